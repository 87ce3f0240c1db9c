"""A process that has run the cpu backend on several threads can fork, and the child runs every
cpu op (OpenMP's thread pool does not survive a fork: without fmkernels' at-fork handler the
child's first parallel region waits forever). Each child runs under a time limit."""

import multiprocessing
import os
import signal
import time

import pytest
import torch

import fmkernels
from fmkernels import platform, reference

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    pytest.mark.skipif(bool(platform.unavailable_reason("cpu")), reason=str(platform.unavailable_reason("cpu"))),
]

TIME_LIMIT_S = 60


def _inputs():
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return dict(
        q=randn(2, 40, 4, 64), k=randn(2, 40, 2, 64), v=randn(2, 40, 2, 64),
        q1=randn(3, 1, 4, 64), k_cache=randn(3, 64, 2, 64), v_cache=randn(3, 64, 2, 64),
        lengths=torch.tensor([5, 64, 31], dtype=torch.int32), new_k=randn(3, 1, 2, 64), new_v=randn(3, 1, 2, 64),
        logits=randn(4, 70000), x=randn(8, 576), weight=randn(300, 576),
    )


def _every_cpu_op(a):
    """Every public op on the cpu backend; big enough that the kernels split work across threads."""
    k_cache, v_cache = a["k_cache"].clone(), a["v_cache"].clone()
    fmkernels.append_kv(k_cache, v_cache, a["new_k"], a["new_v"], a["lengths"] - 1, backend="cpu")
    return dict(
        attention=fmkernels.attention(a["q"], a["k"], a["v"], causal=True, backend="cpu"),
        decode_attention=fmkernels.decode_attention(a["q1"], k_cache, v_cache, a["lengths"], backend="cpu"),
        filter_logits=fmkernels.filter_logits(a["logits"], top_k=50, top_p=0.9, backend="cpu"),
        sample=fmkernels.sample(a["logits"], temperature=0.8, top_p=0.9, seed=7, backend="cpu"),
        linear=fmkernels.linear(a["x"], a["weight"], backend="cpu"),
        k_cache=k_cache,
    )


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _wait(pid: int) -> int:
    """The child's exit status, killing it past the time limit (a hang fails the test, not the suite)."""
    deadline = time.monotonic() + TIME_LIMIT_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child did not finish within {TIME_LIMIT_S} s (an OpenMP region waiting for the parent's threads)")


def test_forked_child_runs_every_cpu_op(two_threads, tmp_path):
    a = _inputs()
    expected = _every_cpu_op(a)  # the parent's OpenMP pool now has its threads
    out = tmp_path / "child.pt"
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            result = _every_cpu_op(a)
            torch.save({"result": result, "threads": torch.get_num_threads()}, out)
            status = 0
        finally:
            os._exit(status)
    assert _wait(pid) == 0
    child = torch.load(out)
    # The child runs single-threaded, with the parent's results: the kernels' results do not depend
    # on the thread count.
    assert child["threads"] == 1
    for name, value in expected.items():
        assert torch.equal(child["result"][name], value), name
    assert torch.get_num_threads() == 2  # the parent keeps its setting


def _child_sample(queue):
    logits = torch.randn(4, 70000, generator=torch.Generator().manual_seed(3))
    tokens = fmkernels.sample(logits, temperature=0.0, backend="cpu")
    queue.put((tokens.tolist(), reference.sample(logits, temperature=0.0).tolist(), torch.get_num_threads()))


def test_multiprocessing_fork_workers_run_the_cpu_ops(two_threads):
    _every_cpu_op(_inputs())
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_child_sample, args=(queue,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        results = [queue.get(timeout=TIME_LIMIT_S) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
    for tokens, expected, threads in results:
        assert tokens == expected and threads == 1
