"""Transformer: a Llama/Mistral/Mixtral decoder whose attention, KV-cache and sampling
steps all go through fmkernels ops, so one model runs on every backend.

References: Llama (Touvron et al. 2023) and Llama 3 (Dubey et al. 2024) for RMSNorm, RoPE,
SwiGLU and GQA; Mixtral (Jiang et al. 2024) for the sparse mixture of experts; transformers'
``modeling_llama.py`` / ``modeling_mixtral.py`` for the exact conventions the checkpoints were
trained with (rotate-half RoPE, RMSNorm in fp32, router softmax before top-k). Module names are
Hugging Face's, so a checkpoint's tensors load by name.

Shapes: B batch, S new tokens, T tokens of a packed batch, H query heads, K KV heads, D head_dim,
E dim, F ffn_dim, V vocab.
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...ops._cpu import MAX_LINEAR_ROWS
from ...quantized import QuantizedWeight, block_format
from .config import ModelConfig
from .parallel import TensorParallel, resolve, take


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in x's dtype (as Llama)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,) fp32: theta^(-2i/D), with Llama-3 scaling where configured
    (long wavelengths divided by ``factor``, short ones kept, a smooth blend in between)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return torch.where(medium, blended, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, heads, D) rotated by cos, sin (B, S, 1, D), in HF's rotate-half convention
    (or packed: x (T, heads, D), cos, sin (T, 1, D))."""
    return x * cos + _rotate_half(x) * sin


def _append_prompts(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows,
                    backend: str) -> None:
    """Writes packed prompts' keys and values k, v (T, K, D) to the cache in one append_kv, as
    ``rows`` (a ``PromptRows``) places them."""
    n_rows = rows.block_table.shape[0]
    padded = [t.new_zeros(n_rows * rows.width, *t.shape[1:]).index_copy_(0, rows.index, t)
              .view(n_rows, rows.width, *t.shape[1:]) for t in (k, v)]  # [rows, width, K, D]
    ops.append_kv(k_cache, v_cache, *padded, rows.cache_seqlens, block_table=rows.block_table, backend=backend)


