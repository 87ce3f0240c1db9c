"""attn_implementation="fmkernels" in Hugging Face transformers models, against transformers' own
eager and sdpa attention on the same weights: logits within DESIGN.md's attention tolerance
(against an fp64 eager run), identical greedy tokens through ``generate`` with its dynamic and
static caches, unpadded, left- and right-padded batches; the masks fmkernels cannot express
raise. The real checkpoint the test suite has (SmolLM2-135M-Instruct) likewise."""


import pytest
import torch

transformers = pytest.importorskip("transformers")

import _bench_scripts  # noqa: E402
import fmkernels.integrations.transformers as integration  # noqa: E402
from fmkernels.integrations.transformers import PaddingMask, padding_mask  # noqa: E402

BACKENDS = ["reference", "cpu"]
VOCAB = 113


def _name(backend):
    """attn_implementation names, one per backend, registered once."""
    name = f"fmkernels_{backend}"
    integration.register(name, backend=backend)
    return name


def _config(arch, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
    elif arch == "mistral":
        config = transformers.MistralConfig(sliding_window=64, **common)
    elif arch == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **common)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(use_sliding_window=False, **common)
    else:
        raise AssertionError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


ARCHS = ["llama", "mistral", "mixtral", "qwen2"]
MODELS = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
          "mixtral": transformers.MixtralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    torch.manual_seed(ARCHS.index(request.param))
    return MODELS[request.param](_config(request.param)).eval()


def _batch(padding, batch=3, length=13, seed=0):
    """Token ids and a 2D attention mask: no padding, left padding or right padding, ragged."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate([0, 5, 1, 8][:batch]):
        if padding == "left" and pad:
            mask[row, :pad] = 0
        elif padding == "right" and pad:
            mask[row, length - pad:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _logits(model, implementation, ids, mask, dtype=torch.float32):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model.to(dtype)(ids, attention_mask=mask).logits.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_within_the_attention_tolerance_of_sdpa(model, backend, padding):
    ids, mask = _batch(padding)
    truth = _logits(model.double(), "eager", ids, mask)
    sdpa = _logits(model, "sdpa", ids, mask)
    ours = _logits(model, _name(backend), ids, mask)
    eager = _logits(model, "eager", ids, mask)
    valid = mask.bool()  # padded positions' outputs are not defined the same way by any two
    ours_error = (ours - truth)[valid].abs().max()
    peer_error = torch.maximum((sdpa - truth)[valid].abs().max(), (eager - truth)[valid].abs().max())
    assert ours_error <= 2 * peer_error + 1e-5, (float(ours_error), float(peer_error))


@pytest.mark.parametrize("padding", ["none", "left"])
def test_bfloat16_logits_within_the_tolerance(model, padding):
    ids, mask = _batch(padding, seed=1)
    truth = _logits(model.double(), "eager", ids, mask)
    sdpa = _logits(model, "sdpa", ids, mask, torch.bfloat16)
    ours = _logits(model, _name("cpu"), ids, mask, torch.bfloat16)
    model.float()
    valid = mask.bool()
    ours_error = (ours - truth)[valid].abs().max()
    assert ours_error <= 2 * (sdpa - truth)[valid].abs().max() + 1e-5


def _generate(model, implementation, ids, mask, **options):
    model.float().set_attn_implementation(implementation)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                              eos_token_id=None, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["none", "left"])
def test_greedy_generate_equals_sdpa_with_the_dynamic_cache(model, backend, padding):
    ids, mask = _batch(padding, seed=2)
    assert torch.equal(_generate(model, _name(backend), ids, mask), _generate(model, "sdpa", ids, mask))


@pytest.mark.parametrize("padding", ["none", "left"])
def test_greedy_generate_equals_sdpa_with_a_static_cache(model, padding):
    ids, mask = _batch(padding, seed=3)
    options = dict(cache_implementation="static")
    assert torch.equal(_generate(model, "fmkernels", ids, mask, **options), _generate(model, "sdpa", ids, mask, **options))


def test_which_op_runs_and_what_it_reads(monkeypatch):
    """Unpadded prompts: attention on views of transformers' tensors; decode steps (dynamic
    cache) and a static cache's unfilled tail: decode_attention on views; padding: packed."""
    calls = []

    def recording(name, op):
        def call(q, k, v, *args, **kwargs):
            calls.append((name, k.is_contiguous(), tuple(q.shape), kwargs))
            return op(q, k, v, *args, **kwargs)
        return call

    monkeypatch.setattr(integration, "attention", recording("attention", integration.attention))
    monkeypatch.setattr(integration, "decode_attention", recording("decode_attention", integration.decode_attention))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config("llama", num_hidden_layers=1)).eval()
    ids, mask = _batch("none")
    _generate(model, "fmkernels", ids, mask)
    assert [c[0] for c in calls] == ["attention"] + ["decode_attention"] * 9
    assert "cu_seqlens_q" not in calls[0][3] and calls[0][2] == (3, 13, 4, 16)
    # (batch, seqlen, heads, head_dim) views of transformers' (batch, heads, seqlen, head_dim): no copy.
    assert not any(contiguous for _, contiguous, _, _ in calls)
    calls.clear()
    _generate(model, "fmkernels", ids, mask, cache_implementation="static")
    assert [c[0] for c in calls] == ["decode_attention"] * 10  # the static cache's keys end past the tokens
    assert not any(contiguous for _, contiguous, _, _ in calls)
    calls.clear()
    ids, mask = _batch("left")
    _generate(model, "fmkernels", ids, mask)
    assert [c[0] for c in calls] == ["attention"] + ["decode_attention"] * 9
    # The packed prompt holds the tokens that are not padding: 13 + 8 + 12 of 3 x 13.
    assert "cu_seqlens_q" in calls[0][3] and calls[0][2] == (33, 4, 16)
    # Left-padded decode steps: one-position blocks over transformers' cache, skipping the padding.
    for _, contiguous, shape, kwargs in calls[1:]:
        assert not contiguous and shape == (3, 1, 4, 16) and kwargs["block_table"].shape[0] == 3


