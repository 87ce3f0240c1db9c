"""flash-attn 2 and FlashInfer as peers: adapters from fmkernels' call conventions to theirs.

Each is registered only when its package is installed (``importlib.util.find_spec``; nothing
is imported until a peer runs), and runs on CUDA tensors only. An installed package that
fails to import (a wheel built for another torch) makes the peer unavailable, with the
import error as the reason, never breaks ``import fmkernels``. A case a peer cannot run
(dtype, head_dim, block size, a tie it breaks differently) is a skip with the reason.

``flash_attn`` (flash-attn 2)
    attention: ``flash_attn_func``, or ``flash_attn_varlen_func`` for packed input (the
    max_seqlen arguments computed from cu_seqlens). decode_attention:
    ``flash_attn_with_kvcache`` with ``cache_seqlens`` (the new tokens are already in the
    cache, so k and v are not passed) and, for a paged cache, ``block_table``. The layouts
    are the same as fmkernels' (fmkernels took them from flash-attn), and so is the
    bottom-right causal mask (flash-attn >= 2.1). The log-sum-exp is natural-log, shape
    (batch, heads, seqlen_q), or (heads, total_q) packed (older releases pad it to
    (batch, heads, max_seqlen_q): unpadded here); flash-attn writes +inf for a query that
    sees no key, fmkernels -inf. float16 and bfloat16, head_dim <= 256 and a multiple of 8;
    paged blocks of a multiple of 256 tokens.

``flashinfer``
    attention: ``BatchPrefillWithRaggedKVCacheWrapper`` (a dense batch is packed with
    uniform indptr). decode_attention: ``BatchDecodeWithPagedKVCacheWrapper`` for one new
    token per sequence, ``BatchPrefillWithPagedKVCacheWrapper`` (causal) for several; a
    contiguous cache (batch, max_seqlen, ...) is passed as a paged one whose pages are the
    sequences (page_size = max_seqlen, last_page_len = cache_seqlens). Layout "NHD"; the
    log-sum-exp comes back base 2, (tokens, heads), and is returned natural-log in
    fmkernels' shape. ``plan`` runs in every call (``fmkernels bench`` times it with
    ``run``). float16 and bfloat16, head_dim 64, 128 or 256; queries that see no key are
    skipped (what FlashInfer returns for them is not documented).

    filter_logits: ``flashinfer.sampling.top_k_mask_logits`` on the temperature-scaled
    fp32 logits (temperature 0: k = 1 on the unscaled ones). Skipped: top-p and min-p
    (FlashInfer filters probabilities with a pivot search to a tolerance, so the kept set
    at the boundary is not the reference's exactly, and check demands it exactly), and
    rows where the k-th and (k+1)-th largest logits tie (FlashInfer keeps a threshold's
    worth of tokens, the reference exactly k by lower id).

    sample: not registered. FlashInfer draws from its own Philox stream (seed, offset);
    ``fmkernels check`` holds a sampler to the reference's tokens for the same per-row seed
    and step, so FlashInfer's samplers would fail every case whatever their quality, and
    a check that accepted any token in the kept set would pass a broken sampler.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from typing import Optional

import torch

from . import reference, registry

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_ATTN_MAX_HEAD_DIM = 256
_FLASH_ATTN_PAGE_MULTIPLE = 256
_FLASHINFER_HEAD_DIMS = (64, 128, 256)
# FlashInfer's wrappers take a float workspace; 128 MB is what its own examples allocate.
_FLASHINFER_WORKSPACE_BYTES = 128 * 1024 * 1024


def unavailable_reason(module_name: str) -> Optional[str]:
    """Why the peer backed by ``module_name`` cannot run here (import error, no GPU), or None."""
    try:
        importlib.import_module(module_name)
    except Exception as exc:  # a broken wheel raises ImportError, OSError, RuntimeError...
        return f"cannot import {module_name}: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def _half_dtype_reason(q: torch.Tensor, library: str) -> Optional[str]:
    if q.dtype not in _HALF_DTYPES:
        return f"{library} takes float16 or bfloat16, got {str(q.dtype).replace('torch.', '')}"
    return None


def _seqlens(cu_seqlens: torch.Tensor) -> list:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


def _some_query_sees_no_key(q, k, causal, cu_seqlens_q, cu_seqlens_k) -> bool:
    if not causal:
        return False
    if cu_seqlens_q is None:
        return q.shape[1] > k.shape[1]
    return any(lq > lk for lq, lk in zip(_seqlens(cu_seqlens_q), _seqlens(cu_seqlens_k)))


# ----------------------------------------------------------------------------
# flash-attn 2
# ----------------------------------------------------------------------------


def _flash_attn_lse(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn's +inf for a query that sees no key as fmkernels' -inf."""
    return lse.masked_fill(torch.isposinf(lse), float("-inf"))


