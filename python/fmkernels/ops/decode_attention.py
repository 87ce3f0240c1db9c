"""fmkernels.decode_attention: attention of a few new tokens against a KV cache."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _validation as check
from ._dispatch import into_out, require_backend, run
from .._signature import SignatureCache, check_once
from ._library import call
from ._kv_cache import require_block_table, require_cache, require_positions, require_seqlens


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
):
    """Attention of n_new >= 1 new queries per sequence against its KV cache (decode, or a prefill chunk).

    The new tokens' keys and values are already in the cache (``append_kv``), and
    ``cache_seqlens[b]`` counts them. Query i of n_new sees cache positions
    j <= i + cache_seqlens[b] - n_new (causal, bottom-right). With cache_seqlens[b] = 5
    and n_new = 2::

        cache  0 1 2 3 4
        q0     1 1 1 1 0
        q1     1 1 1 1 1

    Parameters
    ----------
    q : Tensor (batch, n_new, q_heads, head_dim)
        float32, float16 or bfloat16.
    k_cache, v_cache : Tensor
        Contiguous (batch, max_seqlen, kv_heads, head_dim), or paged
        (num_blocks, block_size, kv_heads, head_dim) with ``block_table``; q's dtype.
    cache_seqlens : Tensor (batch,) int32
        Tokens in each sequence's cache, the n_new new ones included:
        n_new <= cache_seqlens[b] <= capacity (checked; on a GPU unless
        ``fmkernels.device_checks(False)``, and the kernels clamp them into the cache anyway).
    block_table : Tensor (batch, max_blocks) int32, optional
        Sequence b's position p lives in block block_table[b, p // block_size], slot
        p % block_size. Entries past a sequence's length are not read.
    scale : float, optional
        Default 1 / sqrt(head_dim).
    return_lse : bool
        Also return the log-sum-exp, float32 (batch, q_heads, n_new).
    backend : str
        "auto" or an implementation's name.
    out : Tensor, optional
        Buffer for the output, shaped and typed like q; it is the tensor returned.

    Returns
    -------
    out : Tensor (batch, n_new, q_heads, head_dim), q's dtype; and lse with ``return_lse``.
    """
    key = check_once(_CHECKED, _require_arguments,
                     (q, k_cache, v_cache, cache_seqlens, block_table, scale, return_lse, backend, out))
    output, lse = call(
        _decode_attention_op, _execute, key,
        q, k_cache, v_cache, cache_seqlens, block_table, None if scale is None else float(scale), return_lse, backend,
    )
    output = into_out(output, out)
    return (output, lse) if return_lse else output


# Signatures of calls whose arguments passed ``_require_arguments``.
_CHECKED = SignatureCache()


def _require_arguments(q, k_cache, v_cache, cache_seqlens, block_table, scale, return_lse, backend, out) -> None:
    """decode_attention's checks of what its arguments' metadata says."""
    check.require_tensor("q", q)
    check.require_dtype("q", q, check.FLOAT_DTYPES)
    check.require_rank("q", q, 4, "(batch, n_new, q_heads, head_dim)")
    batch, n_new, q_heads, head_dim = q.shape
    if n_new == 0:
        raise ValueError(f"q must hold at least one new token (n_new >= 1), got shape {tuple(q.shape)}")
    paged = block_table is not None
    require_cache(k_cache, v_cache, batch, paged)
    check.require_same_dtype(("q", "k_cache"), (q, k_cache))
    check.require_same_device(("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must have q's head_dim {head_dim}, got {k_cache.shape[3]}")
    if head_dim == 0:
        raise ValueError(f"head_dim must be positive, got q shape {tuple(q.shape)}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"q_heads must be a multiple of kv_heads for GQA/MQA, got q_heads={q_heads}, kv_heads={kv_heads}"
        )
    require_seqlens(cache_seqlens, batch, q.device)
    if paged:
        require_block_table(block_table, batch, q.device)
    check.require_scale(scale)
    check.require_bool("return_lse", return_lse)
    check.require_out(out, q.shape, q.dtype, q.device)
    require_backend(backend)


def require_cache_seqlens_values(cache_seqlens: torch.Tensor, n_new: int, k_cache, block_table) -> None:
    """n_new <= cache_seqlens[b] <= capacity, and the blocks holding them inside the pool
    (one read of the lengths, on the host)."""
    lengths = cache_seqlens.tolist()
    if lengths and min(lengths) < n_new:
        b = next(b for b, length in enumerate(lengths) if length < n_new)
        raise ValueError(
            f"cache_seqlens[{b}] must count the {n_new} new tokens already in the cache (>= n_new), "
            f"got {lengths[b]}"
        )
    require_positions(k_cache, [0] * len(lengths), lengths, block_table, "cache_seqlens")


@torch.library.custom_op("fmkernels::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: Optional[torch.Tensor],
    scale: Optional[float],
    return_lse: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse); lse is empty (0,) without ``return_lse``."""
    output, lse = _execute(q, k_cache, v_cache, cache_seqlens, block_table, scale, return_lse, backend)
    return output, q.new_empty((0,), dtype=torch.float32) if lse is None else lse


def _execute(q, k_cache, v_cache, cache_seqlens, block_table, scale, return_lse, backend, key=None):
    """The custom op's implementation (``key``: the call's signature, see ``_library.call``):
    (out, lse), lse None without ``return_lse``.
    The cache lengths are checked against the cache where ``checks_values`` allows (on a GPU
    that synchronises); the kernels clamp each length into [0, capacity] and skip blocks
    outside the pool whatever the values."""
    if check.checks_values(cache_seqlens):
        require_cache_seqlens_values(cache_seqlens, q.shape[1], k_cache, block_table)
    case = dict(
        q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
        block_table=block_table, scale=scale, return_lse=return_lse,
    )
    result = run("decode_attention", backend, case, key)
    if return_lse:
        output, lse = result
        return output.contiguous(), lse.contiguous()
    return result.contiguous(), None


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, scale, return_lse, backend):
    batch, n_new, q_heads, _ = q.shape
    lse_shape = (batch, q_heads, n_new) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)
