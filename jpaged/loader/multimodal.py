"""Vision-language checkpoints: their language model, and the vision tower beside it.

LLaVA, LLaVA-NeXT, LLaVA-OneVision, Gemma 3 (4B and up), PaliGemma 1 and 2, Mistral Small 3.x, Qwen2-VL / Qwen2.5-VL and Qwen3-VL ship as
`*ForConditionalGeneration` folders: a vision encoder and a projector beside a language model of an
architecture jpaged runs. `text_only_config` turns such a config.json into its language model's
(`text_config`, under the text architecture, with the wrapper's embedding tying), and
`language_model_weights` yields the language model's tensors under a causal LM's names, setting
the vision tower's and the projector's aside. For text the language model computes what the whole
model does: Qwen's multimodal RoPE, whose three sections all take a text token's one position, is
plain RoPE then (`RopeConfig.mrope_section` keeps the sections for images). All of them read
images (`reads_images`; their towers run in `models/vision.py`, LLaVA's and Gemma 3's,
`models/pixtral_vision.py` and `models/qwen_vision.py`). Plain Python: no jax.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

# each vision-language architecture's language model, as jpaged names it (None: its text_config's own)
TEXT_ARCHITECTURES = {
    "LlavaForConditionalGeneration": None,
    "LlavaNextForConditionalGeneration": None,
    "LlavaOnevisionForConditionalGeneration": None,
    "Gemma3ForConditionalGeneration": "Gemma3ForCausalLM",
    "PaliGemmaForConditionalGeneration": None,
    "Mistral3ForConditionalGeneration": "MistralForCausalLM",
    "Qwen2VLForConditionalGeneration": "Qwen2ForCausalLM",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2ForCausalLM",
    "Qwen3VLForConditionalGeneration": "Qwen3ForCausalLM",
}
FLAT_TEXT_CONFIGS = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "visual.", "model.visual.", "model.vision_tower.",
                    "model.multi_modal_projector.", "image_newline", "model.image_newline")
# a language model's tensors as the checkpoints name them (the hub's layout, then transformers 5's), and as a causal LM does
_RENAMES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
            ("model.language_model.", "model."))
# the vision tensors as `models/vision.py` (LLaVA), `models/pixtral_vision.py` and `models/qwen_vision.py` name them
_VISION_RENAMES = (("vision_tower.vision_model.", ""), ("vision_tower.", ""), ("multi_modal_projector.", "projector."),
                   ("visual.", ""))
IMAGE_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Gemma3ForConditionalGeneration",
                       "PaliGemmaForConditionalGeneration",
                       "LlavaOnevisionForConditionalGeneration", "Mistral3ForConditionalGeneration",
                       "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                       "Qwen3VLForConditionalGeneration")


def reads_images(hf_config: dict) -> bool:
    """Whether config.json describes a vision-language model whose images jpaged reads (LLaVA,
    LLaVA-NeXT, LLaVA-OneVision, Gemma 3, PaliGemma, Pixtral, Mistral 3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""
    return any(name in IMAGE_ARCHITECTURES for name in hf_config.get("architectures") or [])


def is_vision_language(hf_config: dict) -> bool:
    """Whether config.json describes a vision-language model whose language model jpaged runs."""
    return any(name in TEXT_ARCHITECTURES for name in hf_config.get("architectures") or [])


def text_only_config(hf_config: dict) -> dict:
    """The language model's config.json of a vision-language model's: its `text_config`, the
    text architecture and the wrapper's `tie_word_embeddings` (which decides, as in transformers).
    Qwen2-VL's and Qwen2.5-VL's configs as the hub ships them keep the language model's keys at
    the top, beside `vision_config`. ValueError for another config without a `text_config`."""
    text = hf_config.get("text_config")
    if text is None and any(name in FLAT_TEXT_CONFIGS for name in hf_config["architectures"]):
        text = {key: value for key, value in hf_config.items() if key not in ("vision_config", "architectures")}
    if not isinstance(text, dict):
        raise ValueError(f"config.json of {hf_config['architectures'][0]} has no text_config to read the "
                         "language model from")
    architecture = next(TEXT_ARCHITECTURES[name] for name in hf_config["architectures"] if name in TEXT_ARCHITECTURES)
    config = {**text, "architectures": [architecture]} if architecture else dict(text)
    if "tie_word_embeddings" in hf_config:
        config["tie_word_embeddings"] = hf_config["tie_word_embeddings"]
    if "PaliGemmaForConditionalGeneration" in hf_config["architectures"]:  # its prefix-LM mask is the engine's
        config.pop("use_bidirectional_attention", None)
    return config


def language_model_weights(weights: Iterable[tuple[str, np.ndarray]], vision: dict | None = None
                           ) -> Iterator[tuple[str, np.ndarray]]:
    """A vision-language checkpoint's language-model tensors under a causal LM's names; the
    vision tower's and the projector's go into `vision` (renamed as the `models/*vision.py`
    towers read them), or are left out where it is None."""
    for name, tensor in weights:
        if name.startswith(_VISION_PREFIXES):
            if vision is not None:
                vision[_vision_name(name)] = tensor
            continue
        for old, new in _RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        yield name, tensor


def _vision_name(name: str) -> str:
    name = name.removeprefix("model.")
    for old, new in _VISION_RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name
