"""The ``cuda`` backend: fmkernels._cuda's kernels on CUDA tensors.

Each function takes the reference's arguments (already validated by the public op),
allocates its outputs on the inputs' device, and hands the kernels tensor views and the
current stream of that device. An optional ``<op>_supports`` says which cases an op's
kernels cannot run, so ``backend="auto"`` passes them to the next backend and
``backend="cuda"`` raises with the reason.
"""

from __future__ import annotations

import math
import os

import torch

from .. import platform
from .._views import tensor_view


def _module():
    return platform.cuda_module()


def stream_of(tensor: torch.Tensor) -> int:
    """The handle of the current CUDA stream on ``tensor``'s device."""
    return torch.cuda.current_stream(tensor.device).cuda_stream


def append_kv(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None) -> None:
    with torch.cuda.device(k_cache.device):
        _module().append_kv(
            tensor_view(k_cache), tensor_view(v_cache), tensor_view(k), tensor_view(v),
            tensor_view(cache_seqlens), tensor_view(block_table), stream_of(k_cache),
        )


#: What csrc/cuda/attention.cu instantiates its tensor-core kernel for.
ATTENTION_HEAD_DIMS = (64, 128)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
#: Its grid is (q_heads, batch, query tiles of ATTENTION_BLOCK_M rows); CUDA bounds y and z.
ATTENTION_BLOCK_M = 128
_MAX_GRID_YZ = 65535
#: The attention kernel's schedules (csrc/cuda/attention.cuh), by the number
#: FMKERNELS_CUDA_ATTENTION_VARIANT selects; every one computes the same result.
ATTENTION_VARIANTS = {
    0: "8 warps x 16 rows, 64-key tiles, K and V copied together",
    1: "8 warps x 16 rows, 64-key tiles, K and V copied apart",
    2: "4 warps x 32 rows, 64-key tiles, K and V copied apart",
    3: "4 warps x 32 rows, 32-key tiles, K and V copied apart",
    4: "8 warps x 16 rows, 128-key tiles, K and V copied apart",
}
ATTENTION_VARIANT_ENV = "FMKERNELS_CUDA_ATTENTION_VARIANT"
DEFAULT_ATTENTION_VARIANT = 2


def attention_supports(q, k, v, *, cu_seqlens_q=None, **_) -> str | None:
    """None when the cuda attention kernel can run this (validated) case, else why not."""
    head_dim = q.shape[-1]
    if head_dim not in ATTENTION_HEAD_DIMS or q.dtype not in ATTENTION_DTYPES:
        dtype = str(q.dtype).removeprefix("torch.")
        return f"cuda attention runs head_dim 64 or 128 in float16/bfloat16; got head_dim {head_dim} {dtype}"
    batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    if batch > _MAX_GRID_YZ:
        return f"cuda attention launches at most {_MAX_GRID_YZ} sequences; got batch {batch}"
    rows = q.shape[-3]  # seqlen_q, or total_q (which bounds every packed sequence)
    if rows > _MAX_GRID_YZ * ATTENTION_BLOCK_M:
        return f"cuda attention launches at most {_MAX_GRID_YZ * ATTENTION_BLOCK_M} query rows per sequence; got {rows}"
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "cuda attention needs compute capability 8.0 or newer (mma.sync m16n8k16 in float16/bfloat16)"
    return None


def _aligned_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a contiguous copy where the attention kernel's 16-byte row copies need one:
    unit stride along head_dim, and a data pointer and strides (of dimensions longer than one)
    that are multiples of 16 bytes."""
    element = tensor.element_size()
    aligned = (
        tensor.stride(-1) == 1
        and tensor.data_ptr() % 16 == 0
        and all(size == 1 or stride * element % 16 == 0 for size, stride in zip(tensor.shape[:-1], tensor.stride()[:-1]))
    )
    return tensor if aligned else tensor.clone(memory_format=torch.contiguous_format)


def attention_variant() -> int:
    """The attention kernel schedule to launch: ``FMKERNELS_CUDA_ATTENTION_VARIANT`` when set
    (a key of ``ATTENTION_VARIANTS``), else ``DEFAULT_ATTENTION_VARIANT``.

    Raises
    ------
    ValueError
        When the variable is set to anything else.
    """
    text = os.environ.get(ATTENTION_VARIANT_ENV, "").strip()
    if not text:
        return DEFAULT_ATTENTION_VARIANT
    if not text.isdigit() or int(text) not in ATTENTION_VARIANTS:
        known = ", ".join(map(str, ATTENTION_VARIANTS))
        raise ValueError(f"{ATTENTION_VARIANT_ENV} must be one of {known}; got {text!r}")
    return int(text)


def attention(q, k, v, *, causal=False, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False):
    """Prefill attention on the tensor-core kernel.

    The environment variable ``FMKERNELS_CUDA_ATTENTION_VARIANT`` (read at every call) picks
    the kernel's schedule, one of ``ATTENTION_VARIANTS``; it exists to benchmark them against
    each other (bench/cuda_attention_variants.py) and leaves the result unchanged. Unset, the
    kernel runs ``DEFAULT_ATTENTION_VARIANT``.
    """
    variant = attention_variant()
    q, k, v = _aligned_rows(q), _aligned_rows(k), _aligned_rows(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    packed = cu_seqlens_q is not None
    lse = None
    if return_lse:
        lse_shape = (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    max_seqlen_q = q.shape[1] if not packed else 0
    if packed:
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
        # Host sync (the ops layer has already synced to validate cu_seqlens): the grid covers
        # the longest query sequence.
        if cu_seqlens_q.numel() > 1:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    with torch.cuda.device(q.device):
        _module().attention(
            tensor_view(q), tensor_view(k), tensor_view(v), tensor_view(out), tensor_view(lse),
            tensor_view(cu_seqlens_q), tensor_view(cu_seqlens_k), bool(causal), scale, max_seqlen_q,
            variant, stream_of(q),
        )
    return (out, lse) if return_lse else out
