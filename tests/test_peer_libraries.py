"""flash-attn and FlashInfer peers: the argument and layout mapping, checked against stand-ins.

Neither library installs on a CPU machine, so fake ``flash_attn`` and ``flashinfer`` modules
are put in ``sys.modules``. Their functions take the real APIs' arguments and compute what
the libraries document (layouts, bottom-right causal masks, base-2 LSE for FlashInfer, +inf
LSE for a query that sees no key in flash-attn) with explicit masks, written here apart from
fmkernels' reference; the adapters' results are then held to the reference. On a GPU with
the libraries installed, the real ones go through ``fmkernels check``'s rules.
"""

import importlib.machinery
import math
import sys
import types

import pytest
import torch

from fmkernels import peer_libraries, reference, registry, testing

from _attention_checks import bottom_right_mask, masked_attention
from _decode_attention_checks import assert_matches_reference, make_case


# ----------------------------------------------------------------------------
# What the libraries compute, with explicit masks
# ----------------------------------------------------------------------------


def _visible(seqlen_q, seqlen_k, causal):
    return bottom_right_mask(seqlen_q, seqlen_k) if causal else torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)


def _masked_attention(q, k, v, scale, visible):
    """q (Sq, Hq, D), k/v (Sk, Hkv, D) -> out (Sq, Hq, D) in q's dtype, natural-log lse (Hq, Sq) fp32."""
    out, lse = masked_attention(q.double(), k.double(), v.double(), visible, scale)
    return out.to(q.dtype), lse.float()


def _require_half(*tensors):
    for tensor in tensors:
        if tensor.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only supports fp16 and bf16")


