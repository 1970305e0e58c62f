"""Image input on Gemma 3 (`Gemma3ForConditionalGeneration`: Gemma 3 4B, 12B, 27B).

Oracle: HF transformers' `Gemma3ForConditionalGeneration` on random weights, with its own
`Gemma3Processor` and image processor: each image's placeholders (start of image, pooled image
tokens, end of image, set apart by newlines that merge with the prompt's), the projected image
features, and greedy tokens for prompts with images, whose tokens attend to each other (HF's
`token_type_ids` mask), prefilled in chunks that stop before an image they cannot finish, offline
and through the server.
"""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
from hf_models import newline_word_tokenizer, randomize_weights, torch_single_thread  # noqa: E402
from test_images import GREEDY, _blocks_all_free, _hf_greedy  # noqa: E402
from test_llava_next import check_greedy_matches_hf  # noqa: E402
from test_qwen_vl import check_template_chat_with_two_images  # noqa: E402

from jpaged import LLM  # noqa: E402
from jpaged.images import placeholder_offsets  # noqa: E402

VOCAB = 320
SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<start_of_image>": 300, "<end_of_image>": 301,
           "<image_soft_token>": 302, "<start_of_turn>": 303, "<end_of_turn>": 304}
NEWLINES = {"\n" * k: 304 + k for k in range(1, 5)}  # runs of up to four newlines are one token each
TOKENS = 16  # per image: 8 x 8 patches of 7 pixels, average-pooled 2 x 2
CONFIG = dict(
    # a window (6) on the first layer, so the sliding mask meets the images' bidirectional one
    text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=6,
                     layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16),
    vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                       image_size=56, patch_size=7),
    mm_tokens_per_image=TOKENS, boi_token_index=300, eoi_token_index=301, image_token_index=302)
TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for part in m['content'] %}{% if part['type'] == 'image' %}<start_of_image>{% else %}"
            "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{{ '<start_of_turn>model\\n' }}")


def _processor():
    """HF's `Gemma3Processor` over a word-level tokenizer that reads each newline run as one token."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    vocab = {"<unk>": 3} | {f"t{i}": i for i in range(4, 300)} | NEWLINES | {f"t{i}": i for i in range(309, VOCAB)}
    tokenizer = newline_word_tokenizer(
        vocab | SPECIAL, additional_special_tokens=list(SPECIAL)[3:], chat_template=TEMPLATE,
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    image_processor = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    return transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                        image_seq_length=TOKENS)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3")
    with torch_single_thread():
        torch.manual_seed(0)
        model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(**CONFIG)).eval()
        model.config._attn_implementation = "eager"
        randomize_weights(model, seed=31)
    model.save_pretrained(str(folder))
    processor = _processor()
    processor.save_pretrained(str(folder))
    # 24 tokens a step: chunks stop before an image they cannot finish (each is 18 tokens)
    llm = LLM(str(folder), dtype="float32", num_blocks=200, block_size=4, max_num_batched_tokens=24,
              max_model_len=400)
    return folder, model, processor, llm


def _image(seed: int, shape=(30, 40)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8))


def test_placeholders_and_newlines_match_the_processor(gemma3):
    """Each image widens to start, 16 image tokens and end, with two newlines on each side joined
    with the prompt's newline tokens beside them, as HF's processor and tokenizer write them: after
    and before text, newlines and other images, at the prompt's start and end."""
    _, _, processor, llm = gemma3
    vision = llm.engine.vision_config
    assert vision.bidirectional and vision.newline_ids == tuple(NEWLINES.values())
    for text in ["t5 t6\n<start_of_image>t7", "<start_of_image>", "t5\n\n<start_of_image><start_of_image>\nt9",
                 "t5 <start_of_image> t6 <start_of_image>\n\nt7", "\n<start_of_image>\n"]:
        count = text.count("<start_of_image>")
        images = [_image(i) for i in range(count)]
        expected = processor(text=text, images=images, return_tensors="np")["input_ids"][0].tolist()
        spans = [vision.placeholder_ids(30, 40)] * count
        widened, offsets = placeholder_offsets(processor.tokenizer.encode(text), vision.prompt_token_id, spans,
                                               vision.newline_ids)
        assert widened == expected, text
        assert [widened[o] for o in offsets] == [SPECIAL["<start_of_image>"]] * count
        assert all(widened[o + 1:o + 1 + TOKENS] == [SPECIAL["<image_soft_token>"]] * TOKENS for o in offsets)
        # a prompt already widened, as the processor gives it, is taken as it is
        assert placeholder_offsets(expected, vision.prompt_token_id, spans, vision.newline_ids) == (widened, offsets)


def test_image_tokens_outside_an_image_are_refused(gemma3):
    """A start-of-image token widened beside stray image tokens (the processor refuses more image
    tokens than images give) is refused, naming the count."""
    _, _, _, llm = gemma3
    stray = [5, SPECIAL["<start_of_image>"]] + [SPECIAL["<image_soft_token>"]] * 15 + [SPECIAL["<end_of_image>"]]
    with pytest.raises(ValueError, match=r"the prompt holds 15 image tokens \(id 302\) outside its images' placeholders"):
        llm.generate({"prompt_token_ids": stray, "multi_modal_data": {"image": _image(0)}}, GREEDY, use_tqdm=False)
    assert _blocks_all_free(llm)


