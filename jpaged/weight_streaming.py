"""Serving a model larger than the device's weight budget by streaming decoder layers onto it
during each step (DeepSpeed ZeRO-Inference: Aminabadi et al., "DeepSpeed-Inference", SC'22).

`plan_offload` decides, from the budget, how many decoder layers stay on the device (the first
ones; embeddings, final norm and LM head always stay). The others are kept in a
`loader.host_store.HostStore` (`offload_weights="host"`: host memory, as jax arrays in pinned
host memory where the platform has that memory kind, else numpy; `"disk"`: memory-mapped files)
and `LayerStream.run` copies them onto the device one layer ahead: layer i + 1's copy is issued
before layer i runs, and layer i + 2's only after layer i has finished, so at most two streamed
layers are on the device at once. The model runner then runs the step as per-layer programs (an
embedding program, one decoder-layer program shared by every layer, and the head), since one
program over all layers would need every layer's weights as its arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class OffloadPlan:
    """Which decoder layers stay on the device (the first `num_resident`) and what they weigh
    there (bytes on each device)."""

    num_layers: int
    num_resident: int
    layer_bytes: int  # one decoder layer
    other_bytes: int  # embeddings, final norm, LM head

    @property
    def num_streamed(self) -> int:
        return self.num_layers - self.num_resident

    def streams(self, layer: int) -> bool:
        return layer >= self.num_resident


def plan_offload(num_layers: int, layer_bytes: int, other_bytes: int, budget_gib: float | None) -> OffloadPlan:
    """The plan for a device weight budget of `budget_gib` GiB (None: stream every layer).
    ValueError when the budget cannot hold one decoder layer, or the weights that never stream."""
    if budget_gib is None:
        return OffloadPlan(num_layers, 0, layer_bytes, other_bytes)
    budget = int(budget_gib * 2**30)
    if budget < layer_bytes:
        raise ValueError(f"device_weight_budget_gib={budget_gib} ({budget / 2**20:.2f} MiB) is smaller than one "
                         f"decoder layer ({layer_bytes / 2**20:.2f} MiB on each device)")
    if budget < other_bytes:
        raise ValueError(f"device_weight_budget_gib={budget_gib} ({budget / 2**20:.2f} MiB) cannot hold the "
                         f"embeddings and LM head ({other_bytes / 2**20:.2f} MiB on each device), which stay on it")
    return OffloadPlan(num_layers, min(num_layers, (budget - other_bytes) // layer_bytes), layer_bytes, other_bytes)


def device_bytes(tree, sharding_of: Callable) -> int:
    """Bytes on each device of the arrays (or abstract values) in `tree` once placed as
    `sharding_of(path, shape, dtype)` says (None: whole on one device)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        sharding = sharding_of(keys, leaf.shape, leaf.dtype)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


def to_pinned_host(layer: dict, shardings: dict) -> dict:
    """A streamed layer's numpy arrays moved into pinned host memory where the platform has it
    (faster, asynchronous copies to the device); else left as they are."""
    out = {}
    for name, array in layer.items():
        sharding = shardings[name]
        try:
            out[name] = jax.device_put(array, sharding.with_memory_kind("pinned_host"))
        except (ValueError, RuntimeError, NotImplementedError):
            return layer
    return out


class LayerStream:
    """The decoder layers' weights of a model with an `OffloadPlan`: `layers[i]` is layer i's
    weight dict, on the device for a resident layer, else kept off it; `shardings[i]` says where
    each of layer i's arrays goes on the device."""

    def __init__(self, layers: list[dict], shardings: list[dict], plan: OffloadPlan):
        self.layers, self.shardings, self.plan = layers, shardings, plan
        self.bytes_copied = 0  # bytes copied onto each device so far
        # jax's copies from host memory return when done on some platforms (CPU): a thread of
        # its own lets the next layer's copy run while the current layer computes
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpaged-stream")

    def run(self, run_layer: Callable[[int, dict], jax.Array]) -> None:
        """`run_layer(i, weights)` for every layer in order, with weights on the device;
        `run_layer` returns an array of its result, awaited before the layer after next is
        copied."""
        streamed = [i for i in range(self.plan.num_layers) if self.plan.streams(i)]
        upcoming = iter(streamed)
        pending = self._copy(next(upcoming, None))
        for i in range(self.plan.num_layers):
            if not self.plan.streams(i):
                run_layer(i, self.layers[i])
                continue
            weights, pending = jax.block_until_ready(pending.result()), None
            pending = self._copy(next(upcoming, None))
            result = run_layer(i, weights)
            del weights
            jax.block_until_ready(result)

    def _copy(self, layer: int | None) -> Future | None:
        """Layer `layer`'s weights on the device (a future), or None for no layer."""
        if layer is None:
            return None
        self.bytes_copied += self.plan.layer_bytes
        return self._copier.submit(jax.device_put, self.layers[layer], self.shardings[layer])

