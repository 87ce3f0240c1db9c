"""The Hopper Triton attention kernel (backend="triton_hopper", kernels/attention_hopper.py)
against the float64 reference, its refusals, and "auto" never picking it.

Tolerance (DESIGN.md): error <= 2 x plain PyTorch's error in the same dtype + 1e-5, for the
output and the log-sum-exp. Outputs are poisoned with NaN before each call; inputs are random
and sizes odd on purpose.

Without a GPU the kernel runs on CPU tensors through the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), at small shapes and one fixed configuration (32 x 16 tiles). The
interpreter runs device-side tensor descriptors (``tl.make_tensor_descriptor``) as masked
loads and stores over the descriptor's shape, with TMA's alignment checks, so it tests the
math, the masks, the per-sequence descriptor bounds (zero fill past a sequence on load,
dropped rows on store), GQA, varlen and the log-sum-exp, in float32, float16 and bfloat16
(loaded as bfloat16, computed in fp32). ``tl.range(..., warp_specialize=True)`` is a plain
loop there, ``num_warps``, ``num_stages`` and ``maxnreg`` mean nothing, and no TMA copy,
descriptor scratch allocation (``triton.set_allocator``) or autotuning happens. Left for a GPU
(the tests marked ``gpu``, on compute capability 9.x or 10.x): that every configuration in
``GPU_CONFIGS`` compiles on the installed Triton (warp-specialised ones included) and gives
the same answers, the device descriptors built at launch, full-size shapes in bfloat16 and
float16, and the autotuner's reuse of a tuned configuration.
"""

import functools
import math
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fmkernels
from _attention_checks import (check_attention, cu_seqlens, dense_shape_id, random_dense, random_packed, randn,
                              run_attention)
from fmkernels import platform, reference, registry, testing
from fmkernels.kernels import attention_hopper

pytestmark = pytest.mark.skipif(
    platform.unavailable_reason("triton") is not None, reason=str(platform.unavailable_reason("triton"))
)

BACKEND = "triton_hopper"
DEVICE = "cpu" if platform.triton_interpreting() else "cuda"
# On a GPU the kernel takes float16 and bfloat16 only; float32 runs under the interpreter.
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]


def _hopper_or_newer():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in attention_hopper.GPU_CONFIGS


needs_hopper = pytest.mark.skipif(
    not platform.triton_interpreting() and not _hopper_or_newer(),
    reason="the triton_hopper kernel runs on compute capability 9.x and 10.x (or under the interpreter)",
)


_randn = functools.partial(randn, device=DEVICE)
_cu_seqlens = functools.partial(cu_seqlens, device=DEVICE)
_dense = functools.partial(random_dense, device=DEVICE)
_packed = functools.partial(random_packed, device=DEVICE)
_shape_id = dense_shape_id


def _check(q, k, v, **kwargs):
    return check_attention(BACKEND, q, k, v, **kwargs)


# (batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, causal)
DENSE_SHAPES = [
    (1, 1, 1, 1, 1, 64, True),
    (2, 17, 17, 4, 1, 64, True),  # GQA 4
    (1, 113, 113, 8, 1, 128, True),  # GQA 8
    (1, 17, 113, 2, 2, 128, True),  # Sq < Sk: chunked prefill
    (2, 113, 17, 2, 2, 128, True),  # Sq > Sk: the first 96 queries see no key
    (1, 17, 40, 4, 4, 64, False),
    (1, 33, 17, 4, 2, 64, False),
    (1, 1, 113, 8, 1, 128, True),  # one query against many keys
]


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=_shape_id)
def test_dense_matches_reference(shape, dtype):
    torch.manual_seed(hash(shape) % 2**31)
    q, k, v = _dense(shape, dtype)
    causal = shape[6]
    out, lse = _check(q, k, v, causal=causal)
    Sq, Sk = shape[1], shape[2]
    if causal and Sq > Sk:
        hidden = Sq - Sk  # queries i < Sq - Sk see no key
        assert torch.all(out[:, :hidden] == 0)
        assert torch.all(torch.isneginf(lse[:, :, :hidden]))


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_and_no_lse(dtype):
    """A given scale, a negative one (the running maximum must not assume scale > 0), and no lse."""
    torch.manual_seed(7)
    q, k, v = _dense((2, 40, 50, 4, 2, 64), dtype)
    _check(q, k, v, causal=True, scale=0.3)
    _check(q, k, v, causal=False, scale=-0.2)
    out = fmkernels.attention(q, k, v, causal=False, scale=0.05, backend=BACKEND, out=torch.full_like(q, float("nan")))
    truth = reference.attention(q.double(), k.double(), v.double(), scale=0.05)
    plain = testing.plain_attention(q, k, v, scale=0.05)
    assert testing.max_error(out, truth) <= testing.attention_tolerance(plain, truth)


