"""The signature of an op call: what its input checks and its choice of implementation read.

A decode loop calls each op thousands of times with arguments that differ only in their
values (the same caches, the same shapes, the next position). What the public functions'
metadata checks and ``registry.select`` decide depends on the arguments' signature alone,
so each remembers its verdict per signature (``SignatureCache``) and a repeated call pays
for building one tuple instead.

A tensor's part of the signature is its type, dtype, device, shape, strides and data
pointer modulo 16 (the CUDA kernels' vector loads need 16-byte alignment); a Python
scalar's part is its type and value. An argument of any other type (a list, a tensor
subclass, a NumPy array) gives no signature: the call is checked in full, as the first
call of a signature always is.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, Hashable, Iterable, Optional, Tuple

import torch

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_SCALARS = (int, float, bool, str, type(None))


def signature(values: Iterable[Any]) -> Optional[Tuple]:
    """The signature of a call's arguments (a hashable tuple), or None where one has no
    signature (see the module's docstring)."""
    key = []
    for value in values:
        kind = type(value)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            key.append((kind, value.dtype, value.device, value.shape, value.stride(), value.data_ptr() % 16))
        elif kind in _SCALARS:
            key.append((kind, value))
        else:
            return None
    return tuple(key)


class SignatureCache:
    """A bounded map from call signatures to what was decided for them.

    Holds at most ``capacity`` entries and forgets them all when full, so a workload of
    ever-new shapes (prefill at every prompt length) costs memory in proportion to
    ``capacity``, not to the number of calls. ``clear`` forgets everything (the registry
    calls it whenever an implementation is registered or removed).
    """

    def __init__(self, capacity: int = 512):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._entries: Dict[Hashable, Any] = {}

    def get(self, key: Optional[Tuple], default: Any = None) -> Any:
        return default if key is None else self._entries.get(key, default)

    def put(self, key: Optional[Tuple], value: Any) -> None:
        if key is None:
            return
        if len(self._entries) >= self.capacity:
            self._entries.clear()
        self._entries[key] = value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# Numbers for the signatures that pass a check: unique in the process, so a number names one
# signature of one op's arguments, and hashing it is cheaper than hashing the signature again.
_NUMBERS = itertools.count()


def check_once(passed: SignatureCache, check: Callable[..., None], arguments: Tuple) -> Optional[int]:
    """``check(*arguments)``, unless arguments of the same signature have passed it before;
    returns a number that stands for the signature (None where there is none), which the
    caller may pass on as the key of the implementation's choice (``registry.select``).

    For checks that read the arguments' metadata only (types, dtypes, devices, shapes,
    strides, scalar values): those give the same verdict for the same signature, so a call
    that repeats a signature skips them. A call with no signature, or one traced by
    torch.compile (where tensors are fake and have no data pointer), is always checked."""
    key = None if torch.compiler.is_compiling() else signature(arguments)
    number = passed.get(key)
    if number is not None:
        return number
    check(*arguments)
    if key is None:
        return None
    number = next(_NUMBERS)
    passed.put(key, number)
    return number
