"""fmkernels.model generate's test-time search: n samples and best-of-n, beam search (against an
exhaustive search, greedy, paged and contiguous caches), and constrained decoding."""

import itertools

import pytest
import torch

from fmkernels.model import ByteTokenizer, ModelConfig, PagedKVCache, Transformer, choice_constraint, generate

from _model_checks import captured_caches

TINY = ModelConfig.from_name("tiny")
PROMPTS = [[3, 14, 15, 92, 65], [35], list(range(40, 60)), [8, 9, 7, 9, 3, 2, 3]]
# A vocabulary small enough to enumerate every continuation; token 0 is EOS.
SMALL = ModelConfig(vocab_size=8, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32,
                    eos_token_ids=(0,))
SAMPLING = dict(temperature=0.9, top_k=50, top_p=0.95)


@pytest.fixture(scope="module")
def model():
    return Transformer.from_config(TINY, seed=0, backend="cpu")


@pytest.fixture(scope="module")
def small():
    return Transformer.from_config(SMALL, seed=4, backend="cpu")


def _sequence_logprobs(model, prompt, tokens):
    """Each token's log-probability under a full forward of prompt + tokens (fp32 log_softmax)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0].float()  # [S, V]
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]


def _exhaustive_best(model, prompt, max_new_tokens, length_penalty):
    """The best continuation by sum(logprobs) / len ** length_penalty over every sequence that
    ends at EOS (token 0) or runs max_new_tokens tokens with no EOS before its end."""
    best = None
    vocab = model.config.vocab_size
    next_logprobs = {}  # prefix -> log_softmax of the next token, from a full forward

    def logprob(prefix, token):
        if prefix not in next_logprobs:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(prefix)]))[0, -1].float()
            next_logprobs[prefix] = torch.log_softmax(logits, dim=-1).tolist()
        return next_logprobs[prefix][token]

    for length in range(1, max_new_tokens + 1):
        for tokens in itertools.product(range(vocab), repeat=length):
            if 0 in tokens[:-1] or (length < max_new_tokens and tokens[-1] != 0):
                continue
            total = sum(logprob(tokens[:i], t) for i, t in enumerate(tokens))
            score = total / length ** length_penalty
            if best is None or score > best[1]:
                best = (list(tokens), score)
    return best


# ---------------------------------------------------------------- num_samples and best-of-n

def test_num_samples_repeat_and_each_equals_a_single_sample_run(model):
    n = 3
    options = dict(max_new_tokens=6, seed=21, **SAMPLING)
    rows = generate(model, PROMPTS[:2], num_samples=n, **options)
    assert len(rows) == 2 * n
    assert generate(model, PROMPTS[:2], num_samples=n, **options) == rows
    assert len({tuple(r) for r in rows[:n]}) > 1  # the samples of a prompt differ
    for b, prompt in enumerate(PROMPTS[:2]):
        for j in range(n):
            alone = generate(model, [prompt], **dict(options, seed=21 + b * n + j))
            assert alone == [rows[b * n + j]]


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_best_of_picks_the_highest_mean_model_logprob(model, temperature):
    n = 4
    options = dict(max_new_tokens=5, seed=7, temperature=temperature, top_k=20 if temperature else 0)
    every = generate(model, PROMPTS[:3], num_samples=n, return_result=True, **options)
    best = generate(model, PROMPTS[:3], num_samples=n, best_of=True, return_result=True, **options)
    assert len(best.tokens) == 3
    for b, prompt in enumerate(PROMPTS[:3]):
        means = []
        for j in range(n):
            tokens = every.tokens[b * n + j]
            recomputed = _sequence_logprobs(model, prompt, tokens)
            means.append(sum(recomputed) / len(tokens))
            assert every.scores[b * n + j] == pytest.approx(means[-1], abs=1e-4)
        chosen = max(range(n), key=lambda j: (means[j], -j))
        assert best.tokens[b] == every.tokens[b * n + chosen]
        assert best.scores[b] == pytest.approx(max(means), abs=1e-4)
        assert best.scores[b] < 0  # the model's own logprobs, not the filtered ones (0 at greedy)


# ---------------------------------------------------------------- beam search

@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_one_beam_is_greedy(model, kv_cache):
    greedy = generate(model, PROMPTS, max_new_tokens=8)
    assert generate(model, PROMPTS, max_new_tokens=8, num_beams=1, kv_cache=kv_cache, block_size=4) == greedy


@pytest.mark.parametrize("max_new_tokens, num_beams", [(2, 8), (3, 64)])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beams_equal_an_exhaustive_search(small, max_new_tokens, num_beams, length_penalty):
    # num_beams >= the number of live prefixes, so no beam is ever pruned.
    prompt = [5, 3, 6]
    result = generate(small, [prompt], max_new_tokens=max_new_tokens, num_beams=num_beams,
                      length_penalty=length_penalty, return_result=True)
    tokens, score = _exhaustive_best(small, prompt, max_new_tokens, length_penalty)
    assert result.tokens == [tokens]
    assert result.scores[0] == pytest.approx(score, abs=1e-4)
    scores = [s for _, s in result.beams[0]]
    assert scores == sorted(scores, reverse=True) and len(scores) <= num_beams


def test_narrow_beams_beat_or_match_greedy_and_score_as_documented(small):
    prompts = [[5, 3, 6], [1, 2], [7, 7, 7, 4]]
    greedy = generate(small, prompts, max_new_tokens=6, return_result=True)
    beams = generate(small, prompts, max_new_tokens=6, num_beams=3, return_result=True)
    for b, prompt in enumerate(prompts):
        lp = _sequence_logprobs(small, prompt, beams.tokens[b])
        assert beams.scores[b] == pytest.approx(sum(lp) / len(lp), abs=1e-4)
        assert beams.logprobs[b] == pytest.approx(lp, abs=1e-4)
        g = _sequence_logprobs(small, prompt, greedy.tokens[b])
        assert beams.scores[b] >= sum(g) / len(g) - 1e-5


@pytest.mark.parametrize("num_beams", [2, 4])
def test_paged_beams_equal_contiguous_share_blocks_and_free_every_block(model, num_beams, monkeypatch):
    contiguous = generate(model, PROMPTS, max_new_tokens=10, num_beams=num_beams, return_result=True)
    caches = captured_caches(monkeypatch)
    shared = []  # per fork: how many of the new beam's blocks it shares
    fork = PagedKVCache.fork

    def spy(self, src, dst):
        fork(self, src, dst)
        shared.append(sum(self.allocator.references(block) > 1 for block in self.blocks[dst]))

    monkeypatch.setattr(PagedKVCache, "fork", spy)
    paged = generate(model, PROMPTS, max_new_tokens=10, num_beams=num_beams, kv_cache="paged", block_size=4,
                     return_result=True)
    assert paged.tokens == contiguous.tokens and paged.beams == contiguous.beams
    assert shared and max(shared) >= 5  # prompt 2's 20 tokens fill 5 blocks, shared by every fork of it
    for cache in caches:
        assert cache.allocator.free_blocks == cache.allocator.num_blocks and not cache.blocks


def test_beams_stop_at_stop_tokens(model):
    free = generate(model, PROMPTS, max_new_tokens=8, num_beams=3)
    stop = free[0][2]
    result = generate(model, PROMPTS, max_new_tokens=8, num_beams=3, stop_token_ids=[stop], return_result=True)
    for tokens, reason in zip(result.tokens, result.finish_reasons):
        assert stop not in tokens[:-1]
        assert reason == ("stop_token" if tokens[-1] == stop else "length")


# ---------------------------------------------------------------- constrained decoding

def _even_below(limit):
    return lambda prompt_index, generated: list(range(0, limit, 2))


@pytest.mark.parametrize("options", [dict(), dict(seed=3, **SAMPLING), dict(num_beams=3),
                                     dict(seed=3, num_samples=2, best_of=True, **SAMPLING)],
                         ids=["greedy", "sampled", "beams", "best_of"])
@pytest.mark.parametrize("form", ["ids", "tensor", "mask"])
def test_allowed_tokens_are_respected(model, options, form):
    seen = []

    def allowed(prompt_index, generated):
        seen.append((prompt_index, list(generated)))
        ids = list(range(prompt_index, 300, 7))  # a different set per prompt
        if form == "tensor":
            return torch.tensor(ids)
        if form == "mask":
            mask = torch.zeros(TINY.vocab_size, dtype=torch.bool)
            mask[ids] = True
            return mask
        return ids

    out = generate(model, PROMPTS, max_new_tokens=6, allowed_tokens=allowed, **options)
    for b, tokens in enumerate(out):
        assert tokens and all(t % 7 == b and t < 300 for t in tokens)
    assert {p for p, _ in seen} == set(range(len(PROMPTS)))


def test_allowed_tokens_none_is_unconstrained(model):
    free = generate(model, PROMPTS, max_new_tokens=5)
    assert generate(model, PROMPTS, max_new_tokens=5, allowed_tokens=lambda b, g: None) == free


CHOICES = ["yes", "no", "maybe", "mayhem", "néant"]


@pytest.mark.parametrize("options", [dict()] + [dict(seed=s, temperature=1.5) for s in range(4)] + [dict(num_beams=3)],
                         ids=["greedy"] + [f"sampled{s}" for s in range(4)] + ["beams"])
@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_choice_constraint_output_is_one_of_the_choices(model, options, kv_cache):
    tok = ByteTokenizer()
    prompts = [tok.encode(text) for text in ("Is it? ", "Answer: ", "x")]
    constraint = choice_constraint(tok, CHOICES)
    result = generate(model, prompts, max_new_tokens=12, allowed_tokens=constraint, kv_cache=kv_cache,
                      block_size=4, return_result=True, tokenizer=tok, **options)
    for tokens, reason, text in zip(result.tokens, result.finish_reasons, result.texts):
        assert tokens[-1] == tok.eos_token_id and reason == "eos"
        assert tok.decode(tokens[:-1]) in CHOICES and text == tok.decode(tokens)


def test_choice_constraint_trie_allows_eos_only_at_a_complete_choice():
    tok = ByteTokenizer()
    c = choice_constraint(tok, ["ab", "abc", "b"])
    assert c(0, []) == [ord("a"), ord("b")]
    assert c(0, tok.encode("a")) == [ord("b")]
    assert c(0, tok.encode("ab")) == [ord("c"), tok.eos_token_id]
    assert c(0, tok.encode("abc")) == [tok.eos_token_id]


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("options, error, message", [
    (dict(num_beams=0), ValueError, "num_beams must be an int >= 1"),
    (dict(num_beams=2.0), ValueError, "num_beams must be an int >= 1"),
    (dict(num_beams=2, temperature=0.8), ValueError, "num_beams is deterministic beam search"),
    (dict(num_beams=2, num_samples=2), ValueError, "num_beams cannot be combined"),
    (dict(num_beams=2, num_logprobs=2, return_logprobs=True), ValueError, "num_beams does not support num_logprobs"),
    (dict(num_samples=0), ValueError, "num_samples must be an int >= 1"),
    (dict(best_of=1), TypeError, "best_of must be a bool"),
    (dict(length_penalty=float("nan")), ValueError, "length_penalty must be a finite number"),
    (dict(allowed_tokens=[1, 2]), TypeError, "allowed_tokens must be callable"),
    (dict(allowed_tokens=lambda b, g: []), ValueError, r"allowed_tokens\(prompt 0, step 0\) allows no token"),
    (dict(allowed_tokens=lambda b, g: [] if g else [5]), ValueError, r"prompt 0, step 1\) allows no token"),
    (dict(allowed_tokens=lambda b, g: [], num_beams=2), ValueError, "allows no token"),
    (dict(allowed_tokens=lambda b, g: [512]), ValueError, "outside the vocabulary"),
    (dict(allowed_tokens=lambda b, g: torch.ones(3, dtype=torch.bool)), ValueError, r"bool mask of shape \(3,\)"),
])
def test_bad_search_input_is_named(model, options, error, message):
    with pytest.raises(error, match=message):
        generate(model, [[1, 2]], max_new_tokens=4, **options)


@pytest.mark.parametrize("choices, error, message", [
    ([], ValueError, "at least one string"),
    ("yes", TypeError, "choices must be a list of strings"),
    (["yes", ""], ValueError, "non-empty strings"),
])
def test_bad_choices_are_named(choices, error, message):
    with pytest.raises(error, match=message):
        choice_constraint(ByteTokenizer(), choices)


def test_choice_constraint_needs_an_eos():
    class NoEos:
        eos_token_id = None

        def encode(self, text):
            return list(text.encode())

    with pytest.raises(ValueError, match="needs a tokenizer with an eos_token_id"):
        choice_constraint(NoEos(), ["a"])


@pytest.mark.parametrize("options", [dict(num_samples=2, seed=1, **SAMPLING), dict(num_beams=2)],
                         ids=["samples", "beams"])
def test_on_token_streams_each_returned_row(model, options):
    streamed = {}
    rows = generate(model, PROMPTS[:2], max_new_tokens=5, on_token=lambda r, t: streamed.setdefault(r, []).append(t),
                    **options)
    assert [streamed[r] for r in range(len(rows))] == rows
