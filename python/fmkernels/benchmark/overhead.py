"""Per-call overhead of the public ops (``fmkernels bench --overhead``, ``bench/op_overhead.py``):
the public op's whole call timed against its kernel alone, at decode-sized inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import bench_results, ops, platform, reference, registry
from .._validation import device_checks
from .._views import tensor_view
from .cases import (
    _SAMPLING_PARAMS,
    BenchCase,
    Kwargs,
    _append_kv_case,
    _attention_case,
    _cases_of,
    _decode_case,
    _linear_case,
    _sampling_case,
)
from .record import device_label, metadata

#: The ways one overhead row calls its op, in table order: the kernel through its binding (views
#: and outputs built once), the public op, the public op with device checks off, and a
#: torch.compile'd function calling the public op.
OVERHEAD_WAYS = ("kernel", "op", "op_no_device_checks", "compiled")

#: Ops held to the target of issue 18 on decode-sized inputs (median per call, device checks on):
#: op <= OVERHEAD_TARGET_RATIO x kernel + OVERHEAD_TARGET_US.
OVERHEAD_TARGET_OPS = ("append_kv", "decode_attention", "sample")
OVERHEAD_TARGET_RATIO = 1.3
OVERHEAD_TARGET_US = 15.0

#: Calls per timed sample and samples per way when --calls and --samples are not given.
DEFAULT_OVERHEAD_CALLS = 100
DEFAULT_OVERHEAD_SAMPLES = 21

# SmolLM2-135M's decode step: 9 query / 3 KV heads of 64, hidden 576, vocabulary 49152, the
# fused q/k/v projection (9 + 2 x 3) x 64 = 960 rows of its weight; a cache of 512 positions a
# sequence with 300 filled, paged in blocks of 16; a 32-token prefill for attention.
_SMOLLM2_HEADS = (9, 3, 64)
_SMOLLM2_VOCAB = 49152
_SMOLLM2_QKV = (960, 576)
_DECODE_CAPACITY, _DECODE_FILLED, _DECODE_BLOCK = 512, 300, 16
_PREFILL_TOKENS = 32
_GREEDY = dict(temperature=0.0)


@dataclasses.dataclass(frozen=True)
class OverheadRow:
    """One line of the overhead table (and one row of its JSON).

    Times are µs per call: over each of ``samples`` samples, ``calls`` calls timed together,
    then the median and the fastest of the samples per way (``OVERHEAD_WAYS``); ``overhead_us``
    is a way's median less the kernel's. ``target_us`` is 1.3 x the kernel's median + 15 µs for
    the ops the target applies to (else None), and ``meets_target`` whether the public op's
    median stayed within it. ``skipped`` maps a way left out to why (every way, where the
    backend cannot run the case); ``error`` says why a row has no times (an output differed).
    """

    op: str
    shape: str
    dtype: str
    device: str
    calls: int
    samples: int
    median_us: Dict[str, float] = dataclasses.field(default_factory=dict)
    min_us: Dict[str, float] = dataclasses.field(default_factory=dict)
    overhead_us: Dict[str, float] = dataclasses.field(default_factory=dict)
    target_us: Optional[float] = None
    meets_target: Optional[bool] = None
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)
    error: Optional[str] = None


def overhead_cases(op: str, device) -> List[BenchCase]:
    """The decode-sized inputs ``fmkernels bench --overhead`` times ``op`` on, modelled on SmolLM2-135M.

    Batch 1 and 8, float32 and bfloat16: decode_attention and append_kv over a 512-position
    cache with 300 filled (contiguous, and paged in 16-token blocks), 9 query / 3 KV heads of
    64; sample greedy (temperature 0) and with temperature 0.7, top-k 50, top-p 0.9 and a
    seed, filter_logits with the latter, over a 49152-token vocabulary; attention over a
    32-token causal prefill; linear against the fused 960 x 576 q/k/v weight. ``op`` and
    ``device`` as for ``default_cases``.
    """
    device, heads = torch.device(device), _SMOLLM2_HEADS
    grid = [(dtype, batch) for dtype in (torch.float32, torch.bfloat16) for batch in (1, 8)]
    cache = dict(capacity=_DECODE_CAPACITY)
    table = {
        "decode_attention": lambda: [
            _decode_case(device, dtype, batch, _DECODE_FILLED, *heads, block_size=block, **cache)
            for block in (None, _DECODE_BLOCK) for dtype, batch in grid
        ],
        "append_kv": lambda: [
            _append_kv_case(device, dtype, batch, _DECODE_FILLED, 1, *heads[1:], block, **cache)
            for block in (None, _DECODE_BLOCK) for dtype, batch in grid
        ],
        "sample": lambda: [
            _sampling_case("sample", device, dtype, batch, _SMOLLM2_VOCAB, params)
            for params in (_GREEDY, _SAMPLING_PARAMS) for dtype, batch in grid
        ],
        "filter_logits": lambda: [
            _sampling_case("filter_logits", device, dtype, batch, _SMOLLM2_VOCAB) for dtype, batch in grid
        ],
        "attention": lambda: [_attention_case(device, dtype, batch, _PREFILL_TOKENS, *heads) for dtype, batch in grid],
        "linear": lambda: [_linear_case(device, dtype, batch, *_SMOLLM2_QKV) for dtype, batch in grid],
    }
    return _cases_of(op, table)


def overhead_target_us(op: str, kernel_us: float) -> Optional[float]:
    """The most µs a public call of ``op`` may take against its kernel's ``kernel_us`` (issue 18),
    or None where the target does not apply."""
    if op not in OVERHEAD_TARGET_OPS:
        return None
    return OVERHEAD_TARGET_RATIO * kernel_us + OVERHEAD_TARGET_US


# The inputs each op writes in place (its output, for the equality check).
_WRITTEN = {"append_kv": ("k_cache", "v_cache")}


def _cpu_kernel(op: str, kwargs: Kwargs) -> Callable[[], Any]:
    """The cpu backend's binding call for ``op`` on ``kwargs``, as ``fmkernels.ops._cpu`` makes it,
    with the views, outputs and per-row parameters built here once: a call runs the C++ kernel
    alone. It returns the output (the caches, for append_kv). The inputs are unit stride."""
    module, threads, view = platform.cpu_module(), torch.get_num_threads(), tensor_view
    if op == "append_kv":
        caches = (kwargs["k_cache"], kwargs["v_cache"])
        views = [view(kwargs[name]) for name in ("k_cache", "v_cache", "k", "v", "cache_seqlens", "block_table")]
        return lambda: (module.append_kv(*views), caches)[1]
    if op == "linear":
        x, weight = kwargs["x"], kwargs["weight"]
        out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)
        views = (view(x), view(weight), view(out), threads)
        return lambda: (module.linear(*views), out)[1]
    if op in ("attention", "decode_attention"):
        q = kwargs["q"]
        out = torch.empty(q.shape, dtype=q.dtype)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if op == "attention":
            views = (view(q), view(kwargs["k"]), view(kwargs["v"]), view(out), None, None, None,
                     bool(kwargs["causal"]), scale, threads)
        else:
            views = (view(q), view(kwargs["k_cache"]), view(kwargs["v_cache"]), view(kwargs["cache_seqlens"]),
                     view(kwargs["block_table"]), view(out), None, scale, threads)
        binding = getattr(module, op)
        return lambda: (binding(*views), out)[1]
    logits = kwargs["logits"]
    batch = logits.shape[0]
    # A view is a raw pointer: the closures keep every tensor viewed (parameters, seeds) alive.
    parameters = reference.filter_parameters(
        batch, "cpu", kwargs.get("temperature", 1.0), kwargs.get("top_k", 0), kwargs.get("top_p", 1.0),
        kwargs.get("min_p", 0.0))
    if op == "filter_logits":
        out = torch.empty(logits.shape, dtype=logits.dtype)
        views = (view(logits), view(out), *map(view, parameters), None, threads)
        return lambda: (module.filter_logits(*views), parameters, out)[-1]
    tokens = torch.empty(batch, dtype=torch.int64)
    seeds = reference.row_seeds(kwargs.get("seed"), batch, "cpu").contiguous()
    steps = reference.per_row(kwargs.get("step", 0), batch, torch.int64, "cpu").contiguous()
    views = (view(logits), view(tokens), *map(view, parameters), view(seeds), view(steps), None, None, None, None,
             threads)
    return lambda: (module.sample(*views), parameters, seeds, steps, tokens)[-1]


def _backend_kernel(op: str, backend: str, kwargs: Kwargs) -> Callable[[], Any]:
    """The backend's registered implementation called directly (no public op, no checks): the
    kernel's stand-in where its binding is not called here (CUDA)."""
    fn = registry.get_impl(op, backend).fn
    written = _WRITTEN.get(op)
    if written:
        return lambda: (fn(**kwargs), tuple(kwargs[name] for name in written))[1]
    return lambda: fn(**kwargs)


