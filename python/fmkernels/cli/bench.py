"""``fmkernels bench``: time every implementation on default shapes, or, with --overhead, each op's call."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from .. import bench_results, benchmark, registry
from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="time every implementation on default shapes",
        description="Time every available implementation of each OP on default shapes sized for the "
        "device (median of --repeats after warm-up) and report TFLOP/s or GB/s and the speedup "
        "over the reference measured in the same run. With --compare, time nothing: put two "
        "--json files side by side.",
        epilog=common.IMPL_SIGNATURES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common.add_op_arguments(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the rows and run metadata as JSON")
    parser.add_argument(
        "--plot", metavar="PATH",
        help="also draw a PNG: a subplot per op, throughput against the size the shapes vary (use "
        "--sweep), a line per implementation, the measured roofline dashed; needs matplotlib "
        "(pip install 'fmkernels[plot]')",
    )
    parser.add_argument(
        "--compare", nargs=2, metavar=("A.json", "B.json"),
        help="time nothing: match the rows of two --json files (op, implementation, shape, dtype) "
        "and print their times and throughputs side by side with the ratios b/a",
    )
    parser.add_argument(
        "--repeats", type=common.integer_at_least(1),
        help="timed calls per implementation, after warm-up (default: "
        + ", ".join(f"{count} on {device}" for device, count in benchmark.DEFAULT_REPEATS.items()) + ")",
    )
    parser.add_argument(
        "--sweep", action="store_true",
        help="time grids of sizes (seqlen, batch x context, batch) instead of one default shape per op",
    )
    parser.add_argument(
        "--only", metavar="NAMES", type=lambda value: [name for name in value.split(",") if name],
        help="comma-separated implementation names to time (e.g. cuda,triton,sdpa_flash); default: all",
    )
    parser.add_argument(
        "--overhead", action="store_true",
        help="time each public op's call at decode-sized inputs instead: the kernel through its binding, "
        "the op, the op with device checks off and the op inside torch.compile, µs per call "
        "(median/min of --repeats samples, default "
        f"{benchmark.DEFAULT_OVERHEAD_SAMPLES}), with issue 18's target for append_kv, decode_attention and sample",
    )
    parser.add_argument(
        "--calls", type=common.integer_at_least(1),
        help=f"with --overhead: calls timed together in one sample (default {benchmark.DEFAULT_OVERHEAD_CALLS})",
    )
    parser.add_argument("--no-compile", action="store_true", help="with --overhead: leave out the torch.compile'd op")
    return parser


def _rate_text(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}"


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=common.console(stderr=True), transient=True)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """bench, or bench --overhead; bench --compare is ``compare.run``."""
    if args.overhead:
        return _run_overhead(args, parser)
    given = [name for name, value in (("--calls", args.calls), ("--no-compile", args.no_compile)) if value]
    if given:
        parser.error(f"{' and '.join(given)}: only with --overhead")
    if args.plot:
        try:
            bench_results.require_matplotlib()
        except ImportError as exc:
            parser.error(str(exc))
    device = common.choose_device(args, parser)
    ops = list(dict.fromkeys(args.ops)) or list(registry.OPS)
    repeats = args.repeats or benchmark.DEFAULT_REPEATS[device.type]
    rows = []
    with common.user_impls(args, parser):
        try:
            jobs = benchmark.plan(ops, device, sweep=args.sweep, only=args.only)
        except ValueError as exc:
            parser.error(str(exc))
        with _progress() as progress:
            task = progress.add_task("peak bandwidth and FLOP/s", total=len(jobs) + 1)
            peaks = benchmark.measure_peaks(device, (job.case.dtype for job in jobs))
            progress.advance(task)
            for job in jobs:
                progress.update(task, description=f"{job.impl.op} · {job.impl.name}")
                rows.append(benchmark.measure(job, repeats))
                progress.advance(task)
    rows = benchmark.with_comparisons(rows, peaks)

    limits = ", ".join(f"{dtype} matmul {rate * 1e3:.0f} GFLOP/s" for dtype, rate in peaks.tflops.items())
    table = common.bench_table(
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
            common.time_text(row.median_ms), _rate_text(row.tflops), _rate_text(row.gbps), roofline, speedup,
            vs_peer, note,
        )
    console = common.console()
    console.print(table)
    if args.json:
        benchmark.write_json(args.json, rows, benchmark.metadata(device, args.command_line, peaks))
        console.print(f"wrote {args.json}")
    if args.plot:
        try:
            bench_results.plot(args.plot, benchmark.metadata(device, args.command_line, peaks),
                               [dataclasses.asdict(row) for row in rows])
        except ValueError as exc:
            common.console(stderr=True).print(f"--plot {args.plot}: {exc}", style="bold red")
            return 1
        console.print(f"wrote {args.plot}")
    return 1 if any(row.error for row in rows) else 0


def _run_overhead(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    other = {"--impl": args.impl, "--plot": args.plot, "--sweep": args.sweep, "--only": args.only}
    given = [name for name, value in other.items() if value]
    if given:
        parser.error(f"--overhead times the public ops and their kernels only: drop {', '.join(given)}")
    device = common.choose_device(args, parser)
    ops = list(dict.fromkeys(args.ops)) or list(registry.OPS)
    calls = args.calls or benchmark.DEFAULT_OVERHEAD_CALLS
    samples = args.repeats or benchmark.DEFAULT_OVERHEAD_SAMPLES
    cases = [case for op in ops for case in benchmark.overhead_cases(op, device)]
    rows = []
    with _progress() as progress:
        task = progress.add_task("overhead", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case.op} · {case.shape}")
            rows.append(benchmark.measure_overhead(case, calls, samples, compile_op=not args.no_compile))
            progress.advance(task)
    meta = benchmark.overhead_metadata(device, args.command_line, calls, samples)
    table = common.bench_table(
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
    console = common.console()
    console.print(table)
    if args.json:
        benchmark.write_json(args.json, rows, meta)
        console.print(f"wrote {args.json}")
    return 1 if any(row.error for row in rows) else 0
