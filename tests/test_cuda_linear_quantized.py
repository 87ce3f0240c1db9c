"""The CUDA linear for GGUF-quantized weights (csrc/cuda/linear_quantized.cu, backend="cuda")
against the fp64 matmul of x and ``fmkernels.quantized.dequantize``.

Weight-only quantization with fp32 accumulation: |out - ref| <= 2^-20 sum_j |w_nj x_j| +
eps_out |ref| + tiny_out, eps_out 0 / 2^-11 / 2^-8 for float32 / float16 / bfloat16 outputs
(their rounding) and tiny_out half the output dtype's smallest subnormal (an fp16 result
near zero rounds to an absolute step, not a relative one). Weights come from
``quantize(torch.randn(...))`` and from random bytes (every field random, the fp16 ones
small finite halves). The helpers here serve tests/test_triton_linear_quantized.py too.

The kernel tests need a GPU and the built fmkernels._cuda; the helper tests run anywhere.
"""

import math

import pytest
import torch

import fmkernels
from fmkernels import platform
from fmkernels.quantized import FORMATS, QuantizedWeight, dequantize, quantize

CUDA_REASON = platform.unavailable_reason("cuda")
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda backend: {CUDA_REASON}")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORMAT_NAMES = tuple(sorted(FORMATS))
#: Byte offsets of each format's fp16 fields within a block.
HALF_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q4_k": (0, 2), "q6_k": (208,)}
#: The output's rounding, relative and (half the smallest subnormal) absolute.
OUT_EPS = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
OUT_TINY = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}
ACCUMULATION = 2.0**-20


def random_weight(n, k, fmt, kind, generator, device="cpu") -> QuantizedWeight:
    """A QuantizedWeight (n, k): ``kind`` "quantized" (a normal tensor through quantize) or
    "bytes" (random bytes, the fp16 fields overwritten by small finite halves)."""
    if kind == "quantized":
        return quantize(torch.randn(n, k, generator=generator).to(device), fmt)
    block = FORMATS[fmt]
    nb = k // block.block_size
    blocks = torch.randint(0, 256, (n, nb, block.block_bytes), generator=generator, dtype=torch.uint8)
    for offset in HALF_FIELDS[fmt]:
        halves = (torch.randn(n, nb, generator=generator) * 0.01).to(torch.float16)
        blocks[..., offset:offset + 2] = halves.view(torch.uint8).reshape(n, nb, 2)
    return QuantizedWeight(blocks.reshape(n, nb * block.block_bytes).to(device), fmt, (n, k))


def expected(x, weight):
    """(ref, magnitude) in fp64: x @ w^T and |x| @ |w|^T, w = dequantize(weight) (..., N)."""
    w = dequantize(weight.blocks, weight.format, weight.shape[1]).double()
    x64 = x.double()
    return x64 @ w.T, x64.abs() @ w.abs().T


def tolerance(ref, magnitude, dtype):
    return ACCUMULATION * magnitude + OUT_EPS[dtype] * ref.abs() + OUT_TINY[dtype]


def within_tolerance(out, ref, magnitude) -> torch.Tensor:
    """Where out is within the tolerance of ref (bool, out's shape); NaN never is."""
    return (out.double() - ref).abs() <= tolerance(ref, magnitude, out.dtype)


def assert_close(out, x, weight):
    ref, magnitude = expected(x, weight)
    assert out.shape == ref.shape and out.dtype == x.dtype
    good = within_tolerance(out, ref, magnitude)
    if not bool(good.all()):
        bad = (~good).nonzero()[0].tolist()
        at = tuple(bad)
        raise AssertionError(
            f"{int((~good).sum())} of {good.numel()} outputs off; first at {at}: {float(out[at])} against "
            f"{float(ref[at])} (tolerance {float(tolerance(ref, magnitude, out.dtype)[at]):.3g})")


def perturbed(out, x, weight):
    """out with its first element moved by three times its tolerance."""
    ref, magnitude = expected(x, weight)
    moved = out.double().clone()
    first = (0,) * out.dim()
    moved[first] = ref[first] + 3 * tolerance(ref, magnitude, out.dtype)[first]
    return moved.to(out.dtype)


def strided_x(rows, k, dtype, generator, device):
    """x (rows, k) with stride 2 along K, a slice of a wider tensor."""
    return torch.randn(rows, 2 * k, generator=generator).to(dtype).to(device)[:, ::2]


