"""fmkernels.append_kv: write new keys and values into a contiguous or paged KV cache."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as check
from ._dispatch import require_backend, run
from .._signature import SignatureCache, check_once
from ._library import call
from ._kv_cache import require_block_table, require_cache, require_positions, require_seqlens


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> None:
    """Write k, v into the caches at each sequence's current length, in place.

    Sequence b's n_new tokens go to positions cache_seqlens[b] .. cache_seqlens[b] + n_new - 1.
    ``cache_seqlens`` is read, not advanced: add n_new to it afterwards (decode_attention
    then counts the new tokens).

    Parameters
    ----------
    k_cache, v_cache : Tensor
        Contiguous (batch, max_seqlen, kv_heads, head_dim), or paged
        (num_blocks, block_size, kv_heads, head_dim) with ``block_table``. Written in place.
    k, v : Tensor (batch, n_new, kv_heads, head_dim)
        The new keys and values, in the cache's dtype and on its device.
    cache_seqlens : Tensor (batch,) int32
        Current lengths; cache_seqlens[b] + n_new must fit in the cache (checked; on a GPU
        unless ``fmkernels.device_checks(False)``, and then a sequence whose tokens do not
        fit, or whose block is outside the pool, is not written).
    block_table : Tensor (batch, max_blocks) int32, optional
        For a paged cache: position p of sequence b lives in block block_table[b, p // block_size],
        slot p % block_size. Each block written must be inside the pool.
    backend : str
        "auto" or an implementation's name.
    """
    key = check_once(_CHECKED, _require_arguments, (k_cache, v_cache, k, v, cache_seqlens, block_table, backend))
    call(_append_kv_op, _execute, key, k_cache, v_cache, k, v, cache_seqlens, block_table, backend)


# Signatures of calls whose arguments passed ``_require_arguments``.
_CHECKED = SignatureCache()


def _require_arguments(k_cache, v_cache, k, v, cache_seqlens, block_table, backend) -> None:
    """append_kv's checks of what its arguments' metadata says."""
    for name, tensor in (("k", k), ("v", v)):
        check.require_tensor(name, tensor)
    check.require_rank("k", k, 4, "(batch, n_new, kv_heads, head_dim)")
    check.require_shape("v", v, k.shape, "(k's shape)")
    batch = k.shape[0]
    paged = block_table is not None
    require_cache(k_cache, v_cache, batch, paged)
    # An expanded cache maps many positions to one element: writes would race and overwrite each other.
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if any(stride == 0 and size > 1 for size, stride in zip(cache.shape, cache.stride())):
            raise ValueError(
                f"{name} must not have a stride-0 (expanded) dimension, it is written in place; "
                f"got shape {tuple(cache.shape)}, strides {cache.stride()}"
            )
    check.require_same_dtype(("k_cache", "k", "v"), (k_cache, k, v))
    check.require_same_device(("k_cache", "v_cache", "k", "v"), (k_cache, v_cache, k, v))
    if tuple(k.shape[2:]) != tuple(k_cache.shape[2:]):
        raise ValueError(
            f"k must have the cache's (kv_heads, head_dim) {tuple(k_cache.shape[2:])}, got {tuple(k.shape[2:])}"
        )
    require_seqlens(cache_seqlens, batch, k.device)
    if paged:
        require_block_table(block_table, batch, k.device)
    require_backend(backend)


@torch.library.custom_op("fmkernels::append_kv", mutates_args=("k_cache", "v_cache"))
def _append_kv_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: Optional[torch.Tensor],
    backend: str,
) -> None:
    """Writes the caches in place."""
    _execute(k_cache, v_cache, k, v, cache_seqlens, block_table, backend)


def _execute(k_cache, v_cache, k, v, cache_seqlens, block_table, backend, key=None) -> None:
    """The custom op's implementation (``key``: the call's signature, see ``_library.call``).
    The positions are checked against the cache where ``checks_values`` allows (on a GPU that
    synchronises); the kernels skip positions past the capacity and blocks outside the pool
    whatever the values."""
    if check.checks_values(cache_seqlens):
        starts = cache_seqlens.tolist()
        n_new = k.shape[1]
        require_positions(k_cache, starts, [start + n_new for start in starts], block_table, "cache_seqlens + n_new")
    run("append_kv", backend, dict(
        k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens, block_table=block_table,
    ), key)


@_append_kv_op.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens, block_table, backend):
    return None