class _Blocks(nn.Module):
    """A module whose weight is a ``QuantizedWeight`` held as a uint8 buffer ``blocks`` (so
    ``model.to(device)`` moves it and ``model.to(dtype)`` leaves it alone); ``weight`` is the
    QuantizedWeight over the current buffer, made again only when the buffer changes."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.format = weight.format
        self.weight_shape = tuple(weight.shape)
        self.register_buffer("blocks", weight.blocks)
        self.__dict__["_weight"] = weight

    @property
    def weight(self) -> QuantizedWeight:
        cached = self.__dict__.get("_weight")
        if cached is None or cached.blocks is not self.blocks:
            cached = self.__dict__["_weight"] = QuantizedWeight(self.blocks, self.format, self.weight_shape)
        return cached

    def __getstate__(self):
        # The cached QuantizedWeight (immutable, so deepcopy cannot rebuild it) is made again on use.
        state = dict(super().__getstate__())
        state.pop("_weight", None)
        return state

    @classmethod
    def empty(cls, format: str, rows: int, cols: int, device=None):
        """An uninitialised weight (rows, cols) of ``format`` on ``device`` (the meta device
        for a loader's plan)."""
        fmt = block_format(format)
        if cols % fmt.block_size:
            raise ValueError(f"a {fmt.name} weight needs a row length that is a multiple of {fmt.block_size}, "
                             f"got {cols}")
        blocks = torch.empty(rows, cols // fmt.block_size * fmt.block_bytes, dtype=torch.uint8, device=device)
        return cls(QuantizedWeight(blocks, fmt.name, (rows, cols)))


class QuantizedLinear(_Blocks):
    """``nn.Linear`` (no bias) over a ``QuantizedWeight`` (N, K): ``in_features`` K,
    ``out_features`` N, ``weight`` the QuantizedWeight. ``forward(x, backend)`` is
    ``fmkernels.linear(x, weight, backend=backend)``, at any number of rows of x.

    ``QuantizedLinear.tied(embedding)``: an LM head that reads a ``QuantizedEmbedding``'s own
    blocks (no buffer of its own, no second copy, and moved with the embedding)."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__(weight)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def tied(cls, embedding: "QuantizedEmbedding") -> "QuantizedLinear":
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.format, head.weight_shape = embedding.format, embedding.weight_shape
        head.out_features, head.in_features = embedding.num_embeddings, embedding.embedding_dim
        object.__setattr__(head, "_source", embedding)  # not a submodule: the embedding is listed once
        return head

    @property
    def weight(self) -> QuantizedWeight:
        source = self.__dict__.get("_source")
        return super().weight if source is None else source.weight

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return ops.linear(x, self.weight, backend=backend)

    def extra_repr(self) -> str:
        tied = ", tied to the embedding" if "_source" in self.__dict__ else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{tied}"


class QuantizedEmbedding(_Blocks):
    """``nn.Embedding`` over a ``QuantizedWeight`` (vocab, dim): ``forward(ids, dtype)``
    dequantizes only the rows it looks up (``QuantizedWeight.embedding``), in ``dtype``."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__(weight)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.embedding(ids, dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}"


def project(layer: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``layer(x)`` (no bias). A ``QuantizedLinear`` always goes through ``fmkernels.linear``
    with the model's ``backend``, at any number of rows ("auto" picks the cpu kernel where it
    takes the case, else the reference, which dequantizes). For an ``nn.Linear``: a decode
    step's few rows on the CPU (at most the cpu kernel's ``MAX_LINEAR_ROWS``) go through
    ``fmkernels.linear``'s C++ kernel, which streams the weight once for all rows, with
    ``backend`` "auto" or "cpu"; everything else (prefill, the GPU, the reference backend)
    through torch's matmul, the faster call there. One fp32 row included: on a quiet 2-core
    AMD EPYC (bench/results/amd-epyc/) the kernel reads SmolLM2-135M's weights 1.4-2.7x
    faster than torch's gemv (AVX-512 and AVX2 alike), and decode went from 14.6 to 21.1
    tokens/s at 1 thread."""
    if isinstance(layer, QuantizedLinear):
        return ops.linear(x, layer.weight, backend=backend)
    rows = x.numel() // x.shape[-1]
    if backend in ("auto", "cpu") and x.device.type == "cpu" and rows <= MAX_LINEAR_ROWS:
        return ops.linear(x, layer.weight, backend="cpu")
    return layer(x)


class Attention(nn.Module):
    """Multi-head attention with GQA; under tensor parallelism, the rank's heads only (its
    output is then a partial sum the Block all-reduces)."""

    def __init__(self, config: ModelConfig, index: int, tensor_parallel: Optional[TensorParallel] = None):
        super().__init__()
        self.index = index
        tp = tensor_parallel
        self.n_heads = config.n_heads if tp is None else tp.n_heads
        self.n_kv_heads = config.n_kv_heads if tp is None else tp.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, backend: str, cache=None, slots=None, seqlens=None, block_table=None,
                cu_seqlens=None, prompt_rows=None, kv_caches=None):
        """x (B, S, E) -> (B, S, E); or, with ``cu_seqlens`` (and the cache's ``prompt_rows``), a
        packed prefill into empty cache slots: x (T, E) -> (T, E); or, with ``kv_caches`` (each
        layer's (k, v) cache tensors, laid out by the caller), decode against them at ``seqlens``
        with no host work (``Transformer.decode``)."""
        tokens = x.shape[:-1]  # (B, S), or (T,) packed
        q = project(self.q_proj, x, backend).view(*tokens, self.n_heads, self.head_dim)  # [B, S, H, D] or [T, H, D]
        k = project(self.k_proj, x, backend).view(*tokens, self.n_kv_heads, self.head_dim)  # [B, S, K, D] or [T, K, D]
        v = project(self.v_proj, x, backend).view(*tokens, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cu_seqlens is not None:
            _append_prompts(cache.k[self.index], cache.v[self.index], k, v, prompt_rows, backend)
            # Each sequence attends to its own keys only (its slot was empty).
            out = ops.attention(q, k, v, causal=True, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                backend=backend)  # [T, H, D]
        elif kv_caches is not None:
            k_cache, v_cache = kv_caches[self.index]
            ops.append_kv(k_cache, v_cache, k, v, seqlens, block_table=block_table, backend=backend)
            out = ops.decode_attention(q, k_cache, v_cache, seqlens + tokens[1], block_table=block_table,
                                       backend=backend)  # [B, S, H, D]
        elif cache is None:
            out = ops.attention(q, k, v, causal=True, backend=backend)  # [B, S, H, D]
        else:
            b, s = tokens
            k_cache, v_cache = cache.layer(self.index, slots)
            ops.append_kv(k_cache, v_cache, k, v, seqlens, block_table=block_table, backend=backend)
            if not any(cache.lengths[slot] for slot in slots):
                # A prefill from an empty cache attends to its own keys only: the fused kernel.
                out = ops.attention(q, k, v, causal=True, backend=backend)
            else:
                out = ops.decode_attention(
                    q, k_cache, v_cache, seqlens + s, block_table=block_table, backend=backend
                )
        return project(self.o_proj, out.reshape(*tokens, self.n_heads * self.head_dim), backend)  # [B, S, E] or [T, E]


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), under the checkpoint's names: Llama's gate_proj, up_proj,
    down_proj, or a Mixtral expert's w1, w3, w2."""

    def __init__(self, config: ModelConfig, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
                 ffn_dim: Optional[int] = None):
        super().__init__()
        self._names = (gate, up, down)
        ffn_dim = config.ffn_dim if ffn_dim is None else ffn_dim  # a tensor-parallel rank's share
        setattr(self, gate, nn.Linear(config.dim, ffn_dim, bias=False))
        setattr(self, up, nn.Linear(config.dim, ffn_dim, bias=False))
        setattr(self, down, nn.Linear(ffn_dim, config.dim, bias=False))

    def forward(self, x, backend: str = "reference"):
        gate, up, down = (getattr(self, name) for name in self._names)
        hidden = F.silu(project(gate, x, backend)) * project(up, x, backend)  # [.., F]
        return project(down, hidden, backend)  # [.., E]


class SparseMoE(nn.Module):
    """Mixtral's block: router softmax over all experts (fp32), top-k, the k weights
    renormalised to sum to 1, each token the weighted sum of its experts' outputs."""

    def __init__(self, config: ModelConfig, ffn_dim: Optional[int] = None):
        super().__init__()
        self.top_k = config.experts_per_token
        self.gate = nn.Linear(config.dim, config.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config, "w1", "w3", "w2", ffn_dim) for _ in range(config.n_experts))

    def forward(self, x, backend: str = "reference"):
        tokens = x.reshape(-1, x.shape[-1])  # [T, E]
        router = project(self.gate, tokens, backend) if isinstance(self.gate, QuantizedLinear) else self.gate(tokens)
        weights = F.softmax(router, dim=-1, dtype=torch.float32)  # [T, n_experts]
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)  # [T, k]
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(tokens)
        for expert_id, expert in enumerate(self.experts):
            token_idx, slot = torch.where(chosen == expert_id)
            if token_idx.numel():
                out.index_add_(0, token_idx, expert(tokens[token_idx], backend) * weights[token_idx, slot, None])
        return out.view(x.shape)


