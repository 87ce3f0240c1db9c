"""Run an implementation on a case through the public op, and hold its outputs to the reference
by the package's rules."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import torch

from .. import ops, reference, registry
from .inputs import Case, Device, Kwargs, cases
from .plain import plain_attention, plain_decode_attention, plain_linear
from ..quantized import QuantizedWeight
from .tolerances import (
    LOGPROB_TOLERANCE,
    NEAR_TIE,
    attention_tolerance,
    max_error,
    quantized_linear_tolerance,
    top_p_boundary_width,
    value_tolerance,
)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """How an implementation did on one case.

    Attributes
    ----------
    max_error : float
        The error of the output that came closest to failing (or failed worst): the largest
        absolute difference for attention, relative to max(1, |reference|) for
        filter_logits and log-probabilities, the relative Gumbel-score gap for sampled tokens.
        ``inf`` when an element is NaN, unwritten, or kept where the reference removes it.
    tolerance : float
        What that error is allowed to be.
    passed : bool
        Every compared output is within its tolerance.
    detail : str
        Which output, and what went wrong (empty when nothing is worth saying).
    """

    max_error: float
    tolerance: float
    passed: bool
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class CheckRow:
    """One line of ``fmkernels check``: an implementation on a case, or why it was skipped.

    ``result`` is ``None`` exactly when ``skipped`` gives a reason; ``case`` is empty when
    the whole implementation was skipped.
    """

    op: str
    implementation: str
    case: str
    result: Optional[CheckResult]
    skipped: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class _Measure:
    """One compared output: its error, its tolerance, and whether it passed."""

    name: str
    error: float
    tolerance: float
    passed: bool
    note: str = ""

    @classmethod
    def within(cls, name: str, error: float, tolerance: float, note: str = "") -> "_Measure":
        return cls(name, error, tolerance, error <= tolerance, note)

    def closeness(self) -> float:
        """How near failing: error / tolerance; failures sort above everything."""
        if not self.passed:
            return math.inf
        return self.error / self.tolerance if self.tolerance > 0 else 0.0


def _verdict(measures: Sequence[_Measure]) -> CheckResult:
    worst = max(measures, key=_Measure.closeness)
    notes = []
    for measure in measures:
        if not measure.passed:
            notes.append(f"{measure.name} error {measure.error:.3g} > {measure.tolerance:.3g}")
        if measure.note:
            notes.append(f"{measure.name}: {measure.note}")
    return CheckResult(worst.error, worst.tolerance, all(m.passed for m in measures), "; ".join(notes))


def _call(impl: registry.Impl, kwargs: Kwargs, out: Optional[torch.Tensor] = None):
    """Run ``impl`` the way users do: through the public op, with backend=impl.name."""
    extra = {"backend": impl.name} if out is None else {"backend": impl.name, "out": out}
    return getattr(ops, impl.op)(**kwargs, **extra)


def _as_tuple(result) -> tuple:
    return tuple(result) if isinstance(result, tuple) else (result,)


def _upcast(kwargs: Kwargs) -> Kwargs:
    """Floating-point tensors as float64; everything else as it is."""
    return {
        key: value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for key, value in kwargs.items()
    }


def _nan_note(actual: torch.Tensor, truth: torch.Tensor) -> str:
    unexpected = torch.isnan(actual) & ~torch.isnan(truth)
    count = int(unexpected.sum())
    return f"{count} NaN elements (unwritten?)" if count else ""


def _compare_with_plain(actual, plain, truth, expected_dtypes, names) -> CheckResult:
    """Each output within ``attention_tolerance`` of the float64 truth, with the truth's shape
    and the expected dtype."""
    actual, plain, truth = _as_tuple(actual), _as_tuple(plain), _as_tuple(truth)
    if len(actual) != len(truth):
        return CheckResult(math.inf, 0.0, False, f"returned {len(actual)} tensors, the reference {len(truth)}")
    measures = []
    for name, a, p, t, dtype in zip(names, actual, plain, truth, expected_dtypes):
        if a.dtype != dtype or a.shape != t.shape:
            return CheckResult(math.inf, 0.0, False,
                               f"{name} is {a.dtype} {tuple(a.shape)}, expected {dtype} {tuple(t.shape)}")
        measures.append(_Measure.within(name, max_error(a, t), attention_tolerance(p, t), _nan_note(a, t)))
    return _verdict(measures)


def compare_attention(op: str, kwargs: Kwargs, actual) -> CheckResult:
    """Hold an attention or decode_attention result to the reference, as ``fmkernels check`` does.

    Parameters
    ----------
    op : str
        "attention" or "decode_attention".
    kwargs : dict
        The call's arguments, as the reference takes them (``return_lse`` included).
    actual : Tensor or (Tensor, Tensor)
        What the implementation returned: out, or (out, lse) with ``return_lse``.

    Returns
    -------
    CheckResult
        Passed when out (and lse) are within ``attention_tolerance`` of the reference run on
        float64 inputs and have the reference's dtypes and shapes.
    """
    if op not in ("attention", "decode_attention"):
        raise ValueError(f"op must be 'attention' or 'decode_attention', got {op!r}")
    plain_fn = plain_attention if op == "attention" else plain_decode_attention
    truth = getattr(reference, op)(**_upcast(kwargs))
    return _compare_with_plain(actual, plain_fn(**kwargs), truth, (kwargs["q"].dtype, torch.float32), ("out", "lse"))


def compare_linear(kwargs: Kwargs, actual: torch.Tensor) -> CheckResult:
    """Hold a linear result to the reference, as ``fmkernels check`` does.

    Parameters
    ----------
    kwargs : dict
        The call's arguments, x (..., K) and weight (N, K).
    actual : Tensor (..., N)
        What the implementation returned.

    Returns
    -------
    CheckResult
        Passed when actual has x's dtype and is within ``attention_tolerance`` of the
        reference run on float64 inputs, the tolerance set by ``plain_linear``'s error; for a
        ``QuantizedWeight``, within ``quantized_linear_tolerance`` of x @ dequantized weight
        in float64, element by element.
    """
    weight = kwargs["weight"]
    if isinstance(weight, QuantizedWeight):
        return _compare_quantized(kwargs["x"], weight.dequantize(), actual)
    truth = reference.linear(**_upcast(kwargs))
    return _compare_with_plain(actual, plain_linear(**kwargs), truth, (kwargs["x"].dtype,), ("out",))


def _compare_quantized(x: torch.Tensor, weight: torch.Tensor, actual: torch.Tensor) -> CheckResult:
    """out against x @ weight^T in float64 (weight dequantized), each element within its own
    ``quantized_linear_tolerance``; the reported error and tolerance are the worst element's."""
    truth = reference.linear(x.double(), weight.double())
    if actual.dtype != x.dtype or actual.shape != truth.shape:
        return CheckResult(math.inf, 0.0, False,
                           f"out is {actual.dtype} {tuple(actual.shape)}, expected {x.dtype} {tuple(truth.shape)}")
    bound = quantized_linear_tolerance(x, weight, truth, x.dtype)
    diff = torch.nan_to_num((actual.double() - truth).abs(), nan=math.inf, posinf=math.inf)
    if not diff.numel():
        return CheckResult(0.0, 0.0, True)
    worst = int(torch.argmax(diff - bound))
    error, tolerance = float(diff.reshape(-1)[worst]), float(bound.reshape(-1)[worst])
    detail = _nan_note(actual, truth)
    passed = bool((diff <= bound).all())
    if not passed and not detail:
        detail = f"out: {int((diff > bound).sum())} elements beyond their bound"
    return CheckResult(error, tolerance, passed, detail)


