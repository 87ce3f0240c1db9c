"""reference.filter_logits, philox4x32, uniform_draws and sample against independent formulations.

Filters are checked exactly on hand-built logits (the kept set is known in advance) and on
random rows against a float64 pure-Python pipeline; the generator against published
Philox4x32-10 answers, a pure-Python Philox and Triton's; the draws by chi-square tests
at fixed seeds, so every test here is deterministic.
"""

import math

import pytest
import torch

from fmkernels import reference

MASK32 = 0xFFFFFFFF
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def philox_py(counter, key, rounds: int = 10):
    """Philox4x32 on Python ints, written from the Random123 paper, sharing no code with the reference."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def expected_kept(row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The DESIGN.md pipeline in float64 Python, one filter after another: the set of kept ids."""
    finite = [i for i, x in enumerate(row) if x != float("-inf")]
    if temperature == 0:
        best = max(row[i] for i in finite)
        return {min(i for i in finite if row[i] == best)}
    scaled = {i: row[i] / temperature for i in finite}
    ranked = sorted(finite, key=lambda i: (-scaled[i], i))  # ties: lower id first
    if top_k:
        ranked = ranked[:top_k]
    peak = scaled[ranked[0]]
    weights = [math.exp(scaled[i] - peak) for i in ranked]
    total = sum(weights)
    prefix, mass = [], 0.0
    for i, w in zip(ranked, weights):
        prefix.append(i)
        mass += w / total
        if mass >= top_p:
            break
    return {i for i in prefix if math.exp(scaled[i] - peak) >= min_p}


def kept_ids(filtered_row: torch.Tensor) -> set:
    return set(torch.nonzero(~torch.isneginf(filtered_row)).flatten().tolist())


def chi_square_p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of the draws' counts against probs (vocab,), pooling bins expected under 5 draws."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    if expected[-1] == 0:  # nothing pooled (or only impossible tokens, checked by the caller)
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    degrees = torch.tensor(float(expected.numel() - 1), dtype=torch.float64)
    return float(1.0 - torch.distributions.Chi2(degrees).cdf(statistic))


# ----------------------------------------------------------------------------
# filter_logits
# ----------------------------------------------------------------------------

# probabilities 0.5, 0.3, 0.15, 0.05 at ids 4, 1, 5, 2; ids 0 and 3 are -inf.
# Cumulative mass 0.5, 0.8, 0.95, 1.0; ratios to the largest 1, 0.6, 0.3, 0.1.
PROB_ROW = [float("-inf")] * 6
for _id, _p in zip([4, 1, 5, 2], [0.5, 0.3, 0.15, 0.05]):
    PROB_ROW[_id] = math.log(_p) + 1.7  # the shift must not matter
ALL_FINITE = {4, 1, 5, 2}

# ids 1 and 3 tie for first, 2 and 4 for third.
TIE_ROW = [1.0, 3.0, 2.0, 3.0, 2.0, 0.5]
FLAT_ROW = [0.7, 0.7, 0.7, 0.7]

