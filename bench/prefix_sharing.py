"""Prefill with a shared prompt prefix, and packed prefill of a ragged batch, on a
SmolLM2-135M-shaped model.

    python bench/prefix_sharing.py [--config smollm2-135m|tiny] [--prompt-len 256] [--num-samples 8]
                                   [--ragged 256,1,17,113,64,200,33,128] [--kv-caches contiguous,paged]
                                   [--block-size 16] [--repeats 3] [--backend auto|cpu|reference|...]
                                   [--device cpu|cuda] [--dtype float32|bfloat16] [--threads T]
                                   [--json PATH]

Model: ``Transformer.from_config`` (random weights, seed 0) with SmolLM2-135M's shape:
vocabulary 49152, dim 576, 30 layers, 9 query and 3 KV heads of 64, ffn 1536, RoPE theta 1e5,
tied embeddings (``--config tiny``: the named tiny configuration, for a quick run).

Shared prefix: one random prompt of ``prompt-len`` tokens, ``num-samples`` samples of it.

* "shared": ``generate([prompt], num_samples=n)``: the prompt is prefilled once and its n
  samples fork its KV cache (a paged cache shares the full blocks and copies the partly
  filled last one; a contiguous cache copies the prompt's positions into the other rows).
* "unshared": ``generate([prompt] * n)``: the same n sequences prefilled as n separate
  prompts (in one packed forward), sharing nothing.

Both sample at temperature 0.8 with the same seed, so row j draws with seed + j in both and
the tokens must agree ("agree"). Prefill time = from the call to the first new token, which
the first ``on_token`` call marks; each call generates that one token only. "KV blocks" =
the paged pool's blocks in use at that first token.

Packed prefill: a ragged batch of prompts (``--ragged`` lengths) prefilled into a fresh
cache (made before the clock starts) by

* "per prompt, all logits": ``model(prompt[None], cache=cache, slots=[b])`` for each prompt,
  keeping the last position's logits: one forward per prompt, the LM head on every token
  (what ``generate`` did before ``Transformer.prefill``);
* "per prompt, last logits": ``model.prefill([prompt], cache=cache, slots=[b])`` for each
  prompt: one forward per prompt, the LM head on the last token only;
* "packed": ``model.prefill(prompts, cache=cache)``: one forward, varlen attention, the LM
  head on the last tokens only.

"agree" there is the largest difference of the last-token logits from the first variant's.

Each case runs once to warm up, then ``repeats`` times with its variants interleaved (so load
from other processes hits them alike); the table shows the medians. "speedup" = the first
variant's median time / this one's. On CUDA every mark is taken after ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from fmkernels import benchmark
from fmkernels.model import ModelConfig, Transformer, generate

SMOLLM2_135M = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                           rope_theta=1e5, tie_embeddings=True, max_seq_len=8192)
CONFIGS = {"smollm2-135m": lambda: SMOLLM2_135M, "tiny": lambda: ModelConfig.from_name("tiny")}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table (and of the JSON): the median over ``repeats`` runs."""

    case: str
    kv_cache: str
    variant: str
    sequences: int
    prompt_tokens: int
    computed_tokens: int
    repeats: int
    prefill_ms: float
    speedup: float
    agree: str
    kv_blocks: Optional[int] = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(model: Transformer, prompts: List[List[int]], num_samples: int, kv_cache: str, block_size: int):
    """(prefill seconds, tokens, paged blocks in use at the first token or None) of one
    ``generate`` call that samples one token per row."""
    device = model.device
    marks: List[float] = []
    caches = []
    blocks: List[int] = []
    new_cache = model.new_cache

    def capture(*args, **kwargs):
        caches.append(new_cache(*args, **kwargs))
        return caches[-1]

    def on_token(row: int, token: int) -> None:
        if not marks:
            _sync(device)
            marks.append(time.perf_counter())
            if caches[0].paged:
                blocks.append(caches[0].allocator.num_blocks - caches[0].allocator.free_blocks)

    model.new_cache = capture  # the cache generate makes, to count its blocks
    try:
        _sync(device)
        start = time.perf_counter()
        tokens = generate(model, prompts, max_new_tokens=1, temperature=0.8, seed=0, num_samples=num_samples,
                          kv_cache=kv_cache, block_size=block_size, ignore_eos=True, on_token=on_token)
    finally:
        del model.new_cache
    return marks[0] - start, tokens, blocks[0] if blocks else None


def per_prompt_all_logits(model: Transformer, prompts: List[List[int]], cache) -> torch.Tensor:
    rows = [model(torch.tensor([p], device=model.device), cache=cache, slots=[b])[0, -1] for b, p in enumerate(prompts)]
    return torch.stack(rows)  # [B, V]


def per_prompt_last_logits(model: Transformer, prompts: List[List[int]], cache) -> torch.Tensor:
    return torch.cat([model.prefill([p], cache=cache, slots=[b]) for b, p in enumerate(prompts)])  # [B, V]


def packed(model: Transformer, prompts: List[List[int]], cache) -> torch.Tensor:
    return model.prefill(prompts, cache=cache)  # [B, V]


