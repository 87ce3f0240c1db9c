"""fmkernels.compat against the APIs it imitates: torch SDPA itself, and flash-attn's documented
semantics computed here from explicit masks (flash-attn does not install without a GPU); and
against the fmkernels ops it wraps."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import fmkernels
from fmkernels import platform, testing
from _attention_checks import bottom_right_mask
from _attention_checks import masked_attention as shared_masked_attention
from fmkernels.compat import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    scaled_dot_product_attention,
)

BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(
        platform.unavailable_reason("cpu") is not None, reason=str(platform.unavailable_reason("cpu")))),
]
TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not platform.triton_interpreting(),
    reason="needs triton and TRITON_INTERPRET=1"))
HEAD_DIM = 24


bottom_right = bottom_right_mask  # flash-attn's causal mask is fmkernels' own


def top_left(seqlen_q, seqlen_k):
    """torch SDPA's is_causal mask: query i sees keys j <= i."""
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril()


def masked_attention(q, k, v, visible, scale=None):
    """q (Sq, H, D), k/v (Sk, Hk, D), visible (Sq, Sk) -> out (Sq, H, D), lse (H, Sq) in q's dtype,
    with flash-attn's conventions where a query sees no key: zeros and a log-sum-exp of +inf."""
    out, lse = shared_masked_attention(q, k, v, visible, scale)
    return out, lse.masked_fill(torch.isneginf(lse), math.inf)


def assert_within_tolerance(actual, sequences):
    """``actual`` (out, lse) against masked_attention per sequence, with DESIGN.md's tolerance:
    ``sequences`` lists (q, k, v, visible) and the results are concatenated along (tokens, heads).
    An lse of None is not checked (SDPA returns none)."""
    for index, name in ((0, "out"), (1, "lse")):
        if actual[index] is None:
            continue
        dim = 0 if index == 0 else 1
        truth = torch.cat([masked_attention(q.double(), k.double(), v.double(), m)[index]
                           for q, k, v, m in sequences], dim=dim)
        plain = torch.cat([masked_attention(q, k, v, m)[index] for q, k, v, m in sequences], dim=dim)
        expected_dtype = sequences[0][0].dtype if index == 0 else torch.float32
        assert actual[index].dtype == expected_dtype and actual[index].shape == truth.shape, name
        error = testing.max_error(actual[index], truth)
        assert error <= testing.attention_tolerance(plain, truth), f"{name}: error {error}"


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# ----------------------------------------------------------------------------
# flash_attn_func and flash_attn_varlen_func
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(17, 17), (5, 23), (23, 5)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_matches_flash_attn_semantics_and_attention(backend, seqlen_q, seqlen_k, causal):
    torch.manual_seed(seqlen_q * 100 + seqlen_k)
    q, k, v = randn(2, seqlen_q, 6, HEAD_DIM), randn(2, seqlen_k, 2, HEAD_DIM), randn(2, seqlen_k, 2, HEAD_DIM)
    out, lse, probs = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True, backend=backend)

    visible = bottom_right(seqlen_q, seqlen_k) if causal else torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    per_batch = [masked_attention(q[b].double(), k[b].double(), v[b].double(), visible) for b in range(2)]
    assert_within_tolerance((out.flatten(0, 1), lse.transpose(0, 1).flatten(1)),
                            [(q[b], k[b], v[b], visible) for b in range(2)])
    assert torch.isinf(lse).sum() == sum(torch.isinf(lse_b).sum() for _, lse_b in per_batch)
    assert probs.numel() == 0 and probs.dtype == q.dtype

    wrapped, wrapped_lse = fmkernels.attention(q, k, v, causal=causal, return_lse=True, backend=backend)
    assert torch.equal(out, wrapped)
    assert torch.equal(lse, wrapped_lse.masked_fill(torch.isneginf(wrapped_lse), math.inf))
    assert torch.equal(flash_attn_func(q, k, v, 0.0, None, causal, backend=backend), wrapped)


