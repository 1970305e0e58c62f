"""From an API request's prompt or chat messages to prompt token ids, with the engine's tokenizer.

Runs in the request handler before the request reaches the engine, so the prompt's length is
known for the context check and the default `max_tokens`. Text is tokenized exactly as the engine
and `LLM.generate` tokenize it (`tokenizer.encode(text)`), and chats exactly as `LLM.chat` renders
them (the chat template's text, encoded without adding special tokens), so the server and the
offline API give the same tokens. Input that cannot be turned into a prompt is an HTTP 400.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jpaged.chat_template import checked_template, checked_variables
from jpaged.config import PixtralVisionConfig, QwenVisionConfig, VisionConfig
from jpaged.images import MediaAccess, chat_for_template, widened_prompt
from jpaged.prompt_inputs import EMBEDS_PLACEHOLDER_ID, as_embeds_array
from jpaged.sampling_params import truncated_prompt
from jpaged.server.errors import bad_request
from jpaged.server.protocol import ChatMessage

CHAT_ROLES = {"system", "user", "assistant", "developer", "tool"}


@dataclass
class Prompt:
    """One prompt as the engine gets it: its token ids, its text where the client sent text, its
    images (PIL images, each placeholder already widened in `token_ids`), or its embeddings
    (`embeds`, float32 `[length, hidden]`; `token_ids` then hold placeholders), and the request's
    cache salt."""

    token_ids: list[int]
    text: str | None = None
    images: list = field(default_factory=list)
    embeds: np.ndarray | None = None
    cache_salt: str | None = None

    def engine_prompt(self) -> dict:
        """The prompt dict `add_request` takes."""
        salt = {} if self.cache_salt is None else {"cache_salt": self.cache_salt}
        if self.embeds is not None:
            return {"prompt_embeds": self.embeds} | salt
        prompt = {"prompt": self.text, "prompt_token_ids": self.token_ids} | salt
        return prompt | ({"multi_modal_data": {"image": self.images}} if self.images else {})

    @property
    def prompt_token_ids(self) -> list[int] | None:
        """Its token ids as responses report them: None for embeddings, as vLLM reports them."""
        return None if self.embeds is not None else self.token_ids


def completion_prompts(prompt: str | list | None, tokenizer: Any, prompt_embeds: str | list[str] | None = None,
                       embeds_enabled: bool = False) -> list[Prompt]:
    """The prompts of a /v1/completions request: `prompt_embeds` (base64 `torch.save`s, vLLM's),
    then `prompt`: a string, a list of strings, a list of token ids, or a list of token-id lists.
    400 for a prompt of no tokens (an empty text, where the tokenizer adds no BOS), an empty
    list, neither field, or embeddings the server was not started for (`embeds_enabled`) or
    cannot read."""
    if prompt_embeds is not None and not embeds_enabled:
        raise bad_request("prompt_embeds needs a server started with --enable-prompt-embeds", param="prompt_embeds")
    embeds = [decoded_embeds(item, i) for i, item in enumerate(
        [prompt_embeds] if isinstance(prompt_embeds, str) else prompt_embeds or [])]
    if prompt_embeds is not None and not embeds:
        raise bad_request("prompt_embeds is an empty list: at least one prompt is needed", param="prompt_embeds")
    prompts = [Prompt([EMBEDS_PLACEHOLDER_ID] * len(rows), embeds=rows) for rows in embeds]
    if prompt is None:
        if not prompts:
            raise bad_request("a completion needs a prompt or prompt_embeds", param="prompt")
        return prompts
    return prompts + _text_or_token_prompts(prompt, tokenizer)


def decoded_embeds(item: str, index: int) -> np.ndarray:
    """One of `prompt_embeds`: base64 of a `torch.save`d `[length, hidden]` tensor (read with
    `weights_only`, so it runs no code), as float32 numpy. 400 naming what could not be read."""
    where = f"prompt_embeds[{index}]"
    try:
        data = base64.b64decode(item, validate=True)
    except ValueError as err:
        raise bad_request(f"{where} is not base64 ({err})", param="prompt_embeds") from err
    try:
        import torch
    except ImportError as err:
        raise bad_request("prompt_embeds needs torch on the server, to read torch.save'd tensors",
                          param="prompt_embeds") from err
    try:
        tensor = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises many kinds for bytes that are not a saved tensor
        raise bad_request(f"{where} is not a torch.save'd tensor ({type(err).__name__}: {str(err)[:200]})",
                          param="prompt_embeds") from err
    if not isinstance(tensor, torch.Tensor):
        raise bad_request(f"{where} holds a {type(tensor).__name__}, not a tensor", param="prompt_embeds")
    try:
        return as_embeds_array(tensor.to_dense() if tensor.is_sparse else tensor)
    except ValueError as err:
        raise bad_request(f"{where}: {err}", param="prompt_embeds") from err


def _text_or_token_prompts(prompt: str | list, tokenizer: Any) -> list[Prompt]:
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(item, int) for item in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt is an empty list: at least one prompt is needed", param="prompt")
    prompts = []
    for i, item in enumerate(items):
        token_ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not token_ids:
            which = f"prompt {i}: " if len(items) > 1 else ""
            raise bad_request(f"{which}prompt is empty: at least one token is needed", param="prompt")
        prompts.append(Prompt(token_ids, item if isinstance(item, str) else None))
    return prompts


def truncated(prompt: Prompt, keep: int | None, max_model_len: int) -> Prompt:
    """`prompt` cut to its last `keep` tokens (`truncate_prompt_tokens`; -1: `max_model_len`), its
    text then left to be decoded from them. 400 for a `keep` that is 0, below -1 or above
    `max_model_len`, or that would cut a prompt with images."""
    try:
        token_ids = truncated_prompt(prompt.token_ids, keep, max_model_len)
    except ValueError as err:
        raise bad_request(str(err), param="truncate_prompt_tokens") from err
    if len(token_ids) == len(prompt.token_ids):
        return prompt
    if prompt.images:
        raise bad_request(f"truncate_prompt_tokens {keep} would cut a prompt with images (of {len(prompt.token_ids)} "
                          "tokens, their placeholders included)", param="truncate_prompt_tokens")
    embeds = None if prompt.embeds is None else prompt.embeds[len(prompt.embeds) - len(token_ids):]
    return Prompt(token_ids, embeds=embeds, cache_salt=prompt.cache_salt)


def conversation(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template takes them (`{"role", "content"}`, the content a string or a
    list of text and image_url parts, which `images.chat_images` then shapes for the template, and
    `name` where given; an assistant turn's `tool_calls` with their arguments as objects, and a
    tool turn's `tool_call_id`, as HF templates read them). 400 for an empty list, an unknown
    role, a part neither text nor image_url, or a tool turn without `tool_call_id`."""
    if not messages:
        raise bad_request("messages is empty: at least one message is needed", param="messages")
    turns = []
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role {message.role!r} is not supported "
                              f"(supported: {', '.join(sorted(CHAT_ROLES))})", param="messages")
        role = "system" if message.role == "developer" else message.role
        text = message_text(message, i)  # checks the parts too
        turn = {"role": role, "content": _parts(message.content) if isinstance(message.content, list) else text}
        if message.name is not None:  # a participant's name, for templates that render it (vLLM passes it on)
            turn["name"] = message.name
        if message.role == "tool":
            if not message.tool_call_id:
                raise bad_request(f"messages[{i}] (tool) needs the tool_call_id it answers", param="messages")
            turn["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            turn["tool_calls"] = [{"id": call.id, "type": call.type, "function": {
                "name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                for call in message.tool_calls]
        turns.append(turn)
    return turns


def _parts(content: list) -> list[dict]:
    """Content parts as the chat template (or `chat_images`, which joins them for templates that
    take text) reads them."""
    return [{"type": "text", "text": part.text} if part.type == "text" else
            {"type": "image_url", "image_url": part.image_url} for part in content]


def _arguments(text: str):
    """A call's arguments as an object where they are JSON (HF templates expect one), else as sent."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def message_text(message: ChatMessage, i: int) -> str:
    """The text of `messages[i]`: its content, text parts joined by newlines (as vLLM joins them),
    "" for an assistant turn without content. 400 for other missing content or parts neither
    text nor image_url."""
    if message.content is None:
        if message.role != "assistant":  # an assistant turn may be empty (or only call tools), as OpenAI's API allows
            raise bad_request(f"messages[{i}] ({message.role}) has no content", param="messages")
        return ""
    if isinstance(message.content, str):
        return message.content
    for j, part in enumerate(message.content):
        if part.type not in ("text", "image_url"):
            raise bad_request(f"messages[{i}] has a content part of type {part.type!r}; only text and image_url "
                              "parts are supported", param="messages")
        if part.type == "text" and part.text is None:
            raise bad_request(f"messages[{i}].content[{j}] is a text part without its text", param="messages")
    return "\n".join(part.text if part.type == "text" else "" for part in message.content)


@dataclass(frozen=True)
class ChatTemplate:
    """Which chat template renders a request's messages, and the extra variables it gets.

    `template`: Jinja text, or None for the tokenizer's own; `variables`: passed to the template
    (vLLM's `chat_template_kwargs`, such as `enable_thinking` for templates that read it)."""

    template: str | None = None
    variables: dict[str, Any] | None = None
    from_request: bool = False  # the request's own `chat_template`: its errors are blamed on that field
    content_format: str = "auto"  # how it takes message contents (`jpaged.images.CONTENT_FORMATS`)

    @classmethod
    def of_request(cls, sent: str | None, variables: dict[str, Any] | None, server_template: str | None,
                   trusted: bool, content_format: str = "auto") -> ChatTemplate:
        """The template of a request that sent `sent` (its `chat_template`) and `variables` (its
        `chat_template_kwargs`) to a server whose template is `server_template` (None: the
        tokenizer's). 400 naming the field for a sent template the server does not trust (as
        vLLM, a template is code the server runs) or that does not parse, and for variables that
        name `apply_chat_template`'s own arguments."""
        try:
            variables = checked_variables(variables)
        except (TypeError, ValueError) as err:
            raise bad_request(str(err), param="chat_template_kwargs") from err
        if sent is None:
            return cls(server_template, variables, from_request=False, content_format=content_format)
        if not trusted:
            raise bad_request("this server does not accept chat templates in requests (start it with "
                              "--trust-request-chat-template to allow them)", param="chat_template")
        try:
            return cls(checked_template(sent), variables, from_request=True, content_format=content_format)
        except ValueError as err:
            raise bad_request(str(err), param="chat_template") from err


def chat_prompt(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool = True,
                continue_final_message: bool = False, add_special_tokens: bool = False,
                tools: list[dict] | None = None, template: ChatTemplate = ChatTemplate(),
                without_template: str = "chat completions are not available; use /v1/completions",
                vision: VisionConfig | QwenVisionConfig | PixtralVisionConfig | None = None,
                media: MediaAccess = MediaAccess(local_root=None),
                max_images: int | None = None, interleave: bool = False) -> Prompt:
    """The prompt of a chat through `template` (by default the tokenizer's chat template), given
    the `tools`, if any. `without_template`: what the refusal says the route's caller may do
    where there is no chat template. `vision`: the engine's vision tower, for a model that reads
    images (their parts are then read, and each image's token widened); `media`: the image
    sources the chat may name (`MediaAccess`; by default no local paths); `max_images`: the most
    image parts a chat may hold (counted before any is read); `interleave`: a template that takes
    text gets each image's token where its part is (`jpaged.images.chat_for_template`).

    Raises:
        APIError: 400 when there is no chat template, the messages are bad (an image that cannot
            be read, or images for a model that reads none), both
            `add_generation_prompt` and `continue_final_message` are set, the final message is
            not the assistant's when it is to be continued, or the template itself refuses them.
    """
    if not template.template and not getattr(tokenizer, "chat_template", None):
        raise bad_request(f"this model's tokenizer has no chat template, so {without_template}, or start the server "
                          "with --chat-template", param="messages")
    turns = conversation(messages)
    try:
        turns, images = chat_for_template(turns, tokenizer, vision, template.template, media, max_images,
                                          template.content_format, interleave)
    except ValueError as err:
        raise bad_request(str(err), param="messages") from err
    if add_generation_prompt and continue_final_message:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                          param="continue_final_message")
    if continue_final_message and turns[-1]["role"] != "assistant":
        raise bad_request("continue_final_message needs the final message to be the assistant's",
                          param="continue_final_message")
    try:
        text = tokenizer.apply_chat_template(turns, tools=tools, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tokenize=False,
                                             chat_template=template.template, **(template.variables or {}))
    except Exception as err:  # the template's own checks (jinja raise_exception, alternating roles)
        raise bad_request(f"the chat template refused the messages: {err}",
                          param="chat_template" if template.from_request else "messages") from err
    token_ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if images:
        try:
            spans = [vision.placeholder_ids(image.height, image.width) for image in images]
        except ValueError as err:
            raise bad_request(str(err), param="messages") from err
        try:
            token_ids, _ = widened_prompt(token_ids, vision, spans, tokenizer.bos_token_id)
        except ValueError as err:
            raise bad_request(f"the chat template's rendering of the messages: {err}", param="messages") from err
    return Prompt(token_ids, text, images)
