"""The CUDA decode_attention kernels against the float64 reference.

Tolerance (DESIGN.md): error to the float64 reference <= 2 x plain PyTorch's error in the
same dtype + 1e-5, for the output and the log-sum-exp. Caches hold NaN in every slot past
each sequence's length and paged tables hold junk block ids past each sequence's blocks,
so a kernel that reads one fails; every buffer the adapter allocates (output, LSE, split
scratch) and the caller's ``out`` start as NaN, so an unwritten element fails.

The split heuristic is a pure function, tested without a GPU.
"""

import math

import pytest
import torch

import fmkernels
from _decode_attention_checks import (  # noqa: F401 (poisoned_allocations is a fixture)
    assert_matches_reference,
    assert_splits_agree,
    make_case,
    poisoned_allocations,
)
from fmkernels import platform, testing
from fmkernels._views import tensor_view
from fmkernels.ops import _cuda

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
VARIANTS = list(_cuda.DECODE_VARIANTS)


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    """Each split kernel in turn, chosen through the adapter's environment switch."""
    monkeypatch.setenv("FMKERNELS_CUDA_DECODE_VARIANT", request.param)
    return _cuda.DECODE_VARIANTS[request.param]

requires_cuda = pytest.mark.skipif(
    platform.unavailable_reason("cuda") is not None, reason=str(platform.unavailable_reason("cuda"))
)


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def run_cuda(case, num_splits=None):
    """Through the public op into a NaN-poisoned ``out``, or the adapter with a forced split count."""
    if num_splits is not None:
        return _cuda.decode_attention(**case, return_lse=True, num_splits=num_splits)
    out = torch.full_like(case["q"], math.nan)
    result, lse = fmkernels.decode_attention(**case, return_lse=True, backend="cuda", out=out)
    assert result.data_ptr() == out.data_ptr()
    return out, lse


# ---------------------------------------------------------------------------
# Without a GPU: the split heuristic and the supports reasons
# ---------------------------------------------------------------------------


def test_one_long_sequence_is_split_to_fill_the_gpu():
    # batch 1 x 8 KV heads x 32k positions on 132 SMs: one CTA per 256 positions or so.
    splits = _cuda.decode_num_splits(8, 32768, 132)
    assert splits * 8 >= 4 * 132
    assert 32768 / splits >= _cuda.DECODE_MIN_SPLIT_POSITIONS


def test_a_full_batch_is_split_little_or_not_at_all():
    assert _cuda.decode_num_splits(64 * 8, 1024, 132) <= 4
    assert _cuda.decode_num_splits(64 * 8, 2048, 132) <= 4
    assert _cuda.decode_num_splits(100_000, 32768, 132) == 1


def test_short_sequences_are_not_split():
    assert _cuda.decode_num_splits(1, _cuda.DECODE_MIN_SPLIT_POSITIONS, 132) == 1
    assert _cuda.decode_num_splits(1, 3 * _cuda.DECODE_MIN_SPLIT_POSITIONS, 132) == 3
    assert _cuda.decode_num_splits(8, 1, 132) == 1


def test_splits_stay_within_the_kernel_limit():
    assert _cuda.decode_num_splits(1, 10**9, 10_000) == _cuda.DECODE_MAX_SPLITS
    assert _cuda.decode_num_splits(0, 10**9, 132) == _cuda.DECODE_MAX_SPLITS


def test_splits_grow_with_the_gpu_and_shrink_with_the_work():
    counts = [_cuda.decode_num_splits(units, 1 << 20, 132) for units in (1, 8, 64, 512, 4096)]
    assert counts == sorted(counts, reverse=True)
    assert _cuda.decode_num_splits(8, 1 << 20, 66) <= _cuda.decode_num_splits(8, 1 << 20, 132)


def test_rows_per_cta():
    assert [_cuda.decode_rows_per_cta(rows) for rows in (1, 4, 5, 8, 24)] == [4, 4, 8, 8, 8]


