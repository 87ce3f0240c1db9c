"""Structured output (fmkernels.model.structured) end to end on the real trained checkpoint the
test suite has (SmolLM2-135M-Instruct), and its errors on the tiny random model.

Every output under a JSON schema parses with json.loads and validates with jsonschema, under
greedy decoding, sampling at temperature 1, beam search and best-of-n; regex outputs match
re.fullmatch; a batch that mixes constrained and free prompts gives each prompt the tokens it
gets alone.
"""

import json
import re
import sys

import pytest

from fmkernels.model import ByteTokenizer, ModelConfig, Transformer, generate, structured

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "height_m": {"type": "number", "minimum": 0.3, "maximum": 2.5},
        "role": {"enum": ["engineer", "doctor", "artist"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
ORDER = {  # nested objects, arrays of objects, enums, numbers, required fields
    "type": "object",
    "properties": {
        "customer": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99999},
                                                   "vip": {"type": "boolean"}},
                     "required": ["id", "vip"], "additionalProperties": False},
        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "object",
                            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                           "quantity": {"type": "integer", "minimum": 1, "maximum": 9}},
                            "required": ["sku", "quantity"], "additionalProperties": False}},
        "priority": {"enum": ["low", "high"]},
    },
    "required": ["customer", "items", "priority"],
    "additionalProperties": False,
}
TAGS = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 4}
SCHEMAS = {"person": PERSON, "order": ORDER, "tags": TAGS}
QUESTIONS = {
    "person": "Describe a fictional person as JSON.",
    "order": "Write a JSON order for two items.",
    "tags": "List some colours as a JSON array.",
}
MODES = {
    "greedy": dict(),
    "sampled": dict(temperature=1.0, seed=7),
    "beams": dict(num_beams=3),
    "best_of": dict(num_samples=3, best_of=True, temperature=1.0, seed=11),
}


@pytest.fixture(scope="module")
def real(smollm2_gguf, smollm2_cpu):
    from fmkernels.model import load_tokenizer

    return smollm2_cpu, load_tokenizer(smollm2_gguf)


def chat(question):
    return [{"role": "user", "content": question}]


# Every mode on the small schemas; the nested order schema (the longest outputs) greedy and sampled.
@pytest.mark.parametrize("schema_name, mode", [(name, mode) for name in SCHEMAS for mode in MODES
                                               if name != "order" or mode in ("greedy", "sampled")])
def test_every_output_validates_against_its_schema(real, schema_name, mode):
    model, tokenizer = real
    schema = SCHEMAS[schema_name]
    result = generate(model, messages=chat(QUESTIONS[schema_name]), tokenizer=tokenizer, max_new_tokens=120,
                      constraint=structured.json_schema(schema), return_result=True, **MODES[mode])
    assert result.finish_reasons == ["eos"], result.texts
    assert result.tokens[0][-1] in model.config.eos_token_ids
    jsonschema.validate(json.loads(result.texts[0]), schema)


@pytest.mark.parametrize("options", [dict(), dict(temperature=1.0, seed=3), dict(num_samples=4, temperature=1.2, seed=5)],
                         ids=["greedy", "sampled", "samples"])
