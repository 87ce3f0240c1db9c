"""Shared set-up of the model tests: tiny random transformers checkpoints saved to disk, a
tiny tokenizer.json trained in memory, and a spy on the KV caches the model makes."""

from __future__ import annotations

import json
import math

import pytest

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


def save_wordlevel_tokenizer(directory, vocab_size=96, eos="</s>"):
    """A tiny whitespace WordLevel tokenizer trained in memory, saved as tokenizer.json (and a
    tokenizer_config.json naming its EOS) with exactly vocab_size ids."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = tokenizers.trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", eos])
    corpus = ["the cat sat on the mat", "the dog ate the cat food", "a bird sang on the roof end stop",
              "one two three four five six seven eight nine ten",
              " ".join(f"w{i}" for i in range(100))]  # fills the vocabulary up to vocab_size
    tokenizer.train_from_iterator(corpus, trainer)
    assert tokenizer.get_vocab_size() == vocab_size
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return tokenizer


def captured_caches(monkeypatch) -> list:
    """The KV caches ``Transformer.new_cache`` makes from now on (generate's, beam search's), in order."""
    from fmkernels.model import Transformer

    caches = []
    new_cache = Transformer.new_cache

    def spy(self, *args, **kwargs):
        caches.append(new_cache(self, *args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(Transformer, "new_cache", spy)
    return caches
