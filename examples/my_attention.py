"""Your own attention kernels, held to fmkernels' reference and timed beside its backends.

Plain PyTorch here, so that the example reads in a minute; replace the bodies with calls
into your kernels. Each function takes exactly the arguments of the reference op it
implements (``fmkernels.reference.attention`` and ``.decode_attention``) and returns what
it returns. Check and time them from the repository root::

    fmkernels check attention --impl examples.my_attention:my_attention
    fmkernels check decode_attention --impl examples.my_attention:my_decode_attention
    fmkernels bench attention --impl examples.my_attention:my_attention

A case your kernel cannot run (a dtype, a head_dim) should raise ``NotImplementedError``
with the reason: check and bench list it as skipped, not failed.
"""

import math

import torch


def _one_sequence(q, k, v, causal, scale):
    """q (Sq, Hq, D), k/v (Sk, Hkv, D) -> out (Sq, Hq, D) in q's dtype, lse (Hq, Sq) fp32."""
    group = q.shape[1] // k.shape[1]  # GQA: query head h reads KV head h // group
    keys = k.float().repeat_interleave(group, dim=1)
    values = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale  # [Hq, Sq, Sk]
    if causal:
        # Bottom-right aligned: query i sees keys j <= i + (Sk - Sq).
        seqlen_q, seqlen_k = q.shape[0], k.shape[0]
        rows = torch.arange(seqlen_q, device=q.device)[:, None]
        cols = torch.arange(seqlen_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + seqlen_k - seqlen_q, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for a query that sees no key
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # such a query's output is 0
    out = torch.einsum("hqk,khd->qhd", weights, values)
    return out.to(q.dtype), lse


def my_attention(q, k, v, *, causal=False, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False):
    """softmax(q k^T * scale [+ bottom-right causal mask]) v.

    q (batch, seqlen_q, q_heads, head_dim), k/v (batch, seqlen_k, kv_heads, head_dim); or
    packed q (total_q, q_heads, head_dim), k/v (total_k, kv_heads, head_dim) with
    cu_seqlens_q/cu_seqlens_k (int32, batch + 1). scale None means 1/sqrt(head_dim).
    Returns out (q's shape and dtype), and with return_lse the natural-log log-sum-exp,
    float32, (batch, q_heads, seqlen_q), or (q_heads, total_q) packed.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cu_seqlens_q is None:
        results = [_one_sequence(q[b], k[b], v[b], causal, scale) for b in range(q.shape[0])]
        out = torch.stack([o for o, _ in results])
        lse = torch.stack([l for _, l in results])
    else:
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        results = [
            _one_sequence(q[bounds_q[b]:bounds_q[b + 1]], k[bounds_k[b]:bounds_k[b + 1]],
                          v[bounds_k[b]:bounds_k[b + 1]], causal, scale)
            for b in range(len(bounds_q) - 1)
        ]
        out = torch.cat([o for o, _ in results])
        lse = torch.cat([l for _, l in results], dim=1)
    return (out, lse) if return_lse else out


def my_decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, return_lse=False):
    """Attention of q (batch, n_new, q_heads, head_dim) against each sequence's cached keys and values.

    The cache already holds the new tokens, and cache_seqlens (int32, batch) counts them.
    Contiguous cache (batch, max_seqlen, kv_heads, head_dim), or paged (num_blocks,
    block_size, kv_heads, head_dim) with block_table (int32, batch x max_blocks). Slots past
    a sequence's length hold garbage (NaN in check): never read them. Returns out (q's shape
    and dtype), and with return_lse the log-sum-exp, float32, (batch, q_heads, n_new).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        if block_table is None:
            keys, values = k_cache[b, :length], v_cache[b, :length]
        else:
            blocks = block_table[b, : -(-length // k_cache.shape[1])].long()
            keys = k_cache[blocks].flatten(0, 1)[:length]
            values = v_cache[blocks].flatten(0, 1)[:length]
        out, lse = _one_sequence(q[b], keys, values, True, scale)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.stack(outs), torch.stack(lses)
    return (out, lse) if return_lse else out
