"""fmkernels bench --plot and --compare: the image a real run draws, the ratios two files give, the errors."""

import json

import pytest

from fmkernels import bench_results, cli

from test_cli import run, table_rows


def _row(op, implementation, shape, median_ms, tflops=None, gbps=None, dtype="bfloat16", **extra):
    return dict(op=op, implementation=implementation, kind="backend", shape=shape, dtype=dtype, repeats=5,
                median_ms=median_ms, tflops=tflops, gbps=gbps, skipped=None, error=None, **extra)


def _write(path, rows, device_name="GPU A"):
    path.write_text(json.dumps({"metadata": {"device": "cuda", "device_name": device_name}, "rows": rows}))
    return str(path)


def test_plot_draws_a_subplot_per_op_from_a_bench_file(tmp_path):
    rows = [_row("attention", impl, f"b={16384 // s} s={s} h=16/16 d=128 causal", 1.0, tflops=rate * s / 1024)
            for impl, rate in (("cuda", 300.0), ("sdpa", 250.0)) for s in (1024, 2048, 4096)]
    rows += [_row("decode_attention", "cuda", f"b=64 cache={c} paged/16", 0.1, tflops=2.0, gbps=c / 4)
             for c in (1024, 8192)]
    rows.append(dict(_row("sample", "cuda", "b=1 vocab=128256", None), skipped="no GPU"))
    metadata = {"device_name": "GPU A", "peak_bandwidth_gbps": 3000.0, "peak_tflops": {"bfloat16": 700.0}}
    path = tmp_path / "deep" / "plot.png"
    assert bench_results.plot(str(path), metadata, rows) == ["attention", "decode_attention"]
    image = path.read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n" and len(image) > 10_000


def test_plot_lines_follow_the_size_the_sweep_varies():
    # attention's sweep: seqlen varies, batch follows from it (tokens / seqlen), causal or not
    rows = [_row("attention", impl, f"b={16384 // s} s={s} h=16/16 d=128" + (" causal" if causal else ""), 1.0,
                 tflops=100.0) for impl in ("cuda", "sdpa") for causal in (False, True) for s in (1024, 4096)]
    assert bench_results._x_key(rows) == "s"
    labels = {bench_results._series_label(row, "s", rows) for row in rows}
    assert labels == {"cuda", "cuda causal", "sdpa", "sdpa causal"}
    # decode's grid: batch x cache, both free: a line per batch along the cache length
    rows = [_row("decode_attention", "cuda", f"b={b} cache={c} contiguous h=32/8 d=128", 1.0, gbps=1000.0)
            for b in (1, 4) for c in (1024, 8192)]
    assert bench_results._x_key(rows) == "cache"
    assert {bench_results._series_label(row, "cache", rows) for row in rows} == {"cuda b=1", "cuda b=4"}


def test_plot_without_timed_rows_is_a_clear_error(tmp_path):
    rows = [dict(_row("attention", "cuda", "b=1 s=8", None), skipped="no CUDA GPU")]
    with pytest.raises(ValueError, match="no timed rows"):
        bench_results.plot(str(tmp_path / "x.png"), {}, rows)


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    def missing():
        raise ImportError("--plot needs matplotlib: pip install 'fmkernels[plot]' (or pip install matplotlib)")

    monkeypatch.setattr(bench_results, "require_matplotlib", missing)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "append_kv", "--device", "cpu", "--plot", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "pip install 'fmkernels[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_compare_prints_ratios_side_by_side_and_rows_in_one_file(capsys, tmp_path):
    a = _write(tmp_path / "a.json", [
        _row("attention", "cuda", "b=8 s=2048", 2.0, tflops=150.0),
        _row("decode_attention", "cuda", "b=64 cache=4096", 0.5, tflops=3.0, gbps=2000.0),
        _row("attention", "triton", "b=8 s=2048", 3.0, tflops=100.0),
    ])
    b = _write(tmp_path / "b.json", [
        _row("decode_attention", "cuda", "b=64 cache=4096", 0.4, tflops=3.75, gbps=2500.0),
        _row("attention", "cuda", "b=8 s=2048", 1.5, tflops=200.0),
        _row("attention", "sdpa_flash", "b=8 s=2048", 1.8, tflops=166.7),
    ])
    status, out = run(capsys, "bench", "--compare", a, b)
    assert status == 0
    assert "different devices" not in capsys.readouterr().err
    rows = {(row[0], row[1]): row for row in table_rows(out) if row[0]}
    assert rows[("attention", "cuda")][3:9] == ["2.00 ms", "1.50 ms", "0.75x", "150 TFLOP/s", "200 TFLOP/s", "1.33x"]
    assert rows[("decode_attention", "cuda")][5:9] == ["0.80x", "2e+03 GB/s", "2.5e+03 GB/s", "1.25x"]
    assert rows[("attention", "triton")][-1] == "only in a" and rows[("attention", "triton")][5] == "-"
    assert rows[("attention", "sdpa_flash")][-1] == "only in b"


def test_compare_warns_when_devices_differ(capsys, tmp_path):
    rows = [_row("attention", "cuda", "b=8 s=2048", 2.0, tflops=150.0)]
    a, b = _write(tmp_path / "a.json", rows, "NVIDIA H100"), _write(tmp_path / "b.json", rows, "NVIDIA H200")
    assert cli.main(["bench", "--compare", a, b]) == 0
    assert "different devices: a on NVIDIA H100 (cuda), b on NVIDIA H200 (cuda)" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("not json at all", "not a bench JSON file (not JSON"),
    ('{"rows": []}', "expected an object with 'metadata'"),
    ('{"metadata": {}, "rows": [{"op": "attention"}]}', "row 0 has no implementation, kind, shape"),
    (None, "cannot read it"),
])
def test_compare_rejects_a_file_that_is_not_a_bench_json(capsys, tmp_path, content, message):
    good = _write(tmp_path / "good.json", [])
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--compare", good, str(bad)])
    err = capsys.readouterr().err
    assert f"--compare: {bad}: " in err and message in err


def test_compare_times_nothing_so_timing_options_are_an_error(capsys, tmp_path):
    a = _write(tmp_path / "a.json", [])
    with pytest.raises(SystemExit):
        cli.main(["bench", "attention", "--compare", a, a, "--json", str(tmp_path / "c.json")])
    assert "--compare reads two files and times nothing: drop OP, --json" in capsys.readouterr().err