@needs_hopper
def test_empty_inputs():
    """No queries: nothing to launch. No keys: every output 0, every log-sum-exp -inf."""
    q, k, v = _dense((2, 0, 5, 2, 1, 64), torch.float16)
    out, lse = run_attention(BACKEND, q, k, v, causal=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    q, k, v = _dense((2, 3, 0, 2, 1, 64), torch.float16)
    out, lse = run_attention(BACKEND, q, k, v)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


# Per-sequence (seqlen_q, seqlen_k): empty sequences, queries seeing nothing, lengths either side
# of the interpreter's 16-key and 32-query tiles.
VARLEN = [
    [(17, 17), (0, 0), (1, 113), (113, 40), (32, 33)],
    [(0, 5), (3, 0), (33, 32), (1, 1)],
]


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("lengths", VARLEN, ids=["mixed", "empty"])
@pytest.mark.parametrize("heads", [(2, 2), (8, 1)], ids=["mha", "gqa8"])
def test_packed_matches_reference(lengths, heads, causal, dtype):
    torch.manual_seed(3)
    q, k, v, cu_q, cu_k = _packed(lengths, heads, 64, dtype)
    out, lse = _check(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert lse.shape == (heads[0], q.shape[0])


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES[-2:], ids=str)
def test_non_contiguous_inputs(dtype):
    """q, k, v as slices of a fused qkv projection, and as transposes of (B, H, S, D): strides
    of 16-byte multiples, which a descriptor takes."""
    torch.manual_seed(4)
    B, S, Hq, Hkv, D = 2, 40, 8, 2, 64
    qkv = _randn(B, S, Hq + 2 * Hkv, D, dtype=dtype)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv], qkv[:, :, Hq + Hkv :]
    assert not q.is_contiguous()
    _check(q, k, v, causal=True)
    q_t = _randn(B, Hq, S, D, dtype=dtype).transpose(1, 2)
    kv_t = _randn(2, B, Hkv, 70, D, dtype=dtype).transpose(2, 3)
    _check(q_t, kv_t[0], kv_t[1], causal=True)
    packed = qkv.reshape(B * S, Hq + 2 * Hkv, D)
    cu = torch.tensor([0, 23, B * S], dtype=torch.int32, device=DEVICE)
    _check(packed[:, :Hq], packed[:, Hq : Hq + Hkv], packed[:, Hq + Hkv :], causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)


