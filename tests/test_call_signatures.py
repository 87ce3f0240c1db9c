"""What the ops remember between calls (fmkernels._signature, registry.select's choices), and
that remembering never skips a check that a call's values need: a repeated signature with a
bad value is refused exactly as a first call would be."""

import gc
import weakref

import pytest
import torch

import fmkernels
from fmkernels import _signature
from fmkernels._signature import SignatureCache, check_once, signature


# Every test leaves the registry as it found it.
pytestmark = pytest.mark.usefixtures("restore_registry")


def test_signature_reads_metadata_not_values():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert signature((a, 1.5, "cpu", None)) == signature((b, 1.5, "cpu", None))
    different = [
        a.double(), a.t(), a[:, :5], torch.randn(4, 7), a.view(-1)[1:].view(1, 23)[:, :6],
        torch.randn(4, 6, dtype=torch.bfloat16),
    ]
    for other in different:
        assert signature((other,)) != signature((a,)), other
    # Scalars by type and value: 1 and 1.0 and True are different calls.
    assert len({signature((value,)) for value in (1, 1.0, True, 2, "1")}) == 5


def test_signature_is_none_for_what_it_cannot_describe():
    class Sub(torch.Tensor):
        pass

    assert signature(([1, 2],)) is None
    assert signature((torch.randn(3).as_subclass(Sub),)) is None
    assert signature((torch.randn(3), object())) is None


def test_signature_cache_is_bounded():
    cache = SignatureCache(capacity=3)
    for i in range(3):
        cache.put((i,), i)
    assert len(cache) == 3 and cache.get((0,)) == 0
    cache.put((3,), 3)  # full: forgets everything first
    assert len(cache) == 1 and cache.get((0,)) is None and cache.get((3,)) == 3
    cache.put(None, "ignored")
    assert cache.get(None) is None and len(cache) == 1
    with pytest.raises(ValueError, match="capacity must be positive, got 0"):
        SignatureCache(capacity=0)


def test_check_once_checks_each_signature_once_and_never_remembers_a_failure():
    seen = []

    def check(x, flag):
        seen.append(flag)
        if flag == "bad":
            raise ValueError("bad flag")

    cache = SignatureCache()
    x = torch.randn(2)
    first = check_once(cache, check, (x, "good"))
    assert check_once(cache, check, (torch.randn(2), "good")) == first  # same signature, other values
    assert seen == ["good"]
    assert check_once(cache, check, (x.double(), "good")) != first
    for _ in range(2):
        with pytest.raises(ValueError, match="bad flag"):
            check_once(cache, check, (x, "bad"))
    assert seen == ["good", "good", "bad", "bad"]
    # No signature (a list): checked at every call, and no number to pass on.
    assert check_once(cache, check, ([1], "good")) is None
    assert check_once(cache, check, ([1], "good")) is None
    assert seen[-2:] == ["good", "good"]


def _decode_inputs(capacity=16):
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 8)
    k_cache = torch.randn(2, capacity, 2, 8)
    v_cache = torch.randn(2, capacity, 2, 8)
    return q, k_cache, v_cache


def test_repeated_decode_signature_still_checks_the_lengths():
    q, k_cache, v_cache = _decode_inputs()
    good = torch.tensor([3, 16], dtype=torch.int32)
    expected = fmkernels.reference.decode_attention(q, k_cache, v_cache, good)
    for _ in range(2):
        torch.testing.assert_close(fmkernels.decode_attention(q, k_cache, v_cache, good, backend="cpu"), expected)
    for lengths, match in (([3, 17], "needs 17 positions, but the cache holds 16"),
                           ([0, 4], r"cache_seqlens\[0\] must count the 1 new tokens"),
                           ([-1, 4], r"cache_seqlens\[0\] must count the 1 new tokens")):
        with pytest.raises(ValueError, match=match):
            fmkernels.decode_attention(q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32), backend="cpu")


