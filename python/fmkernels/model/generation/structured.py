"""Structured output for ``generate``: constraints on what a sequence may emit.

A constraint is compiled, once per ``generate`` call, against the tokenizer into a matcher per
sequence: at each step the matcher writes the tokens that keep the output valid into the row's
packed int32 bitmask (batch, ceil(vocab / 32)), which ``fmkernels.sample`` takes as ``allowed``
(the mask is applied inside the sampling kernels), and then consumes the token drawn.

- ``json_schema(schema)``: JSON valid under a JSON schema (a dict, a JSON string, or a pydantic
  model class); ``json_object()``: any JSON object; ``regex(pattern)``: text matching a regular
  expression in full; ``grammar(lark)``: an EBNF grammar in llguidance's Lark syntax. These
  need the grammar engine llguidance (``pip install 'fmkernels[structured]'``); bench/README.md
  says why it was chosen over xgrammar.
- ``choices(options)``: exactly one of a list of strings, with no dependency (a prefix trie of
  the options' token ids).
- ``generate``'s ``allowed_tokens(prompt_index, generated_ids)`` callbacks, as a matcher too;
  ``choice_constraint(tokenizer, choices)`` is a ready one (the trie ``choices`` compiles to).

A sequence ends with the end-of-sequence token, which the mask allows only where the output is
complete (and forces where nothing may follow); a sequence cut by ``max_new_tokens`` first ends
with finish reason "length", its output incomplete.
"""

from __future__ import annotations

import abc
import json
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import numpy
import torch

from ... import reference
from ...ops.sampling import first_row_without_allowed, pack_allowed

_INSTALL = "pip install 'fmkernels[structured]'"


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:
        raise ImportError(f"JSON-schema, regex and grammar constraints need llguidance: {_INSTALL}") from exc
    return llguidance


