"""The wheel carries the compiled CPU module and the Triton kernels (``kernels/`` -> ``fmkernels/kernels``)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build_tools_present() -> bool:
    try:
        import pybind11  # noqa: F401
        import scikit_build_core  # noqa: F401
    except ImportError:
        return False
    return shutil.which("cmake") is not None


@pytest.mark.skipif(not _build_tools_present(), reason="needs scikit-build-core, pybind11 and cmake")
def test_wheel_contains_extension_and_triton_kernels(tmp_path):
    # Build from a copy so the wheel's build directory does not touch the editable install's.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv*", "build", ".git", ".gpu-wheel", "gpu-out", "__pycache__", "*.so"))
    env = dict(os.environ, FMKERNELS_CUDA="OFF")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)],
        check=True, env=env, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("fmkernels-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fmkernels/kernels/append_kv.py" in names
    assert "fmkernels/reference.py" in names
    assert "fmkernels/ops/attention.py" in names
    assert any(n.startswith("fmkernels/_C.") and n.endswith(".so") for n in names)
    assert not any(n.startswith("kernels/") for n in names), "Triton kernels must live under fmkernels/"


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDACXX"), reason="no CUDA compiler here")
def test_cuda_extension_is_built_and_imports_without_a_gpu():
    # With a toolkit present, FMKERNELS_CUDA=AUTO must build fmkernels._cuda, and the
    # statically linked runtime must let it import whether or not a GPU is present.
    import fmkernels._cuda as cuda_module

    count, error = cuda_module.device_status()
    assert isinstance(count, int) and isinstance(error, str)
    assert cuda_module.runtime_version() >= 11000
