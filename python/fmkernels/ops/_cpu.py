"""The ``cpu`` backend: fmkernels._C's C++ kernels on CPU tensors.

Each function takes the reference's arguments (already validated by the public op),
allocates the outputs, and hands the kernels tensor views. Kernels use
``torch.get_num_threads()`` OpenMP threads, so ``torch.set_num_threads`` governs both.
"""

from __future__ import annotations

import math

import torch

from .. import platform, reference
from .._views import tensor_view

#: The largest head_dim the C++ attention kernels accept.
MAX_HEAD_DIM = 256

#: The most rows of x the C++ linear kernel takes: it keeps them all in registers and cache
#: while it streams the weight once; for more rows (prefill) torch's matmul is faster.
MAX_LINEAR_ROWS = 16


def _module():
    return platform.cpu_module()


def _unit_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of head_dim (or vocab) elements at unit stride."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _scale(q: torch.Tensor, scale) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def supports_head_dim(q, **_) -> str | None:
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return None


def supports_linear_rows(x, **_) -> str | None:
    rows = math.prod(x.shape[:-1])
    if rows > MAX_LINEAR_ROWS:
        return f"{rows} rows of x > {MAX_LINEAR_ROWS}: the kernel is for a decode step's few rows"
    return None


def attention(q, k, v, *, causal=False, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False):
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = None
    if return_lse:
        lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
        lse = torch.empty(lse_shape, dtype=torch.float32)
    _module().attention(
        tensor_view(q), tensor_view(k), tensor_view(v), tensor_view(out), tensor_view(lse),
        tensor_view(cu_seqlens_q), tensor_view(cu_seqlens_k), bool(causal), _scale(q, scale),
        torch.get_num_threads(),
    )
    return (out, lse) if return_lse else out


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, return_lse=False):
    q, k_cache, v_cache = _unit_stride(q), _unit_stride(k_cache), _unit_stride(v_cache)
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32) if return_lse else None
    _module().decode_attention(
        tensor_view(q), tensor_view(k_cache), tensor_view(v_cache), tensor_view(cache_seqlens),
        tensor_view(block_table), tensor_view(out), tensor_view(lse), _scale(q, scale),
        torch.get_num_threads(),
    )
    return (out, lse) if return_lse else out


def append_kv(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None) -> None:
    _module().append_kv(
        tensor_view(k_cache), tensor_view(v_cache), tensor_view(k), tensor_view(v),
        tensor_view(cache_seqlens), tensor_view(block_table),
    )


def linear(x, weight):
    # The kernel takes x as (rows, K); a decode step's 2-D x goes as it is (no reshape, no view).
    x_rows = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    x_rows, weight = _unit_stride(x_rows), _unit_stride(weight)
    out = torch.empty((x_rows.shape[0], weight.shape[0]), dtype=x.dtype)
    _module().linear(tensor_view(x_rows), tensor_view(weight), tensor_view(out), torch.get_num_threads())
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])


def filter_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    logits = _unit_stride(logits)
    out = torch.empty(logits.shape, dtype=logits.dtype)
    parameters = reference.filter_parameters(logits.shape[0], "cpu", temperature, top_k, top_p, min_p)
    _module().filter_logits(
        tensor_view(logits), tensor_view(out), *(tensor_view(p) for p in parameters), torch.get_num_threads(),
    )
    return out


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, step=0,
           return_logprobs=False, num_logprobs=0):
    logits = _unit_stride(logits)
    batch = logits.shape[0]
    parameters = reference.filter_parameters(batch, "cpu", temperature, top_k, top_p, min_p)
    seeds = reference.row_seeds(seed, batch, "cpu").contiguous()
    steps = reference.per_row(step, batch, torch.int64, "cpu").contiguous()
    tokens = torch.empty(batch, dtype=torch.int64)
    logprobs = top_ids = top_logprobs = None
    if return_logprobs:
        logprobs = torch.empty(batch, dtype=torch.float32)
        top_ids = torch.empty((batch, num_logprobs), dtype=torch.int64)
        top_logprobs = torch.empty((batch, num_logprobs), dtype=torch.float32)
    _module().sample(
        tensor_view(logits), tensor_view(tokens), *(tensor_view(p) for p in parameters),
        tensor_view(seeds), tensor_view(steps), tensor_view(logprobs), tensor_view(top_ids),
        tensor_view(top_logprobs), torch.get_num_threads(),
    )
    if return_logprobs:
        return reference.SampleOutput(tokens, logprobs, top_ids, top_logprobs)
    return tokens
