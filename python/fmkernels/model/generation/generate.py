"""Batched generation: prefill each prompt into a KV cache, then decode the live sequences
one token per step, sampling through ``fmkernels.sample``.

``generate`` reads as its four parts: the request (prompts, end tokens, constraints, checked
against the model), the prefill, the decode loop and the result; stopping is one small class.
Beam search runs its own loop (``search.beam_search``)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ... import ops
from ..checkpoint import chat
from ..checkpoint.tokenizer import StreamDecoder
from . import search, structured
from .config import GenerationConfig
from .decode_graphs import DecodeGraphs

Prompts = Union[torch.Tensor, Sequence[Sequence[int]]]

#: The sampling filters that take one value per prompt.
_PER_PROMPT = {"temperature": torch.float32, "top_k": torch.int32, "top_p": torch.float32, "min_p": torch.float32}


@dataclasses.dataclass
class GenerationResult:
    """What ``generate`` returns with ``return_result`` (or ``return_logprobs``); one entry per
    prompt (per sample with ``num_samples`` > 1), in the prompts' order.

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


@torch.no_grad()
def generate(model, prompts: Optional[Prompts] = None, config: Optional[GenerationConfig] = None, *,
             messages=None, tokenizer=None, on_token: Optional[Callable[[int, int], None]] = None, **options):
    """Generates up to ``config.max_new_tokens`` tokens after each prompt.

    The prompts are prefilled together, in one packed forward (``Transformer.prefill``), into
    a KV cache ("contiguous", or "paged" in blocks of ``block_size``); then the sequences
    still running decode together, one token per step. A sequence ends on its own, and then
    leaves the decode batch (a paged cache frees its blocks), at an EOS token (the model
    config's ``eos_token_ids`` and the tokenizer's ``eos_token_id``, unless ``ignore_eos``),
    a token of ``stop_token_ids`` (both kept as its last token), a stop string in the decoded
    new text (the tokens hold every token up to the one that completed it; the text is cut
    before it), or ``max_new_tokens``.

    Sampling is ``fmkernels.sample`` (temperature 0 is greedy). Prompt b draws with seed
    ``seed + b`` at step t for its t-th new token, so a run is exactly repeatable and a
    prompt's tokens do not depend on the other prompts in the batch.

    Parameters
    ----------
    model : a ``fmkernels.model.Transformer``.
    prompts : Tensor (batch, seqlen) of token ids, or a list of token-id lists (ragged).
    config : a ``GenerationConfig``: sampling, stopping, search, constraints, what is returned
        and the KV cache (its docstring has every field). Keyword ``options`` override its
        fields (``generate(model, prompts, max_new_tokens=8)`` is
        ``generate(model, prompts, GenerationConfig(max_new_tokens=8))``).
    messages : instead of prompts, a conversation (a list of ``{"role": ..., "content": ...}``
        dicts) or a list of conversations, one per prompt: each rendered with the tokenizer's
        chat template (``fmkernels.model.chat``; needs ``tokenizer``) with the assistant's turn
        opened, and ended at the template's end-of-turn token (finish reason "eos", unless
        ``ignore_eos``) as well as the EOS tokens.
    tokenizer : needed for ``messages``, ``stop_strings``, grammar constraints and the result's
        ``texts``; its ``eos_token_id`` ends a sequence.
    on_token : called as ``on_token(row, token_id)`` for each new token as soon as it is
        sampled (for streaming); the first calls come right after the prefill. With
        ``num_samples`` = n, sample j of prompt b is row ``b * n + j``.

    Each prompt's length + max_new_tokens - 1 must fit in the model's max_seq_len (the last
    token is returned, never fed back). Beam search (``num_beams``) searches the prompts one
    after another; ``on_token`` gets the best beam's tokens when its prompt's search ends.
    ``cuda_graphs`` "auto" is the plain decode step for now (``GRAPHS_IN_AUTO``: the capture has
    not yet run on a GPU); True raises ValueError where a step cannot be graphed (beam search,
    a mixture of experts, a tensor-parallel model, a backend other than "auto", "cuda" or
    "triton" on CUDA).

    Returns
    -------
    list of lists of int: the new tokens of each prompt, in the prompts' order; or, with
    ``return_result`` or ``return_logprobs``, a ``GenerationResult``.
    """
    config = _resolved(config, options)
    request = _Request.make(model, prompts, messages, tokenizer, on_token, config)
    if config.num_beams is not None:
        return _beam_result(model, request, config, tokenizer, on_token)
    batch = _Batch(request, config, tokenizer)
    cache, logits = _prefill(model, request, config, batch)
    _decode(model, cache, logits, request, config, batch, on_token)
    return _result(batch, config, tokenizer)


