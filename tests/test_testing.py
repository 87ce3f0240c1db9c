"""fmkernels.testing: its error and tolerance helpers, and check_impl catching wrong implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from fmkernels import reference, registry, testing


@pytest.fixture
def register():
    """register(op, fn): a 'user' implementation named after fn, unregistered after the test."""
    registered = []

    def register_for_test(op, fn):
        impl = registry.register_impl(op, f"test:{fn.__name__}", fn, kind="user")
        registered.append(impl)
        return impl

    yield register_for_test
    for impl in registered:
        registry.unregister_impl(impl.op, impl.name)


def case_named(op, text):
    """The CPU case of ``op`` whose name contains ``text``."""
    (case,) = [case for case in testing.cases(op) if text in case.name]
    return case


# ----------------------------------------------------------------------------
# Implementations: right ones written differently from the reference, and wrong ones
# ----------------------------------------------------------------------------


def sdpa_attention(q, k, v, *, causal=False, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False):
    """Correct dense attention through torch SDPA, in fp32, with an explicit bottom-right mask."""
    if cu_seqlens_q is not None or return_lse:
        raise NotImplementedError("dense input without lse only")
    mask = reference.causal_mask(q.shape[1], k.shape[1]) if causal else None
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return torch.nan_to_num(out, nan=0.0).transpose(1, 2).to(q.dtype)  # no visible key: zeros


def top_left_causal_attention(q, k, v, *, causal=False, scale=None, **_):
    """Wrong mask: SDPA's is_causal aligns to the top-left corner."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(),
        is_causal=causal, scale=scale, enable_gqa=True,
    )
    return out.transpose(1, 2).to(q.dtype)


def slightly_off_attention(q, k, v, *, scale=None, **kwargs):
    """Wrong by a little: the scale 0.1% too large (a sloppy rsqrt)."""
    scale = 1.001 / math.sqrt(q.shape[-1]) if scale is None else scale
    return reference.attention(q, k, v, scale=scale, **kwargs)


def last_head_unwritten_decode(q, k_cache, v_cache, cache_seqlens, **kwargs):
    """Leaves the last query head of the output unwritten."""
    out = reference.decode_attention(q, k_cache, v_cache, cache_seqlens, **kwargs)
    unwritten = torch.empty_like(out)
    unwritten[:, :, :-1] = out[:, :, :-1]
    return unwritten


def nan_attention(q, k, v, **kwargs):
    """One NaN element in an otherwise correct output."""
    out = reference.attention(q, k, v, **kwargs)
    out[0, -1, 0, 0] = float("nan")
    return out


def append_all_but_last(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None):
    """Forgets the last new token of every sequence."""
    reference.append_kv(k_cache, v_cache, k[:, :-1], v[:, :-1], cache_seqlens, block_table=block_table)


def filter_ties_by_higher_id(logits, **params):
    """Breaks top-k and top-p ties by the higher token id instead of the lower."""
    return reference.filter_logits(logits.flip(-1), **params).flip(-1)


def sample_next_step(logits, *, step=0, **kwargs):
    """Draws with the next step's random numbers."""
    return reference.sample(logits, step=step + 1, **kwargs)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def test_max_error_counts_nan_and_mismatched_infinities_as_infinite():
    truth = torch.tensor([1.0, float("-inf"), 3.0])
    assert testing.max_error(torch.tensor([1.5, float("-inf"), 3.0]), truth) == 0.5
    assert testing.max_error(torch.tensor([1.0, float("-inf"), float("nan")]), truth) == math.inf
    assert testing.max_error(torch.tensor([1.0, 2.0, 3.0]), truth) == math.inf
    assert testing.max_error(torch.tensor([1.0, float("-inf"), 6.0]), truth, relative=True) == 1.0


def test_attention_tolerance_is_twice_plain_error_plus_floor():
    plain, truth = torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0])
    assert testing.attention_tolerance(plain, truth) == 2 * 0.5 + testing.ATTENTION_ATOL


@pytest.mark.parametrize("op", ["attention", "decode_attention"])
def test_plain_attention_matches_the_reference_in_float64(op):
    """Same conventions as the reference (GQA, bottom-right mask, varlen, paging, empty rows)."""
    plain_fn = testing.plain_attention if op == "attention" else testing.plain_decode_attention
    for case in testing.cases(op):
        kwargs = testing._upcast(case.make_kwargs())
        plain, truth = testing._as_tuple(plain_fn(**kwargs)), testing._as_tuple(getattr(reference, op)(**kwargs))
        for plain_output, true_output in zip(plain, truth):
            assert testing.max_error(plain_output, true_output) < 1e-12, case.name


