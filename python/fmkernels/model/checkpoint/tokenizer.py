"""Tokenizers for generation: a Hugging Face ``tokenizer.json`` (a GGUF file's vocabulary is
built into the same ``HFTokenizer`` by ``checkpoint.gguf.read_tokenizer``), through the
``tokenizers`` library, imported only when one is loaded, a byte-level fallback
for the built-in demo, and ``StreamDecoder``, which turns a growing list of token ids into
complete UTF-8 text."""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

_TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_CONFIG = "tokenizer_config.json"
_CHAT_TEMPLATE = "chat_template.jinja"
# Prompt ids a StreamDecoder decodes the first new tokens with (vLLM uses 5 as well).
_PROMPT_CONTEXT = 5


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, then BOS (256) and EOS (257); fits the ``tiny``
    config's vocabulary of 512. ``decode`` skips ids >= 256 and replaces an incomplete or
    invalid UTF-8 sequence with U+FFFD."""

    bos_token_id = 256
    eos_token_id = 257
    vocab_size = 258

    def encode(self, text: str, *, add_special_tokens: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with the special tokens a chat template needs.

    Attributes
    ----------
    tokenizer : tokenizers.Tokenizer
        The tokenizer itself.
    bos_token_id, eos_token_id : int or None
        Beginning and end of sequence (``tokenizer_config.json``'s ``bos_token``/``eos_token``,
        or a GGUF file's ``tokenizer.ggml.bos_token_id``/``eos_token_id``); None where not given.
        ``generate`` stops at ``eos_token_id``.
    eot_token_id : int or None
        End of turn (a GGUF file's ``tokenizer.ggml.eot_token_id``); None where not given.
    chat_template : str or None
        The checkpoint's Jinja chat template (``chat_template.jinja``, ``tokenizer_config.json``'s
        ``chat_template``, or a GGUF file's ``tokenizer.chat_template``).
    path : str or None
        The file it was read from.
    """

    def __init__(self, tokenizer, eos_token_id: Optional[int] = None, path: Optional[str] = None, *,
                 bos_token_id: Optional[int] = None, eot_token_id: Optional[int] = None,
                 chat_template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.eot_token_id = eot_token_id
        self.chat_template = chat_template
        self.path = path

    @classmethod
    def from_file(cls, path) -> "HFTokenizer":
        """The tokenizer of a Hugging Face checkpoint: ``path`` is its directory (holding
        ``tokenizer.json``) or the ``tokenizer.json`` file itself; the special tokens from
        ``tokenizer_config.json`` beside it, the chat template from ``chat_template.jinja`` or
        that config. Raises FileNotFoundError when there is none and ImportError naming the
        package when ``tokenizers`` is not installed."""
        path = os.fspath(path)
        file = os.path.join(path, _TOKENIZER_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {_TOKENIZER_FILE} at {file}")
        try:
            import tokenizers
        except ImportError as exc:
            raise ImportError(
                f"reading {file} needs the 'tokenizers' package (pip install tokenizers)"
            ) from exc
        tokenizer = tokenizers.Tokenizer.from_file(file)
        directory = os.path.dirname(file)
        config = {}
        if os.path.isfile(os.path.join(directory, _TOKENIZER_CONFIG)):
            with open(os.path.join(directory, _TOKENIZER_CONFIG)) as f:
                config = json.load(f)

        def token_id(key: str) -> Optional[int]:
            token = config.get(key)
            if isinstance(token, dict):
                token = token.get("content")
            return tokenizer.token_to_id(token) if isinstance(token, str) else None

        return cls(tokenizer, token_id("eos_token"), file, bos_token_id=token_id("bos_token"),
                   chat_template=_chat_template(directory, config))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> Optional[str]:
        """The BOS token's text (as a chat template writes it), or None."""
        return None if self.bos_token_id is None else self.tokenizer.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> Optional[str]:
        """The EOS token's text, or None."""
        return None if self.eos_token_id is None else self.tokenizer.id_to_token(self.eos_token_id)

    @property
    def add_bos_token(self) -> bool:
        """Whether ``encode`` puts BOS before the text by default (``add_special_tokens=True``);
        a prompt rendered with a template that writes BOS itself is encoded without it."""
        ids = self.tokenizer.encode("", add_special_tokens=True).ids
        return self.bos_token_id is not None and ids[:1] == [self.bos_token_id]

    def encode(self, text: str, *, add_special_tokens: bool = True) -> List[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) stay whole.
        ``add_special_tokens`` adds what the tokenizer puts around a text (BOS, EOS)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def _chat_template(directory: str, config: dict) -> Optional[str]:
    """``chat_template.jinja`` (transformers >= 4.50 saves it so), else tokenizer_config.json's
    ``chat_template``: a string, or a list of named templates of which "default" is the one."""
    file = os.path.join(directory, _CHAT_TEMPLATE)
    if os.path.isfile(file):
        with open(file) as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


class StreamDecoder:
    """Incremental decoding for streaming: ``push(token_id)`` returns the text the new token
    completes ("" while a multi-byte character or a word is still incomplete), so the
    pieces joined equal ``tokenizer.decode`` of all the ids once the text is complete.
    Given ``prompt_ids``, the new text is what the new tokens add after the prompt's text.

    It decodes a short window of recent ids (from the last point where the text was
    complete), so each push costs O(window), and tokenizers that strip a leading space
    from a lone token (SentencePiece's) still stream the space.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        # The prompt's last few ids open the window (emitted already), so the first new token
        # decodes in context: a word after the prompt keeps its leading space.
        self.ids: List[int] = [int(i) for i in prompt_ids][-_PROMPT_CONTEXT:]
        self._prefix = 0  # start of the decode window
        self._read = len(self.ids)  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """What is left undecoded (an incomplete character decodes as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(before):]
