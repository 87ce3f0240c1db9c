"""Property-based tests (hypothesis): each test draws whole calls of one op (shapes, dtypes, GQA
ratios, layouts, parameters at their extremes, empty batches and sequences) and holds every
backend that can run on this machine to the reference by ``fmkernels.testing.check_impl``'s rules (float64 truth and
plain-PyTorch tolerances for attention and linear, exact caches for append_kv, exact kept sets
for filter_logits, the same tokens for sample), with poisoned outputs, NaN past every
sequence's length, logits with -inf entries (some, or all but one of a row), shuffled and shared block tables, and each tensor contiguous, a sliced view
of a padded one, every other element of a wider one, or stored with its dimensions in another
order. A backend may refuse a call only by saying it cannot run it. Invalid calls
(a valid one with one thing made wrong: a length past the cache, a block outside the pool, a
NaN logit, a parameter out of range) are refused by every backend before anything is written.

In CI the search is deterministic and small (the "ci" profile). ``make fuzz`` runs the long
search (the "fuzz" profile: FMKERNELS_FUZZ_EXAMPLES examples per test, a fresh random seed each
run), and hypothesis prints any failing example with the decorator that replays it
(``@reproduce_failure``); keep it here as a regression test (``@example``).

Every tensor is made on the device FMKERNELS_FUZZ_DEVICE names ("cpu" by default): on a GPU,
``FMKERNELS_FUZZ_DEVICE=cuda`` draws the same calls on CUDA tensors and holds the backends that
run on them to the reference (``bench/gpu_check.sh fuzz`` runs it under compute-sanitizer memcheck).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fmkernels
from fmkernels import reference, registry, testing
from fmkernels.quantized import FORMATS

_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FMKERNELS_FUZZ_EXAMPLES", "500")), **_COMMON)
settings.load_profile(os.environ.get("FMKERNELS_HYPOTHESIS_PROFILE", "ci"))

DEVICE = torch.device(os.environ.get("FMKERNELS_FUZZ_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip(f"FMKERNELS_FUZZ_DEVICE={DEVICE} needs a CUDA GPU, and there is none here", allow_module_level=True)
if DEVICE.type == "cuda":
    pytestmark = pytest.mark.gpu  # the suite's GPU tests hand back GPU memory after each test

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
HEAD_DIMS = st.sampled_from([8, 16, 24, 32, 64, 72, 128, 256])
SEEDS = st.integers(0, 2**31 - 1)


def _backends(op: str):
    """The backends (not peers or users' implementations) that can run on DEVICE's tensors here."""
    return [impl for impl in registry.implementations(op)
            if impl.kind == "backend" and testing.skip_reason(impl, DEVICE) is None]


@st.composite
def _layout(draw):
    """How a tensor is laid out in memory: contiguous; a sliced view of a padded tensor (rows
    of the last dimension ``pad`` elements apart more than their length); every other element
    of a tensor twice as wide (no unit stride anywhere); or its dimensions stored in another
    order (a permutation of the outer dimensions, or of all of them)."""
    kind = draw(st.sampled_from(["contiguous", "contiguous", "padded", "every other", "permuted"]))
    if kind == "padded":
        return kind, draw(st.sampled_from([1, 8]))
    if kind == "permuted":
        return kind, tuple(draw(st.permutations(range(4))))
    return kind, None


def _laid_out(tensor: torch.Tensor, layout) -> torch.Tensor:
    """The same values in ``layout``, as a view of a tensor whose other elements are NaN."""
    kind, argument = layout
    if kind == "contiguous":
        return tensor
    nan, like = float("nan"), dict(dtype=tensor.dtype, device=tensor.device)
    if kind == "padded":
        view = torch.full((*tensor.shape[:-1], tensor.shape[-1] + argument), nan, **like)
        view = view[..., : tensor.shape[-1]]
    elif kind == "every other":
        view = torch.full((*tensor.shape[:-1], 2 * tensor.shape[-1]), nan, **like)[..., ::2]
    else:  # the dimensions in storage order, outermost first
        order = [dim for dim in argument if dim < tensor.dim()]
        stored = torch.full([tensor.shape[dim] for dim in order], nan, **like)
        view = stored.permute([order.index(dim) for dim in range(tensor.dim())])
    view.copy_(tensor)
    return view


def _with_layouts(case: testing.Case, layouts) -> testing.Case:
    """``case`` with each floating-point tensor named in ``layouts`` laid out as it says."""
    layouts = {name: layout for name, layout in layouts.items() if layout[0] != "contiguous"}
    if not layouts:
        return case

    def make_kwargs():
        kwargs = case.make_kwargs()
        for name, layout in layouts.items():
            if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].is_floating_point():
                kwargs[name] = _laid_out(kwargs[name], layout)
        return kwargs

    described = " ".join(f"{name}:{kind}{'' if argument is None else argument}"
                         for name, (kind, argument) in layouts.items())
    return testing.Case(case.op, f"{case.name} {described}", make_kwargs)


def _draw_layouts(data, names):
    return {name: data.draw(_layout(), label=f"{name} layout") for name in names}


def _hold_every_backend_to_the_reference(case: testing.Case) -> None:
    for impl in _backends(case.op):
        try:
            result = testing.check_impl(impl, case)
        except ValueError as error:
            assert "cannot run" in str(error), f"{impl.name} refused a valid call of {case.name}: {error}"
            continue
        assert result.passed, f"{impl.name} on {case.name}: {result.detail} (error {result.max_error} > {result.tolerance})"


@st.composite
def _gqa(draw):
    kv_heads = draw(st.integers(1, 3))
    return kv_heads * draw(st.sampled_from([1, 2, 3, 4])), kv_heads


@given(data=st.data(), dtype=DTYPES, head_dim=HEAD_DIMS, seed=SEEDS)
def test_decode_attention_matches_the_reference(data, dtype, head_dim, seed):
    batch = data.draw(st.integers(0, 4), label="batch")
    n_new = data.draw(st.integers(1, 3), label="n_new")
    lengths = tuple(data.draw(st.lists(st.integers(n_new, 70), min_size=batch, max_size=batch), label="lengths"))
    q_heads, kv_heads = data.draw(_gqa(), label="heads")
    block_size = data.draw(st.sampled_from([None, 1, 4, 16]), label="block_size")
    # Reading blocks other sequences also read is any paged decode's right: share any number
    # of the leading blocks (the decode case's capacity is the longest length + 7).
    shared = (0 if block_size is None or batch <= 1
              else data.draw(st.integers(0, -(-(max(lengths) + 7) // block_size)), label="shared_blocks"))
    shape = testing._DecodeShape(lengths, n_new, q_heads, kv_heads, head_dim, block_size,
                                 return_lse=data.draw(st.booleans(), label="return_lse"), shared_blocks=shared)
    case = _with_layouts(testing._decode_case(shape, dtype, seed, DEVICE),
                         _draw_layouts(data, ("q", "k_cache", "v_cache")))
    _hold_every_backend_to_the_reference(case)


@given(data=st.data(), dtype=DTYPES, head_dim=HEAD_DIMS, seed=SEEDS)
def test_append_kv_matches_the_reference(data, dtype, head_dim, seed):
    batch = data.draw(st.integers(0, 4), label="batch")
    lengths = tuple(data.draw(st.lists(st.integers(0, 70), min_size=batch, max_size=batch), label="lengths"))
    block_size = data.draw(st.sampled_from([None, 1, 4, 16]), label="block_size")
    # The new tokens go after every sequence's own length: only blocks every sequence has
    # filled can be shared, or two sequences would write the same slots.
    shared = (0 if block_size is None or batch <= 1
              else data.draw(st.integers(0, min(lengths) // block_size), label="shared_blocks"))
    shape = testing._AppendShape(lengths, data.draw(st.integers(1, 5), label="n_new"),
                                 data.draw(st.integers(1, 3), label="kv_heads"), head_dim, block_size, shared)
    case = _with_layouts(testing._append_case(shape, dtype, seed, DEVICE),
                         _draw_layouts(data, ("k_cache", "v_cache", "k", "v")))
    _hold_every_backend_to_the_reference(case)


@given(data=st.data(), dtype=DTYPES, head_dim=HEAD_DIMS, seed=SEEDS)
def test_attention_matches_the_reference(data, dtype, head_dim, seed):
    q_heads, kv_heads = data.draw(_gqa(), label="heads")
    packed = data.draw(st.booleans(), label="packed")
    batch = data.draw(st.integers(1, 3), label="batch")
    if packed:  # varlen, empty sequences included
        seqlens_q = tuple(data.draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch), label="seqlens_q"))
        seqlens_k = tuple(data.draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch), label="seqlens_k"))
    else:  # Sq above and below Sk
        seqlens_q = (data.draw(st.integers(0, 40), label="seqlen_q"),) * batch
        seqlens_k = (data.draw(st.integers(0, 40), label="seqlen_k"),) * batch
    shape = testing._AttentionShape(seqlens_q, seqlens_k, q_heads, kv_heads, head_dim,
                                    causal=data.draw(st.booleans(), label="causal"),
                                    return_lse=data.draw(st.booleans(), label="return_lse"), packed=packed)
    case = _with_layouts(testing._attention_case(shape, dtype, seed, DEVICE), _draw_layouts(data, ("q", "k", "v")))
    _hold_every_backend_to_the_reference(case)


@given(data=st.data(), dtype=DTYPES, seed=SEEDS)
def test_linear_matches_the_reference(data, dtype, seed):
    leading = tuple(data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=3), label="leading"))
    shape = testing._LinearShape(leading, data.draw(st.integers(1, 80), label="n"),
                                 data.draw(st.integers(0, 200), label="k"),
                                 transposed=data.draw(st.booleans(), label="transposed"))
    _hold_every_backend_to_the_reference(testing._linear_case(shape, dtype, seed, DEVICE))


@given(data=st.data(), dtype=DTYPES, seed=SEEDS, format=st.sampled_from(sorted(FORMATS)))
def test_quantized_linear_matches_the_reference(data, dtype, seed, format):
    # K whole blocks of the format; rows past the C++ kernel's 16 (its dequantizing path) too
    block = FORMATS[format].block_size
    leading = tuple(data.draw(st.lists(st.integers(0, 20), min_size=1, max_size=2), label="leading"))
    shape = testing._LinearShape(leading, data.draw(st.integers(1, 80), label="n"),
                                 block * data.draw(st.integers(1, 512 // block + 1), label="blocks"),
                                 transposed=data.draw(st.booleans(), label="transposed"), format=format)
    _hold_every_backend_to_the_reference(testing._linear_case(shape, dtype, seed, DEVICE))


@st.composite
def _per_row_or_scalar(draw, values, batch):
    """A scalar from ``values``, or a tuple of them (a per-row tensor)."""
    if draw(st.booleans()):
        return draw(st.sampled_from(values))
    return tuple(draw(st.lists(st.sampled_from(values), min_size=batch, max_size=batch)))


@st.composite
def _sampling_shape(draw, op, min_batch=0):
    batch, vocab = draw(st.integers(min_batch, 4)), draw(st.integers(1, 3000))
    params = dict(
        temperature=draw(_per_row_or_scalar([0.0, 1e-4, 0.3, 1.0, 1e4], batch)),
        top_k=draw(_per_row_or_scalar([0, 1, 2, 7, vocab, vocab + 3], batch)),
        top_p=draw(_per_row_or_scalar([1.0, 0.999, 0.9, 0.5, 1e-6], batch)),
        min_p=draw(_per_row_or_scalar([0.0, 0.05, 0.5, 0.999], batch)),
    )
    if draw(st.booleans()):
        params["allowed"] = "mixed"  # a grammar's token bitmask: testing.random_allowed
    if op == "sample":
        params["seed"] = draw(st.one_of(st.integers(0, 2**62), st.just("per-row")))
        params["step"] = draw(st.integers(0, 2**40))
        if draw(st.booleans()):
            params["return_logprobs"] = True
            params["num_logprobs"] = draw(st.integers(0, min(vocab, 5)))
    return testing._SamplingShape(batch, vocab, params, ties=draw(st.booleans()))


def _with_removed_tokens(case: testing.Case, removed: str, seed: int) -> testing.Case:
    """``case`` with logits set to -inf (tokens an earlier step removed): none; "some" (each
    token with probability 1/2, one token of every row kept finite); or "all but one" (one
    finite logit a row). The token kept finite is one the case's ``allowed`` bitmask allows."""
    if removed == "none":
        return case

    def make_kwargs():
        kwargs = case.make_kwargs()
        logits = kwargs["logits"]
        generator = torch.Generator().manual_seed(seed)
        batch, vocab = logits.shape
        survivor = torch.randint(0, vocab, (batch,), generator=generator)
        if kwargs.get("allowed") is not None and batch:
            allows = reference.unpack_allowed(kwargs["allowed"].cpu(), vocab).float()
            survivor = torch.multinomial(allows, 1, generator=generator)[:, 0]
        gone = torch.ones(batch, vocab, dtype=torch.bool) if removed == "all but one" \
            else torch.rand(batch, vocab, generator=generator) < 0.5
        gone[torch.arange(batch), survivor] = False
        kwargs["logits"] = logits.masked_fill(gone.to(logits.device), float("-inf"))
        return kwargs

    return testing.Case(case.op, f"{case.name} -inf:{removed}", make_kwargs)


@pytest.mark.parametrize("op", ["filter_logits", "sample"])
@given(data=st.data(), dtype=DTYPES, seed=SEEDS)
def test_sampling_matches_the_reference(op, data, dtype, seed):
    shape = data.draw(_sampling_shape(op), label="shape")
    removed = data.draw(st.sampled_from(["none", "none", "some", "all but one"]), label="-inf logits")
    case = _with_removed_tokens(testing._sampling_case(op, shape, dtype, seed, DEVICE), removed, seed)
    case = _with_layouts(case, _draw_layouts(data, ("logits",)))
    _hold_every_backend_to_the_reference(case)


# Failures the search has found, kept as plain cases.
REGRESSIONS = [
    # Triton's top log-probabilities were x - (m + log mass): at temperature 1e-4 the sum rounds
    # at x's scale (~4e4), 2e-4 off the reference's log_softmax.
    testing._sampling_case("sample", testing._SamplingShape(
        2, 4, dict(temperature=0.0001, top_k=(0, 0), top_p=(1.0, 1.0), min_p=0.0, seed="per-row", step=0,
                   return_logprobs=True, num_logprobs=1), ties=True), torch.float32, 0, DEVICE),
    # 198 tokens tied at the top and top_p 0.5: 99 of them reach p exactly, and whether the
    # 100th is kept is fp32 rounding's choice (the reference's cumulative sum keeps it, Triton's
    # count of ties does not). The check accepts either for a token on the top-p boundary.
    *(testing._sampling_case(op, testing._SamplingShape(
        1, 1729, dict(temperature=(0.0001,), top_k=(0,), top_p=(0.5,), min_p=(0.0,)) | extra, ties=True),
        torch.float32, 1_700_496_716, DEVICE)
      for op, extra in (("sample", dict(seed=0, step=0, return_logprobs=True, num_logprobs=0)), ("filter_logits", {}))),
    # An empty v with every other element: torch calls an empty tensor contiguous, so the cpu
    # backend passed it on with stride 2 along head_dim, and its kernel refused the call.
    _with_layouts(testing._attention_case(testing._AttentionShape((0,), (0,), 1, 1, 8, packed=True),
                                          torch.float32, 0, DEVICE), {"v": ("every other", None)}),
]


@pytest.mark.parametrize("case", REGRESSIONS, ids=lambda case: f"{case.op} {case.name}")
def test_regressions_the_search_found(case):
    _hold_every_backend_to_the_reference(case)


# Invalid calls: a valid call drawn as above, then one thing made wrong. Every backend that
# runs here refuses it with ValueError or TypeError before writing anything: the caches and a
# caller's out= buffer keep their bits.

def _refused_untouched(op: str, kwargs, written) -> None:
    for impl in _backends(op):
        before = [testing._bits(t).clone() for t in written]
        with pytest.raises((ValueError, TypeError)):
            getattr(fmkernels, op)(**kwargs, backend=impl.name)
        for tensor, bits in zip(written, before):
            assert torch.equal(testing._bits(tensor), bits), f"{impl.name} wrote before refusing"


@given(data=st.data(), head_dim=HEAD_DIMS, seed=SEEDS)
def test_invalid_cache_positions_are_refused_before_writing(data, head_dim, seed):
    batch = data.draw(st.integers(1, 4), label="batch")
    n_new = data.draw(st.integers(1, 3), label="n_new")
    lengths = tuple(data.draw(st.lists(st.integers(n_new, 40), min_size=batch, max_size=batch), label="lengths"))
    block_size = data.draw(st.sampled_from([None, 4, 16]), label="block_size")
    shape = testing._DecodeShape(lengths, n_new, 4, 2, head_dim, block_size)
    kwargs = testing._decode_case(shape, torch.float32, seed, DEVICE).make_kwargs()
    row = data.draw(st.integers(0, batch - 1), label="row")
    capacity = (kwargs["k_cache"].shape[1] if block_size is None
                else block_size * kwargs["block_table"].shape[1])
    wrong = data.draw(st.sampled_from(["past capacity", "negative", "block outside the pool"]
                                      if block_size else ["past capacity", "negative"]), label="wrong")
    seqlens = kwargs["cache_seqlens"].clone()
    table = kwargs["block_table"]
    if wrong == "past capacity":
        seqlens[row] = capacity + data.draw(st.integers(1, 5), label="excess")
    elif wrong == "negative":
        seqlens[row] = -data.draw(st.integers(1, 5), label="below")
    else:
        # The block of the row's last position: decode reads it and the append writes it.
        table = table.clone()
        table[row, (lengths[row] - 1) // block_size] = \
            data.draw(st.sampled_from([-1, kwargs["k_cache"].shape[0], 10**6]), label="entry")
    out = torch.full_like(kwargs["q"], 7.0)
    _refused_untouched("decode_attention", dict(q=kwargs["q"], k_cache=kwargs["k_cache"], v_cache=kwargs["v_cache"],
                                                cache_seqlens=seqlens, block_table=table, out=out), [out])
    new = torch.ones(batch, n_new, 2, head_dim, device=DEVICE)
    append = dict(k_cache=kwargs["k_cache"], v_cache=kwargs["v_cache"], k=new, v=new,
                  cache_seqlens=seqlens - n_new, block_table=table)
    _refused_untouched("append_kv", append, [kwargs["k_cache"], kwargs["v_cache"]])


@given(data=st.data(), dtype=DTYPES, seed=SEEDS)
def test_invalid_sampling_values_are_refused_before_writing(data, dtype, seed):
    shape = data.draw(_sampling_shape("sample", min_batch=1), label="shape")
    kwargs = testing._sampling_case("sample", shape, dtype, seed, DEVICE).make_kwargs()
    logits = kwargs["logits"].clone()
    row = data.draw(st.integers(0, shape.batch - 1), label="row")
    wrong = data.draw(st.sampled_from(["nan", "+inf", "all -inf", "temperature", "top_p", "min_p"]), label="wrong")
    if wrong in ("nan", "+inf"):
        logits[row, data.draw(st.integers(0, shape.vocab - 1), label="col")] = float(wrong)
    elif wrong == "all -inf":
        logits[row] = float("-inf")
    else:
        bad = {"temperature": -1e-3, "top_p": 0.0, "min_p": 1.5}[wrong]
        rows = torch.tensor([0.5 if wrong != "temperature" else 1.0] * shape.batch, device=DEVICE)
        rows[row] = bad
        kwargs[wrong] = rows
    kwargs["logits"] = logits
    for op in ("filter_logits", "sample"):
        call = {key: value for key, value in kwargs.items()
                if op == "sample" or key in ("logits", "temperature", "top_k", "top_p", "min_p")}
        if op == "sample" and call.get("return_logprobs"):
            call.pop("num_logprobs", None)
            call.pop("return_logprobs")
        out = (torch.full((shape.batch,), -7, dtype=torch.int64, device=DEVICE) if op == "sample"
               else torch.full_like(logits, 7.0))
        _refused_untouched(op, dict(call, out=out), [out])