def _public_op(op: str, backend: str, kwargs: Kwargs, compiled: bool) -> Callable[[], Any]:
    """``fmkernels.<op>(**kwargs, backend=backend)`` as a call of no arguments returning the
    output; with ``compiled``, through a ``torch.compile(fullgraph=True)`` function calling it."""
    public = getattr(ops, op)
    written = _WRITTEN.get(op)
    # Only tensors are the compiled function's arguments; Python scalars (sampling parameters,
    # causal) stay constants of its graph, as in a model's decode step.
    tensors = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
    constants = {name: value for name, value in kwargs.items() if name not in tensors}

    def call(**tensors):
        result = public(**tensors, **constants, backend=backend)
        return tuple(tensors[name] for name in written) if written else result

    if compiled:
        # Every case compiles the same code object: a fresh cache per case, and no dynamic
        # sizes or scalars a previous case's guard failure would bring in.
        torch.compiler.reset()
        call = torch.compile(call, fullgraph=True, dynamic=False)
    return lambda: call(**tensors)


def _outputs(value) -> List[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else [t for item in value for t in _outputs(item)]


def require_same_outputs(calls: Dict[str, Callable[[], Any]], restore: Callable[[], None]) -> None:
    """Every call gives the kernel's output, bit for bit, on the same inputs (restored before each
    call, since append_kv writes them), so no row times a path that computes something else.

    Parameters
    ----------
    calls : dict
        Way name -> call of no arguments returning its output; "kernel" is the truth.
    restore : callable
        Puts the inputs written in place back as they were built.

    Raises
    ------
    AssertionError
        Naming the way whose output differs and how.
    """
    restore()
    expected = [t.clone() for t in _outputs(calls["kernel"]())]
    for way, call in calls.items():
        if way == "kernel":
            continue
        restore()
        got = _outputs(call())
        if len(got) != len(expected) or not all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, expected)
        ):
            shapes = [(tuple(t.shape), str(t.dtype)) for t in got]
            raise AssertionError(f"{way}'s output differs from the kernel's on the same inputs "
                                 f"(got {shapes}, expected {[(tuple(t.shape), str(t.dtype)) for t in expected]})")
    restore()