def _resolved(config: Optional[GenerationConfig], options: Dict) -> GenerationConfig:
    """``config`` with the keyword overrides applied, or a config made of them."""
    fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"generate() got an unexpected keyword argument {unknown[0]!r} (GenerationConfig's "
                        f"fields, messages, tokenizer and on_token are the options)")
    if config is None:
        if "max_new_tokens" not in options:
            raise TypeError("generate needs a GenerationConfig or max_new_tokens=...")
        return GenerationConfig(**options)
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    return config.replace(**options) if options else config


# ----------------------------------------------------------------------------------------
# The request: prompts, end tokens and constraints, checked against the model
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Request:
    prompts: List[List[int]]
    eos: set
    stop: set
    matcher_of: Callable[[int], Optional[structured.Matcher]]
    graphed: Optional[bool]  # see _decode_graphs_choice
    positions: int  # cache positions the longest sequence needs

    @classmethod
    def make(cls, model, prompts, messages, tokenizer, on_token, config: GenerationConfig) -> "_Request":
        model_config = model.config
        end_of_turn = None
        if messages is not None:
            prompts, end_of_turn = _chat_prompts(prompts, messages, tokenizer)
        elif prompts is None:
            raise TypeError("generate needs prompts (token ids) or messages (a conversation)")
        lists = _prompt_lists(prompts, model_config.vocab_size)
        _check_against_model(config, model_config.vocab_size, len(lists), tokenizer)
        if on_token is not None and not callable(on_token):
            raise TypeError(f"on_token must be callable as on_token(prompt_index, token_id), got {on_token!r}")
        graphed = _decode_graphs_choice(model, config.cuda_graphs, config.num_beams)
        constraints = _prompt_constraints(config.constraint, len(lists))
        longest = max(len(p) for p in lists)
        needed = longest + config.max_new_tokens - 1
        if needed > model_config.max_seq_len:
            raise ValueError(
                f"max_new_tokens={config.max_new_tokens} after a prompt of {longest} tokens needs {needed} cache "
                f"positions, beyond the model's max_seq_len={model_config.max_seq_len}"
            )
        eos = set()
        if not config.ignore_eos:
            eos = set(model_config.eos_token_ids)
            if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
                eos.add(int(tokenizer.eos_token_id))
            if end_of_turn is not None:
                eos.add(end_of_turn)
        if getattr(config.allowed_tokens, "eos_token_id", None) is not None:
            eos.add(int(config.allowed_tokens.eos_token_id))
        matcher_of = _matcher_factory(constraints, config.allowed_tokens, tokenizer, model_config, eos)
        if constraints is not None:
            # A constrained sequence ends where its output is complete, even with ignore_eos.
            eos |= set(_constraint_eos(tokenizer, model_config, eos))
        return cls(lists, eos, set(config.stop_token_ids), matcher_of, graphed, needed)


def _check_against_model(config: GenerationConfig, vocab_size: int, prompts: int, tokenizer) -> None:
    """What ``GenerationConfig`` cannot check alone: token ids against the vocabulary, per-prompt
    values against the prompts, text options against the tokenizer."""
    for token in config.stop_token_ids:
        if token >= vocab_size:
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {token!r}")
    if config.num_logprobs > vocab_size:
        raise ValueError(f"num_logprobs must be an int in [0, vocab={vocab_size}], got {config.num_logprobs!r}")
    for name in _PER_PROMPT:
        value = getattr(config, name)
        if isinstance(value, tuple) and len(value) != prompts:
            raise ValueError(f"{name} has {len(value)} values, one per prompt, for {prompts} prompts")
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (tokenizer=...) to decode the generated tokens")


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


# ----------------------------------------------------------------------------------------
# The rows being decoded, and when each stops
# ----------------------------------------------------------------------------------------


class _Stopping:
    """Why a row ends after a token: its text (with a tokenizer) against the stop strings, then
    EOS, stop tokens and the budget."""

    def __init__(self, rows: List[List[int]], request: _Request, config: GenerationConfig, tokenizer):
        self.tokenizer, self.eos, self.stop = tokenizer, request.eos, request.stop
        self.stop_strings, self.max_new_tokens = config.stop_strings, config.max_new_tokens
        self.longest_stop = max((len(s) for s in self.stop_strings), default=0)
        self.streams = [StreamDecoder(tokenizer, prompt) for prompt in rows] if tokenizer is not None else None
        self.texts = [""] * len(rows)

    def reason(self, row: int, token: int, produced: int) -> str:
        """Why row ends after ``token``, its ``produced``-th, or "" when it goes on."""
        if self.streams is not None:
            searched_from = max(0, len(self.texts[row]) - self.longest_stop + 1)
            self.texts[row] += self.streams[row].push(token)
            if self.stop_strings:
                cuts = [self.texts[row].find(s, searched_from) for s in self.stop_strings]
                cuts = [cut for cut in cuts if cut >= 0]
                if cuts:
                    self.texts[row] = self.texts[row][:min(cuts)]
                    return "stop_string"
        if token in self.eos:
            return "eos"
        if token in self.stop:
            return "stop_token"
        if produced == self.max_new_tokens:
            return "length"
        return ""

    def flush(self, reasons: List[str]) -> None:
        """The text a row's stream still holds, once the row has ended (not after a stop string)."""
        if self.streams is not None:
            for row, reason in enumerate(reasons):
                if reason != "stop_string":
                    self.texts[row] += self.streams[row].flush()


