"""Attention checks shared by the backends' tests."""

import torch

import fmkernels
from fmkernels import testing


def run_attention(backend, q, k, v, **kwargs):
    """fmkernels.attention through ``backend`` into a NaN-poisoned ``out``; returns (out, lse)."""
    out = torch.full_like(q, float("nan"))
    result, lse = fmkernels.attention(q, k, v, backend=backend, out=out, return_lse=True, **kwargs)
    assert result.data_ptr() == out.data_ptr()
    return out, lse


def check_attention(backend, q, k, v, **kwargs):
    """Runs ``backend`` and holds its output and LSE to the tolerance; returns them."""
    out, lse = run_attention(backend, q, k, v, **kwargs)
    result = testing.compare_attention("attention", dict(q=q, k=k, v=v, return_lse=True, **kwargs), (out, lse))
    assert result.passed, result.detail
    return out, lse
