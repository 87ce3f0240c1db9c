"""The ``cuda`` backend: fmkernels._cuda's kernels on CUDA tensors.

Each function takes the reference's arguments (already validated by the public op),
allocates its outputs on the inputs' device, and hands the kernels tensor views and the
current stream of that device. An optional ``<op>_supports`` says which cases an op's
kernels cannot run, so ``backend="auto"`` passes them to the next backend and
``backend="cuda"`` raises with the reason.
"""

from __future__ import annotations

import torch

from .. import platform
from .._views import tensor_view


def _module():
    return platform.cuda_module()


def stream_of(tensor: torch.Tensor) -> int:
    """The handle of the current CUDA stream on ``tensor``'s device."""
    return torch.cuda.current_stream(tensor.device).cuda_stream


def append_kv(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None) -> None:
    with torch.cuda.device(k_cache.device):
        _module().append_kv(
            tensor_view(k_cache), tensor_view(v_cache), tensor_view(k), tensor_view(v),
            tensor_view(cache_seqlens), tensor_view(block_table), stream_of(k_cache),
        )
