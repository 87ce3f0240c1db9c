"""fmkernels.attention: fused attention over whole sequences (prefill)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _validation as check
from ._dispatch import into_out, require_backend, run
from .._signature import SignatureCache, check_once
from ._library import call

_DENSE = "(batch, seqlen, heads, head_dim)"
_PACKED = "(total_tokens, heads, head_dim)"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
):
    """Scaled dot-product attention, softmax(q k^T * scale) v, with fp32 accumulation.

    GQA/MQA: query head h reads KV head h // (q_heads // kv_heads), without copying.
    With ``causal``, the mask is aligned to the bottom-right corner: query i of
    seqlen_q sees keys j <= i + (seqlen_k - seqlen_q). For seqlen_q = 2, seqlen_k = 5::

        keys  0 1 2 3 4
        q0    1 1 1 1 0
        q1    1 1 1 1 1

    and for seqlen_q = 5, seqlen_k = 2 the first three queries see no key (their
    output is 0 and their log-sum-exp is -inf)::

        keys  0 1
        q0    0 0
        q1    0 0
        q2    0 0
        q3    1 0
        q4    1 1

    (torch SDPA's ``is_causal`` aligns to the top-left instead.)

    Parameters
    ----------
    q : Tensor (batch, seqlen_q, q_heads, head_dim), or (total_q, q_heads, head_dim) packed
        float32, float16 or bfloat16.
    k, v : Tensor (batch, seqlen_k, kv_heads, head_dim), or (total_k, kv_heads, head_dim) packed
        Same dtype and device as q; q_heads must be a multiple of kv_heads.
    causal : bool
        Apply the bottom-right causal mask (per sequence for packed input).
    scale : float, optional
        Multiplies q k^T; default 1 / sqrt(head_dim).
    cu_seqlens_q, cu_seqlens_k : Tensor (batch + 1,) int32, optional
        Cumulative sequence lengths of packed (varlen) input: sequence b is
        q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]. Give both or neither.
    return_lse : bool
        Also return the log-sum-exp of the scaled scores.
    backend : str
        "auto" (the fastest that supports the case), or an implementation's name
        ("reference", "cpu", "triton", "cuda", a peer's or your own).
    out : Tensor, optional
        Buffer for the output, shaped and typed like q; it is the tensor returned.

    Returns
    -------
    out : Tensor, q's shape and dtype.
    lse : Tensor float32 (batch, q_heads, seqlen_q), or (q_heads, total_q) packed;
        only with ``return_lse``.
    """
    key = check_once(_CHECKED, _require_arguments,
                     (q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, return_lse, backend, out))
    output, lse = call(
        _attention_op, _execute, key,
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal, None if scale is None else float(scale), return_lse, backend,
    )
    output = into_out(output, out)
    return (output, lse) if return_lse else output


# Signatures of calls whose arguments passed ``_require_arguments``.
_CHECKED = SignatureCache()


def _require_arguments(q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, return_lse, backend, out) -> None:
    """attention's checks of what its arguments' metadata says."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check.require_tensor(name, tensor)
    check.require_dtype("q", q, check.FLOAT_DTYPES)
    check.require_same_dtype(("q", "k", "v"), (q, k, v))
    check.require_same_device(("q", "k", "v"), (q, k, v))
    check.require_bool("causal", causal)
    check.require_bool("return_lse", return_lse)
    check.require_scale(scale)

    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
            raise ValueError(f"packed (varlen) attention needs both cu_seqlens_q and cu_seqlens_k; {missing} is None")
        layout = _PACKED
        check.require_rank("q", q, 3, layout)
        check.require_rank("k", k, 3, layout)
        check.require_rank("v", v, 3, layout)
        check.require_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
        check.require_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(
                f"cu_seqlens_k must have the same length as cu_seqlens_q ({cu_seqlens_q.numel()}), "
                f"got {cu_seqlens_k.numel()}"
            )
    else:
        layout = _DENSE
        check.require_rank("q", q, 4, layout)
        check.require_rank("k", k, 4, layout)
        check.require_rank("v", v, 4, layout)
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k must have q's batch size {q.shape[0]}, got {k.shape[0]} (k shape {tuple(k.shape)})")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    q_heads, head_dim = q.shape[-2], q.shape[-1]
    kv_heads = k.shape[-2]
    if head_dim == 0:
        raise ValueError(f"head_dim must be positive, got q shape {tuple(q.shape)}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k must have q's head_dim {head_dim}, got {k.shape[-1]}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"q_heads must be a multiple of kv_heads for GQA/MQA, got q_heads={q_heads}, kv_heads={kv_heads}"
        )
    check.require_out(out, q.shape, q.dtype, q.device)

    require_backend(backend)


@torch.library.custom_op("fmkernels::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    causal: bool,
    scale: Optional[float],
    return_lse: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse); lse is empty (0,) without ``return_lse``."""
    output, lse = _execute(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, return_lse, backend)
    return output, q.new_empty((0,), dtype=torch.float32) if lse is None else lse


def _execute(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, return_lse, backend, key=None):
    """The custom op's implementation (``key``: the call's signature, see ``_library.call``):
    (out, lse), lse None without ``return_lse``."""
    if cu_seqlens_q is not None:
        # Varlen prefill reads the offsets on the host (the kernels size their grids from them).
        check.require_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0])
        check.require_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    case = dict(
        q=q, k=k, v=v, causal=causal, scale=scale,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_lse=return_lse,
    )
    result = run("attention", backend, case, key)
    if return_lse:
        output, lse = result
        return output.contiguous(), lse.contiguous()
    return result.contiguous(), None


@_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, return_lse, backend):
    if not return_lse:
        lse_shape = (0,)
    elif cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)
