"""The bench/ scripts, imported as modules so their tests can call ``main`` and their helpers."""

import importlib.util
import pathlib
import sys

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """bench/<name>.py as the module ``bench_<name>``."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", _BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
