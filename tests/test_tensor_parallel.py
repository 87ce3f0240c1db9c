"""Tensor parallelism over torch.distributed: two CPU processes on the gloo backend, started by
the test with torchrun's environment and bounded in time, against the single-process model:
logits within tolerance, greedy and seeded tokens identical (contiguous and paged caches) for
a dense, a GQA, a replicated-KV and a MoE config, a Hugging Face checkpoint and a GGUF file kept
quantized (its down projection's rank slices cut blocks, so each rank dequantizes that one);
unseeded sampling identical across the ranks. Each rank's share is the exact slice of the whole
model's weights (or blocks), from safetensors and from GGUF; a model that does not split raises."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from _model_checks import hf_model
from fmkernels.model import ModelConfig, QuantizedEmbedding, QuantizedLinear, Transformer, generate, load_pretrained
from fmkernels.model.network.parallel import TensorParallel, resolve, take, whole_blocks

WORKER = os.path.join(os.path.dirname(__file__), "_tensor_parallel_worker.py")
TIMEOUT_S = 300

COMMON = dict(vocab_size=97, dim=64, n_layers=2, ffn_dim=96, max_seq_len=64)
CONFIGS = {
    "dense": dict(COMMON, n_heads=4, n_kv_heads=4),
    "gqa": dict(COMMON, n_heads=4, n_kv_heads=2),
    "replicated kv": dict(COMMON, n_heads=4, n_kv_heads=1),
    "moe": dict(COMMON, n_heads=4, n_kv_heads=2, n_experts=4, experts_per_token=2),
}
# Each rank's (query heads, KV heads) over 2 ranks.
HEADS = {"dense": (2, 2), "gqa": (2, 1), "replicated kv": (2, 1), "moe": (2, 1), "checkpoint": (2, 1),
         "gguf": (2, 1)}
IDS = [[5, 17, 3, 88, 41, 9, 60], [2, 73, 30, 11, 95, 4, 19]]
PROMPTS = [[5, 17, 3], [2, 73, 30, 11, 95, 4]]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp_checkpoint")
    hf_model("llama", seed=4).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gguf_checkpoint(tmp_path_factory):
    """The GQA config as a q4_0 GGUF file (blocks of 32): over 2 ranks the output projection's
    32 columns a rank are whole blocks and stay quantized, the down projection's 48 are not and
    are dequantized. None without the gguf package."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        return None
    from test_model_quantized import quantized_tensors, write_gguf

    source = Transformer.from_config(ModelConfig(**CONFIGS["gqa"], tie_embeddings=False), seed=3)
    path = tmp_path_factory.mktemp("tp_gguf") / "gqa.gguf"
    return str(write_gguf(path, source, tensors=quantized_tensors(source, lambda name: "q4_0")))