def test_the_default_name_runs_on_auto():
    assert integration.NAME == "fmkernels"
    model = transformers.AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="fmkernels").eval()
    assert model.config._attn_implementation == "fmkernels"
    ids, mask = _batch("left", seed=4)
    assert torch.equal(_generate(model, "fmkernels", ids, mask), _generate(model, "sdpa", ids, mask))


# -- masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_length, kv_length, q_offset", [(9, 9, 0), (1, 12, 11), (3, 12, 9), (4, 20, 6)])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_padding_mask_equals_transformers_mask_on_every_query_that_is_not_padding(q_length, kv_length, q_offset,
                                                                                   padding):
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    generator = torch.Generator().manual_seed(q_length * kv_length)
    batch = 4
    length = q_offset + q_length  # the 2D mask covers the keys seen so far
    valid = torch.ones(batch, length, dtype=torch.bool)
    for row in range(1, batch):
        pad = int(torch.randint(0, length, (), generator=generator))
        if padding == "left":
            valid[row, :pad] = False
        elif padding == "right":
            valid[row, length - pad:] = False
    ours = padding_mask(batch, q_length, kv_length, q_offset, 0, causal_mask_function, valid)
    theirs = sdpa_mask(batch_size=batch, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=0,
                       mask_function=causal_mask_function, attention_mask=valid, allow_is_causal_skip=False)
    if ours is None:  # every row sees every key: the ops' plain bottom-right causal mask
        plain = torch.ones(q_length, kv_length, dtype=torch.bool).tril(kv_length - q_length)
        assert q_offset == kv_length - q_length and torch.equal(theirs[:, 0], plain.expand(batch, -1, -1))
        return
    rows = ours.valid_queries("cpu")[:, None, :, None]
    assert bool(((ours.dense("cpu") == theirs) | ~rows).all())
    # A query the mask calls padding is one that transformers' own 2D mask marks padding.
    positions = torch.arange(q_length) + q_offset
    padded = ~valid[:, positions.clamp(max=length - 1)]
    assert not bool((ours.valid_queries("cpu") & padded).any())


