"""fmkernels.QuantizedWeight and the reference's quantized linear.

The dequantization is held to the ``gguf`` package's, bit for bit, on weights made by
``quantize`` and on blocks of random bytes (every bit pattern of the quants, with finite
fp16 scales); ``quantize`` to ggml's reference quantizers where the package has them (q8_0,
q4_0, q4_1). Then the weight object's checks, slices and lookups, and ``fmkernels.linear``'s
handling of it: its checks, out=, torch.compile, the flop count and the tolerance of
``fmkernels check``.
"""

import math

import numpy as np
import pytest
import torch

import fmkernels
from fmkernels import testing
from fmkernels.quantized import FORMATS, GGML_TYPES, QuantizedWeight, dequantize, quantize

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

NAMES = sorted(FORMATS)
# Where each format keeps its fp16 fields (byte offsets in a block): random bytes there would
# be NaN or infinite halves, which no checkpoint holds.
HALF_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q4_k": (0, 2), "q6_k": (208,)}


def random_blocks(format, n, k, seed=0):
    """Blocks (n, k / B * bytes) of random bytes, with small finite fp16 fields."""
    fmt = FORMATS[format]
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // fmt.block_size, fmt.block_bytes), generator=generator, dtype=torch.uint8)
    for offset in HALF_FIELDS[format]:
        halves = ((torch.rand(n, k // fmt.block_size, generator=generator) - 0.3) * 0.05).half()
        blocks[..., offset:offset + 2] = halves.view(torch.uint8).view(n, -1, 2)
    return blocks.view(n, -1)


def gguf_dequantize(blocks, format):
    return torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), GGMLQuantizationType[format.upper()]))


def k_for(format, blocks=3):
    return FORMATS[format].block_size * blocks


@pytest.mark.parametrize("format", NAMES)
def test_formats_are_ggmls(format):
    fmt = FORMATS[format]
    kind = GGMLQuantizationType[format.upper()]
    assert (fmt.block_size, fmt.block_bytes) == gguf_quants.GGML_QUANT_SIZES[kind]
    assert fmt.ggml_type == int(kind) and GGML_TYPES[int(kind)] == format


@pytest.mark.parametrize("format", NAMES)
@pytest.mark.parametrize("seed", range(3))
def test_dequantize_equals_gguf_bit_for_bit(format, seed):
    n, k = 7, k_for(format, 3)
    blocks = random_blocks(format, n, k, seed)
    assert torch.equal(dequantize(blocks, format, k), gguf_dequantize(blocks, format))
    weight = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), format)
    assert torch.equal(weight.dequantize(), gguf_dequantize(weight.blocks, format))


@pytest.mark.parametrize("format", ["q8_0", "q4_0", "q4_1"])
def test_quantize_equals_ggmls_reference_rounding(format):
    values = torch.randn(9, 320, generator=torch.Generator().manual_seed(1)) * 3
    values[0, :32] = 0  # a block of zeros: scale 0
    theirs = gguf_quants.quantize(values.numpy(), GGMLQuantizationType[format.upper()])
    assert torch.equal(quantize(values, format).blocks, torch.from_numpy(theirs))


@pytest.mark.parametrize("format", NAMES)
def test_quantize_round_trip_error(format):
    """Each weight within one quantization step (plus the fp16 scales' rounding) of its value."""
    values = torch.randn(5, k_for(format, 2), generator=torch.Generator().manual_seed(2))
    error = (quantize(values, format).dequantize() - values).abs().max().item()
    levels = {"q8_0": 254, "q4_0": 15, "q4_1": 15, "q4_k": 15, "q6_k": 63}[format]
    step = 2 * values.abs().max().item() / levels
    assert error <= step, (error, step)
    zeros = quantize(torch.zeros(2, k_for(format, 1)), format)
    assert torch.equal(zeros.dequantize(), torch.zeros(2, k_for(format, 1)))


