"""append_kv backends against the reference: a copy, so equality is exact, and every position
the reference leaves alone must keep its poison (the caches start as random values)."""

import importlib.util

import pytest
import torch

import fmkernels
from fmkernels import platform, reference
from fmkernels._views import tensor_view

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BATCH = 4
CONTIGUOUS_MAX_SEQLEN = 13

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _cpu_tensor_backends():
    # On CPU tensors Triton runs only through its interpreter (tests/conftest.py sets it without a GPU).
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(
            platform.unavailable_reason("cpu") is not None, reason=str(platform.unavailable_reason("cpu")))),
        pytest.param("triton", marks=pytest.mark.skipif(
            not (HAS_TRITON and platform.triton_interpreting()), reason="needs triton and TRITON_INTERPRET=1")),
    ]


def make_case(*, n_new, kv_heads, head_dim, dtype, paged, block_size=7, seed=0, device="cpu"):
    """Caches full of random poison, new k/v, and mixed lengths: an empty sequence, one whose new
    tokens end exactly at capacity, two in between. A paged table scatters each sequence over a
    shuffled pool and holds junk past the blocks a sequence uses."""
    torch.manual_seed(seed)
    if paged:
        max_blocks = -(-CONTIGUOUS_MAX_SEQLEN // block_size) + 1
        capacity = max_blocks * block_size
        num_blocks = BATCH * max_blocks + 3
        rows, slots = num_blocks, block_size
    else:
        capacity = CONTIGUOUS_MAX_SEQLEN
        rows, slots = BATCH, CONTIGUOUS_MAX_SEQLEN
    seqlens = [0, capacity - n_new] + torch.randint(0, capacity - n_new + 1, (BATCH - 2,)).tolist()
    case = dict(
        k_cache=torch.randn(rows, slots, kv_heads, head_dim).to(dtype),
        v_cache=torch.randn(rows, slots, kv_heads, head_dim).to(dtype),
        k=torch.randn(BATCH, n_new, kv_heads, head_dim).to(dtype),
        v=torch.randn(BATCH, n_new, kv_heads, head_dim).to(dtype),
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
        block_table=None,
    )
    if paged:
        table = torch.randperm(num_blocks)[: BATCH * max_blocks].reshape(BATCH, max_blocks).int()
        for b, start in enumerate(seqlens):
            last_used = (start + n_new - 1) // block_size
            table[b, last_used + 1:] = torch.tensor([-1, num_blocks + 5])[torch.arange(max_blocks - last_used - 1) % 2]
        case["block_table"] = table
    return {name: None if t is None else t.to(device) for name, t in case.items()}


def expected_caches(case):
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    reference.append_kv(k_cache, v_cache, case["k"], case["v"], case["cache_seqlens"], block_table=case["block_table"])
    assert not torch.equal(k_cache, case["k_cache"]), "the reference wrote nothing: the case tests nothing"
    return k_cache, v_cache


def call(case, backend):
    fmkernels.append_kv(case["k_cache"], case["v_cache"], case["k"], case["v"], case["cache_seqlens"],
                        block_table=case["block_table"], backend=backend)


SIZES = [  # kv_heads, head_dim, block_size, n_new
    (1, 24, 1, 5),
    (3, 64, 7, 1),
    (3, 128, 16, 5),
    (1, 128, 7, 5),
    (3, 24, 16, 1),
]


@pytest.mark.parametrize("backend", _cpu_tensor_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("kv_heads, head_dim, block_size, n_new", SIZES)
def test_matches_reference(backend, dtype, paged, kv_heads, head_dim, block_size, n_new):
    case = make_case(n_new=n_new, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, paged=paged,
                     block_size=block_size, seed=kv_heads * 1000 + head_dim + block_size + n_new)
    expected_k, expected_v = expected_caches(case)
    call(case, backend)
    assert torch.equal(case["k_cache"], expected_k)
    assert torch.equal(case["v_cache"], expected_v)


# Strided layouts. Each variant stores some tensors inside a larger buffer; the whole buffer is
# compared, so the elements between the view's elements must stay untouched too.

def _spread_last_dim(t):
    """t's values at every other element of a buffer of twice its size: (view, buffer)."""
    filler = torch.randn_like(t, dtype=torch.float32).to(t.dtype) if t.is_floating_point() else torch.full_like(t, -5)
    buffer = torch.stack([t, filler], dim=-1)
    return buffer[..., 0], buffer


def _transpose_layout(t):
    """t's values with dims 1 and 2 swapped in memory: (view, buffer)."""
    buffer = t.transpose(1, 2).contiguous()
    return buffer.transpose(1, 2), buffer


def _offset_by_one_element(t):
    """t's values one element into a buffer, so rows miss 16-byte alignment: (view, buffer)."""
    buffer = torch.randn(t.numel() + 1).to(t.dtype) if t.is_floating_point() else torch.full((t.numel() + 1,), -5)
    buffer = buffer.to(t.device)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    return view, buffer


VARIANTS = {
    "k_v_transposed": {"k": _transpose_layout, "v": _transpose_layout},
    "k_v_last_dim_strided": {"k": _spread_last_dim, "v": _spread_last_dim},
    "cache_last_dim_strided": {"k_cache": _spread_last_dim, "v_cache": _spread_last_dim},
    # The two caches with different strides: a kernel must not index v_cache with k_cache's strides.
    "v_cache_unlike_k_cache": {"v_cache": _transpose_layout},
    "index_tensors_strided": {"cache_seqlens": _spread_last_dim, "block_table": _spread_last_dim},
    "fused_kv_buffer": "fused",
    # Misaligned rows: a vectorised copy must fall back to elements.
    "caches_misaligned": {"k_cache": _offset_by_one_element, "v_cache": _offset_by_one_element},
    "k_v_misaligned": {"k": _offset_by_one_element, "v": _offset_by_one_element},
}


def restride(case, variant):
    """The case with the variant's layouts, and the buffer that holds each cache."""
    case = dict(case)
    buffers = {"k_cache": case["k_cache"], "v_cache": case["v_cache"]}
    layout = VARIANTS[variant]
    if layout == "fused":
        # One (rows, slots, 2, kv_heads, head_dim) buffer, as engines that fuse the KV projection keep it.
        fused = torch.stack([case["k_cache"], case["v_cache"]], dim=2)
        case["k_cache"], case["v_cache"] = fused[:, :, 0], fused[:, :, 1]
        return case, {"k_cache": fused, "v_cache": fused}
    for name, change in layout.items():
        if case[name] is not None:
            case[name], buffer = change(case[name])
            if name in buffers:
                buffers[name] = buffer
    return case, buffers


def check_strided(case, variant, backend):
    case, buffers = restride(case, variant)
    assert any(not t.is_contiguous() or t.storage_offset() for t in case.values() if t is not None)
    # The reference writes through views of the same shape and strides into copies of the buffers.
    copies = {id(buffer): buffer.clone() for buffer in buffers.values()}
    views = {name: copies[id(buffer)].as_strided(case[name].shape, case[name].stride(), case[name].storage_offset())
             for name, buffer in buffers.items()}
    reference.append_kv(views["k_cache"], views["v_cache"], case["k"], case["v"], case["cache_seqlens"],
                        block_table=case["block_table"])
    assert not torch.equal(views["k_cache"], case["k_cache"]), "the reference wrote nothing"
    call(case, backend)
    for name, buffer in buffers.items():
        assert torch.equal(buffer, copies[id(buffer)]), name


@pytest.mark.parametrize("backend", _cpu_tensor_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_strided_layouts_match_reference(backend, dtype, paged, variant):
    case = make_case(n_new=5, kv_heads=3, head_dim=24, dtype=dtype, paged=paged, seed=11)
    check_strided(case, variant, backend)


# The compiled modules called directly, past the ops layer's checks: they must check the views
# themselves, raise ValueError and write nothing, whatever they are given. (_cuda leaves positions
# to its kernel, which skips those outside the cache: see the launcher tests below.)

def _views(case):
    return [tensor_view(case[name]) for name in ("k_cache", "v_cache", "k", "v", "cache_seqlens", "block_table")]


def _small_case(paged):
    return make_case(n_new=3, kv_heads=2, head_dim=8, dtype=torch.float32, paged=paged, block_size=4, seed=3)


def _replace(name, make):
    """A change to a case: replace one tensor with make(case)."""
    return lambda case: {**case, name: make(case)}


SHAPE_ERRORS = [  # checked before any data is read, by _C and _cuda alike
    pytest.param(False, _replace("k_cache", lambda c: c["k_cache"][0]), "must be 4-D", id="cache-3d"),
    pytest.param(False, _replace("v_cache", lambda c: c["v_cache"][:, :-1]), "k_cache and v_cache shapes differ",
                 id="v_cache-shape"),
    pytest.param(False, _replace("v", lambda c: c["v"][:, :-1]), "k and v shapes differ", id="v-shape"),
    pytest.param(False, lambda c: {**c, "k": c["k"][:, :, :1], "v": c["v"][:, :, :1]},
                 r"\(kv_heads, head_dim\) differ", id="kv_heads"),
    pytest.param(False, lambda c: {**c, "k": c["k"][..., :4], "v": c["v"][..., :4]},
                 r"\(kv_heads, head_dim\) differ", id="head_dim"),
    pytest.param(False, lambda c: {**c, "k_cache": c["k_cache"][:-1], "v_cache": c["v_cache"][:-1]},
                 "batch must equal k's batch", id="contiguous-batch"),
    pytest.param(False, lambda c: {**c, "k_cache": c["k_cache"][:, :0], "v_cache": c["v_cache"][:, :0]},
                 "at least one position", id="no-positions"),
    pytest.param(False, lambda c: {**c, "k": c["k"].half(), "v": c["v"].half()}, "share one dtype",
                 id="dtype-mismatch"),
    pytest.param(False, lambda c: {n: t.int() if n != "block_table" and t is not None else t for n, t in c.items()},
                 "float32, float16 or bfloat16", id="int-cache"),
    pytest.param(False, _replace("cache_seqlens", lambda c: c["cache_seqlens"].long()), "cache_seqlens must be int32",
                 id="seqlens-int64"),
    pytest.param(False, _replace("cache_seqlens", lambda c: c["cache_seqlens"][:-1]),
                 "cache_seqlens must be int32 of shape", id="seqlens-length"),
    pytest.param(True, _replace("block_table", lambda c: c["block_table"].long()), "block_table must be int32",
                 id="table-int64"),
    pytest.param(True, _replace("block_table", lambda c: c["block_table"][:-1]), "block_table must be int32 of shape",
                 id="table-rows"),
    pytest.param(True, _replace("block_table", lambda c: c["block_table"][0]), "block_table must be int32 of shape",
                 id="table-1d"),
]


def _positions(seqlens, bad_block=None):
    """A change to a paged or contiguous case: these lengths, every block valid but bad_block = (b, j, id)."""
    def change(case):
        case = {**case, "cache_seqlens": torch.tensor(seqlens, dtype=torch.int32)}
        if case["block_table"] is not None:
            table = torch.arange(case["block_table"].numel(), dtype=torch.int32).reshape(case["block_table"].shape)
            if bad_block is not None:
                b, j, block = bad_block
                table[b, j] = case["k_cache"].shape[0] if block == "pool" else block
            case["block_table"] = table
        return case
    return change


# Sequence 0 is always valid, so a kernel that writes before checking every sequence is caught.
# The small case holds 13 positions contiguous, or 5 blocks of 4 (20 positions) paged.
POSITION_ERRORS = [
    pytest.param(False, _positions([0, 11, 3, 1]), "exceeds the cache capacity", id="contiguous-past-capacity"),
    pytest.param(False, _positions([0, 2, -1, 1]), "exceeds the cache capacity", id="contiguous-negative"),
    pytest.param(True, _positions([0, 1, 2, 18]), "exceeds the cache capacity", id="paged-past-capacity"),
    pytest.param(True, _positions([0, 1, -3, 1]), "exceeds the cache capacity", id="paged-negative"),
    pytest.param(True, _positions([0, 1, 2, 3], bad_block=(3, 1, -1)), "block id outside the pool",
                 id="block-negative"),
    pytest.param(True, _positions([0, 9, 2, 3], bad_block=(1, 2, "pool")), "block id outside the pool",
                 id="block-past-pool"),
]

BAD_DESCRIPTIONS = [  # (index of the argument, description, match)
    pytest.param(2, lambda view: view[:3], r"k: expected \(data_ptr, dtype, sizes, strides\)", id="three-items"),
    pytest.param(0, lambda view: (view[0], 9, view[2], view[3]), "k_cache: unknown dtype code 9", id="dtype-code"),
    pytest.param(4, lambda view: (view[0], view[1], (-4,), view[3]), "cache_seqlens: negative size",
                 id="negative-size"),
    pytest.param(3, lambda view: (view[0], view[1], view[2] + (1,), view[3] + (1,)),
                 "v: sizes and strides must have one rank <= 4", id="rank-5"),
    pytest.param(1, lambda view: (view[0], view[1], view[2], view[3][:-1]),
                 "v_cache: sizes and strides must have one rank <= 4", id="strides-length"),
]

COMPILED_MODULES = [
    pytest.param("_C", id="cpu", marks=pytest.mark.skipif(
        platform.cpu_module() is None, reason="fmkernels._C not built")),
    pytest.param("_cuda", id="cuda", marks=pytest.mark.skipif(
        platform.cuda_module() is None, reason="fmkernels._cuda not built")),
]


def _call_compiled(module_name, views):
    if module_name == "_C":
        platform.cpu_module().append_kv(*views)
    else:
        # The shape checks run on the host before anything touches the device, so CPU pointers are safe here.
        platform.cuda_module().append_kv(*views, 0)


def _assert_rejected(module_name, case, views, match):
    before = [case["k_cache"].clone(), case["v_cache"].clone()]
    with pytest.raises(ValueError, match=match):
        _call_compiled(module_name, views)
    assert torch.equal(case["k_cache"], before[0]) and torch.equal(case["v_cache"], before[1])


def test_cuda_supports_refuses_grids_and_counters_past_their_limits():
    """The cuda kernel's grid holds at most 65535 sequences, and its copy loop counts a token's
    elements in int: larger calls are refused before the launch, so ``auto`` passes them on."""
    from fmkernels.ops import _cuda

    def expanded(shape):
        return torch.zeros((1,) * len(shape), dtype=torch.float16).expand(shape)

    cache = expanded((4, 8, 1, 64))
    assert _cuda.append_kv_supports(k_cache=cache, v_cache=cache, k=expanded((65535, 1, 1, 64)), v=cache) is None
    reason = _cuda.append_kv_supports(k_cache=cache, v_cache=cache, k=expanded((65536, 1, 1, 64)), v=cache)
    assert "got batch 65536" in reason
    largest = _cuda.APPEND_KV_MAX_TOKEN_ELEMENTS
    assert _cuda.append_kv_supports(k_cache=cache, v_cache=cache, k=expanded((1, 1, 1, largest)), v=cache) is None
    reason = _cuda.append_kv_supports(k_cache=cache, v_cache=cache, k=expanded((1, 1, 1, largest + 1)), v=cache)
    assert f"got {largest + 1}" in reason


@pytest.mark.parametrize("module_name", COMPILED_MODULES)
@pytest.mark.parametrize("paged, change, match", SHAPE_ERRORS)
def test_compiled_module_rejects_inconsistent_shapes(module_name, paged, change, match):
    case = change(_small_case(paged))
    _assert_rejected(module_name, case, _views(case), match)


@pytest.mark.skipif(platform.cpu_module() is None, reason="fmkernels._C not built")
@pytest.mark.parametrize("paged, change, match", POSITION_ERRORS)
def test_cpu_module_rejects_positions_outside_the_cache(paged, change, match):
    case = change(_small_case(paged))
    _assert_rejected("_C", case, _views(case), match)


@pytest.mark.parametrize("module_name", COMPILED_MODULES)
@pytest.mark.parametrize("index, change, match", BAD_DESCRIPTIONS)
def test_compiled_module_rejects_malformed_views(module_name, index, change, match):
    case = _small_case(paged=False)
    views = _views(case)
    views[index] = change(views[index])
    _assert_rejected(module_name, case, views, match)


@pytest.mark.skipif(platform.cpu_module() is None, reason="fmkernels._C not built")
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_cpu_module_direct_call_matches_reference(paged):
    case = _small_case(paged)
    expected_k, expected_v = expected_caches(case)
    platform.cpu_module().append_kv(*_views(case))
    assert torch.equal(case["k_cache"], expected_k) and torch.equal(case["v_cache"], expected_v)


@pytest.mark.skipif(not (HAS_TRITON and platform.triton_interpreting()), reason="needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("paged, change, match", POSITION_ERRORS)
def test_triton_launcher_skips_positions_outside_the_cache(paged, change, match):
    from fmkernels.kernels.append_kv import append_kv as launch

    _check_launcher_skips(launch, change(_small_case(paged)))


def _check_launcher_skips(launch, case):
    """A launcher called past the ops layer's checks writes nothing outside the cache: it skips a
    sequence whose positions overflow the cache, and a position whose block is outside the pool."""
    k_cache, v_cache, table = case["k_cache"], case["v_cache"], case["block_table"]
    num_blocks, block_size = k_cache.shape[:2]
    capacity = block_size * (table.shape[1] if table is not None else 1)
    n_new = case["k"].shape[1]
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    written = skipped = 0
    for b, start in enumerate(case["cache_seqlens"].tolist()):
        for pos in range(start, start + n_new):
            row, slot = (b, pos) if table is None else (int(table[b, pos // block_size]) if 0 <= pos < capacity else -1,
                                                        pos % block_size)
            if start < 0 or start + n_new > capacity or not 0 <= row < num_blocks:
                skipped += 1
                continue
            expected_k[row, slot] = case["k"][b, pos - start]
            expected_v[row, slot] = case["v"][b, pos - start]
            written += 1
    assert written and skipped
    launch(k_cache, v_cache, case["k"], case["v"], case["cache_seqlens"], block_table=table)
    if k_cache.is_cuda:
        torch.cuda.synchronize()
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


# On a GPU: the cuda and triton backends on CUDA tensors.

def _gpu_backend(name):
    reason = platform.unavailable_reason(name)
    if reason:
        pytest.skip(f"{name}: {reason}")
    return name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("kv_heads, head_dim, block_size, n_new", SIZES)
def test_gpu_backends_match_reference(backend, dtype, paged, kv_heads, head_dim, block_size, n_new):
    _gpu_backend(backend)
    case = make_case(n_new=n_new, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, paged=paged,
                     block_size=block_size, seed=head_dim + n_new, device="cuda")
    expected_k, expected_v = expected_caches(case)
    call(case, backend)
    torch.cuda.synchronize()
    assert torch.equal(case["k_cache"], expected_k)
    assert torch.equal(case["v_cache"], expected_v)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_strided_layouts_match_reference(backend, paged, variant):
    _gpu_backend(backend)
    case = make_case(n_new=5, kv_heads=3, head_dim=24, dtype=torch.float16, paged=paged, seed=12, device="cuda")
    check_strided(case, variant, backend)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("paged, change, match", POSITION_ERRORS)
def test_gpu_launchers_skip_positions_outside_the_cache(backend, paged, change, match):
    _gpu_backend(backend)
    case = {n: None if t is None else t.cuda() for n, t in change(_small_case(paged)).items()}
    if backend == "triton":
        from fmkernels.kernels.append_kv import append_kv as launch
    else:
        def launch(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None):
            stream = torch.cuda.current_stream().cuda_stream
            platform.cuda_module().append_kv(*_views(dict(k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                                                          cache_seqlens=cache_seqlens, block_table=block_table)),
                                             stream)
    _check_launcher_skips(launch, case)
