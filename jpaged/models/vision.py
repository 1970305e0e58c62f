"""LLaVA's and Gemma 3's image side: a CLIP or SigLIP vision transformer and the projector into the
language model.

The engine runs it once per image when a request is added (`ImageEncoder.encode`; one tile per
image for LLaVA, several for LLaVA-NeXT and LLaVA-OneVision, whose tiles' embeddings
`jpaged/image_tiles.py` packs); the
resulting embeddings replace the prompt's image placeholder tokens in the steps that compute
them (`LlamaForCausalLM.__call__`'s `images`). Math as transformers' `CLIPVisionModel` and
`SiglipVisionModel` and `LlavaMultiModalProjector` (Liu et al., "Visual Instruction Tuning",
2023; Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023): patch convolution,
learned positions (CLIP: after a class token, then a layer norm), pre-norm encoder layers, the
chosen layers' states, then linear, activation, linear; Gemma 3's (`Gemma3MultiModalProjector`,
Gemma Team, "Gemma 3 Technical Report", 2025): the last state after the post-layernorm,
average-pooled over squares of patches, an RMSNorm (weights offset by 1) and one projection;
PaliGemma's (Beyer et al., "PaliGemma: A versatile 3B VLM for transfer", 2024): the last state
after the post-layernorm through one linear layer. Parameters are a flat dict under the checkpoint's names, without the
`vision_tower.vision_model.` / `multi_modal_projector.` prefixes (the projector's as
`projector.linear_1.weight`, ...), computed in float32.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.config import VisionConfig
from jpaged.image_tiles import pack_tiles, tile_grid

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


def layer_norm(x, params: dict, name: str, eps: float):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * params[f"{name}.weight"] + params[f"{name}.bias"]


def rms_norm(x, params: dict, name: str, eps: float = 1e-6):
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps) * params[f"{name}.weight"]


def rotate_half(x, cos, sin):
    """RoPE on `x [..., head_dim]` by angles whose `cos` / `sin` repeat over the two halves."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def linear(x, params: dict, name: str):
    y = x @ params[f"{name}.weight"].T
    bias = params.get(f"{name}.bias")
    return y if bias is None else y + bias


def _attention(x, params: dict, name: str, num_heads: int):
    n, t, d = x.shape
    head_dim = d // num_heads

    def heads(y):
        return y.reshape(n, t, num_heads, head_dim)

    q = heads(linear(x, params, f"{name}.q_proj")) * head_dim ** -0.5
    k, v = heads(linear(x, params, f"{name}.k_proj")), heads(linear(x, params, f"{name}.v_proj"))
    weights = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k), axis=-1)
    return linear(jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, t, d), params, f"{name}.out_proj")


def image_features(params: dict, pixel_values, cfg: VisionConfig):
    """The projected embeddings `[N, tokens_per_image, text_hidden]` float32 of `pixel_values
    [N, 3, image_size, image_size]` (as the model's image processor prepares them)."""
    x = pixel_values.astype(jnp.float32)
    patches = jax.lax.conv_general_dilated(x, params["embeddings.patch_embedding.weight"],
                                           (cfg.patch_size, cfg.patch_size), "VALID")
    n, d = patches.shape[:2]
    patches = patches.reshape(n, d, -1).transpose(0, 2, 1)
    if "embeddings.patch_embedding.bias" in params:  # SigLIP's
        patches = patches + params["embeddings.patch_embedding.bias"]
    positions = params["embeddings.position_embedding.weight"][None]
    if cfg.class_token:
        cls = jnp.broadcast_to(params["embeddings.class_embedding"], (n, 1, d))
        hidden = layer_norm(jnp.concatenate([cls, patches], axis=1) + positions, params, "pre_layrnorm",
                             cfg.layer_norm_eps)
    else:
        hidden = patches + positions
    states = [hidden]
    act = ACTIVATIONS[cfg.hidden_act]
    for i in range(max(cfg.feature_layers)):
        name = f"encoder.layers.{i}"
        attended = _attention(layer_norm(hidden, params, f"{name}.layer_norm1", cfg.layer_norm_eps), params,
                              f"{name}.self_attn", cfg.num_heads)
        hidden = hidden + attended
        mlp_in = layer_norm(hidden, params, f"{name}.layer_norm2", cfg.layer_norm_eps)
        hidden = hidden + linear(act(linear(mlp_in, params, f"{name}.mlp.fc1")), params, f"{name}.mlp.fc2")
        states.append(hidden)
    if cfg.projector == "gemma3":
        return _gemma3_projection(params, layer_norm(hidden, params, "post_layernorm", cfg.layer_norm_eps), cfg)
    if cfg.projector == "paligemma":
        return linear(layer_norm(hidden, params, "post_layernorm", cfg.layer_norm_eps), params, "projector.linear")
    features = jnp.concatenate([states[i] for i in cfg.feature_layers], axis=-1)
    if cfg.drop_cls:
        features = features[:, 1:]
    projected = ACTIVATIONS[cfg.projector_act](linear(features, params, "projector.linear_1"))
    return linear(projected, params, "projector.linear_2")


