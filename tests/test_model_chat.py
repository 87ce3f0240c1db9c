"""Chat templates: rendered as transformers renders them (its own renderer is the truth here),
encoded without added special tokens, and the end-of-turn token found from the template."""

import pytest

from fmkernels.model import ByteTokenizer, chat, generate

transformers_chat = pytest.importorskip("transformers.utils.chat_template_utils")

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's shape: the BOS written by the template, whitespace trimmed, a header per turn.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral's shape: roles must alternate (raise_exception), the EOS closes an assistant turn,
# and block tags on their own lines (trim_blocks / lstrip_blocks decide the whitespace).
MISTRAL = """{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + message['content'] + ' [/INST]' }}
    {% else %}
        {{ message['content'] + eos_token }}
    {% endif %}
{% endfor %}
"""
# tojson (no HTML escaping), loop controls and a namespace.
TOOLS = """{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
<{{ message['role'] }}>{{ message['content'] }}</{{ message['role'] }}>
{% endfor %}
{% if tools %}tools: {{ tools | tojson }}{% endif %}
count: {{ ns.n }}
"""

CONVERSATION = [
    {"role": "user", "content": "  What is 2 + 2? <b>& é</b>"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
]


class TemplateTokenizer(ByteTokenizer):
    """The byte-level tokenizer with a chat template and special-token strings."""

    bos_token, eos_token = "<s>", "</s>"

    def __init__(self, template):
        self.chat_template = template


def transformers_render(template, messages, add_generation_prompt, **variables):
    rendered = transformers_chat.render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt,
        bos_token="<s>", eos_token="</s>", **variables,
    )
    return rendered[0][0] if isinstance(rendered, tuple) else rendered[0]


