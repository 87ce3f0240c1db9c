"""Shared set-up of the model tests: tiny random transformers checkpoints saved to disk."""

from __future__ import annotations

import math

import torch

TINY_HF = dict(
    vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' N(0, 0.02) init, so logits are far from uniform and
    greedy choices are not near-ties: N(0, 1/fan_in) matrices, N(1, 0.1) norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1]))


def hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers model in fp32: "llama", "mistral" or "mixtral"."""
    import transformers

    settings = dict(TINY_HF, **overrides)
    if kind == "llama":
        config = transformers.LlamaConfig(**settings)
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        config = transformers.MistralConfig(sliding_window=None, **settings)
        cls = transformers.MistralForCausalLM
    elif kind == "mixtral":
        settings.setdefault("num_local_experts", 4)
        settings.setdefault("num_experts_per_tok", 2)
        config = transformers.MixtralConfig(sliding_window=None, **settings)
        cls = transformers.MixtralForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    randomize(model, seed)
    return model
