"""A request and its token streams as the scheduler sees them: tokens, progress, blocks, status.

A `Request` holds one `Sequence` per sample it draws (`best_of`, else `n`). The first sequence
prefills the prompt; the others fork from it once the prompt is computed, sharing its blocks.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jpaged.sampling_params import SamplingParams, derive_seed

if TYPE_CHECKING:
    from jpaged.detokenizer import IncrementalDetokenizer
    from jpaged.lora import LoRAAdapter
    from jpaged.outputs import Logprob
    from jpaged.prompt_inputs import InputEmbeds
    from jpaged.structured_output import Grammar

_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    num_output_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)


class Sequence:
    def __init__(self, request: Request, index: int, prompt_token_ids: list[int]):
        self.request = request
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.cumulative_logprob = 0.0
        self.output_logprobs: list[dict[int, Logprob]] = []
        self.seed = derive_seed(request.seed, index)
        self.priority = (request.priority, request.arrival, index)  # scheduled in this order
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None
        self.detokenizer: IncrementalDetokenizer | None = None  # its output text, built by the engine
        self.on_hold = False  # not to be scheduled until released (beam search rounds)
        self.draft_token_ids: list[int] = []  # speculative tokens to follow its last one (ngram_proposer.py)
        self.pooled = None  # runner "pooling", mean or CLS: the running sum or first state (numpy [hidden])
        # Where its output stands in the request's structured-output grammar (None: unconstrained).
        self.grammar: Grammar | None = request.grammar.copy() if request.grammar is not None else None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling_params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, stop: int) -> list[int]:
        num_prompt = len(self.prompt_token_ids)
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= num_prompt:  # decodes: no copy of the whole stream each step
            return self.output_token_ids[start - num_prompt : stop - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - num_prompt]

    def step_token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens `[start, stop)` of the stream continued by the draft tokens (a step's row)."""
        num_tokens = self.num_tokens
        if stop <= num_tokens:
            return self.token_ids(start, stop)
        return self.token_ids(start, num_tokens) + self.draft_token_ids[max(start - num_tokens, 0):stop - num_tokens]

    def chunk_within_images(self, first: int, count: int) -> int:
        """The most of `count` new tokens from position `first` a step may compute: a chunk never
        ends inside an image read bidirectionally (its tokens see its later ones), so it stops
        before such an image it cannot finish, or, starting inside one, takes none unless it
        finishes it."""
        stop = first + count
        for start, end in self.request.bidirectional_spans:
            if start < stop < end:
                return max(start - first, 0)
        return count

    @property
    def computes_prompt_logprobs(self) -> bool:
        """Whether its prefill returns prompt logprobs: its request asks for them and lacks them."""
        return self.request.prompt_logprobs_so_far is not None and self.request.prompt_logprobs is None

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, seed: int, grammar: Grammar | None = None, priority: int = 0,
                 lora: LoRAAdapter | None = None):
        self.request_id = request_id
        self.lora = lora  # the LoRA adapter its tokens run through (None: the base model)
        self.priority = priority  # lower first (vLLM's); always 0 under first-come-first-served
        self.grammar = grammar  # its `params.structured_outputs`, compiled, at the start
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.arrival = next(_arrival_counter)
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.seqs = [Sequence(self, 0, self.prompt_token_ids)]
        self.may_draft = True  # False: its sequences decode one token a step (beam search's rounds)
        self.bad_words_token_ids: list[list[int]] = []  # `params.bad_words` as token sequences (engine)
        self.embedding = None  # the pooling runner's float32 [hidden] embedding of the prompt, once computed
        self.pooling_params = None  # under the pooling runner, its `PoolingParams` (None: the defaults)
        # embeddings that stand in for some of its prompt's token embeddings, in order: its images',
        # or, for an embeds prompt, its own by block (`jpaged/prompt_inputs.py`)
        self.input_embeds: list[InputEmbeds] = []
        self.embeds_prompt = False  # its prompt is embeddings: its token ids are placeholders
        # [start, stop) of each span whose tokens attend to each other, in order (Gemma 3's images,
        # PaliGemma's and EmbeddingGemma's whole prompt): a step computes each whole (`Sequence.chunk_within_images`)
        self.bidirectional_spans: list[tuple[int, int]] = []
        # a prompt with images on a multimodal-RoPE model: its int32 [prompt, 3] positions, and what
        # a later token adds to its index for its position (`jpaged/mrope.py`); None: the indices
        self.mrope_positions = None
        self.mrope_delta = 0
        self.cache_salt: str | None = None  # keys its prefix-cache blocks apart from unsalted ones
        # Per prompt token, its logprob and the top `params.prompt_logprobs` (None for the first):
        # filled as the prefill computes them, and `prompt_logprobs` once all are in.
        wanted = params.prompt_logprobs is not None
        self.prompt_logprobs_so_far: list[dict[int, float] | None] | None = (
            [None] * len(self.prompt_token_ids) if wanted else None)
        self.prompt_logprobs = self.prompt_logprobs_so_far if wanted and len(self.prompt_token_ids) < 2 else None

    @property
    def num_samples(self) -> int:
        return self.params.num_samples

    @property
    def is_finished(self) -> bool:
        return len(self.seqs) == self.num_samples and all(s.is_finished for s in self.seqs)

    def fork(self) -> list[Sequence]:
        """The remaining samples, each a copy of the first sequence's prompt (blocks are shared)."""
        children = [Sequence(self, i, self.prompt_token_ids) for i in range(len(self.seqs), self.num_samples)]
        self.seqs.extend(children)
        return children
