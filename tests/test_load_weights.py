"""Weights replaced in a running engine (`LLM.load_weights`, as an RLHF loop hands over its
updated policy) and sleep level 2 (weights discarded, then loaded or read again from the files).

Oracles: HF transformers' greedy tokens of the model whose weights were loaded; jpaged's own
engine made from that model's folder, for quantized weights; jax's count of the arrays alive on the
device (`jax.live_arrays`).
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_models import (  # noqa: E402
    hf_greedy,
    randomize_weights,
    save_random_model,
    save_word_level_tokenizer,
    torch_single_thread,
)

from jpaged import LLM, SamplingParams  # noqa: E402

CONFIG = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  tie_word_embeddings=False)
PROMPTS = [[5, 17, 40, 22, 9, 31, 60, 11, 3, 70, 45, 12, 8, 19, 33, 27, 50, 61, 7, 14], [64, 2, 88, 41], [30, 30, 6]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE = dict(dtype="float32", num_blocks=32, block_size=4, max_num_seqs=4)


def tokens(llm) -> list[list[int]]:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY, use_tqdm=False)]


def device_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


def old_weights(folder) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def random_model(seed: int, config=CONFIG):
    with torch_single_thread():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        randomize_weights(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The engine's own model (saved) and the policy whose weights are loaded (`new`, in memory),
    with HF's greedy tokens of each."""
    folder = tmp_path_factory.mktemp("load_weights")
    old, new = save_random_model(folder / "old", CONFIG, seed=1), random_model(seed=2)
    expected = {name: [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS] for name, model in
                (("old", old), ("new", new))}
    assert expected["old"] != expected["new"]
    return folder / "old", new, expected


def test_loaded_weights_give_the_new_models_tokens(models):
    folder, new, expected = models
    llm = LLM(str(folder), **ENGINE)
    assert tokens(llm) == expected["old"]
    long_prompt = {"prompt_token_ids": PROMPTS[0][::-1] * 2}
    llm.generate(long_prompt, GREEDY, use_tqdm=False)
    assert llm.generate(long_prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens > 0
    compiled = llm.engine.runner.num_compilations
    llm.load_weights(new.state_dict())  # torch tensors, by HF name
    assert tokens(llm) == expected["new"] and llm.engine.runner.num_compilations == compiled
    assert llm.generate(long_prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens == 0  # KV of the old weights
    llm.load_weights(old_weights(folder))
    assert tokens(llm) == expected["old"]
    # numpy arrays in any order, under a base model's names (`layers.0....`, as `LlamaModel` has them)
    llm.load_weights((name.removeprefix("model."), tensor.numpy())
                     for name, tensor in reversed(list(new.state_dict().items())))
    assert tokens(llm) == expected["new"]
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


PARTIAL = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
           "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight", "model.norm.weight"]


def hybrid(folder, new, names: list[str]):
    """The engine's own model (read from `folder` by HF) with `names` taken from `new`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the oracle runs to max_tokens, as the engine is asked to
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).copy_(new.get_parameter(name))
    return model


def test_a_subset_of_weights_replaces_those_and_keeps_the_others(models):
    """vLLM's semantics, as RLHF trainers hand weights over in buckets or one at a time: the
    tensors given replace theirs (a q, v or up projection alone writes its rows of the fused
    one), the others stay; HF's model with the same tensors replaced is the oracle."""
    folder, new, expected = models
    llm = LLM(str(folder), **ENGINE)
    state = new.state_dict()
    for name in PARTIAL:  # one call each
        llm.load_weights({name: state[name]})
    mixed = [hf_greedy(hybrid(folder, new, PARTIAL), p, GREEDY.max_tokens) for p in PROMPTS]
    assert mixed not in (expected["old"], expected["new"])
    assert tokens(llm) == mixed
    for name, tensor in state.items():  # TRL's way: every tensor in a call of its own
        llm.load_weights([(name, tensor)])
    assert tokens(llm) == expected["new"]
    with pytest.raises(ValueError, match=r"weight 'model.layers.2.self_attn.q_proj.weight' is for layer 2, but the "
                                         r"model has 2 layers"):
        llm.load_weights({"model.layers.0.self_attn.o_proj.weight": state["model.layers.0.self_attn.q_proj.weight"],
                          "model.layers.2.self_attn.q_proj.weight": state["model.layers.0.self_attn.q_proj.weight"]})
    assert tokens(llm) == expected["new"]  # the call changed nothing
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_moe_experts_load_as_transformers_keeps_them_in_memory(tmp_path):
    """transformers 5 keeps a Mixtral layer's experts in two stacked tensors in memory
    (`mlp.experts.gate_up_proj [experts, 2 * ff, hidden]`, `down_proj`), where its checkpoints hold
    one tensor per expert: `state_dict()` of such a model loads as its checkpoint does."""
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                        num_local_experts=4, num_experts_per_tok=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=256, sliding_window=None)
    save_random_model(tmp_path / "old", config, seed=1)
    new = random_model(seed=2, config=config)
    assert "model.layers.0.mlp.experts.gate_up_proj" in new.state_dict()
    llm = LLM(str(tmp_path / "old"), **ENGINE)
    llm.load_weights(new.state_dict())
    assert tokens(llm) == [hf_greedy(new, p, GREEDY.max_tokens) for p in PROMPTS]