def test_weight_checks_its_blocks():
    good = random_blocks("q4_1", 4, 64)
    assert QuantizedWeight(good, "Q4_1", (4, 64)).format == "q4_1"
    cases = [
        ((good, "q5_3", (4, 64)), ValueError, "format must be one of"),
        ((good, 3, (4, 64)), TypeError, "format must be a str"),
        ((good.view(torch.int8), "q4_1", (4, 64)), TypeError, "dtype uint8"),
        ((good.numpy(), "q4_1", (4, 64)), TypeError, "blocks must be a torch.Tensor"),
        ((good, "q4_1", (4, 48)), ValueError, "multiple of q4_1's block of 32"),
        ((good[:, :-1], "q4_1", (4, 64)), ValueError, r"blocks must be \(N, K / 32 \* 20\) = \(4, 40\)"),
        ((good[:3], "q4_1", (4, 64)), ValueError, r"= \(4, 40\)"),
        ((good.reshape(-1), "q4_1", (4, 64)), ValueError, "got shape"),
        ((good, "q4_1", (4, -64)), ValueError, "shape must be two non-negative ints"),
        ((good, "q4_1", (4.0, 64)), ValueError, "shape must be two non-negative ints"),
        ((good.T.contiguous().T, "q4_1", (4, 64)), ValueError, "unit stride"),
        ((good[:1].expand(4, 40), "q4_1", (4, 64)), ValueError, "overlap"),
        ((random_blocks("q4_k", 2, 256), "q4_k", (2, 128)), ValueError, "multiple of q4_k's block of 256"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            QuantizedWeight(*args)
    weight = QuantizedWeight(good, "q4_1", (4, 64))
    with pytest.raises(AttributeError, match="immutable"):
        weight.blocks = good


def test_slices_and_embedding():
    k = 256 * 2
    weight = quantize(torch.randn(9, k, generator=torch.Generator().manual_seed(3)), "q4_k")
    full = weight.dequantize()
    assert torch.equal(weight.rows(2, 7).dequantize(), full[2:7])
    columns = weight.columns(256, 512)
    assert columns.blocks.stride(0) == weight.blocks.stride(0)  # a view of the same rows
    assert torch.equal(columns.dequantize(), full[:, 256:])
    ids = torch.tensor([[8, 0, 3], [3, 3, 1]])
    assert torch.equal(weight.embedding(ids), full[ids])
    assert weight.embedding(ids, torch.bfloat16).dtype == torch.bfloat16
    assert weight.nbytes == 9 * 2 * 144 and weight.block_format.bits_per_weight == 4.5
    for bad in [lambda: weight.columns(0, 100), lambda: weight.columns(256, 1024), lambda: weight.rows(5, 3)]:
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("format", NAMES)
def test_reference_linear_is_the_dequantized_matmul(format):
    k = k_for(format, 2)
    weight = QuantizedWeight(random_blocks(format, 33, k, 4), format, (33, k))
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(5))
    out = torch.full((2, 3, 33), math.nan)
    result = fmkernels.linear(x, weight, backend="reference", out=out)
    assert result is out
    assert torch.equal(out, (x @ weight.dequantize().T))
    check = testing.compare_linear(dict(x=x, weight=weight), out)
    assert check.passed, check.detail


def test_linear_checks_a_quantized_call():
    weight = quantize(torch.randn(5, 64), "q8_0")
    cases = [
        (lambda: fmkernels.linear(torch.randn(3, 32), weight), ValueError, "x's K = 32"),
        (lambda: fmkernels.linear(torch.randn(3, 64).double(), weight), TypeError, "x must have dtype"),
        (lambda: fmkernels.linear(torch.tensor(1.0), weight), ValueError, "at least 1 dimension"),
        (lambda: fmkernels.linear(torch.randn(3, 64), weight, out=torch.empty(3, 4)), ValueError, "out"),
        (lambda: fmkernels.linear(torch.randn(3, 64), weight, backend=3), TypeError, "backend must be a str"),
        (lambda: fmkernels.linear(torch.randn(3, 64), weight, backend="torch_linear"), ValueError, "F.linear"),
        (lambda: fmkernels.linear(torch.randn(3, 64), weight, backend="nope"), ValueError, "backend for linear"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    elsewhere = QuantizedWeight(torch.empty(weight.blocks.shape, dtype=torch.uint8, device="meta"), "q8_0", (5, 64))
    with pytest.raises(ValueError, match="x's device"):
        fmkernels.linear(torch.randn(3, 64), elsewhere)


def test_quantized_linear_compiles_and_counts_its_flops():
    from torch.utils.flop_counter import FlopCounterMode

    weight = quantize(torch.randn(7, 256, generator=torch.Generator().manual_seed(6)), "q6_k")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(7))
    expected = fmkernels.linear(x, weight, backend="reference")
    compiled = torch.compile(lambda x: fmkernels.linear(x, weight, backend="reference"), fullgraph=True)
    assert torch.equal(compiled(x), expected)
    with FlopCounterMode(display=False) as counter:
        fmkernels.linear(x, weight, backend="reference")
    assert counter.get_total_flops() == 2 * 3 * 7 * 256


def test_the_tolerance_fails_a_wrong_result():
    weight = quantize(torch.randn(6, 96, generator=torch.Generator().manual_seed(8)), "q4_0")
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(9))
    exact = x @ weight.dequantize().T
    assert testing.compare_linear(dict(x=x, weight=weight), exact).passed
    truth = exact.double()
    bound = testing.quantized_linear_tolerance(x, weight.dequantize(), truth, torch.float32)
    wrong = exact.clone()
    wrong[2, 3] += 1.5 * float(bound[2, 3])
    result = testing.compare_linear(dict(x=x, weight=weight), wrong)
    assert not result.passed and "1 elements beyond" in result.detail
    unwritten = exact.clone()
    unwritten[0, 0] = math.nan
    assert not testing.compare_linear(dict(x=x, weight=weight), unwritten).passed


def test_the_tolerance_holds_int8_activations():
    """x quantized to int8 per block of 32, as the cpu kernel does: within the bound, and the
    bound's first term is what lets it pass."""
    weight = quantize(torch.randn(40, 320, generator=torch.Generator().manual_seed(10)), "q4_1")
    x = torch.randn(5, 320, generator=torch.Generator().manual_seed(11))
    blocks = x.view(5, 10, 32)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127
    rounded = (torch.round(blocks / step) * step).view(5, 320)
    out = (rounded.double() @ weight.dequantize().double().T).float()
    assert testing.compare_linear(dict(x=x, weight=weight), out).passed
    bound = testing.quantized_linear_tolerance(x, weight.dequantize(), (x.double() @ weight.dequantize().double().T),
                                               torch.float32)
    assert float(bound.min()) > 0
