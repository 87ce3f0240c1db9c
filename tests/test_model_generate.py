"""fmkernels.model: KV-cache decode against full recomputation, paged against contiguous,
ragged batches against single prompts, backends against each other, sampling and stops."""

import pytest
import torch

from fmkernels.model import ModelConfig, PagedKVCache, Transformer, generate
from fmkernels.testing import max_error

TINY = ModelConfig.from_name("tiny")
MOE = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=48, n_experts=4,
                  experts_per_token=2, max_seq_len=64, architecture="mixtral")


@pytest.fixture(scope="module")
def model():
    return Transformer.from_config(TINY, seed=0, backend="cpu")


def _ids(batch, seqlen, vocab=TINY.vocab_size, seed=0):
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def test_from_config_is_deterministic_by_seed():
    a, b, c = (Transformer.from_config(TINY, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.layers[1].self_attn.q_proj.weight, b.layers[1].self_attn.q_proj.weight)
    assert not torch.equal(a.layers[1].self_attn.q_proj.weight, c.layers[1].self_attn.q_proj.weight)


@pytest.mark.parametrize("config", [TINY, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_cache_decode_equals_full_recomputation(config, kind):
    model = Transformer.from_config(config, seed=1, backend="cpu")
    ids = _ids(2, 20, config.vocab_size)
    with torch.no_grad():
        full = model(ids)  # [2, 20, V]
        cache = model.new_cache(kind, batch=2, max_seq_len=32, block_size=4)
        # A prefill, a chunk of a chunked prefill, then token-by-token decode.
        pieces = [model(ids[:, :7], cache=cache), model(ids[:, 7:12], cache=cache)]
        pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
    assert max_error(torch.cat(pieces, dim=1), full) < 1e-4


def test_paged_cache_allocates_as_sequences_grow_and_frees(model):
    cache = model.new_cache("paged", num_blocks=6, block_size=4, max_seq_len=24)
    with torch.no_grad():
        model(_ids(1, 5), cache=cache, slots=[7])
        assert len(cache.blocks[7]) == 2 and cache.allocator.free_blocks == 4
        model(_ids(1, 3), cache=cache, slots=[7])
        assert len(cache.blocks[7]) == 2
        model(_ids(1, 1), cache=cache, slots=[7])
        assert len(cache.blocks[7]) == 3
        cache.free(7)
    assert cache.allocator.free_blocks == 6 and 7 not in cache.blocks


def test_paged_pool_exhausted_is_a_clear_error(model):
    cache = PagedKVCache(TINY.n_layers, 2, 4, TINY.n_kv_heads, TINY.head_dim, max_seq_len=32)
    with pytest.raises(RuntimeError, match="pool exhausted: 3 more block"):
        model(_ids(1, 9), cache=cache)


PROMPTS = [[3, 14, 15, 92, 65], [35], list(range(40, 60)), [8, 9, 7, 9, 3, 2, 3]]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, seed=11)],
                         ids=["greedy", "sampled"])
def test_ragged_batch_equals_each_prompt_alone_and_paged_equals_contiguous(model, sampling):
    batch = generate(model, PROMPTS, max_new_tokens=9, **sampling)
    assert [len(tokens) for tokens in batch] == [9] * 4
    paged = generate(model, PROMPTS, max_new_tokens=9, kv_cache="paged", block_size=4, **sampling)
    assert paged == batch
    seed = sampling.pop("seed", None)
    for b, prompt in enumerate(PROMPTS):
        alone_seed = None if seed is None else seed + b  # prompt b draws with seed + b
        assert generate(model, [prompt], max_new_tokens=9, seed=alone_seed, **sampling) == [batch[b]]


def test_tensor_prompts_equal_list_prompts(model):
    ids = _ids(3, 6)
    assert generate(model, ids, max_new_tokens=4) == generate(model, ids.tolist(), max_new_tokens=4)


def test_reference_and_cpu_backends_generate_the_same_tokens():
    # Their logits are held to each other in test_model_hf.py (DESIGN.md's tolerance).
    tokens = [
        generate(
            Transformer.from_config(TINY, seed=2, backend=backend), PROMPTS, max_new_tokens=6, temperature=0.7, seed=3, kv_cache="paged", block_size=4
        )
        for backend in ("reference", "cpu")
    ]
    assert tokens[0] == tokens[1]


