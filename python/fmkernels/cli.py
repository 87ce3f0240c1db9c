"""The ``fmkernels`` command line.

::

    fmkernels check [OP ...] [--device cpu|cuda] [--impl module:function] [--seed N]
    fmkernels bench [OP ...] [--device cpu|cuda] [--impl module:function] [--json PATH] [--plot PATH] [--repeats N]
    fmkernels bench --compare A.json B.json
    fmkernels bench --overhead [OP ...] [--device cpu|cuda] [--calls N] [--repeats N] [--no-compile] [--json PATH]
    fmkernels backends
    fmkernels generate --model PATH|NAME (--prompt TEXT | --chat TEXT) [--max-new-tokens N] [sampling options]
                       [--json-schema FILE|JSON | --json-object | --regex PATTERN | --grammar FILE | --choices TEXT...]
    fmkernels info NAME|PATH [--dtype bf16] [--context N] [--batch N] [--device h100|h200|BW,TFLOPS] [--json]
    fmkernels --version

This module parses and prints; the correctness rules live in ``fmkernels.testing`` and the
timing and FLOP/byte accounting in ``fmkernels.benchmark``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import sys
import time
from typing import Iterator, List, Optional, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import __version__, backends, bench_results, benchmark, registry, testing

# Where output is not a terminal (a log, a pipe), rich would wrap tables at 80 columns.
_LOG_WIDTH = 200
# The last column (a verdict, or why a row was skipped) is never squeezed below this.
_RESULT_WIDTH = 16


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=_LOG_WIDTH if wide else None)


# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------


def _op_name(value: str) -> str:
    if value not in registry.OPS:
        raise argparse.ArgumentTypeError(f"invalid op {value!r} (choose from {', '.join(registry.OPS)})")
    return value


def _integer_at_least(minimum: int):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {number}")
        return number

    return parse


def _number_in(low: float, high: float, low_open: bool = False):
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
        if not (low < number if low_open else low <= number) or not number <= high:
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value}")
        return number

    return parse


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model_names() -> List[str]:
    from .model import ModelConfig

    return ModelConfig.names()


def _integer_list(value: str) -> List[int]:
    parse = _integer_at_least(1)
    return [parse(item) for item in value.split(",") if item.strip()]


#: What an --impl function of each op takes and returns (README.md, "Your own kernels", says the same).
IMPL_SIGNATURES = """\
your implementation (--impl MODULE:FUNCTION) is called with the reference op's arguments, by
keyword (fmkernels.reference.<op>), and returns what it returns; raise NotImplementedError
for a case it cannot run (listed as skipped). Examples: examples/ in the repository.

  attention(q, k, v, *, causal, scale, cu_seqlens_q, cu_seqlens_k, return_lse)
      q (batch, seqlen_q, q_heads, head_dim), k/v (batch, seqlen_k, kv_heads, head_dim), or
      packed (total_tokens, heads, head_dim) with cu_seqlens_q/_k (int32, batch + 1); causal is
      bottom-right aligned; scale None means 1/sqrt(head_dim). Returns out (q's shape and
      dtype), or (out, lse) with return_lse: lse float32, natural log, (batch, q_heads,
      seqlen_q) or (q_heads, total_q) packed; -inf (and out 0) for a query that sees no key.
  decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table, scale, return_lse)
      q (batch, n_new, q_heads, head_dim); cache contiguous (batch, max_seqlen, kv_heads,
      head_dim) or paged (num_blocks, block_size, kv_heads, head_dim) with block_table (int32,
      batch x max_blocks); cache_seqlens (int32, batch) counts the new tokens, already in the
      cache; query i sees positions <= i + cache_seqlens[b] - n_new. Returns out, or (out, lse)
      with lse float32 (batch, q_heads, n_new).
  append_kv(k_cache, v_cache, k, v, cache_seqlens, *, block_table)
      writes k, v (batch, n_new, kv_heads, head_dim) into the caches at positions
      cache_seqlens[b] + [0, n_new), in place; returns None.
  filter_logits(logits, *, temperature, top_k, top_p, min_p)
      logits (batch, vocab); parameters scalars or (batch,) tensors. Returns logits /
      temperature in logits' dtype with the removed tokens at -inf (top-k, then top-p, then
      min-p; temperature 0 keeps the argmax only).
  sample(logits, *, temperature, top_k, top_p, min_p, seed, step, return_logprobs, num_logprobs)
      returns int64 tokens (batch,), the reference's Gumbel-max draws for the same seed and
      step, or with return_logprobs a fmkernels.reference.SampleOutput (tokens, logprobs,
      top_ids, top_logprobs).
  linear(x, weight)
      x (..., K), weight (N, K) as torch.nn.Linear holds it. Returns x @ weight^T (..., N) in
      x's dtype.
