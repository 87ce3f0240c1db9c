"""Time every implementation of an op on default shapes, and count the work it does.

``fmkernels bench`` prints what ``measure`` returns; ``bench/test_bench_ops.py`` times the
same cases with pytest-benchmark. Implementations are called directly (``impl.fn``), so the
time is the implementation's, without the public op's input checks.

What one call is credited with:

* attention: 4 * batch * q_heads * head_dim * (visible (query, key) pairs) FLOPs: two
  matmuls of 2 FLOPs per multiply-add; a causal mask halves the pairs.
* decode_attention: the same FLOPs; bytes = q and the visible keys and values read, the
  output written.
* append_kv: bytes = k and v read, then written into the cache.
* filter_logits: bytes = logits read, filtered logits written.
* sample: bytes = logits read, tokens written.
* linear: 2 * rows * N * K FLOPs; bytes = the weight and x read, the output written. One
  weight, read again on every call: where the last-level cache holds it, the rate is the
  cache's (``bench/cpu_linear.py`` streams distinct copies from DRAM, as a model does).

Index tensors (cache_seqlens, block tables) are left out of the bytes: a few bytes per
sequence. Timing: warm-up calls, then the median of ``repeats`` timed calls; on CUDA each
is timed with CUDA events after the L2 cache is flushed and behind a queued GPU busy-wait
(so the host's launch cost stays outside the timed region), on the CPU with time.perf_counter.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform as host
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from . import __version__, platform, registry
from .testing import skip_reason

#: Timed calls per implementation when --repeats is not given.
DEFAULT_REPEATS = {"cpu": 5, "cuda": 100}

# Zeroed before each timed CUDA call: larger than any GPU's L2 cache (50 MB on an H100).
_L2_FLUSH_BYTES = 256 * 1024 * 1024
# GPU clock cycles of busy-waiting queued ahead of each timed CUDA call (~0.5 ms at 2 GHz).
_HOST_AHEAD_CYCLES = 1_000_000

Kwargs = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One default shape of one op.

    Attributes
    ----------
    op : str
    shape : str
        The sizes, as the table shows them.
    dtype : torch.dtype
    device : torch.device
    make_kwargs : callable
        Builds the op's keyword arguments (the reference's signature).
    flops : int or None
        Floating-point operations one call does; None where FLOP/s says nothing (memory-bound ops).
    bytes : int or None
        Bytes one call must read and write at least; None where GB/s says nothing (attention).
    """

    op: str
    shape: str
    dtype: torch.dtype
    device: torch.device
    make_kwargs: Callable[[], Kwargs]
    flops: Optional[int]
    bytes: Optional[int]


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


# ----------------------------------------------------------------------------
# Work accounting
# ----------------------------------------------------------------------------


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """(query, key) pairs attention computes for one sequence and head.

    With ``causal``, query i sees keys j <= i + seqlen_k - seqlen_q (bottom-right aligned).

    Parameters
    ----------
    seqlen_q, seqlen_k : int
    causal : bool

    Returns
    -------
    int
    """
    if not causal:
        return seqlen_q * seqlen_k
    return sum(min(seqlen_k, max(0, i + seqlen_k - seqlen_q + 1)) for i in range(seqlen_q))


def attention_flops(q_heads: int, head_dim: int, pairs: int) -> int:
    """4 * q_heads * head_dim * pairs: q k^T and p v, 2 FLOPs per multiply-add.

    Parameters
    ----------
    q_heads, head_dim : int
    pairs : int
        Visible (query, key) pairs summed over the batch's sequences.

    Returns
    -------
    int
    """
    return 4 * q_heads * head_dim * pairs


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------
# Default shapes
# ----------------------------------------------------------------------------


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _randn(shape, dtype, device, generator) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=generator)