FILTER_CASES = {
    "off": (PROB_ROW, {}, ALL_FINITE),
    "topk1": (PROB_ROW, dict(top_k=1), {4}),
    "topk2": (PROB_ROW, dict(top_k=2), {4, 1}),
    "topk5-beyond-finite": (PROB_ROW, dict(top_k=5), ALL_FINITE),
    "topk99-beyond-vocab": (PROB_ROW, dict(top_k=99), ALL_FINITE),
    # p values sit 0.01 away from the cumulative boundaries, never on them.
    "topp0.49": (PROB_ROW, dict(top_p=0.49), {4}),
    "topp0.51": (PROB_ROW, dict(top_p=0.51), {4, 1}),
    "topp0.79": (PROB_ROW, dict(top_p=0.79), {4, 1}),
    "topp0.81": (PROB_ROW, dict(top_p=0.81), {4, 1, 5}),
    "topp0.94": (PROB_ROW, dict(top_p=0.94), {4, 1, 5}),
    "topp0.96": (PROB_ROW, dict(top_p=0.96), ALL_FINITE),
    "minp0.09": (PROB_ROW, dict(min_p=0.09), ALL_FINITE),
    "minp0.11": (PROB_ROW, dict(min_p=0.11), {4, 1, 5}),
    "minp0.29": (PROB_ROW, dict(min_p=0.29), {4, 1, 5}),
    "minp0.31": (PROB_ROW, dict(min_p=0.31), {4, 1}),
    "minp0.61": (PROB_ROW, dict(min_p=0.61), {4}),
    "minp1": (PROB_ROW, dict(min_p=1.0), {4}),
    # top-p alone at 0.6 keeps {4, 1}; after top-k 2 the survivors renormalise to 0.625, 0.375.
    "topp0.6-alone": (PROB_ROW, dict(top_p=0.6), {4, 1}),
    "topk2-then-topp0.6": (PROB_ROW, dict(top_k=2, top_p=0.6), {4}),
    # min-p before top-p would renormalise to 0.625, 0.375 and top-p would then keep only {4}.
    "topp0.6-then-minp0.35": (PROB_ROW, dict(top_p=0.6, min_p=0.35), {4, 1}),
    # Temperature first: at T=2 the masses are 0.379, 0.293, 0.208, 0.120 and the ratios 1, 0.77, 0.55, 0.32;
    # at T=0.5 the first mass is 0.685. At T=1 each of these would keep {4, 1}.
    "t2-then-topp0.7": (PROB_ROW, dict(temperature=2.0, top_p=0.7), {4, 1, 5}),
    "t2-then-minp0.5": (PROB_ROW, dict(temperature=2.0, min_p=0.5), {4, 1, 5}),
    "t0.5-then-topp0.68": (PROB_ROW, dict(temperature=0.5, top_p=0.68), {4}),
    "t0-greedy": (PROB_ROW, dict(temperature=0.0, top_k=3, top_p=0.9), {4}),
    "ties-topk1": (TIE_ROW, dict(top_k=1), {1}),
    "ties-topk2": (TIE_ROW, dict(top_k=2), {1, 3}),
    "ties-topk3": (TIE_ROW, dict(top_k=3), {1, 3, 2}),
    "ties-topk4": (TIE_ROW, dict(top_k=4), {1, 3, 2, 4}),
    "ties-t0-greedy": (TIE_ROW, dict(temperature=0.0), {1}),
    # Equal probabilities: the top-p prefix takes them by lower id, as top-k does.
    "flat-topp0.2": (FLAT_ROW, dict(top_p=0.2), {0}),
    "flat-topp0.3": (FLAT_ROW, dict(top_p=0.3), {0, 1}),
    "flat-topp0.6": (FLAT_ROW, dict(top_p=0.6), {0, 1, 2}),
    "flat-minp1": (FLAT_ROW, dict(min_p=1.0), {0, 1, 2, 3}),
}


@pytest.mark.parametrize("case_id", list(FILTER_CASES))
def test_filter_keeps_exactly_the_expected_set(case_id):
    row, params, expected = FILTER_CASES[case_id]
    assert expected_kept(row, **params) == expected  # the float64 pipeline agrees with the hand count
    logits = torch.tensor([row])

    filtered = reference.filter_logits(logits, **params)

    assert kept_ids(filtered[0]) == expected
    temperature = params.get("temperature", 1.0)
    kept = sorted(expected)
    # Greedy keeps the unscaled logit; otherwise kept values are logits / temperature.
    divisor = temperature if temperature > 0 else 1.0
    assert torch.equal(filtered[0, kept], logits[0, kept] / divisor)


