"""fmkernels' ops as torch.library custom ops: opcheck, torch.compile(fullgraph=True),
out= buffers, and (on a GPU) a decode step captured in a CUDA graph and run without a host
synchronisation."""

import pytest
import torch

import fmkernels
from fmkernels import registry
from fmkernels.model import ModelConfig, Transformer

from _decode_attention_checks import make_case
from _sampling_checks import random_rows

gpu = pytest.mark.gpu
# (backend, device): the CPU backends here, fmkernels' GPU backends on a GPU.
BACKENDS = [
    ("reference", "cpu"),
    ("cpu", "cpu"),
    pytest.param("cuda", "cuda", marks=gpu),
    pytest.param("triton", "cuda", marks=gpu),
]


def require_backend(op, backend):
    reason = registry.get_impl(op, backend).unavailable_reason()
    if reason:
        pytest.skip(f"{backend}: {reason}")


def randn(*shape, device="cpu", dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def dtype_for(device):
    # The GPU backends' tensor-core kernels run half precision; the CPU checks fp32 exactly.
    return torch.float16 if device == "cuda" else torch.float32


# ----------------------------------------------------------------------------
# opcheck: schema, fake implementation, and the op under AOT dispatch
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["dense_gqa_causal", "dense_lse", "varlen_causal_lse"])
def test_opcheck_attention(backend, device, kind):
    require_backend("attention", backend)
    dtype = dtype_for(device)
    if kind == "varlen_causal_lse":
        q, k, v = (randn(total, heads, 64, device=device, dtype=dtype, seed=i)
                   for i, (total, heads) in enumerate([(20, 4), (29, 2), (29, 2)]))
        cu_q = torch.tensor([0, 3, 20], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 12, 29], dtype=torch.int32, device=device)
        args = (q, k, v, cu_q, cu_k, True, None, True, backend)
    else:
        q = randn(2, 17, 8, 64, device=device, dtype=dtype, seed=1)
        k, v = (randn(2, 23, 2, 64, device=device, dtype=dtype, seed=s) for s in (2, 3))
        causal, return_lse = kind == "dense_gqa_causal", kind == "dense_lse"
        args = (q, k, v, None, None, causal, 0.3, return_lse, backend)
    torch.library.opcheck(torch.ops.fmkernels.attention.default, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 16])
def test_opcheck_decode_attention(backend, device, block_size):
    require_backend("decode_attention", backend)
    case = make_case([2, 17, 40], 2 if block_size else 1, 8, 2, 64, dtype_for(device), block_size=block_size,
                     device=device)
    args = (case["q"], case["k_cache"], case["v_cache"], case["cache_seqlens"], case["block_table"], None,
            block_size is not None, backend)
    torch.library.opcheck(torch.ops.fmkernels.decode_attention.default, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 4])
def test_opcheck_append_kv(backend, device, block_size):
    require_backend("append_kv", backend)
    dtype = dtype_for(device)
    case = make_case([5, 11], 1, 4, 2, 64, dtype, block_size=block_size, device=device)
    k, v = (randn(2, 3, 2, 64, device=device, dtype=dtype, seed=s) for s in (4, 5))
    seqlens = torch.tensor([2, 8], dtype=torch.int32, device=device)
    args = (case["k_cache"].nan_to_num(), case["v_cache"].nan_to_num(), k, v, seqlens, case["block_table"], backend)
    torch.library.opcheck(torch.ops.fmkernels.append_kv.default, args)


def sampling_inputs(device, seed=0):
    logits, params = random_rows(5, 97, dtype_for(device), torch.Generator().manual_seed(seed), device=device)
    return logits, params


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_filter_logits(backend, device):
    require_backend("filter_logits", backend)
    logits, p = sampling_inputs(device)
    args = (logits, 0.0, p["temperature"], 0, p["top_k"], 0.9, None, 0.0, p["min_p"], None, backend)
    torch.library.opcheck(torch.ops.fmkernels.filter_logits.default, args)
    allowed = half_allowed(logits)
    masked = (logits, 0.7, None, 0, p["top_k"], 0.9, None, 0.0, p["min_p"], allowed, backend)
    torch.library.opcheck(torch.ops.fmkernels.filter_logits.default, masked)


