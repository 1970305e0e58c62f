"""Image input on a LLaVA checkpoint: prompts with images, offline and through the chat template.

Oracle: HF transformers' `LlavaForConditionalGeneration` on random weights (CLIP vision tower,
projector, Llama language model) and its own `LlavaProcessor`: the prompt tokens it widens, its
image features, and its greedy tokens for the same prompt and image. Prompts are prefilled in
chunks that cut through an image's placeholders, and served from the prefix cache.
"""

import base64
import contextlib
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
from hf_models import randomize_weights, torch_single_thread  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402

VOCAB = 320
IMAGE_TOKEN = VOCAB - 1
PATCHES = 16  # (28 / 7) ** 2: one embedding per patch, the class token's dropped
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}assistant:"
            "{% endif %}")
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# the random LLaVA models' language model and CLIP tower (28-pixel images of 7-pixel patches)
LLAMA_TEXT = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
CLIP_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=2, image_size=28, patch_size=7)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, VOCAB - 1)} | {"<image>": IMAGE_TOKEN}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens={"image_token": "<image>"})


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    config = transformers.LlavaConfig(
        text_config=LLAMA_TEXT, vision_config=CLIP_VISION, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    with torch_single_thread():
        model = transformers.LlavaForConditionalGeneration(config).eval()
        randomize_weights(model, seed=5)
    model.save_pretrained(str(folder))
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=_tokenizer(), patch_size=7,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=TEMPLATE)
    processor.save_pretrained(str(folder))
    llm = LLM(str(folder), dtype="float32", num_blocks=64, block_size=4, max_num_batched_tokens=16,
              max_model_len=128)
    return folder, model, processor, llm


def _image(seed: int, size=(40, 50), mode="RGB"):
    channels = len(mode)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, channels), dtype=np.uint8), mode)


def _hf_greedy(model, processor, text: str, images) -> tuple[list[int], list[int]]:
    inputs = processor(text=text, images=images, return_tensors="pt")
    with torch.no_grad(), torch_single_thread():
        out = model.generate(**inputs, max_new_tokens=GREEDY.max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out[0, len(prompt):].tolist()


def _blocks_all_free(llm):
    stats = llm.engine.stats()
    return stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_image_prompts_match_hf_llava(llava):
    """Two images in one prompt (apart and side by side), prompts that differ only in their image,
    and a transparent image (composited onto white, as the processor does), chunked through the
    placeholders (16 tokens a step): the widened prompt and greedy tokens are HF's."""
    _, model, processor, llm = llava
    cases = [("t5 t6 <image> t7 t8", [_image(1)]), ("t5 t6 <image> t7 t8", [_image(2)]),
             ("t9 <image> t10 <image> t11", [_image(3), _image(4, (30, 30))]),
             ("t9 <image><image> t11", [_image(5), _image(6)]), ("t5 <image> t7", [_image(13, mode="RGBA")])]
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}
                            for text, images in cases], GREEDY, use_tqdm=False)
    for (text, images), out in zip(cases, outputs):
        prompt, expected = _hf_greedy(model, processor, text, images)
        assert out.prompt_token_ids == prompt
        assert prompt.count(IMAGE_TOKEN) == PATCHES * len(images)
        assert out.outputs[0].token_ids == expected, text
    assert outputs[0].outputs[0].token_ids != outputs[1].outputs[0].token_ids  # the image counts
    assert _blocks_all_free(llm)


def test_prefix_cache_matches_images_not_placeholders(llava):
    """The same image again reads its placeholders' blocks from the prefix cache; another image
    behind the same tokens computes them afresh (and answers as HF does)."""
    _, model, processor, llm = llava
    llm.engine.reset_prefix_cache()
    text = "t5 t6 t7 t8 t9 t10 t11 t12 <image> t13"
    first = llm.generate({"prompt": text, "multi_modal_data": {"image": _image(7)}}, GREEDY, use_tqdm=False)[0]
    again = llm.generate({"prompt": text, "multi_modal_data": {"image": _image(7)}}, GREEDY, use_tqdm=False)[0]
    other = llm.generate({"prompt": text, "multi_modal_data": {"image": _image(8)}}, GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens >= 8 + PATCHES  # the text and the image's blocks
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert other.num_cached_tokens == 8  # the two blocks of text before the image, no more
    assert other.outputs[0].token_ids == _hf_greedy(model, processor, text, [_image(8)])[1]
    assert _blocks_all_free(llm)


def test_chat_with_image_parts(llava):
    """`LLM.chat` takes OpenAI `image_url` parts (a base64 data URL) and `image_pil` parts; the
    template renders each as the image token, and the answer is HF's for the rendered text."""
    _, model, processor, llm = llava
    buffer = io.BytesIO()
    _image(9).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    for part in ({"type": "image_url", "image_url": {"url": url}}, {"type": "image_pil", "image_pil": _image(9)}):
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "t20 t21"}]}]
        out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": "t20 t21"}]}],
                                             add_generation_prompt=True)
        assert out.prompt == text
        assert out.outputs[0].token_ids == _hf_greedy(model, processor, text, [_image(9)])[1]


