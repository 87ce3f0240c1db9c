"""fmkernels inside Hugging Face transformers: an attention implementation and a logits processor.

    import fmkernels.integrations.transformers  # registers attn_implementation="fmkernels"

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fmkernels")

Every attention call of a model built on transformers' attention interface (Llama, Mistral,
Mixtral, Qwen2 and the many that share their attention code) then runs on fmkernels' ops,
with transformers' own KV cache:

* ``fmkernels.attention`` for a prompt without padding (``causal``, bottom-right, which is
  transformers' alignment once the cache's keys come first);
* ``fmkernels.decode_attention`` for new tokens against the cache: ``cache_seqlens`` = the
  keys each row sees where they start at position 0 (no padding, a static cache's unfilled
  tail); for left-padded rows on the CPU, the same cache read through a block table of
  one-position blocks that skips each row's padding (a paged view of transformers' tensor, not
  a copy; on a GPU, where that view has not run yet, the packed path below);
* ``fmkernels.attention`` on packed sequences (``cu_seqlens``) for a padded prompt: the valid
  queries, keys and values are copied into the packed layout and the output scattered back
  (zero at padded queries).

transformers' 2D padding mask becomes each row's run of keys, never a dense mask. Apart from
the packed prompt, the ops read transformers' tensors through strided views, without a copy.

transformers' layout (batch, heads, seqlen, head_dim) is fmkernels' (batch, seqlen, heads,
head_dim) transposed, so q, k and v are passed as views; GQA is native to the ops, so the KV
heads are never repeated; ``scaling`` is the ops' ``scale``. The output is (batch, seqlen,
heads, head_dim), what transformers' attention functions return.

What fmkernels cannot express raises a ``ValueError`` naming it, never a silently different
result: a dense 4D mask passed in by the caller, a padding mask whose ones are not one run
per row, a sliding window shorter than the keys, attention soft-capping, attention sinks,
dropout, and mask patterns other than causal or bidirectional with padding (transformers'
own mask is built and compared for those; a sliding window longer than every row passes).
Use ``attn_implementation="sdpa"`` for them.

``register(name, backend=...)`` adds the same under another name with a fixed fmkernels
backend, e.g. ``register("fmkernels_cpu", backend="cpu")``.

``FilterLogits`` applies ``fmkernels.filter_logits`` (temperature, top-k, top-p, min-p) as a
``LogitsProcessor`` in transformers' ``generate``; the tokens it keeps are those of
transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` and
``MinPLogitsWarper`` in a row, but for exact ties at the k-th logit (transformers keeps every
tied token, fmkernels the lowest ids up to k).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

try:
    from transformers import AttentionInterface
    from transformers.generation.logits_process import LogitsProcessor
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
except ImportError as error:  # transformers missing, or a release before its attention-mask interface
    raise ImportError(
        "fmkernels.integrations.transformers needs Hugging Face transformers with "
        "transformers.masking_utils.AttentionMaskInterface (5.x is tested): pip install 'transformers>=5'"
        f" ({error})"
    ) from error

from .. import _validation as check
from ..ops import attention, decode_attention, filter_logits

__all__ = ["FilterLogits", "PaddingMask", "register", "NAME"]

#: The name ``attn_implementation`` takes after this module is imported.
NAME = "fmkernels"


@dataclasses.dataclass(eq=False)
class PaddingMask:
    """transformers' attention mask as fmkernels' ops take it: one run of keys per row.

    Query i of row b sits at key position ``query_offset + i`` and sees the keys j with
    ``key_start[b] <= j < key_end[b]``, and, when ``causal``, ``j <= query_offset + i``
    (``key_end`` is clamped to the last query's position + 1 then). A query outside its row's
    run is padding: its output is zero. The mask function builds one per forward; every
    layer reuses it, and the index tensors it derives.
    """

    key_start: List[int]
    key_end: List[int]
    query_offset: int
    q_length: int
    kv_length: int
    causal: bool
    _derived: Dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(batch, 1, q_length, kv_length): the dense mask this stands for."""
        return (len(self.key_start), 1, self.q_length, self.kv_length)

    @property
    def ndim(self) -> int:
        return 4

    def contiguous(self) -> "PaddingMask":
        """Itself: transformers' generate makes masks contiguous before a compiled forward."""
        return self

    @property
    def is_plain(self) -> bool:
        """Every key visible to every row: no padding, queries at the end of the keys."""
        return (self.query_offset == self.kv_length - self.q_length and all(s == 0 for s in self.key_start)
                and all(e == self.kv_length for e in self.key_end))

    @property
    def queries_end_runs(self) -> bool:
        """Causal, and every query inside its row's run with the last one at the run's last key:
        what ``decode_attention`` computes on each row's run (new tokens after a cache)."""
        last = self.query_offset + self.q_length
        return self.causal and all(s <= self.query_offset and e == last for s, e in zip(self.key_start, self.key_end))

    def valid_queries(self, device) -> torch.Tensor:
        """(batch, q_length) bool: the queries inside their row's run."""
        start, end = self._bounds(device)
        position = torch.arange(self.q_length, device=device) + self.query_offset
        return (position >= start) & (position < end)

    def dense(self, device) -> torch.Tensor:
        """(batch, 1, q_length, kv_length) bool, True where a query sees a key."""
        start, end = self._bounds(device)
        key = torch.arange(self.kv_length, device=device)
        seen = ((key >= start) & (key < end))[:, None, :]
        if self.causal:
            query = torch.arange(self.q_length, device=device) + self.query_offset
            seen = seen & (key[None, :] <= query[:, None])[None]
        return seen[:, None]

    def _bounds(self, device):
        key = ("bounds", device)
        if key not in self._derived:
            start = torch.tensor(self.key_start, dtype=torch.int64, device=device)[:, None]
            end = torch.tensor(self.key_end, dtype=torch.int64, device=device)[:, None]
            self._derived[key] = (start, end)
        return self._derived[key]

    def _seqlens(self, device) -> torch.Tensor:
        key = ("seqlens", device)
        if key not in self._derived:
            self._derived[key] = torch.tensor(self.key_end, dtype=torch.int32, device=device)
        return self._derived[key]

    def _packing(self, device):
        """Which queries and keys go into the packed sequences, and their cu_seqlens."""
        key = ("packing", device)
        if key not in self._derived:
            queries = self.valid_queries(device)
            start, end = self._bounds(device)
            position = torch.arange(self.kv_length, device=device)
            keys = (position >= start) & (position < end) & queries.any(1, keepdim=True)
            cu_q = torch.zeros(len(self.key_start) + 1, dtype=torch.int32, device=device)
            cu_k = torch.zeros_like(cu_q)
            cu_q[1:] = queries.sum(1).cumsum(0)
            cu_k[1:] = keys.sum(1).cumsum(0)
            self._derived[key] = (queries, keys, cu_q, cu_k, bool(queries.any()))
        return self._derived[key]

    def _runs_as_pages(self, k: torch.Tensor):
        """Each row's run of keys as a paged cache of one-position blocks over k's own memory
        (no copy): block n is the position at n x k.stride(1) elements from k's start, so row
        b's position j is block (b x k.stride(0) + j x k.stride(1)) / k.stride(1). None where
        the strides do not allow it."""
        batch, kv_length, heads, head_dim = k.shape
        step, row = k.stride(1), k.stride(0)
        if step <= 0 or row % step != 0:
            return None
        key = ("pages", k.device, k.stride())
        if key not in self._derived:
            blocks = (batch - 1) * (row // step) + kv_length
            start = torch.tensor(self.key_start, dtype=torch.int64, device=k.device)
            lengths = torch.tensor(self.key_end, dtype=torch.int64, device=k.device) - start
            position = torch.arange(int(lengths.max()), device=k.device)
            first = torch.arange(batch, device=k.device) * (row // step) + start
            table = (first[:, None] + position[None, :]).clamp(max=blocks - 1).to(torch.int32)
            self._derived[key] = (blocks, table, lengths.to(torch.int32))
        blocks, table, lengths = self._derived[key]
        size, stride = (blocks, 1, heads, head_dim), (step, step, k.stride(2), k.stride(3))
        return size, stride, table, lengths

    def run(self, q, k, v, scale, backend) -> torch.Tensor:
        """Attention of (batch, q_length, heads, head_dim) views under this mask."""
        if self.queries_end_runs:
            if all(s == 0 for s in self.key_start):
                return decode_attention(q, k, v, self._seqlens(q.device), scale=scale, backend=backend)
            # The one-position-block view of the cache has run on the CPU backends only so far;
            # on a GPU a left-padded cache is packed instead.
            pages = self._runs_as_pages(k) if k.stride() == v.stride() and k.device.type == "cpu" else None
            if pages is not None:
                size, stride, table, lengths = pages
                return decode_attention(q, k.as_strided(size, stride), v.as_strided(size, stride), lengths,
                                        block_table=table, scale=scale, backend=backend)
        queries, keys, cu_q, cu_k, any_query = self._packing(q.device)
        out = q.new_zeros(q.shape)
        if any_query:
            out[queries] = attention(q[queries], k[keys], v[keys], causal=self.causal, scale=scale,
                                     cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
        return out


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> Optional[PaddingMask]:
    """transformers' mask interface for fmkernels: None when every row sees every key (the
    ops' plain causal or full attention), else a ``PaddingMask``. Raises ``ValueError`` for a
    mask fmkernels cannot express."""
    if isinstance(attention_mask, PaddingMask):
        # Prepared already (transformers' generate builds a static cache's masks itself, then
        # passes them to the forward, which asks again).
        if attention_mask.shape != (batch_size, 1, q_length, kv_length):
            raise ValueError(f"the fmkernels mask passed in is for (batch, 1, q, kv) = {attention_mask.shape}, "
                             f"this forward needs {(batch_size, 1, q_length, kv_length)}")
        return attention_mask
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    causal = {causal_mask_function: True, bidirectional_mask_function: False}.get(mask_function)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        start, end = [0] * batch_size, [kv_length] * batch_size
    else:
        valid = padding[:, kv_offset:kv_offset + kv_length].bool()
        counts = valid.sum(1)
        first = valid.int().argmax(1)
        last = kv_length - valid.flip(1).int().argmax(1)
        empty = counts == 0
        first, last = first.masked_fill(empty, 0), last.masked_fill(empty, 0)
        broken = (last - first) != counts
        if bool(broken.any()):
            row = int(broken.nonzero()[0, 0])
            ones = valid[row].int().tolist()
            shown = "".join(map(str, ones[:64])) + (" ..." if len(ones) > 64 else "")
            raise ValueError(
                "attn_implementation='fmkernels' needs each row of attention_mask to be one run of ones "
                f"(left or right padding); row {row} is {shown}. Use attn_implementation='sdpa' for other masks."
            )
        start, end = first.tolist(), last.tolist()
    query_offset = q_offset - kv_offset
    mask = PaddingMask(start, end, query_offset, q_length, kv_length, True if causal is None else causal)
    if mask.causal:
        mask.key_end = [min(e, query_offset + q_length) for e in mask.key_end]
        mask.key_start = [min(s, e) for s, e in zip(mask.key_start, mask.key_end)]
    if causal is None:
        _require_expressible(mask, batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                             attention_mask, kwargs.get("device", "cpu"))
    return None if mask.is_plain else mask


def _require_expressible(mask, batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                         attention_mask, device) -> None:
    """Another mask pattern (a sliding window, chunks, overlays): transformers' own mask,
    compared with the causal run on every query that is not padding."""
    theirs = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                       kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                       allow_is_causal_skip=False, device=device)
    ours = mask.dense(theirs.device)
    rows = mask.valid_queries(theirs.device)[:, None, :, None]
    if not bool(((theirs == ours) | ~rows).all()):
        name = getattr(mask_function, "__qualname__", repr(mask_function))
        raise ValueError(
            f"attn_implementation='fmkernels' runs causal or bidirectional attention with padding; this model's "
            f"mask ({name}: a sliding window, chunked attention or another pattern) hides keys the causal mask "
            f"shows at q_length={q_length}, kv_length={kv_length}. Use attn_implementation='sdpa' for it."
        )


def _attention_forward(backend: str):
    def fmkernels_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        dropout: float = 0.0,
        scaling: Optional[float] = None,
        sliding_window: Optional[int] = None,
        softcap: Optional[float] = None,
        is_causal: Optional[bool] = None,
        **kwargs,
    ) -> Tuple[torch.Tensor, None]:
        """transformers' attention-function signature on fmkernels' ops; see the module's docstring."""
        if dropout:
            raise ValueError(f"attn_implementation='fmkernels' has no attention dropout (inference only), got "
                             f"dropout={dropout}; call model.eval(), or use attn_implementation='sdpa'")
        if softcap is not None:
            raise ValueError(f"attn_implementation='fmkernels' has no attention soft-capping, got softcap={softcap}")
        for name in ("s_aux", "sinks", "position_bias"):
            if kwargs.get(name) is not None:
                raise ValueError(f"attn_implementation='fmkernels' does not support {name} (got a value for it)")
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
                raise ValueError(f"{name} must be a (batch, heads, seqlen, head_dim) tensor, got "
                                 f"{getattr(tensor, 'shape', type(tensor).__name__)}")
        q_length, kv_length = query.shape[2], key.shape[2]
        if sliding_window is not None and kv_length > sliding_window:
            raise ValueError(
                f"attn_implementation='fmkernels' has no sliding window: this layer's window of {sliding_window} "
                f"keys would hide some of the {kv_length} keys. Use attn_implementation='sdpa' for it."
            )
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if isinstance(attention_mask, PaddingMask):
            if attention_mask.shape[2:] != (q_length, kv_length) or attention_mask.shape[0] != query.shape[0]:
                raise ValueError(f"the fmkernels mask is for (batch, 1, q, kv) = {attention_mask.shape}, but query "
                                 f"and key give {(query.shape[0], 1, q_length, kv_length)}")
            return attention_mask.run(q, k, v, scaling, backend), None
        if attention_mask is not None:
            raise ValueError(
                "attn_implementation='fmkernels' takes the masks transformers builds for it from a 2D padding "
                f"mask; got {check.shown(attention_mask)}, a dense mask fmkernels cannot express. Pass a 2D "
                "attention_mask, or use attn_implementation='sdpa'."
            )
        causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        if not causal:
            return attention(q, k, v, causal=False, scale=scaling, backend=backend), None
        if q_length == kv_length:
            return attention(q, k, v, causal=True, scale=scaling, backend=backend), None
        if q_length > kv_length:
            raise ValueError(f"causal attention needs at least as many keys as queries, got {q_length} queries "
                             f"and {kv_length} keys")
        lengths = torch.full((query.shape[0],), kv_length, dtype=torch.int32, device=query.device)
        return decode_attention(q, k, v, lengths, scale=scaling, backend=backend), None

    fmkernels_attention_forward.backend = backend
    return fmkernels_attention_forward


def register(name: str = NAME, *, backend: str = "auto") -> None:
    """Register fmkernels' attention (and its mask function) with transformers as
    ``attn_implementation=name``, its ops called with ``backend``."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty str without '/' (transformers reads that as a hub kernel), "
                         f"got {name!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    AttentionInterface.register(name, _attention_forward(backend))
    AttentionMaskInterface.register(name, padding_mask)


class FilterLogits(LogitsProcessor):
    """``fmkernels.filter_logits`` as a transformers logits processor.

        model.generate(..., do_sample=True, top_k=None,
                       logits_processor=[FilterLogits(temperature=0.7, top_k=50, top_p=0.9)])

    In this order: logits / temperature, top-k, top-p, min-p; removed tokens become -inf.
    Leave transformers' own temperature, top_k, top_p and min_p at their no-op values
    (``top_k=None``: transformers' generation config defaults to 50), or both filter.

    Parameters
    ----------
    temperature : float
        > 0 (0 keeps only the argmax).
    top_k : int
        >= 0; 0 is off.
    top_p : float
        In (0, 1].
    min_p : float
        In [0, 1].
    backend : str
        fmkernels backend: "auto" or an implementation's name.
    """

    def __init__(self, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 backend: str = "auto"):
        # The op's own checks, once, on a stand-in row: the errors a call would raise.
        filter_logits(torch.zeros(1, 2), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      backend="reference")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.backend = backend

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return filter_logits(scores, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                             min_p=self.min_p, backend=self.backend)

    def __repr__(self) -> str:
        return (f"FilterLogits(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
                f"min_p={self.min_p}, backend={self.backend!r})")


register()