def test_a_mask_without_padding_is_none():
    from transformers.masking_utils import causal_mask_function

    assert padding_mask(2, 5, 5, 0, 0, causal_mask_function, None) is None
    assert padding_mask(2, 1, 7, 6, 0, causal_mask_function, torch.ones(2, 7, dtype=torch.bool)) is None


def test_ones_that_are_not_one_run_raise():
    from transformers.masking_utils import causal_mask_function

    valid = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="one run of ones.*row 1 is 1011"):
        padding_mask(2, 4, 4, 0, 0, causal_mask_function, valid)


def test_a_dense_mask_raises():
    model = transformers.LlamaForCausalLM(_config("llama")).eval()
    model.set_attn_implementation("fmkernels")
    ids = torch.randint(3, VOCAB, (1, 6))
    dense = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="dense mask fmkernels cannot express"):
        with torch.no_grad():
            model(ids, attention_mask=dense)


def test_a_sliding_window_shorter_than_the_keys_raises_and_a_longer_one_runs():
    torch.manual_seed(0)
    short = transformers.MistralForCausalLM(_config("mistral", sliding_window=4)).eval()
    ids, mask = _batch("none", batch=1)
    short.set_attn_implementation("fmkernels")
    with pytest.raises(ValueError, match="sliding window"):
        with torch.no_grad():
            short(ids, attention_mask=mask)
    long = transformers.MistralForCausalLM(_config("mistral", sliding_window=ids.shape[1])).eval()
    assert torch.allclose(_logits(long, "fmkernels", ids, mask), _logits(long, "sdpa", ids, mask), atol=1e-5)


def test_qwen2_sliding_window_layers_raise_once_the_window_hides_keys():
    config = transformers.Qwen2Config(**{**_config("qwen2").to_dict(), "use_sliding_window": True,
                                         "sliding_window": 4, "max_window_layers": 0, "layer_types": None})
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    assert "sliding_attention" in model.config.layer_types
    ids, mask = _batch("none", batch=1)
    model.set_attn_implementation("fmkernels")
    with pytest.raises(ValueError, match="sliding window|hides keys"):
        with torch.no_grad():
            model(ids, attention_mask=mask)


def test_softcap_sinks_and_dropout_raise():
    forward = integration.AttentionInterface()["fmkernels"]
    module = torch.nn.Module()
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="soft-capping"):
        forward(module, q, k, k, None, softcap=30.0)
    with pytest.raises(ValueError, match="s_aux"):
        forward(module, q, k, k, None, s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="dropout"):
        forward(module, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="at least as many keys"):
        forward(module, q, k[:, :, :2], k[:, :, :2], None)
    with pytest.raises(ValueError, match="query must be"):
        forward(module, q[0], k, k, None)
    out, weights = forward(module, q, k, k, None, scaling=0.5)
    assert weights is None and out.shape == (1, 3, 4, 16)


def test_register_checks_its_arguments():
    with pytest.raises(ValueError, match="'/'"):
        integration.register("org/kernel")
    with pytest.raises(TypeError, match="backend must be a str"):
        integration.register("fmkernels_x", backend=1)


def test_padding_mask_reports_its_shape():
    mask = PaddingMask([0, 2], [5, 5], 4, 1, 5, True)
    assert mask.shape == (2, 1, 1, 5) and not mask.is_plain and mask.queries_end_runs


# -- the real checkpoint ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_transformers):
    """The session's transformers model and tokenizer, given back with their attention
    implementation and padding side as they were."""
    model, tokenizer = smollm2_transformers
    attention, padding_side = model.config._attn_implementation, tokenizer.padding_side
    yield model, tokenizer
    model.set_attn_implementation(attention)
    tokenizer.padding_side = padding_side


PROMPTS = ["The history of the printing press begins", "def fibonacci(n):\n", "Paris is"]