def _random_logits(generator, batch, vocab, dtype, neginf_fraction=0.1) -> torch.Tensor:
    logits = torch.randn(batch, vocab, generator=generator) * 3
    holes = torch.rand(batch, vocab, generator=generator) < neginf_fraction
    holes[:, 0] = False  # every row keeps a finite token
    return logits.masked_fill(holes, float("-inf")).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02),
        dict(temperature=1.3, top_p=0.6),
        dict(temperature=0.5, min_p=0.1),
        dict(top_k=7),
    ],
    ids=["all-four", "t-topp", "t-minp", "topk"],
)
def test_filter_random_rows_match_float64_pipeline(params, dtype):
    g = _generator(11)
    logits = _random_logits(g, 8, 300, dtype)

    filtered = reference.filter_logits(logits, **params)

    assert filtered.dtype == dtype
    scaled = (logits.float() / params.get("temperature", 1.0)).to(dtype)
    for b in range(logits.shape[0]):
        expected = expected_kept(logits[b].double().tolist(), **params)
        assert kept_ids(filtered[b]) == expected
        kept = sorted(expected)
        assert torch.equal(filtered[b, kept], scaled[b, kept])
        assert not kept_ids(filtered[b]) & set(torch.nonzero(torch.isneginf(logits[b])).flatten().tolist())


def test_neginf_tokens_are_never_kept():
    row = [float("-inf"), 0.3, float("-inf"), float("-inf"), -2.0, float("-inf")]
    logits = torch.tensor([row] * 5)
    for params in (
        dict(),
        dict(top_k=4),  # asks for more tokens than are finite
        dict(top_p=1.0, min_p=0.0),
        dict(temperature=0.0),
        dict(temperature=50.0, top_k=6),
    ):
        assert kept_ids(reference.filter_logits(logits, **params)[0]) <= {1, 4}, params


def test_per_row_tensor_parameters_equal_row_by_row_calls():
    g = _generator(5)
    logits = _random_logits(g, 6, 64, torch.float32)
    rows = dict(
        temperature=[0.7, 1.0, 0.0, 1.3, 0.9, 2.0],
        top_k=[0, 5, 3, 10, 1, 64],
        top_p=[1.0, 0.9, 0.5, 0.8, 1.0, 0.3],
        min_p=[0.0, 0.05, 0.0, 0.1, 0.5, 0.0],
    )
    tensors = dict(
        temperature=torch.tensor(rows["temperature"]),
        top_k=torch.tensor(rows["top_k"]),
        top_p=torch.tensor(rows["top_p"]),
        min_p=torch.tensor(rows["min_p"]),
    )

    batched = reference.filter_logits(logits, **tensors)

    sizes = set()
    for b in range(logits.shape[0]):
        scalars = {name: values[b] for name, values in rows.items()}
        assert torch.equal(batched[b : b + 1], reference.filter_logits(logits[b : b + 1], **scalars))
        assert kept_ids(batched[b]) == expected_kept(logits[b].double().tolist(), **scalars)
        sizes.add(len(kept_ids(batched[b])))
    assert len(sizes) > 3  # the rows really are filtered differently


# ----------------------------------------------------------------------------
# Philox4x32-10 and the uniform draws
# ----------------------------------------------------------------------------

