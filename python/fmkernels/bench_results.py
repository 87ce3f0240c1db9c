"""What ``fmkernels bench --json`` wrote: read it back, compare two runs, plot throughput.

A bench JSON file is ``{"metadata": {...}, "rows": [...]}`` (``benchmark.write_json``): the
metadata names the device and the measured peaks, each row one implementation on one shape.

``compare`` matches the rows of two files by (op, implementation, shape, dtype): two commits
on one device, or one commit on two devices. ``plot`` draws, for each op, throughput against
the size its shapes vary (sequence length, cache length, batch), one line per implementation,
with the roofline the run measured; it needs matplotlib (``pip install 'fmkernels[plot]'``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

Row = Dict[str, Any]

#: What the metadata of an op-overhead file (``fmkernels bench --overhead``, ``bench/op_overhead.py``)
#: holds under "benchmark": its rows are not ``fmkernels bench`` rows, and ``read_json`` refuses it.
OVERHEAD_BENCHMARK = "overhead"

#: Keys every row of a bench JSON file has.
ROW_KEYS = ("op", "implementation", "kind", "shape", "dtype", "median_ms", "tflops", "gbps")

# Sizes a plot's x axis may follow, in order of preference: sequence length, cache length,
# vocabulary, batch, new tokens (the keys of benchmark's shape strings).
_X_KEYS = ("s", "cache", "vocab", "b", "new")
_X_LABELS = {"s": "sequence length", "cache": "cached tokens per sequence", "vocab": "vocabulary",
             "b": "batch", "new": "new tokens"}


def read_json(path: str) -> Tuple[Dict[str, Any], List[Row]]:
    """The metadata and rows of a bench JSON file.

    Parameters
    ----------
    path : str
        A file ``fmkernels bench --json`` wrote.

    Returns
    -------
    (dict, list of dict)

    Raises
    ------
    ValueError
        If the file cannot be read, is not JSON, or is not a bench file (naming what is missing).
    """
    try:
        with open(path) as file:
            data = json.load(file)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a bench JSON file (not JSON: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a bench JSON file: expected an object with 'metadata' (an object) "
                         "and 'rows' (a list), as fmkernels bench --json writes")
    if data["metadata"].get("benchmark") == OVERHEAD_BENCHMARK:
        raise ValueError(f"{path}: an op-overhead file (fmkernels bench --overhead, bench/op_overhead.py), not "
                         "fmkernels bench rows: its rows are µs per call of the ways an op is called, "
                         "which --compare does not match")
    for index, row in enumerate(data["rows"]):
        missing = [key for key in ROW_KEYS if not isinstance(row, dict) or key not in row]
        if missing:
            raise ValueError(f"{path}: not a bench JSON file: row {index} has no {', '.join(missing)}")
    return data["metadata"], data["rows"]


def throughput(row: Row) -> Optional[Tuple[float, str]]:
    """(rate, unit) of a timed row: GB/s where its bytes are counted (memory-bound ops), else TFLOP/s."""
    if row.get("gbps") is not None:
        return row["gbps"], "GB/s"
    if row.get("tflops") is not None:
        return row["tflops"], "TFLOP/s"
    return None


# ----------------------------------------------------------------------------
# Two runs side by side
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One (op, implementation, shape, dtype) in two bench files; ``a`` or ``b`` is None where absent."""

    op: str
    implementation: str
    shape: str
    dtype: str
    a: Optional[Row]
    b: Optional[Row]

    def time_ratio(self) -> Optional[float]:
        """b's median time / a's (below 1: b is faster), where both were timed."""
        if self.a is None or self.b is None or not self.a["median_ms"] or self.b["median_ms"] is None:
            return None
        return self.b["median_ms"] / self.a["median_ms"]

    def throughput_ratio(self) -> Optional[float]:
        """b's throughput / a's (above 1: b is faster), where both have one in the same unit."""
        rate_a = throughput(self.a) if self.a is not None else None
        rate_b = throughput(self.b) if self.b is not None else None
        if rate_a is None or rate_b is None or rate_a[1] != rate_b[1] or not rate_a[0]:
            return None
        return rate_b[0] / rate_a[0]


def _key(row: Row) -> tuple:
    return row["op"], row["implementation"], row["shape"], row["dtype"]


def compare(rows_a: Sequence[Row], rows_b: Sequence[Row]) -> List[Comparison]:
    """Match two files' rows by (op, implementation, shape, dtype): a's order, then rows only in b."""
    by_key_b = {_key(row): row for row in rows_b}
    keys_a = {_key(row) for row in rows_a}
    matched = [Comparison(*_key(row), row, by_key_b.get(_key(row))) for row in rows_a]
    return matched + [Comparison(*_key(row), None, row) for row in rows_b if _key(row) not in keys_a]


def device_difference(meta_a: Dict[str, Any], meta_b: Dict[str, Any]) -> Optional[str]:
    """A warning when the two runs' devices differ (their ratios then compare hardware), or None."""
    names = [f"{meta.get('device_name', '?')} ({meta.get('device', '?')})" for meta in (meta_a, meta_b)]
    if names[0] == names[1]:
        return None
    return f"the files were measured on different devices: a on {names[0]}, b on {names[1]}"


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------


