"""load_pretrained on mismatched checkpoints: each error names the problem."""

import json
import os

import pytest
import torch

from fmkernels.model import load_pretrained

from _model_checks import hf_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf_model("llama").save_pretrained(path)
    return path


def _copy(checkpoint, tmp_path, tensors=None, config=None):
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    save_file(tensors(weights) if tensors else weights, os.path.join(tmp_path, "model.safetensors"))
    with open(os.path.join(checkpoint, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(config(raw) if config else raw, f)
    return tmp_path


def test_loads_with_dtype(checkpoint):
    model = load_pretrained(checkpoint, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.backend == "auto"
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_missing_tensor(checkpoint, tmp_path):
    def drop(weights):
        del weights["model.layers.1.self_attn.k_proj.weight"]
        return weights

    with pytest.raises(ValueError, match="no tensor 'model.layers.1.self_attn.k_proj.weight'"):
        load_pretrained(_copy(checkpoint, tmp_path, tensors=drop))


def test_mis_shaped_tensor(checkpoint, tmp_path):
    def shrink(weights):
        weights["model.norm.weight"] = weights["model.norm.weight"][:10].clone()
        return weights

    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(10,\), the config expects \(64,\)"):
        load_pretrained(_copy(checkpoint, tmp_path, tensors=shrink))


def test_unknown_architecture(checkpoint, tmp_path):
    def gpt2(raw):
        return {**raw, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}

    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_pretrained(_copy(checkpoint, tmp_path, config=gpt2))


def test_missing_files(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    path = _copy(checkpoint, tmp_path)
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(path)


def test_missing_shard(tmp_path):
    hf_model("llama").save_pretrained(tmp_path, max_shard_size="30KB")
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    os.remove(tmp_path / shards[-1])
    with pytest.raises(FileNotFoundError, match=f"shard .*{shards[-1]} .*is missing"):
        load_pretrained(tmp_path)


def test_checkpoint_dtype_is_kept_unless_one_is_asked(tmp_path):
    hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    assert load_pretrained(tmp_path).dtype == torch.bfloat16
    model = load_pretrained(tmp_path, dtype=torch.float32)
    assert model.dtype == torch.float32 and model.layers[0].mlp.up_proj.weight.dtype == torch.float32
