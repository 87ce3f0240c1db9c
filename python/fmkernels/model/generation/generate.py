"""Batched generation: prefill each prompt into a KV cache, then decode the live sequences
one token per step, sampling through ``fmkernels.sample``."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .. import ops
from . import search

Prompts = Union[torch.Tensor, Sequence[Sequence[int]]]


@dataclasses.dataclass
class GenerationResult:
    """What ``generate(..., return_result=True)`` (or ``return_logprobs=True``) returns; one
    entry per prompt, in the prompts' order.

    tokens: the new token ids, as ``generate`` returns them otherwise.
    finish_reasons: "eos" (an EOS token of the config or tokenizer, kept), "stop_token" (a
        token of ``stop_token_ids``, kept), "stop_string" or "length" (max_new_tokens).
    texts: with a tokenizer, the text the new tokens add after the prompt's (decoded in the
        prompt's context, so a leading space is kept), cut before a stop string; else None.
    logprobs: with ``return_logprobs``, each new token's log-probability as
        ``fmkernels.sample`` defines it: under the filtered distribution it was drawn from
        (logits / temperature, then top-k/top-p/min-p), so 0.0 at temperature 0 (greedy keeps
        one token) and ``log_softmax(logits)`` at temperature 1 with no filter; else None.
    top_ids, top_logprobs: with ``num_logprobs`` > 0, the ``num_logprobs`` most likely tokens
        at each step under that same distribution, best first (-inf past the filtered set).
    scores: with ``num_samples`` > 1 or ``best_of``, each sequence's mean token log-probability
        under the model's own distribution (fp32 log_softmax of the raw logits: temperature 1,
        unfiltered, unconstrained); with ``num_beams``, each best beam's length-normalised score.
    beams: with ``num_beams``, per prompt the finished beams (at most num_beams), best first,
        as (tokens, score) pairs.
    """

    tokens: List[List[int]]
    finish_reasons: List[str]
    texts: Optional[List[str]] = None
    logprobs: Optional[List[List[float]]] = None
    top_ids: Optional[List[List[List[int]]]] = None
    top_logprobs: Optional[List[List[List[float]]]] = None
    scores: Optional[List[float]] = None
    beams: Optional[List[List[Tuple[List[int], float]]]] = None


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
def generate(model, prompts: Optional[Prompts] = None, *, max_new_tokens: int, messages=None,
             temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, seed: Optional[int] = None,
             stop_token_ids: Optional[Sequence[int]] = None, stop_strings: Optional[Sequence[str]] = None,
             tokenizer=None, ignore_eos: bool = False, return_logprobs: bool = False, num_logprobs: int = 0,
             return_result: bool = False, on_token: Optional[Callable[[int, int], None]] = None,
             kv_cache: str = "contiguous", block_size: int = 16, num_samples: int = 1, best_of: bool = False,
             num_beams: Optional[int] = None, length_penalty: float = 1.0,
             allowed_tokens: Optional[search.AllowedTokens] = None, constraint=None,
             cuda_graphs: Union[str, bool] = "auto"):
    """Generates up to ``max_new_tokens`` tokens after each prompt.

    The prompts are prefilled together, in one packed forward (``Transformer.prefill``), into
    a KV cache ("contiguous", or "paged" in blocks of ``block_size``); then the sequences
    still running decode together, one token per step. A sequence ends on its own, and then
    leaves the decode batch (a paged cache frees its blocks), at:

    - an EOS token: the config's ``eos_token_ids`` and the tokenizer's ``eos_token_id``
      (unless ``ignore_eos``), kept as the sequence's last token;
    - a token in ``stop_token_ids``, kept as its last token;
    - a string of ``stop_strings`` (needs ``tokenizer``) in the decoded new text: the tokens
      hold every token up to and including the one that completed the stop string (a stop
      string may end inside a token), and the result's ``texts`` is the text cut just
      before the stop string;
    - max_new_tokens.

    Sampling is ``fmkernels.sample`` (temperature 0 is greedy). Prompt b draws with seed
    ``seed + b`` at step t for its t-th new token, so a run is exactly repeatable and a
    prompt's tokens do not depend on the other prompts in the batch; ``seed=None`` draws
    the base seed from torch's default generator.

    Parameters
    ----------
    prompts : Tensor (batch, seqlen) of token ids, or a list of token-id lists (ragged).
    messages : instead of prompts, a conversation (a list of ``{"role": ..., "content": ...}``
        dicts) or a list of conversations, one per prompt: each rendered with the tokenizer's
        chat template (``fmkernels.model.chat``; needs ``tokenizer``) with the assistant's turn
        opened, and ended at the template's end-of-turn token (finish reason "eos", unless
        ``ignore_eos``) as well as the EOS tokens.
    max_new_tokens : int >= 1; each prompt's length + max_new_tokens - 1 must fit in the
        model's max_seq_len (the last token is returned, never fed back).
    on_token : called as ``on_token(prompt_index, token_id)`` for each new token as soon as
        it is sampled (for streaming); the first calls come right after the prefill.
    return_logprobs, num_logprobs : also return each token's log-probability and the top
        ``num_logprobs`` alternatives (see ``GenerationResult``).
    num_samples : n >= 1 samples per prompt. Sample j of prompt b is row ``b * n + j`` of the
        output (and the ``prompt_index`` ``on_token`` gets) and draws with seed ``seed + b * n + j``,
        so it equals a one-sample run of that prompt with that seed. The prompt is prefilled
        once; its samples share its KV cache (``fork``).
    best_of : keep, of each prompt's ``num_samples`` samples, only the one with the highest mean
        token log-probability under the model's own distribution (fp32 log_softmax of the raw
        logits, not the filtered sampling logprobs); the output then has one row per prompt.
    num_beams : beam search with B beams (deterministic: temperature must be 0; see
        ``fmkernels.model.search.beam_search``); returns each prompt's best finished beam, and in
        a ``GenerationResult`` all its finished beams with their scores, and as ``logprobs`` the
        model's own log-probabilities of its tokens. Prompts are searched one after another;
        ``on_token`` gets the best beam's tokens when its prompt's search ends; no stop_strings.
    length_penalty : a finished beam's score is ``sum(logprobs) / len(new tokens) ** length_penalty``
        (default 1.0, the mean log-prob; 0 is the plain sum, favouring short outputs).
    allowed_tokens : ``allowed_tokens(prompt_index, generated_ids)`` -> the token ids allowed next
        (a list or int tensor of ids, or a bool mask over the vocabulary), or None for no
        constraint; the others get -inf logits before sampling, greedy or beam expansion, each
        step. Allowing nothing raises ValueError. ``search.choice_constraint(tokenizer, choices)``
        is a ready one (its ``eos_token_id`` also ends a sequence here).
    constraint : structured output (``fmkernels.model.structured``): a constraint for every
        prompt, or a list with one per prompt (None leaves a prompt free). ``json_schema(schema)``
        (a plain dict is taken as one), ``json_object()``, ``regex(pattern)``, ``grammar(lark)``
        and ``choices(options)``; the first four need llguidance (``pip install
        'fmkernels[structured]'``) and a Hugging Face tokenizer (``tokenizer=``). Each sequence
        has its own matcher, fed its own tokens (forked for samples and beams), that fills its row
        of the token bitmask ``fmkernels.sample`` (or, for beams, ``filter_logits``) takes as
        ``allowed``; EOS is allowed only where the output is complete, and a constrained sequence
        ends at EOS even with ``ignore_eos``. A constraint that allows no token raises ValueError
        naming the prompt. Not with ``allowed_tokens``.
    cuda_graphs : "auto", True or False. True runs each decode step on static buffers
        (``fmkernels.model.decode_graphs``): on a CUDA model captured once per batch-size bucket
        in a CUDA graph and replayed, elsewhere eagerly (the same bookkeeping, for tests and
        debugging); the tokens are those of the plain path. "auto" (the default) is False for
        now: the capture has not yet run on a GPU (``GRAPHS_IN_AUTO``); once it has, "auto"
        will be True for a model on CUDA. A step cannot be graphed in beam search (its own
        loop), with a mixture of experts (routing picks each expert's tokens with a
        data-dependent shape), in a tensor-parallel model (its all-reduces are not captured),
        or with a backend other than "auto", "cuda" or "triton" (an implementation that reads
        GPU values back on the host cannot be captured): True raises ValueError naming the
        reason in those cases, "auto" runs the plain path.

    Returns
    -------
    list of lists of int: the new tokens of each prompt, in the prompts' order; or, with
    ``return_result`` or ``return_logprobs``, a ``GenerationResult``.
    """
    config = model.config
    end_of_turn = None
    if messages is not None:
        prompts, end_of_turn = _chat_prompts(prompts, messages, tokenizer)
    elif prompts is None:
        raise TypeError("generate needs prompts (token ids) or messages (a conversation)")
    lists = _prompt_lists(prompts, config.vocab_size)
    _check_parameters(max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids, config.vocab_size)
    stop_strings = _check_stop_strings(stop_strings, tokenizer)
    if not isinstance(return_logprobs, bool):
        raise TypeError(f"return_logprobs must be a bool, got {type(return_logprobs).__name__}")
    if isinstance(num_logprobs, bool) or not isinstance(num_logprobs, numbers.Integral) \
            or not 0 <= num_logprobs <= config.vocab_size:
        raise ValueError(f"num_logprobs must be an int in [0, vocab={config.vocab_size}], got {num_logprobs!r}")
    if num_logprobs and not return_logprobs:
        raise ValueError("num_logprobs > 0 needs return_logprobs=True")
    search.check_search_options(num_samples, best_of, num_beams, length_penalty, allowed_tokens, temperature,
                                stop_strings, num_logprobs)
    graphed = _decode_graphs_choice(model, cuda_graphs, num_beams)
    constraints = _prompt_constraints(constraint, len(lists))
    if constraints is not None and allowed_tokens is not None:
        raise ValueError("pass constraint or allowed_tokens, not both")
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token must be callable as on_token(prompt_index, token_id), got {on_token!r}")
    longest = max(len(p) for p in lists)
    needed = longest + max_new_tokens - 1
    if needed > config.max_seq_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} after a prompt of {longest} tokens needs {needed} cache positions, "
            f"beyond the model's max_seq_len={config.max_seq_len}"
        )
    stop = set(int(t) for t in stop_token_ids or ())
    eos = set()
    if not ignore_eos:
        eos = set(config.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        if end_of_turn is not None:
            eos.add(end_of_turn)
    if getattr(allowed_tokens, "eos_token_id", None) is not None:
        eos.add(int(allowed_tokens.eos_token_id))
    matcher_of = _matcher_factory(constraints, allowed_tokens, tokenizer, config, eos)
    if constraints is not None:
        # A constrained sequence ends where its output is complete, even with ignore_eos.
        eos |= set(_constraint_eos(tokenizer, config, eos))
    if num_beams is not None:
        return _beam_result(model, lists, max_new_tokens, num_beams, length_penalty, eos, stop, matcher_of,
                            kv_cache, block_size, on_token, tokenizer, return_result or return_logprobs)
    prompts = lists
    prompt_of = [b for b in range(len(prompts)) for _ in range(num_samples)]  # the prompt each row samples for
    lists = [prompts[b] for b in prompt_of]
    scoring = num_samples > 1 or best_of
    model_logprob_sums = [0.0] * len(lists)
    device = model.device
    batch = len(lists)
    # A paged cache for static steps holds one more block: the padding rows' scratch.
    num_blocks = batch * -(-needed // block_size) + 1 if graphed is not None and kv_cache == "paged" else None
    cache = model.new_cache(kv_cache, batch=batch, max_seq_len=needed, block_size=block_size, num_blocks=num_blocks)
    if seed is None:
        seed = int(torch.randint(0, 2**62 - batch, ()))
        if getattr(model, "tensor_parallel", None) is not None:
            seed = model.tensor_parallel.same_on_every_rank(seed)  # every rank draws the same tokens
    seeds = torch.arange(batch, dtype=torch.int64) + seed

    if tokenizer is not None:
        from .tokenizer import StreamDecoder

        streams = [StreamDecoder(tokenizer, prompt) for prompt in lists]
    texts = [""] * batch
    reasons = [""] * batch
    logprobs = [[] for _ in lists] if return_logprobs else None
    top_ids = [[] for _ in lists] if return_logprobs else None
    top_logprobs = [[] for _ in lists] if return_logprobs else None
    longest_stop = max((len(s) for s in stop_strings), default=0)

    def finish(b: int, token: int) -> str:
        """Why sequence b ends after token, or "" when it goes on."""
        if tokenizer is not None:
            searched_from = max(0, len(texts[b]) - longest_stop + 1)
            texts[b] += streams[b].push(token)
            if stop_strings:
                cuts = [texts[b].find(s, searched_from) for s in stop_strings]
                cuts = [cut for cut in cuts if cut >= 0]
                if cuts:
                    texts[b] = texts[b][:min(cuts)]
                    return "stop_string"
        if token in eos:
            return "eos"
        if token in stop:
            return "stop_token"
        if len(outputs[b]) == max_new_tokens:
            return "length"
        return ""

    # One packed forward over the prompts, each into the slot of its first sample; the other
    # samples fork it (a paged cache shares its full blocks, a contiguous one copies its row).
    first = [b * num_samples for b in range(len(prompts))]
    logits = model.prefill(prompts, cache=cache, slots=first)  # [P, V]
    for slot in first:
        for j in range(1, num_samples):
            cache.fork(slot, slot + j)
    logits = logits.repeat_interleave(num_samples, dim=0)  # [B, V]

    # Each row's constraint state: the first sample of a prompt takes its matcher, the others fork it.
    firsts = [matcher_of(b) for b in range(len(prompts))]
    matchers = [None if firsts[p] is None else firsts[p] if b % num_samples == 0 else firsts[p].fork()
                for b, p in enumerate(prompt_of)]
    masks = None
    if any(m is not None for m in matchers):
        from .structured import RowMasks

        masks = RowMasks(config.vocab_size)

    outputs: List[List[int]] = [[] for _ in lists]
    active = list(range(batch))  # prompt index of each decode row
    slots = list(range(batch))  # cache slot of each decode row
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    return_logprobs=return_logprobs, num_logprobs=int(num_logprobs))
    decoder = None
    if graphed is not None:
        from .decode_graphs import DecodeGraphs

        words = None if masks is None else -(-config.vocab_size // 32)
        decoder = DecodeGraphs(model, cache, batch, sampling, vocab_words=words, graphs=graphed)

    def allowed_rows():
        """The running rows' token bitmask (host), or None without constraints."""
        if masks is None:
            return None
        return masks.fill([matchers[b] for b in active],
                          lambda r: f"prompt {prompt_of[active[r]]}, step {len(outputs[active[r]])}")

    def row_steps():
        return torch.tensor([len(outputs[b]) for b in active], dtype=torch.int64)

    def draw(logits, allowed):
        return ops.sample(logits, allowed=None if allowed is None else allowed.to(device),
                          seed=seeds[active].to(device), step=row_steps().to(device), backend=model.backend,
                          **sampling)

    sampled = draw(logits, allowed_rows())
    while True:
        if scoring:
            own = search.model_logprobs(logits)  # [B', V]
        tokens = sampled.tokens if return_logprobs else sampled
        if return_logprobs:
            chosen, ids, values = (t.tolist() for t in (sampled.logprobs, sampled.top_ids, sampled.top_logprobs))
        running = []
        drawn = tokens.tolist()
        for row, (b, token) in enumerate(zip(active, drawn)):
            outputs[b].append(token)
            if scoring:
                model_logprob_sums[b] += float(own[row, token])
            if return_logprobs:
                logprobs[b].append(chosen[row])
                top_ids[b].append(ids[row])
                top_logprobs[b].append(values[row])
            if on_token is not None:
                on_token(b, token)
            reasons[b] = finish(b, token)
            if not reasons[b] and matchers[b] is not None:
                matchers[b].consume(token)
            if reasons[b]:
                if cache.paged:
                    cache.free(slots[row])
            else:
                running.append(row)
        if not running:
            break
        active = [active[row] for row in running]
        if cache.paged:
            slots = [slots[row] for row in running]
        else:
            cache.keep([slots[row] for row in running])
            slots = list(range(len(running)))
        allowed = allowed_rows()
        if decoder is not None:
            logits, sampled = decoder.step([drawn[row] for row in running], slots, seeds[active], row_steps(), allowed)
        else:
            next_ids = tokens[running][:, None]  # [B', 1]
            logits = model(next_ids, cache=cache, slots=slots)[:, -1]  # [B', V]
            sampled = draw(logits, allowed)

    scores = [total / len(tokens) for total, tokens in zip(model_logprob_sums, outputs)] if scoring else None
    keep = search.pick_best_of(num_samples, outputs, scores) if best_of else list(range(batch))
    if not (return_result or return_logprobs):
        return [outputs[r] for r in keep]
    if tokenizer is not None:
        for b in range(batch):
            if reasons[b] != "stop_string":
                texts[b] += streams[b].flush()

    def pick(rows):
        return None if rows is None else [rows[r] for r in keep]

    return GenerationResult(
        tokens=pick(outputs), finish_reasons=pick(reasons), texts=pick(texts) if tokenizer is not None else None,
        logprobs=pick(logprobs), top_ids=pick(top_ids) if num_logprobs else None,
        top_logprobs=pick(top_logprobs) if num_logprobs else None, scores=pick(scores),
    )