# Random123's kat_vectors for philox4x32_10: (counter, key, result).
PHILOX_KAT = {
    "zeros": ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    "ones": (
        (MASK32, MASK32, MASK32, MASK32),
        (MASK32, MASK32),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    "pi": (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
}


@pytest.mark.parametrize("case_id", list(PHILOX_KAT))
def test_philox_known_answers(case_id):
    counter, key, result = PHILOX_KAT[case_id]
    words = reference.philox4x32(
        tuple(torch.tensor(c, dtype=torch.int64) for c in counter),
        tuple(torch.tensor(k, dtype=torch.int64) for k in key),
    )
    assert tuple(int(w) for w in words) == result
    assert philox_py(counter, key) == result


def test_philox_batched_matches_python_philox():
    g = _generator(3)
    # Full 32-bit words, most above 2**31, where an int64 product would overflow without the 16-bit split.
    words = torch.randint(0, 2**32, (6, 64), generator=g, dtype=torch.int64)
    counter, key = tuple(words[:4]), tuple(words[4:])

    result = torch.stack(reference.philox4x32(counter, key))

    for j in range(words.shape[1]):
        column = [int(w) for w in words[:, j]]
        assert tuple(result[:, j].tolist()) == philox_py(column[:4], column[4:])


def test_philox_matches_triton_randint4x():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def _randint4x_kernel(seed, offset_base, out_ptr, BLOCK: tl.constexpr):
        offsets = offset_base + tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(seed, offsets)
        base = out_ptr + tl.arange(0, BLOCK) * 4
        tl.store(base + 0, r0.to(tl.int64))
        tl.store(base + 1, r1.to(tl.int64))
        tl.store(base + 2, r2.to(tl.int64))
        tl.store(base + 3, r3.to(tl.int64))

    # Runs under the interpreter on CPU tensors where there is no GPU (conftest sets TRITON_INTERPRET).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block = 16
    # An int64 offset above 2**32 fills counter word 1 too: counter (offset low, offset high, 0, 0).
    for seed, offset_base in ((0, 0), (0x0123456789ABCDEF, 7), (2**40 + 3, 2**33 + 5)):
        out = torch.full((block * 4,), -1, dtype=torch.int64, device=device)
        _randint4x_kernel[(1,)](seed, offset_base, out, BLOCK=block)
        offsets = offset_base + torch.arange(block, dtype=torch.int64)
        expected = reference.philox4x32(
            (offsets & MASK32, offsets >> 32, torch.zeros_like(offsets), torch.zeros_like(offsets)),
            (torch.tensor(seed & MASK32), torch.tensor(seed >> 32)),
        )
        assert torch.equal(out.cpu().view(block, 4) & MASK32, torch.stack(expected, dim=1)), (seed, offset_base)


def test_uniform_draws_follow_the_documented_layout():
    seeds = [0, 2**40 + 7, 2**63 - 1]
    steps = [0, 2**33 + 5, 12345]
    vocab = 10  # not a multiple of 4: the last counter's words are partly unused

    u = reference.uniform_draws(torch.tensor(seeds), torch.tensor(steps), vocab)

    assert u.dtype == torch.float32 and u.shape == (3, vocab)
    for b, (seed, step) in enumerate(zip(seeds, steps)):
        for i in range(vocab):
            word = philox_py((i // 4, step & MASK32, step >> 32, 0), (seed & MASK32, seed >> 32))[i % 4]
            assert u[b, i].item() == ((word >> 9) + 0.5) / 2**23, (b, i)


# Found by search: Philox words with the top 23 bits all ones (seed 39075, token 3) and all zeros
# (seed 75465, token 0), both at step 0. The first rounded to u = 1.0 under a 24-bit fp32 formula.
EXTREME_DRAWS = {"largest": (39075, 3, 1.0 - 2.0**-24), "smallest": (75465, 0, 2.0**-24)}


@pytest.mark.parametrize("case_id", list(EXTREME_DRAWS))
def test_uniform_draws_extremes_stay_inside_the_open_interval(case_id):
    seed, token, value = EXTREME_DRAWS[case_id]
    u = reference.uniform_draws(torch.tensor([seed]), torch.tensor([0]), 8)
    assert u[0, token].item() == value
    assert 0.0 < u[0, token].item() < 1.0


def test_sample_never_draws_a_removed_token_at_the_largest_draw():
    # Seed 39075's token 3 gets the largest Gumbel noise there is; removed tokens must still lose.
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, float("-inf"), 0.1, 0.2]] * 2)
    logits[1, 3] = float("-inf")
    tokens = reference.sample(logits, top_k=torch.tensor([1, 0]), seed=torch.tensor([39075, 39075]))
    assert tokens[0].item() == 0
    assert tokens[1].item() != 3


def test_uniform_draws_are_uniform():
    g = _generator(17)
    seeds = torch.randint(0, 2**62, (4096,), generator=g)
    steps = torch.randint(0, 2**40, (4096,), generator=g)

    u = reference.uniform_draws(seeds, steps, 64).flatten()  # 262144 draws

    assert u.min() > 0 and u.max() < 1
    bins = 256
    assert chi_square_p_value((u * bins).long(), torch.full((bins,), 1.0 / bins)) > 1e-3
    # Kolmogorov-Smirnov on a subsample: sup |F_n - F| against 1.95 / sqrt(n) (alpha = 0.001).
    sample = torch.sort(u[:20000].double()).values
    n = sample.numel()
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    distance = torch.maximum(ranks / n - sample, sample - (ranks - 1) / n).max().item()
    assert distance < 1.95 / math.sqrt(n)


# ----------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------

SAMPLING_FILTERS = {
    "temperature0.8": dict(temperature=0.8),
    "t1.1-topk12-topp0.9-minp0.02": dict(temperature=1.1, top_k=12, top_p=0.9, min_p=0.02),
}
DRAWS = 20000


@pytest.mark.parametrize("scheme", ["many-seeds", "many-steps"])
@pytest.mark.parametrize("filter_id", list(SAMPLING_FILTERS))
def test_sample_distribution_matches_filtered_softmax(filter_id, scheme):
    params = SAMPLING_FILTERS[filter_id]
    vocab = 24
    logits = (torch.randn(1, vocab, generator=_generator(23)) * 1.5).expand(DRAWS, vocab)
    if scheme == "many-seeds":
        seeds, steps = torch.arange(DRAWS, dtype=torch.int64) * 7919 + 12345, 0
    else:
        seeds, steps = torch.full((DRAWS,), 2024, dtype=torch.int64), torch.arange(DRAWS, dtype=torch.int64)

    tokens = reference.sample(logits, seed=seeds, step=steps, **params)

    filtered = reference.filter_logits(logits[:1], **params)[0]
    kept = ~torch.isneginf(filtered)
    assert kept[tokens].all()
    if "top_k" in params:
        assert 1 < int(kept.sum()) < 12  # the filters are active, and more than one token is left
    assert chi_square_p_value(tokens, torch.softmax(filtered.double(), dim=-1)) > 1e-3


def test_row_token_does_not_depend_on_its_batch():
    g = _generator(29)
    batch, vocab = 6, 1000
    logits = torch.randn(batch, vocab, generator=g) * 2
    seeds = torch.randint(0, 2**62, (batch,), generator=g)
    params = dict(temperature=0.9, top_k=200, top_p=0.95, step=7)

    tokens = reference.sample(logits, seed=seeds, **params)

    assert (tokens != logits.argmax(dim=-1)).any()  # really sampled, not greedy
    for b in range(batch):
        assert reference.sample(logits[b : b + 1], seed=seeds[b : b + 1], **params).item() == tokens[b].item()
    order = torch.randperm(batch, generator=g)
    assert torch.equal(reference.sample(logits[order], seed=seeds[order], **params), tokens[order])
    subset = torch.tensor([4, 1, 2])
    assert torch.equal(reference.sample(logits[subset], seed=seeds[subset], **params), tokens[subset])


def test_int_seed_gives_row_b_the_seed_plus_b():
    logits = torch.randn(8, 500, generator=_generator(31))
    tokens = reference.sample(logits, seed=100, step=3)
    assert torch.equal(tokens, reference.sample(logits, seed=100 + torch.arange(8), step=3))
    assert not torch.equal(tokens, reference.sample(logits, seed=torch.full((8,), 100), step=3))


def test_seed_none_follows_torch_manual_seed():
    logits = torch.randn(16, 1000, generator=_generator(37)) * 0.1
    torch.manual_seed(1234)
    first = reference.sample(logits)
    second = reference.sample(logits)  # the default generator moved on
    torch.manual_seed(1234)
    again = reference.sample(logits)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_different_steps_give_different_draws():
    logits = (torch.randn(1, 1000, generator=_generator(41)) * 0.1).expand(64, 1000)
    tokens = reference.sample(logits, seed=torch.full((64,), 7), step=torch.arange(64))
    # 64 draws from ~1000 near-equally likely tokens: a handful of repeats at most.
    assert tokens.unique().numel() > 56


def _argmax_lowest_id(row) -> int:
    best = max(row)
    return row.index(best)


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = torch.randn(5, 50, generator=_generator(43))
    logits[0, [3, 7]] = 10.0
    logits[1, [0, 49]] = 10.0
    logits[2, :10] = float("-inf")
    logits[3, [45, 12, 30]] = 5.0
    for seed in (0, 99):
        tokens = reference.sample(logits, temperature=0.0, top_p=0.5, seed=seed)
        assert tokens.tolist() == [_argmax_lowest_id(row) for row in logits.tolist()]
    assert tokens[0].item() == 3 and tokens[1].item() == 0 and tokens[3].item() == 12


def test_greedy_and_sampled_rows_in_one_batch():
    g = _generator(47)
    logits = torch.randn(5, 1000, generator=g) * 0.5
    temperature = torch.tensor([0.0, 0.8, 0.0, 1.3, 0.0])
    seeds = torch.randint(0, 2**62, (5,), generator=g)

    tokens = reference.sample(logits, temperature=temperature, seed=seeds, step=2)

    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits[greedy].argmax(dim=-1))
    for b in torch.nonzero(~greedy).flatten().tolist():
        alone = reference.sample(logits[b : b + 1], temperature=float(temperature[b]), seed=seeds[b : b + 1], step=2)
        assert alone.item() == tokens[b].item()
        assert tokens[b].item() != logits[b].argmax().item()


