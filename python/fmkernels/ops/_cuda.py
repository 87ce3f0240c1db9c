"""The ``cuda`` backend: fmkernels._cuda's kernels on CUDA tensors.

Each function takes the reference's arguments (already validated by the public op),
allocates its outputs on the inputs' device, and hands the kernels tensor views and the
current stream of that device. An optional ``<op>_supports`` says which cases an op's
kernels cannot run, so ``backend="auto"`` passes them to the next backend and
``backend="cuda"`` raises with the reason.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .. import platform, reference
from .._views import tensor_view
from ..quantized import QuantizedWeight
from ._top_tokens import top_alternatives

#: The largest head_dim the CUDA decode_attention kernels accept.
DECODE_MAX_HEAD_DIM = 256
#: decode_attention splits each sequence's positions so that a launch has about this many
#: CTAs per SM (an SM holds ~3 at a time: several waves keep the tail short) ...
DECODE_CTAS_PER_SM = 16
#: ... never cutting pieces shorter than this many positions (each split adds a partial
#: result to write and merge) ...
DECODE_MIN_SPLIT_POSITIONS = 256
#: ... and at most this many splits (the kernels' limit).
DECODE_MAX_SPLITS = 256
#: The decode_attention split kernels (csrc/cuda/decode_attention.cuh, DecodeVariant), by name.
DECODE_VARIANTS = {"tiled": 0, "tiled_shallow": 1}
#: The one decode_attention runs unless FMKERNELS_CUDA_DECODE_VARIANT names another: the
#: fastest at most shapes on an H100 (tiled wins at batch 64 x 32k positions).
DECODE_DEFAULT_VARIANT = "tiled_shallow"


def _module():
    return platform.cuda_module()


def stream_of(tensor: torch.Tensor) -> int:
    """The handle of the current CUDA stream on ``tensor``'s device."""
    return torch.cuda.current_stream(tensor.device).cuda_stream


def _scale(q: torch.Tensor, scale) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_rows_per_cta(rows: int) -> int:
    """Query rows (group x n_new) one decode_attention CTA computes, as the kernels choose them."""
    return 4 if rows <= 4 else 8


