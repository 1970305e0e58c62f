"""Image input on a LLaVA-NeXT checkpoint: images of any shape, read whole and in tiles.

Oracle: HF transformers' `LlavaNextForConditionalGeneration` on random weights (CLIP vision tower,
projector, learned image newline, Llama language model) and its own `LlavaNextProcessor`: how
many placeholders it widens each image into (on this model's tiny tiles and on llava-v1.6's
geometry), the packed image features, and greedy tokens for prompts holding images of several
shapes, offline and through the server.
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
from test_images import CLIP_VISION, GREEDY, IMAGE_TOKEN, LLAMA_TEXT, _blocks_all_free, _hf_greedy, _tokenizer  # noqa: E402

from jpaged import LLM  # noqa: E402
from jpaged.config import VisionConfig  # noqa: E402

TILE = 28  # pixels; 4 x 4 patches of 7
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's
# (height, width): wide, tall, square, thin, odd, and smaller than a tile
SHAPES = [(40, 90), (90, 40), (60, 60), (12, 100), (33, 57), (9, 7)]


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava_next")
    config = transformers.LlavaNextConfig(
        text_config=LLAMA_TEXT | dict(max_position_embeddings=512), vision_config=CLIP_VISION | dict(image_size=TILE),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=PINPOINTS)
    with torch_single_thread():
        model = transformers.LlavaNextForConditionalGeneration(config).eval()
        randomize_weights(model, seed=7)
    model.save_pretrained(str(folder))
    processor = _processor(PINPOINTS, TILE, 7)
    processor.save_pretrained(str(folder))
    llm = LLM(str(folder), dtype="float32", num_blocks=160, block_size=4, max_num_batched_tokens=16,
              max_model_len=320)
    return folder, model, processor, llm


def _processor(pinpoints, tile: int, patch: int):
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    return transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=_tokenizer(), patch_size=patch,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _image(seed: int, shape=(40, 90)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8))


def _hf_placeholders(processor, image) -> int:
    return processor(text="<image>", images=[image], return_tensors="np")["input_ids"][0].tolist().count(IMAGE_TOKEN)


def test_placeholder_counts_match_the_processor(llava_next):
    """Each image's placeholder count is the one LLaVA-NeXT's processor widens it into: random
    sizes on this model's 28-pixel tiles, and llava-v1.6's own geometry (336-pixel tiles of 24 x
    24 patches, its five grids) on photo-like and extreme shapes."""
    folder, _, processor, _ = llava_next
    vision = VisionConfig.from_hf(json.loads((folder / "config.json").read_text()))
    rng = np.random.default_rng(0)
    for height, width in [tuple(int(x) for x in rng.integers(1, 200, 2)) for _ in range(60)] + SHAPES:
        image = Image.new("RGB", (width, height))
        assert vision.image_tokens(height, width) == _hf_placeholders(processor, image), (height, width)
    v16 = VisionConfig.from_hf({"architectures": ["LlavaNextForConditionalGeneration"], "image_grid_pinpoints":
                                V16_PINPOINTS, "vision_config": {"image_size": 336, "patch_size": 14}})
    processor_v16 = _processor(V16_PINPOINTS, 336, 14)
    for height, width in [(480, 640), (640, 480), (1024, 1024), (300, 1000), (1000, 300), (77, 1500), (337, 335)]:
        image = Image.new("RGB", (width, height))
        assert v16.image_tokens(height, width) == _hf_placeholders(processor_v16, image), (height, width)


def test_image_features_match_hf(llava_next):
    """The packed embeddings of images of every shape (the whole image's patches, the grid's kept
    rows each closed by the newline) equal HF's `get_image_features`."""
    from safetensors.numpy import load_file

    from jpaged.images import ImageProcessor
    from jpaged.loader.multimodal import language_model_weights
    from jpaged.models.vision import ImageEncoder

    folder, model, processor, _ = llava_next
    vision_weights: dict = {}
    list(language_model_weights(load_file(folder / "model.safetensors").items(), vision_weights))
    encoder = ImageEncoder(VisionConfig.from_hf(json.loads((folder / "config.json").read_text())), vision_weights)
    for seed, shape in enumerate(SHAPES):
        image = _image(seed, shape)
        inputs = processor(text="<image>", images=[image], return_tensors="pt")
        with torch.no_grad(), torch_single_thread():
            expected = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                      image_sizes=inputs["image_sizes"]).pooler_output[0].numpy()
        tiles = ImageProcessor(folder).pixel_values([image])[0]
        assert tiles.shape[0] > 1
        np.testing.assert_allclose(encoder.encode(tiles, *shape), expected, rtol=1e-4, atol=1e-5)


