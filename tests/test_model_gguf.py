"""fmkernels.model on GGUF files.

The real SmolLM2-135M-Instruct (Q4_1, with a Q8_0 embedding) against transformers reading the
same file, and the Hugging Face directory transformers writes from it; tiny synthetic files
written here with gguf.GGUFWriter the way llama.cpp's converter writes them (Q/K rows permuted,
shapes in ne order), one per tensor type, against transformers or the model they were written
from -- these are what show the permutation and the dequantization right; tokenizers built
from synthetic vocabularies against transformers'; the errors.
"""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fmkernels.model import ModelConfig, Transformer, generate, load_config, load_pretrained, load_tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

PROMPTS = {
    "text": "The quick brown fox jumps over the lazy dog.",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    if x:\n        return x * 2\n\treturn None\n",
    "naïve café — 東京 🚀🎉 ‽",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces", " ", "\n\n", "a  b   c", "trailing   ", "It's we'll they've", "",
]


def hf_from_gguf(path, **options):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32, **options).eval()


def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def hf_greedy(model, ids, n):
    """transformers' greedy tokens; eos_token_id=None so EOS neither stops nor is masked, as ignore_eos."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, min_new_tokens=n, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def assert_same_tokenizer(ours, theirs, texts):
    for text in texts:
        for special in (True, False):
            ids = theirs(text, add_special_tokens=special)["input_ids"]
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


# --- the real model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf(smollm2_transformers):
    """transformers' model and tokenizer on the file, and its ChatML prompt."""
    model, tokenizer = smollm2_transformers
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    return model, tokenizer, dict(PROMPTS, chat=chat)


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    """Dequantized at load, as transformers does: the weights are then bit-identical to its own
    (the quantized model against this one is test_model_quantized.py's)."""
    return load_pretrained(smollm2_gguf, backend="reference", weights="dequantized")


@pytest.fixture(scope="module")
def hf_directory(hf, tmp_path_factory):
    """What transformers' save_pretrained writes from its GGUF-loaded model (a plain copy of
    it: the GGUF-loaded one refuses to serialise) and tokenizer."""
    model, tokenizer, _ = hf
    path = tmp_path_factory.mktemp("smollm2-hf")
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


#: Greedy tokens held to transformers' on the real file (32 at least, as the quantized-weights work asks).
GREEDY = 32


@pytest.fixture(scope="module")
def expected_greedy(hf):
    model, tokenizer, prompts = hf
    cache = {}

    def tokens(name):
        if name not in cache:
            cache[name] = hf_greedy(model, tokenizer(prompts[name], add_special_tokens=False)["input_ids"], GREEDY)
        return cache[name]

    return tokens


def test_config_from_the_real_file(smollm2_gguf, hf):
    config = load_config(smollm2_gguf)
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.head_dim) == (30, 576, 9, 3, 64)
    assert (config.vocab_size, config.ffn_dim, config.max_seq_len) == (49152, 1536, 8192)
    assert config.tie_embeddings and config.rope_theta == 1e5 and config.rope_scaling is None
    assert config.architecture == "llama" and config.n_experts == 0 and config.eos_token_ids == (2,)
    theirs = hf[0].config
    assert (config.norm_eps, config.rope_theta) == (theirs.rms_norm_eps, theirs.rope_parameters["rope_theta"])
    assert (config.n_kv_heads, config.ffn_dim) == (theirs.num_key_value_heads, theirs.intermediate_size)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_real_logits_match_transformers(ours, hf, backend):
    """Full-forward logits within 1e-4 of transformers' in fp32. The weights are bit-identical
    (both dequantize with gguf); what is left is fp32 rounding, about 6e-5 on either side
    against a float64 run of the same weights."""
    model, tokenizer, prompts = hf
    ours.backend = backend
    for name, text in prompts.items():
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected, actual = model(ids).logits, ours(ids)
        assert actual.shape == expected.shape == (1, ids.shape[1], 49152)
        assert (actual - expected).abs().max() < 1e-4, name


