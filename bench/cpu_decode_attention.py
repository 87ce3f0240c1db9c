"""The C++ CPU decode_attention kernel against torch SDPA and the memory bandwidth.

    python bench/cpu_decode_attention.py [--repeats N] [--seqlen L] [--json PATH]

One-token decode, batch 4, 32 query / 8 KV heads of 128, an 8192-token cache, in float32
and bfloat16, contiguous and paged (16-token blocks, shuffled over the pool).

Roofline: the kernel is memory bound. It reads K and V once, 2 x batch x kv_heads x L x
head_dim elements (268 MB in float32), against ~4 flops per element per query head of a
group. The limit is the copy bandwidth measured here (a 64 MB tensor copy, read and write
counted), so "% copy bw" is bytes / time / that bandwidth.

The peer is torch SDPA with GQA on the same keys, q as (batch, q_heads, 1, head_dim) and
the cache already laid out as (batch, kv_heads, L, head_dim) contiguous (its best case; it
cannot read a paged cache). Kernel and SDPA calls alternate in one process, so other load
on the machine falls on both; times are medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from fmkernels.ops import _cpu

BATCH, Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 32, 8, 128, 16


def copy_bandwidth(repeats: int) -> float:
    """GB/s of a 64 MB tensor copy, bytes read and written both counted."""
    src = torch.randn(16 * 1024 * 1024)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times[2:]) / 1e9


def make_inputs(dtype: torch.dtype, seqlen: int, paged: bool, generator: torch.Generator):
    q = torch.randn((BATCH, 1, Q_HEADS, HEAD_DIM), generator=generator).to(dtype)
    k = torch.randn((BATCH, seqlen, KV_HEADS, HEAD_DIM), generator=generator).to(dtype)
    v = torch.randn((BATCH, seqlen, KV_HEADS, HEAD_DIM), generator=generator).to(dtype)
    seqlens = torch.full((BATCH,), seqlen, dtype=torch.int32)
    sdpa_args = (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
    if not paged:
        return (q, k, v, seqlens, None), sdpa_args
    blocks = seqlen // BLOCK_SIZE
    table = torch.randperm(BATCH * blocks, generator=generator).view(BATCH, blocks).int()
    k_pool = torch.empty((BATCH * blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM), dtype=dtype)
    v_pool = torch.empty_like(k_pool)
    k_pool[table.long()] = k.view(BATCH, blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    v_pool[table.long()] = v.view(BATCH, blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return (q, k_pool, v_pool, seqlens, table), sdpa_args


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    bandwidth = copy_bandwidth(args.repeats)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for paged in (False, True):
            (q, k, v, seqlens, table), sdpa_args = make_inputs(dtype, args.seqlen, paged, generator)

            def kernel():
                return _cpu.decode_attention(q, k, v, seqlens, block_table=table)

            def sdpa():
                return F.scaled_dot_product_attention(*sdpa_args, enable_gqa=True)

            torch.testing.assert_close(kernel(), sdpa().transpose(1, 2), atol=2e-2, rtol=2e-2)
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(timed(kernel))
                theirs.append(timed(sdpa))
            ours_ms, sdpa_ms = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
            kv_bytes = 2 * BATCH * KV_HEADS * args.seqlen * HEAD_DIM * k.element_size()
            gbps = kv_bytes / ours_ms / 1e6
            rows.append(dict(
                dtype=str(dtype).replace("torch.", ""), layout=f"paged/{BLOCK_SIZE}" if paged else "contiguous",
                seqlen=args.seqlen, kernel_ms=ours_ms, sdpa_ms=sdpa_ms, kernel_gbps=gbps,
                copy_gbps=bandwidth, fraction_of_copy_bw=gbps / bandwidth, speedup_vs_sdpa=sdpa_ms / ours_ms,
                kv_bytes=kv_bytes, threads=torch.get_num_threads(),
            ))

    print(f"decode b={BATCH} new=1 h={Q_HEADS}/{KV_HEADS} d={HEAD_DIM} L={args.seqlen}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; copy bandwidth {bandwidth:.1f} GB/s")
    print(f"{'dtype':<9} {'layout':<11} {'kernel ms':>10} {'GB/s':>7} {'% copy bw':>10} {'SDPA ms':>9} {'vs SDPA':>8}")
    for row in rows:
        print(f"{row['dtype']:<9} {row['layout']:<11} {row['kernel_ms']:>10.2f} {row['kernel_gbps']:>7.1f} "
              f"{100 * row['fraction_of_copy_bw']:>9.0f}% {row['sdpa_ms']:>9.2f} {row['speedup_vs_sdpa']:>7.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
