"""Read a GGUF file of a Llama-family architecture (llama, qwen2, qwen3, the mixtures of experts
qwen2moe, qwen3moe and granitemoe, gemma / gemma2 / gemma3, phi3, granite, olmo2 and smollm3) into an HF-style
config, weights and tokenizer.

The engine's model code consumes HF conventions (``config.json`` keys, ``model.layers.{i}...``
tensor names, ``[out_features, in_features]`` layout, rotate-half RoPE). This module translates
a GGUF file (llama.cpp's format) into exactly those, so a GGUF model loads through the same path
as an HF safetensors checkpoint:

- :func:`read_gguf_index` reads the file's metadata once (the slow part: ``GGUFReader`` parses
  every vocabulary string) into a :class:`GGUFIndex`: a ``config.json``-style dict and where
  each tensor's bytes lie; the index is plain JSON, so it can be cached (``gguf_cache.py``);
  :func:`read_gguf` returns the tokenizer's metadata from the same parse as well;
- :func:`load_gguf_weights` yields dequantized tensors one at a time under HF names, with the
  Q/K row permutation llama.cpp's converter applies to llama models undone, the 1 it adds to
  Gemma's norm weights taken off again, a layer's experts
  (one GGUF tensor ``[experts, out, in]`` per projection) split into HF's per-expert tensors,
  read from a memory map of the file at the index's offsets (no metadata parse when an index
  is given);
- :func:`load_gguf_tokenizer` builds the transformers tokenizer stored in the file, by
  transformers' own GGUF tokenizer conversion, from metadata :func:`read_gguf` already read.

Shape convention: GGUF lists dimensions fastest-first, so ``ReaderTensor.shape`` is the reverse of
the numpy shape. A linear weight of HF shape ``[out, in]`` has GGUF shape ``[in, out]``; the
reader's ``tensor.data`` and its dequantization are already ``[out, in]`` in numpy order.
"""

from __future__ import annotations

import collections
import math
import os
import pathlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf import quants as gguf_quants
from gguf.quants import dequantize, quant_shape_to_byte_shape

from jpaged.loader.rope_rows import interleaved_to_rotate_half

# GGUF `general.architecture`: the HF model_type and architecture it becomes. Each names its
# metadata keys with its own prefix ("qwen2.embedding_length", ...).
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "qwen3": ("qwen3", "Qwen3ForCausalLM"), "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
                 "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
                 "gemma3": ("gemma3_text", "Gemma3ForCausalLM"), "phi3": ("phi3", "Phi3ForCausalLM"),
                 "gemma": ("gemma", "GemmaForCausalLM"), "granite": ("granite", "GraniteForCausalLM"),
                 "olmo2": ("olmo2", "Olmo2ForCausalLM"), "smollm3": ("smollm3", "SmolLM3ForCausalLM"),
                 "granitemoe": ("granitemoe", "GraniteMoeForCausalLM")}
NORMALIZED_TOP_K = {"qwen3moe"}  # MoE architectures whose top-k routing weights llama.cpp renormalises
# model_types whose Q/K rows llama.cpp's converter interleaves: those it runs with "normal" RoPE
# (consecutive pairs); the others (qwen, gemma, phi3, olmo2) it runs, and stores, as HF does.
ROPE_PERMUTED = {"llama", "granite", "granitemoe", "smollm3"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
EXPERT = "{expert}"  # in the HF name of a GGUF tensor that holds every expert of a layer
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": f"mlp.experts.{EXPERT}.gate_proj",
    "ffn_up_exps": f"mlp.experts.{EXPERT}.up_proj",
    "ffn_down_exps": f"mlp.experts.{EXPERT}.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Gemma's norms before and after attention and the MLP, as llama.cpp names them (its "ffn_norm"
# is the norm before the MLP, as in every model, which Gemma's HF code calls pre_feedforward_layernorm).
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                      "post_attention_norm": "post_attention_layernorm",
                      "post_ffw_norm": "post_feedforward_layernorm"}
