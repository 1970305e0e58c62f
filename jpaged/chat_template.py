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


def _parse(template: str):
    """`template`'s Jinja syntax tree, parsed as transformers compiles chat templates: with loop
    controls and transformers' `{% generation %}` ... `{% endgeneration %}` block (which marks the
    assistant's tokens and renders its body). jinja2.TemplateSyntaxError where it does not parse."""
    from jinja2 import ext, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols", Generation]).parse(template)


def checked_template(template: str) -> str:
    """`template`, once it parses as Jinja (as transformers compiles chat templates); ValueError
    naming the error and its line otherwise."""
    from jinja2 import TemplateSyntaxError

    if not template.strip():
        raise ValueError("the chat template is empty")
    try:
        _parse(template)
    except TemplateSyntaxError as err:
        raise ValueError(f"the chat template does not parse: {err.message} (line {err.lineno})") from err
    return template


def template_reads_parts(template: str | None) -> bool:
    """Whether a chat template loops over a message's content parts (`{% for part in
    message['content'] %}`, or `.content`, maybe through a filter or a slice), so that it takes
    contents as lists of parts rather than text: vLLM's "auto" content format, read from the
    template's syntax tree as vLLM reads it. A message is the target of a loop over `messages`
    or over a variable set from it; a template that does not parse takes text."""
    from jinja2 import TemplateSyntaxError, nodes

    if not template:
        return False
    try:
        tree = _parse(template)
    except TemplateSyntaxError:
        return False
    loops = [loop for loop in tree.find_all(nodes.For) if isinstance(loop.target, nodes.Name)]
    messages = _names_set_from(tree, "messages")
    message_names = {loop.target.name for loop in loops if any(_reads(loop.iter, name) for name in messages)}
    return any(_reads(loop.iter, name, "content") for loop in loops for name in message_names)


def _reads(node, name: str, key: str | None = None) -> bool:
    """Whether `node` is the variable `name` (with `key`: its item or attribute `key`), maybe
    under filters, tests or a slice."""
    from jinja2 import nodes

    while isinstance(node, (nodes.Filter, nodes.Test)) or (isinstance(node, nodes.Getitem)
                                                          and isinstance(node.arg, nodes.Slice)):
        node = node.node
    if key is not None:
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == key:
            node = node.node
        elif isinstance(node, nodes.Getattr) and node.attr == key:
            node = node.node
        else:
            return False
    return isinstance(node, nodes.Name) and node.ctx == "load" and node.name == name


def _names_set_from(tree, name: str) -> set[str]:
    """`name` and every variable set from it, or from one of those, in `tree` (`{% set m =
    messages[1:] %}`)."""
    from jinja2 import nodes

    found, todo = {name}, [name]
    while todo:
        source = todo.pop()
        for assign in tree.find_all(nodes.Assign):
            if isinstance(assign.target, nodes.Name) and assign.target.name not in found \
                    and _reads(assign.node, source):
                found.add(assign.target.name)
                todo.append(assign.target.name)
    return found


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