class Constraint(abc.ABC):
    """What a sequence may emit; make one with ``json_schema``, ``json_object``, ``regex``,
    ``grammar`` or ``choices``. ``kind`` names it, ``source`` is what it was made from."""

    kind: str = ""

    def __init__(self, source):
        self.source = source

    def __repr__(self) -> str:
        text = repr(self.source)
        return f"{self.kind}({text if len(text) <= 60 else text[:57] + '...'})"

    @abc.abstractmethod
    def compile(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> "Matcher":
        """A matcher in its initial state (the first generated token comes next)."""


class _GrammarConstraint(Constraint):
    """A constraint llguidance compiles: ``grammar_text`` is its grammar in llguidance's form."""

    def __init__(self, source, grammar_text: str):
        super().__init__(source)
        self.grammar_text = grammar_text

    def compile(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> "Matcher":
        llguidance = _llguidance()
        engine_tokenizer = _engine_tokenizer(tokenizer, vocab_size, tuple(eos_token_ids))
        matcher = llguidance.LLMatcher(engine_tokenizer, self.grammar_text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"{self!r} does not compile: {matcher.get_error()}")
        return _EngineMatcher(matcher, vocab_size, self)


class _JSONSchema(_GrammarConstraint):
    kind = "json_schema"


class _JSONObject(_GrammarConstraint):
    kind = "json_object"


class _Regex(_GrammarConstraint):
    kind = "regex"


class _Grammar(_GrammarConstraint):
    kind = "grammar"


def _validated(grammar_text: str, problem: str) -> str:
    """``grammar_text`` if llguidance compiles it, else ValueError(problem: llguidance's error)."""
    error = _llguidance().LLMatcher.validate_grammar(grammar_text)
    if error:
        raise ValueError(f"{problem}: {error}")
    return grammar_text


# The whitespace json_schema allows between JSON tokens, as llguidance's compile options.
WHITESPACE = {
    # A newline and up to 32 spaces of indentation, or one space: what json.dumps writes with
    # or without indent=, and no room for a model to pad its output with blank lines forever.
    "pretty": {"whitespace_pattern": r"(\n[ ]{0,32}|[ ])"},
    "compact": {"whitespace_flexible": False},  # none: the fewest tokens
    "any": {"whitespace_flexible": True},  # any run of JSON whitespace
}


def json_schema(schema, *, whitespace: str = "pretty") -> Constraint:
    """JSON valid under ``schema``: a dict, a JSON string, or a pydantic model class (its
    ``model_json_schema()``). ``whitespace`` between JSON tokens: "pretty" (a newline and up to
    32 spaces, or one space), "compact" (none) or "any" (any JSON whitespace; a small model may
    then write blank lines until max_new_tokens)."""
    if whitespace not in WHITESPACE:
        raise ValueError(f"whitespace must be one of {', '.join(map(repr, WHITESPACE))}, got {whitespace!r}")
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise TypeError(f"schema must be a dict, a JSON string or a pydantic model class, got {type(schema).__name__}")
    grammar_text = _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=WHITESPACE[whitespace])
    return _JSONSchema(schema, _validated(grammar_text, "schema is not a JSON schema llguidance can enforce"))


def json_object(*, whitespace: str = "pretty") -> Constraint:
    """Any JSON object (``whitespace`` as in ``json_schema``)."""
    constraint = json_schema({"type": "object"}, whitespace=whitespace)
    return _JSONObject("any JSON object", constraint.grammar_text)


def regex(pattern: str) -> Constraint:
    """Text that matches ``pattern`` in full (``re.fullmatch``); llguidance's regex syntax (Rust's
    regex crate: no backreferences or lookaround)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty str, got {pattern!r}")
    grammar_text = _llguidance().LLMatcher.grammar_from_regex(pattern)
    return _Regex(pattern, _validated(grammar_text, f"pattern {pattern!r} is not a regular expression llguidance accepts"))


def grammar(lark: str) -> Constraint:
    """Text in the language of an EBNF grammar in llguidance's Lark syntax (start rule ``start``;
    see llguidance's docs/syntax.md), for example ``start: "yes" | "no"``."""
    if not isinstance(lark, str) or not lark.strip():
        raise ValueError(f"lark must be a non-empty grammar text, got {lark!r}")
    grammar_text = _llguidance().LLMatcher.grammar_from_lark(lark)
    return _Grammar(lark, _validated(grammar_text, "the grammar does not compile"))


class _Choices(Constraint):
    kind = "choices"

    def compile(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> "Matcher":
        return _ChoiceMatcher(ChoiceConstraint(tokenizer, self.source), 0, vocab_size, self)


def choices(options: Sequence[str]) -> Constraint:
    """Exactly one of ``options`` (as the tokenizer encodes it), then the end-of-sequence token.
    Needs no grammar engine."""
    if isinstance(options, str) or not isinstance(options, (list, tuple)):
        raise TypeError(f"options must be a list of strings, got {type(options).__name__}")
    if not options or not all(isinstance(o, str) and o for o in options):
        raise ValueError(f"options must be a non-empty list of non-empty strings, got {options!r}")
    return _Choices(list(options))


def as_constraint(value, name: str = "constraint") -> Optional[Constraint]:
    """A constraint, or a dict (a JSON schema), or None."""
    if value is None or isinstance(value, Constraint):
        return value
    if isinstance(value, dict) or (isinstance(value, type) and hasattr(value, "model_json_schema")):
        return json_schema(value)
    raise TypeError(f"{name} must be a fmkernels.model.structured constraint (json_schema, json_object, regex, "
                    f"grammar, choices), a JSON-schema dict or None, got {type(value).__name__}")


# ----------------------------------------------------------------------------
# Matchers: one per sequence
# ----------------------------------------------------------------------------


class Matcher(abc.ABC):
    """One sequence's constraint state."""

    constraint: Constraint

    @abc.abstractmethod
    def fill(self, row: numpy.ndarray) -> None:
        """Write the allowed next tokens into ``row``, int32 (ceil(vocab / 32),), every word."""

    @abc.abstractmethod
    def consume(self, token: int) -> None:
        """Advance past ``token``; ValueError if the constraint does not allow it."""

    @abc.abstractmethod
    def fork(self) -> "Matcher":
        """An independent copy of this state (a beam chosen twice, a sample of n)."""


# The engine's tokenizers by the fmkernels tokenizer they read (reading one costs tens of ms).
_ENGINE_TOKENIZERS: "weakref.WeakKeyDictionary[Any, Dict[tuple, Any]]" = weakref.WeakKeyDictionary()


def _engine_tokenizer(tokenizer, vocab_size: int, eos_token_ids: tuple):
    """llguidance's tokenizer for an fmkernels ``HFTokenizer`` (it reads the tokenizer.json the
    ``tokenizers`` library holds), over the model's vocabulary, with ``eos_token_ids`` as the
    tokens that end a complete output."""
    backend = getattr(tokenizer, "tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError("JSON-schema, regex and grammar constraints need a Hugging Face tokenizer "
                         f"(tokenizer.json or a GGUF file's), got {type(tokenizer).__name__}")
    if not eos_token_ids:
        raise ValueError("a constraint needs an end-of-sequence token to end a complete output: the tokenizer "
                         "has no eos_token_id and the model's config no eos_token_ids")
    cache = _ENGINE_TOKENIZERS.setdefault(tokenizer, {})
    key = (vocab_size, eos_token_ids)
    if key not in cache:
        cache[key] = _llguidance().LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids))
    return cache[key]