# Phi-3's q / k / v in one tensor, and its gate and up in "ffn_up", as in its HF checkpoints.
_PHI3_LAYER_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# OLMo 2's norms after attention and after the MLP (it has none before them).
_OLMO2_LAYER_NAMES = {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                      "post_ffw_norm": "post_feedforward_layernorm"}
_LAYER_NAMES_OF = {"gemma2": _GEMMA_LAYER_NAMES, "gemma3_text": _GEMMA_LAYER_NAMES, "phi3": _PHI3_LAYER_NAMES,
                   "olmo2": _OLMO2_LAYER_NAMES}
GEMMA = {"gemma2": 46, "gemma3": 62}  # layer count of each family's 27B model (llama.cpp's test for its attention scale)
# Every released Gemma 2 and 3 generation_config.json ends a reply at <end_of_turn> as well as at
# EOS, and llama.cpp stops there too; GGUF files name only EOS.
GEMMA_END_OF_TURN = b"<end_of_turn>"
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_CONFIG_ONLY_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
# Phi-3 instruct models end a turn with <|end|>, which their generation_config.json lists as an
# end of sequence and llama.cpp stops at; GGUF files name only EOS.
PHI3_END_OF_TURN = b"<|end|>"
PREFETCH = 2  # tensors dequantized ahead of the one being placed

_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's bytes lie in the file, and what they hold."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    hf_name: str  # the HF parameter it becomes (with `EXPERT` in it: one per expert, split on load)
    ggml_type: int  # GGMLQuantizationType value
    shape: tuple[int, ...]  # numpy (HF) order
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFIndex:
    """What loading needs from a GGUF file's metadata: the HF-style config and the tensor table."""

    config: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "tensors": [asdict(t) for t in self.tensors]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GGUFIndex:
        tensors = tuple(GGUFTensor(**{**t, "shape": tuple(t["shape"])}) for t in data["tensors"])
        return cls(config=data["config"], tensors=tensors)


def read_gguf_index(path: str | os.PathLike) -> GGUFIndex:
    """Parse the GGUF file at ``path`` once: its config and tensor table.

    Raises FileNotFoundError for a missing file, ValueError for one that is not a valid,
    complete GGUF file of an architecture in ``ARCHITECTURES`` (naming the file and what is wrong).
    """
    return _index(*_open(path))


def read_gguf(path: str | os.PathLike) -> tuple[GGUFIndex, dict[str, Any]]:
    """Parse the GGUF file at ``path`` once: its index (as :func:`read_gguf_index`) and its
    tokenizer's metadata (``general.architecture`` and every ``tokenizer.*`` key, as plain Python
    values), from which :func:`load_gguf_tokenizer` builds the tokenizer without reading the file.

    Raises as :func:`read_gguf_index` does.
    """
    path, reader = _open(path)
    index = _index(path, reader)
    keys = [key for key in reader.fields if key.startswith("tokenizer.") or key == "general.architecture"]
    return index, {key: reader.fields[key].contents() for key in keys}


def _index(path: pathlib.Path, reader: GGUFReader) -> GGUFIndex:
    config = _config(path, reader)
    layer_names = _LAYER_NAMES_OF.get(config["model_type"], _LAYER_NAMES)
    tensors = tuple(
        GGUFTensor(name=t.name, hf_name=_hf_name(path, t.name, layer_names), ggml_type=int(t.tensor_type),
                   shape=tuple(int(d) for d in reversed(t.shape)), offset=int(t.data_offset), nbytes=int(t.n_bytes))
        for t in reader.tensors if t.name not in _CONFIG_ONLY_TENSORS)
    return GGUFIndex(config, tensors)


def load_gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Return an HF ``config.json``-style dict for the GGUF file at ``path``."""
    return read_gguf_index(path).config


def load_gguf_weights(path: str | os.PathLike, dtype: Any = np.float32, index: GGUFIndex | None = None,
                      keep_packed: dict[str, str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every weight of the GGUF file at ``path``, one at a time.

    Arrays are dequantized, in HF layout (``[out_features, in_features]`` for linear weights),
    with llama.cpp's Q/K RoPE row permutation undone (llama models only), a layer's experts one
    at a time, and cast to ``dtype`` (a numpy dtype such as ``np.float32`` or
    ``ml_dtypes.bfloat16``). The tensors named in ``keep_packed`` (HF name:
    GGML type, see :func:`block_types`) come instead as their raw block rows, uint8
    ``[out_features, row bytes]``, rows un-permuted likewise. Without an ``index`` the file's metadata is
    read and checked before this returns; with one (from :func:`read_gguf_index`, possibly
    cached) only the file's size is checked against it. The tensors are read lazily from a
    memory map as the iterator advances.
    """
    path = _existing_file(path)
    index = index or read_gguf_index(path)
    size = path.stat().st_size
    for tensor in index.tensors:
        if tensor.offset + tensor.nbytes > size:
            raise ValueError(f"{path} does not match its index: tensor {tensor.name!r} ends at byte "
                             f"{tensor.offset + tensor.nbytes}, file has {size} bytes")
    return _iter_weights(path, index, np.dtype(dtype), keep_packed or {})


