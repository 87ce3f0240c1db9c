"""attention in Triton: FlashAttention-2 style fused forward over whole sequences (prefill).

Each program owns BLOCK_M query rows of one (sequence, q_head) and streams the keys and
values of its KV head through BLOCK_N tiles with an online softmax in fp32: a running row
maximum m, a running sum l of exp(s - m), and the unnormalised output acc, rescaled by
exp(m_old - m_new) whenever the maximum grows. The scores never leave the chip: per
program it reads BLOCK_M x D of q, 2 x (keys seen) x D of k and v, and writes BLOCK_M x D.

Causal masks are bottom-right aligned (query i sees keys j <= i + seqlen_k - seqlen_q):
the key loop stops at the last tile a row of the program can see, and only the tiles that
straddle the diagonal or the end of the keys are masked.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fmkernels import platform

_LOG2E = 1.4426950408889634

#: Largest head_dim the kernel handles (padded to a power of two in registers).
MAX_HEAD_DIM = 256


@triton.jit
def _attention_tiles(
    acc, m_i, l_i,  # running state: (BLOCK_M, BLOCK_D) fp32, (BLOCK_M,) fp32 in log2 units, (BLOCK_M,) fp32
    q,  # (BLOCK_M, BLOCK_D) in the compute dtype
    K_base, V_base,  # this sequence's first key / value of the KV head
    k_stride_token, k_stride_dim, v_stride_token, v_stride_dim,
    offs_m,  # (BLOCK_M,) query rows of the program, within the sequence
    seqlen_k,
    diagonal,  # seqlen_k - seqlen_q: row i sees keys j <= i + diagonal when CAUSAL
    qk_scale,  # scale x log2(e)
    start, end,  # key range [start, end), start a multiple of BLOCK_N
    MASKED: tl.constexpr,  # mask keys past seqlen_k and, with CAUSAL, past the diagonal
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,  # compute in fp32 (bf16 under the interpreter)
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    # k is read transposed, (BLOCK_D, BLOCK_N), so q @ k needs no transpose in registers.
    kT_ptrs = K_base + offs_n[None, :] * k_stride_token + offs_d[:, None] * k_stride_dim
    v_ptrs = V_base + offs_n[:, None] * v_stride_token + offs_d[None, :] * v_stride_dim
    for start_n in range(start, end, BLOCK_N):
        step = tl.cast(start_n, tl.int64)  # the loop variable is a plain int when the range starts at 0
        if MASKED:
            inside = (start_n + offs_n) < seqlen_k
            kT = tl.load(kT_ptrs + step * k_stride_token, mask=mask_d[:, None] & inside[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            kT = tl.load(kT_ptrs + step * k_stride_token)
        else:
            kT = tl.load(kT_ptrs + step * k_stride_token, mask=mask_d[:, None], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
        # "ieee" matters for fp32 inputs only (tf32 would miss the fp32 tolerance); fp16/bf16 use the tensor cores.
        s = tl.dot(q, kT, input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = inside[None, :]
            if CAUSAL:
                visible = visible & ((start_n + offs_n)[None, :] <= offs_m[:, None] + diagonal)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs + step * v_stride_token, mask=inside[:, None] & mask_d[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            v = tl.load(v_ptrs + step * v_stride_token)
        else:
            v = tl.load(v_ptrs + step * v_stride_token, mask=mask_d[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sequence_extent(Cu_seqlens_q_ptr, Cu_seqlens_k_ptr, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first query row, queries, first key row, keys) of sequence b: from cu_seqlens when
    VARLEN (packed rows), else row 0 of a dense batch's seqlen_q and seqlen_k."""
    if VARLEN:
        start_q = tl.load(Cu_seqlens_q_ptr + b)
        len_q = tl.load(Cu_seqlens_q_ptr + b + 1) - start_q
        start_k = tl.load(Cu_seqlens_k_ptr + b)
        len_k = tl.load(Cu_seqlens_k_ptr + b + 1) - start_k
    else:
        start_q = 0
        len_q = seqlen_q
        start_k = 0
        len_k = seqlen_k
    return start_q, len_q, start_k, len_k


