"""Input checks shared by the public ops.

Every message names the argument, what was expected and what came, and every
check runs before any kernel is launched.
"""

from __future__ import annotations

import contextlib
import math
import os
import numbers
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shown(value) -> str:
    """A value as an error message names it: a tensor by dtype and shape, anything else by repr."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    return repr(value)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_dtype(name: str, tensor: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if tensor.dtype not in allowed:
        raise TypeError(
            f"{name} must have dtype {_dtype_names(allowed)}, got {str(tensor.dtype).replace('torch.', '')}"
        )


def require_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0].dtype
    for name, tensor in zip(names[1:], tensors[1:]):
        if tensor.dtype != first:
            raise TypeError(
                f"{name} must have the same dtype as {names[0]} ({str(first).replace('torch.', '')}), "
                f"got {str(tensor.dtype).replace('torch.', '')}"
            )


def require_rank(name: str, tensor: torch.Tensor, rank: int, layout: str) -> None:
    if tensor.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(tensor.shape)}")


def require_shape(name: str, tensor: torch.Tensor, shape: Sequence[int], layout: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} {layout}, got {tuple(tensor.shape)}")


def require_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor | None]) -> None:
    pairs = [(n, t) for n, t in zip(names, tensors) if t is not None]
    first_name, first = pairs[0]
    for name, tensor in pairs[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} must be on the same device as {first_name} ({first.device}), got {tensor.device}"
            )


def require_index_tensor(name: str, tensor, shape: Sequence[int], layout: str) -> torch.Tensor:
    """An int32 tensor of an exact shape, such as cache_seqlens or block_table."""
    require_tensor(name, tensor)
    require_dtype(name, tensor, (torch.int32,))
    require_shape(name, tensor, shape, layout)
    return tensor


def require_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def require_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def require_out(out, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
    if out is None:
        return
    require_tensor("out", out)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(
            f"out must have dtype {str(dtype).replace('torch.', '')}, got {str(out.dtype).replace('torch.', '')}"
        )
    if out.device != device:
        raise ValueError(f"out must be on {device}, got {out.device}")


def require_cu_seqlens(name: str, cu_seqlens, device: torch.device) -> torch.Tensor:
    """Cumulative sequence lengths: int32 (batch + 1,) on ``device``; ``require_cu_seqlens_values``
    checks what they hold."""
    require_tensor(name, cu_seqlens)
    require_dtype(name, cu_seqlens, (torch.int32,))
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D of length batch + 1 >= 2, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu_seqlens.device}")
    return cu_seqlens


def require_cu_seqlens_values(name: str, cu_seqlens: torch.Tensor, total: int) -> None:
    """cu_seqlens start at 0, never decrease and end at ``total`` (reads them on the host)."""
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{i}] = {values[i]} < {name}[{i - 1}] = {values[i - 1]}"
            )
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens ({total}), got {values[-1]}")


# Whether the ops read device tensors' values to check them (fmkernels.device_checks).
_device_checks = os.environ.get("FMKERNELS_DEVICE_CHECKS", "1") != "0"


def set_device_checks(enabled: bool) -> bool:
    """Turns the checks of GPU tensors' values on or off for every op; returns the previous setting.

    The ops check values (cache lengths inside the cache, block ids inside the pool, per-row
    sampling parameters in range, no NaN or +inf logit) before they launch. For a tensor in
    host memory that is free; for a GPU tensor it reads the values on the host, one
    synchronisation per call. Turned off, decode, append_kv and sampling never synchronise
    (the kernels still clamp lengths and skip blocks outside the pool, so nothing is read or
    written out of bounds, but a NaN logit or an out-of-range parameter on the GPU is not
    reported). On by default; ``FMKERNELS_DEVICE_CHECKS=0`` starts with them off. They are
    always skipped while the current CUDA stream is capturing a graph, where a read would fail.
    """
    global _device_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _device_checks = _device_checks, enabled
    return previous


@contextlib.contextmanager
def device_checks(enabled: bool):
    """``with fmkernels.device_checks(False):`` runs a block without the checks of GPU tensors'
    values (``set_device_checks``), and restores the previous setting after it."""
    previous = set_device_checks(enabled)
    try:
        yield
    finally:
        set_device_checks(previous)


def checks_values(tensor: torch.Tensor | None) -> bool:
    """Whether the ops check ``tensor``'s values: always in host memory; on a GPU while device
    checks are on (``set_device_checks``) and no CUDA graph is being captured."""
    if tensor is None:
        return False
    if tensor.is_cpu:
        return True
    if not _device_checks:
        return False
    return not (tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_per_row(
    name: str,
    value,
    batch: int,
    device: torch.device,
    *,
    integral: bool,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """A sampling parameter: a scalar inside [low, high], or a tensor of shape (batch,) on
    ``device`` or the CPU, whose values ``require_row_values`` checks."""
    if isinstance(value, torch.Tensor):
        if integral and (value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex()):
            raise TypeError(f"{name} must be an int or an integer tensor, got dtype {value.dtype}")
        if not integral and not (value.dtype.is_floating_point or _is_int_dtype(value.dtype)):
            raise TypeError(f"{name} must be a float or a real tensor, got dtype {value.dtype}")
        if tuple(value.shape) != (batch,):
            raise ValueError(f"{name} must be a scalar or have shape ({batch},) (batch,), got {tuple(value.shape)}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} must be on {device} or the CPU, got {value.device}")
        return
    if integral and not _is_int(value):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(value).__name__}")
    if not integral and not _is_real(value):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    lo_bad = value < low if low_inclusive else value <= low
    hi_bad = value > high if high_inclusive else value >= high
    if lo_bad or hi_bad:
        raise ValueError(f"{name} must be in {_interval(low, high, low_inclusive, high_inclusive)}, got {value}")


def require_row_values(
    name: str,
    value: torch.Tensor,
    *,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Every value of a per-row parameter tensor lies inside [low, high]: one read on the
    host (a decode step's few rows as a list, more as their least and greatest values), and
    a second pass only to name a bad row."""
    if value.numel() == 0:
        return
    if value.numel() <= 64:
        rows = value.tolist()
        least, greatest = min(rows), max(rows)
        has_nan = value.dtype.is_floating_point and any(row != row for row in rows)
    else:
        least, greatest = torch.stack(torch.aminmax(value)).tolist()  # NaN propagates into both
        has_nan = value.dtype.is_floating_point and math.isnan(least)
    if not has_nan:
        lo_bad = least < low if low_inclusive else least <= low
        hi_bad = greatest > high if high_inclusive else greatest >= high
        if not (lo_bad or hi_bad):
            return
    values = value.double()
    if torch.isnan(values).any():
        raise ValueError(f"{name} must not contain NaN")
    lo_bad = values < low if low_inclusive else values <= low
    hi_bad = values > high if high_inclusive else values >= high
    bad = lo_bad | hi_bad
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be in {_interval(low, high, low_inclusive, high_inclusive)}, "
                         f"got {name}[{row}] = {value[row].item()}")


def _is_int_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _interval(low, high, low_inclusive, high_inclusive) -> str:
    return f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
