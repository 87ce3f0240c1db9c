"""fmkernels.model's packed prefill and shared prompt prefixes: Transformer.prefill against the
per-prompt forward (DESIGN.md's tolerance to a float64 truth) and against decoding from its cache,
one packed forward per generate call, the LM head on last tokens only, and the samples of a
prompt sharing its KV cache: the paged pool's reference counts, forks of partly filled blocks,
contiguous rows copied, and the same tokens as without sharing."""

import pytest
import torch

import fmkernels
from fmkernels.model import BlockAllocator, ModelConfig, Transformer, generate, load_pretrained
from fmkernels.model.network import transformer
from fmkernels.testing import attention_tolerance, max_error

from _model_checks import captured_caches, hf_model

TINY = ModelConfig.from_name("tiny")  # GQA: 4 query heads, 2 KV heads
MHA = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=80, max_seq_len=160)
MOE = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=48, n_experts=4,
                  experts_per_token=2, max_seq_len=160, architecture="mixtral")
LENGTHS = [1, 17, 113]
PROMPTS = [[3, 14, 15, 92, 65], [35], list(range(40, 60)), [8, 9, 7, 9, 3, 2, 3]]
SAMPLING = dict(temperature=0.9, top_k=50, top_p=0.95)


@pytest.fixture(scope="module")
def model():
    return Transformer.from_config(TINY, seed=0, backend="cpu")


