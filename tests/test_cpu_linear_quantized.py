"""The C++ CPU linear kernel on GGUF-quantized weights against the float64 reference.

x is rounded to int8 per block of 32 (scale d_b = max|x_b| / 127) and the sums are fp32, so each
output n may be off the reference ref = x @ dequantize(w)^T (float64) by

    0.5 sum_b d_b sum_{j in b} |w_nj|  +  (K / 32 + 8) 2^-23 sum_j |w_nj x_j|  +  eps_out |ref|

(x's rounding, the fp32 scaling and sums, the output's rounding: eps_out 0 for float32, 2^-11
float16, 2^-8 bfloat16). Past 16 rows the weight is dequantized and multiplied in fp32:
2^-20 sum |w x| + eps_out |ref|. Outputs start as NaN, so an unwritten element fails; N is odd,
K takes odd numbers of blocks, and weights are made both by quantize and from random bytes
(every bit pattern of the quants).
"""

import math

import pytest
import torch

import fmkernels
from fmkernels import platform
from fmkernels._views import tensor_view
from fmkernels.ops import _cpu
from fmkernels.quantized import FORMATS, QuantizedWeight, dequantize, quantize

pytestmark = pytest.mark.skipif(
    platform.unavailable_reason("cpu") is not None, reason=str(platform.unavailable_reason("cpu"))
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [1, 2, 3, 8, 13, 16, 17, 70]
NS = [1, 5, 33, 577]
KS = {32: [32, 96, 576], 256: [256, 768]}
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Byte offsets of each format's fp16 fields within a block.
HALF_FIELDS = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q4_k": [0, 2], "q6_k": [208]}


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def module():
    return platform.cpu_module()


def random_weight(fmt, n, k, generator, from_bytes):
    """A QuantizedWeight (N, K): quantize(randn) or random bytes with small finite fp16 fields."""
    if not from_bytes:
        return quantize(torch.randn((n, k), generator=generator), fmt)
    info = FORMATS[fmt]
    blocks = torch.randint(0, 256, (n, k // info.block_size, info.block_bytes), generator=generator,
                           dtype=torch.uint8)
    for offset in HALF_FIELDS[fmt]:
        halves = (torch.rand((n, k // info.block_size), generator=generator) * 2 - 1) / 64
        blocks[..., offset:offset + 2] = halves.to(torch.float16).view(torch.uint8).view(n, -1, 2)
    return QuantizedWeight(blocks.reshape(n, -1), fmt, (n, k))


class Reference:
    """A weight dequantized in float64, with what the error bound needs of it."""

    def __init__(self, weight):
        self.w = weight.dequantize().double()  # [N, K]
        self.w_abs = self.w.abs()
        self.block_abs = self.w_abs.view(self.w.shape[0], -1, 32).sum(dim=-1)  # [N, K / 32]


def tolerance(x, weight, out_dtype, rows_in_kernel=True):
    """Each output's allowed error (module docstring), and the float64 reference."""
    reference = weight if isinstance(weight, Reference) else Reference(weight)
    k = x.shape[-1]
    xs = x.reshape(-1, k).double()
    ref = xs @ reference.w.T
    magnitude = xs.abs() @ reference.w_abs.T
    if rows_in_kernel:
        step = xs.abs().view(xs.shape[0], -1, 32).amax(dim=-1) / 127  # [rows, K / 32]
        bound = 0.5 * step @ reference.block_abs.T + (k / 32 + 8) * 2.0**-23 * magnitude
    else:
        bound = 2.0**-20 * magnitude
    return bound + OUTPUT_ROUNDING[out_dtype] * ref.abs(), ref


def assert_within(actual, x, weight, rows_in_kernel=True):
    """``weight`` a QuantizedWeight or its Reference."""
    bound, ref = tolerance(x, weight, actual.dtype, rows_in_kernel)
    error = (actual.reshape(ref.shape).double() - ref).abs()
    bad = ~(error <= bound)  # NaN fails
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} outputs off: worst error {float(error.max()):.3g}, "
        f"bound there {float(bound.flatten()[int(error.argmax())]):.3g}")


def run_kernel(x, weight):
    """The binding on a NaN-poisoned out (the kernel path, every row count)."""
    x = _cpu._unit_stride(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]))
    out = torch.full((x.shape[0], weight.shape[0]), math.nan, dtype=x.dtype)
    module().linear_quantized(tensor_view(x), tensor_view(weight.blocks), weight.block_format.ggml_type,
                              tensor_view(out), _cpu._threads())
    return out


def check(x, weight):
    """The kernel on every row count, and the cpu backend's path (the kernel up to 16 rows, the
    dequantized matmul past them) through fmkernels.linear with an out poisoned first."""
    assert_within(run_kernel(x, weight), x, Reference(weight))
    out = torch.full((*x.shape[:-1], weight.shape[0]), math.nan, dtype=x.dtype)
    result = fmkernels.linear(x, weight, backend="cpu", out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_within(out, x, weight, rows_in_kernel=math.prod(x.shape[:-1]) <= _cpu.MAX_LINEAR_ROWS)


@pytest.mark.parametrize("from_bytes", [False, True], ids=["quantized", "random_bytes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_matches_reference(fmt, dtype, from_bytes):
    generator = torch.Generator().manual_seed(100 * sorted(FORMATS).index(fmt) + 10 * DTYPES.index(dtype) + from_bytes)
    for k in KS[FORMATS[fmt].block_size]:
        for n in NS:
            weight = random_weight(fmt, n, k, generator, from_bytes)
            reference = Reference(weight)
            for rows in ROWS:
                x = torch.randn((rows, k), generator=generator).to(dtype)
                assert_within(run_kernel(x, weight), x, reference)
    # The public op's path (the dequantized matmul past 16 rows) on one size per row count.
    weight = random_weight(fmt, 33, KS[FORMATS[fmt].block_size][1], generator, from_bytes)
    for rows in ROWS:
        check(torch.randn((rows, weight.shape[1]), generator=generator).to(dtype), weight)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_narrower_instruction_sets(monkeypatch, isa, fmt):
    """AVX-512 without VNNI, AVX2 and the baseline x86-64, as the dispatcher picks them on
    older CPUs (here by FMKERNELS_CPU_ISA)."""
    monkeypatch.setenv("FMKERNELS_CPU_ISA", isa)
    generator = torch.Generator().manual_seed(7)
    block = FORMATS[fmt].block_size
    for seed, (rows, n, k) in enumerate([(1, 5, block), (3, 33, 3 * block), (13, 577, 3 * block), (16, 1, block)]):
        for from_bytes in (False, True):
            weight = random_weight(fmt, n, k, generator, from_bytes)
            reference = Reference(weight)
            for dtype in DTYPES:
                x = torch.randn((rows, k), generator=generator).to(dtype)
                assert_within(run_kernel(x, weight), x, reference)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_views(fmt):
    """Rows of x from a wider buffer, leading dimensions, a column slice of the weight (rows
    further apart than their bytes) and a row slice."""
    generator = torch.Generator().manual_seed(3)
    block = FORMATS[fmt].block_size
    k = 3 * block
    weight = random_weight(fmt, 41, 5 * block, generator, True)
    wide_x = torch.full((5, 5 * block + 9), math.nan, dtype=torch.bfloat16)
    wide_x[:, 4:4 + k] = torch.randn((5, k), generator=generator).to(torch.bfloat16)
    x = wide_x[:, 4:4 + k]
    columns = weight.columns(block, 4 * block)
    assert columns.blocks.stride(0) > columns.blocks.shape[1]
    check(x, columns)
    check(x, weight.columns(block, 4 * block).rows(3, 36))
    check(x.T.contiguous().T, weight.rows(7, 8).columns(0, k))
    leading = torch.randn((2, 3, k), generator=generator)
    check(leading, columns)
    assert fmkernels.linear(leading, columns, backend="cpu").shape == (2, 3, 41)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_dequantize_is_bit_exact(fmt):
    generator = torch.Generator().manual_seed(11)
    for from_bytes in (False, True):
        weight = random_weight(fmt, 37, 3 * FORMATS[fmt].block_size, generator, from_bytes)
        for w in (weight, weight.columns(FORMATS[fmt].block_size, 3 * FORMATS[fmt].block_size)):
            expected = dequantize(w.blocks, w.format, w.shape[1])
            actual = _cpu.dequantize(w)
            assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))


def test_results_do_not_depend_on_the_thread_count():
    generator = torch.Generator().manual_seed(5)
    weight = random_weight("q4_1", 1537, 576, generator, False)
    x = torch.randn((3, 576), generator=generator)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_cpu.linear(x, weight))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_zero_blocks_of_x_and_empty_shapes():
    generator = torch.Generator().manual_seed(2)
    weight = random_weight("q8_0", 5, 96, generator, False)
    x = torch.randn((2, 96), generator=generator)
    x[:, 32:64] = 0
    assert_within(run_kernel(x, weight), x, weight)
    assert run_kernel(torch.zeros((3, 0)), QuantizedWeight(torch.zeros((4, 0), dtype=torch.uint8), "q4_0",
                                                            (4, 0))).eq(0).all()
    assert run_kernel(x, weight.rows(0, 0)).shape == (2, 0)


def test_the_bound_can_fail():
    """The helper rejects a result one element of which is off by 10 x its bound."""
    generator = torch.Generator().manual_seed(4)
    weight = random_weight("q4_k", 9, 256, generator, False)
    x = torch.randn((3, 256), generator=generator)
    out = run_kernel(x, weight)
    assert_within(out, x, weight)
    bound, _ = tolerance(x, weight, out.dtype)
    out[1, 4] += 10 * float(bound[1, 4])
    with pytest.raises(AssertionError):
        assert_within(out, x, weight)


def test_bad_input_raises():
    generator = torch.Generator().manual_seed(6)
    weight = random_weight("q4_0", 4, 64, generator, False)
    x = torch.randn((2, 64), generator=generator)
    out = torch.empty((2, 4))
    linear = module().linear_quantized
    with pytest.raises(ValueError, match="unknown format"):
        linear(tensor_view(x), tensor_view(weight.blocks), 7, tensor_view(out), 1)
    with pytest.raises(ValueError, match="blocks must be"):
        linear(tensor_view(x), tensor_view(weight.blocks[:, :-1]), 2, tensor_view(out), 1)
    with pytest.raises(ValueError, match="multiple of the format's block"):
        linear(tensor_view(x[:, :48]), tensor_view(weight.blocks), 2, tensor_view(out), 1)
    with pytest.raises(ValueError, match="out must"):
        linear(tensor_view(x), tensor_view(weight.blocks), 2, tensor_view(out[:, :3]), 1)
    with pytest.raises(ValueError, match="dtype"):
        linear(tensor_view(x), tensor_view(weight.blocks), 2, tensor_view(out.half()), 1)
    with pytest.raises(ValueError, match="uint8"):
        linear(tensor_view(x), tensor_view(x), 2, tensor_view(out), 1)
    with pytest.raises(ValueError, match="unknown format"):
        module().dequantize(tensor_view(weight.blocks), 99, tensor_view(torch.empty((4, 64))), 1)
    with pytest.raises(ValueError, match="blocks must be"):
        module().dequantize(tensor_view(weight.blocks[:, :-2]), 2, tensor_view(torch.empty((4, 64))), 1)