@pytest.mark.parametrize("template", [CHATML, LLAMA3, MISTRAL, TOOLS], ids=["chatml", "llama3", "mistral", "tools"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_transformers(template, add_generation_prompt):
    tokenizer = TemplateTokenizer(template)
    variables = {"tools": [{"name": "add", "description": "a <b> & c é"}]} if template is TOOLS else {}
    messages = CONVERSATION if template is not TOOLS else [{"role": "system", "content": "s"}] + CONVERSATION
    ours = chat.render(tokenizer, messages, add_generation_prompt=add_generation_prompt, **variables)
    assert ours == transformers_render(template, messages, add_generation_prompt, **variables)
    assert ours  # a template that rendered nothing would make the comparison empty


def test_apply_chat_template_encodes_without_special_tokens():
    tokenizer = TemplateTokenizer(CHATML)
    ids = chat.apply_chat_template(tokenizer, CONVERSATION)
    assert ids == list(chat.render(tokenizer, CONVERSATION).encode("utf-8"))
    assert tokenizer.bos_token_id not in ids


def test_template_exception_is_a_value_error():
    tokenizer = TemplateTokenizer(MISTRAL)
    with pytest.raises(ValueError, match="roles must alternate"):
        chat.render(tokenizer, [{"role": "assistant", "content": "first"}])


def test_sandboxed():
    tokenizer = TemplateTokenizer("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|access"):
        chat.render(tokenizer, CONVERSATION)


@pytest.mark.parametrize("messages, error, match", [
    ("hello", TypeError, "list of"),
    ([], ValueError, "at least one message"),
    (["hello"], TypeError, r"messages\[0\] must be a dict"),
    ([{"role": "user"}], ValueError, r"messages\[0\] must have a str 'content'"),
    ([{"role": 1, "content": "x"}], ValueError, r"messages\[0\] must have a str 'role'"),
])
def test_bad_messages(messages, error, match):
    with pytest.raises(error, match=match):
        chat.render(TemplateTokenizer(CHATML), messages)


def test_no_template():
    with pytest.raises(ValueError, match="no chat template"):
        chat.render(ByteTokenizer(), CONVERSATION)


class SpecialTokenizer(TemplateTokenizer):
    """Byte tokens, plus the given special tokens as single ids >= 300 that decode to nothing."""

    def __init__(self, template, specials, **ids):
        super().__init__(template)
        self.specials = {text: 300 + i for i, text in enumerate(specials)}
        for name, value in ids.items():
            setattr(self, name, value)

    def encode(self, text, *, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            match = next((s for s in self.specials if text.startswith(s, i)), None)
            if match:
                ids.append(self.specials[match])
                i += len(match)
            else:
                ids.extend(text[i].encode("utf-8"))
                i += 1
        return ids

    def decode(self, ids):
        return super().decode([i for i in ids if i < 256])


@pytest.mark.parametrize("template, specials, expected", [
    (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    (MISTRAL, ["<s>", "</s>"], "</s>"),
])
def test_end_of_turn_from_the_template(template, specials, expected):
    tokenizer = SpecialTokenizer(template, specials, eos_token_id=7)
    assert chat.end_of_turn_token_id(tokenizer) == tokenizer.specials[expected]


def test_end_of_turn_falls_back_to_the_tokenizer():
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert chat.end_of_turn_token_id(SpecialTokenizer(plain, [], eos_token_id=7)) == 7
    assert chat.end_of_turn_token_id(SpecialTokenizer(plain, [], eot_token_id=9, eos_token_id=7)) == 9


# -- generate(messages=...) -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    from fmkernels.model import ModelConfig, Transformer

    return Transformer.from_config(ModelConfig.from_name("tiny"), seed=3, backend="cpu")


def _forced(tokens):
    """An allowed_tokens callback that allows only tokens[step] at each step."""
    return lambda prompt_index, generated: [tokens[len(generated)]]


def test_generate_messages_is_the_templated_prompt_and_stops_at_end_of_turn(tiny_model):
    tokenizer = SpecialTokenizer(CHATML, ["<|im_start|>", "<|im_end|>"])
    end = tokenizer.specials["<|im_end|>"]
    prompt = chat.apply_chat_template(tokenizer, CONVERSATION)
    ours = generate(tiny_model, messages=CONVERSATION, tokenizer=tokenizer, max_new_tokens=6, return_result=True,
                    allowed_tokens=_forced([ord("4"), ord("."), end, 1, 2, 3]))
    assert ours.tokens == [[ord("4"), ord("."), end]] and ours.finish_reasons == ["eos"]
    assert ours.texts == ["4."]
    # Without a forced end, the same tokens as the prompt given as ids (greedy).
    free = generate(tiny_model, messages=CONVERSATION, tokenizer=tokenizer, max_new_tokens=5, ignore_eos=True)
    assert free == generate(tiny_model, [prompt], tokenizer=tokenizer, max_new_tokens=5, ignore_eos=True)
    # ignore_eos also ignores the end of turn.
    forced = _forced([end, end, end])
    assert generate(tiny_model, messages=CONVERSATION, tokenizer=tokenizer, max_new_tokens=3, ignore_eos=True,
                    allowed_tokens=forced) == [[end, end, end]]


def test_generate_a_batch_of_conversations(tiny_model):
    tokenizer = SpecialTokenizer(CHATML, ["<|im_start|>", "<|im_end|>"])
    second = [{"role": "user", "content": "Hi"}]
    batch = generate(tiny_model, messages=[CONVERSATION, second], tokenizer=tokenizer, max_new_tokens=4)
    alone = [generate(tiny_model, messages=m, tokenizer=tokenizer, max_new_tokens=4)[0] for m in (CONVERSATION, second)]
    assert batch == alone


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(messages=CONVERSATION), ValueError, "need a tokenizer"),
    (dict(messages=CONVERSATION, prompts=[[1, 2]], tokenizer=TemplateTokenizer(CHATML)), ValueError, "not both"),
    (dict(messages=[CONVERSATION, "x"], tokenizer=TemplateTokenizer(CHATML)), TypeError, r"messages\[1\]"),
    (dict(messages=CONVERSATION, tokenizer=ByteTokenizer()), ValueError, "no chat template"),
    (dict(), TypeError, "prompts .* or messages"),
])
def test_generate_messages_errors(tiny_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(tiny_model, max_new_tokens=2, **kwargs)