def test_greedy_tokens_match_hf_for_images_of_every_shape(llava_next):
    """Prompts with images of different shapes (so different placeholder counts) in one batch, two
    images of two shapes apart and side by side in one prompt, prefilled 16 tokens a step through
    the placeholders: the widened prompts and greedy tokens are HF's."""
    _, model, processor, llm = llava_next
    cases = [("t5 t6 <image> t7 t8", [_image(i, shape)]) for i, shape in enumerate(SHAPES)]
    cases += [("t9 <image> t10 <image> t11", [_image(20, (40, 90)), _image(21, (90, 40))]),
              ("t9 <image><image> t11", [_image(22, (33, 57)), _image(23, (60, 60))])]
    outputs = check_greedy_matches_hf(model, processor, llm, cases)
    assert len({len(out.prompt_token_ids) for out in outputs[:len(SHAPES)]}) > 3  # the shapes take their own counts


def check_greedy_matches_hf(model, processor, llm, cases: list[tuple[str, list]]) -> list:
    """`cases` (prompt text, images) in one batch: the widened prompts and greedy tokens are HF's
    (`model`, `processor`), and every block is free after. Returns the outputs."""
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}} for text, images in cases],
                           GREEDY, use_tqdm=False)
    for (text, images), out in zip(cases, outputs):
        prompt, expected = _hf_greedy(model, processor, text, images)
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == expected, (text, [image.size for image in images])
    assert _blocks_all_free(llm)
    return outputs


def test_server_chat_with_images_of_two_shapes(llava_next):
    """`/v1/chat/completions` through the official client with two `image_url` parts of different
    shapes answers as HF does for the rendered chat; `usage` and `/tokenize` count HF's widened
    prompt."""
    _, model, processor, llm = llava_next
    check_server_chat_with_two_images(model, processor, llm, [_image(30, (40, 90)), _image(31, (90, 40))])


