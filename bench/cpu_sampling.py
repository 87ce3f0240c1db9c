"""The C++ CPU filter_logits and sample against the reference, on a Llama-3 vocabulary.

    python bench/cpu_sampling.py [--repeats N] [--threads T]

Each case times the reference and the cpu backend interleaved (reference, cpu, reference,
...), so load from other processes on the machine hits both alike, and prints the medians.
GB/s counts the logits read once (batch x vocab x dtype size) over the time: reading them is
the floor of an O(vocab) pass, which is what the kernel does.
"""

import argparse
import statistics
import time

import torch

import fmkernels
from fmkernels.ops import _cpu
from fmkernels import reference

BATCH, VOCAB = 16, 128256

CASES = [  # (op, dtype, parameters)
    ("sample", torch.float32, dict(temperature=0.7, top_k=50, top_p=0.9)),
    ("filter_logits", torch.float32, dict(temperature=0.7, top_k=50, top_p=0.9)),
    ("sample", torch.float32, dict(temperature=0.7, top_p=0.9)),
    ("filter_logits", torch.float32, dict(temperature=0.7, top_p=0.9)),
    ("sample", torch.bfloat16, dict(temperature=0.7, top_k=50, top_p=0.9)),
    ("filter_logits", torch.bfloat16, dict(temperature=0.7, top_k=50, top_p=0.9)),
]


def interleaved_medians(functions, repeats):
    for fn in functions:
        fn()  # warm-up
    times = [[] for _ in functions]
    for _ in range(repeats):
        for fn, spent in zip(functions, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    logits32 = torch.randn(BATCH, VOCAB, generator=generator) * 2
    seeds = torch.randint(0, 2**62, (BATCH,), generator=generator)

    print(f"batch {BATCH}, vocab {VOCAB}, {args.threads} threads, median of {args.repeats} interleaved runs")
    print(f"{'op':<14} {'dtype':<9} {'parameters':<34} {'reference ms':>12} {'cpu ms':>8} {'GB/s':>7} {'speedup':>8}")
    for op, dtype, params in CASES:
        logits = logits32.to(dtype)
        kwargs = dict(params, seed=seeds, step=5) if op == "sample" else params
        ref_ms, cpu_ms = (1e3 * t for t in interleaved_medians(
            [lambda: getattr(reference, op)(logits, **kwargs), lambda: getattr(_cpu, op)(logits, **kwargs)],
            args.repeats))
        gbps = logits.numel() * logits.element_size() / (cpu_ms * 1e-3) / 1e9
        shown = " ".join(f"{key}={value}" for key, value in params.items())
        print(f"{op:<14} {str(dtype)[6:]:<9} {shown:<34} {ref_ms:>12.2f} {cpu_ms:>8.3f} {gbps:>7.1f} "
              f"{ref_ms / cpu_ms:>7.1f}x")
    assert fmkernels.sample(logits32, seed=seeds, backend="cpu", **CASES[0][2]).shape == (BATCH,)


if __name__ == "__main__":
    main()