def block_types(index: GGUFIndex) -> dict[str, str]:
    """The GGML type name (``"Q4_1"``, ``"Q8_0"``, ...) of every quantized tensor, by HF name."""
    return {t.hf_name: GGMLQuantizationType(t.ggml_type).name for t in index.tensors
            if GGMLQuantizationType(t.ggml_type) not in _PLAIN_TYPES}


def load_gguf_tokenizer(path: str | os.PathLike, metadata: dict[str, Any] | None = None):
    """Return the transformers tokenizer stored in the GGUF file (chat template included), the one
    ``PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)`` returns.

    With ``metadata`` (the tokenizer metadata :func:`read_gguf` returned for this file) it is built
    from that by transformers' GGUF tokenizer conversion, without reading the file again; without
    it the file's metadata is read first (and where this transformers has no such conversion,
    transformers reads the file itself). ValueError naming the file where its metadata holds no
    tokenizer, or one with a special token id outside its vocabulary.
    """
    path = _existing_file(path)
    if metadata is None:
        metadata = read_gguf(path)[1]
    _check_tokenizer(path, metadata)
    try:
        tokenizer = _convert_tokenizer(metadata)
    except KeyError as error:  # a field the conversion needs for this kind of tokenizer
        raise ValueError(f"{path}: its {metadata['tokenizer.ggml.model']} tokenizer lacks metadata {error}") from error
    if tokenizer is None:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    return tokenizer


def _check_tokenizer(path: pathlib.Path, metadata: dict[str, Any]) -> None:
    """ValueError naming `path` where its tokenizer metadata cannot make a tokenizer."""
    tokens, kind = metadata.get("tokenizer.ggml.tokens") or [], metadata.get("tokenizer.ggml.model")
    if not tokens or kind in (None, "none"):
        raise ValueError(f"{path} holds no tokenizer (tokenizer.ggml.model {kind!r}, {len(tokens)} tokens): give the "
                         "model's tokenizer with tokenizer= (--tokenizer)")
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < len(tokens)):
            raise ValueError(f"{path}: tokenizer.ggml.{key} {token_id!r} is not a token of its vocabulary of "
                             f"{len(tokens)}")


