"""The ops under Python threads and under many calls: threads calling ops at once with their own
shapes get the reference's results, and 10,000 calls of each op (good or refused) leave the
process's memory where it was, whatever the ops remember between calls."""

import importlib
import os
import threading

import pytest
import torch

import fmkernels
from fmkernels import platform, reference

pytestmark = pytest.mark.skipif(bool(platform.unavailable_reason("cpu")), reason=str(platform.unavailable_reason("cpu")))

TIME_LIMIT_S = 120


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _calls(seed: int):
    """A thread's own workload: every op at shapes that differ from thread to thread, with the
    reference's answers. Each entry is (name, call, expected, exact)."""
    g = _generator(seed)
    heads, head_dim = 2 + seed % 3, 16 * (1 + seed % 4)
    q = torch.randn(2, 5 + seed, heads * 2, head_dim, generator=g)
    k = torch.randn(2, 5 + seed, heads, head_dim, generator=g)
    v = torch.randn(2, 5 + seed, heads, head_dim, generator=g)
    q1 = torch.randn(3, 1, heads * 2, head_dim, generator=g)
    k_cache = torch.randn(3, 32 + seed, heads, head_dim, generator=g)
    v_cache = torch.randn(3, 32 + seed, heads, head_dim, generator=g)
    lengths = torch.tensor([1, 9 + seed, 32 + seed], dtype=torch.int32)
    logits = torch.randn(3, 300 + 17 * seed, generator=g)
    x, weight = torch.randn(4, 40 + seed, generator=g), torch.randn(24 + seed, 40 + seed, generator=g)
    new_k, new_v = torch.randn(3, 1, heads, head_dim, generator=g), torch.randn(3, 1, heads, head_dim, generator=g)
    appended_k, appended_v = k_cache.clone(), v_cache.clone()
    reference.append_kv(appended_k, appended_v, new_k, new_v, lengths - 1)

    def append():
        caches = k_cache.clone(), v_cache.clone()
        fmkernels.append_kv(*caches, new_k, new_v, lengths - 1, backend="cpu")
        return torch.cat(caches)

    return [
        ("attention", lambda: fmkernels.attention(q, k, v, causal=True, backend="cpu"),
         reference.attention(q, k, v, causal=True), False),
        ("decode_attention", lambda: fmkernels.decode_attention(q1, k_cache, v_cache, lengths, backend="cpu"),
         reference.decode_attention(q1, k_cache, v_cache, lengths), False),
        ("append_kv", append, torch.cat((appended_k, appended_v)), True),
        ("filter_logits", lambda: fmkernels.filter_logits(logits, top_k=20, top_p=0.8, backend="cpu"),
         reference.filter_logits(logits, top_k=20, top_p=0.8), True),
        ("sample", lambda: fmkernels.sample(logits, temperature=0.9, top_p=0.9, seed=seed, step=2, backend="cpu"),
         reference.sample(logits, temperature=0.9, top_p=0.9, seed=seed, step=2), True),
        ("linear", lambda: fmkernels.linear(x, weight, backend="cpu"), reference.linear(x, weight), False),
    ]


def test_threads_calling_ops_at_once_get_the_reference_results():
    failures, done = [], []

    def worker(seed):
        try:
            calls = _calls(seed)
            for _ in range(25):
                for name, call, expected, exact in calls:
                    got = call()
                    if exact:
                        if not torch.equal(got, expected):
                            failures.append(f"thread {seed}: {name} differs from the reference")
                    else:
                        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
            done.append(seed)
        except Exception as error:  # reported below, with the thread it came from
            failures.append(f"thread {seed}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=worker, args=(seed,), daemon=True) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIME_LIMIT_S)
    assert not any(thread.is_alive() for thread in threads), f"threads still running after {TIME_LIMIT_S} s"
    assert failures == [] and sorted(done) == list(range(6))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm")
@pytest.mark.parametrize("op", ["attention", "decode_attention", "append_kv", "filter_logits", "sample", "linear"])
def test_ten_thousand_calls_leave_memory_flat(op):
    calls = {name: call for name, call, _, _ in _calls(1)}
    growth = _rss_growth(calls[op], warm_up=1000, calls=10_000)
    assert growth < 4 * 2**20, f"{op}: RSS grew by {growth / 2**20:.1f} MiB over 10,000 calls"


def _rss_growth(call, warm_up: int, calls: int) -> int:
    """How much the process's resident memory grows over ``calls`` calls, after ``warm_up``
    calls in which the allocator's and the ops' caches reach their size."""
    for _ in range(warm_up):
        call()
    before = _rss_bytes()
    for _ in range(calls):
        call()
    return _rss_bytes() - before


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm")
def test_refused_calls_leak_nothing():
    logits = torch.randn(3, 500)
    logits[1, 7] = float("nan")
    q, k_cache = torch.randn(2, 1, 4, 16), torch.randn(2, 8, 2, 16)
    too_long = torch.tensor([3, 9], dtype=torch.int32)

    def refused():
        with pytest.raises(ValueError):
            fmkernels.sample(logits, seed=0, backend="cpu")
        with pytest.raises(ValueError):
            fmkernels.decode_attention(q, k_cache, k_cache, too_long, backend="cpu")

    growth = _rss_growth(refused, warm_up=500, calls=5_000)
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 10,000 refused calls"


def test_ever_new_shapes_keep_the_remembered_signatures_bounded():
    """A prefill at every prompt length is a new signature each time: what the ops remember
    stays within its capacity."""
    attention_module = importlib.import_module("fmkernels.ops.attention")
    cache = attention_module._CHECKED
    for length in range(1, cache.capacity + 50):
        q = torch.randn(1, length, 2, 8)
        fmkernels.attention(q, q, q, causal=True, backend="cpu")
        assert len(cache) <= cache.capacity
    assert len(fmkernels.registry._SELECTED) <= fmkernels.registry._SELECTED.capacity