@pytest.mark.parametrize("backend", BACKENDS + [TRITON])
def test_flash_attn_func_low_precision(backend):
    torch.manual_seed(1)
    q, k, v = (randn(1, s, 4, HEAD_DIM, dtype=torch.float16) for s in (9, 13, 13))
    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, return_attn_probs=True, backend=backend)
    truth = masked_attention(q[0].double(), k[0].double(), v[0].double(), bottom_right(9, 13), scale=0.3)
    plain = masked_attention(q[0], k[0], v[0], bottom_right(9, 13), scale=0.3)
    for actual, t, p in ((out[0], truth[0], plain[0]), (lse[0], truth[1], plain[1])):
        assert testing.max_error(actual, t) <= testing.attention_tolerance(p, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_varlen_func(backend, causal):
    torch.manual_seed(2)
    lengths_q, lengths_k = [1, 17, 5, 0], [1, 30, 2, 4]  # 5 > 2: causal leaves queries seeing no key
    cu_q = torch.tensor([0] + lengths_q, dtype=torch.int32).cumsum(0).int()
    cu_k = torch.tensor([0] + lengths_k, dtype=torch.int32).cumsum(0).int()
    q, k, v = randn(sum(lengths_q), 4, HEAD_DIM), randn(sum(lengths_k), 1, HEAD_DIM), randn(sum(lengths_k), 1, HEAD_DIM)

    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k) + 3,
                                         causal=causal, return_attn_probs=True, backend=backend)
    sequences = []
    for b, (sq, sk) in enumerate(zip(lengths_q, lengths_k)):
        visible = bottom_right(sq, sk) if causal else torch.ones(sq, sk, dtype=torch.bool)
        sequences.append((q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]], visible))
    assert_within_tolerance((out, lse), sequences)
    assert bool(torch.isposinf(lse).any()) == causal

    wrapped = fmkernels.attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
    assert torch.equal(out, wrapped)
    assert torch.equal(flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 30, 0.0, None, causal, backend=backend), out)


def test_flash_attn_varlen_func_checks_max_seqlen():
    cu_q = torch.tensor([0, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6], dtype=torch.int32)
    q, k = randn(10, 2, 8), randn(6, 2, 8)
    longest_q = r"max_seqlen_q must be at least the longest sequence in cu_seqlens_q \(7\), got 6"
    with pytest.raises(ValueError, match=longest_q):
        flash_attn_varlen_func(q, k, k, cu_q, cu_k, 6, 4)
    with pytest.raises(ValueError, match=r"max_seqlen_k .* \(4\), got 3"):
        flash_attn_varlen_func(q, k, k, cu_q, cu_k, 7, 3)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int, got Tensor"):
        flash_attn_varlen_func(q, k, k, cu_q, cu_k, 7, torch.tensor(4))


# ----------------------------------------------------------------------------
# scaled_dot_product_attention
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(7, 19), (19, 19), (19, 7), (1, 5)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("heads, kv_heads", [(3, 3), (6, 2)])
def test_sdpa_matches_torch(backend, seqlen_q, seqlen_k, is_causal, heads, kv_heads):
    torch.manual_seed(seqlen_q + 10 * seqlen_k + heads)
    query = randn(2, heads, seqlen_q, HEAD_DIM)
    key, value = randn(2, kv_heads, seqlen_k, HEAD_DIM), randn(2, kv_heads, seqlen_k, HEAD_DIM)
    gqa = heads != kv_heads
    out = scaled_dot_product_attention(query, key, value, is_causal=is_causal, enable_gqa=gqa, backend=backend)
    truth = F.scaled_dot_product_attention(query.double(), key.double(), value.double(),
                                           is_causal=is_causal, enable_gqa=gqa)
    plain = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, enable_gqa=gqa)
    assert out.shape == truth.shape and out.dtype == query.dtype
    assert testing.max_error(out, truth) <= testing.attention_tolerance(plain, truth)


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_unbatched_and_scale_match_torch(is_causal):
    torch.manual_seed(3)
    query, key, value = randn(4, 11, HEAD_DIM), randn(4, 6, HEAD_DIM), randn(4, 6, HEAD_DIM)
    out = scaled_dot_product_attention(query, key, value, None, 0.0, is_causal, 0.2, backend="cpu")
    truth = F.scaled_dot_product_attention(query.double(), key.double(), value.double(), is_causal=is_causal, scale=0.2)
    plain = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=0.2)
    assert out.shape == (4, 11, HEAD_DIM)
    assert testing.max_error(out, truth) <= testing.attention_tolerance(plain, truth)


