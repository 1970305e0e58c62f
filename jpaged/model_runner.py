"""Runs the jitted model step on a scheduled step and returns the sampled tokens.

This is the boundary between the host (Python lists, numpy) and the device (jax): it takes the
step's padded arrays as `jpaged/step_batch.py` prepares them from the scheduler's plan, carries out
the plan's block moves on the KV cache, and calls the step (model, then on-device sampling) with
the KV cache donated so it is updated in place. It owns the model's parameters and KV cache,
placed on this engine's slice of the device mesh under tensor / pipeline / expert parallelism,
where the step's arrays reach every shard replicated.

The step compiles once per padded token count of `StepShapes` (per micro-batch count under a
pipeline): what requests ask for (sampling settings, logprobs, penalties) changes data, never
shapes. The model part of a step and its sampler are two programs: the sampler's depends only on
the logits rows, vocabulary and logprob count, so it compiles once per row count and, through the
cache directory, once for every engine with that vocabulary (it is half the compile time of a
small model's step). Each row count has two samplers: the whole one, and a greedy one for steps
whose rows are all greedy and want no logprobs, which compiles in a fifth of the time, so an
engine that serves only such requests never compiles the whole sampler. `warm_up` runs every one
of those programs once, so no request waits on a compilation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from jpaged.cache_dir import cache_dir
from jpaged.config import CacheConfig, EngineConfig, ModelConfig, RopeConfig
from jpaged.huge_pages import collapse_in_background
from jpaged.interrupts import interrupts_held
from jpaged.kv_cache_ops import HostKVPool, copy_blocks
from jpaged.loader.host_store import HostStore
from jpaged.loader.weights import (
    as_model_layout,
    load_params,
    param_formats,
    replicate_kv_heads,
    split_fused_tensors,
    update_params,
    zeros_at,
)
from jpaged.lora_slots import LoRASlots
from jpaged.models.llama import LlamaForCausalLM
from jpaged.mrope import step_positions
from jpaged.padding import MAX_BIASED_TOKENS, StepShapes
from jpaged.parallel.expert_parallel import expert_parallel_moe
from jpaged.parallel.layout import kv_heads_per_model
from jpaged.parallel.partition import KV_CACHE_SPEC, param_spec, shard_attention_layer
from jpaged.parallel.pipeline import pipeline
from jpaged.program_cache import ProgramCache
from jpaged.sampler import PromptLogprobs, SamplerOutput, prompt_logprobs, sample_greedy, sample_with_logprobs
from jpaged.sampling_params import logprob_cap
from jpaged.scheduler import ScheduledSequence, SchedulerOutput
from jpaged.step_batch import PAD_TOKEN_ID, PADDING_PARAMS, PromptRows, SamplingArrays, StepBatch, prepare_step
from jpaged.structured_output import bitmask_width
from jpaged.weight_streaming import LayerStream, OffloadPlan, device_bytes, plan_offload, to_pinned_host
from pallas_kernels import cpu_kernels
from pallas_kernels.backend import GPU_PLATFORMS, select_attention
from pallas_kernels.cpu_float_matmul import LIBRARY as FLOAT_MATMUL
from pallas_kernels.cpu_float_matmul import TRANSPOSED_LIBRARY as FLOAT_MATMUL_TRANSPOSED
from pallas_kernels.cpu_float_matmul import cpu_float_matmul
from pallas_kernels.cpu_paged_attention import attention_library, cpu_ragged_paged_attention
from pallas_kernels.cpu_quantized_matmul import LIBRARY as QUANTIZED_MATMUL
from pallas_kernels.cpu_quantized_matmul import cpu_block_matmul, cpu_quantized_matmul
from pallas_kernels.paged_attention import AttentionMetadata, paged_attention_layer
from pallas_kernels.pallas_quantized_matmul import select_quantized_linear
from pallas_kernels.quantized_kv import bytes_per_token_head, empty_cache

logger = logging.getLogger("jpaged")

PROMPT_LOGPROBS_TILE = 256  # prompt positions per LM-head product of the prompt logprobs
WAKE_UP_TAGS = ("weights", "kv_cache")  # what `ModelRunner.wake_up` gives back (vLLM's tags)
QUICK_COMPILE_BELOW = 64 * 2**20
"""Weight bytes under which a model's programs compile without LLVM's optimisations
(XLA's backend optimisation level 0, its expensive passes off): such a model's step is host-bound
(stories260K decodes at the same 2-3 ms a step either way on a 2-core CPU), while its sampler
compiles in about 0.6 of the time. The code differs, so values may round differently (stories260K:
the same tokens, logprobs within 2e-5)."""
QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class StepOutput(NamedTuple):
    """What one step returns to the host (numpy)."""

    sampled: SamplerOutput  # one row per scheduled sequence, in the order given
    prompt_rows: PromptRows | None  # what each prompt-logprob row is about; None: no such rows
    prompt_logprobs: PromptLogprobs | None  # one row per `prompt_rows` entry
    draft_sampled: SamplerOutput | None = None  # one row per draft-check token, in order; None: no drafts
    # runner "pooling", no samples: float32 [3, scheduled, hidden] (`pooled_rows`), or with
    # token_states one float32 [num_new_tokens, hidden] per scheduled sequence
    pooled: np.ndarray | list[np.ndarray] | None = None


def memory_spans(tree) -> list[tuple[int, int]]:
    """(address, bytes) of every shard of the jax arrays in `tree` (for `huge_pages`)."""
    return [(shard.data.unsafe_buffer_pointer(), shard.data.nbytes) for x in jax.tree.leaves(tree)
            if isinstance(x, jax.Array) for shard in x.addressable_shards]


def _to_host(tree) -> tuple:
    """`(host copies, placements)` of a tree of device arrays, whose device buffers are then freed."""
    placed = jax.tree.map(lambda x: x.sharding, tree)
    host = jax.tree.map(lambda x: np.array(x, copy=True), tree)  # a copy: on CPU a plain view shares the buffer
    jax.tree.map(lambda x: x.delete(), tree)
    return host, placed


def host_memory_available() -> int | None:
    """Bytes of host memory available to new allocations (Linux's MemAvailable), or None where
    it cannot be read."""
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, ValueError, KeyError, IndexError):
        return None


def pooled_rows(hidden: jax.Array, batch: StepBatch) -> jax.Array:
    """Per row of the step, from the final hidden states `hidden` [N, H] float32: the state at
    its last new token, the sum of its new tokens' states and the state at its first new token,
    stacked as [3, rows, H] float32 (what last-token, mean and CLS pooling take). Under a
    pipeline the rows of each micro-batch index its own `N / M` tokens (a sequence cut across
    micro-batches has its sum and first state split too: only the last token's state is whole)."""
    starts, lens = batch.attention.query_start, batch.attention.query_lens
    micro_batches = starts.shape[0] if starts.ndim > 1 else 1
    per_batch = hidden.shape[0] // micro_batches
    starts = jnp.where(lens > 0, starts, per_batch)  # padding rows (no tokens, start 0) sort after the real ones
    if starts.ndim > 1:  # [M, rows]: tokens numbered within each micro-batch
        starts = (starts + per_batch * jnp.arange(micro_batches)[:, None]).reshape(-1)
        lens = lens.reshape(-1)
    token = jnp.arange(hidden.shape[0])
    row = jnp.clip(jnp.searchsorted(starts, token, side="right") - 1, 0, starts.shape[0] - 1)
    inside = (token >= starts[row]) & (token < starts[row] + lens[row])
    sums = jax.ops.segment_sum(jnp.where(inside[:, None], hidden, 0.0), row, num_segments=starts.shape[0])
    first = hidden[jnp.clip(starts, 0, hidden.shape[0] - 1)]
    return jnp.stack([hidden[batch.logits_indices], sums, first])


def resolve_dtype(dtype: str):
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype]



def tiled_prompt_logprobs(lm_head, hidden: jax.Array, prompt_indices: jax.Array, next_token_ids: jax.Array,
                          k: int) -> PromptLogprobs:
    """`prompt_logprobs` of the hidden states at `prompt_indices` ([T] int32, -1: none, read as
    row 0), `PROMPT_LOGPROBS_TILE` positions at a time, so the step's working memory holds one
    tile's logits `[tile, V]` rather than all T positions' (T x V float32 is a gigabyte at 4,096
    tokens and a 64K vocabulary, reserved by every step program whether or not a request asks).
    `lm_head` maps `[n, hidden]` to the logits `[n, V]`."""
    num_positions = prompt_indices.shape[0]
    tile = min(num_positions, PROMPT_LOGPROBS_TILE)
    num_tiles = -(-num_positions // tile)
    pad = num_tiles * tile - num_positions

    def tiles(x):
        return jnp.pad(x, (0, pad)).reshape(num_tiles, tile)

    def one_tile(args):
        indices, next_ids = args
        return prompt_logprobs(lm_head(hidden[indices]), next_ids, k)

    out = jax.lax.map(one_tile, (tiles(jnp.maximum(prompt_indices, 0)), tiles(next_token_ids)))
    return jax.tree.map(lambda x: x.reshape(num_tiles * tile, *x.shape[2:])[:num_positions], out)


def matmul_precision(dtype):
    """float32 means float32: no TF32 shortcuts in matmuls on GPUs (the step runs under this)."""
    return jax.default_matmul_precision("highest" if jnp.dtype(dtype) == jnp.float32 else "default")


class ModelRunner:
    def __init__(self, model_config: ModelConfig, config: EngineConfig, weights, shapes: StepShapes,
                 mesh: Mesh | None = None, packed: dict[str, str] | None = None, token_states: bool = False,
                 reads_embeds: bool = False, mrope: bool = False, bidirectional: bool = False):
        """`shapes` are the padded sizes of every step; `mesh` is this engine's slice of the device
        mesh ("pp", "ep", "tp"); None: one device. `packed` names the tensors `weights` yields as
        GGML block rows (HF name: GGML type), kept so on the device. `token_states` (runner
        "pooling"): the steps return every token's final state rather than `pooled_rows`.
        `reads_embeds`: the steps take embeddings in place of some tokens' embeddings (the
        requests' `input_embeds`: images, embeds prompts). `mrope`: the steps give each token three
        positions (`jpaged/mrope.py`), for a multimodal-RoPE model that reads images.
        `bidirectional`: the steps give each token the end of the keys it sees
        (`AttentionMetadata.key_ends`), for a model whose images' tokens see each other (Gemma 3)
        or whose whole prompt does (PaliGemma, EmbeddingGemma): `Request.bidirectional_spans`."""
        if packed and mesh is not None:
            sizes = {name: getattr(config.parallel, f"{name}_parallel_size") for name in
                     ("tensor", "pipeline", "expert", "data")}
            layout = ", ".join(f"{name}_parallel_size={size}" for name, size in sizes.items() if size > 1)
            raise ValueError(f"quantization='gguf' runs on one device, not with {layout}; use quantization='int8' to "
                             "split a quantized model over devices")
        cache_config, self.parallel = config.cache, config.parallel
        self.shapes = shapes
        self.mesh = mesh
        kv_heads = kv_heads_per_model(model_config, self.parallel.tensor_parallel_size)
        weights_kv_heads = model_config.num_kv_heads
        self._checkpoint_config = model_config  # as the checkpoint's tensors are laid out
        self.model_config = model_config = dataclasses.replace(model_config, num_kv_heads=kv_heads)
        weights = self._model_layout(weights)
        self.block_size = cache_config.block_size
        self.kv_cache_dtype = cache_config.kv_cache_dtype
        self.dtype = dtype = resolve_dtype(config.dtype)
        self.num_logprobs = min(logprob_cap(config.max_logprobs, model_config.vocab_size), model_config.vocab_size)
        # the steps return hidden states ("rows": `pooled_rows`, "tokens": every token's), not logits,
        # and sample nothing
        self.pooling = None if config.runner != "pooling" else "tokens" if token_states else "rows"
        quantization = config.quantization if config.quantization != "gguf" else None
        formats = param_formats(packed or {})
        abstract = nnx.eval_shape(lambda: LlamaForCausalLM(model_config, dtype, quantization=quantization,
                                                           weight_formats=formats, **self._layouts(config)))
        self._abstract_model = abstract
        self.graphdef, state = nnx.split(abstract)
        self._abstract = nnx.to_pure_dict(state)
        self._shape_model = nnx.merge(self.graphdef, jax.tree.map(lambda x: x, state))  # parameters as shapes
        self.offload = self._plan_offload(config)
        store = HostStore(cache_dir() / "offload" if config.offload_weights == "disk" else None)

        def sharding(path, shape, dtype):
            if self.offload is not None and path[0] == "layers" and self.offload.streams(path[1]):
                return store
            return self._device_sharding(path, shape, dtype)

        nnx.replace_by_pure_dict(state, load_params(abstract, model_config, weights, sharding))
        store.seal()
        self.state, self.stream = state, None
        self.lora = self._lora_slots(config, kv_heads != weights_kv_heads)
        if self.offload is not None:  # the step's parameters are the rest; the layers are passed one by one
            loaded = nnx.to_pure_dict(state)
            self.stream = self._layer_stream(loaded.pop("layers"), config)
            self.state = loaded
        on_cpu = jax.default_backend() == "cpu"
        self.huge_pages = collapse_in_background(memory_spans(self._resident_weights())) if on_cpu else None
        self.attention = self._attention_ready(config)
        self.num_blocks = cache_config.num_blocks or self._blocks_for_budget(cache_config)
        self._check_kv_memory()
        shape = (model_config.num_layers, self.num_blocks, self.block_size,
                 model_config.num_kv_heads, model_config.head_dim)

        def place(shape, dtype):  # a value array or its scales, split as the cache is
            spec = PartitionSpec(*KV_CACHE_SPEC[:len(shape)])
            return zeros_at(shape, dtype, NamedSharding(mesh, spec) if mesh is not None else None)

        bf16_as_bits = jax.default_backend() == "cpu" and self.attention in ("cpu", "reference")
        self.kv_cache = tuple(empty_cache(shape, cache_config.kv_cache_dtype, dtype, place, bf16_as_bits)
                              for _ in "kv")
        swaps = config.scheduler.preemption_mode == "swap"
        self.num_host_blocks = int(cache_config.swap_space_gib * 2**30 // self.block_bytes) if swaps else 0
        self._check_swap_memory(swaps, cache_config.swap_space_gib)
        self.host_pool = HostKVPool(self.kv_cache, self.num_host_blocks)
        self.reads_embeds = reads_embeds
        self.mrope = mrope
        self.bidirectional = bidirectional
        self._placeholders: dict[tuple, jax.Array] = {}
        self._asleep: dict | None = None  # what `sleep` moved off the devices, by tag
        self._decodes_prefetched: set[tuple[int, ProgramCache]] = set()  # (tokens, sampler)
        self._config = config
        self._make_programs()

    def _model_layout(self, weights: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
        """A checkpoint's tensors as the model keeps them: fused ones split, projections laid out,
        KV heads repeated where the tensor-parallel shards outnumber them."""
        cfg = self._checkpoint_config
        return replicate_kv_heads(as_model_layout(split_fused_tensors(weights, cfg), cfg), cfg,
                                  self.model_config.num_kv_heads)

    def load_weights(self, weights: Iterable[tuple[str, np.ndarray]]) -> None:
        """Write `weights` (a checkpoint's tensors by HF name, numpy arrays) into the model,
        placed, split and quantized as at start; the step programs stay compiled. Any subset of
        the tensors may come, the others stay as they are (`loader.weights.update_params`);
        after `sleep(discard_weights=True)`, all of them. The weights are in use (awake)
        afterwards, also after `sleep`. The parameters written are replaced only once every
        tensor has been read, so for a moment both are on the device. ValueError naming a tensor
        of the wrong shape, for another layer or expert, or (after a level-2 sleep) missing; the
        old weights then stay. ValueError with `offload_weights`."""
        if self.stream is not None:
            raise ValueError("load_weights replaces weights kept on the device; with offload_weights the layers "
                             "stream from host memory")
        if self.weights_discarded:
            loaded = load_params(self._abstract_model, self.model_config, self._model_layout(weights),
                                 self._device_sharding)
            written = loaded
        else:
            self.wake_up(("weights",))
            current = nnx.to_pure_dict(self.state)
            loaded = update_params(current, self.model_config, self._model_layout(weights),
                                   self.parallel.tensor_parallel_size)
            written = [new for new, old in zip(jax.tree.leaves(loaded), jax.tree.leaves(current)) if new is not old]
        _, state = nnx.split(self._abstract_model)
        nnx.replace_by_pure_dict(state, loaded)
        self.state = state
        if self._asleep is not None:
            self._asleep.pop("weights", None)
            self._asleep = self._asleep or None
        if jax.default_backend() == "cpu":
            self.huge_pages = collapse_in_background(memory_spans(written))

    def _make_programs(self) -> None:
        """The (empty) caches of the step and sampler programs."""
        config = self._config
        programs = cache_dir() / "programs" if config.compilation_cache else None
        weights = self.state if self.stream is None else [self.state, self.stream.layers]  # streamed layers too
        options = QUICK_COMPILE if sum(x.nbytes for x in jax.tree.leaves(weights)) < QUICK_COMPILE_BELOW else None
        context, sampler_context = (f"{text}\n{options}" for text in (self._program_context(config),
                                                                      self._sampler_context()))
        self._step = ProgramCache(self._step_fn, (1,), 2, context, programs, options)
        self._sampler = ProgramCache(self._sample, (), 0, sampler_context, programs, options)
        self._greedy_sampler = ProgramCache(self._sample_greedy, (), 0, sampler_context, programs, options)
        if self.stream is not None:
            self._embed = ProgramCache(self._embed_fn, (), 1, context, programs, options)
            self._layer = ProgramCache(self._layer_fn, (1,), 2, context, programs, options)
            self._head = ProgramCache(self._head_fn, (), 1, context, programs, options)

    def use_rope(self, rope: RopeConfig) -> None:
        """Rotate with `rope` rather than the model config's (LongRoPE's factors for the context the
        engine settles on once the KV cache is sized). Call before the first step: it starts the
        step programs afresh."""
        if rope == self.model_config.rope:
            return
        self.model_config = dataclasses.replace(self.model_config, rope=rope)
        self._shape_model.cfg = self.model_config
        self.graphdef, _ = nnx.split(self._shape_model)
        self._make_programs()

    def _lora_slots(self, config: EngineConfig, kv_heads_replicated: bool) -> LoRASlots | None:
        """The LoRA slots (None without `enable_lora`), a whole copy on every device of the mesh.
        ValueError where tensor parallelism replicates KV heads (adapters' k / v factors are not)."""
        if not config.lora.enable_lora:
            return None
        if kv_heads_replicated:
            raise ValueError(f"enable_lora under tensor_parallel_size={self.parallel.tensor_parallel_size} needs at "
                             f"least as many KV heads as devices; the model has fewer, and they would be replicated")
        return LoRASlots(self.model_config, config.lora, self.dtype, self._replicated())

    def _layouts(self, config: EngineConfig) -> dict:
        """The model's attention, MoE, layer runner and stage count for this backend and device layout."""
        model_config, mesh, parallel = self.model_config, self.mesh, self.parallel
        kernels = cache_dir() / "kernels" if config.attention_backend in ("auto", "cpu") else None
        attend = select_attention(config.attention_backend, model_config.head_dim, config.attention_interpret,
                                  kernel_dir=kernels, dtype=self.dtype, kv_cache_dtype=self.kv_cache_dtype)
        self._cpu_kernel = attend is cpu_ragged_paged_attention  # its library is building already
        self._product_libraries = []  # the CPU kernels' libraries of the products
        layouts = dict(attention=paged_attention_layer(attend))
        if self._cpu_kernel and mesh is None and self.dtype == jnp.float32:
            self._product_libraries += [FLOAT_MATMUL, FLOAT_MATMUL_TRANSPOSED]
            layouts.update(float_linear=cpu_float_matmul)
        if config.quantization and mesh is None and jax.default_backend() == "cpu" and cpu_kernels.compiler():
            self._product_libraries.append(QUANTIZED_MATMUL)
            layouts.update(quantized_linear=cpu_quantized_matmul, block_linear=cpu_block_matmul)
        elif config.quantization and mesh is None and jax.default_backend() in GPU_PLATFORMS:
            layouts.update(quantized_linear=select_quantized_linear())
        for library in self._product_libraries:
            cpu_kernels.start_build(cache_dir() / "kernels", library)
        if parallel.tensor_parallel_size > 1:
            layouts["attention"] = shard_attention_layer(layouts["attention"], mesh)
            layouts["tensor_parallel_size"] = parallel.tensor_parallel_size
        if model_config.is_moe and parallel.tensor_parallel_size * parallel.expert_parallel_size > 1:
            layouts["moe"] = expert_parallel_moe(mesh)
        if parallel.pipeline_parallel_size > 1:
            layouts.update(run_layers=pipeline(mesh), pipeline_stages=parallel.pipeline_parallel_size)
        return layouts

    def _attention_ready(self, config: EngineConfig) -> str:
        """Wait for the CPU kernels' builds (they ran while the weights loaded); the attention backend's name."""
        for library in self._product_libraries:
            if reason := cpu_kernels.wait(library):
                logger.warning("%s; %s", reason, "quantized products use the jnp reference" if library == QUANTIZED_MATMUL
                               else "those products are XLA's")
        if not self._cpu_kernel:
            return config.attention_backend
        reason = cpu_kernels.wait(attention_library(self.dtype, self.kv_cache_dtype))
        if reason and config.attention_backend == "cpu":
            raise RuntimeError(reason)
        if reason:
            logger.warning("%s; using the jnp reference", reason)
        return "reference" if reason else "cpu"

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's parameters kept on the devices (all shards together; streamed
        layers not counted)."""
        return sum(x.nbytes for x in jax.tree.leaves(self._resident_weights()))

    def _resident_weights(self):
        """The parameters kept on the devices: the whole model, or all but the streamed layers."""
        if self.stream is None:
            return self.state
        return [self.state, [layer for i, layer in enumerate(self.stream.layers) if not self.offload.streams(i)]]

    def apply_model(self, func: Callable):
        """`func(model)` on the Flax model (an `nnx.Module`) holding the weights as they sit on the
        devices (split over the mesh, quantized and fused as the engine keeps them); returns what
        `func` returns. `func` should read the model, not change it (`load_weights` replaces
        weights). ValueError while the weights are asleep and with `offload_weights` (the layers
        live in host memory or on disk)."""
        if self.stream is not None:
            raise ValueError("apply_model runs on weights kept on the device; with offload_weights the layers "
                             "stream from host memory or disk")
        if self.state is None:
            raise ValueError("apply_model needs the weights, which sleep freed: wake_up(['weights']) first")
        return func(self._model(self.state))

    def sleep(self, discard_weights: bool = False) -> None:
        """Free the device memory of the weights and the KV cache (vLLM's sleep): the weights
        are copied to host memory first (level 1), or with `discard_weights` dropped (level 2,
        the host copy of an earlier sleep too: `load_weights` brings weights back); the cache's
        contents are dropped. The step programs stay compiled. ValueError where the weights are
        streamed (`offload_weights`: they already live in host memory)."""
        if self.stream is not None:
            raise ValueError("sleep frees device memory; with offload_weights the weights already live in host "
                             "memory and stream through the device")
        if self._asleep is None:
            self._asleep = {}
        if "weights" not in self._asleep:
            if discard_weights:
                jax.tree.map(lambda x: x.delete(), self.state)
            self._asleep["weights"] = None if discard_weights else _to_host(self.state)
            self.state = None
        elif discard_weights:
            self._asleep["weights"] = None
        if "kv_cache" not in self._asleep:
            self._asleep["kv_cache"] = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.kv_cache)
            jax.tree.map(lambda x: x.delete(), self.kv_cache)
            self.kv_cache = None

    def wake_up(self, tags: tuple[str, ...] = WAKE_UP_TAGS) -> None:
        """Give back what `sleep` freed, all of it or `tags`' parts ("weights": the same weights,
        placed as before; "kv_cache": an empty cache of the same shape)."""
        if self._asleep is None:
            return
        if "weights" in tags and self.weights_discarded:
            raise ValueError("the weights were discarded (sleep level 2): load_weights brings weights back")
        if "weights" in tags and "weights" in self._asleep:
            host, placed = self._asleep.pop("weights")
            self.state = jax.tree.map(jax.device_put, host, placed)
            if jax.default_backend() == "cpu":
                self.huge_pages = collapse_in_background(memory_spans(self._resident_weights()))
        if "kv_cache" in tags and "kv_cache" in self._asleep:
            self.kv_cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding),
                                         self._asleep.pop("kv_cache"))
        if not self._asleep:
            self._asleep = None

    @property
    def weights_discarded(self) -> bool:
        """Whether `sleep(discard_weights=True)` dropped the weights and no `load_weights` has
        brought them back."""
        return self._asleep is not None and "weights" in self._asleep and self._asleep["weights"] is None

    @property
    def is_sleeping(self) -> bool:
        """Whether `sleep` freed something that `wake_up` has not given back."""
        return self._asleep is not None

    @property
    def sleeping_parts(self) -> list[str]:
        """What `sleep` freed and `wake_up` has not given back, by name ("weights", "KV cache")."""
        return [{"weights": "weights", "kv_cache": "KV cache"}[tag] for tag in WAKE_UP_TAGS if tag in (self._asleep or {})]

    def offload_stats(self) -> dict[str, int]:
        """`EngineStats`' fields about streamed layers."""
        plan = self.offload or OffloadPlan(self.model_config.num_layers, self.model_config.num_layers, 0, 0)
        return dict(offloaded_weight_bytes=self.offloaded_bytes, num_resident_layers=plan.num_resident,
                    num_streamed_layers=plan.num_streamed, streamed_bytes_per_step=plan.num_streamed * plan.layer_bytes,
                    streamed_bytes=self.stream.bytes_copied if self.stream else 0)

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of the streamed layers' weights, kept off the devices."""
        if self.stream is None:
            return 0
        return sum(x.nbytes for i, layer in enumerate(self.stream.layers) if self.offload.streams(i)
                   for x in jax.tree.leaves(layer))

    @property
    def kv_cache_bytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.kv_cache))

    def _device_sharding(self, path: tuple, shape: tuple[int, ...], dtype):
        """Where the parameter at `path` lives on the device(s); None: the default device."""
        return NamedSharding(self.mesh, param_spec(path, shape, self.mesh, dtype)) if self.mesh is not None else None

    def _plan_offload(self, config: EngineConfig) -> OffloadPlan | None:
        if config.offload_weights is None:
            return None
        abstract = self._abstract
        others = {name: value for name, value in abstract.items() if name != "layers"}
        plan = plan_offload(self.model_config.num_layers, device_bytes(abstract["layers"][0], self._placed_at(0)),
                            device_bytes(others, self._device_sharding), config.device_weight_budget_gib)
        if plan.num_streamed == 0:
            logger.info("offload_weights=%s: every decoder layer fits device_weight_budget_gib=%s; none streams",
                        config.offload_weights, config.device_weight_budget_gib)
            return None
        logger.info("offload_weights=%s: %d decoder layers on the device, %d streamed from %s (%.1f MiB each, "
                    "%.1f MiB copied to each device per step)", config.offload_weights, plan.num_resident,
                    plan.num_streamed, "host memory" if config.offload_weights == "host" else "memory-mapped files",
                    plan.layer_bytes / 2**20, plan.num_streamed * plan.layer_bytes / 2**20)
        return plan

    def _placed_at(self, layer: int):
        """`_device_sharding` for the parameters of layer `layer`, given their paths within it."""
        return lambda path, shape, dtype: self._device_sharding(("layers", layer, *path), shape, dtype)

    def _layer_stream(self, loaded_layers: dict, config: EngineConfig) -> LayerStream:
        """The decoder layers' weights (`loaded_layers`: layer: weight dict), the streamed ones
        held off the device."""
        device = jax.devices()[0] if self.mesh is None else None
        layers, shardings = [], []
        for i, layer in sorted(loaded_layers.items()):
            where = {name: self._device_sharding(("layers", i, name), x.shape, x.dtype) or SingleDeviceSharding(device)
                     for name, x in layer.items()}
            if self.offload.streams(i) and config.offload_weights == "host":
                layer = to_pinned_host(layer, where)
            layers.append(layer)
            shardings.append(where)
        return LayerStream(layers, shardings, self.offload)

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block over all layers, K and V (their scales included)."""
        cfg = self.model_config
        per_token_head = bytes_per_token_head(self.kv_cache_dtype, self.dtype, cfg.head_dim)
        return 2 * cfg.num_layers * cfg.num_kv_heads * self.block_size * per_token_head

    @property
    def _device_block_bytes(self) -> int:
        """Bytes of one KV block on each device: its stage's layers of its KV heads."""
        return self.block_bytes // (self.parallel.tensor_parallel_size * self.parallel.pipeline_parallel_size)

    @property
    def first_device(self):
        return self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]

    def _blocks_for_budget(self, cache_config: CacheConfig) -> int:
        block_bytes, device = self._device_block_bytes, self.first_device
        stats = device.memory_stats() if device.platform != "cpu" else None
        if stats and "bytes_limit" in stats:
            budget = stats["bytes_limit"] * cache_config.gpu_memory_utilization - stats["bytes_in_use"]
            source = f"gpu_memory_utilization={cache_config.gpu_memory_utilization} of the device's memory"
        else:
            budget = cache_config.cpu_kv_cache_gib * 2**30
            source = f"cpu_kv_cache_gib={cache_config.cpu_kv_cache_gib}"
        num_blocks = int(budget // block_bytes)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget / 2**20:.1f} MiB ({source}) holds no block of "
                             f"{block_bytes / 2**20:.2f} MiB")
        return num_blocks

    def _check_kv_memory(self) -> None:
        """ValueError naming the settings where the KV cache cannot fit in its memory (each
        device's share on accelerators; on CPUs every device's in host memory)."""
        device = self.first_device
        if device.platform == "cpu":
            need, free, settings = self.num_blocks * self.block_bytes, host_memory_available(), "cpu_kv_cache_gib"
        else:
            stats = device.memory_stats() or {}
            free = stats["bytes_limit"] - stats["bytes_in_use"] if "bytes_limit" in stats else None
            need, settings = self.num_blocks * self._device_block_bytes, "gpu_memory_utilization"
        if free is not None and need > free:
            raise ValueError(f"the KV cache's {self.num_blocks} blocks need {need / 2**30:.2f} GiB of "
                             f"{device.platform} memory, more than the {free / 2**30:.2f} GiB available: lower "
                             f"num_blocks or {settings}")

    def _check_swap_memory(self, swaps: bool, swap_space_gib: float) -> None:
        """ValueError where the swap pool cannot fit in host memory; a warning where it holds no block."""
        if swaps and self.num_host_blocks == 0:
            logger.warning("swap_space_gib=%s holds no KV block of %.2f MiB: preempted sequences are recomputed",
                           swap_space_gib, self.block_bytes / 2**20)
        free = host_memory_available()
        if free is not None and self.num_host_blocks * self.block_bytes > free:
            raise ValueError(f"swap_space_gib={swap_space_gib} is more than the {free / 2**30:.2f} GiB of host memory "
                             "available for swapped-out blocks")

    def _program_context(self, config: EngineConfig) -> str:
        """Every setting the step program is made from beyond its arguments' shapes."""
        parallel = dataclasses.replace(self.parallel, data_parallel_size=1)  # a replica's programs: any count of them
        return repr((self.model_config, self.dtype, self.attention, config.attention_interpret, config.quantization,
                     self.kv_cache_dtype, cpu_kernels.loaded(), parallel,
                     self.block_size, self.shapes, self._mesh_layout(), self.num_logprobs, self.pooling))

    def _sampler_context(self) -> str:
        """Every setting the sampler program is made from beyond its arguments' shapes."""
        return repr(("sampler", self._mesh_layout(), self.num_logprobs, self._config.logprobs_mode))

    def _mesh_layout(self) -> tuple | None:
        """The mesh's axes and shape (None: one device), for the programs' keys, which name no
        device: a program serves every mesh of its layout (`program_cache.py`)."""
        if self.mesh is None:
            return None
        return self.mesh.axis_names, self.mesh.devices.shape

    @property
    def num_compilations(self) -> int:
        """Step and sampler programs made ready so far (compiled, or loaded from the cache
        directory)."""
        samplers = self._sampler.num_programs + self._greedy_sampler.num_programs
        if self.stream is None:
            return self._step.num_programs + samplers
        return self._layer.num_programs + samplers  # with the embedding and head per step shape

    @property
    def step_temp_bytes(self) -> int:
        """The most working memory (XLA's temporaries, bytes per device) any step or sampler
        program made ready so far needs beyond its arguments and outputs."""
        samplers = [self._sampler, self._greedy_sampler]
        caches = [self._step, *samplers] if self.stream is None else [self._embed, self._layer, self._head, *samplers]
        return max(cache.max_temp_bytes for cache in caches)

    def _model(self, state):
        return nnx.merge(self.graphdef, state)

    def _step_fn(self, params, kv_cache, batch: StepBatch):
        """((logits, PromptLogprobs), kv_cache): the float32 logits of the rows that sample; prompt
        logprobs only when the batch has prompt rows (zeros otherwise). `params`: the model's
        state and the LoRA slots' weights (None without LoRA)."""
        state, lora_weights = params
        lora = None if lora_weights is None else (lora_weights, batch.lora_slots, self.lora.column_slots)
        embeds = None if batch.input_embeds is None else (batch.input_embeds, batch.input_embeds_mask)
        with matmul_precision(self.dtype):
            model = self._model(state)
            hidden, kv_cache = model(batch.token_ids, batch.positions, kv_cache, batch.attention, lora, embeds)
            return self._outputs(model, hidden, batch), kv_cache

    def _outputs(self, model, hidden, batch: StepBatch):
        """(logits [rows, V] float32, PromptLogprobs) from the final hidden states `[N, hidden]`;
        under the pooling runner (`pooled_rows`, None), or (the states as float32, None) with
        token_states."""
        if self.pooling == "tokens":
            return hidden.astype(jnp.float32), None
        if self.pooling:
            return pooled_rows(hidden.astype(jnp.float32), batch), None
        logits = model.logits(hidden[batch.logits_indices]).astype(jnp.float32)

        def prompt(hidden):
            return tiled_prompt_logprobs(model.logits, hidden, batch.prompt_indices, batch.prompt_next_ids,
                                         self.num_logprobs)

        def no_prompt(hidden):
            return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(prompt, hidden))

        return logits, jax.lax.cond(jnp.any(batch.prompt_indices >= 0), prompt, no_prompt, hidden)

    # Streamed layers (weight_streaming.py): the step as an embedding program, one program per
    # decoder layer (the same for all), and the head; `state` holds the parameters but the layers.

    def _model_with(self, state: dict):
        """The model with `state`'s parameters (its layers as shapes only)."""
        graphdef, full = nnx.split(self._shape_model)
        nnx.replace_by_pure_dict(full, state)
        return nnx.merge(graphdef, full)

    def _embed_fn(self, state, token_ids):
        with matmul_precision(self.dtype):
            return self._model_with(state).embed(token_ids)

    def _layer_fn(self, weights, kv_cache, hidden, positions, md: AttentionMetadata, layer):
        with matmul_precision(self.dtype):
            return self._shape_model.decode(hidden, positions, kv_cache, md, [weights], first_layer=layer)

    def _head_fn(self, state, hidden, batch: StepBatch):
        with matmul_precision(self.dtype):
            model = self._model_with(state)
            return self._outputs(model, model.final_norm(hidden), batch)

    def _run_streamed(self, batch: StepBatch) -> tuple[jax.Array, PromptLogprobs]:
        batch = jax.device_put(self._step_args(batch)[2])  # used by every layer's program
        hidden = self._embed(self.state, batch.token_ids)

        def run_layer(i: int, weights: dict) -> jax.Array:
            nonlocal hidden
            hidden, self.kv_cache = self._layer(weights, self.kv_cache, hidden, batch.positions, batch.attention,
                                                np.int32(i))
            return hidden

        self.stream.run(run_layer)
        return self._head(self.state, hidden, batch)

    def _sample(self, logits: jax.Array, sampling: SamplingArrays) -> SamplerOutput:
        """The sampler program: tokens, with their top `num_logprobs` logprobs when some row
        wants them (zeros otherwise)."""
        return sample_with_logprobs(logits, sampling, None, self.num_logprobs, self._config.logprobs_mode,
                                    when_wanted=True)

    def _sample_greedy(self, logits: jax.Array, sampling: SamplingArrays) -> SamplerOutput:
        """The sampler program of steps whose rows are all greedy and want no logprobs: `_sample`'s
        tokens, its logprob fields zeros."""
        return sample_greedy(logits, sampling, self.num_logprobs)

    def _sampler_for(self, sampling: SamplingArrays) -> ProgramCache:
        """The smaller greedy sampler where every row of `sampling` (host arrays) is greedy and
        none wants logprobs, else the whole sampler."""
        if np.any(np.asarray(sampling.temperature) > 0) or np.any(np.asarray(sampling.logprobs_wanted)):
            return self._sampler
        return self._greedy_sampler

    def move_blocks(self, plan: SchedulerOutput) -> None:
        """Carry out the step's block moves before it runs: swap-outs, copy-on-write copies, then
        swap-ins (the order the block manager's bookkeeping assumes)."""
        with interrupts_held():  # the moves donate the cache
            self.host_pool.swap_out(self.kv_cache, plan.swap_out)
            self.kv_cache = copy_blocks(self.kv_cache, plan.block_copies, self.shapes.max_num_seqs)
            self.kv_cache = self.host_pool.swap_in(self.kv_cache, plan.swap_in)

    def programs(self) -> list[tuple[int, int]]:
        """`(micro-batches, tokens per micro-batch)` of every step program this configuration can
        run: one per token count, and under a pipeline one per micro-batch count too (a step of
        fewer tokens than micro-batches is cut into single tokens)."""
        counts = self.shapes.token_counts
        if self.parallel.pipeline_parallel_size == 1:
            return [(1, count) for count in counts]
        cuts = sorted({self.parallel.decode_micro_batches, self.parallel.prefill_micro_batches})
        return sorted({(m, count) for m in cuts for count in counts} | {(m, 1) for m in range(1, cuts[-1])})

    def warm_up(self, progress=None) -> None:
        """Compile (or load from the cache directory) every step program and block move, two at
        a time, running each once on padding that writes nothing. `progress(n)` is called after
        each program."""
        steps = [self._padding_step(*program) for program in self.programs()]
        for step in steps if self.stream is None else ():
            self._prefetch(*step)
        for batch, sampling in steps:
            logits, _ = self._forward(batch)
            if not self.pooling:  # both samplers: a padding step's rows are greedy
                args = self._sampler_args(sampling)
                self._sampler(logits, args)
                self._greedy_sampler(logits, args)
            if progress:
                progress(1)
        empty = [(self.num_blocks, self.num_blocks)]  # a pair past the cache's end: moves nothing
        self.kv_cache = copy_blocks(self.kv_cache, empty, self.shapes.max_num_seqs)
        if self.num_host_blocks:
            self.host_pool.swap_out(self.kv_cache, [(0, 0)])
            self.kv_cache = self.host_pool.swap_in(self.kv_cache, [(0, self.num_blocks)])
        jax.block_until_ready(self.kv_cache)

    def _padding_step(self, micro_batches: int, num_tokens: int) -> tuple[StepBatch, SamplingArrays]:
        """A step of `micro_batches` x `num_tokens` padding tokens, laid out as real ones are."""
        num_rows = self.shapes.num_rows(num_tokens)
        lead = (micro_batches,) if self.parallel.pipeline_parallel_size > 1 else ()

        def ints(*shape, fill=0):
            return np.full(lead + shape, fill, np.int32)

        attention = AttentionMetadata(
            slot_mapping=ints(num_tokens, fill=-1), block_tables=ints(num_rows, self.shapes.max_blocks_per_seq),
            context_lens=ints(num_rows), query_start=ints(num_rows), query_lens=ints(num_rows))
        positions = ints(num_tokens, 3) if self.mrope else ints(num_tokens)
        batch = StepBatch(ints(num_tokens), positions, np.zeros(micro_batches * num_rows, np.int64), attention)
        rows = micro_batches * num_rows
        sampling = SamplingArrays.build([PADDING_PARAMS] * rows, [0] * rows, [0] * rows, pad_to=rows)
        return batch, sampling

    def execute(self, scheduled: list[ScheduledSequence], eos_token_ids: list[int]) -> StepOutput:
        """Run one step; per scheduled sequence (in the given order) its sampled token and, where
        a request wants them, logprobs (rows that do not sample carry meaningless values); the
        prompt logprobs of the prompt positions computed in this step, where wanted; and the
        samples (and logprobs, where wanted) that check the step's draft tokens, where it has some.
        `eos_token_ids` are blocked for rows still under their `min_tokens`."""
        step = prepare_step(scheduled, self.block_size, self.shapes, self.parallel, eos_token_ids,
                            self.model_config.vocab_size)
        if any(s.num_new_tokens > 1 for s in scheduled) and all(s.samples for s in scheduled):
            self._prefetch_decode(len(scheduled), self._sampler_for(step.sampling))
        batch = step.batch if self.lora is None else dataclasses.replace(
            step.batch, lora_slots=self._lora_token_slots(scheduled, step.batch, step.rows))
        if self.reads_embeds:
            batch = self._with_input_embeds(scheduled, batch, step.rows)
        if self.mrope:
            batch = self._with_mrope_positions(scheduled, batch, step.rows)
        if self.bidirectional:
            batch = self._with_key_ends(scheduled, batch, step.rows)
        sampled, prompt = self._run(batch, step.sampling)
        if self.pooling == "tokens":
            states, starts, lens = np.asarray(sampled), batch.attention.query_start, batch.attention.query_lens
            return StepOutput(None, None, None, pooled=[states[starts[r]:starts[r] + lens[r]] for r in step.rows])
        if self.pooling:
            return StepOutput(None, None, None, pooled=np.asarray(sampled)[:, step.rows])
        fields = [np.asarray(field) for field in (sampled if step.wants_logprobs else sampled[:1])]
        drafts = None if step.draft_rows is None else SamplerOutput(*(field[step.draft_rows] for field in fields))
        sampled = SamplerOutput(*(field[step.rows] for field in fields))
        if step.prompt_rows is None:
            return StepOutput(sampled, None, None, drafts)
        prompt = PromptLogprobs(*(np.asarray(field)[: len(step.prompt_rows.owner)] for field in prompt))
        return StepOutput(sampled, step.prompt_rows, prompt, drafts)

    def _lora_token_slots(self, scheduled: list[ScheduledSequence], batch: StepBatch, rows: np.ndarray
                          ) -> np.ndarray | None:
        """Each of the step's tokens' LoRA slot (-1: none), the adapters it needs put in slots;
        None when no sequence of the step has an adapter."""
        adapters = [item.seq.request.lora for item in scheduled if item.seq.request.lora is not None]
        if not adapters:
            return None
        slot_of = self.lora.assign(adapters)
        slots = np.full(batch.token_ids.size, -1, np.int32)
        starts, lengths = batch.attention.query_start, batch.attention.query_lens
        for item, row in zip(scheduled, rows):
            if item.seq.request.lora is not None:
                slots[starts[row]:starts[row] + lengths[row]] = slot_of[item.seq.request.lora.lora_int_id]
        return slots

    @property
    def embeds_width(self) -> int:
        """Columns of a step's input embeddings: the hidden size, once more per DeepStack layer."""
        return self.model_config.hidden_size * (1 + self.model_config.deepstack_layers)

    @staticmethod
    def _with_mrope_positions(scheduled: list[ScheduledSequence], batch: StepBatch, rows: np.ndarray) -> StepBatch:
        """`batch` with each token's three multimodal-RoPE positions, `[T, 3]` (`jpaged/mrope.py`)."""
        positions = np.repeat(np.asarray(batch.positions)[:, None], 3, axis=1)
        starts, lengths = batch.attention.query_start, batch.attention.query_lens
        for item, row in zip(scheduled, rows):
            request, span = item.seq.request, slice(starts[row], starts[row] + lengths[row])
            if request.mrope_positions is not None:
                positions[span] = step_positions(positions[span, 0], request.mrope_positions, request.mrope_delta)
        return dataclasses.replace(batch, positions=positions)

    @staticmethod
    def _with_key_ends(scheduled: list[ScheduledSequence], batch: StepBatch, rows: np.ndarray) -> StepBatch:
        """`batch` with each token's key end where it lies in a span read bidirectionally (an
        image, or PaliGemma's or EmbeddingGemma's prompt: the span's end; `Request.bidirectional_spans`), 0 (causal)
        elsewhere; unchanged when no token does."""
        ends = None
        starts = batch.attention.query_start
        for item, row in zip(scheduled, rows):
            first, stop = item.seq.num_computed_tokens, item.seq.num_computed_tokens + item.num_new_tokens
            for start, end in item.seq.request.bidirectional_spans:
                lo, hi = max(first, start), min(stop, end)
                if lo < hi:
                    ends = np.zeros(batch.token_ids.size, np.int32) if ends is None else ends
                    ends[starts[row] + lo - first:starts[row] + hi - first] = end
        if ends is None:
            return batch
        return dataclasses.replace(batch, attention=dataclasses.replace(batch.attention, key_ends=ends))

    def _with_input_embeds(self, scheduled: list[ScheduledSequence], batch: StepBatch, rows: np.ndarray) -> StepBatch:
        """`batch` with the input embeddings (images, embeds prompts) of the positions it computes
        (unchanged when it computes none)."""
        embeds = mask = None
        starts = batch.attention.query_start
        for item, row in zip(scheduled, rows):
            first, stop = item.seq.num_computed_tokens, item.seq.num_computed_tokens + item.num_new_tokens
            for given in item.seq.request.input_embeds:
                lo, hi = max(first, given.offset), min(stop, given.offset + given.length)
                if lo >= hi:
                    continue
                if embeds is None:
                    embeds = np.zeros((batch.token_ids.size, self.embeds_width), np.float32)
                    mask = np.zeros(batch.token_ids.size, bool)
                at = starts[row] + lo - first
                embeds[at:at + hi - lo, :given.embeds.shape[1]] = given.embeds[lo - given.offset:hi - given.offset]
                mask[at:at + hi - lo] = True
        return batch if embeds is None else dataclasses.replace(batch, input_embeds=embeds, input_embeds_mask=mask)

    def _prefetch_decode(self, num_rows: int, sampler: ProgramCache) -> None:
        """Start making ready, in the background, the decode step of `num_rows` sequences that
        usually follows a step that completes every prompt it computes, with `sampler` (the
        sampler program of the step now)."""
        num_tokens = self.shapes.num_tokens(min(num_rows, self.shapes.max_num_seqs))
        key = (num_tokens, sampler)
        if self.parallel.pipeline_parallel_size == 1 and self.stream is None and key not in self._decodes_prefetched:
            self._decodes_prefetched.add(key)
            self._prefetch(*self._padding_step(1, num_tokens), sampler)

    def _prefetch(self, batch: StepBatch, sampling: SamplingArrays, sampler: ProgramCache | None = None) -> None:
        """Start making the step program for `batch` and, on one device, its sampler program
        (default: the one `sampling` needs) ready in the background."""
        self._step.prefetch(*self._step_args(batch))
        if self.mesh is None and not self.pooling:
            rows = (len(batch.logits_indices), self.model_config.vocab_size)
            logits = jax.ShapeDtypeStruct(rows, jnp.float32, sharding=SingleDeviceSharding(self.first_device))
            (sampler or self._sampler_for(sampling)).prefetch(logits, self._sampler_args(sampling))

    def _run(self, batch: StepBatch, sampling: SamplingArrays) -> tuple[SamplerOutput, PromptLogprobs]:
        logits, prompt = self._forward(batch)
        if self.pooling:
            return logits, prompt  # the hidden states
        return self._sampler_for(sampling)(logits, self._sampler_args(sampling)), prompt

    def _forward(self, batch: StepBatch) -> tuple[jax.Array, PromptLogprobs]:
        """The model part of a step: its logits (or a pooling model's hidden states) and prompt
        logprobs, the KV cache updated."""
        with interrupts_held():  # the step donates the cache
            if self.stream is not None:
                return self._run_streamed(batch)
            (logits, prompt), self.kv_cache = self._step(*self._step_args(batch))
        return logits, prompt

    def _step_args(self, batch: StepBatch) -> tuple:
        """The model step's arguments from the host-built arrays, on the devices; arrays no row
        needed stand in as placeholders."""
        num_tokens = batch.token_ids.size
        batch = dataclasses.replace(
            batch,
            prompt_indices=self._or_placeholder(batch.prompt_indices, (num_tokens,), np.int32, -1),
            prompt_next_ids=self._or_placeholder(batch.prompt_next_ids, (num_tokens,), np.int32, 0),
            lora_slots=None if self.lora is None else self._or_placeholder(batch.lora_slots, (num_tokens,), np.int32, -1))
        if self.reads_embeds:
            batch = dataclasses.replace(
                batch, input_embeds=self._or_placeholder(batch.input_embeds, (num_tokens, self.embeds_width), np.float32,
                                                         0.0),
                input_embeds_mask=self._or_placeholder(batch.input_embeds_mask, (num_tokens,), bool, False))
        if self.bidirectional:  # key end 0: causal
            key_ends = self._or_placeholder(batch.attention.key_ends, (num_tokens,), np.int32, 0)
            batch = dataclasses.replace(batch, attention=dataclasses.replace(batch.attention, key_ends=key_ends))
        return (self.state, None if self.lora is None else self.lora.weights), self.kv_cache, self._put(batch)

    def _sampler_args(self, sampling: SamplingArrays) -> SamplingArrays:
        """The sampler's arrays, as `_step_args` gives the step's."""
        num_rows = len(sampling.temperature)
        penalties, bias = (num_rows, self.shapes.penalty_width), (num_rows, MAX_BIASED_TOKENS)
        sampling = dataclasses.replace(
            sampling,
            penalty_ids=self._or_placeholder(sampling.penalty_ids, penalties, np.int32, PAD_TOKEN_ID),
            output_counts=self._or_placeholder(sampling.output_counts, penalties, np.int32, 0),
            bias_ids=self._or_placeholder(sampling.bias_ids, bias, np.int32, PAD_TOKEN_ID),
            bias_values=self._or_placeholder(sampling.bias_values, bias, np.float32, 0.0),
            only_bias_ids=self._or_placeholder(sampling.only_bias_ids, (num_rows,), bool, False),
            token_bitmask=self._or_placeholder(sampling.token_bitmask,
                                               (num_rows, bitmask_width(self.model_config.vocab_size)), np.int32, -1))
        return self._put(sampling)

    def _put(self, tree):
        """The step's host arrays as its program takes them: on one device as they are (the call
        copies them in, faster than placing each array first), else replicated over the mesh.
        Placeholders are already on the devices."""
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, self._replicated()), tree)

    def _replicated(self) -> NamedSharding | None:
        """Every device of the mesh holding a whole copy (None: the one default device)."""
        return NamedSharding(self.mesh, PartitionSpec()) if self.mesh is not None else None

    def _or_placeholder(self, array: np.ndarray | None, shape: tuple[int, ...], dtype, fill) -> jax.Array | np.ndarray:
        """`array`, or a cached device array of `fill` of the shape it would have had."""
        if array is not None:
            return array
        key = (shape, np.dtype(dtype).str, fill)
        if key not in self._placeholders:
            self._placeholders[key] = jax.device_put(np.full(shape, fill, dtype), self._replicated())
        return self._placeholders[key]
