"""The CUDA filter_logits and sample (csrc/cuda/sampling.cu, backend="cuda") against fmkernels.reference.

Masks must equal the reference's, except a top-p cut that the reference's own fp32
rounding decides (its mass before a token within CUT_ATOL of p) or a min-p cut within
CUT_ATOL of min_p (the GPU's exp is not torch's to the last bit); kept values equal.
Tokens equal the reference's (bit-exact Philox) except at Gumbel-score near ties;
log-probabilities are within 1e-4. Outputs are poisoned first.

The kernel tests need a GPU and the built fmkernels._cuda; the test of the shared
top-alternatives helper runs anywhere.
"""

import pytest
import torch

import fmkernels
from _sampling_checks import assert_tokens_match, check_logprobs, check_masks, gumbel_scores, random_rows
from fmkernels import platform, reference
from fmkernels.ops._top_tokens import top_tokens

CUDA_REASON = platform.unavailable_reason("cuda")
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda backend: {CUDA_REASON}")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rows(batch, vocab, dtype, generator, ties=False, holes=0.05):
    return random_rows(batch, vocab, dtype, generator, ties=ties, holes=holes, device="cuda")


def _row_params(params, row):
    return {key: value[row:row + 1] if isinstance(value, torch.Tensor) else value for key, value in params.items()}


def _kept_ids(out):
    return (~torch.isneginf(out)).nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------
# Runs anywhere


def test_top_tokens_orders_by_value_then_id():
    inf = float("inf")
    filtered = torch.tensor([[0.5, 3.0, -inf, 3.0, -inf, 1.0], [-inf, -inf, 2.0, -inf, -inf, -inf]])
    assert top_tokens(filtered, 5).tolist() == [[1, 3, 5, 0, 2], [2, 0, 1, 3, 4]]


# ---------------------------------------------------------------------------------------
# filter_logits, on a GPU



@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4099, 32000, 128256])
def test_filter_logits_masks_equal_the_reference(dtype, vocab):
    generator = torch.Generator().manual_seed(vocab)
    batch = 24 if vocab <= 4099 else 12
    for ties in (False, True):
        logits, params = _rows(batch, vocab, dtype, generator, ties)
        out = torch.full(logits.shape, float("nan"), dtype=dtype, device="cuda")
        fmkernels.filter_logits(logits, backend="cuda", out=out, **params)
        expected = reference.filter_logits(logits, **params)
        assert out.dtype == dtype and not out.isnan().any()
        check_masks(out, expected, logits, params)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("vocab", [1000, 128256])
@pytest.mark.parametrize("top_k", [1, 2, 50, 1000, 0])
@pytest.mark.parametrize("top_p", [0.1, 0.9, 1.0])
def test_filter_logits_top_k_top_p_grid(vocab, top_k, top_p):
    generator = torch.Generator().manual_seed(vocab + top_k)
    logits = (torch.randn(6, vocab, generator=generator) * 3).cuda()
    logits[1] = torch.randint(-3, 4, (vocab,), generator=generator).float().cuda()  # ties
    logits[2, ::7] = float("-inf")  # holes
    for temperature in (0.0, 0.7, 1.0):
        for min_p in (0.0, 0.05):
            params = dict(temperature=temperature, top_k=min(top_k, vocab), top_p=top_p, min_p=min_p)
            tensors = {key: torch.full((6,), value, device="cuda") for key, value in params.items()}
            tensors["top_k"] = tensors["top_k"].long()
            out = fmkernels.filter_logits(logits, backend="cuda", **params)
            check_masks(out, reference.filter_logits(logits, **params), logits, tensors)


@pytest.mark.gpu
@needs_cuda
def test_top_k_of_the_whole_vocabulary_and_beyond():
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 32000, generator=generator) * 2).cuda()
    logits[1, 100:200] = float("-inf")
    for k in (31999, 32000, 32003, 20000):
        out = fmkernels.filter_logits(logits, top_k=k, backend="cuda")
        assert torch.equal(out, reference.filter_logits(logits, top_k=k)), k


