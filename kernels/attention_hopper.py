"""attention in Triton for Hopper (and Blackwell): tensor-descriptor (TMA) tiles and a
warp-specialised key loop, after the Hopper/Blackwell version of Triton's fused-attention
tutorial. ``kernels/attention.py`` stays the kernel for every other GPU.

The math is the FlashAttention-2 kernel's (``kernels/attention.py``): each program owns
BLOCK_M query rows of one (sequence, q_head), streams BLOCK_N-key tiles of its KV head
(h // group) with an online softmax in fp32 (running max m in log2 units, running sum l,
unnormalised acc), and masks only the tiles that straddle the causal diagonal (bottom-right
aligned: query i sees keys j <= i + seqlen_k - seqlen_q) or the end of the keys.

What differs is how tiles move. Every q, k, v and output tile goes through a tensor
descriptor, so on sm_90+ the copies are TMA bulk transfers that the compiler can pipeline
(and, with ``tl.range(..., warp_specialize=True)``, hand to a producer warp group while the
consumer warp groups run wgmma and the softmax). TMA zero-fills rows past a descriptor's
shape on load and drops them on store, so each program builds its descriptors on the device
(``tl.make_tensor_descriptor``) over its own sequence and head only: rows ``[0, seqlen)`` of
that sequence by ``head_dim``, with the token stride. A tile can then never read or write a
neighbouring sequence, whether the batch is dense (batch, seqlen, heads, head_dim) or packed
(total, heads, head_dim) with cu_seqlens, and one code path serves both. (A host descriptor
over the packed rows would cross sequence boundaries; the tutorial also builds device
descriptors on Hopper when it warp-specialises.) Device descriptors live in a global scratch
buffer that Triton asks ``triton.set_allocator``'s allocator for at launch.

TMA needs a 16-byte-aligned base, 16-byte-aligned strides and a unit last stride:
``attention_supports`` refuses calls whose tensors break them, saying which.

Per program it reads BLOCK_M x D of q, 2 x (keys seen) x D of k and v, and writes BLOCK_M x D
of the output (and BLOCK_M fp32 of log-sum-exp).
"""

from __future__ import annotations

import contextvars
import functools
import math
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.testing import do_bench

from fmkernels import platform

from .attention import _LOG2E, _bucket, _key_range, _sequence_extent

#: head_dims the kernel takes: a descriptor's block is (rows, head_dim) with every side a
#: power of two, and these are the two the tutorial runs and tests on Hopper and Blackwell.
HEAD_DIMS = (64, 128)

# A TMA copy's global address and every stride but the last must be multiples of 16 bytes.
_TMA_ALIGNMENT = 16