def test_sdpa_gqa_needs_enable_gqa_as_torch_does():
    query, key = randn(1, 4, 5, 8), randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(query, key, key)
    with pytest.raises(ValueError, match="query has 4 heads and key 2: pass enable_gqa=True"):
        scaled_dot_product_attention(query, key, key)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        scaled_dot_product_attention(query, randn(1, 3, 5, 8), randn(1, 3, 5, 8), enable_gqa=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(33, 130), (130, 130), (130, 33)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_and_flash_attn_func_on_gpu(dtype, seqlen_q, seqlen_k, is_causal):
    torch.manual_seed(seqlen_q + seqlen_k)
    q = randn(2, seqlen_q, 8, 64, dtype=dtype).cuda()
    k, v = randn(2, seqlen_k, 2, 64, dtype=dtype).cuda(), randn(2, seqlen_k, 2, 64, dtype=dtype).cuda()
    sdpa = scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=is_causal,
                                        enable_gqa=True).transpose(1, 2)
    flash, lse, _ = flash_attn_func(q, k, v, causal=is_causal, return_attn_probs=True)
    everything = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    for actual, mask in ((sdpa, top_left(seqlen_q, seqlen_k)), (flash, bottom_right(seqlen_q, seqlen_k))):
        mask = (mask if is_causal else everything).cuda()
        sequences = [(q[b], k[b], v[b], mask) for b in range(2)]
        actual_lse = lse.transpose(0, 1).flatten(1) if actual is flash else None
        assert_within_tolerance((actual.flatten(0, 1), actual_lse), sequences)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(5, 23), (23, 5), (17, 17)])
def test_causal_conventions_differ_exactly_where_the_masks_do(seqlen_q, seqlen_k):
    """flash-attn's causal (bottom-right) and SDPA's is_causal (top-left) on the same inputs."""
    torch.manual_seed(4)
    q, k, v = randn(1, seqlen_q, 2, HEAD_DIM), randn(1, seqlen_k, 2, HEAD_DIM), randn(1, seqlen_k, 2, HEAD_DIM)
    flash = flash_attn_func(q, k, v, causal=True, backend="reference")[0]
    sdpa = scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                        backend="reference").transpose(1, 2)[0]
    same_rows = (bottom_right(seqlen_q, seqlen_k) == top_left(seqlen_q, seqlen_k)).all(dim=1)
    difference = (flash - sdpa).abs().amax(dim=(1, 2))
    assert bool(same_rows.all()) == (seqlen_q == seqlen_k)
    assert (difference[same_rows] <= 1e-6).all()
    assert (difference[~same_rows] > 1e-3).all()


# ----------------------------------------------------------------------------
# flash_attn_with_kvcache
# ----------------------------------------------------------------------------

BATCH, KV_HEADS, Q_HEADS, SEQLEN_CACHE, BLOCK = 3, 2, 4, 19, 5


