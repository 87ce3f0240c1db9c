"""``fmkernels check``: every implementation held to the reference over a sweep of cases."""

from __future__ import annotations

import argparse
import math
import time
from typing import Optional

from rich.table import Table
from rich.text import Text

from .. import registry, testing
from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check", help="hold every implementation to the reference over a sweep of cases",
        description="Run every available implementation of each OP on odd shapes, dtypes and seeds "
        "and compare it with the reference (rules: fmkernels.testing). Exits 1 if any case fails.",
        epilog=common.IMPL_SIGNATURES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common.add_op_arguments(parser)
    parser.add_argument("--seed", type=common.integer_at_least(0), default=0,
                        help="seed of each op's first case (default 0)")
    return parser


def _error_text(value: Optional[float]) -> str:
    if value is None or math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2e}"


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    device = common.choose_device(args, parser)
    ops = list(dict.fromkeys(args.ops)) or list(registry.OPS)
    table = Table(title=f"fmkernels check on {device.type} (seed {args.seed})")
    table.add_column("op", no_wrap=True)
    table.add_column("implementation", no_wrap=True)
    table.add_column("case")
    table.add_column("max error", justify="right", no_wrap=True)
    table.add_column("tolerance", justify="right", no_wrap=True)
    table.add_column("result", min_width=common.RESULT_WIDTH)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    start = time.perf_counter()
    with common.user_impls(args, parser), common.console(stderr=True).status("checking") as status:
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
    console = common.console()
    console.print(table)
    summary = ", ".join(f"{count} {word}" for word, count in counts.items())
    console.print(f"{summary} in {time.perf_counter() - start:.1f} s")
    return 1 if counts["failed"] else 0
