"""ModelConfig: the dimensions of a Llama/Mistral/Mixtral model, from a Hugging Face
config.json or a table of named, published configurations (a GGUF file's metadata:
``fmkernels.model.checkpoint.gguf.read_config``)."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, Dict, Optional, Tuple, Union


# Architectures whose checkpoints this model reads (config.json's "architectures" or "model_type").
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
}
_MODEL_TYPES = set(_ARCHITECTURES.values())


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Dimensions and constants of a decoder-only Llama-style transformer.

    ``n_experts == 0`` is a dense SwiGLU MLP; ``n_experts > 0`` a Mixtral mixture of experts
    with ``experts_per_token`` experts routed per token. ``rope_scaling`` is None or a
    Llama-3 scaling dict (rope_type "llama3": factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings). ``eos_token_ids`` are the checkpoint's end-of-sequence
    tokens (config.json's ``eos_token_id``, an int or a list), which ``generate`` stops at
    unless told not to.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: Optional[int] = None  # None: dim // n_heads
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    n_experts: int = 0
    experts_per_token: int = 0
    max_seq_len: int = 4096
    architecture: str = "llama"
    eos_token_ids: Tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if self.head_dim is None:
            if self.n_heads > 0 and self.dim % self.n_heads:
                raise ValueError(
                    f"dim must be divisible by n_heads when head_dim is not given, got dim={self.dim}, "
                    f"n_heads={self.n_heads}"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads if self.n_heads > 0 else 0)
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first field that is out of range or inconsistent."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads must be a multiple of n_kv_heads (GQA), got n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")
        if self.n_experts < 0 or self.experts_per_token < 0:
            raise ValueError(
                f"ModelConfig.n_experts and experts_per_token must be >= 0, got {self.n_experts}, "
                f"{self.experts_per_token}"
            )
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError(
                f"ModelConfig.experts_per_token must be in [1, n_experts={self.n_experts}], "
                f"got {self.experts_per_token}"
            )
        if self.architecture not in _MODEL_TYPES:
            raise ValueError(
                f"ModelConfig.architecture must be one of {sorted(_MODEL_TYPES)}, got {self.architecture!r}"
            )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        for token in self.eos_token_ids:
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"ModelConfig.eos_token_ids must be token ids in [0, {self.vocab_size}), got {token!r}"
                )

    @classmethod
    def from_hf_config(cls, config: Union[Dict[str, Any], str, os.PathLike]) -> "ModelConfig":
        """Reads a Hugging Face ``config.json`` (a dict, the file, or the directory holding it).

        Llama 2/3 (with Llama-3 ``rope_scaling``), Mistral and Mixtral; transformers' older
        ``rope_theta``/``rope_scaling`` keys and its newer ``rope_parameters`` both work.
        Raises ValueError for another architecture or a missing field, naming it.
        """
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path) as f:
                config = json.load(f)
        architecture = _architecture(config)

        def field(key: str):
            if key not in config or config[key] is None:
                raise ValueError(f"config.json has no {key!r}, which a {architecture} model needs")
            return config[key]

        rope = config.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_scaling = config.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind == "default":
                rope_scaling = None
        n_experts = int(field("num_local_experts")) if architecture == "mixtral" else 0
        eos = config.get("eos_token_id")
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(
            vocab_size=field("vocab_size"),
            dim=field("hidden_size"),
            n_layers=field("num_hidden_layers"),
            n_heads=field("num_attention_heads"),
            n_kv_heads=config.get("num_key_value_heads") or field("num_attention_heads"),
            ffn_dim=field("intermediate_size"),
            head_dim=config.get("head_dim"),
            rope_theta=float(rope_theta),
            rope_scaling=dict(rope_scaling) if rope_scaling is not None else None,
            norm_eps=float(field("rms_norm_eps")),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            n_experts=n_experts,
            experts_per_token=int(field("num_experts_per_tok")) if n_experts else 0,
            max_seq_len=field("max_position_embeddings"),
            architecture=architecture,
            eos_token_ids=eos,
        )

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A named configuration with its published dimensions (see ``ModelConfig.names()``)."""
        if name not in _NAMED:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(sorted(_NAMED))}")
        return cls(**_NAMED[name])

    @staticmethod
    def names():
        return sorted(_NAMED)


def _architecture(config: Dict[str, Any]) -> str:
    names = config.get("architectures") or []
    for name in names:
        if name in _ARCHITECTURES:
            return _ARCHITECTURES[name]
    model_type = config.get("model_type")
    if model_type in _MODEL_TYPES:
        return model_type
    got = names or model_type
    raise ValueError(
        f"unsupported architecture {got!r}: fmkernels.model reads {', '.join(sorted(_ARCHITECTURES))} "
        f"(model_type {', '.join(sorted(_MODEL_TYPES))})"
    )


def _check_rope_scaling(scaling: Dict[str, Any]) -> None:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}: only 'llama3' (or none) is implemented")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise ValueError(f"rope_scaling of type 'llama3' has no {key!r}")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(
            f"rope_scaling high_freq_factor must exceed low_freq_factor, got {scaling['high_freq_factor']} "
            f"and {scaling['low_freq_factor']}"
        )


_LLAMA31_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Published dimensions (the models' config.json files). llama-3-405b is Llama 3.1's, with its
# 128k-context RoPE scaling; mistral-7b is v0.1.
_NAMED: Dict[str, Dict[str, Any]] = {
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    "llama-2-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "llama-2-70b": dict(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "llama-3-8b": dict(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        rope_theta=500000.0, max_seq_len=8192,
    ),
    "llama-3-70b": dict(
        vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
        rope_theta=500000.0, max_seq_len=8192,
    ),
    "llama-3-405b": dict(
        vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248,
        rope_theta=500000.0, rope_scaling=_LLAMA31_SCALING, max_seq_len=131072,
    ),
    "mistral-7b": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        max_seq_len=32768, architecture="mistral",
    ),
    "mixtral-8x7b": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        rope_theta=1e6, max_seq_len=32768, n_experts=8, experts_per_token=2, architecture="mixtral",
    ),
    # Byte-level vocabulary (256 bytes plus room for special tokens): for tests and demos.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
}