class _Batch:
    """Every row's outputs so far (a row is one sample of one prompt), and the rows still decoding."""

    def __init__(self, request: _Request, config: GenerationConfig, tokenizer):
        n = config.num_samples
        self.prompt_of = [b for b in range(len(request.prompts)) for _ in range(n)]
        self.rows = [request.prompts[b] for b in self.prompt_of]
        size = len(self.rows)
        self.outputs: List[List[int]] = [[] for _ in range(size)]
        self.reasons = [""] * size
        self.scoring = n > 1 or config.best_of
        self.model_logprob_sums = [0.0] * size
        keep = config.return_logprobs
        self.logprobs = [[] for _ in range(size)] if keep else None
        self.top_ids = [[] for _ in range(size)] if keep else None
        self.top_logprobs = [[] for _ in range(size)] if keep else None
        self.stopping = _Stopping(self.rows, request, config, tokenizer)
        self.active = list(range(size))  # the row of each decode row
        self.slots = list(range(size))  # the cache slot of each decode row

    def __len__(self) -> int:
        return len(self.rows)

    def steps(self) -> torch.Tensor:
        """Each decode row's step: the tokens its row has so far."""
        return torch.tensor([len(self.outputs[b]) for b in self.active], dtype=torch.int64)

    def record(self, sampled, logits, config: GenerationConfig, on_token) -> Tuple[List[int], List[int]]:
        """Appends each decode row's token; returns (the tokens, the decode rows still running)."""
        own = search.model_logprobs(logits) if self.scoring else None  # [B', V]
        tokens = (sampled.tokens if config.return_logprobs else sampled).tolist()
        if config.return_logprobs:
            chosen, ids, values = (t.tolist() for t in (sampled.logprobs, sampled.top_ids, sampled.top_logprobs))
        running = []
        for i, (b, token) in enumerate(zip(self.active, tokens)):
            self.outputs[b].append(token)
            if own is not None:
                self.model_logprob_sums[b] += float(own[i, token])
            if config.return_logprobs:
                self.logprobs[b].append(chosen[i])
                self.top_ids[b].append(ids[i])
                self.top_logprobs[b].append(values[i])
            if on_token is not None:
                on_token(b, token)
            self.reasons[b] = self.stopping.reason(b, token, len(self.outputs[b]))
            if not self.reasons[b]:
                running.append(i)
        return tokens, running


# ----------------------------------------------------------------------------------------
# Prefill and the decode loop
# ----------------------------------------------------------------------------------------


