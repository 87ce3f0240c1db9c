"""The shapes ``fmkernels bench`` times each op on, and the work one call is credited with.

* attention: 4 * batch * q_heads * head_dim * (visible (query, key) pairs) FLOPs: two
  matmuls of 2 FLOPs per multiply-add; a causal mask halves the pairs.
* decode_attention: the same FLOPs; bytes = q and the visible keys and values read, the
  output written.
* append_kv: bytes = k and v read, then written into the cache.
* filter_logits: bytes = logits read, filtered logits written.
* sample: bytes = logits read, tokens written.
* linear: 2 * rows * N * K FLOPs; bytes = the weight and x read, the output written. One
  weight, read again on every call: where the last-level cache holds it, the rate is the
  cache's (``bench/cpu_linear.py`` streams distinct copies from DRAM, as a model does).

Index tensors (cache_seqlens, block tables) are left out of the bytes: a few bytes per
sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import reference, registry

Kwargs = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One default shape of one op.

    Attributes
    ----------
    op : str
    shape : str
        The sizes, as the table shows them.
    dtype : torch.dtype
    device : torch.device
    make_kwargs : callable
        Builds the op's keyword arguments (the reference's signature).
    flops : int or None
        Floating-point operations one call does; None where FLOP/s says nothing (memory-bound ops).
    bytes : int or None
        Bytes one call must read and write at least; None where GB/s says nothing (attention).
    """

    op: str
    shape: str
    dtype: torch.dtype
    device: torch.device
    make_kwargs: Callable[[], Kwargs]
    flops: Optional[int]
    bytes: Optional[int]


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """(query, key) pairs attention computes for one sequence and head.

    With ``causal``, query i sees keys j <= i + seqlen_k - seqlen_q (bottom-right aligned).

    Parameters
    ----------
    seqlen_q, seqlen_k : int
    causal : bool

    Returns
    -------
    int
    """
    if not causal:
        return seqlen_q * seqlen_k
    return sum(min(seqlen_k, max(0, i + seqlen_k - seqlen_q + 1)) for i in range(seqlen_q))


def attention_flops(q_heads: int, head_dim: int, pairs: int) -> int:
    """4 * q_heads * head_dim * pairs: q k^T and p v, 2 FLOPs per multiply-add.

    Parameters
    ----------
    q_heads, head_dim : int
    pairs : int
        Visible (query, key) pairs summed over the batch's sequences.

    Returns
    -------
    int
    """
    return 4 * q_heads * head_dim * pairs


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _randn(shape, dtype, device, generator) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=generator)


def _paged_cache(batch, blocks_per_sequence, block_size, kv_heads, head_dim, dtype, device, generator):
    """Random paged k and v caches, and a block table handing each sequence shuffled blocks."""
    num_blocks = batch * blocks_per_sequence
    shape = (num_blocks, block_size, kv_heads, head_dim)
    order = torch.randperm(num_blocks, device=device, generator=generator)
    block_table = order.view(batch, blocks_per_sequence).to(torch.int32)
    return _randn(shape, dtype, device, generator), _randn(shape, dtype, device, generator), block_table


