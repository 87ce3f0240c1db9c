"""The registry of implementations: users' own, selection by name and by "auto", and --impl loading."""

import math

import pytest
import torch

import fmkernels
from fmkernels import peer_libraries, platform, reference, registry


# Every test leaves the registry as it found it.
pytestmark = pytest.mark.usefixtures("restore_registry")


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(3, 40)


class Spy:
    """An implementation that records its calls and returns a marker result."""

    def __init__(self, result=None):
        self.calls = []
        self.result = result

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.result


def test_user_impl_is_called_by_name_with_the_case(logits):
    marker = torch.randn(3, 40)
    spy = Spy(marker)
    seen = []
    fmkernels.register_impl("filter_logits", "mine", spy, lambda **case: seen.append(case))
    out = torch.randn(3, 40)
    result = fmkernels.filter_logits(logits, top_k=5, backend="mine", out=out)
    assert result is out and torch.equal(out, marker)
    assert len(spy.calls) == 1
    assert spy.calls[0]["logits"] is logits and spy.calls[0]["top_k"] == 5
    # supports() sees the same arguments, by name.
    assert seen[0].keys() == spy.calls[0].keys()


@pytest.mark.parametrize("verdict", [None, True])
def test_supports_none_or_true_accepts(verdict, logits):
    spy = Spy(torch.randn(3, 40))
    fmkernels.register_impl("filter_logits", "mine", spy, lambda **case: verdict)
    fmkernels.filter_logits(logits, backend="mine")
    assert len(spy.calls) == 1


@pytest.mark.parametrize("verdict, message", [
    (False, "its supports\\(\\) predicate rejects this case"),
    ("vocab 40 is not a multiple of 64", "vocab 40 is not a multiple of 64"),
])
def test_supports_false_or_reason_rejects_without_calling(verdict, message, logits):
    spy = Spy()
    fmkernels.register_impl("filter_logits", "mine", spy, lambda **case: verdict)
    with pytest.raises(ValueError, match=f"backend 'mine' cannot run this filter_logits call: {message}"):
        fmkernels.filter_logits(logits, backend="mine")
    assert spy.calls == []


def test_supports_can_depend_on_the_case(logits):
    spy = Spy(torch.randn(3, 40))
    fmkernels.register_impl("filter_logits", "greedy_only", spy,
                            lambda *, temperature, **case: None if temperature == 0 else "greedy rows only")
    fmkernels.filter_logits(logits, temperature=0.0, backend="greedy_only")
    with pytest.raises(ValueError, match="greedy rows only"):
        fmkernels.filter_logits(logits, temperature=0.5, backend="greedy_only")
    assert len(spy.calls) == 1


def test_devices_and_availability_are_reasons_too(logits):
    fmkernels.register_impl("filter_logits", "gpu_only", Spy(), devices=("cuda",))
    with pytest.raises(ValueError, match="runs on cuda tensors; logits is on cpu"):
        fmkernels.filter_logits(logits, backend="gpu_only")
    fmkernels.register_impl("filter_logits", "absent", Spy(), available=lambda: "libfoo missing")
    with pytest.raises(ValueError, match="not available: libfoo missing"):
        fmkernels.filter_logits(logits, backend="absent")


@pytest.mark.parametrize("kind", ["user", "peer"])
def test_auto_never_picks_user_or_peer_impls(kind, logits):
    spy = Spy(torch.randn(3, 40))
    fmkernels.register_impl("filter_logits", "eager", spy, kind=kind, priority=10**9)
    assert fmkernels.filter_logits(logits, top_p=0.9).equal(reference.filter_logits(logits, top_p=0.9))
    assert registry.select("filter_logits", "auto", {"logits": logits}).kind == "backend"
    assert spy.calls == []


def test_auto_picks_the_highest_priority_backend_that_supports_the_case(logits):
    # The counterpart of the test above: a backend-kind implementation is picked by priority.
    marker = torch.randn(3, 40)
    fmkernels.register_impl("filter_logits", "fast", Spy(marker), kind="backend", priority=10**9)
    fmkernels.register_impl("filter_logits", "faster", Spy(), lambda **case: "not this case",
                            kind="backend", priority=10**9 + 1)
    assert torch.equal(fmkernels.filter_logits(logits), marker)


def test_auto_never_picks_a_named_only_backend(logits):
    """A backend registered named_only (one not yet run where it is meant to run) is passed
    over by auto whatever its priority, and runs when named."""
    marker = torch.randn(3, 40)
    spy = Spy(marker)
    fmkernels.register_impl("filter_logits", "untried", spy, kind="backend", priority=10**9,
                            named_only="not run on a GPU yet")
    assert registry.select("filter_logits", "auto", {"logits": logits}).name != "untried"
    assert fmkernels.filter_logits(logits).equal(reference.filter_logits(logits))
    assert spy.calls == []
    assert torch.equal(fmkernels.filter_logits(logits, backend="untried"), marker)
    for impl in registry.implementations("filter_logits"):
        if impl.name != "untried":
            registry.unregister_impl("filter_logits", impl.name)
    with pytest.raises(ValueError, match=r"untried: runs only when named \(not run on a GPU yet\)"):
        fmkernels.filter_logits(logits)


