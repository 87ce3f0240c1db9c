"""One rank of the tensor-parallel tests (tests/test_tensor_parallel.py starts two, with
torchrun's environment): for each config, the rank's share of the model (random weights from
a seed, or a checkpoint), its logits and generated tokens, saved for the test to compare."""

import json
import sys

import torch
from fmkernels.model import generate, load_pretrained


def run(spec):
    from fmkernels.model import ModelConfig, Transformer

    import os

    results = {}
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if spec.get("device") == "cuda":  # one GPU per rank, NCCL
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    for name, case in spec["cases"].items():
        if "checkpoint" in case:
            model = load_pretrained(case["checkpoint"], backend=case["backend"], device=device,
                                    tensor_parallel=True)
        else:
            model = Transformer.from_config(ModelConfig(**case["config"]), seed=3, backend=case["backend"],
                                            device=device, tensor_parallel=True)
        ids = torch.tensor(case["ids"], device=device)
        with torch.no_grad():
            logits = model(ids).cpu()
        prompts = case["prompts"]
        out = {"logits": logits, "heads": (model.tensor_parallel.n_heads, model.tensor_parallel.n_kv_heads)}
        for kv_cache in ("contiguous", "paged"):
            out[f"greedy {kv_cache}"] = generate(model, prompts, max_new_tokens=8, kv_cache=kv_cache, ignore_eos=True)
            out[f"sampled {kv_cache}"] = generate(model, prompts, max_new_tokens=8, kv_cache=kv_cache, ignore_eos=True,
                                                  temperature=0.9, top_p=0.95, seed=11)
        out["unseeded"] = generate(model, prompts, max_new_tokens=6, ignore_eos=True, temperature=1.0)
        results[name] = out
    import torch.distributed as dist

    torch.save(results, f"{spec['out']}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        run(json.load(file))
