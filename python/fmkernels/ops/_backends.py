"""fmkernels' own implementations, registered under the backend names.

reference (PyTorch, any device) < cpu (C++) < triton < cuda, except where OP_PRIORITY
ranks a backend below the one measured faster for that op: ``backend="auto"`` tries them
from the highest priority down.
"""

from __future__ import annotations

import functools
import importlib

from .. import platform, reference, registry
from . import _cpu, _cuda

PRIORITY = {"reference": 0, "cpu": 10, "triton": 20, "cuda": 30}
# Where a backend is not the fastest for an op, it ranks below the one that is. Prefill
# attention on an H100: the Triton kernel (Triton emits wgmma on sm_90) reached 323-415
# TFLOP/s against 212-283 for the CUDA mma.sync kernel (bench/results/nvidia-h100-80gb-hbm3/
# 2026-11-22-cuda_attention_variants.json), so "auto" takes Triton first there.
OP_PRIORITY = {("attention", "cuda"): 15}
if platform.triton_interpreting():
    # The interpreter is for tests: it runs when named, but "auto" prefers even the reference.
    PRIORITY["triton"] = -10


# The Triton launchers: fmkernels.kernels.<module>.<op>, with the reference's signature,
# and optionally <op>_supports, the cases it can run. An op without one registers no triton
# implementation (linear: on a GPU, cuBLAS through the reference is the tool).
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
        if reason is None and name == "cuda" and not hasattr(platform.cuda_module(), op):
            reason = f"fmkernels._cuda was built without {op}; rebuild fmkernels"
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


# The cases the C++ kernels take, where they do not take every valid call.
CPU_SUPPORTS = {
    "attention": _cpu.supports_head_dim,
    "decode_attention": _cpu.supports_head_dim,
    "linear": _cpu.supports_linear_rows,
}


def _register(op: str, name: str, fn, devices, supports=None) -> None:
    registry.register_impl(
        op, name, fn, supports,
        available=_availability(name, op), devices=devices, kind="backend",
        priority=OP_PRIORITY.get((op, name), PRIORITY[name]),
    )


def register_all() -> None:
    for op in registry.OPS:
        _register(op, "reference", getattr(reference, op), devices=None)
    for op in registry.OPS:
        _register(op, "cpu", getattr(_cpu, op), devices=("cpu",), supports=CPU_SUPPORTS.get(op))
    for op in registry.OPS:
        if hasattr(_cuda, op):
            _register(op, "cuda", getattr(_cuda, op), devices=("cuda",), supports=getattr(_cuda, f"{op}_supports", None))
    triton_devices = ("cuda", "cpu") if platform.triton_interpreting() else ("cuda",)
    for op in TRITON_MODULES:
        launch, supports = _triton(op)
        _register(op, "triton", launch, devices=triton_devices, supports=supports)
