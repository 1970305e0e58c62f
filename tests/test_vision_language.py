"""Vision-language checkpoints (Gemma 3 4B+, Mistral Small 3.x, Qwen2.5-VL, Qwen3-VL) served as
their language model: text in, text out (Mistral 3, Qwen2.5-VL and Qwen3-VL with their images turned off).

Oracle: HF transformers' whole `*ForConditionalGeneration` model, on random weights (vision tower
included), given the same token ids without images: its prompt logprobs and greedy tokens.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_models import hf_greedy, hf_logits, randomize_weights, save_word_level_tokenizer, torch_single_thread  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402

VOCAB = 320
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
CASES = {
    # a window (6) on the first layer, Gemma 3's linear RoPE scaling on the global one, tied embeddings
    "gemma3": lambda: transformers.Gemma3Config(
        text_config=dict(**TEXT, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                         query_pre_attn_scalar=16, rope_scaling={"rope_type": "linear", "factor": 4.0}),
        vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4, image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3),
    # the language model's own LM head (untied)
    "mistral3": lambda: transformers.Mistral3Config(
        tie_word_embeddings=False, image_token_index=VOCAB - 1,
        text_config=dict(model_type="mistral", **TEXT, tie_word_embeddings=False),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14, head_dim=16)),
    # multimodal RoPE (three sections of each head's frequencies), QKV bias
    "qwen2_5_vl": lambda: transformers.Qwen2_5_VLConfig(
        text_config={key: value for key, value in TEXT.items() if key != "head_dim"}
        | dict(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64),
        image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3),
    # interleaved multimodal RoPE, q / k norms
    "qwen3_vl": lambda: transformers.Qwen3VLConfig(
        text_config=dict(**TEXT, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                               "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    with torch_single_thread():
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(CASES[request.param](), dtype=torch.float32,
                                                                     attn_implementation="eager")
        randomize_weights(model, seed=list(CASES).index(request.param))
        model.eval()
        model.save_pretrained(str(folder))
    save_word_level_tokenizer(folder, VOCAB)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return request.param, folder, model


def test_text_through_the_language_model_matches_the_whole_hf_model(case):
    name, folder, model = case
    assert json.loads((folder / "config.json").read_text())["architectures"][0].endswith("ForConditionalGeneration")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, VOCAB - 4, n).tolist() for n in (23, 5)]
    # each reads images (tests/test_gemma3_images.py, tests/test_pixtral.py, tests/test_qwen_vl.py); their
    # folders here have no image processor
    limit = {"image": 0}
    llm = LLM(str(folder), dtype="float32", num_blocks=32, max_num_batched_tokens=64, max_model_len=128,
              limit_mm_per_prompt=limit)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=0),
                           use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        logits = hf_logits(model, prompt)
        expected = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        got = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
        np.testing.assert_allclose(got, [expected[i, t] for i, t in enumerate(prompt[1:])], atol=1e-4)
        assert list(out.outputs[0].token_ids) == hf_greedy(model, prompt, 10), name
    assert llm.engine.model_config.tie_word_embeddings == (name == "gemma3")
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