def _cut_from_nan(*shape, dtype):
    """Random values of ``shape`` (..., tokens, heads, head_dim) inside a NaN buffer with
    19 more tokens, one more head and head_dim 128."""
    *lead, tokens, heads, head_dim = shape
    buffer = torch.full((*lead, tokens + 19, heads + 1, 128), float("nan"), dtype=dtype, device=DEVICE)
    inside = buffer[..., :tokens, :heads, :head_dim]
    inside.copy_(_randn(*shape, dtype=dtype))
    return inside


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES[-2:], ids=str)
def test_reads_nothing_past_a_sequence(dtype):
    """Inputs cut from NaN-filled buffers: past the last key, past head_dim, past each head,
    and, packed, the next sequence's rows right after each one's.

    A NaN read anywhere would reach the output (0 x NaN is NaN), so passing shows that each
    descriptor ends at its sequence's end and its head_dim.
    """
    torch.manual_seed(5)
    B, Sq, Sk, Hq, Hkv, D = 2, 37, 45, 4, 2, 64
    q, k, v = _cut_from_nan(B, Sq, Hq, D, dtype=dtype), _cut_from_nan(B, Sk, Hkv, D, dtype=dtype), _cut_from_nan(B, Sk, Hkv, D, dtype=dtype)
    _check(q, k, v, causal=True)
    _check(q, k, v, causal=False)
    lengths_q, lengths_k = [37, 1, 20], [45, 30, 3]
    q = _cut_from_nan(sum(lengths_q), Hq, D, dtype=dtype)
    k, v = _cut_from_nan(sum(lengths_k), Hkv, D, dtype=dtype), _cut_from_nan(sum(lengths_k), Hkv, D, dtype=dtype)
    for causal in (True, False):
        _check(q, k, v, causal=causal, cu_seqlens_q=_cu_seqlens(lengths_q), cu_seqlens_k=_cu_seqlens(lengths_k))


@needs_hopper
def test_writes_nothing_past_a_sequence(monkeypatch):
    """The output descriptor ends at the sequence's end: a 17-row sequence's 32-row (or larger)
    tile leaves the rows after it as they were (here NaN), where a descriptor over all packed
    rows would overwrite them. (Called on the launcher, below the op's checks, so that rows
    past the last sequence exist.)"""
    monkeypatch.setattr(attention_hopper, "_empty_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    torch.manual_seed(11)
    q, k, v = (_randn(40, 2, 64, dtype=torch.float16) for _ in "qkv")
    cu = _cu_seqlens([17])
    out, lse = attention_hopper.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True)
    assert out[17:].isnan().all()
    expected = reference.attention(q[:17].double(), k[:17].double(), v[:17].double(), causal=True,
                                   cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert not out[:17].isnan().any()
    torch.testing.assert_close(out[:17].double(), expected, atol=2e-3, rtol=2e-3)


def _gpu_tile_shapes():
    return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for configs in attention_hopper.GPU_CONFIGS.values()
                   for c in configs})