#: The backends whose decode-step ops run without reading GPU values back (captured in a CUDA graph).
_GRAPHABLE_BACKENDS = ("auto", "cuda", "triton")

#: Whether cuda_graphs="auto" captures the decode step on CUDA. False until the capture and
#: replay (tests/test_model_decode_graphs.py's gpu tests, bench/gpu_check.sh's model stage)
#: have run on a GPU; cuda_graphs=True asks for them meanwhile.
GRAPHS_IN_AUTO = False


def _decode_graphs_choice(model, cuda_graphs, num_beams) -> Optional[bool]:
    """How decode steps run: None for the plain path, False for static buffers run eagerly, True
    for static buffers captured in CUDA graphs (``cuda_graphs``: "auto", True or False)."""
    if not (isinstance(cuda_graphs, bool) or cuda_graphs == "auto"):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
    if cuda_graphs is False:
        return None
    on_cuda = model.device.type == "cuda"
    reason = None
    if num_beams is not None:
        reason = "beam search runs its own decode loop"
    elif model.config.n_experts:
        reason = "a mixture of experts routes tokens with data-dependent shapes"
    elif getattr(model, "tensor_parallel", None) is not None:
        reason = "a tensor-parallel model's all-reduces are not captured"
    elif on_cuda and model.backend not in _GRAPHABLE_BACKENDS:
        reason = (f"backend {model.backend!r} may read GPU values back on the host (graphs take "
                  f"{', '.join(map(repr, _GRAPHABLE_BACKENDS))})")
    if cuda_graphs == "auto":
        return True if GRAPHS_IN_AUTO and on_cuda and reason is None else None
    if reason is not None:
        raise ValueError(f"cuda_graphs=True cannot run this generate call: {reason}")
    return on_cuda


