"""Drop-in entry points with flash-attn 2's and torch SDPA's signatures, on fmkernels' ops.

Swap ``from flash_attn import flash_attn_func`` for ``from fmkernels.compat import
flash_attn_func`` (likewise ``flash_attn_varlen_func`` and ``flash_attn_with_kvcache``), or
``F.scaled_dot_product_attention`` for ``fmkernels.compat.scaled_dot_product_attention``:
the argument names, order, defaults, layouts and return values are theirs, for the features
fmkernels has. Any other feature (dropout, sliding windows, softcapping, ALiBi, rotary
embeddings, left padding, attention masks) raises a ``ValueError`` naming the argument and
its value, never a silently different result. Each function also takes a keyword-only
``backend`` ("auto", or an implementation's name), passed to the ops it calls.

These are forward-only (inference): fmkernels' compiled backends compute no gradients.

Masks: flash-attn's ``causal`` is aligned bottom-right, as fmkernels' own (query i of Sq
sees keys j <= i + Sk - Sq); torch SDPA's ``is_causal`` is aligned top-left (query i sees
keys j <= i). ``scaled_dot_product_attention`` converts.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import _validation as check
from .ops import append_kv, attention, decode_attention
from .ops._kv_cache import CONTIGUOUS, PAGED, require_block_table, require_positions, require_seqlens

_FLASH_DENSE = "(batch, seqlen, nheads, headdim)"
_FLASH_PACKED = "(total_tokens, nheads, headdim)"
_TORCH_LAYOUT = "(batch, heads, seqlen, head_dim) or unbatched (heads, seqlen, head_dim)"


def _unsupported(function: str, name: str, value, instead: str) -> ValueError:
    return ValueError(f"{function}: fmkernels does not support {name}={check.shown(value)}; {instead}")


def _require_no_dropout(function: str, dropout_p) -> None:
    if not check._is_real(dropout_p):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0:
        raise _unsupported(function, "dropout_p", dropout_p, "pass dropout_p=0.0 (inference has no dropout)")


def _require_flash_features(function: str, window_size, softcap, alibi_slopes) -> None:
    """Rejects the flash-attn features fmkernels lacks, each at any value but 'off'."""
    if not isinstance(window_size, Sequence) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {check.shown(window_size)}")
    if tuple(window_size) != (-1, -1):
        raise _unsupported(function, "window_size", tuple(window_size),
                           "only (-1, -1), the unlimited window, is supported (no sliding-window attention)")
    if not check._is_real(softcap):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if softcap != 0:
        raise _unsupported(function, "softcap", softcap, "only softcap=0.0 (no softcapping) is supported")
    if alibi_slopes is not None:
        raise _unsupported(function, "alibi_slopes", alibi_slopes, "ALiBi biases are not supported; pass None")


def _flash_lse(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn gives a query that sees no key a log-sum-exp of +inf; fmkernels' ops give -inf."""
    return lse.masked_fill(torch.isneginf(lse), math.inf)