def _run_two_ranks(out, checkpoint, device="cpu", gguf_checkpoint=None):
    """What each of two ranks computed: {rank: {case: results}}."""
    cases = {name: dict(config=config, backend="reference" if name == "dense" else "auto", ids=IDS,
                        prompts=PROMPTS) for name, config in CONFIGS.items()}
    cases["checkpoint"] = dict(checkpoint=checkpoint, backend="auto", ids=IDS, prompts=PROMPTS)
    if gguf_checkpoint is not None:
        # The reference: the int8 kernel would round the ranks' quantized and dequantized
        # projections differently from the single process's all-quantized ones.
        cases["gguf"] = dict(checkpoint=gguf_checkpoint, backend="reference", ids=IDS, prompts=PROMPTS)
    spec = out / "spec.json"
    spec.write_text(json.dumps(dict(out=str(out), cases=cases, device=device)))
    port = str(_port())
    processes = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        processes.append(subprocess.Popen([sys.executable, WORKER, str(spec)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail(f"the two ranks did not finish within {TIMEOUT_S} s")
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    return {rank: torch.load(out / f"rank{rank}.pt") for rank in range(2)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, checkpoint, gguf_checkpoint):
    return _run_two_ranks(tmp_path_factory.mktemp("tp_ranks"), checkpoint, gguf_checkpoint=gguf_checkpoint)


def _single(name, checkpoint, gguf_checkpoint=None):
    if name == "checkpoint":
        return load_pretrained(checkpoint, backend="auto")
    if name == "gguf":
        if gguf_checkpoint is None:
            pytest.skip("the GGUF case needs the gguf package")
        return load_pretrained(gguf_checkpoint, backend="reference")
    return Transformer.from_config(ModelConfig(**CONFIGS[name]), seed=3,
                                   backend="reference" if name == "dense" else "auto")


CASES = [*CONFIGS, "checkpoint", "gguf"]


@pytest.mark.parametrize("name", CASES)
def test_logits_equal_the_single_process_model(two_ranks, checkpoint, gguf_checkpoint, name):
    with torch.no_grad():
        expected = _single(name, checkpoint, gguf_checkpoint)(torch.tensor(IDS))
    for rank in range(2):
        assert two_ranks[rank][name]["heads"] == HEADS[name]
        torch.testing.assert_close(two_ranks[rank][name]["logits"], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind", ["greedy", "sampled"])
@pytest.mark.parametrize("kv_cache", ["contiguous", "paged"])
def test_generation_equals_the_single_process_model(two_ranks, checkpoint, gguf_checkpoint, name, kind, kv_cache):
    model = _single(name, checkpoint, gguf_checkpoint)
    options = dict(temperature=0.9, top_p=0.95, seed=11) if kind == "sampled" else {}
    expected = generate(model, PROMPTS, max_new_tokens=8, kv_cache=kv_cache, ignore_eos=True, **options)
    for rank in range(2):
        assert two_ranks[rank][name][f"{kind} {kv_cache}"] == expected


@pytest.mark.parametrize("name", CASES)
def test_unseeded_sampling_is_the_same_on_every_rank(two_ranks, gguf_checkpoint, name):
    if name == "gguf" and gguf_checkpoint is None:
        pytest.skip("the GGUF case needs the gguf package")
    assert two_ranks[0][name]["unseeded"] == two_ranks[1][name]["unseeded"]


# -- one process: the shares and the plan -------------------------------------------------------


def _shares_are_slices(whole, load, config):
    """Each rank's float weights are the slices of the whole model's (of its dequantized weight
    where the whole one is quantized), and its quantized ones the whole one's blocks' slices."""
    full, modules = dict(whole.named_parameters()), dict(whole.named_modules())
    quantized = 0
    for rank in range(2 if config.n_heads % 2 == 0 else 3):
        world = 2 if config.n_heads % 2 == 0 else 3
        plan = TensorParallel.plan(config, rank, world)
        share = load(plan)
        assert share.tensor_parallel is plan
        for name, param in share.named_parameters():
            weight = full[name] if name in full else modules[name[:-len(".weight")]].weight.dequantize()
            assert torch.equal(param, take(weight, plan.slice_of(name, config.head_dim))), name
        for name, module in share.named_modules():
            if isinstance(module, (QuantizedLinear, QuantizedEmbedding)) and "blocks" in module._buffers:
                weight, where = modules[name].weight, plan.slice_of(name + ".weight", config.head_dim)
                if where is not None:
                    weight = (weight.rows if where[0] == 0 else weight.columns)(where[1], where[2])
                assert torch.equal(module.blocks, weight.blocks), name
                quantized += 1
    return quantized


def test_each_rank_reads_its_slices_of_a_safetensors_checkpoint(checkpoint):
    whole = load_pretrained(checkpoint)
    _shares_are_slices(whole, lambda plan: load_pretrained(checkpoint, tensor_parallel=plan),
                       whole.config)


@pytest.mark.parametrize("weights", ["quantized", "dequantized"])
def test_each_rank_reads_its_slices_of_a_gguf_file(smollm2_gguf, weights):
    pytest.importorskip("gguf")
    whole = load_pretrained(smollm2_gguf, weights=weights)  # 9 query / 3 KV heads: split over 3 ranks
    kept = _shares_are_slices(whole, lambda plan: load_pretrained(smollm2_gguf, tensor_parallel=plan, weights=weights),
                              whole.config)
    # Quantized: every matrix on every rank (o_proj's 192 and down_proj's 512 columns a rank are
    # whole q4_1 blocks of 32), and the replicated q8_0 embedding.
    assert kept == (3 * (30 * 7 + 1) if weights == "quantized" else 0)


def test_a_gguf_rank_dequantizes_only_the_slices_that_cut_blocks(gguf_checkpoint):
    if gguf_checkpoint is None:
        pytest.skip("needs the gguf package")
    whole = load_pretrained(gguf_checkpoint)
    kept = _shares_are_slices(whole, lambda plan: load_pretrained(gguf_checkpoint, tensor_parallel=plan),
                              whole.config)
    # Per rank and layer q, k, v, o, gate, up; the embedding and the LM head, replicated.
    assert kept == 2 * (2 * 6 + 2)
    share = load_pretrained(gguf_checkpoint, tensor_parallel=TensorParallel.plan(whole.config, 1, 2))
    assert isinstance(share.layers[0].self_attn.o_proj, QuantizedLinear)  # 32 columns: one block
    assert type(share.layers[0].mlp.down_proj) is torch.nn.Linear  # 48 columns: a block and a half


def test_a_rank_keeps_a_quantized_slice_of_whole_blocks_only():
    assert whole_blocks(None, 256)  # replicated
    assert whole_blocks((0, 3, 7), 256)  # rows: whole rows of blocks, whatever they are
    assert whole_blocks((1, 64, 128), 32) and whole_blocks((1, 0, 512), 256)
    assert not whole_blocks((1, 48, 96), 32) and not whole_blocks((1, 192, 384), 256)
    assert not whole_blocks((1, 0, 48), 32)


def test_the_plan_refuses_a_model_that_does_not_split():
    config = ModelConfig(**CONFIGS["gqa"])
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by the world size 3"):
        TensorParallel.plan(config, 0, 3)
    with pytest.raises(ValueError, match="ffn_dim=90 is not divisible by the world size 4"):
        TensorParallel.plan(ModelConfig(**dict(COMMON, ffn_dim=90, n_heads=4, n_kv_heads=4)), 0, 4)
    with pytest.raises(ValueError, match="n_kv_heads=3 divisible"):
        TensorParallel.plan(ModelConfig(**dict(COMMON, n_heads=6, n_kv_heads=3, head_dim=16)), 0, 2)
    with pytest.raises(ValueError, match="rank must be in"):
        TensorParallel.plan(config, 2, 2)
    with pytest.raises(TypeError, match="world must be an int"):
        TensorParallel.plan(config, 0, 2.0)
    replicated = [TensorParallel.plan(ModelConfig(**CONFIGS["replicated kv"]), rank, 4) for rank in range(4)]
    assert [(p.n_heads, p.n_kv_heads, p.kv_head_start) for p in replicated] == [(1, 1, 0)] * 4


def test_tensor_parallel_needs_torchrun_or_a_process_group(monkeypatch):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = ModelConfig(**CONFIGS["gqa"])
    with pytest.raises(ValueError, match="torchrun"):
        resolve(True, config)
    with pytest.raises(TypeError, match="tensor_parallel must be"):
        resolve("yes", config)
    assert resolve(False, config) is None and resolve(None, config) is None


def test_generate_under_torchrun_prints_from_rank_0_only():
    """``fmkernels generate`` under torchrun --nproc-per-node 2: the text once, the same as one process."""
    command = ["generate", "--model", "tiny", "--prompt", "The rank", "--max-new-tokens", "12",
               "--temperature", "0.8", "--seed", "5", "--device", "cpu"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    single = subprocess.run([sys.executable, "-m", "fmkernels", *command], env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr
    split = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "fmkernels", *command], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert split.returncode == 0, split.stderr[-4000:]
    text = single.stdout.splitlines()[0]
    assert text.startswith("The rank") and len(text) > len("The rank")
    assert split.stdout.count(text) == 1 and split.stdout.count("prefill:") == 1


@pytest.mark.gpu
def test_two_gpus_with_nccl_equal_one(tmp_path, checkpoint):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs (NCCL tensor parallelism)")
    ranks = _run_two_ranks(tmp_path, checkpoint, device="cuda")
    for name in CASES:
        with torch.no_grad():
            expected = _single(name, checkpoint).cuda()(torch.tensor(IDS, device="cuda")).cpu()
        for rank in range(2):
            torch.testing.assert_close(ranks[rank][name]["logits"], expected, rtol=1e-3, atol=1e-3)
        assert ranks[0][name]["greedy paged"] == ranks[1][name]["greedy paged"]
        assert ranks[0][name]["unseeded"] == ranks[1][name]["unseeded"]