def _convert_tokenizer(metadata: dict[str, Any]):
    """The tokenizer transformers builds from a GGUF file's tokenizer metadata; None where this
    transformers lacks the private names used here.

    Does what ``PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)`` does once it has
    read the file (transformers 5.x): groups the metadata by
    ``transformers.integrations.gguf.GGUF_TOKENIZER_MAPPING``, applies what that module's
    ``get_gguf_tokenizer`` adds (llama.cpp's BOS defaults, the special tokens as strings), converts
    with its ``convert_gguf_tokenizer`` and passes the result on as ``tokenizer_object`` with the
    tokenizer config (chat template included) as keyword arguments.
    """
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:
        return None
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    elif tokenizer.get("tokenizer_type") == "gemma4":
        config["add_bos_token"] = False
    for name, key in {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                      "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **extra})


def _iter_weights(path: pathlib.Path, index: GGUFIndex, dtype: np.dtype, keep_packed: dict[str, str]
                  ) -> Iterator[tuple[str, np.ndarray]]:
    """Dequantize, un-permute and cast each tensor in file order, the next `PREFETCH` tensors in
    worker threads while the caller places the current one (numpy's kernels release the GIL)."""
    file = np.memmap(path, dtype=np.uint8, mode="r")
    rope_heads = ({".self_attn.q_proj.": index.config["num_attention_heads"],
                   ".self_attn.k_proj.": index.config["num_key_value_heads"]}
                  if index.config["model_type"] in ROPE_PERMUTED else {})
    norm_shift = 1.0 if index.config["model_type"].startswith("gemma") else 0.0

    def prepare(tensor: GGUFTensor) -> list[tuple[str, np.ndarray]]:
        raw = file[tensor.offset:tensor.offset + tensor.nbytes]
        packed = tensor.hf_name in keep_packed
        kind = GGMLQuantizationType(tensor.ggml_type)
        array = raw.reshape(quant_shape_to_byte_shape(tensor.shape, kind)) if packed else _dequantize(tensor, raw)
        for marker, n_heads in rope_heads.items():
            if marker in tensor.hf_name:
                array = interleaved_to_rotate_half(array, n_heads)  # llama.cpp's converter interleaves them
        if norm_shift and tensor.hf_name.endswith("norm.weight"):
            array = array - norm_shift  # llama.cpp's converter stores Gemma's (1 + w) norm scales as w + 1
        if tensor.hf_name.endswith("shared_expert_gate.weight"):
            array = array.reshape(1, -1)  # HF's [1, hidden]; llama.cpp also takes it as [hidden]
        array = np.array(array) if packed else np.asarray(array, dtype=dtype)
        if EXPERT in tensor.hf_name:
            return [(tensor.hf_name.replace(EXPERT, str(e)), expert) for e, expert in enumerate(array)]
        return [(tensor.hf_name, array)]

    with ThreadPoolExecutor(max_workers=PREFETCH) as pool:
        pending = collections.deque(pool.submit(prepare, t) for t in index.tensors[:PREFETCH])
        for tensor in index.tensors[PREFETCH:]:
            yield from pending.popleft().result()
            pending.append(pool.submit(prepare, tensor))
        while pending:
            yield from pending.popleft().result()


_PLAIN_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


def _dequantize(tensor: GGUFTensor, raw: np.ndarray) -> np.ndarray:
    """Float32 values of one tensor from its raw bytes, in numpy (HF) dimension order."""
    kind = GGMLQuantizationType(tensor.ggml_type)
    if kind in _PLAIN_TYPES:
        return raw.view(_PLAIN_TYPES[kind]).reshape(tensor.shape).astype(np.float32)
    rows = raw.reshape(quant_shape_to_byte_shape(tensor.shape, kind))
    block_format = getattr(gguf_quants, kind.name, None)  # gguf's class for this format: Q4_1, Q8_0, ...
    try:
        # the whole tensor in one vectorized pass (gguf's `dequantize` loops over groups of rows)
        values = block_format.dequantize_rows(rows) if block_format is not None else dequantize(rows, kind)
    except NotImplementedError as exc:
        raise ValueError(f"tensor {tensor.name!r} has type {kind.name}, which gguf cannot dequantize") from exc
    return values.reshape(tensor.shape)


def _hf_name(path: pathlib.Path, name: str, layer_names: dict[str, str]) -> str:
    """HF parameter name for a GGUF tensor name; ValueError for unknown tensors."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_PATTERN.fullmatch(name)
    if match is None or match.group(2) not in layer_names:
        raise ValueError(f"{path}: tensor {name!r} has no known HF counterpart")
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{layer_names[kind]}.{suffix}"


def _config(path: pathlib.Path, reader: GGUFReader) -> dict[str, Any]:
    meta = _Metadata(path, reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture is {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor")

    model_type, architecture = ARCHITECTURES[arch]
    hidden = meta.require(f"{arch}.embedding_length", int)
    heads = meta.require(f"{arch}.attention.head_count", int)
    head_dim = meta.get(f"{arch}.attention.key_length", int) or (  # Phi-3 rotates only part of each head
        meta.get(f"{arch}.rope.dimension_count", int) if arch != "phi3" else None)
    config = {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": meta.get(f"{arch}.vocab_size", int) or int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": meta.require(f"{arch}.feed_forward_length", int),
        "num_hidden_layers": meta.require(f"{arch}.block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", int) or heads,
        "head_dim": head_dim or hidden // heads,
        "rms_norm_eps": meta.require(f"{arch}.attention.layer_norm_rms_epsilon", float),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", float) or 10000.0,
        "max_position_embeddings": meta.require(f"{arch}.context_length", int),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", int, minimum=0),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", int, minimum=0),
    }
    config.update(_experts(meta, arch, tensors))
    if arch in GEMMA or arch == "gemma":
        config.update(_gemma(meta, arch, config, reader))
    if arch == "phi3":
        config.update(_phi3(meta, config, tensors, reader))
    if arch in ("granite", "granitemoe"):
        config.update(_granite(meta, arch, config))
    if arch == "smollm3":  # llama.cpp's rule (no metadata says it): every fourth layer without RoPE
        config["no_rope_layer_interval"] = 4
    rope_scaling = _rope_scaling(meta, arch, tensors.get("rope_freqs.weight"), config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _experts(meta: _Metadata, arch: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """The HF config's mixture-of-experts keys, from `{arch}.expert_*` metadata (none for a dense
    model). Files converted before llama.cpp wrote the experts' sizes (early Qwen1.5-MoE ones)
    have them read from the first layer's expert tensors, as the file's shapes say."""
    num_experts = meta.get(f"{arch}.expert_count", int)
    if not num_experts:
        return {}
    if arch not in ("qwen2moe", "qwen3moe", "granitemoe"):
        raise ValueError(f"{meta.path}: a {arch} GGUF file with {num_experts} experts (such as Mixtral's) is not "
                         "supported; mixtures of experts load from qwen2moe, qwen3moe and granitemoe GGUF files, "
                         "or HF folders")

    if arch == "granitemoe":  # HF's GraniteMoeConfig: its experts' size is intermediate_size
        return {"num_local_experts": num_experts, "num_experts_per_tok": meta.require(f"{arch}.expert_used_count", int)}

    def rows(name: str) -> int:  # a tensor's output size (GGUF lists dimensions fastest first)
        return int(tensors[name].shape[1]) if name in tensors else 0

    config = {"num_experts": num_experts, "num_experts_per_tok": meta.require(f"{arch}.expert_used_count", int),
              "moe_intermediate_size": (meta.get(f"{arch}.expert_feed_forward_length", int)
                                        or rows("blk.0.ffn_gate_exps.weight")),
              "norm_topk_prob": arch in NORMALIZED_TOP_K}
    if not config["moe_intermediate_size"]:
        raise ValueError(f"{meta.path}: neither metadata {arch}.expert_feed_forward_length nor a tensor "
                         "blk.0.ffn_gate_exps.weight gives the experts' size")
    if arch == "qwen2moe":
        config["shared_expert_intermediate_size"] = (meta.get(f"{arch}.expert_shared_feed_forward_length", int)
                                                     or rows("blk.0.ffn_gate_shexp.weight"))
    return config


def _gemma(meta: _Metadata, arch: str, config: dict[str, Any], reader: GGUFReader) -> dict[str, Any]:
    """The HF config keys of a gemma2 / gemma3 file that GGUF metadata leaves out, set as llama.cpp
    runs these files: queries scaled by head_dim ** -0.5 except in the 27B models (hidden / heads);
    Gemma 2's soft caps from metadata (defaults 50 and 30), its window on every other layer
    (default 4,096); Gemma 3's window on five layers of six, RoPE base 10,000 on those; and
    <end_of_turn> as a second end of sequence."""
    head_dim, heads = config["head_dim"], config["num_attention_heads"]
    if arch == "gemma":
        return {"hidden_activation": "gelu_pytorch_tanh", **_end_of_turn(reader, config, GEMMA_END_OF_TURN)}
    keys = {"hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": (config["hidden_size"] // heads if config["num_hidden_layers"] == GEMMA[arch]
                                      else head_dim)}
    window = meta.get(f"{arch}.attention.sliding_window", int)
    if arch == "gemma2":
        keys.update(sliding_window=window or 4096,
                    attn_logit_softcapping=meta.get(f"{arch}.attn_logit_softcapping", float) or 50.0,
                    final_logit_softcapping=meta.get(f"{arch}.final_logit_softcapping", float) or 30.0)
    else:
        keys.update(sliding_window=window, sliding_window_pattern=6, rope_local_base_freq=10_000.0)
    return {**keys, **_end_of_turn(reader, config, GEMMA_END_OF_TURN)}


def _end_of_turn(reader: GGUFReader, config: dict[str, Any], token: bytes) -> dict[str, Any]:
    """`eos_token_id` as EOS and `token`'s id, where the vocabulary has that token."""
    end_of_turn = _token_id(reader, token)
    if end_of_turn is not None and config["eos_token_id"] not in (None, end_of_turn):
        return {"eos_token_id": [config["eos_token_id"], end_of_turn]}
    return {}