def test_numpy_images_read_as_their_pil_images(llava):
    """uint8 arrays (RGB, RGBA, gray), as vLLM takes them: the tokens HF gives for the same
    pixels as a PIL image."""
    _, model, processor, llm = llava
    images = [_image(70), _image(71, mode="RGBA"), _image(72).convert("L")]
    outputs = llm.generate([{"prompt": "t5 <image> t7", "multi_modal_data": {"image": np.asarray(image)}}
                            for image in images], GREEDY, use_tqdm=False)
    for image, out in zip(images, outputs):
        assert out.outputs[0].token_ids == _hf_greedy(model, processor, "t5 <image> t7", [image])[1]
    assert len({tuple(out.outputs[0].token_ids) for out in outputs}) > 1
    assert _blocks_all_free(llm)


def test_image_errors_name_the_problem(llava, tmp_path):
    _, _, _, llm = llava
    with pytest.raises(ValueError, match="stand for 2 images, and 1 was given"):
        llm.generate({"prompt": "t5 <image> t6 <image>", "multi_modal_data": {"image": _image(1)}}, GREEDY,
                     use_tqdm=False)
    with pytest.raises(ValueError, match="stand for 0 images"):
        llm.generate({"prompt": "t5 t6", "multi_modal_data": {"image": _image(1)}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="could not read the image"):
        llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": str(tmp_path / "missing.png")}}, GREEDY,
                     use_tqdm=False)
    with pytest.raises(ValueError, match="takes 'image' only"):
        llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"video": _image(1)}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="is 0x5 pixels"):
        llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": Image.new("RGB", (0, 5))}}, GREEDY,
                     use_tqdm=False)
    with pytest.raises(ValueError, match="not an image format PIL reads"):
        llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": "data:image/png;base64,AAAA"}}, GREEDY,
                     use_tqdm=False)
    with pytest.raises(ValueError, match="URL or path is empty"):
        llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": " "}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="only data:, http"):
        llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": "ftp://host/a.png"}}, GREEDY,
                     use_tqdm=False)
    with pytest.raises(ValueError, match=r"uint8 of shape \[H, W\], \[H, W, 3\] or \[H, W, 4\] with pixels, got float64"):
        llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": np.zeros((8, 8, 3))}}, GREEDY,
                     use_tqdm=False)
    with pytest.raises(ValueError, match="got uint8 of shape \\[2, 8, 8, 3\\]"):
        llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": np.zeros((2, 8, 8, 3), np.uint8)}},
                     GREEDY, use_tqdm=False)
    good = [{"role": "user", "content": [{"type": "image_pil", "image_pil": _image(1)}]}]
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(ValueError, match="conversation 1: could not read the image"):
        llm.chat([good, bad], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="needs its image under 'image_url'"):
        llm.chat([{"role": "user", "content": [{"type": "image_url"}]}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.generate({"prompt": "t5 <image>", "multi_modal_data": {"image": _image(1)}},
                     SamplingParams(max_tokens=2, truncate_prompt_tokens=4), use_tqdm=False)
    assert _blocks_all_free(llm)  # and the engine serves on
    assert llm.generate("t5 t6", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


@contextlib.contextmanager
def _image_host(png: bytes, release=None, arrivals=None):
    """An http server on 127.0.0.1 (its base URL yielded): `/ok` the PNG, `/big` it four times over,
    `/trickle` its first bytes at 4 a second, `/slow-headers` header lines at 4 a second,
    `/redirect` a redirect to 127.0.0.1's `/ok`, `/held` the PNG once the event `release` is set
    (each such request noted in the semaphore `arrivals` as it comes)."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/ok")
                self.end_headers()
                return
            if self.path == "/held":
                arrivals.release()
                release.wait(300)
            if self.path == "/slow-headers":  # each header line sent as it is written
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for i in range(12):
                    self.wfile.write(f"X-Slow-{i}: 1\r\n".encode())
                    self.wfile.flush()
                    time.sleep(0.25)
                self.wfile.write(b"\r\n" + png)
                return
            self.send_response(200)
            self.end_headers()
            if self.path == "/trickle":
                for byte in png[:12]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.25)
            else:
                self.wfile.write(png * (4 if self.path == "/big" else 1))

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a client that hung up mid-answer

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_sources_are_read_within_their_limits(monkeypatch, tmp_path):
    """An http URL's image is read; a download past the byte cap, or one that trickles past the
    time limit as a whole (each read within it), is refused; so is a data URL past the cap; URL
    schemes are read whatever their case, file:// URLs percent-decoded; with allowed media domains,
    other hosts are refused, redirects to them too."""
    import time

    from jpaged import images

    png = _png(_image(80))
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 2 * len(png))
    monkeypatch.setattr(images, "URL_TIMEOUT_S", 1.0)
    with _image_host(png) as base:
        port = base.rsplit(":", 1)[1]
        assert images.load_image(f"{base}/ok").size == _image(80).size
        assert images.load_image(f"HTTP://127.0.0.1:{port}/ok").size == _image(80).size
        with pytest.raises(ValueError, match=f"the image at the URL is over {2 * len(png)} bytes"):
            images.load_image(f"{base}/big")
        started = time.monotonic()
        with pytest.raises(ValueError, match="took over 1 s to download"):
            images.load_image(f"{base}/trickle")
        with pytest.raises(ValueError, match="took over 1 s to download"):
            images.load_image(f"{base}/slow-headers")
        assert time.monotonic() - started < 3.5
        local = images.MediaAccess(domains=frozenset({"localhost"}))
        assert images.load_image(f"http://localhost:{port}/ok", local).size == _image(80).size
        with pytest.raises(images.ImageRefused, match="is on '127.0.0.1', outside the allowed media domains localhost"):
            images.load_image(f"{base}/ok", local)
        with pytest.raises(images.ImageRefused, match="outside the allowed media domains"):
            images.load_image(f"http://localhost:{port}/redirect", local)
    encoded = base64.b64encode(png).decode()
    assert images.load_image("DATA:image/png;BASE64," + encoded).size == _image(80).size
    spaced = tmp_path / "a b#%.png"
    spaced.write_bytes(png)
    for url in (spaced.as_uri(), spaced.as_uri().replace("file://", "FILE://localhost")):
        assert images.load_image(url).size == _image(80).size
    with pytest.raises(ValueError, match="names the host 'elsewhere'"):
        images.load_image("file://elsewhere/a.png")
    with pytest.raises(ValueError, match=f"the data URL's image is over {2 * len(png)} bytes"):
        images.load_image("data:image/png;base64," + base64.b64encode(png * 3).decode())


def test_slow_image_hosts_hold_up_no_other_request(llava, monkeypatch):
    """Chats whose image hosts have not answered (more than Python's default thread pool holds on
    two cores) wait on their own threads: a completion and a text chat are answered meanwhile, and
    the image chats answer once their host does; every block is free after."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from server_thread import serving

    from jpaged import images
    from jpaged.server.launch import create_app

    _, _, _, llm = llava
    monkeypatch.setattr(images, "URL_TIMEOUT_S", 300.0)  # the held chats wait for the release alone
    release, arrivals = threading.Event(), threading.Semaphore(0)
    with _image_host(_png(_image(16)), release, arrivals) as host, \
            serving(create_app(llm.engine, served_model_name="llava")) as base, ThreadPoolExecutor(8) as pool:
        def chat(content):
            return httpx.post(f"{base}/v1/chat/completions", timeout=600, json={
                "model": "llava", "max_tokens": 2, "messages": [{"role": "user", "content": content}]})

        held = [pool.submit(chat, [{"type": "image_url", "image_url": {"url": f"{host}/held"}},
                                   {"type": "text", "text": "t5"}]) for _ in range(8)]
        try:
            assert all(arrivals.acquire(timeout=120) for _ in held)  # every image chat is fetching at once
            completion = httpx.post(f"{base}/v1/completions", timeout=600,
                                    json={"model": "llava", "prompt": "t5 t6", "max_tokens": 2})
            assert completion.status_code == 200 and chat("t5 t6").status_code == 200
            assert not any(future.done() for future in held)
        finally:
            release.set()
        assert [future.result().status_code for future in held] == [200] * 8
    assert _blocks_all_free(llm)


def test_text_models_refuse_images(tmp_path):
    from hf_models import save_word_level_tokenizer

    with torch_single_thread():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64))
    model.save_pretrained(str(tmp_path))
    save_word_level_tokenizer(tmp_path, VOCAB)
    llm = LLM(str(tmp_path), dtype="float32", num_blocks=16, max_model_len=64)
    with pytest.raises(ValueError, match="reads no images"):
        llm.generate({"prompt": "t5", "multi_modal_data": {"image": _image(1)}}, GREEDY, use_tqdm=False)


def test_server_chat_with_image_url_parts(llava):
    """`/v1/chat/completions` through the official client: an `image_url` part (a base64 data URL)
    answers as HF does for the rendered chat and image, streamed or not; the usage counts the
    widened placeholders; an unreadable image and truncation through one are 400s."""
    openai = pytest.importorskip("openai")
    from server_thread import serving

    from jpaged.server.launch import create_app

    folder, model, processor, llm = llava
    buffer = io.BytesIO()
    _image(11).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "t30"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "t30"},
                                                                       {"type": "image"}]}], add_generation_prompt=True)
    prompt, expected = _hf_greedy(model, processor, text, [_image(11)])
    with serving(create_app(llm.engine, served_model_name="llava")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="llava", messages=messages, max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
        assert reply.choices[0].token_ids == expected
        assert reply.usage.prompt_tokens == len(prompt)
        streamed = client.chat.completions.create(model="llava", messages=messages, max_tokens=8, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) \
            == reply.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="could not read the image"):
            client.chat.completions.create(model="llava", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
        with pytest.raises(openai.BadRequestError, match="would cut a prompt with images"):
            client.chat.completions.create(model="llava", messages=messages, max_tokens=2,
                                           extra_body={"truncate_prompt_tokens": 4})
        # the Responses API's input_image parts: the same prompt, so the chat's answer
        parts = [{"type": "input_text", "text": "t30"}, {"type": "input_image", "image_url": url, "detail": "auto"}]
        response = client.responses.create(model="llava", input=[{"role": "user", "content": parts}],
                                           max_output_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        assert response.output_text == reply.choices[0].message.content
        assert response.usage.input_tokens == len(prompt)
        with pytest.raises(openai.BadRequestError, match="file_id") as refused:
            client.responses.create(model="llava", input=[{"role": "user", "content": [
                {"type": "input_image", "file_id": "file-1"}]}])
        assert refused.value.body["param"] == "input"
    assert _blocks_all_free(llm)


def test_cli_generate_with_image(llava, tmp_path, capsys):
    """`jpaged generate --image PATH` answers as `LLM.chat` does with that image before the text,
    and with --no-chat as `LLM.generate` with the prompt's own image token; a model that reads no
    image refuses it (exit 2, the reason on stderr)."""
    from jpaged.cli import main

    folder, _, _, llm = llava
    path = tmp_path / "picture.png"
    _image(12).save(path)
    args = ["generate", "--model", str(folder), "--dtype", "float32", "--num-blocks", "64", "--block-size", "4",
            "--max-model-len", "128", "--max-tokens", "6", "--image", str(path)]
    chat = llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": _image(12)},
                                                  {"type": "text", "text": "t40 t41"}]}],
                    SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text
    raw = llm.generate({"prompt": "t40 <image> t41", "multi_modal_data": {"image": _image(12)}},
                       SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text
    assert main([*args, "t40 t41"]) == 0
    assert capsys.readouterr().out.strip() == chat.strip()
    assert main([*args, "--no-chat", "t40 <image> t41"]) == 0
    assert capsys.readouterr().out.strip() == ("t40 <image> t41" + raw).strip()
    assert main([*args, "--no-chat", "t40 t41"]) == 2
    assert "stand for 0 images" in capsys.readouterr().err


LLAVA_15_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf's: each turn's images first, then its text parts
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_templates_of_content_parts_get_every_turn_as_parts(llava):
    """A template that loops over content parts (llava-1.5's) gets text-only turns as parts too,
    as HF's processor renders them: a multi-turn chat with an image in its first turn renders
    and answers as HF's; and one that takes text gets the image token in the text."""
    _, model, processor, llm = llava
    turns = [[{"type": "image_pil", "image_pil": _image(14)}, {"type": "text", "text": "t20"}], "t30 t31",
             [{"type": "text", "text": "t22"}, {"type": "text", "text": "t23"}]]
    messages = [{"role": role, "content": content} for role, content in zip(("user", "assistant", "user"), turns)]
    hf_messages = [{"role": m["role"], "content": [{"type": "image"} if part["type"] == "image_pil" else part
                                                   for part in m["content"]] if isinstance(m["content"], list)
                    else [{"type": "text", "text": m["content"]}]} for m in messages]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, chat_template=LLAVA_15_TEMPLATE)
    assert "t30 t31" in text and "t22 t23" in text
    out = llm.chat(messages, GREEDY, use_tqdm=False, chat_template=LLAVA_15_TEMPLATE)[0]
    assert out.prompt == text
    assert out.outputs[0].token_ids == _hf_greedy(model, processor, text, [_image(14)])[1]
    as_text = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"  # takes text: vLLM writes the token
    out = llm.chat(messages[:1], GREEDY, use_tqdm=False, chat_template=as_text)[0]
    assert out.prompt == "user: <image>\nt20 "
    assert out.outputs[0].token_ids == _hf_greedy(model, processor, out.prompt, [_image(14)])[1]


