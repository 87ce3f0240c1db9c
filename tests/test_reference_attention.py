"""reference.attention, decode_attention and append_kv against independent formulations.

The reference is the truth every backend is held to, so it is checked here against code
that shares nothing with it: an fp64 loop over (batch, head, query), torch SDPA with an
explicit bottom-right mask, and hand-placed cache writes. Sizes are odd on purpose.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fmkernels import reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _seeded(*key) -> torch.Generator:
    """A generator whose seed depends only on the test case, so each case is deterministic alone."""
    # Not hash(): str hashes are salted per process.
    return torch.Generator().manual_seed(sum((i + 1) * ord(c) for i, c in enumerate(repr(key))) % 2**31)


def _randn(generator, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(dtype)


def naive_attention(q, k, v, causal: bool, scale: float):
    """fp64 attention, one (batch, head, query) at a time: out (B, Sq, Hq, D), lse (B, Hq, Sq)."""
    batch, seqlen_q, q_heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(batch, seqlen_q, q_heads, head_dim, dtype=torch.float64)
    lse = torch.full((batch, q_heads, seqlen_q), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            keys, values = k[b, :, h // group], v[b, :, h // group]
            for i in range(seqlen_q):
                # Bottom-right causal: query i sees key j iff j <= i + Sk - Sq, i.e. keys [0, i + Sk - Sq].
                visible = min(seqlen_k, i + seqlen_k - seqlen_q + 1) if causal else seqlen_k
                if visible <= 0:
                    continue  # sees nothing: output 0, lse -inf
                scores = keys[:visible] @ q[b, i, h] * scale
                peak = scores.max()
                weights = torch.exp(scores - peak)
                total = weights.sum()
                lse[b, h, i] = peak + torch.log(total)
                out[b, i, h] = weights @ values[:visible] / total
    return out, lse


def bottom_right_mask(seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """Bool (Sq, Sk), True where attended: the lower triangle shifted right by Sk - Sq."""
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril(diagonal=seqlen_k - seqlen_q)


def plain_attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """What plain PyTorch gets in the input dtype (matmul and softmax in it): the tolerance yardstick."""
    group = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)  # [B, Hq, Sq, D]
    kt = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qt @ kt.transpose(-1, -2)) * scale  # [B, Hq, Sq, Sk], input dtype
    if causal:
        mask = bottom_right_mask(q.shape[1], k.shape[1])
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).masked_fill(~mask.any(dim=-1)[:, None], 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ vt).transpose(1, 2)


# (batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, causal, scale)
ATTENTION_CASES = {
    "sq17-sk17-d64-gqa1-causal": (2, 17, 17, 4, 4, 64, True, None),
    "sq1-sk113-d128-gqa4-causal": (2, 1, 113, 8, 2, 128, True, None),
    "sq17-sk113-d24-gqa8-causal": (1, 17, 113, 16, 2, 24, True, None),
    "sq113-sk17-d64-gqa4-causal-masked-rows": (2, 113, 17, 8, 2, 64, True, None),
    "sq17-sk1-d24-gqa1-causal-masked-rows": (3, 17, 1, 2, 2, 24, True, None),
    "sq17-sk113-d64-gqa1-full": (2, 17, 113, 2, 2, 64, False, None),
    "sq113-sk17-d128-gqa8-full-scale0.3": (1, 113, 17, 16, 2, 128, False, 0.3),
    "sq1000-sk1000-d64-gqa4-causal": (1, 1000, 1000, 4, 1, 64, True, None),
}


def _attention_inputs(case_id, dtype):
    batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, causal, scale = ATTENTION_CASES[case_id]
    g = _seeded(case_id, str(dtype))
    q = _randn(g, batch, seqlen_q, q_heads, head_dim, dtype=dtype)
    k = _randn(g, batch, seqlen_k, kv_heads, head_dim, dtype=dtype)
    v = _randn(g, batch, seqlen_k, kv_heads, head_dim, dtype=dtype)
    return q, k, v, causal, scale


def _attention_params():
    for case_id in ATTENTION_CASES:
        # The 1000 x 1000 case costs most of the loop's time: one dtype is enough for it.
        dtypes = ["bf16"] if case_id.startswith("sq1000") else list(DTYPES)
        for name in dtypes:
            yield pytest.param(case_id, DTYPES[name], id=f"{case_id}-{name}")


@pytest.mark.parametrize("case_id, dtype", list(_attention_params()))
def test_attention_matches_fp64_loop(case_id, dtype):
    q, k, v, causal, scale = _attention_inputs(case_id, dtype)
    effective_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    out, lse = reference.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    true_out, true_lse = naive_attention(q, k, v, causal, effective_scale)

    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    # The DESIGN.md rule: no worse than twice plain PyTorch's own error in this dtype.
    plain_err = (plain_attention(q, k, v, causal, effective_scale).double() - true_out).abs().max().item()
    ref_err = (out.double() - true_out).abs().max().item()
    assert ref_err <= 2 * plain_err + 1e-5, f"reference error {ref_err:.3g}, plain {dtype} error {plain_err:.3g}"

    blind = torch.isneginf(true_lse)
    assert torch.equal(torch.isneginf(lse), blind)
    assert torch.all(out.transpose(1, 2)[blind] == 0)
    # The reference computes in fp32 from the same (rounded) inputs, so its lse is fp32-accurate in every dtype.
    torch.testing.assert_close(lse.double()[~blind], true_lse[~blind], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case_id", [c for c in ATTENTION_CASES if not c.startswith("sq1000")])
def test_attention_matches_sdpa_with_bottom_right_mask(case_id):
    batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, causal, scale = ATTENTION_CASES[case_id]
    g = _seeded("sdpa", case_id)
    # Drawn in SDPA's (batch, heads, seqlen, head_dim) layout; fmkernels gets the transposed views,
    # strided unlike anything the other tests pass.
    q_sdpa = _randn(g, batch, q_heads, seqlen_q, head_dim)
    k_sdpa = _randn(g, batch, kv_heads, seqlen_k, head_dim)
    v_sdpa = _randn(g, batch, kv_heads, seqlen_k, head_dim)
    q, k, v = (t.transpose(1, 2) for t in (q_sdpa, k_sdpa, v_sdpa))

    out = reference.attention(q, k, v, causal=causal, scale=scale)

    group = q_heads // kv_heads
    mask = bottom_right_mask(seqlen_q, seqlen_k) if causal else torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    expected = F.scaled_dot_product_attention(
        q_sdpa.double(),
        k_sdpa.double().repeat_interleave(group, dim=1),  # query head h reads KV head h // group
        v_sdpa.double().repeat_interleave(group, dim=1),
        attn_mask=mask,
        scale=scale,
    ).transpose(1, 2)  # [B, Sq, Hq, D]
    # SDPA's output for a query that sees nothing has varied across torch versions; the loop test covers it.
    seen = mask.any(dim=-1)
    torch.testing.assert_close(out[:, seen].double(), expected[:, seen], rtol=1e-5, atol=1e-5)


def _poisoned_cache(g, batch, capacity, kv_heads, head_dim, seqlens, dtype):
    """Random keys in [0, seqlens[b]) of each row, NaN beyond: a read past the length shows up as NaN."""
    cache = _randn(g, batch, capacity, kv_heads, head_dim, dtype=dtype)
    for b, length in enumerate(seqlens):
        cache[b, length:] = float("nan")
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_new", [1, 4], ids=["n_new1", "n_new4"])
def test_decode_equals_last_rows_of_causal_prefill(n_new, dtype):
    seqlens = [n_new, 17, 113, 40]  # the first sequence holds only its new tokens
    batch, q_heads, kv_heads, head_dim, capacity = len(seqlens), 8, 2, 64, 120
    g = _seeded("decode", n_new, str(dtype))
    k_cache = _poisoned_cache(g, batch, capacity, kv_heads, head_dim, seqlens, dtype)
    v_cache = _poisoned_cache(g, batch, capacity, kv_heads, head_dim, seqlens, dtype)
    prefill_q = [_randn(g, 1, length, q_heads, head_dim, dtype=dtype) for length in seqlens]
    q = torch.cat([pq[:, -n_new:] for pq in prefill_q])  # [B, n_new, Hq, D]

    out, lse = reference.decode_attention(
        q, k_cache, v_cache, torch.tensor(seqlens, dtype=torch.int32), return_lse=True
    )

    assert out.shape == q.shape and lse.shape == (batch, q_heads, n_new)
    for b, length in enumerate(seqlens):
        full_out, full_lse = reference.attention(
            prefill_q[b], k_cache[b : b + 1, :length], v_cache[b : b + 1, :length], causal=True, return_lse=True
        )
        torch.testing.assert_close(out[b], full_out[0, -n_new:])
        torch.testing.assert_close(lse[b], full_lse[0, :, -n_new:])


def _slot(b: int, pos: int, block_table, block_size):
    """Where position pos of sequence b lives: (b, pos) in a contiguous cache, (block, offset) in a paged one."""
    if block_table is None:
        return b, pos
    return int(block_table[b, pos // block_size]), pos % block_size


def _paged_copy(g, caches, seqlens, block_size, junk, spare_blocks=3):
    """The first seqlens[b] positions of contiguous caches, copied into shuffled block pools.

    Returns (pools, block_table). Blocks are handed out in a random order; table entries past
    a sequence's last block hold ``junk`` and every other pool slot holds NaN, so reading
    either one shows up.
    """
    batch, capacity = caches[0].shape[:2]
    blocks_needed = [-(-length // block_size) for length in seqlens]
    num_blocks = sum(blocks_needed) + spare_blocks
    order = torch.randperm(num_blocks, generator=g)[: sum(blocks_needed)].tolist()
    block_table = torch.full((batch, -(-capacity // block_size)), junk, dtype=torch.int32)
    for b, needed in enumerate(blocks_needed):
        block_table[b, :needed] = torch.tensor([order.pop() for _ in range(needed)], dtype=torch.int32)
    pools = []
    for cache in caches:
        pool = torch.full((num_blocks, block_size, *cache.shape[2:]), float("nan"), dtype=cache.dtype)
        for b, length in enumerate(seqlens):
            for pos in range(length):
                pool[_slot(b, pos, block_table, block_size)] = cache[b, pos]
        pools.append(pool)
    return pools, block_table


@pytest.mark.parametrize("junk", [-1, 2**31 - 1], ids=["junk-1", "junk-int32max"])
@pytest.mark.parametrize("block_size", [1, 7, 16], ids=lambda bs: f"bs{bs}")
@pytest.mark.parametrize("n_new", [1, 3], ids=["n_new1", "n_new3"])
def test_paged_decode_equals_contiguous(n_new, block_size, junk):
    seqlens = [3, 50, 23, 5]
    batch, q_heads, kv_heads, head_dim, capacity = len(seqlens), 4, 1, 24, 50
    g = _seeded("paged", n_new, block_size, junk)
    k_cache = _poisoned_cache(g, batch, capacity, kv_heads, head_dim, seqlens, torch.float32)
    v_cache = _poisoned_cache(g, batch, capacity, kv_heads, head_dim, seqlens, torch.float32)
    q = _randn(g, batch, n_new, q_heads, head_dim)
    (k_pool, v_pool), block_table = _paged_copy(g, (k_cache, v_cache), seqlens, block_size, junk)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32)

    paged_out, paged_lse = reference.decode_attention(
        q, k_pool, v_pool, cache_seqlens, block_table=block_table, return_lse=True
    )
    out, lse = reference.decode_attention(q, k_cache, v_cache, cache_seqlens, return_lse=True)

    assert not paged_out.isnan().any()
    torch.testing.assert_close(paged_out, out)
    torch.testing.assert_close(paged_lse, lse)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_equals_loop_of_dense(causal):
    # Sq > Sk, empty, Sq < Sk, square, queries without keys and keys without queries.
    lens_q = [17, 0, 1, 30, 0, 5]
    lens_k = [9, 0, 113, 30, 4, 0]
    q_heads, kv_heads, head_dim = 8, 2, 64
    g = _seeded("varlen", causal)
    q = _randn(g, sum(lens_q), q_heads, head_dim)
    k = _randn(g, sum(lens_k), kv_heads, head_dim)
    v = _randn(g, sum(lens_k), kv_heads, head_dim)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)

    out, lse = reference.attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)

    assert out.shape == q.shape
    assert lse.shape == (q_heads, sum(lens_q)) and lse.dtype == torch.float32
    for b in range(len(lens_q)):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        dense_out, dense_lse = reference.attention(
            q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal=causal, return_lse=True
        )
        torch.testing.assert_close(out[qs:qe], dense_out[0])
        torch.testing.assert_close(lse[:, qs:qe], dense_lse[0])
    no_keys = slice(int(cu_q[5]), int(cu_q[6]))  # sequence 5: five queries, no keys
    assert torch.all(out[no_keys] == 0) and torch.all(torch.isneginf(lse[:, no_keys]))


APPEND_LAYOUTS = {"contiguous": None, "paged-bs1": 1, "paged-bs7": 7, "paged-bs16": 16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_new", [1, 5], ids=["n_new1", "n_new5"])
@pytest.mark.parametrize("layout", list(APPEND_LAYOUTS))
def test_append_kv_writes_exactly_the_new_positions(layout, n_new, dtype):
    block_size = APPEND_LAYOUTS[layout]
    old_lens = [0, 13, 30]
    batch, q_heads, kv_heads, head_dim, capacity = len(old_lens), 8, 2, 24, 40
    g = _seeded("append", layout, n_new, str(dtype))
    history_k = _poisoned_cache(g, batch, capacity, kv_heads, head_dim, old_lens, dtype)
    history_v = _poisoned_cache(g, batch, capacity, kv_heads, head_dim, old_lens, dtype)
    new_k = _randn(g, batch, n_new, kv_heads, head_dim, dtype=dtype)
    new_v = _randn(g, batch, n_new, kv_heads, head_dim, dtype=dtype)
    if block_size is None:
        k_cache, v_cache, block_table = history_k.clone(), history_v.clone(), None
    else:
        # Blocks for the appended positions too; their slots start as NaN like the history's tail.
        (k_cache, v_cache), block_table = _paged_copy(
            g, (history_k, history_v), [n + n_new for n in old_lens], block_size, junk=-1
        )

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b, start in enumerate(old_lens):
        for t in range(n_new):
            expected_k[_slot(b, start + t, block_table, block_size)] = new_k[b, t]
            expected_v[_slot(b, start + t, block_table, block_size)] = new_v[b, t]
    cache_seqlens = torch.tensor(old_lens, dtype=torch.int32)

    reference.append_kv(k_cache, v_cache, new_k, new_v, cache_seqlens, block_table=block_table)

    # Exact, NaN sentinels included: every other slot must be untouched.
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(cache_seqlens, torch.tensor(old_lens, dtype=torch.int32))  # read, not advanced

    q = _randn(g, batch, n_new, q_heads, head_dim, dtype=dtype)
    out = reference.decode_attention(q, k_cache, v_cache, cache_seqlens + n_new, block_table=block_table)
    for b, length in enumerate(old_lens):
        keys = torch.cat([history_k[b, :length], new_k[b]])[None]
        values = torch.cat([history_v[b, :length], new_v[b]])[None]
        torch.testing.assert_close(out[b : b + 1], reference.attention(q[b : b + 1], keys, values, causal=True))
