"""bench/transformers_integration.py runs end to end on small sizes: FilterLogits keeps
transformers' tokens on every row, the generate rows use the real checkpoint with the same
greedy tokens under both attention implementations, and the JSON holds rows and metadata."""

import json

import pytest

pytest.importorskip("transformers")

import _bench_scripts  # noqa: E402


def test_filter_rows_keep_transformers_tokens(tmp_path):
    bench = _bench_scripts.load("transformers_integration")
    path = tmp_path / "integration.json"
    assert bench.main(["--vocab", "1000", "--batches", "1,3", "--rounds", "1", "--generate", "none",
                       "--json", str(path)]) == 0
    written = json.loads(path.read_text())
    assert "transformers_version" in written["metadata"] and "command" in written["metadata"]
    rows = written["rows"]
    assert len(rows) == 2 * len(bench.PARAMETERS)
    for row in rows:
        assert row["kind"] == "filter" and row["differ_at_rounding_cuts_only"]
        assert row["speedup"] == pytest.approx(row["transformers_us"] / row["fmkernels_us"])


def test_generate_rows_on_the_real_checkpoint(smollm2_gguf, tmp_path):
    pytest.importorskip("gguf")
    bench = _bench_scripts.load("transformers_integration")
    path = tmp_path / "integration.json"
    assert bench.main(["--vocab", "64", "--batches", "1", "--rounds", "1", "--generate-batches", "3",
                       "--prompt-len", "12", "--new-tokens", "3", "--repeats", "1", "--backend", "cpu",
                       "--json", str(path)]) == 0
    rows = [row for row in json.loads(path.read_text())["rows"] if row["kind"] == "generate"]
    assert [(row["batch"], row["backend"]) for row in rows] == [(3, "cpu")]
    assert rows[0]["same_tokens"] and rows[0]["sdpa_ms"] > 0 and rows[0]["fmkernels_ms"] > 0