def _prefill(model, request: _Request, config: GenerationConfig, batch: _Batch):
    """One packed forward over the prompts, each into the slot of its first sample; the other
    samples fork it (a paged cache shares its full blocks, a contiguous one copies its row).
    Returns (the cache, the logits after each row's prompt [B, V])."""
    n = config.num_samples
    block_size = config.block_size
    # A paged cache for static steps holds one more block: the padding rows' scratch.
    num_blocks = (len(batch) * -(-request.positions // block_size) + 1
                  if request.graphed is not None and config.kv_cache == "paged" else None)
    cache = model.new_cache(config.kv_cache, batch=len(batch), max_seq_len=request.positions, block_size=block_size,
                            num_blocks=num_blocks)
    first = [b * n for b in range(len(request.prompts))]
    logits = model.prefill(request.prompts, cache=cache, slots=first)  # [P, V]
    for slot in first:
        for j in range(1, n):
            cache.fork(slot, slot + j)
    return cache, logits.repeat_interleave(n, dim=0)


def _row_sampling(config: GenerationConfig, batch: _Batch) -> Dict[str, object]:
    """``fmkernels.sample``'s filters: a scalar for all rows, or a host tensor with each row's value."""
    sampling = {}
    for name, dtype in _PER_PROMPT.items():
        value = getattr(config, name)
        sampling[name] = torch.tensor([value[b] for b in batch.prompt_of], dtype=dtype) \
            if isinstance(value, tuple) else value
    return sampling


def _decode(model, cache, logits, request: _Request, config: GenerationConfig, batch: _Batch, on_token) -> None:
    """Draws each row's tokens until every row has stopped; the rows that stop leave the batch."""
    device, vocab = model.device, model.config.vocab_size
    seed = config.seed
    if seed is None:
        seed = int(torch.randint(0, 2**62 - len(batch), ()))
        if getattr(model, "tensor_parallel", None) is not None:
            seed = model.tensor_parallel.same_on_every_rank(seed)  # every rank draws the same tokens
    seeds = torch.arange(len(batch), dtype=torch.int64) + seed
    # Each row's constraint state: the first sample of a prompt takes its matcher, the others fork it.
    firsts = [request.matcher_of(p) for p in range(len(request.prompts))]
    matchers = [None if firsts[p] is None else firsts[p] if b % config.num_samples == 0 else firsts[p].fork()
                for b, p in enumerate(batch.prompt_of)]
    masks = structured.RowMasks(vocab) if any(m is not None for m in matchers) else None
    sampling = _row_sampling(config, batch)
    per_row = {name: value for name, value in sampling.items() if isinstance(value, torch.Tensor)}
    options = dict(sampling, return_logprobs=config.return_logprobs, num_logprobs=config.num_logprobs)
    decoder = None
    if request.graphed is not None:
        words = None if masks is None else -(-vocab // 32)
        decoder = DecodeGraphs(model, cache, len(batch), options, vocab_words=words, graphs=request.graphed)

    def allowed_rows():
        """The running rows' token bitmask (host), or None without constraints."""
        if masks is None:
            return None
        return masks.fill([matchers[b] for b in batch.active],
                          lambda r: f"prompt {batch.prompt_of[batch.active[r]]}, step {len(batch.outputs[batch.active[r]])}")

    def draw(logits, allowed):
        rows = dict(options, **{name: value[batch.active].to(device) for name, value in per_row.items()})
        return ops.sample(logits, allowed=None if allowed is None else allowed.to(device),
                          seed=seeds[batch.active].to(device), step=batch.steps().to(device), backend=model.backend,
                          **rows)

    sampled = draw(logits, allowed_rows())
    while True:
        tokens, running = batch.record(sampled, logits, config, on_token)
        for i, b in enumerate(batch.active):
            if batch.reasons[b]:
                if cache.paged:
                    cache.free(batch.slots[i])
            elif matchers[b] is not None:
                matchers[b].consume(tokens[i])
        if not running:
            return
        batch.active = [batch.active[i] for i in running]
        if cache.paged:
            batch.slots = [batch.slots[i] for i in running]
        else:
            cache.keep([batch.slots[i] for i in running])
            batch.slots = list(range(len(running)))
        allowed = allowed_rows()
        if decoder is not None:
            rows = {name: value[batch.active] for name, value in per_row.items()}
            logits, sampled = decoder.step([tokens[i] for i in running], batch.slots, seeds[batch.active],
                                           batch.steps(), allowed, rows=rows)
        else:
            next_ids = (sampled.tokens if config.return_logprobs else sampled)[running][:, None]  # [B', 1]
            logits = model(next_ids, cache=cache, slots=batch.slots)[:, -1]  # [B', V]
            sampled = draw(logits, allowed)


def _result(batch: _Batch, config: GenerationConfig, tokenizer):
    """The token lists, or a ``GenerationResult``; with ``best_of``, each prompt's best sample only."""
    scores = ([total / len(tokens) for total, tokens in zip(batch.model_logprob_sums, batch.outputs)]
              if batch.scoring else None)
    keep = search.pick_best_of(config.num_samples, batch.outputs, scores) if config.best_of else range(len(batch))
    if not config.returns_result:
        return [batch.outputs[r] for r in keep]
    batch.stopping.flush(batch.reasons)

    def pick(rows):
        return None if rows is None else [rows[r] for r in keep]

    return GenerationResult(
        tokens=pick(batch.outputs), finish_reasons=pick(batch.reasons),
        texts=pick(batch.stopping.texts) if tokenizer is not None else None,
        logprobs=pick(batch.logprobs), top_ids=pick(batch.top_ids) if config.num_logprobs else None,
        top_logprobs=pick(batch.top_logprobs) if config.num_logprobs else None, scores=pick(scores),
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


def _beam_result(model, request: _Request, config: GenerationConfig, tokenizer, on_token):
    found = search.beam_search(model, request.prompts, max_new_tokens=config.max_new_tokens,
                               num_beams=config.num_beams, length_penalty=config.length_penalty, eos=request.eos,
                               stop=request.stop, matcher_of=request.matcher_of, kv_cache=config.kv_cache,
                               block_size=config.block_size, on_token=on_token)
    tokens = [beams[0][0] for beams in found]
    if not config.returns_result:
        return tokens
    texts = None
    if tokenizer is not None:
        texts = []
        for prompt, new in zip(request.prompts, tokens):
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
