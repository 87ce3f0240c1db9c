"""fmkernels.model: a thin Llama/Mistral/Mixtral transformer on fmkernels ops.

``ModelConfig`` (from a Hugging Face config.json, a GGUF file's metadata or a named
configuration), ``Transformer`` (random weights with ``from_config``, a local checkpoint
directory or GGUF file with ``from_pretrained``; ``model(input_ids)`` -> logits,
``model.generate(...)``), the KV caches the model decodes against, ``choice_constraint`` for
constrained generation; tokenizers (a checkpoint's ``tokenizer.json`` or a GGUF file's
vocabulary with ``load_tokenizer``, or ``ByteTokenizer``)
and ``StreamDecoder`` for streaming text; ``ModelConfig.stats`` for what a model costs
(parameters, memory, FLOPs, roofline bounds: ``fmkernels info``); ``TensorParallel``, a rank's
share of a model split over torch.distributed (``from_pretrained(..., tensor_parallel=True)``).
"""

from .config import ModelConfig
from .generate import GenerationResult, generate
from .kv_cache import BlockAllocator, ContiguousKVCache, PagedKVCache
from .parallel import TensorParallel
from .search import choice_constraint
from .stats import DeviceSpec, ModelStats
from . import chat
from .tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder, load_tokenizer
from .transformer import Transformer

__all__ = [
    "ModelConfig", "Transformer", "generate", "GenerationResult", "ContiguousKVCache", "PagedKVCache",
    "BlockAllocator", "TensorParallel", "choice_constraint", "ModelStats", "DeviceSpec", "ByteTokenizer", "HFTokenizer", "StreamDecoder", "load_tokenizer",
]
