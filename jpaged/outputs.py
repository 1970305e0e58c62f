"""What the engine hands back per request: generated text and tokens, and why it stopped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jpaged.sequence import RequestMetrics


@dataclass
class Logprob:
    """A token's logprob at one position, as vLLM reports it."""

    logprob: float  # natural log, of the model's own distribution (before penalties, bias, temperature)
    rank: int | None = None  # 1-based: how many tokens have a logprob >= this one's (1: the top token)
    decoded_token: str | None = None  # the token's text as it reads inside a text (" Paris")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None  # sum of its tokens' logprobs; None unless computed (logprobs, best_of)
    logprobs: list[dict[int, Logprob]] | None = None  # per token: the sampled token's, then the top ones

    def finished(self) -> bool:
        """Whether this sample has ended (a method, as vLLM's)."""
        return self.finish_reason is not None


@dataclass
class EmbeddingOutput:
    embedding: list[float]  # the pooled hidden state (runner "pooling", jpaged/pooling.py); [] if none was made


@dataclass
class EmbeddingRequestOutput:
    """A prompt's embedding, as vLLM's `EmbeddingRequestOutput` (`outputs.embedding`)."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool
    metrics: RequestMetrics | None = None


@dataclass
class ClassificationOutput:
    probs: list[float]  # one per label: the classifier's activation of its logits (jpaged/pooling.py); [] if none
    label: str | None = None  # the most probable label's name (config.json's id2label, else LABEL_<i>)


@dataclass
class ClassificationRequestOutput:
    """A prompt's class probabilities, as vLLM's `ClassificationRequestOutput` (`outputs.probs`)."""

    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    finished: bool
    metrics: RequestMetrics | None = None


@dataclass
class PoolingOutput:
    """What a pooling model made of a prompt (`LLM.encode`): `data` float32, [hidden] (embed),
    [num_labels] (classify), or one row per prompt token, [num_prompt_tokens, hidden]
    (token_embed) or [num_prompt_tokens, num_labels] (token_classify); no rows if none was made.
    vLLM's holds a torch tensor; this one a numpy array."""

    data: np.ndarray


@dataclass
class PoolingRequestOutput:
    """A prompt's pooling output, as vLLM's `PoolingRequestOutput` (`outputs.data`)."""

    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool
    metrics: RequestMetrics | None = None


def pooling_request_output(output: EmbeddingRequestOutput | ClassificationRequestOutput | PoolingRequestOutput
                           ) -> PoolingRequestOutput:
    """`output` as the `PoolingRequestOutput` `LLM.encode` gives: an embedding's or class
    probabilities' values as `data` (float32)."""
    if isinstance(output, PoolingRequestOutput):
        return output
    values = output.outputs.embedding if isinstance(output, EmbeddingRequestOutput) else output.outputs.probs
    return PoolingRequestOutput(output.request_id, PoolingOutput(np.asarray(values, np.float32)),
                                output.prompt_token_ids, output.finished, output.metrics)


@dataclass
class ScoringOutput:
    # a cross-encoder's probability for the pair, the cosine of its embeddings, or the MaxSim of its
    # token embeddings (jpaged/scoring.py)
    score: float


@dataclass
class ScoringRequestOutput:
    """A text pair's score, as vLLM's `ScoringRequestOutput` (`outputs.score`). For a
    bi-encoder, `request_id` joins the query's and the document's, and `prompt_token_ids` holds
    the query's tokens, a pad token where the tokenizer has one, and the document's."""

    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool
    metrics: RequestMetrics | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # per prompt token (None for the first)

    @property
    def num_cached_tokens(self) -> int | None:
        """Prompt tokens served from the prefix cache (vLLM's field; `metrics` holds it)."""
        return None if self.metrics is None else self.metrics.num_cached_prompt_tokens
