"""The ``cpu`` backend: fmkernels._C's C++ kernels on CPU tensors.

Each function takes the reference's arguments (already validated by the public op),
allocates the outputs, and hands the kernels tensor views. Kernels use
``torch.get_num_threads()`` OpenMP threads, so ``torch.set_num_threads`` governs both;
in a child made by ``os.fork``, one (see ``_after_fork_in_child``).
"""

from __future__ import annotations

import math
import os

import numpy
import torch

from .. import platform, reference
from .._views import tensor_view
from ..quantized import QuantizedWeight

#: The largest head_dim the C++ attention kernels accept.
MAX_HEAD_DIM = 256

#: The most rows of x the C++ linear kernel takes: it keeps them all in registers and cache
#: while it streams the weight once; for more rows (prefill) torch's matmul is faster.
MAX_LINEAR_ROWS = 16


def _module():
    return platform.cpu_module()


# OpenMP's thread pool does not survive os.fork: in the child, the first parallel region of
# more than one thread waits for the parent's threads, which are not there, and never returns
# (torch's own CPU ops hang the same way). Whether the parent's pool has started cannot be
# asked, so every forked child runs on one thread.
_forked_child = False


def _after_fork_in_child() -> None:
    """Runs in the child of every os.fork (multiprocessing's "fork" start method included):
    torch's ops go single-threaded, and the kernels here stay on one thread in this process
    whatever torch is set to later (more than one there would hang)."""
    global _forked_child
    _forked_child = True
    torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _threads() -> int:
    """The kernels' OpenMP threads: torch's setting, or one in a forked child."""
    return 1 if _forked_child else torch.get_num_threads()


def _unit_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of head_dim (or vocab) elements at unit stride."""
    if tensor.stride(-1) == 1:
        return tensor
    if tensor.is_contiguous():  # empty, or a last dimension of one: contiguous() keeps its strides
        return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)
    return tensor.contiguous()


def _empty_like(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous output shaped and typed like ``tensor`` (``empty_like``, the cheaper
    allocation, where that is contiguous)."""
    return torch.empty_like(tensor) if tensor.is_contiguous() else torch.empty(tensor.shape, dtype=tensor.dtype)


def _scale(q: torch.Tensor, scale) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def supports_head_dim(q, **_) -> str | None:
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return None


def supports_linear_rows(x, weight=None, **_) -> str | None:
    # A quantized weight takes every row count: past MAX_LINEAR_ROWS it is dequantized for a matmul.
    rows = math.prod(x.shape[:-1])
    if rows > MAX_LINEAR_ROWS and not isinstance(weight, QuantizedWeight):
        return f"{rows} rows of x > {MAX_LINEAR_ROWS}: the kernel is for a decode step's few rows"
    return None


