"""Reference ops: plain PyTorch, fp32 math, written to be read.

These are the truth every backend is held to, and the model's CPU path. They
assume valid inputs; the public ops in ``fmkernels.ops`` validate before calling
them. Conventions (see DESIGN.md):

* q, k, v are (batch, seqlen, heads, head_dim); varlen input is packed
  (total_tokens, heads, head_dim) with int32 ``cu_seqlens`` of length batch + 1.
* GQA/MQA: query head h reads KV head h // (q_heads // kv_heads).
* Causal masks are bottom-right aligned: query i of Sq sees keys j <= i + (Sk - Sq).
  A query that sees no key returns zeros and a log-sum-exp of -inf.
* The log-sum-exp is fp32, natural log, (batch, heads, seqlen_q); (heads, total_q)
  for packed input, as flash-attn returns it.
* linear: x (..., K) @ weight^T with weight (N, K), nn.Linear's layout.
* Sampling: logits / temperature -> top-k -> top-p -> min-p -> draw, each filter
  applied to the distribution the previous one left. Temperature 0 is greedy.
* Random draws: Philox4x32-10 keyed by the row's seed, counter (token // 4, step
  low 32 bits, step high 32 bits, 0), word token % 4; the token is the argmax of
  filtered_logit - log(-log(u)) (the Gumbel-max trick), so a row's token depends
  only on its own logits, seed and step.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch

from .quantized import QuantizedWeight

Number = Union[int, float]
PerRow = Union[Number, torch.Tensor]


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------


def causal_mask(seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k), True where query i may see key j: j <= i + (Sk - Sq).

    For Sq = 3, Sk = 5 (queries are the last three positions)::

        keys   0 1 2 3 4
        q0     1 1 1 0 0
        q1     1 1 1 1 0
        q2     1 1 1 1 1
    """
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    return cols <= rows + (seqlen_k - seqlen_q)


