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

from .._signature import _PLAIN_TENSORS, _SCALARS

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


# What ``_intercepted`` asks torch, looked up once (absent in a torch that lacks them, where
# every call goes through the dispatcher).
_FUNCTION_MODE = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_DISPATCH_DEPTH = getattr(torch._C, "_len_torch_dispatch_stack", None)
_PROFILER = torch.autograd.profiler


def _intercepted(args) -> bool:
    """Whether something may stand between a custom op call and its implementation: torch.compile
    tracing, a torch function or dispatch mode (FakeTensorMode, opcheck's), a tensor subclass
    among the arguments, autograd recording a graph, or the profiler (which then lists the call
    as ``fmkernels::<op>``)."""
    if _FUNCTION_MODE is None or _DISPATCH_DEPTH is None:
        return True
    if torch.compiler.is_compiling() or _PROFILER._is_profiler_enabled or _FUNCTION_MODE() or _DISPATCH_DEPTH():
        return True
    grad = torch.is_grad_enabled()
    for arg in args:
        kind = type(arg)
        if kind in _PLAIN_TENSORS:
            if grad and arg.requires_grad:
                return True
        elif kind not in _SCALARS and isinstance(arg, torch.Tensor):
            return True
    return False


def call(op, execute, key, *args, schema=None):
    """``op(*args)`` for a custom op (``torch.library.custom_op``'s object) whose implementation
    is ``execute(*args)``; ``schema``, where given, turns ``args`` into the op's arguments
    (sampling's per-row parameters are two arguments of the op's, one of ``execute``'s).

    In plain eager calls ``execute`` runs directly, without the dispatcher's cost (about 15 µs
    a call on a CPU, most of a decode-step op's overhead), with ``key``, the number that
    stands for the call's signature (``fmkernels._signature.check_once``), so the
    implementation is chosen without computing the signature again; ``execute`` returns None
    for an output the call did not ask for, where the op returns an empty tensor. Through the
    dispatcher wherever ``_intercepted`` says something may intercept the call."""
    if _intercepted(args):
        return op(*(args if schema is None else schema(*args)))
    return execute(*args, key=key)
