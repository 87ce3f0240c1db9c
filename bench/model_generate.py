"""fmkernels' model.generate against transformers' generate, on the same weights in the same run.

    python bench/model_generate.py [--configs tiny,llama-100m] [--batches 1,4] [--prompt-len 128]
                                   [--new-tokens 64] [--repeats 3] [--backend auto|cpu|reference|...]
                                   [--device cpu|cuda] [--dtype float32|bfloat16] [--threads T]
                                   [--json PATH]

Weights: a random transformers ``LlamaForCausalLM`` (the config's dimensions; linear weights
N(0, 1/fan_in), embeddings N(0, 1), norms N(1, 0.1), seed 0: the scheme of
``Transformer.from_config``) is saved with ``save_pretrained`` into a temporary directory and
loaded back with ``Transformer.from_pretrained``, so both models hold the same tensors.

Workload: ``batch`` prompts of ``prompt-len`` random tokens, ``new-tokens`` new tokens each,
greedy, no EOS (fmkernels: ``ignore_eos=True``; transformers: ``eos_token_id=None`` and
``min_new_tokens=max_new_tokens``). Each (config, batch, implementation) runs once to warm up,
then ``repeats`` times, the two implementations interleaved (so load from other processes hits
both alike); the table shows the medians.

Timing, one ``generate`` call split in two at its first token:

* prefill = from the call to the first new token of the whole batch. fmkernels prefills the
  prompts one by one into its KV cache, then samples; its ``on_token`` callback's first call
  marks the first token. transformers runs one batched forward over the prompts, then picks;
  a ``StoppingCriteria`` (called once per step, after the step's tokens are chosen, in the
  same ``generate`` call) marks it. prefill tok/s = batch x prompt-len / prefill time.
* decode = the rest of the call: decode tok/s = batch x (new-tokens - 1) / (total - prefill).

On CUDA every mark is taken after ``torch.cuda.synchronize()``, and the decode rows also show
the fraction of the weight-bandwidth roofline: each decode step reads every weight once
(the embedding table excepted: only the batch's rows), so the floor is weight bytes / copy
bandwidth per step; roofline = (decode tok/s / batch) x weight bytes / measured copy
bandwidth (``fmkernels.benchmark.measure_peaks``, the fastest 256 MB copy). KV-cache reads
(under 1 MB per step here) are left out.

"agree" says whether both implementations chose the same greedy tokens for every prompt (or,
if not, how many of the batch x new-tokens tokens match before each prompt's first difference).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

from fmkernels import benchmark
from fmkernels.model import ModelConfig, Transformer

#: The ~100M-parameter Llama-style configuration (no tied embeddings).
LLAMA_100M = ModelConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                         max_seq_len=2048)
CONFIGS = {"tiny": lambda: ModelConfig.from_name("tiny"), "llama-100m": lambda: LLAMA_100M}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table (and of the JSON): medians over ``repeats`` calls."""

    config: str
    params: int
    batch: int
    implementation: str
    dtype: str
    prompt_len: int
    new_tokens: int
    repeats: int
    prefill_ms: float
    decode_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    prefill_vs_transformers: Optional[float] = None
    decode_vs_transformers: Optional[float] = None
    agree: Optional[str] = None
    roofline: Optional[float] = None
    weight_bytes: Optional[int] = None


def parameter_count(config: ModelConfig) -> int:
    """Parameters of a dense Llama model with this config (embeddings and LM head both counted)."""
    c = config
    attention = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    mlp = 3 * c.dim * c.ffn_dim
    per_layer = attention + mlp + 2 * c.dim
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    return c.vocab_size * c.dim + c.n_layers * per_layer + c.dim + head


def hf_llama(config: ModelConfig, seed: int = 0):
    """A random transformers LlamaForCausalLM with ``config``'s dimensions, initialised as
    ``Transformer.from_config`` initialises its weights, in fp32 on the CPU."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps, max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1]))
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fmkernels(model: Transformer, prompts: torch.Tensor, new_tokens: int):
    """(prefill seconds, decode seconds, tokens) of one greedy generate call."""
    device = model.device
    first: List[float] = []

    def on_token(index: int, token: int) -> None:
        if not first:
            _sync(device)
            first.append(time.perf_counter())

    _sync(device)
    start = time.perf_counter()
    tokens = model.generate(prompts, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True, on_token=on_token)
    _sync(device)
    end = time.perf_counter()
    return first[0] - start, end - first[0], tokens


def time_transformers(model, prompts: torch.Tensor, new_tokens: int):
    """(prefill seconds, decode seconds, tokens) of one greedy transformers generate call."""
    import transformers

    device = prompts.device
    first: List[float] = []

    class FirstToken(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if not first:
                _sync(device)
                first.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    mask = torch.ones_like(prompts)
    _sync(device)
    start = time.perf_counter()
    out = model.generate(
        prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0, stopping_criteria=transformers.StoppingCriteriaList([FirstToken()]),
    )
    _sync(device)
    end = time.perf_counter()
    return first[0] - start, end - first[0], out[:, prompts.shape[1]:].tolist()


def agreement(ours: List[List[int]], theirs: List[List[int]]) -> str:
    if ours == theirs:
        return "yes"
    same = 0
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    total = sum(len(a) for a in ours)
    return f"no ({same}/{total} before divergence)"


def weight_bytes(model: Transformer, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter once, the embedding table only
    for the batch's rows (it is the LM head too when tied, and then read whole)."""
    total = 0
    for name, param in model.named_parameters():
        if name == "embed_tokens.weight" and not model.config.tie_embeddings:
            total += batch * param.shape[1] * param.element_size()
        else:
            total += param.numel() * param.element_size()
    return total


