"""The Triton attention kernel (backend="triton") against the float64 reference.

Tolerance (DESIGN.md): error <= 2 x plain PyTorch's error in the same dtype + 1e-5, for the
output and the log-sum-exp. Outputs are poisoned with NaN before each call; inputs are random
and sizes odd on purpose.

Without a GPU the kernel runs on CPU tensors through the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), with small shapes. On a GPU the same tests run on CUDA tensors, and
the tests marked ``gpu`` add full-size shapes.
"""

import functools

import pytest
import torch

import fmkernels
from _attention_checks import (check_attention, cu_seqlens, dense_shape_id, random_dense, random_packed, randn,
                              run_attention)
from fmkernels import platform, reference, testing
from fmkernels.kernels import attention as triton_attention

pytestmark = pytest.mark.skipif(
    platform.unavailable_reason("triton") is not None, reason=str(platform.unavailable_reason("triton"))
)

DEVICE = "cpu" if platform.triton_interpreting() else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run_triton(q, k, v, **kwargs):
    return run_attention("triton", q, k, v, **kwargs)


_randn = functools.partial(randn, device=DEVICE)
_cu_seqlens = functools.partial(cu_seqlens, device=DEVICE)
_dense = functools.partial(random_dense, device=DEVICE)
_packed = functools.partial(random_packed, device=DEVICE)
_shape_id = dense_shape_id


def _check(q, k, v, **kwargs):
    return check_attention("triton", q, k, v, **kwargs)


