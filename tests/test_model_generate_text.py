"""fmkernels.model.generation.generate with text: stop strings, EOS from the config or the tokenizer,
log-probabilities against the model's own logits, and the streaming callback."""

import dataclasses

import pytest
import torch

from fmkernels.model import GenerationResult, ModelConfig, Transformer, generate

TINY = ModelConfig.from_name("tiny")
PROMPTS = [[3, 14, 15, 92, 65], [35], list(range(40, 60)), [8, 9, 7, 9, 3, 2, 3]]


class AngleTokenizer:
    """Token i decodes to "<i>", so a stop string can begin or end inside a token."""

    def __init__(self, eos_token_id=None):
        self.eos_token_id = eos_token_id

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def model():
    return Transformer.from_config(TINY, seed=0, backend="cpu")


@pytest.fixture(scope="module")
def free(model):
    return generate(model, PROMPTS, max_new_tokens=10)


@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_stop_string_ends_only_the_sequence_that_holds_it(model, free, kv_cache):
    tok = AngleTokenizer()
    t = free[2]
    stop = f"{t[3]}><{t[4]}"  # starts inside token 3's text, ends inside token 4's
    result = generate(model, PROMPTS, max_new_tokens=10, stop_strings=[stop, "never"], tokenizer=tok,
                      kv_cache=kv_cache, block_size=4, return_result=True)
    assert isinstance(result, GenerationResult)
    for b, full in enumerate(free):
        text = tok.decode(full)
        if stop in text:
            kept = next(n for n in range(1, 11) if stop in tok.decode(full[:n]))
            assert result.tokens[b] == full[:kept] and result.finish_reasons[b] == "stop_string"
            assert result.texts[b] == text[:text.index(stop)]
        else:
            assert result.tokens[b] == full and result.finish_reasons[b] == "length"
            assert result.texts[b] == text
    assert result.tokens[2] == t[:5] and result.texts[2] == tok.decode(t[:3]) + "<"
    assert any(reason == "length" for reason in result.finish_reasons)  # the others ran on


def test_stop_strings_need_a_tokenizer(model):
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        generate(model, PROMPTS, max_new_tokens=4, stop_strings=["x"])
    with pytest.raises(ValueError, match="stop_strings must be non-empty strings"):
        generate(model, PROMPTS, max_new_tokens=4, stop_strings=[""], tokenizer=AngleTokenizer())


def test_eos_from_the_config_stops_by_default(free):
    eos = free[1][2]
    model = Transformer.from_config(dataclasses.replace(TINY, eos_token_ids=(eos, 511)), seed=0, backend="cpu")
    result = generate(model, PROMPTS, max_new_tokens=10, return_result=True)
    assert result.tokens[1] == free[1][:3] and result.finish_reasons[1] == "eos"
    for tokens, full in zip(result.tokens, free):
        assert tokens == (full[:full.index(eos) + 1] if eos in full else full)
    assert generate(model, PROMPTS, max_new_tokens=10, ignore_eos=True) == free


def test_eos_of_the_tokenizer_stops_by_default(model, free):
    eos = free[0][4]
    tokens = generate(model, PROMPTS, max_new_tokens=10, tokenizer=AngleTokenizer(eos_token_id=eos))
    assert tokens[0] == free[0][:free[0].index(eos) + 1]


def test_eos_token_id_of_a_checkpoint_config_int_or_list():
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=64, rms_norm_eps=1e-6, architectures=["LlamaForCausalLM"])
    assert ModelConfig.from_hf_config(dict(base, eos_token_id=2)).eos_token_ids == (2,)
    assert ModelConfig.from_hf_config(dict(base, eos_token_id=[2, 7])).eos_token_ids == (2, 7)
    assert ModelConfig.from_hf_config(base).eos_token_ids == ()
    with pytest.raises(ValueError, match="eos_token_ids must be token ids in"):
        ModelConfig.from_hf_config(dict(base, eos_token_id=96))


def test_logprobs_are_the_log_softmax_of_the_models_logits(model):
    # fmkernels.sample's logprob is under the distribution drawn from: at temperature 1 with no
    # filter, log_softmax of the logits.
    result = generate(model, PROMPTS[:3], max_new_tokens=6, temperature=1.0, seed=4, return_logprobs=True,
                      num_logprobs=3)
    sampled = generate(model, PROMPTS[:3], max_new_tokens=6, temperature=1.0, seed=4)
    assert result.tokens == sampled  # asking for logprobs changes no token
    for b, prompt in enumerate(PROMPTS[:3]):
        tokens = result.tokens[b]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:]  # [new, V]
        expected = torch.log_softmax(logits.double(), dim=-1)
        actual = torch.tensor(result.logprobs[b], dtype=torch.float64)
        assert (actual - expected[torch.arange(len(tokens)), torch.tensor(tokens)]).abs().max() < 1e-4
        top = torch.topk(expected, 3, dim=-1)
        assert result.top_ids[b] == top.indices.tolist()
        assert (torch.tensor(result.top_logprobs[b], dtype=torch.float64) - top.values).abs().max() < 1e-4


def test_greedy_logprobs_are_zero_and_the_default_return_is_unchanged(model, free):
    result = generate(model, PROMPTS, max_new_tokens=10, return_logprobs=True)
    assert result.tokens == free and result.texts is None and result.top_ids is None
    assert all(value == 0.0 for row in result.logprobs for value in row)
    assert generate(model, PROMPTS, max_new_tokens=10) == free
    with pytest.raises(ValueError, match="num_logprobs > 0 needs return_logprobs=True"):
        generate(model, PROMPTS, max_new_tokens=2, num_logprobs=2)


def test_on_token_streams_every_token_in_order(model, free):
    calls = []
    tokens = generate(model, PROMPTS, max_new_tokens=10, on_token=lambda b, token: calls.append((b, token)))
    assert tokens == free
    for b, full in enumerate(free):
        assert [token for index, token in calls if index == b] == full
    assert calls[:len(PROMPTS)] == [(b, free[b][0]) for b in range(len(PROMPTS))]
    with pytest.raises(TypeError, match="on_token must be callable"):
        generate(model, PROMPTS, max_new_tokens=2, on_token=3)
