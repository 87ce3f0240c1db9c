"""The Triton filter_logits and sample (kernels/sampling.py) against fmkernels.reference.

Without a GPU these run through the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1), at small vocabularies; the ``gpu`` tests run the full sizes.

Masks must equal the reference's. The one allowed difference is a top-p cut that the
reference's own fp32 rounding decides: the kernel sums probabilities per block, the
reference cumulates them over the sorted row, so a token whose mass before it is within
~1e-5 of p may fall on either side. Tokens must equal the reference's except at
Gumbel-score near ties (fmkernels.testing's rule); log-probabilities are within 1e-4.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import fmkernels  # noqa: E402
from _sampling_checks import (  # noqa: E402
    assert_tokens_match, check_logprobs, check_masks, gumbel_scores, random_rows,
)
from fmkernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rows(batch, vocab, dtype, generator, ties=False, holes=0.05):
    return random_rows(batch, vocab, dtype, generator, ties=ties, holes=holes, device=DEVICE)


def _row_params(params, row):
    return {key: value[row:row + 1] if isinstance(value, torch.Tensor) else value for key, value in params.items()}


# ---------------------------------------------------------------------------------------
# Philox


@triton.jit
def _philox_words_kernel(Seed_ptr, Counter_ptr, Words_ptr, n, BLOCK: tl.constexpr):
    # The call kernels/sampling.py makes: 32-bit counter words, a 64-bit seed, 10 rounds.
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    seed = tl.load(Seed_ptr)
    c0 = tl.load(Counter_ptr + 4 * offs + 0, mask=mask).to(tl.uint32)
    c1 = tl.load(Counter_ptr + 4 * offs + 1, mask=mask).to(tl.uint32)
    c2 = tl.load(Counter_ptr + 4 * offs + 2, mask=mask).to(tl.uint32)
    c3 = tl.load(Counter_ptr + 4 * offs + 3, mask=mask).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, 10)
    tl.store(Words_ptr + 4 * offs + 0, w0.to(tl.int64), mask=mask)
    tl.store(Words_ptr + 4 * offs + 1, w1.to(tl.int64), mask=mask)
    tl.store(Words_ptr + 4 * offs + 2, w2.to(tl.int64), mask=mask)
    tl.store(Words_ptr + 4 * offs + 3, w3.to(tl.int64), mask=mask)


@pytest.mark.parametrize("seed", [0, 1234, 2**32 - 1, 2**32 + 5, 2**62 + 12345, 2**63 - 1])
def test_philox_words_are_bit_exact(seed):
    generator = torch.Generator().manual_seed(seed % 1000)
    counters = torch.randint(0, 2**32, (61, 4), generator=generator, dtype=torch.int64)
    counters[0] = 0
    counters[1] = 2**32 - 1
    words = torch.full((61, 4), -1, dtype=torch.int64, device=DEVICE)
    seed_t = torch.tensor([seed], dtype=torch.int64)
    _philox_words_kernel[(1,)](seed_t.to(DEVICE), counters.to(DEVICE), words, 61, BLOCK=64)
    key = (seed_t & 0xFFFFFFFF, seed_t >> 32)
    expected = torch.stack(reference.philox4x32(tuple(counters.unbind(1)), key), dim=1)
    assert torch.equal(words.cpu(), expected)


# ---------------------------------------------------------------------------------------
# filter_logits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4099])
def test_filter_logits_masks_equal_the_reference(dtype, vocab):
    generator = torch.Generator().manual_seed(vocab)
    for ties in (False, True):
        logits, params = _rows(16 if vocab < 4099 else 8, vocab, dtype, generator, ties)
        actual = fmkernels.filter_logits(logits, backend="triton", **params)
        expected = reference.filter_logits(logits, **params)
        assert actual.dtype == dtype
        check_masks(actual, expected, logits, params)


def test_filter_logits_scalar_parameters():
    generator = torch.Generator().manual_seed(11)
    logits = (torch.randn(3, 1000, generator=generator) * 2).to(DEVICE)
    for params in (dict(), dict(temperature=0.0), dict(temperature=0.6, top_k=40), dict(top_p=0.8),
                   dict(min_p=0.1), dict(top_k=100, top_p=0.5, min_p=0.02)):
        actual = fmkernels.filter_logits(logits, backend="triton", **params)
        assert torch.equal(actual, reference.filter_logits(logits, **params)), params


def test_greedy_keeps_the_first_argmax():
    inf = float("inf")
    logits = torch.tensor([[1.0, 3.0, 3.0, -1.0], [-inf, 2.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0],
                           [-inf, -inf, -inf, -7.0]], device=DEVICE)
    out = fmkernels.filter_logits(logits, temperature=0.0, backend="triton")
    assert (~torch.isneginf(out)).nonzero().tolist() == [[0, 1], [1, 1], [2, 0], [3, 3]]
    assert fmkernels.sample(logits, temperature=0.0, seed=3, backend="triton").tolist() == [1, 1, 0, 3]


def test_top_k_breaks_ties_by_lower_id():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0]], device=DEVICE)
    kept = [(~torch.isneginf(fmkernels.filter_logits(logits, top_k=k, backend="triton")[0])).nonzero().flatten().tolist()
            for k in (1, 3, 4, 5, 6, 7, 8)]
    assert kept == [[1], [1, 3, 4], [1, 3, 4, 6], [1, 2, 3, 4, 6], [1, 2, 3, 4, 5, 6], list(range(7)), list(range(7))]


def test_ties_across_blocks_keep_the_lowest_ids():
    # 5000 tokens at one value spread over both 4096-token blocks: the first k by id survive.
    logits = torch.zeros(2, 5000, device=DEVICE)
    logits[:, 7] = 1.0
    out = fmkernels.filter_logits(logits, top_k=torch.tensor([4500, 20], device=DEVICE), backend="triton")
    kept = ~torch.isneginf(out)
    assert kept[0].nonzero().flatten().tolist() == list(range(4500))
    assert kept[1].nonzero().flatten().tolist() == list(range(20))


def test_top_p_ties_keep_the_smallest_prefix_by_id():
    # Eight equal tokens (1/8 each): the mass before the i-th is i/8, kept while < p.
    logits = torch.full((3, 8), 0.5, device=DEVICE)
    out = fmkernels.filter_logits(logits, top_p=torch.tensor([0.3, 0.01, 0.9], device=DEVICE), backend="triton")
    assert (~torch.isneginf(out)).sum(dim=1).tolist() == [3, 1, 8]
    assert torch.equal(out, reference.filter_logits(logits, top_p=torch.tensor([0.3, 0.01, 0.9], device=DEVICE)))
    # top-k then top-p on ties: k=6 leaves ids 0..5 at 1/6 each; p = 0.4 keeps 3 (before: 0, 1/6, 2/6).
    logits = torch.tensor([[1.0] * 10], device=DEVICE)
    out = fmkernels.filter_logits(logits, top_k=6, top_p=0.4, backend="triton")
    assert (~torch.isneginf(out[0])).nonzero().flatten().tolist() == [0, 1, 2]


def test_negative_zero_ranks_with_zero():
    logits = torch.tensor([[-0.0, 0.0, -0.0, 0.0, -1.0, 0.0]], device=DEVICE)
    for k in (1, 2, 3):
        out = fmkernels.filter_logits(logits, top_k=k, backend="triton")
        assert torch.equal(torch.isneginf(out), torch.isneginf(reference.filter_logits(logits, top_k=k)))
    assert fmkernels.sample(logits, temperature=0.0, seed=0, backend="triton").item() == 0


def test_minus_inf_tokens_are_never_kept():
    inf = float("inf")
    logits = torch.tensor([[-inf, 1.0, -inf, 0.5, -inf, -inf], [2.0, -inf, -inf, -inf, -inf, -inf]], device=DEVICE)
    for params in (dict(top_k=5), dict(top_k=6), dict(top_p=0.999), dict(min_p=0.0), dict(temperature=0.0)):
        out = fmkernels.filter_logits(logits, backend="triton", **params)
        assert torch.equal(out, reference.filter_logits(logits, **params)), params
        tokens = fmkernels.sample(logits, seed=torch.tensor([5, 6], device=DEVICE), backend="triton", **params)
        assert torch.isfinite(logits.gather(1, tokens[:, None])).all()


def test_mask_agreement_on_many_random_rows():
    """Top-p cut rows on random logits: how many differ from the reference (rounding only)."""
    generator = torch.Generator().manual_seed(21)
    logits = (torch.randn(32, 1500, generator=generator) * 2).to(DEVICE)
    params = dict(temperature=torch.rand(32, generator=generator).to(DEVICE) + 0.3,
                  top_k=torch.randint(0, 300, (32,), generator=generator).to(DEVICE),
                  top_p=(torch.rand(32, generator=generator) * 0.98 + 0.01).to(DEVICE),
                  min_p=torch.zeros(32, device=DEVICE))
    out = fmkernels.filter_logits(logits, backend="triton", **params)
    differ = check_masks(out, reference.filter_logits(logits, **params), logits, params)
    assert len(differ) <= 1


# ---------------------------------------------------------------------------------------
# sample


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [7, 1000, 4099])
def test_sample_equals_the_reference(dtype, vocab):
    generator = torch.Generator().manual_seed(1 + vocab)
    batch = 12 if vocab < 4099 else 6
    for ties in (False, True):
        logits, params = _rows(batch, vocab, dtype, generator, ties)
        seeds = torch.randint(0, 2**62, (batch,), generator=generator).to(DEVICE)
        steps = torch.randint(0, 2**40, (batch,), generator=generator).to(DEVICE)
        n = min(vocab, 6)
        kwargs = dict(params, seed=seeds, step=steps, return_logprobs=True, num_logprobs=n)
        actual = fmkernels.sample(logits, backend="triton", **kwargs)
        expected = reference.sample(logits, **kwargs)
        assert_tokens_match(actual.tokens, expected.tokens, gumbel_scores(logits, params, seeds, steps))
        check_logprobs(actual, expected, logits, params)
        if ties:
            assert torch.equal(actual.top_ids, expected.top_ids)


def test_top_ids_past_the_kept_tokens_are_removed_ones_by_id():
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 2.0, 1.0, 1.0]], device=DEVICE)
    out = fmkernels.sample(logits, top_k=torch.tensor([2, 3], device=DEVICE), seed=0, backend="triton",
                           return_logprobs=True, num_logprobs=5)
    assert out.top_ids.tolist() == [[1, 3, 0, 2, 4], [2, 0, 1, 3, 4]]
    assert torch.isneginf(out.top_logprobs[:, 3:]).all() and torch.isneginf(out.top_logprobs[0, 2])
    no_top = fmkernels.sample(logits, seed=0, backend="triton", return_logprobs=True)
    assert no_top.top_ids.shape == (2, 0) and no_top.top_logprobs.shape == (2, 0)
    torch.testing.assert_close(no_top.logprobs, reference.sample(logits, seed=0, return_logprobs=True).logprobs)


def test_draws_follow_the_filtered_distribution():
    """Chi-square of 400 draws (one seed, steps 0..399) against softmax(filtered).

    Small: the interpreter runs one program per draw (~15 ms each without bisection);
    test_gpu_draws_follow_the_filtered_distribution draws 40000 with every filter."""
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(1, 12, generator=generator) * 1.5).to(DEVICE)
    params = dict(temperature=0.8, min_p=0.05)
    draws = 400
    tokens = fmkernels.sample(logits.expand(draws, -1), seed=torch.full((draws,), 1234, device=DEVICE),
                              step=torch.arange(draws, device=DEVICE), backend="triton", **params)
    probs = torch.softmax(reference.filter_logits(logits, **params)[0].double(), dim=0).cpu()
    kept = probs > 0
    counts = torch.bincount(tokens.cpu(), minlength=12).double()
    assert counts[~kept].sum() == 0
    expected = probs[kept] * draws
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    p_value = 1.0 - float(torch.distributions.Chi2(torch.tensor(float(dof))).cdf(torch.tensor(chi2)))
    assert p_value > 1e-3, f"chi2 {chi2:.1f} with {dof} dof, p = {p_value:.2g}"


def test_a_row_draws_the_same_alone_in_a_batch_and_shuffled():
    generator = torch.Generator().manual_seed(9)
    logits, params = _rows(10, 500, torch.float32, generator)
    seeds = torch.randint(0, 2**62, (10,), generator=generator).to(DEVICE)
    batch = fmkernels.sample(logits, seed=seeds, step=3, backend="triton", **params)
    perm = torch.randperm(10, generator=generator).to(DEVICE)
    shuffled = fmkernels.sample(logits[perm], seed=seeds[perm], step=3, backend="triton",
                                **{key: value[perm] for key, value in params.items()})
    alone = [int(fmkernels.sample(logits[i:i + 1], seed=seeds[i:i + 1], step=3, backend="triton",
                                  **_row_params(params, i))) for i in range(10)]
    assert torch.equal(shuffled, batch[perm])
    assert batch.tolist() == alone


def test_seeds_and_steps_change_the_draws():
    logits = torch.zeros(1, 1000, device=DEVICE)
    tokens = [int(fmkernels.sample(logits, seed=s, step=t, backend="triton")) for s, t in
              ((1, 0), (1, 1), (2, 0), (1, 2**32), (2**32 + 1, 0))]
    assert len(set(tokens)) == len(tokens)
    assert int(fmkernels.sample(logits, seed=1, step=2**32, backend="triton")) == tokens[3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outputs_fill_poisoned_buffers(dtype):
    generator = torch.Generator().manual_seed(2)
    logits, params = _rows(8, 301, dtype, generator)
    logits = logits[:, :300]  # rows apart from each other, not contiguous
    out = torch.full(logits.shape, float("nan"), dtype=dtype, device=DEVICE)
    fmkernels.filter_logits(logits, backend="triton", out=out, **params)
    assert not out.isnan().any()
    check_masks(out, reference.filter_logits(logits, **params), logits, params)
    tokens = torch.full((8,), -1, dtype=torch.int64, device=DEVICE)
    fmkernels.sample(logits, seed=4, backend="triton", out=tokens, **params)
    assert_tokens_match(tokens, reference.sample(logits, seed=4, **params),
                  gumbel_scores(logits, params, reference.row_seeds(4, 8, DEVICE), torch.zeros(8, dtype=torch.int64,
                                                                                                 device=DEVICE)))
    tokens.fill_(-1)
    result = fmkernels.sample(logits, seed=4, backend="triton", out=tokens, return_logprobs=True, num_logprobs=3)
    assert (tokens >= 0).all() and result.tokens.data_ptr() == tokens.data_ptr()


def test_vocab_columns_with_a_stride():
    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(200, 3, generator=generator) * 2).to(DEVICE).t()  # (3, 200), vocab stride 3
    params = dict(top_k=20, top_p=0.9)
    assert torch.equal(fmkernels.filter_logits(logits, backend="triton", **params),
                       reference.filter_logits(logits, **params))
    assert torch.equal(fmkernels.sample(logits, seed=8, backend="triton", **params),
                       reference.sample(logits, seed=8, **params))


def test_empty_batch():
    logits = torch.randn(0, 50, device=DEVICE)
    assert fmkernels.filter_logits(logits, top_k=3, backend="triton").shape == (0, 50)
    out = fmkernels.sample(logits, seed=1, backend="triton", return_logprobs=True, num_logprobs=2)
    assert out.tokens.shape == (0,) and out.top_ids.shape == (0, 2)


# ---------------------------------------------------------------------------------------
# Full size, on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_filter_logits_full_vocabulary(dtype, batch):
    generator = torch.Generator().manual_seed(batch)
    for ties in (False, True):
        logits, params = _rows(batch, 128256, dtype, generator, ties, holes=0.001)
        actual = fmkernels.filter_logits(logits, backend="triton", **params)
        check_masks(actual, reference.filter_logits(logits, **params), logits, params)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_sample_full_vocabulary(dtype, batch):
    generator = torch.Generator().manual_seed(100 + batch)
    logits, params = _rows(batch, 128256, dtype, generator, holes=0.001)
    seeds = torch.randint(0, 2**62, (batch,), generator=generator).to(DEVICE)
    kwargs = dict(params, seed=seeds, step=17, return_logprobs=True, num_logprobs=8)
    actual = fmkernels.sample(logits, backend="triton", **kwargs)
    expected = reference.sample(logits, **kwargs)
    steps = torch.full((batch,), 17, dtype=torch.int64, device=DEVICE)
    assert_tokens_match(actual.tokens, expected.tokens, gumbel_scores(logits, params, seeds, steps))
    check_logprobs(actual, expected, logits, params)
    alone = fmkernels.sample(logits[-1:], backend="triton", seed=seeds[-1:], step=17,
                             **_row_params(params, batch - 1))
    assert int(alone) == int(actual.tokens[-1])


@pytest.mark.gpu
def test_gpu_draws_follow_the_filtered_distribution():
    generator = torch.Generator().manual_seed(6)
    logits = (torch.randn(1, 128256, generator=generator) * 3).to(DEVICE)
    params = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.01)
    draws = 40000
    tokens = fmkernels.sample(logits.expand(draws, -1), seed=torch.full((draws,), 99, device=DEVICE),
                              step=torch.arange(draws, device=DEVICE), backend="triton", **params)
    probs = torch.softmax(reference.filter_logits(logits, **params)[0].double(), dim=0)
    kept = probs > 0
    counts = torch.bincount(tokens, minlength=128256).double()
    assert counts[~kept].sum() == 0
    expected = probs[kept] * draws
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    p_value = 1.0 - float(torch.distributions.Chi2(torch.tensor(float(dof))).cdf(torch.tensor(chi2)))
    assert p_value > 1e-3, f"chi2 {chi2:.1f} with {dof} dof, p = {p_value:.2g}"