def _granite(meta: _Metadata, arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """Granite's multipliers, which llama.cpp's converter writes only where they are not 0, as
    llama.cpp reads them: a missing attention scale is head_dim ** -0.5, the others 1."""
    scales = {"embedding_multiplier": "embedding_scale", "residual_multiplier": "residual_scale",
              "logits_scaling": "logit_scale"}
    keys = {name: meta.get(f"{arch}.{key}", float) or 1.0 for name, key in scales.items()}
    keys["attention_multiplier"] = meta.get(f"{arch}.attention.scale", float) or config["head_dim"] ** -0.5
    return keys


def _phi3(meta: _Metadata, config: dict[str, Any], tensors: dict[str, Any], reader: GGUFReader) -> dict[str, Any]:
    """The HF config keys of a phi3 file, as llama.cpp's converter writes them: the rotated share of
    each head (`rope.dimension_count`), the sliding window (0: none, as in Phi-4), LongRoPE from its
    `rope_factors_long` / `rope_factors_short` tensors with the original context and attention
    factor from metadata, and <|end|> as a second end of sequence."""
    keys: dict[str, Any] = {"sliding_window": meta.get("phi3.attention.sliding_window", int, minimum=0) or None}
    rotary = meta.get("phi3.rope.dimension_count", int)
    if rotary and rotary != config["head_dim"]:
        keys["partial_rotary_factor"] = rotary / config["head_dim"]
    factors = {kind: tensors.get(f"rope_factors_{kind}.weight") for kind in ("long", "short")}
    if any(t is not None for t in factors.values()):
        missing = [f"rope_factors_{kind}.weight" for kind, t in factors.items() if t is None]
        if missing:
            raise ValueError(f"{meta.path}: LongRoPE needs both factor tensors; {', '.join(missing)} is missing")
        scaling = {f"{kind}_factor": dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1).tolist()
                   for kind, t in factors.items()}
        scaling.update(rope_type="longrope", original_max_position_embeddings=meta.require(
            "phi3.rope.scaling.original_context_length", int))
        attention_factor = meta.get("phi3.rope.scaling.attn_factor", float)
        if attention_factor:
            scaling["attention_factor"] = attention_factor
        keys["rope_scaling"] = scaling
    return {**keys, **_end_of_turn(reader, config, PHI3_END_OF_TURN)}


