"""Runs the jitted model step on a scheduled step and returns the sampled tokens.

This is the boundary between the host (Python lists, numpy) and the device (jax): it takes the
step's padded arrays as `jpaged/step_batch.py` prepares them from the scheduler's plan, carries out
the plan's block moves on the KV cache, and calls the step (model, then on-device sampling) with
the KV cache donated so it is updated in place. It owns the model's parameters and KV cache,
placed on this engine's slice of the device mesh under tensor / pipeline / expert parallelism,
where the step's arrays reach every shard replicated.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpaged.config import CacheConfig, EngineConfig, ModelConfig
from jpaged.kv_cache_ops import HostKVPool, copy_blocks
from jpaged.loader.weights import load_params, replicate_kv_heads
from jpaged.models.llama import LlamaForCausalLM
from jpaged.parallel.expert_parallel import expert_parallel_moe
from jpaged.parallel.layout import kv_heads_per_model
from jpaged.parallel.partition import KV_CACHE_SPEC, param_spec, shard_attention_layer
from jpaged.parallel.pipeline import pipeline
from jpaged.sampler import PromptLogprobs, SamplerOutput, prompt_logprobs, sample_with_logprobs
from jpaged.scheduler import ScheduledSequence, SchedulerOutput
from jpaged.step_batch import PromptRows, SamplingArrays, StepBatch, prepare_step
from pallas_kernels.backend import select_attention
from pallas_kernels.paged_attention import paged_attention_layer

logger = logging.getLogger("jpaged")


class StepOutput(NamedTuple):
    """What one step returns to the host (numpy)."""

    sampled: SamplerOutput  # one row per scheduled sequence, in the order given
    prompt_rows: PromptRows | None  # what each prompt-logprob row is about; None: no such rows
    prompt_logprobs: PromptLogprobs | None  # one row per `prompt_rows` entry


def resolve_dtype(dtype: str):
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]


def matmul_precision(dtype):
    """float32 means float32: no TF32 shortcuts in matmuls on GPUs (the step runs under this)."""
    return jax.default_matmul_precision("highest" if jnp.dtype(dtype) == jnp.float32 else "default")


class ModelRunner:
    def __init__(self, model_config: ModelConfig, config: EngineConfig, weights, mesh: Mesh | None = None):
        """`mesh` is this engine's slice of the device mesh ("pp", "ep", "tp"); None: one device."""
        cache_config, self.parallel = config.cache, config.parallel
        self.mesh = mesh
        kv_heads = kv_heads_per_model(model_config, self.parallel.tensor_parallel_size)
        weights = replicate_kv_heads(weights, model_config, kv_heads)
        self.model_config = model_config = dataclasses.replace(model_config, num_kv_heads=kv_heads)
        self.block_size = cache_config.block_size
        self.dtype = dtype = resolve_dtype(config.dtype)
        abstract = nnx.eval_shape(lambda: LlamaForCausalLM(model_config, dtype, **self._layouts(config)))
        self.graphdef, state = nnx.split(abstract)

        def zeros_param(path, shape, param_dtype):
            return self._zeros(shape, param_dtype, param_spec(path, shape, self.mesh) if self.mesh else None)

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
        self._step = jax.jit(self._step_fn, static_argnames=("all_greedy", "num_logprobs", "num_prompt_logprobs"),
                             donate_argnums=1)

    def _layouts(self, config: EngineConfig) -> dict:
        """The model's attention, MoE, layer runner and stage count for this backend and device layout."""
        model_config, mesh, parallel = self.model_config, self.mesh, self.parallel
        attend = select_attention(config.attention_backend, model_config.head_dim, config.attention_interpret)
        layouts = dict(attention=paged_attention_layer(attend))
        if parallel.tensor_parallel_size > 1:
            layouts["attention"] = shard_attention_layer(layouts["attention"], mesh)
        if model_config.is_moe and parallel.tensor_parallel_size * parallel.expert_parallel_size > 1:
            layouts["moe"] = expert_parallel_moe(mesh)
        if parallel.pipeline_parallel_size > 1:
            layouts.update(run_layers=pipeline(mesh), pipeline_stages=parallel.pipeline_parallel_size)
        return layouts

    def _zeros(self, shape: tuple[int, ...], dtype, spec: PartitionSpec | None) -> jax.Array:
        """Zeros made where they live: in their shards on a device mesh."""
        if self.mesh is None:
            return jnp.zeros(shape, dtype)
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=NamedSharding(self.mesh, spec))()

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block over all layers, K and V."""
        cfg = self.model_config
        return 2 * cfg.num_layers * cfg.num_kv_heads * self.block_size * cfg.head_dim * jnp.dtype(self.dtype).itemsize

    def _blocks_for_budget(self, cache_config: CacheConfig) -> int:
        # each device holds its stage's layers of its KV heads
        block_bytes = self.block_bytes // (self.parallel.tensor_parallel_size * self.parallel.pipeline_parallel_size)
        device = self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]
        stats = device.memory_stats() if device.platform != "cpu" else None
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
        logger.info("new %s program #%d (compiled, or loaded from the compilation cache): tokens=%s seqs=%s "
                    "decode_seqs=%d max_query_len=%d blocks/seq=%d",
                    kind, self.num_compilations, batch.token_ids.shape, md.block_tables.shape[:-1],
                    md.num_decode_seqs, md.max_query_len, md.block_tables.shape[-1])

    def _step_fn(self, state, kv_cache, batch: StepBatch, sampling: SamplingArrays, all_greedy: bool,
                 num_logprobs: int | None, num_prompt_logprobs: int | None):
        """((SamplerOutput, PromptLogprobs or None), kv_cache); the prompt rows' logits are only
        computed in the variant compiled for batches that have them."""
        self._count_compilation("step", batch)
        prompt = None
        with matmul_precision(self.dtype):
            model = self._model(state)
            hidden, kv_cache = model(batch.token_ids, batch.positions, kv_cache, batch.attention)
            logits = model.logits(hidden[batch.logits_indices])
            if batch.prompt_indices is not None:
                prompt_logits = model.logits(hidden[batch.prompt_indices])
                prompt = prompt_logprobs(prompt_logits, batch.prompt_next_ids, num_prompt_logprobs)
        return (sample_with_logprobs(logits, sampling, all_greedy, num_logprobs), prompt), kv_cache

    def move_blocks(self, plan: SchedulerOutput) -> None:
        """Carry out the step's block moves before it runs: swap-outs, copy-on-write copies, then
        swap-ins (the order the block manager's bookkeeping assumes)."""
        self.host_pool.swap_out(self.kv_cache, plan.swap_out)
        self.kv_cache = copy_blocks(self.kv_cache, plan.block_copies)
        self.kv_cache = self.host_pool.swap_in(self.kv_cache, plan.swap_in)

    def execute(self, scheduled: list[ScheduledSequence], eos_token_ids: list[int]) -> StepOutput:
        """Run one step; per scheduled sequence (in the given order) its sampled token and, where
        a request wants them, logprobs (rows that do not sample carry meaningless values); and
        the prompt logprobs of the prompt positions computed in this step, where wanted.
        `eos_token_ids` are blocked for rows still under their `min_tokens`."""
        step = prepare_step(scheduled, self.block_size, self.parallel, eos_token_ids, self.model_config.vocab_size)
        (sampled, prompt), self.kv_cache = self._step(
            self.state, self.kv_cache, step.batch, step.sampling, all_greedy=step.all_greedy,
            num_logprobs=step.num_logprobs, num_prompt_logprobs=step.num_prompt_logprobs)
        sampled = SamplerOutput(*(None if field is None else np.asarray(field)[step.rows] for field in sampled))
        if prompt is not None:
            prompt = PromptLogprobs(*(np.asarray(field)[: len(step.prompt_rows.owner)] for field in prompt))
        return StepOutput(sampled, step.prompt_rows, prompt)