def check_server_chat_with_two_images(model, processor, llm, images) -> None:
    """A chat with `images` as two `image_url` data URLs, through the server and the `openai`
    client: HF's greedy tokens (`model`, `processor`) for the rendered chat, its widened prompt's
    length as `usage` and as `/tokenize`'s tokens; every block free after."""
    openai = pytest.importorskip("openai")
    import httpx
    from server_thread import serving

    from jpaged.server.launch import create_app

    urls = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[0]}},
                                             {"type": "text", "text": "t30"},
                                             {"type": "image_url", "image_url": {"url": urls[1]}}]}]
    # a template that takes text gets both images first, one per line, as vLLM writes them
    prompt, expected = _hf_greedy(model, processor, "user: <image>\n<image>\nt30 assistant:", images)
    with serving(create_app(llm.engine, served_model_name="m", chat_template=template)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
        assert reply.choices[0].token_ids == expected
        assert reply.usage.prompt_tokens == len(prompt)
        tokenized = httpx.post(f"{base}/tokenize", json={"model": "m", "messages": messages}).json()
        assert tokenized["tokens"] == prompt
    assert _blocks_all_free(llm)


def test_config_errors_name_the_setting():
    base = {"architectures": ["LlavaNextForConditionalGeneration"], "vision_config": {"image_size": 336}}
    with pytest.raises(ValueError, match="positive multiple of the vision tower's image_size 336"):
        VisionConfig.from_hf(base | {"image_grid_pinpoints": [[336, 600]]})
    with pytest.raises(ValueError, match="image_grid_pinpoints None"):
        VisionConfig.from_hf(base)
    with pytest.raises(ValueError, match="LLaVA-NeXT's vision_feature_select_strategy 'full'"):
        VisionConfig.from_hf(base | {"image_grid_pinpoints": [[336, 672]], "vision_feature_select_strategy": "full"})


def test_limit_mm_per_prompt(llava_next, tmp_path, capsys):
    """vLLM's `limit_mm_per_prompt`: a prompt of more images than the limit is refused, naming
    it (and the engine serves on, its blocks free); {"image": 0} serves the model's text alone,
    without its vision tower; other keys and counts are refused at start."""
    folder, model, processor, _ = llava_next
    shapes = dict(dtype="float32", num_blocks=160, block_size=4, max_num_batched_tokens=16, max_model_len=320)
    llm = LLM(str(folder), limit_mm_per_prompt={"image": 1}, **shapes)
    two = {"prompt": "t9 <image> t10 <image>", "multi_modal_data": {"image": [_image(40), _image(41, (60, 60))]}}
    with pytest.raises(ValueError, match=r"holds 2 images, more than limit_mm_per_prompt\['image'\] 1 allows"):
        llm.generate(two, GREEDY, use_tqdm=False)
    one = llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": _image(42)}}, GREEDY, use_tqdm=False)
    assert one[0].outputs[0].token_ids == _hf_greedy(model, processor, "t5 <image>", [_image(42)])[1]
    assert _blocks_all_free(llm)
    text_only = LLM(str(folder), limit_mm_per_prompt={"image": 0}, **shapes)
    assert text_only.engine.vision_config is None
    with pytest.raises(ValueError, match=r"holds 1 image, more than limit_mm_per_prompt\['image'\] 0 allows"):
        text_only.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": _image(42)}}, GREEDY, use_tqdm=False)
    with torch.no_grad():
        expected = model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, 4:].tolist()
    assert text_only.generate({"prompt_token_ids": [1, 5, 6, 7]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids \
        == expected
    for limits in ({"video": 1}, {"image": -1}, {"image": 1.5}, [1]):
        with pytest.raises(ValueError, match="limit_mm_per_prompt"):
            LLM(str(folder), limit_mm_per_prompt=limits, **shapes)
    from jpaged.cli import main

    _image(43).save(tmp_path / "a.png")
    args = ["generate", "--model", str(folder), "--dtype", "float32", "--num-blocks", "160", "--block-size", "4",
            "--max-model-len", "320", "--max-tokens", "4", "--image", str(tmp_path / "a.png"), "--image",
            str(tmp_path / "a.png"), "--limit-mm-per-prompt", '{"image": 1}', "t5"]
    assert main(args) == 2
    assert "holds 2 images, more than limit_mm_per_prompt['image'] 1" in capsys.readouterr().err


def test_checkpoints_that_do_not_fit_their_config_are_refused(llava_next, tmp_path):
    """A projector narrower than the features config.json selects is refused at load; an image
    processor whose grid pinpoints are not the model's is refused at the first image, naming both."""
    import shutil

    folder, _, _, _ = llava_next
    shapes = dict(dtype="float32", num_blocks=160, block_size=4, max_num_batched_tokens=16, max_model_len=320)
    wide = shutil.copytree(folder, tmp_path / "wide")
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(config | {"vision_feature_layer": [-2, -1]}))
    with pytest.raises(ValueError, match="the projector takes 32 features, and vision_feature_layer"):
        LLM(str(wide), **shapes)
    other = shutil.copytree(folder, tmp_path / "other")
    preprocessor = next(path for path in other.glob("*.json") if "image_grid_pinpoints" in path.read_text())
    settings = json.loads(preprocessor.read_text())
    (settings["image_processor"] if "image_processor" in settings else settings)["image_grid_pinpoints"] = [[28, 28]]
    preprocessor.write_text(json.dumps(settings))
    llm = LLM(str(other), **shapes)
    with pytest.raises(ValueError, match="the processor's image_grid_pinpoints must be the model's"):
        llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": _image(44)}}, GREEDY, use_tqdm=False)
    assert _blocks_all_free(llm)


def test_server_counts_image_parts_before_reading_them(llava_next):
    """Over HTTP, a chat of more image parts than `limit_mm_per_prompt` is a 400 before any is
    read (these could not be)."""
    folder, _, _, _ = llava_next
    llm = LLM(str(folder), limit_mm_per_prompt={"image": 1}, dtype="float32", num_blocks=160, block_size=4,
              max_num_batched_tokens=16, max_model_len=320)
    openai = pytest.importorskip("openai")
    from server_thread import serving

    from jpaged.server.launch import create_app

    unreadable = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}  # counted, never read
    with serving(create_app(llm.engine, served_model_name="next", chat_template="{{ messages }}")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match=r"holds 2 images, more than limit_mm_per_prompt"):
            client.chat.completions.create(model="next", max_tokens=2, messages=[
                {"role": "user", "content": [unreadable, {"type": "text", "text": "t5"}, unreadable]}])
    assert _blocks_all_free(llm)
