"""bench/cpu_linear.py runs end to end on a small workload and writes its rows and metadata."""

import json

import pytest

from fmkernels import platform

import _bench_scripts

pytestmark = pytest.mark.skipif(
    platform.unavailable_reason("cpu") is not None, reason=str(platform.unavailable_reason("cpu"))
)

def _load():
    return _bench_scripts.load("cpu_linear")


def test_small_run_writes_json(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "linear.json"
    argv = ["--shapes", "o,down", "--dtypes", "float32,bfloat16", "--rows", "1,3", "--threads", "1",
            "--stream-mib", "4", "--repeats", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "576x1536" in printed and "vs F.linear" in printed
    data = json.loads(out.read_text())
    assert data["metadata"]["command"].endswith(" ".join(argv))
    assert data["metadata"]["cpu_isa"] in ("avx512", "avx2", "generic")
    assert data["metadata"]["stream_bytes"] == 4 << 20 and data["metadata"]["peak_bandwidth_gbps"] > 0
    rows = data["rows"]
    assert [(r["shape"], r["dtype"], r["rows"]) for r in rows] == [
        (shape, dtype, n) for shape in ("o", "down") for dtype in ("float32", "bfloat16") for n in (1, 3)]
    for r in rows:
        # 4 MiB of distinct copies, at least two
        assert r["copies"] >= 2 and r["copies"] * r["n"] * r["k"] * (4 if r["dtype"] == "float32" else 2) >= 4 << 20
        assert set(r["median_gbps"]) == {"kernel", "op", "F.linear"}
        assert all(value > 0 for value in r["median_gbps"].values())
        assert all(r["best_gbps"][key] >= r["median_gbps"][key] for key in r["median_gbps"])


def test_quantized_weights_run_beside_their_dequantized_f_linear(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "linear.json"
    argv = ["--shapes", "o,down", "--weights", "q4_1,q4_k", "--dtypes", "float32", "--rows", "1,17",
            "--threads", "1", "--stream-mib", "1", "--repeats", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipped: o (576x576): K is not a whole number of q4_k blocks" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["weight"], r["rows"]) for r in rows] == [
        ("o", "q4_1", 1), ("o", "q4_1", 17), ("down", "q4_1", 1), ("down", "q4_1", 17),
        ("down", "q4_k", 1), ("down", "q4_k", 17)]
    for r in rows:
        blocks = r["n"] * r["k"] // {"q4_1": 32, "q4_k": 256}[r["weight"]] * {"q4_1": 20, "q4_k": 144}[r["weight"]]
        assert r["bytes_per_call"] == blocks + (r["rows"] * (r["k"] + r["n"])) * 4
        assert r["f_linear_bytes_per_call"] == (r["n"] * r["k"] + r["rows"] * (r["k"] + r["n"])) * 4
        assert r["speedup"] > 0 and all(value > 0 for value in r["median_us"].values())


def test_last_level_cache_is_found():
    assert _load().last_level_cache_bytes() >= 1 << 20


def test_bad_arguments_are_refused():
    bench = _load()
    for argv in (["--shapes", "lm_head"], ["--rows", "17"], ["--dtypes", "int8"], ["--weights", "q5_k"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
