"""The GGUF cache: a file's metadata is parsed once (index and tokenizer from one parse), later
loads read the cached index and tokenizer, which give what the file gives (and what HF
transformers' own GGUF loader gives)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from jpaged.loader import gguf_cache
from jpaged.loader.gguf import load_gguf_tokenizer, load_gguf_weights, read_gguf

TEXTS = ["What is the capital of France?", "café 😊🍰 お元気ですか", "  leading spaces\nand\ttabs", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 😊"}]


@pytest.fixture
def gguf_copy(model_path, tmp_path):
    path = tmp_path / model_path.name
    shutil.copy(model_path, path)
    return path


def _refuse(*args, **kwargs):
    raise AssertionError("the GGUF file was parsed again")


def _token_ids(tokenizer) -> list:
    chat = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    return [tokenizer.encode(text) for text in TEXTS] + [tokenizer.encode(chat, add_special_tokens=False), chat]


def test_second_load_reads_the_cache_with_the_same_tokens_as_hf(gguf_copy, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    root = tmp_path / "cache"
    first_index, load_first = gguf_cache.open_cached(gguf_copy, root)
    first_tokenizer = load_first()
    monkeypatch.setattr(gguf_cache, "read_gguf", _refuse)
    monkeypatch.setattr(gguf_cache, "load_gguf_tokenizer", _refuse)
    index, load_tokenizer = gguf_cache.open_cached(gguf_copy, root)
    tokenizer = load_tokenizer()

    assert index == first_index
    hf = AutoTokenizer.from_pretrained(str(gguf_copy.parent), gguf_file=gguf_copy.name)
    assert _token_ids(tokenizer) == _token_ids(first_tokenizer) == _token_ids(hf)
    assert (tokenizer.eos_token, tokenizer.bos_token) == (hf.eos_token, hf.bos_token)
    assert [tokenizer.decode(ids) for ids in _token_ids(hf)[:-1]] == [hf.decode(ids) for ids in _token_ids(hf)[:-1]]


VARIED_TEXTS = TEXTS + ["Ünïcödé naïve résumé", "👩‍👩‍👧 🇫🇷 🤖", "你好，世界。日本語のテキスト",
                       "a    b\t\t c\n\n\n  ", "<|im_start|>user\nhi<|im_end|><|endoftext|>", "x" * 300]


def test_tokenizer_from_the_parsed_metadata_is_transformers_own(model_path):
    from transformers import PreTrainedTokenizerFast

    _, metadata = read_gguf(model_path)
    ours = load_gguf_tokenizer(model_path, metadata)
    hf = PreTrainedTokenizerFast.from_pretrained(str(model_path.parent), gguf_file=model_path.name)

    assert ours.backend_tokenizer.to_str() == hf.backend_tokenizer.to_str()
    for special in (True, False):
        assert [ours.encode(t, add_special_tokens=special) for t in VARIED_TEXTS] == \
               [hf.encode(t, add_special_tokens=special) for t in VARIED_TEXTS]
    for name in ("bos", "eos", "pad", "unk"):
        assert (getattr(ours, f"{name}_token"), getattr(ours, f"{name}_token_id")) == \
               (getattr(hf, f"{name}_token"), getattr(hf, f"{name}_token_id")), name
    assert ours.all_special_tokens == hf.all_special_tokens
    assert ours.chat_template == hf.chat_template
    assert _token_ids(ours) == _token_ids(hf)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True) == \
           hf.apply_chat_template(CHAT, add_generation_prompt=True)


def test_first_load_maps_and_parses_the_file_once(gguf_copy, tmp_path, monkeypatch):
    """One `gguf.GGUFReader`, and no other read: every GGUF reader (gguf's, transformers' own)
    memory-maps the file to parse it."""
    import gguf

    readers, mapped = [], []
    reader_init, memmap = gguf.GGUFReader.__init__, np.memmap
    monkeypatch.setattr(gguf.GGUFReader, "__init__",
                        lambda self, *args, **kwargs: readers.append(1) or reader_init(self, *args, **kwargs))

    class CountingMemmap(memmap):
        def __new__(cls, filename, *args, **kwargs):
            mapped.append(pathlib.Path(filename).resolve())
            return memmap.__new__(cls, filename, *args, **kwargs)

    monkeypatch.setattr(np, "memmap", CountingMemmap)
    _, load = gguf_cache.open_cached(gguf_copy, tmp_path / "cache")
    load()
    assert len(readers) == 1 and mapped == [gguf_copy.resolve()]


def test_cached_index_reads_the_same_weights(gguf_copy, tmp_path):
    index, _ = gguf_cache.open_cached(gguf_copy, tmp_path / "cache")
    from_cache = load_gguf_weights(gguf_copy, index=index)
    from_file = load_gguf_weights(gguf_copy)
    for (name, cached), (other, parsed) in zip(from_cache, from_file):
        assert name == other
        np.testing.assert_array_equal(cached, parsed)


def test_a_changed_file_gets_a_fresh_entry(gguf_copy, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    gguf_cache.open_cached(gguf_copy, root)
    before = gguf_cache.entry_dir(gguf_copy, root)
    stat = gguf_copy.stat()
    os.utime(gguf_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = gguf_cache.entry_dir(gguf_copy, root)
    assert after != before and not after.exists()
    parses = []
    monkeypatch.setattr(gguf_cache, "read_gguf", lambda path: parses.append(path) or read_gguf(path))
    gguf_cache.open_cached(gguf_copy, root)
    assert parses == [gguf_copy] and (after / "index.json").is_file()
    assert not before.exists()  # the older version's entry is gone


def test_an_unreadable_entry_is_rebuilt(gguf_copy, tmp_path, caplog):
    root = tmp_path / "cache"
    index, _ = gguf_cache.open_cached(gguf_copy, root)
    (gguf_cache.entry_dir(gguf_copy, root) / "index.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="jpaged"):
        rebuilt, _ = gguf_cache.open_cached(gguf_copy, root)
    assert rebuilt == index
    assert any("unreadable" in record.getMessage() for record in caplog.records)
    assert json.loads((gguf_cache.entry_dir(gguf_copy, root) / "index.json").read_text())["config"] == index.config


@pytest.mark.parametrize("damage", ["truncated tokenizer.json", "no chat template"])
def test_a_damaged_tokenizer_is_rebuilt_from_the_file(gguf_copy, tmp_path, damage, caplog):
    root = tmp_path / "cache"
    _, load = gguf_cache.open_cached(gguf_copy, root)
    expected = _token_ids(load())
    folder = gguf_cache.entry_dir(gguf_copy, root) / "tokenizer"
    if damage == "no chat template":
        (folder / "chat_template.jinja").unlink()
    else:
        text = (folder / "tokenizer.json").read_text()
        (folder / "tokenizer.json").write_text(text[: len(text) // 2])
    with caplog.at_level("WARNING", logger="jpaged"):
        _, load = gguf_cache.open_cached(gguf_copy, root)
        assert _token_ids(load()) == expected
    assert any("unreadable" in record.getMessage() for record in caplog.records)
    _, load = gguf_cache.open_cached(gguf_copy, root)  # repaired: read from the cache again
    assert _token_ids(load()) == expected


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        gguf_cache.open_cached(tmp_path / "nothing.gguf", tmp_path)


def test_a_file_copied_over_with_its_size_and_time_kept_gets_a_fresh_entry(gguf_copy, tmp_path):
    """As `cp -p` leaves it: other bytes at the file's end (its last tensors), same size, same
    modification time."""
    root = tmp_path / "cache"
    gguf_cache.open_cached(gguf_copy, root)
    before = gguf_cache.entry_dir(gguf_copy, root)
    stat = gguf_copy.stat()
    with gguf_copy.open("r+b") as file:
        file.seek(stat.st_size - 16)
        tail = file.read(16)
        file.seek(stat.st_size - 16)
        file.write(bytes(255 - b for b in tail))
    os.utime(gguf_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf_copy.stat().st_size == stat.st_size and gguf_copy.stat().st_mtime_ns == stat.st_mtime_ns
    assert gguf_cache.entry_dir(gguf_copy, root) != before
