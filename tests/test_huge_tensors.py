"""KV caches of more than 2^31 elements: an offset computed in 32 bits wraps past 2^31 and reads
or writes the wrong place (or far outside the cache). decode_attention and append_kv on every
backend that runs here (the Triton interpreter wraps 32-bit products as a GPU does) on bf16
caches of more than 2^31 elements, the last sequence at the far end: a contiguous cache whose
row stride itself passes 2^31, one of 3 rows of 2^30 + 1024 elements (row index x row stride
passes 2^31), and a paged pool of 2^20 + 8 blocks (block id x block stride passes 2^31). The
reference runs on small slices holding the same values.

The caches come from torch.empty, and only the slots the calls use are written: the memory they
take is the pages touched (tens of MB), not their size (4 to 8 GiB each).
"""

import pytest
import torch

import fmkernels
from fmkernels import reference, registry, testing

HEAD_DIM = 128
KV_HEADS = 1
Q_HEADS = 4
DTYPE = torch.bfloat16
CAPACITY = 64  # the positions of the slices the reference runs on: every row's first ones


def _backends(op: str):
    return [impl.name for impl in registry.implementations(op)
            if impl.kind == "backend" and testing.skip_reason(impl, "cpu") is None]


def _empty(shape, dtype=DTYPE, device="cpu"):
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, torch.OutOfMemoryError) as error:  # the OS (or the GPU) refused the memory
        pytest.skip(f"cannot reserve a {shape} {dtype} tensor on {device} here: {error}")


def _contiguous(batch, max_seqlen, device="cpu"):
    """(k_cache, v_cache, None, cache_seqlens): every row's positions [0, CAPACITY) written; the
    first and last sequences 37 and 23 tokens long, any between 5."""
    k_cache, v_cache = (_empty((batch, max_seqlen, KV_HEADS, HEAD_DIM), device=device) for _ in "kv")
    assert k_cache.numel() > 2**31 and k_cache.stride(0) * (batch - 1) >= 2**31
    generator = torch.Generator().manual_seed(0)
    for cache in (k_cache, v_cache):
        cache[:, :CAPACITY] = torch.randn((batch, CAPACITY, KV_HEADS, HEAD_DIM), generator=generator).to(device, DTYPE)
    return k_cache, v_cache, None, _lengths(batch, device)


def _lengths(batch, device):
    return torch.tensor([37] + [5] * (batch - 2) + [23], dtype=torch.int32, device=device)


def _paged_caches(device="cpu"):
    """(k_cache, v_cache, block_table, cache_seqlens): a pool of 2^20 + 8 blocks of 16 (2^31 + 2^14 elements).
    Sequence 0's blocks are at the pool's start, sequence 1's among its last ones, out of order."""
    block_size = 16
    num_blocks = 2**31 // (block_size * KV_HEADS * HEAD_DIM) + 8
    k_cache, v_cache = (_empty((num_blocks, block_size, KV_HEADS, HEAD_DIM), device=device) for _ in "kv")
    assert k_cache.numel() > 2**31
    blocks = CAPACITY // block_size
    far = [num_blocks - 1 - 2 * i for i in range(blocks)]  # the last of them past 2^31 elements
    block_table = torch.tensor([list(range(blocks)), far], dtype=torch.int32, device=device)
    generator = torch.Generator().manual_seed(0)
    for cache in (k_cache, v_cache):
        cache[block_table.flatten().long()] = torch.randn(
            (2 * blocks, block_size, KV_HEADS, HEAD_DIM), generator=generator).to(device, DTYPE)
    return k_cache, v_cache, block_table, _lengths(2, device)


def _slices(k_cache, v_cache, block_table, batch):
    """The same sequences as a small contiguous cache (batch, CAPACITY, heads, head_dim)."""
    if block_table is None:
        return [cache[:, :CAPACITY].clone() for cache in (k_cache, v_cache)]
    return [torch.stack([reference.gather_cache(cache, b, CAPACITY, block_table) for b in range(batch)])
            for cache in (k_cache, v_cache)]


CACHES = {
    "contiguous, row stride past 2^31": lambda device: _contiguous(2, 2**24 + 8, device),
    "contiguous, row index x row stride past 2^31": lambda device: _contiguous(3, 2**23 + 8, device),
    "paged": _paged_caches,
}


@pytest.fixture(scope="module", params=list(CACHES))
def caches(request):
    made = CACHES[request.param]("cpu")
    yield made
    del made


@pytest.mark.parametrize("n_new", [1, 3])
@pytest.mark.parametrize("backend", _backends("decode_attention"))
def test_decode_attention_reads_the_far_end(caches, backend, n_new):
    _check_decode_attention_at_the_far_end(caches, backend, n_new)


