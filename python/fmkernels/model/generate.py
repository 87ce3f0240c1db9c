"""Batched generation: prefill each prompt into a KV cache, then decode the live sequences
one token per step, sampling through ``fmkernels.sample``."""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Union

import torch

from .. import ops

Prompts = Union[torch.Tensor, Sequence[Sequence[int]]]


def _prompt_lists(prompts: Prompts, vocab_size: int) -> List[List[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
            raise ValueError(
                f"prompts as a tensor must be (batch, seqlen) integer token ids, got {prompts.dtype} "
                f"of shape {tuple(prompts.shape)}"
            )
        lists = prompts.tolist()
    elif isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, numbers.Integral) for t in prompts):
            raise TypeError("prompts must be a list of token-id lists (one per prompt), got a flat list of ints")
        lists = [list(p) if isinstance(p, (list, tuple, torch.Tensor)) else p for p in prompts]
    else:
        raise TypeError(f"prompts must be a (batch, seqlen) tensor or a list of token-id lists, "
                        f"got {type(prompts).__name__}")
    if not lists:
        raise ValueError("prompts must hold at least one prompt, got none")
    for b, prompt in enumerate(lists):
        if not isinstance(prompt, list):
            raise TypeError(f"prompts[{b}] must be a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError(f"prompts[{b}] is empty: each prompt needs at least one token")
        for i, token in enumerate(prompt):
            if isinstance(token, torch.Tensor):
                token = prompt[i] = int(token)
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise TypeError(f"prompts[{b}][{i}] must be an int token id, got {type(token).__name__}")
            if not 0 <= token < vocab_size:
                raise ValueError(f"prompts[{b}][{i}] = {token} is outside the vocabulary [0, {vocab_size})")
    return lists


def _check_parameters(max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids, vocab_size):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 is off), got {top_k!r}")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(min_p, numbers.Real) or not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < 2**62):
        raise ValueError(f"seed must be None or an int in [0, 2**62), got {seed!r}")
    for token in stop_token_ids or ():
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < vocab_size:
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {token!r}")


@torch.no_grad()
def generate(model, prompts: Prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, seed: Optional[int] = None,
             stop_token_ids: Optional[Sequence[int]] = None, kv_cache: str = "contiguous",
             block_size: int = 16) -> List[List[int]]:
    """Generates up to ``max_new_tokens`` tokens after each prompt.

    Each prompt is prefilled on its own into a KV cache ("contiguous", or "paged" in blocks
    of ``block_size``); then the sequences still running decode together, one token per
    step. A sequence ends at a token in ``stop_token_ids`` (kept as its last token) or after
    max_new_tokens; it then leaves the decode batch (a paged cache frees its blocks).

    Sampling is ``fmkernels.sample`` (temperature 0 is greedy). Prompt b draws with seed
    ``seed + b`` at step t for its t-th new token, so a run is exactly repeatable and a
    prompt's tokens do not depend on the other prompts in the batch; ``seed=None`` draws
    the base seed from torch's default generator.

    Parameters
    ----------
    prompts : Tensor (batch, seqlen) of token ids, or a list of token-id lists (ragged).
    max_new_tokens : int >= 1; each prompt's length + max_new_tokens - 1 must fit in the
        model's max_seq_len (the last token is returned, never fed back).

    Returns
    -------
    list of lists of int: the new tokens of each prompt, in the prompts' order.
    """
    config = model.config
    lists = _prompt_lists(prompts, config.vocab_size)
    _check_parameters(max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids, config.vocab_size)
    longest = max(len(p) for p in lists)
    needed = longest + max_new_tokens - 1
    if needed > config.max_seq_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} after a prompt of {longest} tokens needs {needed} cache positions, "
            f"beyond the model's max_seq_len={config.max_seq_len}"
        )
    stop = set(int(t) for t in stop_token_ids or ())
    device = model.device
    batch = len(lists)
    cache = model.new_cache(kv_cache, batch=batch, max_seq_len=needed, block_size=block_size)
    if seed is None:
        seed = int(torch.randint(0, 2**62 - batch, ()))
    seeds = torch.arange(batch, dtype=torch.int64) + seed

    last = []
    for b, prompt in enumerate(lists):
        logits = model(torch.tensor([prompt], device=device), cache=cache, slots=[b])  # [1, S, V]
        last.append(logits[0, -1])
    logits = torch.stack(last)  # [B, V]

    outputs: List[List[int]] = [[] for _ in lists]
    active = list(range(batch))  # prompt index of each decode row
    slots = list(range(batch))  # cache slot of each decode row
    while True:
        steps = torch.tensor([len(outputs[b]) for b in active], dtype=torch.int64)
        tokens = ops.sample(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            seed=seeds[active].to(device), step=steps.to(device), backend=model.backend,
        )
        running = []
        for row, (b, token) in enumerate(zip(active, tokens.tolist())):
            outputs[b].append(token)
            if token in stop or len(outputs[b]) == max_new_tokens:
                if cache.paged:
                    cache.free(slots[row])
            else:
                running.append(row)
        if not running:
            return outputs
        active = [active[row] for row in running]
        if cache.paged:
            slots = [slots[row] for row in running]
        else:
            cache.keep([slots[row] for row in running])
            slots = list(range(len(running)))
        next_ids = tokens[running][:, None]  # [B', 1]
        logits = model(next_ids, cache=cache, slots=slots)[:, -1]  # [B', V]
