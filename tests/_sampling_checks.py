"""Token, mask and log-probability checks shared by the sampling backends' tests."""

import torch

from fmkernels import reference

#: How far from p the reference's mass before a token may be for its top-p cut to differ (and
#: exp(x - max) from min_p, relatively, for a min-p cut): the GPU backends sum and exponentiate
#: in another order than the reference's fp32 softmax and cumsum.
CUT_ATOL = 1e-5
LOGPROB_ATOL = 1e-4

#: Two tokens whose Gumbel scores are this close (relatively) are a near tie either may win.
NEAR_TIE = 1e-5


def gumbel_scores(logits, params, seeds, steps):
    """filtered logit - log(-log u) per token: the sampled token is the argmax of this."""
    filtered = reference.filter_logits(logits.float(), **params)
    u = reference.uniform_draws(seeds, steps, logits.shape[1])
    return filtered - torch.log(-torch.log(u))


def assert_tokens_match(tokens, expected, scores):
    """Tokens equal the reference's, except where the two tokens' scores are a near tie."""
    rows = (tokens != expected).nonzero().flatten()
    if len(rows):
        a = scores[rows].gather(1, tokens[rows, None])[:, 0]
        b = scores[rows].gather(1, expected[rows, None])[:, 0]
        gap = (a - b).abs() / torch.maximum(a.abs(), b.abs())
        assert float(gap.max()) <= NEAR_TIE, f"tokens differ in rows {rows.tolist()}"


def random_rows(batch, vocab, dtype, generator, ties=False, holes=0.05, device="cpu"):
    """Logits with -inf holes (never a whole row) and per-row mixed sampling parameters."""
    if ties:
        logits = torch.randint(-4, 5, (batch, vocab), generator=generator).float()
    else:
        logits = torch.randn((batch, vocab), generator=generator) * 3
    hole = torch.rand((batch, vocab), generator=generator) < holes
    hole[:, 0] = False
    logits = logits.masked_fill(hole, float("-inf")).to(dtype)

    def pick(values):
        values = torch.tensor(values)
        return values[torch.randint(0, len(values), (batch,), generator=generator)]

    params = dict(
        temperature=pick([0.0, 0.7, 1.0, 1.5]).float(),
        top_k=pick([0, 1, 50, vocab, vocab + 3]).long(),
        top_p=pick([1.0, 0.9, 0.01]).float(),
        min_p=pick([0.0, 0.05]).float(),
    )
    return logits.to(device), {key: value.to(device) for key, value in params.items()}


def mass_before(logits, params, row):
    """The mass before each token's rank (float64) under the row's top-k distribution."""
    t = float(params["temperature"][row]) or 1.0
    x = logits[row].float().cpu() / t  # fp32, as the reference ranks
    vocab = x.numel()
    order = torch.sort(x, descending=True, stable=True).indices
    k = int(params["top_k"][row])
    k = vocab if k == 0 or k >= vocab else k
    sorted_x = x[order].double()
    sorted_x[k:] = float("-inf")
    probs = torch.softmax(sorted_x, dim=0)
    before = torch.cumsum(probs, 0) - probs
    return torch.empty_like(before).scatter_(0, order, before)


def min_p_ratio(logits, params, row):
    """exp(x - max) / min_p (float64) per token: near 1 where the min-p cut is a rounding call."""
    t = float(params["temperature"][row]) or 1.0
    x = (logits[row].float().cpu() / t).double()
    return torch.exp(x - x.max()) / float(params["min_p"][row])


def check_masks(actual, expected, logits, params):
    """Kept sets equal up to rounding cuts, kept values equal; returns the rows that differ.

    A token may differ only where the reference's own fp32 rounding decides: its mass before
    it within CUT_ATOL of top_p, or exp(x - max) within CUT_ATOL (relatively) of min_p (the
    GPU's exp is not torch's to the last bit).
    """
    kept, kept_expected = ~torch.isneginf(actual), ~torch.isneginf(expected)
    rows = (kept != kept_expected).any(dim=1).nonzero().flatten().tolist()
    for row in rows:
        differ = (kept[row] != kept_expected[row]).nonzero().flatten().cpu()
        near = torch.zeros(len(differ), dtype=torch.bool)
        if float(params["top_p"][row]) < 1.0:
            near |= (mass_before(logits, params, row)[differ] - float(params["top_p"][row])).abs() <= CUT_ATOL
        if float(params["min_p"][row]) > 0.0:
            near |= (min_p_ratio(logits, params, row)[differ] - 1.0).abs() <= CUT_ATOL
        assert near.all(), f"row {row}: tokens {differ[~near].tolist()} differ away from a rounding cut"
    both = kept & kept_expected
    assert torch.equal(actual[both], expected[both])
    return rows


def check_logprobs(actual, expected, logits, params):
    logprobs = torch.log_softmax(reference.filter_logits(logits.float(), **params), dim=-1)
    chosen = logprobs.gather(1, actual.tokens[:, None])[:, 0]
    torch.testing.assert_close(actual.logprobs, chosen, atol=LOGPROB_ATOL, rtol=0)
    torch.testing.assert_close(actual.top_logprobs, expected.top_logprobs, atol=LOGPROB_ATOL, rtol=0)
    torch.testing.assert_close(actual.top_logprobs, logprobs.gather(1, actual.top_ids), atol=LOGPROB_ATOL, rtol=0)
