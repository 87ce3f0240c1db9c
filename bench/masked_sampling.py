"""fmkernels.sample with an ``allowed`` token bitmask against the same call without one.

    python bench/masked_sampling.py [--device cpu|cuda] [--backends cpu,reference] [--vocab 49152,128256]
                                    [--batches 1,16] [--rounds 15] [--json PATH]

A grammar engine hands the sampler a packed int32 bitmask per step (batch, ceil(vocab / 32));
the structured-output target is that the masked ``sample`` costs at most 10% more than the
unmasked one on the same logits. Each row times both on the same logits, interleaved
(unmasked, masked, unmasked, ...: ``--rounds`` rounds of 5 timed calls each, after warm-up),
and reports the medians and their ratio, for three masks:

* ``all``: every token allowed (the mask's cost with nothing removed);
* ``half``: a random half of the tokens (a loose grammar state);
* ``sparse``: about 1% of the tokens (a JSON value's next characters, a key's spelling).

Two parameter sets: greedy (temperature 0, the usual choice for structured output) and
temperature 0.7, top-k 50, top-p 0.9. On a GPU each call is timed with CUDA events
(``fmkernels.benchmark.call_seconds``); the mask is already on the device (its copy from the
host is timed apart, as ``copy_us``). ``--kernel-only`` calls each backend's implementation
directly (``fmkernels.registry``), without the public op's checks: the kernels' own cost.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch

import fmkernels
from fmkernels import benchmark, registry

MASKS = {"all": 1.0, "half": 0.5, "sparse": 0.01}
PARAMETERS = {
    "greedy": dict(temperature=0.0),
    "t0.7 k50 p0.9": dict(temperature=0.7, top_k=50, top_p=0.9),
}
CALLS_PER_ROUND = 5


def _mask(batch: int, vocab: int, density: float, generator: torch.Generator) -> torch.Tensor:
    mask = torch.rand((batch, vocab), generator=generator) < density
    mask[:, 0] = True  # every row allows a token
    return fmkernels.pack_allowed(mask)


def interleaved_us(functions: Dict[str, object], device, rounds: int) -> Dict[str, float]:
    """Median µs per call of each function, interleaved (``benchmark.interleaved_median_seconds``)."""
    medians = benchmark.interleaved_median_seconds(functions, device, rounds, CALLS_PER_ROUND)
    return {name: seconds * 1e6 for name, seconds in medians.items()}


def copy_us(allowed: torch.Tensor, device, rounds: int) -> float:
    """µs to copy a host bitmask to the device (pinned memory, as a decode loop would keep it)."""
    host = allowed.cpu().pin_memory()
    return interleaved_us({"copy": lambda: host.to(device, non_blocking=True)}, device, rounds)["copy"]


def _sampler(backend: str, kernel_only: bool):
    if kernel_only:
        return registry.get_impl("sample", backend)
    return lambda **kwargs: fmkernels.sample(backend=backend, **kwargs)


def run(device: str, backends: List[str], vocabs: List[int], batches: List[int], rounds: int,
        kernel_only: bool = False) -> List[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for vocab in vocabs:
        for batch in batches:
            logits = (torch.randn((batch, vocab), generator=generator) * 3).to(device)
            seeds = torch.randint(0, 2**62, (batch,), generator=generator).to(device)
            masks = {name: _mask(batch, vocab, density, generator).to(device) for name, density in MASKS.items()}
            upload = copy_us(masks["half"], device, rounds) if torch.device(device).type == "cuda" else None
            for backend in backends:
                sample = _sampler(backend, kernel_only)
                for label, params in PARAMETERS.items():
                    functions = {"unmasked": lambda: sample(logits=logits, seed=seeds, step=3, **params)}
                    for name, allowed in masks.items():
                        functions[name] = (lambda allowed=allowed: sample(
                            logits=logits, seed=seeds, step=3, allowed=allowed, **params))
                    medians = interleaved_us(functions, device, rounds)
                    for name in MASKS:
                        row = dict(backend=backend, kernel_only=kernel_only, vocab=vocab, batch=batch, parameters=label, mask=name,
                                   unmasked_us=medians["unmasked"], masked_us=medians[name],
                                   ratio=medians[name] / medians["unmasked"])
                        if upload is not None:
                            row["copy_us"] = upload
                        rows.append(row)
                        print(f"{backend:<10} vocab {vocab:>6} b{batch:<4} {label:<14} {name:<7} "
                              f"unmasked {row['unmasked_us']:9.1f} µs  masked {row['masked_us']:9.1f} µs  "
                              f"ratio {row['ratio']:5.2f}" + (f"  copy {upload:6.1f} µs" if upload else ""),
                              flush=True)
    return rows


def _ints(text: str) -> List[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: cpu,reference on the CPU; cuda,triton,reference on a GPU)")
    parser.add_argument("--vocab", default=None, help="comma-separated (default: 49152,128256 on the CPU, 128256 on a GPU)")
    parser.add_argument("--batches", default=None, help="comma-separated (default: 1,16 on the CPU, 1,4,16,64,256 on a GPU)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--kernel-only", action="store_true", help="call the implementations without the op's checks")
    parser.add_argument("--json", default=None, help="write the rows and the run's metadata here")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("no GPU visible", file=sys.stderr)
        return 2
    backends = (args.backends or ("cuda,triton,reference" if gpu else "cpu,reference")).split(",")
    vocabs = _ints(args.vocab or ("128256" if gpu else "49152,128256"))
    batches = _ints(args.batches or ("1,4,16,64,256" if gpu else "1,16"))
    rows = run(args.device, backends, vocabs, batches, args.rounds, args.kernel_only)
    if args.json:
        meta = benchmark.metadata(args.device, "python " + " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])]))
        benchmark.write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
