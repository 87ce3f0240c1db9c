"""Attention and linear as plain PyTorch computes them in the input dtype: the measure of what
the dtype costs a straightforward computation, which the tolerances are set from."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import reference


def _plain_dense(q, k, v, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq), all in q's dtype."""
    group = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)  # [B, Hq, Sq, D]
    kt = k.repeat_interleave(group, dim=2).transpose(1, 2)  # [B, Hq, Sk, D]
    vt = v.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale  # [B, Hq, Sq, Sk]
    if causal:
        visible = reference.causal_mask(q.shape[1], k.shape[1], device=q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Sq]
    probs = torch.softmax(scores, dim=-1)
    # A query that sees no key: softmax gives NaN, the convention is zeros (as the reference).
    probs = torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(probs), probs)
    out = torch.matmul(probs, vt).transpose(1, 2)  # [B, Sq, Hq, D]
    return out, lse


def plain_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Attention as plain PyTorch computes it in the inputs' dtype: matmul, softmax, matmul.

    No upcast and no care taken: its error against the float64 truth is what the dtype
    costs a straightforward computation, and ``attention_tolerance`` lets a kernel err
    twice as much.

    Parameters
    ----------
    q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, return_lse
        As ``fmkernels.reference.attention``: q (batch, seqlen_q, q_heads, head_dim),
        k/v (batch, seqlen_k, kv_heads, head_dim), or packed with cu_seqlens; causal
        masks bottom-right aligned.

    Returns
    -------
    out : Tensor, q's shape and dtype.
    lse : Tensor in q's dtype, (batch, q_heads, seqlen_q) or (q_heads, total_q) packed;
        only with ``return_lse``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cu_seqlens_q is None:
        out, lse = _plain_dense(q, k, v, causal, scale)
    else:
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for b in range(len(bounds_q) - 1):
            out_b, lse_b = _plain_dense(
                q[bounds_q[b] : bounds_q[b + 1]][None],
                k[bounds_k[b] : bounds_k[b + 1]][None],
                v[bounds_k[b] : bounds_k[b + 1]][None],
                causal,
                scale,
            )
            outs.append(out_b[0])
            lses.append(lse_b[0])
        out, lse = torch.cat(outs), torch.cat(lses, dim=1)  # [total_q, Hq, D], [Hq, total_q]
    return (out, lse) if return_lse else out


def plain_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Decode attention as plain PyTorch computes it in the inputs' dtype (see ``plain_attention``).

    Parameters
    ----------
    q, k_cache, v_cache, cache_seqlens, block_table, scale, return_lse
        As ``fmkernels.reference.decode_attention``: q (batch, n_new, q_heads, head_dim)
        against a contiguous or paged cache holding cache_seqlens[b] tokens per sequence.

    Returns
    -------
    out : Tensor (batch, n_new, q_heads, head_dim), q's dtype.
    lse : Tensor (batch, q_heads, n_new), q's dtype; only with ``return_lse``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        keys = reference.gather_cache(k_cache, b, length, block_table)[None]
        values = reference.gather_cache(v_cache, b, length, block_table)[None]
        out_b, lse_b = _plain_dense(q[b : b + 1], keys, values, True, scale)
        outs.append(out_b)
        lses.append(lse_b)
    if not outs:  # an empty batch
        out = torch.empty_like(q)
        lse = torch.empty((0, q.shape[2], q.shape[1]), dtype=q.dtype, device=q.device)
    else:
        out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_lse else out


def plain_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T as plain PyTorch computes it in the inputs' dtype (``F.linear``), the
    measure of what the dtype costs (see ``plain_attention``).

    Parameters
    ----------
    x, weight
        As ``fmkernels.reference.linear``: x (..., K), weight (N, K).

    Returns
    -------
    Tensor (..., N), x's dtype.
    """
    return F.linear(x, weight)