def _prompt_constraints(constraint, prompts: int):
    """One constraint (or None) per prompt, or None where no prompt has one."""
    from . import structured

    if constraint is None:
        return None
    if isinstance(constraint, (list, tuple)):
        if len(constraint) != prompts:
            raise ValueError(f"constraint must be one constraint or a list of one per prompt ({prompts}), "
                             f"got a list of {len(constraint)}")
        constraints = [structured.as_constraint(c, f"constraint[{i}]") for i, c in enumerate(constraint)]
    else:
        constraints = [structured.as_constraint(constraint)] * prompts
    return constraints if any(c is not None for c in constraints) else None


def _constraint_eos(tokenizer, config, eos) -> List[int]:
    """The tokens that end a constrained output: the run's EOS tokens, or (with ignore_eos) the
    tokenizer's and the config's."""
    if eos:
        return sorted(eos)
    ids = set(config.eos_token_ids)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def _matcher_factory(constraints, allowed_tokens, tokenizer, config, eos):
    """``matcher_of(prompt_index)``: a fresh ``structured.Matcher`` for the prompt, or None. A
    constraint is compiled once per generate call and prompt (the same constraint object for
    several prompts once), and each prompt gets its own copy of the state."""
    from . import structured

    if allowed_tokens is not None:
        return lambda p: structured.callback_matcher(allowed_tokens, p, config.vocab_size)
    if constraints is None:
        return lambda p: None
    if tokenizer is None:
        raise ValueError("constraint needs the tokenizer (tokenizer=...) to map its text to tokens")
    eos_ids = _constraint_eos(tokenizer, config, eos)
    compiled = {}
    for c in constraints:
        if c is not None and id(c) not in compiled:
            compiled[id(c)] = c.compile(tokenizer, config.vocab_size, eos_ids)
    return lambda p: None if constraints[p] is None else compiled[id(constraints[p])].fork()


