"""Beam search against HF transformers' own, on the trained stories260K and a random Llama."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jpaged import LLM, BeamSearchParams  # noqa: E402


def hf_beams(model, prompt: list[int], width: int, max_tokens: int, length_penalty: float):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                             max_new_tokens=max_tokens, length_penalty=length_penalty, early_stopping=False,
                             output_scores=True, return_dict_in_generate=True)
    return [seq[len(prompt):].tolist() for seq in out.sequences], out.sequences_scores.tolist()


def check_against_hf(llm, model, prompts, params):
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs):
        tokens, scores = hf_beams(model, prompt, params.beam_width, params.max_tokens, params.length_penalty)
        assert [s.token_ids for s in output.sequences] == tokens
        np.testing.assert_allclose([s.score for s in output.sequences], scores, atol=1e-4)
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not any(manager.ref_counts)


def test_beam_search_matches_hf_on_stories260k(stories_path):
    from hf_models import torch_single_thread

    llm = LLM(stories_path, num_blocks=128)
    model = transformers.AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(text) for text in ("Once upon a time, there was a dog named", "Tom and Sue")]
    with torch_single_thread():
        check_against_hf(llm, model, prompts, BeamSearchParams(beam_width=4, max_tokens=20))
    scheduler = llm.engine.scheduler
    assert 0 < scheduler.num_block_copies  # forked beams copied their shared last block once written
    one = BeamSearchParams(beam_width=2, max_tokens=3)  # one prompt as a flat token-id list, as generate takes it
    assert llm.beam_search(prompts[1], one)[0].sequences == llm.beam_search([prompts[1]], one)[0].sequences
    hot = BeamSearchParams(beam_width=2, max_tokens=3, temperature=1.5)  # vLLM's field: raw logprobs rank either way
    assert llm.beam_search([prompts[1]], hot)[0].sequences == llm.beam_search([prompts[1]], one)[0].sequences
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        BeamSearchParams(beam_width=2, max_tokens=3, temperature=-1)
    # a sequence's text is its tokens' as they read after the prompt (a first word keeps its space)
    for best in llm.beam_search(prompts, one)[0].sequences:
        assert best.text == tokenizer.decode(prompts[0] + best.token_ids)[len(tokenizer.decode(prompts[0])):]
        assert best.text.startswith(" ")


def test_beam_search_matches_hf_on_random_llama_with_length_penalty(tmp_path):
    from hf_models import save_random_model, torch_single_thread

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = save_random_model(tmp_path, config, seed=3)
    llm = LLM(str(tmp_path), num_blocks=64, dtype="float32")
    prompts = [np.random.default_rng(seed).integers(3, 96, n).tolist() for seed, n in ((1, 9), (2, 17))]
    with torch_single_thread():
        check_against_hf(llm, model, prompts, BeamSearchParams(beam_width=3, max_tokens=12, length_penalty=0.5,
                                                               ignore_eos=True))


@pytest.fixture(scope="module")
def random_llama_with_eos(tmp_path_factory):
    """A random Llama whose EOS (id 2, of a 32-token vocabulary) often ranks among the candidates,
    so that hypotheses finish before the last round."""
    from hf_models import save_random_model

    folder = tmp_path_factory.mktemp("llama_eos")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      eos_token_id=2, bos_token_id=1)
    model = save_random_model(folder, config, seed=3, std=0.5)
    model.generation_config.eos_token_id = 2
    return folder, model


@pytest.mark.parametrize("max_num_seqs", [64, 4])
def test_beam_search_with_finished_hypotheses_matches_hf(random_llama_with_eos, max_num_seqs):
    """Hypotheses that end in EOS early compete with the beams still live in the last round, as in HF's
    finalize; with `max_num_seqs` below the number of beams, the beams take turns in the steps."""
    from hf_models import torch_single_thread

    folder, model = random_llama_with_eos
    llm = LLM(str(folder), num_blocks=64, dtype="float32", max_num_seqs=max_num_seqs)
    prompts = [np.random.default_rng(seed).integers(3, 32, 7).tolist() for seed in range(12)]
    params = BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=2.0)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    finished_early = 0
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad(), torch_single_thread():
            out = model.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=3, do_sample=False,
                                 max_new_tokens=8, length_penalty=2.0, early_stopping=False, output_scores=True,
                                 return_dict_in_generate=True, eos_token_id=2, pad_token_id=0)
        expected = [seq[len(prompt):].tolist() for seq in out.sequences]
        expected = [tokens[:tokens.index(2) + 1] if 2 in tokens else tokens for tokens in expected]
        assert [s.token_ids for s in output.sequences] == expected
        np.testing.assert_allclose([s.score for s in output.sequences], out.sequences_scores.tolist(), atol=1e-4)
        finished_early += any(len(s.token_ids) < 8 for s in output.sequences)
        for s in output.sequences:  # vLLM's fields: the prompt in `tokens`, per-token logprobs, "stop" on EOS
            assert s.tokens == prompt + s.token_ids and s.finish_reason == ("stop" if s.token_ids[-1] == 2 else "length")
            assert len(s.logprobs) == len(s.token_ids) and all(len(entry) >= 6 for entry in s.logprobs)
            assert [next(iter(entry)) for entry in s.logprobs] == s.token_ids  # the chosen token first
            assert sum(entry[t].logprob for entry, t in zip(s.logprobs, s.token_ids)) == pytest.approx(s.cum_logprob)
            assert s.score == pytest.approx(s.cum_logprob / len(s.token_ids) ** 2.0)
    assert finished_early  # an EOS-ended hypothesis was among the best (and before the fix, 10 of 12 differed)
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not any(manager.ref_counts)


def test_interrupted_beam_search_frees_every_beam(random_llama_with_eos, fail_step, monkeypatch):
    folder, _ = random_llama_with_eos
    llm = LLM(str(folder), num_blocks=64, dtype="float32")
    fail_step(llm.engine, 4)
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}]
    with pytest.raises(RuntimeError, match="the step failed"):
        llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=8))
    monkeypatch.undo()
    manager = llm.engine.block_manager
    assert not llm.engine.has_unfinished_requests()
    assert manager.num_free_blocks == manager.num_blocks and not any(manager.ref_counts)
    assert len(llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=8))[0].sequences) == 3


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_beams_that_cannot_fit_together_are_an_error_not_a_hang(stories_path, mode):
    """Two beams of 5 + 6 tokens in a 12-token cache: each fits alone, both never do (the beam on
    hold keeps the blocks its preempted sibling needs). The search says so and frees every block."""
    from jpaged import SamplingParams

    llm = LLM(stories_path, num_blocks=3, block_size=4, max_num_seqs=2, max_num_batched_tokens=16,
              enable_prefix_caching=False, preemption_mode=mode)
    with pytest.raises(RuntimeError, match="beam search cannot go on: 2 beams per prompt do not fit"):
        llm.beam_search([{"prompt_token_ids": [10, 11, 12, 13, 14]}], BeamSearchParams(beam_width=2, max_tokens=6))
    manager = llm.engine.block_manager
    assert not llm.engine.has_unfinished_requests()
    assert manager.num_free_blocks == manager.num_blocks and not any(manager.ref_counts)
    assert len(llm.generate([[10, 11]], SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_beams_preempted_in_a_cycle_are_an_error_not_a_hang(stories_path):
    """With a step budget smaller than a beam's context, every step recomputes a chunk of some
    preempted beam, so no step is idle, yet the beams on hold make it preempt the others again and
    no token is ever generated: the search says so instead of stepping forever."""
    llm = LLM(stories_path, num_blocks=16, max_num_batched_tokens=16)
    prompt = "Once upon a time, there was a little girl named Lily. She loved to play outside."
    with pytest.raises(RuntimeError, match="beam search cannot go on: 10 beams per prompt do not fit"):
        llm.beam_search([prompt], BeamSearchParams(beam_width=10, max_tokens=200, ignore_eos=True))
    manager = llm.engine.block_manager
    assert not llm.engine.has_unfinished_requests()
    assert manager.num_free_blocks == manager.num_blocks and not any(manager.ref_counts)
    assert llm.engine.stats().num_preemptions < 100
    assert len(llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=20))[0].sequences) == 2


def test_beam_search_params_are_validated():
    with pytest.raises(ValueError, match=r"beam_width must be >= 1, got 0"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        BeamSearchParams(beam_width=2, max_tokens=0)
    with pytest.raises(TypeError, match="beam_width must be an int, got 2.5"):
        BeamSearchParams(beam_width=2.5, max_tokens=4)
    with pytest.raises(TypeError, match="max_tokens must be an int, got '3'"):
        BeamSearchParams(beam_width=2, max_tokens="3")
    with pytest.raises(ValueError, match="length_penalty must be a finite number, got nan"):
        BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=float("nan"))


def test_beam_search_ends_at_max_model_len(random_llama_with_eos):
    """A max_tokens past max_model_len ends the beams there, as generate ends its output: the same
    search as one asking for exactly what the context leaves."""
    folder, _ = random_llama_with_eos
    llm = LLM(str(folder), num_blocks=64, dtype="float32", max_model_len=24)
    prompt = [{"prompt_token_ids": [5, 6, 7, 8, 9]}]
    past = llm.beam_search(prompt, BeamSearchParams(beam_width=2, max_tokens=100, ignore_eos=True))[0]
    exact = llm.beam_search(prompt, BeamSearchParams(beam_width=2, max_tokens=19, ignore_eos=True))[0]
    assert [s.token_ids for s in past.sequences] == [s.token_ids for s in exact.sequences]
    assert all(len(s.token_ids) == 19 for s in past.sequences)
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not any(manager.ref_counts)