def test_variant_switch(monkeypatch):
    monkeypatch.delenv("FMKERNELS_CUDA_DECODE_VARIANT", raising=False)
    assert _cuda.decode_variant() == _cuda.DECODE_VARIANTS[_cuda.DECODE_DEFAULT_VARIANT]
    for name, number in _cuda.DECODE_VARIANTS.items():
        monkeypatch.setenv("FMKERNELS_CUDA_DECODE_VARIANT", name)
        assert _cuda.decode_variant() == number
        monkeypatch.setenv("FMKERNELS_CUDA_DECODE_VARIANT", str(number))
        assert _cuda.decode_variant() == number
    monkeypatch.setenv("FMKERNELS_CUDA_DECODE_VARIANT", "fastest")
    assert _cuda.decode_variant() not in _cuda.DECODE_VARIANTS.values()


def test_supports_names_what_it_cannot_do():
    assert _cuda.decode_attention_supports(**make_case((5,), 1, 2, 1, 128, torch.bfloat16)) is None
    assert _cuda.decode_attention_supports(**make_case((5,), 1, 2, 1, 36, torch.float32)) is None
    reason = _cuda.decode_attention_supports(**make_case((5,), 1, 2, 1, 320, torch.float16))
    assert reason is not None and "head_dim" in reason
    reason = _cuda.decode_attention_supports(**make_case((5,), 1, 2, 1, 36, torch.bfloat16))
    assert reason is not None and "multiple of 8" in reason
    case = make_case((5,), 1, 2, 1, 64, torch.float16)
    for name in ("k_cache", "v_cache"):
        wide = torch.zeros(case[name].shape[:3] + (80,), dtype=torch.float16)
        case[name] = wide[..., 4:68]  # rows start 8 bytes into a 16-byte vector
    reason = _cuda.decode_attention_supports(**case)
    assert reason is not None and "aligned" in reason


def _expanded(shape):
    """A float16 tensor of ``shape`` that takes one row of memory (unit stride along the last
    dimension, stride 0 along the others)."""
    return torch.zeros(shape[-1], dtype=torch.float16).expand(shape)


def test_supports_refuses_what_the_kernels_count_in_32_bits():
    """Sizes whose counts the kernels keep in int (positions, query rows, CTAs) are refused with
    the limit, before the launch, so ``auto`` passes them on; the largest allowed pass."""
    q, cache = _expanded((1, 1, 8, 64)), _expanded((1, 2**30 - 1, 8, 64))
    assert _cuda.decode_attention_supports(q=q, k_cache=cache, v_cache=cache) is None
    cache = _expanded((1, 2**30, 8, 64))
    assert "got 1073741824" in _cuda.decode_attention_supports(q=q, k_cache=cache, v_cache=cache)
    pool, table = _expanded((4, 16, 8, 64)), torch.zeros(1, 1, dtype=torch.int32).expand(1, 2**26)
    assert "positions" in _cuda.decode_attention_supports(q=q, k_cache=pool, v_cache=pool, block_table=table)
    assert _cuda.decode_attention_supports(q=q, k_cache=pool, v_cache=pool, block_table=table[:, 1:]) is None

    cache = _expanded((1, 64, 1, 64))
    rows = _cuda.DECODE_MAX_QUERY_ROWS
    assert _cuda.decode_attention_supports(q=_expanded((1, 1, rows, 64)), k_cache=cache, v_cache=cache) is None
    reason = _cuda.decode_attention_supports(q=_expanded((1, 1, rows + 1, 64)), k_cache=cache, v_cache=cache)
    assert f"got {rows + 1}" in reason

    # batch x n_new x q_heads merge CTAs past 2^31 - 1
    cache = _expanded((2**24, 64, 8, 64))
    reason = _cuda.decode_attention_supports(q=_expanded((2**24, 1, 128, 64)), k_cache=cache, v_cache=cache)
    assert "CTAs" in reason
    assert _cuda.decode_attention_supports(q=_expanded((2**23, 1, 128, 64)), k_cache=cache, v_cache=cache) is None


# ---------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------

# lengths (mixed in one batch), n_new, q_heads, kv_heads, head_dim, block_size (None: contiguous).
# GQA ratios 1, 4 and 8 (and 16 x 3 rows: several row blocks); head dims 40, 64, 96, 128, 256;
# block sizes 1, 7, 16.
SHAPES = [
    ((1, 17, 113), 1, 4, 4, 64, None),
    ((3, 17, 113), 3, 8, 2, 128, 16),
    ((1, 113, 17), 1, 8, 1, 96, 7),
    ((113, 3, 17), 3, 8, 1, 40, 1),
    ((17, 113), 3, 4, 1, 64, None),
    ((300, 5), 3, 16, 1, 128, 16),
    ((70, 129), 1, 4, 2, 256, None),
]


