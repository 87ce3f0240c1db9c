"""The sdpa peer agrees with the reference where it supports a call, and says why where it does not."""

import pytest
import torch

import fmkernels
from fmkernels import reference, registry, testing


def _qkv(batch, seqlen_q, seqlen_k, q_heads, kv_heads, head_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, q_heads, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, generator=generator).to(dtype)
    return q, k, v


@pytest.mark.parametrize("seqlen_q, seqlen_k, causal", [(17, 17, True), (1, 113, True), (17, 113, True), (113, 17, False)])
@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_attention_matches_the_reference_with_bottom_right_causal(seqlen_q, seqlen_k, causal, q_heads, kv_heads, dtype):
    q, k, v = _qkv(2, seqlen_q, seqlen_k, q_heads, kv_heads, 64, dtype)
    truth = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    plain = testing.plain_attention(q, k, v, causal=causal)
    out = fmkernels.attention(q, k, v, causal=causal, backend="sdpa")
    assert testing.max_error(out, truth) <= testing.attention_tolerance(plain, truth)


def test_sdpa_decode_matches_the_reference_and_ignores_slots_past_each_length():
    q, _, _ = _qkv(3, 2, 1, 8, 2, 64)
    generator = torch.Generator().manual_seed(1)
    k_cache = torch.randn(3, 50, 2, 64, generator=generator)
    v_cache = torch.randn(3, 50, 2, 64, generator=generator)
    cache_seqlens = torch.tensor([2, 17, 50], dtype=torch.int32)
    for b, length in enumerate(cache_seqlens.tolist()):
        k_cache[b, length:] = float("nan")
        v_cache[b, length:] = float("nan")
    expected = reference.decode_attention(q, k_cache, v_cache, cache_seqlens)
    out = fmkernels.decode_attention(q, k_cache, v_cache, cache_seqlens, backend="sdpa")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, reason", [
    (lambda q, k, v: fmkernels.attention(q, k, v, return_lse=True, backend="sdpa"), "log-sum-exp"),
    (lambda q, k, v: fmkernels.attention(q[:, :5].expand(1, 5, 8, 64).contiguous(), k[:, :3], v[:, :3], causal=True,
                                         backend="sdpa"), "see no key"),
    (lambda q, k, v: fmkernels.attention(q[0], k[0], v[0], cu_seqlens_q=torch.tensor([0, 17], dtype=torch.int32),
                                         cu_seqlens_k=torch.tensor([0, 17], dtype=torch.int32), backend="sdpa"), "varlen"),
])
def test_sdpa_says_which_cases_it_cannot_run(call, reason):
    q, k, v = _qkv(1, 17, 17, 8, 2, 64)
    with pytest.raises(ValueError, match=f"backend 'sdpa' cannot run this attention call: .*{reason}"):
        call(q, k, v)


def test_sdpa_is_a_peer_and_never_picked_by_auto():
    impl = registry.get_impl("attention", "sdpa")
    assert impl.kind == "peer"
    q, k, v = _qkv(1, 5, 5, 2, 2, 8)
    assert registry.select("attention", "auto", dict(q=q, k=k, v=v)).name != "sdpa"
    block_table = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="no paged KV cache"):
        fmkernels.decode_attention(q[:, :1], k, v, torch.tensor([5], dtype=torch.int32), block_table=block_table,
                                   backend="sdpa")


@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math"])
def test_pinned_sdpa_peers_run_on_cuda_only_and_say_why_not(name):
    for op in ("attention", "decode_attention"):
        impl = registry.get_impl(op, name)
        assert impl.kind == "peer" and impl.devices == ("cuda",)
        q = torch.randn(1, 4, 2, 16)
        reason = impl.unsupported_reason(dict(q=q, k=q, v=q))
        if torch.cuda.is_available():
            assert "cuda" in reason  # CPU tensors
        else:
            assert reason == "not available: no CUDA GPU"
        assert registry.select(op, "auto", dict(q=q, k=q, v=q)).name != name
