"""Image input on Pixtral towers: Mistral 3 (Mistral Small 3.1 / 3.2) and Pixtral-12B as LLaVA.

Oracle: HF transformers' `Mistral3ForConditionalGeneration` and `LlavaForConditionalGeneration`
with a `PixtralVisionModel` tower, on random weights, and their own Pixtral image processor: how
many placeholders each image becomes (rows of image tokens, each ended by `[IMG_BREAK]`, the last
by `[IMG_END]`), the projected image features (Mistral 3's patch merger included), and greedy
tokens for prompts holding images of several shapes, prefilled in chunks that cut through the
images, offline and through the server.
"""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
from hf_models import randomize_weights, torch_single_thread  # noqa: E402
from test_images import GREEDY, _blocks_all_free, _hf_greedy  # noqa: E402
from test_llava_next import check_greedy_matches_hf  # noqa: E402
from test_qwen_vl import check_template_chat_with_two_images  # noqa: E402

from jpaged import LLM  # noqa: E402
from jpaged.config import PixtralVisionConfig, vision_config_of  # noqa: E402
from jpaged.images import placeholder_offsets  # noqa: E402

VOCAB = 320
SPECIAL = {"[IMG]": 10, "[IMG_BREAK]": 12, "[IMG_END]": 13}
TEXT = dict(model_type="mistral", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=1,
            eos_token_id=2, pad_token_id=0, sliding_window=None)
VISION = dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              patch_size=4, image_size=48, hidden_act="silu")
CONFIGS = {
    # 4-pixel patches merged 2 x 2: an embedding per 8 x 8 pixels, images scaled to fit 48 pixels
    "mistral3": lambda: transformers.Mistral3Config(text_config=TEXT, vision_config=VISION, image_token_index=10,
                                                    spatial_merge_size=2, tie_word_embeddings=False),
    # Pixtral-12B's shape: no merger, the tower's last states through LLaVA's projector (with biases)
    "llava_pixtral": lambda: transformers.LlavaConfig(text_config=TEXT, vision_config=VISION, image_token_index=10,
                                                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                                                      tie_word_embeddings=False),
}
MERGE = {"mistral3": 2, "llava_pixtral": 1}
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for part in m['content'] %}{% if part['type'] == 'image' %}[IMG]{% else %}{{ part['text'] }}"
            "{% endif %} {% endfor %}{% endif %}{% endfor %}assistant:")
# (height, width): wide, tall, square, thin, odd, within two merged patches (HF's model squeezes a
# one-embedding image to no embedding), and past the longest edge
SHAPES = [(20, 45), (45, 20), (30, 30), (6, 47), (17, 29), (7, 9), (100, 130)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, VOCAB) if i not in SPECIAL.values()}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab | SPECIAL, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=list(SPECIAL), chat_template=TEMPLATE)


