"""filter_logits and sample in Triton: temperature, top-k, top-p, min-p and the Gumbel-max draw.

One program per row, and no sort of the vocabulary. Every filter keeps a prefix of the rank
order (scaled logit x descending, ties by lower token id), so a row's kept set is fixed by
a few numbers, each found with passes over the row (128k fp32 logits are 512 KB: they stay
in L2 between passes):

1. the max m of x and its lowest id (the greedy token);
2. top-k: the k-th largest x, by bisection over x's order-preserving int32 key: the largest
   key t_k with count(key >= t_k) >= k. The r = k - count(key > t_k) ties at t_k with the
   lowest ids survive;
3. the top-k survivors' mass Z = sum exp(x - m) (ties at t_k counted r times);
4. top-p: the largest key t_p >= t_k with mass(key >= t_p) / Z >= p, by the same bisection
   (every key above t_k is a survivor), then the mass M above t_p: the i-th tie at t_p (by
   id) is kept while (M + i * exp(x_t_p - m)) / Z < p, the reference's "mass before < p";
5. one pass that applies the thresholds, min-p (exp(x - m) >= min_p), and writes the row,
   or draws token = argmax over kept tokens of x - log(-log u) (lowest id on ties) with u
   from Philox4x32-10 as in ``fmkernels.reference.uniform_draws``.

Each bisection step is one pass; its bounds move to token keys (``_bisection_pass``), so it
is exact and ends after at most 32 steps, usually far fewer. Ties at a threshold are ranked
per block with a prefix sum plus a running count, so the lowest ids win. Passes per row: 2
without top-k and top-p; 3 + steps with top-k; 4 + steps with top-p; up to 4 + 64 with both.

With ``allowed`` (a packed int32 token bitmask, see ``fmkernels.reference.unpack_allowed``),
every pass loads the mask words of its block beside the logits and makes the tokens they do
not allow -inf as it loads them (``_scaled_block``), so every filter, the draw and the
log-probabilities see the allowed distribution, with no extra pass and no copy of the row.
The ``HAS_ALLOWED=False`` specialization loads no mask.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from fmkernels import reference
from fmkernels.ops._top_tokens import top_alternatives

PerRow = Union[int, float, torch.Tensor]

# int32 keys: key(a) < key(b) exactly when a < b for floats (-0 is made +0 first).
_KEY_NEG_INF = tl.constexpr(-2139095041)  # key(-inf)
_KEY_PAST_END = tl.constexpr(-2147483648)  # lanes past the vocabulary: below every token
_KEY_TOP = tl.constexpr(2147483647)  # above every key
_MAX_BLOCK = 4096
@triton.jit
def _allowed_bits(Allowed_ptr, allowed_stride_word, offs, vocab):
    """Whether ``allowed`` (one row of int32 words) allows tokens offs: bit offs % 32 of word
    offs // 32 (bit 31 is the sign bit); False past the vocabulary."""
    word = tl.load(Allowed_ptr + (offs // 32).to(tl.int64) * allowed_stride_word, mask=offs < vocab, other=0)
    return ((word >> (offs % 32)) & 1) != 0


@triton.jit
def _scaled_block(Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, offs, vocab, divisor,
                  HAS_ALLOWED: tl.constexpr):
    """x = logit / divisor in fp32 (rounded as torch divides) and its int32 order key; -inf
    where ``allowed`` (if HAS_ALLOWED) does not allow the token."""
    valid = offs < vocab
    x = tl.load(Logits_ptr + offs.to(tl.int64) * logits_stride_vocab, mask=valid,
                other=float("-inf")).to(tl.float32)
    x = tl.math.div_rn(x, divisor)
    if HAS_ALLOWED:
        # After the division: the IEEE division's special-case path for an infinite operand is
        # slow on a GPU, and a grammar's mask would send half a warp's lanes down it.
        x = tl.where(_allowed_bits(Allowed_ptr, allowed_stride_word, offs, vocab), x, float("-inf"))
    x = tl.where(x == 0.0, 0.0, x)  # -0 ranks with +0, as in the reference's sort
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(valid, key, _KEY_PAST_END)
    return x, key


@triton.jit
def _bisection_pass(Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, vocab, divisor, m, mid,
                    MASS: tl.constexpr, BLOCK: tl.constexpr, HAS_ALLOWED: tl.constexpr):
    """One bisection step's pass over the row: the count of keys >= mid, their mass
    sum exp(x - m) (if MASS, else 0), the smallest key >= mid and the largest key < mid.

    The bisection moves its bounds to those two keys rather than to mid: the count and the
    mass are the same there, so it stays exact, and it skips ranges no token's key is in
    (often most of the 2**32 keys: far fewer than 32 steps).
    """
    count = tl.full([], 0, tl.int32)
    mass = tl.full([], 0.0, tl.float32)
    key_up = tl.full([], _KEY_TOP, tl.int32)
    key_down = tl.full([], _KEY_PAST_END, tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x, key = _scaled_block(Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, offs, vocab,
                               divisor, HAS_ALLOWED)
        at_or_above = key >= mid
        count += tl.sum(at_or_above.to(tl.int32), axis=0)
        if MASS:
            mass += tl.sum(tl.where(at_or_above, tl.exp(x - m), 0.0), axis=0)
        key_up = tl.minimum(key_up, tl.min(tl.where(at_or_above, key, _KEY_TOP), axis=0))
        key_down = tl.maximum(key_down, tl.max(tl.where(at_or_above, _KEY_PAST_END, key), axis=0))
    return count, mass, key_up, key_down


@triton.jit
def _row_thresholds(
    Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, vocab,
    temperature, top_k, top_p,
    BLOCK: tl.constexpr, HAS_ALLOWED: tl.constexpr,
):
    """The numbers that fix a row's kept set (passes 1-4 of the module docstring).

    Returns (divisor, greedy, m, greedy_id, t_k, r_k, top_p_on, t_p, before_p, q_p):
    x = logit / divisor; m = max x, greedy_id its lowest id; keys > t_k survive top-k, and
    the first r_k ties at t_k; keys > t_p survive top-p, and the i-th tie at t_p while
    before_p + i * q_p < top_p (the mass before it, normalised).
    """
    greedy = temperature == 0.0
    divisor = tl.where(greedy, 1.0, temperature)
    arange = tl.arange(0, BLOCK)

    # Pass 1: the max and its lowest id.
    m = tl.full([], float("-inf"), tl.float32)
    key_max = tl.full([], _KEY_PAST_END, tl.int32)
    greedy_id = tl.full([], 0, tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + arange
        x, key = _scaled_block(Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, offs, vocab,
                               divisor, HAS_ALLOWED)
        block_max = tl.max(x, axis=0)
        block_id = tl.min(tl.where((x == block_max) & (offs < vocab), offs, vocab), axis=0)
        greedy_id = tl.where(block_max > m, block_id, greedy_id)
        m = tl.maximum(m, block_max)
        key_max = tl.maximum(key_max, tl.max(key, axis=0))

    k = tl.where((top_k <= 0) | (top_k >= vocab), vocab, top_k).to(tl.int64)
    top_k_on = (k < vocab) & (temperature != 0.0)
    top_p_on = (top_p < 1.0) & (temperature != 0.0)

    # Pass 2 (top-k): the largest key lo with count(key >= lo) >= k, the k-th largest x.
    lo = tl.full([], _KEY_NEG_INF, tl.int64)
    if top_k_on:
        hi = key_max.to(tl.int64)
        while lo < hi:
            mid = lo + ((hi - lo + 1) >> 1)
            count, mass, key_up, key_down = _bisection_pass(
                Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, vocab, divisor, m,
                mid.to(tl.int32), False, BLOCK, HAS_ALLOWED)
            enough = count.to(tl.int64) >= k
            lo = tl.where(enough, key_up.to(tl.int64), lo)
            hi = tl.where(enough, hi, tl.maximum(key_down.to(tl.int64), lo))
    t_k = lo.to(tl.int32)

    # Pass 3: how many ties at t_k survive top-k, and the survivors' mass (for top-p).
    r_k = k
    z = tl.full([], 1.0, tl.float32)
    if top_k_on | top_p_on:
        count_above = tl.full([], 0, tl.int32)
        mass_above = tl.full([], 0.0, tl.float32)
        x_tie = tl.full([], float("-inf"), tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + arange
            x, key = _scaled_block(Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, offs, vocab,
                                   divisor, HAS_ALLOWED)
            above = key > t_k
            count_above += tl.sum(above.to(tl.int32), axis=0)
            mass_above += tl.sum(tl.where(above, tl.exp(x - m), 0.0), axis=0)
            x_tie = tl.maximum(x_tie, tl.max(tl.where(key == t_k, x, float("-inf")), axis=0))
        r_k = k - count_above.to(tl.int64)
        z = mass_above + r_k.to(tl.float32) * tl.exp(x_tie - m)
    inv_z = tl.math.div_rn(1.0, z)

    # Pass 4 (top-p): the largest key t_p with mass(key >= t_p) / z >= top_p (t_k qualifies),
    # then the mass above it and the probability of one tie at it.
    lo_p = lo
    before_p = tl.full([], 0.0, tl.float32)
    q_p = tl.full([], 0.0, tl.float32)
    if top_p_on:
        hi_p = key_max.to(tl.int64)
        while lo_p < hi_p:
            mid = lo_p + ((hi_p - lo_p + 1) >> 1)
            count, mass, key_up, key_down = _bisection_pass(
                Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, vocab, divisor, m,
                mid.to(tl.int32), True, BLOCK, HAS_ALLOWED)
            enough = mass * inv_z >= top_p
            lo_p = tl.where(enough, key_up.to(tl.int64), lo_p)
            hi_p = tl.where(enough, hi_p, tl.maximum(key_down.to(tl.int64), lo_p))
        t_p_key = lo_p.to(tl.int32)
        mass_above_p = tl.full([], 0.0, tl.float32)
        x_tie_p = tl.full([], float("-inf"), tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + arange
            x, key = _scaled_block(Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, offs, vocab,
                                   divisor, HAS_ALLOWED)
            mass_above_p += tl.sum(tl.where(key > t_p_key, tl.exp(x - m), 0.0), axis=0)
            x_tie_p = tl.maximum(x_tie_p, tl.max(tl.where(key == t_p_key, x, float("-inf")), axis=0))
        before_p = mass_above_p * inv_z
        q_p = tl.exp(x_tie_p - m) * inv_z
    t_p = lo_p.to(tl.int32)
    return divisor, greedy, m, greedy_id, t_k, r_k, top_p_on, t_p, before_p, q_p


@triton.jit
def _kept_block(
    x, key, offs, vocab, greedy, m, greedy_id, t_k, r_k, top_p_on, t_p, before_p, q_p,
    top_p, min_p, ties_k, ties_p,
):
    """Which tokens of one block the row keeps, and the running tie counts after it."""
    tie_k = key == t_k
    tie_k_i = tie_k.to(tl.int32)
    rank_k = ties_k + tl.cumsum(tie_k_i, axis=0) - tie_k_i  # ties at t_k with lower ids
    keep = (key > t_k) | (tie_k & (rank_k.to(tl.int64) < r_k))
    tie_p = key == t_p
    tie_p_i = tie_p.to(tl.int32)
    rank_p = ties_p + tl.cumsum(tie_p_i, axis=0) - tie_p_i
    before = before_p + rank_p.to(tl.float32) * q_p
    keep_p = (key > t_p) | (tie_p & ((rank_p == 0) | (before < top_p)))
    keep = tl.where(top_p_on, keep & keep_p, keep)
    keep = keep & (tl.exp(x - m) >= min_p) & (x > float("-inf"))
    keep = tl.where(greedy, offs == greedy_id, keep | (offs == greedy_id))
    keep = keep & (offs < vocab)
    return keep, ties_k + tl.sum(tie_k_i, axis=0), ties_p + tl.sum(tie_p_i, axis=0)


@triton.jit
def _filter_logits_kernel(
    Logits_ptr,  # (batch, vocab) fp32/fp16/bf16
    Out_ptr,  # (batch, vocab) like logits: x where kept, -inf elsewhere
    Temperature_ptr,  # (batch,) fp32; 0 means greedy
    Top_k_ptr,  # (batch,) int64; 0 means off
    Top_p_ptr,  # (batch,) fp32; 1 means off
    Min_p_ptr,  # (batch,) fp32; 0 means off
    Allowed_ptr,  # (batch, ceil(vocab / 32)) int32 token bitmask; read if HAS_ALLOWED
    logits_stride_row, logits_stride_vocab,
    out_stride_row, out_stride_vocab,
    allowed_stride_row, allowed_stride_word,
    vocab,
    BLOCK: tl.constexpr,  # tokens per pass step
    HAS_ALLOWED: tl.constexpr,
):
    # One program per row: reads the row 2 to 68 times (mostly from L2), writes it once.
    row = tl.program_id(0).to(tl.int64)
    Logits_ptr += row * logits_stride_row
    if HAS_ALLOWED:
        Allowed_ptr += row * allowed_stride_row
    Out_ptr += row * out_stride_row
    top_p = tl.load(Top_p_ptr + row)
    min_p = tl.load(Min_p_ptr + row)
    divisor, greedy, m, greedy_id, t_k, r_k, top_p_on, t_p, before_p, q_p = _row_thresholds(
        Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, vocab,
        tl.load(Temperature_ptr + row), tl.load(Top_k_ptr + row), top_p, BLOCK, HAS_ALLOWED,
    )
    ties_k = tl.full([], 0, tl.int32)
    ties_p = tl.full([], 0, tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x, key = _scaled_block(Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, offs, vocab,
                               divisor, HAS_ALLOWED)
        keep, ties_k, ties_p = _kept_block(
            x, key, offs, vocab, greedy, m, greedy_id, t_k, r_k, top_p_on, t_p, before_p, q_p,
            top_p, min_p, ties_k, ties_p,
        )
        y = tl.where(keep, x, float("-inf"))
        if Out_ptr.dtype.element_ty == tl.bfloat16:
            # Round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates.
            bits = y.to(tl.int32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
            y = bits.to(tl.float32, bitcast=True)
        tl.store(Out_ptr + offs.to(tl.int64) * out_stride_vocab, y.to(Out_ptr.dtype.element_ty), mask=offs < vocab)


@triton.jit
def _sample_kernel(
    Logits_ptr,  # (batch, vocab) fp32/fp16/bf16
    Tokens_ptr,  # (batch,) int64: the drawn tokens
    Logprobs_ptr,  # (batch,) fp32: the drawn token's log-probability; written if RETURN_LOGPROBS
    Log_mass_ptr,  # (batch,) fp32: log(sum over kept of exp(x - m)); written if RETURN_LOGPROBS
    # (batch, vocab) fp32: x - m where kept, -inf elsewhere; written if WRITE_FILTERED. Shifted by
    # the max, as log_softmax computes, so (x - m) - log_mass keeps fp32's precision where x is
    # large (a small temperature): x - (m + log_mass) would round m + log_mass at x's scale.
    Filtered_ptr,
    Temperature_ptr,  # (batch,) fp32; 0 means greedy
    Top_k_ptr,  # (batch,) int64; 0 means off
    Top_p_ptr,  # (batch,) fp32; 1 means off
    Min_p_ptr,  # (batch,) fp32; 0 means off
    Seed_ptr,  # (batch,) int64: Philox key (low, high words)
    Step_ptr,  # (batch,) int64: Philox counter words 1 and 2
    Allowed_ptr,  # (batch, ceil(vocab / 32)) int32 token bitmask; read if HAS_ALLOWED
    logits_stride_row, logits_stride_vocab,
    allowed_stride_row, allowed_stride_word,
    vocab,
    RETURN_LOGPROBS: tl.constexpr,
    WRITE_FILTERED: tl.constexpr,
    BLOCK: tl.constexpr,  # tokens per pass step
    HAS_ALLOWED: tl.constexpr,
):
    # One program per row: reads the row 2 to 68 times (mostly from L2), writes one token.
    row = tl.program_id(0).to(tl.int64)
    Logits_ptr += row * logits_stride_row
    if HAS_ALLOWED:
        Allowed_ptr += row * allowed_stride_row
    top_p = tl.load(Top_p_ptr + row)
    min_p = tl.load(Min_p_ptr + row)
    seed = tl.load(Seed_ptr + row)
    step = tl.load(Step_ptr + row)
    divisor, greedy, m, greedy_id, t_k, r_k, top_p_on, t_p, before_p, q_p = _row_thresholds(
        Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, vocab,
        tl.load(Temperature_ptr + row), tl.load(Top_k_ptr + row), top_p, BLOCK, HAS_ALLOWED,
    )
    ties_k = tl.full([], 0, tl.int32)
    ties_p = tl.full([], 0, tl.int32)
    best = tl.full([], float("-inf"), tl.float32)
    best_id = greedy_id
    kept_mass = tl.full([], 0.0, tl.float32)
    arange = tl.arange(0, BLOCK)
    # Philox counter (token // 4, step low, step high, 0); token i takes word i % 4.
    step_lo = tl.zeros([BLOCK], tl.uint32) + step.to(tl.uint32)
    step_hi = tl.zeros([BLOCK], tl.uint32) + (step >> 32).to(tl.uint32)
    zero = tl.zeros([BLOCK], tl.uint32)
    for start in range(0, vocab, BLOCK):
        offs = start + arange
        x, key = _scaled_block(Logits_ptr, logits_stride_vocab, Allowed_ptr, allowed_stride_word, offs, vocab,
                               divisor, HAS_ALLOWED)
        keep, ties_k, ties_p = _kept_block(
            x, key, offs, vocab, greedy, m, greedy_id, t_k, r_k, top_p_on, t_p, before_p, q_p,
            top_p, min_p, ties_k, ties_p,
        )
        w0, w1, w2, w3 = tl.philox(seed, (offs >> 2).to(tl.uint32), step_lo, step_hi, zero, 10)
        lane = offs & 3
        word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        u = ((word >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # exact: in [2**-24, 1 - 2**-24]
        score = tl.where(keep, x - tl.log(-tl.log(u)), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_id = tl.min(tl.where(keep & (score == block_best), offs, vocab), axis=0)
        best_id = tl.where(block_best > best, block_id, best_id)  # earlier blocks win ties
        best = tl.maximum(best, block_best)
        if RETURN_LOGPROBS:
            kept_mass += tl.sum(tl.where(keep, tl.exp(x - m), 0.0), axis=0)
        if WRITE_FILTERED:
            tl.store(Filtered_ptr + row * vocab + offs, tl.where(keep, x - m, float("-inf")), mask=offs < vocab)
    tl.store(Tokens_ptr + row, best_id.to(tl.int64))
    if RETURN_LOGPROBS:
        x_best = tl.load(Logits_ptr + best_id.to(tl.int64) * logits_stride_vocab).to(tl.float32)
        if HAS_ALLOWED:
            x_best = tl.where(_allowed_bits(Allowed_ptr, allowed_stride_word, best_id, vocab), x_best,
                              float("-inf"))
        x_best = tl.math.div_rn(x_best, divisor)
        log_mass = tl.log(kept_mass)
        tl.store(Logprobs_ptr + row, (x_best - m) - log_mass)
        tl.store(Log_mass_ptr + row, log_mass)


def _block(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), _MAX_BLOCK)


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _supports(logits: torch.Tensor, allowed: Optional[torch.Tensor]) -> Optional[str]:
    if logits.shape[1] >= 2**31:
        return f"vocab must be < 2**31 (int32 token ids), got {logits.shape[1]}"
    return None


def filter_logits_supports(*, logits: torch.Tensor, allowed: Optional[torch.Tensor] = None, **_) -> Optional[str]:
    return _supports(logits, allowed)


def sample_supports(*, logits: torch.Tensor, allowed: Optional[torch.Tensor] = None, **_) -> Optional[str]:
    return _supports(logits, allowed)


def _allowed_arguments(logits: torch.Tensor, allowed: Optional[torch.Tensor]):
    """(pointer, row stride, word stride) for the kernels' Allowed_ptr: logits stands in
    (never read) without a mask."""
    if allowed is None:
        return logits, 0, 0
    return allowed, allowed.stride(0), allowed.stride(1)


def filter_logits(
    logits: torch.Tensor,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    min_p: PerRow = 0.0,
    allowed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch ``_filter_logits_kernel``, one program per row. Reads batch x vocab elements
    2 to 68 times (L2-resident after the first), with ``allowed`` its batch x vocab / 32
    words as often, and writes batch x vocab."""
    batch, vocab = logits.shape
    out = torch.empty((batch, vocab), dtype=logits.dtype, device=logits.device)
    if batch == 0:
        return out
    temperature, top_k, top_p, min_p = reference.filter_parameters(batch, logits.device, temperature, top_k, top_p, min_p)
    block = _block(vocab)
    allowed_ptr, allowed_stride_row, allowed_stride_word = _allowed_arguments(logits, allowed)
    _filter_logits_kernel[(batch,)](
        logits, out, temperature, top_k, top_p, min_p, allowed_ptr,
        logits.stride(0), logits.stride(1), out.stride(0), out.stride(1),
        allowed_stride_row, allowed_stride_word,
        vocab, BLOCK=block, HAS_ALLOWED=allowed is not None, num_warps=_warps(block),
    )
    return out


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
    """Launch ``_sample_kernel``, one program per row: reads batch x vocab elements 2 to 68
    times (and ``allowed``'s words as often) and writes batch tokens; with ``num_logprobs``
    also batch x vocab fp32 filtered logits, from which the top ids are picked here."""
    batch, vocab = logits.shape
    device = logits.device
    seeds = reference.row_seeds(seed, batch, device).contiguous()
    steps = reference.per_row(step, batch, torch.int64, device).contiguous()
    temperature, top_k, top_p, min_p = reference.filter_parameters(batch, device, temperature, top_k, top_p, min_p)
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprobs = torch.empty(batch if return_logprobs else 0, dtype=torch.float32, device=device)
    log_mass = torch.empty_like(logprobs)
    write_filtered = return_logprobs and num_logprobs > 0
    filtered = torch.empty((batch, vocab) if write_filtered else (0,), dtype=torch.float32, device=device)
    if batch > 0:
        block = _block(vocab)
        allowed_ptr, allowed_stride_row, allowed_stride_word = _allowed_arguments(logits, allowed)
        _sample_kernel[(batch,)](
            logits, tokens, logprobs, log_mass, filtered,
            temperature, top_k, top_p, min_p, seeds, steps, allowed_ptr,
            logits.stride(0), logits.stride(1), allowed_stride_row, allowed_stride_word, vocab,
            RETURN_LOGPROBS=return_logprobs, WRITE_FILTERED=write_filtered,
            BLOCK=block, HAS_ALLOWED=allowed is not None, num_warps=_warps(block),
        )
    if not return_logprobs:
        return tokens
    top_ids, top_logprobs = top_alternatives(filtered if write_filtered else None, log_mass, batch, num_logprobs,
                                             device)
    return reference.SampleOutput(tokens, logprobs, top_ids, top_logprobs)
