"""fmkernels.filter_logits and fmkernels.sample: temperature, top-k, top-p, min-p, and the draw."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy
import torch

from .. import _validation as check
from .. import platform, reference
from .._views import tensor_view
from ..reference import SampleOutput
from ._dispatch import into_out, require_backend, run
from .._signature import SignatureCache, check_once, signature
from ._library import PerRow, call, join_per_row, split_per_row

_PARAMETERS_DOC = """temperature : float or Tensor (batch,)
        Divides the logits; >= 0, and 0 means greedy (the argmax, lowest id on ties).
    top_k : int or Tensor (batch,) of ints
        Keep the k most likely tokens (ties by lower id); >= 0, and 0 means off.
    top_p : float or Tensor (batch,)
        Keep the smallest prefix of tokens, by descending probability, whose mass
        reaches p (at least one token); in (0, 1], and 1 means off.
    min_p : float or Tensor (batch,)
        Keep tokens at least min_p times as likely as the most likely; in [0, 1], 0 means off.
    allowed : Tensor (batch, ceil(vocab / 32)) int32, optional
        A packed token bitmask (the layout llguidance and xgrammar fill): token t is allowed
        when bit t % 32 of word t // 32 is set; bits past the vocabulary are ignored. The
        tokens it does not allow are -inf before temperature, top-k, top-p and min-p, so the
        filters act on the allowed distribution (and log-probabilities are under it). Every
        row must allow a token whose logit is not -inf. ``fmkernels.pack_allowed`` makes one
        from a bool mask.
    A tensor parameter's values are checked (on a GPU, at the cost of a host synchronisation,
    unless ``fmkernels.device_checks(False)`` is in effect or a CUDA graph is being captured)."""


#: The range of each per-row parameter, as require_per_row and require_row_values take it.
_BOUNDS = {
    # The logits are divided in fp32, so a temperature past fp32's range would overflow.
    "temperature": dict(low=0.0, high=torch.finfo(torch.float32).max),
    "top_k": dict(low=0, high=2**63 - 1),
    "top_p": dict(low=0.0, high=1.0, low_inclusive=False),
    "min_p": dict(low=0.0, high=1.0),
    "seed": dict(low=0, high=2**63 - 1),
    "step": dict(low=0, high=2**63 - 1),
}
_INTEGRAL = ("top_k", "seed", "step")
_INT64_MAX = 2**63 - 1


def _require_parameter(name: str, value, batch: int, device) -> None:
    check.require_per_row(name, value, batch, device, integral=name in _INTEGRAL, **_BOUNDS[name])


def _validate(logits, temperature, top_k, top_p, min_p, allowed, backend) -> None:
    """What can be checked without reading a device tensor; ``_require_values`` does the rest."""
    check.require_tensor("logits", logits)
    check.require_dtype("logits", logits, check.FLOAT_DTYPES)
    check.require_rank("logits", logits, 2, "(batch, vocab)")
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError(f"logits must have a non-empty vocabulary, got shape {tuple(logits.shape)}")
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        _require_parameter(name, value, batch, logits.device)
    if allowed is not None:
        check.require_tensor("allowed", allowed)
        check.require_dtype("allowed", allowed, (torch.int32,))
        check.require_shape("allowed", allowed, (batch, reference.allowed_words(vocab)),
                            f"(batch, ceil(vocab / 32)) for logits of shape {tuple(logits.shape)}")
        check.require_same_device(("logits", "allowed"), (logits, allowed))
    require_backend(backend)


def _require_values(logits: torch.Tensor, parameters, allowed=None) -> None:
    """Per-row parameter tensors (among ``parameters``, by name) in their ranges, and logits
    finite or -inf with something to keep in every row (a token ``allowed`` allows, where it is
    given), for each tensor ``checks_values`` allows. Where it does not (GPU tensors with device checks off, or a CUDA graph capture),
    an out-of-range parameter or a NaN or +inf logit is not reported, and the kernels, which
    index by the shapes alone, still stay inside their tensors.
    """
    for name, value in parameters.items():
        if isinstance(value, torch.Tensor) and check.checks_values(value):
            check.require_row_values(name, value, **_BOUNDS[name])
    if logits.shape[0] == 0 or not check.checks_values(logits):
        return
    vocab = logits.shape[1]
    # One pass in the common case: a finite sum means no NaN or inf anywhere (a -inf, or a sum
    # that overflows, takes the element-wise checks below). It runs first, while torch's threads
    # are awake from the call before.
    finite = math.isfinite(logits.sum(dtype=torch.float32).item())
    if allowed is not None:
        _require_allowed_rows(allowed, vocab)
    if finite:
        return
    # A NaN or +inf logit would be sampled from silently; a row of -inf has nothing to sample.
    bad = torch.isnan(logits) | torch.isposinf(logits)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"logits must be finite or -inf, got logits[{row}, {col}] = {logits[row, col].item()}")
    empty = torch.isneginf(logits).all(dim=1)
    if empty.any():
        row = int(empty.nonzero()[0, 0])
        raise ValueError(f"logits[{row}] is -inf everywhere: there is no token to keep")
    if allowed is not None:
        empty = (torch.isneginf(logits) | ~reference.unpack_allowed(allowed, vocab)).all(dim=1)
        if empty.any():
            row = int(empty.nonzero()[0, 0])
            raise ValueError(f"logits[{row}] is -inf at every token allowed[{row}] allows: there is no token to keep")


def _require_allowed_rows(allowed: torch.Tensor, vocab: int) -> None:
    """Every row of the bitmask allows a token inside the vocabulary (its words are read, not unpacked)."""
    if not check.checks_values(allowed):
        return
    row = first_row_without_allowed(allowed, vocab)
    if row >= 0:
        raise ValueError(f"allowed[{row}] allows no token of the vocabulary ({vocab} tokens): there is nothing to sample")


def first_row_without_allowed(allowed: torch.Tensor, vocab: int) -> int:
    """The first row of a packed bitmask (batch, ceil(vocab / 32)) int32 that allows no token
    of the vocabulary (bits past it do not count), or -1. Reads the words; this runs at every
    decode step, so a CPU tensor goes through the C++ loop (about a µs) or NumPy, not torch."""
    tail = vocab % 32
    cpu = platform.cpu_module() if allowed.device.type == "cpu" else None
    if cpu is not None and hasattr(cpu, "first_row_without_allowed") and allowed.stride(-1) == 1:
        return cpu.first_row_without_allowed(tensor_view(allowed), vocab)
    if allowed.device.type == "cpu":
        words = allowed.numpy()
        if tail:
            some = numpy.bitwise_or.reduce(words[:, :-1], axis=1) | (words[:, -1] & ((1 << tail) - 1))
        else:
            some = numpy.bitwise_or.reduce(words, axis=1)
        empty = numpy.flatnonzero(some == 0)
        return int(empty[0]) if empty.size else -1
    last = allowed[:, -1] & ((1 << tail) - 1 if tail else -1)
    empty = ((allowed[:, :-1] == 0).all(dim=1) & (last == 0)).nonzero()
    return int(empty[0, 0]) if len(empty) else -1


# Signatures of calls whose arguments passed ``_require_filter_arguments`` / ``_require_sample_arguments``.
_FILTER_CHECKED = SignatureCache()
_SAMPLE_CHECKED = SignatureCache()


def _require_filter_arguments(logits, temperature, top_k, top_p, min_p, allowed, backend, out) -> None:
    """filter_logits' checks of what its arguments' metadata (and scalar parameters) say."""
    _validate(logits, temperature, top_k, top_p, min_p, allowed, backend)
    check.require_out(out, logits.shape, logits.dtype, logits.device)


def _require_sample_arguments(logits, temperature, top_k, top_p, min_p, allowed, return_logprobs, num_logprobs,
                              backend, out) -> None:
    """sample's checks of what its arguments' metadata (and scalar parameters) say, but for
    the seed and the step."""
    _validate(logits, temperature, top_k, top_p, min_p, allowed, backend)
    batch, vocab = logits.shape
    check.require_bool("return_logprobs", return_logprobs)
    if isinstance(num_logprobs, bool) or not isinstance(num_logprobs, int):
        raise TypeError(f"num_logprobs must be an int, got {type(num_logprobs).__name__}")
    if not 0 <= num_logprobs <= vocab:
        raise ValueError(f"num_logprobs must be in [0, vocab={vocab}], got {num_logprobs}")
    if num_logprobs and not return_logprobs:
        raise ValueError("num_logprobs > 0 needs return_logprobs=True")
    check.require_out(out, (batch,), torch.int64, logits.device)


def _kind(value):
    """What the choice of implementation may read of a seed or a step: a tensor's signature
    (None for a tensor that has none), else the type."""
    return signature((value,)) if isinstance(value, torch.Tensor) else type(value)


def _as(value: Optional[PerRow], scalar_type):
    """A per-row parameter as the implementations take it: a tensor or None as it is, a
    scalar as ``scalar_type``."""
    return value if value is None or isinstance(value, torch.Tensor) else scalar_type(value)


def _filter_schema(logits, temperature, top_k, top_p, min_p, allowed, backend):
    """filter_logits' implementation arguments as its custom op's: each parameter a (scalar, rows) pair."""
    return (logits, *split_per_row(temperature, float), *split_per_row(top_k, int),
            *split_per_row(top_p, float), *split_per_row(min_p, float), allowed, backend)


def _sample_schema(logits, temperature, top_k, top_p, min_p, allowed, seed, step, return_logprobs, num_logprobs,
                   backend):
    """sample's implementation arguments as its custom op's: each parameter a (scalar, rows) pair."""
    return (*_filter_schema(logits, temperature, top_k, top_p, min_p, allowed, backend)[:-1],
            *split_per_row(seed, int), *split_per_row(step, int), return_logprobs, num_logprobs, backend)


def filter_logits(
    logits: torch.Tensor,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    min_p: PerRow = 0.0,
    allowed: Optional[torch.Tensor] = None,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Temperature-scaled logits with every token the filters remove set to -inf.

    In this order: allowed -> logits / temperature -> top-k -> top-p -> min-p; each filter
    sees the distribution the previous one left. softmax of the result is the distribution
    ``sample`` draws from.

    Parameters
    ----------
    logits : Tensor (batch, vocab)
        float32, float16 or bfloat16; finite or -inf (a -inf token is never kept).
    {params}
    backend : str
        "auto" or an implementation's name.
    out : Tensor, optional
        Buffer for the result, shaped and typed like logits.

    Returns
    -------
    Tensor (batch, vocab), logits' dtype.
    """
    key = check_once(_FILTER_CHECKED, _require_filter_arguments,
                     (logits, temperature, top_k, top_p, min_p, allowed, backend, out))
    result = call(
        _filter_logits_op, _execute_filter_logits, key,
        logits, _as(temperature, float), _as(top_k, int), _as(top_p, float), _as(min_p, float), allowed, backend,
        schema=_filter_schema,
    )
    return into_out(result, out)


