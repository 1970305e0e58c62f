"""Tiny random-weight HF transformers models saved as real model folders, for parity tests.

`save_random_model` builds a model of any supported architecture from its HF config class,
re-draws every weight (norm scales and biases included, which HF initialises to constants),
and writes what `save_pretrained` writes (config.json, generation_config.json,
model.safetensors) plus a small word-level tokenizer, so jpaged loads the folder as it would
any checkpoint from the Hub.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 = unk, bos, eos


@contextlib.contextmanager
def torch_single_thread():
    """Run torch on one thread: these models are tiny, and on a busy 2-core machine torch's
    thread pool makes each op wait on the other core (generate() ran 50x slower with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def newline_word_tokenizer(vocab: dict[str, int], **kwargs):
    """A `PreTrainedTokenizerFast` of one word per id over `vocab` (with `<unk>`, `<bos>`, `<eos>`
    and `<pad>`) that reads each run of newlines as one word, as Gemma's tokenizer reads them, and
    splits the rest at spaces; `kwargs` go to `PreTrainedTokenizerFast`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n+"), behavior="isolated"),
                                                       pre_tokenizers.Split(Regex(" +"), behavior="removed")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", **kwargs)


def save_word_level_tokenizer(folder: str | Path, vocab_size: int) -> None:
    """A `PreTrainedTokenizerFast` whose vocabulary is `<unk> <s> </s> t3 t4 ...` (one word per id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(folder))


def randomize_weights(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Draw every parameter afresh: normal(0, std), norm scales normal(1, std) (Gemma's, which
    scale by 1 + weight, normal(0, std)).

    HF initialises norm weights to one and biases to zero, which would let a loader that drops
    them (or a model that skips them) pass a parity test; random values make both count.
    """
    generator = torch.Generator().manual_seed(seed)
    norm_center = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
            is_norm_scale = name.endswith("norm.weight")
            param.copy_((norm_center + noise) if is_norm_scale else noise)


def save_random_model(folder: str | Path, config, seed: int = 0, std: float = 0.2):
    """Build `config`'s causal-LM with random float32 weights, save it (and a tokenizer) to `folder`.

    Returns the torch model in eval mode, ready to serve as the oracle.
    """
    from transformers import AutoModelForCausalLM

    with torch_single_thread():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        randomize_weights(model, seed, std)
        model.eval()
        model.save_pretrained(str(folder), safe_serialization=True)
    save_word_level_tokenizer(folder, config.vocab_size)
    # The oracle generates without early stops: no eos, and an explicit pad id so it is quiet.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF's own greedy continuation of one prompt (batch of one, no padding), new tokens only."""
    input_ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad(), torch_single_thread():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
        )
    new_tokens = out[0, len(prompt):].tolist()
    assert len(new_tokens) == max_new_tokens, f"HF stopped early after {len(new_tokens)} tokens"
    return new_tokens


def hf_logits(model, prompt: list[int]):
    """HF float32 logits `[len(prompt), vocab]` as numpy."""
    with torch.no_grad(), torch_single_thread():
        return model(torch.tensor([prompt], dtype=torch.long)).logits[0].float().numpy()


def greedy_margin(model, prompt: list[int], continuation: list[int]) -> float:
    """The smallest gap between the top two HF logits over the steps that chose `continuation`.

    A tiny gap means a near-tie that float32 rounding could flip; the continuation must also be
    the argmax of HF's full (cache-free) forward at every step.
    """
    logits = hf_logits(model, prompt + continuation[:-1])[len(prompt) - 1:]
    assert logits.argmax(-1).tolist() == continuation, "HF generate() disagrees with HF's own forward"
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())


def sentence_transformers_files(folder: Path, pooling: str = "pooling_mode_lasttoken", normalize: bool = True,
                                dimension: int = 64) -> None:
    """The files that make `folder` a sentence-transformers model: the transformer, a `Pooling`
    module pooling by `pooling`, and a `Normalize` module where `normalize`."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dimension, pooling: True}))
