"""fmkernels.linear: x @ weight^T, for a decode step's few rows against a weight in memory."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as check
from ._dispatch import into_out, require_backend, run
from .._signature import SignatureCache, check_once
from ._library import call


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
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

    Parameters
    ----------
    x : Tensor (..., K)
        float32, float16 or bfloat16; any leading dimensions, any strides (the ``cpu``
        backend copies x to unit stride along K when it is not).
    weight : Tensor (N, K)
        ``torch.nn.Linear``'s layout, x's dtype and device. Read at unit stride along K by
        the ``cpu`` backend (another layout is copied on every call).
    backend : str
        "auto" or an implementation's name.
    out : Tensor (..., N), optional
        Buffer for the result, x's dtype and device; it is the tensor returned.

    Returns
    -------
    Tensor (..., N), x's dtype.
    """
    key = check_once(_CHECKED, _require_arguments, (x, weight, backend, out))
    return into_out(call(_linear_op, _execute, key, x, weight, backend), out)


# Signatures of calls whose arguments passed ``_require_arguments``.
_CHECKED = SignatureCache()


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


@torch.library.custom_op("fmkernels::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    """x @ weight^T on the implementation the registry selects for the call."""
    return _execute(x, weight, backend)


def _execute(x, weight, backend, key=None) -> torch.Tensor:
    """The custom op's implementation (``key``: the call's signature, see ``_library.call``)."""
    return run("linear", backend, dict(x=x, weight=weight), key).contiguous()


@_linear_op.register_fake
def _(x, weight, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """2 x rows x N x K, as torch counts a matmul."""
    rows = 1
    for size in x_shape[:-1]:
        rows *= size
    return 2 * rows * weight_shape[0] * weight_shape[1]


# torch.utils.flop_counter.FlopCounterMode counts the op like the matmul it is.
try:
    from torch.utils.flop_counter import register_flop_formula
except ImportError:  # pragma: no cover - torch without flop formulas for custom ops
    pass
else:
    register_flop_formula(torch.ops.fmkernels.linear)(_linear_flops)
