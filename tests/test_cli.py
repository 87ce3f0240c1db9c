"""The fmkernels command line, run in-process (cli.main) and once as ``python -m fmkernels``."""

import json
import subprocess
import sys

import pytest
import torch

import fmkernels
from fmkernels import cli, reference, registry
from fmkernels.model import generate, load_pretrained

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


def test_bench_prints_rows_writes_json_and_plots(capsys, tmp_path):
    path, plot_path = tmp_path / "results" / "bench.json", tmp_path / "plots" / "bench.png"
    # Triton left out: under the test suite's interpreter it takes minutes over a 128256-token vocabulary.
    status, out = run(capsys, "bench", "append_kv", "filter_logits", "--device", "cpu", "--repeats", "2",
                      "--only", "reference,cpu,cuda", "--json", str(path), "--plot", str(plot_path))
    assert status == 0, out
    image = plot_path.read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n" and len(image) > 10_000
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
    assert not any(implementation == "triton" for _, implementation in rows)


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


def test_generate_on_a_named_model_streams_and_reports_tokens_per_second(capsys):
    status = cli.main(["generate", "--model", "tiny", "--prompt", "Hello", "--max-new-tokens", "12",
                       "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--backend", "cpu"])
    captured = capsys.readouterr()
    assert status == 0
    assert captured.out.startswith("Hello")
    assert "random weights" in captured.err and "noise" in captured.err
    lines = captured.out.splitlines()
    assert any(line.startswith("prefill: 5 tokens in") and line.endswith("tokens/s") for line in lines)
    assert any(line.startswith("decode: ") and "tokens/s" in line for line in lines)


def test_generate_on_a_saved_transformers_checkpoint_with_a_tokenizer(tmp_path, capsys):
    pytest.importorskip("transformers")
    from _model_checks import hf_model, save_wordlevel_tokenizer

    hf_model("llama").save_pretrained(tmp_path)
    save_wordlevel_tokenizer(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--prompt", "the cat sat", "--max-new-tokens", "8",
            "--kv-cache", "paged", "--backend", "cpu"]
    status = cli.main(argv)
    out = capsys.readouterr().out
    assert status == 0 and out.startswith("the cat sat")
    assert "prefill: 3 tokens in" in out and "tokens/s" in out

    # The same greedy text through the API, and a stop string cut from the streamed output.
    from fmkernels.model import load_tokenizer

    tok = load_tokenizer(tmp_path)
    model = load_pretrained(tmp_path, backend="cpu")
    result = generate(model, [tok.encode("the cat sat")], max_new_tokens=8, tokenizer=tok, return_result=True)
    assert out.splitlines()[0] == "the cat sat" + result.texts[0]
    words = result.texts[0].split()
    if len(words) >= 3:
        stop = words[2][:2] if len(words[2]) >= 2 else words[2]
        assert cli.main(argv + ["--stop", stop]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first == "the cat sat" + result.texts[0][:result.texts[0].index(stop)]


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model", "--prompt", "x"], "not a directory or a known model name"),
    (["--model", "./missing/dir", "--prompt", "x"], "no such checkpoint directory"),
    (["--model", "tiny", "--prompt", "x", "--top-p", "0"], "must be in"),
    (["--model", "tiny", "--prompt", "x", "--temperature", "-1"], "must be in"),
    (["--model", "tiny", "--prompt", "x", "--max-new-tokens", "0"], "must be >= 1"),
    (["--model", "tiny", "--prompt", ""], "encodes to no tokens"),
    (["--model", "tiny", "--prompt", "x", "--max-new-tokens", "400"], "beyond the model's max_seq_len"),
    (["--model", "tiny", "--chat", "hi"], "no chat template"),
    (["--model", "tiny", "--prompt", "x", "--system", "be brief"], "--system goes with --chat"),
])
def test_generate_bad_input_is_a_clear_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_on_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"])
    assert "no config.json" in capsys.readouterr().err
