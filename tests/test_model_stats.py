"""ModelConfig.stats and `fmkernels info`: every figure derived here by hand from the
configuration's dimensions, or measured on the model itself (its parameters, its KV
cache, the matmul FLOPs torch counts in its forward pass), never copied from the code
under test."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fmkernels import cli
from fmkernels.model import ModelConfig, Transformer, model_stats
from fmkernels.model.network.stats import DeviceSpec

# vocab, dim, layers, heads, kv heads, ffn: head_dim 16.
DENSE = ModelConfig(vocab_size=300, dim=48, n_layers=3, n_heads=3, n_kv_heads=3, ffn_dim=80, max_seq_len=64)
GQA = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
MOE = ModelConfig(
    vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, max_seq_len=64,
    n_experts=4, experts_per_token=2, architecture="mixtral",
)
TIED = ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48, tie_embeddings=True)
CONFIGS = {"dense": DENSE, "gqa": GQA, "moe": MOE, "tied": TIED}

# Round numbers so the roofline is easy to do by hand: 1000 GB/s, 100 TFLOP/s, 10 GB.
DEVICE = "1000,100,10"


def test_dense_figures_by_hand():
    s = model_stats(DENSE, dtype="bf16", context=40, batch=2, device=DEVICE, train_tokens=1000)
    p = s.params
    # wq, wk, wv, wo are 48 x 48; three 48 x 80 SwiGLU matrices; two norms a layer and a final one.
    assert p.embedding == 300 * 48
    assert p.attention == 3 * 4 * 48 * 48
    assert p.mlp == 3 * 3 * 48 * 80
    assert p.norms == 7 * 48
    assert p.lm_head == 300 * 48
    assert p.router == 0
    total = 14400 + 27648 + 34560 + 336 + 14400
    assert p.total == p.active == total
    assert s.weight_bytes("fp32") == 4 * total
    assert s.weight_bytes() == 2 * total
    assert s.weight_bytes("int4") == total // 2
    # K and V, 3 layers x 3 heads x 16 dims, 2 bytes each.
    assert s.kv_bytes_per_token == 2 * 3 * 3 * 16 * 2 == 576
    assert s.kv_bytes() == 576 * 40 * 2
    # Per token: 2 FLOPs per weight it multiplies by (not the embedding, not the norms) and
    # q.k plus p.v over 40 keys, 3 heads x 16 dims, in 3 layers.
    matmul = 27648 + 34560 + 14400
    assert s.forward_flops_per_token() == 2 * matmul + 2 * 2 * 3 * 3 * 16 * 40
    # Prefill of 40 tokens: token i attends to i + 1 keys, 820 in all.
    assert s.prefill_flops == 40 * 2 * matmul + 2 * 2 * 3 * 3 * 16 * 820
    assert s.training_flops == 6 * total * 1000
    assert s.chinchilla_tokens == 20 * total
    # One decode step of 2 sequences at 40 tokens reads every weight but the embedding table
    # (the LM head is its own matrix) and both sequences' caches.
    d = s.decode()
    weights = 2 * (total - 14400)
    kv = 576 * 40 * 2
    flops = 2 * (2 * matmul + 4 * 3 * 3 * 16 * 40)
    assert (d.weight_bytes, d.kv_bytes, d.flops) == (weights, kv, flops)
    assert d.memory_time_s == pytest.approx((weights + kv) / 1000e9)
    assert d.compute_time_s == pytest.approx(flops / 100e12)
    assert d.bound == "memory"
    assert d.tokens_per_s == pytest.approx(2 / ((weights + kv) / 1000e9))
    assert d.fits
    assert s.prefill_tokens_per_s == pytest.approx(100e12 * 40 / s.prefill_flops)


def test_gqa_kv_cache_is_per_kv_head():
    s = model_stats(GQA, context=64, batch=3, dtype="fp16", kv_dtype="fp8")
    # head_dim 64 / 8 = 8; 2 KV heads of 8 dims, 2 layers, K and V, 1 byte.
    assert s.kv_bytes_per_token == 2 * 2 * 2 * 8 * 1 == 64
    assert s.kv_bytes() == 64 * 64 * 3
    # wq and wo are 64 x 64; wk and wv 64 x 16.
    assert s.params.attention == 2 * (2 * 64 * 64 + 2 * 64 * 16)
    # The attention term counts query heads: each of 8 reads its KV head's keys.
    assert s.attention_flops_per_token(10) == 2 * 4 * 8 * 8 * 10


def test_moe_figures_by_hand():
    s = model_stats(MOE, context=16, batch=1, device=DEVICE)
    p = s.params
    expert = 3 * 32 * 40
    assert p.mlp == 2 * 4 * expert
    assert p.router == 2 * 32 * 4
    attention = 2 * (2 * 32 * 32 + 2 * 32 * 16)
    assert p.attention == attention
    total = 300 * 32 * 2 + attention + 2 * 4 * expert + 2 * 32 * 4 + 5 * 32
    active = total - 2 * 2 * expert  # each token skips 2 of 4 experts a layer
    assert (p.total, p.active) == (total, active)
    matmul = attention + 2 * 32 * 4 + 2 * 2 * expert + 300 * 32
    assert s.forward_flops_per_token() == 2 * matmul + 4 * 2 * 4 * 8 * 16
    # At batch 1 a step reads exactly the 2 routed experts a layer.
    assert s.decode(batch=1).weight_bytes == 2 * (active - 300 * 32)
    # Expected distinct experts of 4, 2 routed per token, uniform: 4 (1 - (1/2)^batch).
    for batch in (2, 3, 50):
        touched = 4 * (1 - 0.5 ** batch)
        dense = attention + 2 * 32 * 4 + 5 * 32 + 300 * 32
        assert s.decode(batch=batch).weight_bytes == math.ceil(2 * (dense + 2 * touched * expert))
    assert s.decode(batch=50).weight_bytes == pytest.approx(2 * (total - 300 * 32), rel=1e-9)


def test_tied_head_reads_the_embedding_table():
    s = model_stats(TIED, context=8, device=DEVICE)
    assert s.params.lm_head == 0
    # The head multiplies by the embedding table, so the step reads it, and it costs FLOPs.
    assert s.decode().weight_bytes == 2 * s.params.total
    assert s.matmul_params_per_token == s.params.attention + s.params.mlp + 300 * 32


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_counts_match_the_model(name):
    config = CONFIGS[name]
    model = Transformer.from_config(config)
    parts = {"embedding": 0, "attention": 0, "mlp": 0, "router": 0, "norms": 0, "lm_head": 0}
    for param_name, param in model.named_parameters():
        if "embed_tokens" in param_name:
            parts["embedding"] += param.numel()
        elif "self_attn" in param_name:
            parts["attention"] += param.numel()
        elif ".gate." in param_name:
            parts["router"] += param.numel()
        elif "norm" in param_name:
            parts["norms"] += param.numel()
        elif "lm_head" in param_name:
            parts["lm_head"] += param.numel()
        else:
            parts["mlp"] += param.numel()
    counted = model_stats(config).params.as_dict()
    assert {key: counted[key] for key in parts} == parts
    assert counted["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matmul_flops_match_torchs_count(name):
    # FlopCounterMode counts the model's projections, MLPs (or routed experts) and LM head;
    # attention runs in fmkernels ops, which it does not see.
    config = CONFIGS[name]
    model = Transformer.from_config(config, seed=3)
    tokens = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    assert counter.get_total_flops() == 9 * 2 * model_stats(config).matmul_params_per_token


def test_kv_bytes_match_the_models_cache():
    model = Transformer.from_config(GQA, dtype=torch.bfloat16)
    cache = model.new_cache("contiguous", batch=3, max_seq_len=20)
    held = sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v])
    assert held == model_stats(GQA, dtype="bf16", context=20, batch=3).kv_bytes()


def test_published_totals():
    llama = model_stats(ModelConfig.from_name("llama-2-7b")).params
    assert llama.total == pytest.approx(6.74e9, rel=2e-3)
    mixtral = model_stats(ModelConfig.from_name("mixtral-8x7b")).params
    assert mixtral.total == pytest.approx(46.7e9, rel=2e-3)
    assert mixtral.active == pytest.approx(12.9e9, rel=2e-3)
    assert model_stats(ModelConfig.from_name("llama-3-8b")).params.total == pytest.approx(8.03e9, rel=2e-3)
    assert model_stats(ModelConfig.from_name("llama-3-405b")).params.total == pytest.approx(405.9e9, rel=2e-3)
    # Llama 3 8B, bf16: 128 KiB of KV cache per token (8 KV heads x 128, 32 layers).
    assert model_stats(ModelConfig.from_name("llama-3-8b")).kv_bytes_per_token == 128 * 1024


def test_roofline_moves_with_batch_and_context():
    s = model_stats(ModelConfig.from_name("llama-3-8b"), device="h100", table_batches=[1, 64, 1024],
                                                  table_contexts=[128, 8192])
    rows = {(r.batch, r.context): r for r in s.table()}
    assert len(rows) == 6
    # Batch 1 is memory-bound: every weight but the 128256 x 4096 embedding table (published
    # total 8,030,261,248), 2 bytes each, and 8192 tokens of 128 KiB of cache, at 3350 GB/s.
    step_bytes = 2 * (8_030_261_248 - 128256 * 4096) + 8192 * 128 * 1024
    assert rows[1, 8192].tokens_per_s == pytest.approx(3350e9 / step_bytes)
    assert rows[1, 8192].tokens_per_s < rows[1, 128].tokens_per_s
    assert rows[64, 128].tokens_per_s > 50 * rows[1, 128].tokens_per_s
    # 1024 x 8192 tokens of cache is 1.1 TB: past the H100's 80 GB.
    assert rows[1024, 8192].fits is False and rows[1, 8192].fits is True
    # 1024 tokens of ~15 GFLOPs each take ~16 ms at 989 TFLOP/s; reading 15 GB of weights and
    # 17 GB of cache takes ~10 ms: compute-bound. At 8192 tokens the cache dominates again.
    assert rows[1024, 128].bound == "compute" and rows[1024, 8192].bound == "memory"


def test_device_specs():
    assert DeviceSpec.parse("H200").memory_bandwidth_gb_s == 4800
    custom = DeviceSpec.parse("2976,794")
    assert (custom.memory_bandwidth_gb_s, custom.tflops, custom.memory_gb) == (2976, 794, None)
    assert model_stats(DENSE, device=custom).decode().fits is None
    for bad in ("h300", "1000", "1,2,3,4", "a,b"):
        with pytest.raises(ValueError, match="device must be one of a100, h100, h200 or"):
            DeviceSpec.parse(bad)
    with pytest.raises(ValueError, match="memory_bandwidth_gb_s must be a positive"):
        DeviceSpec.parse("0,100")
    with pytest.raises(TypeError, match="device"):
        model_stats(DENSE, device=3350)


@pytest.mark.parametrize("kwargs, name", [
    (dict(dtype="float16"), "dtype"), (dict(kv_dtype="int2"), "kv_dtype"), (dict(context=0), "context"),
    (dict(batch=-1), "batch"), (dict(batch=1.5), "batch"), (dict(train_tokens=0), "train_tokens"),
    (dict(table_batches=[]), "table_batches"), (dict(table_contexts=[4, 0]), "table_contexts"),
])
def test_stats_validates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        model_stats(DENSE, **kwargs)


def _run_info(capsys, *argv):
    assert cli.main(["info", *argv]) == 0
    return capsys.readouterr().out


def test_info_json_keys_are_the_documented_ones(capsys):
    report = json.loads(_run_info(capsys, "mixtral-8x7b", "--json", "--batch", "4", "--context", "2048"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### `fmkernels info --json`"):]
    section = section[:section.index("\n## ")]
    documented = set(re.findall(r"`([a-z_0-9]+)`", section))

    def keys(value, prefix=""):
        for key, item in value.items():
            yield key
            if isinstance(item, dict):
                yield from keys(item)
        if isinstance(value.get("table"), list):
            yield from keys(value["table"][0])

    missing = set(keys(report)) - documented
    assert not missing, f"--json keys missing from README: {sorted(missing)}"
    assert report["parameters"]["active"] == model_stats(ModelConfig.from_name("mixtral-8x7b")).params.active
    assert (report["batch"], report["context"], report["decode"]["batch"]) == (4, 2048, 4)
    assert report["kv_cache"]["bytes"] == 131072 * 2048 * 4
    assert report["device"] == {"name": "h100", "memory_bandwidth_gb_s": 3350, "tflops": 989, "memory_gb": 80}


def test_info_tables(capsys):
    out = _run_info(capsys, "llama-2-7b", "--device", "h200", "--batches", "1,8", "--contexts", "512,4096")
    assert "6,738,415,616" in out
    assert "4800 GB/s" in out and "512 tokens" in out
    assert "prefill tokens/s" in out


@pytest.mark.parametrize("kind", ["llama", "mistral", "mixtral"])
def test_info_reads_a_config_json(kind, tmp_path, capsys):
    pytest.importorskip("transformers")
    from _model_checks import hf_model

    # transformers' own model of the same config.json holds the parameters counted.
    model = hf_model(kind, tie_word_embeddings=kind == "mistral")
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    report = json.loads(_run_info(capsys, str(tmp_path), "--json", "--context", "32"))
    assert report["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert report["config"]["architecture"] == kind


def test_info_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "llama-9"])
    assert "not a config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["info", "tiny", "--device", "fast"])
    assert "device must be one of" in capsys.readouterr().err
    config = {"architectures": ["MixtralForCausalLM"], "vocab_size": 100, "hidden_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 128, "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        cli.main(["info", str(tmp_path)])
    assert "num_local_experts" in capsys.readouterr().err


@pytest.mark.parametrize("name, world", [("gqa", 2), ("gqa", 4), ("gqa", 8), ("moe", 2), ("moe", 4), ("tied", 2)])
def test_tensor_parallel_memory_is_a_ranks_model(name, world):
    from fmkernels.model import TensorParallel

    config = CONFIGS[name]
    split = model_stats(config, dtype="bf16", context=20, batch=3, device=DEVICE).tensor_parallel(world, 50)
    for rank in range(world):  # every rank holds as much
        model = Transformer.from_config(config, dtype=torch.bfloat16,
                                        tensor_parallel=TensorParallel.plan(config, rank, world))
        assert split.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
        cache = model.new_cache("contiguous", batch=3, max_seq_len=20)
        assert split.kv_bytes == sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v])
    assert (split.n_heads, split.n_kv_heads) == (model.tensor_parallel.n_heads, model.tensor_parallel.n_kv_heads)
    assert split.kv_replicated == (config.n_kv_heads < world)
    # Two all-reduces a layer of dim bf16 values; a ring sends 2 (N - 1) / N of them per rank.
    assert split.all_reduce_bytes_per_token == math.ceil(2 * config.n_layers * 2 * (world - 1) / world * config.dim * 2)


def test_tensor_parallel_roofline_by_hand():
    # GQA (8 heads, 2 KV heads, head_dim 8, ffn 96, 2 layers) over 2 ranks, bf16, batch 3 at 20 tokens.
    split = model_stats(GQA, dtype="bf16", context=20, batch=3, device=DEVICE).tensor_parallel(2, 50)
    attention = 2 * (2 * 64 * 4 * 8 + 2 * 64 * 1 * 8)  # q, o: 4 heads; k, v: 1 KV head; 2 layers
    mlp = 2 * 3 * 64 * 48
    norms, head = 5 * 64, 300 * 64
    assert split.step_weight_bytes == 2 * (attention + mlp + norms + head)
    kv = 3 * 20 * 2 * 2 * 1 * 8 * 2  # batch x context x (k, v) x layers x KV heads x head_dim x 2 bytes
    assert split.kv_bytes == kv
    assert split.memory_time_s == pytest.approx((split.step_weight_bytes + kv) / 1000e9)
    flops = 3 * (2 * (attention + mlp + head) + 4 * 2 * 4 * 8 * 20)
    assert split.compute_time_s == pytest.approx(flops / 100e12)
    assert split.communication_time_s == pytest.approx(3 * 2 * 2 * 2 * 0.5 * 64 * 2 / 50e9)
    assert split.tokens_per_s == pytest.approx(3 / (max(split.memory_time_s, split.compute_time_s)
                                                    + split.communication_time_s))


def test_tensor_parallel_checks_its_arguments():
    stats = model_stats(GQA, device=DEVICE)
    with pytest.raises(ValueError, match="interconnect bandwidth is needed"):
        stats.tensor_parallel(2)
    with pytest.raises(ValueError, match="interconnect_gb_s"):
        stats.tensor_parallel(2, -1.0)
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        stats.tensor_parallel(3, 50)
    assert model_stats(GQA, device="h100").tensor_parallel(2).interconnect_gb_s == 450


def test_info_tp(capsys):
    out = _run_info(capsys, "llama-3-70b", "--tp", "8")
    assert "tensor parallel over 8 x h100" in out and "8 / 1" in out
    report = json.loads(_run_info(capsys, "mixtral-8x7b", "--tp", "4", "--json"))
    assert report["tensor_parallel"]["world"] == 4 and report["tensor_parallel"]["interconnect_gb_s"] == 450
    with pytest.raises(SystemExit):
        cli.main(["info", "tiny", "--tp", "3"])
    assert "n_heads=4 is not divisible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["info", "tiny", "--tp", "2", "--device", "100,10"])
    assert "needs --interconnect" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["info", "tiny", "--interconnect", "5"])
    assert "--interconnect goes with --tp" in capsys.readouterr().err


# -- quantized weights ----------------------------------------------------------------------------

def _quantized(config, formats):
    """``Transformer.from_config(config)`` with the weights ``formats`` names held in those block formats."""
    from fmkernels import quantize
    from fmkernels.model import QuantizedEmbedding, QuantizedLinear

    model = Transformer.from_config(config)
    for name, format in formats.items():
        path = name[:-len(".weight")]
        parent, _, leaf = path.rpartition(".")
        module = model.get_submodule(path)
        weight = quantize(module.weight.detach(), format)
        quantized = QuantizedEmbedding(weight) if isinstance(module, torch.nn.Embedding) else QuantizedLinear(weight)
        setattr(model.get_submodule(parent) if parent else model, leaf, quantized)
    if config.tie_embeddings and "embed_tokens.weight" in formats:
        model.lm_head = QuantizedLinear.tied(model.embed_tokens)
    return model


def _held_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_weights_are_counted_at_their_formats_bytes(tied):
    import dataclasses

    config = dataclasses.replace(GQA, tie_embeddings=tied)
    formats = {"embed_tokens.weight": "q8_0", **({} if tied else {"lm_head.weight": "q4_1"})}
    for i in range(config.n_layers):
        formats.update({f"layers.{i}.self_attn.{p}.weight": "q8_0" for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
        formats.update({f"layers.{i}.mlp.{p}.weight": "q4_0" for p in ("gate_proj", "up_proj", "down_proj")})
    model = _quantized(config, formats)
    s = model_stats(config, dtype="fp32", context=20, batch=3, device=DEVICE, weights=model)
    assert s == model_stats(config, dtype="fp32", context=20, batch=3, device=DEVICE, weights=formats)
    held = _held_bytes(model)  # fp32 norms and the blocks, each weight's once
    assert s.weight_bytes() == held and s.weight_bytes("fp32") == 4 * s.params.total
    # q8_0 is 34 bytes a 32 weights, q4_0 18, q4_1 20; norms 4 bytes each.
    p = s.params
    by_hand = p.embedding * 34 / 32 + p.attention * 34 / 32 + p.mlp * 18 / 32 + p.norms * 4 + p.lm_head * 20 / 32
    assert held == by_hand
    # A decode step reads all but the embedding table, unless the head is that table.
    table = model.embed_tokens.blocks.numel()
    assert s.decode().weight_bytes == (held if tied else held - table)
    assert s.decode().memory_bytes == held + s.kv_bytes()
    report = s.as_dict()["weight_formats"]
    assert report["bytes"] == held and report["parameters"] == {
        "q8_0": p.embedding + p.attention, "q4_0": p.mlp, "fp32": p.norms, **({} if tied else {"q4_1": p.lm_head})}
    # Over 2 ranks a rank holds half the attention and MLP at their formats, the rest whole.
    split = s.tensor_parallel(2, 50)
    attention = config.n_layers * (2 * 64 * 32 + 2 * 64 * 8)
    assert split.weight_bytes == math.ceil(p.embedding * 34 / 32 + attention * 34 / 32 + p.mlp / 2 * 18 / 32
                                           + p.norms * 4 + p.lm_head * 20 / 32)
    assert "weight_formats" not in model_stats(config).as_dict()  # a plain model's report is unchanged


def test_weights_are_checked():
    with pytest.raises(ValueError, match="'layers.9.mlp.up_proj.weight', which is not a weight"):
        model_stats(GQA, weights={"layers.9.mlp.up_proj.weight": "q4_0"})
    with pytest.raises(ValueError, match="a weight's format must be one of .*got 'q5_k'"):
        model_stats(GQA, weights={"layers.0.mlp.up_proj.weight": "q5_k"})
    with pytest.raises(TypeError, match="weights must be a model or a mapping"):
        model_stats(GQA, weights=["q4_0"])


def test_info_of_a_gguf_file_counts_its_blocks(smollm2_gguf, capsys):
    pytest.importorskip("gguf")
    from fmkernels.model import load_pretrained

    model = load_pretrained(smollm2_gguf)  # Q4_1 matrices, a Q8_0 embedding, F32 norms
    norms = sum(p.numel() for p in model.parameters())
    blocks = sum(b.numel() for b in model.buffers())
    report = json.loads(_run_info(capsys, smollm2_gguf, "--json", "--context", "1024", "--batches", "1",
                                  "--contexts", "1024"))
    assert report["weight_formats"]["bytes"] == blocks + 2 * norms  # the norms in --dtype bf16
    assert report["weight_formats"]["parameters"]["q8_0"] == 49152 * 576
    # A decode step reads every block (the head is the tied embedding) and the norms.
    assert report["decode"]["weight_bytes_per_step"] == blocks + 2 * norms
    out = _run_info(capsys, smollm2_gguf, "--batches", "1", "--contexts", "1024")
    assert "GGUF tensor types" in out and "Q4_1" in out and "q4_1/q8_0 blocks" in out