def quantized_linear(x, weight, backend="cuda"):
    """fmkernels.linear(x, weight, backend=...) into an out buffer poisoned with NaN."""
    out = torch.full((*x.shape[:-1], weight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    assert fmkernels.linear(x, weight, backend=backend, out=out) is out
    return out


# ---------------------------------------------------------------------------------------
# Runs anywhere


def test_tolerance_fails_a_perturbed_result():
    generator = torch.Generator().manual_seed(0)
    weight = random_weight(5, 64, "q8_0", "quantized", generator)
    for dtype in DTYPES:
        x = torch.randn(3, 64, generator=generator).to(dtype)
        ref, magnitude = expected(x, weight)
        out = ref.to(dtype)
        assert bool(within_tolerance(out, ref, magnitude).all())
        assert not bool(within_tolerance(perturbed(out, x, weight), ref, magnitude)[0, 0])
        assert not bool(within_tolerance(torch.full_like(out, float("nan")), ref, magnitude).any())


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_random_bytes_weights_are_finite(fmt):
    k = FORMATS[fmt].block_size * 2
    weight = random_weight(7, k, fmt, "bytes", torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(weight.dequantize()).all())


def test_cuda_supports_declines_float_weights_and_many_rows():
    from fmkernels.ops import _cuda

    weight = random_weight(4, 32, "q4_0", "quantized", torch.Generator().manual_seed(2))
    assert "float weight" in _cuda.linear_supports(torch.randn(2, 32), torch.randn(4, 32))
    assert "65 rows" in _cuda.linear_supports(torch.randn(5, 13, 32), weight)
    assert _cuda.linear_supports(torch.randn(64, 32), weight) is None


# ---------------------------------------------------------------------------------------
# On a GPU

CASES = [(1, 49152, 2048), (3, 4099, 1024), (8, 1000, 2048), (17, 777, 512), (64, 4096, 2048), (64, 1, 256)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("kind", ["quantized", "bytes"])
def test_cuda_linear_quantized_matches_fp64(fmt, dtype, kind):
    generator = torch.Generator().manual_seed(len(fmt) + DTYPES.index(dtype))
    for rows, n, k in CASES:
        k = max(k, FORMATS[fmt].block_size)
        weight = random_weight(n, k, fmt, kind, generator, "cuda")
        x = torch.randn(rows, k, generator=generator).to(dtype).cuda()
        assert_close(quantized_linear(x, weight), x, weight)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_cuda_linear_quantized_slices_and_strides(fmt):
    generator = torch.Generator().manual_seed(7)
    block = FORMATS[fmt].block_size
    weight = random_weight(333, 8 * block, fmt, "bytes", generator, "cuda")
    sliced = weight.columns(block, 6 * block)  # rows 3 blocks apart from the parent's stride
    for dtype in DTYPES:
        for rows in (1, 5, 64):
            x = strided_x(rows, 5 * block, dtype, generator, "cuda")
            assert_close(quantized_linear(x, sliced), x, sliced)
        x3 = torch.randn(2, 3, 5 * block, generator=generator).to(dtype).cuda()
        assert_close(quantized_linear(x3, sliced), x3, sliced)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", list(range(1, 65)))
def test_cuda_linear_quantized_every_row_count(rows):
    generator = torch.Generator().manual_seed(rows)
    for fmt in FORMAT_NAMES:
        weight = random_weight(67, 2 * max(512, FORMATS[fmt].block_size), fmt, "bytes", generator, "cuda")
        x = torch.randn(rows, weight.shape[1], generator=generator).half().cuda()
        assert_close(quantized_linear(x, weight), x, weight)


@pytest.mark.gpu
@needs_cuda
def test_cuda_linear_quantized_rejects_bad_views():
    from fmkernels._views import tensor_view
    from fmkernels.ops import _cuda

    module = platform.cuda_module()
    weight = random_weight(4, 64, "q8_0", "quantized", torch.Generator().manual_seed(3), "cuda")
    x = torch.randn(2, 64, device="cuda")
    out = torch.empty(2, 4, device="cuda")
    stream = _cuda.stream_of(x)
    with pytest.raises(ValueError, match="format"):
        module.linear_quantized(tensor_view(x), tensor_view(weight.blocks), "q5_0", tensor_view(out), stream)
    with pytest.raises(ValueError, match="at most 64 rows"):
        big = torch.randn(65, 64, device="cuda")
        module.linear_quantized(tensor_view(big), tensor_view(weight.blocks), "q8_0",
                                tensor_view(torch.empty(65, 4, device="cuda")), stream)
    with pytest.raises(ValueError, match="out"):
        module.linear_quantized(tensor_view(x), tensor_view(weight.blocks), "q8_0", tensor_view(out.half()), stream)
    with pytest.raises(ValueError, match="columns"):
        module.linear_quantized(tensor_view(x[:, :32]), tensor_view(weight.blocks), "q8_0", tensor_view(out), stream)


@pytest.mark.gpu
@needs_cuda
def test_cuda_linear_quantized_empty_and_zero_k():
    generator = torch.Generator().manual_seed(4)
    weight = random_weight(5, 64, "q4_1", "quantized", generator, "cuda")
    assert quantized_linear(torch.randn(0, 64, device="cuda"), weight).shape == (0, 5)
    empty_k = weight.columns(0, 0)
    out = quantized_linear(torch.randn(3, 0, device="cuda"), empty_k)
    assert out.shape == (3, 5) and bool((out == 0).all())
    assert math.prod(quantized_linear(torch.randn(2, 64, device="cuda"), weight.rows(0, 0)).shape) == 0
