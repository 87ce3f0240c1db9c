"""Bad input to the public ops raises ValueError/TypeError naming the argument, before anything runs.

Each case starts from a valid call and changes one thing. The ``meta`` device stands in for
a second device, so device mismatches are checked on a machine without a GPU.
"""

import importlib
import math

import pytest
import torch

import fmkernels
from fmkernels import platform

OP_MODULES = [importlib.import_module(f"fmkernels.ops.{name}")
              for name in ("attention", "decode_attention", "append_kv", "sampling", "linear")]


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


def with_item(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


# Valid calls. Each builder seeds torch, so every case starts from the same random inputs.

def dense_attention():
    torch.manual_seed(0)
    return dict(q=randn(2, 5, 4, 16), k=randn(2, 7, 2, 16), v=randn(2, 7, 2, 16))


def packed_attention():
    torch.manual_seed(1)
    return dict(q=randn(9, 4, 16), k=randn(11, 2, 16), v=randn(11, 2, 16),
                cu_seqlens_q=i32([0, 4, 9]), cu_seqlens_k=i32([0, 5, 11]))


def contiguous_decode():
    torch.manual_seed(2)
    return dict(q=randn(2, 1, 4, 16), k_cache=randn(2, 8, 2, 16), v_cache=randn(2, 8, 2, 16),
                cache_seqlens=i32([3, 8]))


def paged_decode():
    # Pool of 6 blocks of 4; capacity 3 x 4 = 12. Sequence 0 (length 5) uses two blocks, so its
    # third entry is junk that must not be read; sequence 1 fills its blocks to capacity.
    torch.manual_seed(3)
    return dict(q=randn(2, 1, 4, 16), k_cache=randn(6, 4, 2, 16), v_cache=randn(6, 4, 2, 16),
                cache_seqlens=i32([5, 12]), block_table=i32([[5, 1, -7], [0, 2, 3]]))


def contiguous_append():
    # Sequence 1 ends exactly at the capacity of 8.
    torch.manual_seed(4)
    return dict(k_cache=randn(2, 8, 2, 16), v_cache=randn(2, 8, 2, 16),
                k=randn(2, 3, 2, 16), v=randn(2, 3, 2, 16), cache_seqlens=i32([0, 5]))


def paged_append():
    # Sequence 0 writes positions 2..4 (blocks 4 and 1; its entry 99 is junk past its end);
    # sequence 1 writes positions 9..11 (block 3), the last positions it can hold.
    torch.manual_seed(5)
    return dict(k_cache=randn(6, 4, 2, 16), v_cache=randn(6, 4, 2, 16),
                k=randn(2, 3, 2, 16), v=randn(2, 3, 2, 16),
                cache_seqlens=i32([2, 9]), block_table=i32([[4, 1, 99], [0, 2, 3]]))


def logits():
    torch.manual_seed(6)
    return dict(logits=randn(3, 50))


def linear_inputs():
    torch.manual_seed(7)
    return dict(x=randn(2, 3, 16), weight=randn(5, 16))


NAN, INF = float("nan"), float("inf")


def case(op, make_args, change, error, match):
    return pytest.param(op, make_args, change, error, match, id=f"{op}-{match}")


ATTENTION_CASES = [
    case("attention", dense_attention, lambda a: {"q": a["q"].numpy()}, TypeError, "q must be a torch.Tensor"),
    case("attention", dense_attention, lambda a: {"k": None}, TypeError, "k must be a torch.Tensor"),
    case("attention", dense_attention, lambda a: {"v": a["v"].tolist()}, TypeError, "v must be a torch.Tensor"),
    case("attention", dense_attention, lambda a: {n: t.int() for n, t in a.items()},
         TypeError, "q must have dtype float32, float16 or bfloat16, got int32"),
    case("attention", dense_attention, lambda a: {n: t.double() for n, t in a.items()},
         TypeError, "q must have dtype .* got float64"),
    case("attention", dense_attention, lambda a: {"k": a["k"].half()}, TypeError, "k must have the same dtype as q"),
    case("attention", dense_attention, lambda a: {"v": a["v"].bfloat16()},
         TypeError, "v must have the same dtype as q"),
    case("attention", dense_attention, lambda a: {"k": a["k"].to("meta")},
         ValueError, "k must be on the same device as q"),
    case("attention", dense_attention, lambda a: {"v": a["v"].to("meta")},
         ValueError, "v must be on the same device as q"),
    case("attention", dense_attention, lambda a: {"q": a["q"][0]}, ValueError, r"q must be 4-D \(batch, seqlen"),
    case("attention", dense_attention, lambda a: {"k": a["k"][None]}, ValueError, "k must be 4-D"),
    case("attention", dense_attention, lambda a: {"q": randn(2, 5, 3, 16)},
         ValueError, "q_heads must be a multiple of kv_heads.*q_heads=3, kv_heads=2"),
    case("attention", dense_attention, lambda a: {"k": randn(2, 7, 0, 16), "v": randn(2, 7, 0, 16)},
         ValueError, "q_heads must be a multiple of kv_heads"),
    case("attention", dense_attention,
         lambda a: {"q": randn(2, 5, 4, 0), "k": randn(2, 7, 2, 0), "v": randn(2, 7, 2, 0)},
         ValueError, "head_dim must be positive"),
    case("attention", dense_attention, lambda a: {"k": randn(2, 7, 2, 8), "v": randn(2, 7, 2, 8)},
         ValueError, "k must have q's head_dim 16, got 8"),
    case("attention", dense_attention, lambda a: {"v": randn(2, 6, 2, 16)}, ValueError, "v must have k's shape"),
    case("attention", dense_attention, lambda a: {"v": randn(2, 7, 2, 8)}, ValueError, "v must have k's shape"),
    case("attention", dense_attention, lambda a: {"k": randn(3, 7, 2, 16), "v": randn(3, 7, 2, 16)},
         ValueError, "k must have q's batch size 2, got 3"),
    case("attention", packed_attention, lambda a: {"cu_seqlens_k": None},
         ValueError, "needs both cu_seqlens_q and cu_seqlens_k; cu_seqlens_k is None"),
    case("attention", packed_attention, lambda a: {"cu_seqlens_q": None}, ValueError, "cu_seqlens_q is None"),
    case("attention", packed_attention, lambda a: {"cu_seqlens_q": a["cu_seqlens_q"].long()},
         TypeError, "cu_seqlens_q must have dtype int32, got int64"),
    case("attention", packed_attention, lambda a: {"cu_seqlens_k": [0, 5, 11]},
         TypeError, "cu_seqlens_k must be a torch.Tensor"),
    case("attention", packed_attention, lambda a: {"cu_seqlens_q": i32([[0, 4, 9]])},
         ValueError, "cu_seqlens_q must be 1-D"),
    case("attention", packed_attention, lambda a: {"cu_seqlens_q": i32([9])}, ValueError, "cu_seqlens_q must be 1-D"),
    case("attention", packed_attention, lambda a: {"cu_seqlens_q": i32([1, 4, 9])},
         ValueError, r"cu_seqlens_q\[0\] must be 0, got 1"),
    case("attention", packed_attention,
         lambda a: {"cu_seqlens_q": i32([0, 6, 4, 9]), "cu_seqlens_k": i32([0, 3, 5, 11])},
         ValueError, r"cu_seqlens_q must be non-decreasing, got cu_seqlens_q\[2\] = 4"),
    case("attention", packed_attention, lambda a: {"cu_seqlens_k": i32([0, 5, 10])},
         ValueError, r"cu_seqlens_k\[-1\] must equal the number of packed tokens \(11\), got 10"),
    case("attention", packed_attention, lambda a: {"cu_seqlens_k": i32([0, 5, 8, 11])},
         ValueError, r"cu_seqlens_k must have the same length as cu_seqlens_q \(3\), got 4"),
    case("attention", packed_attention, lambda a: {"cu_seqlens_k": a["cu_seqlens_k"].to("meta")},
         ValueError, "cu_seqlens_k must be on cpu, got meta"),
    case("attention", packed_attention, lambda a: {"q": a["q"][None]}, ValueError, r"q must be 3-D \(total_tokens"),
    case("attention", dense_attention, lambda a: {"causal": 1}, TypeError, "causal must be a bool, got int"),
    case("attention", dense_attention, lambda a: {"causal": "yes"}, TypeError, "causal must be a bool"),
    case("attention", dense_attention, lambda a: {"return_lse": None}, TypeError, "return_lse must be a bool"),
    case("attention", dense_attention, lambda a: {"scale": NAN}, ValueError, "scale must be finite"),
    case("attention", dense_attention, lambda a: {"scale": -INF}, ValueError, "scale must be finite"),
    case("attention", dense_attention, lambda a: {"scale": "0.1"}, TypeError, "scale must be a float or None"),
    case("attention", dense_attention, lambda a: {"scale": True}, TypeError, "scale must be a float or None"),
    case("attention", dense_attention, lambda a: {"out": randn(2, 5, 4, 8)},
         ValueError, r"out must have shape \(2, 5, 4, 16\)"),
    case("attention", dense_attention, lambda a: {"out": randn(2, 5, 4, 16).half()},
         TypeError, "out must have dtype float32"),
    case("attention", dense_attention, lambda a: {"out": randn(2, 5, 4, 16).to("meta")},
         ValueError, "out must be on cpu"),
    case("attention", dense_attention, lambda a: {"out": 0}, TypeError, "out must be a torch.Tensor"),
]

DECODE_CASES = [
    case("decode_attention", contiguous_decode, lambda a: {"q": None}, TypeError, "q must be a torch.Tensor"),
    case("decode_attention", contiguous_decode, lambda a: {"k_cache": a["k_cache"].numpy()},
         TypeError, "k_cache must be a torch.Tensor"),
    case("decode_attention", contiguous_decode, lambda a: {"v_cache": 1.0},
         TypeError, "v_cache must be a torch.Tensor"),
    case("decode_attention", contiguous_decode, lambda a: {"q": a["q"].long()}, TypeError, "q must have dtype"),
    case("decode_attention", contiguous_decode,
         lambda a: {"q": a["q"].double(), "k_cache": a["k_cache"].double(), "v_cache": a["v_cache"].double()},
         TypeError, "q must have dtype .* got float64"),
    case("decode_attention", contiguous_decode,
         lambda a: {"k_cache": a["k_cache"].half(), "v_cache": a["v_cache"].half()},
         TypeError, r"k_cache must have the same dtype as q \(float32\), got float16"),
    case("decode_attention", contiguous_decode, lambda a: {"v_cache": a["v_cache"].half()},
         TypeError, "v_cache must have the same dtype as k_cache"),
    case("decode_attention", contiguous_decode,
         lambda a: {"k_cache": a["k_cache"].int(), "v_cache": a["v_cache"].int()},
         TypeError, "k_cache must have dtype"),
    case("decode_attention", contiguous_decode,
         lambda a: {"k_cache": a["k_cache"].to("meta"), "v_cache": a["v_cache"].to("meta")},
         ValueError, "k_cache must be on the same device as q"),
    case("decode_attention", contiguous_decode, lambda a: {"v_cache": a["v_cache"].to("meta")},
         ValueError, "v_cache must be on the same device as q"),
    case("decode_attention", contiguous_decode, lambda a: {"q": a["q"][0]}, ValueError, "q must be 4-D"),
    case("decode_attention", contiguous_decode, lambda a: {"k_cache": a["k_cache"][0]},
         ValueError, "k_cache must be 4-D"),
    case("decode_attention", contiguous_decode, lambda a: {"v_cache": randn(2, 7, 2, 16)},
         ValueError, "v_cache must have shape \\(2, 8, 2, 16\\)"),
    case("decode_attention", contiguous_decode, lambda a: {"q": randn(2, 0, 4, 16)}, ValueError, "n_new >= 1"),
    case("decode_attention", contiguous_decode, lambda a: {"q": randn(2, 1, 4, 8)},
         ValueError, "k_cache must have q's head_dim 8, got 16"),
    case("decode_attention", contiguous_decode,
         lambda a: {"q": randn(2, 1, 4, 0), "k_cache": randn(2, 8, 2, 0), "v_cache": randn(2, 8, 2, 0)},
         ValueError, "head_dim must be positive"),
    case("decode_attention", contiguous_decode, lambda a: {"q": randn(2, 1, 3, 16)},
         ValueError, "q_heads must be a multiple of kv_heads"),
    case("decode_attention", contiguous_decode,
         lambda a: {"k_cache": randn(3, 8, 2, 16), "v_cache": randn(3, 8, 2, 16)},
         ValueError, "contiguous k_cache .* must have batch 2"),
    case("decode_attention", contiguous_decode,
         lambda a: {"k_cache": randn(2, 0, 2, 16), "v_cache": randn(2, 0, 2, 16)},
         ValueError, "k_cache must hold at least one position"),
    case("decode_attention", contiguous_decode, lambda a: {"cache_seqlens": [3, 8]},
         TypeError, "cache_seqlens must be a torch.Tensor"),
    case("decode_attention", contiguous_decode, lambda a: {"cache_seqlens": a["cache_seqlens"].long()},
         TypeError, "cache_seqlens must have dtype int32, got int64"),
    case("decode_attention", contiguous_decode, lambda a: {"cache_seqlens": i32([3, 8, 1])},
         ValueError, r"cache_seqlens must have shape \(2,\)"),
    case("decode_attention", contiguous_decode, lambda a: {"cache_seqlens": i32([[3], [8]])},
         ValueError, r"cache_seqlens must have shape \(2,\)"),
    case("decode_attention", contiguous_decode, lambda a: {"cache_seqlens": a["cache_seqlens"].to("meta")},
         ValueError, "cache_seqlens must be on cpu, got meta"),
    case("decode_attention", contiguous_decode, lambda a: {"cache_seqlens": i32([3, 9])},
         ValueError, r"cache_seqlens for sequence 1 needs 9 positions, but the cache holds 8 \(max_seqlen 8\)"),
    case("decode_attention", contiguous_decode, lambda a: {"cache_seqlens": i32([-1, 8])},
         ValueError, r"cache_seqlens\[0\] must count the 1 new tokens .* got -1"),
    case("decode_attention", contiguous_decode, lambda a: {"q": randn(2, 4, 4, 16)},
         ValueError, r"cache_seqlens\[0\] must count the 4 new tokens .* \(>= n_new\), got 3"),
    case("decode_attention", paged_decode, lambda a: {"cache_seqlens": i32([5, 13])},
         ValueError, r"needs 13 positions, but the cache holds 12 \(block_table's 3 blocks x block_size 4\)"),
    case("decode_attention", paged_decode, lambda a: {"block_table": with_item(a["block_table"], (1, 1), -1)},
         ValueError, r"block_table\[1, 1\] = -1 is outside the pool of 6 blocks"),
    case("decode_attention", paged_decode, lambda a: {"block_table": with_item(a["block_table"], (0, 1), 6)},
         ValueError, r"block_table\[0, 1\] = 6 is outside the pool of 6 blocks"),
    case("decode_attention", paged_decode, lambda a: {"block_table": a["block_table"].tolist()},
         TypeError, "block_table must be a torch.Tensor"),
    case("decode_attention", paged_decode, lambda a: {"block_table": a["block_table"].long()},
         TypeError, "block_table must have dtype int32"),
    case("decode_attention", paged_decode, lambda a: {"block_table": a["block_table"][0]},
         ValueError, "block_table must be 2-D"),
    case("decode_attention", paged_decode, lambda a: {"block_table": a["block_table"][:1]},
         ValueError, r"block_table must have 2 rows \(batch\)"),
    case("decode_attention", paged_decode, lambda a: {"block_table": a["block_table"].to("meta")},
         ValueError, "block_table must be on cpu, got meta"),
    case("decode_attention", contiguous_decode, lambda a: {"scale": INF}, ValueError, "scale must be finite"),
    case("decode_attention", contiguous_decode, lambda a: {"return_lse": 0}, TypeError, "return_lse must be a bool"),
    case("decode_attention", contiguous_decode, lambda a: {"out": randn(2, 2, 4, 16)},
         ValueError, "out must have shape"),
    case("decode_attention", contiguous_decode, lambda a: {"out": randn(2, 1, 4, 16).bfloat16()},
         TypeError, "out must have dtype float32, got bfloat16"),
]

APPEND_CASES = [
    case("append_kv", contiguous_append, lambda a: {"k": a["k"].numpy()}, TypeError, "k must be a torch.Tensor"),
    case("append_kv", contiguous_append, lambda a: {"v": None}, TypeError, "v must be a torch.Tensor"),
    case("append_kv", contiguous_append, lambda a: {"k_cache": a["k_cache"].tolist()},
         TypeError, "k_cache must be a torch.Tensor"),
    case("append_kv", contiguous_append, lambda a: {"v_cache": None}, TypeError, "v_cache must be a torch.Tensor"),
    case("append_kv", contiguous_append, lambda a: {"k": a["k"].int(), "v": a["v"].int()},
         TypeError, r"k must have the same dtype as k_cache \(float32\), got int32"),
    case("append_kv", contiguous_append, lambda a: {n: t.double() for n, t in a.items() if n != "cache_seqlens"},
         TypeError, "k_cache must have dtype float32, float16 or bfloat16, got float64"),
    case("append_kv", contiguous_append, lambda a: {"k": a["k"].half()},
         TypeError, "k must have the same dtype as k_cache"),
    case("append_kv", contiguous_append, lambda a: {"v": a["v"].bfloat16()},
         TypeError, "v must have the same dtype as k_cache"),
    case("append_kv", contiguous_append, lambda a: {"v_cache": a["v_cache"].half()},
         TypeError, "v_cache must have the same dtype as k_cache"),
    case("append_kv", contiguous_append, lambda a: {"k": a["k"].to("meta"), "v": a["v"].to("meta")},
         ValueError, "k must be on the same device as k_cache"),
    case("append_kv", contiguous_append, lambda a: {"v": a["v"].to("meta")},
         ValueError, "v must be on the same device as k_cache"),
    case("append_kv", contiguous_append, lambda a: {"v_cache": a["v_cache"].to("meta")},
         ValueError, "v_cache must be on the same device as k_cache"),
    case("append_kv", contiguous_append, lambda a: {"k": a["k"][0], "v": a["v"][0]},
         ValueError, r"k must be 4-D \(batch, n_new, kv_heads, head_dim\)"),
    case("append_kv", contiguous_append, lambda a: {"v": a["v"][:, :2]},
         ValueError, r"v must have shape \(2, 3, 2, 16\)"),
    case("append_kv", contiguous_append, lambda a: {"v_cache": a["v_cache"][:, :7]},
         ValueError, r"v_cache must have shape \(2, 8, 2, 16\)"),
    case("append_kv", contiguous_append, lambda a: {"k": randn(2, 3, 3, 16), "v": randn(2, 3, 3, 16)},
         ValueError, r"k must have the cache's \(kv_heads, head_dim\) \(2, 16\), got \(3, 16\)"),
    case("append_kv", contiguous_append, lambda a: {"k": randn(2, 3, 2, 24), "v": randn(2, 3, 2, 24)},
         ValueError, r"k must have the cache's \(kv_heads, head_dim\)"),
    case("append_kv", contiguous_append, lambda a: {"k": randn(3, 3, 2, 16), "v": randn(3, 3, 2, 16)},
         ValueError, "contiguous k_cache .* must have batch 3"),
    case("append_kv", contiguous_append, lambda a: {"k_cache": randn(1, 8, 2, 16).expand(2, 8, 2, 16)},
         ValueError, "k_cache must not have a stride-0"),
    case("append_kv", contiguous_append, lambda a: {"cache_seqlens": (0, 5)},
         TypeError, "cache_seqlens must be a torch.Tensor"),
    case("append_kv", contiguous_append, lambda a: {"cache_seqlens": a["cache_seqlens"].long()},
         TypeError, "cache_seqlens must have dtype int32"),
    case("append_kv", contiguous_append, lambda a: {"cache_seqlens": i32([0])},
         ValueError, r"cache_seqlens must have shape \(2,\)"),
    case("append_kv", contiguous_append, lambda a: {"cache_seqlens": a["cache_seqlens"].to("meta")},
         ValueError, "cache_seqlens must be on cpu"),
    case("append_kv", contiguous_append, lambda a: {"cache_seqlens": i32([0, 6])},
         ValueError, r"cache_seqlens \+ n_new for sequence 1 needs 9 positions, but the cache holds 8"),
    case("append_kv", contiguous_append, lambda a: {"cache_seqlens": i32([-1, 5])},
         ValueError, r"cache_seqlens\[0\] must be >= 0, got -1"),
    case("append_kv", paged_append, lambda a: {"cache_seqlens": i32([2, 10])},
         ValueError, r"needs 13 positions, but the cache holds 12 \(block_table's 3 blocks"),
    case("append_kv", paged_append, lambda a: {"block_table": with_item(a["block_table"], (0, 1), -2)},
         ValueError, r"block_table\[0, 1\] = -2 is outside the pool of 6 blocks"),
    case("append_kv", paged_append, lambda a: {"block_table": with_item(a["block_table"], (1, 2), 6)},
         ValueError, r"block_table\[1, 2\] = 6 is outside the pool"),
    case("append_kv", paged_append, lambda a: {"block_table": a["block_table"].long()},
         TypeError, "block_table must have dtype int32"),
    case("append_kv", paged_append, lambda a: {"block_table": a["block_table"].flatten()},
         ValueError, "block_table must be 2-D"),
    case("append_kv", paged_append, lambda a: {"block_table": a["block_table"].repeat(2, 1)},
         ValueError, r"block_table must have 2 rows"),
    case("append_kv", paged_append, lambda a: {"block_table": a["block_table"].to("meta")},
         ValueError, "block_table must be on cpu"),
]

SAMPLING_PARAMETER_CASES = [
    (lambda a: {"logits": [[0.0, 1.0]]}, TypeError, "logits must be a torch.Tensor"),
    (lambda a: {"logits": torch.arange(12).reshape(3, 4)}, TypeError, "logits must have dtype .* got int64"),
    (lambda a: {"logits": a["logits"].double()}, TypeError, "logits must have dtype .* got float64"),
    (lambda a: {"logits": a["logits"][0]}, ValueError, r"logits must be 2-D \(batch, vocab\)"),
    (lambda a: {"logits": randn(3, 0)}, ValueError, "logits must have a non-empty vocabulary"),
    (lambda a: {"logits": with_item(a["logits"], (1, 7), NAN)},
     ValueError, r"logits must be finite or -inf, got logits\[1, 7\] = nan"),
    (lambda a: {"logits": with_item(a["logits"], (2, 0), INF)},
     ValueError, r"logits must be finite or -inf, got logits\[2, 0\] = inf"),
    (lambda a: {"logits": with_item(a["logits"], 2, -INF)}, ValueError, r"logits\[2\] is -inf everywhere"),
    (lambda a: {"top_p": 0.0}, ValueError, r"top_p must be in \(0.0, 1.0\], got 0.0"),
    (lambda a: {"top_p": 1.5}, ValueError, "top_p must be in"),
    (lambda a: {"top_p": -0.2}, ValueError, "top_p must be in"),
    (lambda a: {"top_p": NAN}, ValueError, "top_p must not be NaN"),
    (lambda a: {"top_p": torch.tensor([0.5, 0.0, 0.9])}, ValueError, r"top_p must be in .* got top_p\[1\] = 0.0"),
    (lambda a: {"top_p": torch.tensor([0.5, NAN, 0.9])}, ValueError, "top_p must not contain NaN"),
    (lambda a: {"top_k": -1}, ValueError, "top_k must be in"),
    (lambda a: {"top_k": 2**63}, ValueError, "top_k must be in"),
    (lambda a: {"top_k": 2.0}, TypeError, "top_k must be an int"),
    (lambda a: {"top_k": True}, TypeError, "top_k must be an int"),
    (lambda a: {"top_k": torch.tensor([1.0, 2.0, 3.0])},
     TypeError, "top_k must be an int or an integer tensor, got dtype"),
    (lambda a: {"top_k": torch.tensor([1, -3, 2])}, ValueError, r"top_k must be in .* got top_k\[1\] = -3"),
    (lambda a: {"temperature": -0.5}, ValueError, "temperature must be in"),
    (lambda a: {"temperature": INF}, ValueError, "temperature must be"),
    (lambda a: {"temperature": NAN}, ValueError, "temperature must not be NaN"),
    (lambda a: {"temperature": torch.tensor([1.0, INF, 1.0])}, ValueError, "temperature must be"),
    (lambda a: {"temperature": torch.tensor([1.0, -1.0, 1.0])},
     ValueError, r"temperature must be in .* got temperature\[1\]"),
    (lambda a: {"temperature": "1"}, TypeError, "temperature must be a float"),
    (lambda a: {"min_p": -0.1}, ValueError, r"min_p must be in \[0.0, 1.0\]"),
    (lambda a: {"min_p": 1.5}, ValueError, r"min_p must be in \[0.0, 1.0\]"),
    (lambda a: {"min_p": torch.tensor([0.1, 0.2, 1.01])}, ValueError, r"min_p must be in .* got min_p\[2\]"),
    (lambda a: {"top_k": torch.tensor([1, 2])}, ValueError, r"top_k must be a scalar or have shape \(3,\)"),
    (lambda a: {"temperature": torch.ones(3, 1)}, ValueError, r"temperature must be a scalar or have shape \(3,\)"),
    (lambda a: {"min_p": torch.zeros(4)}, ValueError, r"min_p must be a scalar or have shape \(3,\)"),
    (lambda a: {"top_p": torch.ones(3).to("meta")}, ValueError, "top_p must be on cpu or the CPU, got meta"),
]

SAMPLING_CASES = [
    case(op, logits, change, error, match)
    for op in ("filter_logits", "sample")
    for change, error, match in SAMPLING_PARAMETER_CASES
] + [
    case("filter_logits", logits, lambda a: {"out": randn(3, 49)}, ValueError, r"out must have shape \(3, 50\)"),
    case("filter_logits", logits, lambda a: {"out": randn(3, 50).half()}, TypeError, "out must have dtype float32"),
    case("sample", logits, lambda a: {"seed": -1}, ValueError, "seed must be in"),
    case("sample", logits, lambda a: {"seed": 2**63}, ValueError, "seed must be in"),
    case("sample", logits, lambda a: {"seed": 1.5}, TypeError, "seed must be an int"),
    case("sample", logits, lambda a: {"seed": torch.tensor([1, -2, 3])},
         ValueError, r"seed must be in .* got seed\[1\] = -2"),
    case("sample", logits, lambda a: {"seed": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "seed must be an int"),
    case("sample", logits, lambda a: {"seed": torch.tensor([1, 2])},
         ValueError, r"seed must be a scalar or have shape \(3,\)"),
    case("sample", logits, lambda a: {"step": -1}, ValueError, "step must be in"),
    case("sample", logits, lambda a: {"step": 0.5}, TypeError, "step must be an int"),
    case("sample", logits, lambda a: {"return_logprobs": True, "num_logprobs": -1},
         ValueError, r"num_logprobs must be in \[0, vocab=50\], got -1"),
    case("sample", logits, lambda a: {"return_logprobs": True, "num_logprobs": 51},
         ValueError, r"num_logprobs must be in \[0, vocab=50\], got 51"),
    case("sample", logits, lambda a: {"num_logprobs": 3}, ValueError, "num_logprobs > 0 needs return_logprobs=True"),
    case("sample", logits, lambda a: {"return_logprobs": True, "num_logprobs": 2.0},
         TypeError, "num_logprobs must be an int"),
    case("sample", logits, lambda a: {"return_logprobs": 1}, TypeError, "return_logprobs must be a bool"),
    case("sample", logits, lambda a: {"out": torch.zeros(3, dtype=torch.int32)},
         TypeError, "out must have dtype int64"),
    case("sample", logits, lambda a: {"out": torch.zeros(3, 1, dtype=torch.int64)},
         ValueError, r"out must have shape \(3,\)"),
]

LINEAR_CASES = [
    case("linear", linear_inputs, lambda a: {"x": a["x"].numpy()}, TypeError, "x must be a torch.Tensor"),
    case("linear", linear_inputs, lambda a: {"weight": None}, TypeError, "weight must be a torch.Tensor"),
    case("linear", linear_inputs, lambda a: {n: t.int() for n, t in a.items()},
         TypeError, "x must have dtype float32, float16 or bfloat16, got int32"),
    case("linear", linear_inputs, lambda a: {n: t.double() for n, t in a.items()},
         TypeError, "x must have dtype .* got float64"),
    case("linear", linear_inputs, lambda a: {"weight": a["weight"].bfloat16()},
         TypeError, r"weight must have the same dtype as x \(float32\), got bfloat16"),
    case("linear", linear_inputs, lambda a: {"weight": a["weight"].to("meta")},
         ValueError, "weight must be on the same device as x"),
    case("linear", linear_inputs, lambda a: {"x": torch.tensor(1.0)},
         ValueError, r"x must have at least 1 dimension \(\.\.\., K\)"),
    case("linear", linear_inputs, lambda a: {"weight": a["weight"][0]}, ValueError, r"weight must be 2-D \(N, K\)"),
    case("linear", linear_inputs, lambda a: {"weight": a["weight"][None]}, ValueError, "weight must be 2-D"),
    case("linear", linear_inputs, lambda a: {"weight": randn(5, 15)},
         ValueError, r"weight must have x's K = 16 columns \(N, K\), got shape \(5, 15\)"),
    case("linear", linear_inputs, lambda a: {"weight": a["weight"].T.contiguous()},
         ValueError, "weight must have x's K = 16 columns"),
    case("linear", linear_inputs, lambda a: {"out": randn(2, 3, 4)}, ValueError, r"out must have shape \(2, 3, 5\)"),
    case("linear", linear_inputs, lambda a: {"out": randn(6, 5)}, ValueError, r"out must have shape \(2, 3, 5\)"),
    case("linear", linear_inputs, lambda a: {"out": randn(2, 3, 5).half()}, TypeError, "out must have dtype float32"),
    case("linear", linear_inputs, lambda a: {"out": randn(2, 3, 5).to("meta")}, ValueError, "out must be on cpu"),
]

CASES = ATTENTION_CASES + DECODE_CASES + APPEND_CASES + SAMPLING_CASES + LINEAR_CASES


class Dispatched(Exception):
    """Raised in place of running a kernel: not a ValueError/TypeError, so pytest.raises lets it through."""


@pytest.fixture
def no_dispatch(monkeypatch):
    def refuse(op, backend, case):
        raise Dispatched(f"{op} dispatched to {backend!r} despite bad input")

    for module in OP_MODULES:
        monkeypatch.setattr(module, "run", refuse)


@pytest.mark.parametrize("op, make_args, change, error, match", CASES)
def test_bad_input_raises_before_dispatch(op, make_args, change, error, match, no_dispatch):
    args = make_args()
    args.update(change(args))
    with pytest.raises(error, match=match):
        getattr(fmkernels, op)(**args)


def _caches(args):
    return [t for name in ("k_cache", "v_cache") if isinstance(t := args.get(name), torch.Tensor)]


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
@pytest.mark.parametrize("op, make_args, change, error, match", APPEND_CASES)
def test_rejected_append_kv_leaves_cache_untouched(op, make_args, change, error, match, backend):
    if backend == "cpu" and platform.unavailable_reason("cpu"):
        pytest.skip(platform.unavailable_reason("cpu"))
    args = make_args()
    args.update(change(args))
    before = [c.clone() for c in _caches(args) if c.device.type != "meta"]
    with pytest.raises(error, match=match):
        fmkernels.append_kv(**args, backend=backend)
    after = [c for c in _caches(args) if c.device.type != "meta"]
    assert before, "the case left no cache to check"
    for old, new in zip(before, after):
        assert torch.equal(old, new)


# Backend names: selection happens after validation, so these run without the no_dispatch fixture.

def _no_gpu() -> bool:
    return platform.unavailable_reason("cuda") is not None


BACKEND_CASES = [
    case("attention", dense_attention, lambda a: {"backend": "nope"}, ValueError,
         r"backend for attention must be 'auto' or one of: .*reference.*; got 'nope'"),
    case("attention", dense_attention, lambda a: {"backend": None}, TypeError, "backend must be a str, got NoneType"),
    case("decode_attention", paged_decode, lambda a: {"backend": "Reference"}, ValueError, "got 'Reference'"),
    case("filter_logits", logits, lambda a: {"backend": "cuda"}, ValueError,
         r"backend 'cuda' cannot run this filter_logits call: (not available|runs on cuda tensors)"),
    case("sample", logits, lambda a: {"backend": 0}, TypeError, "backend must be a str"),
    case("append_kv", contiguous_append, lambda a: {"backend": ""}, ValueError, "backend for append_kv must be 'auto'"),
    case("append_kv", paged_append, lambda a: {"backend": "cuda"}, ValueError,
         r"backend 'cuda' cannot run this append_kv call: (not available|runs on cuda tensors)"),
    # linear's triton and cuda kernels take quantized weights only.
    case("linear", linear_inputs, lambda a: {"backend": "triton"}, ValueError,
         r"backend 'triton' cannot run this linear call: (a float weight: torch's matmul|not available|runs on cuda)"),
    case("linear", linear_inputs, lambda a: {"backend": "cuda"}, ValueError,
         r"backend 'cuda' cannot run this linear call: (not available|runs on cuda tensors|a float weight)"),
]


@pytest.mark.parametrize("op, make_args, change, error, match", BACKEND_CASES)
def test_backend_that_cannot_run_raises(op, make_args, change, error, match):
    args = make_args()
    args.update(change(args))
    before = [c.clone() for c in _caches(args)]
    with pytest.raises(error, match=match):
        getattr(fmkernels, op)(**args)
    for old, new in zip(before, _caches(args)):
        assert torch.equal(old, new)


@pytest.mark.skipif(not _no_gpu(), reason="this machine has a usable GPU")
def test_cuda_backend_without_gpu_says_why():
    args = contiguous_append()
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot run this append_kv call: not available: .*"
                                         r"(no GPU|driver|not built)"):
        fmkernels.append_kv(**args, backend="cuda")


# Valid calls: out= buffers, per-row tensors, empty batches, junk past a sequence's end.

def test_attention_out_buffer_is_returned_and_filled():
    args = dense_attention()
    expected, expected_lse = fmkernels.attention(**args, causal=True, return_lse=True)
    out = randn(*args["q"].shape)
    result, lse = fmkernels.attention(**args, causal=True, return_lse=True, out=out)
    assert result is out
    assert torch.equal(out, expected)
    assert torch.equal(lse, expected_lse)


def test_packed_attention_matches_per_sequence_dense_calls():
    args = packed_attention()
    out = randn(*args["q"].shape)
    assert fmkernels.attention(**args, causal=True, out=out) is out
    for b in range(2):
        qs = slice(*args["cu_seqlens_q"][b:b + 2].tolist())
        ks = slice(*args["cu_seqlens_k"][b:b + 2].tolist())
        dense = fmkernels.attention(args["q"][qs][None], args["k"][ks][None], args["v"][ks][None], causal=True)
        torch.testing.assert_close(out[qs], dense[0])


def test_paged_decode_ignores_junk_block_entries_past_the_end():
    args = paged_decode()
    table = args["block_table"]
    # The same caches laid out contiguously: sequence b's position p at [b, p].
    contiguous = {}
    for name in ("k_cache", "v_cache"):
        cache = args[name]
        contiguous[name] = torch.stack([
            torch.cat([cache[int(table[b, j])] if table[b, j] >= 0 else randn(*cache.shape[1:]) for j in range(3)])
            for b in range(2)
        ])
    out = randn(*args["q"].shape)
    result = fmkernels.decode_attention(**args, out=out)
    assert result is out
    expected = fmkernels.decode_attention(args["q"], contiguous["k_cache"], contiguous["v_cache"],
                                          args["cache_seqlens"])
    torch.testing.assert_close(out, expected)


def test_paged_append_accepts_junk_block_entries_past_the_end():
    args = paged_append()
    expected = {name: args[name].clone() for name in ("k_cache", "v_cache")}
    fmkernels.append_kv(expected["k_cache"], expected["v_cache"], args["k"], args["v"], args["cache_seqlens"],
                        block_table=args["block_table"], backend="reference")
    fmkernels.append_kv(**args)
    assert torch.equal(args["k_cache"], expected["k_cache"]) and torch.equal(args["v_cache"], expected["v_cache"])
    assert torch.equal(args["k_cache"][3, 1:], args["k"][1])


def test_filter_logits_per_row_tensors_match_per_row_scalars():
    args = logits()
    params = dict(
        temperature=torch.tensor([0.5, 1.0, 2.0]),
        top_k=torch.tensor([0, 5, 12], dtype=torch.int32),
        top_p=torch.tensor([1.0, 0.9, 0.6], dtype=torch.float64),
        min_p=torch.tensor([0.0, 0.05, 0.1]),
    )
    out = randn(3, 50)
    assert fmkernels.filter_logits(**args, **params, out=out) is out
    for b in range(3):
        row = fmkernels.filter_logits(args["logits"][b:b + 1], **{n: p[b].item() for n, p in params.items()})
        assert torch.equal(out[b:b + 1], row)
    kept = (~torch.isneginf(out)).sum(dim=1)
    assert kept[0] == 50 and 1 <= kept[1] <= 5 and 1 <= kept[2] <= 12


def test_top_k_beyond_vocab_keeps_everything():
    args = logits()
    assert torch.equal(fmkernels.filter_logits(**args, top_k=2**63 - 1), fmkernels.filter_logits(**args))


def test_sample_out_buffer_and_per_row_seeds():
    args = logits()
    seeds = torch.tensor([7, 2**63 - 1, 0])
    params = dict(temperature=torch.tensor([0.7, 1.0, 1.3]), top_k=torch.tensor([3, 0, 10]),
                  top_p=torch.tensor([1.0, 0.8, 0.95]), min_p=0.01, step=torch.tensor([0, 5, 2**40]))
    out = torch.full((3,), -1, dtype=torch.int64)
    result = fmkernels.sample(**args, **params, seed=seeds, out=out)
    assert result is out
    filtered = fmkernels.filter_logits(**args, **{n: params[n] for n in ("temperature", "top_k", "top_p", "min_p")})
    assert not torch.isneginf(filtered.gather(1, out[:, None])).any()
    # A row's token depends only on its own logits, seed and step.
    for b in range(3):
        alone = fmkernels.sample(args["logits"][b:b + 1], temperature=params["temperature"][b:b + 1],
                                 top_k=params["top_k"][b:b + 1], top_p=params["top_p"][b:b + 1], min_p=0.01,
                                 step=params["step"][b:b + 1], seed=seeds[b:b + 1])
        assert alone.item() == out[b].item()
    with_logprobs = fmkernels.sample(**args, **params, seed=seeds, return_logprobs=True, num_logprobs=2,
                                     out=torch.empty(3, dtype=torch.int64))
    assert torch.equal(with_logprobs.tokens, out)
    assert with_logprobs.top_ids.shape == (3, 2)


def test_empty_batches():
    q = randn(0, 3, 4, 16)
    assert fmkernels.attention(q, randn(0, 5, 2, 16), randn(0, 5, 2, 16), causal=True).shape == q.shape
    decode_q = randn(0, 1, 4, 16)
    empty_cache = randn(0, 8, 2, 16)
    assert fmkernels.decode_attention(decode_q, empty_cache, empty_cache.clone(), i32([])).shape == decode_q.shape
    fmkernels.append_kv(empty_cache, empty_cache.clone(), randn(0, 2, 2, 16), randn(0, 2, 2, 16), i32([]))
    assert fmkernels.filter_logits(randn(0, 50), top_k=3).shape == (0, 50)
    tokens = fmkernels.sample(randn(0, 50), seed=1, top_p=0.5)
    assert tokens.shape == (0,) and tokens.dtype == torch.int64
    assert fmkernels.sample(randn(0, 50), seed=1, return_logprobs=True, num_logprobs=4).top_ids.shape == (0, 4)
    assert fmkernels.linear(randn(0, 16), randn(5, 16)).shape == (0, 5)


@pytest.mark.parametrize("make_args", [contiguous_append, paged_append])
def test_append_zero_new_tokens_is_a_no_op(make_args):
    args = make_args()
    # With no new token, a sequence may already be at capacity.
    full = i32([8, 12]) if "block_table" in args else i32([8, 8])
    args.update(k=args["k"][:, :0], v=args["v"][:, :0], cache_seqlens=full)
    before = [c.clone() for c in _caches(args)]
    fmkernels.append_kv(**args, backend="reference")
    fmkernels.append_kv(**args)
    for old, new in zip(before, _caches(args)):
        assert torch.equal(old, new)


def test_scale_accepts_ints_and_defaults_to_rsqrt_head_dim():
    args = dense_attention()
    default = fmkernels.attention(**args)
    explicit = fmkernels.attention(**args, scale=1 / math.sqrt(16))
    assert torch.equal(default, explicit)
    assert not torch.equal(fmkernels.attention(**args, scale=1), default)


def test_named_backend_that_does_not_support_the_case_raises_instead_of_falling_back():
    q = torch.randn(1, 3, 2, 264)
    k = torch.randn(1, 5, 2, 264)
    with pytest.raises(ValueError, match=r"backend 'cpu' cannot run this attention call: head_dim 264 > 256"):
        fmkernels.attention(q, k, k, backend="cpu")
    assert fmkernels.attention(q, k, k).shape == q.shape  # auto picks an implementation that can
