"""The inputs ``fmkernels check`` runs each op on: odd sizes on purpose, random values drawn from a
case's seed, NaN in every cache slot an op must not touch."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .. import reference, registry
from ..quantized import quantize

#: The input dtypes every op is checked in.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


Kwargs = Dict[str, Any]
Device = Union[str, torch.device]


@dataclasses.dataclass(frozen=True)
class Case:
    """One set of inputs for one op.

    Attributes
    ----------
    op : str
        The op, one of ``fmkernels.registry.OPS``.
    name : str
        What the inputs are (sizes, layout, options, dtype, seed), as ``fmkernels check`` lists them.
    make_kwargs : callable
        ``make_kwargs()`` builds the op's keyword arguments (the reference's signature)
        afresh: the same values at every call, drawn from the case's seed.
    """

    op: str
    name: str
    make_kwargs: Callable[[], Kwargs]


class _AttentionShape(NamedTuple):
    seqlens_q: Tuple[int, ...]  # one per sequence; a dense batch has equal lengths
    seqlens_k: Tuple[int, ...]
    q_heads: int
    kv_heads: int
    head_dim: int
    causal: bool = False
    return_lse: bool = False
    packed: bool = False  # varlen: (total_tokens, heads, head_dim) with cu_seqlens


class _DecodeShape(NamedTuple):
    cache_seqlens: Tuple[int, ...]  # tokens in each sequence's cache, the new ones included
    n_new: int
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: Optional[int] = None  # paged cache when set
    return_lse: bool = False
    shared_blocks: int = 0  # paged: every sequence's first blocks are the first sequence's


class _AppendShape(NamedTuple):
    cache_seqlens: Tuple[int, ...]  # tokens already in each sequence's cache
    n_new: int
    kv_heads: int
    head_dim: int
    block_size: Optional[int] = None
    shared_blocks: int = 0  # paged: every sequence's first blocks are the first sequence's


class _LinearShape(NamedTuple):
    leading: Tuple[int, ...]  # x's leading dimensions: rows = their product
    n: int
    k: int
    transposed: bool = False  # x stored (K, rows): not unit stride along K
    format: Optional[str] = None  # a QuantizedWeight of this format (fmkernels.quantized)


class _SamplingShape(NamedTuple):
    batch: int
    vocab: int
    params: Dict[str, Any]  # the op's keyword arguments; a tuple is a per-row tensor
    ties: bool = False  # small integer logits, so top-k and top-p must break ties by token id


_ATTENTION_SHAPES = (
    _AttentionShape((17, 17), (17, 17), 4, 4, 64),
    _AttentionShape((113,), (113,), 8, 2, 128, causal=True, return_lse=True),
    _AttentionShape((1, 1), (113, 113), 8, 1, 64, causal=True),
    _AttentionShape((17,), (113,), 8, 1, 128, causal=True, return_lse=True),
    _AttentionShape((17,), (5,), 4, 4, 64, causal=True, return_lse=True),  # 12 queries see no key
    _AttentionShape((1, 17, 40), (17, 17, 113), 8, 2, 64, causal=True, return_lse=True, packed=True),
)
_ATTENTION_SHAPES_GPU = (
    _AttentionShape((1000, 1000), (1000, 1000), 32, 8, 128, causal=True, return_lse=True),
    _AttentionShape((113,) * 4, (1000,) * 4, 16, 2, 64, causal=True),
    _AttentionShape((1000,), (1000,), 8, 8, 64),
    _AttentionShape((1000, 1, 113, 17), (1000, 17, 1000, 113), 32, 4, 128, causal=True, packed=True),
)
_DECODE_SHAPES = (
    _DecodeShape((1, 17, 113), 1, 8, 8, 64),
    _DecodeShape((17, 113, 1), 1, 8, 1, 128, block_size=16, return_lse=True),
    _DecodeShape((4, 17, 113), 4, 8, 2, 64, return_lse=True),
    _DecodeShape((113, 33), 1, 16, 4, 128, block_size=32),
    _DecodeShape((40, 113, 17), 1, 8, 2, 64, block_size=16, shared_blocks=2),  # a shared prompt
)
_DECODE_SHAPES_GPU = (
    _DecodeShape((1000, 1, 4096, 17, 113, 2048, 333, 1) * 4, 1, 32, 8, 128, block_size=16, return_lse=True),
    _DecodeShape((4096,) * 16, 1, 64, 8, 128),
    _DecodeShape((1000, 17, 113, 4096), 8, 32, 4, 64, block_size=64),
)
_APPEND_SHAPES = (
    _AppendShape((0, 16, 112), 1, 2, 64),
    _AppendShape((0, 15, 100), 5, 1, 128, block_size=16),  # crosses block boundaries
    _AppendShape((3, 40), 17, 8, 128),
    _AppendShape((1, 31, 64), 1, 4, 64, block_size=32),
    _AppendShape((32, 40, 33), 3, 2, 64, block_size=16, shared_blocks=2),  # after a shared prompt
)
_APPEND_SHAPES_GPU = (
    _AppendShape((0, 999, 4095, 17) * 4, 1, 8, 128, block_size=16),
    _AppendShape((1000, 0, 113), 113, 8, 64),
)
_LINEAR_SHAPES = (
    _LinearShape((1,), 5, 7),
    _LinearShape((3,), 33, 64),
    _LinearShape((2, 4), 1536, 576),
    _LinearShape((13,), 7, 1000, transposed=True),
    _LinearShape((16,), 1, 1),
    _LinearShape((1, 17), 40, 64),  # 17 rows: past the C++ kernel's 16
    # GGUF's formats: K whole blocks (32, or 256 for the k-quants), N odd
    _LinearShape((1,), 33, 576, format="q4_1"),
    _LinearShape((3,), 5, 96, format="q4_0"),
    _LinearShape((2, 4), 577, 256, format="q8_0"),
    _LinearShape((13,), 7, 512, transposed=True, format="q4_k"),
    _LinearShape((5,), 33, 256, format="q6_k"),
    _LinearShape((1, 17), 40, 96, format="q4_1"),
)
_LINEAR_SHAPES_GPU = (
    _LinearShape((1,), 32000, 4096),
    _LinearShape((8, 16), 4096, 4096),
    _LinearShape((4, 1), 14336, 4096, transposed=True),
    _LinearShape((1,), 4096, 4096, format="q4_k"),
    _LinearShape((8,), 14336, 4096, format="q8_0"),
    _LinearShape((64,), 4095, 2048, format="q6_k"),
    _LinearShape((3, 1), 32000, 4096, transposed=True, format="q4_1"),
)
_PER_ROW = dict(
    temperature=(0.0, 0.5, 1.0, 1.5),
    top_k=(0, 1, 20, 1000),
    top_p=(1.0, 0.5, 0.95, 0.8),
    min_p=(0.0, 0.05, 0.0, 0.1),
)
_FILTER_SHAPES = (
    _SamplingShape(4, 1000, dict(temperature=0.7, top_k=50)),
    _SamplingShape(4, 1000, dict(top_p=0.9)),
    _SamplingShape(4, 1000, _PER_ROW),
    _SamplingShape(3, 257, dict(top_k=10, top_p=0.9, min_p=0.2), ties=True),
    _SamplingShape(5, 1001, dict(temperature=0.7, top_k=50, top_p=0.9, allowed="mixed")),
)
_FILTER_SHAPES_GPU = (
    _SamplingShape(64, 32000, dict(temperature=0.8, top_k=40, top_p=0.95)),
    _SamplingShape(64, 128256, dict(top_p=0.9, min_p=0.05)),
    _SamplingShape(64, 128256, dict(temperature=0.7, top_k=50, top_p=0.9, allowed="mixed")),
)
_SAMPLE_SHAPES = (
    _SamplingShape(8, 1000, dict(seed="per-row", step=3, return_logprobs=True, num_logprobs=5)),
    _SamplingShape(4, 1000, dict(_PER_ROW, seed=1234, step=(0, 1, 2, 3))),
    _SamplingShape(4, 32000, dict(temperature=0.8, top_p=0.9, seed=7, return_logprobs=True, num_logprobs=3)),
    _SamplingShape(3, 257, dict(top_k=10, seed="per-row", return_logprobs=True, num_logprobs=4), ties=True),
    _SamplingShape(5, 4099, dict(temperature=0.8, top_p=0.9, min_p=0.05, allowed="mixed", seed="per-row",
                                 return_logprobs=True, num_logprobs=3)),
    _SamplingShape(5, 1001, dict(temperature=0.0, allowed="mixed", seed=3)),
)
_SAMPLE_SHAPES_GPU = (
    _SamplingShape(64, 128256, dict(temperature=0.7, top_k=50, top_p=0.9, seed="per-row", step=17,
                                    return_logprobs=True, num_logprobs=8)),
)

# Per-row parameters become tensors of these dtypes.
_PARAM_DTYPES = dict(
    temperature=torch.float32, top_p=torch.float32, min_p=torch.float32,
    top_k=torch.int32, seed=torch.int64, step=torch.int64,
)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _randn(generator: torch.Generator, shape, dtype: torch.dtype, device: torch.device, scale: float = 1.0):
    """Normal values drawn on the CPU (so every device gets the same ones), then cast and moved."""
    return (torch.randn(shape, generator=generator) * scale).to(device=device, dtype=dtype)


def _int32(values, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int32).to(device)


def _kv_caches(generator, lengths, capacity, kv_heads, head_dim, dtype, device, block_size, shared_blocks=0):
    """k_cache, v_cache and block_table (None for a contiguous cache).

    Each sequence can hold ``capacity`` tokens; positions [0, lengths[b]) hold random keys
    and values, and every other slot, spare blocks included, is NaN: an implementation that
    reads or writes a slot it should not fails. A paged cache's blocks are shuffled; with
    ``shared_blocks`` every sequence's first blocks are the first sequence's, as when the
    sequences share a prompt (a later sequence's history overwrites the earlier ones' there,
    and the blocks this frees stay spare).
    """
    batch = len(lengths)
    if block_size is None:
        block_table = None
        shape = (batch, capacity, kv_heads, head_dim)
    else:
        blocks_per_sequence = -(-capacity // block_size)
        num_blocks = batch * blocks_per_sequence + 2  # two spare blocks no sequence owns
        order = torch.randperm(num_blocks, generator=generator)[: batch * blocks_per_sequence]
        block_table = order.view(batch, blocks_per_sequence).to(torch.int32)
        if shared_blocks:
            block_table[1:, :shared_blocks] = block_table[0, :shared_blocks]
        shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = []
    for _ in ("k", "v"):
        cache = torch.full(shape, float("nan"), dtype=dtype)
        for b, length in enumerate(lengths):
            history = torch.randn((length, kv_heads, head_dim), generator=generator).to(dtype)
            if block_table is None:
                cache[b, :length] = history
            else:
                positions = torch.arange(length)
                cache[block_table[b, positions // block_size].long(), positions % block_size] = history
        caches.append(cache.to(device))
    return caches[0], caches[1], None if block_table is None else block_table.to(device)


def _attention_case(shape: _AttentionShape, dtype, seed: int, device) -> Case:
    def make_kwargs() -> Kwargs:
        generator = torch.Generator().manual_seed(seed)
        if shape.packed:
            q_shape = (sum(shape.seqlens_q), shape.q_heads, shape.head_dim)
            k_shape = (sum(shape.seqlens_k), shape.kv_heads, shape.head_dim)
        else:
            q_shape = (len(shape.seqlens_q), shape.seqlens_q[0], shape.q_heads, shape.head_dim)
            k_shape = (len(shape.seqlens_k), shape.seqlens_k[0], shape.kv_heads, shape.head_dim)
        kwargs = dict(
            q=_randn(generator, q_shape, dtype, device),
            k=_randn(generator, k_shape, dtype, device),
            v=_randn(generator, k_shape, dtype, device),
            causal=shape.causal,
            return_lse=shape.return_lse,
        )
        if shape.packed:
            kwargs["cu_seqlens_q"] = _int32([0, *torch.tensor(shape.seqlens_q).cumsum(0).tolist()], device)
            kwargs["cu_seqlens_k"] = _int32([0, *torch.tensor(shape.seqlens_k).cumsum(0).tolist()], device)
        return kwargs

    if shape.packed:
        sizes = f"varlen sq={','.join(map(str, shape.seqlens_q))} sk={','.join(map(str, shape.seqlens_k))}"
    else:
        sizes = f"b={len(shape.seqlens_q)} sq={shape.seqlens_q[0]} sk={shape.seqlens_k[0]}"
    options = ("causal" if shape.causal else "") + (" lse" if shape.return_lse else "")
    name = _name(sizes, f"h={shape.q_heads}/{shape.kv_heads} d={shape.head_dim}", options, dtype, seed)
    return Case("attention", name, make_kwargs)


def _decode_case(shape: _DecodeShape, dtype, seed: int, device) -> Case:
    capacity = max(shape.cache_seqlens, default=0) + 7  # free slots after the longest sequence too

    def make_kwargs() -> Kwargs:
        generator = torch.Generator().manual_seed(seed)
        batch = len(shape.cache_seqlens)
        q = _randn(generator, (batch, shape.n_new, shape.q_heads, shape.head_dim), dtype, device)
        k_cache, v_cache, block_table = _kv_caches(
            generator, shape.cache_seqlens, capacity, shape.kv_heads, shape.head_dim, dtype, device, shape.block_size,
            shape.shared_blocks,
        )
        return dict(
            q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=_int32(shape.cache_seqlens, device),
            block_table=block_table, return_lse=shape.return_lse,
        )

    layout = "contiguous" if shape.block_size is None else f"paged/{shape.block_size}"
    if shape.shared_blocks:
        layout += f" shared={shape.shared_blocks}"
    sizes = f"{layout} seqlens={_short_list(shape.cache_seqlens)} new={shape.n_new}"
    heads = f"h={shape.q_heads}/{shape.kv_heads} d={shape.head_dim}"
    name = _name(sizes, heads, "lse" if shape.return_lse else "", dtype, seed)
    return Case("decode_attention", name, make_kwargs)


def _append_case(shape: _AppendShape, dtype, seed: int, device) -> Case:
    capacity = max(shape.cache_seqlens, default=0) + shape.n_new + 7

    def make_kwargs() -> Kwargs:
        generator = torch.Generator().manual_seed(seed)
        batch = len(shape.cache_seqlens)
        k_cache, v_cache, block_table = _kv_caches(
            generator, shape.cache_seqlens, capacity, shape.kv_heads, shape.head_dim, dtype, device, shape.block_size,
            shape.shared_blocks,
        )
        new_shape = (batch, shape.n_new, shape.kv_heads, shape.head_dim)
        return dict(
            k_cache=k_cache, v_cache=v_cache,
            k=_randn(generator, new_shape, dtype, device), v=_randn(generator, new_shape, dtype, device),
            cache_seqlens=_int32(shape.cache_seqlens, device), block_table=block_table,
        )

    layout = "contiguous" if shape.block_size is None else f"paged/{shape.block_size}"
    if shape.shared_blocks:
        layout += f" shared={shape.shared_blocks}"
    sizes = f"{layout} seqlens={_short_list(shape.cache_seqlens)} new={shape.n_new}"
    name = _name(sizes, f"kv_heads={shape.kv_heads} d={shape.head_dim}", "", dtype, seed)
    return Case("append_kv", name, make_kwargs)


def _linear_case(shape: _LinearShape, dtype, seed: int, device) -> Case:
    def make_kwargs() -> Kwargs:
        generator = torch.Generator().manual_seed(seed)
        rows = math.prod(shape.leading)
        if shape.transposed:
            x = _randn(generator, (shape.k, rows), dtype, device).T.reshape(*shape.leading, shape.k)
        else:
            x = _randn(generator, (*shape.leading, shape.k), dtype, device)
        # nn.Linear's scale: outputs of order 1 whatever K
        if shape.format is not None:
            values = torch.randn((shape.n, shape.k), generator=generator) / math.sqrt(shape.k)
            return dict(x=x, weight=quantize(values, shape.format).to(device))
        weight = _randn(generator, (shape.n, shape.k), dtype, device, scale=1.0 / math.sqrt(max(shape.k, 1)))
        return dict(x=x, weight=weight)

    form = f"{shape.format} " if shape.format else ""
    sizes = f"x=({','.join(map(str, shape.leading + (shape.k,)))}) w={form}({shape.n},{shape.k})"
    return Case("linear", _name(sizes, "", "x-transposed" if shape.transposed else "", dtype, seed), make_kwargs)


def _sampling_case(op: str, shape: _SamplingShape, dtype, seed: int, device) -> Case:
    def make_kwargs() -> Kwargs:
        generator = torch.Generator().manual_seed(seed)
        size = (shape.batch, shape.vocab)
        if shape.ties:
            logits = torch.randint(-4, 5, size, generator=generator).to(device=device, dtype=dtype)
        else:
            logits = _randn(generator, size, dtype, device, scale=3.0)
        kwargs = dict(logits=logits)
        for key, value in shape.params.items():
            if value == "per-row":  # only seeds: random row seeds below 2**62
                value = tuple(torch.randint(0, 2**62, (shape.batch,), generator=generator).tolist())
            if value == "mixed":  # only allowed
                kwargs[key] = random_allowed(shape.batch, shape.vocab, generator).to(device)
                continue
            if isinstance(value, tuple):
                value = torch.tensor(value, dtype=_PARAM_DTYPES[key], device=device)
            kwargs[key] = value
        return kwargs

    shown = {key: value for key, value in shape.params.items() if key not in ("seed", "return_logprobs")}
    options = " ".join(f"{key}={'per-row' if isinstance(value, tuple) else value}" for key, value in shown.items())
    sizes = f"b={shape.batch} vocab={shape.vocab}" + (" tied-logits" if shape.ties else "")
    return Case(op, _name(sizes, options, "", dtype, seed), make_kwargs)


def random_allowed(batch: int, vocab: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A packed ``allowed`` bitmask (batch, ceil(vocab / 32)) int32 that mixes the masks a
    grammar produces: row 0 allows a random half of the tokens, row 1 all but one, row 2 a
    single token, row 3 about 1% of them, and later rows a random half again; every row also
    has its bits past the vocabulary set (which must be ignored)."""
    mask = torch.rand((batch, vocab), generator=generator) < 0.5
    if batch > 1:
        mask[1] = True
        mask[1, int(torch.randint(vocab, (1,), generator=generator))] = False
    if batch > 2:
        mask[2] = False
        mask[2, int(torch.randint(vocab, (1,), generator=generator))] = True
    if batch > 3:
        mask[3] = torch.rand(vocab, generator=generator) < 0.01
        mask[3, int(torch.randint(vocab, (1,), generator=generator))] = True
    mask[:, 0] |= ~mask.any(dim=1)  # the random rows allow at least one token
    allowed = reference.pack_allowed(mask)
    tail = vocab % 32
    if tail:
        allowed[:, -1] |= torch.tensor(-1 << tail, dtype=torch.int32)
    return allowed