def _check_attention(impl: registry.Impl, case: Case) -> CheckResult:
    kwargs = case.make_kwargs()
    return compare_attention(case.op, kwargs, _call(impl, kwargs, out=torch.full_like(kwargs["q"], float("nan"))))


def _check_linear(impl: registry.Impl, case: Case) -> CheckResult:
    kwargs = case.make_kwargs()
    x, weight = kwargs["x"], kwargs["weight"]
    poisoned = torch.full((*x.shape[:-1], weight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    return compare_linear(kwargs, _call(impl, kwargs, out=poisoned))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers, so NaN compares equal to the same NaN."""
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _exact_measure(name: str, actual: torch.Tensor, expected: torch.Tensor) -> _Measure:
    differs = _bits(actual) != _bits(expected)
    count = int(differs.sum())
    if not count:
        return _Measure(name, 0.0, 0.0, True)
    first = tuple(differs.nonzero()[0].tolist())
    note = f"{count} of {differs.numel()} elements differ, the first at {first}"
    return _Measure(name, max_error(actual[differs], expected[differs]), 0.0, False, note)


def _check_append_kv(impl: registry.Impl, case: Case) -> CheckResult:
    expected = case.make_kwargs()
    reference.append_kv(**expected)
    actual = case.make_kwargs()
    _call(impl, actual)
    return _verdict([_exact_measure(name, actual[name], expected[name]) for name in ("k_cache", "v_cache")])


def _kept_note(actual: torch.Tensor, expected: torch.Tensor) -> str:
    kept, kept_expected = ~torch.isneginf(actual), ~torch.isneginf(expected)
    extra, missing = kept & ~kept_expected, kept_expected & ~kept
    wrong_rows = (extra | missing).any(dim=1).nonzero().flatten().tolist()
    if not wrong_rows:
        return ""
    row = wrong_rows[0]
    return (
        f"kept tokens differ in {len(wrong_rows)} rows; row {row} keeps {int(extra[row].sum())} "
        f"the reference removes and removes {int(missing[row].sum())} it keeps"
    )


def _check_filter_logits(impl: registry.Impl, case: Case) -> CheckResult:
    kwargs = case.make_kwargs()
    logits = kwargs["logits"]
    expected = reference.filter_logits(**kwargs)
    actual = _call(impl, kwargs, out=torch.full_like(logits, float("nan")))
    boundary, _ = top_p_boundary(kwargs)
    either_way = boundary & (torch.isneginf(actual) != torch.isneginf(expected))
    compared = torch.where(either_way, expected, actual)
    note = _kept_note(compared, expected) or _nan_note(compared, expected)
    if either_way.any():
        note = "; ".join(filter(None, [note, f"{int(either_way.sum())} tokens on the top-p boundary kept the other way"]))
    error = max_error(compared, expected, relative=True)
    return _verdict([_Measure.within("logits", error, value_tolerance(logits.dtype), note)])


_FILTER_PARAMS = ("temperature", "top_k", "top_p", "min_p", "allowed")


def _allowed_logits(kwargs: Kwargs) -> torch.Tensor:
    """The case's logits with the tokens its ``allowed`` bitmask (if any) disallows at -inf."""
    logits = kwargs["logits"]
    if kwargs.get("allowed") is None:
        return logits
    return logits.masked_fill(~reference.unpack_allowed(kwargs["allowed"], logits.shape[1]), float("-inf"))


def _filtered_and_gumbel(kwargs: Kwargs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's fp32 filtered logits, Gumbel scores (filtered - log(-log u)) and the
    Gumbel noise -log(-log u), each (batch, vocab)."""
    logits = kwargs["logits"]
    batch, vocab = logits.shape
    params = {key: kwargs[key] for key in _FILTER_PARAMS if key in kwargs}
    filtered = reference.filter_logits(logits.float(), **params)
    seeds = reference.row_seeds(kwargs["seed"], batch, logits.device)
    steps = reference.per_row(kwargs.get("step", 0), batch, torch.int64, logits.device)
    noise = -torch.log(-torch.log(reference.uniform_draws(seeds, steps, vocab)))
    return filtered, filtered + noise, noise


def top_p_boundary(kwargs: Kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(boundary, scaled): the tokens on the top-p boundary (``top_p_boundary_width``) that top-k and
    min-p keep, (batch, vocab) bool in token order, and the fp32 temperature-scaled logits, for
    ``filter_logits``' keyword arguments (``logits`` and the parameters). Where two filters
    disagree only on such tokens, fp32 rounding, not the rule, decided."""
    logits = _allowed_logits(kwargs)
    batch, vocab = logits.shape
    temperature, top_k, top_p, min_p = reference.filter_parameters(
        batch, logits.device, *(kwargs.get(key, default) for key, default in zip(_FILTER_PARAMS[:4], (1.0, 0, 1.0, 0.0))))
    greedy = temperature == 0
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    order = torch.sort(scaled, dim=-1, descending=True, stable=True).indices
    sorted_logits = scaled.gather(1, order)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    in_top_k = rank < torch.where(top_k == 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))[:, None]
    probs = torch.softmax(sorted_logits.double().masked_fill(~in_top_k, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    boundary = ((mass_before - top_p.double()[:, None]).abs() <= top_p_boundary_width(vocab)) & in_top_k
    boundary &= ((top_p < 1.0) & ~greedy)[:, None] & ~torch.isneginf(sorted_logits)
    boundary &= torch.exp(sorted_logits - sorted_logits[:, :1]) >= min_p[:, None]
    boundary[:, 0] = False  # the first token is always kept
    return torch.zeros_like(boundary).scatter(1, order, boundary), scaled


def _out_of_range(ids: torch.Tensor, vocab: int) -> str:
    bad = ((ids < 0) | (ids >= vocab)).nonzero()
    if not len(bad):
        return ""
    first = tuple(bad[0].tolist())
    return f"{len(bad)} ids outside [0, {vocab}) (unwritten?), e.g. {int(ids[first])} at {first}"


def _token_gaps(tokens: torch.Tensor, expected: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
    """(batch,) float64: 0 where the tokens agree, else how far apart (relatively) their Gumbel
    scores are, inf where the implementation's token was not kept."""
    score = gumbel.gather(1, tokens[:, None])[:, 0].double()
    expected_score = gumbel.gather(1, expected[:, None])[:, 0].double()
    gap = (score - expected_score).abs() / torch.maximum(score.abs(), expected_score.abs())
    gap = torch.nan_to_num(gap, nan=math.inf, posinf=math.inf)
    return torch.where(tokens == expected, torch.zeros_like(gap), gap)


def _token_measure(tokens: torch.Tensor, expected: torch.Tensor, gaps: torch.Tensor) -> _Measure:
    rows = (tokens != expected).nonzero().flatten()
    if not len(rows):
        return _Measure("tokens", 0.0, NEAR_TIE, True)
    error = float(gaps.max())
    row = int(gaps.argmax())
    note = f"{len(rows)} of {len(tokens)} differ from the reference's"
    if error <= NEAR_TIE:
        note += " (near ties)"
    else:
        note += f"; row {row}: {int(tokens[row])}, the reference {int(expected[row])}"
    return _Measure.within("tokens", error, NEAR_TIE, note)


def _logprob_errors(actual, filtered: torch.Tensor) -> torch.Tensor:
    """(batch,) float64: the largest error of each row's chosen and top log-probabilities
    against the filtered distribution ``filtered``, relative to max(1, |log-probability|)."""
    logprobs = torch.log_softmax(filtered, dim=-1)
    top = torch.sort(logprobs, dim=-1, descending=True, stable=True).values[:, : actual.top_ids.shape[1]]
    pairs = [
        # the implementation's own token's log-probability (its token may be a near tie)
        (actual.logprobs[:, None], logprobs.gather(1, actual.tokens[:, None])),
        # the top values, and the ids they are reported for (tied ids may come in either order)
        (actual.top_logprobs, top),
        (actual.top_logprobs, logprobs.gather(1, actual.top_ids)),
    ]
    errors = torch.zeros(filtered.shape[0], dtype=torch.float64, device=filtered.device)
    for values, truth in pairs:
        if values.shape[1]:
            a, t = values.double(), truth.double()
            diff = torch.where(a == t, torch.zeros_like(a), (a - t).abs() / t.abs().clamp_min(1.0))
            errors = torch.maximum(errors, torch.nan_to_num(diff, nan=math.inf, posinf=math.inf).amax(dim=1))
    return errors


def _check_sample(impl: registry.Impl, case: Case) -> CheckResult:
    """Tokens (up to near ties) and log-probabilities against the reference's filtered
    distribution; where a token is on the top-p boundary, against the distribution with that
    token's membership flipped too, row by row whichever the implementation is nearer."""
    kwargs = case.make_kwargs()
    logits = kwargs["logits"]
    expected = reference.sample(**kwargs)
    poisoned = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=logits.device)
    actual = _call(impl, kwargs, out=poisoned)
    logprobs_asked = kwargs.get("return_logprobs", False)
    tokens = actual.tokens if logprobs_asked else actual
    vocab = logits.shape[1]
    if _out_of_range(tokens, vocab):
        return _verdict([_Measure("tokens", math.inf, NEAR_TIE, False, _out_of_range(tokens, vocab))])
    if logprobs_asked and _out_of_range(actual.top_ids, vocab):
        return _verdict([_Measure("logprobs", math.inf, LOGPROB_TOLERANCE, False, _out_of_range(actual.top_ids, vocab))])
    filtered, gumbel, noise = _filtered_and_gumbel(kwargs)
    alternatives = [(filtered, gumbel, expected.tokens if logprobs_asked else expected)]
    boundary, scaled = top_p_boundary(kwargs)
    if boundary.any():
        flipped = torch.where(boundary, torch.where(torch.isneginf(filtered), scaled, float("-inf")), filtered)
        flipped_gumbel = flipped + noise
        alternatives.append((flipped, flipped_gumbel, flipped_gumbel.argmax(dim=1)))
    gaps = torch.stack([_token_gaps(tokens, best, scores) for _, scores, best in alternatives])
    scores = gaps / NEAR_TIE
    if logprobs_asked:
        errors = torch.stack([_logprob_errors(actual, distribution) for distribution, _, _ in alternatives])
        scores = torch.maximum(scores, errors / LOGPROB_TOLERANCE)
    chosen = scores.argmin(dim=0, keepdim=True)  # the alternative each row is nearer
    best = torch.stack([best for _, _, best in alternatives]).gather(0, chosen)[0]
    measures = [_token_measure(tokens, best, gaps.gather(0, chosen)[0])]
    if logprobs_asked:
        row_errors = errors.gather(0, chosen)
        measures.append(_Measure.within("logprobs", float(row_errors.max()) if row_errors.numel() else 0.0,
                                        LOGPROB_TOLERANCE))
    return _verdict(measures)


_CHECKS = {
    "attention": _check_attention,
    "decode_attention": _check_attention,
    "append_kv": _check_append_kv,
    "filter_logits": _check_filter_logits,
    "sample": _check_sample,
    "linear": _check_linear,
}


def check_impl(impl: registry.Impl, case: Case) -> CheckResult:
    """Run ``impl`` on ``case`` through the public op and hold it to the reference.

    The rules are the module's: float64 truth and plain-PyTorch tolerances for attention
    and linear, exact caches for append_kv, exact kept sets for filter_logits, same tokens (up to near
    ties) for sample, and outputs written into poisoned ``out=`` buffers.

    Parameters
    ----------
    impl : fmkernels.registry.Impl
        A registered implementation of ``case.op``: what ``fmkernels.register_impl``
        returns, or an entry of ``fmkernels.implementations(op)``.
    case : Case
        From ``cases(op, device)``, or one of your own.

    Returns
    -------
    CheckResult

    Raises
    ------
    ValueError
        If ``impl`` is not registered under its name for ``case.op``, or cannot run the
        case (``impl.unsupported_reason`` says why). Whatever ``impl`` raises propagates.
    """
    if impl.op != case.op:
        raise ValueError(f"impl implements {impl.op!r}, but the case is for {case.op!r}")
    if not any(registered is impl for registered in registry.implementations(impl.op)):
        raise ValueError(
            f"impl {impl.name!r} is not registered for {impl.op}: check the Impl that "
            "fmkernels.register_impl returned"
        )
    return _CHECKS[case.op](impl, case)


def skip_reason(impl: registry.Impl, device: Device) -> Optional[str]:
    """Why ``impl`` cannot run on ``device`` at all (not built, no GPU, other device), or None.

    Parameters
    ----------
    impl : fmkernels.registry.Impl
    device : str or torch.device

    Returns
    -------
    str or None
    """
    unavailable = impl.unavailable_reason()
    if unavailable:
        return unavailable
    device_type = torch.device(device).type
    if impl.devices is not None and device_type not in impl.devices:
        return f"runs on {' or '.join(impl.devices)} tensors, not {device_type}"
    return None


def _check_row(impl: registry.Impl, case: Case) -> CheckRow:
    unsupported = impl.unsupported_reason(case.make_kwargs())
    if unsupported:
        return CheckRow(case.op, impl.name, case.name, None, unsupported)
    try:
        result = check_impl(impl, case)
    except NotImplementedError as exc:
        return CheckRow(case.op, impl.name, case.name, None, f"NotImplementedError: {exc}")
    except Exception as exc:  # a crashing implementation fails its case; the other checks go on
        result = CheckResult(math.nan, math.nan, False, f"raised {type(exc).__name__}: {exc}")
    return CheckRow(case.op, impl.name, case.name, result)


def run_checks(op_names: Iterable[str], device: Device = "cpu", seed: int = 0) -> Iterator[CheckRow]:
    """Check every registered implementation of each op on its ``cases``: what ``fmkernels check`` prints.

    An implementation that cannot run on ``device`` gives one skipped row; one that cannot
    run a case (its ``supports`` predicate, or it raises ``NotImplementedError``) gives a
    skipped row for that case; one that raises anything else fails that case.

    Parameters
    ----------
    op_names : iterable of str
        Ops from ``fmkernels.registry.OPS``.
    device : str or torch.device
    seed : int
        Seed of each op's first case (see ``cases``).

    Yields
    ------
    CheckRow
        In order: op, then implementation (``fmkernels.implementations``), then case.
    """
    for op in op_names:
        op_cases = cases(op, device, seed)
        for impl in registry.implementations(op):
            reason = skip_reason(impl, device)
            if reason:
                yield CheckRow(op, impl.name, "", None, reason)
                continue
            for case in op_cases:
                yield _check_row(impl, case)
