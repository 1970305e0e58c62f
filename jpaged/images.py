"""A prompt's images, from what the user gives to where their embeddings go.

Images arrive as vLLM takes them: `{"prompt": ..., "multi_modal_data": {"image": image or
[images]}}` offline (PIL images, or strings: a `data:` URL, an `http(s)://` URL, a `file://` URL
or a local path), and as OpenAI `image_url` chat parts. `ImageProcessor` turns them into the
model's pixel arrays with the checkpoint's own image processor (transformers'), and
`placeholder_offsets` finds where each image's embeddings go in the prompt: a run of image
tokens per image (as many as its embeddings: `VisionConfig.image_tokens`,
`QwenVisionConfig.image_tokens`; Pixtral's rows of them, each ended by a break token,
`PixtralVisionConfig.placeholder_ids`), written by the user or the chat template as one image
token and widened here, as the models' processors widen it. The engine encodes the pixels
(`models/vision.py`, `models/qwen_vision.py`, `models/pixtral_vision.py`) and keeps an
`InputEmbeds` per run of image tokens (`embedding_runs`: one per image, Pixtral's one per row) on the request
(`jpaged/prompt_inputs.py`); the model runner puts the embeddings in place of the placeholders'
token embeddings in the steps that compute them, and the block manager keys cached blocks by the
images they hold (`InputEmbeds.hash`, of the pixels).
Host side: no jax.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np

from jpaged.chat_template import template_reads_parts
from jpaged.config import PixtralVisionConfig, QwenVisionConfig, VisionConfig

IMAGE_PART_TYPES = ("image_url", "image_pil", "image")  # chat content parts holding an image (vLLM's)
# how a chat template takes message contents (vLLM's `chat_template_content_format`): "string" text,
# "openai" lists of parts, "auto" as the template reads them (`template_reads_parts`)
CONTENT_FORMATS = ("auto", "string", "openai")
URL_TIMEOUT_S = 10.0
MAX_IMAGE_BYTES = 64 * 2**20


class ImageRefused(ValueError):
    """An image source the caller may not read (a local path or a host a server does not allow)."""


@dataclass(frozen=True)
class MediaAccess:
    """Which image sources a caller may read: local paths and `file://` URLs (`local_root`: True
    any, a folder those inside it, None none) and http(s) URLs (`domains`: None any host, else
    those hostnames only, redirects included; vLLM's `--allowed-media-domains`). Offline callers
    may read anything; a server reads what its flags allow."""

    local_root: Path | bool | None = True
    domains: frozenset[str] | None = None


def load_image(source, access: MediaAccess = MediaAccess()):
    """A PIL image from a PIL image, a uint8 numpy array (`[H, W]` gray, `[H, W, 3]` RGB or `[H, W,
    4]` RGBA), a `data:` URL, an `http(s)://` or `file://` URL, or a path (in its own mode: the
    image processor converts it to RGB, transparency onto white, as the model's processor does).
    `access`: the sources that may be read (`MediaAccess`). ValueError naming what could not be
    read, `ImageRefused` for what is not allowed; at most `MAX_IMAGE_BYTES` are read."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        return _array_image(source)
    if not isinstance(source, (Image.Image, str)):
        raise ValueError(f"an image must be a PIL image, a uint8 numpy array or a URL or path string, got "
                         f"{type(source).__name__}")
    shown = source if not isinstance(source, str) or len(source) <= 80 else source[:77] + "..."
    try:
        image = source if isinstance(source, Image.Image) else Image.open(io.BytesIO(_image_bytes(source, access)))
        image.load()
    except UnidentifiedImageError as err:
        raise ValueError(f"could not read the image {shown!r}: not an image format PIL reads") from err
    except ImageRefused:
        raise
    except Exception as err:
        raise ValueError(f"could not read the image {shown!r}: {type(err).__name__}: {err}") from err
    if not image.width or not image.height:
        raise ValueError(f"the image {shown!r} is {image.width}x{image.height} pixels: it has no pixels to read")
    return image


def _download(url: str, domains: frozenset[str] | None) -> bytes:
    """The bytes at an http(s) URL: ValueError past `MAX_IMAGE_BYTES`, or where the whole request
    takes longer than `URL_TIMEOUT_S`, headers and redirects included (a server may send a byte at
    a time); `ImageRefused` where the URL, or one it redirects to, is on a host outside `domains`
    (None: any), before it is asked."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_fetch(url, domains))
    with ThreadPoolExecutor(1) as pool:  # called from inside an event loop (a notebook): a loop of its own
        return pool.submit(asyncio.run, _fetch(url, domains)).result()


async def _fetch(url: str, domains: frozenset[str] | None) -> bytes:
    import httpx

    async def check(request):
        _check_host(str(request.url), domains)

    try:
        async with asyncio.timeout(URL_TIMEOUT_S), httpx.AsyncClient(
                timeout=URL_TIMEOUT_S, follow_redirects=True, event_hooks={"request": [check]}) as client, \
                client.stream("GET", url) as response:
            response.raise_for_status()
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_IMAGE_BYTES:
                    raise ValueError(f"the image at the URL is over {MAX_IMAGE_BYTES} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except TimeoutError as err:
        raise ValueError(f"the image at the URL took over {URL_TIMEOUT_S:g} s to download") from err


def _check_host(url: str, domains: frozenset[str] | None) -> None:
    host = (urlsplit(url).hostname or "").lower()
    if domains is not None and host not in domains:
        raise ImageRefused(f"image URL {url[:80]!r} is on {host!r}, outside the allowed media domains "
                           f"{', '.join(sorted(domains))}")


def _array_image(array: np.ndarray):
    from PIL import Image

    channels = {2: 1, 3: array.shape[-1]}.get(array.ndim)
    if array.dtype != np.uint8 or channels not in (1, 3, 4) or not array.size:
        raise ValueError(f"an image array must be uint8 of shape [H, W], [H, W, 3] or [H, W, 4] with pixels, got "
                         f"{array.dtype} of shape {list(array.shape)}")
    return Image.fromarray(array[..., 0] if array.ndim == 3 and channels == 1 else array)


def _image_bytes(source: str, access: MediaAccess) -> bytes:
    scheme = source.split(":", 1)[0].lower() if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", source) else ""
    if scheme == "data":
        header, _, payload = source.partition(",")
        if not header.lower().endswith(";base64"):
            raise ValueError("only base64 data URLs hold images")
        if len(payload) // 4 * 3 > MAX_IMAGE_BYTES:
            raise ValueError(f"the data URL's image is over {MAX_IMAGE_BYTES} bytes")
        return base64.b64decode(payload, validate=True)
    if scheme in ("http", "https"):
        return _download(source, access.domains)
    if scheme == "file":  # file:///a%20b.png, file://localhost/... (RFC 8089), the path percent-decoded
        parts = urlsplit(source)
        if parts.netloc.lower() not in ("", "localhost"):
            raise ValueError(f"image URL {source[:80]!r} names the host {parts.netloc!r}: file:// URLs read this "
                             "machine's files only")
        source = url2pathname(parts.path)
    if not source.strip():
        raise ValueError("the image's URL or path is empty")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
        raise ValueError(f"image URL {source[:80]!r}: only data:, http(s):// and file:// URLs (or paths) are read")
    path = Path(source).expanduser()
    if access.local_root is None or access.local_root is False:
        raise ImageRefused(f"image {source[:80]!r} is a local path or file:// URL, which this server does not read "
                           "(start it with --allowed-local-media-path FOLDER to serve that folder's images)")
    if access.local_root is not True and not path.resolve().is_relative_to(Path(access.local_root).resolve()):
        raise ImageRefused(f"image {source[:80]!r} is outside the allowed local media path {access.local_root}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"{path} is over {MAX_IMAGE_BYTES} bytes")
    return path.read_bytes()


def as_image_list(multi_modal_data) -> list:
    """The images of a prompt's `multi_modal_data` (`{"image": image or [images]}`; `{}`, None or
    an empty list: none, as vLLM reads them), loaded. ValueError for other keys."""
    if multi_modal_data is None:
        return []
    if not isinstance(multi_modal_data, dict):
        raise ValueError(f"multi_modal_data must be a dict such as {{'image': image}}, got "
                         f"{type(multi_modal_data).__name__}")
    if unknown := sorted(set(multi_modal_data) - {"image"}, key=str):
        raise ValueError(f"multi_modal_data takes 'image' only, got {unknown}")
    images = multi_modal_data.get("image")
    if images is None:
        return []
    images = images if isinstance(images, (list, tuple)) else [images]
    return [load_image(image) for image in images]


def chat_images(conversation: list[dict], image_token: str | None = None, as_parts: bool = False,
                access: MediaAccess = MediaAccess(), interleave: bool = False) -> tuple[list[dict], list]:
    """The conversation as the chat template takes it, and its images in order, loaded
    (`load_image`, with `access`). Contents are text or lists of text and image parts. With
    `as_parts` (a template that loops over each message's content parts, as LLaVA's do;
    `template_reads_parts`), every content is a list of parts, a string becoming one text part
    and each image part `{"type": "image"}`; otherwise lists become text (`_as_text`).
    ValueError for an image part without its image, and as `_as_text`."""
    images, messages = [], []
    for message in conversation:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and as_parts:
            message = {**message, "content": [{"type": "text", "text": content}]}
        elif isinstance(content, list):
            parts = []
            for part in content:
                if _is_image(part):
                    images.append(load_image(_image_of(part), access))
                    part = {"type": "image"}
                parts.append(part)
            if not as_parts:
                parts = _as_text(parts, image_token, interleave)
            message = {**message, "content": parts}
        messages.append(message)
    return messages, images


def _as_text(parts: list[dict], image_token: str, interleave: bool) -> str:
    """A message's text and image parts as text, as vLLM writes them for templates that take
    text: the text parts joined by newlines, and before them, one per line, `image_token` (the
    model's `template_image_ids`) for each image the text does not already name by that token;
    with `interleave` (vLLM's `interleave_mm_strings`), each image's token where its part is.
    ValueError where the text names more images than the message holds."""
    images = sum(part["type"] == "image" for part in parts)
    text = "\n".join(image_token if part["type"] == "image" else part["text"] for part in parts
                     if interleave or part["type"] != "image")
    if not images:
        return text
    missing = images - text.count(image_token)
    if missing < 0:
        raise ValueError(f"a message's text holds {text.count(image_token)} {image_token!r} placeholders, more than "
                         f"its {images} image part{'s' * (images > 1)}")
    return "\n".join([image_token] * missing + [text])


def chat_for_template(conversation: list[dict], tokenizer,
                      vision: VisionConfig | QwenVisionConfig | PixtralVisionConfig | None,
                      template: str | None, access: MediaAccess = MediaAccess(),
                      max_images: int | None = None, content_format: str = "auto",
                      interleave: bool = False) -> tuple[list[dict], list]:
    """`chat_images` for an engine's model (`vision`, its vision tower; None where it reads no
    images) and the chat template that renders it (`template`, None: the tokenizer's), which
    takes contents as `content_format` says (`CONTENT_FORMATS`; `interleave`: text contents
    write each image where its part is). ValueError for an unknown
    format, more image parts than `max_images` (before any is read), image parts where the model
    reads no images, and as `chat_images`."""
    check_content_format(content_format)
    count = sum(_is_image(part) for m in conversation if isinstance(m, dict) and isinstance(m.get("content"), list)
                for part in m["content"])
    check_image_count(count, max_images)
    if vision is None and count:
        raise ValueError("the messages hold image parts, and the model reads no images")
    as_parts = content_format == "openai" or (
        content_format == "auto" and template_reads_parts(template or tokenizer.chat_template))
    image_token = None if vision is None else "".join(tokenizer.convert_ids_to_tokens(vision.template_image_ids))
    return chat_images(conversation, image_token, as_parts, access, interleave)


def check_content_format(content_format: str) -> None:
    """ValueError unless `content_format` is one of `CONTENT_FORMATS`."""
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"chat_template_content_format {content_format!r} is not one of {', '.join(CONTENT_FORMATS)}")


def check_image_count(count: int, max_images: int | None) -> None:
    """ValueError when a prompt's `count` images are more than `max_images` (the engine's
    `limit_mm_per_prompt`; None: no limit)."""
    if max_images is not None and count > max_images:
        raise ValueError(f"the prompt holds {count} image{'s' * (count > 1)}, more than limit_mm_per_prompt['image'] "
                         f"{max_images} allows")


def _is_image(part) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def _image_of(part: dict):
    kind = part["type"]
    value = part.get(kind)
    if kind == "image_url":
        value = value.get("url") if isinstance(value, dict) else value
    if value is None:
        raise ValueError(f"a chat part of type {kind!r} needs its image under {kind!r}")
    return value


def widened_prompt(token_ids: list[int], vision: VisionConfig | QwenVisionConfig | PixtralVisionConfig,
                   spans: list[list[int]], bos_token_id: int | None) -> tuple[list[int], list[int]]:
    """`(token_ids, offsets)`: the prompt with its images' placeholders (`spans`, one per image,
    `vision.placeholder_ids`) and where each starts: in place of each image's token
    (`placeholder_offsets`), or first for PaliGemma (`prefix_images`). ValueError as those give, and
    for image tokens left outside the placeholders (Gemma 3's, whose prompt writes another token)."""
    if vision.prefix_lm:
        widened, offsets = prefix_images(token_ids, vision.image_token_id, spans, bos_token_id, vision.newline_ids[0])
    else:
        widened, offsets = placeholder_offsets(token_ids, vision.prompt_token_id, spans, vision.newline_ids)
    expected = sum(span.count(vision.image_token_id) for span in spans)
    if (found := widened.count(vision.image_token_id)) != expected:  # Gemma 3's, whose image tokens are not the prompt's
        raise ValueError(f"the prompt holds {found - expected} image token{'s' * (found - expected != 1)} (id "
                         f"{vision.image_token_id}) outside its images' placeholders")
    return widened, offsets


def placeholder_offsets(token_ids: list[int], image_token_id: int, spans: list[list[int]],
                        newline_ids: tuple[int, ...] = ()) -> tuple[list[int], list[int]]:
    """`(token_ids, offsets)`: the prompt with each image's token widened to the image's
    placeholders (`spans`, one list of token ids per image: a run of image tokens, as many as its
    embeddings; Pixtral's rows end in break tokens; Gemma 3's start and end tokens around them),
    and where each image's span starts. A run of placeholder tokens equal to the next k images'
    spans together is those k images already widened; a run of k image tokens alone is k images
    side by side; in other runs (Pixtral's break tokens beside image tokens) each next image's
    whole span is that image already widened, each other image token one image, and other tokens
    stay text. With `newline_ids` (Gemma 3's: `newline_ids[k - 1]` is the token of k newlines) an
    image widened from its token is set apart by two newlines on each side, each pair joined with a
    newline token beside it into one token where the vocabulary has it, as Gemma 3's processor
    writes "\n\n" around the image and its tokenizer reads a newline run as one token. ValueError
    when the prompt's image tokens stand for other than `len(spans)` images."""
    widened, offsets, done, image, written, ends = [], [], 0, 0, 0, []
    for start, length in _runs(token_ids, {image_token_id}.union(*spans)):
        widened += token_ids[done:start]
        for item in _run_items(token_ids[start:start + length], image_token_id, spans[image:]):
            if isinstance(item, int):  # a token that stays as it is
                widened.append(item)
                continue
            if image < len(spans):
                if item == "token" and newline_ids:
                    _add_newlines(widened, newline_ids)
                offsets.append(len(widened))
                widened += spans[image]
                if item == "token" and newline_ids:
                    ends.append(len(widened))
                    widened.append(newline_ids[1])
            image, written = image + 1, written + (item == "widened")
        done = start + length
    if image != len(spans):
        tokens, whose = image - written, "image's" if written == 1 else "images'"
        raise ValueError(f"the prompt's image tokens (id {image_token_id}) stand for {image} image{'s' * (image != 1)}, "
                         f"and {len(spans)} {'were' if len(spans) != 1 else 'was'} given ({tokens} image "
                         f"token{'s' * (tokens != 1)} standing for one image each, {written} {whose} placeholders "
                         "written whole): write one image token per image (or each image's whole placeholders)")
    widened += token_ids[done:]
    for end in reversed(ends):  # each image's closing newlines joined with newlines after them
        joined = _joined(newline_ids, widened[end], widened[end + 1]) if end + 1 < len(widened) else None
        if joined is not None:
            widened[end:end + 2] = [joined]
            offsets = [offset - (offset > end) for offset in offsets]
    return widened, offsets


def prefix_images(token_ids: list[int], image_token_id: int, spans: list[list[int]], bos_token_id: int | None,
                  newline_id: int) -> tuple[list[int], list[int]]:
    """`(token_ids, offsets)`: PaliGemma's prompt, as its processor writes it: each image's
    placeholders (`spans`), then the beginning-of-sequence token and the text, ended by a newline.
    The prompt may start with one image token per image (widened here) or hold none (the images
    go first); a prompt that starts with all the images' placeholders already is taken as it is.
    ValueError for image tokens elsewhere, or as many as neither."""
    placeholders = [token for span in spans for token in span]
    offsets = list(itertools.accumulate([len(span) for span in spans[:-1]], initial=0))
    count = token_ids.count(image_token_id)
    if count == len(placeholders) and token_ids[:count] == placeholders:
        return token_ids, offsets
    if count not in (0, len(spans)) or token_ids[:count] != [image_token_id] * count:
        raise ValueError(f"PaliGemma's prompt puts its images first: it may start with one image token (id "
                         f"{image_token_id}) per image ({len(spans)}) or hold none, and holds {count}"
                         f"{'' if token_ids[:count] == [image_token_id] * count else ', not all at the start'}")
    text = token_ids[count:]
    if bos_token_id is not None and text[:1] != [bos_token_id]:
        text = [bos_token_id, *text]
    return placeholders + text + [newline_id], offsets


def _add_newlines(tokens: list[int], newline_ids: tuple[int, ...]) -> None:
    """Append two newlines to `tokens`, joined with a newline token that ends them where the
    vocabulary has the longer run."""
    joined = _joined(newline_ids, tokens[-1], newline_ids[1]) if tokens else None
    if joined is None:
        tokens.append(newline_ids[1])
    else:
        tokens[-1] = joined


def _joined(newline_ids: tuple[int, ...], first: int, second: int) -> int | None:
    """The token of the newlines of tokens `first` and `second` together, or None where either is
    not a newline token or the vocabulary has no token that long."""
    if first not in newline_ids or second not in newline_ids:
        return None
    count = newline_ids.index(first) + newline_ids.index(second) + 2
    return newline_ids[count - 1] if count <= len(newline_ids) else None


def _run_items(run: list[int], image_token_id: int, spans: list[list[int]]) -> list:
    """A run of placeholder tokens read as images: "widened" for each image whose whole span it
    holds, "token" for each image token that stands for one, the other tokens themselves."""
    together = []
    for count, span in enumerate(spans, 1):
        together += span
        if together == run:
            return ["widened"] * count
        if len(together) >= len(run):
            break
    if all(token == image_token_id for token in run):
        return ["token"] * len(run)
    items, i, image = [], 0, 0
    while i < len(run):
        span = spans[image] if image < len(spans) else None
        if span is not None and run[i:i + len(span)] == span:
            items.append("widened")
            i, image = i + len(span), image + 1
        elif run[i] == image_token_id:
            items.append("token")
            i, image = i + 1, image + 1
        else:
            items.append(run[i])
            i += 1
    return items


def embedding_runs(span: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """(start, length) within an image's placeholder `span` of each run of `image_token_id`: where
    its embeddings go, in order (one run; Pixtral's: one per row, between its break tokens)."""
    return _runs(span, {image_token_id})


def _runs(token_ids: list[int], members: set[int]) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of tokens in `members`."""
    runs, start = [], None
    for i, token in enumerate([*token_ids, None]):
        if token in members and start is None:
            start = i
        elif token not in members and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


class ImageProcessor:
    """A model folder's image processor (transformers' `AutoImageProcessor`): images to pixels."""

    def __init__(self, folder: Path, **call_kwargs):
        """`call_kwargs`: settings for each call the model's processor makes beside its own (Pixtral's
        `patch_size`, its tower's patch times the merge size, as `PixtralProcessor` passes it)."""
        from transformers import AutoImageProcessor

        self._call_kwargs = call_kwargs

        try:
            self._processor = AutoImageProcessor.from_pretrained(str(folder))
        except Exception as err:
            raise ValueError(f"{folder} has no image processor (preprocessor_config.json or processor_config.json) "
                             f"to prepare images with: {type(err).__name__}: {err}") from err

    def pixel_values(self, images: list) -> list[np.ndarray]:
        """Each image's pixels, float32, as the model's processor prepares them: `[tiles, 3, H, W]`
        (one tile for LLaVA; the whole image, then its grid's tiles row by row, for LLaVA-NeXT and
        LLaVA-OneVision; Pixtral's whole image, resized), or Qwen-VL's patches as their grid, `[rows,
        columns, 3 x frames x patch x patch]`."""
        return [self._pixels(self._processor([image], return_tensors="np", **self._call_kwargs)) for image in images]

    def _pixels(self, prepared) -> np.ndarray:
        pixels = np.asarray(prepared["pixel_values"], np.float32)
        if "image_grid_thw" in prepared:  # Qwen-VL: patches in merge-square order, one frame's grid
            _, rows, cols = (int(n) for n in prepared["image_grid_thw"][0])
            merge = self._processor.merge_size
            squares = pixels.reshape(rows // merge, cols // merge, merge, merge, -1)
            return squares.transpose(0, 2, 1, 3, 4).reshape(rows, cols, -1)
        pixels = pixels[0]
        return pixels if pixels.ndim == 4 else pixels[None]

    def pixel_limits(self) -> tuple[int, int] | None:
        """Qwen-VL's processor's bounds on a resized image's area in pixels (min, max); None for
        other processors."""
        size = getattr(self._processor, "size", None) or {}
        if "shortest_edge" in size and "longest_edge" in size and hasattr(self._processor, "merge_size"):
            return int(size["shortest_edge"]), int(size["longest_edge"])
        return None

    def longest_edge(self) -> int | None:
        """Pixtral's processor's bound on a resized image's longer side in pixels; None for
        processors without one."""
        size = getattr(self._processor, "size", None) or {}
        return int(size["longest_edge"]) if set(size) == {"longest_edge"} else None


def pixel_hash(pixels: np.ndarray) -> str:
    """A hash of one image's pixel array: images with equal pixels share cached KV blocks."""
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
