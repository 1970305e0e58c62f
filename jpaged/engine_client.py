"""The engine's one face: what the API (`LLM`), beam search and a server may call.

`EngineClient` is a `typing.Protocol` that `LLMEngine` (one engine) and `DataParallelEngine`
(replicas) both implement; nothing outside the engine reaches into its scheduler, block manager
or model runner. Requests go in by id and come out as `RequestOutput`s from `step()`; aborting a
request frees its KV blocks at once. Beam search also steers single sequences (fork, free), the
one place where a caller holds `Sequence`s. Plain Python: importing this starts no jax.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from jpaged.config import QwenVisionConfig, VisionConfig
from jpaged.lora import LoRARequest
from jpaged.outputs import RequestOutput
from jpaged.pooling import Classifier, PoolingParams
from jpaged.reasoning import ReasoningParser
from jpaged.sampling_params import SamplingParams
from jpaged.sequence import Sequence

PromptType = str | list[int] | dict  # text, token ids, or {"prompt": ...} / {"prompt_token_ids": [...]}


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_swapped: int
    kv_cache_usage: float  # share of device blocks referenced by sequences
    prefix_cache_hit_rate: float  # share of looked-up prompt tokens found in the prefix cache
    num_preemptions: int
    num_swap_outs: int
    num_prompt_tokens_computed: int
    num_generated_tokens: int
    num_compilations: int  # step programs compiled so far (one per new padded shape)
    weight_bytes: int  # the model's parameters on the devices (quantized values and scales included)
    kv_cache_bytes: int  # the KV cache on the devices
    offloaded_weight_bytes: int = 0  # streamed decoder layers' weights, kept off the devices (offload_weights)
    num_resident_layers: int = 0  # decoder layers whose weights stay on the devices
    num_streamed_layers: int = 0  # decoder layers copied onto the devices in every step
    streamed_bytes_per_step: int = 0  # bytes those copies move onto each device per step
    streamed_bytes: int = 0  # bytes copied onto each device so far
    num_draft_tokens: int = 0  # speculative tokens checked so far (SpeculativeConfig)
    num_accepted_draft_tokens: int = 0  # of those, the ones the model's own choices confirmed
    num_blocks: int = 0  # KV cache blocks on the devices (summed over data-parallel replicas)
    num_free_blocks: int = 0  # of those, blocks no request holds (cached prefix blocks included)
    step_temp_bytes: int = 0  # most working memory of a compiled step program so far (XLA's temporaries, per device)


@runtime_checkable
class EngineClient(Protocol):
    """A steppable engine. Attributes: `tokenizer` (an HF tokenizer), `model_name` (str),
    `max_model_len` (prompt + output tokens a request may reach), `max_logprobs` (the most top
    logprobs a request may ask for per token), `eos_token_ids` (set[int]),
    `default_sampling_params` (`SamplingParams` fields that requests which leave them unset
    take, from the model's generation config; see `generation_defaults`), `reasoning_parser`
    (the `ReasoningParser` of `EngineConfig.reasoning_parser`, or None), `runner_type`
    ("generate", or "pooling": requests take no `SamplingParams` and end with their prompt's
    embedding, an `EmbeddingRequestOutput`, its class probabilities, a
    `ClassificationRequestOutput`, or per-token rows, a `PoolingRequestOutput`), `pooling_task`
    (under "pooling", "embed", "classify", "token_embed" or "token_classify"; None under
    "generate"), `classifier` (a classifying engine's head: its labels, activation and
    how it reads a text pair, `jpaged.pooling.Classifier`; None otherwise), `vision_config`
    (a model that reads images: its vision tower, which names each image's placeholder token and
    the placeholders each image widens to, `placeholder_ids`; `jpaged.images.placeholder_offsets`); None
    otherwise), `max_images` (the most images a prompt may hold, `limit_mm_per_prompt`; None: no
    limit), `interleave_mm_strings` (whether a chat template that takes text gets each image's
    token where its part is, `jpaged.images.chat_for_template`), `enable_sleep_mode` (whether
    `sleep` may be called), `profiler_dir` (where `start_profile` writes traces; None: it may
    not be called), `logprobs_mode` (what sampled tokens' logprobs hold, `EngineConfig`'s),
    `enable_prompt_embeds` (whether
    prompts may come as embeddings, `{"prompt_embeds": ...}`)."""

    tokenizer: Any
    model_name: str
    max_model_len: int
    max_logprobs: int
    eos_token_ids: set[int]
    default_sampling_params: dict[str, Any]
    reasoning_parser: ReasoningParser | None
    runner_type: str
    pooling_task: str | None
    classifier: Classifier | None
    vision_config: VisionConfig | QwenVisionConfig | None
    max_images: int | None
    interleave_mm_strings: bool
    enable_sleep_mode: bool
    profiler_dir: str | None
    logprobs_mode: str
    enable_prompt_embeds: bool

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    priority: int = 0, lora_request: LoRARequest | None = None) -> None:
        """Queue a request, run through the LoRA adapter `lora_request` names where given (with
        `enable_lora`). ValueError for an id in use or input that can never be served (empty
        prompt, ids outside the vocabulary, longer than `max_model_len` or the KV cache), a
        `priority` other than 0 under first-come-first-served scheduling (lower values are
        served first under `scheduling_policy="priority"`), an adapter the engine cannot run, or
        params of the other runner (`PoolingParams` go to a pooling engine, `SamplingParams` to a
        generating one)."""
        ...

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read a LoRA adapter now (with `enable_lora`), so that its first request starts at once;
        True. ValueError for one the engine cannot run."""
        ...

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter and clear its device slot; False for an unknown id. ValueError while
        unfinished requests use it."""
        ...

    def list_loras(self) -> set[int]:
        """The ids of the adapters the engine holds."""
        ...

    def abort_request(self, request_id: str) -> None:
        """End a request (finish reason "abort") and free its KV blocks now; unknown ids are ignored."""
        ...

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; the outputs of the requests that advanced in it."""
        ...

    def has_unfinished_requests(self) -> bool: ...

    def get_num_unfinished_requests(self) -> int: ...

    def stats(self) -> EngineStats: ...

    def reset_prefix_cache(self) -> int:
        """Drop every cached block no sequence holds; return how many were dropped."""
        ...

    def sleep(self, level: int = 1) -> None:
        """Free the device memory of the weights and KV cache until `wake_up` (`LLM.sleep`)."""
        ...

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Give back what `sleep` freed (`LLM.wake_up`)."""
        ...

    def is_sleeping(self) -> bool: ...

    def load_weights(self, weights) -> None:
        """Replace the model's weights (all or a subset) with HF-named tensors (`LLM.load_weights`)."""
        ...

    def apply_model(self, func) -> list:
        """`func(model)` on each worker's model (`LLM.apply_model`)."""
        ...

    def start_profile(self, prefix: str | None = None) -> Path:
        """Start a jax profiler trace under `profiler_dir` (`LLM.start_profile`)."""
        ...

    def stop_profile(self) -> Path:
        """End and write the trace (`LLM.stop_profile`)."""
        ...

    def get_sequence(self, request_id: str) -> Sequence:
        """A queued request's first sequence (beam search steers it). KeyError for unknown ids."""
        ...

    def fork_sequence(self, seq: Sequence) -> Sequence:
        """A running copy of `seq` (same tokens, logprobs, progress) sharing its KV blocks."""
        ...

    def free_sequence(self, seq: Sequence) -> None:
        """End `seq` (finish reason "abort" unless it finished) and free its KV blocks now."""
        ...
