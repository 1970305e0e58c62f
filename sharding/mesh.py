"""The device mesh a parallel layout asks for, and its per-replica slices.

Four named axes: "dp" (data-parallel replicas, outermost), "pp" (pipeline stages), "ep" (expert
shards) and "tp" (tensor shards, innermost, so a layer's all-reduces stay among neighbouring
devices). Each replica's engine runs on its slice of the mesh, the three inner axes. Axes are
`Auto` so GSPMD places the tensor-parallel all-reduces itself; the pipeline and expert layers
(`jpaged/parallel/`) take their axes manual inside `shard_map`.

A layout is anything with the four sizes `data_parallel_size`, `pipeline_parallel_size`,
`expert_parallel_size` and `tensor_parallel_size` (jpaged's `ParallelConfig`); this module
depends on jax alone.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DP_AXIS, PP_AXIS, EP_AXIS, TP_AXIS = "dp", "pp", "ep", "tp"
AXES = (DP_AXIS, PP_AXIS, EP_AXIS, TP_AXIS)
_SIZE_NAMES = ("data_parallel_size", "pipeline_parallel_size", "expert_parallel_size", "tensor_parallel_size")


def make_mesh(parallel) -> Mesh:
    """The whole layout as one mesh over the first `world_size` devices."""
    devices = jax.devices()
    sizes = tuple(getattr(parallel, name) for name in _SIZE_NAMES)
    world_size = math.prod(sizes)
    if world_size > len(devices):
        asked = " x ".join(f"{name} {size}" for name, size in zip(_SIZE_NAMES, sizes) if size > 1)
        raise ValueError(f"{asked} needs {world_size} devices; "
                         f"{len(devices)} {jax.default_backend()} device(s) exist")
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices[:world_size])


def replica_meshes(parallel) -> list[Mesh | None]:
    """Each data-parallel replica's slice of the mesh ("pp", "ep", "tp"); `[None]` for a lone device."""
    if math.prod(getattr(parallel, name) for name in _SIZE_NAMES) == 1:
        return [None]
    mesh = make_mesh(parallel)
    inner = AXES[1:]
    return [Mesh(np.asarray(devices), inner, axis_types=(AxisType.Auto,) * len(inner)) for devices in mesh.devices]


def context_mesh(mesh: Mesh):
    """The mesh a nested `shard_map` must name: inside a pipeline stage, the one with "pp" manual."""
    abstract = jax.sharding.get_abstract_mesh()
    return mesh if abstract.empty else abstract