class _EngineMatcher(Matcher):
    def __init__(self, matcher, vocab_size: int, constraint: Constraint):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.constraint = constraint

    def fill(self, row: numpy.ndarray) -> None:
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        if self.matcher.is_error():
            raise ValueError(f"{self.constraint!r}: {self.matcher.get_error()}")

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise ValueError(f"{self.constraint!r} does not allow token {token}: {self.matcher.get_error()}")

    def fork(self) -> "Matcher":
        return _EngineMatcher(self.matcher.deep_copy(), self.vocab_size, self.constraint)


def pack_ids(row: numpy.ndarray, ids) -> None:
    """Set ``row`` (int32 words) to allow exactly ``ids``."""
    row[:] = 0
    ids = numpy.asarray(ids, dtype=numpy.int64)
    if ids.size:
        numpy.bitwise_or.at(row.view(numpy.uint32), ids >> 5, (numpy.uint32(1) << (ids & 31).astype(numpy.uint32)))


class _ChoiceMatcher(Matcher):
    def __init__(self, trie, node: int, vocab_size: int, constraint: Constraint):
        self.trie, self.node, self.vocab_size, self.constraint = trie, node, vocab_size, constraint

    def fill(self, row: numpy.ndarray) -> None:
        pack_ids(row, self.trie.allowed_at(self.node))

    def consume(self, token: int) -> None:
        if token == self.trie.eos_token_id and self.trie.is_complete(self.node):
            return
        self.node = self.trie.child(self.node, int(token))

    def fork(self) -> "Matcher":
        return _ChoiceMatcher(self.trie, self.node, self.vocab_size, self.constraint)


class _CallbackMatcher(Matcher):
    """``generate``'s ``allowed_tokens(prompt_index, generated_ids)`` as a matcher."""

    def __init__(self, callback, prompt_index: int, vocab_size: int, generated: Optional[List[int]] = None):
        self.callback, self.prompt_index, self.vocab_size = callback, prompt_index, vocab_size
        self.generated = [] if generated is None else generated
        self.constraint = None

    def fill(self, row: numpy.ndarray) -> None:
        mask = allowed_mask(self.callback(self.prompt_index, list(self.generated)), self.vocab_size,
                            self.prompt_index, len(self.generated))
        if mask is None:
            row[:] = -1
            return
        row[:] = pack_allowed(mask).numpy()

    def consume(self, token: int) -> None:
        self.generated.append(int(token))

    def fork(self) -> "Matcher":
        return _CallbackMatcher(self.callback, self.prompt_index, self.vocab_size, list(self.generated))


def callback_matcher(callback, prompt_index: int, vocab_size: int) -> Matcher:
    return _CallbackMatcher(callback, prompt_index, vocab_size)