def test_auto_with_no_backend_able_lists_every_reason(logits):
    for impl in registry.implementations("filter_logits"):
        registry.unregister_impl("filter_logits", impl.name)
    fmkernels.register_impl("filter_logits", "picky", Spy(), lambda **case: "too picky", kind="backend")
    fmkernels.register_impl("filter_logits", "absent", Spy(), kind="backend", available=lambda: "not built")
    with pytest.raises(ValueError, match=r"no backend can run this filter_logits call \(") as error:
        fmkernels.filter_logits(logits)
    assert "picky: too picky" in str(error.value) and "absent: not available: not built" in str(error.value)


def test_user_append_kv_impl_gets_every_argument():
    torch.manual_seed(1)
    spy = Spy()
    fmkernels.register_impl("append_kv", "mine", spy)
    k_cache, v_cache = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
    k, v = torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8)
    seqlens = torch.tensor([0, 3], dtype=torch.int32)
    fmkernels.append_kv(k_cache, v_cache, k, v, seqlens, backend="mine")
    assert spy.calls == [dict(k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=seqlens, block_table=None)]


def test_duplicate_names_need_replace(logits):
    first, second = Spy(torch.randn(3, 40)), Spy(torch.randn(3, 40))
    fmkernels.register_impl("filter_logits", "mine", first)
    with pytest.raises(ValueError, match="filter_logits already has an implementation named 'mine'; pass replace=True"):
        fmkernels.register_impl("filter_logits", "mine", second)
    with pytest.raises(ValueError, match="already has an implementation named 'reference'"):
        fmkernels.register_impl("filter_logits", "reference", second)
    fmkernels.register_impl("filter_logits", "mine", second, replace=True)
    assert torch.equal(fmkernels.filter_logits(logits, backend="mine"), second.result)
    assert first.calls == []


def test_same_name_may_serve_several_ops():
    fmkernels.register_impl("filter_logits", "mine", Spy())
    fmkernels.register_impl("sample", "mine", Spy())
    assert registry.get_impl("sample", "mine").op == "sample"


def test_unregister_removes_the_name(logits):
    fmkernels.register_impl("filter_logits", "mine", Spy(torch.randn(3, 40)))
    fmkernels.unregister_impl("filter_logits", "mine")
    assert "mine" not in [impl.name for impl in fmkernels.implementations("filter_logits")]
    with pytest.raises(ValueError, match=r"backend for filter_logits must be 'auto' or one of: .*; got 'mine'"):
        fmkernels.filter_logits(logits, backend="mine")
    with pytest.raises(ValueError, match="filter_logits has no implementation named 'mine'"):
        fmkernels.unregister_impl("filter_logits", "mine")


def test_implementations_lists_backends_by_priority_then_peers_then_users():
    fmkernels.register_impl("append_kv", "a_user", Spy(), priority=100)
    fmkernels.register_impl("append_kv", "z_peer", Spy(), kind="peer")
    impls = fmkernels.implementations("append_kv")
    # A user's priority orders it among users only: kinds come first.
    assert [impl.kind for impl in impls] == sorted((impl.kind for impl in impls), key=registry.KINDS.index)
    # Under the interpreter (no GPU), Triton drops below the reference so "auto" never picks it.
    expected = ["cuda", "cpu", "reference", "triton"] if platform.triton_interpreting() else ["cuda", "triton", "cpu", "reference"]
    assert [impl.name for impl in impls if impl.kind == "backend"] == expected
    names = [impl.name for impl in impls]
    assert names.index("z_peer") < names.index("a_user") == len(names) - 1
    # Peers by name: SDPA's, and flash-attn's and FlashInfer's where installed.
    installed = [name for name, (module, _) in peer_libraries.PEER_LIBRARIES.items() if peer_libraries._installed(module)]
    peers = sorted(["sdpa", "sdpa_cudnn", "sdpa_efficient", "sdpa_flash", "sdpa_math", *installed])
    # triton_hopper takes triton's priority, so it is listed beside it (auto never picks it).
    assert [impl.name for impl in fmkernels.implementations("attention")] == (
        ["cuda", "cpu", "reference", "triton", "triton_hopper"] if platform.triton_interpreting()
        else ["triton", "triton_hopper", "cuda", "cpu", "reference"]
    ) + peers


def test_an_op_registers_only_the_backends_that_implement_it():
    """linear's Triton and CUDA kernels take quantized weights only: they decline a float
    weight, saying cuBLAS (the reference) is the tool, and "auto" never picks them until they
    have run on a GPU."""
    from fmkernels.ops import _backends

    names = [impl.name for impl in fmkernels.implementations("linear")]
    assert sorted(names) == ["cpu", "cuda", "reference", "torch_linear", "triton"]
    for name in ("triton", "cuda"):
        impl = registry.get_impl("linear", name)
        assert impl.named_only and "not yet run on a GPU" in impl.named_only
    float_case = dict(x=torch.randn(2, 8), weight=torch.randn(3, 8))
    assert "float weight" in _backends._triton("linear", "linear")[1](**float_case)
    for op in registry.OPS:
        names = [impl.name for impl in fmkernels.implementations(op)]
        assert ("triton" in names) == (op in _backends.TRITON_MODULES), op
        assert {"reference", "cpu"} <= set(names), op


