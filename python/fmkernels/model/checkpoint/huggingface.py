"""A Hugging Face checkpoint directory (config.json + safetensors, one file or shards)
loaded into a Transformer, each tensor (or a tensor-parallel rank's slice of it) read once."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from ..network.config import ModelConfig
from ..network.parallel import resolve
from ..network.transformer import materialize, meta_model

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# Checkpoint dtypes the ops run; any other loads as float32.
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (HF keeps everything but the LM head under ``model.``)."""
    return name if name.startswith("lm_head.") else "model." + name


def _our_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def _shards(path: str) -> Dict[str, str]:
    """Tensor name -> the safetensors file holding it."""
    index = os.path.join(path, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'")
        files = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"checkpoint shard {shard} (listed in {_INDEX}) is missing")
        return files
    single = os.path.join(path, _SINGLE)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in {path}")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def load_huggingface(path: str, *, dtype: Optional[torch.dtype], device, backend: str, tensor_parallel=False):
    """The Transformer of the checkpoint directory ``path`` (see ``fmkernels.model.load_pretrained``);
    with ``tensor_parallel``, this rank's share (``fmkernels.model.network.parallel``)."""
    config = ModelConfig.from_hf_config(path)
    files = _shards(path)
    from safetensors import safe_open

    plan = resolve(tensor_parallel, config, device)
    # The whole model's shapes are the checkpoint's; a tensor-parallel rank holds slices of them.
    model = meta_model(config, backend=backend)
    expected = {_hf_name(name): param for name, param in model.named_parameters()}
    missing = sorted(name for name in expected if name not in files)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint {path} has no tensor {missing[0]!r}{more}, which the {config.architecture} "
                         f"config needs")
    # Shapes and dtype from the headers first, so a mismatch is reported before anything loads.
    by_shard: Dict[str, list] = {}
    for name in expected:
        by_shard.setdefault(files[name], []).append(name)
    for shard, names in sorted(by_shard.items()):
        with safe_open(shard, framework="pt") as f:
            for name in names:
                header = f.get_slice(name)
                shape = tuple(header.get_shape())
                if shape != tuple(expected[name].shape):
                    want = tuple(expected[name].shape)
                    raise ValueError(f"checkpoint tensor {name!r} has shape {shape}, the config expects {want}")
                if dtype is None and name == _hf_name("embed_tokens.weight"):
                    dtype = _DTYPES.get(header.get_dtype(), torch.float32)
    if plan is not None:
        model = meta_model(config, backend=backend, tensor_parallel=plan)
    model = materialize(model, dtype=dtype or torch.float32, device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():  # one tensor (a rank's slice of one) in host memory at a time beside the model
        for shard, names in sorted(by_shard.items()):
            with safe_open(shard, framework="pt") as f:
                for name in names:
                    ours = _our_name(name)
                    where = None if plan is None else plan.slice_of(ours, config.head_dim)
                    if where is None:
                        params[ours].copy_(f.get_tensor(name))
                    else:
                        dim, start, stop = where
                        part = f.get_slice(name)
                        params[ours].copy_(part[start:stop] if dim == 0 else part[:, start:stop])
    return model.eval()