def _kv_cache(batch, positions, block_size, kv_heads, head_dim, dtype, device, generator):
    """Random k and v caches of ``positions`` per sequence: contiguous (block_table None) when
    ``block_size`` is None, else paged."""
    if block_size is not None:
        return _paged_cache(batch, -(-positions // block_size), block_size, kv_heads, head_dim, dtype, device,
                            generator)
    shape = (batch, positions, kv_heads, head_dim)
    return _randn(shape, dtype, device, generator), _randn(shape, dtype, device, generator), None


def _attention_case(device, dtype, batch, seqlen, q_heads, kv_heads, head_dim, causal=True) -> BenchCase:
    def make_kwargs() -> Kwargs:
        generator = _generator(device)
        q = _randn((batch, seqlen, q_heads, head_dim), dtype, device, generator)
        k = _randn((batch, seqlen, kv_heads, head_dim), dtype, device, generator)
        v = _randn((batch, seqlen, kv_heads, head_dim), dtype, device, generator)
        return dict(q=q, k=k, v=v, causal=causal)

    flops = attention_flops(q_heads, head_dim, batch * visible_pairs(seqlen, seqlen, causal=causal))
    shape = f"b={batch} s={seqlen} h={q_heads}/{kv_heads} d={head_dim}" + (" causal" if causal else "")
    return BenchCase("attention", shape, dtype, device, make_kwargs, flops, None)


def _decode_case(device, dtype, batch, seqlen, q_heads, kv_heads, head_dim, block_size=None,
                 capacity=None) -> BenchCase:
    """One new token per sequence against ``seqlen`` cached ones; paged when ``block_size`` is given.

    The cache holds ``capacity`` positions per sequence (default ``seqlen``: full), of which
    the first ``seqlen`` are attended to.
    """
    positions = seqlen if capacity is None else capacity

    def make_kwargs() -> Kwargs:
        generator = _generator(device)
        q = _randn((batch, 1, q_heads, head_dim), dtype, device, generator)
        k_cache, v_cache, block_table = _kv_cache(
            batch, positions, block_size, kv_heads, head_dim, dtype, device, generator
        )
        cache_seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
        return dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, block_table=block_table)

    flops = attention_flops(q_heads, head_dim, batch * seqlen)
    q_and_out = 2 * batch * q_heads * head_dim
    keys_and_values = 2 * batch * seqlen * kv_heads * head_dim
    layout = "contiguous" if block_size is None else f"paged/{block_size}"
    filled = seqlen if capacity is None else f"{seqlen}/{capacity}"
    shape = f"b={batch} cache={filled} {layout} h={q_heads}/{kv_heads} d={head_dim}"
    return BenchCase("decode_attention", shape, dtype, device, make_kwargs, flops,
                     (q_and_out + keys_and_values) * _itemsize(dtype))


def _append_kv_case(device, dtype, batch, seqlen, n_new, kv_heads, head_dim, block_size,
                    capacity=None) -> BenchCase:
    """``n_new`` tokens per sequence written after ``seqlen`` cached ones, into a paged cache
    (``block_size``) or a contiguous one (``block_size`` None) of ``capacity`` positions per
    sequence (default: just enough)."""
    positions = seqlen + n_new if capacity is None else capacity

    def make_kwargs() -> Kwargs:
        generator = _generator(device)
        k_cache, v_cache, block_table = _kv_cache(
            batch, positions, block_size, kv_heads, head_dim, dtype, device, generator
        )
        k = _randn((batch, n_new, kv_heads, head_dim), dtype, device, generator)
        v = _randn((batch, n_new, kv_heads, head_dim), dtype, device, generator)
        cache_seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
        return dict(k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens, block_table=block_table)

    new_elements = 2 * batch * n_new * kv_heads * head_dim  # k and v
    layout = "contiguous" if block_size is None else f"paged/{block_size}"
    at = seqlen if capacity is None else f"{seqlen}/{capacity}"
    shape = f"b={batch} new={n_new} at {at} {layout} kv_heads={kv_heads} d={head_dim}"
    return BenchCase("append_kv", shape, dtype, device, make_kwargs, None, 2 * new_elements * _itemsize(dtype))


_SAMPLING_PARAMS = dict(temperature=0.7, top_k=50, top_p=0.9)


