"""fmkernels.model: a thin Llama/Mistral/Mixtral transformer on fmkernels ops, in three layers
whose imports point down only (``tests/test_import_layers.py``):

- ``network``: ``ModelConfig`` (a Hugging Face config.json or a named configuration),
  ``Transformer`` (random weights with ``from_config``; ``model(input_ids)`` -> logits; its
  ``QuantizedLinear`` / ``QuantizedEmbedding`` layers where it keeps GGUF blocks), the KV
  caches it decodes against, ``TensorParallel`` (a rank's share of a model split over
  torch.distributed) and ``model_stats`` (parameters, memory, FLOPs, roofline bounds:
  ``fmkernels info``);
- ``checkpoint``: ``load_pretrained`` (a local Hugging Face directory or GGUF file),
  ``load_config`` and ``load_tokenizer`` (a checkpoint's ``tokenizer.json`` or a GGUF file's
  vocabulary; ``ByteTokenizer`` for the demo), ``StreamDecoder`` for streaming text, ``chat``
  templates;
- ``generation``: ``generate(model, prompts, config)`` with a ``GenerationConfig``, its
  ``GenerationResult``, ``structured`` output constraints and ``choice_constraint``.
"""

from .network.config import ModelConfig
from .network.kv_cache import BlockAllocator, ContiguousKVCache, PagedKVCache
from .network.parallel import TensorParallel
from .network.stats import DeviceSpec, ModelStats, model_stats
from .network.transformer import QuantizedEmbedding, QuantizedLinear, Transformer, weight_formats
from .checkpoint import chat
from .checkpoint.load import load_config, load_pretrained, load_tokenizer
from .checkpoint.tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder
from .generation import structured
from .generation.config import GenerationConfig
from .generation.generate import GenerationResult, generate
from .generation.structured import choice_constraint

__all__ = [
    "ModelConfig", "Transformer", "QuantizedLinear", "QuantizedEmbedding", "weight_formats", "ContiguousKVCache", "PagedKVCache", "BlockAllocator", "TensorParallel",
    "ModelStats", "DeviceSpec", "model_stats",
    "load_pretrained", "load_config", "load_tokenizer", "ByteTokenizer", "HFTokenizer", "StreamDecoder", "chat",
    "generate", "GenerationConfig", "GenerationResult", "structured", "choice_constraint",
]