@pytest.mark.gpu
@needs_cuda
def test_greedy_keeps_the_first_argmax():
    inf = float("inf")
    logits = torch.tensor([[1.0, 3.0, 3.0, -1.0], [-inf, 2.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0],
                           [-inf, -inf, -inf, -7.0]], device="cuda")
    out = fmkernels.filter_logits(logits, temperature=0.0, backend="cuda")
    assert (~torch.isneginf(out)).nonzero().tolist() == [[0, 1], [1, 1], [2, 0], [3, 3]]
    assert fmkernels.sample(logits, temperature=0.0, seed=3, backend="cuda").tolist() == [1, 1, 0, 3]


@pytest.mark.gpu
@needs_cuda
def test_top_k_breaks_ties_by_lower_id():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0]], device="cuda")
    kept = [_kept_ids(fmkernels.filter_logits(logits, top_k=k, backend="cuda")[0]) for k in (1, 3, 4, 5, 6, 7, 8)]
    assert kept == [[1], [1, 3, 4], [1, 3, 4, 6], [1, 2, 3, 4, 6], [1, 2, 3, 4, 5, 6], list(range(7)), list(range(7))]


@pytest.mark.gpu
@needs_cuda
def test_ties_across_tiles_keep_the_lowest_ids():
    # Thousands of tokens at one value over many of the kernel's 2048-token tiles.
    logits = torch.zeros(3, 128256, device="cuda")
    logits[:, 7] = 1.0
    out = fmkernels.filter_logits(logits, top_k=torch.tensor([4500, 20, 100000], device="cuda"), backend="cuda")
    kept = ~torch.isneginf(out)
    assert kept[0].nonzero().flatten().tolist() == list(range(4500))
    assert kept[1].nonzero().flatten().tolist() == list(range(20))
    assert kept[2].nonzero().flatten().tolist() == list(range(100000))


@pytest.mark.gpu
@needs_cuda
def test_top_p_ties_keep_the_smallest_prefix_by_id():
    logits = torch.full((3, 8), 0.5, device="cuda")
    top_p = torch.tensor([0.3, 0.01, 0.9], device="cuda")
    out = fmkernels.filter_logits(logits, top_p=top_p, backend="cuda")
    assert (~torch.isneginf(out)).sum(dim=1).tolist() == [3, 1, 8]
    assert torch.equal(out, reference.filter_logits(logits, top_p=top_p))
    logits = torch.tensor([[1.0] * 10], device="cuda")
    out = fmkernels.filter_logits(logits, top_k=6, top_p=0.4, backend="cuda")
    assert _kept_ids(out[0]) == [0, 1, 2]
    # 3000 ties after one large token, across tiles: p cuts inside the ties.
    logits = torch.zeros(1, 5000, device="cuda")
    logits[0, 4000] = 5.0
    out = fmkernels.filter_logits(logits, top_p=0.5, backend="cuda")
    expected = reference.filter_logits(logits, top_p=0.5)
    assert _kept_ids(out[0]) == _kept_ids(expected[0])


@pytest.mark.gpu
@needs_cuda
def test_negative_zero_ranks_with_zero():
    logits = torch.tensor([[-0.0, 0.0, -0.0, 0.0, -1.0, 0.0]], device="cuda")
    for k in (1, 2, 3):
        out = fmkernels.filter_logits(logits, top_k=k, backend="cuda")
        assert torch.equal(torch.isneginf(out), torch.isneginf(reference.filter_logits(logits, top_k=k)))
    assert fmkernels.sample(logits, temperature=0.0, seed=0, backend="cuda").item() == 0


@pytest.mark.gpu
@needs_cuda
def test_minus_inf_tokens_are_never_kept():
    inf = float("inf")
    logits = torch.tensor([[-inf, 1.0, -inf, 0.5, -inf, -inf], [2.0, -inf, -inf, -inf, -inf, -inf]], device="cuda")
    for params in (dict(top_k=5), dict(top_k=6), dict(top_p=0.999), dict(min_p=0.0), dict(temperature=0.0)):
        out = fmkernels.filter_logits(logits, backend="cuda", **params)
        assert torch.equal(out, reference.filter_logits(logits, **params)), params
        tokens = fmkernels.sample(logits, seed=torch.tensor([5, 6], device="cuda"), backend="cuda", **params)
        assert torch.isfinite(logits.gather(1, tokens[:, None])).all()


