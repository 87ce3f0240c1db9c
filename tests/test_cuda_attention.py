"""The CUDA attention kernel (backend="cuda") against the float64 reference.

Tolerance (DESIGN.md): error <= 2 x plain PyTorch's error in the same dtype + 1e-5, for the
output and the log-sum-exp. Outputs are poisoned with NaN before each call; inputs are random
and sizes odd on purpose: seqlens either side of the kernel's 128-query and 64-key tiles.

The kernel tests need a GPU and the built fmkernels._cuda (marked ``gpu``); the tests of
``attention_supports``, of the variant choice and of the adapter's alignment copies run
anywhere. The correctness tests run every kernel schedule (``_cuda.ATTENTION_VARIANTS``,
picked through FMKERNELS_CUDA_ATTENTION_VARIANT).
"""

import functools

import pytest
import torch

import fmkernels
from _attention_checks import (check_attention, cu_seqlens, dense_shape_id, random_dense, random_packed, randn,
                              run_attention)
from fmkernels import platform, registry
from fmkernels.ops import _cuda

CUDA_REASON = platform.unavailable_reason("cuda")
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda backend: {CUDA_REASON}")

DTYPES = [torch.float16, torch.bfloat16]
VARIANTS = list(_cuda.ATTENTION_VARIANTS)


@pytest.fixture(params=VARIANTS, ids=lambda n: f"variant{n}")
def variant(request, monkeypatch):
    """Runs the test with the kernel schedule ``request.param``."""
    monkeypatch.setenv(_cuda.ATTENTION_VARIANT_ENV, str(request.param))
    return request.param


_randn = functools.partial(randn, device="cuda")
_cu_seqlens = functools.partial(cu_seqlens, device="cuda")
_dense = functools.partial(random_dense, device="cuda")
_packed = functools.partial(random_packed, device="cuda")
_shape_id = dense_shape_id


def _check(q, k, v, **kwargs):
    return check_attention("cuda", q, k, v, **kwargs)


# ----------------------------------------------------------------------------
# attention_supports and the adapter's copies: no GPU needed
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head_dim, dtype",
    [(64, torch.float16), (128, torch.bfloat16), (64, torch.bfloat16), (128, torch.float16)],
)
def test_supports_head_dims_64_and_128_in_half_types(head_dim, dtype):
    q = torch.empty(1, 17, 4, head_dim, dtype=dtype)
    k = v = torch.empty(1, 17, 1, head_dim, dtype=dtype)
    assert _cuda.attention_supports(q=q, k=k, v=v, causal=True) is None


@pytest.mark.parametrize(
    "head_dim, dtype, reason",
    [
        (96, torch.float16, "got head_dim 96 float16"),
        (64, torch.float32, "got head_dim 64 float32"),
        (32, torch.bfloat16, "got head_dim 32 bfloat16"),
        (256, torch.float32, "got head_dim 256 float32"),
    ],
)
def test_supports_names_the_unsupported_head_dim_or_dtype(head_dim, dtype, reason):
    q = k = v = torch.empty(1, 3, 2, head_dim, dtype=dtype)
    verdict = _cuda.attention_supports(q=q, k=k, v=v)
    assert verdict.startswith("cuda attention runs head_dim 64 or 128 in float16/bfloat16")
    assert verdict.endswith(reason)


def test_supports_refuses_grids_past_cuda_limits():
    q = k = v = torch.empty(0, 2, 64, dtype=torch.float16)
    too_many_sequences = torch.zeros(65537, dtype=torch.int32)
    assert "batch 65536" in _cuda.attention_supports(q=q, k=k, v=v, cu_seqlens_q=too_many_sequences)
    assert _cuda.attention_supports(q=q, k=k, v=v, cu_seqlens_q=too_many_sequences[:65536]) is None
    rows = 65535 * 128 + 1
    long_q = torch.empty(1, 1, 64, dtype=torch.float16).expand(rows, 1, 64)
    assert f"got {rows}" in _cuda.attention_supports(q=long_q, k=k, v=v, cu_seqlens_q=too_many_sequences[:2])


def test_supports_refuses_key_rows_past_32_bits():
    q = torch.empty(1, 1, 64, dtype=torch.float16).expand(2, 1, 64)
    cu_seqlens = torch.tensor([0, 1, 2], dtype=torch.int32)
    keys = _cuda.ATTENTION_MAX_KEYS
    k = torch.empty(1, 1, 64, dtype=torch.float16).expand(keys, 1, 64)
    assert _cuda.attention_supports(q=q, k=k, v=k, cu_seqlens_q=cu_seqlens) is None
    k = torch.empty(1, 1, 64, dtype=torch.float16).expand(keys + 1, 1, 64)
    assert f"got {keys + 1}" in _cuda.attention_supports(q=q, k=k, v=k, cu_seqlens_q=cu_seqlens)
    many_heads = torch.empty(1, 1, 64, dtype=torch.float16).expand(2, 2**31, 64)
    assert "heads" in _cuda.attention_supports(q=many_heads, k=q, v=q, cu_seqlens_q=cu_seqlens)


