"""GenerationConfig: everything a ``generate`` call decides, in one frozen, validated object.

The fields fall in six groups: sampling (temperature, top_k, top_p, min_p, seed), stopping
(max_new_tokens, stop_token_ids, stop_strings, ignore_eos), search (num_samples, best_of,
num_beams, length_penalty), constraints (constraint, allowed_tokens), what comes back
(return_logprobs, num_logprobs, return_result) and the KV cache (kv_cache, block_size,
cuda_graphs). Each is checked when the config is made, so a mistake is reported where it is
written; what depends on the model (token ids against its vocabulary, lengths against its
``max_seq_len``) is checked by ``generate``.

The four sampling filters take one value for every prompt or a sequence of one per prompt,
as ``fmkernels.sample`` takes a scalar or a per-row tensor; a prompt's samples share its
values.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

PerPrompt = Union[float, int, Sequence[Union[float, int]]]

_KV_CACHES = ("contiguous", "paged")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _per_prompt(name: str, value, check, expected: str):
    """``value`` as a float/int or a tuple of them, each passing ``check``."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1):
        values = tuple(value.tolist() if hasattr(value, "tolist") else value)
        if not values:
            raise ValueError(f"{name} must be a value or a non-empty sequence of one per prompt, got an empty one")
        for i, v in enumerate(values):
            if not check(v):
                raise ValueError(f"{name}[{i}] must be {expected}, got {v!r}")
        return values
    if not check(value):
        raise ValueError(f"{name} must be {expected} (or a sequence of one per prompt), got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What ``generate(model, prompts, config)`` does; ``dataclasses.replace(config, ...)`` or
    ``config.replace(...)`` gives a changed copy, and keywords to ``generate`` override fields.

    Sampling
    --------
    temperature : 0 is greedy; else logits / temperature. Per prompt or one for all.
    top_k : keep the k most likely tokens; 0 is off. Per prompt or one for all.
    top_p : keep the smallest set of most likely tokens whose mass reaches p; 1 is off.
    min_p : drop tokens below min_p times the most likely one's probability; 0 is off.
    seed : prompt b draws with seed ``seed + b`` at step t for its t-th token (sample j of
        prompt b with ``seed + b * num_samples + j``); None draws the base seed from torch's
        default generator.

    Stopping
    --------
    max_new_tokens : the token budget of each sequence (>= 1).
    stop_token_ids : tokens that end a sequence (kept as its last token).
    stop_strings : strings that end a sequence once the decoded new text holds one (needs a
        tokenizer); the result's text is cut before it.
    ignore_eos : do not stop at the config's or tokenizer's EOS tokens.

    Search
    ------
    num_samples : n >= 1 samples per prompt, prefilled once and forked.
    best_of : keep only each prompt's sample with the highest mean model log-probability.
    num_beams : beam search with B beams (temperature must be 0); None is off.
    length_penalty : a finished beam's score is ``sum(logprobs) / len(tokens) ** length_penalty``.

    Constraints
    -----------
    constraint : structured output (``fmkernels.model.structured``): one constraint for every
        prompt, or a sequence with one per prompt (None leaves a prompt free).
    allowed_tokens : ``allowed_tokens(prompt_index, generated_ids)`` -> the ids allowed next (a
        list or int tensor, or a bool mask over the vocabulary), or None; not with ``constraint``.

    Results
    -------
    return_logprobs : return a ``GenerationResult`` with each token's log-probability.
    num_logprobs : with ``return_logprobs``, also the top ``num_logprobs`` alternatives per step.
    return_result : return a ``GenerationResult`` (finish reasons, texts) rather than token lists.

    KV cache
    --------
    kv_cache : "contiguous" (a row of max length per sequence) or "paged" (blocks).
    block_size : tokens per block of a paged cache.
    cuda_graphs : "auto", True or False: run each decode step on static buffers, captured in
        CUDA graphs on a CUDA model (``fmkernels.model.generation.decode_graphs``).
    """

    max_new_tokens: int
    temperature: PerPrompt = 0.0
    top_k: PerPrompt = 0
    top_p: PerPrompt = 1.0
    min_p: PerPrompt = 0.0
    seed: Optional[int] = None
    stop_token_ids: Tuple[int, ...] = ()
    stop_strings: Tuple[str, ...] = ()
    ignore_eos: bool = False
    num_samples: int = 1
    best_of: bool = False
    num_beams: Optional[int] = None
    length_penalty: float = 1.0
    constraint: Any = None
    allowed_tokens: Optional[Callable[[int, List[int]], object]] = None
    return_logprobs: bool = False
    num_logprobs: int = 0
    return_result: bool = False
    kv_cache: str = "contiguous"
    block_size: int = 16
    cuda_graphs: Union[str, bool] = "auto"

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731
        put("temperature", _per_prompt("temperature", self.temperature,
                                       lambda v: real(v) and math.isfinite(v) and v >= 0, "a number >= 0 (0 is greedy)"))
        put("top_k", _per_prompt("top_k", self.top_k, lambda v: _is_int(v) and v >= 0, "an int >= 0 (0 is off)"))
        put("top_p", _per_prompt("top_p", self.top_p, lambda v: real(v) and 0 < v <= 1, "in (0, 1]"))
        put("min_p", _per_prompt("min_p", self.min_p, lambda v: real(v) and 0 <= v <= 1, "in [0, 1]"))
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**62):
            raise ValueError(f"seed must be None or an int in [0, 2**62), got {self.seed!r}")
        put("stop_token_ids", self._token_ids(self.stop_token_ids))
        put("stop_strings", self._stop_strings(self.stop_strings))
        for name in ("ignore_eos", "best_of", "return_logprobs", "return_result"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if not _is_int(self.num_samples) or self.num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {self.num_samples!r}")
        if not real(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not _is_int(self.num_logprobs) or self.num_logprobs < 0:
            raise ValueError(f"num_logprobs must be an int >= 0, got {self.num_logprobs!r}")
        if self.num_logprobs and not self.return_logprobs:
            raise ValueError("num_logprobs > 0 needs return_logprobs=True")
        if self.allowed_tokens is not None and not callable(self.allowed_tokens):
            raise TypeError("allowed_tokens must be callable as allowed_tokens(prompt_index, generated_ids), "
                            f"got {self.allowed_tokens!r}")
        if isinstance(self.constraint, list):
            put("constraint", tuple(self.constraint))
        if self.constraint is not None and self.allowed_tokens is not None:
            raise ValueError("pass constraint or allowed_tokens, not both")
        if self.kv_cache not in _KV_CACHES:
            raise ValueError(f"kv_cache must be 'contiguous' or 'paged', got {self.kv_cache!r}")
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")
        if not (isinstance(self.cuda_graphs, bool) or self.cuda_graphs == "auto"):
            raise ValueError(f"cuda_graphs must be 'auto', True or False, got {self.cuda_graphs!r}")
        self._check_search()

    @staticmethod
    def _token_ids(ids) -> Tuple[int, ...]:
        if ids is None:
            return ()
        if _is_int(ids):
            ids = (ids,)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple, set, frozenset)):
            raise TypeError(f"stop_token_ids must be a sequence of token ids, got {type(ids).__name__}")
        for token in ids:
            if not _is_int(token) or token < 0:
                raise ValueError(f"stop_token_ids must be token ids >= 0, got {token!r}")
        return tuple(int(t) for t in ids)

    @staticmethod
    def _stop_strings(strings) -> Tuple[str, ...]:
        if strings is None:
            return ()
        if isinstance(strings, str):
            strings = (strings,)
        if not isinstance(strings, (list, tuple)):
            raise TypeError(f"stop_strings must be a string or a sequence of strings, got {type(strings).__name__}")
        for s in strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop_strings must be non-empty strings, got {s!r}")
        return tuple(strings)

    def _check_search(self) -> None:
        if self.num_beams is None:
            return
        if not _is_int(self.num_beams) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {self.num_beams!r}")
        if self.temperature != 0:
            raise ValueError(f"num_beams is deterministic beam search: it takes no sampling (temperature must be 0, "
                             f"got {self.temperature!r})")
        if self.num_samples != 1 or self.best_of:
            raise ValueError("num_beams cannot be combined with num_samples > 1 or best_of")
        if self.stop_strings:
            raise ValueError("num_beams does not support stop_strings; use stop_token_ids")
        if self.num_logprobs:
            raise ValueError("num_beams does not support num_logprobs")

    def replace(self, **changes) -> "GenerationConfig":
        """A copy with ``changes`` applied (and validated); an unknown field raises TypeError."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise TypeError(f"GenerationConfig has no field {unknown[0]!r}; fields: {', '.join(sorted(fields))}")
        return dataclasses.replace(self, **changes)

    @property
    def per_prompt(self) -> bool:
        """Whether a sampling filter has one value per prompt."""
        return any(isinstance(getattr(self, name), tuple) for name in ("temperature", "top_k", "top_p", "min_p"))

    @property
    def returns_result(self) -> bool:
        """Whether ``generate`` returns a ``GenerationResult`` (else token lists)."""
        return self.return_result or self.return_logprobs