def test_bfloat16_tensors_load_as_their_values(models):
    """A trainer's bfloat16 tensors, all at once or one a call (a q, k or v projection alone
    into its rows of the float32 fused one): the engine holds their values exactly (HF's model
    with its weights rounded to bfloat16 is the oracle)."""
    folder, new, _ = models
    rounded = random_model(seed=2)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(torch.bfloat16).to(torch.float32))
    expected = [hf_greedy(rounded, p, GREEDY.max_tokens) for p in PROMPTS]
    llm = LLM(str(folder), **ENGINE)
    llm.load_weights({name: tensor.to(torch.bfloat16) for name, tensor in new.state_dict().items()})
    assert tokens(llm) == expected
    one_by_one = LLM(str(folder), **ENGINE)
    for name, tensor in new.state_dict().items():
        one_by_one.load_weights({name: tensor.to(torch.bfloat16)})
    assert tokens(one_by_one) == expected


def test_quantized_engine_quantizes_the_loaded_weights(models, tmp_path):
    """int8 weights: loading a model's tensors gives what an engine made from its folder gives;
    float8 tensors load as their values; a weight that cannot be quantized is named."""
    folder, new, _ = models
    with torch_single_thread():
        new.save_pretrained(str(tmp_path), safe_serialization=True)
    save_word_level_tokenizer(tmp_path, CONFIG.vocab_size)
    llm = LLM(str(folder), quantization="int8", **ENGINE)
    weight_bytes = llm.engine.runner.weight_bytes
    llm.load_weights(new.state_dict())
    expected = tokens(LLM(str(tmp_path), quantization="int8", **ENGINE))
    assert tokens(llm) == expected and llm.engine.runner.weight_bytes == weight_bytes
    broken = {**new.state_dict(), "model.layers.1.mlp.down_proj.weight": torch.full((64, 128), float("nan"))}
    with pytest.raises(ValueError, match="weight 'model.layers.1.mlp.down_proj.weight': cannot quantize"):
        llm.load_weights(broken)
    assert tokens(llm) == expected
    fp8 = {name: tensor.to(torch.float8_e4m3fn) for name, tensor in new.state_dict().items()}
    rounded = LLM(str(tmp_path), quantization="int8", **ENGINE)
    rounded.load_weights({name: tensor.float() for name, tensor in fp8.items()})
    llm.load_weights(fp8)
    assert tokens(llm) == tokens(rounded)


def test_a_subset_of_weights_is_quantized_into_the_fused_rows(models, tmp_path):
    """int8 weights: a subset written into a running engine gives what an int8 engine made from
    the folder of HF's model with that subset replaced gives (the parts of fused projections
    quantized row by row, as the whole would be)."""
    folder, new, _ = models
    mixed = hybrid(folder, new, PARTIAL)
    with torch_single_thread():
        mixed.save_pretrained(str(tmp_path), safe_serialization=True)
    save_word_level_tokenizer(tmp_path, CONFIG.vocab_size)
    llm = LLM(str(folder), quantization="int8", **ENGINE)
    before = tokens(llm)
    llm.load_weights({name: new.get_parameter(name) for name in PARTIAL})
    expected = tokens(LLM(str(tmp_path), quantization="int8", **ENGINE))
    assert expected != before and tokens(llm) == expected