@pytest.mark.gpu
@needs_cuda
def test_mask_agreement_on_many_random_rows():
    generator = torch.Generator().manual_seed(21)
    logits = (torch.randn(64, 1500, generator=generator) * 2).cuda()
    params = dict(temperature=torch.rand(64, generator=generator).cuda() + 0.3,
                  top_k=torch.randint(0, 300, (64,), generator=generator).cuda(),
                  top_p=(torch.rand(64, generator=generator) * 0.98 + 0.01).cuda(),
                  min_p=torch.zeros(64, device="cuda"))
    out = fmkernels.filter_logits(logits, backend="cuda", **params)
    differ = check_masks(out, reference.filter_logits(logits, **params), logits, params)
    assert len(differ) <= 2


@pytest.mark.gpu
@needs_cuda
def test_vocab_columns_with_a_stride_and_rows_apart():
    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(200, 3, generator=generator) * 2).cuda().t()  # (3, 200), vocab stride 3
    params = dict(top_k=20, top_p=0.9)
    assert torch.equal(fmkernels.filter_logits(logits, backend="cuda", **params),
                       reference.filter_logits(logits, **params))
    assert torch.equal(fmkernels.sample(logits, seed=8, backend="cuda", **params),
                       reference.sample(logits, seed=8, **params))
    wide = (torch.randn(4, 1003, generator=generator)).cuda()[:, 1:1002]  # rows unaligned and apart
    assert torch.equal(fmkernels.filter_logits(wide, backend="cuda", **params), reference.filter_logits(wide, **params))


# ---------------------------------------------------------------------------------------
# sample, on a GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32000, 128256])
def test_sample_equals_the_reference(dtype, vocab):
    generator = torch.Generator().manual_seed(1 + vocab)
    batch = 32 if vocab <= 1000 else 16
    for ties in (False, True):
        logits, params = _rows(batch, vocab, dtype, generator, ties)
        seeds = torch.randint(0, 2**62, (batch,), generator=generator).cuda()
        steps = torch.randint(0, 2**40, (batch,), generator=generator).cuda()
        n = min(vocab, 6)
        kwargs = dict(params, seed=seeds, step=steps, return_logprobs=True, num_logprobs=n)
        actual = fmkernels.sample(logits, backend="cuda", **kwargs)
        expected = reference.sample(logits, **kwargs)
        assert_tokens_match(actual.tokens, expected.tokens, gumbel_scores(logits, params, seeds, steps))
        check_logprobs(actual, expected, logits, params)
        if ties:
            assert torch.equal(actual.top_ids, expected.top_ids)
        tokens = fmkernels.sample(logits, backend="cuda", **dict(params, seed=seeds, step=steps))
        assert torch.equal(tokens, actual.tokens)


