"""Decode steps on static buffers (fmkernels.model.generation.decode_graphs), and generate(cuda_graphs=...).

On the CPU, ``cuda_graphs=True`` runs the static-buffer step eagerly: the same buckets,
padding rows, staged copies and cache bookkeeping a CUDA graph replays, held here to the
plain path's tokens and log-probabilities (bit for bit: a row's arithmetic does not depend
on its batch), while rows leave the batch at different steps, a paged cache grows between
steps and a contiguous one compacts. The padding rows are checked to touch no live sequence's
cache. On a GPU (the tests marked ``gpu``) the steps are captured and replayed, and the
replayed step is checked not to synchronise with the host.
"""

import dataclasses
import importlib
import types

import pytest
import torch

from fmkernels.model import ModelConfig, Transformer, generate
from fmkernels.model.generation import decode_graphs
from fmkernels.model.generation.decode_graphs import DecodeGraphs, bucket_sizes

generate_module = importlib.import_module("fmkernels.model.generation.generate")

PROMPTS = [[1, 2, 3], [7], [5, 6, 7, 8, 9], [4, 4], [9, 9, 9]]


@pytest.fixture(scope="module")
def model():
    return Transformer.from_config(ModelConfig.from_name("tiny"), seed=0, backend="cpu")


def _stop_tokens(model, **options):
    """Tokens that end some rows early: each of three rows' third token in a free run."""
    free = generate(model, PROMPTS, max_new_tokens=12, ignore_eos=True, **options)
    return sorted({free[b][2] for b in (0, 2, 4)})


def _both(model, **options):
    plain = generate(model, PROMPTS, return_result=True, cuda_graphs=False, **options)
    static = generate(model, PROMPTS, return_result=True, cuda_graphs=True, **options)
    return plain, static


@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=40, top_p=0.9, seed=3),
                                      dict(temperature=1.0, min_p=0.05, seed=11)], ids=["greedy", "top-p", "min-p"])
def test_static_steps_give_the_plain_paths_tokens(model, kv_cache, sampling):
    stop = _stop_tokens(model, kv_cache=kv_cache, **sampling)
    plain, static = _both(model, max_new_tokens=12, kv_cache=kv_cache, block_size=4, stop_token_ids=stop,
                          return_logprobs=True, num_logprobs=3, **sampling)
    assert static.tokens == plain.tokens and static.finish_reasons == plain.finish_reasons
    assert "stop_token" in plain.finish_reasons and "length" in plain.finish_reasons  # rows leave at different steps
    assert static.logprobs == plain.logprobs
    assert static.top_ids == plain.top_ids and static.top_logprobs == plain.top_logprobs


@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_samples_best_of_and_token_constraints(model, kv_cache):
    options = dict(max_new_tokens=9, kv_cache=kv_cache, block_size=4, temperature=1.0, seed=5)
    plain, static = _both(model, num_samples=3, **options)
    assert static.tokens == plain.tokens and static.scores == plain.scores
    plain, static = _both(model, num_samples=2, best_of=True, **options)
    assert static.tokens == plain.tokens and static.scores == plain.scores

    def odd_tokens(prompt_index, generated):  # a constraint: the allowed= bitmask path
        return list(range(1, model.config.vocab_size, 2)) if prompt_index % 2 else None

    plain, static = _both(model, allowed_tokens=odd_tokens, **options)
    assert static.tokens == plain.tokens
    assert all(token % 2 for b, tokens in enumerate(static.tokens) if b % 2 for token in tokens)


def test_buckets_shrink_as_rows_finish(model, monkeypatch):
    buckets = []
    run = DecodeGraphs._run

    def spy(self, bucket):
        buckets.append(bucket)
        return run(self, bucket)

    monkeypatch.setattr(DecodeGraphs, "_run", spy)
    stop = _stop_tokens(model)
    result = generate(model, PROMPTS, max_new_tokens=12, stop_token_ids=stop, return_result=True, cuda_graphs=True)
    live = [sum(len(tokens) > step for tokens in result.tokens) for step in range(1, 12)]
    live = [n for n in live if n]  # rows decoding at each step after the prefill's
    assert buckets == [min(size for size in bucket_sizes(5) if size >= n) for n in live]
    assert buckets[0] == 5 and buckets[-1] < 5


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        bucket_sizes(0)


