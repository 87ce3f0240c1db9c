"""The CUDA decode_attention split kernels against each other, Triton and SDPA flash.

    python bench/cuda_decode_variants.py [--repeats N] [--json PATH]

bfloat16 decode at the shapes of ``fmkernels.benchmark.sweep_cases("decode_attention",
"cuda")``: one new token, 32 query / 8 KV heads of 128, batch 1 to 64 x cache 1k to 32k,
contiguous and paged. Each variant of ``fmkernels.ops._cuda.DECODE_VARIANTS`` runs through
the adapter with ``FMKERNELS_CUDA_DECODE_VARIANT`` set; the registry's ``triton`` and
``sdpa_flash`` implementations are the reference points. Each cell: GB/s (K, V, q and out
bytes over the median time, L2 flushed before every call) and its share of the copy
bandwidth that ``fmkernels.benchmark.measure_peaks`` measures in the same run.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from fmkernels import benchmark, registry
from fmkernels.ops import _cuda

OP = "decode_attention"
PEERS = ("triton", "sdpa_flash")
VARIANT_ENV = "FMKERNELS_CUDA_DECODE_VARIANT"


def time_peer(name, kwargs, device, repeats):
    """Median seconds of the registry's ``name`` on ``kwargs``, or None where it cannot run them."""
    impl = registry.get_impl(OP, name)
    if impl.unavailable_reason() is not None or impl.unsupported_reason(kwargs) is not None:
        return None
    return benchmark.median_seconds(lambda: impl.fn(**kwargs), device, repeats)


def time_variant(variant, kwargs, device, repeats):
    previous = os.environ.get(VARIANT_ENV)
    os.environ[VARIANT_ENV] = variant
    try:
        return benchmark.median_seconds(lambda: _cuda.decode_attention(**kwargs), device, repeats)
    finally:
        if previous is None:
            del os.environ[VARIANT_ENV]
        else:
            os.environ[VARIANT_ENV] = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the table as JSON here")
    args = parser.parse_args()

    device = torch.device("cuda")
    copy_gbps = benchmark.measure_peaks(device, []).bandwidth_gbps
    columns = list(_cuda.DECODE_VARIANTS) + list(PEERS)
    print(f"copy bandwidth {copy_gbps:.0f} GB/s; default variant {_cuda.DECODE_DEFAULT_VARIANT}; "
          f"cells: GB/s (% of copy)")
    print(" | ".join(["shape"] + columns))
    rows = []
    for case in benchmark.sweep_cases(OP, device):
        kwargs = case.make_kwargs()
        seconds = {variant: time_variant(variant, kwargs, device, args.repeats) for variant in _cuda.DECODE_VARIANTS}
        seconds.update({name: time_peer(name, kwargs, device, args.repeats) for name in PEERS})
        gbps = {name: None if s is None else case.bytes / s / 1e9 for name, s in seconds.items()}
        cells = ["-" if gbps[name] is None else f"{gbps[name]:.0f} ({100 * gbps[name] / copy_gbps:.0f}%)"
                 for name in columns]
        print(" | ".join([case.shape.replace(" h=32/8 d=128", "")] + cells), flush=True)
        rows.append({"shape": case.shape, "bytes": case.bytes, "seconds": seconds, "gbps": gbps,
                     "percent_of_copy": {name: None if g is None else 100 * g / copy_gbps for name, g in gbps.items()}})
        del kwargs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": benchmark.device_name(device), "copy_gbps": copy_gbps,
                       "default_variant": _cuda.DECODE_DEFAULT_VARIANT, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