def flash_attn_attention(q, k, v, *, causal=False, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                         return_lse=False):
    flash_attn = importlib.import_module("flash_attn")
    if cu_seqlens_q is None:
        result = flash_attn.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal,
                                            return_attn_probs=return_lse)
    else:
        seqlens_q = _seqlens(cu_seqlens_q)
        result = flash_attn.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max(seqlens_q), max(_seqlens(cu_seqlens_k)),
            softmax_scale=scale, causal=causal, return_attn_probs=return_lse,
        )
    if not return_lse:
        return result
    out, lse = result[0], result[1]
    if cu_seqlens_q is not None and lse.dim() == 3:  # padded (batch, heads, max_seqlen_q)
        lse = torch.cat([lse[b, :, :length] for b, length in enumerate(seqlens_q)], dim=1)
    return out, _flash_attn_lse(lse)


def _flash_attn_case_reason(q) -> Optional[str]:
    head_dim = q.shape[-1]
    if head_dim > _FLASH_ATTN_MAX_HEAD_DIM or head_dim % 8:
        return f"flash-attn takes head_dim <= {_FLASH_ATTN_MAX_HEAD_DIM} and a multiple of 8, got {head_dim}"
    return _half_dtype_reason(q, "flash-attn")


def flash_attn_attention_supports(q, **_):
    return _flash_attn_case_reason(q)


def flash_attn_decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None,
                                return_lse=False):
    flash_attn = importlib.import_module("flash_attn")
    result = flash_attn.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table, softmax_scale=scale,
        causal=True, return_softmax_lse=return_lse,
    )
    if not return_lse:
        return result
    out, lse = result
    return out, _flash_attn_lse(lse)


def flash_attn_decode_attention_supports(q, k_cache, block_table=None, **_):
    if block_table is not None and k_cache.shape[1] % _FLASH_ATTN_PAGE_MULTIPLE:
        return (f"flash-attn's paged KV cache takes blocks of a multiple of {_FLASH_ATTN_PAGE_MULTIPLE} "
                f"tokens, got {k_cache.shape[1]}")
    return _flash_attn_case_reason(q)


# ----------------------------------------------------------------------------
# FlashInfer
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _flashinfer_wrapper(module, wrapper_name: str, device: torch.device):
    """One wrapper of each kind per device (and module), sharing one workspace."""
    return getattr(module, wrapper_name)(_flashinfer_workspace(device), kv_layout="NHD")


@functools.lru_cache(maxsize=None)
def _flashinfer_workspace(device: torch.device) -> torch.Tensor:
    return torch.empty(_FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)