@pytest.mark.skipif(not platform.triton_interpreting(), reason="the interpreter runs one fixed configuration")
@pytest.mark.parametrize("blocks", _gpu_tile_shapes(), ids=lambda b: f"m{b[0]}-n{b[1]}")
def test_every_gpu_tile_shape(monkeypatch, blocks):
    """Each (BLOCK_M, BLOCK_N) the GPU autotuner may pick gives the same answers (masks, causal
    split, descriptor bounds), the key loop warp-specialised or not."""
    torch.manual_seed(6)
    for warp_specialize in (True, False):
        monkeypatch.setattr(attention_hopper, "INTERPRETER_CONFIG",
                            {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "WARP_SPECIALIZE": warp_specialize})
        q, k, v = _dense((1, 150, 200, 2, 1, 64), torch.float16)
        _check(q, k, v, causal=True)
        q, k, v, cu_q, cu_k = _packed([(130, 200), (1, 70), (150, 20), (0, 3)], (2, 1), 128, torch.float16)
        _check(q, k, v, causal=not warp_specialize, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


# ----------------------------------------------------------------------------
# Configurations per architecture
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("major", sorted(attention_hopper.GPU_CONFIGS))
def test_autotune_prunes_to_fitting_configs(major):
    """Every (head_dim, dtype, causal) keeps a candidate, none past the shared-memory and (Hopper)
    register budgets; Hopper warp-specialises only without the causal mask, as the tutorial does,
    and Blackwell's register caps follow the tutorial's."""
    configs = attention_hopper.GPU_CONFIGS[major]
    for head_dim in attention_hopper.HEAD_DIMS:
        for dtype in (torch.float16, torch.bfloat16):
            for causal in (True, False):
                kept = attention_hopper._fitting_configs(configs, major, head_dim, dtype, causal)
                assert kept, (head_dim, dtype, causal)
                for config in kept:
                    shared, per_thread = attention_hopper._footprint(config, head_dim, dtype.itemsize)
                    assert shared <= attention_hopper._SHARED_MEMORY_BUDGET
                    if major == 9:
                        assert per_thread <= attention_hopper._ACC_PER_THREAD
                        assert not (causal and config.kwargs["WARP_SPECIALIZE"])
                    elif config.maxnreg is not None:
                        assert config.maxnreg == (168 if (head_dim, dtype) == (128, torch.float16) else 80)
                if not (major == 9 and causal):
                    assert any(config.kwargs["WARP_SPECIALIZE"] for config in kept), (head_dim, dtype, causal)


def test_a_failing_candidate_loses_the_autotune(monkeypatch):
    """A candidate the installed Triton cannot compile gets an infinite time (and a warning)."""
    monkeypatch.setattr(attention_hopper, "do_bench", lambda kernel_call, quantiles: kernel_call())

    def fails():
        raise RuntimeError("PassManager::run failed")

    with pytest.warns(RuntimeWarning, match="PassManager::run failed"):
        assert attention_hopper._bench_or_lose(fails, (0.5, 0.2, 0.8)) == [math.inf] * 3


# ----------------------------------------------------------------------------
# Refusals, with their reasons
# ----------------------------------------------------------------------------


def _fake_cuda(*shapes, dtype=torch.bfloat16):
    """Tensors that say they are on a GPU, without one (their data pointers read 0: aligned)."""
    with FakeTensorMode():
        return [torch.empty(shape, dtype=dtype, device="cuda") for shape in shapes]


def _supports(q, k, v, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fake tensor's data pointer warns
        return attention_hopper.attention_supports(q=q, k=k, v=v, **kwargs)


@pytest.mark.parametrize("capability, accepted", [((8, 0), False), ((8, 9), False), ((9, 0), True),
                                                  ((10, 0), True), ((12, 0), False)])
def test_supports_only_hopper_and_blackwell(monkeypatch, capability, accepted):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    q, k, v = _fake_cuda((2, 64, 8, 128), (2, 64, 2, 128), (2, 64, 2, 128))
    reason = _supports(q, k, v, causal=True)
    if accepted:
        assert reason is None
    else:
        assert f"compute capability {capability[0]}.{capability[1]}" in reason and "backend='triton'" in reason


def test_supports_refuses_float32_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q, k, v = _fake_cuda((1, 16, 2, 64), (1, 16, 2, 64), (1, 16, 2, 64), dtype=torch.float32)
    assert "dtype torch.float32 on a GPU" in _supports(q, k, v)


@pytest.mark.parametrize("head_dim", [32, 96, 256])
def test_supports_refuses_other_head_dims(head_dim):
    q, k, v = (torch.zeros(1, 4, 2, head_dim, dtype=torch.float16) for _ in "qkv")
    assert f"head_dim {head_dim}: the triton_hopper attention kernel takes head_dim 64 or 128" in _supports(q, k, v)


def test_supports_refuses_layouts_tma_cannot_take():
    aligned = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    assert _supports(aligned, aligned, aligned) is None
    # head_dim not unit-stride
    wide = torch.zeros(1, 8, 2, 128, dtype=torch.float16)[..., ::2]
    assert "q.stride(-1) is 2" in _supports(wide, aligned, aligned)
    # rows 68 elements (136 bytes) apart
    padded = torch.zeros(1, 8, 1, 68, dtype=torch.float16)[..., :64]
    assert "k.stride(1) is 68 elements (136 bytes)" in _supports(aligned, padded, padded)
    # a data pointer 2 bytes past a 16-byte boundary
    shifted = torch.zeros(1 * 8 * 2 * 64 + 1, dtype=torch.float16)[1:].view(1, 8, 2, 64)
    assert "v's data pointer is not 16-byte aligned" in _supports(aligned, aligned, shifted)
    # packed rows of heads 2 x 68 elements apart
    packed = torch.zeros(10, 2, 68, dtype=torch.float16)[..., :64]
    assert "stride(1) is 68 elements" in _supports(packed, packed, packed)


@needs_hopper
def test_the_op_names_the_reason_when_named():
    q = torch.zeros(1, 8, 2, 128, dtype=torch.float16, device=DEVICE)[..., ::2]
    with pytest.raises(ValueError, match="backend 'triton_hopper' cannot run this attention call: q.stride"):
        fmkernels.attention(q, q, q, backend=BACKEND)


# ----------------------------------------------------------------------------
# "auto" never picks it
# ----------------------------------------------------------------------------


@pytest.mark.usefixtures("restore_registry")
def test_auto_never_picks_it_on_this_machine():
    impl = registry.get_impl("attention", BACKEND)
    assert impl.kind == "backend" and impl.named_only
    q, k, v = _dense((1, 17, 17, 2, 1, 64), torch.float16)
    case = dict(q=q, k=k, v=v, causal=True)
    if platform.triton_interpreting() or _hopper_or_newer():
        assert impl.unsupported_reason(case) is None  # it could run this case when named
    assert registry.select("attention", "auto", case).name != BACKEND
    fmkernels.attention(q, k, v, causal=True)  # and auto runs something else


@pytest.mark.usefixtures("restore_registry")
def test_auto_never_picks_it_on_a_hopper_gpu(monkeypatch):
    """With a faked capability-9.0 GPU, on which it is available and supports the case, and at
    the top priority: auto still passes it over, and would not without ``named_only``."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q, k, v = _fake_cuda((1, 4096, 16, 128), (1, 4096, 4, 128), (1, 4096, 4, 128))
    case = dict(q=q, k=k, v=v, causal=True)
    impl = registry.get_impl("attention", BACKEND)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fake tensors' data pointers warn
        assert impl.unsupported_reason(case) is None
        assert registry.select("attention", "auto", case).name != BACKEND
        top = dict(available=impl.available, devices=impl.devices, kind="backend", priority=10**9, replace=True)
        registry.register_impl("attention", BACKEND, impl.fn, impl.supports, named_only=impl.named_only, **top)
        assert registry.select("attention", "auto", case).name != BACKEND
        registry.register_impl("attention", BACKEND, impl.fn, impl.supports, **top)
        assert registry.select("attention", "auto", case).name == BACKEND


@pytest.mark.usefixtures("restore_registry")
def test_auto_with_no_backend_able_says_it_runs_only_when_named():
    for impl in registry.implementations("attention"):
        if impl.name != BACKEND:
            registry.unregister_impl("attention", impl.name)
    q, k, v = _dense((1, 4, 4, 1, 1, 64), torch.float16)
    with pytest.raises(ValueError, match="triton_hopper: runs only when named \\(not yet run on a GPU"):
        fmkernels.attention(q, k, v)


# ----------------------------------------------------------------------------
# Full size, on a GPU
# ----------------------------------------------------------------------------

GPU_DENSE_SHAPES = [
    (2, 1000, 1000, 32, 8, 128, True),
    (1, 4096, 4096, 16, 2, 128, True),  # GQA 8
    (1, 8192, 8192, 16, 16, 128, False),
    (1, 4096, 4096, 8, 8, 64, False),
    (2, 113, 4096, 16, 4, 128, True),  # chunked prefill
    (2, 4096, 1000, 8, 1, 64, True),  # the first 3096 queries see no key
    (1, 1, 4096, 32, 8, 128, True),
    (1, 2048, 2048, 8, 2, 64, True),
]

gpu_hopper = pytest.mark.skipif(not _hopper_or_newer(), reason="needs a GPU of compute capability 9.x or 10.x")


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_DENSE_SHAPES, ids=_shape_id)
def test_gpu_dense_matches_reference(shape, dtype):
    torch.manual_seed(hash(shape) % 2**31)
    q, k, v = _dense(shape, dtype, device="cuda")
    out, lse = _check(q, k, v, causal=shape[6])
    if shape[6] and shape[1] > shape[2]:
        hidden = shape[1] - shape[2]
        assert torch.all(out[:, :hidden] == 0)
        assert torch.all(torch.isneginf(lse[:, :, :hidden]))


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gpu_packed_matches_reference(causal, dtype):
    torch.manual_seed(8)
    lengths = [(1000, 1000), (1, 4096), (0, 0), (4096, 2000), (17, 113), (3000, 17)]
    q, k, v, cu_q, cu_k = _packed(lengths, (32, 4), 128, dtype, device="cuda")
    out, lse = _check(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert lse.shape == (32, q.shape[0])


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_non_contiguous_inputs(dtype):
    torch.manual_seed(9)
    B, S, Hq, Hkv, D = 2, 2048, 32, 8, 128
    qkv = _randn(B, S, Hq + 2 * Hkv, D, dtype=dtype, device="cuda")
    _check(qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv], qkv[:, :, Hq + Hkv :], causal=True)
    q_t = _randn(B, Hq, S, D, dtype=dtype, device="cuda").transpose(1, 2)
    kv_t = _randn(2, B, Hkv, 3000, D, dtype=dtype, device="cuda").transpose(2, 3)
    _check(q_t, kv_t[0], kv_t[1], causal=True)


def _every_config():
    """(major, index) of every GPU candidate, for one test each."""
    return [(major, index) for major, configs in sorted(attention_hopper.GPU_CONFIGS.items())
            for index in range(len(configs))]


@pytest.fixture
def one_config(monkeypatch):
    """Pins the autotuner of an architecture to one candidate (so it compiles and runs that
    one, and raises what it raises); the tuners are rebuilt after the test."""

    def pin(major, config):
        monkeypatch.setitem(attention_hopper.GPU_CONFIGS, major, [config])
        attention_hopper._autotuned.cache_clear()

    yield pin
    attention_hopper._autotuned.cache_clear()


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("major, index", _every_config(), ids=lambda v: str(v))
def test_gpu_every_config_compiles_and_matches(one_config, major, index):
    """Each candidate compiles on this Triton (warp-specialised ones included) and holds to the
    reference, in every case the autotuner may pick it for: a failure names the configuration."""
    if torch.cuda.get_device_capability()[0] != major:
        pytest.skip(f"a configuration for compute capability {major}.x")
    table = attention_hopper.GPU_CONFIGS[major]
    config = table[index]
    cases = [(head_dim, causal) for head_dim in attention_hopper.HEAD_DIMS for causal in (False, True)
             if config in attention_hopper._fitting_configs(table, major, head_dim, torch.bfloat16, causal)]
    if not cases:
        pytest.skip(f"{config} is pruned for every case")
    one_config(major, config)
    torch.manual_seed(index)
    for head_dim, causal in cases:
        q, k, v = _dense((2, 1041, 1041, 8, 2, head_dim), torch.bfloat16, device="cuda")
        _check(q, k, v, causal=causal)


@pytest.mark.gpu
@gpu_hopper
def test_gpu_second_call_reuses_the_tuned_config():
    """The autotuner keys on (head_dim, causal, varlen, seqlen buckets, dtypes): same bucket, no new tuning."""
    torch.manual_seed(10)
    q, k, v = _dense((1, 1000, 1000, 8, 2, 128), torch.bfloat16, device="cuda")
    fmkernels.attention(q, k, v, causal=True, backend=BACKEND)
    tuner = attention_hopper._autotuned(torch.cuda.get_device_capability()[0])
    tuned = len(tuner.cache)
    q, k, v = _dense((1, 900, 900, 8, 2, 128), torch.bfloat16, device="cuda")
    _check(q, k, v, causal=True)
    assert len(tuner.cache) == tuned


@pytest.mark.gpu
@gpu_hopper
def test_gpu_leaves_the_callers_allocator_alone():
    """The descriptors' scratch comes from the kernel's own allocator, set in a copy of the
    caller's context: an allocator the caller set stays set, and is not asked."""
    import triton
    from triton.runtime import _allocation

    asked = []

    def callers(size, alignment, stream):
        asked.append(size)
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(callers)
    try:
        q, k, v = _dense((1, 300, 300, 4, 2, 64), torch.bfloat16, device="cuda")
        _check(q, k, v, causal=False)
        assert _allocation._allocator.get() is callers and asked == []
    finally:
        triton.set_allocator(_allocation.NullAllocator())
