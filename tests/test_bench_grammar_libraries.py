"""bench/grammar_libraries.py: the 128256-token vocabulary it grows from the real checkpoint's is a
working byte-level BPE (it loads, round-trips text and uses the added tokens), and each grammar
library that is installed walks the schema's valid answer with masks that allow every token of it."""

import importlib.util
import json

import pytest

import _bench_scripts


def _load():
    return _bench_scripts.load("grammar_libraries")


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    pytest.importorskip("gguf")
    from fmkernels.model import load_tokenizer

    return load_tokenizer(smollm2_gguf)


def test_grown_vocabulary_is_a_working_bpe(smollm2_tokenizer):
    from tokenizers import Tokenizer

    bench = _load()
    grown = Tokenizer.from_str(bench._grown_tokenizer_json(smollm2_tokenizer.tokenizer.to_str(), bench.LLAMA3_VOCAB))
    assert grown.get_vocab_size(with_added_tokens=True) == bench.LLAMA3_VOCAB
    text = bench.ANSWER + " The quick brown fox jumps over the lazy dog, again and again."
    ids = grown.encode(text, add_special_tokens=False).ids
    assert grown.decode(ids) == text
    # An added token is the text of the two it joins (pre-tokenization keeps BPE from producing
    # most of them, but a model may emit any token, so a grammar library must judge them all).
    added = grown.id_to_token(smollm2_tokenizer.vocab_size + 1000)
    left, right = next((added[:i], added[i:]) for i in range(1, len(added))
                       if grown.token_to_id(added[:i]) is not None and grown.token_to_id(added[i:]) is not None)
    pair = [grown.token_to_id(left), grown.token_to_id(right)]
    assert grown.decode([grown.token_to_id(added)]) == grown.decode(pair)


@pytest.mark.parametrize("library", ["llguidance", "xgrammar"])
def test_installed_library_allows_the_answer(smollm2_tokenizer, library):
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    bench = _load()
    answer_ids = smollm2_tokenizer.encode(bench.ANSWER, add_special_tokens=False)
    row = bench.measure(library, smollm2_tokenizer.tokenizer.to_str(), answer_ids, smollm2_tokenizer.eos_token_id,
                        smollm2_tokenizer.vocab_size, repeats=1)
    assert row["steps"] == len(answer_ids) + 1 and row["mask_median_us"] > 0 and row["compile_ms"] > 0


def test_main_writes_the_rows_and_the_machine(smollm2_gguf, tmp_path, capsys):
    bench = _load()
    out = tmp_path / "grammar.json"
    assert bench.main(["--tokenizer", str(smollm2_gguf), "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["metadata"]["device_name"] and data["metadata"]["command"].endswith(f"--json {out}")
    installed = [name for name in bench.LIBRARIES if importlib.util.find_spec(name) is not None]
    assert sorted({row["library"] for row in data["rows"]}) == sorted(installed)
    assert all(row["vocab"] in (49152, bench.LLAMA3_VOCAB) for row in data["rows"])
    assert "library" in capsys.readouterr().out