"""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ops", nargs="*", type=_op_name, metavar="OP",
        help=f"ops to run: {', '.join(registry.OPS)} (default: all)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"),
        help="where the inputs live (default: cuda when a GPU is visible, else cpu)",
    )
    parser.add_argument(
        "--impl", action="append", default=[], metavar="MODULE:FUNCTION",
        help="also run your own implementation of the named OP(s): a function with the "
        "reference's signature (fmkernels.reference.<op>); MODULE is imported from the current "
        "directory or the Python path; repeatable",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmkernels",
        description="Check fmkernels' implementations (and yours) against the reference ops, "
        "benchmark them, and list the backends this machine can run.",
    )
    parser.add_argument("--version", action="version", version=f"fmkernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check", help="hold every implementation to the reference over a sweep of cases",
        description="Run every available implementation of each OP on odd shapes, dtypes and seeds "
        "and compare it with the reference (rules: fmkernels.testing). Exits 1 if any case fails.",
        epilog=IMPL_SIGNATURES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(check)
    check.add_argument("--seed", type=_integer_at_least(0), default=0, help="seed of each op's first case (default 0)")
    check.set_defaults(handler=_check)

    bench = commands.add_parser(
        "bench", help="time every implementation on default shapes",
        description="Time every available implementation of each OP on default shapes sized for the "
        "device (median of --repeats after warm-up) and report TFLOP/s or GB/s and the speedup "
        "over the reference measured in the same run. With --compare, time nothing: put two "
        "--json files side by side.",
        epilog=IMPL_SIGNATURES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(bench)
    bench.add_argument("--json", metavar="PATH", help="also write the rows and run metadata as JSON")
    bench.add_argument(
        "--plot", metavar="PATH",
        help="also draw a PNG: a subplot per op, throughput against the size the shapes vary (use "
        "--sweep), a line per implementation, the measured roofline dashed; needs matplotlib "
        "(pip install 'fmkernels[plot]')",
    )
    bench.add_argument(
        "--compare", nargs=2, metavar=("A.json", "B.json"),
        help="time nothing: match the rows of two --json files (op, implementation, shape, dtype) "
        "and print their times and throughputs side by side with the ratios b/a",
    )
    bench.add_argument(
        "--repeats", type=_integer_at_least(1),
        help="timed calls per implementation, after warm-up (default: "
        + ", ".join(f"{count} on {device}" for device, count in benchmark.DEFAULT_REPEATS.items()) + ")",
    )
    bench.add_argument(
        "--sweep", action="store_true",
        help="time grids of sizes (seqlen, batch x context, batch) instead of one default shape per op",
    )
    bench.add_argument(
        "--only", metavar="NAMES", type=lambda value: [name for name in value.split(",") if name],
        help="comma-separated implementation names to time (e.g. cuda,triton,sdpa_flash); default: all",
    )
    bench.add_argument(
        "--overhead", action="store_true",
        help="time each public op's call at decode-sized inputs instead: the kernel through its binding, "
        "the op, the op with device checks off and the op inside torch.compile, µs per call "
        "(median/min of --repeats samples, default "
        f"{benchmark.DEFAULT_OVERHEAD_SAMPLES}), with issue 18's target for append_kv, decode_attention and sample",
    )
    bench.add_argument(
        "--calls", type=_integer_at_least(1),
        help=f"with --overhead: calls timed together in one sample (default {benchmark.DEFAULT_OVERHEAD_CALLS})",
    )
    bench.add_argument("--no-compile", action="store_true", help="with --overhead: leave out the torch.compile'd op")
    bench.set_defaults(handler=_bench)

    listing = commands.add_parser("backends", help="which backends can run here, and why not")
    listing.set_defaults(handler=_backends)

    generate = commands.add_parser(
        "generate", help="generate text with fmkernels.model, streamed, with tokens/s",
        description="Generate text after a prompt with fmkernels.model, printing it as tokens come, then "
        "prefill and decode tokens/s. --model is a checkpoint directory (config.json, safetensors, "
        "tokenizer.json), a .gguf file, or a named configuration (random weights, byte-level tokenizer). "
        "--chat sends TEXT as a user message through the checkpoint's chat template and streams the answer.",
    )
    generate.add_argument("--model", required=True, metavar="PATH|NAME",
                          help="a local Hugging Face checkpoint directory, a .gguf file, or one of: "
                          + ", ".join(_model_names()))
    text = generate.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", metavar="TEXT", help="text to continue")
    text.add_argument("--chat", metavar="TEXT", help="a user message, answered through the chat template")
    generate.add_argument("--system", metavar="TEXT", help="with --chat: a system message before it")
    generate.add_argument("--max-new-tokens", type=_integer_at_least(1), default=64, metavar="N",
                          help="default 64")
    generate.add_argument("--temperature", type=_number_in(0.0, math.inf), default=0.0, metavar="T",
                          help="0 is greedy (default)")
    generate.add_argument("--top-k", type=_integer_at_least(0), default=0, metavar="K", help="0 is off (default)")
    generate.add_argument("--top-p", type=_number_in(0.0, 1.0, low_open=True), default=1.0, metavar="P",
                          help="1.0 is off (default)")
    generate.add_argument("--min-p", type=_number_in(0.0, 1.0), default=0.0, metavar="P", help="0.0 is off (default)")
    generate.add_argument("--seed", type=_integer_at_least(0), default=0, metavar="S", help="default 0")
    generate.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop strings (cut from the output)")
    structure = generate.add_mutually_exclusive_group()
    structure.add_argument("--json-schema", metavar="FILE|JSON",
                           help="constrain the output to JSON valid under this schema (a file, or the schema itself)")
    structure.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    structure.add_argument("--regex", metavar="PATTERN", help="constrain the output to match PATTERN in full")
    structure.add_argument("--grammar", metavar="FILE",
                           help="constrain the output to a Lark grammar (llguidance's syntax, start rule 'start')")
    structure.add_argument("--choices", nargs="+", metavar="TEXT", help="constrain the output to one of these")
    generate.add_argument("--backend", default="auto", help="the ops' backend (default auto)")
    generate.add_argument("--kv-cache", choices=("contiguous", "paged"), default="contiguous")
    generate.add_argument("--dtype", choices=sorted(_DTYPES),
                          help="weights' dtype (default: the checkpoint's; float32 for a named model)")
    generate.add_argument("--device", choices=("cpu", "cuda"),
                          help="where the model runs (default: cuda when a GPU is visible, else cpu)")
    generate.set_defaults(handler=_generate)

    from .model.stats import DEVICES, DTYPE_BYTES

    info = commands.add_parser(
        "info", help="what a model costs: parameters, memory, FLOPs, decode and prefill rooflines",
        description="Parameters (total and active per token), weight and KV-cache memory, FLOPs per token, "
        "training FLOPs and the roofline bounds on decode and prefill throughput, computed from the "
        "model's configuration (ModelConfig.stats; derivations in fmkernels.model.stats).",
    )
    info.add_argument("model", metavar="NAME|PATH",
                      help=f"a named configuration ({', '.join(_model_names())}), a config.json or its directory")
    info.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16", help="weights' dtype (default bf16)")
    info.add_argument("--kv-dtype", choices=list(DTYPE_BYTES), help="KV cache's dtype (default: --dtype)")
    info.add_argument("--context", type=_integer_at_least(1), metavar="N",
                      help="cached tokens per sequence, and the prompt length for prefill "
                      "(default: the model's max_seq_len, at most 8192)")
    info.add_argument("--batch", type=_integer_at_least(1), default=1, metavar="N",
                      help="sequences decoded together (default 1)")
    info.add_argument("--device", default="h100", metavar="NAME|BW,TFLOPS[,GB]",
                      help=f"{', '.join(DEVICES)} (datasheet figures), or memory bandwidth in GB/s, dense "
                      "matmul TFLOP/s and optionally memory in GB, e.g. 2976,794,80 (default h100)")
    info.add_argument("--train-tokens", type=_integer_at_least(1), metavar="N",
                      help="training budget in tokens (default: the Chinchilla budget, 20 per parameter)")
    info.add_argument("--batches", type=_integer_list, metavar="N,N,...",
                      help="the roofline table's batch sizes (default 1,4,16,64,256)")
    info.add_argument("--contexts", type=_integer_list, metavar="N,N,...",
                      help="the roofline table's contexts (default 1k, 4k, 16k, ... up to max_seq_len, and --context)")
    info.add_argument("--tp", type=_integer_at_least(1), default=1, metavar="N",
                      help="tensor parallelism over N devices: weights and KV cache per device, and the decode "
                      "bound with the all-reduces (default 1)")
    info.add_argument("--interconnect", type=_number_in(0.0, math.inf, low_open=True), metavar="GBPS",
                      help="with --tp: the interconnect's GB/s per device per direction (default: the named "
                      "device's NVLink; needed for a custom --device)")
    info.add_argument("--json", action="store_true", help="print the figures as JSON (keys: README)")
    info.set_defaults(handler=_info)
    return parser


def _device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> torch.device:
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU on this machine")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and _tensor_parallel():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per torchrun process
        torch.cuda.set_device(device)
    return device


def _tensor_parallel() -> bool:
    """Under torchrun with more than one process: the model is split over them."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _load_user_function(spec: str, parser: argparse.ArgumentParser):
    # A console script's sys.path starts with its bin folder, not the user's directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return registry.load_impl(spec)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