def _uniform_indptr(batch: int, length: int, device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * length


def _natural_lse(lse_base2: torch.Tensor) -> torch.Tensor:
    return lse_base2 * math.log(2.0)


def flashinfer_attention(q, k, v, *, causal=False, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                         return_lse=False):
    flashinfer = importlib.import_module("flashinfer")
    q_heads, head_dim, kv_heads = q.shape[-2], q.shape[-1], k.shape[-2]
    if cu_seqlens_q is None:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        qo_indptr = _uniform_indptr(batch, seqlen_q, q.device)
        kv_indptr = _uniform_indptr(batch, seqlen_k, q.device)
        q_rows, k_rows, v_rows = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))  # [tokens, H, D]
    else:
        qo_indptr, kv_indptr, q_rows, k_rows, v_rows = cu_seqlens_q, cu_seqlens_k, q, k, v
    wrapper = _flashinfer_wrapper(flashinfer, "BatchPrefillWithRaggedKVCacheWrapper", q.device)
    wrapper.plan(qo_indptr, kv_indptr, q_heads, kv_heads, head_dim, causal=causal, sm_scale=scale,
                 q_data_type=q.dtype, kv_data_type=k.dtype)
    result = wrapper.run(q_rows, k_rows, v_rows, return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    if cu_seqlens_q is None:
        out = out.view(q.shape)
    if not return_lse:
        return out
    if cu_seqlens_q is None:
        lse = lse.view(batch, seqlen_q, q_heads).transpose(1, 2)  # [B, H, Sq]
    else:
        lse = lse.transpose(0, 1)  # [H, total_q]
    return out, _natural_lse(lse).contiguous()


def _flashinfer_case_reason(q) -> Optional[str]:
    if q.shape[-1] not in _FLASHINFER_HEAD_DIMS:
        return f"flashinfer takes head_dim {', '.join(map(str, _FLASHINFER_HEAD_DIMS))}, got {q.shape[-1]}"
    return _half_dtype_reason(q, "flashinfer")


def flashinfer_attention_supports(q, k, causal=False, cu_seqlens_q=None, cu_seqlens_k=None, **_):
    if _some_query_sees_no_key(q, k, causal, cu_seqlens_q, cu_seqlens_k):
        return "queries that see no key (seqlen_q > seqlen_k, causal): flashinfer does not document its output"
    return _flashinfer_case_reason(q)


def _flashinfer_pages(k_cache, cache_seqlens, block_table):
    """(indptr, indices, last_page_len) of FlashInfer's paged cache for fmkernels' cache.

    A contiguous cache (batch, max_seqlen, ...) is a paged one with one page per sequence.
    """
    batch, page_size, device = cache_seqlens.shape[0], k_cache.shape[1], cache_seqlens.device
    if block_table is None:
        indptr = _uniform_indptr(batch, 1, device)
        return indptr, indptr[:-1], cache_seqlens.to(torch.int32)
    lengths = cache_seqlens.long()
    pages = (lengths + page_size - 1) // page_size
    indptr = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    indptr[1:] = torch.cumsum(pages, 0)
    owned = torch.arange(block_table.shape[1], device=device)[None, :] < pages[:, None]
    indices = block_table[owned].to(torch.int32)  # row by row: each sequence's pages in order
    last_page_len = (lengths - (pages - 1) * page_size).to(torch.int32)
    return indptr, indices, last_page_len


def flashinfer_decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None,
                                return_lse=False):
    flashinfer = importlib.import_module("flashinfer")
    batch, n_new, q_heads, head_dim = q.shape
    kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    indptr, indices, last_page_len = _flashinfer_pages(k_cache, cache_seqlens, block_table)
    types = dict(sm_scale=scale, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
    if n_new == 1:
        wrapper = _flashinfer_wrapper(flashinfer, "BatchDecodeWithPagedKVCacheWrapper", q.device)
        wrapper.plan(indptr, indices, last_page_len, q_heads, kv_heads, head_dim, page_size, **types)
    else:
        wrapper = _flashinfer_wrapper(flashinfer, "BatchPrefillWithPagedKVCacheWrapper", q.device)
        wrapper.plan(_uniform_indptr(batch, n_new, q.device), indptr, indices, last_page_len, q_heads, kv_heads,
                     head_dim, page_size, causal=True, **types)
    result = wrapper.run(q.reshape(batch * n_new, q_heads, head_dim), (k_cache, v_cache), return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    out = out.view(q.shape)
    if not return_lse:
        return out
    return out, _natural_lse(lse.view(batch, n_new, q_heads).transpose(1, 2)).contiguous()


def flashinfer_decode_attention_supports(q, cache_seqlens, **_):
    if bool((cache_seqlens < 1).any()):
        return "empty sequences (cache_seqlens 0): flashinfer's pages hold at least one token"
    return _flashinfer_case_reason(q)


def _flashinfer_top_k(logits, temperature, top_k):
    """fp32 logits / temperature and the per-row k fmkernels' filter means: (scaled, k int32)."""
    batch, vocab = logits.shape
    temperature, top_k, _, _ = reference.filter_parameters(batch, logits.device, temperature, top_k, 1.0, 0.0)
    greedy = temperature == 0
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    k = torch.where((top_k == 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k)
    k = torch.where(greedy, torch.ones_like(k), k)
    return scaled, k.to(torch.int32)


def flashinfer_filter_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, allowed=None):
    sampling = importlib.import_module("flashinfer.sampling")
    scaled, k = _flashinfer_top_k(logits, temperature, top_k)
    return sampling.top_k_mask_logits(scaled, k).to(logits.dtype)


def _is_off(value, off: float) -> bool:
    if isinstance(value, torch.Tensor):
        return bool((value == off).all())
    return value == off


def flashinfer_filter_logits_supports(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, allowed=None, **_):
    if allowed is not None:
        return "an allowed= token bitmask: flashinfer's top_k_mask_logits takes none"
    if not _is_off(top_p, 1.0) or not _is_off(min_p, 0.0):
        return ("top-p and min-p: flashinfer filters probabilities with a pivot search to a tolerance, "
                "not the reference's exact kept set")
    scaled, k = _flashinfer_top_k(logits, temperature, top_k)
    vocab = scaled.shape[1]
    cut = k < vocab
    if bool(cut.any()):
        ranked = torch.sort(scaled[cut], dim=-1, descending=True).values
        kth = k[cut].long()[:, None]
        if bool((ranked.gather(1, kth - 1) == ranked.gather(1, kth)).any()):
            return "a tie at the k-th largest logit: flashinfer keeps every tied token, the reference exactly k"
    return None


# ----------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------

#: peer name -> the package it needs, and (op, function, supports) it registers.
PEER_LIBRARIES = {
    "flash_attn": ("flash_attn", (
        ("attention", flash_attn_attention, flash_attn_attention_supports),
        ("decode_attention", flash_attn_decode_attention, flash_attn_decode_attention_supports),
    )),
    "flashinfer": ("flashinfer", (
        ("attention", flashinfer_attention, flashinfer_attention_supports),
        ("decode_attention", flashinfer_decode_attention, flashinfer_decode_attention_supports),
        ("filter_logits", flashinfer_filter_logits, flashinfer_filter_logits_supports),
    )),
}


def _installed(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module without a spec
        return False


def register_all() -> None:
    """Register the peers of each installed package (CUDA tensors only)."""
    for name, (module_name, entries) in PEER_LIBRARIES.items():
        if not _installed(module_name):
            continue
        available = functools.partial(unavailable_reason, module_name)
        for op, fn, supports in entries:
            registry.register_impl(op, name, fn, supports, available=available, devices=("cuda",), kind="peer")