def _flash_outputs(result, return_attn_probs: bool, q: torch.Tensor):
    """flash-attn's return value from fmkernels.attention's: out, or (out, softmax_lse, S_dmask).

    flash-attn computes S_dmask only when dropout_p > 0 and returns an empty tensor of q's
    dtype otherwise; with dropout unsupported, that empty tensor is the honest answer.
    """
    if not return_attn_probs:
        return result
    out, lse = result
    return out, _flash_lse(lse), torch.empty((0,), dtype=q.dtype, device=q.device)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str = "auto",
):
    """flash-attn 2's ``flash_attn_func`` on ``fmkernels.attention``: softmax(q k^T * scale) v.

    GQA/MQA: query head h reads KV head h // (nheads // nheads_k). With ``causal`` the mask
    is aligned bottom-right, as flash-attn >= 2.1: query i of seqlen_q sees keys
    j <= i + seqlen_k - seqlen_q. For seqlen_q = 2, seqlen_k = 5, and for 5 and 2::

        keys  0 1 2 3 4        keys  0 1
        q0    1 1 1 1 0        q0    0 0
        q1    1 1 1 1 1        q1    0 0
                               q2    0 0
                               q3    1 0
                               q4    1 1

    A query that sees no key gets zeros, and a log-sum-exp of +inf (flash-attn's convention;
    ``fmkernels.attention`` returns -inf there).

    Parameters
    ----------
    q : Tensor (batch, seqlen_q, nheads, headdim)
        float32, float16 or bfloat16.
    k, v : Tensor (batch, seqlen_k, nheads_k, headdim)
        q's dtype and device; nheads a multiple of nheads_k.
    dropout_p : float
        Must be 0.0 (no dropout).
    softmax_scale : float, optional
        Multiplies q k^T; default 1 / sqrt(headdim).
    causal : bool
        Bottom-right causal mask.
    window_size : (int, int)
        Must be (-1, -1) (no sliding window).
    softcap : float
        Must be 0.0 (no softcapping).
    alibi_slopes : None
        ALiBi is not supported.
    deterministic : bool
        Accepted: it concerns flash-attn's backward pass; the forward pass is deterministic.
    return_attn_probs : bool
        Also return softmax_lse and S_dmask.
    backend : str, keyword-only
        "auto" or an implementation's name, as ``fmkernels.attention``.

    Returns
    -------
    out : Tensor (batch, seqlen_q, nheads, headdim), q's dtype.
    softmax_lse : Tensor float32 (batch, nheads, seqlen_q); only with ``return_attn_probs``.
    S_dmask : Tensor, empty, q's dtype (what flash-attn returns without dropout); only with
        ``return_attn_probs``.
    """
    function = "flash_attn_func"
    _require_no_dropout(function, dropout_p)
    _require_flash_features(function, window_size, softcap, alibi_slopes)
    check.require_bool("deterministic", deterministic)
    check.require_bool("return_attn_probs", return_attn_probs)
    result = attention(q, k, v, causal=causal, scale=softmax_scale, return_lse=return_attn_probs, backend=backend)
    return _flash_outputs(result, return_attn_probs, q)


def _require_max_seqlen(name: str, value, cu_seqlens: torch.Tensor, cu_name: str) -> None:
    """flash-attn sizes its grid by max_seqlen: one below the longest sequence is a caller's bug."""
    if not check._is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if value < longest:
        raise ValueError(f"{name} must be at least the longest sequence in {cu_name} ({longest}), got {value}")


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
):
    """flash-attn 2's ``flash_attn_varlen_func`` on ``fmkernels.attention`` with cu_seqlens.

    Sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] against
    k[cu_seqlens_k[b]:cu_seqlens_k[b+1]]; ``causal`` aligns each sequence's mask
    bottom-right, as ``flash_attn_func`` draws it.

    Parameters
    ----------
    q : Tensor (total_q, nheads, headdim)
    k, v : Tensor (total_k, nheads_k, headdim)
    cu_seqlens_q, cu_seqlens_k : Tensor (batch + 1,) int32
        Cumulative sequence lengths, from 0 to total_q (total_k).
    max_seqlen_q, max_seqlen_k : int
        At least the longest query (key) sequence; checked against cu_seqlens, which costs
        a device-to-host copy (``fmkernels.attention`` makes one anyway to check cu_seqlens).
        A larger value is allowed, as in flash-attn.
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
    return_attn_probs
        As ``flash_attn_func``.
    block_table : None
        A paged KV cache is not supported here; ``flash_attn_with_kvcache`` takes one.
    backend : str, keyword-only
        As ``fmkernels.attention``.

    Returns
    -------
    out : Tensor (total_q, nheads, headdim), q's dtype.
    softmax_lse : Tensor float32 (nheads, total_q); only with ``return_attn_probs``.
    S_dmask : Tensor, empty; only with ``return_attn_probs``.
    """
    function = "flash_attn_varlen_func"
    _require_no_dropout(function, dropout_p)
    _require_flash_features(function, window_size, softcap, alibi_slopes)
    if block_table is not None:
        raise _unsupported(function, "block_table", block_table,
                           "for a paged KV cache use fmkernels.compat.flash_attn_with_kvcache")
    check.require_bool("deterministic", deterministic)
    check.require_bool("return_attn_probs", return_attn_probs)
    for name, tensor in (("q", q), ("k", k)):
        check.require_tensor(name, tensor)
        check.require_rank(name, tensor, 3, _FLASH_PACKED)
    for name, offsets, tensor in (("cu_seqlens_q", cu_seqlens_q, q), ("cu_seqlens_k", cu_seqlens_k, k)):
        check.require_cu_seqlens(name, offsets, q.device)
        check.require_cu_seqlens_values(name, offsets, tensor.shape[0])
    _require_max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q, "cu_seqlens_q")
    _require_max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k, "cu_seqlens_k")
    result = attention(
        q, k, v, causal=causal, scale=softmax_scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        return_lse=return_attn_probs, backend=backend,
    )
    return _flash_outputs(result, return_attn_probs, q)