def half_allowed(logits):
    """A packed bitmask allowing a random half of each row's tokens and its largest logit."""
    mask = torch.rand(logits.shape, generator=torch.Generator().manual_seed(2)).to(logits.device) < 0.5
    mask |= logits == logits.amax(dim=1, keepdim=True)
    return fmkernels.pack_allowed(mask)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("logprobs", [(False, 0), (True, 0), (True, 3)])
def test_opcheck_sample(backend, device, logprobs):
    require_backend("sample", backend)
    logits, p = sampling_inputs(device, seed=1)
    seeds = torch.tensor([7, 3, 2**40, 0, 11], device=device)
    allowed = half_allowed(logits)
    args = (logits, 0.0, p["temperature"], 0, p["top_k"], 0.0, p["top_p"], 0.05, None, allowed,
            None, seeds, 4, None, *logprobs, backend)
    torch.library.opcheck(torch.ops.fmkernels.sample.default, args)
    scalar_args = (logits, 0.8, None, 20, None, 0.9, None, 0.0, None, None, 123, None, 0,
                   torch.arange(5, device=device), *logprobs, backend)
    torch.library.opcheck(torch.ops.fmkernels.sample.default, scalar_args)


# linear has no triton or cuda backend: on a GPU the reference is torch's cuBLAS matmul.
LINEAR_BACKENDS = [("reference", "cpu"), ("cpu", "cpu"), pytest.param("reference", "cuda", marks=gpu)]


@pytest.mark.parametrize("backend,device", LINEAR_BACKENDS)
@pytest.mark.parametrize("leading", [(1,), (3,), (2, 5)])
def test_opcheck_linear(backend, device, leading):
    require_backend("linear", backend)
    dtype = dtype_for(device)
    x, weight = randn(*leading, 70, device=device, dtype=dtype, seed=1), randn(33, 70, device=device, dtype=dtype, seed=2)
    torch.library.opcheck(torch.ops.fmkernels.linear.default, (x, weight, backend))


@pytest.mark.parametrize("backend,device", LINEAR_BACKENDS)
@pytest.mark.parametrize("format", ["q4_1", "q6_k"])
def test_opcheck_quantized_linear(backend, device, format):
    """A QuantizedWeight reaches the op as its blocks (uint8) and its format."""
    require_backend("linear", backend)
    x = randn(3, 256, device=device, dtype=dtype_for(device), seed=1)
    weight = fmkernels.quantize(randn(33, 256, seed=2), format).to(device)
    torch.library.opcheck(torch.ops.fmkernels.linear.default, (x, weight.blocks, backend, weight.format))


# ----------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, the eager result
# ----------------------------------------------------------------------------


def compiled(fn, compiler="aot_eager"):
    return torch.compile(fn, fullgraph=True, backend=compiler)