@pytest.mark.gpu
@needs_cuda
def test_top_ids_past_the_kept_tokens_are_removed_ones_by_id():
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 2.0, 1.0, 1.0]], device="cuda")
    out = fmkernels.sample(logits, top_k=torch.tensor([2, 3], device="cuda"), seed=0, backend="cuda",
                           return_logprobs=True, num_logprobs=5)
    assert out.top_ids.tolist() == [[1, 3, 0, 2, 4], [2, 0, 1, 3, 4]]
    assert torch.isneginf(out.top_logprobs[:, 3:]).all() and torch.isneginf(out.top_logprobs[0, 2])
    no_top = fmkernels.sample(logits, seed=0, backend="cuda", return_logprobs=True)
    assert no_top.top_ids.shape == (2, 0) and no_top.top_logprobs.shape == (2, 0)
    torch.testing.assert_close(no_top.logprobs, reference.sample(logits, seed=0, return_logprobs=True).logprobs)
    greedy = fmkernels.sample(logits, temperature=0.0, seed=0, backend="cuda", return_logprobs=True, num_logprobs=2)
    assert greedy.tokens.tolist() == [1, 2] and greedy.logprobs.tolist() == [0.0, 0.0]
    assert greedy.top_ids.tolist() == [[1, 0], [2, 0]]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_top_logprobs_keep_fp32_precision_at_a_small_temperature(backend):
    # At temperature 1e-4 the filtered logits are ~3e4, where fp32's spacing is 2**-8: the top
    # alternatives' log-probabilities must be (x - m) - log mass, as log_softmax computes them.
    # x - (m + log mass) rounded the sum at x's scale: log 3 of mass (three tokens tied at the
    # top) came out up to 2e-3 off (the fix of ef1afac for Triton, then for CUDA).
    if platform.unavailable_reason(backend) is not None:
        pytest.skip(f"{backend}: {platform.unavailable_reason(backend)}")
    generator = torch.Generator().manual_seed(12)
    logits = torch.randn(6, 1000, generator=generator)
    top = logits.max(dim=1, keepdim=True).values
    logits[:, [3, 500, 999]] = top + 3.0  # three tokens tied at the top, the rest ~3e4 below them
    logits = logits.cuda()
    kwargs = dict(temperature=1e-4, seed=0, return_logprobs=True, num_logprobs=3)
    actual = fmkernels.sample(logits, backend=backend, **kwargs)
    expected = reference.sample(logits, **kwargs)
    assert actual.top_ids.tolist() == [[3, 500, 999]] * 6
    log_third = torch.full((6, 3), -torch.log(torch.tensor(3.0)).item(), device="cuda")
    torch.testing.assert_close(expected.top_logprobs, log_third, atol=1e-6, rtol=0)
    torch.testing.assert_close(actual.top_logprobs, log_third, atol=1e-6, rtol=0)
    torch.testing.assert_close(actual.logprobs, log_third[:, 0], atol=1e-6, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_draws_follow_the_filtered_distribution():
    generator = torch.Generator().manual_seed(6)
    logits = (torch.randn(1, 128256, generator=generator) * 3).cuda()
    params = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.01)
    draws = 40000
    tokens = fmkernels.sample(logits.expand(draws, -1), seed=torch.full((draws,), 99, device="cuda"),
                              step=torch.arange(draws, device="cuda"), backend="cuda", **params)
    probs = torch.softmax(reference.filter_logits(logits, **params)[0].double(), dim=0)
    kept = probs > 0
    counts = torch.bincount(tokens, minlength=128256).double()
    assert counts[~kept].sum() == 0
    expected = probs[kept] * draws
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    p_value = 1.0 - float(torch.distributions.Chi2(torch.tensor(float(dof))).cdf(torch.tensor(chi2)))
    assert p_value > 1e-3, f"chi2 {chi2:.1f} with {dof} dof, p = {p_value:.2g}"


@pytest.mark.gpu
@needs_cuda
def test_a_row_draws_the_same_alone_in_a_batch_and_shuffled():
    generator = torch.Generator().manual_seed(9)
    logits, params = _rows(64, 32000, torch.float32, generator)
    seeds = torch.randint(0, 2**62, (64,), generator=generator).cuda()
    batch = fmkernels.sample(logits, seed=seeds, step=3, backend="cuda", **params)
    perm = torch.randperm(64, generator=generator).cuda()
    shuffled = fmkernels.sample(logits[perm], seed=seeds[perm], step=3, backend="cuda",
                                **{key: value[perm] for key, value in params.items()})
    alone = [int(fmkernels.sample(logits[i:i + 1], seed=seeds[i:i + 1], step=3, backend="cuda",
                                  **_row_params(params, i))) for i in range(64)]
    assert torch.equal(shuffled, batch[perm])
    assert batch.tolist() == alone


