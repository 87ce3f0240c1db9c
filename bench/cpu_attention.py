"""The C++ CPU attention kernel against torch SDPA on one prefill shape, in one process.

    python bench/cpu_attention.py [--seqlen 2048] [--q-heads 16] [--kv-heads 4] [--head-dim 128]
                                  [--repeats 7] [--dtypes float32 bfloat16] [--no-causal]

Calls alternate (fmkernels, SDPA, fmkernels, ...) so that load from other processes on the
machine hits both alike; each line gives the median of ``--repeats`` calls per implementation
after one warm-up call each. FLOPs count only the visible scores (causal: Sq (Sq + 1) / 2 of
them, Sq == Sk): 4 * Hq * D per score, for q k^T and p v. SDPA is given ``is_causal=True``,
which for Sq == Sk is the same mask as fmkernels' bottom-right one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fmkernels


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    args = parser.parse_args()

    B, S, Hq, Hkv, D = args.batch, args.seqlen, args.q_heads, args.kv_heads, args.head_dim
    scores = B * Hq * (S * (S + 1) // 2 if args.causal else S * S)
    flops = 4 * D * scores
    print(f"B={B} S={S} heads={Hq}/{Hkv} D={D} causal={args.causal} threads={torch.get_num_threads()}")
    print(f"{'dtype':<9} {'impl':<10} {'median ms':>10} {'GFLOP/s':>8} {'vs SDPA':>8}")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        torch.manual_seed(0)
        q = torch.randn(B, S, Hq, D).to(dtype)
        k = torch.randn(B, S, Hkv, D).to(dtype)
        v = torch.randn(B, S, Hkv, D).to(dtype)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = torch.empty_like(q)
        impls = {
            "fmkernels": lambda: fmkernels.attention(q, k, v, causal=args.causal, backend="cpu", out=out),
            "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=args.causal, enable_gqa=True),
        }
        times = {impl: [] for impl in impls}
        for fn in impls.values():
            fn()
        for _ in range(args.repeats):
            for impl, fn in impls.items():
                times[impl].append(_time(fn))
        sdpa = statistics.median(times["sdpa"])
        for impl in impls:
            median = statistics.median(times[impl])
            print(f"{name:<9} {impl:<10} {median * 1e3:>10.1f} {flops / median / 1e9:>8.1f} {sdpa / median:>7.2f}x")


if __name__ == "__main__":
    main()
