"""The benchmark's accounting: roofline fractions and comparisons against the reference and peers."""

import pytest
import torch

from fmkernels import benchmark
from fmkernels.benchmark import BenchRow, Peaks


def test_visible_pairs_counts_bottom_right_causal_pairs():
    assert benchmark.visible_pairs(4, 4, causal=False) == 16
    assert benchmark.visible_pairs(4, 4, causal=True) == 1 + 2 + 3 + 4
    assert benchmark.visible_pairs(2, 5, causal=True) == 4 + 5
    assert benchmark.visible_pairs(5, 2, causal=True) == 0 + 0 + 0 + 1 + 2


def test_roofline_fraction_uses_the_binding_limit():
    peaks = Peaks(bandwidth_gbps=100.0, tflops={"float32": 1.0})
    # 1 GFLOP at 1 TFLOP/s takes 1 ms; 10 MB at 100 GB/s takes 0.1 ms: compute binds.
    assert benchmark.roofline_fraction(10**9, 10**7, 2e-3, "float32", peaks) == pytest.approx(0.5)
    # 1 GB at 100 GB/s takes 10 ms: memory binds.
    assert benchmark.roofline_fraction(10**9, 10**9, 20e-3, "float32", peaks) == pytest.approx(0.5)
    # No FLOP rate measured for the dtype: only the bytes count.
    assert benchmark.roofline_fraction(10**9, 10**8, 2e-3, "bfloat16", peaks) == pytest.approx(0.5)
    assert benchmark.roofline_fraction(None, None, 1.0, "float32", peaks) is None


def _row(implementation, kind, median_ms, shape="s"):
    return BenchRow(op="attention", implementation=implementation, kind=kind, shape=shape, dtype="float32",
                    repeats=3, median_ms=median_ms, flops=10**9, bytes=None)


def test_comparisons_against_the_reference_and_the_fastest_peer():
    rows = [
        _row("cpu", "backend", 10.0), _row("reference", "backend", 40.0),
        _row("sdpa", "peer", 20.0), _row("slow_peer", "peer", 80.0),
        _row("cpu", "backend", 5.0, shape="other"),  # nothing to compare to for this shape
        BenchRow(op="attention", implementation="cuda", kind="backend", shape="s", dtype="float32", repeats=3,
                 skipped="no GPU"),
    ]
    cpu, reference, sdpa, slow_peer, other, cuda = benchmark.with_comparisons(rows, Peaks(100.0, {"float32": 1.0}))
    assert cpu.speedup == pytest.approx(4.0) and cpu.peer == "sdpa" and cpu.vs_peer == pytest.approx(2.0)
    assert reference.speedup == pytest.approx(1.0)
    assert slow_peer.vs_peer == pytest.approx(0.25)
    assert cpu.roofline == pytest.approx(0.1)  # 1 ms allowed, 10 ms taken
    assert other.speedup is None and other.vs_peer is None
    assert cuda.median_ms is None and cuda.speedup is None and cuda.roofline is None


def test_measured_peaks_are_positive_and_recorded_per_dtype():
    peaks = benchmark.measure_peaks("cpu", [torch.float32, torch.float32])
    assert peaks.bandwidth_gbps > 0
    assert list(peaks.tflops) == ["float32"] and peaks.tflops["float32"] > 0


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sweep_grids_cover_every_op_and_count_their_work(device):
    # Cases are descriptions: building them allocates nothing, so the CUDA grid is listable anywhere.
    attention = benchmark.sweep_cases("attention", device)
    assert {case.shape.endswith("causal") for case in attention} == {True, False}
    for case in attention:
        batch, seqlen = (int(part.split("=")[1]) for part in case.shape.split()[:2])
        causal = case.shape.endswith("causal")
        assert case.flops == 4 * 16 * 128 * batch * benchmark.visible_pairs(seqlen, seqlen, causal)
    decode = benchmark.sweep_cases("decode_attention", device)
    assert any("paged/16" in case.shape for case in decode) and any("contiguous" in case.shape for case in decode)
    for case in decode:
        batch, context = int(case.shape.split()[0][2:]), int(case.shape.split()[1][6:])
        itemsize = torch.empty((), dtype=case.dtype).element_size()
        # K and V of 8 heads x 128 read once per cached position; q and out of 32 x 128.
        assert case.bytes == (2 * batch * context * 8 * 128 + 2 * batch * 32 * 128) * itemsize
    for op in ("append_kv", "filter_logits", "sample"):
        assert benchmark.sweep_cases(op, device) and all(case.bytes for case in benchmark.sweep_cases(op, device))
    linear = benchmark.sweep_cases("linear", device)
    assert len({case.shape for case in linear}) == len(linear) > 1
    for case in linear:
        rows, n, k = (int(part.split("=")[1]) for part in case.shape.split())
        itemsize = torch.empty((), dtype=case.dtype).element_size()
        assert case.flops == 2 * rows * n * k and case.bytes == (n * k + rows * k + rows * n) * itemsize
    with pytest.raises(ValueError, match="op must be one of"):
        benchmark.sweep_cases("softmax", device)


def test_plan_keeps_only_the_named_implementations():
    jobs = benchmark.plan(["sample"], "cpu", only=["cpu", "reference"])
    assert {job.impl.name for job in jobs} == {"cpu", "reference"}
    assert len(jobs) == 2 * len(benchmark.default_cases("sample", "cpu"))
    swept = benchmark.plan(["sample"], "cpu", sweep=True, only=["reference"])
    assert [job.case.shape for job in swept] == [case.shape for case in benchmark.sweep_cases("sample", "cpu")]
    with pytest.raises(ValueError, match="no implementation named nope"):
        benchmark.plan(["sample"], "cpu", only=["reference", "nope"])