# (batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, causal)
DENSE_SHAPES = [
    (1, 1, 1, 1, 1, 64, True),
    (2, 17, 17, 4, 1, 64, True),  # GQA 4
    (1, 113, 113, 8, 1, 128, True),  # GQA 8
    (1, 17, 113, 2, 2, 96, True),  # Sq < Sk: chunked prefill
    (2, 113, 17, 2, 2, 128, True),  # Sq > Sk: the first 96 queries see no key
    (1, 17, 40, 4, 4, 32, False),
    (1, 33, 17, 4, 2, 64, False),
    (1, 1, 113, 8, 1, 128, True),  # one query against many keys
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=_shape_id)
def test_dense_matches_reference(shape, dtype):
    torch.manual_seed(hash(shape) % 2**31)
    q, k, v = _dense(shape, dtype)
    causal = shape[6]
    out, lse = _check(q, k, v, causal=causal)
    Sq, Sk = shape[1], shape[2]
    if causal and Sq > Sk:
        hidden = Sq - Sk  # queries i < Sq - Sk see no key
        assert torch.all(out[:, :hidden] == 0)
        assert torch.all(torch.isneginf(lse[:, :, :hidden]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [256, 40, 8])
def test_other_head_dims(head_dim, dtype):
    """head_dim 256 (the largest), and sizes padded to the next power of two (40 -> 64, 8 -> 16)."""
    torch.manual_seed(head_dim)
    q, k, v = _dense((1, 33, 40, 2, 1, head_dim), dtype)
    _check(q, k, v, causal=True)


def test_head_dim_over_256_is_refused():
    q, k, v = _dense((1, 4, 4, 1, 1, 512), torch.float16)
    with pytest.raises(ValueError, match="head_dim 512"):
        fmkernels.attention(q, k, v, backend="triton")
    assert triton_attention.attention_supports(q=q, k=k, v=v) is not None
    assert triton_attention.attention_supports(q=q[..., :256], k=k[..., :256], v=v[..., :256]) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_and_no_lse(dtype):
    torch.manual_seed(7)
    q, k, v = _dense((2, 40, 50, 4, 2, 64), dtype)
    _check(q, k, v, causal=True, scale=0.3)
    out = fmkernels.attention(q, k, v, causal=False, scale=0.05, backend="triton", out=torch.full_like(q, float("nan")))
    truth = reference.attention(q.double(), k.double(), v.double(), scale=0.05)
    plain = testing.plain_attention(q, k, v, scale=0.05)
    assert testing.max_error(out, truth) <= testing.attention_tolerance(plain, truth)


def test_empty_inputs():
    """No queries: nothing to launch. No keys: every output 0, every log-sum-exp -inf."""
    q, k, v = _dense((2, 0, 5, 2, 1, 64), torch.float16)
    out, lse = _run_triton(q, k, v, causal=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    q, k, v = _dense((2, 3, 0, 2, 1, 64), torch.float16)
    out, lse = _run_triton(q, k, v)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


# Per-sequence (seqlen_q, seqlen_k): empty sequences, queries seeing nothing, lengths either side
# of the interpreter's 16-key and 32-query tiles.
VARLEN = [
    [(17, 17), (0, 0), (1, 113), (113, 40), (32, 33)],
    [(0, 5), (3, 0), (33, 32), (1, 1)],
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("lengths", VARLEN, ids=["mixed", "empty"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 1)], ids=["mha", "gqa8"])
def test_packed_matches_reference(lengths, heads, causal, dtype):
    torch.manual_seed(3)
    q, k, v, cu_q, cu_k = _packed(lengths, heads, 64, dtype)
    out, lse = _check(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert lse.shape == (heads[0], q.shape[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    """q, k, v as slices of a fused qkv projection, and as transposes of (B, H, S, D)."""
    torch.manual_seed(4)
    B, S, Hq, Hkv, D = 2, 40, 8, 2, 64
    qkv = _randn(B, S, Hq + 2 * Hkv, D, dtype=dtype)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv], qkv[:, :, Hq + Hkv :]
    assert not q.is_contiguous()
    _check(q, k, v, causal=True)
    q_t = _randn(B, Hq, S, D, dtype=dtype).transpose(1, 2)
    kv_t = _randn(2, B, Hkv, 70, D, dtype=dtype).transpose(2, 3)
    _check(q_t, kv_t[0], kv_t[1], causal=True)
    packed = qkv.reshape(B * S, Hq + 2 * Hkv, D)
    cu = torch.tensor([0, 23, B * S], dtype=torch.int32, device=DEVICE)
    _check(packed[:, :Hq], packed[:, Hq : Hq + Hkv], packed[:, Hq + Hkv :], causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)


def _cut_from_nan(*shape, dtype):
    """Random values of ``shape`` (..., tokens, heads, head_dim) inside a NaN buffer with
    19 more tokens, one more head and head_dim 128."""
    *lead, tokens, heads, head_dim = shape
    buffer = torch.full((*lead, tokens + 19, heads + 1, 128), float("nan"), dtype=dtype, device=DEVICE)
    inside = buffer[..., :tokens, :heads, :head_dim]
    inside.copy_(_randn(*shape, dtype=dtype))
    return inside


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reads_nothing_past_the_inputs(dtype):
    """Inputs cut from NaN-filled buffers: past the last key, past head_dim, past each head.

    A NaN read anywhere would reach the output (0 x NaN is NaN), so passing shows the
    masked loads stay inside the tensors.
    """
    torch.manual_seed(5)
    B, Sq, Sk, Hq, Hkv, D = 2, 37, 45, 4, 2, 96
    q, k, v = _cut_from_nan(B, Sq, Hq, D, dtype=dtype), _cut_from_nan(B, Sk, Hkv, D, dtype=dtype), _cut_from_nan(B, Sk, Hkv, D, dtype=dtype)
    _check(q, k, v, causal=True)
    _check(q, k, v, causal=False)
    lengths_q, lengths_k = [37, 1, 20], [45, 30, 3]
    q = _cut_from_nan(sum(lengths_q), Hq, D, dtype=dtype)
    k, v = _cut_from_nan(sum(lengths_k), Hkv, D, dtype=dtype), _cut_from_nan(sum(lengths_k), Hkv, D, dtype=dtype)
    for causal in (True, False):
        _check(q, k, v, causal=causal, cu_seqlens_q=_cu_seqlens(lengths_q), cu_seqlens_k=_cu_seqlens(lengths_k))


@pytest.mark.skipif(not platform.triton_interpreting(), reason="the interpreter runs one fixed configuration")
@pytest.mark.parametrize(
    "blocks", sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in triton_attention._GPU_CONFIGS}),
    ids=lambda b: f"m{b[0]}-n{b[1]}",
)
def test_every_gpu_tile_shape(monkeypatch, blocks):
    """Each (BLOCK_M, BLOCK_N) the GPU autotuner may pick gives the same answers (masks, causal skip)."""
    monkeypatch.setattr(triton_attention, "INTERPRETER_CONFIG", {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]})
    torch.manual_seed(6)
    q, k, v = _dense((1, 150, 200, 2, 1, 64), torch.float16)
    _check(q, k, v, causal=True)
    q, k, v = _dense((1, 200, 130, 2, 2, 32), torch.float16)
    _check(q, k, v, causal=True)
    q, k, v, cu_q, cu_k = _packed([(130, 200), (1, 70), (150, 20), (0, 3)], (2, 1), 64, torch.float16)
    _check(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_autotune_prunes_to_fitting_configs():
    """Every (head_dim, dtype) keeps at least one candidate, and none past the budgets."""
    for block_d in (16, 32, 64, 128, 256):
        for dtype in DTYPES:
            q = torch.empty(0, dtype=dtype)
            kept = triton_attention._prune_configs(triton_attention._GPU_CONFIGS, {"Q_ptr": q}, BLOCK_D=block_d)
            assert kept, (block_d, dtype)
            if len(kept) > 1 or (block_d, dtype) != (256, torch.float32):
                for config in kept:
                    shared, per_thread = triton_attention._footprint(config, block_d, q.element_size())
                    assert shared <= triton_attention._SHARED_MEMORY_BUDGET
                    assert per_thread <= triton_attention._ACC_PER_THREAD


# ----------------------------------------------------------------------------
# Full size, on a GPU
# ----------------------------------------------------------------------------

GPU_DENSE_SHAPES = [
    (2, 1000, 1000, 32, 8, 128, True),
    (1, 4096, 4096, 16, 2, 128, True),  # GQA 8
    (1, 4096, 4096, 8, 8, 64, False),
    (2, 113, 4096, 16, 4, 128, True),  # chunked prefill
    (2, 4096, 1000, 8, 1, 64, True),  # the first 3096 queries see no key
    (1, 1, 4096, 32, 8, 128, True),
    (4, 1024, 1024, 16, 4, 96, True),
    (1, 2048, 2048, 8, 2, 256, True),
    (1, 1000, 1000, 8, 8, 32, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_DENSE_SHAPES, ids=_shape_id)
def test_gpu_dense_matches_reference(shape, dtype):
    torch.manual_seed(hash(shape) % 2**31)
    q, k, v = _dense(shape, dtype, device="cuda")
    out, lse = _check(q, k, v, causal=shape[6])
    if shape[6] and shape[1] > shape[2]:
        hidden = shape[1] - shape[2]
        assert torch.all(out[:, :hidden] == 0)
        assert torch.all(torch.isneginf(lse[:, :, :hidden]))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_fp32_meets_fp32_tolerance(head_dim):
    """fp32 inputs use input_precision="ieee": tf32 (10-bit mantissa) would miss this tolerance."""
    torch.manual_seed(head_dim)
    q, k, v = _dense((2, 1000, 1000, 8, 2, head_dim), torch.float32, device="cuda")
    _check(q, k, v, causal=True)
    q, k, v = _dense((1, 113, 2048, 4, 4, head_dim), torch.float32, device="cuda")
    _check(q, k, v, causal=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gpu_packed_matches_reference(causal, dtype):
    torch.manual_seed(8)
    lengths = [(1000, 1000), (1, 4096), (0, 0), (4096, 2000), (17, 113), (3000, 17)]
    q, k, v, cu_q, cu_k = _packed(lengths, (32, 4), 128, dtype, device="cuda")
    out, lse = _check(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert lse.shape == (32, q.shape[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_non_contiguous_inputs(dtype):
    torch.manual_seed(9)
    B, S, Hq, Hkv, D = 2, 2048, 32, 8, 128
    qkv = _randn(B, S, Hq + 2 * Hkv, D, dtype=dtype, device="cuda")
    _check(qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv], qkv[:, :, Hq + Hkv :], causal=True)
    q_t = _randn(B, Hq, S, D, dtype=dtype, device="cuda").transpose(1, 2)
    kv_t = _randn(2, B, Hkv, 3000, D, dtype=dtype, device="cuda").transpose(2, 3)
    _check(q_t, kv_t[0], kv_t[1], causal=True)


@pytest.mark.gpu
def test_gpu_second_call_reuses_the_tuned_config():
    """The autotuner keys on (head_dim, causal, varlen, seqlen buckets, dtypes): same bucket, no new tuning."""
    torch.manual_seed(10)
    q, k, v = _dense((1, 1000, 1000, 8, 2, 128), torch.bfloat16, device="cuda")
    fmkernels.attention(q, k, v, causal=True, backend="triton")
    tuned = len(triton_attention._attention_kernel_autotuned.cache)
    q, k, v = _dense((1, 900, 900, 8, 2, 128), torch.bfloat16, device="cuda")
    _check(q, k, v, causal=True)
    assert len(triton_attention._attention_kernel_autotuned.cache) == tuned
