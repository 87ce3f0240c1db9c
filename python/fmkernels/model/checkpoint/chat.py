"""Chat templates: a conversation (a list of ``{"role": ..., "content": ...}`` messages)
rendered into prompt tokens with the checkpoint's jinja2 template, as transformers'
``apply_chat_template`` renders it, and the token that ends the model's turn.

transformers' conventions, kept here so the same template gives the same text: a sandboxed
jinja2 environment with ``trim_blocks`` and ``lstrip_blocks`` and the ``loopcontrols``
extension; ``raise_exception``, ``strftime_now`` and a ``tojson`` filter that does not
escape HTML; the variables ``messages``, ``add_generation_prompt``, ``bos_token`` and
``eos_token``; the rendered text encoded without adding special tokens (the template
writes the BOS where the model wants one).
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

Message = Mapping[str, Any]

# Content of an assistant message no template writes itself: what a template puts after it
# is how it closes a turn.
_SENTINEL = "\u2063fmkernels-end-of-turn\u2063"


def _environment():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as exc:
        raise ImportError("chat templates need jinja2: pip install 'fmkernels[chat]'") from exc

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def check_messages(messages, name: str = "messages") -> List[Dict[str, Any]]:
    """A conversation as a list of plain dicts, each with a str ``role`` and ``content``."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"{name} must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{name} must hold at least one message, got none")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"{name}[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"{name}[{i}] must have a str {key!r}, got {message.get(key)!r}")
        plain.append(dict(message))
    return plain


def _template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(f"the tokenizer {tokenizer!r} has no chat template (tokenizer_config.json's chat_template, "
                         f"chat_template.jinja, or a GGUF file's tokenizer.chat_template): pass prompts instead")
    return template


def render(tokenizer, messages, *, add_generation_prompt: bool = True, **variables) -> str:
    """The prompt text of a conversation under the tokenizer's chat template.

    Parameters
    ----------
    tokenizer : a tokenizer with ``chat_template`` (``load_tokenizer``'s)
    messages : list of dict
        ``{"role": "system" | "user" | "assistant", "content": str}``, oldest first.
    add_generation_prompt : bool
        End with the header of the assistant's turn, so the model writes the answer.
    **variables
        More template variables (``tools``, ``documents``, ...), as transformers passes them.
    """
    import jinja2

    messages = check_messages(messages)
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token")}
    try:
        return _environment().from_string(_template(tokenizer)).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special, **variables
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"the chat template rejected the messages: {exc}") from exc


def apply_chat_template(tokenizer, messages, *, add_generation_prompt: bool = True, **variables) -> List[int]:
    """The prompt token ids of a conversation: ``render`` encoded without adding special tokens."""
    text = render(tokenizer, messages, add_generation_prompt=add_generation_prompt, **variables)
    return list(tokenizer.encode(text, add_special_tokens=False))


def end_of_turn_token_id(tokenizer) -> Optional[int]:
    """The token the template closes an assistant turn with (ChatML's ``<|im_end|>``, Llama 3's
    ``<|eot_id|>``, ...): the first special token (one that decodes to no text) the template
    writes after an assistant message; the tokenizer's ``eot_token_id`` or ``eos_token_id``
    where the template writes none."""
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = render(tokenizer, turn, add_generation_prompt=False)
    if _SENTINEL in text:
        after = text.split(_SENTINEL, 1)[1]
        for token in tokenizer.encode(after, add_special_tokens=False) if after else ():
            if tokenizer.decode([token]) == "":
                return int(token)
    for name in ("eot_token_id", "eos_token_id"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            return int(token)
    return None