def assert_same(actual, expected):
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compile_attention_and_decode(backend):
    q, k, v = randn(2, 5, 4, 16, seed=1), randn(2, 9, 2, 16, seed=2), randn(2, 9, 2, 16, seed=3)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    case = make_case([3, 12], 2, 4, 2, 16, torch.float32, block_size=4)

    def fn(q, k, v, cu, case):
        out, lse = fmkernels.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        packed = fmkernels.attention(k[0], k[1], v[1], cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)
        decoded, decode_lse = fmkernels.decode_attention(**case, return_lse=True, backend=backend)
        return out * 2, lse, packed, decoded, decode_lse

    assert_same(compiled(fn)(q, k, v, cu, case), fn(q, k, v, cu, case))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compile_sampling(backend):
    logits, p = sampling_inputs("cpu", seed=2)
    seeds = torch.tensor([5, 1, 9, 2, 2])

    def fn(logits, p, seeds):
        filtered = fmkernels.filter_logits(logits, **p, backend=backend)
        tokens = fmkernels.sample(logits, temperature=0.7, top_k=p["top_k"], seed=seeds, step=3, backend=backend)
        with_logprobs = fmkernels.sample(logits, **p, seed=17, step=seeds, return_logprobs=True, num_logprobs=4,
                                         backend=backend)
        return (filtered, tokens, *with_logprobs)

    assert_same(compiled(fn)(logits, p, seeds), fn(logits, p, seeds))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compile_linear(backend):
    x, weight, out = randn(2, 3, 40, seed=1), randn(17, 40, seed=2), torch.zeros(2, 3, 17)

    def fn(x, weight, out):
        projected = fmkernels.linear(x, weight, backend=backend)
        fmkernels.linear(x[0], weight, backend=backend, out=out[0])
        return projected.relu(), out

    eager_out, compiled_out = out.clone(), out.clone()
    assert_same(compiled(fn)(x, weight, compiled_out), fn(x, weight, eager_out))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compile_quantized_linear(backend):
    require_backend("linear", backend)
    x, weight = randn(2, 3, 64, seed=1), fmkernels.quantize(randn(17, 64, seed=2), "q8_0")

    def fn(x):
        return fmkernels.linear(x, weight, backend=backend).relu()

    assert_same((compiled(fn)(x),), (fn(x),))


def test_compiled_ops_check_host_values_at_run_time():
    """Values the traced code cannot read are still checked on the CPU, by the op when it runs."""
    logits, p = sampling_inputs("cpu")
    p["top_p"][3] = 0.0
    with pytest.raises(ValueError, match=r"top_p must be in \(0.0, 1.0\], got top_p\[3\] = 0.0"):
        compiled(lambda logits: fmkernels.sample(logits, **p, seed=1, backend="cpu"))(logits)
    case = make_case([3, 12], 2, 4, 2, 16, torch.float32)
    case["cache_seqlens"][1] = 1
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] must count the 2 new tokens"):
        compiled(lambda case: fmkernels.decode_attention(**case, backend="cpu"))(case)


def test_compile_runs_a_user_registered_backend():
    calls = []

    def mine(logits, **kwargs):
        calls.append(logits.shape)
        return fmkernels.reference.filter_logits(logits, **kwargs)

    registry.register_impl("filter_logits", "mine", mine)
    try:
        logits, p = sampling_inputs("cpu", seed=3)
        fn = compiled(lambda logits: fmkernels.filter_logits(logits, **p, backend="mine"))
        assert torch.equal(fn(logits), fmkernels.filter_logits(logits, **p, backend="reference"))
        assert calls == [logits.shape]
    finally:
        registry.unregister_impl("filter_logits", "mine")


def decode_step(backend, k_cache, v_cache, k, v, q, seqlens, block_table, weight, seeds, steps, attn_out, tokens):
    """One decode step: append the new keys and values, attend, project to logits, sample."""
    fmkernels.append_kv(k_cache, v_cache, k, v, seqlens, block_table=block_table, backend=backend)
    fmkernels.decode_attention(q, k_cache, v_cache, seqlens + 1, block_table=block_table, backend=backend,
                               out=attn_out)
    logits = (attn_out.flatten(1) @ weight).float()
    return fmkernels.sample(logits, temperature=0.8, top_k=40, top_p=0.9, seed=seeds, step=steps, backend=backend,
                            out=tokens)