def _paged_cache(batch, blocks_per_sequence, block_size, kv_heads, head_dim, dtype, device, generator):
    """Random paged k and v caches, and a block table handing each sequence shuffled blocks."""
    num_blocks = batch * blocks_per_sequence
    shape = (num_blocks, block_size, kv_heads, head_dim)
    order = torch.randperm(num_blocks, device=device, generator=generator)
    block_table = order.view(batch, blocks_per_sequence).to(torch.int32)
    return _randn(shape, dtype, device, generator), _randn(shape, dtype, device, generator), block_table


def _kv_cache(batch, positions, block_size, kv_heads, head_dim, dtype, device, generator):
    """Random k and v caches of ``positions`` per sequence: contiguous (block_table None) when
    ``block_size`` is None, else paged."""
    if block_size is not None:
        return _paged_cache(batch, -(-positions // block_size), block_size, kv_heads, head_dim, dtype, device,
                            generator)
    shape = (batch, positions, kv_heads, head_dim)
    return _randn(shape, dtype, device, generator), _randn(shape, dtype, device, generator), None


def _attention_case(device, dtype, batch, seqlen, q_heads, kv_heads, head_dim, causal=True) -> BenchCase:
    def make_kwargs() -> Kwargs:
        generator = _generator(device)
        q = _randn((batch, seqlen, q_heads, head_dim), dtype, device, generator)
        k = _randn((batch, seqlen, kv_heads, head_dim), dtype, device, generator)
        v = _randn((batch, seqlen, kv_heads, head_dim), dtype, device, generator)
        return dict(q=q, k=k, v=v, causal=causal)

    flops = attention_flops(q_heads, head_dim, batch * visible_pairs(seqlen, seqlen, causal=causal))
    shape = f"b={batch} s={seqlen} h={q_heads}/{kv_heads} d={head_dim}" + (" causal" if causal else "")
    return BenchCase("attention", shape, dtype, device, make_kwargs, flops, None)


def _decode_case(device, dtype, batch, seqlen, q_heads, kv_heads, head_dim, block_size=None,
                 capacity=None) -> BenchCase:
    """One new token per sequence against ``seqlen`` cached ones; paged when ``block_size`` is given.

    The cache holds ``capacity`` positions per sequence (default ``seqlen``: full), of which
    the first ``seqlen`` are attended to.
    """
    positions = seqlen if capacity is None else capacity

    def make_kwargs() -> Kwargs:
        generator = _generator(device)
        q = _randn((batch, 1, q_heads, head_dim), dtype, device, generator)
        k_cache, v_cache, block_table = _kv_cache(
            batch, positions, block_size, kv_heads, head_dim, dtype, device, generator
        )
        cache_seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
        return dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, block_table=block_table)

    flops = attention_flops(q_heads, head_dim, batch * seqlen)
    q_and_out = 2 * batch * q_heads * head_dim
    keys_and_values = 2 * batch * seqlen * kv_heads * head_dim
    layout = "contiguous" if block_size is None else f"paged/{block_size}"
    filled = seqlen if capacity is None else f"{seqlen}/{capacity}"
    shape = f"b={batch} cache={filled} {layout} h={q_heads}/{kv_heads} d={head_dim}"
    return BenchCase("decode_attention", shape, dtype, device, make_kwargs, flops,
                     (q_and_out + keys_and_values) * _itemsize(dtype))


def _append_kv_case(device, dtype, batch, seqlen, n_new, kv_heads, head_dim, block_size,
                    capacity=None) -> BenchCase:
    """``n_new`` tokens per sequence written after ``seqlen`` cached ones, into a paged cache
    (``block_size``) or a contiguous one (``block_size`` None) of ``capacity`` positions per
    sequence (default: just enough)."""
    positions = seqlen + n_new if capacity is None else capacity

    def make_kwargs() -> Kwargs:
        generator = _generator(device)
        k_cache, v_cache, block_table = _kv_cache(
            batch, positions, block_size, kv_heads, head_dim, dtype, device, generator
        )
        k = _randn((batch, n_new, kv_heads, head_dim), dtype, device, generator)
        v = _randn((batch, n_new, kv_heads, head_dim), dtype, device, generator)
        cache_seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
        return dict(k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens, block_table=block_table)

    new_elements = 2 * batch * n_new * kv_heads * head_dim  # k and v
    layout = "contiguous" if block_size is None else f"paged/{block_size}"
    at = seqlen if capacity is None else f"{seqlen}/{capacity}"
    shape = f"b={batch} new={n_new} at {at} {layout} kv_heads={kv_heads} d={head_dim}"
    return BenchCase("append_kv", shape, dtype, device, make_kwargs, None, 2 * new_elements * _itemsize(dtype))