def _check_decode_attention_at_the_far_end(caches, backend, n_new):
    k_cache, v_cache, block_table, cache_seqlens = caches
    batch = len(cache_seqlens)
    q = torch.randn((batch, n_new, Q_HEADS, HEAD_DIM), generator=torch.Generator().manual_seed(1))
    q = q.to(k_cache.device, DTYPE)
    out, lse = fmkernels.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table=block_table,
                                          return_lse=True, backend=backend)
    k_small, v_small = _slices(k_cache, v_cache, block_table, batch)
    expected, expected_lse = reference.decode_attention(q.double(), k_small.double(), v_small.double(),
                                                        cache_seqlens, return_lse=True)
    # bf16 inputs, fp32 accumulation: the output rounds to bf16 (2^-8 relative).
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("backend", _backends("append_kv"))
def test_append_kv_writes_the_far_end(caches, backend):
    _check_append_kv_at_the_far_end(caches, backend)


def _check_append_kv_at_the_far_end(caches, backend):
    k_cache, v_cache, block_table, cache_seqlens = caches
    batch, n_new = len(cache_seqlens), 5
    generator = torch.Generator().manual_seed(2)
    k, v = (torch.randn((batch, n_new, KV_HEADS, HEAD_DIM), generator=generator).to(k_cache.device, DTYPE)
            for _ in "kv")
    k_small, v_small = _slices(k_cache, v_cache, block_table, batch)
    reference.append_kv(k_small, v_small, k, v, cache_seqlens)
    fmkernels.append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table=block_table, backend=backend)
    k_after, v_after = _slices(k_cache, v_cache, block_table, batch)
    assert torch.equal(k_after, k_small) and torch.equal(v_after, v_small)


# Rows far apart: views of 80 rows, 2^25 + 64 elements apart, of a buffer of more than 2^31
# elements (only the rows are written). Every stride fits in 32 bits; the offset of row 64 on
# does not.
ROWS, ROW_STRIDE, SMALL_DIM = 80, 2**25 + 64, 16


def _far_apart_rows(dtype=torch.float16, fill=None):
    """A (1, ROWS, 1, SMALL_DIM) view with its rows ROW_STRIDE elements apart."""
    buffer = _empty((ROWS * ROW_STRIDE,), dtype)
    view = buffer.as_strided((1, ROWS, 1, SMALL_DIM), (ROWS * ROW_STRIDE, ROW_STRIDE, SMALL_DIM, 1))
    assert (ROWS - 1) * ROW_STRIDE > 2**31 > ROW_STRIDE
    if fill is None:
        view.copy_(torch.randn(view.shape, generator=torch.Generator().manual_seed(3)).to(dtype))
    else:
        view.fill_(fill)
    return view


@pytest.mark.parametrize("backend", _backends("attention"))
def test_attention_rows_far_apart(backend):
    q = _far_apart_rows()
    out = _far_apart_rows(fill=float("nan"))
    generator = torch.Generator().manual_seed(4)
    k, v = (torch.randn((1, ROWS, 1, SMALL_DIM), generator=generator).half() for _ in "kv")
    try:
        fmkernels.attention(q, k, v, causal=True, out=out, backend=backend)
    except ValueError as error:  # a backend that cannot run fp16 here says so
        assert "cannot run" in str(error)
        pytest.skip(str(error))
    expected = reference.attention(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", _backends("decode_attention"))
def test_decode_attention_rows_far_apart(backend):
    q = _far_apart_rows()
    out = _far_apart_rows(fill=float("nan"))
    generator = torch.Generator().manual_seed(5)
    k_cache, v_cache = (torch.randn((1, 128, 1, SMALL_DIM), generator=generator).half() for _ in "kv")
    cache_seqlens = torch.tensor([100], dtype=torch.int32)
    fmkernels.decode_attention(q, k_cache, v_cache, cache_seqlens, out=out, backend=backend)
    expected = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(), cache_seqlens)
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", _backends("append_kv"))
def test_append_kv_rows_far_apart(backend):
    k, v = _far_apart_rows(), _far_apart_rows()
    k_cache, v_cache = (torch.full((1, 128, 1, SMALL_DIM), float("nan"), dtype=torch.float16) for _ in "kv")
    fmkernels.append_kv(k_cache, v_cache, k, v, torch.tensor([5], dtype=torch.int32), backend=backend)
    assert torch.equal(k_cache[:, 5:5 + ROWS], k) and torch.equal(v_cache[:, 5:5 + ROWS], v)
    assert k_cache[:, :5].isnan().all() and k_cache[:, 5 + ROWS:].isnan().all()


# On a GPU: the same caches in device memory (4 to 8 GiB each, allocated for real), for the
# cuda and triton kernels, whose offsets csrc/cuda and kernels/ compute in 64 bits.
@pytest.mark.gpu
@pytest.mark.parametrize("cache_kind", list(CACHES))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_decode_attention_and_append_kv_at_the_far_end(cache_kind, backend):
    caches = CACHES[cache_kind]("cuda")
    try:
        for n_new in (1, 3):
            _check_decode_attention_at_the_far_end(caches, backend, n_new)
        _check_append_kv_at_the_far_end(caches, backend)
    finally:
        del caches
        torch.cuda.empty_cache()
