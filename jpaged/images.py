"""A prompt's images, from what the user gives to where their embeddings go.

Images arrive as vLLM takes them: `{"prompt": ..., "multi_modal_data": {"image": image or
[images]}}` offline (PIL images, or strings: a `data:` URL, an `http(s)://` URL, a `file://` URL
or a local path), and as OpenAI `image_url` chat parts. `ImageProcessor` turns them into the
model's pixel arrays with the checkpoint's own image processor (transformers'), and
`placeholder_offsets` finds where each image's embeddings go in the prompt: a run of
`tokens_per_image` image tokens per image, written by the user or the chat template as one image
token and widened here, as LLaVA's processor widens it. The engine encodes the pixels
(`models/vision.py`) and keeps one `ImageInput` per image on the request; the model runner puts
the embeddings in place of the placeholders' token embeddings in the steps that compute them,
and the block manager keys cached blocks by the images they hold (`ImageInput.hash`).
Host side: no jax.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_PART_TYPES = ("image_url", "image_pil", "image")  # chat content parts holding an image (vLLM's)
URL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt: its embeddings `[length, hidden]` (float32 numpy) for prompt
    positions `[offset, offset + length)`, and a hash of its pixels."""

    offset: int
    embeds: np.ndarray
    hash: str

    @property
    def length(self) -> int:
        return len(self.embeds)


def load_image(source):
    """A PIL image in RGB from a PIL image, a `data:` URL, an `http(s)://` or `file://` URL, or a
    path. ValueError naming what could not be read."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if not isinstance(source, str):
        raise ValueError(f"an image must be a PIL image or a URL or path string, got {type(source).__name__}")
    try:
        if source.startswith("data:"):
            header, _, payload = source.partition(",")
            if not header.endswith(";base64"):
                raise ValueError("only base64 data URLs hold images")
            data = base64.b64decode(payload, validate=True)
        elif source.startswith(("http://", "https://")):
            import httpx

            response = httpx.get(source, timeout=URL_TIMEOUT_S, follow_redirects=True)
            response.raise_for_status()
            data = response.content
        else:
            data = Path(source.removeprefix("file://")).expanduser().read_bytes()
        image = Image.open(io.BytesIO(data))
        return image.convert("RGB")
    except Exception as err:
        shown = source if len(source) <= 80 else source[:77] + "..."
        raise ValueError(f"could not read the image {shown!r}: {type(err).__name__}: {err}") from err


def as_image_list(multi_modal_data) -> list:
    """The images of a prompt's `multi_modal_data` (`{"image": image or [images]}`), loaded.
    ValueError for other keys or an empty list."""
    if not isinstance(multi_modal_data, dict):
        raise ValueError(f"multi_modal_data must be a dict such as {{'image': image}}, got "
                         f"{type(multi_modal_data).__name__}")
    if unknown := sorted(set(multi_modal_data) - {"image"}, key=str):
        raise ValueError(f"multi_modal_data takes 'image' only, got {unknown}")
    images = multi_modal_data.get("image")
    images = images if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("multi_modal_data['image'] is an empty list")
    return [load_image(image) for image in images]


def chat_images(conversation: list[dict]) -> tuple[list[dict], list]:
    """The conversation with each image part made `{"type": "image"}` (what chat templates
    render as the image token), and its images in order, loaded. ValueError for an image part
    without its image."""
    images, messages = [], []
    for message in conversation:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or not any(_is_image(part) for part in content):
            messages.append(message)
            continue
        parts = []
        for part in content:
            if _is_image(part):
                images.append(load_image(_image_of(part)))
                part = {"type": "image"}
            parts.append(part)
        messages.append({**message, "content": parts})
    return messages, images


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


def placeholder_offsets(token_ids: list[int], image_token_id: int, tokens_per_image: int, num_images: int
                        ) -> tuple[list[int], list[int]]:
    """`(token_ids, offsets)`: the prompt with each lone image token widened to a run of
    `tokens_per_image` (runs already that long stay), and where each image's run starts.
    ValueError when the prompt's image tokens do not make `num_images` such runs."""
    runs, start = [], None
    for i, token in enumerate([*token_ids, None]):
        if token == image_token_id and start is None:
            start = i
        elif token != image_token_id and start is not None:
            runs.append((start, i - start))
            start = None
    if len(runs) != num_images or any(length not in (1, tokens_per_image) for _, length in runs):
        raise ValueError(f"the prompt holds {len(runs)} image placeholders (runs of image token {image_token_id}, of "
                         f"lengths {[length for _, length in runs]}) for {num_images} images: each image needs one "
                         f"image token, or a run of {tokens_per_image}")
    widened, offsets, done = [], [], 0
    for start, length in runs:
        widened += token_ids[done:start]
        offsets.append(len(widened))
        widened += [image_token_id] * tokens_per_image
        done = start + length
    return widened + token_ids[done:], offsets


class ImageProcessor:
    """A model folder's image processor (transformers' `AutoImageProcessor`): images to pixels."""

    def __init__(self, folder: Path):
        from transformers import AutoImageProcessor

        try:
            self._processor = AutoImageProcessor.from_pretrained(str(folder))
        except Exception as err:
            raise ValueError(f"{folder} has no image processor (preprocessor_config.json or processor_config.json) "
                             f"to prepare images with: {type(err).__name__}: {err}") from err

    def pixel_values(self, images: list) -> np.ndarray:
        """`[N, 3, H, W]` float32, as the model's processor prepares them."""
        return np.asarray(self._processor(images, return_tensors="np")["pixel_values"], np.float32)


def pixel_hash(pixels: np.ndarray) -> str:
    """A hash of one image's pixel array: images with equal pixels share cached KV blocks."""
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
