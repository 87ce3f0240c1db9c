"""The dry run of ``bench/gpu_check.sh``: import the Python parts of every command it would run.

    FMKERNELS_GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh all

The script lists its commands (one per line, shell-quoted) and hands the list to this module,
which checks each here, without a GPU, so a device call does not spend its minutes on a typo:

* ``python -m pytest ARGS``: pytest collects ARGS' selection (``--collect-only``; the xdist
  and stop-early options dropped), which must hold at least one test;
* ``python -m fmkernels ARGS``: the command line's own parser accepts ARGS;
* ``python SCRIPT.py ARGS``: the script imports (as a module, so its ``main`` does not run) and,
  where it defines ``main(argv)`` with an argparse parser, accepts ARGS (parsed with its
  ``main`` replaced by the parser's check);
* anything else (pip, compute-sanitizer's own options, cuobjdump, tar) is printed only.

Wrappers are looked through: ``timeout``'s and ``env``'s arguments and ``compute-sanitizer``'s
options (each with its value) come before the command they run. Exits 1 when any command fails its check.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import shlex
import sys
from typing import List, Optional, Sequence

def unwrapped(argv: Sequence[str]) -> List[str]:
    """The command ``argv`` runs once ``timeout``, ``env`` and ``compute-sanitizer`` are looked through."""
    argv = list(argv)
    while argv:
        head = os.path.basename(argv[0])
        if head == "timeout":
            argv = argv[1:]
            while argv and argv[0].startswith("-"):
                argv = argv[2:] if argv[0] in ("-k", "-s") else argv[1:]
            argv = argv[1:]  # the duration
        elif head == "env":
            argv = argv[1:]
            while argv and "=" in argv[0] and not argv[0].startswith("-"):
                argv = argv[1:]
        elif head == "compute-sanitizer":
            argv = argv[1:]
            while argv and argv[0].startswith("-"):  # its options take a value: --tool memcheck, --print-limit=20
                argv = argv[1:] if "=" in argv[0] else argv[2:]
        else:
            return argv
    return argv


def _is_python(word: str) -> bool:
    return os.path.basename(word).startswith("python")


def _pytest_selection(args: Sequence[str]) -> List[str]:
    """pytest's arguments for collecting what ``args`` would run: no workers, no -x, -q kept."""
    kept, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg in ("-n", "--durations"):
            skip_next = True
            continue
        if arg in ("-x", "-v") or arg.startswith("--durations="):
            continue
        kept.append(arg)
    return ["--collect-only", "-q", *kept]


def check_pytest(args: Sequence[str]) -> Optional[str]:
    import pytest

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = pytest.main(_pytest_selection(args))
    if code != 0:
        return f"pytest collection exited {int(code)} (5: no test selected):\n{output.getvalue()[-2000:]}"
    return None


def check_cli(args: Sequence[str]) -> Optional[str]:
    from fmkernels import cli

    try:
        with contextlib.redirect_stderr(io.StringIO()) as errors:
            cli._parser().parse_args(list(args))
    except SystemExit as exit_:
        return f"fmkernels rejects {list(args)}: {errors.getvalue().strip() or exit_}"
    return None


class _Parsed(Exception):
    """Raised in place of a script's work once its parser has accepted the arguments."""


def check_script(path: str, args: Sequence[str]) -> Optional[str]:
    """Import the script as a module; run its ``main(argv)`` up to its argument parsing."""
    if not os.path.isfile(path):
        return f"{path} does not exist"
    name = "_dry_run_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # any import failure is what the dry run is for
        return f"importing {path} failed: {type(error).__name__}: {error}"
    main = getattr(module, "main", None)
    if main is None:
        return None
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, argv=None, namespace=None):
        original(parser, argv, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_and_stop
    try:
        with contextlib.redirect_stderr(io.StringIO()) as errors:
            try:
                main(list(args))
            except TypeError:  # a main() that takes no argv reads sys.argv
                saved, sys.argv = sys.argv, [path, *args]
                try:
                    main()
                finally:
                    sys.argv = saved
    except _Parsed:
        return None
    except SystemExit as exit_:
        return f"{path} rejects {list(args)}: {errors.getvalue().strip() or exit_}"
    finally:
        argparse.ArgumentParser.parse_args = original
    return f"{path}: main() returned without parsing its arguments"


def check(argv: Sequence[str]) -> Optional[str]:
    """Why the command ``argv`` would fail at once (None: it imports and parses)."""
    argv = unwrapped(argv)
    if not argv or not _is_python(argv[0]):
        return None
    args = argv[1:]
    if args[:2] == ["-m", "pytest"]:
        return check_pytest(args[2:])
    if args[:2] == ["-m", "fmkernels"]:
        return check_cli(args[2:])
    if args and args[0].endswith(".py"):
        return check_script(args[0], args[1:])
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commands", help="the file of commands, one shell-quoted command a line")
    args = parser.parse_args(argv)
    with open(args.commands) as file:
        commands = [shlex.split(line) for line in file if line.strip()]
    failures = 0
    for command in commands:
        error = check(command)
        text = shlex.join(unwrapped(command))
        print(f"{'ok  ' if error is None else 'FAIL'} {text[:150]}")
        if error is not None:
            failures += 1
            print("     " + error.replace("\n", "\n     "))
    print(f"dry run: {len(commands)} commands, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