def _token_id(reader: GGUFReader, token: bytes) -> int | None:
    """The id of `token` in the file's vocabulary, or None (without decoding the whole vocabulary)."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return None
    parts = field.parts
    return next((i for i, part in enumerate(field.data) if parts[part].tobytes() == token), None)


def _rope_scaling(meta: _Metadata, arch: str, rope_freqs, config: dict[str, Any]) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from GGUF metadata, or from a llama3 ``rope_freqs`` tensor.

    llama.cpp stores llama3 scaling only as per-frequency divisors (``rope_freqs``). Assuming the
    smoothing parameters every Llama 3.x release uses, ``factor`` is solved from the lowest
    frequency and all divisors are checked against HF's llama3 formula; anything else is rejected
    rather than silently mis-rotated.
    """
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        scaling = {"rope_type": kind, "factor": meta.require(f"{arch}.rope.scaling.factor")}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = original
        if kind == "yarn":  # llama.cpp's keys for what HF's yarn parameters default
            for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
                if (value := meta.get(f"{arch}.rope.scaling.{key}", float)) is not None:
                    scaling[name] = value
            # ggml multiplies YaRN's own 0.1 ln(factor) + 1 by the file's attention factor
            if (value := meta.get(f"{arch}.rope.scaling.attn_factor", float)) is not None:
                scaling["attention_factor"] = value * (0.1 * math.log(scaling["factor"]) + 1.0
                                                       if scaling["factor"] > 1 else 1.0)
        return scaling
    if rope_freqs is None:
        return None
    stored = dequantize(rope_freqs.data, rope_freqs.tensor_type).astype(np.float64).reshape(-1)
    smooth = _llama3_smooth(config["rope_theta"], config["head_dim"], _LLAMA3_ROPE_DEFAULTS)
    if stored.shape != smooth.shape:
        raise ValueError(f"{meta.path}: rope_freqs.weight has shape {stored.shape}, "
                         f"expected {smooth.shape} for head_dim {config['head_dim']}")
    if np.allclose(stored, 1.0):
        return None
    lowest = int(np.argmin(smooth))
    factor = (1.0 - smooth[lowest]) / (1.0 / stored[lowest] - smooth[lowest])
    scaling = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), **_LLAMA3_ROPE_DEFAULTS}
    expected = 1.0 / ((1.0 - smooth) / scaling["factor"] + smooth)
    if smooth[lowest] >= 1.0 or not np.allclose(stored, expected, rtol=1e-4):
        raise ValueError(f"{meta.path}: rope_freqs.weight does not match llama3 rope scaling "
                         f"with {scaling}; unsupported rope scaling")
    return scaling


