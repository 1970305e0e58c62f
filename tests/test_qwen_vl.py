"""Image input on Qwen2-VL and Qwen2.5-VL checkpoints: the vision tower, multimodal RoPE positions.

Oracle: HF transformers' `Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration`
on random weights (Qwen2.5-VL's tower with windowed and full-attention blocks, windows that the
images' grids do not fill evenly) and their own `Qwen2VLImageProcessor` / processors: how many
placeholders each image becomes, the merged image features, the multimodal RoPE positions
(`get_rope_index`), and greedy tokens for prompts holding images of several shapes, prefilled in
chunks that cut through the images, offline and through the server.
"""

import base64
import io
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
from hf_models import randomize_weights, torch_single_thread  # noqa: E402
from test_images import GREEDY, _blocks_all_free, _hf_greedy  # noqa: E402
from test_llava_next import check_greedy_matches_hf  # noqa: E402

from jpaged import LLM  # noqa: E402
from jpaged.config import QwenVisionConfig  # noqa: E402
from jpaged.mrope import prompt_positions  # noqa: E402

VOCAB = 320
SPECIAL = {"<|vision_end|>": VOCAB - 4, "<|vision_start|>": VOCAB - 3, "<|video_pad|>": VOCAB - 2,
           "<|image_pad|>": VOCAB - 1}
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
TOKEN_IDS = dict(image_token_id=SPECIAL["<|image_pad|>"], video_token_id=SPECIAL["<|video_pad|>"],
                 vision_start_token_id=SPECIAL["<|vision_start|>"], vision_end_token_id=SPECIAL["<|vision_end|>"])
CONFIGS = {
    "qwen2_vl": lambda: transformers.Qwen2VLConfig(
        text_config=TEXT, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        **TOKEN_IDS),
    # windows of 2 x 2 merged patches (56 pixels) on the first block, the whole image on the second
    "qwen2_5_vl": lambda: transformers.Qwen2_5_VLConfig(
        text_config=TEXT, vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                                             out_hidden_size=64, fullatt_block_indexes=[1], window_size=56),
        **TOKEN_IDS),
    # 16-pixel patches, a learned 4 x 4 position grid, DeepStack from both blocks into the first two
    # of three layers, interleaved multimodal RoPE, q / k norms
    "qwen3_vl": lambda: transformers.Qwen3VLConfig(
        text_config=TEXT | dict(num_hidden_layers=3, head_dim=16, rope_scaling={
            "rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           deepstack_visual_indexes=[0, 1], num_position_embeddings=16),
        **TOKEN_IDS),
}
PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for part in m['content'] %}{% if part['type'] == 'image' %}" + IMAGE + "{% else %}{{ part['text'] }}"
            "{% endif %} {% endfor %}{% endif %}{% endfor %}assistant:")
# (height, width): wide, tall, square, thin, odd, smaller than a patch, and one past max_pixels
SHAPES = [(40, 90), (90, 40), (60, 60), (20, 150), (33, 57), (9, 7), (200, 260)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, min(SPECIAL.values()))} | SPECIAL
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=list(SPECIAL), chat_template=TEMPLATE,
                                   extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})