def test_plain_attention_error_grows_as_precision_drops():
    kwargs = case_named("attention", "sq=113").make_kwargs()
    truth = reference.attention(**testing._upcast(kwargs))[0]
    errors = {}
    for dtype in testing.DTYPES:
        low = {key: value.to(dtype) if torch.is_tensor(value) else value for key, value in kwargs.items()}
        errors[dtype] = testing.max_error(testing.plain_attention(**low)[0], truth)
    assert errors[torch.float32] < 1e-5 < errors[torch.float16] < errors[torch.bfloat16]


def test_value_tolerance_is_two_units_in_the_last_place():
    assert testing.value_tolerance(torch.float16) == 2 * 2.0**-10
    assert testing.value_tolerance(torch.bfloat16) == 2 * 2.0**-7
    assert testing.value_tolerance(torch.float32) == 1e-5


def test_cases_cover_every_dtype_and_grow_on_a_gpu():
    for op in registry.OPS:
        cpu, gpu = testing.cases(op, "cpu"), testing.cases(op, "cuda")
        assert {name.split()[-2] for name in (case.name for case in cpu)} == {"fp32", "fp16", "bf16"}
        assert len(gpu) > len(cpu)
        assert len({case.name for case in gpu}) == len(gpu)


# ----------------------------------------------------------------------------
# check_impl
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("op", registry.OPS)
def test_reference_passes_every_case(op):
    impl = registry.get_impl(op, "reference")
    for case in testing.cases(op, seed=11):
        result = testing.check_impl(impl, case)
        assert result.passed, (case.name, result)
        assert result.max_error <= result.tolerance


def test_a_correct_user_attention_passes(register):
    impl = register("attention", sdpa_attention)
    for case in testing.cases("attention"):
        if "varlen" in case.name or "lse" in case.name:
            with pytest.raises(NotImplementedError):
                testing.check_impl(impl, case)
        else:
            assert testing.check_impl(impl, case).passed, case.name


def test_a_scale_off_by_a_little_fails_in_fp32(register):
    result = testing.check_impl(register("attention", slightly_off_attention), case_named("attention", "sq=17 sk=17"))
    assert not result.passed
    assert result.max_error > result.tolerance
    assert "out error" in result.detail


def test_a_top_left_causal_mask_fails_when_seqlens_differ(register):
    impl = register("attention", top_left_causal_attention)
    square = case_named("attention", "sq=113 sk=113")
    without_lse = testing.Case("attention", square.name, lambda: {**square.make_kwargs(), "return_lse": False})
    assert testing.check_impl(impl, without_lse).passed
    result = testing.check_impl(impl, case_named("attention", "sq=1 sk=113"))
    assert not result.passed


def test_an_unwritten_output_head_fails(register):
    result = testing.check_impl(register("decode_attention", last_head_unwritten_decode),
                                case_named("decode_attention", "seqlens=1,17,113"))
    assert not result.passed


def test_a_nan_output_element_fails_and_is_named(register):
    result = testing.check_impl(register("attention", nan_attention), case_named("attention", "sq=17 sk=17"))
    assert not result.passed
    assert result.max_error == math.inf
    assert "1 NaN elements" in result.detail


def test_an_unwritten_cache_slot_fails(register):
    result = testing.check_impl(register("append_kv", append_all_but_last), case_named("append_kv", "new=5"))
    assert not result.passed
    assert "elements differ" in result.detail


def test_ties_broken_the_wrong_way_fail(register):
    impl = register("filter_logits", filter_ties_by_higher_id)
    assert testing.check_impl(impl, case_named("filter_logits", "vocab=1000 temperature=0.7 top_k=50")).passed
    result = testing.check_impl(impl, case_named("filter_logits", "tied-logits"))
    assert not result.passed
    assert "kept tokens differ" in result.detail


def test_tokens_drawn_with_other_random_numbers_fail(register):
    result = testing.check_impl(register("sample", sample_next_step), case_named("sample", "b=8"))
    assert not result.passed
    assert "differ from the reference's" in result.detail


def near_tie_case():
    """One row whose two best Gumbel scores are 1e-6 apart (relative): token 3 wins, token 5 is second."""
    def make_kwargs():
        logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
        gumbel_noise = testing._filtered_and_gumbel(dict(logits=logits, seed=5))[2]
        logits[0, 3] = 20.0
        winning_score = logits[0, 3] + gumbel_noise[0, 3]
        logits[0, 5] = winning_score * (1 - 1e-6) - gumbel_noise[0, 5]
        return dict(logits=logits, seed=5)

    return testing.Case("sample", "near tie", make_kwargs)


def test_a_near_tie_may_go_either_way_but_a_clear_loss_may_not(register):
    case = near_tie_case()
    assert int(reference.sample(**case.make_kwargs())[0]) == 3

    def second_best(logits, **kwargs):
        return torch.tensor([5])

    def clear_loser(logits, **kwargs):
        return torch.tensor([0])

    result = testing.check_impl(register("sample", second_best), case)
    assert result.passed and "near ties" in result.detail
    assert not testing.check_impl(register("sample", clear_loser), case).passed


