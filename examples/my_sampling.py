"""Your own logits filter, held to fmkernels' reference: temperature and top-k only.

::

    fmkernels check filter_logits --impl examples.my_sampling:my_filter_logits

Cases with top-p or min-p raise ``NotImplementedError``, so check lists them as skipped:
that is how an implementation says which cases it leaves to others. It takes no ``allowed``
token bitmask either (an optional argument: ``fmkernels.registry.OPTIONAL_ARGUMENTS``), so the
masked cases are skipped too, as taking "no allowed= argument".
"""

import torch


def _per_row(value, batch, device):
    """A scalar or a (batch,) tensor as a (batch,) float64 tensor."""
    return torch.as_tensor(value, dtype=torch.float64, device=device).expand(batch)


def my_filter_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """logits (batch, vocab) / temperature, with all but the top_k largest per row set to -inf.

    Each parameter is a scalar or a (batch,) tensor. temperature 0 keeps only the argmax
    (unscaled); top_k 0 keeps everything; ties are broken by the lower token id. Returned
    in logits' dtype.
    """
    batch, vocab = logits.shape
    if (_per_row(top_p, batch, logits.device) < 1).any() or (_per_row(min_p, batch, logits.device) > 0).any():
        raise NotImplementedError("my_filter_logits does temperature and top-k only")
    temperature = _per_row(temperature, batch, logits.device).float()
    greedy = temperature == 0
    scaled = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    keep_count = _per_row(top_k, batch, logits.device).long()
    keep_count = torch.where(keep_count == 0, vocab, keep_count.clamp(max=vocab))
    keep_count = torch.where(greedy, 1, keep_count)
    # A stable descending sort ranks tied logits by token id.
    order = torch.sort(scaled, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(vocab, device=logits.device).expand(batch, vocab))
    return scaled.masked_fill(rank >= keep_count[:, None], float("-inf")).to(logits.dtype)
