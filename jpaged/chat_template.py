"""Chat templates given by the caller: reading one named on the command line, checking that it
parses, and the variables a caller may pass to it.

`LLM.chat` and the server (`jpaged serve --chat-template`, a request's `chat_template` and
`chat_template_kwargs`) render conversations with the tokenizer's `apply_chat_template`; what
they are given goes through here first, so a template that cannot parse or variables that would
clash with `apply_chat_template`'s own arguments are refused with a message naming them.
Plain Python: no jax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# `apply_chat_template`'s own arguments and the names it renders with: extra variables may not set them
RESERVED_VARIABLES = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


def read_chat_template(source: str) -> str:
    """A template named on the command line: the text of the file `source` names, or `source`
    itself when it is Jinja text (holds `{{` or `{%`). ValueError when it is neither, or when
    the template does not parse."""
    if "{{" in source or "{%" in source:
        return checked_template(source)
    try:
        return checked_template(Path(source).read_text())
    except OSError as err:
        raise ValueError(f"chat template {source!r:.100} is neither a readable file nor a Jinja template "
                         f"({err.strerror or err})") from err


def checked_template(template: str) -> str:
    """`template`, once it parses as Jinja (as transformers compiles chat templates); ValueError
    naming the error and its line otherwise."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not template.strip():
        raise ValueError("the chat template is empty")
    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except TemplateSyntaxError as err:
        raise ValueError(f"the chat template does not parse: {err.message} (line {err.lineno})") from err
    return template


def checked_variables(variables: Any) -> dict[str, Any]:
    """Extra template variables (`chat_template_kwargs`) as a dict; TypeError for a non-dict,
    ValueError naming the ones that would set `apply_chat_template`'s own arguments."""
    if variables is None:
        return {}
    if not isinstance(variables, dict):
        raise TypeError(f"chat_template_kwargs must be a dict of template variables, got {type(variables).__name__}")
    clashing = sorted(RESERVED_VARIABLES & set(variables))
    if clashing:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(clashing)}: they are the template's own "
                         "inputs, set by the call")
    return variables


def chat_text(tokenizer, conversation: list[dict], add_generation_prompt: bool = True,
              tools: list[dict] | None = None, chat_template: str | None = None,
              chat_template_kwargs: dict | None = None, continue_final_message: bool = False) -> str:
    """A conversation rendered by the chat template (`chat_template`, or the tokenizer's).
    ValueError when the template fails on it (its own checks, such as Jinja's `raise_exception`
    or alternating roles, or an error in the template)."""
    try:
        return tokenizer.apply_chat_template(conversation, tools=tools, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tokenize=False,
                                             chat_template=chat_template, **(chat_template_kwargs or {}))
    except Exception as err:  # Jinja's errors, and whatever a template's own code raises
        raise ValueError(f"the chat template{'' if chat_template is None else ' (chat_template)'} failed on the "
                         f"conversation: {type(err).__name__}: {err}") from err
