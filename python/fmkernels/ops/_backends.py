"""fmkernels' own implementations, registered under the backend names.

reference (PyTorch, any device) < cpu (C++) < triton < cuda: ``backend="auto"`` tries
them from the highest priority down.
"""

from __future__ import annotations

import torch

from .. import platform, reference, registry
from .._views import tensor_view
from . import _cpu

PRIORITY = {"reference": 0, "cpu": 10, "triton": 20, "cuda": 30}
if platform.triton_interpreting():
    # The interpreter is for tests: it runs when named, but "auto" prefers even the reference.
    PRIORITY["triton"] = -10


def _availability(name: str, op: str):
    def unavailable_reason():
        reason = platform.unavailable_reason(name)
        if reason is None and name == "cpu" and not hasattr(platform.cpu_module(), op):
            reason = f"fmkernels._C was built without {op}; rebuild fmkernels"
        return reason

    return unavailable_reason


def _register(op: str, name: str, fn, devices, supports=None) -> None:
    registry.register_impl(
        op, name, fn, supports,
        available=_availability(name, op), devices=devices, kind="backend", priority=PRIORITY[name],
    )


def _append_kv_cuda(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None) -> None:
    with torch.cuda.device(k_cache.device):
        stream = torch.cuda.current_stream(k_cache.device).cuda_stream
        platform.cuda_module().append_kv(
            tensor_view(k_cache), tensor_view(v_cache), tensor_view(k), tensor_view(v),
            tensor_view(cache_seqlens), tensor_view(block_table), stream,
        )


def _append_kv_triton(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None) -> None:
    from ..kernels.append_kv import append_kv

    append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table=block_table)


def register_all() -> None:
    for op in registry.OPS:
        _register(op, "reference", getattr(reference, op), devices=None)
    for op in registry.OPS:
        supports = _cpu.supports_head_dim if op in ("attention", "decode_attention") else None
        _register(op, "cpu", getattr(_cpu, op), devices=("cpu",), supports=supports)
    _register("append_kv", "cuda", _append_kv_cuda, devices=("cuda",))
    triton_devices = ("cuda", "cpu") if platform.triton_interpreting() else ("cuda",)
    _register("append_kv", "triton", _append_kv_triton, devices=triton_devices)
