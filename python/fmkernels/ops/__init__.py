"""The public ops: validate inputs, pick an implementation, call it."""

from ._backends import register_all as _register_all
from .append_kv import append_kv
from .attention import attention
from .decode_attention import decode_attention
from .linear import linear
from .sampling import filter_logits, pack_allowed, sample

_register_all()

__all__ = ["attention", "decode_attention", "append_kv", "filter_logits", "sample", "pack_allowed", "linear"]
