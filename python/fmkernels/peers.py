"""Peers: other libraries' kernels, registered beside fmkernels' own so that ``fmkernels
check`` holds them to the same reference and ``fmkernels bench`` times them in the same run.

``sdpa``: torch.nn.functional.scaled_dot_product_attention (whatever backend torch picks
for the device), for dense attention and decode against a contiguous cache. Its
``is_causal`` aligns the mask top-left, so a causal call with seqlen_q != seqlen_k passes
an explicit bottom-right mask instead.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from . import reference, registry

# enable_gqa (torch >= 2.5) reads the shared KV heads without copying them.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) in fmkernels' layout -> (B, Sq, Hq, D)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
    group = q.shape[1] // k.shape[1]
    extra = {}
    if group > 1:
        if _SDPA_HAS_GQA:
            extra["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **extra)
    return out.transpose(1, 2)


def sdpa_attention(q, k, v, *, causal=False, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False):
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if causal and seqlen_q != seqlen_k:
        return _sdpa(q, k, v, attn_mask=reference.causal_mask(seqlen_q, seqlen_k, q.device), scale=scale)
    return _sdpa(q, k, v, is_causal=causal, scale=scale)


def sdpa_attention_supports(q, k, causal=False, cu_seqlens_q=None, return_lse=False, **_):
    if cu_seqlens_q is not None:
        return "no packed (varlen) input"
    if return_lse:
        return "does not return the log-sum-exp"
    if causal and q.shape[1] > k.shape[1]:
        return "queries that see no key (seqlen_q > seqlen_k, causal)"
    return None


def sdpa_decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, return_lse=False):
    lengths = cache_seqlens.tolist()
    if len(set(lengths)) == 1:
        return sdpa_attention(q, k_cache[:, : lengths[0]], v_cache[:, : lengths[0]], causal=True, scale=scale)
    # One call per sequence: a mask over a longer cache would still multiply its unused
    # slots (whatever they hold, NaN included) by zero weights.
    return torch.cat([
        sdpa_attention(q[b : b + 1], k_cache[b : b + 1, :length], v_cache[b : b + 1, :length], causal=True, scale=scale)
        for b, length in enumerate(lengths)
    ])


def sdpa_decode_attention_supports(block_table=None, return_lse=False, **_):
    if block_table is not None:
        return "no paged KV cache"
    if return_lse:
        return "does not return the log-sum-exp"
    return None


def register_all() -> None:
    registry.register_impl("attention", "sdpa", sdpa_attention, sdpa_attention_supports, kind="peer")
    registry.register_impl(
        "decode_attention", "sdpa", sdpa_decode_attention, sdpa_decode_attention_supports, kind="peer"
    )