def test_aligned_rows_keeps_aligned_views_and_copies_the_rest():
    B, S, Hq, Hkv, D = 2, 5, 4, 2, 64
    qkv = torch.randn(B, S, Hq + 2 * Hkv, D).half()
    k = qkv[:, :, Hq : Hq + Hkv]  # head offset Hq * D elements: 16-byte aligned, no copy
    assert _cuda._aligned_rows(k) is k
    shifted = torch.randn(B * S * Hq * D + 1).half()[1:].view(B, S, Hq, D)  # data pointer off by 2 bytes
    copy = _cuda._aligned_rows(shifted)
    assert copy.data_ptr() % 16 == 0 and copy.is_contiguous() and torch.equal(copy, shifted)
    odd_rows = torch.randn(B, S, Hq, D + 4).half()[..., :D]  # row stride of 68 elements
    assert _cuda._aligned_rows(odd_rows).stride() == (S * Hq * D, Hq * D, D, 1)
    transposed = torch.randn(B, S, D, Hq).half().transpose(-1, -2)  # head_dim not unit stride
    assert _cuda._aligned_rows(transposed).stride(-1) == 1
    one_row = torch.randn(1, 1, Hq, D + 1).half()[..., 1:]  # data pointer off by 2 bytes
    assert _cuda._aligned_rows(one_row).data_ptr() % 16 == 0


def test_variant_defaults_and_follows_the_environment(monkeypatch):
    monkeypatch.delenv(_cuda.ATTENTION_VARIANT_ENV, raising=False)
    assert _cuda.attention_variant() == _cuda.ATTENTION_DEFAULT_VARIANT in _cuda.ATTENTION_VARIANTS
    for number in _cuda.ATTENTION_VARIANTS:
        monkeypatch.setenv(_cuda.ATTENTION_VARIANT_ENV, f" {number} ")
        assert _cuda.attention_variant() == number
    monkeypatch.setenv(_cuda.ATTENTION_VARIANT_ENV, "")
    assert _cuda.attention_variant() == _cuda.ATTENTION_DEFAULT_VARIANT


@pytest.mark.parametrize("text", ["5", "-1", "two", "1.0"])
def test_unknown_variant_is_refused(monkeypatch, text):
    monkeypatch.setenv(_cuda.ATTENTION_VARIANT_ENV, text)
    with pytest.raises(ValueError, match=f"FMKERNELS_CUDA_ATTENTION_VARIANT must be one of 0, 1, 2, 3, 4; got '{text}'"):
        _cuda.attention_variant()


# ----------------------------------------------------------------------------
# The kernel, on a GPU
# ----------------------------------------------------------------------------

# (batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, causal)
DENSE_SHAPES = [
    (1, 1, 1, 1, 1, 64, True),
    (2, 17, 17, 4, 1, 64, True),  # GQA 4
    (1, 113, 113, 8, 1, 128, True),  # GQA 8
    (1, 17, 113, 2, 2, 128, True),  # Sq < Sk: chunked prefill
    (2, 113, 17, 2, 2, 64, True),  # Sq > Sk: the first 96 queries see no key
    (1, 1, 1000, 8, 1, 128, True),  # one query against many keys
    (1, 1000, 1000, 4, 4, 128, False),
    (2, 1000, 1000, 8, 2, 64, True),
    (1, 1000, 17, 4, 4, 128, True),
    (1, 17, 1000, 4, 1, 64, False),
    (1, 2048, 2048, 16, 2, 128, True),  # GQA 8
    (1, 2048, 2048, 8, 8, 64, False),
    (1, 129, 200, 4, 4, 128, False),  # one row into a second query tile
    (1, 300, 128, 2, 1, 64, True),  # whole key tiles, Sq > Sk
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=_shape_id)
def test_dense_matches_reference(shape, dtype, variant):
    torch.manual_seed(hash(shape) % 2**31)
    q, k, v = _dense(shape, dtype)
    causal = shape[6]
    out, lse = _check(q, k, v, causal=causal)
    Sq, Sk = shape[1], shape[2]
    if causal and Sq > Sk:
        hidden = Sq - Sk  # queries i < Sq - Sk see no key
        assert torch.all(out[:, :hidden] == 0)
        assert torch.all(torch.isneginf(lse[:, :, :hidden]))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [0.3, 0.02, -0.2])
