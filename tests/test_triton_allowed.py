"""The Triton filter_logits and sample with an ``allowed`` token bitmask (kernels/sampling.py),
called through the launchers, against fmkernels.reference with the same mask.

Without a GPU these run through the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1). Disallowed tokens are -inf before every filter, so the masked
kernels must also equal, bit for bit, the unmasked kernels on logits with those tokens set
to -inf; against the reference the rules of tests/test_triton_sampling.py apply (top-p and
min-p cuts the reference's own fp32 rounding decides, Gumbel-score near ties).
"""

import pytest
import torch

pytest.importorskip("triton")

from _sampling_checks import assert_tokens_match, check_logprobs, check_masks, gumbel_scores  # noqa: E402
from fmkernels import reference  # noqa: E402
from fmkernels.kernels import sampling  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INF = float("inf")


def _masks(vocab, generator):
    """Bool masks (rows, vocab): about half the tokens, all but one, one, all, and the bit-31
    tokens (31, 63, ...) with token 0."""
    half = torch.rand(vocab, generator=generator) < 0.5
    half[int(torch.randint(0, vocab, (1,), generator=generator))] = True
    all_but_one = torch.ones(vocab, dtype=torch.bool)
    all_but_one[int(torch.randint(0, vocab, (1,), generator=generator))] = False
    one = torch.zeros(vocab, dtype=torch.bool)
    one[int(torch.randint(0, vocab, (1,), generator=generator))] = True
    bit31 = torch.zeros(vocab, dtype=torch.bool)
    bit31[31::32] = True
    bit31[0] = True
    return torch.stack([half, all_but_one, one, torch.ones(vocab, dtype=torch.bool), bit31])


def _pack_with_garbage(mask, generator):
    """``reference.pack_allowed(mask)`` with random bits set past the vocabulary."""
    allowed = reference.pack_allowed(mask)
    tail = mask.shape[1] % 32
    if tail:
        garbage = torch.randint(1, 2**31, (mask.shape[0],), generator=generator, dtype=torch.int64)
        garbage = (garbage << tail) & ~((1 << tail) - 1) & 0xFFFFFFFF
        garbage = (garbage - ((garbage >> 31) << 32)).to(torch.int32)
        allowed[:, -1] |= garbage
    return allowed


def _case(vocab, dtype, seed):
    """Logits, the bool mask, the packed mask (garbage past the vocabulary) and per-row
    parameters: greedy, and temperature 0.7 with top-k, top-p, min-p and all three."""
    generator = torch.Generator().manual_seed(seed)
    mask = _masks(vocab, generator)
    mask = torch.cat([mask, mask[:3]])  # 8 rows: the parameter sets meet different masks
    batch = mask.shape[0]
    logits = torch.randn((batch, vocab), generator=generator) * 3
    logits[:, 31::32] += 4.0  # bit-31 tokens often on top, so getting them wrong shows
    logits = logits.to(dtype)
    params = dict(
        temperature=torch.tensor([0.0, 0.7, 0.7, 0.7, 0.7, 0.0, 1.0, 0.7]),
        top_k=torch.tensor([0, 5, 0, 0, 20, 0, 3, vocab + 3]),
        top_p=torch.tensor([1.0, 1.0, 0.8, 1.0, 0.9, 1.0, 1.0, 0.5]),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.05, 0.02, 0.1, 0.0, 0.0]),
    )
    allowed = _pack_with_garbage(mask, generator)
    assert torch.equal(reference.unpack_allowed(allowed, vocab), mask)
    masked = logits.masked_fill(~mask, -INF)
    to = dict(device=DEVICE)
    return (logits.to(**to), mask.to(**to), allowed.to(**to), masked.to(**to),
            {key: value.to(**to) for key, value in params.items()})


def _exact_rows(params):
    """Rows without a top-p or min-p cut: their kept sets involve no rounding call."""
    return ((params["top_p"] >= 1.0) & (params["min_p"] == 0.0)).nonzero().flatten().tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [37, 1000, 4099])
