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