_SAMPLING_PARAMS = dict(temperature=0.7, top_k=50, top_p=0.9)


def _sampling_case(op, device, dtype, batch, vocab, params=None) -> BenchCase:
    """Logits of ``batch`` rows over ``vocab``, filtered or sampled with ``params`` (default
    temperature 0.7, top-k 50, top-p 0.9); ``sample`` draws with seed 0."""
    params = _SAMPLING_PARAMS if params is None else params

    def make_kwargs() -> Kwargs:
        logits = _randn((batch, vocab), dtype, device, _generator(device)) * 3
        kwargs = dict(logits=logits, **params)
        if op == "sample":
            kwargs["seed"] = 0
        return kwargs

    logits_bytes = batch * vocab * _itemsize(dtype)
    written = logits_bytes if op == "filter_logits" else batch * 8  # filtered logits, or int64 tokens
    options = " ".join(f"{key}={value}" for key, value in params.items())
    return BenchCase(op, f"b={batch} vocab={vocab} {options}", dtype, device, make_kwargs, None,
                     logits_bytes + written)


def _linear_case(device, dtype, rows, n, k) -> BenchCase:
    def make_kwargs() -> Kwargs:
        generator = _generator(device)
        x = _randn((rows, k), dtype, device, generator)
        weight = _randn((n, k), dtype, device, generator) / k**0.5
        return dict(x=x, weight=weight)

    moved = (n * k + rows * k + rows * n) * _itemsize(dtype)
    return BenchCase("linear", f"b={rows} n={n} k={k}", dtype, device, make_kwargs, 2 * rows * n * k, moved)


# SmolLM2-135M's LM head, its largest matmul: (N, K) = (vocabulary, hidden).
_HEAD = (49152, 576)


def default_cases(op: str, device) -> List[BenchCase]:
    """The shapes ``fmkernels bench`` times ``op`` on.

    On the CPU, the shapes the C++ backend is measured on: a 2048-token causal prefill
    (16 query / 4 KV heads of 128), decode of one token over an 8192-token cache (batch 4,
    32 / 8 heads of 128; contiguous, and paged in float32), in float32 and bfloat16,
    sampling over a 128256-token vocabulary (batch 16), and 1 and 8 rows against
    SmolLM2-135M's LM head (49152 x 576) in float32 and bfloat16. On a GPU they are large enough to
    fill it: Llama-3-8B-like heads, 2048-token prefill over 8 sequences, 4096-token paged
    decode over 64, 128 rows of logits, 16 rows against its MLP's 14336 x 4096 weight.

    Parameters
    ----------
    op : str
        One of ``fmkernels.registry.OPS``.
    device : str or torch.device

    Returns
    -------
    list of BenchCase
    """
    device = torch.device(device)
    fp32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cpu":
        table = {
            "attention": lambda: [_attention_case(device, dtype, 1, 2048, 16, 4, 128) for dtype in (fp32, bf16)],
            "decode_attention": lambda: [
                _decode_case(device, fp32, 4, 8192, 32, 8, 128),
                _decode_case(device, bf16, 4, 8192, 32, 8, 128),
                _decode_case(device, fp32, 4, 8192, 32, 8, 128, block_size=16),
            ],
            "append_kv": lambda: [_append_kv_case(device, fp32, 8, 1000, 1, 8, 128, 16)],
            "filter_logits": lambda: [_sampling_case("filter_logits", device, fp32, 16, 128256)],
            "sample": lambda: [_sampling_case("sample", device, fp32, 16, 128256)],
            "linear": lambda: [_linear_case(device, dtype, rows, *_HEAD) for dtype in (fp32, bf16) for rows in (1, 8)],
        }
    else:
        table = {
            "attention": lambda: [_attention_case(device, bf16, 8, 2048, 32, 8, 128)],
            "decode_attention": lambda: [_decode_case(device, bf16, 64, 4096, 32, 8, 128, 16)],
            "append_kv": lambda: [_append_kv_case(device, bf16, 64, 4096, 16, 8, 128, 16)],
            "filter_logits": lambda: [_sampling_case("filter_logits", device, fp32, 128, 128256)],
            "sample": lambda: [_sampling_case("sample", device, fp32, 128, 128256)],
            "linear": lambda: [_linear_case(device, bf16, 16, 14336, 4096)],
        }
    if op not in table:
        raise ValueError(f"op must be one of {', '.join(registry.OPS)}, got {op!r}")
    return table[op]()