@contextlib.contextmanager
def _user_impls(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Iterator[None]:
    """Register each --impl function as a 'user' implementation of the named ops while the command runs."""
    if args.impl and not args.ops:
        parser.error("--impl needs the op(s) the function implements, e.g. check attention --impl mymodule:my_attention")
    registered = []
    try:
        for spec in dict.fromkeys(args.impl):
            fn = _load_user_function(spec, parser)
            for op in dict.fromkeys(args.ops):
                mismatch = registry.signature_error(op, fn)
                if mismatch:
                    parser.error(f"--impl {spec} cannot implement {op}: {mismatch}")
                registry.register_impl(op, spec, fn, kind="user")
                registered.append((op, spec))
        yield
    finally:
        for op, spec in registered:
            registry.unregister_impl(op, spec)


# ----------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------


def _error_text(value: Optional[float]) -> str:
    if value is None or math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2e}"


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    device = _device(args, parser)
    ops = list(dict.fromkeys(args.ops)) or list(registry.OPS)
    table = Table(title=f"fmkernels check on {device.type} (seed {args.seed})")
    table.add_column("op", no_wrap=True)
    table.add_column("implementation", no_wrap=True)
    table.add_column("case")
    table.add_column("max error", justify="right", no_wrap=True)
    table.add_column("tolerance", justify="right", no_wrap=True)
    table.add_column("result", min_width=_RESULT_WIDTH)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    start = time.perf_counter()
    with _user_impls(args, parser), _console(stderr=True).status("checking") as status:
        for row in testing.run_checks(ops, device, seed=args.seed):
            status.update(f"checking {row.op} · {row.implementation}")
            if row.result is None:
                counts["skipped"] += 1
                table.add_row(row.op, row.implementation, row.case, "", "", Text(f"skipped: {row.skipped}", "yellow"))
                continue
            result = row.result
            counts["passed" if result.passed else "failed"] += 1
            if result.passed:
                verdict = Text("pass" + (f" ({result.detail})" if result.detail else ""), "green")
            else:
                verdict = Text(f"FAIL: {result.detail}", "bold red")
            table.add_row(
                row.op, row.implementation, row.case,
                _error_text(result.max_error), _error_text(result.tolerance), verdict,
            )
    console = _console()
    console.print(table)
    summary = ", ".join(f"{count} {word}" for word, count in counts.items())
    console.print(f"{summary} in {time.perf_counter() - start:.1f} s")
    return 1 if counts["failed"] else 0