def top_p_boundary_case(op):
    """Four tokens tied at the top, each of probability 1/4 (exact in fp32), and top_p 0.5: two
    reach p exactly, so whether the third is kept is fp32 rounding's choice; the fourth (0.75
    before it) is removed whatever the rounding."""
    def make_kwargs():
        logits = torch.full((1, 40), -30.0)
        logits[0, [3, 9, 20, 31]] = 5.0
        kwargs = dict(logits=logits, top_p=0.5)
        if op == "sample":
            kwargs.update(seed=11, return_logprobs=True, num_logprobs=3)
        return kwargs

    return testing.Case(op, "top-p boundary", make_kwargs)


def test_a_token_on_the_top_p_boundary_may_go_either_way_but_no_other(register):
    case = top_p_boundary_case("filter_logits")
    assert torch.isfinite(reference.filter_logits(**case.make_kwargs())[0]).nonzero().flatten().tolist() == [3, 9]

    def keeping(ids):
        def filter_keeping(logits, **params):
            out = torch.full_like(logits, float("-inf"))
            out[0, ids] = logits[0, ids]
            return out
        filter_keeping.__name__ += "_".join(map(str, ids))
        return filter_keeping

    result = testing.check_impl(register("filter_logits", keeping([3, 9, 20])), case)
    assert result.passed and "top-p boundary" in result.detail
    assert not testing.check_impl(register("filter_logits", keeping([3, 9, 20, 31])), case).passed
    assert not testing.check_impl(register("filter_logits", keeping([3])), case).passed


def test_a_sample_on_the_top_p_boundary_is_held_to_the_distribution_it_drew_from(register):
    case = top_p_boundary_case("sample")
    kwargs = case.make_kwargs()
    _, _, noise = testing._filtered_and_gumbel(kwargs)
    three = [3, 9, 20]
    token = three[int(noise[0, three].argmax())]  # the draw among three kept tokens

    def draw_among(logprob):
        def sample_among_three(logits, **kwargs):
            ids = torch.tensor([three])
            return reference.SampleOutput(torch.tensor([token]), torch.tensor([logprob]), ids,
                                          torch.full((1, 3), logprob))
        sample_among_three.__name__ += f"_{logprob:.3f}"
        return sample_among_three

    assert testing.check_impl(register("sample", draw_among(-math.log(3))), case).passed
    # the token of three with the log-probabilities of two: neither distribution
    assert not testing.check_impl(register("sample", draw_among(-math.log(2))), case).passed


def test_check_impl_needs_a_registered_impl_of_the_cases_op():
    loose = registry.Impl("attention", "loose", reference.attention)
    with pytest.raises(ValueError, match="not registered"):
        testing.check_impl(loose, testing.cases("attention")[0])
    with pytest.raises(ValueError, match="the case is for"):
        testing.check_impl(registry.get_impl("sample", "reference"), testing.cases("attention")[0])


def test_run_checks_skips_what_cannot_run_and_fails_what_raises(register):
    def broken(logits, **kwargs):
        raise RuntimeError("kernel exploded")

    register("filter_logits", broken)
    rows = [row for row in testing.run_checks(["filter_logits", "append_kv"]) if row.implementation != "reference"]
    broken_rows = [row for row in rows if row.implementation == "test:broken"]
    assert broken_rows and all(not row.result.passed and "kernel exploded" in row.result.detail for row in broken_rows)
    cuda_rows = [row for row in rows if row.implementation == "cuda"]
    # Without a GPU, one skipped row per op the cuda backend implements.
    assert sorted(row.op for row in cuda_rows) == ["append_kv", "filter_logits"]
    assert all(row.case == "" and row.skipped for row in cuda_rows)


def test_compare_attention_passes_the_reference_and_catches_wrong_results():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 9, 4, 32, generator=generator)
    k = torch.randn(2, 13, 2, 32, generator=generator)
    v = torch.randn(2, 13, 2, 32, generator=generator)
    kwargs = dict(q=q, k=k, v=v, causal=True, return_lse=True)
    out, lse = reference.attention(**kwargs)
    assert testing.compare_attention("attention", kwargs, (out, lse)).passed
    assert not testing.compare_attention("attention", kwargs, (out + 1e-3, lse)).passed
    assert not testing.compare_attention("attention", kwargs, (out, lse - 1e-3)).passed
    wrong_dtype = testing.compare_attention("attention", kwargs, (out.half(), lse))
    assert not wrong_dtype.passed and "float16" in wrong_dtype.detail
    assert not testing.compare_attention("attention", kwargs, (out,)).passed
    with pytest.raises(ValueError, match="op must be"):
        testing.compare_attention("sample", kwargs, out)
