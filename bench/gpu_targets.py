"""The GPU targets of issue 29, each measured beside its peers in one process.

    python bench/gpu_targets.py [--repeats 20] [--rounds 4] [--json PATH]

One table per target, then one line per target with the measured value and whether it is met:

* decode: ``decode_attention`` at batch 1 / 32k and batch 64 / 2k cached tokens, contiguous and
  paged (blocks of 16), bf16, 32 query / 8 KV heads of 128, as a fraction of the copy bandwidth
  measured in the same run (bytes: q, the visible keys and values, the output); target 0.85 for
  the best of fmkernels' backends, in every case. The SDPA decode peers are timed beside them.
* prefill: ``attention`` at seqlen 4k, 8k and 16k (16k tokens a call, 16 heads of 128, bf16,
  causal and not) against SDPA's flash backend (FlashAttention-2); target 1.3x for the best of
  fmkernels' backends (cuda, triton, and the Hopper Triton path where it is registered) at every
  seqlen >= 4k. cuDNN's SDPA backend is timed beside them.
* masked sampling: ``sample`` under an ``allowed`` bitmask against the same call without one
  (``bench/masked_sampling.py``, kernels called directly), vocab 128256, batch 1, 16 and 256,
  greedy and temperature 0.7 / top-k 50 / top-p 0.9, masks allowing all, half and 1% of the
  tokens; target: masked at most 1.10x unmasked in every row, per backend.
* filter_logits: batch 1 over 128256 tokens (temperature 0.7, top-k 50, top-p 0.9) against the
  sort-based reference; target 3x for the best of fmkernels' backends.

Implementations are timed as ``fmkernels bench`` times them (``fmkernels.benchmark.measure``:
the implementation called directly, CUDA events, the L2 flushed, the host's launch cost queued
behind a busy-wait). ``--json`` writes every timed row and the target lines, with the run's
metadata (device, versions, the measured peaks, this command). Exits 0 when every target is met,
3 when the run measured them and some is not (``bench/gpu_check.sh`` tells that from a failure).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

import fmkernels  # noqa: F401  (registers the backends and peers)
from fmkernels import benchmark, registry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import masked_sampling  # noqa: E402  (bench/masked_sampling.py, beside this file)

DECODE_TARGET = 0.85
PREFILL_TARGET = 1.3
MASKED_TARGET = 1.10
FILTER_TARGET = 3.0

#: fmkernels' backends whose best row is held to each target, and the peers timed beside them.
DECODE_IMPLS = ("cuda", "triton", "sdpa", "sdpa_flash")
PREFILL_IMPLS = ("cuda", "triton", "triton_hopper", "sdpa_flash", "sdpa_cudnn")
PREFILL_PEER = "sdpa_flash"
FILTER_IMPLS = ("cuda", "triton", "reference")
MASKED_BACKENDS = ("cuda", "triton")
MASKED_BATCHES = (1, 16, 256)
VOCAB = 128256


def _size(case: benchmark.BenchCase, key: str) -> Optional[int]:
    """The integer after ``key=`` in a case's shape ("b=64 cache=2048 paged/16 ..." -> 64 for b)."""
    match = re.search(rf"\b{key}=(\d+)\b", case.shape)
    return int(match.group(1)) if match else None


#: Which sweep cases each target takes (``fmkernels.benchmark.sweep_cases`` on a GPU).
TARGET_CASES: Dict[str, Callable[[benchmark.BenchCase], bool]] = {
    "decode_attention": lambda case: (_size(case, "b"), _size(case, "cache")) in ((1, 32768), (64, 2048)),
    "attention": lambda case: (_size(case, "s") or 0) >= 4096,
    "filter_logits": lambda case: _size(case, "b") == 1,
}
TARGET_IMPLS = {"decode_attention": DECODE_IMPLS, "attention": PREFILL_IMPLS, "filter_logits": FILTER_IMPLS}


def jobs(device) -> List[benchmark.Job]:
    """The timed jobs of the decode, prefill and filter_logits targets: the registered
    implementations of ``TARGET_IMPLS`` on the sweep cases ``TARGET_CASES`` picks."""
    planned = []
    for op, picks in TARGET_CASES.items():
        names = [name for name in TARGET_IMPLS[op] if name in {impl.name for impl in registry.implementations(op)}]
        planned += [job for job in benchmark.plan([op], device, sweep=True, only=names) if picks(job.case)]
    return planned


@dataclasses.dataclass(frozen=True)
class TargetLine:
    """One target in one case: the measured value against the target, and which row gave it."""

    target: str
    case: str
    value: Optional[float]
    goal: float
    met: bool
    by: Optional[str]
    note: str = ""


def _best(rows: Sequence[benchmark.BenchRow], names: Sequence[str], key) -> Optional[benchmark.BenchRow]:
    timed = [row for row in rows if row.kind == "backend" and row.implementation in names and row.median_ms]
    return max(timed, key=key, default=None)


