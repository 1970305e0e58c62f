"""Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's image side: the vision transformer and the patch merger.

The engine runs it once per image when a request is added (`QwenImageEncoder.encode`), as it runs
LLaVA's tower (`models/vision.py`); the embeddings replace the image's placeholder tokens, which
the language model reads at multimodal RoPE positions (`jpaged/mrope.py`). Math as transformers'
`Qwen2VisionTransformerPretrainedModel`, `Qwen2_5_VisionTransformerPretrainedModel` and
`Qwen3VLVisionModel` (Wang et al., "Qwen2-VL", 2024; Bai et al., "Qwen2.5-VL Technical Report",
2025; Qwen3-VL, 2025): a linear patch embedding (the checkpoint's 3D convolution over one patch;
Qwen3-VL adds its learned position grid, resampled bilinearly to the image's grid), rotate-half
RoPE over each patch's (row, column), pre-norm blocks attending over the whole image (Qwen2.5-VL:
within windows of `window_size` pixels, but in `full_attention_layers`), then the merger: a norm,
each `spatial_merge_size`^2 neighbouring patches concatenated, linear, GELU, linear. Qwen3-VL
also merges the states after its `deepstack_layers` (a norm over the concatenated patches
there), and the language model adds those embeddings to the image tokens' hidden states after its
first layers (DeepStack, Meng et al. 2024; `LlamaForCausalLM.__call__`).

Patches run in the merger's order: each `spatial_merge_size` x `spatial_merge_size` square's
patches together, the squares row by row (HF's processor order). Attention is permutation
equivariant, so Qwen2.5-VL's windows are a mask over that order rather than HF's reordering. An
image's patches are padded to a power of two (padding attends to itself alone and is dropped), so
the tower compiles for few sizes. Parameters are a flat dict under the checkpoint's names without
the `visual.` prefix, computed in float32.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.config import QwenVisionConfig
from jpaged.models.vision import ACTIVATIONS, layer_norm, linear, rms_norm, rotate_half

MIN_PADDED_PATCHES = 64


def _norm(x, params: dict, name: str, cfg: QwenVisionConfig):
    return rms_norm(x, params, name) if cfg.windowed else layer_norm(x, params, name, 1e-6)


def _attention(x, params: dict, name: str, cos, sin, groups, num_heads: int):
    """Attention of each patch over the patches of its group (`groups [N]`: equal ids attend)."""
    n, d = x.shape
    head_dim = d // num_heads
    q, k, v = linear(x, params, f"{name}.qkv").reshape(n, 3, num_heads, head_dim).transpose(1, 0, 2, 3)
    q, k = rotate_half(q, cos[:, None], sin[:, None]), rotate_half(k, cos[:, None], sin[:, None])
    scores = jnp.einsum("qhd,khd->hqk", q, k) * head_dim ** -0.5
    scores = jnp.where((groups[:, None] == groups[None, :])[None], scores, -jnp.inf)
    out = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), v)
    return linear(out.reshape(n, d), params, f"{name}.proj")


def _mlp(x, params: dict, name: str, cfg: QwenVisionConfig):
    act = ACTIVATIONS[cfg.hidden_act]
    if cfg.windowed:
        return linear(act(linear(x, params, f"{name}.gate_proj")) * linear(x, params, f"{name}.up_proj"), params,
                      f"{name}.down_proj")
    first, second = ("fc1", "fc2") if cfg.version == "qwen2_vl" else ("linear_fc1", "linear_fc2")
    return linear(act(linear(x, params, f"{name}.{first}")), params, f"{name}.{second}")


def _merge(x, params: dict, name: str, cfg: QwenVisionConfig, after_shuffle: bool = False):
    """Each `spatial_merge_size`^2 consecutive patches' states `x [N, hidden]` as one embedding
    `[N / merge^2, out_hidden_size]`: a norm (Qwen3-VL's DeepStack mergers: over the merged
    states), linear, GELU, linear."""
    width = x.shape[-1] * cfg.spatial_merge_size ** 2
    if cfg.version != "qwen3_vl":
        merged = _norm(x, params, f"{name}.ln_q", cfg).reshape(-1, width)
        return linear(ACTIVATIONS["gelu"](linear(merged, params, f"{name}.mlp.0")), params, f"{name}.mlp.2")
    merged = layer_norm(x.reshape(-1, width), params, f"{name}.norm", 1e-6) if after_shuffle else (
        layer_norm(x, params, f"{name}.norm", 1e-6).reshape(-1, width))
    return linear(ACTIVATIONS["gelu"](linear(merged, params, f"{name}.linear_fc1")), params, f"{name}.linear_fc2")


def image_features(params: dict, patches, cos, sin, whole, windows, grid_taps, grid_weights, cfg: QwenVisionConfig):
    """The merged embeddings `[N / merge^2, out_hidden_size x (1 + len(deepstack_layers))]`
    float32 of `patches [N, patch_features]` in the merger's order (Qwen3-VL: the DeepStack
    layers' merged states after the last layer's, along the features), with each patch's RoPE
    `cos` / `sin [N, head_dim]` and attention groups (`whole` for full attention, `windows` for
    Qwen2.5-VL's windowed layers; [N] int32, equal ids attend to each other); Qwen3-VL's learned
    positions are the rows `grid_taps [N, 4]` of its grid weighted by `grid_weights [N, 4]`."""
    weight = params["patch_embed.proj.weight"]
    x = patches.astype(jnp.float32) @ weight.reshape(weight.shape[0], -1).T
    if "patch_embed.proj.bias" in params:
        x = x + params["patch_embed.proj.bias"]
    if cfg.num_position_embeddings:
        x = x + (params["pos_embed.weight"][grid_taps] * grid_weights[..., None]).sum(1)
    deepstack = []
    for i in range(cfg.num_layers):
        name = f"blocks.{i}"
        groups = windows if cfg.windowed and i not in cfg.full_attention_layers else whole
        x = x + _attention(_norm(x, params, f"{name}.norm1", cfg), params, f"{name}.attn", cos, sin, groups,
                           cfg.num_heads)
        x = x + _mlp(_norm(x, params, f"{name}.norm2", cfg), params, f"{name}.mlp", cfg)
        if i in cfg.deepstack_layers:
            j = cfg.deepstack_layers.index(i)
            deepstack.append(_merge(x, params, f"deepstack_merger_list.{j}", cfg, after_shuffle=True))
    return jnp.concatenate([_merge(x, params, "merger", cfg), *deepstack], axis=-1)


def grid_interpolation(row: np.ndarray, col: np.ndarray, rows: int, cols: int, side: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's learned `side x side` position grid resampled to a `rows x cols` image
    bilinearly, corners aligned (as `F.interpolate(align_corners=True)`): for each patch at
    (`row`, `col`), its 4 rows of the grid (int32 `[N, 4]`) and their weights (float32)."""
    def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        source = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(source)
        offsets = np.arange(2, dtype=np.float32)
        taps = np.clip(floor[:, None] + offsets, 0, side - 1).astype(np.int32)
        return taps, np.clip(1 - np.abs(source[:, None] - floor[:, None] - offsets), 0, None).astype(np.float32)

    row_taps, row_weights = axis(row, rows)
    col_taps, col_weights = axis(col, cols)
    taps = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    return taps, (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)


def merger_order(rows: int, cols: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Each patch's (row, column) in the grid, int64 `[rows * cols]` each, in the merger's order."""
    row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    order = lambda grid: grid.reshape(rows // merge, merge, cols // merge, merge).transpose(0, 2, 1, 3).ravel()  # noqa: E731
    return order(row), order(col)


class QwenImageEncoder:
    """The vision tower and merger on one device, compiled once per padded patch count."""

    def __init__(self, cfg: QwenVisionConfig, weights: dict[str, np.ndarray], device=None):
        """`weights`: the tower's tensors by name (see the module docstring). ValueError naming a
        tensor the model needs that `weights` lacks, or a patch embedding of another shape."""
        merger = ("norm", "linear_fc1", "linear_fc2") if cfg.version == "qwen3_vl" else ("ln_q", "mlp.0", "mlp.2")
        needed = ["patch_embed.proj.weight", *(f"merger.{name}.weight" for name in merger)]
        needed += [f"blocks.{i}.attn.qkv.weight" for i in range(cfg.num_layers)]
        needed += [f"deepstack_merger_list.{j}.linear_fc1.weight" for j in range(len(cfg.deepstack_layers))]
        needed += ["pos_embed.weight"] if cfg.num_position_embeddings else []
        if missing := [name for name in needed if name not in weights]:
            raise ValueError(f"the Qwen-VL checkpoint lacks vision tensors {missing[:3]}")
        shape = np.shape(weights["patch_embed.proj.weight"])
        if int(np.prod(shape[1:])) != cfg.patch_features or shape[0] != cfg.hidden_size:
            raise ValueError(f"the patch embedding has shape {shape}; config.json's vision_config describes "
                             f"[{cfg.hidden_size}, 3, {cfg.temporal_patch_size}, {cfg.patch_size}, {cfg.patch_size}]")
        self.cfg = cfg
        self.params = {name: jax.device_put(np.asarray(w, np.float32), device) for name, w in weights.items()}
        self._encode = jax.jit(partial(image_features, cfg=cfg))

    def encode(self, pixels: np.ndarray, height: int, width: int) -> np.ndarray:
        """The embeddings, float32 numpy `[rows * columns, out_hidden_size x (1 + DeepStack
        layers)]` (merged patches row by row), of an image's patches `pixels [grid rows, grid
        columns, patch_features]`. ValueError for patches of another shape."""
        cfg, merge = self.cfg, self.cfg.spatial_merge_size
        rows, cols = pixels.shape[:2]
        if pixels.ndim != 3 or pixels.shape[2] != cfg.patch_features or rows % merge or cols % merge:
            raise ValueError(f"patches of shape {pixels.shape}; the vision tower takes [rows, columns, "
                             f"{cfg.patch_features}] with rows and columns multiples of {merge}")
        row, col = merger_order(rows, cols, merge)
        count = rows * cols
        padded = max(MIN_PADDED_PATCHES, 1 << (count - 1).bit_length())
        patches = np.zeros((padded, cfg.patch_features), np.float32)
        patches[:count] = pixels[row, col]
        cos, sin = self._rope(row, col, padded)
        alone = -1 - np.arange(padded - count, dtype=np.int32)  # padding: a group of its own each
        whole = np.concatenate([np.zeros(count, np.int32), alone])
        windows = whole
        if cfg.windowed:
            side = max(cfg.window_size // merge // cfg.patch_size, 1)  # in merged patches
            window = (row // merge // side) * (cols // merge // side + 1) + col // merge // side
            windows = np.concatenate([window.astype(np.int32), alone])
        taps, weights = np.zeros((padded, 4), np.int32), np.zeros((padded, 4), np.float32)
        if cfg.num_position_embeddings:
            side = int(round(cfg.num_position_embeddings ** 0.5))
            taps[:count], weights[:count] = grid_interpolation(row, col, rows, cols, side)
        features = self._encode(self.params, patches, cos, sin, whole, windows, taps, weights)
        return np.asarray(features)[:count // merge ** 2]

    def _rope(self, row: np.ndarray, col: np.ndarray, padded: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin `[padded, head_dim]` float32: a quarter of each head's dims turn by the
        patch's row, a quarter by its column, as HF's axial vision RoPE."""
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        inv_freq = 1.0 / self.cfg.rope_theta ** (np.arange(0, head_dim // 2, 2, dtype=np.float32) / (head_dim // 2))
        angles = np.zeros((padded, head_dim // 2), np.float32)
        angles[:len(row)] = np.concatenate([row[:, None] * inv_freq, col[:, None] * inv_freq], axis=1)
        angles = np.concatenate([angles, angles], axis=1)
        return np.cos(angles), np.sin(angles)