def _sampling_case(op, device, dtype, batch, vocab, params=None, allowed: Optional[float] = None) -> BenchCase:
    """Logits of ``batch`` rows over ``vocab``, filtered or sampled with ``params`` (default
    temperature 0.7, top-k 50, top-p 0.9); ``sample`` draws with seed 0. ``allowed``: the
    fraction of tokens a random ``allowed`` bitmask lets through (None: no bitmask)."""
    params = _SAMPLING_PARAMS if params is None else params

    def make_kwargs() -> Kwargs:
        generator = _generator(device)
        logits = _randn((batch, vocab), dtype, device, generator) * 3
        kwargs = dict(logits=logits, **params)
        if allowed is not None:
            mask = torch.rand((batch, vocab), generator=generator, device=device) < allowed
            mask[:, 0] = True  # every row allows a token
            kwargs["allowed"] = reference.pack_allowed(mask)
        if op == "sample":
            kwargs["seed"] = 0
        return kwargs

    logits_bytes = batch * vocab * _itemsize(dtype)
    written = logits_bytes if op == "filter_logits" else batch * 8  # filtered logits, or int64 tokens
    mask_bytes = 0 if allowed is None else batch * reference.allowed_words(vocab) * 4
    options = " ".join(f"{key}={value}" for key, value in params.items())
    if allowed is not None:
        options += f" allowed={allowed:.0%}"
    return BenchCase(op, f"b={batch} vocab={vocab} {options}", dtype, device, make_kwargs, None,
                     logits_bytes + mask_bytes + written)


def _linear_case(device, dtype, rows, n, k) -> BenchCase:
    def make_kwargs() -> Kwargs:
        generator = _generator(device)
        x = _randn((rows, k), dtype, device, generator)
        weight = _randn((n, k), dtype, device, generator) / k**0.5
        return dict(x=x, weight=weight)

    moved = (n * k + rows * k + rows * n) * _itemsize(dtype)
    return BenchCase("linear", f"b={rows} n={n} k={k}", dtype, device, make_kwargs, 2 * rows * n * k, moved)


# SmolLM2-135M's LM head, its largest matmul: (N, K) = (vocabulary, hidden).
_HEAD = (49152, 576)


def _cases_of(op: str, table: Dict[str, Callable[[], List[BenchCase]]]) -> List[BenchCase]:
    """``table[op]()``: the cases a table builds for ``op``; an unknown op raises ValueError."""
    if op not in table:
        raise ValueError(f"op must be one of {', '.join(registry.OPS)}, got {op!r}")
    return table[op]()


def default_cases(op: str, device) -> List[BenchCase]:
    """The shapes ``fmkernels bench`` times ``op`` on.

    On the CPU, the shapes the C++ backend is measured on: a 2048-token causal prefill
    (16 query / 4 KV heads of 128), decode of one token over an 8192-token cache (batch 4,
    32 / 8 heads of 128; contiguous, and paged in float32), in float32 and bfloat16,
    sampling over a 128256-token vocabulary (batch 16; sample also under a bitmask allowing 1%
    of the tokens, as a grammar does), and 1 and 8 rows against
    SmolLM2-135M's LM head (49152 x 576) in float32 and bfloat16. On a GPU they are large enough to
    fill it: Llama-3-8B-like heads, 2048-token prefill over 8 sequences, 4096-token paged
    decode over 64, 128 rows of logits, 16 rows against its MLP's 14336 x 4096 weight.

    Parameters
    ----------
    op : str
        One of ``fmkernels.registry.OPS``.
    device : str or torch.device

    Returns
    -------
    list of BenchCase
    """
    device = torch.device(device)
    fp32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cpu":
        table = {
            "attention": lambda: [_attention_case(device, dtype, 1, 2048, 16, 4, 128) for dtype in (fp32, bf16)],
            "decode_attention": lambda: [
                _decode_case(device, fp32, 4, 8192, 32, 8, 128),
                _decode_case(device, bf16, 4, 8192, 32, 8, 128),
                _decode_case(device, fp32, 4, 8192, 32, 8, 128, block_size=16),
            ],
            "append_kv": lambda: [_append_kv_case(device, fp32, 8, 1000, 1, 8, 128, 16)],
            "filter_logits": lambda: [_sampling_case("filter_logits", device, fp32, 16, 128256)],
            "sample": lambda: [_sampling_case("sample", device, fp32, 16, 128256),
                               _sampling_case("sample", device, fp32, 16, 128256, allowed=0.01)],
            "linear": lambda: [_linear_case(device, dtype, rows, *_HEAD) for dtype in (fp32, bf16) for rows in (1, 8)],
        }
    else:
        table = {
            "attention": lambda: [_attention_case(device, bf16, 8, 2048, 32, 8, 128)],
            "decode_attention": lambda: [_decode_case(device, bf16, 64, 4096, 32, 8, 128, 16)],
            "append_kv": lambda: [_append_kv_case(device, bf16, 64, 4096, 16, 8, 128, 16)],
            "filter_logits": lambda: [_sampling_case("filter_logits", device, fp32, 128, 128256)],
            "sample": lambda: [_sampling_case("sample", device, fp32, 128, 128256),
                               _sampling_case("sample", device, fp32, 128, 128256, allowed=0.01)],
            "linear": lambda: [_linear_case(device, bf16, 16, 14336, 4096)],
        }
    return _cases_of(op, table)


