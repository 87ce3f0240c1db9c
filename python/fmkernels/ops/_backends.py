"""fmkernels' own implementations, registered under the backend names.

reference (PyTorch, any device) < cpu (C++) < triton < cuda: ``backend="auto"`` tries
them from the highest priority down.
"""

from __future__ import annotations

import functools
import importlib

import torch

from .. import platform, reference, registry
from .._views import tensor_view
from . import _cpu

PRIORITY = {"reference": 0, "cpu": 10, "triton": 20, "cuda": 30}
if platform.triton_interpreting():
    # The interpreter is for tests: it runs when named, but "auto" prefers even the reference.
    PRIORITY["triton"] = -10


# The Triton launchers: fmkernels.kernels.<module>.<op>, with the reference's signature,
# and optionally <op>_supports, the cases it can run.
TRITON_MODULES = {
    "attention": "attention",
    "decode_attention": "decode_attention",
    "append_kv": "append_kv",
    "filter_logits": "sampling",
    "sample": "sampling",
}


@functools.lru_cache(maxsize=None)
def _triton_module(op: str):
    """The kernels module of ``op`` (importing it defines its Triton kernels), or None."""
    try:
        return importlib.import_module(f"fmkernels.kernels.{TRITON_MODULES[op]}")
    except ImportError:
        return None


def _availability(name: str, op: str):
    def unavailable_reason():
        reason = platform.unavailable_reason(name)
        if reason is None and name == "cpu" and not hasattr(platform.cpu_module(), op):
            reason = f"fmkernels._C was built without {op}; rebuild fmkernels"
        if reason is None and name == "triton" and not hasattr(_triton_module(op), op):
            reason = f"fmkernels.kernels.{TRITON_MODULES[op]} has no {op}"
        return reason

    return unavailable_reason


def _triton(op: str):
    """(launcher, supports) calling into the kernels module only when used."""

    def launch(**kwargs):
        return getattr(_triton_module(op), op)(**kwargs)

    def supports(**kwargs):
        check = getattr(_triton_module(op), f"{op}_supports", None)
        return None if check is None else check(**kwargs)

    return launch, supports


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


def register_all() -> None:
    for op in registry.OPS:
        _register(op, "reference", getattr(reference, op), devices=None)
    for op in registry.OPS:
        supports = _cpu.supports_head_dim if op in ("attention", "decode_attention") else None
        _register(op, "cpu", getattr(_cpu, op), devices=("cpu",), supports=supports)
    _register("append_kv", "cuda", _append_kv_cuda, devices=("cuda",))
    triton_devices = ("cuda", "cpu") if platform.triton_interpreting() else ("cuda",)
    for op in registry.OPS:
        launch, supports = _triton(op)
        _register(op, "triton", launch, devices=triton_devices, supports=supports)
