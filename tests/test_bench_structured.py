"""bench/masked_sampling.py and bench/structured_decode.py: each runs end to end on small sizes
and writes its rows with the run's metadata; the decode bench's timers see the constraint's work
and leave fmkernels as they found it."""

import json

import pytest

import _bench_scripts
from fmkernels import ops
from fmkernels.model import structured


def test_masked_sampling_writes_ratios_of_the_same_logits(tmp_path):
    bench = _bench_scripts.load("masked_sampling")
    path = tmp_path / "masked.json"
    assert bench.main(["--vocab", "1000", "--batches", "1,3", "--rounds", "1", "--json", str(path)]) == 0
    written = json.loads(path.read_text())
    assert written["metadata"]["device"] == "cpu" and "command" in written["metadata"]
    rows = written["rows"]
    # two backends x two batches x two parameter sets x three masks
    assert len(rows) == 2 * 2 * 2 * 3
    for row in rows:
        assert row["ratio"] == pytest.approx(row["masked_us"] / row["unmasked_us"])
        assert row["mask"] in bench.MASKS and not row["kernel_only"]


def test_structured_decode_times_the_constraint_and_restores_what_it_wraps(smollm2_gguf, tmp_path):
    pytest.importorskip("llguidance")
    bench = _bench_scripts.load("structured_decode")
    saved = (ops.sample, structured.RowMasks.fill, structured._EngineMatcher.consume)
    path = tmp_path / "decode.json"
    assert bench.main(["--models", "tiny", "--batches", "2", "--new-tokens", "6", "--repeats", "1",
                       "--json", str(path)]) == 0
    assert (ops.sample, structured.RowMasks.fill, structured._EngineMatcher.consume) == saved
    (row,) = json.loads(path.read_text())["rows"]
    assert row["model"] == "tiny" and row["batch"] == 2
    assert row["free"]["mask_ms"] == 0 and row["constrained"]["mask_ms"] > 0
    assert row["free"]["sample_ms"] > 0 and row["constrained"]["sample_ms"] > 0
    assert row["step_ratio"] == pytest.approx(row["constrained"]["step_ms"] / row["free"]["step_ms"])
