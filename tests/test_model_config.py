"""ModelConfig: named configurations, Hugging Face config.json dicts, validation."""

import dataclasses
import json

import pytest

from fmkernels.model import ModelConfig

LLAMA_JSON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}


@pytest.mark.parametrize("name, dims", [
    ("llama-2-7b", (32000, 4096, 32, 32, 32, 11008, 128)),
    ("llama-2-13b", (32000, 5120, 40, 40, 40, 13824, 128)),
    ("llama-2-70b", (32000, 8192, 80, 64, 8, 28672, 128)),
    ("llama-3-8b", (128256, 4096, 32, 32, 8, 14336, 128)),
    ("llama-3-70b", (128256, 8192, 80, 64, 8, 28672, 128)),
    ("llama-3-405b", (128256, 16384, 126, 128, 8, 53248, 128)),
    ("mistral-7b", (32000, 4096, 32, 32, 8, 14336, 128)),
    ("mixtral-8x7b", (32000, 4096, 32, 32, 8, 14336, 128)),
    ("tiny", (512, 64, 2, 4, 2, 128, 16)),
])
def test_named_configs_have_published_dimensions(name, dims):
    c = ModelConfig.from_name(name)
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.head_dim) == dims
    assert name in ModelConfig.names()


def test_named_config_details():
    assert ModelConfig.from_name("llama-3-405b").rope_scaling["factor"] == 8.0
    mixtral = ModelConfig.from_name("mixtral-8x7b")
    assert (mixtral.n_experts, mixtral.experts_per_token, mixtral.rope_theta) == (8, 2, 1e6)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model name 'llama-9'.*llama-2-7b"):
        ModelConfig.from_name("llama-9")


def test_hf_config_dict_and_file(tmp_path):
    config = ModelConfig.from_hf_config(LLAMA_JSON)
    # Llama 3.1 8B: Llama 3's dimensions with the 128k-context RoPE scaling.
    expected = dataclasses.replace(
        ModelConfig.from_name("llama-3-8b"), rope_scaling=LLAMA_JSON["rope_scaling"], max_seq_len=131072
    )
    assert config == expected
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_JSON))
    assert ModelConfig.from_hf_config(tmp_path) == config
    assert ModelConfig.from_hf_config(tmp_path / "config.json") == config


def test_hf_rope_parameters_and_explicit_head_dim():
    raw = {k: v for k, v in LLAMA_JSON.items() if k not in ("rope_theta", "rope_scaling")}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    raw["head_dim"] = 64
    config = ModelConfig.from_hf_config(raw)
    assert (config.rope_theta, config.rope_scaling, config.head_dim) == (1e6, None, 64)


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture.*GPT2LMHeadModel"),
    (dict(hidden_size=None), "config.json has no 'hidden_size'"),
    (dict(num_attention_heads=32, num_key_value_heads=5), "n_heads must be a multiple of n_kv_heads"),
    (dict(hidden_size=4100), "dim must be divisible by n_heads"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported rope_scaling type 'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 4.0}), "has no 'low_freq_factor'"),
    (dict(vocab_size=0), "vocab_size must be a positive int"),
])
def test_bad_hf_config_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**LLAMA_JSON, **change})


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_hf_config(tmp_path)


def test_moe_validation():
    with pytest.raises(ValueError, match=r"experts_per_token must be in \[1, n_experts=4\]"):
        ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8, n_experts=4,
                    experts_per_token=5, architecture="mixtral")