def _fake_flash_attn(padded_varlen_lse=False):
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        _require_half(q, k, v)
        results = [_masked_attention(q[b], k[b], v[b], softmax_scale, _visible(q.shape[1], k.shape[1], causal))
                   for b in range(q.shape[0])]
        out = torch.stack([o for o, _ in results])
        lse = torch.stack([l for _, l in results])
        lse = lse.masked_fill(torch.isneginf(lse), math.inf)  # flash-attn: +inf where no key is seen
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        _require_half(q, k, v)
        bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        lengths_q = [bq[b + 1] - bq[b] for b in range(len(bq) - 1)]
        lengths_k = [bk[b + 1] - bk[b] for b in range(len(bk) - 1)]
        if max_seqlen_q != max(lengths_q) or max_seqlen_k != max(lengths_k):
            raise RuntimeError("max_seqlen does not match cu_seqlens")
        outs, lses = [], []
        for b in range(len(lengths_q)):
            o, l = _masked_attention(q[bq[b]:bq[b + 1]], k[bk[b]:bk[b + 1]], v[bk[b]:bk[b + 1]], softmax_scale,
                                     _visible(lengths_q[b], lengths_k[b], causal))
            outs.append(o)
            lses.append(l)
        if padded_varlen_lse:  # releases before 2.4: (batch, heads, max_seqlen_q), junk past each length
            lse = torch.full((len(lses), q.shape[1], max_seqlen_q), 12345.0)
            for b, l in enumerate(lses):
                lse[b, :, : l.shape[1]] = l
        else:
            lse = torch.cat(lses, dim=1)
        lse = lse.masked_fill(torch.isneginf(lse), math.inf)
        out = torch.cat(outs)
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
        _require_half(q, k_cache, v_cache)
        if k is not None or v is not None or cache_seqlens.dtype != torch.int32:
            raise RuntimeError("unexpected arguments")
        outs, lses = [], []
        for b, length in enumerate(cache_seqlens.tolist()):
            if block_table is None:
                keys, values = k_cache[b, :length], v_cache[b, :length]
            else:  # position p lives in block block_table[b, p // block_size], slot p % block_size
                positions = torch.arange(length)
                blocks, slots = block_table[b, positions // k_cache.shape[1]].long(), positions % k_cache.shape[1]
                keys, values = k_cache[blocks, slots], v_cache[blocks, slots]
            o, l = _masked_attention(q[b], keys, values, softmax_scale, _visible(q.shape[1], length, causal))
            outs.append(o)
            lses.append(l)
        out, lse = torch.stack(outs), torch.stack(lses)
        return (out, lse) if return_softmax_lse else out

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    return module


class _FakeWrapper:
    def __init__(self, float_workspace_buffer, kv_layout="NHD"):
        if kv_layout != "NHD" or float_workspace_buffer.dtype != torch.uint8:
            raise ValueError("unexpected wrapper arguments")
        self.planned = None


def _pages_to_rows(pages, indptr, indices, last_page_len, b):
    """Sequence b's keys (or values) from a paged NHD cache: (length, Hkv, D)."""
    owned = indices[indptr[b]: indptr[b + 1]].long()
    rows = pages[owned].flatten(0, 1)
    return rows[: (len(owned) - 1) * pages.shape[1] + int(last_page_len[b])]


def _as_base2(outs, lses):
    """Per-sequence results as FlashInfer returns them: out (tokens, H, D), lse (tokens, H) base 2."""
    return torch.cat(outs), torch.cat([l.T for l in lses]) / math.log(2.0)


class _FakeRaggedPrefill(_FakeWrapper):
    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, *, causal=False, sm_scale=None,
             q_data_type=torch.float16, kv_data_type=None):
        self.planned = (qo_indptr.tolist(), kv_indptr.tolist(), num_qo_heads, num_kv_heads, head_dim_qk, causal,
                        sm_scale, q_data_type)

    def run(self, q, k, v, *, return_lse=False):
        qo, kv, hq, hkv, d, causal, scale, q_dtype = self.planned
        _require_half(q, k, v)
        if q.shape != (qo[-1], hq, d) or k.shape != (kv[-1], hkv, d) or q.dtype != q_dtype:
            raise ValueError("run's tensors do not match the plan")
        outs, lses = [], []
        for b in range(len(qo) - 1):
            o, l = _masked_attention(q[qo[b]:qo[b + 1]], k[kv[b]:kv[b + 1]], v[kv[b]:kv[b + 1]], scale,
                                     _visible(qo[b + 1] - qo[b], kv[b + 1] - kv[b], causal))
            outs.append(o)
            lses.append(l)
        out, lse = _as_base2(outs, lses)
        return (out, lse) if return_lse else out


class _FakePagedPrefill(_FakeWrapper):
    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads,
             head_dim_qk, page_size, *, causal=False, sm_scale=None, q_data_type=torch.float16, kv_data_type=None):
        self.planned = (qo_indptr.tolist(), paged_kv_indptr.tolist(), paged_kv_indices, paged_kv_last_page_len,
                        num_qo_heads, page_size, causal, sm_scale)

    def run(self, q, paged_kv_cache, *, return_lse=False):
        qo, indptr, indices, last, hq, page_size, causal, scale = self.planned
        k_pages, v_pages = paged_kv_cache
        if k_pages.shape[1] != page_size or q.shape[:2] != (qo[-1], hq):
            raise ValueError("run's tensors do not match the plan")
        outs, lses = [], []
        for b in range(len(qo) - 1):
            keys = _pages_to_rows(k_pages, indptr, indices, last, b)
            values = _pages_to_rows(v_pages, indptr, indices, last, b)
            o, l = _masked_attention(q[qo[b]:qo[b + 1]], keys, values, scale,
                                     _visible(qo[b + 1] - qo[b], len(keys), causal))
            outs.append(o)
            lses.append(l)
        out, lse = _as_base2(outs, lses)
        return (out, lse) if return_lse else out


