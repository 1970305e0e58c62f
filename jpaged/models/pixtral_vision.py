"""Pixtral's image side (Mistral 3, Pixtral-12B): the vision transformer and the projector.

The engine runs it once per image when a request is added (`PixtralImageEncoder.encode`), as it
runs LLaVA's tower (`models/vision.py`); each row of the resulting embeddings replaces a row of the
image's placeholder tokens, between the break tokens (`PixtralVisionConfig.placeholder_ids`). Math
as transformers' `PixtralVisionModel` with `Mistral3MultiModalProjector` or LLaVA's projector
(Mistral AI, "Pixtral 12B", 2024): a patch convolution (a matmul over each patch's pixels), an
RMSNorm, rotate-half RoPE whose frequencies alternate between the patch's row and its column
(`axial_angles`), pre-norm blocks (RMSNorm, attention over the whole image, gated MLP), the
chosen layers' states; Mistral 3 then takes an RMSNorm and merges each `spatial_merge_size` x
`spatial_merge_size` square of patches with a linear layer; then linear, activation, linear.

Patches run in the merger's order (each square's patches together, the squares row by row, as
`models/qwen_vision.py`'s); attention is permutation equivariant, so the order changes nothing but
makes merging a reshape. An image's patches are padded to a power of two (padding attends to
the padding alone and is dropped), so the tower compiles for few sizes. Parameters are a flat dict
under the checkpoint's names without the `vision_tower.` prefix, the projector's as
`projector.linear_1.weight`, ..., computed in float32.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.config import PixtralVisionConfig
from jpaged.models.qwen_vision import MIN_PADDED_PATCHES, merger_order
from jpaged.models.vision import ACTIVATIONS, linear, rms_norm, rotate_half


def _attention(x, params: dict, name: str, cos, sin, valid, num_heads: int):
    n, d = x.shape
    head_dim = d // num_heads

    def heads(y):
        return y.reshape(n, num_heads, head_dim)

    q, k = heads(linear(x, params, f"{name}.q_proj")), heads(linear(x, params, f"{name}.k_proj"))
    q, k = rotate_half(q, cos[:, None], sin[:, None]), rotate_half(k, cos[:, None], sin[:, None])
    scores = jnp.einsum("qhd,khd->hqk", q, k) * head_dim ** -0.5
    visible = valid[:, None] == valid[None, :]  # the image's patches together, padding apart
    scores = jnp.where(visible[None], scores, -jnp.inf)
    out = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), heads(linear(x, params, f"{name}.v_proj")))
    return linear(out.reshape(n, d), params, f"{name}.o_proj")


def image_features(params: dict, patches, cos, sin, valid, cfg: PixtralVisionConfig):
    """The projected embeddings `[N / merge^2, text_hidden]` float32 of `patches [N, 3 x patch x
    patch]` in the merger's order, with each patch's RoPE `cos` / `sin [N, head_dim]` and
    `valid [N]` (bool: the image's, not padding)."""
    weight = params["patch_conv.weight"]
    x = rms_norm(patches.astype(jnp.float32) @ weight.reshape(weight.shape[0], -1).T, params, "ln_pre", 1e-5)
    states = [x]
    act = ACTIVATIONS[cfg.hidden_act]
    for i in range(max(cfg.feature_layers)):
        name = f"transformer.layers.{i}"
        x = x + _attention(rms_norm(x, params, f"{name}.attention_norm", 1e-5), params, f"{name}.attention", cos,
                           sin, valid, cfg.num_heads)
        h = rms_norm(x, params, f"{name}.ffn_norm", 1e-5)
        x = x + linear(act(linear(h, params, f"{name}.feed_forward.gate_proj"))
                       * linear(h, params, f"{name}.feed_forward.up_proj"), params, f"{name}.feed_forward.down_proj")
        states.append(x)
    x = jnp.concatenate([states[i] for i in cfg.feature_layers], axis=-1)
    if cfg.projector_norm_eps is not None:
        squares = rms_norm(x, params, "projector.norm", cfg.projector_norm_eps).reshape(
            -1, cfg.spatial_merge_size ** 2, x.shape[-1])
        # each square's features channel by channel, its patches within (as torch's `unfold`)
        x = linear(squares.transpose(0, 2, 1).reshape(squares.shape[0], -1), params, "projector.patch_merger.merging_layer")
    x = ACTIVATIONS[cfg.projector_act](linear(x, params, "projector.linear_1"))
    return linear(x, params, "projector.linear_2")


def axial_angles(row: np.ndarray, col: np.ndarray, head_dim: int, theta: float) -> np.ndarray:
    """RoPE angles `[N, head_dim // 2]` float32 of patches at (`row`, `col`): of the head's
    `head_dim // 2` frequencies (theta^(-2i / head_dim)), the even ones turn by the row and
    the odd ones by the column, the row's first (transformers' Pixtral axial RoPE)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    return np.concatenate([row[:, None] * inv_freq[0::2], col[:, None] * inv_freq[1::2]], axis=1).astype(np.float32)


class PixtralImageEncoder:
    """The vision tower and projector on one device, compiled once per padded patch count."""

    def __init__(self, cfg: PixtralVisionConfig, weights: dict[str, np.ndarray], device=None):
        """`weights`: the tower's and projector's tensors by name (see the module docstring).
        ValueError naming a tensor the model needs that `weights` lacks, or a patch convolution
        of another shape."""
        needed = ["patch_conv.weight", "ln_pre.weight", "projector.linear_1.weight", "projector.linear_2.weight"]
        needed += [f"transformer.layers.{i}.attention.q_proj.weight" for i in range(max(cfg.feature_layers))]
        if cfg.projector_norm_eps is not None:
            needed += ["projector.norm.weight", "projector.patch_merger.merging_layer.weight"]
        if missing := [name for name in needed if name not in weights]:
            raise ValueError(f"the Pixtral checkpoint lacks vision tensors {missing[:3]}")
        shape = np.shape(weights["patch_conv.weight"])
        if shape != (cfg.hidden_size, 3, cfg.patch_size, cfg.patch_size):
            raise ValueError(f"the patch convolution has shape {shape}; config.json's vision_config describes "
                             f"[{cfg.hidden_size}, 3, {cfg.patch_size}, {cfg.patch_size}]")
        self.cfg = cfg
        self.params = {name: jax.device_put(np.asarray(w, np.float32), device) for name, w in weights.items()}
        self._encode = jax.jit(partial(image_features, cfg=cfg))

    def encode(self, pixels: np.ndarray, height: int, width: int) -> np.ndarray:
        """The embeddings, float32 numpy `[rows * columns, text_hidden]` (merged patches row by
        row, `cfg.grid(height, width)`), of an image's pixels `[1, 3, H, W]` as the processor
        resized them. ValueError for pixels of another shape."""
        cfg, merge, patch = self.cfg, self.cfg.spatial_merge_size, self.cfg.patch_size
        rows, cols = (side // patch for side in pixels.shape[2:]) if pixels.ndim == 4 else (0, 0)
        if pixels.shape[:2] != (1, 3) or rows * patch != pixels.shape[2] or cols * patch != pixels.shape[3] \
                or rows % merge or cols % merge or (rows // merge, cols // merge) != cfg.grid(height, width):
            raise ValueError(f"pixels of shape {pixels.shape} for a {height}x{width} image; the vision tower takes "
                             f"[1, 3, H, W] with H and W multiples of {patch * merge} "
                             f"({cfg.grid(height, width)} merged patches)")
        grid = pixels[0].reshape(3, rows, patch, cols, patch).transpose(1, 3, 0, 2, 4).reshape(rows, cols, -1)
        row, col = merger_order(rows, cols, merge)
        count = rows * cols
        padded = max(MIN_PADDED_PATCHES, 1 << (count - 1).bit_length())
        patches = np.zeros((padded, grid.shape[-1]), np.float32)
        patches[:count] = grid[row, col]
        angles = np.zeros((padded, cfg.hidden_size // cfg.num_heads // 2), np.float32)
        angles[:count] = axial_angles(row, col, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        angles = np.concatenate([angles, angles], axis=1)
        valid = np.arange(padded) < count
        features = self._encode(self.params, patches, np.cos(angles), np.sin(angles), valid)
        return np.asarray(features)[:count // merge ** 2]