def _top_ids(row, n):
    return sorted(range(len(row)), key=lambda i: (-row[i], i))[:n]


# Temperature 1 keeps filter_logits exact in low precision, so its log-softmax is the same number.
LOGPROB_CASES = {
    "fp32-t0.9-filtered": (torch.float32, dict(temperature=0.9, top_k=20, top_p=0.95)),
    "fp16-t1-minp": (torch.float16, dict(min_p=0.05)),
    "bf16-t1-topk": (torch.bfloat16, dict(top_k=6)),
}


@pytest.mark.parametrize("case_id", list(LOGPROB_CASES))
@pytest.mark.parametrize("num_logprobs", [0, 5, 40])
def test_return_logprobs(case_id, num_logprobs):
    dtype, params = LOGPROB_CASES[case_id]
    g = _generator(53)
    logits = (torch.randn(4, 64, generator=g) * 2).to(dtype)
    logits[0, [9, 2, 30]] = 6.0  # a three-way tie for the top: ids 2, 9, 30 in that order

    result = reference.sample(
        logits, seed=torch.tensor([5, 6, 7, 8]), return_logprobs=True, num_logprobs=num_logprobs, **params
    )

    logprobs = torch.log_softmax(reference.filter_logits(logits, **params).float(), dim=-1)
    assert torch.equal(result.tokens, reference.sample(logits, seed=torch.tensor([5, 6, 7, 8]), **params))
    assert result.logprobs.dtype == torch.float32 and result.top_logprobs.dtype == torch.float32
    assert result.top_ids.dtype == torch.int64
    assert result.top_ids.shape == (4, num_logprobs) and result.top_logprobs.shape == (4, num_logprobs)
    torch.testing.assert_close(result.logprobs, logprobs.gather(1, result.tokens[:, None])[:, 0], rtol=1e-6, atol=1e-6)
    for b in range(4):
        assert result.top_ids[b].tolist() == _top_ids(logprobs[b].tolist(), num_logprobs)
    torch.testing.assert_close(result.top_logprobs, logprobs.gather(1, result.top_ids), rtol=1e-6, atol=1e-6)
    if num_logprobs >= 3:
        assert result.top_ids[0, :3].tolist() == [2, 9, 30]