def decode_inputs(device, dtype, paged, seed=0):
    """Caches and a step's inputs; the new tokens land inside each sequence's valid blocks."""
    generator = torch.Generator().manual_seed(seed)
    case = make_case([9, 30, 17], 1, 8, 2, 64, dtype, block_size=8 if paged else None, seed=seed, device=device)
    lengths = case["cache_seqlens"].cpu()
    seqlens = (torch.rand(3, generator=generator) * lengths).int().to(device)  # < each length
    return dict(
        k_cache=case["k_cache"].nan_to_num(), v_cache=case["v_cache"].nan_to_num(),
        k=randn(3, 1, 2, 64, device=device, dtype=dtype, seed=seed + 1),
        v=randn(3, 1, 2, 64, device=device, dtype=dtype, seed=seed + 2),
        q=case["q"], seqlens=seqlens, block_table=case["block_table"],
        weight=randn(8 * 64, 300, device=device, dtype=dtype, seed=seed + 3) / 20,
        seeds=torch.tensor([3, 1, 4], device=device), steps=torch.tensor([0, 5, 9], device=device),
        attn_out=torch.empty_like(case["q"]), tokens=torch.empty(3, dtype=torch.int64, device=device),
    )


def clone_inputs(inputs):
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


def test_compile_paged_decode_step_with_inductor():
    """The decode step through inductor (the one test paying its start-up, ~30 s), the caches
    updated in place as in eager."""
    eager = decode_inputs("cpu", torch.float32, paged=True)
    traced = clone_inputs(eager)
    expected = decode_step("cpu", **eager)
    actual = torch.compile(decode_step, fullgraph=True)("cpu", **traced)
    assert torch.equal(actual, expected) and actual.data_ptr() == traced["tokens"].data_ptr()
    for key in ("k_cache", "v_cache", "attn_out"):
        assert torch.equal(traced[key], eager[key]), key


