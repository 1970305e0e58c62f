"""Image input on a LLaVA-OneVision checkpoint: a SigLIP tower, and tiles as LLaVA-NeXT's, capped
at N tiles' patches ("anyres_max_N").

Oracle: HF transformers' `LlavaOnevisionForConditionalGeneration` on random weights (SigLIP tower,
projector, learned image newline, Llama language model) and its own `LlavaOnevisionProcessor`
(given a prompt's images as a flat list, as vLLM gives them: each image tiled): how many
placeholders it widens each image into, the packed image features (grids below and above the
cap), and greedy tokens offline and through the server.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
from hf_models import randomize_weights, torch_single_thread  # noqa: E402
from test_images import IMAGE_TOKEN, LLAMA_TEXT, _tokenizer  # noqa: E402
from test_llava_next import check_greedy_matches_hf, check_server_chat_with_two_images  # noqa: E402

from jpaged import LLM  # noqa: E402
from jpaged.config import VisionConfig  # noqa: E402

TILE = 28  # pixels; 4 x 4 patches of 7
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 84], [28, 84], [84, 28]]
ASPECT = "anyres_max_2"  # grids over 2.2 tiles' patches (35) shrink
SIGLIP_VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                     num_attention_heads=2, image_size=TILE, patch_size=7, vision_use_head=False)
# (height, width): wide, tall, square (capped), large (capped), thin, odd, smaller than a tile
SHAPES = [(40, 90), (90, 40), (60, 60), (100, 110), (12, 100), (33, 57), (9, 7)]


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava_onevision")
    config = transformers.LlavaOnevisionConfig(
        text_config=LLAMA_TEXT | dict(max_position_embeddings=512), vision_config=SIGLIP_VISION,
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=ASPECT)
    with torch_single_thread():
        model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
        randomize_weights(model, seed=8)
    model.save_pretrained(str(folder))
    processor = _processor(PINPOINTS, TILE, ASPECT)
    processor.image_processor.save_pretrained(str(folder))
    processor.tokenizer.save_pretrained(str(folder))
    llm = LLM(str(folder), dtype="float32", num_blocks=200, block_size=4, max_num_batched_tokens=16,
              max_model_len=400)
    return folder, model, processor, llm


class _ImageProcessor(transformers.LlavaOnevisionProcessor):
    """HF's processor without a video processor (whose class check needs torchvision, not
    installed here) or video token (the test tokenizer has none); images are all these tests give it."""

    def check_argument_for_proper_class(self, name, argument):
        return None


def _processor(pinpoints, tile: int, aspect: str, patches: int = 16):
    image_processor = transformers.LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                                                   image_grid_pinpoints=pinpoints)
    processor = _ImageProcessor(image_processor=image_processor, tokenizer=_tokenizer(), num_image_tokens=patches,
                                vision_feature_select_strategy="full", vision_aspect_ratio=aspect)
    processor.video_token = processor.video_token_id = None
    return processor


def _image(seed: int, shape=(40, 90)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8))


def _hf_placeholders(processor, images) -> int:
    ids = processor(text="<image>" * len(images), images=images, return_tensors="np")["input_ids"][0].tolist()
    return ids.count(IMAGE_TOKEN)


def test_placeholder_counts_match_the_processor(onevision):
    """Each image's placeholder count is the one LLaVA-OneVision's processor widens it into: random
    sizes on this model's 28-pixel tiles (grids below and above the cap), two and three images in
    one prompt (each read whole), and llava-onevision-qwen2's own geometry (384-pixel tiles of 27 x 27
    patches, "anyres_max_9") on photo-like and extreme shapes."""
    folder, _, processor, _ = onevision
    vision = VisionConfig.from_hf(json.loads((folder / "config.json").read_text()))
    assert vision.max_tiles == 2 and not vision.class_token and not vision.drop_cls
    rng = np.random.default_rng(0)
    for height, width in [tuple(int(x) for x in rng.integers(1, 200, 2)) for _ in range(60)] + SHAPES:
        assert vision.image_tokens(height, width) == _hf_placeholders(processor, [Image.new("RGB", (width, height))])
    images = [Image.new("RGB", (w, h)) for h, w in SHAPES[:3]]
    assert sum(vision.image_tokens(image.height, image.width) for image in images) == _hf_placeholders(processor, images)
    pinpoints = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]
    ov = VisionConfig.from_hf({"architectures": ["LlavaOnevisionForConditionalGeneration"], "image_grid_pinpoints":
                               pinpoints, "vision_config": {"image_size": 384, "patch_size": 14}})
    processor_ov = _processor(pinpoints, 384, "anyres_max_9", patches=729)
    for height, width in [(480, 640), (640, 480), (1024, 1024), (300, 1000), (1000, 300), (77, 1500), (2000, 2000)]:
        image = Image.new("RGB", (width, height))
        assert ov.image_tokens(height, width) == _hf_placeholders(processor_ov, [image]), (height, width)


def test_image_features_match_hf(onevision):
    """The packed embeddings of images of every shape (the whole image's patches, the grid's kept
    rows, scaled down past the cap, each closed by the newline) equal HF's `get_image_features`,
    one image at a time and two together."""
    from safetensors.numpy import load_file

    from jpaged.images import ImageProcessor
    from jpaged.loader.multimodal import language_model_weights
    from jpaged.models.vision import ImageEncoder

    folder, model, processor, _ = onevision
    vision_weights: dict = {}
    list(language_model_weights(load_file(folder / "model.safetensors").items(), vision_weights))
    encoder = ImageEncoder(VisionConfig.from_hf(json.loads((folder / "config.json").read_text())), vision_weights)
    cases = [[_image(seed, shape)] for seed, shape in enumerate(SHAPES)] + [[_image(10, (40, 90)), _image(11)]]
    for images in cases:
        inputs = processor(text="<image>" * len(images), images=images, return_tensors="pt")
        with torch.no_grad(), torch_single_thread():
            expected = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                batch_num_images=inputs["batch_num_images"]).pooler_output
        tiles = ImageProcessor(folder).pixel_values(images)
        for image, pixels, want in zip(images, tiles, expected):
            got = encoder.encode(pixels, image.height, image.width)
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_greedy_tokens_match_hf(onevision):
    """Prompts with images of different shapes (capped grids among them) in one batch, and two
    images in one prompt, prefilled 16 tokens a step through the placeholders: the widened prompts
    and greedy tokens are HF's; every block is free after."""
    _, model, processor, llm = onevision
    cases = [("t5 t6 <image> t7 t8", [_image(i, shape)]) for i, shape in enumerate(SHAPES)]
    cases += [("t9 <image> t10 <image> t11", [_image(20, (40, 90)), _image(21, (90, 40))])]
    check_greedy_matches_hf(model, processor, llm, cases)


def test_server_chat_with_two_images(onevision):
    """`/v1/chat/completions` through the official client with two `image_url` parts answers as HF
    does for the rendered chat; `usage` and `/tokenize` count HF's widened prompt."""
    _, model, processor, llm = onevision
    check_server_chat_with_two_images(model, processor, llm, [_image(40, (40, 90)), _image(41, (90, 40))])


def test_config_errors_name_the_setting():
    base = {"architectures": ["LlavaOnevisionForConditionalGeneration"], "image_grid_pinpoints": [[384, 768]],
            "vision_config": {"image_size": 384, "patch_size": 14}}
    assert VisionConfig.from_hf(base).max_tiles == 9  # transformers' default "anyres_max_9"
    with pytest.raises(ValueError, match="vision_aspect_ratio 'anyres' is not supported"):
        VisionConfig.from_hf(base | {"vision_aspect_ratio": "anyres"})
    with pytest.raises(ValueError, match="LLaVA-OneVision's vision_feature_select_strategy 'default'"):
        VisionConfig.from_hf(base | {"vision_feature_select_strategy": "default"})