def sample(
    logits: torch.Tensor,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    min_p: PerRow = 0.0,
    allowed: Optional[torch.Tensor] = None,
    seed: Optional[PerRow] = None,
    step: PerRow = 0,
    return_logprobs: bool = False,
    num_logprobs: int = 0,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
):
    """Draw one token per row from the filtered distribution (see ``filter_logits``).

    Draws are reproducible and independent of the batch around a row: token i of row b
    gets a uniform number from Philox4x32-10 keyed by the row's seed, with the step in the
    counter, and the row's token is the argmax of filtered_logit - log(-log u) (Gumbel-max).

    Parameters
    ----------
    logits : Tensor (batch, vocab)
        float32, float16 or bfloat16; finite or -inf. NaN or +inf raises ValueError (on a
        GPU unless device checks are off: ``fmkernels.device_checks``).
    {params}
    seed : int, Tensor (batch,) of ints, or None
        Row seeds in [0, 2**63). A tensor gives each row its own seed, so a row's token
        does not depend on its batch; an int s gives row b the seed s + b; None draws s
        from torch's default generator (on the host, at each call; a CUDA graph captures
        the value drawn at capture, so give it tensor seeds).
    step : int or Tensor (batch,) of ints
        The decode step, >= 0; the same seed at another step gives a fresh draw.
    return_logprobs : bool
        Also return the chosen token's log-probability and the top ``num_logprobs``
        alternatives, all under the filtered distribution.
    num_logprobs : int
        How many alternatives, 0 <= num_logprobs <= vocab.
    backend : str
        "auto" or an implementation's name.
    out : Tensor (batch,) int64, optional
        Buffer for the tokens; it is the tensor returned (as ``tokens`` with logprobs).

    Returns
    -------
    tokens : Tensor (batch,) int64; or, with ``return_logprobs``, a ``SampleOutput``
        (tokens, logprobs (batch,) float32, top_ids (batch, num_logprobs) int64,
        top_logprobs (batch, num_logprobs) float32).
    """
    key = check_once(_SAMPLE_CHECKED, _require_sample_arguments,
                     (logits, temperature, top_k, top_p, min_p, allowed, return_logprobs, num_logprobs, backend, out))
    # The seed and the step change from call to call: checked every time, outside the signature.
    batch = logits.shape[0]
    if seed is not None and not (type(seed) is int and 0 <= seed <= _INT64_MAX - batch + 1):
        _require_parameter("seed", seed, batch, logits.device)
        if not isinstance(seed, torch.Tensor) and seed + batch - 1 > _INT64_MAX:
            raise ValueError(f"seed + batch - 1 must be < 2**63 (row b gets seed + b), got seed = {seed}")
    if not (type(step) is int and 0 <= step <= _INT64_MAX):
        _require_parameter("step", step, batch, logits.device)
    if key is not None:
        # The implementation's choice may read the seed's and the step's kinds, not their values.
        kinds = (_kind(seed), _kind(step))
        key = None if None in kinds else (key, *kinds)

    tokens, logprobs, top_ids, top_logprobs = call(
        _sample_op, _execute_sample, key,
        logits, _as(temperature, float), _as(top_k, int), _as(top_p, float), _as(min_p, float), allowed,
        _as(seed, int), _as(step, int), return_logprobs, num_logprobs, backend,
        schema=_sample_schema,
    )
    tokens = into_out(tokens, out)
    if return_logprobs:
        return SampleOutput(tokens, logprobs, top_ids, top_logprobs)
    return tokens