def _beam_result(model, lists, max_new_tokens, num_beams, length_penalty, eos, stop, matcher_of, kv_cache,
                 block_size, on_token, tokenizer, as_result):
    found = search.beam_search(model, lists, max_new_tokens=max_new_tokens, num_beams=num_beams,
                               length_penalty=length_penalty, eos=eos, stop=stop, matcher_of=matcher_of,
                               kv_cache=kv_cache, block_size=block_size, on_token=on_token)
    tokens = [beams[0][0] for beams in found]
    if not as_result:
        return tokens
    texts = None
    if tokenizer is not None:
        from .tokenizer import StreamDecoder

        texts = []
        for prompt, new in zip(lists, tokens):
            stream = StreamDecoder(tokenizer, prompt)
            texts.append("".join(stream.push(t) for t in new) + stream.flush())
    return GenerationResult(
        tokens=tokens, finish_reasons=[beams[0][2] for beams in found], texts=texts,
        logprobs=[beams[0][3] for beams in found], scores=[beams[0][1] for beams in found],
        beams=[[(t, score) for t, score, _, _ in beams] for beams in found],
    )


def _chat_prompts(prompts, messages, tokenizer) -> Tuple[List[List[int]], Optional[int]]:
    """The prompts of ``messages`` (one conversation, or a list of them) under the tokenizer's
    chat template, and the template's end-of-turn token."""
    from . import chat

    if prompts is not None:
        raise ValueError("pass prompts or messages, not both")
    if tokenizer is None:
        raise ValueError("messages need a tokenizer (tokenizer=...) with a chat template")
    if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple)):
        conversations = list(messages)
    else:
        conversations = [messages]
    lists = []
    for b, conversation in enumerate(conversations):
        name = "messages" if len(conversations) == 1 and conversation is messages else f"messages[{b}]"
        lists.append(chat.apply_chat_template(tokenizer, chat.check_messages(conversation, name)))
    return lists, chat.end_of_turn_token_id(tokenizer)


def _check_stop_strings(stop_strings, tokenizer) -> List[str]:
    if stop_strings is None:
        return []
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = list(stop_strings)
    for s in stop_strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop_strings must be non-empty strings, got {s!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (tokenizer=...) to decode the generated tokens")
    return stop_strings
