"""pytest-benchmark timings of every implementation of every op on fmkernels.benchmark's CPU default shapes.

Run on demand, not with the test suite (pyproject's testpaths is ["tests"]):

    pytest bench/ --benchmark-json bench/results/<device>/<date>-pytest-bench.json

Each result's extra_info carries the case's FLOPs and bytes, and the achieved TFLOP/s and
GB/s at the median time, counted as ``fmkernels bench`` counts them.
"""

import pytest
import torch

from fmkernels.benchmark import plan
from fmkernels.registry import OPS

JOBS = plan(OPS, torch.device("cpu"))


@pytest.fixture(autouse=True)
def _node_id_for_pytest_benchmark(request):
    """pytest-benchmark (5.2.3, 5.3) reads ``Node._nodeid``, which pytest 9.2 no longer has
    (ionelmc/pytest-benchmark#321); autouse fixtures run before ``benchmark`` is built."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def _job_id(job) -> str:
    layout = "-paged" if "paged" in job.case.shape and job.case.op == "decode_attention" else ""
    return f"{job.case.op}{layout}-{str(job.case.dtype).replace('torch.', '')}-{job.impl.name}"


@pytest.mark.parametrize("job", JOBS, ids=[_job_id(job) for job in JOBS])
def test_op(benchmark, job):
    if job.skipped:
        pytest.skip(job.skipped)
    kwargs = job.case.make_kwargs()
    unsupported = job.impl.unsupported_reason(kwargs)
    if unsupported:
        pytest.skip(unsupported)
    benchmark.group = f"{job.case.op} {job.case.shape} {job.case.dtype}"
    benchmark.extra_info.update(shape=job.case.shape, dtype=str(job.case.dtype), flops=job.case.flops,
                                bytes=job.case.bytes)
    benchmark(job.impl.fn, **kwargs)
    if benchmark.stats:  # no stats under --benchmark-disable
        median = benchmark.stats.stats.median
        if job.case.flops:
            benchmark.extra_info["tflops"] = job.case.flops / median / 1e12
        if job.case.bytes:
            benchmark.extra_info["gbps"] = job.case.bytes / median / 1e9