def test_templates_that_take_text_get_the_images_first_unless_interleaved(llava):
    """vLLM's placement for templates that take text: the images a message's text does not name
    go first, one per line; `interleave_mm_strings` writes each where its part is; a token the
    text already holds stands for an image; more such tokens than images are refused."""
    from jpaged.images import chat_images

    _, model, processor, llm = llava
    as_text = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    parts = [{"type": "text", "text": "t20"}, {"type": "image_pil", "image_pil": _image(14)},
             {"type": "text", "text": "t21"}]
    out = llm.chat([{"role": "user", "content": parts}], GREEDY, use_tqdm=False, chat_template=as_text)[0]
    assert out.prompt == "user: <image>\nt20\nt21 "
    assert out.outputs[0].token_ids == _hf_greedy(model, processor, out.prompt, [_image(14)])[1]

    def written(content, interleave):
        return chat_images([{"role": "user", "content": content}], "<image>", interleave=interleave)[0][0]["content"]

    assert written(parts, interleave=True) == "t20\n<image>\nt21"
    named = [{"type": "text", "text": "t20 <image> t21"}, parts[1]]
    assert written(named, interleave=False) == "t20 <image> t21"
    with pytest.raises(ValueError, match="holds 2 '<image>' placeholders, more than its 1 image part"):
        written([{"type": "text", "text": "<image><image>"}, parts[1]], interleave=False)
    from jpaged.cli import _parser, engine_kwargs
    assert engine_kwargs(_parser().parse_args(["serve", "m", "--interleave-mm-strings"]))["interleave_mm_strings"]