class Block(nn.Module):
    """A decoder layer; under tensor parallelism, the rank's share, with the attention's and
    the MLP's partial outputs summed over the ranks (two all-reduces)."""

    def __init__(self, config: ModelConfig, index: int, tensor_parallel: Optional[TensorParallel] = None):
        super().__init__()
        self.tensor_parallel = tensor_parallel
        ffn_dim = None if tensor_parallel is None else tensor_parallel.ffn_dim
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, index, tensor_parallel)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        if config.n_experts:
            self.block_sparse_moe = SparseMoE(config, ffn_dim)
        else:
            self.mlp = SwiGLU(config, ffn_dim=ffn_dim)

    def forward(self, x, cos, sin, backend, **cache_args):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, backend, **cache_args)
        if self.tensor_parallel is not None:
            attended = self.tensor_parallel.all_reduce(attended)
        x = x + attended
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        out = ffn(self.post_attention_layernorm(x), backend)
        if self.tensor_parallel is not None:
            out = self.tensor_parallel.all_reduce(out)
        return x + out


class Transformer(nn.Module):
    """A Llama/Mistral/Mixtral decoder.

    ``model(input_ids)`` is the full forward: (batch, seqlen) int64 ids -> logits (batch,
    seqlen, vocab) in the model's dtype. With ``cache`` and ``slots`` (the cache rows of the
    batch's sequences), the new tokens continue those sequences: their keys and values are
    appended to the cache (``fmkernels.append_kv``) and attention reads it
    (``fmkernels.decode_attention``); this is decode (seqlen 1) and chunked prefill.
    ``prefill(prompts, cache=...)`` runs a ragged batch of prompts into empty slots in one
    packed forward and returns the logits after each prompt's last token only.
    ``backend`` is passed to every op ("auto", "reference", "cpu", "triton", "cuda", ...).
    With ``tensor_parallel`` (a ``fmkernels.model.network.parallel.TensorParallel``), the model is one
    rank's share of a split over torch.distributed (see that module); ``config`` stays the
    whole model's.
    """

    def __init__(self, config: ModelConfig, *, backend: str = "auto",
                 tensor_parallel: Optional[TensorParallel] = None):
        super().__init__()
        self.config = config
        self.backend = backend
        self.tensor_parallel = tensor_parallel
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i, tensor_parallel) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # fp32 whatever the weights' dtype (not a buffer, so .to(dtype) leaves it alone).
        self._inv_freq = rope_frequencies(config)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the logits', the KV cache's): the norms' float dtype, which
        is every float weight's too; quantized weights (``QuantizedLinear``) keep their blocks."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``ids`` in the model's dtype."""
        if isinstance(self.embed_tokens, QuantizedEmbedding):
            return self.embed_tokens(ids, self.dtype)
        return self.embed_tokens(ids)

    def _check_ids(self, name: str, ids) -> None:
        """ids (named ``name`` in errors) must be an integer tensor of ids of the vocabulary."""
        integral = isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point and not ids.dtype.is_complex
        if not integral or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {getattr(ids, 'dtype', type(ids))}")
        # Reading the ids is data-dependent control flow: torch.compile traces past it (the
        # embedding lookup still rejects an id outside the table).
        if ids.numel() and not torch.compiler.is_compiling():
            low, high = torch.aminmax(ids)
            if low < 0 or high >= self.config.vocab_size:
                bad = int(low) if low < 0 else int(high)
                raise ValueError(f"{name} hold token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")

    def _rope(self, positions: torch.Tensor):
        """cos, sin (*positions.shape, 1, D) in the model's dtype, computed in fp32."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq  # [..., D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[..., None, :]  # [..., 1, D]
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    def forward(self, input_ids: torch.Tensor, *, cache=None, slots: Optional[Sequence[int]] = None):
        self._check_ids("input_ids", input_ids)
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, seqlen), got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        cache_args = {}
        if cache is None:
            positions = torch.arange(s, device=input_ids.device).expand(b, s)  # [B, S]
        else:
            slots = list(range(b)) if slots is None else list(slots)
            if len(slots) != b:
                raise ValueError(f"slots must name one cache slot per batch row ({b}), got {len(slots)}")
            seqlens, block_table = cache.prepare(slots, s)
            positions = seqlens.long()[:, None] + torch.arange(s, device=input_ids.device)  # [B, S]
            cache_args = dict(cache=cache, slots=slots, seqlens=seqlens, block_table=block_table)
        cos, sin = self._rope(positions)  # [B, S, 1, D]
        x = self._embed(input_ids)  # [B, S, E]
        for layer in self.layers:
            x = layer(x, cos, sin, self.backend, **cache_args)
        if cache is not None:
            cache.advance(slots, s)
        return project(self.lm_head, self.norm(x), self.backend)  # [B, S, V]

    def decode(self, input_ids: torch.Tensor, *, kv_caches, seqlens: torch.Tensor,
               block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One decode step on tensors the caller lays out, with no host work: no check of the
        ids' values, no cache bookkeeping, nothing read back (``fmkernels.model.generation.decode_graphs``
        captures it in a CUDA graph). Each row's keys and values are appended at its
        ``seqlens`` position and attention reads its cache through that token.

        Parameters
        ----------
        input_ids : Tensor (B, 1) int64, ids of the vocabulary.
        kv_caches : sequence of (k_cache, v_cache), one pair per layer: contiguous (B,
            max_seq_len, K, D) rows, or a paged pool (num_blocks, block_size, K, D) with
            ``block_table``.
        seqlens : Tensor (B,) int32, the tokens each row's cache holds before this one.
        block_table : Tensor (B, max_blocks) int32, for a paged pool.

        Returns
        -------
        Tensor (B, V): the next-token logits of each row. The caller advances its lengths.
        """
        positions = seqlens.long()[:, None]  # [B, 1]
        cos, sin = self._rope(positions)  # [B, 1, 1, D]
        x = self._embed(input_ids)  # [B, 1, E]
        for layer in self.layers:
            x = layer(x, cos, sin, self.backend, kv_caches=kv_caches, seqlens=seqlens, block_table=block_table)
        return project(self.lm_head, self.norm(x), self.backend)[:, -1]  # [B, V]

    def prefill(self, prompts, *, cache, slots: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Prefills a batch of prompts (ragged) into empty cache slots in one forward pass, and
        returns the logits after each prompt's last token.

        The prompts' tokens are packed into one (total_tokens,) sequence: RoPE at each token's
        position in its own prompt, ``fmkernels.attention`` on the packed q, k, v with
        ``cu_seqlens`` (causal within each prompt), every prompt's keys and values written to
        its slot by one ``fmkernels.append_kv`` per layer (``cache.prompt_rows``), norms and
        MLP / mixture of experts on the packed tokens. The LM head runs on each prompt's last token only: ``model(ids)[:, -1]``
        without the (total_tokens, vocab) logits of the whole prompt.

        Parameters
        ----------
        prompts : sequence of n prompts, each a non-empty list of int token ids or a 1-D
            integer tensor; or a (n, seqlen) integer tensor.
        cache : ContiguousKVCache or PagedKVCache (``new_cache``)
            The slots must be empty; they hold the prompts afterwards (``model(ids,
            cache=cache, slots=slots)`` continues them).
        slots : sequence of n distinct ints, optional
            The cache slot of each prompt; default 0 .. n-1.

        Returns
        -------
        Tensor (n, vocab) in the model's dtype: row i is the next-token logits after prompts[i].
        """
        if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
            prompts = list(prompts)
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a sequence of token-id lists or 1-D tensors, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts must hold at least one prompt, got none")
        ids = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, torch.Tensor):
                try:
                    prompt = torch.as_tensor(prompt)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"prompts[{i}] must be a list of int token ids or a 1-D integer tensor, "
                                    f"got {type(prompt).__name__}") from None
            if prompt.dim() != 1 or prompt.numel() == 0:
                raise ValueError(f"prompts[{i}] must be a non-empty 1-D sequence of token ids, "
                                 f"got shape {tuple(prompt.shape)}")
            self._check_ids(f"prompts[{i}]", prompt)
            ids.append(prompt)
        n = len(ids)
        slots = list(range(n)) if slots is None else list(slots)
        if len(slots) != n or len(set(slots)) != n:
            raise ValueError(f"slots must name {n} distinct cache slots, one per prompt, got {slots}")
        for slot in slots:
            if cache.length(slot):
                raise ValueError(f"prefill writes prompts into empty cache slots; slot {slot} holds "
                                 f"{cache.length(slot)} tokens (continue it with model(ids, cache=..., slots=...))")
        lengths = [prompt.numel() for prompt in ids]
        cache.prepare(slots, lengths)  # checks the room and allocates a paged cache's blocks
        rows = cache.prompt_rows(slots, lengths)
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=self.device)
        positions = torch.cat([torch.arange(length) for length in lengths]).to(self.device)  # [T]
        cos, sin = self._rope(positions)  # [T, 1, D]
        x = self._embed(torch.cat([prompt.to(self.device) for prompt in ids]))  # [T, E]
        for layer in self.layers:
            x = layer(x, cos, sin, self.backend, cache=cache, cu_seqlens=cu_seqlens, prompt_rows=rows)
        cache.advance(slots, lengths)
        last = cu_seqlens[1:].long() - 1  # [n]
        return project(self.lm_head, self.norm(x[last]), self.backend)  # [n, V]

    def new_cache(self, kind: str = "contiguous", *, batch: int = 1, max_seq_len: Optional[int] = None,
                  num_blocks: Optional[int] = None, block_size: int = 16):
        """An empty KV cache for this model: "contiguous" (batch rows of max_seq_len) or
        "paged" (num_blocks blocks of block_size; default enough for batch x max_seq_len)."""
        from .kv_cache import ContiguousKVCache, PagedKVCache

        c = self.config
        max_seq_len = c.max_seq_len if max_seq_len is None else max_seq_len
        common = dict(dtype=self.dtype, device=self.device)
        kv_heads = c.n_kv_heads if self.tensor_parallel is None else self.tensor_parallel.n_kv_heads
        if kind == "contiguous":
            return ContiguousKVCache(c.n_layers, batch, max_seq_len, kv_heads, c.head_dim, **common)
        if kind == "paged":
            if num_blocks is None:
                num_blocks = batch * -(-max_seq_len // block_size)
            return PagedKVCache(c.n_layers, num_blocks, block_size, kv_heads, c.head_dim,
                                max_seq_len=max_seq_len, **common)
        raise ValueError(f"kv_cache must be 'contiguous' or 'paged', got {kind!r}")

    @classmethod
    def from_config(cls, config: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device="cpu", backend: str = "auto", tensor_parallel=False) -> "Transformer":
        """Random weights, the same for the same seed: linear weights N(0, 1/fan_in), embeddings
        N(0, 1), norms N(1, 0.1), so activations stay O(1) and logits are far from uniform.

        ``tensor_parallel`` (as ``fmkernels.model.load_pretrained``'s): this rank's slices of those same weights."""
        plan = resolve(tensor_parallel, config, device)
        model = cls(config, backend=backend)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                elif param.dim() == 2 and name != "embed_tokens.weight":
                    param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1]))
                else:
                    param.copy_(torch.randn(param.shape, generator=generator))
        if plan is not None:
            whole, model = model, cls(config, backend=backend, tensor_parallel=plan)
            shares = dict(model.named_parameters())
            with torch.no_grad():
                for name, param in whole.named_parameters():
                    shares[name].copy_(take(param, plan.slice_of(name, config.head_dim)))
        return model.to(device=device, dtype=dtype).eval()


