"""The Triton linear for GGUF-quantized weights (kernels/linear.py) against the fp64 matmul of
x and ``fmkernels.quantized.dequantize``, with tests/test_cuda_linear_quantized.py's tolerance
(weight-only, fp32 accumulation: 2^-20 sum_j |w_nj x_j| plus the output's rounding).

Without a GPU these run through the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), at small shapes; the ``gpu`` tests run larger ones.
"""

import pytest
import torch

pytest.importorskip("triton")

from fmkernels.quantized import FORMATS  # noqa: E402
from test_cuda_linear_quantized import (  # noqa: E402
    DTYPES, FORMAT_NAMES, assert_close, expected, perturbed, quantized_linear, random_weight, strided_x,
    within_tolerance,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _linear(x, weight):
    from fmkernels.kernels import linear

    return linear.linear(x, weight)


def _small_k(fmt):
    """Two K for the format: 32/96 for 32-weight blocks, 256/512 for the k-quants."""
    block = FORMATS[fmt].block_size
    return (block, 3 * block) if block == 32 else (block, 2 * block)


# (rows, N, which of the two K): rows 1, 3, 17, 64 (the broadcast and the dot paths), odd N.
SMALL_CASES = [(1, 1, 0), (3, 5, 1), (17, 33, 0), (64, 5, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_triton_linear_quantized_matches_fp64(fmt, dtype):
    generator = torch.Generator().manual_seed(len(fmt) * 10 + DTYPES.index(dtype))
    for kind in ("quantized", "bytes"):
        for rows, n, which in SMALL_CASES:
            k = _small_k(fmt)[which]
            weight = random_weight(n, k, fmt, kind, generator, DEVICE)
            x = torch.randn(rows, k, generator=generator).to(dtype).to(DEVICE)
            assert_close(_linear(x, weight), x, weight)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_triton_linear_quantized_column_slice_and_strided_x(fmt):
    generator = torch.Generator().manual_seed(5)
    block = FORMATS[fmt].block_size
    weight = random_weight(7, 3 * block, fmt, "bytes", generator, DEVICE)
    sliced = weight.columns(block, 3 * block)  # its rows keep the parent's stride
    assert sliced.blocks.stride(0) > sliced.blocks.shape[1]
    x = strided_x(3, 2 * block, torch.float16, generator, DEVICE)
    assert not x.is_contiguous()
    assert_close(_linear(x, sliced), x, sliced)
    x3 = torch.randn(2, 9, 4 * block, generator=generator).to(DEVICE)[:, ::4, block:3 * block]  # 3-D, sliced
    out = _linear(x3, sliced)
    assert out.shape == (2, 3, 7)
    assert_close(out, x3, sliced)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_public_linear_runs_the_triton_kernel_when_named(fmt):
    generator = torch.Generator().manual_seed(11)
    k = _small_k(fmt)[1]
    weight = random_weight(9, k, fmt, "quantized", generator, DEVICE)
    for dtype in DTYPES:
        x = torch.randn(2, 3, k, generator=generator).to(dtype).to(DEVICE)
        assert_close(quantized_linear(x, weight, backend="triton"), x, weight)


def test_triton_linear_quantized_tolerance_fails_a_perturbed_result():
    generator = torch.Generator().manual_seed(6)
    weight = random_weight(5, 96, "q4_1", "bytes", generator, DEVICE)
    for dtype in DTYPES:
        x = torch.randn(3, 96, generator=generator).to(dtype).to(DEVICE)
        out = _linear(x, weight)
        ref, magnitude = expected(x, weight)
        assert bool(within_tolerance(out, ref, magnitude).all())
        assert not bool(within_tolerance(perturbed(out, x, weight), ref, magnitude)[0, 0])


def test_triton_linear_quantized_empty_and_zero_k():
    generator = torch.Generator().manual_seed(8)
    weight = random_weight(5, 64, "q8_0", "quantized", generator, DEVICE)
    assert _linear(torch.randn(0, 64, device=DEVICE), weight).shape == (0, 5)
    out = _linear(torch.randn(3, 0, device=DEVICE), weight.columns(0, 0))
    assert out.shape == (3, 5) and bool((out == 0).all())
    assert _linear(torch.randn(2, 64, device=DEVICE), weight.rows(0, 0)).shape == (2, 0)


def test_triton_linear_supports_declines_float_weights_and_many_rows():
    from fmkernels.kernels import linear

    weight = random_weight(4, 32, "q4_0", "quantized", torch.Generator().manual_seed(2), DEVICE)
    x = torch.randn(2, 32, device=DEVICE)
    assert linear.linear_supports(x, torch.randn(4, 32, device=DEVICE)) == (
        "a float weight: torch's matmul (the reference) is the tool")
    assert "65 rows" in linear.linear_supports(torch.randn(65, 32, device=DEVICE), weight)
    assert linear.linear_supports(torch.randn(64, 32, device=DEVICE), weight) is None
    with pytest.raises(ValueError, match="65 rows"):
        linear.linear(torch.randn(65, 32, device=DEVICE), weight)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_triton_linear_quantized_gpu_sizes(fmt, dtype):
    generator = torch.Generator().manual_seed(9)
    for rows, n, k in [(1, 49152, 2048), (8, 4099, 1024), (33, 1000, 2048), (64, 4096, 2048)]:
        for kind in ("quantized", "bytes"):
            weight = random_weight(n, k, fmt, kind, generator, "cuda")
            x = torch.randn(rows, k, generator=generator).to(dtype).cuda()
            assert_close(_linear(x, weight), x, weight)