def run_config(name: str, config: ModelConfig, args, device: torch.device, dtype: torch.dtype,
               peaks: Optional[benchmark.Peaks]) -> List[Row]:
    params = parameter_count(config)
    print(f"{name}: {params / 1e6:.1f}M parameters (vocab {config.vocab_size}, dim {config.dim}, "
          f"{config.n_layers} layers, {config.n_heads}/{config.n_kv_heads} heads, ffn {config.ffn_dim})",
          file=sys.stderr)
    hf = hf_llama(config, seed=0)
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = Transformer.from_pretrained(directory, dtype=dtype, device=device, backend=args.backend)
    hf = hf.to(device=device, dtype=dtype)
    assert parameter_count(ours.config) == sum(p.numel() for p in ours.parameters()), "parameter count"

    rows = []
    generator = torch.Generator().manual_seed(1)
    for batch in args.batches:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=generator).to(device)
        impls = (("transformers", time_transformers, hf), ("fmkernels", time_fmkernels, ours))
        runs: Dict[str, list] = {impl: [] for impl, _, _ in impls}
        tokens = {}
        with torch.no_grad():
            for impl, fn, model in impls:
                fn(model, prompts, args.new_tokens)  # warm-up
            # Interleaved (transformers, fmkernels, transformers, ...), so load from other
            # processes on the machine hits both alike.
            for _ in range(args.repeats):
                for impl, fn, model in impls:
                    prefill, decode, tokens[impl] = fn(model, prompts, args.new_tokens)
                    runs[impl].append((prefill, decode))
        agree = agreement(tokens["fmkernels"], tokens["transformers"])
        medians = {}
        for impl in ("transformers", "fmkernels"):
            prefill = statistics.median(r[0] for r in runs[impl])
            decode = statistics.median(r[1] for r in runs[impl])
            medians[impl] = (batch * args.prompt_len / prefill,
                             batch * (args.new_tokens - 1) / decode if args.new_tokens > 1 else float("nan"),
                             prefill, decode)
        for impl in ("transformers", "fmkernels"):
            prefill_rate, decode_rate, prefill, decode = medians[impl]
            base = medians["transformers"]
            roofline = wbytes = None
            if peaks is not None:
                wbytes = weight_bytes(ours, batch)
                roofline = (decode_rate / batch) * wbytes / (peaks.bandwidth_gbps * 1e9)
            rows.append(Row(
                config=name, params=params, batch=batch, implementation=impl if impl == "transformers"
                else f"fmkernels ({args.backend})", dtype=str(dtype).replace("torch.", ""),
                prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                prefill_ms=prefill * 1e3, decode_ms=decode * 1e3, prefill_tok_s=prefill_rate,
                decode_tok_s=decode_rate, prefill_vs_transformers=prefill_rate / base[0],
                decode_vs_transformers=decode_rate / base[1], agree=agree, roofline=roofline,
                weight_bytes=wbytes,
            ))
        print(f"  batch {batch}: done (tokens agree: {agree})", file=sys.stderr)
    return rows


def print_table(rows: List[Row], peaks: Optional[benchmark.Peaks], meta: dict) -> None:
    headers = ["config", "params", "batch", "implementation", "dtype", "prefill tok/s", "decode tok/s",
               "prefill vs hf", "decode vs hf", "agree"]
    if peaks is not None:
        headers.append("roofline")
    lines = []
    for r in rows:
        line = [r.config, f"{r.params / 1e6:.1f}M", str(r.batch), r.implementation, r.dtype,
                f"{r.prefill_tok_s:,.0f}", f"{r.decode_tok_s:,.1f}", f"{r.prefill_vs_transformers:.2f}x",
                f"{r.decode_vs_transformers:.2f}x", r.agree if r.implementation != "transformers" else ""]
        if peaks is not None:
            line.append(f"{r.roofline:.1%}")
        lines.append(line)
    title = (f"generate: {rows[0].prompt_len}-token prompts, {rows[0].new_tokens} new tokens, greedy; "
             f"median of {rows[0].repeats} on {meta['device_name']} ({meta['cpu_threads']} threads)")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for line in lines:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    else:
        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="right" if i in (1, 2, 5, 6, 7, 8, 10) else "left")
        for line in lines:
            table.add_row(*line)
        Console(width=max(160, os.get_terminal_size().columns if sys.stdout.isatty() else 0)).print(table)
    print("prefill = call to first new token (batch x prompt tokens over it); decode = the rest "
          "(batch x (new-1) tokens); 'vs hf' = rate / transformers' rate in this run")
    if peaks is not None:
        print(f"roofline: (decode tok/s / batch) x weight bytes / copy bandwidth {peaks.bandwidth_gbps:.0f} GB/s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,llama-100m", help=f"comma-separated of {sorted(CONFIGS)}")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto", help="fmkernels backend: auto, cpu, reference, triton, cuda")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write rows and metadata here")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    peaks = benchmark.measure_peaks(device, [dtype]) if device.type == "cuda" else None
    command = " ".join(shlex.quote(a) for a in ["python", "bench/model_generate.py", *(sys.argv[1:] if argv is None
                                                                                      else argv)])
    meta = benchmark.metadata(device, command, peaks)
    import transformers

    meta["transformers_version"] = transformers.__version__
    rows = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        rows += run_config(name, CONFIGS[name](), args, device, dtype, peaks)
    print_table(rows, peaks, meta)
    if args.json:
        benchmark.write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
