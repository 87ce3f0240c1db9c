"""Tokenizers for generation: a Hugging Face ``tokenizer.json`` (through the ``tokenizers``
library, imported only when one is loaded) or a byte-level fallback for the built-in demo,
and ``StreamDecoder``, which turns a growing list of token ids into complete UTF-8 text."""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

_TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_CONFIG = "tokenizer_config.json"
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
    """A Hugging Face ``tokenizers.Tokenizer``; ``eos_token_id`` from ``tokenizer_config.json``'s
    ``eos_token`` when the file is there, else None."""

    def __init__(self, tokenizer, eos_token_id: Optional[int] = None, path: Optional[str] = None):
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def load_tokenizer(path) -> HFTokenizer:
    """The tokenizer of a checkpoint: ``path`` is its directory (holding ``tokenizer.json``)
    or the ``tokenizer.json`` file itself. Raises FileNotFoundError when there is none and
    ImportError naming the package when ``tokenizers`` is not installed."""
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
    eos_token_id = None
    config = os.path.join(os.path.dirname(file), _TOKENIZER_CONFIG)
    if os.path.isfile(config):
        with open(config) as f:
            eos = json.load(f).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            eos_token_id = tokenizer.token_to_id(eos)
    return HFTokenizer(tokenizer, eos_token_id, file)


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