class _Processor:
    """Qwen-VL's processor for images (its `Qwen2VLProcessor` needs torchvision for videos): HF's
    image processor makes the pixels and grids, and each `<|image_pad|>` becomes grid / merge^2
    of them, as the processor widens it."""

    def __init__(self, patch: int = 14):
        side = 2 * patch  # a merged patch
        self.image_processor = transformers.Qwen2VLImageProcessor(patch_size=patch, min_pixels=side * side * 4,
                                                                  max_pixels=side * side * 40)
        self.tokenizer = _tokenizer()

    def __call__(self, text: str, images=None, return_tensors="pt") -> dict:
        inputs = {}
        if images:
            inputs = dict(self.image_processor(images, return_tensors="pt"))
            counts = iter((inputs["image_grid_thw"].prod(-1) // 4).tolist())
            pieces = text.split("<|image_pad|>")
            text = pieces[0] + "".join("<|image_pad|>" * next(counts) + piece for piece in pieces[1:])
        ids = torch.tensor([self.tokenizer.encode(text)])
        return inputs | {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                         "mm_token_type_ids": (ids == SPECIAL["<|image_pad|>"]).int()}

    def save_pretrained(self, folder: str) -> None:
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module", params=list(CONFIGS))
def qwen_vl(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    with torch_single_thread():
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(CONFIGS[request.param](), dtype=torch.float32,
                                                                     attn_implementation="eager")
        randomize_weights(model, seed=11 + list(CONFIGS).index(request.param))
        model.eval()
    model.save_pretrained(str(folder))
    processor = _Processor(PATCH[request.param])
    processor.save_pretrained(str(folder))
    llm = LLM(str(folder), dtype="float32", num_blocks=200, block_size=4, max_num_batched_tokens=16, max_model_len=400)
    return folder, model, processor, llm


def _image(seed: int, shape=(40, 90)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8))


def _hf_inputs(processor, text: str, images):
    return processor(text=text, images=images, return_tensors="pt")


def test_placeholder_counts_match_the_processor(qwen_vl):
    """Each image's placeholder count (its resized grid in merged patches) is the one the
    processor widens it into, over random sizes and the edge cases of `smart_resize`."""
    folder, _, processor, llm = qwen_vl
    vision = llm.engine.vision_config
    side = 2 * vision.patch_size
    assert isinstance(vision, QwenVisionConfig) and (vision.min_pixels, vision.max_pixels) == (side**2 * 4, side**2 * 40)
    rng = np.random.default_rng(0)
    for height, width in [tuple(int(x) for x in rng.integers(1, 400, 2)) for _ in range(60)] + SHAPES:
        if max(height, width) / min(height, width) > 200:
            continue
        ids = _hf_inputs(processor, IMAGE, [Image.new("RGB", (width, height))])["input_ids"][0].tolist()
        assert vision.image_tokens(height, width) == ids.count(SPECIAL["<|image_pad|>"]), (height, width)
    with pytest.raises(ValueError, match="aspect ratio is over 200"):
        vision.image_tokens(1, 300)


def test_image_features_match_hf(qwen_vl):
    """The merged embeddings of images of every shape equal HF's `get_image_features` (Qwen3-VL:
    the DeepStack features too, after them)."""
    _, model, processor, llm = qwen_vl
    for seed, shape in enumerate(SHAPES):
        image = _image(seed, shape)
        inputs = _hf_inputs(processor, IMAGE, [image])
        with torch.no_grad(), torch_single_thread():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                      image_grid_thw=inputs["image_grid_thw"])
        deepstack = getattr(features, "deepstack_features", None) or []  # per DeepStack layer, per image
        expected = [features.pooler_output[0], *(layer[0] if isinstance(layer, tuple) else layer for layer in deepstack)]
        pixels = llm.engine.image_processor.pixel_values([image])[0]
        np.testing.assert_allclose(llm.engine.image_encoder.encode(pixels, *shape),
                                   torch.cat(expected, dim=-1).numpy(), rtol=1e-4, atol=1e-5)


def test_multimodal_rope_positions_match_hf(qwen_vl):
    """A prompt's three positions per token, and the shift of the tokens after it, are HF's
    `get_rope_index` for prompts with one image, two apart, two side by side, and none."""
    _, model, processor, llm = qwen_vl
    vision = llm.engine.vision_config
    cases = [("t5 " + IMAGE + " t7 t8", [_image(0, (40, 90))]),
             ("t9 " + IMAGE + " t10 t11 " + IMAGE + " t12", [_image(1, (90, 40)), _image(2, (9, 7))]),
             (IMAGE + IMAGE + " t13", [_image(3, (60, 60)), _image(4, (20, 150))]), ("t5 t6 t7", [])]
    for text, images in cases:
        inputs = _hf_inputs(processor, text, images or None)
        ids = inputs["input_ids"][0].tolist()
        expected, delta = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                     inputs.get("image_grid_thw"))
        runs = [i for i, token in enumerate(ids) if token == SPECIAL["<|image_pad|>"]
                and (i == 0 or ids[i - 1] != SPECIAL["<|image_pad|>"])]
        grids = [vision.grid(image.height, image.width) for image in images]
        positions, shift = prompt_positions(len(ids), runs, grids)
        np.testing.assert_array_equal(positions, expected[:, 0].numpy().T)
        assert shift == int(delta[0, 0])


def test_greedy_tokens_match_hf_for_images_of_every_shape(qwen_vl):
    """Prompts with images of different shapes in one batch, and two images in one prompt,
    prefilled 16 tokens a step through the images: the widened prompts and greedy tokens (whose
    positions run on past the images' shift) are HF's, and every block is free after."""
    _, model, processor, llm = qwen_vl
    cases = [(f"t5 t6 {IMAGE} t7 t8", [_image(i, shape)]) for i, shape in enumerate(SHAPES)]
    cases += [(f"t9 {IMAGE} t10 {IMAGE} t11", [_image(20, (40, 90)), _image(21, (90, 40))])]
    outputs = check_greedy_matches_hf(model, processor, llm, cases)
    assert len({len(out.prompt_token_ids) for out in outputs}) > 3


def test_server_chat_with_two_images(qwen_vl):
    _, model, processor, llm = qwen_vl
    check_template_chat_with_two_images(model, processor, llm, [_image(30, (40, 90)), _image(31, (90, 40))])