@pytest.mark.gpu
@needs_cuda
def test_seeds_and_steps_change_the_draws():
    logits = torch.zeros(1, 1000, device="cuda")
    tokens = [int(fmkernels.sample(logits, seed=s, step=t, backend="cuda")) for s, t in
              ((1, 0), (1, 1), (2, 0), (1, 2**32), (2**32 + 1, 0))]
    assert len(set(tokens)) == len(tokens)
    expected = [int(reference.sample(logits, seed=s, step=t)) for s, t in ((1, 0), (1, 2**32), (2**32 + 1, 0))]
    assert [tokens[0], tokens[3], tokens[4]] == expected


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outputs_fill_poisoned_buffers(dtype):
    generator = torch.Generator().manual_seed(2)
    logits, params = _rows(8, 301, dtype, generator)
    logits = logits[:, :300]
    out = torch.full(logits.shape, float("nan"), dtype=dtype, device="cuda")
    fmkernels.filter_logits(logits, backend="cuda", out=out, **params)
    assert not out.isnan().any()
    check_masks(out, reference.filter_logits(logits, **params), logits, params)
    tokens = torch.full((8,), -1, dtype=torch.int64, device="cuda")
    fmkernels.sample(logits, seed=4, backend="cuda", out=tokens, **params)
    steps = torch.zeros(8, dtype=torch.int64, device="cuda")
    assert_tokens_match(tokens, reference.sample(logits, seed=4, **params),
                        gumbel_scores(logits, params, reference.row_seeds(4, 8, "cuda"), steps))
    tokens.fill_(-1)
    result = fmkernels.sample(logits, seed=4, backend="cuda", out=tokens, return_logprobs=True, num_logprobs=3)
    assert (tokens >= 0).all() and result.tokens.data_ptr() == tokens.data_ptr()
    assert not result.logprobs.isnan().any() and not result.top_logprobs.isnan().any()


@pytest.mark.gpu
@needs_cuda
def test_empty_batch():
    logits = torch.randn(0, 50, device="cuda")
    assert fmkernels.filter_logits(logits, top_k=3, backend="cuda").shape == (0, 50)
    out = fmkernels.sample(logits, seed=1, backend="cuda", return_logprobs=True, num_logprobs=2)
    assert out.tokens.shape == (0,) and out.top_ids.shape == (0, 2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_full_vocabulary_batches(dtype, batch):
    generator = torch.Generator().manual_seed(100 + batch)
    logits, params = _rows(batch, 128256, dtype, generator, holes=0.001)
    check_masks(fmkernels.filter_logits(logits, backend="cuda", **params),
                 reference.filter_logits(logits, **params), logits, params)
    seeds = torch.randint(0, 2**62, (batch,), generator=generator).cuda()
    kwargs = dict(params, seed=seeds, step=17, return_logprobs=True, num_logprobs=8)
    actual = fmkernels.sample(logits, backend="cuda", **kwargs)
    expected = reference.sample(logits, **kwargs)
    steps = torch.full((batch,), 17, dtype=torch.int64, device="cuda")
    assert_tokens_match(actual.tokens, expected.tokens, gumbel_scores(logits, params, seeds, steps))
    check_logprobs(actual, expected, logits, params)
    alone = fmkernels.sample(logits[-1:], backend="cuda", seed=seeds[-1:], step=17, **_row_params(params, batch - 1))
    assert int(alone) == int(actual.tokens[-1])


@pytest.mark.gpu
@needs_cuda
def test_bindings_reject_views_that_do_not_fit():
    from fmkernels._views import tensor_view

    module = platform.cuda_module()
    logits = torch.randn(2, 10, device="cuda")
    params = [torch.ones(2, device="cuda"), torch.zeros(2, dtype=torch.int64, device="cuda"),
              torch.ones(2, device="cuda"), torch.zeros(2, device="cuda")]
    out = torch.empty(2, 9, device="cuda")
    with pytest.raises(ValueError, match="out must be shaped"):
        module.filter_logits(tensor_view(logits), tensor_view(out), *(tensor_view(p) for p in params), None, 0)
    wide = torch.zeros(2, 2, dtype=torch.int32, device="cuda")  # vocab 10 takes one word
    with pytest.raises(ValueError, match="allowed must be int32"):
        module.filter_logits(tensor_view(logits), tensor_view(torch.empty_like(logits)),
                             *(tensor_view(p) for p in params), tensor_view(wide), 0)
    tokens = torch.empty(2, dtype=torch.int64, device="cuda")
    seeds = torch.zeros(3, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="seeds"):
        module.sample(tensor_view(logits), tensor_view(tokens), *(tensor_view(p) for p in params),
                      tensor_view(seeds), tensor_view(seeds[:2]), None, None, None, None, 0)