def _cache_lengths(cache_seqlens, batch: int, capacity: int, has_new: bool, device: torch.device) -> torch.Tensor:
    """flash-attn's cache_seqlens (an int, a (batch,) int32 tensor, or None for a full cache) as a tensor."""
    if cache_seqlens is None:
        if has_new:
            raise ValueError("cache_seqlens must be given with k and v: it says where the new tokens go, got None")
        return torch.full((batch,), capacity, dtype=torch.int32, device=device)
    if check._is_int(cache_seqlens):
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int, a torch.Tensor or None, got {type(cache_seqlens).__name__}")
    require_seqlens(cache_seqlens, batch, device)
    return cache_seqlens


def _cache_rows(k_cache: torch.Tensor, cache_batch_idx, batch: int, device: torch.device) -> Optional[torch.Tensor]:
    """For a contiguous cache, which of its rows each sequence uses, as a block table of one
    block per sequence (a row of (batch_cache, seqlen_cache, ...) is a page of seqlen_cache
    slots); None where sequence b uses row b."""
    if cache_batch_idx is None:
        if k_cache.shape[0] != batch:
            raise ValueError(
                f"a contiguous k_cache {CONTIGUOUS} must have q's batch {batch} unless cache_batch_idx "
                f"picks its rows, got shape {tuple(k_cache.shape)}"
            )
        return None
    check.require_index_tensor("cache_batch_idx", cache_batch_idx, (batch,), "(batch,)")
    if cache_batch_idx.device != device:
        raise ValueError(f"cache_batch_idx must be on {device}, got {cache_batch_idx.device}")
    outside = (cache_batch_idx < 0) | (cache_batch_idx >= k_cache.shape[0])
    if outside.any():
        b = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"cache_batch_idx[{b}] = {int(cache_batch_idx[b])} is outside the cache's {k_cache.shape[0]} rows"
        )
    return cache_batch_idx[:, None]


