"""fmkernels.linear: x @ weight^T, for a decode step's few rows against a weight in memory."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _validation as check
from ..quantized import QuantizedWeight
from ._dispatch import into_out, require_backend, run
from .._signature import SignatureCache, check_once
from ._library import call


def linear(
    x: torch.Tensor,
    weight: Union[torch.Tensor, QuantizedWeight],
    *,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x @ weight^T, as ``torch.nn.functional.linear`` without a bias, accumulated in fp32.

    out[..., n] = sum_k x[..., k] * weight[n, k]. The rows of x are its leading dimensions
    flattened (a decode step: batch x new tokens). The ``cpu`` backend is for skinny x, at
    most 16 rows: it reads each weight element once for all rows, so its time is the
    weight's bytes over the memory bandwidth. Above 16 rows ``auto`` runs the reference,
    which upcasts to fp32; for a prefill, torch's own matmul in the input dtype
    (``torch.nn.functional.linear``, the ``torch_linear`` peer) is the faster call.

    A ``fmkernels.QuantizedWeight`` (GGUF's q8_0, q4_0, q4_1, q4_k, q6_k blocks) stands in
    for the float weight on every backend: the reference dequantizes it and multiplies in
    fp32; the ``cpu`` backend reads the blocks as they are, quantizing each block of 32 of x
    to int8 as llama.cpp does (the error bound is in DESIGN.md), at any number of rows (above
    16 it dequantizes the weight and multiplies in fp32); ``triton`` and ``cuda`` dequantize
    in registers (fp32 accumulation, 1-64 rows). An implementation a user registers gets the
    QuantizedWeight as ``weight`` and declines it through its ``supports`` if it must.

    Parameters
    ----------
    x : Tensor (..., K)
        float32, float16 or bfloat16; any leading dimensions, any strides (the ``cpu``
        backend copies x to unit stride along K when it is not).
    weight : Tensor (N, K) or QuantizedWeight (N, K)
        ``torch.nn.Linear``'s layout, x's dtype and device. Read at unit stride along K by
        the ``cpu`` backend (another layout is copied on every call). A QuantizedWeight is on
        x's device, of any dtype of x.
    backend : str
        "auto" or an implementation's name.
    out : Tensor (..., N), optional
        Buffer for the result, x's dtype and device; it is the tensor returned.

    Returns
    -------
    Tensor (..., N), x's dtype.
    """
    if isinstance(weight, QuantizedWeight):
        key = check_once(_CHECKED_QUANTIZED, _require_quantized,
                         (x, weight.blocks, weight.format, weight.shape[1], backend, out))
        return into_out(call(_linear_op, _execute, key, x, weight, backend, schema=_quantized_schema), out)
    key = check_once(_CHECKED, _require_arguments, (x, weight, backend, out))
    return into_out(call(_linear_op, _execute, key, x, weight, backend), out)


# Signatures of calls whose arguments passed ``_require_arguments`` (``_require_quantized``).
_CHECKED = SignatureCache()
_CHECKED_QUANTIZED = SignatureCache()


def _require_arguments(x, weight, backend, out) -> None:
    """linear's checks of what its arguments' metadata says."""
    check.require_tensor("x", x)
    check.require_tensor("weight", weight)
    check.require_dtype("x", x, check.FLOAT_DTYPES)
    check.require_same_dtype(("x", "weight"), (x, weight))
    check.require_same_device(("x", "weight"), (x, weight))
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (..., K), got a 0-D tensor")
    check.require_rank("weight", weight, 2, "(N, K)")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must have x's K = {x.shape[-1]} columns (N, K), got shape {tuple(weight.shape)}"
        )
    check.require_out(out, (*x.shape[:-1], weight.shape[0]), x.dtype, x.device)
    require_backend(backend)


def _require_quantized(x, blocks, format, k, backend, out) -> None:
    """linear's checks for a QuantizedWeight (which checked its own blocks when it was made)."""
    check.require_tensor("x", x)
    check.require_dtype("x", x, check.FLOAT_DTYPES)
    if x.device != blocks.device:
        raise ValueError(f"weight must be on x's device ({x.device}), got a QuantizedWeight on {blocks.device}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (..., K), got a 0-D tensor")
    if k != x.shape[-1]:
        raise ValueError(
            f"weight must have x's K = {x.shape[-1]} columns (N, K), got a {format} weight of shape "
            f"({blocks.shape[0]}, {k})")
    check.require_out(out, (*x.shape[:-1], blocks.shape[0]), x.dtype, x.device)
    require_backend(backend)


def _quantized_schema(x, weight, backend):
    """The custom op's arguments for a QuantizedWeight: its blocks and its format."""
    return x, weight.blocks, backend, weight.format


@torch.library.custom_op("fmkernels::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, backend: str, format: Optional[str] = None) -> torch.Tensor:
    """x @ weight^T on the implementation the registry selects for the call; with ``format``,
    ``weight`` is a QuantizedWeight's blocks (N, row bytes) of that format."""
    if format is not None:
        weight = QuantizedWeight(weight, format, (weight.shape[0], x.shape[-1]))
    return _execute(x, weight, backend)


def _execute(x, weight, backend, key=None) -> torch.Tensor:
    """The custom op's implementation (``key``: the call's signature, see ``_library.call``)."""
    return run("linear", backend, dict(x=x, weight=weight), key).contiguous()


@_linear_op.register_fake
def _(x, weight, backend, format=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """2 x rows x N x K, as torch counts a matmul (K is x's: a quantized weight's blocks
    are bytes)."""
    rows = 1
    for size in x_shape[:-1]:
        rows *= size
    return 2 * rows * weight_shape[0] * x_shape[-1]


# torch.utils.flop_counter.FlopCounterMode counts the op like the matmul it is.
try:
    from torch.utils.flop_counter import register_flop_formula
except ImportError:  # pragma: no cover - torch without flop formulas for custom ops
    pass
else:
    register_flop_formula(torch.ops.fmkernels.linear)(_linear_flops)