def _time_text(milliseconds: Optional[float]) -> str:
    if milliseconds is None:
        return "-"
    if milliseconds < 1:
        return f"{milliseconds * 1e3:.1f} µs"
    if milliseconds < 1000:
        return f"{milliseconds:.2f} ms"
    return f"{milliseconds / 1e3:.2f} s"


def _rate_text(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}"


def _bench_table(title: str, caption: str, numbers: Sequence[str]) -> Table:
    """op, implementation and shape, then the right-aligned ``numbers`` columns, then a note."""
    table = Table(title=title, caption=caption)
    table.add_column("op", no_wrap=True)
    table.add_column("implementation", no_wrap=True)
    table.add_column("shape")
    for column in numbers:
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("note", min_width=_RESULT_WIDTH)
    return table


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.compare:
        return _compare(args, parser)
    if args.overhead:
        return _bench_overhead(args, parser)
    given = [name for name, value in (("--calls", args.calls), ("--no-compile", args.no_compile)) if value]
    if given:
        parser.error(f"{' and '.join(given)}: only with --overhead")
    if args.plot:
        try:
            bench_results.require_matplotlib()
        except ImportError as exc:
            parser.error(str(exc))
    device = _device(args, parser)
    ops = list(dict.fromkeys(args.ops)) or list(registry.OPS)
    repeats = args.repeats or benchmark.DEFAULT_REPEATS[device.type]
    rows = []
    with _user_impls(args, parser):
        try:
            jobs = benchmark.plan(ops, device, sweep=args.sweep, only=args.only)
        except ValueError as exc:
            parser.error(str(exc))
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=_console(stderr=True), transient=True) as progress:
            task = progress.add_task("peak bandwidth and FLOP/s", total=len(jobs) + 1)
            peaks = benchmark.measure_peaks(device, (job.case.dtype for job in jobs))
            progress.advance(task)
            for job in jobs:
                progress.update(task, description=f"{job.impl.op} · {job.impl.name}")
                rows.append(benchmark.measure(job, repeats))
                progress.advance(task)
    rows = benchmark.with_comparisons(rows, peaks)

    limits = ", ".join(f"{dtype} matmul {rate * 1e3:.0f} GFLOP/s" for dtype, rate in peaks.tflops.items())
    table = _bench_table(
        f"fmkernels bench on {benchmark.device_label(device)} (median of {repeats})",
        f"speedup: the reference's time / this time; vs peer: the fastest peer's time / this time; "
        f"roofline: the time the measured limits allow / this time (copy {peaks.bandwidth_gbps:.1f} GB/s, {limits})",
        ("median", "TFLOP/s", "GB/s", "roofline", "speedup", "vs peer"),
    )
    for row in rows:
        speedup = f"{row.speedup:.2f}x" if row.speedup is not None else "-"
        vs_peer = f"{row.vs_peer:.2f}x {row.peer}" if row.vs_peer is not None and row.kind != "peer" else "-"
        roofline = f"{row.roofline:.0%}" if row.roofline is not None else "-"
        if row.error:
            note = Text(f"error: {row.error}", "bold red")
        elif row.skipped:
            note = Text(f"skipped: {row.skipped}", "yellow")
        else:
            note = Text("")
        table.add_row(
            row.op, row.implementation, f"{row.shape} {row.dtype}",
            _time_text(row.median_ms), _rate_text(row.tflops), _rate_text(row.gbps), roofline, speedup, vs_peer,
            note,
        )
    console = _console()
    console.print(table)
    if args.json:
        benchmark.write_json(args.json, rows, benchmark.metadata(device, args.command_line, peaks))
        console.print(f"wrote {args.json}")
    if args.plot:
        try:
            bench_results.plot(args.plot, benchmark.metadata(device, args.command_line, peaks),
                               [dataclasses.asdict(row) for row in rows])
        except ValueError as exc:
            _console(stderr=True).print(f"--plot {args.plot}: {exc}", style="bold red")
            return 1
        console.print(f"wrote {args.plot}")
    return 1 if any(row.error for row in rows) else 0