def _attention_dense(q, k, v, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in fp32 (fp64 for fp64 inputs, the tight truth fmkernels.testing uses):
    q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq)."""
    group = q.shape[2] // k.shape[2]
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(math_dtype)
    kf = k.to(math_dtype).repeat_interleave(group, dim=2)  # [B, Sk, Hq, D]
    vf = v.to(math_dtype).repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale  # [B, Hq, Sq, Sk]
    if causal:
        visible = causal_mask(q.shape[1], k.shape[1], device=q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Sq]; -inf where a query sees no key
    probs = torch.exp(scores - lse[..., None])
    probs = torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(probs), probs)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)  # [B, Sq, Hq, D]
    return out, lse


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
):
    """softmax(q k^T * scale [+ causal mask]) v, in fp32 (fp64 for fp64 input), returned in q's dtype.

    q (batch, seqlen_q, q_heads, head_dim), k/v (batch, seqlen_k, kv_heads, head_dim);
    or packed q (total_q, q_heads, head_dim), k/v (total_k, kv_heads, head_dim) with
    cu_seqlens_q and cu_seqlens_k. Returns out, or (out, lse) with ``return_lse``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cu_seqlens_q is None:
        out, lse = _attention_dense(q, k, v, causal, scale)
    else:
        bounds_q = cu_seqlens_q.tolist()
        bounds_k = cu_seqlens_k.tolist()
        outs, lses = [], []
        for b in range(len(bounds_q) - 1):
            qb = q[bounds_q[b] : bounds_q[b + 1]][None]
            kb = k[bounds_k[b] : bounds_k[b + 1]][None]
            vb = v[bounds_k[b] : bounds_k[b + 1]][None]
            out_b, lse_b = _attention_dense(qb, kb, vb, causal, scale)
            outs.append(out_b[0])
            lses.append(lse_b[0])
        out = torch.cat(outs, dim=0)  # [total_q, Hq, D]
        lse = torch.cat(lses, dim=1)  # [Hq, total_q]
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def gather_cache(cache: torch.Tensor, b: int, length: int, block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """Sequence b's first ``length`` positions of a contiguous or paged cache: (length, kv_heads, head_dim)."""
    if block_table is None:
        return cache[b, :length]
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    blocks = block_table[b, :n_blocks].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Attention of n_new new queries per sequence against its KV cache.

    q (batch, n_new, q_heads, head_dim); the new tokens' keys and values are already
    in the cache, and cache_seqlens (int32, batch) counts them. Query i of n_new sees
    cache positions j <= i + cache_seqlens[b] - n_new (causal, bottom-right). The cache
    is contiguous (batch, max_seqlen, kv_heads, head_dim), or paged (num_blocks,
    block_size, kv_heads, head_dim) with block_table (int32, batch x max_blocks).
    Returns out (batch, n_new, q_heads, head_dim), and lse (batch, q_heads, n_new).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        kb = gather_cache(k_cache, b, length, block_table)[None]
        vb = gather_cache(v_cache, b, length, block_table)[None]
        out_b, lse_b = _attention_dense(q[b : b + 1], kb, vb, True, scale)
        outs.append(out_b)
        lses.append(lse_b)
    if outs:
        out, lse = torch.cat(outs).to(q.dtype), torch.cat(lses)
    else:
        out = torch.empty_like(q)
        lse = torch.empty(0, q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: Optional[torch.Tensor] = None,
) -> None:
    """Write k, v (batch, n_new, kv_heads, head_dim) at positions cache_seqlens[b] + [0, n_new).

    Contiguous cache: k_cache[b, pos]. Paged cache: k_cache[block_table[b, pos // block_size],
    pos % block_size]. cache_seqlens is read, not advanced.
    """
    n_new = k.shape[1]
    for b, start in enumerate(cache_seqlens.tolist()):
        positions = torch.arange(start, start + n_new, device=k_cache.device)
        if block_table is None:
            k_cache[b, start : start + n_new] = k[b]
            v_cache[b, start : start + n_new] = v[b]
        else:
            block_size = k_cache.shape[1]
            blocks = block_table[b].long()[positions // block_size]
            slots = positions % block_size
            k_cache[blocks, slots] = k[b]
            v_cache[blocks, slots] = v[b]


# ----------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ weight^T in fp32 (fp64 for fp64 inputs), returned in x's dtype.

    x (..., K), weight (N, K) as ``torch.nn.Linear`` holds it -> (..., N); a
    ``QuantizedWeight`` is dequantized as ggml does (``fmkernels.quantized.dequantize``).
    """
    math_dtype = torch.promote_types(x.dtype, torch.float32)
    if isinstance(weight, QuantizedWeight):
        weight = weight.dequantize()
    return (x.to(math_dtype) @ weight.to(math_dtype).T).to(x.dtype)


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------


def per_row(value: PerRow, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A scalar or a (batch,) tensor as a (batch,) tensor of ``dtype`` on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.full((batch,), value, dtype=dtype, device=device)


def filter_parameters(batch: int, device, temperature: PerRow, top_k: PerRow, top_p: PerRow, min_p: PerRow):
    """(temperature, top_k, top_p, min_p) as contiguous (batch,) tensors on ``device``:
    float32, int64, float32, float32."""
    return (
        per_row(temperature, batch, torch.float32, device).contiguous(),
        per_row(top_k, batch, torch.int64, device).contiguous(),
        per_row(top_p, batch, torch.float32, device).contiguous(),
        per_row(min_p, batch, torch.float32, device).contiguous(),
    )


def allowed_words(vocab: int) -> int:
    """The int32 words of an ``allowed`` bitmask row over ``vocab`` tokens: ceil(vocab / 32)."""
    return (vocab + 31) // 32


def unpack_allowed(allowed: torch.Tensor, vocab: int) -> torch.Tensor:
    """The packed token bitmask ``allowed`` (batch, ceil(vocab / 32)) int32 as a bool mask
    (batch, vocab): token t is allowed when bit t % 32 of word t // 32 is set (bits past the
    vocabulary are ignored)."""
    token = torch.arange(vocab, device=allowed.device)
    words = allowed[:, token // 32].to(torch.int64)  # int64: bit 31 stays a plain bit
    return ((words >> (token % 32)) & 1).bool()


def pack_allowed(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (batch, vocab) packed as ``allowed`` bitmask rows (batch, ceil(vocab / 32))
    int32, the layout ``unpack_allowed`` reads (and llguidance and xgrammar write)."""
    batch, vocab = mask.shape
    words = allowed_words(vocab)
    padded = torch.zeros((batch, words * 32), dtype=torch.int64, device=mask.device)
    padded[:, :vocab] = mask
    bits = (padded.view(batch, words, 32) << torch.arange(32, device=mask.device)).sum(dim=-1)
    return (bits - ((bits >> 31) << 32)).to(torch.int32)  # two's complement: bit 31 is the sign


def _filtered_logits_fp32(logits, temperature, top_k, top_p, min_p, allowed=None) -> torch.Tensor:
    """The DESIGN.md pipeline in fp32: (batch, vocab) scaled logits, -inf where removed."""
    batch, vocab = logits.shape
    device = logits.device
    temperature, top_k, top_p, min_p = filter_parameters(batch, device, temperature, top_k, top_p, min_p)
    if allowed is not None:
        # Disallowed tokens are -inf before any filter: every filter acts on the allowed ones.
        logits = logits.float().masked_fill(~unpack_allowed(allowed, vocab), float("-inf"))

    greedy = temperature == 0
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]

    # Tokens by descending logit; a stable sort breaks ties by lower token id.
    order = torch.sort(scaled, dim=-1, descending=True, stable=True).indices
    sorted_logits = scaled.gather(1, order)
    rank = torch.arange(vocab, device=device)[None, :]

    # top-k: the first k ranks (0 means off).
    k_eff = torch.where(top_k == 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    keep = rank < k_eff[:, None]

    # top-p: the shortest prefix whose mass reaches p, under the top-k survivors' distribution.
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)

    # min-p: tokens at least min_p times as likely as the most likely one.
    ratio = torch.exp(sorted_logits - sorted_logits[:, :1])
    keep &= ratio >= min_p[:, None]

    # Greedy rows keep only the first-ranked token (the lowest id among ties).
    keep = torch.where(greedy[:, None], rank == 0, keep)
    keep &= ~torch.isneginf(sorted_logits)
    keep[:, 0] = True  # at least one token survives every filter

    keep_by_token = torch.zeros_like(keep).scatter(1, order, keep)
    return scaled.masked_fill(~keep_by_token, float("-inf"))