def make_cache(layout, seed):
    """A cache of random history and NaN past each sequence's length (a read there would show),
    the lengths, and the table (paged) or row indices (cache_batch_idx) that address it."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [3, 0, 11]
    if layout == "paged":
        max_blocks = -(-SEQLEN_CACHE // BLOCK)
        pool = torch.randperm(BATCH * max_blocks + 2, generator=generator).int()
        table = pool[: BATCH * max_blocks].view(BATCH, max_blocks)
        shape = (pool.numel(), BLOCK, KV_HEADS, HEAD_DIM)
        slots = [[(int(table[b, p // BLOCK]), p % BLOCK) for p in range(max_blocks * BLOCK)] for b in range(BATCH)]
    else:
        rows = list(range(BATCH)) if layout == "contiguous" else [4, 0, 2]
        table = None if layout == "contiguous" else torch.tensor(rows, dtype=torch.int32)
        shape = (5 if table is not None else BATCH, SEQLEN_CACHE, KV_HEADS, HEAD_DIM)
        slots = [[(rows[b], p) for p in range(SEQLEN_CACHE)] for b in range(BATCH)]
    caches = []
    for _ in range(2):
        cache = torch.full(shape, math.nan)
        for b, length in enumerate(lengths):
            for p in range(length):
                cache[slots[b][p]] = torch.randn(KV_HEADS, HEAD_DIM, generator=generator)
        caches.append(cache)
    return caches, torch.tensor(lengths, dtype=torch.int32), table, slots


def layout_kwargs(layout, table):
    if layout == "paged":
        return dict(block_table=table)
    return dict(cache_batch_idx=table) if layout == "batch_idx" else {}


def check_kvcache_append_then_attend(backend, layout, seqlen_q, causal, device="cpu", dtype=torch.float32):
    """k, v land in the cache (and nothing else changes), cache_seqlens stays, and q attends to
    the appended cache under flash-attn's mask."""
    (k_cache, v_cache), cache_seqlens, table, slots = make_cache(layout, seed=seqlen_q + causal)
    torch.manual_seed(5)
    q = randn(BATCH, seqlen_q, Q_HEADS, HEAD_DIM, dtype=dtype)
    k_new, v_new = randn(BATCH, 4, KV_HEADS, HEAD_DIM, dtype=dtype), randn(BATCH, 4, KV_HEADS, HEAD_DIM, dtype=dtype)
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b, length in enumerate(cache_seqlens.tolist()):
        for i in range(4):
            expected_k[slots[b][length + i]] = k_new[b, i]
            expected_v[slots[b][length + i]] = v_new[b, i]
    on_device = [t.to(device) for t in (q, k_cache, v_cache, k_new, v_new, cache_seqlens)]
    q_d, k_cache_d, v_cache_d, k_new_d, v_new_d, seqlens_d = on_device
    table_d = None if table is None else table.to(device)

    out, lse = flash_attn_with_kvcache(q_d, k_cache_d, v_cache_d, k_new_d, v_new_d, cache_seqlens=seqlens_d,
                                       causal=causal, return_softmax_lse=True, backend=backend,
                                       **layout_kwargs(layout, table_d))

    torch.testing.assert_close(k_cache_d.cpu(), expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache_d.cpu(), expected_v, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(seqlens_d.cpu(), cache_seqlens)
    sequences = []
    for b, length in enumerate((cache_seqlens + 4).tolist()):
        keys = torch.stack([expected_k[slots[b][p]] for p in range(length)])
        values = torch.stack([expected_v[slots[b][p]] for p in range(length)])
        visible = bottom_right(seqlen_q, length) if causal else torch.ones(seqlen_q, length, dtype=torch.bool)
        sequences.append((q[b], keys, values, visible))
    assert_within_tolerance((out.cpu().flatten(0, 1), lse.cpu().transpose(0, 1).flatten(1)), sequences)


KVCACHE_CASES = pytest.mark.parametrize("seqlen_q, causal", [(1, False), (3, True), (3, False)])
LAYOUTS = pytest.mark.parametrize("layout", ["contiguous", "paged", "batch_idx"])


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
@KVCACHE_CASES
def test_flash_attn_with_kvcache_appends_then_attends(backend, layout, seqlen_q, causal):
    check_kvcache_append_then_attend(backend, layout, seqlen_q, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@LAYOUTS
@KVCACHE_CASES
def test_flash_attn_with_kvcache_on_gpu(dtype, layout, seqlen_q, causal):
    check_kvcache_append_then_attend("auto", layout, seqlen_q, causal, device="cuda", dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS + [TRITON])
def test_flash_attn_with_kvcache_is_append_kv_then_decode_attention(backend):
    (k_cache, v_cache), cache_seqlens, table, _ = make_cache("paged", seed=6)
    torch.manual_seed(6)
    q = randn(BATCH, 2, Q_HEADS, HEAD_DIM)
    k_new, v_new = randn(BATCH, 2, KV_HEADS, HEAD_DIM), randn(BATCH, 2, KV_HEADS, HEAD_DIM)
    k_ops, v_ops = k_cache.clone(), v_cache.clone()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                  block_table=table, causal=True, num_splits=3, backend=backend)
    fmkernels.append_kv(k_ops, v_ops, k_new, v_new, cache_seqlens, block_table=table, backend=backend)
    expected = fmkernels.decode_attention(q, k_ops, v_ops, cache_seqlens + 2, block_table=table, backend=backend)
    assert torch.equal(out, expected)
    torch.testing.assert_close(k_cache, k_ops, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_with_kvcache_int_and_absent_cache_seqlens(causal):
    torch.manual_seed(7)
    k_cache, v_cache = randn(2, 9, 1, HEAD_DIM), randn(2, 9, 1, HEAD_DIM)
    q = randn(2, 3, 2, HEAD_DIM)
    mask = bottom_right(3, 9) if causal else torch.ones(3, 9, dtype=torch.bool)
    whole = flash_attn_with_kvcache(q, k_cache, v_cache, causal=causal, return_softmax_lse=True, backend="cpu")
    assert_within_tolerance((whole[0].flatten(0, 1), whole[1].transpose(0, 1).flatten(1)),
                            [(q[b], k_cache[b], v_cache[b], mask) for b in range(2)])
    seven = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=7, causal=causal, return_softmax_lse=True,
                                    backend="cpu")
    mask = bottom_right(3, 7) if causal else torch.ones(3, 7, dtype=torch.bool)
    assert_within_tolerance((seven[0].flatten(0, 1), seven[1].transpose(0, 1).flatten(1)),
                            [(q[b], k_cache[b, :7], v_cache[b, :7], mask) for b in range(2)])


def test_flash_attn_with_kvcache_validates_before_writing():
    k_cache, v_cache = randn(2, 9, 1, 8), randn(2, 9, 1, 8)
    before = k_cache.clone()
    new = randn(2, 1, 1, 8)
    lengths = torch.tensor([2, 3], dtype=torch.int32)
    with pytest.raises(TypeError, match="k_cache must have the same dtype as q"):
        flash_attn_with_kvcache(randn(2, 1, 2, 8, dtype=torch.float16), k_cache, v_cache, new, new,
                                cache_seqlens=lengths)
    with pytest.raises(ValueError, match="sequence 0's cache must hold at least seqlen_q = 4 tokens"):
        flash_attn_with_kvcache(randn(2, 4, 2, 8), k_cache, v_cache, new, new, cache_seqlens=lengths, causal=True)
    assert torch.equal(k_cache, before)
    pool = randn(6, 2, 1, 8)
    pool_before = pool.clone()
    table = torch.tensor([[0, 1], [9, 2]], dtype=torch.int32)  # block 9, read but not written, is outside
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = 9 is outside the pool of 6 blocks"):
        flash_attn_with_kvcache(randn(2, 1, 2, 8), pool, pool.clone(), new, new, cache_seqlens=lengths,
                                block_table=table)
    assert torch.equal(pool, pool_before)


# ----------------------------------------------------------------------------
# Unsupported arguments and bad input
# ----------------------------------------------------------------------------

_Q, _K = randn(1, 4, 2, 8), randn(1, 4, 2, 8)
_CU = torch.tensor([0, 4], dtype=torch.int32)
_CACHE = randn(1, 8, 2, 8)
_SEQLENS = torch.tensor([2], dtype=torch.int32)


@pytest.mark.parametrize("call, message", [
    (lambda: flash_attn_func(_Q, _K, _K, dropout_p=0.1), "dropout_p=0.1"),
    (lambda: flash_attn_func(_Q, _K, _K, window_size=(4, 0)), r"window_size=\(4, 0\)"),
    (lambda: flash_attn_func(_Q, _K, _K, softcap=30.0), "softcap=30.0"),
    (lambda: flash_attn_func(_Q, _K, _K, alibi_slopes=torch.ones(2)), r"alibi_slopes=a float32 tensor of shape \(2,\)"),
    (lambda: flash_attn_varlen_func(_Q[0], _K[0], _K[0], _CU, _CU, 4, 4, block_table=_SEQLENS[None]), "block_table="),
    (lambda: flash_attn_varlen_func(_Q[0], _K[0], _K[0], _CU, _CU, 4, 4, dropout_p=0.5), "dropout_p=0.5"),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, rotary_cos=torch.ones(8, 4)), "rotary_cos="),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, rotary_sin=torch.ones(8, 4)), "rotary_sin="),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, cache_leftpad=_SEQLENS), "cache_leftpad="),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, window_size=(-1, 2)), r"window_size=\(-1, 2\)"),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, softcap=5.0), "softcap=5.0"),
    (lambda: scaled_dot_product_attention(_Q, _K, _K, attn_mask=torch.ones(4, 4, dtype=torch.bool)), "attn_mask="),
    (lambda: scaled_dot_product_attention(_Q, _K, _K, dropout_p=0.2), "dropout_p=0.2"),
])
def test_unsupported_arguments_raise_naming_them(call, message):
    with pytest.raises(ValueError, match="fmkernels does not support " + message):
        call()


