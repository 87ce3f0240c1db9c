"""Test-time search for ``generate``: n samples per prompt with best-of-n, and beam search
(constrained through ``structured``'s matchers, as sampling is).

Scores here are the model's own log-probabilities: ``log_softmax`` of the raw logits in
fp32 (temperature 1, no top-k/top-p/min-p filter, no constraint mask), not the logprobs
``fmkernels.sample`` returns for the filtered distribution it drew from.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Set, Tuple

import torch

from ... import ops
from .structured import RowMasks


def model_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """The model's own log-probabilities: fp32 log_softmax of the raw logits."""
    return torch.log_softmax(logits.float(), dim=-1)


def beam_score(logprob_sum: float, length: int, length_penalty: float) -> float:
    return logprob_sum / length ** length_penalty


def pick_best_of(n: int, rows: List[List[int]], scores: List[float]) -> List[int]:
    """The row index of the best sample (highest mean model log-prob; the first on a tie) of each
    group of n consecutive rows."""
    best = []
    for start in range(0, len(rows), n):
        group = range(start, start + n)
        best.append(max(group, key=lambda r: (scores[r], -r)))
    return best


def _fork_rows(cache, parents: List[int], slots: List[int], next_slot: List[int]) -> List[int]:
    """Makes the cache follow reselected beams: beam j continues the sequence in parents[j]'s
    slot. Contiguous: the rows are gathered (index_select) to 0..len-1. Paged: the first child of a
    parent takes over its slot, each further child forks it (sharing its full blocks, copying a
    partly filled last one), and the slots of dropped parents are freed. Returns the new beams' slots."""
    if not cache.paged:
        cache.keep(parents)
        return list(range(len(parents)))
    new_slots, claimed = [], set()
    for p in parents:
        if p not in claimed:
            claimed.add(p)
            new_slots.append(slots[p])
        else:
            new_slots.append(next_slot[0])
            cache.fork(slots[p], next_slot[0])
            next_slot[0] += 1
    for p, slot in enumerate(slots):
        if p not in claimed:
            cache.free(slot)
    return new_slots


@torch.no_grad()
def beam_search(model, lists: List[List[int]], *, max_new_tokens: int, num_beams: int, length_penalty: float,
                eos: Set[int], stop: Set[int], matcher_of: Callable[[int], Optional[object]], kv_cache: str,
                block_size: int, on_token=None):
    """Beam search for each prompt (one prompt after another, its beams decoding as one batch).

    Each step, every live beam is expanded by its tokens under the model's log_softmax (minus
    the tokens its constraint forbids: ``matcher_of(prompt_index)`` gives the prompt's
    ``structured.Matcher`` or None, and each beam carries its own, forked where a beam is chosen
    twice; the mask goes through ``fmkernels.filter_logits``); of the best 2 * num_beams candidates by summed
    log-prob, those ending in an EOS or stop token finish, and the best num_beams others go on.
    A beam also finishes at max_new_tokens. A finished beam's score is
    ``sum(logprobs) / len(new tokens) ** length_penalty``. The search ends when no live beam
    can still beat the worst of the best num_beams finished beams (or none is left).

    ``on_token(prompt_index, token)`` gets the best beam's tokens once the prompt's search ends.
    Returns per prompt a list of (tokens, score, reason, token_logprobs), best first, at most
    num_beams long; token_logprobs are the model's own (log_softmax of the raw logits).
    """
    device = model.device
    results = []
    masks = None
    for b, prompt in enumerate(lists):
        root = matcher_of(b)
        if root is not None and masks is None:
            masks = RowMasks(model.config.vocab_size)
        # Paged: reselection holds the old beams and the forks of the new ones at once, 2 * B sequences.
        rows = 2 * num_beams if kv_cache == "paged" else num_beams
        cache = model.new_cache(kv_cache, batch=rows, max_seq_len=len(prompt) + max_new_tokens - 1,
                                block_size=block_size)
        logits = model.prefill([prompt], cache=cache, slots=[0])  # [1, V]
        beams: List[Tuple[List[int], float, List[float]]] = [([], 0.0, [])]  # tokens, logprob sum, logprobs
        matchers = [root]  # each live beam's constraint state
        slots, next_slot = [0], [1]
        finished: List[Tuple[List[int], float, str, List[float]]] = []
        while beams:
            logp = model_logprobs(logits)  # [nb, V]
            if root is not None:
                allowed = masks.fill(matchers, lambda r: f"prompt {b}, beam {r}, step {len(beams[r][0])}")
                logp = ops.filter_logits(logp, allowed=allowed.to(logp.device), backend=model.backend)
            totals = torch.tensor([s for _, s, _ in beams], dtype=torch.float32, device=logp.device)[:, None] + logp
            k = min(2 * num_beams, totals.numel())
            values, flat = torch.topk(totals.reshape(-1), k)  # ties: torch's order, deterministic
            vocab = logp.shape[-1]
            survivors, parents, next_matchers = [], [], []
            for value, index in zip(values.tolist(), flat.tolist()):
                if value == float("-inf"):
                    break
                parent, token = divmod(index, vocab)
                tokens, _, lps = beams[parent]
                new = (tokens + [token], float(totals[parent, token]), lps + [float(logp[parent, token])])
                reason = "eos" if token in eos else "stop_token" if token in stop else \
                    "length" if len(new[0]) == max_new_tokens else ""
                if reason:
                    finished.append((new[0], beam_score(new[1], len(new[0]), length_penalty), reason, new[2]))
                elif len(survivors) < num_beams:
                    survivors.append(new)
                    parents.append(parent)
                    if root is not None:
                        child = matchers[parent].fork()
                        child.consume(token)
                        next_matchers.append(child)
            finished.sort(key=lambda f: -f[1])
            del finished[num_beams:]
            if survivors and len(finished) == num_beams:
                # The best score a live beam can still reach: logprobs only lower its sum, so
                # with length_penalty > 0 the most it gains is dividing by the longest length.
                best_sum, length = max(s for _, s, _ in survivors), len(survivors[0][0])
                reach = max_new_tokens if length_penalty > 0 else length + 1
                if beam_score(best_sum, reach, length_penalty) <= finished[-1][1]:
                    survivors = []
            if not survivors:
                if cache.paged:
                    for slot in slots:
                        cache.free(slot)
                break
            slots = _fork_rows(cache, parents, slots, next_slot)
            beams = survivors
            matchers = next_matchers if root is not None else [None] * len(beams)
            next_ids = torch.tensor([[t[-1]] for t, _, _ in beams], device=device)  # [nb, 1]
            logits = model(next_ids, cache=cache, slots=slots)[:, -1]  # [nb, V]
        if not finished:
            raise ValueError(f"beam search for prompt {b} found no sequence with a finite log-probability")
        if on_token is not None:
            for token in finished[0][0]:
                on_token(b, token)
        results.append(finished)
    return results
