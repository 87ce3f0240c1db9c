"""GenerationConfig: validated when made, frozen, replaced field by field; generate(model,
prompts, config) with keyword overrides; per-prompt sampling values, which give each prompt the
tokens a run of that prompt alone with its values gives, on the plain and the static-buffer
decode step."""

import dataclasses

import pytest
import torch

from fmkernels.model import GenerationConfig, ModelConfig, Transformer, generate

PROMPTS = [[1, 2, 3], [7], [5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def model():
    return Transformer.from_config(ModelConfig.from_name("tiny"), seed=0, backend="cpu")


def test_a_config_and_the_same_keywords_generate_the_same_tokens(model):
    config = GenerationConfig(max_new_tokens=7, temperature=0.9, top_k=20, seed=4, kv_cache="paged", block_size=4)
    by_config = generate(model, PROMPTS, config)
    assert by_config == generate(model, PROMPTS, max_new_tokens=7, temperature=0.9, top_k=20, seed=4,
                                 kv_cache="paged", block_size=4)
    # Keywords override the config's fields, and leave the config as it was.
    assert generate(model, PROMPTS, config, seed=5) == generate(model, PROMPTS, config.replace(seed=5))
    assert generate(model, PROMPTS, config, seed=5) != by_config
    assert config.seed == 4


def test_the_config_is_frozen_and_replace_checks_again():
    config = GenerationConfig(max_new_tokens=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.temperature = 1.0
    assert config.replace(top_p=0.5).top_p == 0.5 and config.top_p == 1.0
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        config.replace(top_p=0.0)
    with pytest.raises(TypeError, match="GenerationConfig has no field 'top_q'"):
        config.replace(top_q=0.5)


def test_sequences_become_tuples_so_a_config_compares_and_hashes():
    a = GenerationConfig(max_new_tokens=3, stop_token_ids=[5, 6], stop_strings="END", temperature=[0.5, 1.0])
    b = GenerationConfig(max_new_tokens=3, stop_token_ids=(5, 6), stop_strings=("END",), temperature=(0.5, 1.0))
    assert a == b and hash(a) == hash(b)
    assert a.stop_token_ids == (5, 6) and a.stop_strings == ("END",) and a.temperature == (0.5, 1.0)
    assert a.per_prompt and not GenerationConfig(max_new_tokens=3).per_prompt
    assert GenerationConfig(max_new_tokens=3, top_k=torch.tensor([1, 2])).top_k == (1, 2)


@pytest.mark.parametrize("fields, error, message", [
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1, got 0"),
    (dict(max_new_tokens=2.0), ValueError, "max_new_tokens must be an int >= 1"),
    (dict(temperature=-0.5), ValueError, "temperature must be a number >= 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a number >= 0"),
    (dict(temperature=[0.5, -1.0]), ValueError, r"temperature\[1\] must be a number >= 0 \(0 is greedy\), got -1.0"),
    (dict(temperature=[]), ValueError, "temperature must be a value or a non-empty sequence"),
    (dict(top_k=1.5), ValueError, "top_k must be an int >= 0"),
    (dict(top_k=True), ValueError, "top_k must be an int >= 0"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(min_p=[0.1, 2.0]), ValueError, r"min_p\[1\] must be in \[0, 1\]"),
    (dict(seed=-1), ValueError, r"seed must be None or an int in \[0, 2\*\*62\)"),
    (dict(seed=1.0), ValueError, "seed must be None or an int"),
    (dict(stop_token_ids=[-1]), ValueError, "stop_token_ids must be token ids >= 0, got -1"),
    (dict(stop_token_ids="a"), TypeError, "stop_token_ids must be a sequence of token ids, got str"),
    (dict(stop_strings=[""]), ValueError, "stop_strings must be non-empty strings"),
    (dict(stop_strings=3), TypeError, "stop_strings must be a string or a sequence of strings, got int"),
    (dict(ignore_eos=1), TypeError, "ignore_eos must be a bool, got int"),
    (dict(return_result="yes"), TypeError, "return_result must be a bool, got str"),
    (dict(num_samples=0), ValueError, "num_samples must be an int >= 1"),
    (dict(best_of=1), TypeError, "best_of must be a bool"),
    (dict(num_beams=0), ValueError, "num_beams must be an int >= 1"),
    (dict(num_beams=2, temperature=0.5), ValueError, "num_beams is deterministic beam search"),
    (dict(num_beams=2, num_samples=2), ValueError, "num_beams cannot be combined"),
    (dict(num_beams=2, stop_strings=["x"]), ValueError, "num_beams does not support stop_strings"),
    (dict(length_penalty=float("inf")), ValueError, "length_penalty must be a finite number"),
    (dict(num_logprobs=-1), ValueError, "num_logprobs must be an int >= 0"),
    (dict(num_logprobs=2), ValueError, r"num_logprobs > 0 needs return_logprobs=True"),
    (dict(allowed_tokens=[1]), TypeError, "allowed_tokens must be callable"),
    (dict(allowed_tokens=lambda b, g: None, constraint={"type": "object"}), ValueError,
     "pass constraint or allowed_tokens, not both"),
    (dict(kv_cache="ring"), ValueError, "kv_cache must be 'contiguous' or 'paged', got 'ring'"),
    (dict(block_size=0), ValueError, "block_size must be an int >= 1, got 0"),
    (dict(cuda_graphs="on"), ValueError, "cuda_graphs must be 'auto', True or False, got 'on'"),
])
def test_bad_fields_are_named_when_the_config_is_made(fields, error, message):
    with pytest.raises(error, match=message):
        GenerationConfig(**dict(dict(max_new_tokens=4), **fields))


def test_generate_names_what_only_the_model_can_check(model):
    with pytest.raises(ValueError, match=r"temperature has 2 values, one per prompt, for 3 prompts"):
        generate(model, PROMPTS, max_new_tokens=2, temperature=[0.5, 0.7])
    with pytest.raises(ValueError, match=r"stop_token_ids must be token ids in \[0, 512\), got 600"):
        generate(model, PROMPTS, max_new_tokens=2, stop_token_ids=[600])
    with pytest.raises(ValueError, match=r"num_logprobs must be an int in \[0, vocab=512\], got 513"):
        generate(model, PROMPTS, max_new_tokens=2, return_logprobs=True, num_logprobs=513)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        generate(model, PROMPTS, max_new_tokens=2, temprature=0.5)
    with pytest.raises(TypeError, match="config must be a GenerationConfig, got dict"):
        generate(model, PROMPTS, {"max_new_tokens": 2})
    with pytest.raises(TypeError, match="generate needs a GenerationConfig or max_new_tokens"):
        generate(model, PROMPTS)


PER_PROMPT = dict(temperature=(0.0, 0.8, 1.3), top_k=(0, 5, 0), top_p=(1.0, 1.0, 0.7), min_p=(0.0, 0.05, 0.0))


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["plain", "static"])
@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_per_prompt_values_give_each_prompt_its_own_run(model, cuda_graphs, kv_cache):
    config = GenerationConfig(max_new_tokens=9, seed=11, ignore_eos=True, kv_cache=kv_cache, block_size=4,
                              return_logprobs=True, cuda_graphs=cuda_graphs, **PER_PROMPT)
    batch = generate(model, PROMPTS, config)
    for b, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], config.replace(seed=11 + b, cuda_graphs=False,
                                                         **{name: values[b] for name, values in PER_PROMPT.items()}))
        assert batch.tokens[b] == alone.tokens[0]
        assert batch.logprobs[b] == alone.logprobs[0]
    # The values did something: the greedy row is not the sampled rows' values' run.
    hot = generate(model, PROMPTS, config.replace(temperature=1.3, top_k=0, top_p=0.7, min_p=0.0))
    assert hot.tokens[0] != batch.tokens[0]


def test_per_prompt_values_are_shared_by_a_prompts_samples(model):
    config = GenerationConfig(max_new_tokens=6, seed=2, num_samples=2, ignore_eos=True,
                              temperature=(0.0, 1.0, 0.5))
    rows = generate(model, PROMPTS, config)
    assert rows[0] == rows[1]  # greedy: both samples of prompt 0 are the same
    for row, prompt in enumerate(b for b in range(3) for _ in range(2)):
        alone = generate(model, [PROMPTS[prompt]], config.replace(num_samples=1, seed=2 + row,
                                                                   temperature=config.temperature[prompt]))
        assert rows[row] == alone[0]


def test_stopping_rows_leave_with_their_values(model):
    # Rows that stop early leave the batch; the rows left keep their own values.
    free = generate(model, PROMPTS, max_new_tokens=10, ignore_eos=True, temperature=(0.0, 0.9, 0.0), seed=1)
    stop = free[0][2]
    stopped = generate(model, PROMPTS, max_new_tokens=10, ignore_eos=True, temperature=(0.0, 0.9, 0.0), seed=1,
                       stop_token_ids=[stop])
    for b in range(3):
        end = free[b].index(stop) + 1 if stop in free[b] else len(free[b])
        assert stopped[b] == free[b][:end]