def meta_model(config: ModelConfig, *, backend: str, tensor_parallel: Optional[TensorParallel] = None) -> Transformer:
    """The model (a tensor-parallel rank's share, with ``tensor_parallel``) with parameters on
    the meta device (shapes only), for checking a checkpoint before any memory is allocated."""
    with torch.device("meta"):
        model = Transformer(config, backend=backend, tensor_parallel=tensor_parallel)
    model._inv_freq = rope_frequencies(config)
    return model


def materialize(model: Transformer, *, dtype: torch.dtype, device) -> Transformer:
    """A meta model's parameters allocated (uninitialised) in ``dtype`` on ``device``."""
    model = model.to(dtype).to_empty(device=device or "cpu")
    if model.config.tie_embeddings and isinstance(model.lm_head, nn.Linear):  # to_empty gives each module its own tensor
        model.lm_head.weight = model.embed_tokens.weight
    return model


def quantize_modules(model: Transformer, formats: Mapping[str, str]) -> Transformer:
    """Replaces, in place, the module of each weight ``formats`` names (``"layers.0.mlp.up_proj.weight"``:
    ``"q4_1"``; an ``nn.Linear`` or the ``nn.Embedding``) with an uninitialised ``QuantizedLinear``
    (``QuantizedEmbedding``) of that format and shape, on the weight's device: a loader's meta
    model, before ``materialize``. A tied LM head follows a quantized embedding (``QuantizedLinear.tied``)."""
    modules = dict(model.named_modules())
    for name, format in formats.items():
        path = name[:-len(".weight")] if name.endswith(".weight") else None
        old = modules.get(path)
        if isinstance(old, nn.Embedding):
            new = QuantizedEmbedding.empty(format, old.num_embeddings, old.embedding_dim, old.weight.device)
        elif isinstance(old, nn.Linear) and old.bias is None:
            new = QuantizedLinear.empty(format, old.out_features, old.in_features, old.weight.device)
        else:
            raise ValueError(f"{name!r} is not the weight of one of the model's linear layers or its embedding")
        parent, _, leaf = path.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, new)
    if model.config.tie_embeddings and isinstance(model.embed_tokens, QuantizedEmbedding):
        model.lm_head = QuantizedLinear.tied(model.embed_tokens)
    return model


def weight_formats(model: nn.Module) -> Dict[str, str]:
    """Weight name -> block format of each quantized weight of ``model`` (its QuantizedLinear
    and QuantizedEmbedding modules; a tied LM head is the embedding's, listed once)."""
    return {f"{name}.weight": module.format for name, module in model.named_modules()
            if isinstance(module, (QuantizedLinear, QuantizedEmbedding)) and "_source" not in module.__dict__}
