"""fmkernels.model tokenizers: the byte-level fallback, a Hugging Face tokenizer.json built
here with `tokenizers` (with its special tokens and chat template), and streaming decode of
multi-byte UTF-8. GGUF tokenizers: test_model_gguf.py."""

import json

import pytest

from fmkernels.model import ByteTokenizer, StreamDecoder, load_tokenizer

from _model_checks import save_wordlevel_tokenizer

TEXTS = ["hello world", "naïve café — 東京 🚀", "", "a\nb\tc"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text, add_special_tokens=True)
    assert with_bos[0] == tok.bos_token_id and tok.decode(with_bos + [tok.eos_token_id]) == text


def test_byte_tokenizer_fits_the_tiny_vocabulary():
    from fmkernels.model import ModelConfig

    assert ByteTokenizer.vocab_size <= ModelConfig.from_name("tiny").vocab_size
    assert ByteTokenizer().eos_token_id == 257


def test_hf_tokenizer_from_tokenizer_json_round_trips(tmp_path):
    save_wordlevel_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("the cat") == tok.encode("the cat")
    ids = tok.encode("the cat sat on the mat")
    assert len(ids) == 6 and tok.decode(ids) == "the cat sat on the mat"
    assert tok.eos_token_id == tok.tokenizer.token_to_id("</s>")
    assert tok.decode(ids + [tok.eos_token_id]) == "the cat sat on the mat"  # special tokens skipped


def test_hf_tokenizer_without_config_has_no_eos(tmp_path):
    save_wordlevel_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    assert load_tokenizer(tmp_path).eos_token_id is None


def test_hf_tokenizer_special_tokens_and_chat_template(tmp_path):
    save_wordlevel_tokenizer(tmp_path)
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert (tok.bos_token_id, tok.eos_token_id) == (tok.tokenizer.token_to_id("<s>"), tok.tokenizer.token_to_id("</s>"))
    assert tok.chat_template == template and tok.eot_token_id is None
    assert tok.add_bos_token is False and tok.encode("the cat")[0] != tok.bos_token_id
    # transformers >= 4.50 writes the template to chat_template.jinja, which wins; older ones a list of named ones.
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_tokenizer(tmp_path).chat_template == "{{ messages[0]['content'] }}"
    (tmp_path / "chat_template.jinja").unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": template}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).chat_template == template


def test_hf_tokenizer_adds_bos_where_its_post_processor_does(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = save_wordlevel_tokenizer(tmp_path)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos_token is True and tok.encode("the cat")[0] == bos
    assert tok.encode("the cat", add_special_tokens=False)[0] != bos
    assert tok.decode(tok.encode("the cat")) == "the cat"
    assert tok.decode(tok.encode("the cat"), skip_special_tokens=False) == "<s> the cat"
    assert tok.chat_template is None


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_missing_tokenizers_package_is_a_clear_error(tmp_path, monkeypatch):
    save_wordlevel_tokenizer(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)
    with pytest.raises(ImportError, match="needs the 'tokenizers' package"):
        load_tokenizer(tmp_path)


def test_stream_decoder_yields_only_complete_utf8():
    tok = ByteTokenizer()
    text = "ab東京🚀é"
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in tok.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    # The three bytes of 東 give "", "", "東"; the four of 🚀 three "" then "🚀".
    assert pieces[2:5] == ["", "", "東"] and pieces[8:12] == ["", "", "", "🚀"]
    assert stream.flush() == ""


def test_stream_decoder_flushes_an_incomplete_character():
    stream = StreamDecoder(ByteTokenizer())
    assert stream.push(0xE6) == "" and stream.flush() == "\ufffd"


def test_stream_decoder_keeps_spaces_between_words(tmp_path):
    save_wordlevel_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    stream = StreamDecoder(tok)
    text = "".join(stream.push(i) for i in tok.encode("the dog ate the cat food"))
    assert text == "the dog ate the cat food"
    # After a prompt, the first new word keeps the space that separates it from the prompt.
    prompt = tok.encode("the dog")
    stream = StreamDecoder(tok, prompt)
    assert [stream.push(i) for i in tok.encode("ate food")] == [" ate", " food"]
