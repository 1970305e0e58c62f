"""Turns a scheduled step into padded arrays, runs the jitted model step, returns sampled tokens.

This is the boundary between the host (Python lists, numpy) and the device (jax). Per step it
builds the ragged batch: flattened `token_ids` and `positions`, the `slot_mapping` where each
new token's K/V goes, and per sequence its `block_tables` row, `context_lens`, `query_start`
and `query_lens`. Decode sequences come first. Every dimension is padded to a bucket (see
`bucket`) so the step compiles for a small, logged set of shapes. Under tensor parallelism the
runner also owns the device mesh: parameters and KV cache are sharded on it, and the step's
arrays reach every shard replicated.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jpaged.block_manager import BlockManager
from jpaged.config import CacheConfig, EngineConfig, ModelConfig
from jpaged.kv_cache_ops import HostKVPool, copy_blocks
from jpaged.loader.weights import load_params, replicate_kv_heads
from jpaged.models.llama import LlamaForCausalLM
from jpaged.sampler import (
    SamplerOutput,
    SamplingArrays,
    max_num_logprobs,
    sample_with_logprobs,
)
from jpaged.scheduler import ScheduledSequence, SchedulerOutput
from pallas_kernels.backend import select_attention
from pallas_kernels.paged_attention import AttentionMetadata, paged_attention_layer
from sharding.mesh import check_tensor_parallel, kv_heads_per_model, make_mesh
from sharding.partition import KV_CACHE_SPEC, param_spec, shard_attention_layer

logger = logging.getLogger("jpaged")


def bucket(n: int) -> int:
    """The padded size for `n`: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (0 stays 0).

    Powers of two and their halfway points waste at most a third of a dimension while
    keeping the number of distinct shapes, and so of compilations, logarithmic.
    """
    if n <= 2:
        return n
    power = 1 << (n - 1).bit_length()
    return power * 3 // 4 if n <= power * 3 // 4 else power


@dataclass(frozen=True)
class StepBatch:
    token_ids: jax.Array  # [T]
    positions: jax.Array  # [T]
    logits_indices: jax.Array  # [S] last new token of each sequence
    attention: AttentionMetadata


jax.tree_util.register_dataclass(
    StepBatch, data_fields=["token_ids", "positions", "logits_indices", "attention"], meta_fields=[]
)


def resolve_dtype(dtype: str):
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]


class ModelRunner:
    def __init__(self, model_config: ModelConfig, config: EngineConfig, weights, eos_token_ids: set[int]):
        cache_config = config.cache
        self.eos_token_ids = sorted(eos_token_ids)
        self.tensor_parallel_size = tp = config.tensor_parallel_size
        check_tensor_parallel(model_config, tp)
        self.mesh = None if tp == 1 else make_mesh(tp)
        kv_heads = kv_heads_per_model(model_config, tp)
        weights = replicate_kv_heads(weights, model_config, kv_heads)
        self.model_config = model_config = dataclasses.replace(model_config, num_kv_heads=kv_heads)
        self.block_size = cache_config.block_size
        self.dtype = dtype = resolve_dtype(config.dtype)
        attend = select_attention(config.attention_backend, model_config.head_dim, config.attention_interpret)
        attention = paged_attention_layer(attend)
        if self.mesh is not None:
            attention = shard_attention_layer(attention, self.mesh)
        abstract = nnx.eval_shape(lambda: LlamaForCausalLM(model_config, dtype, attention))
        self.graphdef, state = nnx.split(abstract)
        def zeros_param(path, shape, param_dtype):
            return self._zeros(shape, param_dtype, param_spec(path, shape, tp))

        nnx.replace_by_pure_dict(state, load_params(abstract, model_config, weights, zeros_param))
        self.state = state
        self.num_blocks = cache_config.num_blocks or self._blocks_for_budget(cache_config)
        shape = (model_config.num_layers, self.num_blocks, self.block_size,
                 model_config.num_kv_heads, model_config.head_dim)
        self.kv_cache = (self._zeros(shape, dtype, KV_CACHE_SPEC), self._zeros(shape, dtype, KV_CACHE_SPEC))
        swaps = config.scheduler.preemption_mode == "swap"
        self.num_host_blocks = int(cache_config.swap_space_gib * 2**30 // self.block_bytes) if swaps else 0
        self.host_pool = HostKVPool(self.kv_cache, self.num_host_blocks)
        self.num_compilations = 0
        self._step = jax.jit(self._step_fn, static_argnames=("all_greedy", "num_logprobs"), donate_argnums=1)
        self._logits = jax.jit(self._logits_fn, donate_argnums=1)

    def _zeros(self, shape: tuple[int, ...], dtype, spec: PartitionSpec) -> jax.Array:
        """Zeros made where they live: in their shards under tensor parallelism."""
        if self.mesh is None:
            return jnp.zeros(shape, dtype)
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=NamedSharding(self.mesh, spec))()

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block over all layers, K and V."""
        cfg = self.model_config
        return 2 * cfg.num_layers * cfg.num_kv_heads * self.block_size * cfg.head_dim * jnp.dtype(self.dtype).itemsize

    def _blocks_for_budget(self, cache_config: CacheConfig) -> int:
        block_bytes = self.block_bytes // self.tensor_parallel_size  # each device holds its KV heads
        stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
        if stats and "bytes_limit" in stats:
            budget = stats["bytes_limit"] * cache_config.gpu_memory_utilization - stats["bytes_in_use"]
        else:
            budget = cache_config.cpu_kv_cache_gib * 2**30
        num_blocks = int(budget // block_bytes)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget / 2**20:.1f} MiB holds no block of "
                             f"{block_bytes / 2**20:.2f} MiB")
        return num_blocks

    def _model(self, state):
        return nnx.merge(self.graphdef, state)

    def _count_compilation(self, kind: str, batch: StepBatch) -> None:
        self.num_compilations += 1
        md = batch.attention
        logger.info("compiling %s #%d: tokens=%d seqs=%d decode_seqs=%d max_query_len=%d blocks/seq=%d",
                    kind, self.num_compilations, batch.token_ids.shape[0], md.block_tables.shape[0],
                    md.num_decode_seqs, md.max_query_len, md.block_tables.shape[1])

    def _step_fn(self, state, kv_cache, batch: StepBatch, sampling: SamplingArrays, all_greedy: bool,
                 num_logprobs: int | None):
        self._count_compilation("step", batch)
        with self._matmul_precision():
            model = self._model(state)
            hidden, kv_cache = model(batch.token_ids, batch.positions, kv_cache, batch.attention)
            logits = model.logits(hidden[batch.logits_indices])
        return sample_with_logprobs(logits, sampling, all_greedy, num_logprobs), kv_cache

    def _logits_fn(self, state, kv_cache, batch: StepBatch):
        self._count_compilation("logits", batch)
        with self._matmul_precision():
            model = self._model(state)
            hidden, kv_cache = model(batch.token_ids, batch.positions, kv_cache, batch.attention)
            return model.logits(hidden), kv_cache

    def _matmul_precision(self):
        """float32 means float32: no TF32 shortcuts in matmuls on GPUs."""
        return jax.default_matmul_precision("highest" if self.dtype == jnp.float32 else "default")

    def move_blocks(self, plan: SchedulerOutput) -> None:
        """Carry out the step's block moves before it runs: swap-outs, copy-on-write copies, then
        swap-ins (the order the block manager's bookkeeping assumes)."""
        self.host_pool.swap_out(self.kv_cache, plan.swap_out)
        self.kv_cache = copy_blocks(self.kv_cache, plan.block_copies)
        self.kv_cache = self.host_pool.swap_in(self.kv_cache, plan.swap_in)

    def execute(self, scheduled: list[ScheduledSequence]) -> SamplerOutput:
        """Run one step; per scheduled sequence (in the given order) its sampled token and, where
        a request wants them, logprobs. Rows that do not sample carry meaningless values."""
        ordered = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens > 1)
        batch, rows = self._build_batch([scheduled[i] for i in ordered])
        seqs = [scheduled[i].seq for i in ordered]
        params = [s.sampling_params for s in seqs]
        sampling = SamplingArrays.build(
            params, [s.seed for s in seqs], [len(s.output_token_ids) for s in seqs],
            pad_to=batch.logits_indices.shape[0],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            output_token_ids=[s.output_token_ids for s in seqs],
            eos_token_ids=self.eos_token_ids, vocab_size=self.model_config.vocab_size,
        )
        all_greedy = all(p.is_greedy for p in params)
        num_logprobs = max_num_logprobs(params)
        if num_logprobs is None and any(p.best_of > p.n for p in params):
            num_logprobs = 0  # best_of ranks samples by their cumulative logprob
        out, self.kv_cache = self._step(self.state, self.kv_cache, batch, sampling,
                                        all_greedy=all_greedy, num_logprobs=num_logprobs)
        position = np.empty(len(scheduled), np.int64)
        position[ordered] = rows  # each scheduled sequence's row in the step's arrays
        return SamplerOutput(*(None if field is None else np.asarray(field)[position] for field in out))

    def prompt_logits(self, seq, block_manager: BlockManager) -> np.ndarray:
        """Float32 logits `[num_tokens, vocab]` of a fresh sequence's whole prompt, through the cache."""
        block_manager.grow(seq, seq.num_tokens)
        try:
            batch, _ = self._build_batch([ScheduledSequence.of(seq, seq.num_tokens)])
            logits, self.kv_cache = self._logits(self.state, self.kv_cache, batch)
        finally:
            block_manager.free(seq)
        return np.asarray(logits)[: seq.num_tokens]

    def _build_batch(self, scheduled: list[ScheduledSequence]) -> tuple[StepBatch, np.ndarray]:
        """Padded arrays for `scheduled` (decodes first); also each sequence's row.

        Decode row `i` holds its token at flat index `i`; prefill tokens start after the padded
        decode rows.
        """
        num_decode = sum(1 for s in scheduled if s.num_new_tokens == 1)
        num_prefill = len(scheduled) - num_decode
        decode_rows, prefill_rows = bucket(num_decode), bucket(num_prefill)
        rows = np.concatenate([np.arange(num_decode), decode_rows + np.arange(num_prefill)]).astype(np.int64)
        prefill_counts = [s.num_new_tokens for s in scheduled[num_decode:]]
        prefill_starts = decode_rows + np.cumsum([0] + prefill_counts)[:-1]
        first_tokens = np.concatenate([np.arange(num_decode), prefill_starts]).astype(np.int64)
        padded_tokens = bucket(decode_rows + sum(prefill_counts))
        num_rows = decode_rows + prefill_rows
        max_blocks = bucket(max(len(s.seq.block_table) for s in scheduled))

        token_ids = np.zeros(padded_tokens, np.int32)
        positions = np.zeros(padded_tokens, np.int32)
        slot_mapping = np.full(padded_tokens, -1, np.int32)
        block_tables = np.zeros((num_rows, max_blocks), np.int32)
        context_lens = np.zeros(num_rows, np.int32)
        query_start = np.zeros(num_rows, np.int32)
        query_start[:decode_rows] = np.arange(decode_rows)
        query_lens = np.zeros(num_rows, np.int32)
        for row, start, item in zip(rows, first_tokens, scheduled):
            seq, count = item.seq, item.num_new_tokens
            first = seq.num_computed_tokens
            span = slice(start, start + count)
            token_ids[span] = seq.token_ids(first, first + count)
            positions[span] = np.arange(first, first + count)
            table = np.asarray(seq.block_table, np.int64)
            slot_mapping[span] = table[positions[span] // self.block_size] * self.block_size + (
                positions[span] % self.block_size)
            block_tables[row, : len(table)] = table
            context_lens[row], query_start[row], query_lens[row] = first + count, start, count
        max_query_len = bucket(max(prefill_counts, default=0))
        attention = AttentionMetadata(
            slot_mapping=slot_mapping, block_tables=block_tables, context_lens=context_lens,
            query_start=query_start, query_lens=query_lens,
            num_decode_seqs=decode_rows, max_query_len=max_query_len,
        )
        logits_indices = np.maximum(query_start + query_lens - 1, 0)
        return StepBatch(token_ids, positions, logits_indices, attention), rows
