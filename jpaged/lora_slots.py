"""LoRA adapters on the device: `max_loras` slots of rank `max_lora_rank` for every projection an
adapter may target, and which adapter each slot holds.

Per decoder layer and projection, slot `s` is columns `[s * R, (s + 1) * R)` of `a [in, max_loras *
R]` and rows `[s * R, (s + 1) * R)` of `b [max_loras * R, out]` (an adapter of rank r < R, or one
that leaves the projection alone, fills the rest with zeros). A step's tokens each carry their
request's slot (-1: none), and the model adds `((x @ a) * mask) @ b` to the projection, where
`mask [T, max_loras * R]` keeps each token's own slot's columns: every adapter of the batch in two
skinny matmuls, whatever the mix (a dense form of Punica's batched gather-matmul). The slots are
step arguments of fixed shape, so loading an adapter compiles nothing.
"""

from __future__ import annotations

from collections import OrderedDict

import jax
import numpy as np

from jpaged.config import LoRAConfig, ModelConfig
from jpaged.lora import LoRAAdapter, lora_modules


class LoRASlots:
    """The device's adapter slots. `weights` (a list per layer of `{"lora_a.<module>": a,
    "lora_b.<module>": b}`) and `column_slots` are what the step takes; `assign` puts the adapters
    a step needs into slots, evicting the least recently used."""

    def __init__(self, cfg: ModelConfig, config: LoRAConfig, dtype, sharding=None):
        """`sharding`: where the slots live (the engine's devices, each holding a whole copy);
        None: the default device."""
        self.max_loras, self.rank, self.dtype, self.sharding = config.max_loras, config.max_lora_rank, dtype, sharding
        width = self.max_loras * self.rank
        self._host = [{name: (np.zeros((d_in, width), np.float32), np.zeros((width, d_out), np.float32))
                       for name, (d_in, d_out) in lora_modules(cfg).items()} for _ in range(cfg.num_layers)]
        self.weights = [self._layer_on_device(layer) for layer in range(cfg.num_layers)]
        self.column_slots = np.repeat(np.arange(self.max_loras, dtype=np.int32), self.rank)  # a constant of the step
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recent first

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.weights))

    def assign(self, adapters: list[LoRAAdapter]) -> dict[int, int]:
        """The slot of each of `adapters` (at most `max_loras` distinct ids), loading those not held."""
        wanted = {adapter.lora_int_id: adapter for adapter in adapters}
        if len(wanted) > self.max_loras:
            raise ValueError(f"a step needs {len(wanted)} LoRA adapters, more than max_loras {self.max_loras}")
        for lora_id in wanted:
            if lora_id in self._slot_of:
                self._slot_of.move_to_end(lora_id)
        changed: set[int] = set()
        for lora_id, adapter in wanted.items():
            if lora_id not in self._slot_of:
                self._slot_of[lora_id] = slot = self._free_slot(wanted)
                changed |= self._write(slot, adapter)
        self._upload(changed)
        return {lora_id: self._slot_of[lora_id] for lora_id in wanted}

    def evict(self, lora_id: int) -> None:
        """Clear the slot of adapter `lora_id`, if it holds one."""
        slot = self._slot_of.pop(lora_id, None)
        if slot is not None:
            self._upload(self._clear(slot))

    def _free_slot(self, wanted: dict[int, LoRAAdapter]) -> int:
        used = set(self._slot_of.values())
        free = [slot for slot in range(self.max_loras) if slot not in used]
        if free:
            return free[0]
        evicted = next(lora_id for lora_id in self._slot_of if lora_id not in wanted)
        return self._slot_of.pop(evicted)

    def _columns(self, slot: int) -> slice:
        return slice(slot * self.rank, (slot + 1) * self.rank)

    def _clear(self, slot: int) -> set[int]:
        """Zero `slot` in the host copies; the layers where it held something."""
        columns, changed = self._columns(slot), set()
        for layer, modules in enumerate(self._host):
            for a, b in modules.values():
                if a[:, columns].any() or b[columns, :].any():
                    changed.add(layer)
                    a[:, columns] = 0
                    b[columns, :] = 0
        return changed

    def _write(self, slot: int, adapter: LoRAAdapter) -> set[int]:
        """Put `adapter`'s factors into `slot` of the host copies (zeros where it has none); the
        layers whose copies changed."""
        changed, columns = self._clear(slot) | {layer for layer, _ in adapter.factors}, self._columns(slot)
        for (layer, name), (a_new, b_new) in adapter.factors.items():
            a, b = self._host[layer][name]
            a[:, columns][:, :adapter.rank] = a_new
            b[columns, :][:adapter.rank] = b_new
        return changed

    def _upload(self, layers: set[int]) -> None:
        for layer in sorted(layers):
            self.weights[layer] = self._layer_on_device(layer)

    def _layer_on_device(self, layer: int) -> dict[str, jax.Array]:
        out = {}
        for name, (a, b) in self._host[layer].items():
            out[f"lora_a.{name}"] = jax.device_put(a.astype(self.dtype), self.sharding)
            out[f"lora_b.{name}"] = jax.device_put(b.astype(self.dtype), self.sharding)
        return out