class RowMasks:
    """The packed bitmask of a decode batch, filled by each row's matcher (None: unconstrained,
    every bit set). Rows of several matchers are filled in parallel by llguidance's executor."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.words = reference.allowed_words(vocab_size)
        self._buffer = numpy.empty((0, self.words), dtype=numpy.int32)
        self._executor = None

    def fill(self, matchers: Sequence[Optional[Matcher]], describe) -> torch.Tensor:
        """(rows, words) int32 for ``matchers``; ``describe(row)`` names a row in an error (the
        prompt, the step) when its constraint allows no token."""
        rows = len(matchers)
        if self._buffer.shape[0] < rows:
            self._buffer = numpy.empty((max(rows, 2 * self._buffer.shape[0]), self.words), dtype=numpy.int32)
        bits = self._buffer[:rows]
        engine = [(m.matcher, r) for r, m in enumerate(matchers) if isinstance(m, _EngineMatcher)]
        if len(engine) > 1:
            if self._executor is None:
                self._executor = _llguidance().LLExecutor()
            # One call fills every engine row, in parallel (the rows are contiguous, words * 4 bytes apart).
            self._executor.unsafe_compute_mask_ptr(engine, bits.ctypes.data, self.words * 4, rows)
        for r, matcher in enumerate(matchers):
            if matcher is None:
                bits[r] = -1
            elif len(engine) <= 1 or not isinstance(matcher, _EngineMatcher):
                matcher.fill(bits[r])
            elif matcher.matcher.is_error():
                raise ValueError(f"{matcher.constraint!r} at {describe(r)}: {matcher.matcher.get_error()}")
        row = first_row_without_allowed(torch.from_numpy(bits), self.vocab_size)
        if row >= 0:
            what = repr(matchers[row].constraint) if matchers[row].constraint is not None else "allowed_tokens"
            raise ValueError(f"{what} allows no token at {describe(row)}")
        return torch.from_numpy(bits.copy())


# ----------------------------------------------------------------------------
# Token callbacks: allowed_tokens and choice_constraint
# ----------------------------------------------------------------------------

AllowedTokens = Callable[[int, List[int]], object]


def allowed_mask(allowed, vocab_size: int, prompt_index: int, step: int) -> Optional[torch.Tensor]:
    """A callback's answer as a bool mask (vocab,), or None for no constraint at this step."""
    if allowed is None:
        return None
    where = f"allowed_tokens(prompt {prompt_index}, step {step})"
    if isinstance(allowed, torch.Tensor) and allowed.dtype == torch.bool:
        if allowed.shape != (vocab_size,):
            raise ValueError(f"{where} returned a bool mask of shape {tuple(allowed.shape)}, expected ({vocab_size},)")
        mask = allowed.cpu()
    else:
        ids = torch.as_tensor(allowed.tolist() if isinstance(allowed, torch.Tensor) else list(allowed),
                              dtype=torch.int64).reshape(-1)
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{where} returned token ids outside the vocabulary [0, {vocab_size})")
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[ids] = True
    if not mask.any():
        raise ValueError(f"{where} allows no token: a constraint must leave at least one token allowed")
    return mask


class ChoiceConstraint:
    """An ``allowed_tokens`` callback that restricts the output to one of ``choices``: a prefix
    trie over the choices' token ids, with EOS allowed only where a choice is complete.
    ``generate`` also ends a sequence at this constraint's ``eos_token_id``."""

    def __init__(self, tokenizer, choices: Sequence[str]):
        if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
            raise TypeError(f"choices must be a list of strings, got {type(choices).__name__}")
        if not choices:
            raise ValueError("choices must hold at least one string, got none")
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("choice_constraint needs a tokenizer with an eos_token_id to end a complete choice")
        self.eos_token_id = int(eos)
        self.choices = list(choices)
        self._children: List[Dict[int, int]] = [{}]
        self._complete: Set[int] = set()
        for choice in self.choices:
            if not isinstance(choice, str) or not choice:
                raise ValueError(f"choices must be non-empty strings, got {choice!r}")
            try:
                ids = tokenizer.encode(choice, add_special_tokens=False)
            except TypeError:
                ids = tokenizer.encode(choice)
            if self.eos_token_id in ids:
                raise ValueError(f"choice {choice!r} encodes to the EOS token {self.eos_token_id}")
            node = 0
            for token in ids:
                node = self._children[node].setdefault(int(token), len(self._children))
                if node == len(self._children):
                    self._children.append({})
            self._complete.add(node)

    def child(self, node: int, token: int) -> int:
        """The trie node after ``token`` at ``node``; ValueError where no choice goes on with it."""
        if int(token) not in self._children[node]:
            raise ValueError(f"token {token} leaves the choices' trie: no choice goes on with it")
        return self._children[node][int(token)]

    def is_complete(self, node: int) -> bool:
        return node in self._complete

    def allowed_at(self, node: int) -> List[int]:
        """The tokens allowed at ``node``: each choice's next token, and EOS where a choice is complete."""
        allowed = sorted(self._children[node])
        if node in self._complete:
            allowed.append(self.eos_token_id)
        return allowed

    def __call__(self, prompt_index: int, generated: Sequence[int]) -> List[int]:
        node = 0
        for token in generated:
            try:
                node = self.child(node, token)
            except ValueError:
                raise ValueError(f"generated tokens {list(generated)} left the choices' trie at token {token}") from None
        return self.allowed_at(node)


def choice_constraint(tokenizer, choices: Sequence[str]) -> ChoiceConstraint:
    """An ``allowed_tokens`` constraint for ``generate``: the new text is exactly one of ``choices``
    followed by the tokenizer's EOS (kept as the last token). ``max_new_tokens`` must leave room
    for the longest choice's tokens plus EOS, or a sequence stops at the budget mid-choice."""
    return ChoiceConstraint(tokenizer, choices)
