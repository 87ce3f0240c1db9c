"""fmkernels.backends(): which backends run here and why not; importing never raises."""

import ctypes
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import fmkernels
from fmkernels import platform


def _gpu_present() -> bool:
    if torch.cuda.is_available():
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def test_backends_lists_every_backend_with_a_reason():
    statuses = fmkernels.backends()
    assert list(statuses) == ["reference", "cpu", "triton", "cuda"]
    for name, status in statuses.items():
        assert isinstance(status, fmkernels.BackendStatus)
        assert status.name == name
        assert isinstance(status.available, bool)
        assert isinstance(status.reason, str) and status.reason
        assert str(status).startswith(f"{name}: {'available' if status.available else 'unavailable'} (")


def test_reference_and_cpu_are_available():
    statuses = fmkernels.backends()
    assert statuses["reference"].available
    assert statuses["cpu"].available, statuses["cpu"].reason
    assert "C++" in statuses["cpu"].reason
    assert platform.unavailable_reason("reference") is None
    assert platform.unavailable_reason("cpu") is None


@pytest.mark.skipif(_gpu_present(), reason="this machine has a GPU driver")
def test_cuda_is_unavailable_without_a_gpu_and_says_why():
    status = fmkernels.backends()["cuda"]
    assert not status.available
    if platform.cuda_module() is None:
        assert status.reason.startswith("not built")
    else:
        assert "no GPU" in status.reason or "driver" in status.reason, status.reason
    assert platform.unavailable_reason("cuda") == status.reason


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_status_follows_the_interpreter():
    status = fmkernels.backends()["triton"]
    if platform.triton_interpreting():
        assert status.available and "interpreter" in status.reason
    elif not torch.cuda.is_available():
        assert not status.available and "no GPU" in status.reason


def test_unknown_backend_status_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of reference, cpu, triton, cuda, got 'tpu'"):
        platform.backend_status("tpu")


def test_cuda_module_imports_without_a_gpu():
    cuda = pytest.importorskip("fmkernels._cuda", reason="fmkernels._cuda not built (no nvcc at build time)")
    status = cuda.device_status()
    assert isinstance(status, tuple) and len(status) == 2
    count, error = status
    assert isinstance(count, int) and isinstance(error, str)
    assert cuda.runtime_version() > 0
    if not _gpu_present():
        assert count == 0 and error.startswith("cudaError")


@pytest.mark.skipif(_gpu_present(), reason="this machine has a GPU driver")
def test_cuda_kernel_call_without_a_gpu_raises_a_clear_error():
    # Well-formed views pass the host checks; the launch then fails in the CUDA runtime, which must
    # surface as an exception, not a crash. Nothing reaches memory: there is no device to run on.
    cuda = pytest.importorskip("fmkernels._cuda", reason="fmkernels._cuda not built")
    from fmkernels._views import tensor_view

    torch.manual_seed(0)
    cache = torch.randn(2, 4, 1, 8)
    new = torch.randn(2, 1, 1, 8)
    seqlens = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"fmkernels.append_kv \(cuda\): cudaError"):
        cuda.append_kv(*(tensor_view(t) for t in (cache, cache.clone(), new, new.clone(), seqlens)), None, 0)


def test_triton_kernels_are_importable_from_the_installed_package():
    pytest.importorskip("triton")
    module = importlib.import_module("fmkernels.kernels.append_kv")
    assert callable(module.append_kv)
    assert module.__name__ == "fmkernels.kernels.append_kv"


# Fresh interpreters: import-time behaviour cannot be observed from this one, where fmkernels
# is already imported and TRITON_INTERPRET is set.
_REPORT = """
import json, sys
for blocked in sys.argv[1:]:
    sys.modules[blocked] = None  # makes `import blocked` raise ImportError
import fmkernels, torch
statuses = {name: [s.available, s.reason] for name, s in fmkernels.backends().items()}
errors = {}
k_cache = torch.randn(2, 4, 1, 8)
for backend in ("cpu", "triton"):
    try:
        fmkernels.append_kv(k_cache, k_cache.clone(), torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8),
                            torch.tensor([0, 3], dtype=torch.int32), backend=backend)
    except ValueError as exc:
        errors[backend] = str(exc)
fmkernels.append_kv(k_cache, k_cache.clone(), torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8),
                    torch.tensor([0, 3], dtype=torch.int32))
print(json.dumps({"statuses": statuses, "errors": errors}))
"""


def _report(*blocked):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _REPORT, *blocked], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_gpu_present(), reason="checks the no-GPU statuses")
def test_import_without_gpu_or_interpreter_names_each_missing_piece():
    report = _report()
    assert report["statuses"]["reference"] == [True, "PyTorch, fp32 math, any device"]
    assert report["statuses"]["cpu"][0]
    if importlib.util.find_spec("triton") is not None:
        assert report["statuses"]["triton"][0] is False and "no GPU" in report["statuses"]["triton"][1]
        # Without the interpreter, Triton cannot take CPU tensors: named explicitly, it refuses.
        assert report["errors"]["triton"].startswith("backend 'triton' cannot run this append_kv call")
    assert "cpu" not in report["errors"]


def test_import_with_nothing_compiled_and_no_triton_still_works():
    report = _report("triton", "fmkernels._C", "fmkernels._cuda")
    statuses = report["statuses"]
    assert statuses["reference"][0]
    assert statuses["cpu"] == [False, statuses["cpu"][1]] and statuses["cpu"][1].startswith("not built")
    assert statuses["cuda"] == [False, statuses["cuda"][1]] and statuses["cuda"][1].startswith("not built")
    assert statuses["triton"] == [False, "triton missing"]
    # Named backends that cannot run say so; "auto" (the script's last call) ran on the reference.
    assert report["errors"]["cpu"] == (
        f"backend 'cpu' cannot run this append_kv call: not available: {statuses['cpu'][1]}")
    assert "not available: triton missing" in report["errors"]["triton"]
