"""A ``fmkernels bench`` run: which implementation runs on which case, its timed row, and the
comparisons between rows. Implementations are called directly (``impl.fn``), so the time is the
implementation's, without the public op's input checks."""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence

from .. import registry
from ..testing import skip_reason
from .cases import BenchCase, default_cases, sweep_cases
from .roofline import Peaks, roofline_fraction
from .timing import median_seconds


@dataclasses.dataclass(frozen=True)
class Job:
    """An implementation to time on a case; ``skipped`` says why it cannot run on the case's device."""

    impl: registry.Impl
    case: BenchCase
    skipped: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One line of ``fmkernels bench`` (and one row of its JSON).

    Times are in milliseconds; tflops and gbps are achieved rates (None where not counted);
    speedup is the reference's median time over this one's, for the same op and shape in
    the same run; vs_peer the fastest peer's (named in ``peer``) over this one's; roofline
    the fraction of the hardware's limit reached (see ``roofline_fraction``). ``skipped``
    or ``error`` says why there is no time.
    """

    op: str
    implementation: str
    kind: str
    shape: str
    dtype: str
    repeats: int
    median_ms: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    speedup: Optional[float] = None
    peer: Optional[str] = None
    vs_peer: Optional[float] = None
    roofline: Optional[float] = None
    flops: Optional[int] = None
    bytes: Optional[int] = None
    skipped: Optional[str] = None
    error: Optional[str] = None


def plan(op_names: Iterable[str], device, *, sweep: bool = False,
         only: Optional[Iterable[str]] = None) -> List[Job]:
    """Every registered implementation of each op on each case, in table order.

    Parameters
    ----------
    op_names : iterable of str
    device : str or torch.device
    sweep : bool
        The grids of ``sweep_cases`` instead of ``default_cases``.
    only : iterable of str, optional
        Implementation names to keep (the others are left out of the plan); unknown names
        raise ValueError.

    Returns
    -------
    list of Job
        Jobs for implementations that cannot run on ``device`` carry the reason in ``skipped``.
    """
    op_names = list(op_names)
    cases = sweep_cases if sweep else default_cases
    if only is not None:
        only = set(only)
        known = {impl.name for op in op_names for impl in registry.implementations(op)}
        unknown = sorted(only - known)
        if unknown:
            raise ValueError(f"only: no implementation named {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return [
        Job(impl, case, skip_reason(impl, device))
        for op in op_names
        for case in cases(op, device)
        for impl in registry.implementations(op)
        if only is None or impl.name in only
    ]


def measure(job: Job, repeats: int) -> BenchRow:
    """Time ``job`` (see ``median_seconds``) and turn its FLOPs and bytes into rates.

    An implementation that cannot run the case (unavailable, its ``supports`` predicate,
    or it raises ``NotImplementedError``) gives a skipped row; one that raises anything
    else gives a row with the error.

    Parameters
    ----------
    job : Job
    repeats : int

    Returns
    -------
    BenchRow
        Without comparisons: ``with_comparisons`` fills them once every row is timed.
    """
    case, impl = job.case, job.impl
    row = BenchRow(
        op=case.op, implementation=impl.name, kind=impl.kind, shape=case.shape,
        dtype=str(case.dtype).replace("torch.", ""), repeats=repeats, flops=case.flops, bytes=case.bytes,
    )
    if job.skipped:
        return dataclasses.replace(row, skipped=job.skipped)
    kwargs = case.make_kwargs()
    unsupported = impl.unsupported_reason(kwargs)
    if unsupported:
        return dataclasses.replace(row, skipped=unsupported)
    try:
        seconds = median_seconds(lambda: impl(**kwargs), case.device, repeats)
    except NotImplementedError as exc:
        return dataclasses.replace(row, skipped=f"NotImplementedError: {exc}")
    except Exception as exc:  # a crashing implementation gets an error row; the others still run
        return dataclasses.replace(row, error=f"{type(exc).__name__}: {exc}")
    return dataclasses.replace(
        row,
        median_ms=seconds * 1e3,
        tflops=case.flops / seconds / 1e12 if case.flops else None,
        gbps=case.bytes / seconds / 1e9 if case.bytes else None,
    )


def with_comparisons(rows: Sequence[BenchRow], peaks: Optional[Peaks] = None) -> List[BenchRow]:
    """``rows`` with their speedups and roofline fractions filled in.

    speedup: the reference's median time / the row's, for the same op and shape. vs_peer:
    the fastest peer's (``peer``) / the row's. roofline: see ``roofline_fraction``, when
    ``peaks`` is given.

    Parameters
    ----------
    rows : sequence of BenchRow
    peaks : Peaks, optional

    Returns
    -------
    list of BenchRow
        Rows without a time keep None; so do comparisons with nothing timed to compare to.
    """
    reference_ms: Dict[tuple, float] = {}
    fastest_peer: Dict[tuple, BenchRow] = {}
    for row in rows:
        if row.median_ms is None:
            continue
        key = (row.op, row.shape, row.dtype)
        if row.implementation == "reference":
            reference_ms[key] = row.median_ms
        if row.kind == "peer" and (key not in fastest_peer or row.median_ms < fastest_peer[key].median_ms):
            fastest_peer[key] = row
    compared = []
    for row in rows:
        if row.median_ms is None:
            compared.append(row)
            continue
        key = (row.op, row.shape, row.dtype)
        peer = fastest_peer.get(key)
        compared.append(dataclasses.replace(
            row,
            speedup=reference_ms[key] / row.median_ms if key in reference_ms else None,
            peer=peer.implementation if peer else None,
            vs_peer=peer.median_ms / row.median_ms if peer else None,
            roofline=roofline_fraction(row.flops, row.bytes, row.median_ms / 1e3, row.dtype, peaks) if peaks else None,
        ))
    return compared