def target_lines(rows: Sequence[benchmark.BenchRow]) -> List[TargetLine]:
    """The decode, prefill and filter_logits target lines of timed (compared) rows."""
    lines = []
    by_case: Dict[tuple, List[benchmark.BenchRow]] = {}
    for row in rows:
        by_case.setdefault((row.op, row.shape), []).append(row)
    for (op, shape), case_rows in by_case.items():
        if op == "decode_attention":
            best = _best(case_rows, DECODE_IMPLS, key=lambda row: row.roofline or 0.0)
            value = None if best is None else best.roofline
            lines.append(TargetLine("decode: fraction of copy bandwidth", shape, value, DECODE_TARGET,
                                    value is not None and value >= DECODE_TARGET, best and best.implementation))
        elif op == "attention":
            peer = next((row for row in case_rows if row.implementation == PREFILL_PEER and row.median_ms), None)
            best = _best(case_rows, PREFILL_IMPLS, key=lambda row: -row.median_ms)
            value = None if best is None or peer is None else peer.median_ms / best.median_ms
            note = "" if peer is not None else f"{PREFILL_PEER} not timed"
            lines.append(TargetLine(f"prefill: speed-up over {PREFILL_PEER}", shape, value, PREFILL_TARGET,
                                    value is not None and value >= PREFILL_TARGET, best and best.implementation, note))
        elif op == "filter_logits":
            best = _best(case_rows, FILTER_IMPLS, key=lambda row: row.speedup or 0.0)
            value = None if best is None else best.speedup
            lines.append(TargetLine("filter_logits: speed-up over the reference", shape, value, FILTER_TARGET,
                                    value is not None and value >= FILTER_TARGET, best and best.implementation))
    return lines


def masked_lines(masked_rows: Sequence[dict]) -> List[TargetLine]:
    """One line per backend: its worst masked / unmasked ratio, and the row it came from."""
    lines = []
    for backend in dict.fromkeys(row["backend"] for row in masked_rows):
        worst = max((row for row in masked_rows if row["backend"] == backend), key=lambda row: row["ratio"])
        case = f"{backend}: worst of {sum(row['backend'] == backend for row in masked_rows)} rows " \
               f"(b={worst['batch']} {worst['parameters']} mask={worst['mask']})"
        lines.append(TargetLine("masked sampling: masked / unmasked", case, worst["ratio"], MASKED_TARGET,
                                worst["ratio"] <= MASKED_TARGET, backend))
    return lines


def _text(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def print_rows(rows: Sequence[benchmark.BenchRow]) -> None:
    for row in rows:
        rate = f"{row.tflops:.0f} TFLOP/s" if row.tflops else f"{row.gbps:.0f} GB/s" if row.gbps else ""
        status = row.skipped or row.error or ""
        print(f"{row.op:<16} {row.implementation:<15} {row.shape:<44} "
              f"{_text(row.median_ms):>9} ms {rate:>14} roofline {_text(row.roofline):>6}  {status[:60]}", flush=True)


def print_lines(lines: Sequence[TargetLine]) -> None:
    print("\ntarget                                         value  goal  met  by               case")
    for line in lines:
        print(f"{line.target:<44} {_text(line.value):>7} {line.goal:>5} {'yes' if line.met else 'NO':>4}  "
              f"{line.by or '-':<16} {line.case} {line.note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per implementation and case")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the masked-sampling rows")
    parser.add_argument("--json", default=None, help="write the rows, the target lines and the run's metadata here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_targets: no GPU visible", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    peaks = benchmark.measure_peaks(device, [torch.bfloat16])
    print(f"{benchmark.device_name(device)}: copy {peaks.bandwidth_gbps:.0f} GB/s, "
          f"bf16 matmul {peaks.tflops['bfloat16']:.0f} TFLOP/s", flush=True)
    rows = []
    for job in jobs(device):
        rows.append(benchmark.measure(job, args.repeats))
        print_rows(rows[-1:])
        torch.cuda.empty_cache()
    rows = benchmark.with_comparisons(rows, peaks)
    backends = [name for name in MASKED_BACKENDS
                if benchmark.skip_reason(registry.get_impl("sample", name), device) is None]
    masked_rows = masked_sampling.run("cuda", backends, [VOCAB], list(MASKED_BATCHES), args.rounds, kernel_only=True)
    lines = target_lines(rows) + masked_lines(masked_rows)
    print_lines(lines)
    if args.json:
        command = "python " + " ".join([os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
        meta = benchmark.metadata(device, command, peaks)
        meta["targets"] = [dataclasses.asdict(line) for line in lines]
        meta["masked_sampling"] = masked_rows
        benchmark.write_json(args.json, rows, meta)
        print(f"wrote {args.json}")
    return 0 if all(line.met for line in lines) else 3


if __name__ == "__main__":
    sys.exit(main())