def _llama3_smooth(theta: float, head_dim: int, params: dict[str, Any]) -> np.ndarray:
    """Per-frequency blend of HF's llama3 scaling: 0 = divide by factor, 1 = unscaled."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    ratio = params["original_max_position_embeddings"] / wavelen
    return np.clip((ratio - low) / (high - low), 0.0, 1.0)


class _Metadata:
    """Scalar GGUF metadata lookup with errors naming the file."""

    def __init__(self, path: pathlib.Path, reader: GGUFReader):
        self.path = path
        self.fields = reader.fields

    def get(self, key: str, expected: type | None = None, minimum: int = 1) -> Any:
        """The value of `key`, or None; with `expected` (int: at least `minimum`; float: a float),
        ValueError naming the key for a value of another type."""
        value = self._value(key)
        if value is None or expected is None:
            return value
        if expected is int and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"{self.path}: metadata {key!r} is {type(value).__name__} {value!r:.50}, "
                             f"expected an integer >= {minimum}")
        if expected is float and not isinstance(value, float):
            raise ValueError(f"{self.path}: metadata {key!r} is {type(value).__name__} {value!r:.50}, expected a float")
        return value

    def _value(self, key: str) -> Any:
        field = self.fields.get(key)
        if field is None:
            return None
        kind = field.types[0] if field.types else None
        part = field.parts[field.data[0]]
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        if kind == GGUFValueType.ARRAY:
            raise ValueError(f"{self.path}: metadata {key!r} is an array, expected a scalar")
        value = part[0].item()
        if kind == GGUFValueType.FLOAT32:
            return float(str(np.float32(value)))
        return value

    def require(self, key: str, expected: type | None = None) -> Any:
        value = self.get(key, expected)
        if value is None:
            raise ValueError(f"{self.path}: required GGUF metadata {key!r} is missing")
        return value


def _existing_file(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


class _PlainArrayReader(GGUFReader):
    """`GGUFReader` over a plain ndarray view of its memory map: the reader slices the file once
    per metadata item (about a million slices for a 49k-token vocabulary), and `np.memmap`'s
    bookkeeping on each slice was over half of its parse time."""

    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, mapped: np.ndarray) -> None:
        self._plain_data = mapped.view(np.ndarray)


def _open(path: str | os.PathLike) -> tuple[pathlib.Path, GGUFReader]:
    """Open ``path`` with GGUFReader, turning any parse failure into a ValueError naming it."""
    path = _existing_file(path)
    try:
        reader = _PlainArrayReader(path)
    except Exception as exc:
        raise ValueError(f"{path} is not a valid GGUF file (corrupt or truncated?): "
                         f"{type(exc).__name__}: {exc}") from exc
    size = reader.data.size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(f"{path} is truncated: tensor {tensor.name!r} ends at byte "
                             f"{tensor.data_offset + tensor.n_bytes}, file has {size} bytes")
    return path, reader