def test_repeated_paged_signature_still_checks_the_block_table():
    q = torch.randn(2, 1, 4, 8)
    k_cache, v_cache = torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)
    lengths = torch.tensor([5, 8], dtype=torch.int32)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    fmkernels.decode_attention(q, k_cache, v_cache, lengths, block_table=table, backend="cpu")
    bad = torch.tensor([[0, 1], [2, 6]], dtype=torch.int32)
    with pytest.raises(ValueError, match="block"):
        fmkernels.decode_attention(q, k_cache, v_cache, lengths, block_table=bad, backend="cpu")
    with pytest.raises(ValueError, match="block"):
        fmkernels.append_kv(k_cache, v_cache, torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8),
                            torch.tensor([4, 7], dtype=torch.int32), block_table=bad, backend="cpu")
    # An entry outside the pool past a sequence's length is never read: accepted.
    padded = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    short = torch.tensor([5, 4], dtype=torch.int32)
    expected = fmkernels.reference.decode_attention(q, k_cache, v_cache, short, block_table=padded)
    torch.testing.assert_close(
        fmkernels.decode_attention(q, k_cache, v_cache, short, block_table=padded, backend="cpu"), expected)


def test_repeated_append_signature_still_checks_the_positions():
    _, k_cache, v_cache = _decode_inputs(capacity=8)
    k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    fmkernels.append_kv(k_cache, v_cache, k, v, torch.tensor([0, 5], dtype=torch.int32), backend="cpu")
    before = k_cache.clone()
    with pytest.raises(ValueError, match="cache_seqlens \\+ n_new for sequence 1 needs 9 positions"):
        fmkernels.append_kv(k_cache, v_cache, k, v, torch.tensor([0, 6], dtype=torch.int32), backend="cpu")
    assert torch.equal(k_cache, before)


def test_repeated_sample_signature_still_checks_logits_and_parameter_rows():
    logits = torch.randn(3, 50)
    temperature = torch.tensor([0.5, 1.0, 0.0])
    for _ in range(2):
        fmkernels.sample(logits, temperature=temperature, seed=1, backend="cpu")
    for row, value, match in ((1, float("nan"), "logits must be finite or -inf, got logits\\[1, 7\\] = nan"),
                              (2, float("inf"), "logits must be finite or -inf, got logits\\[2, 7\\] = inf")):
        bad = logits.clone()
        bad[row, 7] = value
        with pytest.raises(ValueError, match=match):
            fmkernels.sample(bad, temperature=temperature, seed=1, backend="cpu")
    empty = logits.clone()
    empty[0] = float("-inf")
    with pytest.raises(ValueError, match="logits\\[0\\] is -inf everywhere"):
        fmkernels.sample(empty, temperature=temperature, seed=1, backend="cpu")
    with pytest.raises(ValueError, match="temperature must be in .*, got temperature\\[1\\] = -1.0"):
        fmkernels.sample(logits, temperature=torch.tensor([0.5, -1.0, 0.0]), seed=1, backend="cpu")
    with pytest.raises(ValueError, match="temperature must not contain NaN"):
        fmkernels.sample(logits, temperature=torch.tensor([0.5, float("nan"), 0.0]), seed=1, backend="cpu")
    # The seed and step are checked at every call, inside or outside a known signature.
    with pytest.raises(ValueError, match="seed \\+ batch - 1 must be < 2\\*\\*63"):
        fmkernels.sample(logits, temperature=temperature, seed=2**63 - 2, backend="cpu")
    with pytest.raises(ValueError, match="step must be in"):
        fmkernels.sample(logits, temperature=temperature, seed=1, step=-1, backend="cpu")
    with pytest.raises(TypeError, match="step must be an int or an integer tensor, got float"):
        fmkernels.sample(logits, temperature=temperature, seed=1, step=1.0, backend="cpu")


def test_row_values_on_many_rows_take_the_same_checks():
    logits = torch.randn(100, 20)
    top_p = torch.full((100,), 0.9)
    fmkernels.sample(logits, top_p=top_p, seed=0, backend="cpu")
    top_p[73] = 0.0
    with pytest.raises(ValueError, match="top_p must be in \\(0.0, 1.0\\], got top_p\\[73\\] = 0.0"):
        fmkernels.sample(logits, top_p=top_p, seed=0, backend="cpu")
    top_p[73] = float("nan")
    with pytest.raises(ValueError, match="top_p must not contain NaN"):
        fmkernels.sample(logits, top_p=top_p, seed=0, backend="cpu")


