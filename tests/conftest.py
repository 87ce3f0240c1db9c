"""Test set-up: Triton through the interpreter when there is no GPU, and the gpu marker."""

import os

import torch

# Must happen before any Triton kernel is defined: without a GPU, Triton kernels run on
# the CPU through the interpreter (fp32 and fp16 exact; bf16 only loaded and stored).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
