"""The C++ CPU filter_logits and sample against fmkernels.reference.

Masks must equal the reference's. The one allowed difference is a top-p cut the reference's
own fp32 rounding decides: for vocabularies past the kernel's whole-row sort (4096) the kernel
sums probabilities in double, the reference in fp32, so a token whose mass before it is within
fmkernels.testing.top_p_boundary_width(vocab) of p may fall on either side. Tokens must equal the reference's
except at Gumbel-score near ties (fmkernels.testing's rule).
"""

import pytest
import torch

import fmkernels
from _sampling_checks import assert_tokens_match, gumbel_scores, random_rows
from fmkernels import platform, reference, testing
from fmkernels._views import tensor_view

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SORT_ALL = 4096  # csrc/cpu/sampling.cpp kSortAll


def _rows(batch, vocab, dtype, generator, ties=False):
    return random_rows(batch, vocab, dtype, generator, ties=ties)


def _mass_before(logits, params, row):
    """Exact (float64) mass before each token's rank under the row's top-k distribution."""
    t = float(params["temperature"][row]) or 1.0
    x = logits[row].double() / t
    vocab = x.numel()
    order = torch.sort(x, descending=True, stable=True).indices
    k = int(params["top_k"][row])
    k = vocab if k == 0 or k >= vocab else k
    sorted_x = x[order].clone()
    sorted_x[k:] = float("-inf")
    probs = torch.softmax(sorted_x, dim=0)
    before = torch.cumsum(probs, 0) - probs
    return torch.empty_like(before).scatter_(0, order, before)


def _check_masks(actual, expected, logits, params):
    kept, kept_expected = ~torch.isneginf(actual), ~torch.isneginf(expected)
    for row in (kept != kept_expected).any(dim=1).nonzero().flatten().tolist():
        # Only a top-p cut the reference's rounding decides may differ.
        p = float(params["top_p"][row])
        assert logits.shape[1] > SORT_ALL and p < 1.0, f"row {row}: masks differ"
        differ = (kept[row] != kept_expected[row]).nonzero().flatten()
        gap = (_mass_before(logits, params, row)[differ] - p).abs().max()
        width = testing.top_p_boundary_width(logits.shape[1])
        assert gap <= width, f"row {row}: masks differ {float(gap):.3g} from the top-p cut (width {width:.3g})"
    both = kept & kept_expected
    assert torch.equal(actual[both], expected[both])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32000])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "tied"])
def test_filter_logits_masks_equal_the_reference(dtype, vocab, ties):
    generator = torch.Generator().manual_seed(vocab)
    logits, params = _rows(48, vocab, dtype, generator, ties)
    actual = fmkernels.filter_logits(logits, backend="cpu", **params)
    expected = reference.filter_logits(logits, **params)
    assert actual.dtype == dtype
    _check_masks(actual, expected, logits, params)


def test_greedy_keeps_the_first_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, -1.0], [float("-inf"), 2.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    out = fmkernels.filter_logits(logits, temperature=0.0, backend="cpu")
    assert (~torch.isneginf(out)).nonzero().tolist() == [[0, 1], [1, 1], [2, 0]]
    assert fmkernels.sample(logits, temperature=0.0, seed=3, backend="cpu").tolist() == [1, 1, 0]


def test_top_k_breaks_ties_by_lower_id():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0]])
    out = fmkernels.filter_logits(logits, top_k=3, backend="cpu")
    assert (~torch.isneginf(out[0])).nonzero().flatten().tolist() == [1, 3, 4]
    out = fmkernels.filter_logits(logits, top_k=5, backend="cpu")
    assert (~torch.isneginf(out[0])).nonzero().flatten().tolist() == [1, 2, 3, 4, 6]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [7, 1000, 32000])
def test_sample_equals_the_reference(dtype, vocab):
    generator = torch.Generator().manual_seed(1 + vocab)
    for ties in (False, True):
        logits, params = _rows(64, vocab, dtype, generator, ties)
        seeds = torch.randint(0, 2**62, (64,), generator=generator)
        steps = torch.randint(0, 2**40, (64,), generator=generator)
        n = min(vocab, 6)
        kwargs = dict(params, seed=seeds, step=steps, return_logprobs=True, num_logprobs=n)
        actual = fmkernels.sample(logits, backend="cpu", **kwargs)
        expected = reference.sample(logits, **kwargs)
        assert_tokens_match(actual.tokens, expected.tokens, gumbel_scores(logits, params, seeds, steps))
        logprobs = torch.log_softmax(reference.filter_logits(logits.float(), **params), dim=-1)
        torch.testing.assert_close(actual.logprobs, logprobs.gather(1, actual.tokens[:, None])[:, 0],
                                   atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(actual.top_logprobs, expected.top_logprobs, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(actual.top_logprobs, logprobs.gather(1, actual.top_ids), atol=1e-4, rtol=1e-5)


def test_top_ids_past_the_kept_tokens_are_removed_ones_by_id():
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, 0.0]])
    out = fmkernels.sample(logits, top_k=2, seed=0, backend="cpu", return_logprobs=True, num_logprobs=5)
    assert out.top_ids.tolist() == [[1, 3, 0, 2, 4]]
    assert torch.isneginf(out.top_logprobs[0, 2:]).all()


