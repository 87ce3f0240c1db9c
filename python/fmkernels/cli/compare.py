"""``fmkernels bench --compare A.json B.json``: two bench --json files side by side, timing nothing."""

from __future__ import annotations

import argparse
from typing import Optional

from rich.text import Text

from .. import bench_results
from . import common


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


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Its options are bench's (``bench.add_parser``)."""
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
        common.console(stderr=True).print(f"warning: {difference}; the ratios compare devices, not only code",
                                          style="yellow")
    table = common.bench_table(
        f"a: {path_a} ({meta_a.get('device_name', '?')}) vs b: {path_b} ({meta_b.get('device_name', '?')})",
        "time b/a below 1 and throughput b/a above 1: b is faster",
        ("a median", "b median", "time b/a", "a throughput", "b throughput", "throughput b/a"),
    )
    for item in bench_results.compare(rows_a, rows_b):
        notes = [text for text in (_missing_text(item.a, "a"), _missing_text(item.b, "b")) if text]
        table.add_row(
            item.op, item.implementation, f"{item.shape} {item.dtype}",
            common.time_text(item.a["median_ms"] if item.a else None),
            common.time_text(item.b["median_ms"] if item.b else None),
            _ratio_text(item.time_ratio()), _throughput_text(item.a), _throughput_text(item.b),
            _ratio_text(item.throughput_ratio()), Text("; ".join(notes), "yellow"),
        )
    common.console().print(table)
    return 0