def check_template_chat_with_two_images(model, processor, llm, images) -> None:
    """`/v1/chat/completions` through the official client with two `image_url` parts (`images`)
    answers as HF (`model`, `processor`) does for the chat the tokenizer's template renders;
    `usage` counts HF's widened prompt; every block is free after."""
    openai = pytest.importorskip("openai")
    from server_thread import serving

    from jpaged.server.launch import create_app

    urls = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[0]}},
                                             {"type": "text", "text": "t30"},
                                             {"type": "image_url", "image_url": {"url": urls[1]}}]}]
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "t30"}, {"type": "image"}]}], tokenize=False)
    prompt, expected = _hf_greedy(model, processor, text, images)
    with serving(create_app(llm.engine, served_model_name="m")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
        assert reply.choices[0].token_ids == expected
        assert reply.usage.prompt_tokens == len(prompt)
    assert _blocks_all_free(llm)


def test_string_content_format_writes_the_vision_markers(qwen_vl):
    """A chat template that takes contents as text gets each image part as
    `<|vision_start|><|image_pad|><|vision_end|>` (what Qwen's templates write, and vLLM's
    placeholder), joined to the text by a newline: HF's prompt and tokens."""
    _, model, processor, llm = qwen_vl
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"
    image = _image(70)
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": "t30"}]}]
    out = llm.chat(messages, GREEDY, chat_template=template, chat_template_content_format="string", use_tqdm=False)[0]
    prompt, expected = _hf_greedy(model, processor, f"user: {IMAGE}\nt30 assistant:", [image])
    assert out.prompt_token_ids == prompt and out.outputs[0].token_ids == expected
    assert _blocks_all_free(llm)


def test_hub_layout_config_reads_the_same_model(qwen_vl, tmp_path):
    """A config.json as the hub ships Qwen2-VL checkpoints, the language model's keys at the top
    beside `vision_config` (no `text_config`), loads the same model: the same greedy tokens."""
    folder, _, _, llm = qwen_vl
    config = json.loads((folder / "config.json").read_text())
    if config["architectures"][0] != "Qwen2_5_VLForConditionalGeneration":
        pytest.skip("Qwen2.5-VL's case stands for Qwen2-VL's, which loads through the same path; Qwen3-VL's configs "
                    "on the hub hold a text_config")
    flat = {key: value for key, value in config.items() if key != "text_config"} | config["text_config"]
    flat["architectures"] = config["architectures"]
    for item in folder.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(flat))
    hub = LLM(str(tmp_path), dtype="float32", num_blocks=64, block_size=4, max_model_len=200)
    prompt = {"prompt": f"t5 {IMAGE} t7", "multi_modal_data": {"image": _image(40, (33, 57))}}
    assert (hub.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
            == llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids)


def test_prefix_cache_preemption_and_drafts_keep_the_positions(qwen_vl):
    """On an engine that compiles every step at start-up (`[T, 3]` positions in the padding
    steps too), with a KV cache too small for its batch (so sequences are preempted and
    recomputed) and n-gram drafts checked past the prompt: the same image again comes from the
    prefix cache, and every answer is HF's greedy one; every block is free after."""
    folder, model, processor, _ = qwen_vl
    if model.config.model_type != "qwen3_vl":
        pytest.skip("Qwen3-VL's case (multimodal RoPE and DeepStack) stands for the three: the others share the path")
    llm = LLM(str(folder), dtype="float32", num_blocks=24, block_size=4, max_num_batched_tokens=16, max_model_len=80,
              compile_warmup=True, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                       "prompt_lookup_min": 1, "prompt_lookup_max": 2})
    words = [f"t{i}" for i in range(5, 35)]  # many tokens for the n-gram lookup to find the answers' in
    text = f"{' '.join(words[:4])} {IMAGE} {' '.join(words[4:])}"
    cases = [(text, [_image(50, (60, 60))]), (text, [_image(51, (40, 90))]), (f"t10 {IMAGE} t11", [_image(52, (90, 40))])]
    outputs = llm.generate([{"prompt": t, "multi_modal_data": {"image": images}} for t, images in cases], GREEDY,
                           use_tqdm=False)
    assert llm.engine.stats().num_preemptions > 0 and llm.engine.stats().num_draft_tokens > 0
    again = llm.generate({"prompt": text, "multi_modal_data": {"image": _image(50, (60, 60))}}, GREEDY,
                         use_tqdm=False)[0]
    assert again.num_cached_tokens >= 4 + vision_tokens(llm, 60, 60)
    for (t, images), out in zip([*cases, cases[0]], [*outputs, again]):
        assert out.outputs[0].token_ids == _hf_greedy(model, processor, t, images)[1], t
    assert _blocks_all_free(llm)


def vision_tokens(llm, height: int, width: int) -> int:
    return llm.engine.vision_config.image_tokens(height, width)


def test_mrope_sections_wider_than_a_head_are_refused_at_load():
    from jpaged.config import ModelConfig
    from jpaged.loader.multimodal import text_only_config

    hf = CONFIGS["qwen2_vl"]().to_dict() | {"architectures": ["Qwen2VLForConditionalGeneration"]}
    assert ModelConfig.from_hf(text_only_config(hf)).rope.mrope_section == (2, 3, 3)
    hf["text_config"]["rope_scaling"] = hf["text_config"]["rope_parameters"] = {
        "rope_type": "default", "mrope_section": [4, 4, 4], "rope_theta": 10000.0}
    with pytest.raises(ValueError, match=r"mrope_section \[4, 4, 4\] covers 12 frequencies, more than the 8"):
        ModelConfig.from_hf(text_only_config(hf))
