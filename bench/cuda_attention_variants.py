"""The CUDA attention kernel's schedules against each other, FlashAttention-2 and Triton.

    python bench/cuda_attention_variants.py [--repeats 20] [--variants 0 1 2 3 4] [--json PATH]

Times bf16 prefill attention on the GPU sweep (``fmkernels.benchmark.sweep_cases``: 16
heads of 128, seqlen 1k to 16k at 16k tokens per call, causal and not) once per kernel
schedule, each picked through FMKERNELS_CUDA_ATTENTION_VARIANT, and the ``sdpa_flash``,
``triton`` and ``triton_hopper`` (TMA and warp-specialised, compute capability 9.x and 10.x)
implementations as reference points. Prints one line per shape (TFLOP/s, median
of ``--repeats`` calls; ``-`` where an implementation cannot run) and, with ``--json``,
writes the same numbers there.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import fmkernels  # noqa: F401  (registers the backends and peers)
from fmkernels import benchmark, registry
from fmkernels.ops import _cuda

REFERENCES = ("sdpa_flash", "triton", "triton_hopper")


def _tflops(fn, case, repeats):
    return case.flops / benchmark.median_seconds(fn, case.device, repeats) / 1e12


def _reference_tflops(name, case, kwargs, repeats):
    """TFLOP/s of implementation ``name`` on ``case``, or None where it cannot run it."""
    impl = registry.get_impl("attention", name)
    if benchmark.skip_reason(impl, case.device) or impl.unsupported_reason(kwargs):
        return None
    return _tflops(lambda: impl.fn(**kwargs), case, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", type=int, nargs="+", default=list(_cuda.ATTENTION_VARIANTS))
    parser.add_argument("--json", help="where to write the results as JSON")
    args = parser.parse_args()
    unknown = [n for n in args.variants if n not in _cuda.ATTENTION_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(_cuda.ATTENTION_VARIANTS)}")
    device = torch.device("cuda")
    cuda_impl = registry.get_impl("attention", "cuda")

    for number in args.variants:
        print(f"variant {number}: {_cuda.ATTENTION_VARIANTS[number]}")
    columns = [f"v{n}" for n in args.variants] + list(REFERENCES)
    print(f"{'seqlen':>6} {'causal':>6} " + " ".join(f"{c:>10}" for c in columns) + "   best")
    rows = []
    saved = os.environ.get(_cuda.ATTENTION_VARIANT_ENV)
    try:
        for case in benchmark.sweep_cases("attention", device):
            kwargs = case.make_kwargs()
            seqlen, causal = kwargs["q"].shape[1], bool(kwargs["causal"])
            rates = {}
            for number in args.variants:
                os.environ[_cuda.ATTENTION_VARIANT_ENV] = str(number)
                rates[f"v{number}"] = _tflops(lambda: cuda_impl.fn(**kwargs), case, args.repeats)
            for name in REFERENCES:
                rates[name] = _reference_tflops(name, case, kwargs, args.repeats)
            best = max((f"v{n}" for n in args.variants), key=lambda c: rates[c])
            cells = " ".join(f"{'-' if rates[c] is None else f'{rates[c]:.0f}':>10}" for c in columns)
            print(f"{seqlen:>6} {'yes' if causal else 'no':>6} {cells}   {best}")
            rows.append(dict(shape=case.shape, seqlen=seqlen, causal=causal, tflops=rates))
            torch.cuda.empty_cache()
    finally:
        if saved is None:
            os.environ.pop(_cuda.ATTENTION_VARIANT_ENV, None)
        else:
            os.environ[_cuda.ATTENTION_VARIANT_ENV] = saved
    if args.json:
        meta = dict(device=benchmark.device_name(device), repeats=args.repeats,
                    variants={str(n): _cuda.ATTENTION_VARIANTS[n] for n in args.variants})
        with open(args.json, "w") as file:
            json.dump(dict(meta=meta, rows=rows), file, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