def _filled_cache(model, kind, capacity, lengths, block_size=4):
    """A cache holding random prompts of ``lengths`` in slots 0.. (with room for the scratch block)."""
    blocks = capacity * -(-32 // block_size) + 1
    cache = model.new_cache(kind, batch=capacity, max_seq_len=32, block_size=block_size, num_blocks=blocks)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=generator) for n in lengths]
    model.prefill(prompts, cache=cache)
    return cache


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_padding_rows_touch_no_live_sequence(model, kind):
    """Three live rows run in the bucket of four: the fourth (padding) row writes a free row's
    position 0 (contiguous) or the scratch block (paged), nothing else; the live rows' caches
    and logits equal a plain step's."""
    lengths = [5, 9, 3]
    static_cache, plain_cache = (_filled_cache(model, kind, 5, lengths) for _ in range(2))
    runner = DecodeGraphs(model, static_cache, 5, dict(temperature=0.0))
    before = [t.clone() for t in static_cache.k + static_cache.v]
    next_ids = [11, 12, 13]
    slots = [0, 1, 2]
    logits, tokens = runner.step(next_ids, slots, torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    expected = model(torch.tensor(next_ids)[:, None], cache=plain_cache, slots=slots)[:, -1]
    assert torch.equal(logits, expected) and torch.equal(tokens, expected.argmax(-1))
    assert [static_cache.length(s) for s in slots] == [6, 10, 4]
    for now, was, plain in zip(static_cache.k + static_cache.v, before, plain_cache.k + plain_cache.v):
        changed = (now != was).flatten(1).any(1).nonzero().flatten().tolist()  # rows (contiguous) or blocks (paged)
        if kind == "contiguous":
            assert set(changed) <= {0, 1, 2, 3}
            assert torch.equal(now[:3], plain[:3])
            assert torch.equal(now[3, 1:], was[3, 1:]) and torch.equal(now[4], was[4])
        else:
            assert torch.equal(now[:runner.scratch_block], plain[:runner.scratch_block])
            assert torch.equal(now[runner.scratch_block + 1:], plain[runner.scratch_block + 1:])
            assert runner.scratch_block not in [b for s in slots for b in static_cache.blocks[s]]


def test_steps_grow_a_paged_sequence_into_new_blocks(model):
    cache = _filled_cache(model, "paged", 2, [3, 4], block_size=4)
    runner = DecodeGraphs(model, cache, 2, dict(temperature=0.0))
    zeros = torch.zeros(2, dtype=torch.int64)
    assert [len(cache.blocks[s]) for s in (0, 1)] == [1, 1]
    runner.step([1, 2], [0, 1], zeros, zeros)  # slot 1 writes position 4: a second block
    assert [len(cache.blocks[s]) for s in (0, 1)] == [1, 2] and [cache.length(s) for s in (0, 1)] == [4, 5]


def test_generate_rejects_what_it_cannot_graph(model):
    with pytest.raises(ValueError, match="cuda_graphs must be 'auto', True or False, got 'yes'"):
        generate(model, PROMPTS, max_new_tokens=2, cuda_graphs="yes")
    with pytest.raises(ValueError, match="cuda_graphs=True cannot run this generate call: beam search"):
        generate(model, PROMPTS, max_new_tokens=2, num_beams=2, cuda_graphs=True)
    moe = Transformer.from_config(dataclasses.replace(ModelConfig.from_name("tiny"), n_experts=4,
                                                      experts_per_token=2), seed=0, backend="cpu")
    with pytest.raises(ValueError, match="mixture of experts"):
        generate(moe, PROMPTS, max_new_tokens=2, cuda_graphs=True)
    assert generate(moe, PROMPTS, max_new_tokens=2) == generate(moe, PROMPTS, max_new_tokens=2, cuda_graphs=False)


def test_auto_keeps_the_plain_path_on_the_cpu(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("auto made a static-buffer runner on the CPU")

    monkeypatch.setattr(decode_graphs, "DecodeGraphs", refuse)
    assert generate(model, PROMPTS, max_new_tokens=3) == generate(model, PROMPTS, max_new_tokens=3, cuda_graphs=False)


def test_auto_graphs_cuda_only_once_they_are_let_into_auto(monkeypatch):
    # The choice reads the model's device, config, backend and parallel plan, nothing else.
    def stand_in(backend="auto", experts=0, device="cuda"):
        return types.SimpleNamespace(device=torch.device(device), backend=backend,
                                     config=types.SimpleNamespace(n_experts=experts), tensor_parallel=None)

    choose = generate_module._decode_graphs_choice
    assert choose(stand_in(), "auto", None) is None  # not yet run on a GPU
    assert choose(stand_in(), True, None) is True
    assert choose(stand_in(device="cpu"), True, None) is False
    monkeypatch.setattr(generate_module, "GRAPHS_IN_AUTO", True)
    assert choose(stand_in(), "auto", None) is True
    assert choose(stand_in(device="cpu"), "auto", None) is None
    assert choose(stand_in(backend="reference"), "auto", None) is None
    assert choose(stand_in(experts=4), "auto", None) is None
    assert choose(stand_in(), "auto", 2) is None
    with pytest.raises(ValueError, match="backend 'reference' may read GPU values back"):
        choose(stand_in(backend="reference"), True, None)


def test_runner_errors(model):
    cache = _filled_cache(model, "contiguous", 2, [3, 4])
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device, it is on cpu"):
        DecodeGraphs(model, cache, 2, {}, graphs=True)
    with pytest.raises(ValueError, match="a contiguous cache of 2 rows cannot run 3 sequences"):
        DecodeGraphs(model, cache, 3, {})
    runner = DecodeGraphs(model, cache, 2, dict(temperature=0.0))
    three = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="a step runs at most 2 sequences, got 3"):
        runner.step([1, 2, 3], [0, 1, 2], three, three)
    with pytest.raises(ValueError, match="allowed must be given exactly when"):
        runner.step([1, 2], [0, 1], three[:2], three[:2], allowed=torch.zeros(2, 16, dtype=torch.int32))


# ---------------------------------------------------------------------------------------
# On a GPU: captured, replayed, and not synchronising


def _gpu_model(backend):
    from fmkernels import platform

    reason = platform.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    return Transformer.from_config(ModelConfig.from_name("tiny"), seed=0, dtype=torch.float16, device="cuda",
                                   backend=backend)


def _runners(monkeypatch):
    made = []
    init = DecodeGraphs.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(DecodeGraphs, "__init__", record)
    return made


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_graphs_replay_the_plain_paths_tokens(backend, kv_cache, monkeypatch):
    gpu_model = _gpu_model(backend)
    runners = _runners(monkeypatch)
    options = dict(max_new_tokens=16, kv_cache=kv_cache, block_size=8, temperature=0.8, top_p=0.9, seed=2,
                   return_logprobs=True, num_logprobs=2, stop_token_ids=_stop_tokens(gpu_model, kv_cache=kv_cache))
    plain = generate(gpu_model, PROMPTS, cuda_graphs=False, **options)
    graphed = generate(gpu_model, PROMPTS, cuda_graphs=True, **options)
    assert len(runners) == 1 and runners[0].graphs
    assert graphed.tokens == plain.tokens
    torch.testing.assert_close(torch.tensor(sum(graphed.logprobs, [])), torch.tensor(sum(plain.logprobs, [])),
                               atol=1e-5, rtol=0)
    runner = runners[0]
    assert 1 <= runner.captures <= len(runner.buckets) and runner.replays >= 10


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_a_replayed_step_does_not_synchronise(backend):
    gpu_model = _gpu_model(backend)
    cache = gpu_model.new_cache("paged", batch=3, max_seq_len=32, block_size=8, num_blocks=13)
    gpu_model.prefill([[1, 2, 3], [4, 5], [6]], cache=cache)
    runner = DecodeGraphs(gpu_model, cache, 3, dict(temperature=0.7, top_k=20), graphs=True)
    seeds, steps = torch.arange(3), torch.zeros(3, dtype=torch.int64)
    first = runner.step([7, 8, 9], [0, 1, 2], seeds, steps)[1].tolist()  # warm-up and capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, tokens = runner.step(first, [0, 1, 2], seeds, steps + 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert runner.replays == 1 and tokens.shape == (3,)
