"""Time every implementation of an op on default shapes, and count the work it does.

``fmkernels bench`` prints what ``measure`` returns; ``bench/test_bench_ops.py`` times the
same cases with pytest-benchmark. Implementations are called directly (``impl.fn``), so the
time is the implementation's, without the public op's input checks.

* ``cases``: the default and sweep shapes, and the FLOPs and bytes one call is credited with;
* ``timing``: how a call is timed (warm-up, then the median of ``repeats`` timed calls; on
  CUDA with events, the L2 cache flushed and the host's launch cost kept outside);
* ``roofline``: the device's copy bandwidth and matmul rates, measured, and the fraction of
  them a call reaches;
* ``run``: the plan of a run, its timed rows and the comparisons between them;
* ``record``: the device and the metadata a benchmark JSON records, and the file;
* ``overhead``: the public op's whole call against its kernel alone, at decode-sized inputs
  (``fmkernels bench --overhead``, ``bench/op_overhead.py``).
"""

from ..testing import skip_reason
from .cases import BenchCase, Kwargs, attention_flops, default_cases, sweep_cases, visible_pairs
from .overhead import (
    DEFAULT_OVERHEAD_CALLS,
    DEFAULT_OVERHEAD_SAMPLES,
    OVERHEAD_COLUMNS,
    OVERHEAD_TARGET_OPS,
    OVERHEAD_TARGET_RATIO,
    OVERHEAD_TARGET_US,
    OVERHEAD_WAYS,
    OverheadRow,
    measure_overhead,
    overhead_cases,
    overhead_cells,
    overhead_metadata,
    overhead_target_us,
    overhead_title,
    require_same_outputs,
    sample_us,
)
from .record import cpu_isa, device_label, device_name, metadata, write_json
from .roofline import Peaks, measure_peaks, roofline_fraction
from .run import BenchRow, Job, measure, plan, with_comparisons
from .timing import DEFAULT_REPEATS, call_seconds, interleaved_median_seconds, median_seconds

__all__ = [
    "BenchCase", "Kwargs", "attention_flops", "default_cases", "sweep_cases", "visible_pairs",
    "DEFAULT_REPEATS", "call_seconds", "interleaved_median_seconds", "median_seconds",
    "Peaks", "measure_peaks", "roofline_fraction",
    "BenchRow", "Job", "measure", "plan", "with_comparisons", "skip_reason",
    "cpu_isa", "device_label", "device_name", "metadata", "write_json",
    "DEFAULT_OVERHEAD_CALLS", "DEFAULT_OVERHEAD_SAMPLES", "OVERHEAD_COLUMNS", "OVERHEAD_TARGET_OPS",
    "OVERHEAD_TARGET_RATIO", "OVERHEAD_TARGET_US", "OVERHEAD_WAYS", "OverheadRow", "measure_overhead",
    "overhead_cases", "overhead_cells", "overhead_metadata", "overhead_target_us", "overhead_title",
    "require_same_outputs", "sample_us",
]