def test_regex_outputs_match_in_full(real, options):
    model, tokenizer = real
    patterns = [r"[0-9]{3}-[0-9]{4}", r"(yes|no), because [a-z ]{5,30}\.", r"#[0-9a-f]{6}"]
    result = generate(model, messages=[chat("What is your phone number?"), chat("Is the sky blue?"),
                                       chat("Pick a colour.")], tokenizer=tokenizer, max_new_tokens=40,
                      constraint=[structured.regex(p) for p in patterns], return_result=True, **options)
    n = options.get("num_samples", 1)
    for row, text in enumerate(result.texts):
        assert re.fullmatch(patterns[row // n], text), (patterns[row // n], text)
        assert result.finish_reasons[row] == "eos"


def test_grammar_json_object_and_choices(real):
    model, tokenizer = real
    constraints = [
        structured.grammar('start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]{0,3}/'),
        structured.json_object(),
        structured.choices(["Paris", "London", "Rome"]),
    ]
    questions = ["How many legs does a spider have?", 'Reply with the JSON object {"ok": true}.',
                 "What is the capital of France?"]
    result = generate(model, messages=[chat(q) for q in questions], tokenizer=tokenizer, max_new_tokens=60,
                      constraint=constraints, return_result=True)
    assert re.fullmatch(r"The answer is [1-9][0-9]{0,3}\.", result.texts[0])
    assert isinstance(json.loads(result.texts[1]), dict)
    assert result.texts[2] == "Paris"
    assert result.finish_reasons == ["eos"] * 3


# Each cache layout once, each with one way of drawing (the four pairs took a minute on a 2-core CPU).
@pytest.mark.parametrize("kv_cache, options", [("contiguous", dict()), ("paged", dict(temperature=1.0, seed=21, top_p=0.9))],
                         ids=["contiguous-greedy", "paged-sampled"])
def test_a_mixed_batch_gives_each_prompt_its_tokens_alone(real, options, kv_cache):
    model, tokenizer = real
    conversations = [chat(QUESTIONS["person"]), chat("Say hello."), chat("Give a hex colour."), chat("Count to 3.")]
    constraints = [structured.json_schema(PERSON), None, structured.regex(r"#[0-9a-f]{6}"), None]
    common = dict(tokenizer=tokenizer, max_new_tokens=40, kv_cache=kv_cache, block_size=16, **options)
    together = generate(model, messages=conversations, constraint=constraints, **common)
    for b, (conversation, constraint) in enumerate(zip(conversations, constraints)):
        if "seed" in options:  # prompt b draws with seed + b in the batch
            common["seed"] = options["seed"] + b
        alone = generate(model, messages=conversation, constraint=constraint, **common)
        assert together[b] == alone[0], b


def test_a_complete_output_ends_even_with_ignore_eos(real):
    model, tokenizer = real
    result = generate(model, messages=chat("Three digits please."), tokenizer=tokenizer, max_new_tokens=20,
                      constraint=structured.regex("[0-9]{3}"), ignore_eos=True, return_result=True)
    assert re.fullmatch("[0-9]{3}", result.texts[0]) and result.finish_reasons == ["eos"]


def test_the_budget_cuts_an_incomplete_output(real):
    model, tokenizer = real
    result = generate(model, messages=chat(QUESTIONS["order"]), tokenizer=tokenizer, max_new_tokens=5,
                      constraint=structured.json_schema(ORDER), return_result=True)
    assert result.finish_reasons == ["length"] and len(result.tokens[0]) == 5
    assert result.texts[0].startswith("{")


def test_a_pydantic_style_class_and_a_schema_dict_are_taken_as_json_schemas(real):
    model, tokenizer = real

    class Colour:  # what generate reads of a pydantic model class
        @classmethod
        def model_json_schema(cls):
            return {"type": "object", "properties": {"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
                    "required": ["hex"], "additionalProperties": False}

    for constraint in (Colour, Colour.model_json_schema(), structured.json_schema(json.dumps(Colour.model_json_schema()))):
        text = generate(model, messages=chat("A colour as JSON."), tokenizer=tokenizer, max_new_tokens=30,
                        constraint=constraint, return_result=True).texts[0]
        jsonschema.validate(json.loads(text), Colour.model_json_schema())


# ---------------------------------------------------------------- errors, on the tiny model

@pytest.fixture(scope="module")
def tiny():
    return Transformer.from_config(ModelConfig.from_name("tiny"), seed=0, backend="cpu")


class NoToken(structured.Constraint):
    """A constraint whose matcher allows nothing after its first token."""

    kind = "no_token"

    class _Matcher(structured.Matcher):
        def __init__(self, steps=0):
            self.steps, self.constraint = steps, None

        def fill(self, row):
            row[:] = 0
            if self.steps == 0:
                row[0] = 1 << 5

        def consume(self, token):
            self.steps += 1

        def fork(self):
            copy = NoToken._Matcher(self.steps)
            copy.constraint = self.constraint
            return copy

    def compile(self, tokenizer, vocab_size, eos_token_ids):
        matcher = NoToken._Matcher()
        matcher.constraint = self
        return matcher


def test_a_constraint_that_allows_no_token_names_the_prompt(tiny):
    with pytest.raises(ValueError, match=r"no_token\(None\) allows no token at prompt 1, step 1"):
        generate(tiny, [[1, 2], [3]], max_new_tokens=4, tokenizer=ByteTokenizer(), constraint=[None, NoToken(None)])
    with pytest.raises(ValueError, match=r"allows no token at prompt 0, beam 0, step 1"):
        generate(tiny, [[1, 2]], max_new_tokens=4, tokenizer=ByteTokenizer(), constraint=NoToken(None), num_beams=2)


def test_choices_need_no_grammar_engine(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    tok = ByteTokenizer()
    result = generate(tiny, [tok.encode("Q: ")], max_new_tokens=8, tokenizer=tok,
                      constraint=structured.choices(["yes", "no"]), return_result=True)
    assert result.texts[0] in ("yes", "no") and result.finish_reasons == ["eos"]


def test_a_missing_grammar_engine_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    for make in (lambda: structured.json_schema({"type": "object"}), structured.json_object,
                 lambda: structured.regex("a+"), lambda: structured.grammar('start: "a"')):
        with pytest.raises(ImportError, match=r"pip install 'fmkernels\[structured\]'"):
            make()


@pytest.mark.parametrize("make, error, message", [
    (lambda: structured.json_schema("{not json"), ValueError, "schema is not valid JSON"),
    (lambda: structured.json_schema(3), TypeError, "schema must be a dict"),
    (lambda: structured.json_schema({}, whitespace="none"), ValueError, "whitespace must be one of 'pretty'"),
    (lambda: structured.json_schema({"type": "nonsense"}), ValueError, "not a JSON schema llguidance can enforce"),
    (lambda: structured.regex("(unclosed"), ValueError, "not a regular expression llguidance accepts"),
    (lambda: structured.regex(""), ValueError, "pattern must be a non-empty str"),
    (lambda: structured.grammar("start: undefined_rule"), ValueError, "the grammar does not compile"),
    (lambda: structured.choices("yes"), TypeError, "options must be a list of strings"),
    (lambda: structured.choices(["yes", ""]), ValueError, "non-empty strings"),
])
def test_bad_constraints_are_named(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("options, error, message", [
    (dict(constraint="json"), TypeError, "constraint must be a fmkernels.model.structured constraint"),
    (dict(constraint=[None]), ValueError, r"a list of one per prompt \(2\), got a list of 1"),
    (dict(constraint=[None, 5]), TypeError, r"constraint\[1\] must be"),
    (dict(constraint=structured.choices(["a"]), allowed_tokens=lambda b, g: None), ValueError,
     "pass constraint or allowed_tokens, not both"),
    (dict(constraint={"type": "object"}), ValueError, "constraint needs the tokenizer"),
    (dict(constraint={"type": "object"}, tokenizer=ByteTokenizer()), ValueError, "need a Hugging Face tokenizer"),
])
def test_bad_generate_constraints_are_named(tiny, options, error, message):
    with pytest.raises(error, match=message):
        generate(tiny, [[1, 2], [3]], max_new_tokens=4, **options)


# ---------------------------------------------------------------- the command line

def test_generate_command_line_constraints(smollm2_gguf, tmp_path, capsys):
    from fmkernels.cli import main as cli_main

    schema = {"type": "object", "properties": {"legs": {"type": "integer", "minimum": 0, "maximum": 8}},
              "required": ["legs"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "answer.lark").write_text('start: "It has " /[0-9]/ " legs."')
    common = ["generate", "--model", smollm2_gguf, "--chat", "How many legs does a cat have?", "--max-new-tokens",
              "24", "--dtype", "float32"]
    for flags, check in [
        (["--json-schema", str(tmp_path / "schema.json")], lambda text: jsonschema.validate(json.loads(text), schema)),
        (["--json-schema", json.dumps(schema)], lambda text: jsonschema.validate(json.loads(text), schema)),
        (["--grammar", str(tmp_path / "answer.lark")], lambda text: re.fullmatch("It has [0-9] legs.", text)),
    ]:  # (each call loads the checkpoint: --regex and --choices take the same path)
        assert cli_main(common + flags) == 0
        text = capsys.readouterr().out.split("\nprefill:")[0].strip()
        assert check(text) is not False, (flags, text)


@pytest.mark.parametrize("flags, message", [
    (["--regex", "(unclosed"], "not a regular expression llguidance accepts"),
    (["--json-schema", "/no/such/file.json"], "No such file"),
    (["--regex", "a", "--choices", "b"], "not allowed with argument"),
])
def test_generate_command_line_constraint_errors(flags, message, capsys):
    from fmkernels.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["generate", "--model", "tiny", "--prompt", "x"] + flags)
    assert message in capsys.readouterr().err