def test_real_checkpoint_logits_and_greedy_tokens_equal_sdpa(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not bool(mask.all())  # ragged: left-padded on purpose
    valid = mask.bool()
    ours, sdpa, eager = (_logits(model, name, ids, mask) for name in (_name("cpu"), "sdpa", "eager"))
    assert (ours - eager)[valid].abs().max() <= 2 * (sdpa - eager)[valid].abs().max() + 1e-4
    tokens = {}
    for name in (_name("cpu"), "sdpa"):
        model.set_attn_implementation(name)
        with torch.no_grad():
            tokens[name] = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    assert torch.equal(tokens[_name("cpu")], tokens["sdpa"])


# -- FilterLogits ------------------------------------------------------------------------------


def _warpers(temperature, top_k, top_p, min_p):
    """The warpers transformers' generate builds for these parameters (bench/transformers_integration.py's)."""
    return _bench_scripts.load("transformers_integration").transformers_warpers(temperature, top_k, top_p, min_p)


PARAMETERS = [(1.0, 0, 1.0, 0.0), (0.7, 50, 1.0, 0.0), (1.3, 0, 0.9, 0.0), (0.8, 40, 0.95, 0.05),
              (1.0, 0, 1.0, 0.1), (0.6, 1, 1.0, 0.0), (2.0, 5000, 0.5, 0.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, top_k, top_p, min_p", PARAMETERS)
@pytest.mark.parametrize("batch, vocab", [(1, 1000), (5, 4099), (3, 49152)])
def test_filter_logits_keeps_the_tokens_transformers_warpers_keep(backend, temperature, top_k, top_p, min_p, batch,
                                                                  vocab):
    generator = torch.Generator().manual_seed(batch * vocab + top_k)
    scores = torch.randn(batch, vocab, generator=generator) * 3
    ids = torch.zeros(batch, 1, dtype=torch.long)
    theirs = _warpers(temperature, top_k, top_p, min_p)(ids, scores.clone())
    processor = integration.FilterLogits(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                         backend=backend)
    ours = processor(ids, scores.clone())
    kept = torch.isfinite(theirs)
    differ = kept != torch.isfinite(ours)
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    # Both filters sum probabilities in fp32: only a cut their rounding decides may differ.
    assert _bench_scripts.load("transformers_integration").at_rounding_cut(scores, params, differ)
    both = kept & torch.isfinite(ours)
    torch.testing.assert_close(ours[both], theirs[both], rtol=1e-6, atol=1e-6)


def test_filter_logits_samples_transformers_tokens_in_generate():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config("llama")).eval()
    ids, mask = _batch("left", seed=5)
    options = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        torch.manual_seed(7)
        theirs = model.generate(ids, temperature=0.8, top_k=20, top_p=0.9, **options)
        torch.manual_seed(7)
        processor = integration.FilterLogits(temperature=0.8, top_k=20, top_p=0.9, backend="reference")
        ours = model.generate(ids, temperature=1.0, top_k=None, top_p=1.0, logits_processor=[processor], **options)
    assert torch.equal(ours, theirs)


def test_filter_logits_checks_its_parameters():
    with pytest.raises(ValueError, match="top_p"):
        integration.FilterLogits(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        integration.FilterLogits(temperature=-1.0)
    with pytest.raises(TypeError, match="top_k"):
        integration.FilterLogits(top_k=2.5)
    with pytest.raises(TypeError, match="backend must be a str"):
        integration.FilterLogits(backend=None)
    assert "top_k=3" in repr(integration.FilterLogits(top_k=3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_tokens_after_a_left_padded_cache_equal_sdpa(model, backend):
    """Three tokens at once after a cached, left-padded prompt (as assisted decoding feeds
    them): decode_attention over one-position blocks that skip each row's padding."""
    ids, mask = _batch("left", seed=6)
    more = torch.randint(3, VOCAB, (ids.shape[0], 3), generator=torch.Generator().manual_seed(6))
    full = torch.cat([mask, torch.ones_like(more)], dim=1)
    logits = {}
    for name in (_name(backend), "sdpa"):
        model.float().set_attn_implementation(name)
        with torch.no_grad():
            cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
            logits[name] = model(more, attention_mask=full, past_key_values=cache).logits
    torch.testing.assert_close(logits[_name(backend)], logits["sdpa"], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("padding", ["none", "left"])
def test_greedy_generate_on_a_gpu_equals_sdpa(padding):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config("llama")).eval().cuda()
    ids, mask = (t.cuda() for t in _batch(padding, seed=7))
    assert torch.equal(_generate(model, "fmkernels", ids, mask), _generate(model, "sdpa", ids, mask))
