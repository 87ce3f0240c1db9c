"""Attention checks shared by the backends' tests."""

import math

import torch

import fmkernels
from fmkernels import testing


def randn(*shape, dtype=torch.float32, device="cpu"):
    """Standard normal values drawn on the CPU (the same on every device), in dtype on device."""
    return torch.randn(*shape).to(device=device, dtype=dtype)


def cu_seqlens(lengths, device="cpu"):
    """(len(lengths) + 1,) int32 offsets of packed sequences of ``lengths``."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def random_dense(shape, dtype, device="cpu"):
    """Random q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) for shape (B, Sq, Sk, Hq, Hkv, D, ...)."""
    batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim = shape[:6]
    return (randn(batch, seqlen_q, q_heads, head_dim, dtype=dtype, device=device),
            randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype, device=device),
            randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype, device=device))


def random_packed(lengths, heads, head_dim, dtype, device="cpu"):
    """Random packed q, k, v and their cu_seqlens for ``lengths`` [(seqlen_q, seqlen_k), ...]
    and ``heads`` (q_heads, kv_heads)."""
    q_heads, kv_heads = heads
    cu_q = cu_seqlens([s for s, _ in lengths], device)
    cu_k = cu_seqlens([s for _, s in lengths], device)
    q = randn(int(cu_q[-1]), q_heads, head_dim, dtype=dtype, device=device)
    k = randn(int(cu_k[-1]), kv_heads, head_dim, dtype=dtype, device=device)
    v = randn(int(cu_k[-1]), kv_heads, head_dim, dtype=dtype, device=device)
    return q, k, v, cu_q, cu_k


def dense_shape_id(shape):
    """A test id for (batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, causal)."""
    return "b{}-q{}-k{}-h{}/{}-d{}-{}".format(*shape[:6], "causal" if shape[6] else "full")


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


def bottom_right_mask(seqlen_q, seqlen_k):
    """fmkernels' (and flash-attn's) causal mask: query i sees keys j <= i + seqlen_k - seqlen_q."""
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril(seqlen_k - seqlen_q)


def masked_attention(q, k, v, visible, scale=None):
    """Attention with an explicit mask, in q's dtype: q (Sq, Hq, D), k/v (Sk, Hkv, D), visible
    (Sq, Sk) bool -> out (Sq, Hq, D), natural-log lse (Hq, Sq); a query that sees no key gets
    zeros and an lse of -inf."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, values), lse
