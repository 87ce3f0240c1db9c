"""bench/prefix_sharing.py runs end to end on the tiny configuration: shared and unshared samples
agree on their tokens, the paged pool holds fewer blocks when shared, the three prefills of the
ragged batch agree on their logits, and the JSON holds rows and metadata."""

import json

import _bench_scripts

def _load():
    return _bench_scripts.load("prefix_sharing")


def test_tiny_run_agrees_and_writes_json(tmp_path):
    bench = _load()
    out = tmp_path / "result.json"
    argv = ["--config", "tiny", "--prompt-len", "10", "--num-samples", "3", "--ragged", "7,1,12", "--block-size", "4",
            "--repeats", "1", "--backend", "cpu", "--json", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["metadata"]["command"].endswith(" ".join(argv)) and data["metadata"]["config"] == "tiny"
    rows = {(r["case"], r["kv_cache"], r["variant"]): r for r in data["rows"]}
    for kind in ("contiguous", "paged"):
        shared, unshared = (rows[("3 samples of a 10-token prompt", kind, v)] for v in ("shared", "unshared"))
        assert shared["agree"] == unshared["agree"] == "yes"
        assert (shared["computed_tokens"], unshared["computed_tokens"]) == (10, 30)
        for variant in ("per prompt, all logits", "per prompt, last logits", "packed"):
            row = rows[("ragged 7,1,12", kind, variant)]
            assert float(row["agree"]) < 1e-4 and row["prefill_ms"] > 0
    # 10 tokens in blocks of 4: 3 blocks once and a copy of the partly filled third per other sample.
    assert rows[("3 samples of a 10-token prompt", "paged", "shared")]["kv_blocks"] == 3 + 2
    assert rows[("3 samples of a 10-token prompt", "paged", "unshared")]["kv_blocks"] == 3 * 3