# Full size: batch 1 at a long context (many splits) and batch 64 at mixed lengths.
FULL_SIZE_SHAPES = [
    ((32768,), 1, 32, 8, 128, None),
    ((32768,), 1, 32, 8, 128, 16),
    ((32768, 3, 1000), 3, 8, 1, 64, 7),
    ((20000, 17), 1, 16, 16, 256, None),
    (tuple(1024 for _ in range(64)), 1, 32, 8, 128, None),
    (tuple((37 * i * i + 113) % 4096 + 3 for i in range(64)), 1, 32, 8, 128, 16),
    (tuple((53 * i * i + 17) % 4096 + 3 for i in range(64)), 3, 32, 4, 96, None),
]


def _shape_id(shape):
    lengths, n_new, q_heads, kv_heads, head_dim, block_size = shape
    layout = "contiguous" if block_size is None else f"paged{block_size}"
    batch = f"b={len(lengths)}-L<={max(lengths)}" if len(lengths) > 3 else f"L={','.join(map(str, lengths))}"
    return f"{batch}-new={n_new}-h={q_heads}/{kv_heads}-d={head_dim}-{layout}"


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES + FULL_SIZE_SHAPES, ids=_shape_id)
def test_matches_reference(shape, dtype, variant, poisoned_allocations):
    lengths, n_new, q_heads, kv_heads, head_dim, block_size = shape
    case = make_case(lengths, n_new, q_heads, kv_heads, head_dim, dtype, block_size, device="cuda")
    assert_matches_reference(case, run_cuda(case))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("block_size", [None, 7], ids=["contiguous", "paged7"])