@torch.library.custom_op("fmkernels::filter_logits", mutates_args=())
def _filter_logits_op(
    logits: torch.Tensor,
    temperature: float, temperature_rows: Optional[torch.Tensor],
    top_k: int, top_k_rows: Optional[torch.Tensor],
    top_p: float, top_p_rows: Optional[torch.Tensor],
    min_p: float, min_p_rows: Optional[torch.Tensor],
    allowed: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    """Each ``<name>_rows`` tensor, when given, replaces the scalar ``<name>``."""
    return _execute_filter_logits(
        logits, join_per_row(temperature, temperature_rows), join_per_row(top_k, top_k_rows),
        join_per_row(top_p, top_p_rows), join_per_row(min_p, min_p_rows), allowed, backend,
    )


def _execute_filter_logits(logits, temperature, top_k, top_p, min_p, allowed, backend, key=None) -> torch.Tensor:
    """The implementation of filter_logits (``key``: the call's signature, see ``_library.call``)."""
    parameters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    _require_values(logits, parameters, allowed)
    return run("filter_logits", backend, dict(logits=logits, **parameters, allowed=allowed), key).contiguous()


@_filter_logits_op.register_fake
def _(logits, temperature, temperature_rows, top_k, top_k_rows, top_p, top_p_rows, min_p, min_p_rows, allowed,
      backend):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("fmkernels::sample", mutates_args=())
def _sample_op(
    logits: torch.Tensor,
    temperature: float, temperature_rows: Optional[torch.Tensor],
    top_k: int, top_k_rows: Optional[torch.Tensor],
    top_p: float, top_p_rows: Optional[torch.Tensor],
    min_p: float, min_p_rows: Optional[torch.Tensor],
    allowed: Optional[torch.Tensor],
    seed: Optional[int], seed_rows: Optional[torch.Tensor],
    step: int, step_rows: Optional[torch.Tensor],
    return_logprobs: bool,
    num_logprobs: int,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, logprobs, top_ids, top_logprobs); without ``return_logprobs`` logprobs is
    empty (0,) and the top alternatives (batch, 0)."""
    result = _execute_sample(
        logits, join_per_row(temperature, temperature_rows), join_per_row(top_k, top_k_rows),
        join_per_row(top_p, top_p_rows), join_per_row(min_p, min_p_rows), allowed, join_per_row(seed, seed_rows),
        join_per_row(step, step_rows), return_logprobs, num_logprobs, backend,
    )
    if return_logprobs:
        return result
    batch = logits.shape[0]
    return (result[0], logits.new_empty((0,), dtype=torch.float32),
            logits.new_empty((batch, 0), dtype=torch.int64), logits.new_empty((batch, 0), dtype=torch.float32))


def _execute_sample(logits, temperature, top_k, top_p, min_p, allowed, seed, step, return_logprobs, num_logprobs,
                    backend, key=None):
    """The implementation of sample (``key``: the call's signature, see ``_library.call``):
    (tokens, logprobs, top_ids, top_logprobs), the last three None without ``return_logprobs``."""
    parameters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=step)
    _require_values(logits, parameters, allowed)
    result = run("sample", backend, dict(
        logits=logits, **parameters, return_logprobs=return_logprobs, num_logprobs=num_logprobs, allowed=allowed,
    ), key)
    if return_logprobs:
        return tuple(tensor.contiguous() for tensor in result)
    return result.contiguous(), None, None, None


@_sample_op.register_fake
def _(logits, temperature, temperature_rows, top_k, top_k_rows, top_p, top_p_rows, min_p, min_p_rows, allowed,
      seed, seed_rows, step, step_rows, return_logprobs, num_logprobs, backend):
    batch = logits.shape[0]
    return (logits.new_empty((batch,), dtype=torch.int64),
            logits.new_empty((batch if return_logprobs else 0,), dtype=torch.float32),
            logits.new_empty((batch, num_logprobs), dtype=torch.int64),
            logits.new_empty((batch, num_logprobs), dtype=torch.float32))


filter_logits.__doc__ = filter_logits.__doc__.format(params=_PARAMETERS_DOC)
sample.__doc__ = sample.__doc__.format(params=_PARAMETERS_DOC)


def pack_allowed(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (batch, vocab) or (vocab,) of allowed tokens as the packed int32 bitmask
    ``filter_logits`` and ``sample`` take as ``allowed``: (batch, ceil(vocab / 32)) (or
    (ceil(vocab / 32),)), bit t % 32 of word t // 32 for token t, on the mask's device."""
    check.require_tensor("mask", mask)
    check.require_dtype("mask", mask, (torch.bool,))
    if mask.dim() not in (1, 2):
        raise ValueError(f"mask must be 1-D (vocab,) or 2-D (batch, vocab), got shape {tuple(mask.shape)}")
    if mask.dim() == 1:
        return reference.pack_allowed(mask[None])[0]
    return reference.pack_allowed(mask)