def sweep_cases(op: str, device) -> List[BenchCase]:
    """The grids ``fmkernels bench --sweep`` times ``op`` over: how speed moves with size.

    On a GPU (bfloat16 attention, float32 logits):

    * attention: seqlen 1k to 16k at 16k tokens per call (batch = 16384 / seqlen), 16 heads
      of 128 (FlashAttention's published setting), causal and not;
    * decode_attention: one new token, 32 query / 8 KV heads of 128, batch 1, 4, 16, 64 x
      cache 1k, 2k, 8k, 32k, contiguous; and paged (blocks of 16) at batch 1 / 32k,
      16 / 8k and 64 / 2k;
    * append_kv: 16 new tokens over batch 1 and 64, paged;
    * filter_logits and sample: vocabulary 128256, batch 1, 16, 64, 256 (sample) and 1,
      64, 256 (filter_logits), top_k 50, top_p 0.9, temperature 0.7;
    * linear: 1 to 256 rows against Llama-3-8B's 14336 x 4096 MLP weight.

    On the CPU, the same kinds of grid at sizes a few cores finish in minutes (linear: 1 to
    16 rows, the C++ kernel's range, against SmolLM2-135M's 49152 x 576 LM head).

    Parameters
    ----------
    op : str
        One of ``fmkernels.registry.OPS``.
    device : str or torch.device

    Returns
    -------
    list of BenchCase
    """
    device = torch.device(device)
    fp32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cpu":
        seqlens, tokens = (256, 512, 1024, 2048), 2048
        decode_grid = [(batch, context) for batch in (1, 4) for context in (1024, 8192)]
        paged_grid = [(1, 8192)]
        sample_batches, filter_batches, append_batches = (1, 16), (1, 16), (1, 8)
        linear_rows, linear_shape = (1, 2, 4, 8, 16), _HEAD
        dtype = fp32
    else:
        seqlens, tokens = (1024, 2048, 4096, 8192, 16384), 16384
        decode_grid = [(batch, context) for batch in (1, 4, 16, 64) for context in (1024, 2048, 8192, 32768)]
        paged_grid = [(1, 32768), (16, 8192), (64, 2048)]
        sample_batches, filter_batches, append_batches = (1, 16, 64, 256), (1, 64, 256), (1, 64)
        linear_rows, linear_shape = (1, 4, 16, 64, 256), (14336, 4096)
        dtype = bf16
    table = {
        "attention": lambda: [
            _attention_case(device, dtype, max(1, tokens // seqlen), seqlen, 16, 16, 128, causal)
            for causal in (False, True) for seqlen in seqlens
        ],
        "decode_attention": lambda: [
            _decode_case(device, dtype, batch, context, 32, 8, 128) for batch, context in decode_grid
        ] + [_decode_case(device, dtype, batch, context, 32, 8, 128, block_size=16) for batch, context in paged_grid],
        "append_kv": lambda: [_append_kv_case(device, dtype, batch, 2048, 16, 8, 128, 16) for batch in append_batches],
        "filter_logits": lambda: [_sampling_case("filter_logits", device, fp32, batch, 128256) for batch in filter_batches],
        "sample": lambda: [_sampling_case("sample", device, fp32, batch, 128256) for batch in sample_batches],
        "linear": lambda: [_linear_case(device, dtype, rows, *linear_shape) for rows in linear_rows],
    }
    return _cases_of(op, table)
