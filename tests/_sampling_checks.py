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
