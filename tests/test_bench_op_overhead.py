"""The per-call overhead benchmark: bench/op_overhead.py and ``fmkernels bench --overhead`` on a
small workload, the output check that keeps a wrong path from being timed, the target's arithmetic."""

import json

import pytest

import fmkernels
from fmkernels import benchmark, cli, platform

import _bench_scripts
from test_cli import run, table_rows

pytestmark = pytest.mark.skipif(
    platform.unavailable_reason("cpu") is not None, reason=str(platform.unavailable_reason("cpu"))
)

TIMED = {"kernel", "op", "op_no_device_checks"}


def _case(op, index=0):
    return benchmark.overhead_cases(op, "cpu")[index]


def test_small_run_writes_json(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    argv = ["--ops", "append_kv,sample", "--threads", "1", "--calls", "2", "--samples", "3", "--no-compile",
            "--json", str(out)]
    assert _bench_scripts.load("op_overhead").main(argv) == 0
    printed = capsys.readouterr().out
    meta, rows = (data := json.loads(out.read_text()))["metadata"], data["rows"]
    assert benchmark.device_label("cpu") in printed and "1 thread(s)" in printed
    assert meta["benchmark"] == "overhead" and meta["command"].endswith(" ".join(argv))
    assert meta["cpu_threads"] == 1 and meta["cpu_isa"] in ("avx512", "avx2", "generic")
    assert (meta["calls"], meta["samples"]) == (2, 3) and meta["device_name"] == benchmark.device_name("cpu")
    assert [(r["op"], r["shape"], r["dtype"]) for r in rows] == [
        (c.op, c.shape, str(c.dtype).replace("torch.", "")) for op in ("append_kv", "sample")
        for c in benchmark.overhead_cases(op, "cpu")]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    shapes = " ".join(r["shape"] for r in rows)
    assert "300/512 contiguous" in shapes and "300/512 paged/16" in shapes and "temperature=0.0" in shapes
    for r in rows:
        assert r["error"] is None and r["skipped"] == {"compiled": "--no-compile"}
        assert set(r["median_us"]) == set(r["min_us"]) == TIMED
        assert all(0 < r["min_us"][way] <= r["median_us"][way] for way in TIMED)
        assert r["overhead_us"]["op"] == pytest.approx(r["median_us"]["op"] - r["median_us"]["kernel"])
        assert r["target_us"] == pytest.approx(1.3 * r["median_us"]["kernel"] + 15)
        assert r["meets_target"] == (r["median_us"]["op"] <= r["target_us"])
        line = next(line for line in printed.splitlines() if r["shape"] in line and r["dtype"] in line)
        assert line.split()[-1] == ("PASS" if r["meets_target"] else "FAIL")


def test_compiled_op_is_timed_after_its_output_is_checked():
    row = benchmark.measure_overhead(_case("linear"), calls=2, samples=2)
    assert row.error is None and not row.skipped
    assert set(row.median_us) == TIMED | {"compiled"}
    assert row.target_us is None and row.meets_target is None  # the target is for decode's ops
    assert benchmark.overhead_cells(row)[-2:] == ["-", "-"]


def _wrong(backend=None, write=True, **changes):
    """Builds the op's calls on another backend or with other arguments, or (write=False) calls
    that return the caches unwritten."""

    def build(op, default_backend, kwargs, compiled):
        if not write:
            return lambda: (kwargs["k_cache"], kwargs["v_cache"])
        return lambda: getattr(fmkernels, op)(**{**kwargs, **changes}, backend=backend or default_backend)

    return build


@pytest.mark.parametrize("op, index, wrong", [
    ("decode_attention", 1, _wrong(backend="reference")),  # close to the kernel's output, not equal
    ("sample", 5, _wrong(seed=1)),  # top-k/top-p draws, other seeds
    ("append_kv", 1, _wrong(write=False)),  # the caches as they were: the new token never written
])
def test_an_op_whose_output_differs_from_the_kernel_is_not_timed(op, index, wrong):
    row = benchmark.measure_overhead(_case(op, index), calls=1, samples=1, compile_op=False, public_op=wrong)
    assert row.error.startswith("op's output differs from the kernel's on the same inputs")
    assert not row.median_us and row.meets_target is None


def test_the_target_is_1_3_times_the_kernel_plus_15_us_for_decode_ops():
    for op in ("append_kv", "decode_attention", "sample"):
        assert benchmark.overhead_target_us(op, 100.0) == pytest.approx(145.0)
        assert benchmark.overhead_target_us(op, 0.0) == pytest.approx(15.0)
    for op in ("attention", "linear", "filter_logits"):
        assert benchmark.overhead_target_us(op, 100.0) is None

    def cells(op_us, meets):
        row = benchmark.OverheadRow("sample", "b=1", "float32", "cpu", 10, 3, median_us={"kernel": 100.0, "op": op_us},
                                    min_us={"kernel": 90.0, "op": op_us}, overhead_us={"op": op_us - 100.0},
                                    target_us=145.0, meets_target=meets)
        return benchmark.overhead_cells(row)

    # kernel, op, op - kernel, no device checks, - kernel, compiled, - kernel, target, verdict
    assert cells(140.0, True) == ["100.0/90.0", "140.0/140.0", "+40.0", "-", "-", "-", "-", "145.0", "PASS"]
    assert cells(150.0, False)[-1] == "FAIL"


def test_cli_bench_overhead_prints_the_rows_and_writes_json(capsys, tmp_path):
    out = tmp_path / "overhead.json"
    status, printed = run(capsys, "bench", "--overhead", "append_kv", "--device", "cpu", "--calls", "2",
                          "--repeats", "2", "--no-compile", "--json", str(out))
    assert status == 0
    rows = [row for row in table_rows(printed) if row[0]]
    assert [row[0] for row in rows] == ["append_kv"] * len(benchmark.overhead_cases("append_kv", "cpu"))
    assert all(row[1] == "cpu" and row[-2] in ("PASS", "FAIL") for row in rows)
    data = json.loads(out.read_text())
    assert data["metadata"]["command"].startswith("fmkernels bench --overhead append_kv")
    assert data["metadata"]["samples"] == 2 and data["rows"][0]["calls"] == 2


def test_compare_refuses_overhead_files(capsys, tmp_path):
    path = tmp_path / "overhead.json"
    benchmark.write_json(str(path), [], benchmark.overhead_metadata("cpu", "fmkernels bench --overhead", 1, 1))
    with pytest.raises(SystemExit):
        cli.main(["bench", "--compare", str(path), str(path)])
    assert f"--compare: {path}: an op-overhead file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "linear", "--calls", "3"], "--calls: only with --overhead"),
    (["bench", "--overhead", "--sweep"], "--overhead times the public ops and their kernels only: drop --sweep"),
])
def test_overhead_options_are_refused_where_they_do_not_apply(capsys, argv, message):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err