class _FakeDecode(_FakeWrapper):
    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
             sm_scale=None, q_data_type=torch.float16, kv_data_type=None):
        self.planned = (indptr.tolist(), indices, last_page_len, num_qo_heads, page_size, sm_scale)

    def run(self, q, paged_kv_cache, *, return_lse=False):
        indptr, indices, last, hq, page_size, scale = self.planned
        k_pages, v_pages = paged_kv_cache
        if q.shape[:2] != (len(indptr) - 1, hq) or k_pages.shape[1] != page_size:
            raise ValueError("run's tensors do not match the plan")
        outs, lses = [], []
        for b in range(q.shape[0]):  # one query per sequence sees every key
            keys = _pages_to_rows(k_pages, indptr, indices, last, b)
            values = _pages_to_rows(v_pages, indptr, indices, last, b)
            o, l = _masked_attention(q[b: b + 1], keys, values, scale, _visible(1, len(keys), False))
            outs.append(o)
            lses.append(l)
        out, lse = _as_base2(outs, lses)
        return (out, lse) if return_lse else out


def _top_k_mask_logits(logits, top_k):
    """Keeps every logit at least as large as the row's k-th largest (a threshold, as FlashInfer)."""
    k = torch.as_tensor(top_k).expand(logits.shape[0]).long()
    kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, -math.inf)


def _fake_flashinfer():
    module = types.ModuleType("flashinfer")
    module.__spec__ = importlib.machinery.ModuleSpec("flashinfer", None)
    module.BatchPrefillWithRaggedKVCacheWrapper = _FakeRaggedPrefill
    module.BatchPrefillWithPagedKVCacheWrapper = _FakePagedPrefill
    module.BatchDecodeWithPagedKVCacheWrapper = _FakeDecode
    sampling = types.ModuleType("flashinfer.sampling")
    sampling.top_k_mask_logits = _top_k_mask_logits
    module.sampling = sampling
    return module, sampling


@pytest.fixture
def fake_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())


@pytest.fixture
def fake_flashinfer(monkeypatch):
    module, sampling = _fake_flashinfer()
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    monkeypatch.setitem(sys.modules, "flashinfer.sampling", sampling)


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


def _qkv(seqlens_q, seqlens_k, q_heads, kv_heads, head_dim, dtype, packed, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    if packed:
        kwargs = dict(q=randn(sum(seqlens_q), q_heads, head_dim), k=randn(sum(seqlens_k), kv_heads, head_dim),
                      v=randn(sum(seqlens_k), kv_heads, head_dim))
        kwargs["cu_seqlens_q"] = torch.tensor([0, *torch.tensor(seqlens_q).cumsum(0).tolist()], dtype=torch.int32)
        kwargs["cu_seqlens_k"] = torch.tensor([0, *torch.tensor(seqlens_k).cumsum(0).tolist()], dtype=torch.int32)
        return kwargs
    batch = len(seqlens_q)
    return dict(q=randn(batch, seqlens_q[0], q_heads, head_dim), k=randn(batch, seqlens_k[0], kv_heads, head_dim),
                v=randn(batch, seqlens_k[0], kv_heads, head_dim))


_ATTENTION_CASES = [
    # seqlens_q, seqlens_k, q_heads, kv_heads, causal, packed
    ((17, 17), (17, 17), 4, 4, False, False),
    ((17,), (113,), 8, 1, True, False),
    ((1, 1, 1), (40, 40, 40), 8, 2, True, False),
    ((1, 17, 40), (17, 17, 113), 8, 2, True, True),
]


def _assert_attention_matches(kwargs, actual):
    result = testing.compare_attention("attention", dict(kwargs, return_lse=True), actual)
    assert result.passed, result.detail


# ----------------------------------------------------------------------------
# flash-attn
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seqlens_q, seqlens_k, q_heads, kv_heads, causal, packed", _ATTENTION_CASES)
@pytest.mark.parametrize("padded_varlen_lse", [False, True])
def test_flash_attn_attention_maps_layouts_scale_and_lse(monkeypatch, seqlens_q, seqlens_k, q_heads, kv_heads,
                                                         causal, packed, padded_varlen_lse):
    if padded_varlen_lse and not packed:
        pytest.skip("the padded LSE is varlen's only")
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(padded_varlen_lse))
    kwargs = _qkv(seqlens_q, seqlens_k, q_heads, kv_heads, 64, torch.bfloat16, packed)
    kwargs.update(causal=causal, scale=0.3)
    _assert_attention_matches(kwargs, peer_libraries.flash_attn_attention(**kwargs, return_lse=True))
    out = peer_libraries.flash_attn_attention(**kwargs)
    assert torch.equal(out, peer_libraries.flash_attn_attention(**kwargs, return_lse=True)[0])