def filter_logits(
    logits: torch.Tensor,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    min_p: PerRow = 0.0,
    allowed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Temperature-scaled logits (batch, vocab) with every token the filters remove set to -inf.

    Order: allowed -> logits / temperature -> top-k -> top-p -> min-p. ``allowed``, a packed
    int32 token bitmask (batch, ceil(vocab / 32)) (see ``unpack_allowed``), sets the tokens it
    does not allow to -inf first. top-k keeps exactly k tokens
    (ties by lower id); top-p keeps the smallest prefix by descending probability whose
    mass reaches p; min-p keeps tokens with probability >= min_p * the largest. Off values:
    top_k 0, top_p 1.0, min_p 0.0. Temperature 0 keeps only the argmax (unscaled).
    Each parameter is a scalar or a (batch,) tensor. Returned in logits' dtype.
    """
    return _filtered_logits_fp32(logits, temperature, top_k, top_p, min_p, allowed).to(logits.dtype)


_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for a 32-bit constant a and int64 tensor b < 2**32."""
    # a * b can reach 2**64 and overflow int64, so multiply by 16-bit halves of b.
    p_hi = a * (b >> 16)  # < 2**48
    p_lo = a * (b & 0xFFFF)  # < 2**48
    t = p_hi + (p_lo >> 16)  # a * b == t * 2**16 + (p_lo & 0xFFFF)
    low = ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    high = t >> 16
    return high, low


def philox4x32(counter: Tuple[torch.Tensor, ...], key: Tuple[torch.Tensor, torch.Tensor], rounds: int = 10):
    """Philox4x32 (Salmon et al., SC 2011) on int64 tensors holding 32-bit words.

    counter: four tensors, key: two tensors, broadcastable. Returns four tensors of words.
    """
    c0, c1, c2, c3 = (c & _MASK32 for c in counter)
    k0, k1 = (k & _MASK32 for k in key)
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform_draws(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """u[b, i] in (0, 1), fp32, for row seeds (batch,) and steps (batch,) (int64, >= 0).

    Token i uses word i % 4 of Philox4x32-10 with key (seed low, seed high) and counter
    (i // 4, step low, step high, 0); u = ((word >> 9) + 0.5) / 2**23, so u is in
    [2**-24, 1 - 2**-24]. (23 bits, not 24: (x + 0.5) for x >= 2**23 is not exact in fp32,
    and x = 2**24 - 1 rounded up to u = 1.0, whose Gumbel noise is +inf.)
    """
    seed = seed.long()[:, None]
    step = step.long()[:, None]
    groups = torch.arange((vocab + 3) // 4, device=seed.device, dtype=torch.int64)[None, :]
    zeros = torch.zeros_like(groups)
    words = philox4x32(
        (groups, step & _MASK32, step >> 32, zeros),
        (seed & _MASK32, seed >> 32),
    )
    words = torch.stack(words, dim=-1).reshape(seed.shape[0], 4 * groups.shape[1])[:, :vocab]  # [B, V]
    return ((words >> 9).float() + 0.5) * (1.0 / (1 << 23))


class SampleOutput(NamedTuple):
    """What ``sample(..., return_logprobs=True)`` returns.

    tokens (batch,) int64; logprobs (batch,) fp32, the chosen token's log-probability
    under the filtered distribution; top_ids (batch, num_logprobs) int64 and
    top_logprobs (batch, num_logprobs) fp32, the most likely tokens under it, best first.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


def row_seeds(seed: Optional[PerRow], batch: int, device) -> torch.Tensor:
    """Per-row seeds: a (batch,) tensor as given, an int s as s + row, None as a draw from torch's generator."""
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return seed + torch.arange(batch, device=device, dtype=torch.int64)


def sample(
    logits: torch.Tensor,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    min_p: PerRow = 0.0,
    seed: Optional[PerRow] = None,
    step: PerRow = 0,
    return_logprobs: bool = False,
    num_logprobs: int = 0,
    allowed: Optional[torch.Tensor] = None,
):
    """Draw one token per row of logits (batch, vocab) after ``filter_logits`` (with ``allowed``).

    Returns tokens (batch,) int64, or a ``SampleOutput`` with ``return_logprobs``.
    seed: a (batch,) int64 tensor of row seeds (a row's token then depends only on its
    own logits, seed and step), an int s (row b gets s + b), or None (drawn from
    torch's default generator). step: a scalar or (batch,) tensor, the decode step.
    """
    batch, vocab = logits.shape
    device = logits.device
    filtered = _filtered_logits_fp32(logits, temperature, top_k, top_p, min_p, allowed)
    seeds = row_seeds(seed, batch, device)
    steps = per_row(step, batch, torch.int64, device)
    u = uniform_draws(seeds, steps, vocab)
    # Gumbel-max: argmax(l_i + g_i) with g_i = -log(-log u_i) draws i with probability softmax(l)_i.
    tokens = torch.argmax(filtered - torch.log(-torch.log(u)), dim=-1)
    if not return_logprobs:
        return tokens
    logprobs_all = torch.log_softmax(filtered, dim=-1)
    chosen = logprobs_all.gather(1, tokens[:, None])[:, 0]
    order = torch.sort(logprobs_all, dim=-1, descending=True, stable=True).indices[:, :num_logprobs]
    return SampleOutput(tokens, chosen, order, logprobs_all.gather(1, order))