def _short_list(values: Sequence[int]) -> str:
    shown = ",".join(map(str, values[:4]))
    return shown + (f",...({len(values)})" if len(values) > 4 else "")


def _name(sizes: str, details: str, options: str, dtype, seed: int) -> str:
    return " ".join(part for part in (sizes, details, options, _dtype_name(dtype), f"seed={seed}") if part)


_CASE_TABLES = {
    "attention": (_ATTENTION_SHAPES, _ATTENTION_SHAPES_GPU, _attention_case),
    "decode_attention": (_DECODE_SHAPES, _DECODE_SHAPES_GPU, _decode_case),
    "append_kv": (_APPEND_SHAPES, _APPEND_SHAPES_GPU, _append_case),
    "filter_logits": (
        _FILTER_SHAPES, _FILTER_SHAPES_GPU,
        lambda shape, dtype, seed, device: _sampling_case("filter_logits", shape, dtype, seed, device),
    ),
    "sample": (
        _SAMPLE_SHAPES, _SAMPLE_SHAPES_GPU,
        lambda shape, dtype, seed, device: _sampling_case("sample", shape, dtype, seed, device),
    ),
    "linear": (_LINEAR_SHAPES, _LINEAR_SHAPES_GPU, _linear_case),
}


def cases(op: str, device: Device = "cpu", seed: int = 0) -> List[Case]:
    """The inputs ``fmkernels check`` runs ``op`` on, sized for ``device``.

    Odd sizes on purpose: sequence lengths 1, 17 and 113 (1000 and 4096 on a GPU),
    seqlen_q != seqlen_k, queries that see no key, GQA ratios 1, 4 and 8, head dims 64
    and 128, mixed-length (varlen) batches, contiguous and paged caches, tied logits;
    matmuls of 1 to 17 rows against K of 1 to 1000, x with leading dimensions or transposed.
    On the CPU each shape runs once, the dtypes (fp32, fp16, bf16) in turn, so the whole
    check takes seconds; on a GPU every shape runs in every dtype, and larger shapes join.

    Parameters
    ----------
    op : str
        One of ``fmkernels.registry.OPS``.
    device : str or torch.device
        Where the inputs live.
    seed : int
        The first case's seed; case i draws its inputs from seed + i.

    Returns
    -------
    list of Case
    """
    if op not in _CASE_TABLES:
        raise ValueError(f"op must be one of {', '.join(registry.OPS)}, got {op!r}")
    device = torch.device(device)
    shapes, gpu_shapes, build = _CASE_TABLES[op]
    if device.type == "cpu":
        combos = [(shape, DTYPES[i % len(DTYPES)]) for i, shape in enumerate(shapes)]
    else:
        combos = [(shape, dtype) for shape in shapes + gpu_shapes for dtype in DTYPES]
    return [build(shape, dtype, seed + i, device) for i, (shape, dtype) in enumerate(combos)]
