"""Triton kernels, installed as ``fmkernels.kernels``.

Each op follows one naming pattern: ``_<op>_kernel`` is the ``@triton.jit`` body,
``<op>()`` the launcher (shapes, strides, grid). The launchers take validated
tensors; the public ops in ``fmkernels.ops`` validate.
"""