def _bench_overhead(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    other = {"--impl": args.impl, "--plot": args.plot, "--sweep": args.sweep, "--only": args.only}
    given = [name for name, value in other.items() if value]
    if given:
        parser.error(f"--overhead times the public ops and their kernels only: drop {', '.join(given)}")
    device = _device(args, parser)
    ops = list(dict.fromkeys(args.ops)) or list(registry.OPS)
    calls = args.calls or benchmark.DEFAULT_OVERHEAD_CALLS
    samples = args.repeats or benchmark.DEFAULT_OVERHEAD_SAMPLES
    cases = [case for op in ops for case in benchmark.overhead_cases(op, device)]
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_console(stderr=True), transient=True) as progress:
        task = progress.add_task("overhead", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case.op} · {case.shape}")
            rows.append(benchmark.measure_overhead(case, calls, samples, compile_op=not args.no_compile))
            progress.advance(task)
    meta = benchmark.overhead_metadata(device, args.command_line, calls, samples)
    table = _bench_table(
        benchmark.overhead_title(meta),
        f"a way's median - the kernel's; target: {meta['target']}",
        benchmark.OVERHEAD_COLUMNS,
    )
    for row in rows:
        if row.error:
            note = Text(f"error: {row.error}", "bold red")
        elif row.skipped and not row.median_us:
            note = Text(f"skipped: {row.skipped['kernel']}", "yellow")
        else:
            note = Text("")
        table.add_row(row.op, device.type, f"{row.shape} {row.dtype}", *benchmark.overhead_cells(row), note)
    console = _console()
    console.print(table)
    if args.json:
        benchmark.write_json(args.json, rows, meta)
        console.print(f"wrote {args.json}")
    return 1 if any(row.error for row in rows) else 0


