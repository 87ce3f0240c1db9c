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
                    tensor_parallel=False, weights: str = "auto") -> Transformer:
    """Loads a local checkpoint: a Hugging Face directory or a GGUF file.

    Parameters
    ----------
    path : str or os.PathLike
        A Hugging Face checkpoint directory (config.json and safetensors: ``model.safetensors``,
        or shards listed in ``model.safetensors.index.json``), or a GGUF file (llama.cpp's
        format; architecture "llama": Llama, Mistral, Mixtral). A GGUF file's weights may be of
        any type the ``gguf`` package dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
        Q5_1, Q2_K..Q6_K, ...); ``weights`` says which stay quantized. Tensors are read a slab
        of rows at a time, so loading holds about one copy of the model as it is kept.
    dtype : torch.dtype, optional
        The activations' dtype, and that of every weight held as floats (all of them, but
        those kept quantized). None keeps the checkpoint's (safetensors; a GGUF file whose
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
    weights : str
        For a GGUF file: "quantized" keeps each matrix of a block format fmkernels runs
        (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) in that format, the file's bytes as they are, as a
        ``QuantizedLinear`` (``QuantizedEmbedding`` for the embedding; a tied LM head shares
        it) that ``fmkernels.linear`` multiplies by; matrices of other types (F16, BF16, F32,
        Q5_K, ...) and the norms are dequantized into ``dtype``. A tensor-parallel rank keeps
        its slice quantized where it is whole blocks, else dequantizes it. "dequantized"
        dequantizes every tensor into ``dtype``. "auto" (the default) is "quantized" on the
        CPU, where the C++ kernel reads the blocks, and "dequantized" on a GPU: the GPU
        quantized kernels (Triton, CUDA) have not run on a GPU yet, so auto does not reach
        them (ask for "quantized" to). For a Hugging Face directory, "auto" and
        "dequantized" load it as it is; "quantized" raises ValueError (it holds no blocks).

    Returns
    -------
    Transformer
        In eval mode; ``model.config`` as ``load_config(path)`` reads it.

    Raises FileNotFoundError for a missing file, ValueError for a ``weights`` not named above
    (naming it), for an unknown architecture, a
    missing metadata key, a missing, unexpected or mis-shaped tensor or a tensor type gguf
    cannot dequantize, naming it, and ImportError naming the extra when a GGUF file is given
    without the ``gguf`` package (``pip install 'fmkernels[gguf]'``).
    """
    path = _path(path)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    gguf.resolve_weights(weights, device)  # the value checked before any file is read
    if os.path.isfile(path):
        return gguf.load_gguf(path, dtype=dtype, device=device, backend=backend, tensor_parallel=tensor_parallel,
                              weights=weights)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory or GGUF file {path} does not exist")
    if weights == "quantized":
        raise ValueError(f"weights='quantized' keeps a GGUF file's quantized blocks, but {path} is a Hugging Face "
                         f"checkpoint directory, which holds none: use weights='auto' or 'dequantized'")
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