@pytest.mark.parametrize("call, error, message", [
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, _K, None, cache_seqlens=_SEQLENS), ValueError,
     "k and v must be given together"),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, _K[:, :1], _K[:, :1]), ValueError,
     "cache_seqlens must be given with k and v"),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, cache_seqlens=2.0), TypeError,
     "cache_seqlens must be an int, a torch.Tensor or None, got float"),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, cache_seqlens=torch.tensor([-1], dtype=torch.int32)),
     ValueError, r"cache_seqlens\[0\] must be >= 0, got -1"),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, num_splits=-1), ValueError, "num_splits must be >= 0"),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, cache_batch_idx=torch.tensor([1], dtype=torch.int32)),
     ValueError, r"cache_batch_idx\[0\] = 1 is outside the cache's 1 rows"),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, cache_batch_idx=_SEQLENS, block_table=_SEQLENS[None]),
     ValueError, "cache_batch_idx picks rows of a contiguous cache"),
    (lambda: flash_attn_with_kvcache(_Q, randn(2, 8, 2, 8), randn(2, 8, 2, 8)), ValueError,
     "must have q's batch 1 unless cache_batch_idx"),
    (lambda: flash_attn_with_kvcache(_Q, _CACHE, _CACHE, cache_seqlens=0), ValueError,
     "sequence 0's cache must hold at least one token"),
    (lambda: flash_attn_func(_Q, _K, _K, deterministic=1), TypeError, "deterministic must be a bool"),
    (lambda: flash_attn_func(_Q, _K, _K, window_size=3), TypeError, "window_size must be a pair"),
    (lambda: scaled_dot_product_attention(_Q[0, 0], _K[0, 0], _K[0, 0]), ValueError,
     r"query must be \(batch, heads, seqlen, head_dim\) or unbatched"),
    (lambda: scaled_dot_product_attention(_Q, _K[0], _K[0]), ValueError, "key must be 4-D"),
    (lambda: scaled_dot_product_attention(_Q, _K, _K[:, :1]), ValueError, "value must have key's 4 heads"),
    (lambda: scaled_dot_product_attention(_Q, _K, _K, is_causal=None), TypeError, "is_causal must be a bool"),
    (lambda: scaled_dot_product_attention(_Q.double(), _K, _K), TypeError,
     "query must have dtype float32, float16 or bfloat16, got float64"),
    (lambda: flash_attn_func(_Q, _K, _K, dropout_p="0"), TypeError, "dropout_p must be a float, got str"),
])
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()