def _ratio_text(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _throughput_text(row: Optional[dict]) -> str:
    rate = bench_results.throughput(row) if row is not None else None
    return "-" if rate is None else f"{rate[0]:.3g} {rate[1]}"


def _missing_text(row: Optional[dict], name: str) -> str:
    if row is None:
        return f"only in {'b' if name == 'a' else 'a'}"
    if row.get("median_ms") is None:
        return f"{name}: " + (f"error: {row['error']}" if row.get("error") else f"skipped: {row.get('skipped')}")
    return ""


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    timing_options = dict(OP=args.ops, **{"--impl": args.impl, "--json": args.json, "--plot": args.plot,
                                          "--sweep": args.sweep, "--only": args.only, "--repeats": args.repeats,
                                          "--device": args.device, "--overhead": args.overhead,
                                          "--calls": args.calls, "--no-compile": args.no_compile})
    given = [name for name, value in timing_options.items() if value]
    if given:
        parser.error(f"--compare reads two files and times nothing: drop {', '.join(given)}")
    path_a, path_b = args.compare
    try:
        meta_a, rows_a = bench_results.read_json(path_a)
        meta_b, rows_b = bench_results.read_json(path_b)
    except ValueError as exc:
        parser.error(f"--compare: {exc}")
    difference = bench_results.device_difference(meta_a, meta_b)
    if difference:
        _console(stderr=True).print(f"warning: {difference}; the ratios compare devices, not only code",
                                    style="yellow")
    table = _bench_table(
        f"a: {path_a} ({meta_a.get('device_name', '?')}) vs b: {path_b} ({meta_b.get('device_name', '?')})",
        "time b/a below 1 and throughput b/a above 1: b is faster",
        ("a median", "b median", "time b/a", "a throughput", "b throughput", "throughput b/a"),
    )
    for item in bench_results.compare(rows_a, rows_b):
        notes = [text for text in (_missing_text(item.a, "a"), _missing_text(item.b, "b")) if text]
        table.add_row(
            item.op, item.implementation, f"{item.shape} {item.dtype}",
            _time_text(item.a["median_ms"] if item.a else None), _time_text(item.b["median_ms"] if item.b else None),
            _ratio_text(item.time_ratio()), _throughput_text(item.a), _throughput_text(item.b),
            _ratio_text(item.throughput_ratio()), Text("; ".join(notes), "yellow"),
        )
    _console().print(table)
    return 0


def _backends(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    table = Table(title="fmkernels backends")
    table.add_column("backend")
    table.add_column("available")
    table.add_column("details")
    for status in backends().values():
        available = Text("yes", "green") if status.available else Text("no", "yellow")
        table.add_row(status.name, available, status.reason)
    _console().print(table)
    return 0


def _load_model(args: argparse.Namespace, parser: argparse.ArgumentParser, device: torch.device):
    """(model, tokenizer) for --model: a checkpoint directory, or a named config with random weights."""
    from .model import ByteTokenizer, ModelConfig, Transformer, load_tokenizer

    dtype = _DTYPES[args.dtype] if args.dtype else None
    err = _console(stderr=True)
    gguf = os.path.isfile(args.model) and args.model.endswith(".gguf")
    if os.path.isdir(args.model) or gguf:
        try:
            model = Transformer.from_pretrained(args.model, dtype=dtype, device=device, backend=args.backend,
                                                tensor_parallel=_tensor_parallel())
        except (OSError, ValueError) as exc:
            parser.error(f"--model {args.model}: {exc}")
        except ImportError as exc:
            parser.error(str(exc))
        if gguf or os.path.isfile(os.path.join(args.model, "tokenizer.json")):
            try:
                return model, load_tokenizer(args.model)
            except ImportError as exc:
                parser.error(str(exc))
        if model.config.vocab_size < ByteTokenizer.vocab_size:
            parser.error(f"--model {args.model}: no tokenizer.json, and its vocabulary "
                         f"({model.config.vocab_size}) is too small for the byte-level tokenizer")
        err.print(f"{args.model} has no tokenizer.json: using the byte-level tokenizer", style="yellow")
        return model, ByteTokenizer()
    if args.model not in _model_names():
        looks_like_path = os.sep in args.model or args.model.startswith(".")
        what = "no such checkpoint directory" if looks_like_path else "not a directory or a known model name"
        parser.error(f"--model {args.model}: {what} (names: {', '.join(_model_names())})")
    config = ModelConfig.from_name(args.model)
    if config.vocab_size < ByteTokenizer.vocab_size:
        parser.error(f"--model {args.model}: its vocabulary is too small for the byte-level tokenizer")
    model = Transformer.from_config(config, seed=0, dtype=dtype or torch.float32, device=device, backend=args.backend,
                                    tensor_parallel=_tensor_parallel())
    err.print(f"{args.model}: random weights (seed 0) and a byte-level tokenizer; the output is noise",
              style="yellow")
    return model, ByteTokenizer()


def _constraint(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The structured-output constraint the flags ask for, or None."""
    from .model import structured

    try:
        if args.json_schema is not None:
            text = args.json_schema
            if not text.lstrip().startswith("{"):
                with open(text) as f:
                    text = f.read()
            return structured.json_schema(text)
        if args.json_object:
            return structured.json_object()
        if args.regex is not None:
            return structured.regex(args.regex)
        if args.grammar is not None:
            with open(args.grammar) as f:
                return structured.grammar(f.read())
        if args.choices is not None:
            return structured.choices(args.choices)
    except (ImportError, OSError, ValueError, TypeError) as exc:
        parser.error(str(exc))
    return None


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .model import StreamDecoder, parallel

    constraint = _constraint(args, parser)
    device = _device(args, parser)
    model, tokenizer = _load_model(args, parser, device)
    if args.system is not None and args.chat is None:
        parser.error("--system goes with --chat")
    request = {}
    if args.chat is not None:
        from .model import chat

        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        messages.append({"role": "user", "content": args.chat})
        try:
            prompt = chat.apply_chat_template(tokenizer, messages)
        except (ImportError, ValueError) as exc:
            parser.error(f"--chat: {exc}")
        request["messages"] = messages
    else:
        prompt = tokenizer.encode(args.prompt)
        if not prompt:
            parser.error("--prompt: the prompt encodes to no tokens")
        request["prompts"] = [prompt]
    # Under torchrun every rank computes the same tokens; rank 0 prints them.
    first = parallel.is_first_rank(model)
    out = sys.stdout if first else open(os.devnull, "w")
    stream = StreamDecoder(tokenizer, prompt)
    # Text that a stop string could still claim (its last len - 1 characters) waits; a stop
    # string found is never printed (generate cuts it from its text in the same way).
    hold = max((len(s) for s in args.stop), default=1) - 1
    state = {"text": "", "printed": 0, "first": None}

    def on_token(_: int, token: int) -> None:
        if state["first"] is None:
            state["first"] = time.perf_counter()
        state["text"] += stream.push(token)
        cuts = [cut for cut in (state["text"].find(s) for s in args.stop) if cut >= 0]
        safe = min(cuts) if cuts else len(state["text"]) - hold
        if safe > state["printed"]:
            out.write(state["text"][state["printed"]:safe])
            out.flush()
            state["printed"] = safe

    if args.chat is None:
        out.write(args.prompt)
    start = time.perf_counter()
    try:
        result = model.generate(
            **request, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop_strings=args.stop or None,
            tokenizer=tokenizer, kv_cache=args.kv_cache, on_token=on_token, return_result=True,
            constraint=constraint,
        )
    except ValueError as exc:
        parser.error(str(exc))
    end = time.perf_counter()
    text = result.texts[0]
    out.write(text[state["printed"]:] + "\n")
    out.flush()
    new = len(result.tokens[0])
    prefill_s = state["first"] - start
    decode_s = end - state["first"]
    if model.tensor_parallel is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    if not first:
        out.close()
        return 0
    console = _console()
    console.print(f"prefill: {len(prompt)} tokens in {prefill_s * 1e3:.1f} ms, "
                  f"{len(prompt) / prefill_s:.1f} tokens/s")
    if new > 1:
        console.print(f"decode: {new - 1} tokens in {decode_s * 1e3:.1f} ms, {(new - 1) / decode_s:.1f} tokens/s "
                      f"(stopped: {result.finish_reasons[0]})")
    else:
        console.print(f"decode: no tokens after the first (stopped: {result.finish_reasons[0]})")
    return 0


def _count_text(value: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:,.2f}{unit}"
    return f"{value:,.0f}"


def _bytes_text(value: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value:,.0f} B"


def _flops_text(value: float) -> str:
    exponent = int(math.floor(math.log10(value))) if value > 0 else 0
    return f"{value / 10 ** exponent:.2f}e{exponent}"


def _seconds_text(value: float) -> str:
    return f"{value * 1e3:,.3f} ms" if value >= 1e-4 else f"{value * 1e6:,.2f} µs"


def _load_config(spec: str, parser: argparse.ArgumentParser):
    from .model import ModelConfig

    if spec in _model_names():
        return ModelConfig.from_name(spec)
    if os.path.exists(spec):
        try:
            return ModelConfig.from_hf_config(spec)
        except (OSError, ValueError) as exc:
            parser.error(f"{spec}: {exc}")
    parser.error(f"{spec}: not a config.json, a directory holding one, or a known model name "
                 f"(names: {', '.join(_model_names())})")


def _info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from .model.stats import DTYPE_BYTES

    config = _load_config(args.model, parser)
    try:
        stats = config.stats(
            dtype=args.dtype, kv_dtype=args.kv_dtype, context=args.context, batch=args.batch, device=args.device,
            train_tokens=args.train_tokens, table_batches=args.batches, table_contexts=args.contexts,
        )
        split = stats.tensor_parallel(args.tp, args.interconnect) if args.tp > 1 else None
    except ValueError as exc:
        if "interconnect" in str(exc):
            parser.error(f"--tp {args.tp} on --device {args.device} needs --interconnect GBPS: {exc}")
        parser.error(f"--tp {args.tp}: {exc}" if args.tp > 1 else str(exc))
    if args.interconnect is not None and split is None:
        parser.error("--interconnect goes with --tp N (N > 1)")
    if args.json:
        figures = {"model": args.model, **stats.as_dict()}
        if split is not None:
            figures["tensor_parallel"] = split.as_dict()
        print(json.dumps(figures, indent=2))
        return 0

    console = _console()
    p = stats.params
    moe = f", {config.n_experts} experts, {config.experts_per_token} per token" if config.n_experts else ""
    console.print(
        f"[bold]{args.model}[/bold]: {config.architecture}, {config.n_layers} layers, dim {config.dim}, "
        f"{config.n_heads} heads / {config.n_kv_heads} KV heads x {config.head_dim}, ffn {config.ffn_dim}, "
        f"vocab {config.vocab_size}{moe}"
    )
    if stats.context > config.max_seq_len:
        console.print(f"--context {stats.context} is beyond the model's max_seq_len {config.max_seq_len}",
                      style="yellow")

    params = Table(title="parameters")
    for column in ("part", "parameters", "share"):
        params.add_column(column, justify="left" if column == "part" else "right")
    parts = [("embedding", p.embedding), ("attention", p.attention),
             ("experts" if config.n_experts else "mlp", p.mlp), ("router", p.router), ("norms", p.norms),
             ("lm head" + (" (tied)" if config.tie_embeddings else ""), p.lm_head)]
    for name, count in parts:
        if count or name.startswith("lm head"):
            params.add_row(name, f"{count:,}", f"{count / p.total:.1%}")
    params.add_row("[bold]total[/bold]", f"[bold]{p.total:,}[/bold] ({_count_text(p.total)})", "")
    params.add_row("active per token", f"{p.active:,} ({_count_text(p.active)})", f"{p.active / p.total:.1%}")
    console.print(params)

    memory = Table(title="memory")
    memory.add_column("what")
    memory.add_column("bytes", justify="right")
    widths: dict = {}
    for dtype, width in DTYPE_BYTES.items():
        widths.setdefault(width, []).append(dtype)
    for names in widths.values():
        chosen = " (chosen)" if stats.dtype in names else ""
        memory.add_row(f"weights, {'/'.join(names)}{chosen}", _bytes_text(stats.weight_bytes(names[0])))
    memory.add_row(f"KV cache per token ({stats.kv_dtype})", _bytes_text(stats.kv_bytes_per_token))
    memory.add_row(f"KV cache, {stats.context:,} tokens x batch {stats.batch}", _bytes_text(stats.kv_bytes()))
    memory.add_row(f"weights ({stats.dtype}) + KV cache", _bytes_text(stats.weight_bytes() + stats.kv_bytes()))
    console.print(memory)

    compute = Table(title="FLOPs")
    compute.add_column("what")
    compute.add_column("FLOPs", justify="right")
    compute.add_row("forward, per token: matmuls", _flops_text(2 * stats.matmul_params_per_token))
    compute.add_row(f"forward, per token: attention at {stats.context:,} keys",
                    _flops_text(stats.attention_flops_per_token()))
    compute.add_row(f"prefill of a {stats.context:,}-token prompt", _flops_text(stats.prefill_flops))
    compute.add_row(f"training on {_count_text(stats.train_tokens)} tokens (6 x active x tokens)",
                    _flops_text(stats.training_flops))
    compute.add_row("Chinchilla budget (20 tokens / parameter)", f"{_count_text(stats.chinchilla_tokens)} tokens")
    console.print(compute)

    device = stats.device
    capacity = f", {device.memory_gb:g} GB" if device.memory_gb else ""
    decode = stats.decode()
    bounds = Table(title=f"roofline on {device.name}: {device.memory_bandwidth_gb_s:g} GB/s, "
                   f"{device.tflops:g} TFLOP/s{capacity}")
    bounds.add_column("what")
    bounds.add_column("bound", justify="right")
    bounds.add_row(f"decode step, batch {decode.batch} at {decode.context:,} tokens: reads",
                   f"{_bytes_text(decode.weight_bytes)} weights + {_bytes_text(decode.kv_bytes)} KV")
    bounds.add_row("  memory time / compute time",
                   f"{_seconds_text(decode.memory_time_s)} / {_seconds_text(decode.compute_time_s)} ({decode.bound})")
    bounds.add_row("  decode tokens/s (per sequence)",
                   f"{decode.tokens_per_s:,.1f} ({decode.tokens_per_s / decode.batch:,.1f})")
    bounds.add_row(f"prefill tokens/s ({stats.context:,}-token prompt)", f"{stats.prefill_tokens_per_s:,.0f}")
    if decode.fits is False:
        bounds.add_row("[yellow]weights + KV cache exceed the device's memory[/yellow]", "")
    console.print(bounds)

    if split is not None:
        kv_note = " (each rank one, replicated)" if split.kv_replicated else ""
        parallel = Table(title=f"tensor parallel over {split.world} x {device.name}, interconnect "
                         f"{split.interconnect_gb_s:g} GB/s per device per direction")
        parallel.add_column("what")
        parallel.add_column("per device", justify="right")
        parallel.add_row("heads / KV heads", f"{split.n_heads} / {split.n_kv_heads}{kv_note}")
        parallel.add_row(f"weights ({stats.dtype})", _bytes_text(split.weight_bytes))
        parallel.add_row(f"KV cache, {stats.context:,} tokens x batch {stats.batch}", _bytes_text(split.kv_bytes))
        parallel.add_row("decode step reads", f"{_bytes_text(split.step_weight_bytes)} weights + "
                         f"{_bytes_text(split.kv_bytes)} KV")
        parallel.add_row("all-reduce bytes sent per token (2 a layer)", _bytes_text(split.all_reduce_bytes_per_token))
        parallel.add_row("  memory / compute / all-reduce time",
                         f"{_seconds_text(split.memory_time_s)} / {_seconds_text(split.compute_time_s)} / "
                         f"{_seconds_text(split.communication_time_s)}")
        parallel.add_row("  decode tokens/s (vs 1 device)",
                         f"{split.tokens_per_s:,.1f} ({split.tokens_per_s / decode.tokens_per_s:.2f}x)")
        console.print(parallel)

    rows = stats.table()
    table = Table(title="decode tokens/s bound (whole batch); * compute-bound, oom: weights + KV exceed memory")
    table.add_column("batch", justify="right")
    for context in stats.table_contexts:
        table.add_column(f"{context:,} tokens", justify="right")
    for batch in stats.table_batches:
        cells = []
        for row in rows:
            if row.batch == batch:
                text = f"{row.tokens_per_s:,.0f}" + ("*" if row.bound == "compute" else "")
                cells.append(f"[dim]{text} oom[/dim]" if row.fits is False else text)
        table.add_row(str(batch), *cells)
    console.print(table)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``fmkernels`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0, or 1 when a check failed or an implementation raised during
        bench. Bad arguments exit with status 2 and a message (argparse's ``SystemExit``).
    """
    arguments: List[str] = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(arguments)
    args.command_line = shlex.join(["fmkernels", *arguments])
    return args.handler(args, parser)
