"""fmkernels.model: a thin Llama/Mistral/Mixtral transformer on fmkernels ops.

``ModelConfig`` (from a Hugging Face config.json or a named configuration),
``Transformer`` (random weights with ``from_config``, a local checkpoint with
``from_pretrained``; ``model(input_ids)`` -> logits, ``model.generate(...)``), and the KV
caches the model decodes against.
"""

from .config import ModelConfig
from .generate import generate
from .kv_cache import BlockAllocator, ContiguousKVCache, PagedKVCache
from .transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "generate", "ContiguousKVCache", "PagedKVCache", "BlockAllocator"]