def test_image_features_match_hf(gemma3):
    """The projected embeddings (last states after the post-layernorm, pooled 2 x 2, RMSNorm,
    projection) equal HF's `get_image_features`, for images of several shapes."""
    _, model, processor, llm = gemma3
    for seed, shape in enumerate([(30, 40), (56, 56), (100, 20)]):
        image = _image(seed, shape)
        pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
        with torch.no_grad(), torch_single_thread():
            expected = model.model.get_image_features(pixel_values=pixels).pooler_output[0].numpy()
        ours = llm.engine.image_encoder.encode(llm.engine.image_processor.pixel_values([image])[0], *shape[::-1])
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_greedy_tokens_match_hf_with_images_read_bidirectionally(gemma3):
    """Prompts with one image, two apart and two side by side, in one batch prefilled 24 tokens a
    step (chunks stop before an image they cannot finish): the widened prompts and greedy tokens
    are HF's."""
    _, model, processor, llm = gemma3
    cases = [("t5 t6 t7 t8 t9 t10\n<start_of_image>t11 t12", [_image(1)]),
             ("t5\n<start_of_image>t13 t14 t15 t16\n\n<start_of_image>t17", [_image(2), _image(3, (56, 20))]),
             ("t9 <start_of_image><start_of_image> t20", [_image(4), _image(5)]),
             ("t5 t6\n<start_of_image>t11 t12", [_image(6, (20, 70))])]
    check_greedy_matches_hf(model, processor, llm, cases)


def test_prompt_logprobs_match_hf_where_image_tokens_see_each_other(gemma3):
    """Every prompt position's logprob equals HF's (whose `token_type_ids` mask lets an image's
    tokens see each other, within the first layer's window) to 1e-4, with steps of 24 tokens that
    would end inside both images; HF's causal mask over the same prompt moves them by far more, so
    the check tells the two apart."""
    _, model, processor, llm = gemma3
    # 24 tokens a step would end the first step and the second inside an image: they stop before it
    text = "t5 t6 t7 t8 t9 t10 t11 t12 t13 t14\n<start_of_image>t13\n<start_of_image>t17 t18"
    images = [_image(7), _image(8, (40, 90))]
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": images}},
                       dataclasses.replace(GREEDY, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    inputs = processor(text=text, images=images, return_tensors="pt")
    prompt = inputs["input_ids"][0].tolist()
    assert out.prompt_token_ids == prompt
    got = np.array([entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])])

    def hf_logprobs(**kwargs):
        with torch.no_grad(), torch_single_thread():
            logits = model(**kwargs).logits[0, :-1].double()
        return torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].numpy()

    np.testing.assert_allclose(got, hf_logprobs(**inputs), atol=1e-4)
    causal = {key: value for key, value in inputs.items() if key != "token_type_ids"}
    assert np.abs(got - hf_logprobs(**causal)).max() > 1e-2
    assert _blocks_all_free(llm)


def test_prefix_cache_hits_on_the_same_image(gemma3):
    """The same prompt and image again comes from the prefix cache with HF's tokens; another image
    of the same size does not hit past the text before it."""
    _, model, processor, llm = gemma3
    text = "t5 t6 t7 t8 t9\n<start_of_image>t7 t8"
    image, other = _image(40), _image(41)
    llm.engine.reset_prefix_cache()
    first, again, changed = (llm.generate({"prompt": text, "multi_modal_data": {"image": img}}, GREEDY,
                                          use_tqdm=False)[0] for img in (image, image, other))
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == _hf_greedy(model, processor, text, [image])[1]
    assert changed.outputs[0].token_ids == _hf_greedy(model, processor, text, [other])[1]
    assert again.num_cached_tokens >= 20 and changed.num_cached_tokens <= 8
    assert _blocks_all_free(llm)


def test_string_content_format_writes_the_start_of_image_token(gemma3):
    """A chat template that takes contents as text gets `<start_of_image>` for each image part (the
    token the processor widens), joined to the text by a newline: HF's prompt and tokens."""
    _, model, processor, llm = gemma3
    template = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                "{{ '<start_of_turn>model\\n' }}")
    image = _image(60)
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": "t30"}]}]
    out = llm.chat(messages, GREEDY, chat_template=template, chat_template_content_format="string", use_tqdm=False)[0]
    prompt, expected = _hf_greedy(model, processor, "<start_of_turn>user\n<start_of_image>\nt30<end_of_turn>\n"
                                                    "<start_of_turn>model\n", [image])
    assert out.prompt_token_ids == prompt and out.outputs[0].token_ids == expected


def test_a_step_too_small_for_an_image_is_refused(gemma3):
    folder = gemma3[0]
    with pytest.raises(ValueError, match=": an image is 16 tokens, which attend to each other and so are "
                                         "computed in one step: max_num_batched_tokens must be at least that, got 8"):
        LLM(str(folder), dtype="float32", num_blocks=40, block_size=4, max_num_batched_tokens=8)


def test_server_chat_with_two_images(gemma3):
    """A chat through the server and the `openai` client, its template writing `<start_of_image>`
    after a newline: HF's tokens, and `usage` counts HF's widened prompt."""
    _, model, processor, llm = gemma3
    check_template_chat_with_two_images(model, processor, llm, [_image(50), _image(51, (70, 30))])
