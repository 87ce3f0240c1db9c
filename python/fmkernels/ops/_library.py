"""What the public ops share as torch.library custom ops (``torch.ops.fmkernels.<op>``).

Each public function checks what it can from its inputs' metadata (shapes, dtypes,
devices, Python scalars), which torch.compile traces without a graph break, then calls
its custom op. The op's implementation checks tensors' values (host tensors always, GPU
tensors unless turned off: ``_validation.checks_values``), selects the backend in the registry and runs it; its
fake implementation only says the outputs' shapes and dtypes. A schema has one fixed
form, so:

- outputs a call may leave out (the log-sum-exp, the log-probabilities) are always
  returned, empty when not asked for, and the public function picks;
- a per-row sampling parameter (a scalar or a (batch,) tensor) is two arguments, the
  scalar and an optional tensor of rows that overrides it.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

PerRow = Union[int, float, torch.Tensor]


def split_per_row(value: Optional[PerRow], scalar_type) -> Tuple[Optional[Union[int, float]], Optional[torch.Tensor]]:
    """(scalar, rows) for a custom op's schema: (0, value) for a tensor, (value, None) for a
    scalar, (None, None) for None."""
    if isinstance(value, torch.Tensor):
        return scalar_type(0), value
    if value is None:
        return None, None
    return scalar_type(value), None


def join_per_row(scalar: Optional[Union[int, float]], rows: Optional[torch.Tensor]) -> Optional[PerRow]:
    """The parameter ``split_per_row`` split: the rows when given, else the scalar."""
    return scalar if rows is None else rows