def test_sleep_level_2_discards_the_weights_and_brings_back_new_or_the_files_ones(models):
    folder, new, expected = models
    llm = LLM(str(folder), enable_sleep_mode=True, **ENGINE)
    runner = llm.engine.runner
    assert tokens(llm) == expected["old"]
    weights = sum(x.nbytes for x in jax.tree.leaves(runner.state))
    cache = sum(x.nbytes for x in jax.tree.leaves(runner.kv_cache))
    awake = device_bytes()
    llm.sleep(level=2)
    assert awake - device_bytes() >= weights + cache
    llm.wake_up(["kv_cache"])
    with pytest.raises(ValueError, match=r"sleeping \(weights off the device\)"):
        llm.generate("hi", GREEDY, use_tqdm=False)
    llm.load_weights(new.state_dict())  # the weights come back with the new values
    assert not llm.engine.is_sleeping() and tokens(llm) == expected["new"]
    llm.sleep(level=1)
    llm.wake_up([])  # nothing, as vLLM's
    assert llm.engine.runner.sleeping_parts == ["weights", "KV cache"]
    llm.sleep(level=2)  # the host copy of level 1 is dropped too
    llm.wake_up()  # nothing loaded: the model's files are read again
    assert tokens(llm) == expected["old"]
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_refusals_name_the_problem_and_keep_the_old_weights(models, tmp_path):
    folder, new, expected = models
    llm = LLM(str(folder), enable_sleep_mode=True, **ENGINE)
    state = new.state_dict()
    llm.sleep(level=2)  # discarded weights come back whole: a missing tensor is named
    missing = {name: tensor for name, tensor in state.items() if name != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"weights missing from the checkpoint: model\.layers\.1\.mlp\.up_proj\.weight"):
        llm.load_weights(missing)
    without = {name: tensor for name, tensor in state.items() if name not in (
        "model.layers.0.self_attn.o_proj.weight", "model.norm.weight")}
    with pytest.raises(ValueError, match=r"missing from the checkpoint: model\.norm\.weight, "
                                         r"model\.layers\.N\.self_attn\.o_proj\.weight for layers \[0\]"):
        llm.load_weights(without)
    llm.wake_up()
    with pytest.raises(ValueError, match=r"weight 'model.layers.0.self_attn.k_proj.weight' has shape \(64, 64\), "
                                         r"expected \(32, 64\)"):
        llm.load_weights({"model.layers.0.self_attn.k_proj.weight": torch.ones(64, 64)})  # a part alone
    with pytest.raises(ValueError, match=r"weight 'model.norm.weight' has shape \(65,\)"):
        llm.load_weights({**state, "model.norm.weight": torch.ones(65)})
    with pytest.raises(ValueError, match="weight 'lm_head.weight' must hold floats, got int64"):
        llm.load_weights({**state, "lm_head.weight": torch.ones(96, 64, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"weights model.layers.0.self_attn.q_proj.weight \(64, 64\), "
                                         r"model.layers.0.self_attn.k_proj.weight \(64, 32\), .* do not fit together"):
        llm.load_weights({**state, "model.layers.0.self_attn.k_proj.weight": state[
            "model.layers.0.self_attn.k_proj.weight"].T})
    with pytest.raises(ValueError, match=r"weight 'model.norm.weight' could not be read \(NotImplementedError"):
        llm.load_weights({**state, "model.norm.weight": torch.empty(64, device="meta")})
    with pytest.raises(ValueError, match=r"weights must be \(name, tensor\) pairs"):
        llm.load_weights(list(state.values()))
    with pytest.raises(ValueError, match="weights must be a mapping or an iterable"):
        llm.load_weights(3)
    assert tokens(llm) == expected["old"]
    llm.engine.add_request("busy", {"prompt_token_ids": PROMPTS[1]}, GREEDY)
    with pytest.raises(ValueError, match="load_weights with 1 unfinished request: finish or abort"):
        llm.load_weights(state)
    llm.engine.abort_request("busy")
    with pytest.raises(ValueError, match="with offload_weights the layers stream from host memory"):
        LLM(str(folder), offload_weights="host", **ENGINE).load_weights(state)
    with pytest.raises(ValueError, match=r"sleep level must be 1 .* or 2 .*, got 3"):
        LLM(str(folder), enable_sleep_mode=True, **ENGINE).sleep(level=3)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert np.all([t == e for t, e in zip(tokens(llm), expected["old"])])


def test_apply_model_reads_the_weights_the_engine_runs(models):
    """vLLM's `apply_model`: a function of the Flax model, run in each worker (here one), reads
    the weights as the engine holds them (HF's tensors; the LM head kept as [hidden, vocab]),
    the loaded ones after `load_weights`; refused while the weights sleep."""
    folder, new, _ = models
    llm = LLM(str(folder), enable_sleep_mode=True, **ENGINE)

    def read(model):
        return [np.asarray(model.embed_tokens[...]), np.asarray(model.norm[...]), np.asarray(model.lm_head[...])]

    [(embed, norm, head)] = llm.apply_model(read)
    weights = old_weights(folder)
    np.testing.assert_array_equal(embed, weights["model.embed_tokens.weight"])
    np.testing.assert_array_equal(norm, weights["model.norm.weight"])
    np.testing.assert_array_equal(head, weights["lm_head.weight"].T)
    llm.load_weights(new.state_dict())
    [(embed, _, _)] = llm.apply_model(read)
    np.testing.assert_array_equal(embed, new.state_dict()["model.embed_tokens.weight"].numpy())
    llm.sleep(level=1)
    with pytest.raises(ValueError, match=r"apply_model needs the weights, which sleep freed: wake_up"):
        llm.apply_model(read)
    llm.wake_up()
    assert llm.apply_model(lambda model: len(model.layers)) == [CONFIG.num_hidden_layers]