def test_scale(scale, dtype, variant):
    """Any finite scale, a negative one included (the running max is taken after scaling)."""
    torch.manual_seed(7)
    q, k, v = _dense((2, 140, 150, 4, 2, 64), dtype)
    _check(q, k, v, causal=True, scale=scale)
    _check(q, k, v, causal=False, scale=scale)


@pytest.mark.gpu
@needs_cuda
def test_without_lse_and_into_out():
    torch.manual_seed(11)
    q, k, v = _dense((2, 200, 200, 4, 1, 128), torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    result = fmkernels.attention(q, k, v, causal=True, backend="cuda", out=out)
    assert result.data_ptr() == out.data_ptr()
    expected, _ = _check(q, k, v, causal=True)
    assert torch.equal(out, expected)


@pytest.mark.gpu
@needs_cuda
def test_empty_inputs(variant):
    """No queries: nothing to launch. No keys: every output 0, every log-sum-exp -inf."""
    q, k, v = _dense((2, 0, 5, 2, 1, 64), torch.float16)
    out, lse = run_attention("cuda", q, k, v, causal=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    q, k, v = _dense((2, 3, 0, 2, 1, 64), torch.float16)
    out, lse = run_attention("cuda", q, k, v)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


# Per-sequence (seqlen_q, seqlen_k): empty sequences, queries seeing nothing, tile edges.
VARLEN = {
    "mixed": [(17, 17), (0, 0), (1, 113), (113, 40), (1000, 1000), (128, 64), (129, 65)],
    "empty": [(0, 5), (3, 0), (0, 0), (1, 1)],
    "long": [(2048, 2048), (1, 2048), (700, 17), (17, 700)],
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("lengths", VARLEN.values(), ids=VARLEN.keys())
@pytest.mark.parametrize("heads, head_dim", [((4, 4), 64), ((8, 1), 128), ((16, 4), 128)], ids=["mha-d64", "gqa8-d128", "gqa4-d128"])
def test_packed_matches_reference(lengths, heads, head_dim, causal, dtype, variant):
    torch.manual_seed(3)
    q, k, v, cu_q, cu_k = _packed(lengths, heads, head_dim, dtype)
    out, lse = _check(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert lse.shape == (heads[0], q.shape[0])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_non_contiguous_inputs(head_dim, dtype, variant):
    """q, k, v as slices of a fused qkv projection, as transposes of (B, H, S, D), and packed slices."""
    torch.manual_seed(4)
    B, S, Hq, Hkv = 2, 300, 8, 2
    qkv = _randn(B, S, Hq + 2 * Hkv, head_dim, dtype=dtype)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv], qkv[:, :, Hq + Hkv :]
    assert not q.is_contiguous()
    _check(q, k, v, causal=True)
    q_t = _randn(B, Hq, S, head_dim, dtype=dtype).transpose(1, 2)
    kv_t = _randn(2, B, Hkv, 170, head_dim, dtype=dtype).transpose(2, 3)
    _check(q_t, kv_t[0], kv_t[1], causal=True)
    _check(q_t, kv_t[0], kv_t[1], causal=False)
    packed = qkv.reshape(B * S, Hq + 2 * Hkv, head_dim)
    cu = torch.tensor([0, 230, B * S], dtype=torch.int32, device="cuda")
    _check(packed[:, :Hq], packed[:, Hq : Hq + Hkv], packed[:, Hq + Hkv :], causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)


@pytest.mark.gpu
@needs_cuda
def test_misaligned_inputs_are_copied():
    """A data pointer 2 bytes off 16 and an odd row stride: the adapter copies, the answer holds."""
    torch.manual_seed(12)
    B, Sq, Sk, Hq, Hkv, D = 1, 150, 90, 4, 2, 64
    q = _randn(B * Sq * Hq * D + 1, dtype=torch.float16)[1:].view(B, Sq, Hq, D)
    k = _randn(B, Sk, Hkv, D + 4, dtype=torch.float16)[..., :D]
    v = _randn(B, Sk, Hkv, D, dtype=torch.float16)
    assert q.data_ptr() % 16 != 0 and k.stride(2) % 8 != 0
    _check(q, k, v, causal=True)


def _cut_from_nan(*shape, dtype):
    """Random values of ``shape`` (..., tokens, heads, head_dim) inside a NaN buffer with
    70 more tokens, one more head and head_dim 256."""
    *lead, tokens, heads, head_dim = shape
    buffer = torch.full((*lead, tokens + 70, heads + 1, 256), float("nan"), dtype=dtype, device="cuda")
    inside = buffer[..., :tokens, :heads, :head_dim]
    inside.copy_(_randn(*shape, dtype=dtype))
    return inside


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_reads_nothing_past_the_inputs(head_dim, variant):
    """Inputs cut from NaN-filled buffers: past the last query and key, past head_dim, past each head.

    A NaN read anywhere would reach the output (0 x NaN is NaN), so passing shows the
    zero-filled tile loads stay inside the tensors.
    """
    torch.manual_seed(5)
    dtype = torch.bfloat16
    B, Sq, Sk, Hq, Hkv = 2, 37, 45, 4, 2
    q = _cut_from_nan(B, Sq, Hq, head_dim, dtype=dtype)
    k, v = _cut_from_nan(B, Sk, Hkv, head_dim, dtype=dtype), _cut_from_nan(B, Sk, Hkv, head_dim, dtype=dtype)
    _check(q, k, v, causal=True)
    _check(q, k, v, causal=False)
    lengths_q, lengths_k = [37, 1, 20, 0], [45, 30, 3, 2]
    q = _cut_from_nan(sum(lengths_q), Hq, head_dim, dtype=dtype)
    k = _cut_from_nan(sum(lengths_k), Hkv, head_dim, dtype=dtype)
    v = _cut_from_nan(sum(lengths_k), Hkv, head_dim, dtype=dtype)
    for causal in (True, False):
        _check(q, k, v, causal=causal, cu_seqlens_q=_cu_seqlens(lengths_q), cu_seqlens_k=_cu_seqlens(lengths_k))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_larger_batch(dtype, variant):
    torch.manual_seed(13)
    q, k, v = _dense((24, 257, 257, 8, 2, 128), dtype)
    _check(q, k, v, causal=True)
    q, k, v = _dense((33, 64, 100, 4, 4, 64), dtype)
    _check(q, k, v, causal=False)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant_number", VARIANTS)
def test_bad_cu_seqlens_stay_in_bounds(variant_number):
    """Called directly, the binding clamps a cu_seqlens table past the tensors into them."""
    torch.manual_seed(14)
    q, k, v = _randn(10, 2, 64, dtype=torch.float16), _randn(7, 1, 64, dtype=torch.float16), _randn(7, 1, 64, dtype=torch.float16)
    out = torch.zeros_like(q)
    lse = torch.zeros(2, 10, device="cuda")
    cu_q = torch.tensor([0, 4, 5000, -3], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([-9, 3, 9000, 2], dtype=torch.int32, device="cuda")
    views = [_cuda.tensor_view(t) for t in (q, k, v, out, lse, cu_q, cu_k)]
    _cuda._module().attention(*views, True, 0.125, 5000, variant_number, _cuda.stream_of(q))
    torch.cuda.synchronize()
    # Sequence 0 is q[0:4] against k[0:3]: the first query sees no key.
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[:, 0]))
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@needs_cuda
def test_binding_refuses_what_the_kernel_cannot_run():
    q = _randn(1, 4, 2, 96, dtype=torch.float16)
    views = [_cuda.tensor_view(t) for t in (q, q, q, torch.empty_like(q))]
    with pytest.raises(ValueError, match="head_dim 64 or 128"):
        _cuda._module().attention(*views, None, None, None, False, 0.1, 0, 0, _cuda.stream_of(q))
    q = _randn(1, 4, 2, 64, dtype=torch.float16)
    views = [_cuda.tensor_view(t) for t in (q, q, q, torch.empty_like(q))]
    assert _cuda._module().ATTENTION_VARIANTS == len(VARIANTS)
    for unknown in (-1, len(VARIANTS)):
        with pytest.raises(ValueError, match=f"variant must be in \\[0, {len(VARIANTS)}\\); got {unknown}"):
            _cuda._module().attention(*views, None, None, None, False, 0.1, 0, unknown, _cuda.stream_of(q))


@pytest.mark.gpu
@needs_cuda
def test_auto_prefers_triton_then_cuda_and_named_cuda_refuses_with_the_reason():
    q, k, v = _dense((1, 17, 17, 4, 2, 128), torch.bfloat16)
    case = dict(q=q, k=k, v=v, causal=True, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False)
    # On an H100 the Triton kernel (wgmma through Triton) outruns this mma.sync kernel: auto takes it first.
    expected = "cuda" if platform.unavailable_reason("triton") else "triton"
    assert registry.select("attention", "auto", case).name == expected
    q, k, v = _dense((1, 17, 17, 4, 2, 96), torch.bfloat16)
    case.update(q=q, k=k, v=v)
    assert registry.select("attention", "auto", case).name != "cuda"
    with pytest.raises(ValueError, match="head_dim 96 bfloat16"):
        fmkernels.attention(q, k, v, backend="cuda")
    q, k, v = _dense((1, 17, 17, 4, 2, 64), torch.float32)
    with pytest.raises(ValueError, match="head_dim 64 float32"):
        fmkernels.attention(q, k, v, backend="cuda")
