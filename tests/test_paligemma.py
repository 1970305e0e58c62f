"""Image input on PaliGemma 1 and 2 (`PaliGemmaForConditionalGeneration`).

Oracle: HF transformers' `PaliGemmaForConditionalGeneration` on random weights (a Gemma language
model; PaliGemma 2's Gemma 2 with a sliding window and soft-capped scores), with its own
`PaliGemmaProcessor` and SigLIP image processor: the prompt (images first, then the
beginning-of-sequence token, the text and a newline), the projected image features, and greedy
tokens and prompt logprobs where the whole prompt attends bidirectionally (HF's prefix-LM mask)
and the output causally, under preemption too.
"""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
from hf_models import newline_word_tokenizer, randomize_weights, torch_single_thread  # noqa: E402
from test_images import GREEDY, _blocks_all_free  # noqa: E402

from jpaged import LLM  # noqa: E402

WORDS = 300
VOCAB = 1600  # the processor adds PaliGemma's 1,152 location and segmentation tokens after the words
SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<image>": 3}
TOKENS = 16  # per image: 4 x 4 patches of 7 pixels
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=28,
              patch_size=7, projection_dim=64)
CONFIGS = {
    "paligemma": dict(model_type="gemma", **TEXT),
    # Gemma 2: a window of 36 on every other layer (the longest prompt's length: the output passes
    # it), soft-capped scores and logits
    "paligemma2": dict(model_type="gemma2", **TEXT, sliding_window=36, query_pre_attn_scalar=16,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}


def _processor():
    """HF's `PaliGemmaProcessor` over a word-level tokenizer and SigLIP's image processor."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vocab = SPECIAL | {"<unk>": 4, "\n": 5, "\n\n": 6} | {f"t{i}": i for i in range(7, WORDS)}
    tokenizer = newline_word_tokenizer(vocab, additional_special_tokens=["<image>"])
    image_processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    image_processor.image_seq_length = TOKENS
    return transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module", params=list(CONFIGS))
def paligemma(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    with torch_single_thread():
        torch.manual_seed(0)
        config = transformers.PaliGemmaConfig(text_config=CONFIGS[request.param], vision_config=VISION,
                                              image_token_index=SPECIAL["<image>"], projection_dim=64)
        model = transformers.PaliGemmaForConditionalGeneration(config).eval()
        model.config._attn_implementation = "eager"
        randomize_weights(model, seed=41 + list(CONFIGS).index(request.param))
    model.save_pretrained(str(folder))
    processor = _processor()
    processor.save_pretrained(str(folder))
    llm = LLM(str(folder), dtype="float32", num_blocks=100, block_size=4, max_num_batched_tokens=48,
              max_model_len=128)
    return folder, model, processor, llm


def _image(seed: int, shape=(30, 40)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8))


def _hf(model, processor, text: str, images, causal: bool = False):
    """HF's prompt, greedy tokens and per-position log-probabilities of the prompt's next tokens
    (under HF's prefix-LM mask, or with `causal` a causal one over the whole prompt)."""
    inputs = processor(text=text, images=[images], return_tensors="pt")
    if causal:
        inputs.pop("token_type_ids")
    prompt = inputs["input_ids"][0].tolist()
    with torch.no_grad(), torch_single_thread():
        out = model.generate(**inputs, max_new_tokens=GREEDY.max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        logits = model(**inputs).logits[0, :-1].double()
    logprobs = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].numpy()
    return prompt, out[0, len(prompt):].tolist(), logprobs


def test_image_features_match_hf(paligemma):
    _, model, processor, llm = paligemma
    for seed, shape in enumerate([(30, 40), (28, 28), (90, 20)]):
        image = _image(seed, shape)
        pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
        with torch.no_grad(), torch_single_thread():
            expected = model.model.get_image_features(pixel_values=pixels).pooler_output[0].numpy()
        ours = llm.engine.image_encoder.encode(llm.engine.image_processor.pixel_values([image])[0], *shape[::-1])
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_prompts_tokens_and_logprobs_match_hf_over_a_bidirectional_prefix(paligemma):
    """Prompts of one and two images, with text and without, in one batch: the prompt is HF's
    (images, beginning of sequence, text, newline; also given with one image token per image at
    the start, or already widened as token ids), the greedy tokens are HF's, and every prompt
    position's logprob is HF's to 1e-4, where HF's causal mask over the prompt differs by more
    than 1e-2. Prefix caching is off: a block's keys depend on the prompt's later tokens."""
    _, model, processor, llm = paligemma
    assert not llm.engine.block_manager.enable_prefix_caching
    cases = [("t9 t10 t11", [_image(1)]), ("", [_image(2)]), ("t12 t13", [_image(3), _image(4, (50, 20))])]
    expected = [_hf(model, processor, text, images) for text, images in cases]
    params = dataclasses.replace(GREEDY, prompt_logprobs=0)
    prompts = [{"prompt": text, "multi_modal_data": {"image": images}} for text, images in cases]
    prompts[1]["prompt"] = "<image>"
    prompts.append({"prompt_token_ids": expected[0][0], "multi_modal_data": {"image": cases[0][1]}})
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for out, (prompt, tokens, logprobs) in zip(outputs, expected + expected[:1]):
        assert out.prompt_token_ids == prompt and out.outputs[0].token_ids == tokens
        got = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
        np.testing.assert_allclose(got, logprobs, atol=1e-4)
    causal = _hf(model, processor, *cases[0], causal=True)[2]
    assert np.abs(causal - expected[0][2]).max() > 1e-2
    assert _blocks_all_free(llm)


def test_preempted_requests_recompute_their_prefix_whole(paligemma):
    """Six requests of 7 blocks each on a cache of 12: preempted ones recompute their prompt in one step
    and answer as HF does; every block is free after."""
    folder, model, processor, _ = paligemma
    llm = LLM(str(folder), dtype="float32", num_blocks=12, block_size=4, max_num_batched_tokens=48,
              max_model_len=48)
    cases = [(f"t{20 + i} t{30 + i}", [_image(10 + i)]) for i in range(6)]
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}} for text, images in cases],
                           GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for out, (text, images) in zip(outputs, cases):
        assert out.outputs[0].token_ids == _hf(model, processor, text, images)[1]
    assert _blocks_all_free(llm)


def test_prompts_longer_than_a_step_and_misplaced_images_are_refused(paligemma):
    _, _, _, llm = paligemma
    long_text = " ".join(f"t{i}" for i in range(10, 45))
    with pytest.raises(ValueError, match=r"prompt of 53 tokens: .* reads a prompt whole in one step \(its tokens see "
                                         r"each other\), and max_num_batched_tokens is 48"):
        llm.generate({"prompt": long_text, "multi_modal_data": {"image": _image(0)}}, GREEDY, use_tqdm=False)
    if llm.engine.model_config.sliding_windows:
        with pytest.raises(ValueError, match="prompt of 40 tokens: .* reads a prompt whole, and a prompt longer than "
                                             "its layers' sliding window of 36 tokens is not supported"):
            llm.generate({"prompt": "t5 t6 t7 t8 t9 t10", "multi_modal_data": {"image": [_image(0), _image(1)]}},
                         GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="PaliGemma's prompt puts its images first: it may start with one image token "
                                         r"\(id 3\) per image \(1\) or hold none, and holds 1, not all at the start"):
        llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": _image(0)}}, GREEDY, use_tqdm=False)
    assert _blocks_all_free(llm)