def test_compile_model_prefill_and_decode():
    model = Transformer.from_config(ModelConfig.from_name("tiny"), seed=0, backend="cpu")
    forward = compiled(model)
    prompt = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    caches = [model.new_cache(batch=2, max_seq_len=16) for _ in range(2)]
    with torch.no_grad():
        assert torch.equal(forward(prompt), model(prompt))
        prefill = forward(prompt, cache=caches[0])
        assert torch.equal(prefill, model(prompt, cache=caches[1]))
        next_ids = prefill[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(forward(next_ids, cache=caches[0]), model(next_ids, cache=caches[1]))


# ----------------------------------------------------------------------------
# out= buffers
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_out_buffers_are_returned_and_hold_the_result(backend):
    q, k, v = randn(2, 5, 4, 16, seed=1), randn(2, 9, 2, 16, seed=2), randn(2, 9, 2, 16, seed=3)
    case = make_case([3, 12], 2, 4, 2, 16, torch.float32)
    logits, p = sampling_inputs("cpu")
    x, weight = randn(2, 3, 16, seed=4), randn(5, 16, seed=5)
    calls = [
        (fmkernels.linear, (x, weight), {}, torch.empty(2, 3, 5)),
        (fmkernels.attention, (q, k, v), dict(causal=True), q),
        (fmkernels.decode_attention, (), case, case["q"]),
        (fmkernels.filter_logits, (logits,), p, logits),
        (fmkernels.sample, (logits,), dict(p, seed=3), logits[:, 0].long()),
    ]
    for op, args, kwargs, like in calls:
        expected = op(*args, **kwargs, backend=backend)
        out = torch.full_like(like, -7)
        result = op(*args, **kwargs, backend=backend, out=out)
        assert result.data_ptr() == out.data_ptr(), op.__name__
        assert torch.equal(out, expected), op.__name__
    out = torch.full_like(q, -7)
    result, lse = fmkernels.attention(q, k, v, return_lse=True, backend=backend, out=out)
    assert result is out and torch.equal(lse, fmkernels.attention(q, k, v, return_lse=True, backend=backend)[1])
    out = torch.full((5,), -7, dtype=torch.int64)
    result = fmkernels.sample(logits, **p, seed=3, return_logprobs=True, num_logprobs=2, backend=backend, out=out)
    assert result.tokens is out and torch.equal(out, fmkernels.sample(logits, **p, seed=3, backend=backend))


@pytest.mark.parametrize("op", ["decode_attention", "sample"])
def test_out_on_another_device_is_rejected(op):
    case = make_case([3, 12], 2, 4, 2, 16, torch.float32)
    logits, _ = sampling_inputs("cpu")
    call = {
        "decode_attention": lambda out: fmkernels.decode_attention(**case, out=out),
        "sample": lambda out: fmkernels.sample(logits, seed=1, out=out),
    }[op]
    like = case["q"] if op == "decode_attention" else logits[:, 0].long()
    with pytest.raises(ValueError, match="out must be on cpu, got meta"):
        call(torch.empty_like(like, device="meta"))


# ----------------------------------------------------------------------------
# GPU: a decode step without host synchronisation, captured in a CUDA graph
# ----------------------------------------------------------------------------



def decode_step_cases(test):
    """Runs ``test(backend, paged)`` on a GPU for fmkernels' GPU backends and both cache layouts."""

    def run(backend, paged):
        for op in ("append_kv", "decode_attention", "sample"):
            require_backend(op, backend)
        test(backend, paged)

    run.__name__ = test.__name__
    return gpu(pytest.mark.parametrize("paged", [False, True])(pytest.mark.parametrize("backend", ["cuda", "triton"])(run)))


@decode_step_cases
def test_decode_step_does_not_synchronise(backend, paged):
    inputs = decode_inputs("cuda", torch.float16, paged)
    decode_step(backend, **clone_inputs(inputs))  # compiles the Triton kernels, fills the caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with fmkernels.device_checks(False):
            decode_step(backend, **inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
def test_device_checks_report_gpu_values_unless_turned_off():
    logits = torch.randn(3, 50, device="cuda")
    logits[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[1, 7\] = nan"):
        fmkernels.sample(logits, seed=0)
    with pytest.raises(ValueError, match="top_p"):
        fmkernels.sample(logits.nan_to_num(), top_p=torch.tensor([0.5, 1.5, 0.9], device="cuda"), seed=0)
    with fmkernels.device_checks(False):
        tokens = fmkernels.sample(logits.nan_to_num(), top_p=torch.tensor([0.5, 1.0, 0.9], device="cuda"), seed=0)
    assert tokens.shape == (3,) and bool(((tokens >= 0) & (tokens < 50)).all())


@decode_step_cases
def test_decode_step_replays_in_a_cuda_graph(backend, paged):
    static = decode_inputs("cuda", torch.float16, paged)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_step(backend, **clone_inputs(static))  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_step(backend, **static)

    for seed in (1, 2):
        fresh = decode_inputs("cuda", torch.float16, paged, seed=seed)
        fresh["steps"] += seed
        for key, value in fresh.items():
            if key not in ("attn_out", "tokens") and value is not None:
                static[key].copy_(value)
        graph.replay()
        expected = decode_step(backend, **fresh)
        torch.cuda.synchronize()
        assert torch.equal(static["tokens"], expected)
        for key in ("attn_out", "k_cache", "v_cache"):
            assert torch.equal(static[key], fresh[key]), key


def test_device_checks_switch():
    from fmkernels._validation import checks_values

    host, device = torch.zeros(2), torch.empty(2, device="meta")
    assert checks_values(host) and checks_values(device)
    nan_logits = torch.tensor([[0.0, float("nan")]])
    with fmkernels.device_checks(False):
        assert checks_values(host) and not checks_values(device)
        with pytest.raises(ValueError, match=r"logits\[0, 1\] = nan"):  # host values are still checked
            fmkernels.sample(nan_logits, seed=0, backend="reference")
    assert checks_values(device)
    assert fmkernels.set_device_checks(False) is True
    assert fmkernels.set_device_checks(True) is False
    with pytest.raises(TypeError, match="enabled must be a bool, got int"):
        fmkernels.set_device_checks(1)
