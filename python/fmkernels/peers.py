"""Peers: other libraries' kernels, registered beside fmkernels' own so that ``fmkernels
check`` holds them to the same reference and ``fmkernels bench`` times them in the same run.

``sdpa``: torch.nn.functional.scaled_dot_product_attention (whatever backend torch picks
for the device), for dense attention and decode against a contiguous cache. Its
``is_causal`` aligns the mask top-left, so a causal call with seqlen_q != seqlen_k passes
an explicit bottom-right mask instead.

On CUDA, each of SDPA's own backends is also a peer of its own, pinned with
``torch.nn.attention.sdpa_kernel``: ``sdpa_flash`` (FlashAttention-2), ``sdpa_cudnn``
(cuDNN's fused attention), ``sdpa_efficient`` (memory-efficient attention) and
``sdpa_math`` (the unfused composite of matmuls and softmax). A case a pinned backend
cannot run (its dtype, head_dim, GQA or mask) is a skip, not an error.

``flash_attn`` (flash-attn 2) and ``flashinfer`` join them when those packages are
installed; their adapters are in ``fmkernels.peer_libraries``.

``torch_linear``: torch.nn.functional.linear in the inputs' dtype, torch's own matmul
(oneDNN or MKL on the CPU, cuBLAS on a GPU), the peer of ``linear``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import peer_libraries, reference, registry

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch: only the unpinned sdpa peer
    SDPBackend = sdpa_kernel = None
try:  # torch >= 2.3: a bottom-right causal mask the flash and efficient backends take
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # pragma: no cover
    causal_lower_right = None

#: The pinned CUDA peers: name -> the SDPBackend member's name.
PINNED_SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}

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
    if causal and seqlen_q == 1:
        causal = False  # one query at the bottom right sees every key
    if causal and seqlen_q != seqlen_k:
        return _sdpa(q, k, v, attn_mask=reference.causal_mask(seqlen_q, seqlen_k, q.device), scale=scale)
    return _sdpa(q, k, v, is_causal=causal, scale=scale)


def _pinned_sdpa_attention(backend_name: str):
    """sdpa_attention restricted to one of SDPA's CUDA backends."""
    backend = getattr(SDPBackend, backend_name)

    def attention(q, k, v, *, causal=False, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False):
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        if causal and seqlen_q == 1:
            causal = False
        mask, is_causal = None, causal
        if causal and seqlen_q != seqlen_k:
            if causal_lower_right is None or backend_name == "CUDNN_ATTENTION":
                raise NotImplementedError(f"SDPA's {backend_name} backend takes no bottom-right causal mask here")
            mask, is_causal = causal_lower_right(seqlen_q, seqlen_k), False
        with sdpa_kernel([backend]):
            try:
                return _sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
            except RuntimeError as exc:
                if "No available kernel" not in str(exc):
                    raise
                raise NotImplementedError(f"SDPA's {backend_name} backend cannot run this case") from None

    return attention


def _pinned_sdpa_decode_attention(attention):
    """Decode through a pinned backend: one call when every sequence has the same length."""

    def decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, return_lse=False):
        lengths = cache_seqlens.tolist()
        if len(set(lengths)) != 1:
            raise NotImplementedError("pinned SDPA peers time decode on sequences of one length only")
        return attention(q, k_cache[:, : lengths[0]], v_cache[:, : lengths[0]], causal=True, scale=scale)

    return decode_attention


@functools.lru_cache(maxsize=None)
def pinned_sdpa_unavailable_reason(name: str):
    """Why the pinned peer ``name`` cannot run here (no GPU, torch without that backend), or None."""
    if sdpa_kernel is None:
        return "torch < 2.3 has no torch.nn.attention.sdpa_kernel"
    if not hasattr(SDPBackend, PINNED_SDPA_BACKENDS[name]):
        return f"this torch has no SDPBackend.{PINNED_SDPA_BACKENDS[name]}"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if name == "sdpa_flash" and not torch.backends.cuda.is_flash_attention_available():
        return "this torch was built without the flash backend"
    if name == "sdpa_cudnn" and not torch.backends.cudnn.is_available():
        return "this torch has no cuDNN"
    return None


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


def torch_linear(x, weight):
    """x @ weight^T by ``torch.nn.functional.linear``, in x's dtype."""
    return F.linear(x, weight)


def torch_linear_supports(x, weight, **_):
    if not isinstance(weight, torch.Tensor):
        return "a QuantizedWeight: F.linear takes float weights (dequantize it first)"
    return None


def register_all() -> None:
    peer_libraries.register_all()
    registry.register_impl("linear", "torch_linear", torch_linear, torch_linear_supports, kind="peer")
    registry.register_impl("attention", "sdpa", sdpa_attention, sdpa_attention_supports, kind="peer")
    registry.register_impl(
        "decode_attention", "sdpa", sdpa_decode_attention, sdpa_decode_attention_supports, kind="peer"
    )
    if sdpa_kernel is None:
        return
    for name, backend_name in PINNED_SDPA_BACKENDS.items():
        available = functools.partial(pinned_sdpa_unavailable_reason, name)
        attention = _pinned_sdpa_attention(backend_name)
        registry.register_impl(
            "attention", name, attention, sdpa_attention_supports,
            available=available, devices=("cuda",), kind="peer",
        )
        registry.register_impl(
            "decode_attention", name, _pinned_sdpa_decode_attention(attention), sdpa_decode_attention_supports,
            available=available, devices=("cuda",), kind="peer",
        )