@pytest.mark.parametrize("call", [
    lambda: fmkernels.register_impl("matmul", "mine", Spy()),
    lambda: fmkernels.unregister_impl("matmul", "mine"),
    lambda: fmkernels.implementations("matmul"),
    lambda: registry.get_impl("Attention", "reference"),
    lambda: registry.select("", "auto", {}),
], ids=["register", "unregister", "implementations", "get_impl", "select"])
def test_unknown_op_is_rejected(call):
    with pytest.raises(ValueError,
                       match="op must be one of attention, decode_attention, append_kv, filter_logits, sample"):
        call()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(name=""), ValueError, "name must be a non-empty string other than 'auto', got ''"),
    (dict(name="auto"), ValueError, "name must be a non-empty string other than 'auto'"),
    (dict(name=3), ValueError, "name must be a non-empty string"),
    (dict(fn="reference"), TypeError, "fn must be callable, got str"),
    (dict(supports=True), TypeError, "supports must be callable or None, got bool"),
    (dict(kind="friend"), ValueError, "kind must be one of backend, peer, user, got 'friend'"),
    (dict(named_only=True), TypeError, "named_only must be a str \\(the reason\\) or None, got bool"),
    (dict(named_only=""), ValueError, "named_only must be a non-empty reason or None"),
], ids=["empty-name", "auto", "int-name", "fn", "supports", "kind", "named-only-type", "named-only-empty"])
def test_register_rejects_bad_arguments(kwargs, error, match):
    arguments = dict(op="filter_logits", name="mine", fn=Spy())
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        fmkernels.register_impl(**arguments)
    assert "mine" not in [impl.name for impl in fmkernels.implementations("filter_logits")]


def test_select_needs_a_string_backend():
    with pytest.raises(TypeError, match="backend must be a str, got int"):
        registry.select("filter_logits", 1, {})


def test_load_impl_imports_module_function_and_registers_it(logits):
    fn = registry.load_impl("fmkernels.reference:filter_logits")
    assert fn is reference.filter_logits
    assert registry.load_impl("math:sqrt") is math.sqrt
    fmkernels.register_impl("filter_logits", "loaded", fn)
    assert torch.equal(fmkernels.filter_logits(logits, top_k=3, backend="loaded"),
                       fmkernels.filter_logits(logits, top_k=3, backend="reference"))


@pytest.mark.parametrize("spec, error, match", [
    ("math.sqrt", ValueError, "--impl must look like module:function, got 'math.sqrt'"),
    ("math:sqrt:x", ValueError, "--impl must look like module:function"),
    (None, ValueError, "--impl must look like module:function, got None"),
    ("fmkernels_no_such_module:f", ValueError,
     "--impl fmkernels_no_such_module:f: cannot import 'fmkernels_no_such_module'"),
    ("math:no_such_function", ValueError, "module 'math' has no attribute 'no_such_function'"),
    ("math:pi", TypeError, "--impl math:pi: 'pi' is not callable"),
], ids=["no-colon", "two-colons", "none", "no-module", "no-attribute", "not-callable"])
def test_load_impl_errors(spec, error, match):
    with pytest.raises(error, match=match):
        registry.load_impl(spec)


def test_an_implementation_without_an_optional_argument_runs_the_calls_that_leave_it_out(restore_registry):
    """``allowed`` came to the sampling ops after implementations of them were written: one whose
    signature lacks it is accepted, called without it, and refuses (by name) the calls that give it."""
    calls = []

    def old_filter(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
        calls.append(temperature)
        return reference.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)

    assert registry.signature_error("filter_logits", old_filter) is None
    impl = registry.register_impl("filter_logits", "old", old_filter)
    assert impl.declines == ("allowed",)
    logits = torch.randn(2, 40)
    assert torch.equal(fmkernels.filter_logits(logits, temperature=0.5, backend="old"),
                       reference.filter_logits(logits, temperature=0.5))
    assert calls == [0.5]
    allowed = torch.full((2, 2), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend 'old' cannot run this filter_logits call: it takes no allowed= argument"):
        fmkernels.filter_logits(logits, allowed=allowed, backend="old")
    assert calls == [0.5]
    # "auto" passes such a call to an implementation that takes the argument.
    assert torch.equal(fmkernels.filter_logits(logits, allowed=allowed), reference.filter_logits(logits, allowed=allowed))

    def takes_everything(logits, **options):
        return reference.filter_logits(logits, **options)

    assert registry.register_impl("filter_logits", "kwargs", takes_everything).declines == ()
    # A required argument still has to be there.
    assert "cannot take filter_logits's arguments" in registry.signature_error(
        "filter_logits", lambda logits, *, temperature=1.0, allowed=None: logits)