def test_filter_logits_with_allowed_equals_the_reference(dtype, vocab):
    logits, mask, allowed, masked, params = _case(vocab, dtype, seed=vocab)
    actual = sampling.filter_logits(logits, allowed=allowed, **params)
    expected = reference.filter_logits(logits, allowed=allowed, **params)
    assert actual.dtype == dtype
    assert torch.isneginf(actual[~mask]).all()
    # The mask is the same as -inf logits: bit for bit what the unmasked kernel makes of them.
    assert torch.equal(actual, sampling.filter_logits(masked, **params))
    assert check_masks(actual, expected, masked, params) == []
    rows = _exact_rows(params)
    assert torch.equal(torch.isneginf(actual[rows]), torch.isneginf(expected[rows]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [37, 1000, 4099])
def test_sample_with_allowed_equals_the_reference(dtype, vocab):
    logits, mask, allowed, masked, params = _case(vocab, dtype, seed=7 + vocab)
    batch = logits.shape[0]
    generator = torch.Generator().manual_seed(vocab)
    seeds = torch.randint(0, 2**62, (batch,), generator=generator).to(DEVICE)
    steps = torch.randint(0, 2**40, (batch,), generator=generator).to(DEVICE)
    kwargs = dict(params, seed=seeds, step=steps, return_logprobs=True, num_logprobs=min(vocab, 5))
    actual = sampling.sample(logits, allowed=allowed, **kwargs)
    expected = reference.sample(logits, allowed=allowed, **kwargs)
    assert mask.gather(1, actual.tokens[:, None]).all()
    assert_tokens_match(actual.tokens, expected.tokens, gumbel_scores(masked, params, seeds, steps))
    check_logprobs(actual, expected, masked, params)
    unmasked = sampling.sample(masked, **kwargs)
    for name in ("tokens", "logprobs", "top_ids", "top_logprobs"):
        assert torch.equal(getattr(actual, name), getattr(unmasked, name)), name
    # Tokens alone (no log-probabilities written): the same draw.
    tokens = sampling.sample(logits, allowed=allowed, seed=seeds, step=steps, **params)
    assert torch.equal(tokens, actual.tokens)


def test_single_allowed_tokens_and_bit_31():
    # vocab 37: the last word holds tokens 32..36; its other 27 bits are garbage to ignore.
    vocab = 37
    logits = torch.arange(vocab, dtype=torch.float32, device=DEVICE).flip(0).expand(5, -1).contiguous()
    allowed = torch.zeros((5, 2), dtype=torch.int32, device=DEVICE)
    allowed[:, 1] = -64  # garbage: bits 6..31 of the last word, past token 36
    allowed[0, 0] = -2**31  # token 31 alone (the sign bit)
    allowed[1, 1] |= 1 << 4  # token 36 alone (the last)
    allowed[2, 0] = -2**31 | 1 << 5  # tokens 5 and 31
    allowed[3, 1] |= 1  # token 32 alone
    allowed[4, 0] = -1  # tokens 0..31
    expected_greedy = [31, 36, 5, 32, 0]
    for params in (dict(temperature=0.0), dict(temperature=0.7, top_k=2), dict(top_p=0.5), dict(min_p=0.5)):
        out = sampling.filter_logits(logits, allowed=allowed, **params)
        assert torch.equal(out, reference.filter_logits(logits, allowed=allowed, **params)), params
        kept = ~torch.isneginf(out)
        assert kept.gather(1, torch.tensor(expected_greedy, device=DEVICE)[:, None]).all(), params
        result = sampling.sample(logits, allowed=allowed, seed=torch.arange(5, device=DEVICE), return_logprobs=True,
                                 num_logprobs=2, **params)
        assert kept.gather(1, result.tokens[:, None]).all(), params
    greedy = sampling.sample(logits, allowed=allowed, temperature=0.0, seed=1, return_logprobs=True)
    assert greedy.tokens.tolist() == expected_greedy
    assert torch.equal(greedy.logprobs, torch.zeros(5, device=DEVICE))
    # A single allowed token: drawn with log-probability 0 at any temperature.
    one = sampling.sample(logits[[0, 1, 3]], allowed=allowed[[0, 1, 3]], temperature=1.3, seed=2,
                          return_logprobs=True, num_logprobs=3)
    assert one.tokens.tolist() == [31, 36, 32]
    assert torch.equal(one.logprobs, torch.zeros(3, device=DEVICE))
    assert torch.isneginf(one.top_logprobs[:, 1:]).all()


def test_allowed_views_with_any_strides():
    logits, mask, allowed, masked, params = _case(100, torch.float32, seed=3)
    words = allowed.shape[1]
    wide = torch.full((allowed.shape[0], 2 * words + 3), -1, dtype=torch.int32, device=DEVICE)
    wide[:, 1:2 * words + 1:2] = allowed
    views = (wide[:, 1:2 * words + 1:2],  # word stride 2, row stride 2 * words + 3
             torch.full((allowed.shape[0], words + 5), -1, dtype=torch.int32, device=DEVICE)[:, :words],
             allowed[:1].expand(allowed.shape[0], -1))  # row stride 0
    views[1].copy_(allowed)
    for view in views:
        expected_mask = reference.unpack_allowed(view, 100)
        out = sampling.filter_logits(logits, allowed=view, **params)
        assert check_masks(out, reference.filter_logits(logits, allowed=view, **params),
                           logits.masked_fill(~expected_mask, -INF), params) == []
        assert torch.equal(out, sampling.filter_logits(logits, allowed=view.contiguous(), **params))
        tokens = sampling.sample(logits, allowed=view, seed=9, **params)
        assert torch.equal(tokens, sampling.sample(logits, allowed=view.contiguous(), seed=9, **params))
        assert expected_mask.gather(1, tokens[:, None]).all()


def test_supports_take_allowed():
    logits = torch.zeros(2, 40, device=DEVICE)
    allowed = torch.full((2, 2), -1, dtype=torch.int32, device=DEVICE)
    for supports in (sampling.filter_logits_supports, sampling.sample_supports):
        assert supports(logits=logits) is None
        assert supports(logits=logits, allowed=None) is None
        huge = torch.empty((1, 2**31), device="meta")
        assert "vocab must be < 2**31" in supports(logits=huge, allowed=None)
        assert supports(logits=logits, allowed=allowed) is None
        assert "vocab must be < 2**31" in supports(logits=huge, allowed=torch.empty((1, 2**26), device="meta"))
