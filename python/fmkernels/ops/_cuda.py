"""The ``cuda`` backend: fmkernels._cuda's kernels on CUDA tensors.

Each function takes the reference's arguments (already validated by the public op),
allocates its outputs on the inputs' device, and hands the kernels tensor views and the
current stream of that device. An optional ``<op>_supports`` says which cases an op's
kernels cannot run, so ``backend="auto"`` passes them to the next backend and
``backend="cuda"`` raises with the reason.
"""

from __future__ import annotations

import torch

from .. import platform, reference
from .._views import tensor_view
from ._top_tokens import top_tokens


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


def _unit_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The sampling kernels read rows of vocab elements at unit stride."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _filter_parameters(logits: torch.Tensor, temperature, top_k, top_p, min_p):
    """Per-row (batch,) tensors on logits' device: temperature, top_p, min_p float32; top_k int64."""
    batch, device = logits.shape[0], logits.device
    return (
        reference.per_row(temperature, batch, torch.float32, device).contiguous(),
        reference.per_row(top_k, batch, torch.int64, device).contiguous(),
        reference.per_row(top_p, batch, torch.float32, device).contiguous(),
        reference.per_row(min_p, batch, torch.float32, device).contiguous(),
    )


def filter_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    logits = _unit_stride(logits)
    with torch.cuda.device(logits.device):
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        parameters = _filter_parameters(logits, temperature, top_k, top_p, min_p)
        _module().filter_logits(
            tensor_view(logits), tensor_view(out), *(tensor_view(p) for p in parameters), stream_of(logits),
        )
    return out


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, step=0,
           return_logprobs=False, num_logprobs=0):
    logits = _unit_stride(logits)
    batch, vocab = logits.shape
    device = logits.device
    with torch.cuda.device(device):
        parameters = _filter_parameters(logits, temperature, top_k, top_p, min_p)
        seeds = reference.row_seeds(seed, batch, device).contiguous()
        steps = reference.per_row(step, batch, torch.int64, device).contiguous()
        tokens = torch.empty(batch, dtype=torch.int64, device=device)
        logprobs = lse = filtered = None
        if return_logprobs:
            logprobs = torch.empty(batch, dtype=torch.float32, device=device)
            if num_logprobs > 0:
                # The top alternatives come from the filtered row, picked here.
                lse = torch.empty(batch, dtype=torch.float32, device=device)
                filtered = torch.empty((batch, vocab), dtype=torch.float32, device=device)
        _module().sample(
            tensor_view(logits), tensor_view(tokens), *(tensor_view(p) for p in parameters),
            tensor_view(seeds), tensor_view(steps), tensor_view(logprobs), tensor_view(lse),
            tensor_view(filtered), stream_of(logits),
        )
        if not return_logprobs:
            return tokens
        if filtered is not None and batch > 0:
            top_ids = top_tokens(filtered, num_logprobs)
            top_logprobs = filtered.gather(1, top_ids) - lse[:, None]
        else:
            top_ids = torch.empty((batch, num_logprobs), dtype=torch.int64, device=device)
            top_logprobs = torch.empty((batch, num_logprobs), dtype=torch.float32, device=device)
    return reference.SampleOutput(tokens, logprobs, top_ids, top_logprobs)