RAGGED_VARIANTS: Dict[str, Callable] = {
    "per prompt, all logits": per_prompt_all_logits,
    "per prompt, last logits": per_prompt_last_logits,
    "packed": packed,
}


def shared_prefix_rows(model: Transformer, args, kv_cache: str, prompt: List[int]) -> List[Row]:
    n = args.num_samples
    variants = {"unshared": ([prompt] * n, 1), "shared": ([prompt], n)}
    times: Dict[str, List[float]] = {name: [] for name in variants}
    results = {}
    for repeat in range(args.repeats + 1):  # the first run warms up
        for name, (prompts, samples) in variants.items():
            seconds, tokens, blocks = time_generate(model, prompts, samples, kv_cache, args.block_size)
            results[name] = (tokens, blocks)
            if repeat:
                times[name].append(seconds)
    base = statistics.median(times["unshared"])
    agree = "yes" if results["shared"][0] == results["unshared"][0] else "no"
    return [
        Row(case=f"{n} samples of a {len(prompt)}-token prompt", kv_cache=kv_cache, variant=name, sequences=n,
            prompt_tokens=n * len(prompt), computed_tokens=len(prompt) * len(prompts), repeats=args.repeats,
            prefill_ms=statistics.median(times[name]) * 1e3, speedup=base / statistics.median(times[name]),
            agree=agree, kv_blocks=results[name][1])
        for name, (prompts, _) in variants.items()
    ]


def ragged_rows(model: Transformer, args, kv_cache: str, prompts: List[List[int]]) -> List[Row]:
    device = model.device
    times: Dict[str, List[float]] = {name: [] for name in RAGGED_VARIANTS}
    logits = {}
    for repeat in range(args.repeats + 1):
        for name, fn in RAGGED_VARIANTS.items():
            cache = model.new_cache(kv_cache, batch=len(prompts), max_seq_len=max(map(len, prompts)),
                                    block_size=args.block_size)
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                logits[name] = fn(model, prompts, cache)
            _sync(device)
            if repeat:
                times[name].append(time.perf_counter() - start)
    first = next(iter(RAGGED_VARIANTS))
    base = statistics.median(times[first])
    total = sum(map(len, prompts))
    lengths = ",".join(str(len(p)) for p in prompts)
    return [
        Row(case=f"ragged {lengths}", kv_cache=kv_cache, variant=name, sequences=len(prompts),
            prompt_tokens=total, computed_tokens=total, repeats=args.repeats,
            prefill_ms=statistics.median(times[name]) * 1e3, speedup=base / statistics.median(times[name]),
            agree=f"{(logits[name].float() - logits[first].float()).abs().max().item():.1e}")
        for name in RAGGED_VARIANTS
    ]


def print_table(rows: List[Row], meta: dict) -> None:
    headers = ["case", "kv cache", "variant", "prompt tokens", "computed", "prefill ms", "speedup", "agree",
               "KV blocks"]
    lines = [[r.case, r.kv_cache, r.variant, str(r.prompt_tokens), str(r.computed_tokens), f"{r.prefill_ms:,.1f}",
              f"{r.speedup:.2f}x", r.agree, "" if r.kv_blocks is None else str(r.kv_blocks)] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    print(f"prefill of {meta['config']}, median of {rows[0].repeats} on {meta['device_name']} "
          f"({meta['cpu_capability']}, {meta['cpu_threads']} threads), {meta['dtype']}")
    for line in [headers, *lines]:
        print("  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))))
    print("prefill = call to first new token (shared prefix: generate) or the prefill calls (ragged); "
          "computed = prompt tokens run through the model; speedup = the case's first row's time / this one's")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="smollm2-135m", choices=sorted(CONFIGS))
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--ragged", default="256,1,17,113,64,200,33,128", help="comma-separated prompt lengths")
    parser.add_argument("--kv-caches", default="contiguous,paged")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto", help="fmkernels backend: auto, cpu, reference, triton, cuda")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write rows and metadata here")
    args = parser.parse_args(argv)
    kv_caches = args.kv_caches.split(",")
    for kind in kv_caches:
        if kind not in ("contiguous", "paged"):
            parser.error(f"--kv-caches: {kind!r} is not 'contiguous' or 'paged'")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    command = " ".join(shlex.quote(a) for a in ["python", "bench/prefix_sharing.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    meta = benchmark.metadata(device, command)
    config = CONFIGS[args.config]()
    meta.update(cpu_capability=torch.backends.cpu.get_cpu_capability(), dtype=args.dtype, config=args.config)
    model = Transformer.from_config(config, seed=0, dtype=dtype, device=device, backend=args.backend)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=generator).tolist()
    ragged = [torch.randint(0, config.vocab_size, (int(n),), generator=generator).tolist()
              for n in args.ragged.split(",")]
    rows: List[Row] = []
    for kind in kv_caches:
        rows += shared_prefix_rows(model, args, kind, prompt)
        print(f"  {kind}: shared prefix done", file=sys.stderr)
    for kind in kv_caches:
        rows += ragged_rows(model, args, kind, ragged)
        print(f"  {kind}: ragged batch done", file=sys.stderr)
    print_table(rows, meta)
    if args.json:
        benchmark.write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
