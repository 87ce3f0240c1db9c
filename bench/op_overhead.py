"""Per-call time of every public op at decode-sized inputs: the kernel against the ops layer.

    python bench/op_overhead.py [--ops decode_attention,append_kv,sample,filter_logits,attention,linear]
                                [--device cpu|cuda] [--threads N] [--calls N] [--samples N]
                                [--no-compile] [--json PATH]

Inputs (``fmkernels.benchmark.overhead_cases``) are SmolLM2-135M's decode step at batch 1 and 8,
float32 and bfloat16: 9 query / 3 KV heads of 64 over a 512-position cache with 300 filled
(contiguous, and paged in 16-token blocks), a 49152-token vocabulary (greedy, and top-k 50 /
top-p 0.9 with a seed), a 32-token prefill and the 960 x 576 q/k/v weight. Each op is called
four ways (``fmkernels.benchmark.measure_overhead``):

* kernel: on the CPU, the ``fmkernels._C`` binding the cpu backend calls, its tensor views and
  outputs built once outside the timed loop; on CUDA, the cuda backend's implementation called
  directly (it builds its views and outputs per call);
* op: ``fmkernels.<op>(..., backend="cpu")`` (or "cuda"), default checks;
* op, no device checks: the same inside ``fmkernels.device_checks(False)`` (on the CPU the
  values of host tensors are checked anyway, so this equals op there);
* compiled: a ``torch.compile(fullgraph=True)`` function calling the op (``--no-compile``
  leaves it out; compiling takes seconds a row).

Every way's output is checked equal to the kernel's, bit for bit, before anything is timed.
Then rounds of one sample per way, the ways in turn, so a noisy machine's load falls on all of
them; a sample times ``--calls`` calls back to back. The table gives µs per call, median/min over
``--samples`` samples, the overhead (a way's median less the kernel's) and, for append_kv,
decode_attention and sample, issue 18's target: op <= 1.3 x kernel + 15 µs, PASS or FAIL. On
CUDA the times are host time per call (the GPU's work is not waited for).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import List, Optional

import torch

from fmkernels import benchmark, registry


def print_table(rows: List[benchmark.OverheadRow], meta: dict) -> None:
    print(benchmark.overhead_title(meta))
    print(f"target: {meta['target']}")
    headers = ["op", "shape", "dtype", *benchmark.OVERHEAD_COLUMNS]
    cells = [[row.op, row.shape, row.dtype, *benchmark.overhead_cells(row)] for row in rows]
    widths = [max(len(line[i]) for line in [headers] + cells) for i in range(len(headers))]
    for line in [headers] + cells:
        print("  ".join(text.ljust(width) if i < 3 else text.rjust(width)
                        for i, (text, width) in enumerate(zip(line, widths))).rstrip())
    for row in rows:
        if row.error:
            print(f"error: {row.op} {row.shape} {row.dtype}: {row.error}")
        elif row.skipped and not row.median_us:
            print(f"skipped: {row.op} {row.shape} {row.dtype}: {row.skipped['kernel']}")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _ops(value: str) -> List[str]:
    names = [name for name in value.split(",") if name]
    unknown = [name for name in names if name not in registry.OPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"ops of {', '.join(registry.OPS)}, got {value!r}")
    return names


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=_ops, default=list(registry.OPS), help="comma-separated subset of the ops")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="torch.set_num_threads for the run (default: this process's)")
    parser.add_argument("--calls", type=_positive, default=benchmark.DEFAULT_OVERHEAD_CALLS,
                        help="calls timed together in one sample")
    parser.add_argument("--samples", type=_positive, default=benchmark.DEFAULT_OVERHEAD_SAMPLES,
                        help="samples per way, interleaved")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd op")
    parser.add_argument("--json", default=None, help="write rows and metadata here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")

    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        command = " ".join(shlex.quote(a) for a in ["python", "bench/op_overhead.py",
                                                    *(sys.argv[1:] if argv is None else argv)])
        meta = benchmark.overhead_metadata(device, command, args.calls, args.samples)
        rows = [benchmark.measure_overhead(case, args.calls, args.samples, compile_op=not args.no_compile)
                for op in args.ops for case in benchmark.overhead_cases(op, device)]
    finally:
        torch.set_num_threads(previous_threads)
    print_table(rows, meta)
    if args.json:
        benchmark.write_json(args.json, rows, meta)
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
