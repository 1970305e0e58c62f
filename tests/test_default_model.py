"""The default model end to end: the CLI's answer, and greedy tokens against HF transformers."""

import pytest

from jpaged import LLM, SamplingParams
from jpaged.cli import main
from jpaged.llm import chat_token_ids

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain."]


def test_cli_answers_the_default_question(model_path, capsys):
    assert main([]) == 0
    assert capsys.readouterr().out.strip() == "The capital of France is Paris."


def test_greedy_tokens_match_hf_transformers(model_path, hf_gguf_model):
    torch = pytest.importorskip("torch")
    llm = LLM(None, num_blocks=64)
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
