"""Tensor parallelism for the thin model over torch.distributed, the way Megatron-LM and
gpt-fast split a decoder.

Each rank of a process group holds:

* its query heads, ``n_heads / world`` of them, and the KV heads those read: ``n_kv_heads /
  world`` where that divides, else (``world`` a multiple of ``n_kv_heads``) the one KV head its
  query heads share, replicated on ``world / n_kv_heads`` ranks, as vLLM does;
* q/k/v projections split by output rows (column-parallel), the output projection by input
  columns (row-parallel); likewise the MLP (gate and up by rows, down by columns) and every
  expert of a Mixtral block (w1, w3 by rows, w2 by columns), with the router replicated;
* the embedding, the norms and the LM head replicated.

The ops need no change: each rank runs them on its own heads and its own slice of the MLP.
Two all-reduces (sums) a layer join the ranks: after the attention output projection and
after the MLP's down projection. Every rank then holds the same hidden states and the same
logits, so sampling, whose draws are keyed by (seed, step) per sequence, picks the same token
on every rank without a broadcast.

``fmkernels.model.load_pretrained(path, tensor_parallel=True)`` under ``torchrun`` (or with a
process group of one's own) reads only the rank's slices: safetensors slices read from the
file, GGUF row slices dequantize only their rows; a GGUF column slice (the output and down
projections) dequantizes the tensor's rows a slab at a time and keeps its columns. A GGUF
matrix kept quantized (``weights="quantized"``) stays so where the rank's slice is whole
blocks (``whole_blocks``): row slices always, column slices where both ends fall on block
boundaries; a slice that cuts a block is dequantized.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional, Tuple

import torch

from .config import ModelConfig

#: (dim, start, stop): the slice of a full parameter a rank holds.
Slice = Tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """One rank's share of a model split over ``world`` ranks of ``group``.

    Attributes
    ----------
    rank, world : int
        The rank in the group and the group's size.
    group : ProcessGroup or None
        None: torch.distributed's default group.
    n_heads, n_kv_heads : int
        The query and KV heads this rank holds.
    head_start, kv_head_start : int
        The first of them among the model's heads.
    ffn_dim, ffn_start : int
        The rows of the MLP (and of each expert) this rank holds, and the first.
    """

    rank: int
    world: int
    group: Any
    n_heads: int
    n_kv_heads: int
    head_start: int
    kv_head_start: int
    ffn_dim: int
    ffn_start: int

    @classmethod
    def plan(cls, config: ModelConfig, rank: int, world: int, group: Any = None) -> "TensorParallel":
        """This rank's share; ``ValueError`` where the model does not split over ``world``."""
        for name, value in (("rank", rank), ("world", world)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world) with world >= 1, got rank={rank}, world={world}")
        if config.n_heads % world:
            raise ValueError(f"tensor parallelism splits the query heads: n_heads={config.n_heads} is not divisible "
                             f"by the world size {world}")
        if config.ffn_dim % world:
            raise ValueError(f"tensor parallelism splits the MLP: ffn_dim={config.ffn_dim} is not divisible by the "
                             f"world size {world}")
        heads = config.n_heads // world
        if config.n_kv_heads % world == 0:
            kv_heads, kv_start = config.n_kv_heads // world, rank * (config.n_kv_heads // world)
        elif world % config.n_kv_heads == 0:
            # Fewer KV heads than ranks: each rank's query heads share one KV head; replicate it.
            kv_heads, kv_start = 1, rank // (world // config.n_kv_heads)
        else:
            raise ValueError(
                f"tensor parallelism needs n_kv_heads={config.n_kv_heads} divisible by the world size {world} "
                f"(split) or the world size a multiple of it (replicated)"
            )
        ffn = config.ffn_dim // world
        return cls(rank, world, group, heads, kv_heads, rank * heads, kv_start, ffn, rank * ffn)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks, in place (the partial outputs of a row-parallel matmul)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def same_on_every_rank(self, value: int) -> int:
        """Rank 0's ``value`` (an int64), on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        backend = dist.get_backend(self.group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        box = torch.tensor([value], dtype=torch.int64, device=device)
        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(box, src=source, group=self.group)
        return int(box.item())

    def slice_of(self, name: str, head_dim: int) -> Optional[Slice]:
        """The slice of the full parameter ``name`` (fmkernels' names) this rank holds; None
        for a replicated one."""
        q = (self.head_start * head_dim, (self.head_start + self.n_heads) * head_dim)
        kv = (self.kv_head_start * head_dim, (self.kv_head_start + self.n_kv_heads) * head_dim)
        ffn = (self.ffn_start, self.ffn_start + self.ffn_dim)
        leaf = re.sub(r"^layers\.\d+\.", "", name)
        leaf = re.sub(r"^block_sparse_moe\.experts\.\d+\.", "experts.", leaf)
        rule = {
            "self_attn.q_proj.weight": (0, *q), "self_attn.k_proj.weight": (0, *kv),
            "self_attn.v_proj.weight": (0, *kv), "self_attn.o_proj.weight": (1, *q),
            "mlp.gate_proj.weight": (0, *ffn), "mlp.up_proj.weight": (0, *ffn), "mlp.down_proj.weight": (1, *ffn),
            "experts.w1.weight": (0, *ffn), "experts.w3.weight": (0, *ffn), "experts.w2.weight": (1, *ffn),
        }
        return rule.get(leaf)


def take(tensor: torch.Tensor, where: Optional[Slice]) -> torch.Tensor:
    """The rank's slice of a full tensor (a view)."""
    if where is None:
        return tensor
    dim, start, stop = where
    return tensor.narrow(dim, start, stop - start)


def whole_blocks(where: Optional[Slice], block_size: int) -> bool:
    """Whether a rank's slice ``where`` of a block-quantized weight (N, K), blocks of
    ``block_size`` along K, is whole blocks, so the rank can keep it quantized: the whole
    weight, any rows (dim 0), or columns (dim 1) that start and stop on a block boundary."""
    if where is None or where[0] == 0:
        return True
    return where[1] % block_size == 0 and where[2] % block_size == 0


def resolve(tensor_parallel, config: ModelConfig, device=None) -> Optional[TensorParallel]:
    """``tensor_parallel`` as the argument of ``load_pretrained``/``Transformer.from_config`` (False/None,
    True: torch.distributed's default group, initialised from torchrun's environment if it is
    not yet, with NCCL for a model on a GPU and gloo otherwise; a ProcessGroup; or a
    ``TensorParallel``) -> this rank's plan, or None."""
    if tensor_parallel is None or tensor_parallel is False:
        return None
    if isinstance(tensor_parallel, TensorParallel):
        return tensor_parallel
    import torch.distributed as dist

    if tensor_parallel is True:
        group = None
        if not dist.is_available():
            raise RuntimeError("tensor_parallel=True needs torch.distributed, which this torch build lacks")
        if not dist.is_initialized():
            if "WORLD_SIZE" not in os.environ:
                raise ValueError("tensor_parallel=True needs torch.distributed initialised, or torchrun's "
                                 "environment (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT) to initialise it: "
                                 "run under torchrun --nproc-per-node N")
            on_gpu = device is not None and torch.device(device).type == "cuda"
            dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    elif isinstance(tensor_parallel, dist.ProcessGroup):
        group = tensor_parallel
    else:
        raise TypeError(f"tensor_parallel must be a bool, a torch.distributed ProcessGroup or a TensorParallel, "
                        f"got {type(tensor_parallel).__name__}")
    return TensorParallel.plan(config, dist.get_rank(group), dist.get_world_size(group), group)


def is_first_rank(model) -> bool:
    """Whether this process prints: rank 0 of the model's group, or a model on one process."""
    plan = getattr(model, "tensor_parallel", None)
    return plan is None or plan.rank == 0