def test_split_counts(dtype, block_size, variant, poisoned_allocations):
    """One split (written directly), a few, and more splits than steps (most of them empty)."""
    case = make_case((113, 3, 40), 3, 8, 2, 64, dtype, block_size, seed=1, device="cuda")
    results = []
    for num_splits in (1, 2, 5, 64):
        results.append(run_cuda(case, num_splits))
        assert_matches_reference(case, results[-1])
    assert_splits_agree(case, results)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_strided_q_and_cache(dtype, variant, poisoned_allocations):
    case = make_case((17, 113, 40), 3, 8, 2, 64, dtype, seed=2, device="cuda")
    # q as a transposed (batch, heads, n_new, D) buffer; the caches as views of wider ones.
    case["q"] = case["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not case["q"].is_contiguous()
    for name in ("k_cache", "v_cache"):
        wide = torch.full(case[name].shape[:3] + (80,), math.nan, dtype=dtype, device="cuda")
        wide[..., 8:72] = case[name]
        case[name] = wide[..., 8:72]
        assert not case[name].is_contiguous()
    assert_matches_reference(case, run_cuda(case))
    case["q"] = torch.cat([case["q"], case["q"]], dim=-1)[..., ::2]  # head_dim stride 2
    assert_matches_reference(case, run_cuda(case))


@pytest.mark.gpu
@requires_cuda
def test_equals_last_rows_of_attention(variant):
    """Decoding n_new tokens over a full cache gives the last n_new rows of causal attention."""
    generator = torch.Generator("cuda").manual_seed(3)
    batch, seqlen, n_new, q_heads, kv_heads, head_dim = 2, 70, 4, 4, 2, 32
    q, k, v = (torch.randn((batch, seqlen, heads, head_dim), generator=generator, device="cuda")
               for heads in (q_heads, kv_heads, kv_heads))
    full, full_lse = fmkernels.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
    out, lse = fmkernels.decode_attention(q[:, -n_new:], k, v, seqlens, return_lse=True, backend="cuda")
    assert testing.max_error(out, full[:, -n_new:]) <= 1e-5
    assert testing.max_error(lse, full_lse[..., -n_new:]) <= 1e-5


@pytest.mark.gpu
@requires_cuda
def test_unsupported_case_raises_when_named_and_falls_back_on_auto():
    case = make_case((5, 9), 1, 4, 2, 36, torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="multiple of 8"):
        fmkernels.decode_attention(**case, backend="cuda")
    assert_matches_reference(case, fmkernels.decode_attention(**case, return_lse=True))


def _direct_call(case, out, lse, num_splits=1, partial_out=None, partial_lse=None, variant=None):
    """The binding itself, past the ops layer's checks; variant None: the adapter's choice."""
    platform.cuda_module().decode_attention(
        tensor_view(case["q"]), tensor_view(case["k_cache"]), tensor_view(case["v_cache"]),
        tensor_view(case["cache_seqlens"]), tensor_view(case["block_table"]), tensor_view(out), tensor_view(lse),
        1.0 / math.sqrt(case["q"].shape[-1]), num_splits, tensor_view(partial_out), tensor_view(partial_lse),
        _cuda.decode_variant() if variant is None else variant, torch.cuda.current_stream().cuda_stream,
    )
    torch.cuda.synchronize()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("block_size", [None, 4], ids=["contiguous", "paged4"])
def test_direct_call_clamps_lengths_and_skips_bad_blocks(block_size, variant):
    """Lengths past the cache are clamped to its capacity, negative ones to 0 (rows that see
    nothing: zeros and an LSE of -inf), and positions in blocks outside the pool are skipped."""
    case = make_case((6, 9, 3), 2, 4, 2, 64, torch.float16, block_size, seed=5, device="cuda")
    capacity = case["k_cache"].shape[1] * (1 if block_size is None else case["block_table"].shape[1])
    case["cache_seqlens"] = torch.tensor([capacity + 50, -3, 1], dtype=torch.int32, device="cuda")
    clamped = dict(case, cache_seqlens=torch.tensor([capacity, 0, 1], dtype=torch.int32, device="cuda"))
    for name in ("k_cache", "v_cache"):  # the slots past the lengths, now read, hold numbers
        case[name] = torch.nan_to_num(case[name], nan=0.5)
        clamped[name] = case[name]
    if block_size is not None:
        table = case["block_table"].clone()
        table[0, 1::2] = -1  # every other block of sequence 0 outside the pool
        case["block_table"] = table
        clamped = None  # the skipped blocks change sequence 0's result: checked for finiteness below
    q = case["q"]
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    for num_splits in (1, 3):
        out = torch.full_like(q, math.nan)
        lse = torch.full(lse_shape, math.nan, device="cuda")
        scratch_rows = q.shape[0] * num_splits * q.shape[2] * q.shape[1]
        partial_out = torch.full((scratch_rows * q.shape[3],), math.nan, device="cuda")
        partial_lse = torch.full((scratch_rows,), math.nan, device="cuda")
        _direct_call(case, out, lse, num_splits, partial_out, partial_lse)
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
        assert torch.isneginf(lse[2, :, 0]).all() and torch.isfinite(lse[2, :, 1]).all()
        if clamped is not None:
            assert_matches_reference(clamped, (out, lse))


@pytest.mark.gpu
@requires_cuda
def test_direct_call_rejects_bad_scratch_and_splits():
    case = make_case((40,), 1, 4, 2, 64, torch.bfloat16, device="cuda")
    out = torch.empty_like(case["q"])
    with pytest.raises(ValueError, match="num_splits"):
        _direct_call(case, out, None, num_splits=0)
    with pytest.raises(ValueError, match="num_splits"):
        _direct_call(case, out, None, num_splits=_cuda.DECODE_MAX_SPLITS + 1)
    small = torch.empty(10, device="cuda")
    with pytest.raises(ValueError, match="scratch"):
        _direct_call(case, out, None, 2, small, small)
    with pytest.raises(ValueError, match="scratch"):
        _direct_call(case, out, None, 2, None, None)
    for unknown in (-1, len(_cuda.DECODE_VARIANTS)):
        with pytest.raises(ValueError, match="variant"):
            _direct_call(case, out, None, variant=unknown)




@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_splits", [1, 7, 256])
def test_split_counts_full_size(num_splits, variant, poisoned_allocations):
    case = make_case((32768, 5000, 1), 1, 32, 8, 128, torch.bfloat16, 16, seed=4, device="cuda")
    assert_matches_reference(case, run_cuda(case, num_splits))


@pytest.mark.gpu
@requires_cuda
def test_the_adapter_splits_a_long_sequence():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert _cuda.decode_num_splits(8, 32768, sms) * 8 >= 2 * sms
