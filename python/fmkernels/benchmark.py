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

The overhead section (``overhead_cases``, ``measure_overhead``; ``bench/op_overhead.py``) times
the other side: the public op's whole call against its kernel alone, at decode-sized inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform as host
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from . import __version__, bench_results, ops, platform, reference, registry
from ._validation import device_checks
from ._views import tensor_view
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


def _sampling_case(op, device, dtype, batch, vocab, params=None, allowed: Optional[float] = None) -> BenchCase:
    """Logits of ``batch`` rows over ``vocab``, filtered or sampled with ``params`` (default
    temperature 0.7, top-k 50, top-p 0.9); ``sample`` draws with seed 0. ``allowed``: the
    fraction of tokens a random ``allowed`` bitmask lets through (None: no bitmask)."""
    params = _SAMPLING_PARAMS if params is None else params

    def make_kwargs() -> Kwargs:
        generator = _generator(device)
        logits = _randn((batch, vocab), dtype, device, generator) * 3
        kwargs = dict(logits=logits, **params)
        if allowed is not None:
            mask = torch.rand((batch, vocab), generator=generator, device=device) < allowed
            mask[:, 0] = True  # every row allows a token
            kwargs["allowed"] = reference.pack_allowed(mask)
        if op == "sample":
            kwargs["seed"] = 0
        return kwargs

    logits_bytes = batch * vocab * _itemsize(dtype)
    written = logits_bytes if op == "filter_logits" else batch * 8  # filtered logits, or int64 tokens
    mask_bytes = 0 if allowed is None else batch * reference.allowed_words(vocab) * 4
    options = " ".join(f"{key}={value}" for key, value in params.items())
    if allowed is not None:
        options += f" allowed={allowed:.0%}"
    return BenchCase(op, f"b={batch} vocab={vocab} {options}", dtype, device, make_kwargs, None,
                     logits_bytes + mask_bytes + written)


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


def _cases_of(op: str, table: Dict[str, Callable[[], List[BenchCase]]]) -> List[BenchCase]:
    """``table[op]()``: the cases a table builds for ``op``; an unknown op raises ValueError."""
    if op not in table:
        raise ValueError(f"op must be one of {', '.join(registry.OPS)}, got {op!r}")
    return table[op]()


def default_cases(op: str, device) -> List[BenchCase]:
    """The shapes ``fmkernels bench`` times ``op`` on.

    On the CPU, the shapes the C++ backend is measured on: a 2048-token causal prefill
    (16 query / 4 KV heads of 128), decode of one token over an 8192-token cache (batch 4,
    32 / 8 heads of 128; contiguous, and paged in float32), in float32 and bfloat16,
    sampling over a 128256-token vocabulary (batch 16; sample also under a bitmask allowing 1%
    of the tokens, as a grammar does), and 1 and 8 rows against
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
            "sample": lambda: [_sampling_case("sample", device, fp32, 16, 128256),
                               _sampling_case("sample", device, fp32, 16, 128256, allowed=0.01)],
            "linear": lambda: [_linear_case(device, dtype, rows, *_HEAD) for dtype in (fp32, bf16) for rows in (1, 8)],
        }
    else:
        table = {
            "attention": lambda: [_attention_case(device, bf16, 8, 2048, 32, 8, 128)],
            "decode_attention": lambda: [_decode_case(device, bf16, 64, 4096, 32, 8, 128, 16)],
            "append_kv": lambda: [_append_kv_case(device, bf16, 64, 4096, 16, 8, 128, 16)],
            "filter_logits": lambda: [_sampling_case("filter_logits", device, fp32, 128, 128256)],
            "sample": lambda: [_sampling_case("sample", device, fp32, 128, 128256),
                               _sampling_case("sample", device, fp32, 128, 128256, allowed=0.01)],
            "linear": lambda: [_linear_case(device, bf16, 16, 14336, 4096)],
        }
    return _cases_of(op, table)


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
    return _cases_of(op, table)


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


def interleaved_median_seconds(functions: Dict[str, Callable[[], Any]], device, rounds: int,
                               calls_per_round: int = 5) -> Dict[str, float]:
    """Median seconds per call of each function, timed in turn ``rounds`` times
    (``calls_per_round`` calls each), so load from other processes hits every function alike."""
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            times[name] += call_seconds(fn, device, calls_per_round)
    return {name: statistics.median(spent) for name, spent in times.items()}


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
    rows : sequence of BenchRow, or of dicts (a bench/ script's own rows)
    meta : dict
        From ``metadata``.
    """
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    rows = [row if isinstance(row, dict) else dataclasses.asdict(row) for row in rows]
    with open(path, "w") as file:
        json.dump({"metadata": meta, "rows": rows}, file, indent=2)
        file.write("\n")


# ----------------------------------------------------------------------------
# Per-call overhead of the public ops
# ----------------------------------------------------------------------------

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
