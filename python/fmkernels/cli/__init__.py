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

A module per subcommand (``bench`` holds --overhead, ``compare`` bench --compare), the helpers
they share in ``common``. They parse and print; the correctness rules live in
``fmkernels.testing`` and the timing and FLOP/byte accounting in ``fmkernels.benchmark``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import List, Optional, Sequence

from .. import __version__
from . import backends, bench, check, compare, generate, info


def _bench_or_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return compare.run(args, parser) if args.compare else bench.run(args, parser)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmkernels",
        description="Check fmkernels' implementations (and yours) against the reference ops, "
        "benchmark them, and list the backends this machine can run.",
    )
    parser.add_argument("--version", action="version", version=f"fmkernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check.add_parser(commands).set_defaults(handler=check.run)
    bench.add_parser(commands).set_defaults(handler=_bench_or_compare)
    backends.add_parser(commands).set_defaults(handler=backends.run)
    generate.add_parser(commands).set_defaults(handler=generate.run)
    info.add_parser(commands).set_defaults(handler=info.run)
    return parser


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