def test_seeded_sampling_repeats_and_seeds_differ(model):
    options = dict(max_new_tokens=12, temperature=1.0, top_p=0.95)
    first = generate(model, PROMPTS[:2], seed=5, **options)
    assert generate(model, PROMPTS[:2], seed=5, **options) == first
    assert generate(model, PROMPTS[:2], seed=6, **options) != first


@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_stop_tokens_end_each_sequence_on_its_own(model, kv_cache):
    free = generate(model, PROMPTS, max_new_tokens=10)
    stop = free[2][3]  # the fourth token of prompt 2 ends it there
    stopped = generate(model, PROMPTS, max_new_tokens=10, stop_token_ids=[stop], kv_cache=kv_cache, block_size=4)
    for tokens, full in zip(stopped, free):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert tokens == full[:end]
    assert stopped[2] == free[2][:4]


@pytest.mark.parametrize("prompts, options, error, message", [
    ([[1, 2], []], {}, ValueError, r"prompts\[1\] is empty"),
    ([], {}, ValueError, "at least one prompt"),
    ([[1, 512]], {}, ValueError, r"prompts\[0\]\[1\] = 512 is outside the vocabulary \[0, 512\)"),
    ([[-1]], {}, ValueError, "outside the vocabulary"),
    ([1, 2, 3], {}, TypeError, "list of token-id lists"),
    ([[1] * 200], dict(max_new_tokens=100), ValueError, "needs 299 cache positions, beyond the model's max_seq_len"),
    ([[1]], dict(max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1"),
    ([[1]], dict(temperature=-1.0), ValueError, "temperature must be"),
    ([[1]], dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    ([[1]], dict(top_k=-2), ValueError, "top_k must be"),
    ([[1]], dict(min_p=1.5), ValueError, "min_p must be"),
    ([[1]], dict(stop_token_ids=[600]), ValueError, "stop_token_ids"),
    ([[1]], dict(kv_cache="ring"), ValueError, "kv_cache must be 'contiguous' or 'paged'"),
])
def test_bad_generate_input_is_named(model, prompts, options, error, message):
    options = dict(dict(max_new_tokens=4), **options)
    with pytest.raises(error, match=message):
        generate(model, prompts, **options)


@pytest.mark.parametrize("ids, error, message", [
    (torch.tensor([[1, 512]]), ValueError, r"token id 512, outside the vocabulary \[0, 512\)"),
    (torch.tensor([[-3, 1]]), ValueError, "token id -3"),
    (torch.tensor([[1.0]]), TypeError, "input_ids must be an integer tensor"),
    (torch.tensor([1, 2]), ValueError, r"input_ids must be a non-empty \(batch, seqlen\)"),
])
def test_bad_forward_input_is_named(model, ids, error, message):
    with pytest.raises(error, match=message):
        model(ids)


@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_finished_sequences_leave_the_decode_batch(model, kv_cache, monkeypatch):
    free = generate(model, PROMPTS, max_new_tokens=8)
    stop = free[1][2]
    calls = []
    forward = Transformer.forward

    def spy(self, input_ids, **kwargs):
        calls.append((input_ids.shape[0], kwargs.get("cache")))
        return forward(self, input_ids, **kwargs)

    monkeypatch.setattr(Transformer, "forward", spy)
    stopped = generate(model, PROMPTS, max_new_tokens=8, stop_token_ids=[stop], kv_cache=kv_cache, block_size=4)
    decode_batches = [batch for batch, _ in calls]  # the prefill is Transformer.prefill, not a forward call
    running = [sum(len(tokens) > step for tokens in stopped) for step in range(1, 8)]
    assert decode_batches == [n for n in running if n] and min(decode_batches) < len(PROMPTS)
    cache = calls[-1][1]
    if kv_cache == "paged":  # every sequence's blocks went back to the pool
        assert cache.allocator.free_blocks == cache.allocator.num_blocks and not cache.blocks