def _prompts(lengths, vocab, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def _poisoned(cache):
    """NaN in every cache entry, so a position prefill should have written and did not fails."""
    for tensor in (*cache.k, *cache.v):
        tensor.fill_(float("nan"))
    return cache


def _last_logits(model, prompt):
    with torch.no_grad():
        return model(torch.tensor([prompt]))[0, -1]  # [V]


class _Spy:
    """Records the calls of an fmkernels op the model calls, then runs it."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        self._op = getattr(fmkernels.ops, name)
        monkeypatch.setattr(fmkernels.ops, name, self)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self._op(*args, **kwargs)


# ---------------------------------------------------------------- Transformer.prefill

@pytest.mark.parametrize("kind, overrides", [("llama", {}), ("llama", dict(num_key_value_heads=4)),
                                             ("llama", dict(num_key_value_heads=1)), ("mixtral", {})],
                         ids=["gqa", "mha", "mqa", "moe"])
@pytest.mark.parametrize("cache_kind", ["contiguous", "paged"])
def test_packed_prefill_is_within_the_design_tolerance_of_a_float64_truth(tmp_path, kind, overrides, cache_kind):
    """DESIGN.md's rule at the scale of the model: each prompt's last-token logits from one
    packed prefill of a ragged batch are, on every CPU backend, at most twice plain PyTorch's
    fp32 error (the reference backend's per-prompt forward) from the float64 truth (transformers
    in float64), plus 1e-5; and as close to the backend's own per-prompt forward."""
    pytest.importorskip("transformers")
    reference = hf_model(kind, max_position_embeddings=128, **overrides)
    reference.save_pretrained(tmp_path)
    if kind == "mixtral":
        reference.set_experts_implementation("eager")  # its grouped GEMM has no float64
    prompts = _prompts(LENGTHS, 96, seed=3)
    with torch.no_grad():
        reference = reference.double()
        truth = torch.stack([reference(torch.tensor([p])).logits[0, -1] for p in prompts])  # [3, V]
    plain = None
    for backend in ("reference", "cpu"):
        model = load_pretrained(tmp_path, backend=backend)
        alone = torch.stack([_last_logits(model, p) for p in prompts])
        plain = alone if plain is None else plain
        cache = _poisoned(model.new_cache(cache_kind, batch=3, max_seq_len=128, block_size=16))
        with torch.no_grad():
            packed = model.prefill(prompts, cache=cache)
        assert packed.shape == (3, 96) and packed.dtype == torch.float32
        tolerance = attention_tolerance(plain, truth)
        assert max_error(packed, truth) <= tolerance
        assert max_error(packed, alone) <= tolerance


@pytest.mark.parametrize("config", [TINY, MHA, MOE], ids=["gqa", "mha", "moe"])
@pytest.mark.parametrize("cache_kind", ["contiguous", "paged"])
@pytest.mark.parametrize("lengths", [LENGTHS, [17, 17, 17]], ids=["ragged", "equal"])
def test_decoding_after_a_packed_prefill_equals_the_full_forward(config, cache_kind, lengths, monkeypatch):
    # The cache starts as NaN: a key or value prefill did not write would reach the logits.
    model = Transformer.from_config(config, seed=1, backend="cpu")
    prompts = _prompts(lengths, config.vocab_size, seed=4)
    following = [5, 9, 2]
    cache = _poisoned(model.new_cache(cache_kind, batch=3, max_seq_len=128, block_size=8))
    append = _Spy(monkeypatch, "append_kv")
    with torch.no_grad():
        first = model.prefill(prompts, cache=cache)
        assert len(append.calls) == config.n_layers  # every prompt's keys and values in one call per layer
        second = model(torch.tensor(following)[:, None], cache=cache)[:, -1]  # [3, V]
    assert [cache.length(slot) for slot in range(3)] == [n + 1 for n in lengths]
    for i, prompt in enumerate(prompts):
        assert max_error(first[i], _last_logits(model, prompt)) < 1e-4
        assert max_error(second[i], _last_logits(model, prompt + [following[i]])) < 1e-4


@pytest.mark.parametrize("cache_kind", ["contiguous", "paged"])
def test_prefill_into_any_empty_slots(model, cache_kind):
    prompts = _prompts([9, 2, 30], TINY.vocab_size, seed=5)
    slots = [4, 0, 2]
    cache = _poisoned(model.new_cache(cache_kind, batch=5, max_seq_len=40, block_size=4))
    with torch.no_grad():
        model.prefill(prompts, cache=cache, slots=slots)
        # Nothing outside the prompts' own rows or blocks is written (it is still NaN).
        owned = sorted(b for s in slots for b in cache.blocks[s]) if cache.paged else slots
        others = [r for r in range(cache.k[0].shape[0]) if r not in owned]
        assert others and all(tensor[others].isnan().all() for tensor in (*cache.k, *cache.v))
        for slot, prompt in zip(slots, prompts):
            assert cache.length(slot) == len(prompt)
            logits = model(torch.tensor([[7]]), cache=cache, slots=[slot])[0, -1]
            assert max_error(logits, _last_logits(model, prompt + [7])) < 1e-4
    assert cache.length(1) == 0 and cache.length(3) == 0


def test_prefill_takes_tensors_and_lists_alike(model):
    prompts = _prompts([6, 6], TINY.vocab_size, seed=6)
    results = []
    for form in (prompts, [torch.tensor(p) for p in prompts], torch.tensor(prompts)):
        with torch.no_grad():
            results.append(model.prefill(form, cache=model.new_cache(batch=2, max_seq_len=8)))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_generate_prefills_in_one_packed_forward_with_the_lm_head_on_last_tokens(model, kv_cache, monkeypatch):
    attention = _Spy(monkeypatch, "attention")
    decode = _Spy(monkeypatch, "decode_attention")
    heads = []
    project = transformer.project

    def spy(layer, x, backend):  # the LM head's input, whichever matmul runs it
        if layer is model.lm_head:
            heads.append(tuple(x.shape))
        return project(layer, x, backend)

    monkeypatch.setattr(transformer, "project", spy)
    tokens = generate(model, PROMPTS, max_new_tokens=3, kv_cache=kv_cache, block_size=4, ignore_eos=True)
    assert [len(t) for t in tokens] == [3] * len(PROMPTS)
    # One packed attention call per layer, over every prompt's tokens; decode reads the cache.
    assert len(attention.calls) == TINY.n_layers
    for args, kwargs in attention.calls:
        assert args[0].shape[0] == sum(len(p) for p in PROMPTS)
        assert kwargs["cu_seqlens_q"].tolist() == [0, 5, 6, 26, 33] and kwargs["causal"]
    assert len(decode.calls) == 2 * TINY.n_layers
    assert heads == [(len(PROMPTS), TINY.dim), (len(PROMPTS), 1, TINY.dim), (len(PROMPTS), 1, TINY.dim)]


@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
@pytest.mark.parametrize("options", [dict(), dict(seed=17, **SAMPLING)], ids=["greedy", "sampled"])
def test_ragged_prompts_of_1_17_113_tokens_get_the_tokens_they_get_alone(kv_cache, options):
    model = Transformer.from_config(MHA, seed=2, backend="cpu")
    prompts = _prompts(LENGTHS, MHA.vocab_size, seed=7)
    batch = generate(model, prompts, max_new_tokens=6, kv_cache=kv_cache, block_size=16, **options)
    for b, prompt in enumerate(prompts):
        alone = dict(options, seed=options["seed"] + b) if options else options
        assert generate(model, [prompt], max_new_tokens=6, kv_cache=kv_cache, block_size=16, **alone) == [batch[b]]


def test_reference_and_cpu_backends_prefill_alike():
    prompts = _prompts(LENGTHS, MOE.vocab_size, seed=8)
    logits = []
    for backend in ("reference", "cpu"):
        model = Transformer.from_config(MOE, seed=3, backend=backend)
        with torch.no_grad():
            logits.append(model.prefill(prompts, cache=model.new_cache("paged", batch=3, max_seq_len=120)))
    assert max_error(logits[0], logits[1]) < 1e-4


# ---------------------------------------------------------------- shared prompt prefixes

@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
@pytest.mark.parametrize("best_of", [False, True])
def test_shared_samples_equal_the_prompt_repeated_without_sharing(model, kv_cache, best_of, monkeypatch):
    n = 3
    options = dict(max_new_tokens=7, seed=23, kv_cache=kv_cache, block_size=4, return_result=True, **SAMPLING)
    attention = _Spy(monkeypatch, "attention")
    shared = generate(model, PROMPTS, num_samples=n, best_of=best_of, **options)
    # Each prompt prefilled once: one packed forward over the distinct prompts' tokens.
    assert [args[0].shape[0] for args, _ in attention.calls] == [sum(len(p) for p in PROMPTS)] * TINY.n_layers
    # Without sharing: each prompt given n times, so row b * n + j draws with seed + b * n + j as well
    # (best_of of one sample keeps every row, with its score).
    repeated = generate(model, [p for p in PROMPTS for _ in range(n)], best_of=True, **options)
    if best_of:
        picked = [max(range(b * n, (b + 1) * n), key=lambda r: (repeated.scores[r], -r)) for b in range(len(PROMPTS))]
        assert shared.tokens == [repeated.tokens[r] for r in picked]
        assert shared.scores == pytest.approx([repeated.scores[r] for r in picked], abs=1e-5)
    else:
        assert shared.tokens == repeated.tokens
        assert shared.scores == pytest.approx(repeated.scores, abs=1e-5)


@pytest.mark.parametrize("block_size", [4, 5])
def test_samples_share_the_prompts_full_blocks_and_give_every_block_back(model, block_size, monkeypatch):
    n = 4
    caches = captured_caches(monkeypatch)
    used = []

    def on_token(row, token):
        if not used:  # right after the prefill and the forks, before any decode step
            allocator = caches[0].allocator
            used.append(allocator.num_blocks - allocator.free_blocks)

    generate(model, PROMPTS, max_new_tokens=6, num_samples=n, seed=1, kv_cache="paged", block_size=block_size,
             on_token=on_token, **SAMPLING)
    # Per prompt: its blocks once, plus a copy of its partly filled last block for each other sample.
    shared = sum(-(-len(p) // block_size) + (n - 1) * bool(len(p) % block_size) for p in PROMPTS)
    unshared = n * sum(-(-len(p) // block_size) for p in PROMPTS)
    assert used == [shared] and shared < unshared
    cache = caches[0]
    assert cache.allocator.free_blocks == cache.allocator.num_blocks and not cache.blocks


def test_block_allocator_counts_references():
    allocator = BlockAllocator(4)
    a, b = allocator.allocate(2)
    assert (a, b) == (0, 1) and allocator.references(a) == 1
    allocator.share([a])
    allocator.share([a])
    allocator.free([a, b])
    assert allocator.references(a) == 2 and allocator.references(b) == 0 and allocator.free_blocks == 3
    allocator.free([a])
    allocator.free([a])
    assert allocator.free_blocks == 4 and allocator.allocate(1) == [0]
    with pytest.raises(ValueError, match="block 1 is not allocated"):
        allocator.free([1])
    with pytest.raises(ValueError, match="block 3 is not allocated"):
        allocator.share([3])
    with pytest.raises(ValueError, match="block 9 is not allocated"):
        allocator.free([9])
    assert allocator.references(0) == 1 and allocator.free_blocks == 3  # a failed call changes nothing


def test_paged_fork_shares_full_blocks_and_copies_a_partly_filled_last_block(model):
    cache = model.new_cache("paged", num_blocks=8, block_size=4, max_seq_len=16)
    prompt = _prompts([6], TINY.vocab_size, seed=9)[0]
    with torch.no_grad():
        model.prefill([prompt], cache=cache, slots=[0])
        full, partial = cache.blocks[0]
        cache.fork(0, 5)
        assert cache.blocks[5][0] == full and cache.blocks[5][1] not in (full, partial)
        copy = cache.blocks[5][1]
        assert cache.allocator.references(full) == 2 and cache.allocator.references(copy) == 1
        assert cache.lengths[5] == 6 and cache.allocator.free_blocks == 5
        for tensor in (*cache.k, *cache.v):
            assert torch.equal(tensor[copy, :2], tensor[partial, :2])
        before = [tensor.clone() for tensor in (*cache.k, *cache.v)]
        # The two sequences write different tokens at position 6, each into its own last block.
        logits = model(torch.tensor([[1], [2]]), cache=cache, slots=[0, 5])[:, -1]
    assert max_error(logits[0], _last_logits(model, prompt + [1])) < 1e-4
    assert max_error(logits[1], _last_logits(model, prompt + [2])) < 1e-4
    for old, tensor in zip(before, (*cache.k, *cache.v)):
        assert torch.equal(tensor[full], old[full])  # the shared block is never written again
        assert torch.equal(tensor[partial, :2], old[partial, :2]) and torch.equal(tensor[copy, :2], old[copy, :2])
        assert not torch.equal(tensor[partial, 2], tensor[copy, 2])
    with pytest.raises(ValueError, match="slot 5 already holds a sequence"):
        cache.fork(0, 5)
    with pytest.raises(ValueError, match="slot 3 holds no sequence to fork"):
        cache.fork(3, 6)
    cache.free(0)
    assert cache.allocator.references(full) == 1 and cache.allocator.free_blocks == 6  # 5 still uses it
    cache.free(5)
    assert cache.allocator.free_blocks == 8


def test_paged_fork_at_a_block_boundary_shares_every_block(model):
    cache = model.new_cache("paged", num_blocks=8, block_size=4, max_seq_len=16)
    prompt = _prompts([8], TINY.vocab_size, seed=10)[0]
    with torch.no_grad():
        model.prefill([prompt], cache=cache, slots=[0])
        cache.fork(0, 1)
        assert cache.blocks[1] == cache.blocks[0] and cache.allocator.free_blocks == 6
        logits = model(torch.tensor([[3], [4]]), cache=cache, slots=[0, 1])[:, -1]  # each a new block
    assert len(set(cache.blocks[0][2:] + cache.blocks[1][2:])) == 2 and cache.allocator.free_blocks == 4
    assert max_error(logits[1], _last_logits(model, prompt + [4])) < 1e-4


def test_contiguous_fork_copies_the_rows_positions(model):
    cache = model.new_cache("contiguous", batch=3, max_seq_len=12)
    for tensor in (*cache.k, *cache.v):
        tensor[2] = 7.0
    prompt = _prompts([5], TINY.vocab_size, seed=11)[0]
    with torch.no_grad():
        model.prefill([prompt], cache=cache, slots=[0])
        cache.fork(0, 2)
        assert cache.lengths == [5, 0, 5]
        for tensor in (*cache.k, *cache.v):
            assert torch.equal(tensor[2, :5], tensor[0, :5])
            assert (tensor[2, 5:] == 7.0).all()  # positions past the prompt are not copied
        cache.fork(0, 1)
        logits = model(torch.tensor([[1], [2], [3]]), cache=cache)[:, -1]
    for i, token in enumerate([1, 2, 3]):
        assert max_error(logits[i], _last_logits(model, prompt + [token])) < 1e-4
    with pytest.raises(ValueError, match="slot 1 already holds a sequence"):
        cache.fork(0, 1)
    with pytest.raises(ValueError, match=r"slot must be a row of the cache in \[0, 3\), got 3"):
        cache.fork(0, 3)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("prompts, slots, error, message", [
    ([], None, ValueError, "at least one prompt"),
    ([1, 2], None, ValueError, r"prompts\[0\] must be a non-empty 1-D sequence of token ids, got shape \(\)"),
    ("12", None, TypeError, "prompts must be a sequence of token-id lists or 1-D tensors, got str"),
    (torch.tensor([1, 2]), None, TypeError, "got Tensor"),
    ([[1], []], None, ValueError, r"prompts\[1\] must be a non-empty 1-D sequence"),
    ([[1], [[2]]], None, ValueError, r"prompts\[1\] must be a non-empty 1-D sequence of token ids, got shape \(1, 1\)"),
    (["ab"], None, TypeError, r"prompts\[0\] must be a list of int token ids or a 1-D integer tensor, got str"),
    ([[1.5]], None, TypeError, r"prompts\[0\] must be an integer tensor, got torch.float32"),
    ([[True]], None, TypeError, r"prompts\[0\] must be an integer tensor, got torch.bool"),
    ([[1], [512]], None, ValueError, r"prompts\[1\] hold token id 512, outside the vocabulary \[0, 512\)"),
    ([[1], [2]], [0], ValueError, r"slots must name 2 distinct cache slots, one per prompt, got \[0\]"),
    ([[1], [2]], [1, 1], ValueError, "distinct cache slots"),
    ([[1]], [3], ValueError, r"slot must be a row of the cache in \[0, 2\), got 3"),
    ([[1] * 9], None, ValueError, "needs 9 positions, the cache holds max_seq_len=8"),
])
def test_bad_prefill_input_is_named(model, prompts, slots, error, message):
    cache = model.new_cache(batch=2, max_seq_len=8)
    with pytest.raises(error, match=message):
        model.prefill(prompts, cache=cache, slots=slots)
    assert cache.lengths == [0, 0]


@pytest.mark.parametrize("cache_kind", ["contiguous", "paged"])
def test_prefill_into_a_slot_that_holds_a_sequence_is_an_error(model, cache_kind):
    cache = model.new_cache(cache_kind, batch=2, max_seq_len=8, block_size=4)
    with torch.no_grad():
        model.prefill([[1, 2]], cache=cache, slots=[1])
        with pytest.raises(ValueError, match="prefill writes prompts into empty cache slots; slot 1 holds 2 tokens"):
            model.prefill([[3], [4]], cache=cache, slots=[0, 1])
    assert cache.length(0) == 0 and cache.length(1) == 2
