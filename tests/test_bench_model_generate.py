"""bench/model_generate.py runs end to end on a small workload: both implementations agree on
the greedy tokens, the parameter count matches the model, and the JSON holds rows and metadata."""

import json

import pytest
import torch

pytest.importorskip("transformers")

import _bench_scripts  # noqa: E402


def _load():
    return _bench_scripts.load("model_generate")


def test_parameter_count_of_the_100m_config():
    bench = _load()
    assert 90e6 < bench.parameter_count(bench.LLAMA_100M) < 130e6


def test_prefill_bound_counts_the_lm_head_for_the_last_token_only():
    bench = _load()
    config = bench.LLAMA_100M
    n, c = 100, config
    kv = c.n_kv_heads * c.head_dim
    per_layer = c.dim * (c.n_heads * c.head_dim) * 2 + c.dim * kv * 2 + 3 * c.dim * c.ffn_dim
    attention = 4 * c.n_layers * c.n_heads * c.head_dim * (n * (n + 1) // 2)
    flops = n * 2 * c.n_layers * per_layer + attention + 2 * c.vocab_size * c.dim
    tflops = 0.5
    assert bench.prefill_bound(config, torch.float32, n, tflops) == pytest.approx(tflops * 1e12 * n / flops)


def test_tiny_run_agrees_with_transformers_and_writes_json(tmp_path):
    bench = _load()
    out = tmp_path / "result.json"
    argv = ["--configs", "tiny", "--batches", "1,2", "--prompt-len", "8", "--new-tokens", "5", "--repeats", "1",
            "--dtypes", "float32", "--threads", "1", "--backend", "cpu", "--breakdown", "--json", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["metadata"]["command"].endswith(" ".join(argv))
    assert "transformers_version" in data["metadata"]
    rows = data["rows"]
    assert [(r["batch"], r["implementation"]) for r in rows] == [
        (1, "transformers"), (1, "fmkernels (cpu)"), (2, "transformers"), (2, "fmkernels (cpu)")]
    assert [r["agree"] for r in rows] == [None, "yes", None, "yes"]
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    assert all(0 < r["of_bound"] and r["decode_bound_tok_s"] > 0 for r in rows)
    assert all(0 < r["prefill_of_bound"] and r["prefill_bound_tok_s"] > 0 for r in rows)
    assert set(data["metadata"]["matmul_tflops_by_threads"]) == {"1"}
    assert data["metadata"]["cpu_isa"] in ("avx512", "avx2", "generic")
    # The decode step's parts: each non-negative, the named parts within the step's time.
    parts = data["metadata"]["decode_breakdown"]
    assert [(p["batch"], p["threads"], p["dtype"]) for p in parts] == [(1, 1, "float32"), (2, 1, "float32")]
    for p in parts:
        named = p["matmul_ms"] + p["attention_ms"] + p["sampling_ms"] + p["other_ops_ms"] + p["rest_ms"]
        assert p["matmul_ms"] > 0 and p["attention_ms"] > 0 and p["sampling_ms"] > 0
        assert named >= p["step_ms"] * 0.999
        # The public ops timed around each call: the tiny model's 2 layers append and attend once
        # each per step, and the step samples once; their time is a part of the step's.
        assert p["op_calls"]["append_kv"] == p["op_calls"]["decode_attention"] == 2
        assert p["op_calls"]["sample"] == 1
        assert 0 < sum(p["op_ms"].values()) < p["step_ms"] * 1.5


def test_cuda_graphs_on_and_off_are_rows_of_their_own(tmp_path):
    # On a CPU "on" is generate's static-buffer decode without capture: the same tokens.
    bench = _load()
    out = tmp_path / "result.json"
    argv = ["--configs", "tiny", "--batches", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
            "--dtypes", "float32", "--threads", "1", "--backend", "cpu", "--cuda-graphs", "on,off",
            "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["implementation"] for r in rows] == [
        "transformers", "fmkernels (cpu, graphs on)", "fmkernels (cpu, graphs off)"]
    assert [r["agree"] for r in rows] == [None, "yes", "yes"]


@pytest.mark.parametrize("value", ["sometimes", "on,on"])
def test_cuda_graphs_setting_is_checked(value, capsys):
    with pytest.raises(SystemExit):
        _load().main(["--configs", "tiny", "--cuda-graphs", value])
    assert "--cuda-graphs" in capsys.readouterr().err