def test_flash_attn_lse_is_minus_inf_for_queries_that_see_no_key(fake_flash_attn):
    kwargs = _qkv((17,), (5,), 4, 4, 64, torch.float16, packed=False)
    out, lse = peer_libraries.flash_attn_attention(**kwargs, causal=True, return_lse=True)
    _assert_attention_matches(dict(kwargs, causal=True), (out, lse))
    assert torch.isneginf(lse[:, :, :12]).all() and torch.isfinite(lse[:, :, 12:]).all()


@pytest.mark.parametrize("lengths, n_new, block_size", [((1, 17, 300), 1, None), ((300, 17, 513), 4, 256)])
def test_flash_attn_decode_maps_contiguous_and_paged_caches(fake_flash_attn, lengths, n_new, block_size):
    case = make_case(lengths, n_new, 8, 2, 64, torch.bfloat16, block_size=block_size)
    assert_matches_reference(case, peer_libraries.flash_attn_decode_attention(**case, return_lse=True))


@pytest.mark.parametrize("call, reason", [
    (lambda: peer_libraries.flash_attn_attention_supports(q=torch.zeros(1, 3, 2, 64)), "float16 or bfloat16, got float32"),
    (lambda: peer_libraries.flash_attn_attention_supports(q=torch.zeros(1, 3, 2, 320, dtype=torch.half)),
     "head_dim <= 256 and a multiple of 8, got 320"),
    (lambda: peer_libraries.flash_attn_decode_attention_supports(
        q=torch.zeros(1, 1, 2, 64, dtype=torch.half), k_cache=torch.zeros(4, 16, 2, 64, dtype=torch.half),
        block_table=torch.zeros(1, 2, dtype=torch.int32)), "multiple of 256 tokens, got 16"),
])
def test_flash_attn_says_which_cases_it_cannot_run(call, reason):
    assert reason in call()


# ----------------------------------------------------------------------------
# FlashInfer
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seqlens_q, seqlens_k, q_heads, kv_heads, causal, packed", _ATTENTION_CASES)
def test_flashinfer_attention_packs_dense_batches_and_converts_the_lse(fake_flashinfer, seqlens_q, seqlens_k,
                                                                       q_heads, kv_heads, causal, packed):
    kwargs = _qkv(seqlens_q, seqlens_k, q_heads, kv_heads, 128, torch.float16, packed, seed=1)
    kwargs.update(causal=causal)
    _assert_attention_matches(kwargs, peer_libraries.flashinfer_attention(**kwargs, return_lse=True))
    assert peer_libraries.flashinfer_attention(**kwargs).shape == kwargs["q"].shape


@pytest.mark.parametrize("lengths, n_new, block_size", [
    ((1, 17, 113), 1, None), ((17, 113, 1), 1, 16), ((4, 17, 113), 4, None), ((113, 33), 3, 32),
])
def test_flashinfer_decode_maps_caches_to_pages(fake_flashinfer, lengths, n_new, block_size):
    case = make_case(lengths, n_new, 8, 2, 64, torch.bfloat16, block_size=block_size, seed=2)
    case["scale"] = 0.2
    assert_matches_reference(case, peer_libraries.flashinfer_decode_attention(**case, return_lse=True))


