"""fmkernels.model against models nobody here wrote: tiny random transformers checkpoints,
saved with save_pretrained and loaded with load_pretrained."""

import pytest
import torch

from fmkernels.model import ModelConfig, generate, load_pretrained
from fmkernels.testing import attention_tolerance, max_error

from _model_checks import hf_model

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CASES = {
    "llama": ("llama", {}),
    "llama3-rope-scaling": ("llama", dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-head-dim": ("llama", dict(head_dim=32)),
    "mistral": ("mistral", dict(rope_theta=1e6)),
    "mixtral": ("mixtral", {}),
}


def _hf_and_ours(tmp_path, name, **save_options):
    kind, overrides = CASES[name]
    reference = hf_model(kind, **overrides)
    reference.save_pretrained(tmp_path, **save_options)
    return reference, load_pretrained(tmp_path, backend="cpu")


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(tmp_path, name):
    reference, model = _hf_and_ours(tmp_path, name)
    ids = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        actual = model(ids)
    assert actual.shape == expected.shape == (2, 23, 96)
    assert (actual - expected).abs().max() < 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    reference, model = _hf_and_ours(tmp_path, "mixtral", max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.arange(17)[None] % 96
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["llama", "llama3-rope-scaling", "mixtral"])
def test_greedy_generation_matches_transformers(tmp_path, name):
    reference, model = _hf_and_ours(tmp_path, name)
    prompt = [5, 17, 3, 88, 41, 2, 60]
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0,
        )[0, len(prompt):].tolist()
    for kv_cache in ("contiguous", "paged"):
        # The reference ran with eos_token_id=None; the config's EOS (2) would stop ours.
        assert generate(model, [prompt], max_new_tokens=12, kv_cache=kv_cache, block_size=4,
                        ignore_eos=True) == [expected]


def test_config_from_transformers_config():
    config = ModelConfig.from_hf_config(hf_model("mixtral").config.to_dict())
    assert (config.architecture, config.n_experts, config.experts_per_token) == ("mixtral", 4, 2)
    assert (config.dim, config.n_heads, config.n_kv_heads, config.head_dim) == (64, 4, 2, 16)
    llama3 = ModelConfig.from_hf_config(hf_model("llama", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
                                        .config.to_dict())
    assert llama3.rope_theta == 500000.0 and llama3.rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_backends_within_the_design_tolerance_of_a_float64_truth(tmp_path, name):
    """DESIGN.md's attention rule at the scale of the model: the kernels' error to the fp64
    truth (transformers in float64) is at most twice plain PyTorch's fp32 error (the
    reference backend) plus 1e-5, for the full forward and for chunked prefill into a cache."""
    reference, _ = _hf_and_ours(tmp_path, name)
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(2))
    if name == "mixtral":
        reference.set_experts_implementation("eager")  # its grouped GEMM has no float64
    with torch.no_grad():
        truth = reference.double()(ids).logits
        logits = {}
        for backend in ("reference", "cpu"):
            model = load_pretrained(tmp_path, backend=backend)
            cache = model.new_cache("paged", batch=2, max_seq_len=32, block_size=4)
            chunked = torch.cat([model(ids[:, :13], cache=cache), model(ids[:, 13:], cache=cache)], dim=1)
            logits[backend] = (model(ids), chunked)
    for plain, kernel in zip(logits["reference"], logits["cpu"]):
        assert max_error(kernel, truth) <= attention_tolerance(plain, truth)
