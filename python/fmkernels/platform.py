"""Which backends can run here, and why not. Nothing in this module raises at import."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib
import os
from typing import Dict, Optional

BACKENDS = ("reference", "cpu", "triton", "cuda")

# cudaGetDeviceCount's errors, in words a user can act on.
_CUDA_ERRORS = {
    "cudaErrorNoDevice": "no GPU",
    "cudaErrorInsufficientDriver": "driver too old for the CUDA runtime fmkernels was built with",
    "cudaErrorCompatNotSupportedOnDevice": "driver too old for the CUDA runtime fmkernels was built with",
    "cudaErrorInitializationError": "CUDA driver failed to initialise",
}


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on when it is available

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


def _import(module: str):
    """(module, None) or (None, reason)."""
    try:
        return importlib.import_module(module), None
    except ImportError as exc:
        return None, f"{module} not importable: {exc}"


@functools.lru_cache(maxsize=None)
def cpu_module():
    """fmkernels._C, or None."""
    return _import("fmkernels._C")[0]


@functools.lru_cache(maxsize=None)
def cuda_module():
    """fmkernels._cuda, or None."""
    return _import("fmkernels._cuda")[0]


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _cpu_status() -> BackendStatus:
    module, reason = _import("fmkernels._C")
    if module is None:
        return BackendStatus("cpu", False, f"not built ({reason})")
    threads = "OpenMP" if getattr(module, "openmp", False) else "one thread"
    return BackendStatus("cpu", True, f"C++ kernels, {threads}")


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _cuda_status() -> BackendStatus:
    module, reason = _import("fmkernels._cuda")
    if module is None:
        return BackendStatus("cuda", False, f"not built ({reason})")
    if not _driver_present():
        return BackendStatus("cuda", False, "no GPU (no NVIDIA driver: libcuda.so.1 not found)")
    count, error = module.device_status()
    if error:
        return BackendStatus("cuda", False, _CUDA_ERRORS.get(error, f"CUDA runtime error {error}"))
    if count == 0:
        return BackendStatus("cuda", False, "no GPU")
    return BackendStatus("cuda", True, f"{count} GPU(s), CUDA runtime {module.runtime_version()}")


@functools.lru_cache(maxsize=None)
def _triton_status() -> BackendStatus:
    triton, reason = _import("triton")
    if triton is None:
        return BackendStatus("triton", False, "triton missing")
    if triton_interpreting():
        return BackendStatus("triton", True, f"triton {triton.__version__}, interpreter on the CPU (TRITON_INTERPRET=1)")
    import torch

    if not torch.cuda.is_available():
        return BackendStatus("triton", False, f"triton {triton.__version__} installed, but no GPU")
    return BackendStatus("triton", True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")


def backend_status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus("reference", True, "PyTorch, fp32 math, any device")
    if name == "cpu":
        return _cpu_status()
    if name == "cuda":
        return _cuda_status()
    if name == "triton":
        return _triton_status()
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")


def backends() -> Dict[str, BackendStatus]:
    """Each backend, whether it can run on this machine, and why not."""
    return {name: backend_status(name) for name in BACKENDS}


def unavailable_reason(name: str) -> Optional[str]:
    status = backend_status(name)
    return None if status.available else status.reason
