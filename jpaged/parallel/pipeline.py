"""Pipeline parallelism: the decoder's layers split into stages over the "pp" axis, a step's
micro-batches flowing through them.

The runner hands the step's new tokens over as M micro-batches (arrays with a leading `[M]` axis).
Inside a `shard_map` that makes "pp" manual, stage `s` of `S` holds its contiguous share of the
layers (entry `s` of each layer weight, which is stacked over stages) and of their KV cache. The
schedule runs `M + S - 1` ticks: at tick `t` stage `s` works on micro-batch `t - s` when that
exists and idles otherwise, then hands its output to stage `s + 1` with a `ppermute`. After
`S - 1` ticks of filling, every stage is busy until the last micro-batch drains, so the idle
share of a step is `(S - 1) / (M + S - 1)`: more micro-batches, fewer bubbles. A micro-batch
reaching a stage finds the KV of all earlier micro-batches already written there, so the step's
tokens may be cut anywhere, even inside one prompt's chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding.mesh import PP_AXIS


def run_pipeline(stage_fn, mesh: Mesh, hidden, positions, kv_cache, md, layer_weights):
    """Run `stage_fn(hidden [T, H], positions [T], kv_cache, md, layer_weights, model_first_layer)
    -> (hidden, kv_cache)` as a pipeline over micro-batches `hidden [M, T, H]`. Each leaf of
    `layer_weights` is stacked over stages `[S, ...]`; `stage_fn` gets its stage's entry, its
    stage's share of the KV cache (split on its leading axis) and the model's number of its first
    layer (a traced int32).

    Returns the last stage's outputs `[M, T, H]`, the updated KV cache, and the schedule as it
    ran: `busy [S, M + S - 1]`, whether each stage worked at each tick.
    """
    num_stages = mesh.shape[PP_AXIS]
    num_micro_batches = hidden.shape[0]
    forward = [(s, s + 1) for s in range(num_stages - 1)]

    def schedule(hidden, positions, kv_cache, md, layer_weights):
        stage = jax.lax.axis_index(PP_AXIS)
        layer_weights = jax.tree.map(lambda w: w[0], layer_weights)
        is_last = stage == num_stages - 1

        def tick(carry, t):
            received, outputs, kv_cache = carry
            micro_batch = t - stage
            busy = (micro_batch >= 0) & (micro_batch < num_micro_batches)
            m = jnp.clip(micro_batch, 0, num_micro_batches - 1)
            x = jnp.where(stage == 0, hidden[m], received)
            y, kv_cache = jax.lax.cond(
                busy,
                lambda: stage_fn(x, positions[m], kv_cache, jax.tree.map(lambda a: a[m], md), layer_weights,
                                 model_first_layer=stage * len(layer_weights)),
                lambda: (x, kv_cache),
            )
            outputs = outputs.at[m].set(jnp.where(busy & is_last, y, outputs[m]))
            return (jax.lax.ppermute(y, PP_AXIS, forward), outputs, kv_cache), busy

        ticks = jnp.arange(num_micro_batches + num_stages - 1)
        init = (jnp.zeros_like(hidden[0]), jnp.zeros_like(hidden), kv_cache)
        (_, outputs, kv_cache), busy = jax.lax.scan(tick, init, ticks)
        # Only the last stage holds outputs; the sum over stages hands them to every stage.
        return jax.lax.psum(outputs, PP_AXIS), kv_cache, busy[None]

    body = jax.shard_map(
        schedule, mesh=mesh,
        in_specs=(P(), P(), P(PP_AXIS), P(), P(PP_AXIS)),
        out_specs=(P(), P(PP_AXIS), P(PP_AXIS)),
        axis_names={PP_AXIS}, check_vma=False,
    )
    return body(hidden, positions, kv_cache, md, layer_weights)


def pipeline(mesh: Mesh):
    """A model's `run_layers` that pipelines the decoder over the mesh's "pp" stages."""

    def run_layers(decoder, hidden, positions, kv_cache, md, layer_weights):
        outputs, kv_cache, _ = run_pipeline(decoder, mesh, hidden, positions, kv_cache, md, layer_weights)
        return outputs.reshape(-1, outputs.shape[-1]), kv_cache

    return run_layers