class _Processor:
    """Pixtral's processor for images (`PixtralProcessor` needs torchvision): HF's image processor
    resizes to whole merged patches, and each `[IMG]` becomes its rows of `[IMG]`, each row ended
    by `[IMG_BREAK]` and the last by `[IMG_END]`, as the processor's `replace_image_token` writes."""

    def __init__(self, merge: int):
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        self.side = VISION["patch_size"] * merge
        self.image_processor = PixtralImageProcessorPil(patch_size={"height": VISION["patch_size"],
                                                                    "width": VISION["patch_size"]},
                                                        size={"longest_edge": VISION["image_size"]})
        self.tokenizer = _tokenizer()

    def __call__(self, text: str, images=None, return_tensors="pt") -> dict:
        inputs = {}
        if images:
            inputs = dict(self.image_processor(images, return_tensors="pt", patch_size=self.side))
            pieces = text.split("[IMG]")
            text = pieces[0] + "".join(self._span(*size) + piece for size, piece in
                                       zip(inputs["image_sizes"].tolist(), pieces[1:]))
        ids = torch.tensor([self.tokenizer.encode(text)])
        return inputs | {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _span(self, height: int, width: int) -> str:
        tokens = (["[IMG]"] * (width // self.side) + ["[IMG_BREAK]"]) * (height // self.side)
        tokens[-1] = "[IMG_END]"
        return " " + " ".join(tokens) + " "

    def save_pretrained(self, folder: str) -> None:
        """As Mistral Small 3.1 ships: the chat template in the processor's `chat_template.json`,
        the tokenizer's config without one."""
        self.image_processor.save_pretrained(folder)
        template, self.tokenizer.chat_template = self.tokenizer.chat_template, None
        self.tokenizer.save_pretrained(folder)
        self.tokenizer.chat_template = template
        (Path(folder) / "chat_template.json").write_text(json.dumps({"chat_template": template}))


@pytest.fixture(scope="module", params=list(CONFIGS))
def pixtral(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    with torch_single_thread():
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(CONFIGS[request.param](), dtype=torch.float32,
                                                                     attn_implementation="eager")
        randomize_weights(model, seed=21 + list(CONFIGS).index(request.param))
        model.eval()
    model.save_pretrained(str(folder))
    processor = _Processor(MERGE[request.param])
    processor.save_pretrained(str(folder))
    llm = LLM(str(folder), dtype="float32", num_blocks=200, block_size=4, max_num_batched_tokens=16, max_model_len=400)
    return folder, model, processor, llm


def _image(seed: int, shape=(20, 45)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8))


def test_placeholders_match_the_processor(pixtral):
    """Each image's placeholders (rows of image tokens and their break / end tokens) are those
    the processor writes for it, over random sizes and past the longest edge."""
    _, _, processor, llm = pixtral
    vision = llm.engine.vision_config
    assert isinstance(vision, PixtralVisionConfig) and vision.longest_edge == VISION["image_size"]
    rng = np.random.default_rng(0)
    for height, width in [tuple(int(x) for x in rng.integers(1, 300, 2)) for _ in range(60)] + SHAPES:
        if min(height, width) * VISION["image_size"] < max(height, width):
            continue  # the processor scales such images to no pixel across
        ids = processor("[IMG]", [Image.new("RGB", (width, height))])["input_ids"][0].tolist()
        assert vision.placeholder_ids(height, width) == ids, (height, width)
        assert vision.image_tokens(height, width) == len(ids)
    with pytest.raises(ValueError, match=r"a 1x300 \(height x width\) image is too thin"):
        vision.image_tokens(1, 300)


def test_prompts_mixing_widened_images_image_tokens_and_break_tokens(pixtral):
    """One image's placeholders written whole beside another's one image token, and a break token
    standing alone as text: each image widened once, the stray token kept, as the processor
    (which widens image tokens only) gives them; greedy tokens are HF's; a placeholder count
    that does not fit is refused, counting both kinds."""
    _, model, processor, llm = pixtral
    first, second = _image(90, (20, 45)), _image(91, (17, 29))
    widened = processor("[IMG]", [first])["input_ids"][0].tolist()
    text = " ".join(["t5 [IMG_BREAK]", *processor.tokenizer.convert_ids_to_tokens(widened), "[IMG] t7"])
    expected_prompt, expected = _hf_greedy(model, processor, "t5 [IMG_BREAK] [IMG] [IMG] t7", [first, second])
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": [first, second]}}, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == expected_prompt and out.outputs[0].token_ids == expected
    with pytest.raises(ValueError, match=r"stand for 2 images, and 1 was given \(1 image token standing for one "
                                         r"image each, 1 image's placeholders written whole\)"):
        llm.generate({"prompt": text, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)
    assert _blocks_all_free(llm)


def test_image_features_match_hf(pixtral):
    """The projected embeddings of images of every shape equal HF's `get_image_features`."""
    _, model, processor, llm = pixtral
    for seed, shape in enumerate(SHAPES):
        image = _image(seed, shape)
        inputs = processor("[IMG]", [image])
        with torch.no_grad(), torch_single_thread():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                      image_sizes=inputs["image_sizes"]).pooler_output
        expected = torch.cat(list(features)).reshape(-1, TEXT["hidden_size"]).numpy()
        pixels = llm.engine.image_processor.pixel_values([image])[0]
        np.testing.assert_allclose(llm.engine.image_encoder.encode(pixels, *shape), expected, rtol=1e-4, atol=1e-5)


def test_greedy_tokens_match_hf_for_images_of_every_shape(pixtral):
    """Prompts with images of different shapes in one batch, and two images in one prompt (apart
    and side by side), prefilled 16 tokens a step through the images: the widened prompts and
    greedy tokens are HF's, and every block is free after."""
    _, model, processor, llm = pixtral
    cases = [("t5 t6 [IMG] t7 t8", [_image(i, shape)]) for i, shape in enumerate(SHAPES)]
    cases += [("t9 [IMG] t10 [IMG] t11", [_image(20, (20, 45)), _image(21, (45, 20))]),
              ("t9 [IMG] [IMG] t11", [_image(22, (30, 30)), _image(23, (6, 47))])]
    outputs = check_greedy_matches_hf(model, processor, llm, cases)
    assert len({len(out.prompt_token_ids) for out in outputs}) > 3
    assert outputs[0].outputs[0].token_ids != outputs[2].outputs[0].token_ids


def test_widened_prompts_and_the_prefix_cache(pixtral):
    """A prompt that already holds an image's placeholders is taken as that image; the same image
    behind the same tokens comes from the prefix cache (with HF's tokens), and another image of
    the same size does not."""
    _, model, processor, llm = pixtral
    image, other = _image(40, (30, 30)), _image(41, (30, 30))
    widened = processor("t5 t6 [IMG] t7", [image])["input_ids"][0].tolist()
    vision = llm.engine.vision_config
    assert placeholder_offsets(widened, vision.image_token_id, [vision.placeholder_ids(30, 30)]) == (widened, [2])
    llm.engine.reset_prefix_cache()
    first = llm.generate({"prompt_token_ids": widened, "multi_modal_data": {"image": image}}, GREEDY,
                         use_tqdm=False)[0]
    again, changed = (llm.generate({"prompt": "t5 t6 [IMG] t7", "multi_modal_data": {"image": img}}, GREEDY,
                                   use_tqdm=False)[0] for img in (image, other))
    assert first.prompt_token_ids == again.prompt_token_ids == widened
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == _hf_greedy(
        model, processor, "t5 t6 [IMG] t7", [image])[1]
    assert changed.outputs[0].token_ids == _hf_greedy(model, processor, "t5 t6 [IMG] t7", [other])[1]
    block = llm.engine.block_manager.block_size
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == (len(widened) - 1) // block * block
    assert changed.num_cached_tokens == 0  # the first block holds the image's first placeholders
    assert _blocks_all_free(llm)


def test_server_chat_with_two_images(pixtral):
    """The chat renders through the processor's `chat_template.json` (the tokenizer has none)."""
    _, model, processor, llm = pixtral
    check_template_chat_with_two_images(model, processor, llm, [_image(30, (20, 45)), _image(31, (45, 20))])


def test_config_errors_name_the_setting():
    base = {"architectures": ["Mistral3ForConditionalGeneration"], "vision_config": {"model_type": "pixtral"}}
    assert vision_config_of(base).spatial_merge_size == 2
    with pytest.raises(ValueError, match="vision_config.hidden_act 'relu'"):
        vision_config_of(base | {"vision_config": {"model_type": "pixtral", "hidden_act": "relu"}})
    with pytest.raises(ValueError, match="not a multiple of 4 x its 16 heads"):
        vision_config_of(base | {"vision_config": {"model_type": "pixtral", "hidden_size": 1032}})
    llava = {"architectures": ["LlavaForConditionalGeneration"], "vision_config": {"model_type": "pixtral"}}
    assert vision_config_of(llava | {"vision_feature_select_strategy": "full"}).spatial_merge_size == 1
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'default' is not supported"):
        vision_config_of(llava)


def test_chat_template_json_is_the_template_of_last_resort(pixtral, tmp_path):
    """The processor's `chat_template.json` gives a tokenizer without a template its template; a
    tokenizer's own template wins over it; a file without one is refused, naming it."""
    from jpaged.loader.hf import tokenizer_loader

    folder, _, processor, llm = pixtral
    assert llm.get_tokenizer().chat_template == processor.tokenizer.chat_template
    processor.tokenizer.save_pretrained(tmp_path)  # its own template, beside another in chat_template.json
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert tokenizer_loader(tmp_path)().chat_template == processor.tokenizer.chat_template
    plain = processor.tokenizer.__class__(tokenizer_object=processor.tokenizer.backend_tokenizer)
    plain.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.json").write_text(json.dumps({"template": "x"}))
    with pytest.raises(ValueError, match="chat_template.json holds no chat_template string"):
        tokenizer_loader(tmp_path / "plain")()
