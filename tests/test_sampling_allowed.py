"""fmkernels.filter_logits and fmkernels.sample under an ``allowed`` token bitmask, through the
public ops, on every backend that runs here (the reference, the C++ cpu kernel, and Triton
through its interpreter without a GPU; on a GPU, the reference, triton and cuda on CUDA tensors).

The reference is the truth: its masked ops equal the unmasked ops on logits with the
disallowed tokens at -inf (checked first), and every backend's masks and tokens equal the
reference's (top-p cuts the reference's own rounding decides, and Gumbel near ties, aside:
tests/_sampling_checks.py). The draws are checked by a chi-square test on the allowed
distribution, and a row's token must not depend on the batch around it.
"""

import math

import pytest
import torch

import fmkernels
from _sampling_checks import assert_tokens_match, check_logprobs, check_masks, gumbel_scores
from fmkernels import platform, reference, testing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("reference", "cpu", "triton") if DEVICE == "cpu" else ("reference", "triton", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require(backend):
    reason = platform.unavailable_reason(backend)
    if reason:
        pytest.skip(f"{backend}: {reason}")


def case(batch, vocab, dtype, seed):
    """Logits with a few -inf entries, a mixed bitmask (``testing.random_allowed``: half, all but
    one, one, 1%, ... with garbage bits past the vocabulary) that allows a finite logit in every
    row, and per-row parameters: greedy, plain, top-k, top-p, min-p, and all of them."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, vocab), generator=generator) * 3
    logits[torch.rand((batch, vocab), generator=generator) < 0.05] = -math.inf
    allowed = testing.random_allowed(batch, vocab, generator)
    mask = reference.unpack_allowed(allowed, vocab)
    finite = mask & ~torch.isneginf(logits)
    for row in (~finite.any(dim=1)).nonzero().flatten().tolist():
        logits[row, mask[row].nonzero()[0, 0]] = 0.0  # one allowed token with a finite logit
    cycle = [(0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 20, 1.0, 0.0), (0.9, 0, 0.8, 0.0),
             (1.3, 0, 1.0, 0.1), (0.7, 50, 0.9, 0.05)]
    rows = [cycle[b % len(cycle)] for b in range(batch)]
    params = dict(
        temperature=torch.tensor([r[0] for r in rows]), top_k=torch.tensor([r[1] for r in rows]),
        top_p=torch.tensor([r[2] for r in rows]), min_p=torch.tensor([r[3] for r in rows]),
    )
    to = dict(device=DEVICE)
    return logits.to(dtype=dtype, **to), allowed.to(**to), {k: v.to(**to) for k, v in params.items()}


def masked_logits(logits, allowed):
    return logits.masked_fill(~reference.unpack_allowed(allowed, logits.shape[1]), -math.inf)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_reference_masks_before_every_filter(dtype):
    logits, allowed, params = case(12, 1001, dtype, seed=1)
    seeds = torch.arange(12, device=DEVICE) * 7919
    pre_masked = masked_logits(logits, allowed)
    assert torch.equal(reference.filter_logits(logits, allowed=allowed, **params),
                       reference.filter_logits(pre_masked, **params))
    got = reference.sample(logits, allowed=allowed, seed=seeds, step=2, return_logprobs=True, num_logprobs=4,
                           **params)
    expected = reference.sample(pre_masked, seed=seeds, step=2, return_logprobs=True, num_logprobs=4, **params)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [37, 1000, 4099])
def test_filter_logits_masks_equal_the_reference(backend, dtype, vocab):
    require(backend)
    logits, allowed, params = case(12, vocab, dtype, seed=vocab)
    actual = fmkernels.filter_logits(logits, allowed=allowed, backend=backend, **params)
    expected = reference.filter_logits(logits, allowed=allowed, **params)
    assert not (~torch.isneginf(actual) & ~reference.unpack_allowed(allowed, vocab)).any()
    check_masks(actual, expected, masked_logits(logits, allowed), params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [37, 1000, 4099])
def test_sample_tokens_and_logprobs_equal_the_reference(backend, dtype, vocab):
    require(backend)
    logits, allowed, params = case(12, vocab, dtype, seed=10 + vocab)
    seeds = torch.arange(12, device=DEVICE) * 104729 + vocab
    actual = fmkernels.sample(logits, allowed=allowed, seed=seeds, step=5, backend=backend, return_logprobs=True,
                              num_logprobs=3, **params)
    expected = reference.sample(logits, allowed=allowed, seed=seeds, step=5, return_logprobs=True, num_logprobs=3,
                                **params)
    assert reference.unpack_allowed(allowed, vocab).gather(1, actual.tokens[:, None]).all()
    pre_masked = masked_logits(logits, allowed)
    steps = torch.full((12,), 5, device=DEVICE)
    assert_tokens_match(actual.tokens, expected.tokens, gumbel_scores(pre_masked, params, seeds, steps))
    check_logprobs(actual, expected, pre_masked, params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_single_allowed_token_is_drawn_with_log_probability_zero(backend):
    require(backend)
    vocab = 100
    logits = torch.randn((4, vocab), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.zeros((4, vocab), dtype=torch.bool)
    chosen = [0, 31, 63, 99]  # bit 0, bit 31 (the sign bit), bit 31 of word 1, the last token
    mask[range(4), chosen] = True
    allowed = fmkernels.pack_allowed(mask).to(DEVICE)
    for params in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.5, top_k=3, top_p=0.5)):
        result = fmkernels.sample(logits, allowed=allowed, seed=3, backend=backend, return_logprobs=True,
                                  num_logprobs=2, **params)
        assert result.tokens.tolist() == chosen
        assert torch.equal(result.logprobs, torch.zeros(4, device=DEVICE))
        assert result.top_ids[:, 0].tolist() == chosen
        assert torch.isneginf(result.top_logprobs[:, 1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_follow_the_allowed_distribution(backend):
    """Chi-square over 4000 draws (fresh seeds) of one row whose allowed tokens hold a known
    distribution; the disallowed tokens, some of them the most likely, never come."""
    require(backend)
    if backend == "triton" and platform.triton_interpreting():
        pytest.skip("4000 rows through the Triton interpreter take a minute; its tokens equal the reference's "
                    "(test_sample_tokens_and_logprobs_equal_the_reference), whose draws are tested here")
    vocab, draws = 64, 4000
    generator = torch.Generator().manual_seed(5)
    row = torch.randn(vocab, generator=generator)
    mask = torch.rand(vocab, generator=generator) < 0.3
    mask[row.argmax()] = False  # the most likely token is disallowed
    allowed = fmkernels.pack_allowed(mask).expand(draws, -1).to(DEVICE)
    logits = row.expand(draws, -1).to(DEVICE)
    tokens = fmkernels.sample(logits, allowed=allowed, seed=torch.arange(draws, device=DEVICE) * 7 + 1,
                              temperature=0.8, backend=backend).cpu()
    assert mask[tokens].all()
    probs = torch.softmax((row / 0.8).masked_fill(~mask, -math.inf).double(), dim=0)
    counts = torch.bincount(tokens, minlength=vocab).double()
    kept = mask.nonzero().flatten()
    expected = probs[kept] * draws
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = len(kept) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof) + 10, f"chi-square {chi2:.1f} with {dof} degrees of freedom"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_draws_the_same_token_alone_and_in_a_batch(backend):
    require(backend)
    logits, allowed, params = case(8, 1000, torch.float32, seed=3)
    seeds = torch.arange(8, device=DEVICE) * 31 + 5
    batched = fmkernels.sample(logits, allowed=allowed, seed=seeds, step=4, backend=backend, **params)
    again = fmkernels.sample(logits, allowed=allowed, seed=seeds, step=4, backend=backend, **params)
    assert torch.equal(batched, again)
    for b in range(8):
        alone = fmkernels.sample(logits[b:b + 1], allowed=allowed[b:b + 1], seed=seeds[b:b + 1], step=4,
                                 backend=backend, **{k: v[b:b + 1] for k, v in params.items()})
        assert int(alone) == int(batched[b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitmask_views_and_bits_past_the_vocabulary(backend):
    """A strided view of a wider buffer, and every bit past the vocabulary set, change nothing."""
    require(backend)
    logits, allowed, params = case(6, 70, torch.float32, seed=9)
    clean = fmkernels.pack_allowed(reference.unpack_allowed(allowed, 70))
    wide = torch.full((6, 7), -1, dtype=torch.int32, device=DEVICE)
    wide[:, 1:4] = clean
    wide[:, 3] |= -1 << (70 % 32)
    view = wide[:, 1:4]
    assert not view.is_contiguous()
    seeds = torch.arange(6, device=DEVICE)
    expected = fmkernels.sample(logits, allowed=clean, seed=seeds, backend=backend, **params)
    assert torch.equal(fmkernels.sample(logits, allowed=view, seed=seeds, backend=backend, **params), expected)
    assert torch.equal(fmkernels.filter_logits(logits, allowed=view, backend=backend, **params),
                       fmkernels.filter_logits(logits, allowed=clean, backend=backend, **params))


def test_pack_allowed_round_trips_and_checks_its_argument():
    generator = torch.Generator().manual_seed(0)
    for vocab in (1, 31, 32, 33, 64, 1000):
        mask = torch.rand((3, vocab), generator=generator) < 0.5
        packed = fmkernels.pack_allowed(mask)
        assert packed.dtype == torch.int32 and packed.shape == (3, (vocab + 31) // 32)
        assert torch.equal(reference.unpack_allowed(packed, vocab), mask)
        assert torch.equal(fmkernels.pack_allowed(mask[0]), packed[0])
    assert int(fmkernels.pack_allowed(torch.tensor([False] * 31 + [True]))[0]) == -2**31
    with pytest.raises(TypeError, match="mask must have dtype bool, got int32"):
        fmkernels.pack_allowed(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask must be 1-D"):
        fmkernels.pack_allowed(torch.zeros((1, 2, 3), dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        fmkernels.pack_allowed([True, False])


@pytest.mark.parametrize("op", ["filter_logits", "sample"])
def test_invalid_bitmasks_are_refused_before_anything_is_written(op):
    function = getattr(fmkernels, op)
    logits = torch.randn(2, 40)
    out = torch.full((2,), -7, dtype=torch.int64) if op == "sample" else torch.full((2, 40), 7.0)
    kwargs = dict(seed=0) if op == "sample" else {}
    ok = torch.full((2, 2), -1, dtype=torch.int32)
    with pytest.raises(TypeError, match="allowed must have dtype int32, got int64"):
        function(logits, allowed=ok.long(), out=out, **kwargs)
    with pytest.raises(TypeError, match="allowed must be a torch.Tensor, got list"):
        function(logits, allowed=[[1, 1], [1, 1]], out=out, **kwargs)
    with pytest.raises(ValueError, match=r"allowed must have shape \(2, 2\).*got \(2, 1\)"):
        function(logits, allowed=ok[:, :1], out=out, **kwargs)
    with pytest.raises(ValueError, match=r"allowed must have shape \(2, 2\).*got \(2, 3\)"):
        function(logits, allowed=torch.full((2, 3), -1, dtype=torch.int32), out=out, **kwargs)
    only_past_the_vocabulary = ok.clone()
    only_past_the_vocabulary[1] = torch.tensor([0, -1 << 8], dtype=torch.int32)  # tokens 40..63: past vocab 40
    with pytest.raises(ValueError, match=r"allowed\[1\] allows no token of the vocabulary"):
        function(logits, allowed=only_past_the_vocabulary, out=out, **kwargs)
    at_minus_inf = logits.clone()
    at_minus_inf[0, :32] = -math.inf
    first_word_only = torch.tensor([[-1, 0], [-1, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"logits\[0\] is -inf at every token allowed\[0\] allows"):
        function(at_minus_inf, allowed=first_word_only, out=out, **kwargs)
    assert bool((out == (-7 if op == "sample" else 7.0)).all()), "a refused call wrote its output"


def test_peers_without_a_masked_path_refuse_it_by_name():
    from fmkernels import peer_libraries

    allowed = torch.full((2, 2), -1, dtype=torch.int32)
    reason = peer_libraries.flashinfer_filter_logits_supports(torch.zeros(2, 40), allowed=allowed)
    assert "allowed" in reason


def test_rows_are_checked_without_the_cpu_extension_too(monkeypatch):
    """Where fmkernels._C is absent, NumPy reads the words: the same verdicts."""
    from fmkernels.ops import sampling

    monkeypatch.setattr(platform, "cpu_module", lambda: None)
    good = fmkernels.pack_allowed(torch.rand((3, 70), generator=torch.Generator().manual_seed(0)) < 0.5)
    good[:, 0] |= 1
    sampling._require_allowed_rows(good, 70)
    bad = good.clone()
    bad[2] = torch.tensor([0, 0, -1 << 6], dtype=torch.int32)  # only bits past a vocabulary of 70
    with pytest.raises(ValueError, match=r"allowed\[2\] allows no token of the vocabulary \(70 tokens\)"):
        sampling._require_allowed_rows(bad, 70)
