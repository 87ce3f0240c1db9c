"""fmkernels.filter_logits and fmkernels.sample: temperature, top-k, top-p, min-p, and the draw."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _validation as check
from ..reference import SampleOutput
from ._dispatch import into_out, run

PerRow = Union[int, float, torch.Tensor]

_PARAMETERS_DOC = """temperature : float or Tensor (batch,)
        Divides the logits; >= 0, and 0 means greedy (the argmax, lowest id on ties).
    top_k : int or Tensor (batch,) of ints
        Keep the k most likely tokens (ties by lower id); >= 0, and 0 means off.
    top_p : float or Tensor (batch,)
        Keep the smallest prefix of tokens, by descending probability, whose mass
        reaches p (at least one token); in (0, 1], and 1 means off.
    min_p : float or Tensor (batch,)
        Keep tokens at least min_p times as likely as the most likely; in [0, 1], 0 means off."""


def _validate(logits, temperature, top_k, top_p, min_p) -> None:
    check.require_tensor("logits", logits)
    check.require_dtype("logits", logits, check.FLOAT_DTYPES)
    check.require_rank("logits", logits, 2, "(batch, vocab)")
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError(f"logits must have a non-empty vocabulary, got shape {tuple(logits.shape)}")
    device = logits.device
    # The logits are divided in fp32, so a temperature past fp32's range would overflow.
    check.require_per_row("temperature", temperature, batch, device, integral=False, low=0.0,
                          high=torch.finfo(torch.float32).max)
    check.require_per_row("top_k", top_k, batch, device, integral=True, low=0, high=2**63 - 1)
    check.require_per_row("top_p", top_p, batch, device, integral=False, low=0.0, high=1.0, low_inclusive=False)
    check.require_per_row("min_p", min_p, batch, device, integral=False, low=0.0, high=1.0)
    if batch == 0:
        return
    # A NaN or +inf logit would be sampled from silently; a row of -inf has nothing to sample.
    bad = torch.isnan(logits) | torch.isposinf(logits)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"logits must be finite or -inf, got logits[{row}, {col}] = {logits[row, col].item()}")
    empty = torch.isneginf(logits).all(dim=1)
    if empty.any():
        row = int(empty.nonzero()[0, 0])
        raise ValueError(f"logits[{row}] is -inf everywhere: there is no token to keep")


def filter_logits(
    logits: torch.Tensor,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    min_p: PerRow = 0.0,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Temperature-scaled logits with every token the filters remove set to -inf.

    In this order: logits / temperature -> top-k -> top-p -> min-p; each filter sees the
    distribution the previous one left. softmax of the result is the distribution
    ``sample`` draws from.

    Parameters
    ----------
    logits : Tensor (batch, vocab)
        float32, float16 or bfloat16; finite or -inf (a -inf token is never kept).
    {params}
    backend : str
        "auto" or an implementation's name.
    out : Tensor, optional
        Buffer for the result, shaped and typed like logits.

    Returns
    -------
    Tensor (batch, vocab), logits' dtype.
    """
    _validate(logits, temperature, top_k, top_p, min_p)
    check.require_out(out, logits.shape, logits.dtype, logits.device)
    result = run("filter_logits", backend, dict(
        logits=logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
    ))
    return into_out(result, out)


def sample(
    logits: torch.Tensor,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    min_p: PerRow = 0.0,
    seed: Optional[PerRow] = None,
    step: PerRow = 0,
    return_logprobs: bool = False,
    num_logprobs: int = 0,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
):
    """Draw one token per row from the filtered distribution (see ``filter_logits``).

    Draws are reproducible and independent of the batch around a row: token i of row b
    gets a uniform number from Philox4x32-10 keyed by the row's seed, with the step in the
    counter, and the row's token is the argmax of filtered_logit - log(-log u) (Gumbel-max).

    Parameters
    ----------
    logits : Tensor (batch, vocab)
        float32, float16 or bfloat16; finite or -inf. NaN or +inf raises ValueError.
    {params}
    seed : int, Tensor (batch,) of ints, or None
        Row seeds in [0, 2**63). A tensor gives each row its own seed, so a row's token
        does not depend on its batch; an int s gives row b the seed s + b; None draws s
        from torch's default generator.
    step : int or Tensor (batch,) of ints
        The decode step, >= 0; the same seed at another step gives a fresh draw.
    return_logprobs : bool
        Also return the chosen token's log-probability and the top ``num_logprobs``
        alternatives, all under the filtered distribution.
    num_logprobs : int
        How many alternatives, 0 <= num_logprobs <= vocab.
    backend : str
        "auto" or an implementation's name.
    out : Tensor (batch,) int64, optional
        Buffer for the tokens.

    Returns
    -------
    tokens : Tensor (batch,) int64; or, with ``return_logprobs``, a ``SampleOutput``
        (tokens, logprobs (batch,) float32, top_ids (batch, num_logprobs) int64,
        top_logprobs (batch, num_logprobs) float32).
    """
    _validate(logits, temperature, top_k, top_p, min_p)
    batch, vocab = logits.shape
    if seed is not None:
        check.require_per_row("seed", seed, batch, logits.device, integral=True, low=0, high=2**63 - 1)
        if not isinstance(seed, torch.Tensor) and seed + batch - 1 > 2**63 - 1:
            raise ValueError(f"seed + batch - 1 must be < 2**63 (row b gets seed + b), got seed = {seed}")
    check.require_per_row("step", step, batch, logits.device, integral=True, low=0, high=2**63 - 1)
    check.require_bool("return_logprobs", return_logprobs)
    if isinstance(num_logprobs, bool) or not isinstance(num_logprobs, int):
        raise TypeError(f"num_logprobs must be an int, got {type(num_logprobs).__name__}")
    if not 0 <= num_logprobs <= vocab:
        raise ValueError(f"num_logprobs must be in [0, vocab={vocab}], got {num_logprobs}")
    if num_logprobs and not return_logprobs:
        raise ValueError("num_logprobs > 0 needs return_logprobs=True")
    check.require_out(out, (batch,), torch.int64, logits.device)

    result = run("sample", backend, dict(
        logits=logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        seed=seed, step=step, return_logprobs=return_logprobs, num_logprobs=num_logprobs,
    ))
    if return_logprobs:
        return SampleOutput(into_out(result.tokens, out), *result[1:])
    return into_out(result, out)


filter_logits.__doc__ = filter_logits.__doc__.format(params=_PARAMETERS_DOC)
sample.__doc__ = sample.__doc__.format(params=_PARAMETERS_DOC)
