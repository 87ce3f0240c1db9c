"""Tensor views for the compiled kernels: (data_ptr, dtype_code, sizes, strides).

The C++ and CUDA kernels never see a torch object (csrc/common/tensor_view.h), so one
build works with any torch version. Codes match ``fmkernels::DType``.
"""

from __future__ import annotations

import torch

DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.uint8: 5,
}


def tensor_view(tensor: torch.Tensor | None):
    """The description a binding turns into a ``TensorView``; ``None`` stays ``None``."""
    if tensor is None:
        return None
    # torch.Size is a tuple, and stride() returns one: the binding takes both as they are.
    return (tensor.data_ptr(), DTYPE_CODES[tensor.dtype], tensor.shape, tensor.stride())
