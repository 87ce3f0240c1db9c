"""decode_attention in Triton: split-KV (flash-decoding) attention of a few new queries
against a contiguous or paged KV cache.

Two launches. ``_decode_attention_split_kernel`` runs one program per (sequence, KV head,
split of the context, block of query rows): the rows are all the query heads of the KV
head's GQA group times the n_new new tokens, so each K/V row read from the cache serves
the whole group. Each program keeps an online softmax over its part of the context and
writes its normalised partial output and log-sum-exp in fp32.
``_decode_attention_merge_kernel`` combines a row's splits by their log-sum-exps:
out = sum_s exp(lse_s - lse) out_s, lse = log sum_s exp(lse_s). With a single split the
first kernel writes the output and the log-sum-exp directly and the merge is skipped.

Memory traffic, the floor of this op: read 2 x sum_b(L_b) x kv_heads x head_dim cache
elements and q; write out, plus 2 x splits x rows x head_dim fp32 scratch elements when split.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fmkernels import platform

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
# Splits are sized so the launch has about this many programs per SM (GPU), and a fixed
# few under the interpreter, where the point is to run the split and merge path.
_PROGRAMS_PER_SM = 4
_INTERPRETER_SPLITS = 3
_MAX_SPLITS = 256


@triton.jit
def _decode_attention_split_kernel(
    Q_ptr,  # (batch, n_new, q_heads, head_dim)
    K_cache_ptr, V_cache_ptr,  # (rows, slots, kv_heads, head_dim): batch x max_seqlen, or blocks x block_size
    Seqlens_ptr,  # (batch,) int32: cache length of each sequence, the n_new new tokens included
    Block_table_ptr,  # (batch, max_blocks) int32; unused unless PAGED
    Out_ptr,  # (batch, splits, n_new, q_heads, head_dim): fp32 scratch, or the output when splits == 1
    Lse_ptr,  # (batch, splits, q_heads, n_new): fp32, natural log
    q_stride_batch, q_stride_token, q_stride_head, q_stride_dim,
    k_stride_row, k_stride_slot, k_stride_head, k_stride_dim,
    v_stride_row, v_stride_slot, v_stride_head, v_stride_dim,
    seqlens_stride, table_stride_batch, table_stride_block,
    out_stride_batch, out_stride_split, out_stride_token, out_stride_head, out_stride_dim,
    lse_stride_batch, lse_stride_split, lse_stride_head, lse_stride_token,
    n_new, kv_heads, group, head_dim, block_size,
    capacity,  # positions one sequence can hold: max_seqlen, or max_blocks x block_size
    num_blocks,  # rows of the cache (the pool size when PAGED)
    qk_scale,  # scale x log2(e): scores are kept in base 2
    PAGED: tl.constexpr,
    UPCAST: tl.constexpr,  # compute the dots in fp32 (bf16 under the interpreter)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, so the GPU does not round to tf32
    BLOCK_M: tl.constexpr,  # query rows (group heads x new tokens) per program, >= 16 for tl.dot
    BLOCK_N: tl.constexpr,  # cache positions per tile
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid_bh // kv_heads
    h_kv = pid_bh % kv_heads

    # The ops layer keeps lengths inside the cache; a direct launch is clamped, never out of bounds.
    length = tl.minimum(tl.maximum(tl.load(Seqlens_ptr + b * seqlens_stride), 0), capacity)
    # This sequence's tiles are shared out evenly: split s covers [start, end).
    tiles = tl.cdiv(length, BLOCK_N)
    tiles_per_split = tl.cdiv(tiles, num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, length)

    # Row r of the tile is query head h_kv * group + r // n_new, new token r % n_new.
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = group * n_new
    row_valid = offs_m < rows
    head = h_kv * group + offs_m // n_new
    token = offs_m % n_new
    last_visible = token + length - n_new  # causal, bottom-right: token i sees j <= i + L - n_new
    offs_d = tl.arange(0, BLOCK_D)
    dim_valid = offs_d < head_dim

    b64 = b.to(tl.int64)
    token64 = token.to(tl.int64)  # 64-bit: one sequence's q and out may span more than 2^31 elements
    q = tl.load(Q_ptr + b64 * q_stride_batch + token64[:, None] * q_stride_token + head[:, None] * q_stride_head
                + offs_d[None, :] * q_stride_dim, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, base-2 scaled
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_head = h_kv.to(tl.int64) * k_stride_head
    v_head = h_kv.to(tl.int64) * v_stride_head
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        pos_valid = offs_n < end
        if PAGED:
            # Each position is gathered through the block table, so any block_size works.
            block = tl.load(Block_table_ptr + b64 * table_stride_batch + (offs_n // block_size) * table_stride_block,
                            mask=pos_valid, other=0).to(tl.int64)
            pos_valid = pos_valid & (block >= 0) & (block < num_blocks)
            slot = (offs_n % block_size).to(tl.int64)
        else:
            block = b64 + tl.zeros([BLOCK_N], tl.int64)
            slot = offs_n.to(tl.int64)
        k_rows = block * k_stride_row + slot * k_stride_slot + k_head
        v_rows = block * v_stride_row + slot * v_stride_slot + v_head
        kv_mask = pos_valid[:, None] & dim_valid[None, :]
        k = tl.load(K_cache_ptr + k_rows[:, None] + offs_d[None, :] * k_stride_dim, mask=kv_mask, other=0.0)
        v = tl.load(V_cache_ptr + v_rows[:, None] + offs_d[None, :] * v_stride_dim, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = pos_valid[None, :] & (offs_n[None, :] <= last_visible[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen nothing visible yet keeps m = -inf; subtract 0 instead, giving p = alpha = 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Normalised partial output and its natural-log LSE; a row with nothing visible in this
    # split writes out 0 and lse -inf, which the merge weighs by exp(-inf) = 0.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # x ln 2
    out_base = Out_ptr + b64 * out_stride_batch + split.to(tl.int64) * out_stride_split
    tl.store(out_base + token64[:, None] * out_stride_token + head[:, None] * out_stride_head
             + offs_d[None, :] * out_stride_dim, out, mask=row_valid[:, None] & dim_valid[None, :])
    lse_base = Lse_ptr + b64 * lse_stride_batch + split.to(tl.int64) * lse_stride_split
    tl.store(lse_base + head * lse_stride_head + token * lse_stride_token, lse, mask=row_valid)


@triton.jit
def _decode_attention_merge_kernel(
    Part_out_ptr,  # (batch, splits, n_new, q_heads, head_dim) fp32, from the split kernel
    Part_lse_ptr,  # (batch, splits, q_heads, n_new) fp32
    Out_ptr,  # (batch, n_new, q_heads, head_dim), q's dtype
    Lse_ptr,  # (batch, q_heads, n_new) fp32
    part_out_stride_batch, part_out_stride_split, part_out_stride_token, part_out_stride_head, part_out_stride_dim,
    part_lse_stride_batch, part_lse_stride_split, part_lse_stride_head, part_lse_stride_token,
    out_stride_batch, out_stride_token, out_stride_head, out_stride_dim,
    lse_stride_batch, lse_stride_head, lse_stride_token,
    n_new, q_heads, head_dim, num_splits,
    BLOCK_S: tl.constexpr,  # splits per step
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
):
    # One program per (sequence, new token, query head): reads splits x (head_dim + 1) fp32
    # elements, writes head_dim + 1.
    pid = tl.program_id(0).to(tl.int64)  # 64-bit: the scratch may hold more than 2^31 elements
    b = pid // (n_new * q_heads)
    token = (pid // q_heads) % n_new
    head = pid % q_heads
    offs_d = tl.arange(0, BLOCK_D)
    dim_valid = offs_d < head_dim
    part_out = Part_out_ptr + b * part_out_stride_batch + token * part_out_stride_token + head * part_out_stride_head
    part_lse = Part_lse_ptr + b * part_lse_stride_batch + head * part_lse_stride_head + token * part_lse_stride_token

    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        split_valid = offs_s < num_splits
        lse_s = tl.load(part_lse + offs_s.to(tl.int64) * part_lse_stride_split, mask=split_valid, other=float("-inf"))
        out_s = tl.load(part_out + offs_s[:, None].to(tl.int64) * part_out_stride_split
                        + offs_d[None, :] * part_out_stride_dim,
                        mask=split_valid[:, None] & dim_valid[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(lse_s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse_s - m_safe)  # 0 for empty splits
        l = l * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * out_s, axis=0)
        m = m_new

    seen = l > 0.0
    l_safe = tl.where(seen, l, 1.0)
    tl.store(Out_ptr + b * out_stride_batch + token * out_stride_token + head * out_stride_head
             + offs_d * out_stride_dim, acc / l_safe, mask=dim_valid)
    tl.store(Lse_ptr + b * lse_stride_batch + head * lse_stride_head + token * lse_stride_token,
             tl.where(seen, m + tl.log(l_safe), float("-inf")))


def _blocks(rows: int, head_dim: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D): rows padded to >= 16 for tl.dot; smaller tiles for the
    widest heads and for fp32, whose pipelined tiles would not fit an A100's shared memory."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    wide = block_d > 128 or dtype == torch.float32
    block_m = min(max(16, triton.next_power_of_2(rows)), 32 if wide else 64)
    if block_d > 128 and dtype == torch.float32:
        block_n = 16
    else:
        block_n = 32 if wide or platform.triton_interpreting() else 64
    return block_m, block_n, block_d


def _num_splits(device: torch.device, programs: int, tiles: int) -> int:
    """Splits per sequence: enough programs for ~_PROGRAMS_PER_SM per SM, at most one per tile."""
    if platform.triton_interpreting() or device.type != "cuda":
        wanted = _INTERPRETER_SPLITS
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = math.ceil(_PROGRAMS_PER_SM * sms / programs)
    return max(1, min(wanted, tiles, _MAX_SPLITS))


def decode_attention_supports(q: torch.Tensor, **kwargs) -> Optional[str]:
    """None when the Triton kernels handle the case, else the reason they do not."""
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"triton decode_attention supports head_dim <= {_MAX_HEAD_DIM}, got {q.shape[-1]}"
    return None


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    num_splits: Optional[int] = None,
):
    """Launch the split kernel over (batch x kv_heads, splits, row blocks) programs, then the
    merge over batch x n_new x q_heads when there is more than one split.

    Inputs are validated by ``fmkernels.decode_attention``. ``num_splits`` overrides the
    launcher's choice (tests use it to force one split or many).
    """
    batch, n_new, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    # The interpreter truncates fp32 to bf16; there the kernels write fp32 and torch rounds.
    upcast = platform.triton_interpreting() and q.dtype == torch.bfloat16
    out = torch.empty(q.shape, dtype=torch.float32 if upcast else q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, n_new), dtype=torch.float32, device=q.device)
    if batch == 0:
        return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)

    paged = block_table is not None
    table = block_table if paged else cache_seqlens  # any int32 pointer; not read unless PAGED
    block_size = k_cache.shape[1]
    capacity = block_table.shape[1] * block_size if paged else k_cache.shape[1]
    block_m, block_n, block_d = _blocks(group * n_new, head_dim, q.dtype)
    row_blocks = triton.cdiv(group * n_new, block_m)
    if num_splits is None:
        # Sized by the capacity, not the longest sequence, so the launch reads no length on the
        # host (no synchronisation: a decode step can be captured in a CUDA graph). Each program
        # shares out its own sequence's tiles, and a split left with none writes lse -inf.
        num_splits = _num_splits(q.device, batch * kv_heads * row_blocks, triton.cdiv(capacity, block_n))

    if num_splits == 1:
        part_out, part_lse = out, lse
        part_out_strides = (out.stride(0), 0, out.stride(1), out.stride(2), out.stride(3))
        part_lse_strides = (lse.stride(0), 0, lse.stride(1), lse.stride(2))
    else:
        part_out = torch.empty((batch, num_splits, n_new, q_heads, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_splits, q_heads, n_new), dtype=torch.float32, device=q.device)
        part_out_strides, part_lse_strides = part_out.stride(), part_lse.stride()

    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _decode_attention_split_kernel[(batch * kv_heads, num_splits, row_blocks)](
            q, k_cache, v_cache, cache_seqlens, table, part_out, part_lse,
            *q.stride(), *k_cache.stride(), *v_cache.stride(),
            cache_seqlens.stride(0), table.stride(0), table.stride(1) if paged else 0,
            *part_out_strides, *part_lse_strides,
            n_new, kv_heads, group, head_dim, block_size, capacity, k_cache.shape[0],
            scale * _LOG2E,
            PAGED=paged,
            UPCAST=upcast,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=4,
        )
        if num_splits > 1:
            _decode_attention_merge_kernel[(batch * n_new * q_heads,)](
                part_out, part_lse, out, lse,
                *part_out.stride(), *part_lse.stride(), *out.stride(), *lse.stride(),
                n_new, q_heads, head_dim, num_splits,
                BLOCK_S=min(16, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
                num_warps=4,
            )
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out

