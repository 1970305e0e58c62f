"""The default model end to end: the CLI's answer, and greedy tokens against HF transformers."""

import ctypes
import json
import mmap
import re

import jsonschema
import pytest

from jpaged import LLM, SamplingParams
from jpaged.cli import main
from jpaged.llm import chat_token_ids
from jpaged.model_runner import memory_spans
from jpaged.sampling_params import StructuredOutputsParams

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain."]


def test_cli_answers_the_default_question(model_path, capsys):
    assert main([]) == 0
    assert capsys.readouterr().out.strip() == "The capital of France is Paris."


@pytest.fixture(scope="module")
def default_llm(model_path):
    return LLM(None, num_blocks=64)


def test_greedy_tokens_match_hf_transformers(default_llm, hf_gguf_model):
    torch = pytest.importorskip("torch")
    llm = default_llm
    tokenizer = llm.get_tokenizer()
    prompts = [chat_token_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    ours = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two torch threads crawl when the other core is busy
    try:
        with torch.inference_mode():
            theirs = [hf_gguf_model.generate(torch.tensor([p]), do_sample=False,
                                             max_new_tokens=24)[0, len(p):].tolist() for p in prompts]
    finally:
        torch.set_num_threads(threads)
    assert ours == theirs
    assert ours[0][-1] in llm.engine.eos_token_ids  # the first answer ends itself
    if kernel_collapses():  # the weights moved into huge pages meanwhile (jpaged/huge_pages.py)
        runner = llm.engine.runner
        runner.huge_pages.join()
        weights = memory_spans(runner.state)
        assert huge_bytes_holding(weights) >= 0.8 * sum(n for _, n in weights)


MADV_COLLAPSE = 25  # Linux 6.1+


def smaps() -> list[tuple[int, int, int]]:
    """(start, end, AnonHugePages bytes) of every mapping of this process, as the kernel counts them."""
    maps = []
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read()):
        start, end = (int(x, 16) for x in block.split(" ", 1)[0].split("-"))
        maps.append((start, end, 1024 * int(re.search(r"AnonHugePages:\s+(\d+) kB", block).group(1))))
    return maps


def huge_bytes_holding(spans) -> int:
    """Huge-page bytes of the mappings that hold the (address, bytes) spans."""
    return sum(huge for start, end, huge in smaps() if any(start <= a < end for a, _ in spans))


def kernel_collapses() -> bool:
    """Whether this kernel moves memory into a huge page when asked (checked on a fresh mapping)."""
    try:
        area = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        area.write(b"x" * (8 << 20))
        area.madvise(mmap.MADV_HUGEPAGE)
        area.madvise(MADV_COLLAPSE)
    except (OSError, AttributeError, ValueError):
        return False
    view = ctypes.c_char.from_buffer(area)
    return huge_bytes_holding([(ctypes.addressof(view), 1)]) > 0


def test_default_model_answers_in_json_as_hf_with_the_same_mask(default_llm, hf_gguf_model):
    """The chat model fills a schema: valid JSON (its unconstrained answer here is not: it ends the
    object with a trailing comma), token for token as HF transformers' greedy search under
    llguidance's mask."""
    torch = pytest.importorskip("torch")
    from guidance_mask import GuidanceMask
    from transformers import LogitsProcessorList

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                               "population_millions": {"type": "number"}},
              "required": ["city", "country", "population_millions"], "additionalProperties": False}
    llm = default_llm
    tokenizer = llm.get_tokenizer()
    question = "Give the capital of France as JSON with city, country and population_millions."
    prompt = chat_token_ids(tokenizer, [{"role": "user", "content": question}])
    constraint = StructuredOutputsParams(json=schema)
    constrained, plain = llm.generate([{"prompt_token_ids": prompt}] * 2, [
        SamplingParams(temperature=0, max_tokens=60, structured_outputs=constraint),
        SamplingParams(temperature=0, max_tokens=60)], use_tqdm=False)
    answer = constrained.outputs[0]
    assert answer.finish_reason == "stop"
    value = json.loads(answer.text)
    jsonschema.validate(value, schema)
    assert value["city"] == "Paris"
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain.outputs[0].text)
    eos = sorted(llm.engine.eos_token_ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            mask = GuidanceMask(tokenizer, constraint, len(prompt), llm.engine.model_config.vocab_size, eos)
            theirs = hf_gguf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=60,
                                            logits_processor=LogitsProcessorList([mask]))
    finally:
        torch.set_num_threads(threads)
    assert answer.token_ids == theirs[0, len(prompt):].tolist()
