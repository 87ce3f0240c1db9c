"""The C++ CPU linear kernel against the float64 reference.

Tolerance (DESIGN.md, attention's rule): error to the float64 reference <= 2 x the error of
torch's F.linear in the same dtype + 1e-5. Outputs start as NaN, so an unwritten element
fails; sizes are odd so every vector tail and every partial group of weight rows runs.
"""

import math

import pytest
import torch

import fmkernels
from fmkernels import platform, registry, testing
from fmkernels._views import tensor_view

pytestmark = pytest.mark.skipif(
    platform.unavailable_reason("cpu") is not None, reason=str(platform.unavailable_reason("cpu"))
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [1, 2, 3, 8, 13, 16]
KS = [1, 7, 64, 576, 1000]
NS = [1, 5, 33, 1536]


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def inputs(leading, n, k, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((*leading, k), generator=generator).to(dtype)
    weight = (torch.randn((n, k), generator=generator) / math.sqrt(max(k, 1))).to(dtype)
    return x, weight


def run_cpu(x, weight):
    out = torch.full((*x.shape[:-1], weight.shape[0]), math.nan, dtype=x.dtype)
    result = fmkernels.linear(x, weight, backend="cpu", out=out)
    assert result.data_ptr() == out.data_ptr()
    return out


def assert_matches_reference(x, weight, actual=None):
    actual = run_cpu(x, weight) if actual is None else actual
    result = testing.compare_linear(dict(x=x, weight=weight), actual)
    assert result.passed, result.detail
    return actual


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", KS)
def test_matches_reference(rows, k, dtype):
    for seed, n in enumerate(NS):
        assert_matches_reference(*inputs((rows,), n, k, dtype, seed))


@pytest.mark.parametrize("isa", ["avx2", "generic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_narrower_instruction_sets(monkeypatch, isa, dtype):
    """The AVX2 and baseline x86-64 variants the dispatcher picks on older CPUs."""
    monkeypatch.setenv("FMKERNELS_CPU_ISA", isa)
    for seed, (rows, n, k) in enumerate([(1, 5, 7), (3, 33, 64), (13, 1536, 576), (16, 33, 1000), (2, 1, 1)]):
        assert_matches_reference(*inputs((rows,), n, k, dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_leading_dimensions_are_rows(dtype):
    for leading in [(2, 3), (2, 1, 4), (1, 1, 1, 16)]:
        x, weight = inputs(leading, 33, 64, dtype)
        out = assert_matches_reference(x, weight)
        assert out.shape == (*leading, 33)
        flat = fmkernels.linear(x.reshape(-1, 64), weight, backend="cpu")
        assert torch.equal(out.reshape(-1, 33), flat)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_strided_inputs(dtype):
    x, weight = inputs((5,), 40, 100, dtype, seed=1)
    wide_x = torch.full((5, 120), math.nan, dtype=dtype)
    wide_x[:, 7:107] = x
    wide_weight = torch.full((40, 130), math.nan, dtype=dtype)
    wide_weight[:, 3:103] = weight
    variants = {
        "x rows of a wider buffer": (wide_x[:, 7:107], weight),
        "x transposed": (x.T.contiguous().T, weight),
        "x one row expanded": (x[2:3].expand(4, 100), weight),
        "weight rows of a wider buffer": (x, wide_weight[:, 3:103]),
        "weight transposed": (x, weight.T.contiguous().T),
        "every other weight row": (x, torch.repeat_interleave(weight, 2, dim=0)[::2]),
    }
    expected = fmkernels.linear(x, weight, backend="cpu")
    for name, (a, b) in variants.items():
        assert not (a.is_contiguous() and b.is_contiguous()), name
        out = assert_matches_reference(a, b)
        if name != "x one row expanded":
            assert torch.equal(out, expected), name


def test_out_buffer_that_is_not_contiguous():
    x, weight = inputs((3,), 33, 64, torch.float32)
    wide = torch.full((3, 40), math.nan)
    result = fmkernels.linear(x, weight, backend="cpu", out=wide[:, 2:35])
    assert result.data_ptr() == wide[:, 2:35].data_ptr()
    assert torch.equal(wide[:, 2:35], fmkernels.linear(x, weight, backend="cpu"))
    assert wide[:, :2].isnan().all() and wide[:, 35:].isnan().all()


def test_results_do_not_depend_on_the_thread_count():
    x, weight = inputs((13,), 1536, 576, torch.bfloat16)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fmkernels.linear(x, weight, backend="cpu"))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nan_and_inf_reach_only_their_outputs(dtype):
    """Padding past K contributes nothing: an inf in x's last element, a NaN in one weight row."""
    x, weight = inputs((3,), 5, 19, dtype)
    x[1, 18] = math.inf
    weight[3, 18] = math.nan
    out = run_cpu(x, weight)
    expected = fmkernels.reference.linear(x, weight)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
    assert out[:, 3].isnan().all() and out[1, [0, 1, 2, 4]].isinf().all()
    assert out[[0, 2]][:, [0, 1, 2, 4]].isfinite().all()


def test_empty_sizes():
    for leading, n, k in [((0,), 5, 7), ((3,), 0, 7), ((3,), 5, 0), ((2, 0), 5, 7)]:
        x, weight = inputs(leading, n, k, torch.float32)
        out = fmkernels.linear(x, weight, backend="cpu")
        assert out.shape == (*leading, n) and torch.equal(out, torch.zeros_like(out))


def test_more_than_16_rows_is_for_torch():
    x, weight = inputs((17,), 5, 7, torch.float32)
    with pytest.raises(ValueError, match="backend 'cpu' cannot run this linear call: 17 rows of x > 16"):
        fmkernels.linear(x, weight, backend="cpu")
    assert registry.select("linear", "auto", dict(x=x, weight=weight)).name == "reference"
    assert registry.select("linear", "auto", dict(x=x[:16], weight=weight)).name == "cpu"


def test_kernel_rejects_views_it_cannot_read():
    """The binding's own checks: what the adapter never passes is refused, not read out of bounds."""
    module = platform.cpu_module()
    x, weight = inputs((3,), 5, 8, torch.float32)
    out = torch.empty(3, 5)
    calls = {
        "weight's K differs from x's": (x, weight[:, :7], out),
        "unit stride along their last dimension": (x, weight.T.contiguous().T, out),
        "must share one dtype": (x, weight.half(), out),
        "out must be \\(rows, N\\)": (x, weight, torch.empty(3, 4)),
        "must be 2-D": (x[None], weight, out),
        "out's rows overlap": (x, weight, torch.empty(5).expand(3, 5)),
    }
    for message, (a, b, c) in calls.items():
        with pytest.raises(ValueError, match=message):
            module.linear(tensor_view(a), tensor_view(b), tensor_view(c), 1)