@triton.jit
def _key_range(start_m, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_end, end) for the query tile at row start_m: keys [0, full_end) are whole tiles
    every row of it sees unmasked, [full_end, end) the tiles to mask (the causal diagonal's, the
    last partial one); keys past end no row of the tile sees."""
    diagonal = len_k - len_q
    if CAUSAL:
        # Keys every row of the tile sees: j <= start_m + diagonal; keys any row sees: j < start_m + BLOCK_M + diagonal.
        full_end = tl.minimum(tl.maximum(start_m + diagonal + 1, 0), len_k)
        end = tl.minimum(tl.maximum(start_m + BLOCK_M + diagonal, 0), len_k)
    else:
        full_end = len_k
        end = len_k
    return (full_end // BLOCK_N) * BLOCK_N, end


@triton.jit(do_not_specialize=["bucket_q", "bucket_k"])
def _attention_kernel(
    Q_ptr,  # (batch, seqlen_q, q_heads, head_dim), or (total_q, q_heads, head_dim) when VARLEN
    K_ptr, V_ptr,  # (batch, seqlen_k, kv_heads, head_dim), or (total_k, kv_heads, head_dim) when VARLEN
    Out_ptr,  # q's shape and dtype
    Lse_ptr,  # fp32 (batch, q_heads, seqlen_q), or (q_heads, total_q) when VARLEN; unused unless RETURN_LSE
    Cu_seqlens_q_ptr, Cu_seqlens_k_ptr,  # (batch + 1,) int32; unused unless VARLEN
    q_stride_batch, q_stride_token, q_stride_head, q_stride_dim,  # batch strides are 0 when VARLEN
    k_stride_batch, k_stride_token, k_stride_head, k_stride_dim,
    v_stride_batch, v_stride_token, v_stride_head, v_stride_dim,
    o_stride_batch, o_stride_token, o_stride_head, o_stride_dim,
    lse_stride_batch, lse_stride_head, lse_stride_token,
    seqlen_q, seqlen_k,  # dense lengths; each sequence's own come from cu_seqlens when VARLEN
    group,  # q_heads // kv_heads: query head h reads KV head h // group
    qk_scale,  # scale x log2(e): the softmax runs in base 2
    bucket_q, bucket_k,  # power-of-two buckets of the longest sequences: autotune keys only
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    UPCAST: tl.constexpr,  # load, then compute in fp32 (bf16 under the interpreter)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM (and >= 16, for tl.dot)
):
    # Grid: (query tiles of the longest sequence, batch, q_heads).
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start_q, len_q, start_k, len_k = _sequence_extent(Cu_seqlens_q_ptr, Cu_seqlens_k_ptr, b, seqlen_q, seqlen_k, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:  # past this sequence's end (VARLEN: the grid covers the longest)
        return

    kv_h = (h // group).to(tl.int64)
    b64 = b.to(tl.int64)
    Q_base = Q_ptr + b64 * q_stride_batch + tl.cast(start_q, tl.int64) * q_stride_token + h.to(tl.int64) * q_stride_head
    O_base = Out_ptr + b64 * o_stride_batch + tl.cast(start_q, tl.int64) * o_stride_token + h.to(tl.int64) * o_stride_head
    K_base = K_ptr + b64 * k_stride_batch + tl.cast(start_k, tl.int64) * k_stride_token + kv_h * k_stride_head
    V_base = V_ptr + b64 * v_stride_batch + tl.cast(start_k, tl.int64) * v_stride_token + kv_h * v_stride_head

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < len_q
    mask_d = offs_d < HEAD_DIM
    # 64-bit: one sequence's rows may span more than 2^31 elements
    q = tl.load(Q_base + offs_m[:, None].to(tl.int64) * q_stride_token + offs_d[None, :] * q_stride_dim,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    diagonal = len_k - len_q
    full_end, end = _key_range(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _attention_tiles(
        acc, m_i, l_i, q, K_base, V_base, k_stride_token, k_stride_dim, v_stride_token, v_stride_dim,
        offs_m, len_k, diagonal, qk_scale, 0, full_end,
        False, CAUSAL, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D,
    )
    acc, m_i, l_i = _attention_tiles(
        acc, m_i, l_i, q, K_base, V_base, k_stride_token, k_stride_dim, v_stride_token, v_stride_dim,
        offs_m, len_k, diagonal, qk_scale, full_end, end,
        True, CAUSAL, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D,
    )

    # A row that saw no key has l = 0: its output is 0 and its log-sum-exp -inf.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O_base + offs_m[:, None].to(tl.int64) * o_stride_token + offs_d[None, :] * o_stride_dim,
             out.to(Out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    if RETURN_LSE:
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))  # x ln 2
        Lse_base = Lse_ptr + b64 * lse_stride_batch + h.to(tl.int64) * lse_stride_head
        tl.store(Lse_base + (start_q + offs_m).to(tl.int64) * lse_stride_token, lse, mask=mask_m)


# Autotune candidates for a GPU (FlashAttention-2 / Triton tutorial shapes), pruned per
# head_dim and dtype by _prune_configs so the first call compiles and times only a few.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=1),
]

#: Under the interpreter: one small fixed configuration (autotune would run every candidate).
#: BLOCK_M != BLOCK_N on purpose, so tiles straddle the causal diagonal unevenly.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}

# Shared memory a configuration may plan for (A100 has 164 KiB per block, H100 227 KiB).
_SHARED_MEMORY_BUDGET = 160 * 1024
# fp32 accumulator elements per thread beyond which registers spill.
_ACC_PER_THREAD = 64


def _footprint(config: triton.Config, block_d: int, element_size: int):
    """(shared memory bytes, accumulator elements per thread) of ``config``."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    # q once, k and v once per pipeline stage
    shared = (block_m + 2 * block_n * max(config.num_stages, 1)) * block_d * element_size
    return shared, block_m * block_d // (32 * config.num_warps)


