"""Checks shared by the ops that read or write a KV cache (decode_attention, append_kv)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _validation as check

CONTIGUOUS = "(batch, max_seqlen, kv_heads, head_dim)"
PAGED = "(num_blocks, block_size, kv_heads, head_dim)"


def require_cache(k_cache, v_cache, batch: int, paged: bool) -> int:
    """Checks the two caches against each other; returns the positions one sequence can hold per row."""
    layout = PAGED if paged else CONTIGUOUS
    check.require_tensor("k_cache", k_cache)
    check.require_tensor("v_cache", v_cache)
    check.require_dtype("k_cache", k_cache, check.FLOAT_DTYPES)
    check.require_same_dtype(("k_cache", "v_cache"), (k_cache, v_cache))
    check.require_rank("k_cache", k_cache, 4, layout)
    check.require_shape("v_cache", v_cache, k_cache.shape, "(k_cache's shape)")
    if k_cache.shape[1] == 0:
        raise ValueError(f"k_cache must hold at least one position per row, got shape {tuple(k_cache.shape)}")
    if not paged and k_cache.shape[0] != batch:
        raise ValueError(
            f"a contiguous k_cache {CONTIGUOUS} must have batch {batch}, got shape {tuple(k_cache.shape)}"
        )
    return k_cache.shape[1]


def require_block_table(block_table, batch: int, device: torch.device) -> None:
    check.require_tensor("block_table", block_table)
    check.require_dtype("block_table", block_table, (torch.int32,))
    check.require_rank("block_table", block_table, 2, "(batch, max_blocks_per_sequence)")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (batch), got shape {tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on {device}, got {block_table.device}")


def require_seqlens(cache_seqlens, batch: int, device: torch.device) -> None:
    check.require_index_tensor("cache_seqlens", cache_seqlens, (batch,), "(batch,)")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on {device}, got {cache_seqlens.device}")


def require_positions(
    k_cache: torch.Tensor,
    starts: Sequence[int],
    ends: Sequence[int],
    block_table: Optional[torch.Tensor],
    what: str,
) -> None:
    """Every position [starts[b], ends[b]) of every sequence must lie in the cache, and
    every block holding one must be inside the pool.

    ``starts`` and ``ends`` are host lists (one read of the lengths per call). The block
    table is read in one pass, its least and greatest entry, and row by row only when an
    entry is outside the pool (a table padded with -1, or an error to name)."""
    if not starts:
        return
    block_size = k_cache.shape[1]
    capacity = block_size * block_table.shape[1] if block_table is not None else block_size
    if min(starts) < 0:
        b = next(b for b, start in enumerate(starts) if start < 0)
        raise ValueError(f"cache_seqlens[{b}] must be >= 0, got {starts[b]}")
    if max(ends) > capacity:
        b = next(b for b, end in enumerate(ends) if end > capacity)
        where = (
            f"block_table's {block_table.shape[1]} blocks x block_size {block_size}"
            if block_table is not None
            else f"max_seqlen {capacity}"
        )
        raise ValueError(f"{what} for sequence {b} needs {ends[b]} positions, but the cache holds {capacity} ({where})")
    if block_table is None or max(ends) == 0:
        return
    num_blocks = k_cache.shape[0]
    low, high = torch.aminmax(block_table)
    if block_table.is_cpu:
        low, high = int(low), int(high)
    else:
        low, high = torch.stack((low, high)).tolist()
    if low >= 0 and high < num_blocks:
        return
    table = block_table.cpu()
    for b, (start, end) in enumerate(zip(starts, ends)):
        if end <= start:
            continue
        used = table[b, start // block_size : (end - 1) // block_size + 1]
        bad = (used < 0) | (used >= num_blocks)
        if bad.any():
            j = start // block_size + int(bad.nonzero()[0, 0])
            raise ValueError(
                f"block_table[{b}, {j}] = {int(table[b, j])} is outside the pool of {num_blocks} blocks"
            )
