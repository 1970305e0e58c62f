"""Puts HF-named tensors into the model's parameters, converting layout and dtype.

Weights arrive one tensor at a time (from safetensors or GGUF) under HF names and `[out, in]`
layout; the model keeps `x @ W` layout, one set of arrays per decoder layer (`layers[i]`), MoE
experts stacked on a leading axis (`[experts, ...]`). A layer's q / k / v and gate / up tensors
are joined into the fused projections the model keeps (`fuse_projections`) before they are placed. Checkpoints store one tensor per expert
(`...experts.{e}.w1.weight` for Mixtral, `...experts.{e}.gate_proj.weight` for Qwen MoE, which is
also what `save_pretrained` writes), each written into its expert's slot. A pipelined model's
`layers[j]` holds layer `j` of every stage, stacked on a leading stage axis, so a layer's
tensors go into their stage's slot of it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jpaged.config import FUSED_PROJECTIONS, ModelConfig
from jpaged.loader.host_store import HostStore
from jpaged.loader.rope_rows import as_rotate_half
from jpaged.models.quantization import QUANTIZED_PARAMS, quantize, scale_name, scheme_of

_LAYER_TENSORS = {
    "input_layernorm.weight": ("input_norm", False),
    "post_attention_layernorm.weight": ("post_attention_norm", False),
    "pre_feedforward_layernorm.weight": ("pre_mlp_norm", False),  # Gemma's norms before and after the MLP
    "post_feedforward_layernorm.weight": ("post_mlp_norm", False),
    "self_attn.qkv_proj.weight": ("qkv_proj", True),  # joined by fuse_projections
    "self_attn.qkv_proj.bias": ("qkv_bias", False),
    "mlp.gate_up_proj.weight": ("gate_up_proj", True),
    "self_attn.q_proj.weight": ("q_proj", True),
    "self_attn.k_proj.weight": ("k_proj", True),
    "self_attn.v_proj.weight": ("v_proj", True),
    "self_attn.o_proj.weight": ("o_proj", True),
    "self_attn.q_norm.weight": ("q_norm", False),
    "self_attn.k_norm.weight": ("k_norm", False),
    "mlp.gate_proj.weight": ("gate_proj", True),
    "mlp.up_proj.weight": ("up_proj", True),
    "mlp.down_proj.weight": ("down_proj", True),
    # Mixture of experts: the router, and Qwen2-MoE's shared expert and its sigmoid gate.
    "block_sparse_moe.gate.weight": ("router", True),
    "block_sparse_moe.router.layer.weight": ("router", True),  # GraniteMoE
    "mlp.gate.weight": ("router", True),
    "mlp.shared_expert.gate_proj.weight": ("shared_gate_proj", True),
    "mlp.shared_expert.up_proj.weight": ("shared_up_proj", True),
    "mlp.shared_expert.down_proj.weight": ("shared_down_proj", True),
    "mlp.shared_expert_gate.weight": ("shared_expert_gate", True),
    # gpt-oss: the output projection's bias, each head's attention sink, the router's weight and bias
    "self_attn.o_proj.bias": ("o_bias", False),
    "self_attn.sinks": ("sinks", False),
    "mlp.router.weight": ("router", True),
    "mlp.router.bias": ("router_bias", False),
}
# Per-expert tensors (after `experts.{e}.`): Mixtral's w1 / w3 / w2 are gate / up / down.
_EXPERT_TENSORS = {
    "w1.weight": "expert_gate_proj",
    "w3.weight": "expert_up_proj",
    "w2.weight": "expert_down_proj",
    "gate_proj.weight": "expert_gate_proj",
    "up_proj.weight": "expert_up_proj",
    "down_proj.weight": "expert_down_proj",
    "gate_proj.bias": "expert_gate_bias",  # gpt-oss's (split from its stacked tensors)
    "up_proj.bias": "expert_up_bias",
    "down_proj.bias": "expert_down_bias",
}
_EXPERT_PARAMS = frozenset(_EXPERT_TENSORS.values())  # [experts, ...] in each layer
_TOP_TENSORS = {
    "model.embed_tokens.weight": ("embed_tokens", False),
    "model.norm.weight": ("norm", False),
    "lm_head.weight": ("lm_head", True),
}
_LAYER_TENSOR_OF = {param: name for name, (param, _) in _LAYER_TENSORS.items()}
# Fused tensors (joined from their parts, in this order: `FUSED_PROJECTIONS`, and the q / k / v
# biases into `qkv_bias`) and the layer parameters they fill.
_FUSIONS = {_LAYER_TENSOR_OF[fused]: (fused, tuple(_LAYER_TENSOR_OF[part] for part in parts))
            for fused, parts in FUSED_PROJECTIONS.items()}
_FUSIONS["self_attn.qkv_proj.bias"] = ("qkv_bias", tuple(name.replace(".weight", ".bias")
                                                         for name in _FUSIONS["self_attn.qkv_proj.weight"][1]))
_FUSED_INTO = {part: fused for fused, (_, parts) in _FUSIONS.items() for part in parts}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_NAME = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(.+)")


def _target(name: str) -> tuple[str, tuple[int, ...], bool] | None:
    """`(param name, where, transpose)` for an HF tensor name; None to skip it.

    `where` is `()` for a top-level parameter, `(layer,)` for a layer's and `(layer, expert)` for
    one expert of a layer's MoE parameter.
    """
    if name in _TOP_TENSORS:
        param, transpose = _TOP_TENSORS[name]
        return param, (), transpose
    match = _LAYER_NAME.fullmatch(name)
    if match and match.group(2) in _LAYER_TENSORS:
        param, transpose = _LAYER_TENSORS[match.group(2)]
        return param, (int(match.group(1)),), transpose
    expert = _EXPERT_NAME.fullmatch(match.group(2)) if match else None
    if expert and expert.group(2) in _EXPERT_TENSORS:
        return _EXPERT_TENSORS[expert.group(2)], (int(match.group(1)), int(expert.group(1))), True
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"unexpected weight {name!r}: not part of a supported Llama-family model")


def _slot(param: str, where: tuple[int, ...], layers_per_stage: int, staged: bool):
    """The model's path to `param` and the index into it of the tensor at `where`."""
    if not where:
        return (param,), ()
    layer, expert = where[0], where[1:]
    stage = (layer // layers_per_stage,) if staged else ()
    return ("layers", layer % layers_per_stage, param), stage + expert


def param_formats(packed: dict[str, str]) -> dict[str, str]:
    """The model's parameter keys (`"embed_tokens"`, `"layers.3.q_proj"`, ...) of the HF tensors
    in `packed` (HF name: GGML block type), with their types."""
    formats = {}
    for name, kind in packed.items():
        param, where, _ = _target(name)
        formats[".".join(["layers", str(where[0]), param] if where else [param])] = kind
    return formats


def fuse_rows(parts: list[np.ndarray], shards: int) -> np.ndarray:
    """Join tensors `[out_i, ...]` along their first axis, shard-major: for each of `shards`
    tensor-parallel shards, its slice of every part in turn (as `models.llama.split_columns`
    reads them). Works on `[out, in]` weights, `[out]` biases and GGML block rows alike."""
    return np.concatenate([piece for shard in range(shards) for piece in
                           (np.split(part, shards)[shard] for part in parts)])


def _check_joinable(layer: int, parts: dict[str, np.ndarray], shards: int) -> None:
    """ValueError naming a layer's tensors that cannot be joined by rows: of no rows, of rows
    that differ in shape, or of a row count the tensor-parallel shards do not divide."""
    shapes = {part: tensor.shape for part, tensor in parts.items()}
    if any(len(shape) == 0 or shape[0] % shards for shape in shapes.values()) or \
            len({shape[1:] for shape in shapes.values()}) > 1:
        listed = ", ".join(f"model.layers.{layer}.{part} {tuple(shape)}" for part, shape in shapes.items())
        raise ValueError(f"weights {listed} do not fit together: each must be [rows, ...] with the same row shape"
                         + (f" and rows divisible by the {shards} tensor-parallel shards" if shards > 1 else ""))


def fuse_projections(weights: Iterable[tuple[str, np.ndarray]], layers: dict, shards: int = 1,
                     keep_alone: bool = False):
    """`weights` with each layer's q / k / v tensors (weights, and biases where the model has
    them) and gate / up weights joined into one tensor each (`fuse_rows`), where the layer's
    parameters (`layers[i]`, a dict by name; a pipelined model's layer `i % len(layers)`) have
    the fused one. A layer's parts are held until its last one arrives; a part missing at the
    end is an error (ValueError naming it), or with `keep_alone` the parts that came are
    yielded at the end as they are."""
    pending: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, tensor in weights:
        match = _LAYER_NAME.fullmatch(name)
        fused = _FUSED_INTO.get(match.group(2)) if match else None
        layer = int(match.group(1)) if fused else -1
        if fused is None or _FUSIONS[fused][0] not in layers.get(layer % len(layers), {}):
            yield name, tensor
            continue
        held = pending.setdefault((layer, fused), {})
        held[match.group(2)] = tensor
        parts = _FUSIONS[fused][1]
        if len(held) == len(parts):
            del pending[layer, fused]
            _check_joinable(layer, {part: held[part] for part in parts}, shards)
            yield f"model.layers.{layer}.{fused}", fuse_rows([held[part] for part in parts], shards)
    if pending and keep_alone:
        for (layer, _), held in sorted(pending.items()):
            yield from ((f"model.layers.{layer}.{part}", tensor) for part, tensor in held.items())
    elif pending:
        missing = [f"model.layers.{layer}.{part}" for (layer, fused), held in sorted(pending.items())
                   for part in _FUSIONS[fused][1] if part not in held]
        raise ValueError(f"weights missing from the checkpoint: {', '.join(missing)}")


def split_fused_tensors(weights: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig):
    """`weights` with a checkpoint's own fused tensors (Phi-3's `self_attn.qkv_proj` and
    `mlp.gate_up_proj`: q, k, v and gate, up stacked by rows) split into their parts, which
    `fuse_projections` joins again in the model's layout, and GraniteMoE's experts stacked in one
    tensor (`block_sparse_moe.input_linear [experts, 2 * ff, hidden]`, gate then up, and
    `output_linear`; transformers 5's `mlp.experts.gate_up_proj` and `down_proj` alike) and gpt-oss's (`_INTERLEAVED_EXPERTS`, as float tensors or as MXFP4 blocks
    and scales, `dequantize_mxfp4`) split into one tensor per expert. ValueError for a fused tensor whose rows
    are not the parts' sizes."""
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sizes = {"qkv_proj": (q_dim, kv_dim, kv_dim), "qkv_bias": (q_dim, kv_dim, kv_dim),
             "gate_up_proj": (cfg.intermediate_size,) * 2}
    mxfp4: dict[str, dict[str, np.ndarray]] = {}  # an MXFP4 tensor's blocks or scales, until the other comes
    for name, tensor in weights:
        match = _LAYER_NAME.fullmatch(name)
        part = next((suffix for suffix in _MXFP4_PARTS if name.endswith(suffix)), None)
        if match and part and match.group(2).removesuffix(part) in _INTERLEAVED_EXPERTS:
            held = mxfp4.setdefault(name.removesuffix(part), {})
            held[part] = tensor
            if len(held) < 2:
                continue
            del mxfp4[name.removesuffix(part)]
            name, tensor = name.removesuffix(part), dequantize_mxfp4(held["_blocks"], held["_scales"])
            match = _LAYER_NAME.fullmatch(name)
        if match and match.group(2) in _INTERLEAVED_EXPERTS and cfg.architecture == "gpt_oss":
            yield from _split_interleaved(match.group(2), match.group(1), tensor)
            continue
        stacked = _STACKED_EXPERTS.get(match.group(2)) if match else None
        if stacked is not None:
            if tensor.ndim != 3 or tensor.shape[1] % len(stacked):
                raise ValueError(f"weight {name!r} has shape {tensor.shape}, expected [experts, {len(stacked)} x rows, "
                                 "columns] (the experts' " + " and ".join(p.split(".")[0] for p in stacked) + " stacked)")
            for expert, per_expert in enumerate(tensor):
                parts = np.split(per_expert, len(stacked))
                for part, piece in zip(stacked, parts):
                    yield f"model.layers.{match.group(1)}.block_sparse_moe.experts.{expert}.{part}", piece
            continue
        fusion = _FUSIONS.get(match.group(2)) if match else None
        if fusion is None:
            yield name, tensor
            continue
        fused, parts = fusion
        if tensor.shape[0] != sum(sizes[fused]):
            raise ValueError(f"weight {name!r} has {tensor.shape[0]} rows, expected {sum(sizes[fused])} "
                             f"({' + '.join(map(str, sizes[fused]))} for {', '.join(parts)})")
        for part, piece in zip(parts, np.split(tensor, np.cumsum(sizes[fused])[:-1])):
            yield f"model.layers.{match.group(1)}.{part}", piece
    if mxfp4:
        missing = [f"{name}{suffix}" for name, held in mxfp4.items() for suffix in _MXFP4_PARTS if suffix not in held]
        raise ValueError(f"weights missing from the checkpoint: {', '.join(missing)} (MXFP4 blocks and scales pair)")


# GLM-4's four norms a layer, by the names of Gemma 2's (the same places: before and after
# attention, before and after the MLP)
_GLM4_NORMS = {"post_self_attn_layernorm.weight": "post_attention_layernorm.weight",
               "post_attention_layernorm.weight": "pre_feedforward_layernorm.weight",
               "post_mlp_layernorm.weight": "post_feedforward_layernorm.weight"}


def as_model_layout(weights: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig):
    """`weights` as the model reads them: each layer's q and k rows (weights and biases)
    reordered from interleaved RoPE pairs to rotate-half where `cfg.rope_interleaved`
    (`loader/rope_rows.py`), and GLM-4's norms under Gemma 2's names."""
    for name, tensor in weights:
        match = _LAYER_NAME.fullmatch(name)
        if match and match.group(2).startswith("self_attn."):
            tensor = as_rotate_half(tensor, match.group(2).split(".")[1], cfg)
        if match and cfg.architecture == "glm4" and match.group(2) in _GLM4_NORMS:
            name = f"model.layers.{match.group(1)}.{_GLM4_NORMS[match.group(2)]}"
        yield name, tensor


# Experts stacked in one tensor, `[experts, out, in]`: the per-expert tensors each holds, stacked
# by rows in this order. GraniteMoE's checkpoints; and transformers 5's own MoE models (Mixtral,
# Qwen MoE, ...) in memory, as their `state_dict()` hands them to `LLM.load_weights` (their
# checkpoints hold one tensor per expert).
_STACKED_EXPERTS = {"block_sparse_moe.input_linear.weight": ("gate_proj.weight", "up_proj.weight"),
                    "block_sparse_moe.output_linear.weight": ("down_proj.weight",),
                    "mlp.experts.gate_up_proj": ("gate_proj.weight", "up_proj.weight"),
                    "mlp.experts.down_proj": ("down_proj.weight",)}
# gpt-oss's stacked experts, in `x @ W` layout with gate and up interleaved by column (gate in the
# even columns): the per-expert tensors each holds, in [out, in] layout as the others' checkpoints.
_INTERLEAVED_EXPERTS = {"mlp.experts.gate_up_proj": ("gate_proj.weight", "up_proj.weight"),
                        "mlp.experts.gate_up_proj_bias": ("gate_proj.bias", "up_proj.bias"),
                        "mlp.experts.down_proj": ("down_proj.weight",),
                        "mlp.experts.down_proj_bias": ("down_proj.bias",)}


# MXFP4 (OCP Microscaling, 4-bit e2m1 values with an e8m0 scale per 32), as gpt-oss ships its experts:
# each 4-bit code's value, low nibble first in each byte.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
_MXFP4_PARTS = ("_blocks", "_scales")


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """An MXFP4 tensor as float32: `blocks [..., out, groups, 16]` uint8 (two 4-bit codes a byte,
    low nibble first), `scales [..., out, groups]` uint8 (powers of two, biased by 127) to
    `[..., in, out]` (`x @ W` layout, in = groups * 32), as transformers' gpt-oss loader reads it.
    ValueError for shapes that do not pair."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair "
                         "(blocks [..., groups, 16], scales [..., groups])")
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*scales.shape, 32)
    with np.errstate(over="ignore"):  # scale 255 (E8M0's NaN) overflows to inf, as transformers reads it
        values = np.ldexp(FP4_VALUES[codes], scales.astype(np.int32)[..., None] - 127)
    return values.reshape(*scales.shape[:-1], -1).swapaxes(-1, -2)


def _split_interleaved(name: str, layer: str, tensor: np.ndarray):
    """One gpt-oss stacked expert tensor as per-expert tensors under the names `_target` reads."""
    parts = _INTERLEAVED_EXPERTS[name]
    for expert, per_expert in enumerate(tensor):
        for i, part in enumerate(parts):
            piece = per_expert[..., i::len(parts)]
            yield f"model.layers.{layer}.mlp.experts.{expert}.{part}", piece.T if piece.ndim == 2 else piece


def replicate_kv_heads(weights: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig, num_kv_heads: int):
    """Repeat each KV head's K/V projection rows until the model has `num_kv_heads` of them.

    Under tensor parallelism with more shards than KV heads, every shard needs a KV head of its
    own; head `j` of the result is head `j // repeats` of the checkpoint, which keeps each query
    head reading the K/V it was trained with.
    """
    repeats = num_kv_heads // cfg.num_kv_heads
    for name, tensor in weights:
        if repeats > 1 and (re.search(r"self_attn\.[kv]_proj\.(weight|bias)$", name) or
                            (cfg.qk_norm_over_heads and name.endswith("self_attn.k_norm.weight"))):
            per_head = tensor.reshape(cfg.num_kv_heads, cfg.head_dim, *tensor.shape[1:])
            tensor = np.repeat(per_head, repeats, axis=0).reshape(num_kv_heads * cfg.head_dim, *tensor.shape[1:])
        yield name, tensor


# torch's float types that numpy lacks, as ml_dtypes holds them
_ML_DTYPES = {"torch.bfloat16": ml_dtypes.bfloat16, "torch.float8_e4m3fn": ml_dtypes.float8_e4m3fn,
              "torch.float8_e5m2": ml_dtypes.float8_e5m2}


def host_tensors(weights) -> Iterator[tuple[str, np.ndarray]]:
    """A caller's tensors as the loader takes them: `(name, numpy array)` pairs from a mapping or
    an iterable of pairs, each value a torch tensor (any device; bfloat16 and float8 kept as
    such), a jax or numpy array. ValueError naming an entry that is not a pair of a name and a floating array."""
    pairs = weights.items() if isinstance(weights, Mapping) else weights
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise ValueError(f"weights must be a mapping or an iterable of (name, tensor) pairs, got "
                         f"{type(weights).__name__}")
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"weights must be (name, tensor) pairs, got {pair!r:.80}")
        name, tensor = pair
        try:
            if hasattr(tensor, "detach"):  # a torch tensor, read without importing torch
                tensor = tensor.detach().to("cpu")
                if (ml_dtype := _ML_DTYPES.get(str(tensor.dtype))) is not None:  # exact through float32
                    tensor = tensor.float().numpy().astype(ml_dtype)
            array = np.asarray(tensor)
        except Exception as err:  # a tensor with no data to copy (torch's meta device, a deleted jax array)
            raise ValueError(f"weight {name!r} could not be read ({type(err).__name__}: {err})") from err
        if array.dtype.kind != "f" and array.dtype not in _ML_DTYPES.values():
            raise ValueError(f"weight {name!r} must hold floats, got {array.dtype}")
        yield name, array


def load_params(model: nnx.Module, cfg: ModelConfig, weights: Iterable[tuple[str, np.ndarray]],
                sharding=lambda path, shape, dtype: None):
    """Fill the (abstract) `model`'s parameters from `weights`; returns the loaded nnx state.

    `sharding(path, shape, dtype)` says where a parameter lives (a `jax.sharding.Sharding`, None
    for the default device, or a `HostStore` that keeps it off the device). A tensor that is a whole parameter goes straight there; one that is a
    pipeline stage's layer or an expert is written into its parameter, allocated as zeros where
    it lives. Tensors are placed as they arrive, so the host holds one at a time. A parameter the
    model keeps quantized (int8 or float8 storage) is quantized as it arrives, its scale placed
    beside it.
    """
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers_per_stage = len(state["layers"])
    staged = layers_per_stage < cfg.num_layers
    params: dict[tuple, jax.Array] = {}
    filled: dict[str, set[tuple[int, ...]]] = {}
    for name, tensor in fuse_projections(weights, state["layers"], getattr(model, "tensor_parallel_size", 1)):
        placed = _prepared(state, cfg, name, tensor, layers_per_stage, staged)
        if placed is None:
            continue
        path, index, value, scale, param, where = placed
        if scale is not None:
            scale_path = path[:-1] + (scale_name(param),)
            _place(params, scale_path, index, scale, _lookup(state, scale_path, name), sharding)
        _place(params, path, index, value, _lookup(state, path, name), sharding)
        filled.setdefault(param, set()).add(where)
    _check_complete(state, filled, cfg)
    for path, param in params.items():
        _assign(state, path, param)
    return state


def update_params(state: dict, cfg: ModelConfig, weights: Iterable[tuple[str, np.ndarray]], shards: int = 1) -> dict:
    """The model's parameters `state` (a pure dict of device arrays, as `nnx.to_pure_dict` gives
    them; left as they are) with the tensors in `weights` written in, each where it lives and
    quantized as its parameter is: a new pure dict that shares every array no tensor touched.

    Any subset of a checkpoint's tensors may come (vLLM's `load_weights` semantics, as RLHF
    trainers hand weights over in buckets or one by one). A q / k / v or gate / up tensor that
    comes without the others of its layer is written into its rows of the fused projection
    (shard-major, as `fuse_rows` lays them out for `shards` tensor-parallel shards); a row's
    int8 / float8 scales depend on that row alone, so they are the fused tensor's rows too.
    The updates are written into copies, so on an error (ValueError naming the tensor) nothing
    has changed. `cfg` is the model's config (KV heads as the model keeps them).
    """
    layers_per_stage = len(state["layers"])
    staged = layers_per_stage < cfg.num_layers
    updated: dict[tuple, jax.Array] = {}

    def write(path: tuple, index: tuple, value: np.ndarray, name: str, rows=None) -> None:
        current = updated.get(path)
        base = current if current is not None else _lookup(state, path, name)
        value = np.ascontiguousarray(value, dtype=base.dtype)
        if not index and rows is None:
            updated[path] = jax.device_put(value, base.sharding)
            return
        axis, pieces = rows if rows is not None else (0, [(0, value)])
        for offset, piece in pieces:
            piece = np.ascontiguousarray(piece, dtype=base.dtype)
            starts = list(index) + [0] * piece.ndim
            starts[len(index) + axis] = offset
            writer = _update_slice_in_place if current is not None else _update_slice
            base = current = writer(base, piece, tuple(np.int32(i) for i in starts))
        updated[path] = base

    for name, tensor in fuse_projections(weights, state["layers"], shards, keep_alone=True):
        part = _fused_part(name, state["layers"], layers_per_stage)
        if part is not None:
            _write_fused_part(write, state, cfg, name, tensor, part, layers_per_stage, staged, shards)
            continue
        placed = _prepared(state, cfg, name, tensor, layers_per_stage, staged)
        if placed is None:
            continue
        path, index, value, scale, param, _ = placed
        if scale is not None:
            write(path[:-1] + (scale_name(param),), index, scale, name)
        write(path, index, value, name)
    new_state = jax.tree.map(lambda x: x, state)
    for path, param in updated.items():
        _assign(new_state, path, param)
    return new_state


def _fused_part(name: str, layers: dict, layers_per_stage: int) -> tuple[str, str] | None:
    """`(fused tensor, part)` HF names for a q / k / v or gate / up tensor of a layer whose model
    keeps them fused; None for any other tensor."""
    match = _LAYER_NAME.fullmatch(name)
    fused = _FUSED_INTO.get(match.group(2)) if match else None
    if fused is None or _FUSIONS[fused][0] not in layers.get(int(match.group(1)) % layers_per_stage, {}):
        return None
    return fused, match.group(2)


def _write_fused_part(write, state, cfg, name, tensor, part, layers_per_stage, staged, shards) -> None:
    """Write one part of a fused projection (`_fused_part`) into its rows (see `update_params`)."""
    fused, piece_name = part
    layer = int(_LAYER_NAME.fullmatch(name).group(1))
    if layer >= cfg.num_layers:
        raise ValueError(f"weight {name!r} is for layer {layer}, but the model has {cfg.num_layers} layers "
                         f"(0 to {cfg.num_layers - 1})")
    param, transpose = _LAYER_TENSORS[fused]
    path, index = _slot(param, (layer,), layers_per_stage, staged)
    spec = _lookup(state, path, name)
    parts = _FUSIONS[fused][1]
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sizes = (q_rows, kv_rows, kv_rows) if len(parts) == 3 else (cfg.intermediate_size,) * 2
    position = parts.index(piece_name)
    scheme = scheme_of(spec.dtype) if param in QUANTIZED_PARAMS else None
    if np.dtype(spec.dtype) == np.uint8:
        raise ValueError(f"weight {name!r} is kept in GGML blocks; load_weights takes float tensors")
    transposed = transpose and scheme is None
    expected = (sizes[position],) + tuple(spec.shape[len(index):][::-1][1:] if transposed
                                          else spec.shape[len(index) + 1:])
    if tensor.shape != expected:
        raise ValueError(f"weight {name!r} has shape {tensor.shape}, expected {expected}")
    tensor, scale = _quantized(name, tensor, scheme)
    start = sum(sizes[:position]) // shards

    def rows(value: np.ndarray, axis: int):
        share, block = sizes[position] // shards, sum(sizes) // shards
        moved = np.moveaxis(value, 0, axis)
        return axis, [(shard * block + start, np.take(moved, range(shard * share, (shard + 1) * share), axis=axis))
                      for shard in range(shards)]

    if scale is not None:
        write(path[:-1] + (scale_name(param),), index, scale, name, rows(scale, 0))
    write(path, index, tensor, name, rows(tensor, 1 if transposed else 0))


def _prepared(state: dict, cfg: ModelConfig, name: str, tensor: np.ndarray, layers_per_stage: int, staged: bool):
    """One tensor as its parameter keeps it: `(path, index, value, scale, param, where)` (scale
    None unless the parameter is quantized), or None for a tensor the model does not keep.
    ValueError naming a tensor for a layer or expert the model lacks, or of the wrong shape."""
    target = _target(name)
    if target is None or (target[0] == "lm_head" and cfg.tie_word_embeddings):
        return None
    param, where, transpose = target
    for i, n, what in zip(where, (cfg.num_layers, cfg.num_experts), ("layer", "expert")):
        if i >= n:
            raise ValueError(f"weight {name!r} is for {what} {i}, but the model has {n} {what}s (0 to {n - 1})")
    path, index = _slot(param, where, layers_per_stage, staged)
    spec = _lookup(state, path, name)
    scheme = scheme_of(spec.dtype) if param in QUANTIZED_PARAMS else None
    packed = np.dtype(spec.dtype) == np.uint8  # GGML block rows, [out, row bytes] as the file has them
    transposed = transpose and scheme is None and not packed  # quantized: kept [out, in]
    value = tensor.T if transposed else tensor
    expected = tuple(spec.shape[len(index):])
    if value.shape != expected:
        layer = _LAYER_NAME.fullmatch(name)
        joined = _FUSIONS.get(layer.group(2)) if layer else None
        parts = f" (joined from {', '.join(joined[1])})" if joined else ""
        raise ValueError(f"weight {name!r}{parts} has shape {tensor.shape}, expected "
                         f"{expected[::-1] if transposed else expected}")
    value, scale = _quantized(name, value, scheme)
    return path, index, np.ascontiguousarray(value, dtype=spec.dtype), scale, param, where


def _quantized(name: str, value: np.ndarray, scheme: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """`(values, scale)` of `value` under `scheme` (`quantize`), or `(value, None)` for None;
    ValueError naming the weight that cannot be quantized."""
    if scheme is None:
        return value, None
    try:
        return quantize(value, scheme)
    except ValueError as err:
        raise ValueError(f"weight {name!r}: {err}") from err


def _slice_update(param: jax.Array, value, starts: tuple) -> jax.Array:
    return jax.lax.dynamic_update_slice(param, value.reshape((1,) * (param.ndim - value.ndim) + value.shape), starts)


_update_slice = jax.jit(_slice_update)  # into a copy: the first write to a parameter
_update_slice_in_place = jax.jit(_slice_update, donate_argnums=0)  # into that copy


def _place(params: dict, path: tuple, index: tuple, value: np.ndarray, spec, sharding) -> None:
    """Put `value` at `index` of the parameter at `path` (the whole of it for `index == ()`)."""
    where_it_lives = sharding(path, spec.shape, spec.dtype)
    if isinstance(where_it_lives, HostStore):  # a streamed layer's weight, kept off the device
        if not index:
            params[path] = where_it_lives.put(path, value)
            return
        if path not in params:
            params[path] = where_it_lives.zeros(path, spec.shape, spec.dtype)
        params[path][index] = value
        return
    if not index:
        params[path] = jax.device_put(value, where_it_lives)
        return
    if path not in params:
        params[path] = zeros_at(spec.shape, spec.dtype, where_it_lives)
    params[path] = _write_at(params[path], index, value)


def zeros_at(shape: tuple[int, ...], dtype, sharding) -> jax.Array:
    """Zeros made where they live (in their shards on a device mesh; None: the default device)."""
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return _sharded_zeros(shape, dtype, sharding)()


@functools.cache
def _sharded_zeros(shape: tuple[int, ...], dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@partial(jax.jit, donate_argnums=0)
def _write_at(param: jax.Array, index: tuple, value) -> jax.Array:
    """`param` with `value` at `index` (`()` for the whole parameter, else a pipeline stage, an
    expert, or both): traced, so one compile per parameter shape."""
    return param.at[index].set(value)


def _lookup(state: dict, path: tuple[str, ...], name: str):
    node = state
    for key in path:
        if key not in node:
            raise ValueError(f"weight {name!r} does not belong to this model configuration")
        node = node[key]
    return node


def _assign(state: dict, path: tuple[str, ...], value) -> None:
    node = state
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _check_complete(state: dict, filled: dict[str, set[tuple[int, ...]]], cfg: ModelConfig) -> None:
    layers, experts = range(cfg.num_layers), range(cfg.num_experts)
    expected = {name: {()} for name in ("embed_tokens", "norm", "lm_head") if name in state}
    for i in layers:  # a GGUF model's layers may differ in which projections are fused
        for param in state["layers"][i % len(state["layers"])]:
            if param.endswith("_scale"):  # placed with its weight
                continue
            expected.setdefault(param, set()).update({(i, e) for e in experts} if param in _EXPERT_PARAMS else {(i,)})
    missing = []
    for param, indices in expected.items():
        got = filled.get(param)
        name = _checkpoint_name(param, state)
        if got is None:
            missing.append(name)
        elif got != indices:
            what = "layers" if len(next(iter(indices))) == 1 else "(layer, expert)"
            gaps = sorted(indices - got)
            gaps = [g[0] for g in gaps] if what == "layers" else gaps
            missing.append(f"{name} for {what} {gaps}")
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {', '.join(missing)}")


def _checkpoint_name(param: str, state: dict) -> str:
    """How a checkpoint names the tensor(s) of the model's parameter `param` (N: the layer, E:
    the expert; a fused parameter's parts joined by " / ")."""
    if param in state:
        return next(hf for hf, (target, _) in _TOP_TENSORS.items() if target == param)
    if param in _EXPERT_PARAMS:
        return "model.layers.N.mlp.experts.E." + next(hf for hf, target in _EXPERT_TENSORS.items()
                                                     if target == param and not hf.startswith("w"))
    tensor = _LAYER_TENSOR_OF.get(param, param)
    parts = _FUSIONS[tensor][1] if tensor in _FUSIONS else (tensor,)
    return " / ".join(f"model.layers.N.{part}" for part in parts)
