"""The fmkernels command line, run in-process (cli.main) and once as ``python -m fmkernels``."""

import json
import subprocess
import sys

import pytest
import torch

import fmkernels
from fmkernels import cli, reference, registry

# --impl imports this module by the name pytest gave it (it is in sys.modules already).
HERE = __name__


def wrong_attention(q, k, v, *, causal=False, **kwargs):
    """Forgets the causal mask."""
    return reference.attention(q, k, v, causal=False, **kwargs)


def upcast_attention(q, k, v, **kwargs):
    """A correct attention: the reference's math on float64 inputs, returned in q's dtype."""
    result = reference.attention(q.double(), k.double(), v.double(), **kwargs)
    if kwargs.get("return_lse"):
        out, lse = result
        return out.to(q.dtype), lse.float()
    return result.to(q.dtype)


def run(capsys, *argv):
    """(exit status, stdout) of ``fmkernels argv``."""
    status = cli.main(list(argv))
    return status, capsys.readouterr().out


def table_rows(out):
    """The cells of each line of a printed rich table."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]


def test_version_from_python_dash_m():
    completed = subprocess.run(
        [sys.executable, "-m", "fmkernels", "--version"], capture_output=True, text=True, timeout=120, check=True
    )
    assert completed.stdout.strip() == f"fmkernels {fmkernels.__version__}"


def test_check_passes_every_registered_implementation(capsys):
    status, out = run(capsys, "check", "--device", "cpu")
    assert status == 0, out
    assert " 0 failed" in out and "FAIL" not in out
    results = {(row[0], row[1]): row[-1] for row in table_rows(out) if row[0]}
    for op in registry.OPS:
        assert results[(op, "reference")] == "pass"
    for backend in ("cpu", "triton"):  # triton through the interpreter (conftest)
        assert results[("append_kv", backend)] == "pass"
    assert results[("append_kv", "cuda")].startswith("skipped")


def test_check_fails_a_wrong_user_implementation(capsys):
    status, out = run(capsys, "check", "attention", "--impl", f"{HERE}:wrong_attention")
    assert status == 1
    assert "FAIL" in out
    assert f"{HERE}:wrong_attention" in out


def test_check_passes_a_correct_user_implementation_and_unregisters_it(capsys):
    spec = f"{HERE}:upcast_attention"
    status, out = run(capsys, "check", "attention", "--impl", spec, "--seed", "3")
    assert status == 0, out
    assert spec in out and "seed=3" in out
    assert spec not in [impl.name for impl in registry.implementations("attention")]


def test_bench_prints_rows_and_writes_json(capsys, tmp_path):
    path = tmp_path / "results" / "bench.json"
    status, out = run(capsys, "bench", "append_kv", "filter_logits", "--device", "cpu", "--repeats", "2",
                      "--json", str(path))
    assert status == 0, out
    assert "append_kv" in out and "filter_logits" in out and "GB/s" in out

    report = json.loads(path.read_text())
    assert set(report["metadata"]) >= {"device", "device_name", "torch_version", "fmkernels_version", "date", "command"}
    assert report["metadata"]["command"].startswith("fmkernels bench append_kv filter_logits")
    assert report["metadata"]["torch_version"] == torch.__version__
    rows = {(row["op"], row["implementation"]): row for row in report["rows"]}
    assert set(rows) >= {("append_kv", "reference"), ("append_kv", "cpu"), ("filter_logits", "reference")}
    expected_keys = {"op", "implementation", "shape", "dtype", "median_ms", "tflops", "gbps", "speedup", "skipped"}
    assert all(expected_keys <= set(row) for row in report["rows"])
    assert rows[("append_kv", "reference")]["speedup"] == 1.0
    assert rows[("append_kv", "cpu")]["median_ms"] > 0 and rows[("append_kv", "cpu")]["gbps"] > 0
    assert rows[("append_kv", "cuda")]["skipped"]


def test_backends_lists_all_four(capsys):
    status, out = run(capsys, "backends")
    assert status == 0
    for name in ("reference", "cpu", "triton", "cuda"):
        assert name in out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["check", "softmax"], "invalid op 'softmax'"),
        (["check", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["bench", "--repeats", "0"], "must be >= 1"),
        (["check", "--seed", "x"], "must be an integer"),
        (["check", "--impl", f"{HERE}:wrong_attention"], "--impl needs the op(s)"),
        (["check", "attention", "--impl", "no_such_module_here:fn"], "cannot import 'no_such_module_here'"),
        (["check", "attention", "--impl", "no_colon"], "module:function"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err
