"""decode_attention cases and checks shared by the backends' tests."""

import math

import pytest
import torch

from fmkernels import reference, testing


def make_case(lengths, n_new, q_heads, kv_heads, head_dim, dtype, block_size=None, seed=0, device="cpu"):
    """q, caches and tables for sequences of the given lengths (new tokens included)."""
    generator = torch.Generator(device).manual_seed(seed)
    batch, capacity = len(lengths), max(lengths) + 5
    if block_size is None:
        table = None
        shape = (batch, capacity, kv_heads, head_dim)
    else:
        max_blocks = -(-capacity // block_size)
        num_blocks = batch * max_blocks + 3
        table = torch.randperm(num_blocks, generator=generator, device=device)[: batch * max_blocks]
        table = table.view(batch, max_blocks).int()
        for b, length in enumerate(lengths):
            unused = torch.arange(-(-length // block_size), max_blocks, device=device)
            table[b, unused] = torch.where(unused % 2 == 0, -1, num_blocks + 7).int()  # junk, never read
        shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = []
    for _ in ("k", "v"):
        cache = torch.full(shape, math.nan, dtype=dtype, device=device)
        for b, length in enumerate(lengths):
            history = torch.randn((length, kv_heads, head_dim), generator=generator, device=device).to(dtype)
            if table is None:
                cache[b, :length] = history
            else:
                positions = torch.arange(length, device=device)
                cache[table[b, positions // block_size].long(), positions % block_size] = history
        caches.append(cache)
    q = torch.randn((batch, n_new, q_heads, head_dim), generator=generator, device=device).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return dict(q=q, k_cache=caches[0], v_cache=caches[1], cache_seqlens=seqlens, block_table=table)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled floating tensors while a test runs."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))


def assert_matches_reference(case, actual):
    """Holds (out, lse) to the reference with the DESIGN.md tolerance."""
    result = testing.compare_attention("decode_attention", dict(case, return_lse=True), actual)
    assert result.passed, result.detail


def assert_splits_agree(case, results):
    """Results of one case under different split counts agree with the first (one split) to
    the output's tolerance, and to 1e-5 in the log-sum-exp."""
    plain_out = testing.plain_decode_attention(**case)
    truth = reference.decode_attention(**{k: v.double() if v is not None and v.is_floating_point() else v
                                          for k, v in case.items()})
    for out, lse in results[1:]:
        assert testing.max_error(out, results[0][0]) <= testing.attention_tolerance(plain_out, truth)
        assert testing.max_error(lse, results[0][1]) <= 1e-5