def _prune_configs(configs, named_args, **kwargs):
    """The candidates that fit the shared memory and register budgets; the smallest if none does."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    element_size = named_args["Q_ptr"].element_size()
    fits = [
        config for config in configs
        if _footprint(config, block_d, element_size)[0] <= _SHARED_MEMORY_BUDGET
        and _footprint(config, block_d, element_size)[1] <= _ACC_PER_THREAD
    ]
    return fits or [min(configs, key=lambda config: _footprint(config, block_d, element_size))]


_attention_kernel_autotuned = triton.autotune(
    configs=_GPU_CONFIGS,
    # the tensors' dtypes are part of every autotune key as well
    key=["HEAD_DIM", "CAUSAL", "VARLEN", "bucket_q", "bucket_k"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attention_kernel)


def _bucket(seqlen: int) -> int:
    """Power-of-two bucket of a sequence length, for the autotune key (capped: long is long)."""
    return min(triton.next_power_of_2(max(seqlen, 1)), 16384)


def attention_supports(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    return_lse: bool = False,
) -> Optional[str]:
    """None when ``attention`` can run this (validated) case, else why not."""
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}: the triton attention kernel keeps a query tile's head_dim in registers"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} not supported by the triton attention kernel (float32, float16, bfloat16)"
    if q.is_cuda and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "bfloat16 tl.dot needs compute capability 8.0 or newer"
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Launch ``_attention_kernel`` over (query tiles of the longest sequence, batch, q_heads).

    Takes validated tensors with the reference's signature (``fmkernels.reference.attention``).
    Reads q once and k, v once per query tile that sees them (about Sq / BLOCK_M times, halved
    when causal); writes the output and, with ``return_lse``, the fp32 log-sum-exp.
    """
    varlen = cu_seqlens_q is not None
    q_heads, head_dim = q.shape[-2], q.shape[-1]
    group = q_heads // k.shape[-2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    interpreting = platform.triton_interpreting()
    # bf16 arithmetic and tl.dot are wrong under the interpreter: load bf16, compute in fp32.
    upcast = interpreting and q.dtype == torch.bfloat16
    # ... and its fp32 -> bf16 conversion truncates (a GPU rounds to nearest even): there the
    # kernel writes fp32 and torch rounds.
    out = torch.empty(q.shape, dtype=torch.float32 if upcast else q.dtype, device=q.device)
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        total_q = q.shape[0]
        lse = torch.empty((q_heads, total_q), dtype=torch.float32, device=q.device)
        # Host sync: the grid covers the longest sequence.
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if batch else 0
        seqlen_q, seqlen_k = 0, 0
        # (total, heads, dim): a zero batch stride; each sequence starts at its cu_seqlens offset.
        q_strides, k_strides, v_strides, o_strides = ((0, *t.stride()) for t in (q, k, v, out))
        lse_strides = (0, *lse.stride())
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = k.shape[1]
        max_seqlen_q, max_seqlen_k = seqlen_q, seqlen_k
        lse = torch.empty((batch, q_heads, seqlen_q), dtype=torch.float32, device=q.device)
        q_strides, k_strides, v_strides, o_strides = (t.stride() for t in (q, k, v, out))
        lse_strides = lse.stride()
        cu_q = cu_k = lse  # any pointer; not read unless VARLEN
    if batch == 0 or max_seqlen_q == 0 or q_heads == 0:
        out = out.to(q.dtype)
        return (out, lse) if return_lse else out

    args = (
        q, k, v, out, lse, cu_q, cu_k,
        *q_strides, *k_strides, *v_strides, *o_strides, *lse_strides,
        seqlen_q, seqlen_k, group, scale * _LOG2E, _bucket(max_seqlen_q), _bucket(max_seqlen_k),
    )
    flags = dict(
        CAUSAL=causal, VARLEN=varlen, RETURN_LSE=return_lse,
        UPCAST=upcast,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    if interpreting:
        grid = (triton.cdiv(max_seqlen_q, INTERPRETER_CONFIG["BLOCK_M"]), batch, q_heads)
        _attention_kernel[grid](*args, **flags, **INTERPRETER_CONFIG)
    else:
        def grid(meta):
            return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), batch, q_heads)

        with torch.cuda.device(q.device):
            _attention_kernel_autotuned[grid](*args, **flags)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
