"""The Triton decode_attention kernels against the float64 reference.

Without a GPU they run on CPU tensors through the interpreter (tests/conftest.py), at small
sizes; the ``gpu`` tests run the same checks at full size on CUDA.

Tolerance (DESIGN.md): error to the float64 reference <= 2 x plain PyTorch's error in the
same dtype + 1e-5, for the output and the log-sum-exp. Caches hold NaN in every slot past
each sequence's length and paged tables hold junk block ids past each sequence's blocks,
so a kernel that reads one fails; every buffer the launcher allocates (output, LSE, split
scratch) and the caller's ``out`` start as NaN, so an unwritten element fails.
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

pytestmark = pytest.mark.skipif(
    platform.unavailable_reason("triton") is not None, reason=str(platform.unavailable_reason("triton"))
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernels():
    from fmkernels.kernels import decode_attention

    return decode_attention


def run_triton(case, num_splits=None):
    """Through the public op (with a NaN-poisoned ``out``), or the launcher with a forced split count."""
    if num_splits is not None:
        return kernels().decode_attention(**case, return_lse=True, num_splits=num_splits)
    out = torch.full_like(case["q"], math.nan)
    result, lse = fmkernels.decode_attention(**case, return_lse=True, backend="triton", out=out)
    assert result.data_ptr() == out.data_ptr()
    return out, lse


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def _shape_id(shape):
    lengths, n_new, q_heads, kv_heads, head_dim, block_size = shape
    layout = "contiguous" if block_size is None else f"paged{block_size}"
    return f"L={','.join(map(str, lengths))}-new={n_new}-h={q_heads}/{kv_heads}-d={head_dim}-{layout}"


# lengths (mixed in one batch), n_new, q_heads, kv_heads, head_dim, block_size (None: contiguous).
# GQA ratios 1, 4 and 8; head dims 32, 64, 96, 128; block sizes 1, 7, 16.
SHAPES = [
    ((1, 17, 113), 1, 4, 4, 64, None),
    ((3, 17, 113), 3, 8, 2, 128, 16),
    ((1, 113, 17), 1, 8, 1, 96, 7),
    ((113, 3, 17), 3, 8, 1, 32, 1),
    ((17, 113), 3, 4, 1, 64, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_reference(shape, dtype, poisoned_allocations):
    lengths, n_new, q_heads, kv_heads, head_dim, block_size = shape
    case = make_case(lengths, n_new, q_heads, kv_heads, head_dim, dtype, block_size, device=DEVICE)
    assert_matches_reference(case, run_triton(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("block_size", [None, 7], ids=["contiguous", "paged7"])
def test_split_counts(dtype, block_size, poisoned_allocations):
    """One split (written directly), a few, and more splits than tiles (most of them empty)."""
    case = make_case((113, 3, 40), 3, 8, 2, 64, dtype, block_size, seed=1, device=DEVICE)
    results = []
    for num_splits in (1, 2, 5):
        results.append(run_triton(case, num_splits))
        assert_matches_reference(case, results[-1])
    assert_splits_agree(case, results)


def test_launcher_splits_long_sequences():
    """The launcher's own choice cuts a sequence of several tiles into several splits."""
    decode = kernels()
    _, block_n, _ = decode._blocks(4, 64, torch.float16)
    assert decode._num_splits(torch.device(DEVICE), 8, -(-113 // block_n)) > 1
    assert decode._num_splits(torch.device(DEVICE), 8, 1) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_strided_q_and_cache(dtype, poisoned_allocations):
    case = make_case((17, 113, 40), 3, 8, 2, 64, dtype, seed=2, device=DEVICE)
    # q as a transposed (batch, heads, n_new, D) buffer; the caches as views of wider ones.
    case["q"] = case["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not case["q"].is_contiguous()
    for name in ("k_cache", "v_cache"):
        wide = torch.full(case[name].shape[:3] + (80,), math.nan, dtype=dtype, device=DEVICE)
        wide[..., 8:72] = case[name]
        case[name] = wide[..., 8:72]
        assert not case[name].is_contiguous()
    assert_matches_reference(case, run_triton(case))
    case["q"] = torch.cat([case["q"], case["q"]], dim=-1)[..., ::2]  # head_dim stride 2
    assert_matches_reference(case, run_triton(case))


def test_equals_last_rows_of_attention():
    """Decoding n_new tokens over a full cache gives the last n_new rows of causal attention."""
    generator = torch.Generator(DEVICE).manual_seed(3)
    batch, seqlen, n_new, q_heads, kv_heads, head_dim = 2, 70, 4, 4, 2, 32
    q, k, v = (torch.randn((batch, seqlen, heads, head_dim), generator=generator, device=DEVICE)
               for heads in (q_heads, kv_heads, kv_heads))
    full, full_lse = fmkernels.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=DEVICE)
    out, lse = fmkernels.decode_attention(q[:, -n_new:], k, v, seqlens, return_lse=True, backend="triton")
    assert testing.max_error(out, full[:, -n_new:]) <= 1e-5
    assert testing.max_error(lse, full_lse[..., -n_new:]) <= 1e-5


def test_supports_names_what_it_cannot_do():
    case = make_case((5,), 1, 2, 1, 320, torch.float32, device=DEVICE)
    reason = kernels().decode_attention_supports(**case)
    assert reason is not None and "head_dim" in reason
    assert kernels().decode_attention_supports(**make_case((5,), 1, 2, 1, 256, torch.float32, device=DEVICE)) is None
    with pytest.raises(ValueError, match="head_dim"):
        fmkernels.decode_attention(**case, backend="triton")


# Full size on a GPU: batch 1 at a long context (many splits) and batch 64 at mixed lengths.
GPU_SHAPES = [
    ((32768,), 1, 32, 8, 128, None),
    ((32768,), 1, 32, 8, 128, 16),
    ((32768, 1, 1000), 3, 8, 1, 64, 7),
    ((20000, 17), 1, 16, 16, 256, None),
    (tuple((37 * i * i + 113) % 4096 + 3 for i in range(64)), 1, 32, 8, 128, 16),
    (tuple((53 * i * i + 17) % 4096 + 3 for i in range(64)), 3, 32, 4, 96, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: _shape_id(s) if len(s[0]) < 4 else f"b={len(s[0])}-"
                         + _shape_id(((max(s[0]),),) + s[1:]))
def test_matches_reference_gpu(shape, dtype, poisoned_allocations):
    lengths, n_new, q_heads, kv_heads, head_dim, block_size = shape
    case = make_case(lengths, n_new, q_heads, kv_heads, head_dim, dtype, block_size, device="cuda")
    assert_matches_reference(case, run_triton(case))


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 7, 256])
def test_split_counts_gpu(num_splits, poisoned_allocations):
    case = make_case((32768, 5000, 1), 1, 32, 8, 128, torch.bfloat16, 16, seed=4, device="cuda")
    assert_matches_reference(case, run_triton(case, num_splits))


@pytest.mark.gpu
def test_launcher_fills_the_gpu():
    decode = kernels()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    device = torch.device("cuda")
    # batch 1, 8 KV heads, 32k context: splits bring the launch to several programs per SM.
    assert decode._num_splits(device, 8, 32768 // 64) * 8 >= 2 * sms
    # batch 64 x 8 KV heads already fills it: one split or few.
    assert decode._num_splits(device, 512, 4096 // 64) <= 2
