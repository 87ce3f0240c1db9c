"""Runs a validated call on the implementation the registry selects."""

from __future__ import annotations

from typing import Any, Dict, Hashable, Optional

import torch

from .. import registry


def require_backend(backend) -> str:
    """The backend argument is a name: "auto" or an implementation's (checked in the registry at run time)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    return backend


def run(op: str, backend: str, case: Dict[str, Any], key: Optional[Hashable] = None):
    """Select the implementation of ``op`` for ``case`` (``key``: what stands for the call's
    signature, when the public function has it, see ``registry.select``) and call it with
    ``case`` as keywords."""
    impl = registry.select(op, backend, case, key=key)
    return impl(**case)


def into_out(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """Copy ``result`` into a caller's ``out`` buffer, if one was given."""
    if out is None:
        return result
    out.copy_(result)
    return out