def sweep_cases(op: str, device) -> List[BenchCase]:
    """The grids ``fmkernels bench --sweep`` times ``op`` over: how speed moves with size.

    On a GPU (bfloat16 attention, float32 logits):

    * attention: seqlen 1k to 16k at 16k tokens per call (batch = 16384 / seqlen), 16 heads
      of 128 (FlashAttention's published setting), causal and not;
    * decode_attention: one new token, 32 query / 8 KV heads of 128, batch 1, 4, 16, 64 x
      cache 1k, 2k, 8k, 32k, contiguous; and paged (blocks of 16) at batch 1 / 32k,
      16 / 8k and 64 / 2k;
    * append_kv: 16 new tokens over batch 1 and 64, paged;
    * filter_logits and sample: vocabulary 128256, batch 1, 16, 64, 256 (sample) and 1,
      64, 256 (filter_logits), top_k 50, top_p 0.9, temperature 0.7;
    * linear: 1 to 256 rows against Llama-3-8B's 14336 x 4096 MLP weight.

    On the CPU, the same kinds of grid at sizes a few cores finish in minutes (linear: 1 to
    16 rows, the C++ kernel's range, against SmolLM2-135M's 49152 x 576 LM head).

    Parameters
    ----------
    op : str
        One of ``fmkernels.registry.OPS``.
    device : str or torch.device

    Returns
    -------
    list of BenchCase
    """
    device = torch.device(device)
    fp32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cpu":
        seqlens, tokens = (256, 512, 1024, 2048), 2048
        decode_grid = [(batch, context) for batch in (1, 4) for context in (1024, 8192)]
        paged_grid = [(1, 8192)]
        sample_batches, filter_batches, append_batches = (1, 16), (1, 16), (1, 8)
        linear_rows, linear_shape = (1, 2, 4, 8, 16), _HEAD
        dtype = fp32
    else:
        seqlens, tokens = (1024, 2048, 4096, 8192, 16384), 16384
        decode_grid = [(batch, context) for batch in (1, 4, 16, 64) for context in (1024, 2048, 8192, 32768)]
        paged_grid = [(1, 32768), (16, 8192), (64, 2048)]
        sample_batches, filter_batches, append_batches = (1, 16, 64, 256), (1, 64, 256), (1, 64)
        linear_rows, linear_shape = (1, 4, 16, 64, 256), (14336, 4096)
        dtype = bf16
    table = {
        "attention": lambda: [
            _attention_case(device, dtype, max(1, tokens // seqlen), seqlen, 16, 16, 128, causal)
            for causal in (False, True) for seqlen in seqlens
        ],
        "decode_attention": lambda: [
            _decode_case(device, dtype, batch, context, 32, 8, 128) for batch, context in decode_grid
        ] + [_decode_case(device, dtype, batch, context, 32, 8, 128, block_size=16) for batch, context in paged_grid],
        "append_kv": lambda: [_append_kv_case(device, dtype, batch, 2048, 16, 8, 128, 16) for batch in append_batches],
        "filter_logits": lambda: [_sampling_case("filter_logits", device, fp32, batch, 128256) for batch in filter_batches],
        "sample": lambda: [_sampling_case("sample", device, fp32, batch, 128256) for batch in sample_batches],
        "linear": lambda: [_linear_case(device, dtype, rows, *linear_shape) for rows in linear_rows],
    }
    if op not in table:
        raise ValueError(f"op must be one of {', '.join(registry.OPS)}, got {op!r}")
    return table[op]()


# ----------------------------------------------------------------------------
# The hardware's limits, measured
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Peaks:
    """What this device reaches on the simplest kernels, measured in the same run.

    Attributes
    ----------
    bandwidth_gbps : float
        Copying a large tensor: bytes read + written per second, / 1e9.
    tflops : dict
        Per dtype name ("float32", "bfloat16", ...): a large square matmul's FLOP/s, / 1e12.
    """

    bandwidth_gbps: float
    tflops: Dict[str, float]


def measure_peaks(device, dtypes: Iterable[torch.dtype]) -> Peaks:
    """Measure the copy bandwidth and the matmul rate of each dtype on ``device`` (fastest calls).

    These are the limits a kernel is held to (DESIGN.md, "Performance method"): a matmul
    from torch's BLAS is as close to the FLOP peak as this machine gets in practice, and a
    tensor copy as close to the memory bandwidth.

    Parameters
    ----------
    device : str or torch.device
    dtypes : iterable of torch.dtype

    Returns
    -------
    Peaks
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    # A peak is the best the device showed: the fastest call, not the median.
    elements = (1 << 28) // 4  # 256 MB: past any cache, CPU or GPU
    # Random data, never constants: a GPU's matmul runs measurably faster on zeros or ones.
    generator = _generator(device)
    source = torch.randn(elements, dtype=torch.float32, device=device, generator=generator)
    target = torch.empty_like(source)
    seconds = min(call_seconds(lambda: target.copy_(source), device, 20 if on_gpu else 10))
    bandwidth = 2 * source.numel() * 4 / seconds / 1e9
    size = 8192 if on_gpu else 4096  # large enough for the BLAS to reach its best rate
    tflops = {}
    for dtype in dict.fromkeys(dtypes):
        a = torch.randn(size, size, dtype=torch.float32, device=device, generator=generator).to(dtype)
        seconds = min(call_seconds(lambda: a @ a, device, 20 if on_gpu else 5))
        tflops[str(dtype).replace("torch.", "")] = 2 * size**3 / seconds / 1e12
    return Peaks(bandwidth, tflops)


def roofline_fraction(flops: Optional[int], bytes_moved: Optional[int], seconds: float, dtype: str,
                      peaks: Peaks) -> Optional[float]:
    """The fraction of the hardware's limit a call reached: the roofline floor over its time.

    The floor is the larger of FLOPs / the dtype's matmul rate and bytes / the copy
    bandwidth: whichever resource the call cannot do faster than.

    Parameters
    ----------
    flops, bytes_moved : int or None
        The call's work (None where not counted).
    seconds : float
        Its median time.
    dtype : str
        Its inputs' dtype name, for the FLOP rate.
    peaks : Peaks

    Returns
    -------
    float or None
        None when neither work is counted.
    """
    floors = []
    if flops and dtype in peaks.tflops:
        floors.append(flops / (peaks.tflops[dtype] * 1e12))
    if bytes_moved:
        floors.append(bytes_moved / (peaks.bandwidth_gbps * 1e9))
    return max(floors) / seconds if floors else None


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def call_seconds(fn: Callable[[], Any], device, repeats: int) -> List[float]:
    """Times of ``repeats`` calls of ``fn()``, after max(1, repeats // 5) warm-up calls.

    Parameters
    ----------
    fn : callable
        Called with no arguments.
    device : str or torch.device
        On CUDA, each call is timed with CUDA events on the current stream, after a buffer
        larger than the L2 cache is zeroed, so no call finds the previous one's data in
        cache, and after a queued busy-wait (``torch.cuda._sleep``) that keeps the GPU
        occupied while the host launches the call: the time is the call's GPU work, not
        its Python launch cost (a call that synchronises with the host still pays it).
        Elsewhere, time.perf_counter around each call.
    repeats : int
        Timed calls, >= 1.

    Returns
    -------
    list of float
        Seconds, one per timed call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(max(1, repeats // 5)):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    sleep = getattr(torch.cuda, "_sleep", None)
    for start, end in events:
        flush.zero_()
        if sleep is not None:
            # Keep the GPU busy while the host launches the call, so the timed region holds
            # the call's GPU work and not Python's launch cost (as a CUDA-graph replay would).
            sleep(_HOST_AHEAD_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def median_seconds(fn: Callable[[], Any], device, repeats: int) -> float:
    """Median of ``call_seconds(fn, device, repeats)``: what a benchmark row reports."""
    return statistics.median(call_seconds(fn, device, repeats))


# ----------------------------------------------------------------------------
# A run
# ----------------------------------------------------------------------------


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
        seconds = median_seconds(lambda: impl.fn(**kwargs), case.device, repeats)
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


def device_name(device) -> str:
    """The GPU's name (torch.cuda.get_device_name), or the CPU's model name.

    Parameters
    ----------
    device : str or torch.device

    Returns
    -------
    str
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return host.processor() or host.machine()


def cpu_isa() -> Optional[str]:
    """The instruction set fmkernels' C++ CPU kernels chose on this machine ("avx512", "avx2"
    or "generic", after any FMKERNELS_CPU_ISA cap), or None without the extension."""
    module = platform.cpu_module()
    return module.isa() if module is not None and hasattr(module, "isa") else None


def device_label(device) -> str:
    """How a table names the device: ``device_name``, and on the CPU the kernels' instruction set
    ("Intel(R) Xeon(R) Processor, avx512")."""
    isa = cpu_isa() if torch.device(device).type == "cpu" else None
    return device_name(device) + (f", {isa}" if isa else "")


def metadata(device, command: str, peaks: Optional[Peaks] = None) -> Dict[str, Any]:
    """What a benchmark JSON records beside its rows, so a figure is never quoted without its device.

    Parameters
    ----------
    device : str or torch.device
    command : str
        The command line that produced the rows.
    peaks : Peaks, optional
        The measured limits the rows' roofline fractions refer to.

    Returns
    -------
    dict
        device, device_name, cpu_threads, torch_version, fmkernels_version, date (UTC,
        ISO 8601), command, and peak_bandwidth_gbps and peak_tflops when measured; on the
        CPU also cpu_isa, the instruction set fmkernels' C++ kernels run ("avx512", "avx2" or
        "generic"; None where the extension is not built).
    """
    extra = {} if peaks is None else {"peak_bandwidth_gbps": peaks.bandwidth_gbps, "peak_tflops": peaks.tflops}
    if torch.device(device).type == "cpu":
        extra["cpu_isa"] = cpu_isa()
    return {
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "fmkernels_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        **extra,
    }


def write_json(path: str, rows: Sequence[BenchRow], meta: Dict[str, Any]) -> None:
    """Write ``{"metadata": meta, "rows": [...]}`` to ``path`` (parent folders created).

    Parameters
    ----------
    path : str
    rows : sequence of BenchRow
    meta : dict
        From ``metadata``.
    """
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as file:
        json.dump({"metadata": meta, "rows": [dataclasses.asdict(row) for row in rows]}, file, indent=2)
        file.write("\n")

