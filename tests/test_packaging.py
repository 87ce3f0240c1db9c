"""The CUDA extension builds wherever a toolkit is and imports without a GPU. (The wheel's contents and
a clean install of it: ``.ci/wheel-check``, which CI runs after the tests.)"""

import os
import shutil

import pytest


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDACXX"), reason="no CUDA compiler here")
def test_cuda_extension_is_built_and_imports_without_a_gpu():
    # With a toolkit present, FMKERNELS_CUDA=AUTO must build fmkernels._cuda, and the
    # statically linked runtime must let it import whether or not a GPU is present.
    import fmkernels._cuda as cuda_module

    count, error = cuda_module.device_status()
    assert isinstance(count, int) and isinstance(error, str)
    assert cuda_module.runtime_version() >= 11000
