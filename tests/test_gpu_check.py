"""bench/gpu_check.sh's dry run, its time budget, and the scripts a device call runs.

A lent GPU has 15 minutes in all; the call that spends them must not fail on a typo or a
stale selection. The dry run (FMKERNELS_GPU_CHECK_DRY_RUN=1) prints every command with its
time limit and imports its Python parts (bench/gpu_check_dry_run.py): pytest collects each
selection, the CLI and the bench scripts parse their arguments. These tests run it here.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from fmkernels import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check_dry_run  # noqa: E402
import gpu_targets  # noqa: E402

SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
ALL_STAGES = ["build", "test", "check", "memcheck", "racecheck", "fuzz", "targets", "model", "sweep", "variants"]
CALL_SECONDS = 9 * 60  # what one device call may take, the machine's start aside (../shared/GPU.md)


def _dry_run(*stages, **env):
    environment = dict(os.environ, FMKERNELS_GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable, OUT="", **env)
    environment.pop("TRITON_INTERPRET", None)  # as on the device: the scripts set nothing up
    return subprocess.run(["bash", SCRIPT, *stages], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=600)


def _summary(stdout):
    """{stage: (verdict, text)} of the summary lines at the end of the output."""
    lines = stdout.split("== summary", 1)[1].splitlines()[1:]
    return {line.split()[0]: (line.split()[1], line) for line in lines if line.strip()}


def test_the_dry_run_of_all_imports_every_command_and_fits_the_call():
    result = _dry_run("all")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = _summary(result.stdout)
    assert list(summary) == ALL_STAGES
    assert all(verdict == "ok" for verdict, _ in summary.values()), summary
    counted = re.search(r"dry run: (\d+) commands, 0 failed", result.stdout)
    assert counted and int(counted.group(1)) >= len(ALL_STAGES)
    # The dry run's clock runs every command to its limit: the worst case still fits the call.
    spent = [int(seconds) for seconds in re.findall(r"^== \w+: (\d+) s$", result.stdout, re.M)]
    assert len(spent) == len(ALL_STAGES) and sum(spent) <= CALL_SECONDS - 10


def test_stages_past_the_budget_are_skipped_and_say_so():
    result = _dry_run("build", "check", "targets", BUDGET_S="100")
    assert result.returncode == 0, result.stdout[-3000:]
    summary = _summary(result.stdout)
    assert summary["build"][0] == "ok" and summary["check"][0] == "ok"
    assert summary["targets"][0] == "skipped" and "out of budget" in summary["targets"][1]
    assert "+ [10 s]" in result.stdout  # check's limit, cut to what build left of the 100 s


def test_an_unknown_stage_ends_the_call_before_anything_runs():
    result = _dry_run("build", "tset")
    assert result.returncode == 2
    assert "unknown stage tset" in result.stderr and "+ [" not in result.stdout


def test_the_wrappers_are_looked_through():
    command = ["timeout", "-k", "10", "60", "env", "A=1", "B=2", "compute-sanitizer", "--tool", "memcheck",
               "--error-exitcode", "1", "--leak-check", "full", "python3", "-m", "pytest", "-q", "tests"]
    assert gpu_check_dry_run.unwrapped(command) == ["python3", "-m", "pytest", "-q", "tests"]
    assert gpu_check_dry_run.unwrapped(["pip", "install", "x"]) == ["pip", "install", "x"]


@pytest.mark.parametrize("command, error", [
    (["python3", "bench/no_such_script.py"], "does not exist"),
    (["python3", "bench/gpu_targets.py", "--repeets", "3"], "rejects"),
    (["python3", "-m", "fmkernels", "bench", "--sweeep"], "fmkernels rejects"),
    (["python3", "-m", "pytest", "-k", "no_test_has_this_name", "tests/test_gpu_check.py"], "no test selected"),
])
def test_the_dry_run_catches_what_would_fail_on_the_device(command, error, monkeypatch):
    monkeypatch.chdir(ROOT)
    found = gpu_check_dry_run.check(command)
    assert found is not None and error in found


def test_the_dry_run_passes_good_commands(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert gpu_check_dry_run.check(["python3", "bench/gpu_targets.py", "--repeats", "3"]) is None
    assert gpu_check_dry_run.check(["python3", "-m", "fmkernels", "check", "--device", "cuda", "sample"]) is None
    assert gpu_check_dry_run.check(["cuobjdump", "--dump-sass", "x.so"]) is None  # printed only


def test_the_targets_time_the_cases_they_name():
    jobs = gpu_targets.jobs(torch.device("cuda"))  # the cases are built lazily: no GPU needed
    shapes = {(job.case.op, job.case.shape) for job in jobs}
    decode = sorted(shape for op, shape in shapes if op == "decode_attention")
    assert [shape.split(" h=")[0] for shape in decode] == [
        "b=1 cache=32768 contiguous", "b=1 cache=32768 paged/16", "b=64 cache=2048 contiguous", "b=64 cache=2048 paged/16"]
    prefill = {shape for op, shape in shapes if op == "attention"}
    assert {int(re.search(r"s=(\d+)", shape).group(1)) for shape in prefill} == {4096, 8192, 16384}
    assert len(prefill) == 6  # causal and not
    assert [shape for op, shape in shapes if op == "filter_logits"] == ["b=1 vocab=128256 temperature=0.7 top_k=50 top_p=0.9"]
    names = {job.impl.name for job in jobs if job.case.op == "attention"}
    assert {"cuda", "triton", "sdpa_flash"} <= names


def _row(op, implementation, kind, shape, median_ms, **extra):
    return benchmark.BenchRow(op=op, implementation=implementation, kind=kind, shape=shape, dtype="bfloat16",
                              repeats=1, median_ms=median_ms, **extra)


def test_target_lines_take_the_best_backend_against_the_goal():
    rows = [
        _row("decode_attention", "cuda", "backend", "d", 1.0, roofline=0.80),
        _row("decode_attention", "triton", "backend", "d", 1.1, roofline=0.87),
        _row("decode_attention", "sdpa", "peer", "d", 0.5, roofline=0.95),  # a peer never meets our target
        _row("attention", "cuda", "backend", "p", 2.0),
        _row("attention", "triton", "backend", "p", 1.5),
        _row("attention", "sdpa_flash", "peer", "p", 2.1),
        _row("filter_logits", "cuda", "backend", "f", 0.1, speedup=3.5),
        _row("filter_logits", "reference", "backend", "f", 0.35, speedup=1.0),
    ]
    lines = {line.target.split(":")[0]: line for line in gpu_targets.target_lines(rows)}
    assert lines["decode"].by == "triton" and lines["decode"].value == 0.87 and lines["decode"].met
    assert lines["prefill"].by == "triton" and lines["prefill"].value == pytest.approx(1.4) and lines["prefill"].met
    assert lines["filter_logits"].by == "cuda" and lines["filter_logits"].met
    slow = gpu_targets.target_lines([_row("attention", "triton", "backend", "p", 2.0),
                                     _row("attention", "sdpa_flash", "peer", "p", 2.1)])
    assert not slow[0].met and slow[0].value == pytest.approx(1.05)
    untimed = gpu_targets.target_lines([_row("attention", "triton", "backend", "p", 2.0)])
    assert untimed[0].value is None and not untimed[0].met and "sdpa_flash not timed" in untimed[0].note


def test_masked_lines_report_each_backends_worst_row():
    rows = [dict(backend="cuda", batch=1, parameters="greedy", mask="all", ratio=1.05),
            dict(backend="cuda", batch=16, parameters="greedy", mask="sparse", ratio=1.20),
            dict(backend="triton", batch=1, parameters="greedy", mask="half", ratio=0.98)]
    cuda, triton = gpu_targets.masked_lines(rows)
    assert (cuda.value, cuda.met) == (1.20, False) and "b=16" in cuda.case and "worst of 2 rows" in cuda.case
    assert (triton.value, triton.met) == (0.98, True)
