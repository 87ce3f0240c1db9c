"""The C++ CPU attention kernel (backend="cpu") against the float64 reference.

Tolerance (DESIGN.md): error <= 2 x plain PyTorch's error in the same dtype + 1e-5, for the
output and the log-sum-exp. Outputs are poisoned with NaN before each call; inputs are random
and sizes odd on purpose.
"""

import pytest
import torch

import fmkernels
from _attention_checks import check_attention, run_attention
from fmkernels import platform, reference
from fmkernels._views import tensor_view

pytestmark = pytest.mark.skipif(
    platform.unavailable_reason("cpu") is not None, reason=str(platform.unavailable_reason("cpu"))
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _run_cpu(q, k, v, **kwargs):
    return run_attention("cpu", q, k, v, **kwargs)


def _check(q, k, v, **kwargs):
    return check_attention("cpu", q, k, v, **kwargs)


# (batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, causal)
DENSE_SHAPES = [
    (1, 1, 1, 1, 1, 64, True),
    (2, 17, 17, 4, 1, 64, True),  # GQA 4
    (1, 113, 113, 8, 1, 128, True),  # GQA 8
    (3, 17, 113, 2, 2, 96, True),  # Sq < Sk: chunked prefill
    (2, 113, 17, 4, 4, 128, True),  # Sq > Sk: the first 96 queries see no key
    (1, 113, 17, 8, 2, 24, False),
    (2, 5, 70, 3, 3, 256, False),
    (1, 33, 65, 16, 2, 7, True),
    (1, 1, 113, 8, 1, 128, True),  # one query against many keys
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "b{}-q{}-k{}-h{}/{}-d{}-{}".format(
    *s[:6], "causal" if s[6] else "full"))
def test_dense_matches_reference(shape, dtype):
    B, Sq, Sk, Hq, Hkv, D, causal = shape
    torch.manual_seed(hash(shape) % 2**31)
    q, k, v = _randn(B, Sq, Hq, D, dtype=dtype), _randn(B, Sk, Hkv, D, dtype=dtype), _randn(B, Sk, Hkv, D, dtype=dtype)
    out, lse = _check(q, k, v, causal=causal)
    if causal and Sq > Sk:
        hidden = Sq - Sk  # queries i < Sq - Sk see no key
        assert torch.all(out[:, :hidden] == 0)
        assert torch.all(torch.isneginf(lse[:, :, :hidden]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_causal_prefill(dtype):
    torch.manual_seed(1)
    q, k, v = _randn(1, 1000, 8, 128, dtype=dtype), _randn(1, 1000, 2, 128, dtype=dtype), _randn(1, 1000, 2, 128, dtype=dtype)
    _check(q, k, v, causal=True)


def test_long_keys_full_attention():
    torch.manual_seed(2)
    q, k, v = _randn(1, 17, 4, 64), _randn(1, 1000, 4, 64), _randn(1, 1000, 4, 64)
    _check(q, k, v, causal=False, scale=0.3)


# Per-sequence (seqlen_q, seqlen_k): empty sequences, queries seeing nothing, lengths either side
# of the 64-key tile.
VARLEN = [
    [(17, 17), (0, 0), (1, 113), (113, 40), (64, 65)],
    [(0, 5), (3, 0), (65, 64), (1, 1)],
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("lengths", VARLEN, ids=["mixed", "empty"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 1)], ids=["mha", "gqa8"])
def test_packed_matches_reference(lengths, heads, causal, dtype):
    torch.manual_seed(3)
    Hq, Hkv = heads
    cu_q = torch.tensor([0] + [sum(s for s, _ in lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(s for _, s in lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    q = _randn(int(cu_q[-1]), Hq, 96, dtype=dtype)
    k, v = _randn(int(cu_k[-1]), Hkv, 96, dtype=dtype), _randn(int(cu_k[-1]), Hkv, 96, dtype=dtype)
    out, lse = _check(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert lse.shape == (Hq, q.shape[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    """q, k, v as slices of a fused qkv projection, and as transposes of (B, H, S, D)."""
    torch.manual_seed(4)
    B, S, Hq, Hkv, D = 2, 113, 8, 2, 64
    qkv = _randn(B, S, Hq + 2 * Hkv, D, dtype=dtype)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv], qkv[:, :, Hq + Hkv :]
    assert not q.is_contiguous()
    _check(q, k, v, causal=True)
    q_t = _randn(B, Hq, S, D, dtype=dtype).transpose(1, 2)
    kv_t = _randn(2, B, Hkv, 70, D, dtype=dtype).transpose(2, 3)
    _check(q_t, kv_t[0], kv_t[1], causal=True)
    packed = qkv.reshape(B * S, Hq + 2 * Hkv, D)
    cu = torch.tensor([0, 50, B * S], dtype=torch.int32)
    _check(packed[:, :Hq], packed[:, Hq : Hq + Hkv], packed[:, Hq + Hkv :], causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_count_does_not_change_results(dtype):
    torch.manual_seed(5)
    q, k, v = _randn(2, 150, 8, 128, dtype=dtype), _randn(2, 150, 2, 128, dtype=dtype), _randn(2, 150, 2, 128, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_cpu(q, k, v, causal=True)
        torch.set_num_threads(2)
        two = _run_cpu(q, k, v, causal=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("isa", ["avx2", "generic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_narrower_instruction_sets(monkeypatch, isa, dtype):
    """The AVX2 and baseline x86-64 variants the dispatcher picks on older CPUs."""
    monkeypatch.setenv("FMKERNELS_CPU_ISA", isa)
    torch.manual_seed(6)
    q, k, v = _randn(2, 70, 6, 40, dtype=dtype), _randn(2, 90, 3, 40, dtype=dtype), _randn(2, 90, 3, 40, dtype=dtype)
    _check(q, k, v, causal=True)
    cu = torch.tensor([0, 0, 17, 140], dtype=torch.int32)
    q, k, v = _randn(140, 8, 24, dtype=dtype), _randn(140, 1, 24, dtype=dtype), _randn(140, 1, 24, dtype=dtype)
    _check(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)


@pytest.mark.parametrize("shapes", [
    ((0, 5, 4, 64), (0, 5, 2, 64)),  # no sequences
    ((2, 0, 4, 64), (2, 5, 2, 64)),  # no queries
    ((2, 3, 0, 64), (2, 5, 2, 64)),  # no query heads
    ((2, 3, 4, 64), (2, 0, 2, 64)),  # no keys: zeros, lse -inf
], ids=["batch0", "seqlen_q0", "heads0", "seqlen_k0"])
def test_empty_inputs(shapes):
    q, k, v = torch.randn(shapes[0]), torch.randn(shapes[1]), torch.randn(shapes[1])
    out, lse = _run_cpu(q, k, v, causal=True)
    truth, truth_lse = reference.attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out, truth) and torch.equal(lse, truth_lse)


def test_head_dim_above_256_is_rejected_by_cpu_and_auto_falls_back():
    q, k = torch.randn(1, 3, 2, 257), torch.randn(1, 5, 2, 257)
    with pytest.raises(ValueError, match="backend 'cpu' cannot run this attention call: head_dim 257 > 256"):
        fmkernels.attention(q, k, k, backend="cpu")
    torch.testing.assert_close(fmkernels.attention(q, k, k), reference.attention(q, k, k))


def _call_kernel(q, k, v, out, lse=None, cu_q=None, cu_k=None):
    platform.cpu_module().attention(
        tensor_view(q), tensor_view(k), tensor_view(v), tensor_view(out), tensor_view(lse),
        tensor_view(cu_q), tensor_view(cu_k), True, 0.125, 2,
    )


def test_kernel_checks_its_inputs():
    """The kernel's own checks, below the public op's validation: nothing is written on a bad call."""
    q, k = torch.randn(6, 4, 64), torch.randn(6, 2, 64)
    out = torch.full_like(q, float("nan"))
    bad_bounds = [[0, 7], [0, 4, 2], [-1, 6]]
    for bounds in bad_bounds:
        cu = torch.tensor(bounds, dtype=torch.int32)
        with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing and within q's tokens"):
            _call_kernel(q, k, k, out, cu_q=cu, cu_k=torch.tensor([0] * (len(bounds) - 1) + [6], dtype=torch.int32))
        with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing and within k's tokens"):
            _call_kernel(q, k, k, out, cu_q=torch.tensor([0] * (len(bounds) - 1) + [6], dtype=torch.int32), cu_k=cu)
    assert torch.isnan(out).all()
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="both cu_seqlens_q and cu_seqlens_k"):
        _call_kernel(q, k, k, out, cu_q=cu)
    with pytest.raises(ValueError, match="head_dim must be between 1 and 256"):
        _call_kernel(torch.randn(6, 4, 257), torch.randn(6, 2, 257), torch.randn(6, 2, 257), torch.randn(6, 4, 257), cu_q=cu, cu_k=cu)
    with pytest.raises(ValueError, match="share one dtype"):
        _call_kernel(q, k.half(), k.half(), out, cu_q=cu, cu_k=cu)
    with pytest.raises(ValueError, match="q_heads must be a multiple of kv_heads"):
        _call_kernel(q, torch.randn(6, 3, 64), torch.randn(6, 3, 64), out, cu_q=cu, cu_k=cu)
    with pytest.raises(ValueError, match=r"lse must have shape \(q_heads, total_q\)"):
        _call_kernel(q, k, k, out, lse=torch.empty(6, 4), cu_q=cu, cu_k=cu)
    with pytest.raises(ValueError, match="unit stride along head_dim"):
        _call_kernel(q, k, k, torch.empty(6, 64, 4).transpose(1, 2), cu_q=cu, cu_k=cu)
    with pytest.raises(ValueError, match="out must have q's shape"):
        _call_kernel(q, k, k, torch.empty(6, 4, 63), cu_q=cu, cu_k=cu)
    assert torch.isnan(out).all()