def test_supports_is_asked_once_per_signature_and_again_after_the_registry_changes():
    asked = []
    fmkernels.register_impl("filter_logits", "mine", lambda logits, **_: logits * 2,
                            lambda **case: asked.append(case["top_k"]))
    logits = torch.randn(2, 10)
    for _ in range(3):
        fmkernels.filter_logits(logits, top_k=3, backend="mine")
    assert asked == [3]
    fmkernels.filter_logits(logits, top_k=4, backend="mine")  # another scalar value: another signature
    assert asked == [3, 4]
    fmkernels.register_impl("filter_logits", "other", lambda **_: None)
    fmkernels.filter_logits(logits, top_k=3, backend="mine")
    assert asked == [3, 4, 3]
    fmkernels.unregister_impl("filter_logits", "mine")
    with pytest.raises(ValueError, match="backend for filter_logits must be 'auto' or one of"):
        fmkernels.filter_logits(logits, top_k=3, backend="mine")


def test_a_refusal_is_remembered_and_repeated():
    fmkernels.register_impl("filter_logits", "picky", lambda **_: None, lambda **_: "never")
    logits = torch.randn(2, 10)
    for _ in range(2):
        with pytest.raises(ValueError, match="backend 'picky' cannot run this filter_logits call: never"):
            fmkernels.filter_logits(logits, backend="picky")


def test_what_is_remembered_keeps_no_tensor_alive():
    """The maps hold signatures, numbers, implementations and messages, never a call's tensors
    (a remembered exception's traceback would hold them)."""
    fmkernels.register_impl("filter_logits", "picky", lambda **_: None, lambda **_: "never")
    logits = torch.randn(2, 10)
    alive = weakref.ref(logits)
    with pytest.raises(ValueError, match="never"):
        fmkernels.filter_logits(logits, backend="picky")
    fmkernels.filter_logits(logits, backend="cpu")
    del logits
    gc.collect()
    assert alive() is None


def test_direct_and_dispatched_calls_agree():
    """A plain eager call skips the dispatcher; under the profiler (or any mode) the same call
    goes through torch.ops.fmkernels, listed by name, with the same result."""
    q, k_cache, v_cache = _decode_inputs()
    lengths = torch.tensor([5, 9], dtype=torch.int32)
    logits = torch.randn(2, 30)
    direct = (fmkernels.decode_attention(q, k_cache, v_cache, lengths, return_lse=True, backend="cpu"),
              fmkernels.sample(logits, temperature=0.7, top_k=5, seed=3, step=2, return_logprobs=True,
                               num_logprobs=2, backend="cpu"))
    with torch.autograd.profiler.profile() as profile:
        dispatched = (fmkernels.decode_attention(q, k_cache, v_cache, lengths, return_lse=True, backend="cpu"),
                      fmkernels.sample(logits, temperature=0.7, top_k=5, seed=3, step=2, return_logprobs=True,
                                       num_logprobs=2, backend="cpu"))
    names = {event.name for event in profile.function_events}
    assert {"fmkernels::decode_attention", "fmkernels::sample"} <= names
    for a, b in zip(direct[0], dispatched[0]):
        assert torch.equal(a, b)
    for a, b in zip(direct[1], dispatched[1]):
        assert torch.equal(a, b)


def test_numbers_name_one_signature_each():
    cache_a, cache_b = SignatureCache(), SignatureCache()
    x = torch.randn(3)
    numbers = {check_once(cache_a, lambda *_: None, (x,)), check_once(cache_b, lambda *_: None, (x,)),
               check_once(cache_a, lambda *_: None, (x.double(),))}
    assert len(numbers) == 3 and None not in numbers
    assert isinstance(next(_signature._NUMBERS), int)
