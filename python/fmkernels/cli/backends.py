"""``fmkernels backends``: which backends can run here, and why not."""

from __future__ import annotations

import argparse

from rich.table import Table
from rich.text import Text

from .. import backends
from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser("backends", help="which backends can run here, and why not")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    table = Table(title="fmkernels backends")
    table.add_column("backend")
    table.add_column("available")
    table.add_column("details")
    for status in backends().values():
        available = Text("yes", "green") if status.available else Text("no", "yellow")
        table.add_row(status.name, available, status.reason)
    common.console().print(table)
    return 0