def decode_num_splits(ctas_per_split: int, capacity: int, num_sms: int) -> int:
    """Splits per sequence for decode_attention.

    ``ctas_per_split``: CTAs a launch has with one split (batch x kv_heads x row blocks);
    ``capacity``: the most positions a sequence can hold; ``num_sms``: the GPU's SMs.
    """
    wanted = DECODE_CTAS_PER_SM * num_sms // max(1, ctas_per_split)
    worth_splitting = -(-capacity // DECODE_MIN_SPLIT_POSITIONS)
    return max(1, min(wanted, worth_splitting, DECODE_MAX_SPLITS))


def decode_variant() -> int:
    """The split kernel decode_attention launches, as the binding's int.

    A benchmarking switch: the environment variable ``FMKERNELS_CUDA_DECODE_VARIANT`` picks
    one of DECODE_VARIANTS by name or number (read at every call, so a benchmark can compare
    them in one process); unset, DECODE_DEFAULT_VARIANT. All variants compute the same
    results to rounding. A value that names none is passed on as a number (or -1), for the
    binding to reject with a ValueError.
    """
    value = os.environ.get("FMKERNELS_CUDA_DECODE_VARIANT", "").strip()
    if not value:
        return DECODE_VARIANTS[DECODE_DEFAULT_VARIANT]
    if value in DECODE_VARIANTS:
        return DECODE_VARIANTS[value]
    try:
        return int(value)
    except ValueError:
        return -1


#: Positions a sequence may hold: the decode kernels count them in 32 bits.
DECODE_MAX_POSITIONS = 2**30 - 1
#: The most n_new x q_heads query rows a decode call may have: the kernels count rows in int,
#: rounded up to whole blocks of 8.
DECODE_MAX_QUERY_ROWS = 2**31 - 9
_INT32_MAX = 2**31 - 1


def decode_attention_supports(q, k_cache, v_cache, *, block_table=None, **_) -> str | None:
    batch, n_new, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
    if capacity > DECODE_MAX_POSITIONS:
        return (f"cuda decode_attention holds at most {DECODE_MAX_POSITIONS} positions a sequence "
                f"(32-bit positions); got {capacity}")
    if n_new * q_heads > DECODE_MAX_QUERY_ROWS:
        return f"cuda decode_attention takes at most {DECODE_MAX_QUERY_ROWS} n_new x q_heads rows; got {n_new * q_heads}"
    rows = q_heads // kv_heads * n_new
    # One split at the least; decode_num_splits adds splits only while the grid is small.
    ctas = batch * kv_heads * -(-rows // decode_rows_per_cta(rows))
    if max(ctas, batch * n_new * q_heads) > _INT32_MAX:
        return f"cuda decode_attention launches at most {_INT32_MAX} CTAs; this call needs more"
    vector = 16 // q.element_size()
    if head_dim > DECODE_MAX_HEAD_DIM:
        return f"cuda decode_attention supports head_dim <= {DECODE_MAX_HEAD_DIM}, got {head_dim}"
    if head_dim % vector != 0:
        return (f"cuda decode_attention reads rows in 16-byte vectors: head_dim must be a multiple of "
                f"{vector} for {q.dtype}, got {head_dim}")
    for cache in (k_cache, v_cache):
        if cache.stride(-1) != 1 or cache.data_ptr() % 16 != 0 or any(s % vector for s in cache.stride()[:3]):
            return "cuda decode_attention needs 16-byte aligned cache rows at unit stride along head_dim"
    return None


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, return_lse=False,
                     num_splits=None):
    """``num_splits``: splits per sequence; None lets decode_num_splits choose.

    The split kernel is decode_variant(): set ``FMKERNELS_CUDA_DECODE_VARIANT`` (a name of
    DECODE_VARIANTS) to benchmark the others.
    """
    q = q if q.stride(-1) == 1 else q.contiguous()
    batch, n_new, q_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, n_new), dtype=torch.float32, device=q.device) if return_lse else None
    if num_splits is None:
        kv_heads = k_cache.shape[2]
        rows = q_heads // kv_heads * n_new
        row_blocks = -(-rows // decode_rows_per_cta(rows))
        capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
        num_splits = decode_num_splits(batch * kv_heads * row_blocks, capacity, _sm_count(q.device.index))
    partial_out = partial_lse = None
    if num_splits > 1:
        partial_rows = batch * num_splits * q_heads * n_new
        partial_out = torch.empty(partial_rows * head_dim, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(partial_rows, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        _module().decode_attention(
            tensor_view(q), tensor_view(k_cache), tensor_view(v_cache), tensor_view(cache_seqlens),
            tensor_view(block_table), tensor_view(out), tensor_view(lse), _scale(q, scale), num_splits,
            tensor_view(partial_out), tensor_view(partial_lse), decode_variant(), stream_of(q),
        )
    return (out, lse) if return_lse else out


#: append_kv's grid is (n_new, batch): CUDA bounds y.
APPEND_KV_MAX_BATCH = 65535
#: The most kv_heads x head_dim elements of a token: the copy loop's int counter steps past the
#: last one by up to a block of 256 threads.
APPEND_KV_MAX_TOKEN_ELEMENTS = 2**31 - 1 - 256


def append_kv_supports(k_cache, v_cache, k, v, **_) -> str | None:
    batch, _n_new, kv_heads, head_dim = k.shape
    if batch > APPEND_KV_MAX_BATCH:
        return f"cuda append_kv launches at most {APPEND_KV_MAX_BATCH} sequences; got batch {batch}"
    if kv_heads * head_dim > APPEND_KV_MAX_TOKEN_ELEMENTS:
        return (f"cuda append_kv copies at most {APPEND_KV_MAX_TOKEN_ELEMENTS} kv_heads x head_dim elements "
                f"a token; got {kv_heads * head_dim}")
    return None


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
#: Key rows (seqlen_k, or total_k when packed) the kernel's int tile arithmetic can count.
ATTENTION_MAX_KEYS = 2**31 - 1 - ATTENTION_BLOCK_M
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
#: The fastest on an H100 (bench/results/nvidia-h100-80gb-hbm3/2026-11-22-cuda_attention_variants.json:
#: first at 8 of the 10 bf16 d=128 shapes, 212-283 TFLOP/s).
ATTENTION_DEFAULT_VARIANT = 3


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
    if q.shape[-2] > _INT32_MAX:
        return f"cuda attention launches at most {_INT32_MAX} heads; got {q.shape[-2]}"
    keys = k.shape[-3]  # seqlen_k, or total_k
    if keys > ATTENTION_MAX_KEYS:
        return f"cuda attention counts key rows in 32 bits: at most {ATTENTION_MAX_KEYS}; got {keys}"
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
    (a key of ``ATTENTION_VARIANTS``), else ``ATTENTION_DEFAULT_VARIANT``.

    Raises
    ------
    ValueError
        When the variable is set to anything else.
    """
    text = os.environ.get(ATTENTION_VARIANT_ENV, "").strip()
    if not text:
        return ATTENTION_DEFAULT_VARIANT
    if not text.isdigit() or int(text) not in ATTENTION_VARIANTS:
        known = ", ".join(map(str, ATTENTION_VARIANTS))
        raise ValueError(f"{ATTENTION_VARIANT_ENV} must be one of {known}; got {text!r}")
    return int(text)


def attention(q, k, v, *, causal=False, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False):
    """Prefill attention on the tensor-core kernel.

    The environment variable ``FMKERNELS_CUDA_ATTENTION_VARIANT`` (read at every call) picks
    the kernel's schedule, one of ``ATTENTION_VARIANTS``; it exists to benchmark them against
    each other (bench/cuda_attention_variants.py) and leaves the result unchanged. Unset, the
    kernel runs ``ATTENTION_DEFAULT_VARIANT``.
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
def _unit_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The sampling kernels read rows of vocab elements at unit stride."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def filter_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, allowed=None):
    logits = _unit_stride(logits)
    allowed = None if allowed is None else _unit_stride(allowed)
    with torch.cuda.device(logits.device):
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        parameters = reference.filter_parameters(logits.shape[0], logits.device, temperature, top_k, top_p, min_p)
        _module().filter_logits(
            tensor_view(logits), tensor_view(out), *(tensor_view(p) for p in parameters), tensor_view(allowed),
            stream_of(logits),
        )
    return out


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, step=0,
           return_logprobs=False, num_logprobs=0, allowed=None):
    logits = _unit_stride(logits)
    allowed = None if allowed is None else _unit_stride(allowed)
    batch, vocab = logits.shape
    device = logits.device
    with torch.cuda.device(device):
        parameters = reference.filter_parameters(logits.shape[0], logits.device, temperature, top_k, top_p, min_p)
        seeds = reference.row_seeds(seed, batch, device).contiguous()
        steps = reference.per_row(step, batch, torch.int64, device).contiguous()
        tokens = torch.empty(batch, dtype=torch.int64, device=device)
        logprobs = log_mass = filtered = None
        if return_logprobs:
            logprobs = torch.empty(batch, dtype=torch.float32, device=device)
            if num_logprobs > 0:
                # The top alternatives come from the filtered row (x - max x where kept), picked here.
                log_mass = torch.empty(batch, dtype=torch.float32, device=device)
                filtered = torch.empty((batch, vocab), dtype=torch.float32, device=device)
        _module().sample(
            tensor_view(logits), tensor_view(tokens), *(tensor_view(p) for p in parameters),
            tensor_view(seeds), tensor_view(steps), tensor_view(allowed), tensor_view(logprobs), tensor_view(log_mass),
            tensor_view(filtered), stream_of(logits),
        )
        if not return_logprobs:
            return tokens
        top_ids, top_logprobs = top_alternatives(filtered, log_mass, batch, num_logprobs, device)
    return reference.SampleOutput(tokens, logprobs, top_ids, top_logprobs)


#: The most rows of x (its leading dimensions flattened) the quantized linear kernel takes
#: (csrc/cuda/linear_quantized.cuh): a decode step's few rows, accumulated in registers.
LINEAR_MAX_ROWS = 64


def linear_supports(x, weight, **_) -> str | None:
    """None when csrc/cuda/linear_quantized.cu runs this (validated) call, else why not."""
    if isinstance(weight, torch.Tensor):
        return "a float weight: torch's matmul (the reference) is the tool"
    if not isinstance(weight, QuantizedWeight):
        return f"cuda linear takes a QuantizedWeight, got {type(weight).__name__}"
    rows = math.prod(x.shape[:-1])
    if rows > LINEAR_MAX_ROWS:
        return f"{rows} rows of x > {LINEAR_MAX_ROWS}: the quantized kernel is for a decode step's few rows"
    return None


def linear(x, weight):
    """x (..., K) @ dequantize(weight)^T -> (..., N) in x's dtype, for a QuantizedWeight: the
    weight's blocks are read as they are (any row stride), x at any strides."""
    n_features, k_features = weight.shape
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x_rows = x.reshape(rows, k_features)
    out = torch.empty((rows, n_features), dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        _module().linear_quantized(
            tensor_view(x_rows), tensor_view(weight.blocks), weight.format, tensor_view(out), stream_of(x),
        )
    return out.view(*lead, n_features)
