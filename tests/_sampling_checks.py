"""Token checks shared by the sampling backends' tests."""

import torch

from fmkernels import reference

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