@pytest.mark.parametrize("backend, prompt", [("reference", "text"), ("cpu", "chat")])
def test_real_greedy_tokens_match_transformers(ours, hf, expected_greedy, backend, prompt):
    ours.backend = backend
    ids = hf[1](hf[2][prompt], add_special_tokens=False)["input_ids"]
    assert generate(ours, [ids], max_new_tokens=GREEDY, temperature=0, ignore_eos=True) == [expected_greedy(prompt)]


def test_real_weights_are_transformers_weights(ours, hf):
    theirs = hf[0].state_dict()
    for name, param in ours.named_parameters():
        assert torch.equal(param, theirs[name if name.startswith("lm_head") else "model." + name]), name


def test_hf_directory_saved_by_transformers_matches(smollm2_gguf, hf, hf_directory, expected_greedy):
    model, tokenizer, prompts = hf
    directory = load_pretrained(hf_directory, backend="cpu")
    assert directory.config == load_config(smollm2_gguf)
    ids = tokenizer(prompts["code"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert (directory(torch.tensor([ids])) - model(torch.tensor([ids])).logits).abs().max() < 1e-4
    ids = tokenizer(prompts["chat"], add_special_tokens=False)["input_ids"]
    assert generate(directory, [ids], max_new_tokens=GREEDY, temperature=0, ignore_eos=True) == [expected_greedy("chat")]


# --- the real tokenizer ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def test_real_tokenizer_matches_transformers(real_tokenizer, hf):
    assert_same_tokenizer(real_tokenizer, hf[1], TEXTS + [hf[2]["chat"]])
    assert real_tokenizer.vocab_size == len(hf[1]) == 49152


def test_real_tokenizer_special_tokens(real_tokenizer, hf):
    tokenizer = hf[1]
    assert (real_tokenizer.bos_token, real_tokenizer.eos_token) == (tokenizer.bos_token, tokenizer.eos_token) \
        == ("<|im_start|>", "<|im_end|>")
    assert (real_tokenizer.bos_token_id, real_tokenizer.eos_token_id, real_tokenizer.eot_token_id) == (1, 2, None)
    assert real_tokenizer.add_bos_token is False and real_tokenizer.encode("hi")[0] != 1
    assert real_tokenizer.chat_template == tokenizer.chat_template and "<|im_start|>" in real_tokenizer.chat_template
    ids = real_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # written special tokens stay whole
    assert real_tokenizer.decode(ids) == "user\nhi"


def test_real_tokenizer_splits_digits_as_llama_cpp(real_tokenizer, hf):
    """tokenizer.ggml.pre "smollm": llama.cpp (and the model's own tokenizer.json) split every
    digit off before the GPT-2 regex, so two spaces before a number are one token ("ĠĠ", 256).
    transformers' GGUF loader knows no "smollm" and uses the GPT-2 regex alone here."""
    assert real_tokenizer.encode("  42\n") == [256, 36, 34, 198]
    assert hf[1]("  42\n", add_special_tokens=False)["input_ids"] == [216, 216, 36, 34, 198]
    assert real_tokenizer.decode([256, 36, 34, 198]) == "  42\n"


def test_hf_directory_tokenizer_matches(hf, hf_directory, real_tokenizer):
    tokenizer = load_tokenizer(hf_directory)
    assert_same_tokenizer(tokenizer, hf[1], TEXTS)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    assert tokenizer.chat_template == real_tokenizer.chat_template and tokenizer.add_bos_token is False
    assert tokenizer.eot_token_id is None


_PEAK = """
import json, resource, sys, torch
from fmkernels.model import load_pretrained
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = load_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]), weights="dequantized")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"delta": (peak - base) * 1024, "weights": weights}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_load_peak_memory_is_about_one_model(smollm2_gguf, dtype):
    """The peak resident memory of loading dequantized, over a process that imported torch and
    fmkernels (quantized: test_model_quantized.py): measured 558 MiB for 513 MiB of fp32 weights and 304 MiB for 257 MiB of bf16 ones (the
    slabs, the reader's metadata, the meta model). The bound is generous: 1.25 x + 64 MiB."""
    out = subprocess.run([sys.executable, "-c", _PEAK, smollm2_gguf, dtype], capture_output=True, text=True,
                         check=True, timeout=300)
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    assert numbers["weights"] == 134515008 * (4 if dtype == "float32" else 2)
    assert numbers["delta"] < 1.25 * numbers["weights"] + 64 * 2**20, numbers


# --- synthetic files ------------------------------------------------------------------------

# dim and ffn_dim multiples of 256, the K-quant block; head_dim 64.
SMALL = dict(vocab_size=96, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=64, norm_eps=1e-6)
# The row offsets of the fp16 scales (d, dmin) in each K-quant block (gguf/quants.py's layouts).
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
QUANTIZED = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # gguf.quants.quantize implements these
TYPES = [Q.F32, Q.F16, Q.BF16] + QUANTIZED + list(K_SCALES)


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, applied to attn_q (heads) and attn_k (kv heads)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(model: Transformer, experts: str = "stacked"):
    """Our parameters under llama.cpp's names, as numpy in (rows, cols) order, Q/K permuted."""
    c = model.config
    params = {name: param.detach().float().numpy() for name, param in model.named_parameters()}
    out = {"token_embd.weight": params["embed_tokens.weight"], "output_norm.weight": params["norm.weight"]}
    if not c.tie_embeddings:
        out["output.weight"] = params["lm_head.weight"]
    for i in range(c.n_layers):
        layer, blk = f"layers.{i}.", f"blk.{i}."
        out[blk + "attn_norm.weight"] = params[layer + "input_layernorm.weight"]
        out[blk + "ffn_norm.weight"] = params[layer + "post_attention_layernorm.weight"]
        out[blk + "attn_q.weight"] = llama_cpp_permute(params[layer + "self_attn.q_proj.weight"], c.n_heads)
        out[blk + "attn_k.weight"] = llama_cpp_permute(params[layer + "self_attn.k_proj.weight"], c.n_kv_heads)
        out[blk + "attn_v.weight"] = params[layer + "self_attn.v_proj.weight"]
        out[blk + "attn_output.weight"] = params[layer + "self_attn.o_proj.weight"]
        if not c.n_experts:
            for theirs, ours in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                out[f"{blk}ffn_{theirs}.weight"] = params[f"{layer}mlp.{ours}.weight"]
            continue
        moe = layer + "block_sparse_moe."
        out[blk + "ffn_gate_inp.weight"] = params[moe + "gate.weight"]
        for theirs, ours in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            each = [params[f"{moe}experts.{e}.{ours}.weight"] for e in range(c.n_experts)]
            if experts == "stacked":
                out[f"{blk}ffn_{theirs}_exps.weight"] = np.stack(each)  # ne (cols, rows, experts)
            else:
                out.update({f"{blk}ffn_{theirs}.{e}.weight": w for e, w in enumerate(each)})
    return out


def random_k_blocks(shape, kind, std, rng):
    """Valid random blocks of a K-quant type gguf can only dequantize: random bytes, with the
    fp16 scales set so the weights have standard deviation ``std``."""
    block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    for scale in (1.0, None):
        if scale is None:
            scale = std / gguf.quants.dequantize(raw.reshape(*shape[:-1], -1), kind).std()
        for at in K_SCALES[kind]:
            raw[..., at:at + 2] = np.array([scale], dtype=np.float16).view(np.uint8)
    return raw.reshape(*shape[:-1], -1)


def encode(weight: np.ndarray, kind, rng):
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors stay F32, as llama.cpp keeps them."""
    if weight.ndim == 1 or kind == Q.F32:
        return weight.astype(np.float32), None
    if kind == Q.F16:
        return weight.astype(np.float16), None
    if kind in K_SCALES:
        return random_k_blocks(weight.shape, kind, float(weight.std()), rng), kind
    return gguf.quants.quantize(weight, kind), kind


def close(writer, path):
    """Writes what ``writer`` holds to ``path``."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_gguf(path, model: Transformer, kind=Q.F32, *, experts="stacked", tensors=None, metadata=None,
               architecture="llama", skip=()):
    """``model`` written as a GGUF file: llama.* metadata, its tensors of type ``kind``, and
    ``tensors`` extra or replaced ones (None drops one; a (bytes, GGML type) pair is written
    as it is); ``metadata(writer)`` adds keys; ``skip`` drops keys."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    keys = {
        "context_length": c.max_seq_len, "embedding_length": c.dim, "block_count": c.n_layers,
        "feed_forward_length": c.ffn_dim, "head_count": c.n_heads, "head_count_kv": c.n_kv_heads,
        "rope_freq_base": c.rope_theta, "layer_norm_rms_eps": c.norm_eps, "rope_dimension_count": c.head_dim,
        "vocab_size": c.vocab_size,
    }
    if c.n_experts:
        keys.update(expert_count=c.n_experts, expert_used_count=c.experts_per_token)
    for name, value in keys.items():
        if name not in skip:
            getattr(writer, f"add_{name}")(value)
    if metadata is not None:
        metadata(writer)
    rng = np.random.default_rng(0)
    for name, weight in {**gguf_tensors(model, experts), **(tensors or {})}.items():
        if weight is None:
            continue
        if isinstance(weight, tuple):
            data, raw_dtype = weight
        else:
            data, raw_dtype = encode(weight, kind, rng) if weight.dtype == np.float32 else (weight, None)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    return close(writer, path)


@pytest.fixture(scope="module")
def small():
    return Transformer.from_config(ModelConfig(**SMALL), seed=3)


@pytest.mark.parametrize("kind", TYPES, ids=lambda kind: kind.name)
def test_each_tensor_type_matches_transformers(tmp_path, small, kind):
    path = write_gguf(tmp_path / f"small-{kind.name}.gguf", small, kind)
    reference = hf_from_gguf(path)
    # A file of F16 (BF16) matrices loads in float16 (bfloat16) by default, a quantized one in float32.
    default = {Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(kind, torch.float32)
    assert load_pretrained(path).dtype == default
    # Dequantized, so the weights are transformers' own; kept quantized: test_model_quantized.py.
    model = load_pretrained(path, dtype=torch.float32, backend="cpu", weights="dequantized")
    ids = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = reference(ids).logits, model(ids)
    assert (actual - expected).abs().max() < 1e-4
    assert expected.std() > 0.5  # logits far from uniform: the comparison means something


def test_f32_file_is_the_model_it_was_written_from(tmp_path, small):
    """Independent of transformers' own un-permute: the loaded weights are the written ones."""
    model = load_pretrained(write_gguf(tmp_path / "small.gguf", small), backend="cpu")
    for (name, param), (_, source) in zip(model.named_parameters(), small.named_parameters()):
        assert torch.equal(param, source), name
    ids = torch.arange(20)[None] % 96
    with torch.no_grad():
        assert torch.equal(model(ids), small(ids))


def test_tied_output_and_dtype_request(tmp_path):
    tied = Transformer.from_config(ModelConfig(**SMALL, tie_embeddings=True), seed=4)
    path = write_gguf(tmp_path / "tied.gguf", tied, Q.Q8_0)
    config = load_config(path)
    # The file holds eps as float32, as llama.cpp writes it.
    assert config.norm_eps == float(np.float32(1e-6)) and config.tie_embeddings
    assert dataclasses.replace(config, norm_eps=1e-6) == tied.config
    model = load_pretrained(path, dtype=torch.bfloat16, weights="dequantized")
    assert model.dtype == torch.bfloat16 and model.lm_head.weight is model.embed_tokens.weight
    assert all(param.dtype == torch.bfloat16 for param in model.parameters())
    reference = load_pretrained(path, weights="dequantized")
    assert torch.equal(model.embed_tokens.weight, reference.embed_tokens.weight.bfloat16())
    # Kept quantized (the CPU's default), the tied head is the embedding's QuantizedWeight and
    # dtype the activations'.
    quantized = load_pretrained(path, dtype=torch.bfloat16)
    assert quantized.dtype == torch.bfloat16 and quantized.lm_head.weight is quantized.embed_tokens.weight
    assert torch.equal(quantized.embed_tokens.weight.dequantize(), reference.embed_tokens.weight)


@pytest.mark.parametrize("experts", ["stacked", "per-expert"])
def test_mixtral(tmp_path, experts):
    source = Transformer.from_config(ModelConfig(**dict(SMALL, dim=64, ffn_dim=96), n_experts=4,
                                                 experts_per_token=2, architecture="mixtral"), seed=5)
    path = write_gguf(tmp_path / "mixtral.gguf", source, experts=experts)
    model = load_pretrained(path, backend="cpu")
    assert dataclasses.replace(model.config, norm_eps=1e-6) == source.config
    ids = torch.arange(23)[None] % 96
    with torch.no_grad():
        assert torch.equal(model(ids), source(ids))


def llama3_rope_factors(config: ModelConfig, scaling) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for Llama-3 scaling."""
    dim, factor = config.head_dim, scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# theta 1e4 and head_dim 16: wavelengths 6, 20, 63, 199, ...; two fall in the blend [16, 64].
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    source = Transformer.from_config(ModelConfig(**dict(SMALL, dim=64, ffn_dim=96), rope_scaling=LLAMA3), seed=6)
    factors = llama3_rope_factors(source.config, LLAMA3)
    path = write_gguf(tmp_path / "llama3.gguf", source, tensors={"rope_freqs.weight": factors})
    model = load_pretrained(path, backend="cpu")
    scaling = model.config.rope_scaling
    assert scaling["rope_type"] == "llama3" and scaling["original_max_position_embeddings"] == 64
    assert scaling["factor"] == 8.0 and math.isclose(scaling["high_freq_factor"], 4.0, rel_tol=1e-4)
    ids = torch.arange(40)[None] % 96
    with torch.no_grad():
        assert (model(ids) - source(ids)).abs().max() < 1e-4


def test_rope_scaling_fmkernels_cannot_express_is_refused(tmp_path, small):
    source = Transformer.from_config(ModelConfig(**dict(SMALL, dim=64, ffn_dim=96)), seed=6)
    odd = np.linspace(1.0, 3.0, 8, dtype=np.float32) ** 2  # no plateau of `factor`: not Llama-3's shape
    with pytest.raises(ValueError, match="'rope_freqs.weight' does not follow Llama-3 RoPE scaling"):
        load_config(write_gguf(tmp_path / "odd.gguf", source, tensors={"rope_freqs.weight": odd}))
    path = write_gguf(tmp_path / "linear.gguf", source,
                      metadata=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR))
    with pytest.raises(ValueError, match="rope.scaling.type 'linear'"):
        load_pretrained(path)


# --- errors ---------------------------------------------------------------------------------

def test_another_architecture(tmp_path, small):
    with pytest.raises(ValueError, match="general.architecture must be 'llama'.*got 'qwen2'"):
        load_pretrained(write_gguf(tmp_path / "qwen.gguf", small, architecture="qwen2"))


@pytest.mark.parametrize("key", ["block_count", "feed_forward_length", "layer_norm_rms_eps", "head_count"])
def test_missing_key(tmp_path, small, key):
    name = {"layer_norm_rms_eps": "attention.layer_norm_rms_epsilon",
            "head_count": "attention.head_count"}.get(key, key)
    with pytest.raises(ValueError, match=f"no metadata key 'llama.{name}'"):
        load_pretrained(write_gguf(tmp_path / "missing.gguf", small, skip={key}))


def test_unsupported_tensor_type(tmp_path, small):
    wide = {"blk.1.attn_v.weight": small.layers[1].self_attn.v_proj.weight.detach().double().numpy()}
    with pytest.raises(ValueError, match="'blk.1.attn_v.weight' has type F64, which the installed gguf package"):
        load_pretrained(write_gguf(tmp_path / "f64.gguf", small, tensors=wide))


def test_missing_unexpected_and_mis_shaped_tensors(tmp_path, small):
    tensors = gguf_tensors(small)
    with pytest.raises(ValueError, match="has no tensor 'blk.1.ffn_up.weight', which the config needs"):
        load_pretrained(write_gguf(tmp_path / "drop.gguf", small, tensors={"blk.1.ffn_up.weight": None}))
    bias = {"blk.0.attn_q.bias": np.zeros(256, dtype=np.float32)}
    with pytest.raises(ValueError, match="has tensor 'blk.0.attn_q.bias', which a llama model has no place for"):
        load_pretrained(write_gguf(tmp_path / "bias.gguf", small, tensors=bias))
    short = {"output_norm.weight": tensors["output_norm.weight"][:100]}
    with pytest.raises(ValueError, match=r"'output_norm.weight' has shape \(100,\).*expects \(256,\)"):
        load_pretrained(write_gguf(tmp_path / "short.gguf", small, tensors=short))
    # Without output.weight the output is tied to the embedding, not missing.
    path = write_gguf(tmp_path / "tied.gguf", small, tensors={"output.weight": None})
    assert load_config(path).tie_embeddings


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    for load in (load_pretrained, load_tokenizer, load_config):
        with pytest.raises(ValueError, match=r"is not a GGUF file: it starts with b'PK\\x03\\x04'"):
            load(path)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_tokenizer(tmp_path / "absent.gguf")


def test_missing_gguf_package(tmp_path, small, monkeypatch):
    path = write_gguf(tmp_path / "small.gguf", small)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"needs the 'gguf' package: pip install 'fmkernels\[gguf\]'"):
        load_pretrained(path)


# --- synthetic tokenizers -------------------------------------------------------------------

CORPUS = [
    "the cat sat on the mat. The dog ate the cat's food!", "hello world, hello there; 1234 + 5678 = 6912",
    "def main():\n    return 0\n\nif __name__ == '__main__':\n    main()\n", "naïve café, 東京 and 🚀 rockets",
    "It's we'll they've I'm you'd", "    indented\n\tand tabbed  ",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_TEXTS = TEXTS + ["the cat's 1234 numbers", "<think>why</think> then", "x<|endoftext|>y"]


def write_tokenizer_gguf(path, tokens, types, *, model="gpt2", merges=None, scores=None, pre=None, bos=1, eos=2,
                         add_bos=None):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_eot_token_id(eos)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return close(writer, path)


@pytest.fixture(scope="module")
def byte_level_vocab():
    """(tokens, merges, types) of a byte-level BPE trained here, with three control tokens and a
    user-defined one, as llama.cpp writes a gpt2 vocabulary."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS + ["<think>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model["merges"]]
    types = [3, 3, 3, 4] + [1] * (len(tokens) - 4)
    return tokens, merges, types


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
@pytest.mark.parametrize("add_bos", [None, True])
def test_byte_level_tokenizer_matches_transformers(tmp_path, byte_level_vocab, pre, add_bos):
    tokens, merges, types = byte_level_vocab
    path = write_tokenizer_gguf(tmp_path / "bpe.gguf", tokens, types, merges=merges, pre=pre, add_bos=add_bos)
    ours, theirs = load_tokenizer(path), hf_tokenizer(path)
    assert_same_tokenizer(ours, theirs, TOKENIZER_TEXTS)
    assert ours.add_bos_token is bool(add_bos) and ours.bos_token == theirs.bos_token == "<|im_start|>"
    assert ours.eot_token_id == 2 and ours.chat_template == theirs.chat_template
    assert ours.encode("<think>")[-1] == 3 and ours.decode([3]) == "<think>"  # user-defined: whole, not special


def test_byte_level_pre_tokenizers_follow_llama_cpp(tmp_path):
    """llama.cpp takes a word in the vocabulary whole under "llama-bpe" (ignore_merges), and
    splits digits off under "smollm"; "gpt-2" merges by rank and keeps digit runs together."""
    tokens = SPECIALS + ["a", "b", "c", "bc", "ab", "abc", "1", "2", "12", "Ġ", "ĠĠ"]
    merges = ["b c", "a b", "ab c", "1 2", "Ġ Ġ"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    ids = {token: i for i, token in enumerate(tokens)}
    encoded = {}
    for pre in ("gpt-2", "llama-bpe", "smollm"):
        path = write_tokenizer_gguf(tmp_path / f"{pre}.gguf", tokens, types, merges=merges, pre=pre)
        encoded[pre] = (load_tokenizer(path).encode("abc"), load_tokenizer(path).encode("  12"))
    assert encoded["gpt-2"] == ([ids["a"], ids["bc"]], [ids["Ġ"], ids["Ġ"], ids["12"]])
    assert encoded["llama-bpe"][0] == [ids["abc"]]
    assert encoded["smollm"] == ([ids["a"], ids["bc"]], [ids["ĠĠ"], ids["1"], ids["2"]])
    path = write_tokenizer_gguf(tmp_path / "unknown.gguf", tokens, types, merges=merges, pre="default")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'default' is not one fmkernels knows"):
        load_tokenizer(path)


def sentencepiece_vocab(corpus, merges=60):
    """(tokens, scores, types) of a SentencePiece-style BPE trained here: <unk>, <s>, </s>, the
    256 byte tokens, the merged pieces (scored by merge order), then the single characters."""
    counts = {}
    for line in corpus:
        for word in line.replace("\n", " ").split(" "):
            if word:
                counts["\u2581" + word] = counts.get("\u2581" + word, 0) + 1
    pieces_of = {word: list(word) for word in counts}
    merged = []
    for _ in range(merges):
        pairs = {}
        for word, n in counts.items():
            for pair in zip(pieces_of[word], pieces_of[word][1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merged.append("".join(best))
        for word, pieces in pieces_of.items():
            out, i = [], 0
            while i < len(pieces):
                if tuple(pieces[i:i + 2]) == best:
                    out.append(merged[-1])
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            pieces_of[word] = out
    chars = sorted({c for word in counts for c in word} - set(merged))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + merged + chars
    scores = [0.0] * 259 + [-float(i) for i in range(len(merged))] + [-1000.0 - i for i in range(len(chars))]
    return tokens, scores, [2, 3, 3] + [6] * 256 + [1] * (len(merged) + len(chars))


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    tokens, scores, types = sentencepiece_vocab(CORPUS)
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", tokens, types, model="llama", scores=scores)
    ours, theirs = load_tokenizer(path), hf_tokenizer(path)
    texts = [text for text in TOKENIZER_TEXTS if "<|" not in text] + ["<s>the</s> cat", "the cat sat"]
    assert_same_tokenizer(ours, theirs, texts)
    assert ours.add_bos_token and ours.encode("the")[0] == 1 and ours.bos_token == "<s>"
    assert len(ours.encode("🎉", add_special_tokens=False)) == 5  # not in the vocabulary: "▁" and four bytes


def test_unknown_tokenizer_model(tmp_path):
    path = write_tokenizer_gguf(tmp_path / "bert.gguf", ["[CLS]", "[SEP]", "a"], [3, 3, 1], model="bert", bos=0, eos=1)
    with pytest.raises(ValueError, match="tokenizer.ggml.model must be 'gpt2' or 'llama', got 'bert'"):
        load_tokenizer(path)