def require_matplotlib():
    """matplotlib's Figure and Agg canvas classes, or an ImportError that says how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'fmkernels[plot]' (or pip install matplotlib)") from None
    return Figure, FigureCanvasAgg


def _sizes(shape: str) -> Dict[str, int]:
    """The integer sizes of a shape string ("b=4 s=1024 h=16/16 d=128 causal" -> b, s, d)."""
    sizes = {}
    for token in shape.split():
        key, _, value = token.partition("=")
        if value.isdigit():
            sizes[key] = int(value)
    return sizes


def _x_key(rows: Sequence[Row]) -> Optional[str]:
    """The size an op's rows vary most naturally along (preferring sequence length), or one they all have."""
    sizes = [_sizes(row["shape"]) for row in rows]
    present = [key for key in _X_KEYS if all(key in s for s in sizes)]
    varying = [key for key in present if len({s[key] for s in sizes}) > 1]
    return (varying or present or [None])[0]


def _series_label(row: Row, x_key: str, rows: Sequence[Row]) -> str:
    """The implementation, and what else tells its rows apart: tokens of the shape (and the dtype)
    that vary across the op's rows, leaving out the x size and sizes that follow from it."""
    x_of = {row_["shape"]: _sizes(row_["shape"]).get(x_key) for row_ in rows}
    parts = [row["implementation"]]
    for token in row["shape"].split():
        key, _, value = token.partition("=")
        if key == x_key or all(token in r["shape"].split() for r in rows):
            continue
        if value.isdigit():
            # a size set by the x size (attention's batch = tokens / seqlen) is not a series of its own
            pairs = {(x_of[r["shape"]], _sizes(r["shape"]).get(key)) for r in rows}
            if len({x for x, _ in pairs}) == len(pairs):
                continue
        parts.append(token)
    if len({r["dtype"] for r in rows}) > 1:
        parts.append(row["dtype"])
    return " ".join(parts)


def _roofline(ax, unit: str, dtypes: Sequence[str], metadata: Dict[str, Any]) -> None:
    if unit == "GB/s" and metadata.get("peak_bandwidth_gbps"):
        ax.axhline(metadata["peak_bandwidth_gbps"], color="black", linestyle="--",
                   label=f"roofline: copy {metadata['peak_bandwidth_gbps']:.0f} GB/s")
    peaks = metadata.get("peak_tflops") or {}
    if unit == "TFLOP/s":
        for dtype in dtypes:
            if dtype in peaks:
                ax.axhline(peaks[dtype], color="black", linestyle="--",
                           label=f"roofline: {dtype} matmul {peaks[dtype]:.3g} TFLOP/s")


def plot(path: str, metadata: Dict[str, Any], rows: Sequence[Row]) -> List[str]:
    """Write a PNG with one subplot per op: throughput against size, one line per implementation.

    The x axis is the size the op's shapes vary (sequence length for attention, cached
    tokens for decode, batch for sampling; logarithmic when it spans a factor of 4 or more);
    the y axis GB/s for ops whose bytes are counted, else TFLOP/s, logarithmic. A dashed
    line marks the roofline the run measured (copy bandwidth, or the dtype's matmul rate).
    Rows without a time (skipped, errors) are left out.

    Parameters
    ----------
    path : str
        The image to write (PNG).
    metadata : dict
        The bench run's metadata (device name and peaks).
    rows : sequence of dict
        The bench rows, as in the JSON file.

    Returns
    -------
    list of str
        The ops plotted, in order.

    Raises
    ------
    ImportError
        Without matplotlib.
    ValueError
        When no row has a time.
    """
    Figure, FigureCanvasAgg = require_matplotlib()
    from matplotlib.ticker import ScalarFormatter
    timed = [row for row in rows if row.get("median_ms") is not None and throughput(row) is not None]
    ops = list(dict.fromkeys(row["op"] for row in timed))
    if not ops:
        raise ValueError("no timed rows with a throughput to plot (every row was skipped or failed)")
    figure = Figure(figsize=(9, 4 * len(ops)), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"fmkernels bench on {metadata.get('device_name', 'an unknown device')}")
    for index, op in enumerate(ops):
        ax = figure.add_subplot(len(ops), 1, index + 1)
        op_rows = [row for row in timed if row["op"] == op]
        unit = "GB/s" if any(row.get("gbps") is not None for row in op_rows) else "TFLOP/s"
        op_rows = [row for row in op_rows if throughput(row)[1] == unit]
        x_key = _x_key(op_rows)
        series: Dict[str, List[Tuple[float, float]]] = {}
        for row in op_rows:
            x = _sizes(row["shape"]).get(x_key, 0) if x_key else 0
            series.setdefault(_series_label(row, x_key, op_rows), []).append((x, throughput(row)[0]))
        for label, points in series.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        _roofline(ax, unit, sorted({row["dtype"] for row in op_rows}), metadata)
        xs = [x for points in series.values() for x, _ in points if x > 0]
        if xs and max(xs) >= 4 * min(xs):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())  # 1024, not 2^10
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel(_X_LABELS.get(x_key, "case"))
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return ops
