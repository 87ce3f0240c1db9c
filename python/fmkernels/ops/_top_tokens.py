"""The top alternatives of ``sample(..., num_logprobs=n)`` from a backend's filtered logits."""

from __future__ import annotations

import torch


def top_tokens(filtered: torch.Tensor, n: int) -> torch.Tensor:
    """Ids of the n > 0 largest of each row of filtered (batch, vocab), by (value desc, id asc)."""
    # torch.topk's values are right, but which of several tied ids it returns is not defined:
    # keep everything above the n-th value, then the lowest ids among the ties at it.
    nth = torch.topk(filtered, n, dim=1).values[:, -1:]
    above = filtered > nth
    tie = filtered == nth
    needed = n - above.sum(dim=1, keepdim=True)
    chosen = above | (tie & (torch.cumsum(tie, dim=1) <= needed))
    # Exactly n chosen per row: their ids in ascending order are the n smallest of the ids with
    # the others pushed past the vocabulary (topk of distinct values; no nonzero(), no host sync).
    vocab = filtered.shape[1]
    token_ids = torch.arange(vocab, device=filtered.device).expand_as(filtered)
    ids = torch.topk(torch.where(chosen, token_ids, vocab), n, dim=1, largest=False).values
    order = torch.sort(filtered.gather(1, ids), dim=1, descending=True, stable=True).indices
    return ids.gather(1, order)


def top_alternatives(filtered, log_mass, batch: int, n: int, device):
    """(top_ids int64, top_logprobs float32), each (batch, n), from a kernel's filtered fp32 rows,
    shifted by their maximum (x - m where kept, -inf elsewhere), and their log kept masses
    (batch,), log sum exp(x - m): a log-probability is (x - m) - log_mass, as log_softmax
    computes it; empty-valued when ``filtered`` is None (n == 0) or the batch is empty."""
    if filtered is None or batch == 0:
        return (torch.empty((batch, n), dtype=torch.int64, device=device),
                torch.empty((batch, n), dtype=torch.float32, device=device))
    top_ids = top_tokens(filtered, n)
    return top_ids, filtered.gather(1, top_ids) - log_mass[:, None]
