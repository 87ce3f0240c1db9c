"""The user-kernel examples in examples/ pass ``fmkernels check`` (and a wrong signature is a clear error)."""

import pathlib

import pytest

from fmkernels import cli

from test_cli import run, table_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def in_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # --impl imports examples.* from the current directory


@pytest.mark.parametrize("op, spec, min_passed", [
    ("attention", "examples.my_attention:my_attention", 6),
    ("decode_attention", "examples.my_attention:my_decode_attention", 4),
    ("filter_logits", "examples.my_sampling:my_filter_logits", 1),
])
def test_example_passes_check(capsys, in_repository_root, op, spec, min_passed):
    status, out = run(capsys, "check", op, "--device", "cpu", "--impl", spec)
    assert status == 0, out
    verdicts = [row[-1] for row in table_rows(out) if row[1] == spec]
    assert sum(verdict.startswith("pass") for verdict in verdicts) >= min_passed, out
    # The sampling example takes no allowed= bitmask (an optional argument): its masked cases are skipped.
    assert all(verdict.startswith(("pass", "skipped: NotImplementedError", "skipped: it takes no allowed="))
               for verdict in verdicts), out


def test_an_example_for_another_op_is_a_clear_error(capsys, in_repository_root):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", "decode_attention", "--impl", "examples.my_attention:my_attention"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--impl examples.my_attention:my_attention cannot implement decode_attention" in err
    assert "decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table, scale, return_lse)" in err


def test_check_help_documents_each_ops_signature(capsys):
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    out = capsys.readouterr().out
    for call in ("attention(q, k, v, *, causal, scale, cu_seqlens_q, cu_seqlens_k, return_lse)",
                 "append_kv(k_cache, v_cache, k, v, cache_seqlens, *, block_table)",
                 "filter_logits(logits, *, temperature, top_k, top_p, min_p)"):
        assert call in out