def test_flashinfer_filter_logits_matches_the_reference_on_top_k_and_temperature(fake_flashinfer):
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(3)) * 3
    params = dict(temperature=torch.tensor([0.0, 0.5, 1.0, 1.5, 0.7]), top_k=torch.tensor([0, 1, 20, 1000, 2000]))
    assert peer_libraries.flashinfer_filter_logits_supports(logits, **params) is None
    actual = peer_libraries.flashinfer_filter_logits(logits, **params)
    assert torch.equal(actual, reference.filter_logits(logits, **params))


@pytest.mark.parametrize("params, reason", [
    (dict(top_p=0.9), "top-p and min-p"),
    (dict(min_p=torch.tensor([0.0, 0.1])), "top-p and min-p"),
    (dict(top_k=2), "a tie at the k-th largest logit"),
])
def test_flashinfer_filter_logits_skips_what_it_cannot_match(params, reason):
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0], [2.0, 1.0, 0.0, -1.0]])
    assert reason in peer_libraries.flashinfer_filter_logits_supports(logits, **params)


@pytest.mark.parametrize("call, reason", [
    (lambda: peer_libraries.flashinfer_attention_supports(q=torch.zeros(1, 3, 2, 96, dtype=torch.half),
                                                          k=torch.zeros(1, 3, 2, 96)), "head_dim 64, 128, 256, got 96"),
    (lambda: peer_libraries.flashinfer_attention_supports(q=torch.zeros(1, 5, 2, 64, dtype=torch.half),
                                                          k=torch.zeros(1, 3, 2, 64), causal=True), "see no key"),
    (lambda: peer_libraries.flashinfer_decode_attention_supports(q=torch.zeros(2, 1, 2, 64),
                                                                 cache_seqlens=torch.tensor([3, 4])),
     "float16 or bfloat16"),
])
def test_flashinfer_says_which_cases_it_cannot_run(call, reason):
    assert reason in call()


# ----------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------


def test_installed_libraries_register_as_cuda_peers(monkeypatch, fake_flash_attn, fake_flashinfer):
    monkeypatch.setattr(registry, "_REGISTRY", {op: {} for op in registry.OPS})
    peer_libraries.register_all()
    names = {op: [impl.name for impl in registry.implementations(op)] for op in registry.OPS}
    assert names == {"attention": ["flash_attn", "flashinfer"], "decode_attention": ["flash_attn", "flashinfer"],
                     "append_kv": [], "filter_logits": ["flashinfer"], "sample": [], "linear": []}
    impl = registry.get_impl("attention", "flash_attn")
    assert impl.kind == "peer" and impl.devices == ("cuda",)
    q = torch.zeros(1, 2, 2, 64, dtype=torch.half)
    expected = "not available: no CUDA GPU" if not torch.cuda.is_available() else "runs on cuda tensors; q is on cpu"
    assert impl.unsupported_reason(dict(q=q, k=q, v=q)) == expected


def test_absent_or_broken_libraries_register_nothing_or_say_why(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {op: {} for op in registry.OPS})
    monkeypatch.setattr(peer_libraries, "_installed", lambda name: False)
    peer_libraries.register_all()
    assert all(not registry.implementations(op) for op in registry.OPS)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # importing it now fails
    assert peer_libraries.unavailable_reason("flash_attn").startswith("cannot import flash_attn: ModuleNotFoundError")


# ----------------------------------------------------------------------------
# The real libraries, on a GPU
# ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(peer_libraries.PEER_LIBRARIES))
def test_installed_peer_library_passes_check_on_cuda(name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    module_name, entries = peer_libraries.PEER_LIBRARIES[name]
    pytest.importorskip(module_name)
    ops = [op for op, _, _ in entries]
    rows = [row for row in testing.run_checks(ops, "cuda") if row.implementation == name]
    failed = [f"{row.op} {row.case}: {row.result.detail}" for row in rows if row.result and not row.result.passed]
    assert not failed, failed
    for op in ops:
        assert any(row.op == op and row.result is not None for row in rows), f"{name} ran no {op} case"
