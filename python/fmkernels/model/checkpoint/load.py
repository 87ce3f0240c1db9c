"""The one way in to a local checkpoint, whatever its format: ``load_pretrained`` (the
model), ``load_config`` (its configuration) and ``load_tokenizer`` (its tokenizer), each
dispatching on the path to a Hugging Face directory (``huggingface``, ``tokenizer``) or a
GGUF file (``gguf``)."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..network.config import ModelConfig
from ..network.transformer import Transformer
from . import gguf, huggingface
from .tokenizer import HFTokenizer


def _path(path, name: str = "path") -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def load_pretrained(path, *, dtype: Optional[torch.dtype] = None, device=None, backend: str = "auto",
                    tensor_parallel=False) -> Transformer:
    """Loads a local checkpoint: a Hugging Face directory or a GGUF file.

    Parameters
    ----------
    path : str or os.PathLike
        A Hugging Face checkpoint directory (config.json and safetensors: ``model.safetensors``,
        or shards listed in ``model.safetensors.index.json``), or a GGUF file (llama.cpp's
        format; architecture "llama": Llama, Mistral, Mixtral). A GGUF file's weights, of any
        type the ``gguf`` package dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
        Q2_K..Q6_K, ...), are dequantized at load, a slab of rows at a time, so loading holds
        about one copy of the model in ``dtype``; the model computes in ``dtype``.
    dtype : torch.dtype, optional
        The weights' dtype. None keeps the checkpoint's (safetensors; a GGUF file whose
        matrices are all F16 or all BF16) and is float32 for a quantized GGUF file.
    device : torch.device or str, optional
        Where the weights go; default CPU.
    backend : str
        The ops' backend ("auto", "reference", "cpu", "triton", "cuda", ...).
    tensor_parallel : bool, ProcessGroup or TensorParallel
        True: this process's share of the model split over torch.distributed's default
        group (initialised from torchrun's environment when it is not yet: gloo on a CPU
        machine, NCCL with GPUs), reading only its slices of the checkpoint; a ProcessGroup:
        split over that group. See ``fmkernels.model.network.parallel``.

    Returns
    -------
    Transformer
        In eval mode; ``model.config`` as ``load_config(path)`` reads it.

    Raises FileNotFoundError for a missing file, ValueError for an unknown architecture, a
    missing metadata key, a missing, unexpected or mis-shaped tensor or a tensor type gguf
    cannot dequantize, naming it, and ImportError naming the extra when a GGUF file is given
    without the ``gguf`` package (``pip install 'fmkernels[gguf]'``).
    """
    path = _path(path)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    if os.path.isfile(path):
        return gguf.load_gguf(path, dtype=dtype, device=device, backend=backend, tensor_parallel=tensor_parallel)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory or GGUF file {path} does not exist")
    return huggingface.load_huggingface(path, dtype=dtype, device=device, backend=backend,
                                        tensor_parallel=tensor_parallel)


def load_config(path) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint: a Hugging Face directory or its ``config.json``
    (``ModelConfig.from_hf_config``), or a GGUF file (its ``llama.*`` metadata: llama.cpp writes
    Llama, Mistral and Mixtral as architecture "llama"; ``gguf.read_config`` says what each field
    is read from). Raises FileNotFoundError for a missing path, ValueError for another
    architecture or a missing key, naming it, and ImportError naming the extra when a GGUF file
    is given without the ``gguf`` package (``pip install 'fmkernels[gguf]'``)."""
    path = _path(path)
    if path.endswith(".gguf") or gguf.is_gguf(path):
        return gguf.read_config(gguf.GGUFFile(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint directory, config.json or GGUF file at {path}")
    return ModelConfig.from_hf_config(path)


def load_tokenizer(path) -> HFTokenizer:
    """The tokenizer of a checkpoint: ``path`` is its directory (holding ``tokenizer.json``),
    the ``tokenizer.json`` file itself (``HFTokenizer.from_file``), or a GGUF file (its
    ``tokenizer.*`` metadata: see ``gguf.read_tokenizer``). Raises FileNotFoundError when there
    is none and ImportError naming the package when ``tokenizers`` (or, for GGUF, ``gguf``) is
    not installed."""
    path = _path(path)
    if path.endswith(".gguf") or gguf.is_gguf(path):
        return gguf.read_tokenizer(gguf.GGUFFile(path))
    return HFTokenizer.from_file(path)