def _require_query(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    """What decode_attention checks of q, checked before append_kv writes anything."""
    check.require_tensor("q", q)
    check.require_dtype("q", q, check.FLOAT_DTYPES)
    check.require_rank("q", q, 4, _FLASH_DENSE)
    if q.shape[1] == 0:
        raise ValueError(f"q must hold at least one query per sequence, got shape {tuple(q.shape)}")
    check.require_tensor("k_cache", k_cache)
    check.require_rank("k_cache", k_cache, 4, f"{CONTIGUOUS}, or {PAGED} with block_table")
    check.require_same_dtype(("q", "k_cache"), (q, k_cache))
    check.require_same_device(("q", "k_cache"), (q, k_cache))
    nheads, headdim = q.shape[2:]
    nheads_k = k_cache.shape[2]
    if k_cache.shape[3] != headdim:
        raise ValueError(f"k_cache must have q's headdim {headdim}, got {k_cache.shape[3]}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"q's nheads must be a multiple of the cache's nheads_k, got {nheads} and {nheads_k}")


def _require_readable(k_cache, table, lengths: torch.Tensor, seqlen_q: int, causal: bool) -> None:
    """Before append_kv writes: every position attended to lies in the cache (and its blocks
    in the pool), and every query sees a key, as decode_attention needs: under the causal
    mask, each sequence's cache must hold at least its seqlen_q queries' positions."""
    lengths = lengths.cpu()
    ends = lengths.tolist()
    require_positions(k_cache, [0] * len(ends), ends, table, "cache_seqlens + seqlen_new")
    least = seqlen_q if causal else 1
    short = lengths < least
    if short.any():
        b = int(short.nonzero()[0, 0])
        what = f"at least seqlen_q = {seqlen_q} tokens with causal=True" if causal else "at least one token"
        raise ValueError(
            f"sequence {b}'s cache must hold {what} (cache_seqlens + the new k's seqlen), got "
            f"{int(lengths[b])}; fmkernels does not compute queries that see no key, where flash-attn "
            "returns zeros"
        )


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    backend: str = "auto",
):
    """flash-attn 2's ``flash_attn_with_kvcache`` on ``fmkernels.append_kv`` and ``decode_attention``.

    If k and v are given, they are written into k_cache and v_cache in place at positions
    cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 (``append_kv``); then q attends to
    each sequence's first cache_seqlens[b] + seqlen_new positions. ``cache_seqlens`` itself
    is not changed (as in flash-attn): advance it yourself. With ``causal`` the mask is
    aligned bottom-right: with 5 tokens in the cache after the append and seqlen_q = 2::

        cache  0 1 2 3 4
        q0     1 1 1 1 0
        q1     1 1 1 1 1

    Without ``causal`` every query sees all of its sequence's tokens; for seqlen_q > 1 that
    runs decode_attention once per query (the cache is read seqlen_q times).

    Parameters
    ----------
    q : Tensor (batch, seqlen_q, nheads, headdim)
        float32, float16 or bfloat16.
    k_cache, v_cache : Tensor
        Contiguous (batch_cache, seqlen_cache, nheads_k, headdim), or paged
        (num_blocks, page_block_size, nheads_k, headdim) with ``block_table``; q's dtype.
        Any page_block_size (flash-attn needs a multiple of 256).
    k, v : Tensor (batch, seqlen_new, nheads_k, headdim), optional
        New keys and values, appended in place. Give both or neither.
    rotary_cos, rotary_sin : None
        Rotary embeddings are not supported: rotate q and k before the call.
    cache_seqlens : int, Tensor (batch,) int32, or None
        Tokens in each sequence's cache before the new k, v are appended. None (only
        without k, v) means the whole cache: seqlen_cache, or max_num_blocks x page_block_size.
    cache_batch_idx : Tensor (batch,) int32, optional
        Contiguous cache only: sequence b uses cache row cache_batch_idx[b] (default b). If an
        index repeats and k, v are given, which sequence's values are written is unspecified,
        as in flash-attn.
    cache_leftpad : None
        Left-padded caches are not supported.
    block_table : Tensor (batch, max_num_blocks_per_seq) int32, optional
        Paged cache: position p of sequence b is in block block_table[b, p // page_block_size].
    softmax_scale : float, optional
        Default 1 / sqrt(headdim).
    causal : bool
        Bottom-right causal mask over the cache.
    window_size, softcap, alibi_slopes
        Must be (-1, -1), 0.0 and None.
    rotary_interleaved : bool
        Accepted; it only concerns rotary embeddings.
    num_splits : int
        Accepted (>= 0) and ignored: fmkernels' backends choose their own split of the cache.
    return_softmax_lse : bool
        Also return the log-sum-exp.
    backend : str, keyword-only
        "auto" or an implementation's name, for both append_kv and decode_attention.

    Returns
    -------
    out : Tensor (batch, seqlen_q, nheads, headdim), q's dtype.
    softmax_lse : Tensor float32 (batch, nheads, seqlen_q); only with ``return_softmax_lse``.

    Every query must see at least one token: with ``causal``, each sequence holds at least
    seqlen_q tokens after the append; otherwise at least one (flash-attn would return zeros
    for the others; this raises).
    """
    function = "flash_attn_with_kvcache"
    _require_flash_features(function, window_size, softcap, alibi_slopes)
    for name, value in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if value is not None:
            raise _unsupported(function, name, value, "rotary embeddings are not supported: rotate q and k first")
    if cache_leftpad is not None:
        raise _unsupported(function, "cache_leftpad", cache_leftpad, "left-padded caches are not supported")
    check.require_bool("causal", causal)
    check.require_bool("rotary_interleaved", rotary_interleaved)
    check.require_bool("return_softmax_lse", return_softmax_lse)
    if not check._is_int(num_splits):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0: automatic), got {num_splits}")
    if (k is None) != (v is None):
        raise ValueError(f"k and v must be given together, got k={check.shown(k)} and v={check.shown(v)}")
    check.require_scale(softmax_scale)
    _require_query(q, k_cache)
    batch, seqlen_q = q.shape[:2]
    if k is not None:
        check.require_tensor("k", k)
        check.require_rank("k", k, 4, "(batch, seqlen_new, nheads_k, headdim)")
        if k.shape[0] != batch:
            raise ValueError(f"k must have q's batch {batch}, got shape {tuple(k.shape)}")

    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx picks rows of a contiguous cache; with block_table (a paged "
                             f"cache) give each sequence its blocks instead, got {check.shown(cache_batch_idx)}")
        require_block_table(block_table, batch, q.device)
        table = block_table
        capacity = k_cache.shape[1] * block_table.shape[1]
    else:
        table = _cache_rows(k_cache, cache_batch_idx, batch, q.device)
        capacity = k_cache.shape[1]
    lengths = _cache_lengths(cache_seqlens, batch, capacity, k is not None, q.device)
    negative = lengths < 0
    if negative.any():
        b = int(negative.nonzero()[0, 0])
        raise ValueError(f"cache_seqlens[{b}] must be >= 0, got {int(lengths[b])}")
    seqlen_new = 0 if k is None else k.shape[1]
    _require_readable(k_cache, table, lengths + seqlen_new, seqlen_q, causal)
    if k is not None:
        append_kv(k_cache, v_cache, k, v, lengths, block_table=table, backend=backend)
        lengths = lengths + seqlen_new

    if causal or seqlen_q == 1:
        result = decode_attention(q, k_cache, v_cache, lengths, block_table=table, scale=softmax_scale,
                                  return_lse=return_softmax_lse, backend=backend)
        out, lse = result if return_softmax_lse else (result, None)
    else:
        # Each query as its own sequence of one token, which sees every position (bottom-right
        # with n_new = 1); a contiguous cache's rows serve as one-block pages.
        if table is None:
            table = torch.arange(batch, dtype=torch.int32, device=q.device)[:, None]
        nheads, headdim = q.shape[2:]
        result = decode_attention(
            q.reshape(batch * seqlen_q, 1, nheads, headdim), k_cache, v_cache,
            lengths.repeat_interleave(seqlen_q), block_table=table.repeat_interleave(seqlen_q, dim=0),
            scale=softmax_scale, return_lse=return_softmax_lse, backend=backend,
        )
        out, lse = result if return_softmax_lse else (result, None)
        out = out.reshape(batch, seqlen_q, nheads, headdim)
        if lse is not None:
            lse = lse.reshape(batch, seqlen_q, nheads).transpose(1, 2).contiguous()  # [B, nheads, seqlen_q]
    return out if lse is None else (out, _flash_lse(lse))


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on ``fmkernels.attention``.

    torch's layout, heads before the sequence: (batch, heads, seqlen, head_dim), or unbatched
    (heads, seqlen, head_dim). ``is_causal`` is torch's top-left mask, query i sees keys
    j <= i, which is not fmkernels' (and flash-attn's) bottom-right ``causal``, query i sees
    keys j <= i + seqlen_k - seqlen_q. For seqlen_q = 2, seqlen_k = 5::

        is_causal (top-left)      fmkernels causal (bottom-right)
        keys  0 1 2 3 4           keys  0 1 2 3 4
        q0    1 0 0 0 0           q0    1 1 1 1 0
        q1    1 1 0 0 0           q1    1 1 1 1 1

    and for seqlen_q = 4, seqlen_k = 2 (queries past seqlen_k see every key)::

        is_causal (top-left)      fmkernels causal (bottom-right)
        keys  0 1                 keys  0 1
        q0    1 0                 q0    0 0
        q1    1 1                 q1    0 0
        q2    1 1                 q2    1 0
        q3    1 1                 q3    1 1

    The two agree when seqlen_q == seqlen_k. Here top-left is computed as bottom-right over
    the first seqlen_q keys when seqlen_q <= seqlen_k; otherwise the first seqlen_k queries
    causally (square) and the rest over every key.

    Parameters
    ----------
    query : Tensor (batch, heads, seqlen_q, head_dim) or (heads, seqlen_q, head_dim)
        float32, float16 or bfloat16.
    key, value : Tensor (batch, kv_heads, seqlen_k, head_dim) or (kv_heads, seqlen_k, head_dim)
        query's rank, dtype and device; value's shape is key's (no broadcasting).
    attn_mask : None
        Attention masks are not supported: use ``is_causal``, or ``fmkernels.attention``.
    dropout_p : float
        Must be 0.0.
    is_causal : bool
        torch's top-left causal mask.
    scale : float, optional
        Default 1 / sqrt(head_dim).
    enable_gqa : bool
        As torch: kv_heads may differ from heads (heads a multiple of kv_heads) only with True.
    backend : str, keyword-only
        As ``fmkernels.attention``.

    Returns
    -------
    Tensor, query's shape and dtype (a transposed view of fmkernels' (batch, seqlen, heads,
    head_dim) output).
    """
    function = "scaled_dot_product_attention"
    if attn_mask is not None:
        raise _unsupported(function, "attn_mask", attn_mask,
                           "use is_causal, or fmkernels.attention(causal=True) for a bottom-right mask")
    _require_no_dropout(function, dropout_p)
    check.require_bool("is_causal", is_causal)
    check.require_bool("enable_gqa", enable_gqa)
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        check.require_tensor(name, tensor)
    check.require_dtype("query", query, check.FLOAT_DTYPES)
    if query.dim() not in (3, 4):
        raise ValueError(f"query must be {_TORCH_LAYOUT}, got shape {tuple(query.shape)}")
    for name, tensor in (("key", key), ("value", value)):
        check.require_rank(name, tensor, query.dim(), f"like query, {_TORCH_LAYOUT}")
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if value.shape[-3] != kv_heads:
        raise ValueError(f"value must have key's {kv_heads} heads, got shape {tuple(value.shape)}")
    if heads != kv_heads and not enable_gqa:
        raise ValueError(
            f"query has {heads} heads and key {kv_heads}: pass enable_gqa=True for grouped-query attention "
            "(torch requires it too)"
        )
    unbatched = query.dim() == 3
    q, k, v = ((t[None] if unbatched else t).transpose(1, 2) for t in (query, key, value))  # [B, S, H, D]
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    options = dict(scale=scale, backend=backend)
    if not is_causal:
        out = attention(q, k, v, **options)
    elif seqlen_q <= seqlen_k:
        out = attention(q, k[:, :seqlen_q], v[:, :seqlen_q], causal=True, **options)
    else:
        square = attention(q[:, :seqlen_k], k, v, causal=True, **options)
        past_keys = attention(q[:, seqlen_k:], k, v, **options)
        out = torch.cat((square, past_keys), dim=1)
    out = out.transpose(1, 2)
    return out[0] if unbatched else out
