"""fmkernels' own implementations, registered under the backend names.

reference (PyTorch, any device) < cpu (C++) < triton < cuda, except where OP_PRIORITY
ranks a backend below the one measured faster for that op: ``backend="auto"`` tries them
from the highest priority down, skipping the implementations NAMED_ONLY lists.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

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
# and optionally <op>_supports, the cases it can run. linear's (kernels/linear.py) takes
# GGUF-quantized weights only: for a float weight, cuBLAS through the reference is the tool.
TRITON_MODULES = {
    "attention": "attention",
    "decode_attention": "decode_attention",
    "append_kv": "append_kv",
    "filter_logits": "sampling",
    "sample": "sampling",
    "linear": "linear",
}

# Further Triton implementations of an op, each under its own backend name beside "triton"
# (listed next to it, and needing what it needs): (op, name) -> kernels module.
TRITON_VARIANTS = {
    # kernels/attention_hopper.py: tensor descriptors (TMA) and a warp-specialised key loop, sm_90/sm_100
    ("attention", "triton_hopper"): "attention_hopper",
}

# Implementations that "auto" never picks, and why: each runs only when named. An entry
# leaves once the implementation has passed its GPU tests and won its benchmark on a GPU
# (then OP_PRIORITY places it).
NAMED_ONLY = {
    ("attention", "triton_hopper"): (
        "not yet run on a GPU: it waits for its gpu tests and a bench/cuda_attention_variants.py "
        "run against triton and sdpa_flash"
    ),
    # kernels/linear.py and csrc/cuda/linear_quantized.cu: GGUF-quantized weights.
    ("linear", "triton"): "not yet run on a GPU: it waits for its gpu tests and a bench run",
    ("linear", "cuda"): "not yet run on a GPU: it waits for its gpu tests and a bench run",
}

# fmkernels._cuda's function for an op, where it is not named as the op.
CUDA_FUNCTIONS = {"linear": "linear_quantized"}


@functools.lru_cache(maxsize=None)
def _kernels_module(module: str):
    """fmkernels.kernels.<module> (importing it defines its Triton kernels), or None."""
    try:
        return importlib.import_module(f"fmkernels.kernels.{module}")
    except ImportError:
        return None


def _platform_backend(name: str) -> str:
    """The backend whose availability ``name``'s is: a Triton variant's is Triton's."""
    return "triton" if any(variant == name for _, variant in TRITON_VARIANTS) else name


def _availability(name: str, op: str, module: Optional[str] = None):
    def unavailable_reason():
        reason = platform.unavailable_reason(_platform_backend(name))
        if reason is None and name == "cpu" and not hasattr(platform.cpu_module(), op):
            reason = f"fmkernels._C was built without {op}; rebuild fmkernels"
        if reason is None and name == "cuda" and not hasattr(platform.cuda_module(), CUDA_FUNCTIONS.get(op, op)):
            reason = f"fmkernels._cuda was built without {op}; rebuild fmkernels"
        if reason is None and module is not None and not hasattr(_kernels_module(module), op):
            reason = f"fmkernels.kernels.{module} has no {op}"
        return reason

    return unavailable_reason


def _triton(op: str, module: str):
    """(launcher, supports) calling into fmkernels.kernels.<module> only when used."""

    def launch(**kwargs):
        return getattr(_kernels_module(module), op)(**kwargs)

    def supports(**kwargs):
        check = getattr(_kernels_module(module), f"{op}_supports", None)
        return None if check is None else check(**kwargs)

    return launch, supports


# The cases the C++ kernels take, where they do not take every valid call.
CPU_SUPPORTS = {
    "attention": _cpu.supports_head_dim,
    "decode_attention": _cpu.supports_head_dim,
    "linear": _cpu.supports_linear_rows,
}


def _register(op: str, name: str, fn, devices, supports=None, module=None) -> None:
    family = _platform_backend(name)
    registry.register_impl(
        op, name, fn, supports,
        available=_availability(name, op, module), devices=devices, kind="backend",
        priority=OP_PRIORITY.get((op, name), PRIORITY[family]), named_only=NAMED_ONLY.get((op, name)),
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
    for op, module in TRITON_MODULES.items():
        launch, supports = _triton(op, module)
        _register(op, "triton", launch, devices=triton_devices, supports=supports, module=module)
    for (op, name), module in TRITON_VARIANTS.items():
        launch, supports = _triton(op, module)
        _register(op, name, launch, devices=triton_devices, supports=supports, module=module)