def _gemma3_projection(params: dict, states, cfg: VisionConfig):
    """Gemma 3's projector on the tower's normed last states `[N, patches, hidden]` (patches row by
    row): means over squares of patches, `pooled_tokens` of them row by row, then RMSNorm and
    projection; `[N, pooled_tokens, text_hidden]`."""
    n, _, width = states.shape
    pooled, side = int(np.sqrt(cfg.pooled_tokens)), cfg.image_size // cfg.patch_size
    kernel = side // pooled
    means = states.reshape(n, pooled, kernel, pooled, kernel, width).mean(axis=(2, 4)).reshape(n, -1, width)
    normed = means * jax.lax.rsqrt(jnp.square(means).mean(-1, keepdims=True) + cfg.layer_norm_eps)
    normed = normed * (1.0 + params["projector.mm_soft_emb_norm.weight"])
    return normed @ params["projector.mm_input_projection_weight"]


# each projector's first weight, and its axis that takes the tower's features
_PROJECTOR_INPUTS = {"gemma3": "projector.mm_input_projection_weight", "paligemma": "projector.linear.weight"}
_INPUT_AXIS = {"gemma3": 0}


def _needed_tensors(cfg: VisionConfig) -> list[str]:
    """The tensors `image_features` reads (those of every layer but the first left out)."""
    needed = [f"embeddings.{name}" for name in ("patch_embedding.weight", "position_embedding.weight")]
    needed += ["embeddings.class_embedding", "pre_layrnorm.weight"] if cfg.class_token else []
    if cfg.projector == "gemma3":
        needed += ["post_layernorm.weight", "projector.mm_soft_emb_norm.weight", "projector.mm_input_projection_weight"]
    elif cfg.projector == "paligemma":
        needed += ["post_layernorm.weight", "projector.linear.weight"]
    else:
        needed += ["projector.linear_1.weight", "projector.linear_2.weight"]
    needed += [f"encoder.layers.{i}.self_attn.q_proj.weight" for i in range(max(cfg.feature_layers))]
    return needed + (["image_newline"] if cfg.grid_pinpoints else [])


class ImageEncoder:
    """The vision tower and projector on one device, compiled once (for one image at a time)."""

    def __init__(self, cfg: VisionConfig, weights: dict[str, np.ndarray], device=None):
        """`weights`: the tower's and projector's tensors by name (see the module docstring).
        ValueError naming a tensor the model needs that `weights` lacks."""
        if missing := [name for name in _needed_tensors(cfg) if name not in weights]:
            raise ValueError(f"the checkpoint lacks vision tensors {missing[:3]}")
        width = np.shape(weights[_PROJECTOR_INPUTS.get(cfg.projector, "projector.linear_1.weight")])[_INPUT_AXIS.get(
            cfg.projector, 1)]
        if width != cfg.hidden_size * len(cfg.feature_layers):
            raise ValueError(f"the projector takes {width} features, and vision_feature_layer "
                             f"{list(cfg.feature_layers)} gives {len(cfg.feature_layers)} x the tower's hidden_size "
                             f"{cfg.hidden_size}: config.json does not describe this checkpoint")
        self.cfg = cfg
        self.params = {name: jax.device_put(np.asarray(w, np.float32), device) for name, w in weights.items()}
        self.newline = np.asarray(weights["image_newline"], np.float32) if cfg.grid_pinpoints else None
        self._encode = jax.jit(partial(image_features, cfg=cfg))

    def encode(self, tiles: np.ndarray, height: int, width: int) -> np.ndarray:
        """The embeddings, float32 numpy `[cfg.image_tokens(height, width), text_hidden]`, of an
        image of `height` x `width` pixels from its `tiles` `[tiles, 3, image_size, image_size]`
        (`ImageProcessor.pixel_values`: one for LLaVA). ValueError for tiles of another shape."""
        expected = (3, self.cfg.image_size, self.cfg.image_size)
        if tiles.ndim != 4 or tiles.shape[1:] != expected or not self.cfg.grid_pinpoints and len(tiles) != 1:
            raise ValueError(f"pixel values of shape {tiles.shape}; the vision tower takes "
                             f"[{'tiles' if self.cfg.grid_pinpoints else 1}, {expected[0]}, {expected[1]}, {expected[2]}]")
        if self.cfg.grid_pinpoints:
            rows, cols = tile_grid(height, width, self.cfg.grid_pinpoints, self.cfg.image_size)
            if len(tiles) != 1 + rows * cols:
                raise ValueError(f"the image processor cut a {height}x{width} image into {len(tiles)} tiles, and "
                                 f"config.json's image_grid_pinpoints into 1 + {rows}x{cols}: the processor's "
                                 "image_grid_pinpoints must be the model's")
        features = np.concatenate([np.asarray(self._encode(self.params, tile[None])) for tile in tiles])
        if not self.cfg.grid_pinpoints:
            return features[0]
        return pack_tiles(features, self.newline, height, width, self.cfg.grid_pinpoints, self.cfg.image_size,
                          self.cfg.max_tiles)