def test_draws_follow_the_filtered_distribution():
    """Chi-square of 40000 draws (one seed, steps 0..39999) against softmax(filtered)."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 40, generator=generator) * 2
    params = dict(temperature=0.8, top_k=20, top_p=0.95, min_p=0.01)
    draws = 40000
    tokens = fmkernels.sample(logits.expand(draws, -1), seed=torch.full((draws,), 1234), step=torch.arange(draws),
                              backend="cpu", **params)
    probs = torch.softmax(reference.filter_logits(logits, **params)[0].double(), dim=0)
    kept = probs > 0
    counts = torch.bincount(tokens, minlength=40).double()
    assert counts[~kept].sum() == 0
    expected = probs[kept] * draws
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    p_value = 1.0 - float(torch.distributions.Chi2(torch.tensor(float(dof))).cdf(torch.tensor(chi2)))
    assert p_value > 1e-3, f"chi2 {chi2:.1f} with {dof} dof, p = {p_value:.2g}"


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_draws_the_same_alone_in_a_batch_and_shuffled(threads):
    generator = torch.Generator().manual_seed(9)
    logits, params = _rows(24, 5000, torch.float32, generator)
    seeds = torch.randint(0, 2**62, (24,), generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = fmkernels.sample(logits, seed=seeds, step=3, backend="cpu", **params)
        perm = torch.randperm(24, generator=generator)
        shuffled = fmkernels.sample(logits[perm], seed=seeds[perm], step=3, backend="cpu",
                                    **{key: value[perm] for key, value in params.items()})
        alone = [int(fmkernels.sample(logits[i:i + 1], seed=seeds[i:i + 1], step=3, backend="cpu",
                                      **{key: value[i:i + 1] for key, value in params.items()}))
                 for i in range(24)]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(shuffled, batch[perm])
    assert batch.tolist() == alone


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outputs_fill_poisoned_buffers(dtype):
    generator = torch.Generator().manual_seed(2)
    logits, params = _rows(16, 3000, dtype, generator)
    logits = logits[:, :2999]  # rows apart from each other, not contiguous
    out = torch.full(logits.shape, float("nan"), dtype=dtype)
    fmkernels.filter_logits(logits, backend="cpu", out=out, **params)
    assert not out.isnan().any()
    _check_masks(out, reference.filter_logits(logits, **params), logits, params)
    tokens = torch.full((16,), -1, dtype=torch.int64)
    fmkernels.sample(logits, seed=4, backend="cpu", out=tokens, **params)
    assert torch.equal(tokens, reference.sample(logits, seed=4, **params))


def test_large_vocabulary_top_p_alone():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 128256, generator=generator) * 2
    params = dict(temperature=torch.full((8,), 0.7), top_k=torch.zeros(8, dtype=torch.int64),
                  top_p=torch.full((8,), 0.9), min_p=torch.zeros(8))
    _check_masks(fmkernels.filter_logits(logits, backend="cpu", **params),
                 reference.filter_logits(logits, **params), logits, params)


def test_the_kernel_rejects_views_that_do_not_fit():
    module = platform.cpu_module()
    logits = torch.randn(3, 10)
    out = torch.empty(3, 10, dtype=torch.float16)
    params = [torch.ones(3), torch.zeros(3, dtype=torch.int64), torch.ones(3), torch.zeros(3)]
    views = [tensor_view(p) for p in params]
    with pytest.raises(ValueError, match="out"):
        module.filter_logits(tensor_view(logits), tensor_view(out), *views, None, 1)
    views[1] = tensor_view(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="top_k"):
        module.filter_logits(tensor_view(logits), tensor_view(torch.empty(3, 10)), *views, None, 1)
    views[1] = tensor_view(params[1])
    for allowed in (torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 1, dtype=torch.int64),
                    torch.zeros(2, 1, dtype=torch.int32)):
        with pytest.raises(ValueError, match="allowed"):
            module.filter_logits(tensor_view(logits), tensor_view(torch.empty(3, 10)), *views,
                                 tensor_view(allowed), 1)
    tokens = torch.empty(2, dtype=torch.int64)
    seeds = tensor_view(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="tokens"):
        module.sample(tensor_view(logits), tensor_view(tokens), *views, seeds, seeds, None, None, None, None, 1)
    tokens = torch.empty(3, dtype=torch.int64)
    top_ids = tensor_view(torch.empty(3, 11, dtype=torch.int64))
    with pytest.raises(ValueError, match="top_ids"):
        module.sample(tensor_view(logits), tensor_view(tokens), *views, seeds, seeds, None,
                      tensor_view(torch.empty(3)), top_ids, tensor_view(torch.empty(3, 11)), 1)
    with pytest.raises(ValueError, match="allowed"):
        module.sample(tensor_view(logits), tensor_view(tokens), *views, seeds, seeds,
                      tensor_view(torch.zeros(3, 2, dtype=torch.int32)), None, None, None, 1)


def test_empty_batch():
    logits = torch.randn(0, 50)
    assert fmkernels.filter_logits(logits, top_k=3, backend="cpu").shape == (0, 50)
    out = fmkernels.sample(logits, seed=1, backend="cpu", return_logprobs=True, num_logprobs=2)
    assert out.tokens.shape == (0,) and out.top_ids.shape == (0, 2)


def test_first_row_without_allowed_reads_only_bitmasks():
    module = platform.cpu_module()
    allowed = torch.full((3, 2), -1, dtype=torch.int32)
    assert module.first_row_without_allowed(tensor_view(allowed), 40) == -1
    allowed[1] = torch.tensor([0, -1 << 8], dtype=torch.int32)  # only bits past a vocabulary of 40
    assert module.first_row_without_allowed(tensor_view(allowed), 40) == 1
    assert module.first_row_without_allowed(tensor_view(allowed), 41) == -1  # bit 8 of word 1 is token 40
    for bad, vocab in ((allowed.long(), 40), (allowed, 70), (allowed, 0), (allowed.T.contiguous().T, 40),
                       (torch.zeros(3, dtype=torch.int32), 40)):
        with pytest.raises(ValueError, match="allowed must be int32"):
            module.first_row_without_allowed(tensor_view(bad), vocab)
