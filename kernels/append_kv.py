"""append_kv in Triton: write new keys/values into a contiguous or paged KV cache."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _append_kv_kernel(
    K_cache_ptr, V_cache_ptr,  # (rows, slots, kv_heads, head_dim): batch x max_seqlen, or blocks x block_size
    K_ptr, V_ptr,  # (batch, n_new, kv_heads, head_dim)
    Seqlens_ptr,  # (batch,) int32: where each sequence's new tokens start
    Block_table_ptr,  # (batch, max_blocks) int32; unused unless PAGED
    k_cache_stride_row, k_cache_stride_slot, k_cache_stride_head, k_cache_stride_dim,
    v_cache_stride_row, v_cache_stride_slot, v_cache_stride_head, v_cache_stride_dim,
    k_stride_batch, k_stride_token, k_stride_head, k_stride_dim,
    v_stride_batch, v_stride_token, v_stride_head, v_stride_dim,
    seqlens_stride, table_stride_batch, table_stride_block,
    n_new, kv_heads, head_dim, block_size,
    capacity,  # positions one sequence can hold: max_seqlen, or max_blocks x block_size
    num_blocks,  # rows of the cache (the pool size when PAGED)
    PAGED: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    # One program per (sequence, new token): reads and writes kv_heads x head_dim elements of k and of v.
    pid = tl.program_id(0).to(tl.int64)  # 64-bit: k and v may hold more than 2^31 elements
    b = pid // n_new
    t = pid % n_new
    start = tl.load(Seqlens_ptr + b * seqlens_stride).to(tl.int64)
    pos = start + t
    # The ops layer rejects positions and blocks outside the cache; a direct launch with them
    # writes nothing rather than out of bounds (as the CUDA kernel does).
    inside = (start >= 0) & (start + n_new <= capacity)
    if PAGED:
        row = tl.load(Block_table_ptr + b * table_stride_batch + (pos // block_size) * table_stride_block,
                      mask=inside, other=-1).to(tl.int64)
        inside = inside & (row >= 0) & (row < num_blocks)
        slot = pos % block_size
    else:
        row = b.to(tl.int64)
        slot = pos
    offs_d = tl.arange(0, BLOCK_DIM)
    for h0 in range(0, kv_heads, BLOCK_HEADS):
        offs_h = h0 + tl.arange(0, BLOCK_HEADS)
        mask = (offs_h[:, None] < kv_heads) & (offs_d[None, :] < head_dim) & inside
        k = tl.load(K_ptr + b * k_stride_batch + t * k_stride_token
                    + offs_h[:, None] * k_stride_head + offs_d[None, :] * k_stride_dim, mask=mask)
        v = tl.load(V_ptr + b * v_stride_batch + t * v_stride_token
                    + offs_h[:, None] * v_stride_head + offs_d[None, :] * v_stride_dim, mask=mask)
        tl.store(K_cache_ptr + row * k_cache_stride_row + slot * k_cache_stride_slot
                 + offs_h[:, None] * k_cache_stride_head + offs_d[None, :] * k_cache_stride_dim, k, mask=mask)
        tl.store(V_cache_ptr + row * v_cache_stride_row + slot * v_cache_stride_slot
                 + offs_h[:, None] * v_cache_stride_head + offs_d[None, :] * v_cache_stride_dim, v, mask=mask)


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: Optional[torch.Tensor] = None,
) -> None:
    """Launch ``_append_kv_kernel`` over (batch x n_new) programs. Reads and writes
    2 x batch x n_new x kv_heads x head_dim elements."""
    batch, n_new, kv_heads, head_dim = k.shape
    if batch * n_new * kv_heads * head_dim == 0:
        return
    paged = block_table is not None
    table = block_table if paged else cache_seqlens  # any int32 pointer; not read unless PAGED
    block_dim = triton.next_power_of_2(head_dim)
    block_heads = max(1, min(triton.next_power_of_2(kv_heads), 4096 // block_dim))
    _append_kv_kernel[(batch * n_new,)](
        k_cache, v_cache, k, v, cache_seqlens, table,
        *k_cache.stride(), *v_cache.stride(), *k.stride(), *v.stride(),
        cache_seqlens.stride(0),
        table.stride(0), table.stride(1) if paged else 0,
        n_new, kv_heads, head_dim, k_cache.shape[1],
        block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1], k_cache.shape[0],
        PAGED=paged, BLOCK_HEADS=block_heads, BLOCK_DIM=block_dim,
    )
