"""The real trained checkpoint end to end (SmolLM2-135M-Instruct, Q4_1 GGUF), dequantized to
fp32 as transformers reads it: chat answers, ragged batches and shared prompt prefixes against
transformers reading the same file, and the command line. The logits and greedy-token
comparisons are in test_model_gguf.py; the model keeping the file's blocks (the CPU's default)
against this one in test_model_quantized.py."""


import pytest
import torch

from fmkernels.cli import main as cli_main
from fmkernels.model import chat, generate, load_pretrained, load_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string."]
PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


@pytest.fixture(scope="module")
def real(smollm2_gguf, smollm2_transformers):
    """(fmkernels' fp32 model on the cpu backend, dequantized as transformers' is, our tokenizer,
    transformers' model and tokenizer). The int8 activations of the quantized kernel reverse a
    near-tie at the first question's first token (test_model_quantized.py), so transformers'
    answers are held to the dequantized model."""
    model = load_pretrained(smollm2_gguf, dtype=torch.float32, backend="cpu", weights="dequantized")
    return (model, load_tokenizer(smollm2_gguf), *smollm2_transformers)


def _hf_greedy(hf, ids, new_tokens, eos_token_id=None):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos_token_id,
                          pad_token_id=hf.config.pad_token_id)
    return out[0, len(ids):].tolist()


def test_the_template_and_end_of_turn_are_the_checkpoints(real):
    _, tokenizer, _, hf_tokenizer = real
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    ids = chat.apply_chat_template(tokenizer, messages)
    assert ids == list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
    assert chat.end_of_turn_token_id(tokenizer) == hf_tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("question, new_tokens", zip(QUESTIONS, (48, 20)))
def test_chat_answer_equals_transformers(real, question, new_tokens):
    model, tokenizer, hf, hf_tokenizer = real
    messages = [{"role": "user", "content": question}]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    theirs = _hf_greedy(hf, list(ids), new_tokens, eos_token_id=end)
    ours = generate(model, messages=messages, tokenizer=tokenizer, max_new_tokens=new_tokens, return_result=True)
    assert ours.tokens[0] == theirs
    answer = hf_tokenizer.decode(theirs, skip_special_tokens=True)
    assert ours.texts[0] == answer and answer.strip()
    assert ours.finish_reasons[0] == ("eos" if theirs[-1] == end else "length")


def test_ragged_batch_gives_each_prompt_its_own_tokens(real):
    model, tokenizer, _, _ = real
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    prompts.append(chat.apply_chat_template(tokenizer, [{"role": "user", "content": QUESTIONS[1]}]))
    assert len({len(p) for p in prompts}) == len(prompts)  # ragged on purpose
    batch = generate(model, prompts, max_new_tokens=16, ignore_eos=True)
    for prompt, tokens in zip(prompts, batch):
        assert tokens == generate(model, [prompt], max_new_tokens=16, ignore_eos=True)[0]


@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_samples_share_the_prompt_and_match_separate_prompts(real, kv_cache):
    model, tokenizer, _, _ = real
    prompt = tokenizer.encode(PROMPTS[0])
    options = dict(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=5, kv_cache=kv_cache, ignore_eos=True)
    shared = generate(model, [prompt], num_samples=4, **options)
    # Sample j draws with seed + j: the same as four one-sample prompts with those seeds.
    separate = generate(model, [prompt] * 4, **options)
    assert shared == separate
    assert len({tuple(t) for t in shared}) > 1  # the samples differ from one another


def test_generate_chat_on_the_command_line(real, smollm2_gguf, capsys):
    model, tokenizer, _, _ = real
    status = cli_main(["generate", "--model", smollm2_gguf, "--chat", QUESTIONS[0], "--max-new-tokens", "16",
                       "--backend", "cpu", "--dtype", "float32", "--weights", "dequantized"])
    out = capsys.readouterr().out
    assert status == 0
    expected = generate(model, messages=[{"role": "user", "content": QUESTIONS[0]}], tokenizer=tokenizer,
                        max_new_tokens=16, return_result=True)
    assert out.splitlines()[0] == expected.texts[0].splitlines()[0]
    assert "prefill:" in out and "decode:" in out and "tokens/s" in out
