"""fmkernels: fused attention, KV-cache decode attention, top-k/top-p sampling and skinny matmuls.

Every op has a PyTorch reference (``fmkernels.reference``) and compiled backends
(``cpu``, ``triton``, ``cuda``) held to it; ``fmkernels.backends()`` says which can run here.
"""

from . import peers as _peers
from .ops import append_kv, attention, decode_attention, filter_logits, linear, pack_allowed, sample
from ._validation import device_checks, set_device_checks
from .platform import BackendStatus, backends
from .quantized import QuantizedWeight, quantize
from .reference import SampleOutput
from .registry import implementations, register_impl, unregister_impl

__version__ = "0.1.0"

_peers.register_all()

__all__ = [
    "attention",
    "decode_attention",
    "append_kv",
    "filter_logits",
    "sample",
    "pack_allowed",
    "linear",
    "QuantizedWeight",
    "quantize",
    "SampleOutput",
    "backends",
    "device_checks",
    "set_device_checks",
    "BackendStatus",
    "register_impl",
    "unregister_impl",
    "implementations",
    "__version__",
]
