"""The C++ CPU decode_attention kernel against the float64 reference.

Tolerance (DESIGN.md): error to the float64 reference <= 2 x plain PyTorch's error in the
same dtype + 1e-5, for the output and the log-sum-exp. Caches hold NaN in every slot past
each sequence's length and paged tables hold junk block ids past each sequence's blocks,
so a kernel that reads one fails; outputs start as NaN, so an unwritten element fails.
"""

import math

import pytest
import torch

import fmkernels
from _decode_attention_checks import make_case
from fmkernels import platform, reference, testing
from fmkernels._views import tensor_view

pytestmark = pytest.mark.skipif(
    platform.unavailable_reason("cpu") is not None, reason=str(platform.unavailable_reason("cpu"))
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_cpu(case):
    out = torch.full_like(case["q"], math.nan)
    result, lse = fmkernels.decode_attention(**case, return_lse=True, backend="cpu", out=out)
    assert result.data_ptr() == out.data_ptr()
    return out, lse


def assert_matches_reference(case, actual=None):
    out, lse = run_cpu(case) if actual is None else actual
    result = testing.compare_attention("decode_attention", dict(case, return_lse=True), (out, lse))
    assert result.passed, result.detail
    return out, lse


# lengths (mixed in one batch), n_new, q_heads, kv_heads, head_dim, block_size (None: contiguous)
SHAPES = [
    ((1, 17, 113, 1000), 1, 8, 8, 64, None),
    ((1, 17, 113, 1000), 1, 8, 2, 128, 16),
    ((1, 17, 113, 1000), 1, 8, 1, 96, 7),
    ((3, 17, 113, 1000), 3, 8, 2, 24, None),
    ((17, 113, 1000, 20), 17, 8, 1, 64, 1),
    ((17, 113, 1000), 17, 4, 4, 128, None),
    ((5, 113, 1000), 3, 8, 8, 256, 16),
    ((1, 1000, 17), 1, 8, 1, 256, None),
    ((113, 1000), 3, 16, 4, 24, 7),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L={','.join(map(str, s[0]))}-new={s[1]}-h={s[2]}/{s[3]}"
                         f"-d={s[4]}-{'contiguous' if s[5] is None else f'paged{s[5]}'}")
def test_matches_reference(shape, dtype):
    lengths, n_new, q_heads, kv_heads, head_dim, block_size = shape
    assert_matches_reference(make_case(lengths, n_new, q_heads, kv_heads, head_dim, dtype, block_size))


@pytest.mark.parametrize("isa", ["avx2", "generic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_narrower_instruction_sets(monkeypatch, isa, dtype):
    """The AVX2 and baseline x86-64 variants the dispatcher picks on older CPUs."""
    monkeypatch.setenv("FMKERNELS_CPU_ISA", isa)
    assert_matches_reference(make_case((2, 17, 300), 2, 8, 2, 40, dtype))
    assert_matches_reference(make_case((113, 7), 1, 4, 4, 24, dtype, block_size=7))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_strided_q_and_cache(dtype):
    case = make_case((17, 113, 40), 3, 8, 2, 64, dtype, seed=1)
    # q as a transposed (batch, heads, n_new, D) buffer; the caches as views of wider ones.
    case["q"] = case["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not case["q"].is_contiguous()
    for name in ("k_cache", "v_cache"):
        wide = torch.full(case[name].shape[:3] + (80,), math.nan, dtype=dtype)
        wide[..., 8:72] = case[name]
        case[name] = wide[..., 8:72]
        assert not case[name].is_contiguous()
    assert_matches_reference(case)
    case["q"] = torch.cat([case["q"], case["q"]], dim=-1)[..., ::2]  # head_dim stride 2: the adapter copies it
    assert_matches_reference(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_long_sequence_split_across_threads(dtype, block_size):
    """One sequence of ~5000 positions: on 2 threads it is cut into splits merged by their LSE."""
    case = make_case((4999,), 1, 8, 1, 128, dtype, block_size, seed=2)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(assert_matches_reference(case))
    finally:
        torch.set_num_threads(threads)
    (out_1, lse_1), (out_2, lse_2) = results
    plain_out = testing.plain_decode_attention(**case)
    truth = reference.decode_attention(**{k: v.double() if v is not None and v.is_floating_point() else v
                                          for k, v in case.items()})
    assert testing.max_error(out_1, out_2) <= testing.attention_tolerance(plain_out, truth)
    assert testing.max_error(lse_1, lse_2) <= 1e-5


def test_equals_last_rows_of_attention():
    """Decoding n_new tokens over a full cache gives the last n_new rows of causal attention."""
    generator = torch.Generator().manual_seed(3)
    batch, seqlen, n_new, q_heads, kv_heads, head_dim = 2, 300, 5, 8, 2, 64
    q = torch.randn((batch, seqlen, q_heads, head_dim), generator=generator)
    k = torch.randn((batch, seqlen, kv_heads, head_dim), generator=generator)
    v = torch.randn((batch, seqlen, kv_heads, head_dim), generator=generator)
    full, full_lse = fmkernels.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32)
    out, lse = fmkernels.decode_attention(q[:, -n_new:], k, v, seqlens, return_lse=True, backend="cpu")
    assert testing.max_error(out, full[:, -n_new:]) <= 1e-5
    assert testing.max_error(lse, full_lse[..., -n_new:]) <= 1e-5


def _call_kernel(case, out=None, lse=None, scale=0.125):
    """The binding itself, past the Python validation, so the C++ checks are what answers."""
    out = torch.empty_like(case["q"]) if out is None else out
    platform.cpu_module().decode_attention(
        tensor_view(case["q"]), tensor_view(case["k_cache"]), tensor_view(case["v_cache"]),
        tensor_view(case["cache_seqlens"]), tensor_view(case["block_table"]), tensor_view(out), tensor_view(lse),
        scale, 2,
    )
    return out


@pytest.mark.parametrize("mistake", ["long", "short", "block-id", "negative-block", "dtype", "lse-shape", "heads"])
def test_kernel_rejects_bad_input(mistake):
    case = make_case((17, 40), 2, 4, 2, 32, torch.float32, block_size=8, seed=4)
    out, lse = None, None
    if mistake == "long":
        case["cache_seqlens"][1] = case["block_table"].shape[1] * 8 + 1
    elif mistake == "short":
        case["cache_seqlens"][0] = 1
    elif mistake == "block-id":
        case["block_table"][1, 0] = case["k_cache"].shape[0]
    elif mistake == "negative-block":
        case["block_table"][0, 2] = -1
    elif mistake == "dtype":
        out = torch.empty(case["q"].shape, dtype=torch.float16)
    elif mistake == "lse-shape":
        lse = torch.empty((2, 4, 3), dtype=torch.float32)
    elif mistake == "heads":
        case["q"] = torch.randn(2, 2, 3, 32)
    with pytest.raises(ValueError, match="decode_attention"):
        _call_kernel(case, out, lse)