@triton.jit
def _attention_tiles(
    acc, m_i, l_i,  # running state: (BLOCK_M, HEAD_DIM) fp32, (BLOCK_M,) fp32 in log2 units, (BLOCK_M,) fp32
    q,  # (BLOCK_M, HEAD_DIM) in the compute dtype
    desc_k, desc_v,  # (seqlen_k, HEAD_DIM) descriptors over this sequence's KV head, BLOCK_N-row blocks
    offs_m,  # (BLOCK_M,) query rows of the program, within the sequence
    seqlen_k,
    diagonal,  # seqlen_k - seqlen_q: row i sees keys j <= i + diagonal when CAUSAL
    qk_scale,  # scale x log2(e)
    start, end,  # key range [start, end), start a multiple of BLOCK_N
    MASKED: tl.constexpr,  # mask keys past seqlen_k and, with CAUSAL, past the diagonal
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,  # compute in fp32 (bf16 under the interpreter)
    WARP_SPECIALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = desc_k.load([start_n, 0])  # rows past seqlen_k come back as zeros
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k.T) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = (start_n + offs_n)[None, :] < seqlen_k
            if CAUSAL:
                visible = visible & ((start_n + offs_n)[None, :] <= offs_m[:, None] + diagonal)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            # Every row sees every key of these tiles, so the maximum is finite from the first.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = m_new
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        v = desc_v.load([start_n, 0])
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        # l last, as in the tutorial: p's row sums are not live across the second dot.
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["bucket_q", "bucket_k"])
def _attention_kernel(
    Q_ptr,  # (batch, seqlen_q, q_heads, head_dim), or (total_q, q_heads, head_dim) when VARLEN; unit last stride
    K_ptr, V_ptr,  # (batch, seqlen_k, kv_heads, head_dim), or (total_k, kv_heads, head_dim) when VARLEN
    Out_ptr,  # q's shape, contiguous; q's dtype (fp32 with UPCAST)
    Lse_ptr,  # fp32 (batch, q_heads, seqlen_q), or (q_heads, total_q) when VARLEN; unused unless RETURN_LSE
    Cu_seqlens_q_ptr, Cu_seqlens_k_ptr,  # (batch + 1,) int32; unused unless VARLEN
    q_stride_batch, q_stride_token, q_stride_head,  # batch strides are 0 when VARLEN; 16-byte multiples
    k_stride_batch, k_stride_token, k_stride_head,
    v_stride_batch, v_stride_token, v_stride_head,
    o_stride_batch, o_stride_token, o_stride_head,
    lse_stride_batch, lse_stride_head, lse_stride_token,
    seqlen_q, seqlen_k,  # dense lengths; each sequence's own come from cu_seqlens when VARLEN
    group,  # q_heads // kv_heads: query head h reads KV head h // group
    qk_scale,  # scale x log2(e): the softmax runs in base 2
    bucket_q, bucket_k,  # power-of-two buckets of the longest sequences: autotune keys only
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    UPCAST: tl.constexpr,  # load, then compute in fp32 (bf16 under the interpreter)
    HEAD_DIM: tl.constexpr,  # 64 or 128
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,  # warp-specialise the unmasked key loop
):
    # Grid: (query tiles of the longest sequence, batch, q_heads). The last query tiles go
    # first: causal ones see the most keys, and the short ones then fill the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start_q, len_q, start_k, len_k = _sequence_extent(Cu_seqlens_q_ptr, Cu_seqlens_k_ptr, b, seqlen_q, seqlen_k, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:  # past this sequence's end (VARLEN: the grid covers the longest)
        return

    kv_h = (h // group).to(tl.int64)
    b64 = b.to(tl.int64)
    # This sequence's first row of the head: 16-byte aligned, as the base and strides are.
    Q_base = Q_ptr + b64 * q_stride_batch + tl.cast(start_q, tl.int64) * q_stride_token + h.to(tl.int64) * q_stride_head
    O_base = Out_ptr + b64 * o_stride_batch + tl.cast(start_q, tl.int64) * o_stride_token + h.to(tl.int64) * o_stride_head
    K_base = K_ptr + b64 * k_stride_batch + tl.cast(start_k, tl.int64) * k_stride_token + kv_h * k_stride_head
    V_base = V_ptr + b64 * v_stride_batch + tl.cast(start_k, tl.int64) * v_stride_token + kv_h * v_stride_head
    # Descriptors end at the sequence's end: loads past it give zeros, stores past it are dropped.
    desc_q = tl.make_tensor_descriptor(Q_base, shape=[len_q, HEAD_DIM], strides=[q_stride_token, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    desc_o = tl.make_tensor_descriptor(O_base, shape=[len_q, HEAD_DIM], strides=[o_stride_token, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    # A sequence without keys loads none; its descriptors still get a valid (non-zero) extent.
    rows_k = tl.maximum(len_k, 1)
    desc_k = tl.make_tensor_descriptor(K_base, shape=[rows_k, HEAD_DIM], strides=[k_stride_token, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(V_base, shape=[rows_k, HEAD_DIM], strides=[v_stride_token, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])

    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = desc_q.load([start_m, 0])
    if UPCAST:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    diagonal = len_k - len_q
    full_end, end = _key_range(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _attention_tiles(
        acc, m_i, l_i, q, desc_k, desc_v, offs_m, len_k, diagonal, qk_scale, 0, full_end,
        False, CAUSAL, UPCAST, WARP_SPECIALIZE, BLOCK_N,
    )
    # The masked tiles (the diagonal's, and the last partial one) stay in a plain loop.
    acc, m_i, l_i = _attention_tiles(
        acc, m_i, l_i, q, desc_k, desc_v, offs_m, len_k, diagonal, qk_scale, full_end, end,
        True, CAUSAL, UPCAST, False, BLOCK_N,
    )

    # A row that saw no key has l = 0: its output is 0 and its log-sum-exp -inf.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    desc_o.store([start_m, 0], out.to(Out_ptr.dtype.element_ty))
    if RETURN_LSE:
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))  # x ln 2
        Lse_base = Lse_ptr + b64 * lse_stride_batch + h.to(tl.int64) * lse_stride_head
        tl.store(Lse_base + (start_q + offs_m).to(tl.int64) * lse_stride_token, lse, mask=offs_m < len_q)


def _config(block_m, block_n, num_warps, num_stages, warp_specialize, maxnreg=None):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "WARP_SPECIALIZE": warp_specialize},
                         num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


# Autotune candidates per major compute capability, pruned per case by _fitting_configs.
# None of them has run on a GPU yet: the first GPU session's timings decide what stays.
GPU_CONFIGS = {
    # Hopper: wgmma works on 64-row warp-group tiles, so 8 warps split a 128-row tile in two
    # and the accumulator stays in registers; as in the tutorial, 8 warps only with 128 x 128
    # tiles, and warp specialisation (a TMA producer beside the consumer warp groups) only
    # without the causal mask.
    9: [
        _config(128, 128, 8, 2, True),
        _config(128, 128, 8, 3, True),
        _config(128, 128, 8, 2, False),
        _config(128, 128, 8, 3, False),
        _config(128, 64, 4, 3, False),
        _config(64, 64, 4, 3, False),
    ],
    # Blackwell: tcgen05 keeps the accumulator in tensor memory, so 4 warps hold a 128-row
    # tile; the tutorial warp-specialises the forward here, causal or not, capping registers
    # per thread so the partitions fit (_blackwell_maxnreg).
    10: [
        _config(128, 128, 4, 3, True, maxnreg=168),
        _config(128, 128, 4, 3, True, maxnreg=80),
        _config(128, 64, 4, 3, True, maxnreg=168),
        _config(128, 64, 4, 3, True, maxnreg=80),
        _config(128, 128, 4, 2, False),
        _config(128, 64, 4, 3, False),
    ],
}

#: Under the interpreter: one small fixed configuration (autotune would run every candidate).
#: BLOCK_M != BLOCK_N on purpose, so tiles straddle the causal diagonal unevenly.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "WARP_SPECIALIZE": True}

# Shared memory a configuration may plan for (Hopper and Blackwell: 227 KiB per block).
_SHARED_MEMORY_BUDGET = 220 * 1024
# Hopper: fp32 accumulator elements per thread beyond which registers spill.
_ACC_PER_THREAD = 64


def _footprint(config: triton.Config, head_dim: int, element_size: int):
    """(shared memory bytes, accumulator elements per thread) of ``config``."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    # q and the output tile the TMA store reads from, k and v once per pipeline stage
    shared = (2 * block_m + 2 * block_n * max(config.num_stages, 1)) * head_dim * element_size
    return shared, block_m * head_dim // (32 * config.num_warps)


def _blackwell_maxnreg(head_dim: int, dtype: torch.dtype) -> int:
    """The tutorial's register cap for a warp-specialised Blackwell forward."""
    return 168 if head_dim == 128 and dtype == torch.float16 else 80


def _fitting_configs(configs, major: int, head_dim: int, dtype: torch.dtype, causal: bool):
    """The candidates of ``configs`` for compute capability ``major`` that fit the budgets and
    follow the tutorial's per-architecture rules (the smallest if none does)."""
    element_size = dtype.itemsize

    def fits(config):
        shared, per_thread = _footprint(config, head_dim, element_size)
        if shared > _SHARED_MEMORY_BUDGET:
            return False
        if major == 9:
            return per_thread <= _ACC_PER_THREAD and not (causal and config.kwargs["WARP_SPECIALIZE"])
        return config.maxnreg is None or config.maxnreg == _blackwell_maxnreg(head_dim, dtype)

    return [config for config in configs if fits(config)] or [
        min(configs, key=lambda config: _footprint(config, head_dim, element_size))
    ]


def _bench_or_lose(kernel_call, quantiles):
    """Triton's benchmark of one candidate, or an infinite time when it fails to compile.

    Warp specialisation on Hopper is new in Triton and takes only some loops: a candidate
    the installed Triton cannot compile loses the autotune (with a warning) instead of
    failing the call. If every candidate fails, the call itself raises the error.
    """
    try:
        return do_bench(kernel_call, quantiles=quantiles)
    except (CompilationError, RuntimeError) as error:
        warnings.warn(f"triton_hopper attention: an autotune candidate failed, skipped ({type(error).__name__}: {error})",
                      RuntimeWarning, stacklevel=2)
        return [float("inf")] * len(quantiles)


@functools.lru_cache(maxsize=None)
def _autotuned(major: int):
    """The kernel autotuned over ``GPU_CONFIGS[major]`` (one tuner per architecture, so one
    machine's GPUs of two architectures do not share tuned choices)."""

    def prune(configs, named_args, **kwargs):
        return _fitting_configs(configs, major, kwargs["HEAD_DIM"], named_args["Q_ptr"].dtype, kwargs["CAUSAL"])

    return triton.autotune(
        configs=GPU_CONFIGS[major],
        # the tensors' dtypes are part of every autotune key as well
        key=["HEAD_DIM", "CAUSAL", "VARLEN", "bucket_q", "bucket_k"],
        prune_configs_by={"early_config_prune": prune},
        do_bench=_bench_or_lose,
    )(_attention_kernel)


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
    """None when ``attention`` can run this (validated) case, else why not.

    On CUDA tensors: compute capability 9.x or 10.x (the architectures with configurations),
    float16 or bfloat16. On the CPU (under the interpreter) float32 as well. Everywhere:
    head_dim 64 or 128, and TMA's layout rules (16-byte-aligned data pointers and strides,
    unit stride along head_dim).
    """
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        if major not in GPU_CONFIGS:
            return (f"compute capability {major}.{minor}: the triton_hopper attention kernel has configurations for "
                    f"{' and '.join(f'{m}.x' for m in GPU_CONFIGS)} only (backend='triton' runs the others)")
        if q.dtype not in (torch.float16, torch.bfloat16):
            return (f"dtype {q.dtype} on a GPU: the triton_hopper attention kernel feeds the tensor cores float16 or "
                    "bfloat16 (backend='triton' runs float32 at full precision)")
    elif q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} not supported by the triton_hopper attention kernel (float32, float16, bfloat16)"
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        return (f"head_dim {head_dim}: the triton_hopper attention kernel takes head_dim "
                f"{' or '.join(map(str, HEAD_DIMS))} (backend='triton' takes up to 256)")
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        strides = tensor.stride()
        if strides[-1] != 1:
            return f"{name}.stride(-1) is {strides[-1]}: a tensor descriptor (TMA) needs unit stride along head_dim"
        if tensor.data_ptr() % _TMA_ALIGNMENT:
            return f"{name}'s data pointer is not {_TMA_ALIGNMENT}-byte aligned, as a tensor descriptor (TMA) needs"
        for dim, stride in enumerate(strides[:-1]):
            if stride * tensor.element_size() % _TMA_ALIGNMENT:
                return (f"{name}.stride({dim}) is {stride} elements ({stride * tensor.element_size()} bytes): "
                        f"a tensor descriptor (TMA) needs strides in multiples of {_TMA_ALIGNMENT} bytes")
    return None


def _scratch(device: torch.device):
    """The allocator Triton asks for the device descriptors' global scratch at each launch."""

    def allocate(size: int, alignment: int, stream: Optional[int]):
        return torch.empty(size, dtype=torch.int8, device=device)

    return allocate


def _empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The output buffer the kernel writes (tests poison it to see which rows a launch writes)."""
    return torch.empty(shape, dtype=dtype, device=device)


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

    Takes validated tensors that ``attention_supports`` accepts, with the reference's
    signature (``fmkernels.reference.attention``). Reads q once and k, v once per query tile
    that sees them (about Sq / BLOCK_M times, halved when causal); writes the output and,
    with ``return_lse``, the fp32 log-sum-exp.
    """
    varlen = cu_seqlens_q is not None
    q_heads, head_dim = q.shape[-2], q.shape[-1]
    group = q_heads // k.shape[-2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    interpreting = platform.triton_interpreting()
    # bf16 arithmetic and tl.dot are wrong under the interpreter, and its fp32 -> bf16
    # conversion truncates: load bf16, compute in fp32, write fp32 and let torch round.
    upcast = interpreting and q.dtype == torch.bfloat16
    out = _empty_output(q.shape, torch.float32 if upcast else q.dtype, q.device)
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        lse = torch.empty((q_heads, q.shape[0]), dtype=torch.float32, device=q.device)
        # Host sync: the grid covers the longest sequence.
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if batch else 0
        seqlen_q, seqlen_k = 0, 0
        # (total, heads, dim): a zero batch stride; each sequence starts at its cu_seqlens offset.
        q_strides, k_strides, v_strides, o_strides = ((0, *t.stride()[:-1]) for t in (q, k, v, out))
        lse_strides = (0, *lse.stride())
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = k.shape[1]
        max_seqlen_q, max_seqlen_k = seqlen_q, seqlen_k
        lse = torch.empty((batch, q_heads, seqlen_q), dtype=torch.float32, device=q.device)
        q_strides, k_strides, v_strides, o_strides = (t.stride()[:-1] for t in (q, k, v, out))
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
    flags = dict(CAUSAL=causal, VARLEN=varlen, RETURN_LSE=return_lse, UPCAST=upcast, HEAD_DIM=head_dim)
    if interpreting:
        grid = (triton.cdiv(max_seqlen_q, INTERPRETER_CONFIG["BLOCK_M"]), batch, q_heads)
        _attention_kernel[grid](*args, **flags, **INTERPRETER_CONFIG)
    else:
        kernel = _autotuned(torch.cuda.get_device_capability(q.device)[0])

        def grid(meta):
            return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), batch, q_heads)

        def launch():
            # The allocator is a context variable: set it in a copy of the caller's context,
            # so a caller's own allocator is left as it was.
            triton.set_allocator(_scratch(q.device))
            kernel[grid](*args, **flags)

        with torch.cuda.device(q.device):
            contextvars.copy_context().run(launch)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