def attention(q, k, v, *, causal=False, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False):
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    out = _empty_like(q)
    lse = None
    if return_lse:
        lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
        lse = torch.empty(lse_shape, dtype=torch.float32)
    _module().attention(
        tensor_view(q), tensor_view(k), tensor_view(v), tensor_view(out), tensor_view(lse),
        tensor_view(cu_seqlens_q), tensor_view(cu_seqlens_k), bool(causal), _scale(q, scale),
        _threads(),
    )
    return (out, lse) if return_lse else out


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, return_lse=False):
    q, k_cache, v_cache = _unit_stride(q), _unit_stride(k_cache), _unit_stride(v_cache)
    out = _empty_like(q)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32) if return_lse else None
    _module().decode_attention(
        tensor_view(q), tensor_view(k_cache), tensor_view(v_cache), tensor_view(cache_seqlens),
        tensor_view(block_table), tensor_view(out), tensor_view(lse), _scale(q, scale),
        _threads(),
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
    if isinstance(weight, QuantizedWeight):
        out = _linear_quantized(_unit_stride(x_rows), weight)
    else:
        x_rows, weight = _unit_stride(x_rows), _unit_stride(weight)
        out = torch.empty((x_rows.shape[0], weight.shape[0]), dtype=x.dtype)
        _module().linear(tensor_view(x_rows), tensor_view(weight), tensor_view(out), _threads())
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The weight (N, K) as float32, by the C++ dequantization (the reference's fp32 operations,
    bit for bit)."""
    out = torch.empty(tuple(weight.shape), dtype=torch.float32)
    _module().dequantize(tensor_view(weight.blocks), weight.block_format.ggml_type, tensor_view(out), _threads())
    return out


def _linear_quantized(x_rows: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x_rows (rows, K) @ weight^T: the int8 kernel for a decode step's few rows; for more
    (prefill), the weight dequantized to fp32 once and torch's matmul, in fp32."""
    if x_rows.shape[0] > MAX_LINEAR_ROWS:
        return torch.matmul(x_rows.float(), dequantize(weight).T).to(x_rows.dtype)
    out = torch.empty((x_rows.shape[0], weight.shape[0]), dtype=x_rows.dtype)
    _module().linear_quantized(tensor_view(x_rows), tensor_view(weight.blocks), weight.block_format.ggml_type,
                               tensor_view(out), _threads())
    return out


# Per-row parameter tensors made from scalars, with their views, by (value, batch, dtype): a
# decode loop passes the same temperature, top_k, top_p and min_p at every step. The kernels
# only read them; the map forgets everything when full.
_SCALAR_ROWS: dict = {}
_SCALAR_ROWS_CAPACITY = 256


def _row_view(value, batch: int, dtype: torch.dtype, keep: list):
    """The view of a per-row parameter (a scalar or a (batch,) tensor) as a contiguous (batch,)
    tensor of ``dtype``. The tensor behind it is appended to ``keep``, which the caller holds
    until the kernel returns."""
    if isinstance(value, torch.Tensor):
        rows = value.to(dtype=dtype).contiguous()
        keep.append(rows)
        return tensor_view(rows)
    key = (value, batch, dtype)
    entry = _SCALAR_ROWS.get(key)
    if entry is None:
        if len(_SCALAR_ROWS) >= _SCALAR_ROWS_CAPACITY:
            _SCALAR_ROWS.clear()
        rows = torch.full((batch,), value, dtype=dtype)
        entry = _SCALAR_ROWS[key] = (rows, tensor_view(rows))
    keep.append(entry[0])
    return entry[1]


def _row_seeds(seed, batch: int) -> torch.Tensor:
    """``reference.row_seeds`` as a contiguous int64 tensor, made on the host by NumPy (the
    cheapest way to a small tensor)."""
    if isinstance(seed, torch.Tensor):
        return seed.to(torch.int64).contiguous()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    # seed + batch - 1 < 2**63 (the public op checks it): int64 all the way.
    return torch.from_numpy(numpy.arange(seed, seed + batch, dtype=numpy.int64))


def _filter_views(batch: int, temperature, top_k, top_p, min_p, keep: list):
    """The kernels' (temperature, top_k, top_p, min_p) rows: float32, int64, float32, float32."""
    return (_row_view(temperature, batch, torch.float32, keep), _row_view(top_k, batch, torch.int64, keep),
            _row_view(top_p, batch, torch.float32, keep), _row_view(min_p, batch, torch.float32, keep))


def filter_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, allowed=None):
    logits = _unit_stride(logits)
    out = _empty_like(logits)
    keep = []
    parameters = _filter_views(logits.shape[0], temperature, top_k, top_p, min_p, keep)
    allowed = None if allowed is None else _unit_stride(allowed)
    _module().filter_logits(tensor_view(logits), tensor_view(out), *parameters, tensor_view(allowed), _threads())
    return out


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, step=0,
           return_logprobs=False, num_logprobs=0, allowed=None):
    logits = _unit_stride(logits)
    allowed = None if allowed is None else _unit_stride(allowed)
    batch = logits.shape[0]
    keep = []
    parameters = _filter_views(batch, temperature, top_k, top_p, min_p, keep)
    seeds = _row_seeds(seed, batch)
    steps = reference.per_row(step, batch, torch.int64, "cpu").contiguous()
    tokens = torch.empty(batch, dtype=torch.int64)
    logprobs = top_ids = top_logprobs = None
    if return_logprobs:
        logprobs = torch.empty(batch, dtype=torch.float32)
        top_ids = torch.empty((batch, num_logprobs), dtype=torch.int64)
        top_logprobs = torch.empty((batch, num_logprobs), dtype=torch.float32)
    _module().sample(
        tensor_view(logits), tensor_view(tokens), *parameters, tensor_view(seeds), tensor_view(steps),
        tensor_view(allowed), tensor_view(logprobs), tensor_view(top_ids), tensor_view(top_logprobs), _threads(),
    )
    if return_logprobs:
        return reference.SampleOutput(tokens, logprobs, top_ids, top_logprobs)
    return tokens