def test_chat_template_content_format_overrides_what_auto_reads(llava):
    """vLLM's `chat_template_content_format`: a template that reads a message's parts through a
    variable (which "auto" takes for one reading text) renders the image under "openai", in
    `LLM.chat` and through the server, as HF's processor renders that chat; under "auto" the
    template gets text, renders no image token, and the image is refused as unplaced; an unknown
    format is refused, naming it."""
    openai = pytest.importorskip("openai")
    from server_thread import serving

    from jpaged.server.launch import create_app

    _, model, processor, llm = llava
    template = ("{% for m in messages %}{% set parts = m['content'] %}{{ m['role'] }}:{% for p in parts %}"
                "{% if p['type'] == 'image' %} <image>{% else %} {{ p['text'] }}{% endif %}{% endfor %}"
                "{% endfor %} assistant:")
    image = _image(60)
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                             {"type": "text", "text": "t30"}]}]
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                          "text": "t30"}]}],
                                         chat_template=template)
    prompt, expected = _hf_greedy(model, processor, text, [image])
    out = llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template, chat_template_content_format="openai")[0]
    assert out.prompt == text and out.prompt_token_ids == prompt and out.outputs[0].token_ids == expected
    with pytest.raises(ValueError, match="stand for 0 images, and 1 was given"):
        llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template)
    with pytest.raises(ValueError, match="chat_template_content_format 'json' is not one of auto, string, openai"):
        llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template, chat_template_content_format="json")
    with pytest.raises(ValueError, match="chat_template_content_format 'json'"):
        create_app(llm.engine, chat_template_content_format="json")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    served = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                           {"type": "text", "text": "t30"}]}]
    with serving(create_app(llm.engine, served_model_name="llava", chat_template=template,
                            chat_template_content_format="openai")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="llava", messages=served, max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
        assert reply.choices[0].token_ids == expected and reply.usage.prompt_tokens == len(prompt)
    assert _blocks_all_free(llm)


def test_server_reads_local_images_only_from_the_allowed_folder(llava, tmp_path):
    """`image_url` parts naming a path or file:// URL are refused (400) unless the server was
    started with that folder as `allowed_local_media_path`, and then only inside it; with
    `allowed_media_domains`, http(s) URLs only on those hosts."""
    openai = pytest.importorskip("openai")
    from server_thread import serving

    from jpaged.server.launch import create_app

    _, _, _, llm = llava
    allowed = tmp_path / "media"
    allowed.mkdir()
    _image(15).save(allowed / "a.png")
    _image(15).save(tmp_path / "outside.png")

    def ask(client, url):
        return client.chat.completions.create(model="llava", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "t5"}]}])

    with serving(create_app(llm.engine, served_model_name="llava")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="--allowed-local-media-path"):
            ask(client, str(allowed / "a.png"))
    with serving(create_app(llm.engine, served_model_name="llava", allowed_local_media_path=str(allowed))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        assert ask(client, f"file://{allowed / 'a.png'}").choices[0].message.content is not None
        with pytest.raises(openai.BadRequestError, match="outside the allowed local media path"):
            ask(client, str(tmp_path / "outside.png"))
    with pytest.raises(ValueError, match="is not a folder"):
        create_app(llm.engine, allowed_local_media_path=str(tmp_path / "outside.png"))
    for entry in ("localhost:8000", "http://localhost", ""):
        with pytest.raises(ValueError, match=f"allowed_media_domains entry '{entry}' is not a host"):
            create_app(llm.engine, allowed_media_domains=[entry])
    with _image_host(_png(_image(15))) as host, serving(create_app(
            llm.engine, served_model_name="llava", allowed_media_domains=["LocalHost"])) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        assert ask(client, host.replace("127.0.0.1", "localhost") + "/ok").choices[0].message.content is not None
        with pytest.raises(openai.BadRequestError, match="outside the allowed media domains localhost"):
            ask(client, f"{host}/ok")
    assert _blocks_all_free(llm)


def test_siglip_tower_with_qwen2_matches_hf(tmp_path):
    """A LLaVA of a SigLIP tower (no class token, a patch-embedding bias, no pre-norm) and a
    Qwen2 language model, all of every layer's features (llava-interleave-qwen's "full" selection
    of the last layer): the widened prompt, the image features and greedy tokens are HF's."""
    from safetensors.numpy import load_file

    from jpaged.config import VisionConfig
    from jpaged.images import ImageProcessor
    from jpaged.loader.multimodal import language_model_weights
    from jpaged.models.vision import ImageEncoder

    config = transformers.LlavaConfig(
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, vision_feature_select_strategy="full")
    with torch_single_thread():
        model = transformers.LlavaForConditionalGeneration(config).eval()
        randomize_weights(model, seed=9)
    model.save_pretrained(str(tmp_path))
    image_processor = transformers.SiglipImageProcessor(size={"height": 28, "width": 28})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=_tokenizer(), patch_size=7,
                                            vision_feature_select_strategy="full", num_additional_image_tokens=0)
    processor.save_pretrained(str(tmp_path))
    vision_weights: dict = {}
    list(language_model_weights(load_file(tmp_path / "model.safetensors").items(), vision_weights))
    encoder = ImageEncoder(VisionConfig.from_hf(config.to_dict()), vision_weights)
    inputs = processor(text="<image>", images=[_image(16)], return_tensors="pt")
    with torch.no_grad(), torch_single_thread():
        expected = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0].numpy()
    tiles = ImageProcessor(tmp_path).pixel_values([_image(16)])[0]
    np.testing.assert_allclose(encoder.encode(tiles, 40, 50), expected.reshape(PATCHES, -1), rtol=1e-4, atol=1e-5)
    llm = LLM(str(tmp_path), dtype="float32", num_blocks=32, block_size=4, max_num_batched_tokens=16, max_model_len=96)
    cases = [("t5 <image> t7", [_image(16)]), ("t9 <image> t10 <image>", [_image(17), _image(18, (30, 30))])]
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}} for text, images in cases],
                           GREEDY, use_tqdm=False)
    for (text, images), out in zip(cases, outputs):
        prompt, tokens = _hf_greedy(model, processor, text, images)
        assert out.prompt_token_ids == prompt and prompt.count(IMAGE_TOKEN) == PATCHES * len(images)
        assert out.outputs[0].token_ids == tokens, text
    assert _blocks_all_free(llm)