def sample_us(call: Callable[[], Any], calls: int, device: torch.device) -> float:
    """µs per call of ``calls`` back-to-back calls of ``call()``, timed on the host with
    time.perf_counter; on CUDA after the device is idle, and without waiting for it at the end,
    so the figure is the host's time to issue a call (its launch cost), not the GPU's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def measure_overhead(case: BenchCase, calls: int, samples: int, *, compile_op: bool = True,
                     public_op: Optional[Callable[[str, str, Kwargs, bool], Callable[[], Any]]] = None) -> OverheadRow:
    """Time ``case`` the four ways of ``OVERHEAD_WAYS`` (the compiled one only with ``compile_op``).

    The outputs are checked equal first (``require_same_outputs``); then, after a warm-up
    sample each, ``samples`` rounds that each time one sample of every way in turn, so load
    from elsewhere on the machine falls on all of them alike.

    Parameters
    ----------
    case : BenchCase
        One of ``overhead_cases``; on the CPU the cpu backend runs it, on CUDA the cuda backend.
    calls, samples : int
        >= 1.
    compile_op : bool
        Also time the op inside ``torch.compile``.
    public_op : callable, optional
        Builds the op's calls (default: the public op, ``fmkernels.<op>``); for tests.

    Returns
    -------
    OverheadRow
        Without times when the backend cannot run the case (``skipped``) or an output differs (``error``).
    """
    if calls < 1 or samples < 1:
        raise ValueError(f"calls and samples must be >= 1, got {calls} and {samples}")
    device, backend = case.device, case.device.type
    row = OverheadRow(op=case.op, shape=case.shape, dtype=str(case.dtype).replace("torch.", ""),
                      device=str(device), calls=calls, samples=samples,
                      skipped={} if compile_op else {"compiled": "--no-compile"})
    kwargs = case.make_kwargs()
    impl = {impl.name: impl for impl in registry.implementations(case.op)}.get(backend)
    unsupported = f"no {backend} implementation" if impl is None else impl.unsupported_reason(kwargs)
    if unsupported:
        return dataclasses.replace(row, skipped={way: unsupported for way in OVERHEAD_WAYS})
    written = {name: kwargs[name].clone() for name in _WRITTEN.get(case.op, ())}

    def restore():
        for name, initial in written.items():
            kwargs[name].copy_(initial)

    public_op = public_op or _public_op
    kernel = _cpu_kernel(case.op, kwargs) if backend == "cpu" else _backend_kernel(case.op, backend, kwargs)
    op_call = public_op(case.op, backend, kwargs, False)
    ways = {"kernel": kernel, "op": op_call, "op_no_device_checks": op_call}
    if compile_op:
        ways["compiled"] = public_op(case.op, backend, kwargs, True)

    def setting(way: str):
        return device_checks(False) if way == "op_no_device_checks" else contextlib.nullcontext()

    def under_setting(way: str, call: Callable[[], Any]) -> Callable[[], Any]:
        def run():
            with setting(way):
                return call()
        return run

    try:
        require_same_outputs({way: under_setting(way, call) for way, call in ways.items()}, restore)
    except AssertionError as exc:
        return dataclasses.replace(row, error=str(exc))
    times: Dict[str, List[float]] = {way: [] for way in ways}
    order = list(ways)
    for round_ in range(samples + 1):
        # Each round starts one way later, so none always runs right after the same other one.
        start = round_ % len(order)
        for way in order[start:] + order[:start]:
            with setting(way):
                elapsed = sample_us(ways[way], calls, device)
            if round_:  # the first round warms up
                times[way].append(elapsed)
    median = {way: statistics.median(t) for way, t in times.items()}
    target = overhead_target_us(case.op, median["kernel"])
    return dataclasses.replace(
        row, median_us=median, min_us={way: min(t) for way, t in times.items()},
        overhead_us={way: median[way] - median["kernel"] for way in ways if way != "kernel"},
        target_us=target, meets_target=None if target is None else median["op"] <= target,
    )


#: The overhead table's number columns, after op, shape and dtype (``overhead_cells``).
OVERHEAD_COLUMNS = ("kernel", "op", "-kernel", "no dev checks", "-kernel", "compiled", "-kernel", "target",
                    "verdict")


def overhead_metadata(device, command: str, calls: int, samples: int) -> Dict[str, Any]:
    """``metadata`` for an overhead run, with ``benchmark`` = "overhead", the table's device label,
    the calls per sample, the samples and the target."""
    return {
        **metadata(device, command),
        "benchmark": bench_results.OVERHEAD_BENCHMARK,
        "device_label": device_label(device),
        "calls": calls,
        "samples": samples,
        "target": f"op <= {OVERHEAD_TARGET_RATIO} x kernel + {OVERHEAD_TARGET_US:g} us for "
                  + ", ".join(OVERHEAD_TARGET_OPS),
    }


def overhead_title(meta: Dict[str, Any]) -> str:
    """The overhead table's title: device, threads, what a figure is."""
    clock = "host µs" if meta["device"] == "cuda" else "µs"
    return (f"per-call time of the public ops on {meta['device_label']}, {meta['cpu_threads']} thread(s): "
            f"{clock} per call, median/min of {meta['samples']} samples of {meta['calls']} calls")


def overhead_cells(row: OverheadRow) -> List[str]:
    """The texts of ``OVERHEAD_COLUMNS`` for ``row`` ("-" where there is none): median/min µs per way,
    the overheads over the kernel, the target and PASS or FAIL."""

    def timed(way: str) -> str:
        if way not in row.median_us:
            return "-"
        return f"{row.median_us[way]:.1f}/{row.min_us[way]:.1f}"

    def over(way: str) -> str:
        return f"{row.overhead_us[way]:+.1f}" if way in row.overhead_us else "-"

    verdict = "-" if row.meets_target is None else ("PASS" if row.meets_target else "FAIL")
    return [timed("kernel"), timed("op"), over("op"), timed("op_no_device_checks"), over("op_no_device_checks"),
            timed("compiled"), over("compiled"), "-" if row.target_us is None else f"{row.target_us:.1f}", verdict]
