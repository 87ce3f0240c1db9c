"""The C++ CPU linear kernel against torch's F.linear, on weights that stream from DRAM.

    python bench/cpu_linear.py [--dtypes float32,bfloat16] [--rows 1,2,4,8,16] [--threads 1,2]
                               [--shapes qkv,o,gate_up,down,head] [--weights float,q4_1,q8_0,...]
                               [--stream-mib N] [--repeats N] [--json PATH]

--weights: "float" (the weight in x's dtype) and GGUF's formats (``fmkernels.QuantizedWeight``:
q8_0, q4_0, q4_1, q4_k, q6_k). For a format, the kernel and the op read the blocks; F.linear
multiplies by the weight dequantized ahead into x's dtype (how a model that dequantizes at load
runs), so it reads 2 or 4 bytes a weight where the kernel reads the format's 4.5 to 8.5 bits.

Shapes: SmolLM2-135M's matmuls, weight (N, K) as nn.Linear holds it: the fused q/k/v
projection 960x576, the attention output 576x576, the fused gate/up projection 3072x576, the
down projection 576x1536 and the LM head 49152x576. x is (rows, K): a decode step's rows
(batch x new tokens).

Roofline: memory bound. A call reads the weight once (N x K elements) against 2 x rows
FLOPs per element, and x and out are small. "GB/s" is the weight's bytes (plus x's and
out's) over the time; "% copy" is that over the copy bandwidth measured in the same run
(``fmkernels.benchmark.measure_peaks``: a 256 MB tensor copy, bytes read and written both
counted). A kernel that only reads can pass 100%.

As in a model, the weights come from DRAM, not from cache: each shape has as many distinct
copies of its weight as it takes to fill --stream-mib (default twice the last-level cache),
and one timed pass calls the matmul on every copy in turn, like one decode step through the
layers. Kernel, op and F.linear passes alternate, so other load on the machine falls on all
three; the table shows medians of --repeats passes (the JSON also the fastest).

* kernel: ``fmkernels.ops._cpu.linear``, the cpu backend's adapter (no input checks);
* op: ``fmkernels.linear(x, w, backend="cpu")``, the public op: checks, torch.library dispatch;
* F.linear: ``torch.nn.functional.linear(x, w)``.

"vs F.linear" is F.linear's time over the kernel's (the same work, not the same bytes, for a
quantized weight).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import fmkernels
from fmkernels import benchmark, testing
from fmkernels.ops import _cpu
from fmkernels.quantized import FORMATS, QuantizedWeight, quantize

#: SmolLM2-135M's weights, (N, K).
SHAPES: Dict[str, tuple] = {
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "head": (49152, 576),
}
IMPLEMENTATIONS = ("kernel", "op", "F.linear")


@dataclasses.dataclass(frozen=True)
class Row:
    """One (shape, dtype, rows, threads): each implementation's median and best GB/s."""

    shape: str
    n: int
    k: int
    dtype: str
    rows: int
    threads: int
    copies: int
    bytes_per_call: int  # the kernel's and the op's: the weight as stored, x and out
    repeats: int
    median_gbps: Dict[str, float]
    best_gbps: Dict[str, float]
    copy_gbps: float
    speedup: float  # F.linear's median time over the kernel's
    weight: str = "float"  # "float" (x's dtype) or a QuantizedWeight's format
    f_linear_bytes_per_call: int = 0  # F.linear's: its float weight, x and out
    median_us: Dict[str, float] = dataclasses.field(default_factory=dict)  # per call


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs, then sysconf), or 32 MiB when none does."""
    sizes = []
    folder = "/sys/devices/system/cpu/cpu0/cache"
    if os.path.isdir(folder):
        for entry in os.listdir(folder):
            try:
                with open(os.path.join(folder, entry, "size")) as file:
                    text = file.read().strip()
            except OSError:
                continue
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            if text and text[-1] in units and text[:-1].isdigit():
                sizes.append(int(text[:-1]) * units[text[-1]])
            elif text.isdigit():
                sizes.append(int(text))
    if not sizes:
        try:
            sizes.append(os.sysconf("SC_LEVEL3_CACHE_SIZE"))
        except (ValueError, OSError):
            pass
    return max([size for size in sizes if size > 0], default=32 << 20)


def weight_copies(n: int, k: int, dtype: torch.dtype, stream_bytes: int, generator, weight_format: str = "float"):
    """Distinct copies of one random N(0, 1/K) weight, at least two, filling stream_bytes: in
    ``dtype``, or quantized to ``weight_format``."""
    values = torch.randn((n, k), generator=generator) / math.sqrt(k)
    if weight_format != "float":
        weight = quantize(values, weight_format)
        count = max(2, -(-stream_bytes // weight.nbytes))
        return [weight] + [QuantizedWeight(weight.blocks.clone(), weight.format, weight.shape)
                           for _ in range(count - 1)]
    weight = values.to(dtype)
    count = max(2, -(-stream_bytes // (weight.numel() * weight.element_size())))
    return [weight] + [weight.clone() for _ in range(count - 1)]


def weight_bytes(weight) -> int:
    if isinstance(weight, QuantizedWeight):
        return weight.nbytes
    return weight.numel() * weight.element_size()


def pass_seconds(fn, x: torch.Tensor, weights: List[torch.Tensor]) -> float:
    start = time.perf_counter()
    for weight in weights:
        fn(x, weight)
    return time.perf_counter() - start


def measure(name: str, dtype: torch.dtype, rows: int, threads: int, weights: list,
            repeats: int, copy_gbps: float, generator) -> Row:
    n, k = weights[0].shape
    x = torch.randn((rows, k), generator=generator).to(dtype)
    quantized = isinstance(weights[0], QuantizedWeight)
    # F.linear's operands: the float weights (dequantized ahead, as a model loading them would)
    floats = [w.dequantize(dtype) for w in weights] if quantized else weights
    calls = {
        "kernel": (_cpu.linear, weights),
        "op": (lambda x, w: fmkernels.linear(x, w, backend="cpu"), weights),
        "F.linear": (F.linear, floats),
    }
    for label, (fn, operands) in calls.items():
        check = testing.compare_linear(dict(x=x, weight=weights[0]), fn(x, operands[0]))
        # F.linear in a 16-bit dtype errs more than the kernels' fp32 sums: a loose check there
        assert check.passed or (label == "F.linear" and check.max_error < 5e-2), (label, check)
        pass_seconds(fn, x, operands)  # warm-up: page the copies in, let the threads start
    times = {label: [] for label in calls}
    for _ in range(repeats):
        for label, (fn, operands) in calls.items():
            times[label].append(pass_seconds(fn, x, operands))
    io = (rows * k + rows * n) * x.element_size()
    per_call = {label: weight_bytes(operands[0]) + io for label, (_, operands) in calls.items()}
    copies = len(weights)
    median = {label: per_call[label] * copies / statistics.median(t) / 1e9 for label, t in times.items()}
    return Row(
        shape=name, n=n, k=k, dtype=str(dtype).replace("torch.", ""), rows=rows, threads=threads,
        copies=copies, bytes_per_call=per_call["kernel"], repeats=repeats, median_gbps=median,
        best_gbps={label: per_call[label] * copies / min(t) / 1e9 for label, t in times.items()},
        copy_gbps=copy_gbps, speedup=statistics.median(times["F.linear"]) / statistics.median(times["kernel"]),
        weight=weights[0].format if quantized else "float", f_linear_bytes_per_call=per_call["F.linear"],
        median_us={label: statistics.median(t) / copies * 1e6 for label, t in times.items()},
    )


def print_table(rows: List[Row], meta: dict) -> None:
    print(f"linear x (rows, K) @ w (N, K)^T on {meta['device_label']}; GB/s = weight+x+out bytes / time, "
          f"median of {rows[0].repeats} passes; copy bandwidth {rows[0].copy_gbps:.1f} GB/s")
    header = (f"{'shape':<8} {'N x K':>11} {'weight':<6} {'dtype':<9} {'rows':>4} {'thr':>3} {'copies':>6} "
              f"{'kernel':>7} {'% copy':>6} {'us':>7} {'op':>7} {'F.linear':>8} {'% copy':>6} {'vs F.linear':>11}")
    print(header)
    for r in rows:
        g = r.median_gbps
        print(f"{r.shape:<8} {f'{r.n}x{r.k}':>11} {r.weight:<6} {r.dtype:<9} {r.rows:>4} {r.threads:>3} "
              f"{r.copies:>6} {g['kernel']:>7.1f} {g['kernel'] / r.copy_gbps:>6.0%} {r.median_us['kernel']:>7.1f} "
              f"{g['op']:>7.1f} {g['F.linear']:>8.1f} {g['F.linear'] / r.copy_gbps:>6.0%} {r.speedup:>10.2f}x")


def _list(kind):
    return lambda value: [kind(v) for v in value.split(",") if v]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", type=_list(str), default=["float32", "bfloat16"])
    parser.add_argument("--rows", type=_list(int), default=[1, 2, 4, 8, 16])
    parser.add_argument("--threads", type=_list(int), default=None,
                        help="comma-separated torch.set_num_threads values (default: this process's)")
    parser.add_argument("--shapes", type=_list(str), default=list(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--weights", type=_list(str), default=["float"],
                        help=f"float and/or GGUF formats: {', '.join(sorted(FORMATS))}")
    parser.add_argument("--stream-mib", type=int, default=None,
                        help="distinct weight memory per shape (default: twice the last-level cache)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None, help="write rows and metadata here")
    args = parser.parse_args(argv)
    for name in args.shapes:
        if name not in SHAPES:
            parser.error(f"--shapes: unknown shape {name!r}; known: {', '.join(SHAPES)}")
    for name in args.dtypes:
        if name not in ("float32", "bfloat16", "float16"):
            parser.error(f"--dtypes: float32, bfloat16 or float16, got {name!r}")
    for name in args.weights:
        if name != "float" and name not in FORMATS:
            parser.error(f"--weights: float or one of {', '.join(sorted(FORMATS))}, got {name!r}")
    threads = args.threads or [torch.get_num_threads()]
    most_rows = _cpu.MAX_LINEAR_ROWS if "float" in args.weights else 4096  # quantized: any rows
    if min(threads + args.rows + [args.repeats]) < 1 or max(args.rows) > most_rows:
        parser.error(f"--threads and --repeats must be >= 1, --rows in [1, {most_rows}] "
                     f"(above {_cpu.MAX_LINEAR_ROWS} for quantized --weights only)")
    stream_bytes = (args.stream_mib << 20) if args.stream_mib else 2 * last_level_cache_bytes()

    device = torch.device("cpu")
    peaks = benchmark.measure_peaks(device, [])
    command = " ".join(shlex.quote(a) for a in ["python", "bench/cpu_linear.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    meta = benchmark.metadata(device, command, peaks)
    meta.update(device_label=benchmark.device_label(device), stream_bytes=stream_bytes,
                last_level_cache_bytes=last_level_cache_bytes())
    generator = torch.Generator().manual_seed(0)
    rows = []
    previous_threads = torch.get_num_threads()
    try:
        for name in args.shapes:
            for weight_format in args.weights:
                n, k = SHAPES[name]
                if weight_format != "float" and k % FORMATS[weight_format].block_size:
                    print(f"skipped: {name} ({n}x{k}): K is not a whole number of {weight_format} blocks")
                    continue
                for dtype in (getattr(torch, d) for d in args.dtypes):
                    weights = weight_copies(n, k, dtype, stream_bytes, generator, weight_format)
                    for count in threads:
                        torch.set_num_threads(count)
                        for r in args.rows:
                            rows.append(measure(name, dtype, r, count, weights, args.repeats,
                                                peaks.bandwidth_gbps, generator))
                    del weights
    finally:
        torch.set_num_threads(previous_threads)
    print_table(rows, meta)
    if args.json:
        benchmark.write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
