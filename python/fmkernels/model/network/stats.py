"""What a model costs, from its configuration alone: parameters (total and active per
token), weight and KV-cache memory, FLOPs per token, training FLOPs, and the roofline
bounds on decode and prefill throughput on a given device.

Every figure is computed from ``ModelConfig``'s dimensions, for the Llama/Mistral/Mixtral
layout that ``fmkernels.model.Transformer`` builds: no biases; per layer an RMSNorm
before attention and one before the MLP; attention projections wq (dim x heads*head_dim),
wk and wv (dim x kv_heads*head_dim) and wo (heads*head_dim x dim); a SwiGLU MLP of three
dim x ffn_dim matrices, or for a mixture of experts one such MLP per expert plus a
dim x n_experts router; a final RMSNorm and an LM head (vocab x dim) unless tied to the
embedding.

Quantized weights (``model_stats(config, weights=...)``: a model holding ``QuantizedLinear``
layers, or a mapping of weight names to formats, e.g. a GGUF file's ``q4_1`` matrices): each
such weight is held and read at its format's bytes per weight (``fmkernels.quantized.FORMATS``:
q4_1 20 bytes per 32 weights, q8_0 34, ...), every other weight at ``dtype``'s. A part mixing
formats (attention, the MLP, ...) counts at its average; a tensor-parallel rank's share of a
part at that part's average too.

The roofline model of one decode step of ``batch`` sequences at ``context`` cached tokens:

- memory time = (weights read + KV cache read) / bandwidth. The weights read are every
  matrix the step multiplies by (attention, router, the experts the batch routes to, the
  LM head) and the norms; the embedding table is gathered row by row, so only its LM-head
  use counts (the table itself when tied). For a mixture of experts, the experts the
  batch touches in a layer are E * (1 - (1 - k/E) ** batch) on average if each token picks
  k of E experts uniformly at random (exactly k at batch 1, all E at large batch).
- compute time = batch * forward FLOPs per token / the device's matmul rate.
- the step takes at least the larger of the two; tokens/s <= batch / step time.

FLOPs count a multiply-add as 2. The forward pass of one token at position ``context``
(attending to ``context`` keys) costs 2 * (matmul parameters per token) for the
projections, MLP or routed experts and LM head (the LM head counts even when tied), plus
4 * layers * heads * head_dim * context for q k^T and p v. Prefill of a ``context``-token
prompt attends causally: token i sees i + 1 keys, context * (context + 1) / 2 in all.
Training costs about 6 FLOPs per active parameter per token (forward 2, backward 4); the
compute-optimal budget of the Chinchilla rule is about 20 tokens per parameter (fit on
dense models; here applied to the total count).

Tensor parallelism over N ranks (``ModelStats.tensor_parallel``, the split of
``fmkernels.model.network.parallel``): each rank holds its query heads, its KV heads (or one
replicated KV head where N exceeds them), 1/N of the MLP and of every expert, and the
embedding, norms, router and LM head whole; its KV cache holds its KV heads. A decode step
on a rank reads its weights and KV cache and computes its share (the LM head whole), then
two all-reduces a layer sum batch x dim activations (2 bytes each, 4 in fp32): a ring
all-reduce sends 2 (N - 1) / N of them per rank. The step takes at least the larger of the
memory and compute times plus the all-reduce time at the interconnect's bandwidth per
direction (no overlap, latency not counted).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

from ...quantized import FORMATS
from .config import ModelConfig

#: Bytes per element of each weight/KV dtype that ``model_stats`` accepts.
DTYPE_BYTES: Dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}

CHINCHILLA_TOKENS_PER_PARAMETER = 20
TRAINING_FLOPS_PER_PARAMETER_TOKEN = 6


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """A device's limits: memory bandwidth (GB/s, 1e9 bytes), dense matmul rate (TFLOP/s)
    at the compute precision, and memory (GB, 1e9 bytes; None when unknown)."""

    name: str
    memory_bandwidth_gb_s: float
    tflops: float
    memory_gb: Optional[float] = None

    def __post_init__(self):
        for field in ("memory_bandwidth_gb_s", "tflops"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"DeviceSpec.{field} must be a positive finite number, got {value!r}")
        if self.memory_gb is not None and (
            isinstance(self.memory_gb, bool) or not isinstance(self.memory_gb, (int, float))
            or not self.memory_gb > 0 or math.isinf(self.memory_gb)
        ):
            raise ValueError(f"DeviceSpec.memory_gb must be a positive finite number or None, got {self.memory_gb!r}")

    @classmethod
    def parse(cls, spec: Union[str, "DeviceSpec"]) -> "DeviceSpec":
        """A named device (``DEVICES``) or ``"BANDWIDTH_GBPS,TFLOPS[,MEMORY_GB]"``."""
        if isinstance(spec, DeviceSpec):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"device must be a device name or 'BANDWIDTH_GBPS,TFLOPS[,MEMORY_GB]', got {spec!r}")
        key = spec.strip().lower()
        if key in DEVICES:
            return DEVICES[key]
        parts = key.split(",")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[0-9]*\.?[0-9]+(e[+-]?[0-9]+)?", p.strip())
                                               for p in parts):
            raise ValueError(
                f"device must be one of {', '.join(sorted(DEVICES))} or 'BANDWIDTH_GBPS,TFLOPS[,MEMORY_GB]' "
                f"(e.g. '3350,989,80'), got {spec!r}"
            )
        numbers = [float(p) for p in parts]
        return cls(name=spec.strip(), memory_bandwidth_gb_s=numbers[0], tflops=numbers[1],
                   memory_gb=numbers[2] if len(numbers) == 3 else None)


#: Datasheet figures (SXM parts): HBM bandwidth, dense bf16 tensor-core rate, memory.
#: Measured figures are lower (this project's H100 copy bandwidth was 2976 GB/s and its
#: bf16 matmul 794 TFLOP/s, bench/results/nvidia-h100-80gb-hbm3/): pass them as
#: "BANDWIDTH_GBPS,TFLOPS" for a bound against what the machine really reaches.
DEVICES: Dict[str, DeviceSpec] = {
    "a100": DeviceSpec("a100", memory_bandwidth_gb_s=2039, tflops=312, memory_gb=80),
    "h100": DeviceSpec("h100", memory_bandwidth_gb_s=3350, tflops=989, memory_gb=80),
    "h200": DeviceSpec("h200", memory_bandwidth_gb_s=4800, tflops=989, memory_gb=141),
}

#: NVLink bandwidth per GPU per direction (GB/s) of the named devices: the default
#: interconnect for ``ModelStats.tensor_parallel``.
INTERCONNECT_GB_S: Dict[str, float] = {"a100": 300, "h100": 450, "h200": 450}


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Parameters by part. ``mlp`` is the dense MLP, or every expert of a mixture;
    ``active_mlp`` the part of it one token runs through (experts_per_token experts)."""

    embedding: int
    attention: int
    mlp: int
    active_mlp: int
    router: int
    norms: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.router + self.norms + self.lm_head

    @property
    def active(self) -> int:
        """Parameters one token uses: the total less the experts it is not routed to."""
        return self.total - self.mlp + self.active_mlp

    def as_dict(self) -> Dict[str, int]:
        return {
            "embedding": self.embedding, "attention": self.attention, "mlp": self.mlp, "router": self.router,
            "norms": self.norms, "lm_head": self.lm_head, "total": self.total, "active": self.active,
        }


def parameter_counts(config) -> ParameterCounts:
    c = config
    attention_per_layer = c.dim * c.n_heads * c.head_dim * 2 + c.dim * c.n_kv_heads * c.head_dim * 2
    mlp_per_expert = 3 * c.dim * c.ffn_dim
    experts = max(c.n_experts, 1)
    routed = c.experts_per_token if c.n_experts else 1
    return ParameterCounts(
        embedding=c.vocab_size * c.dim,
        attention=c.n_layers * attention_per_layer,
        mlp=c.n_layers * experts * mlp_per_expert,
        active_mlp=c.n_layers * routed * mlp_per_expert,
        router=c.n_layers * c.dim * c.n_experts,
        norms=(2 * c.n_layers + 1) * c.dim,
        lm_head=0 if c.tie_embeddings else c.vocab_size * c.dim,
    )


#: The parts of ``ParameterCounts`` that hold weights, in its order.
PARTS = ("embedding", "attention", "mlp", "router", "norms", "lm_head")


def _weights(config) -> Iterator[Tuple[str, str, int]]:
    """(name, part, elements) of every weight of ``config``'s model, under fmkernels' names."""
    c = config
    q, kv = c.dim * c.n_heads * c.head_dim, c.dim * c.n_kv_heads * c.head_dim
    yield "embed_tokens.weight", "embedding", c.vocab_size * c.dim
    for i in range(c.n_layers):
        layer = f"layers.{i}."
        for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv), ("o_proj", q)):
            yield f"{layer}self_attn.{name}.weight", "attention", size
        if c.n_experts:
            yield f"{layer}block_sparse_moe.gate.weight", "router", c.dim * c.n_experts
            for e in range(c.n_experts):
                for name in ("w1", "w3", "w2"):
                    yield f"{layer}block_sparse_moe.experts.{e}.{name}.weight", "mlp", c.dim * c.ffn_dim
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                yield f"{layer}mlp.{name}.weight", "mlp", c.dim * c.ffn_dim
        for name in ("input_layernorm", "post_attention_layernorm"):
            yield f"{layer}{name}.weight", "norms", c.dim
    yield "norm.weight", "norms", c.dim
    if not c.tie_embeddings:
        yield "lm_head.weight", "lm_head", c.vocab_size * c.dim


def element_bytes(format: str) -> float:
    """Bytes per weight of a dtype of ``DTYPE_BYTES`` or a block format of ``fmkernels.quantized``."""
    if format in DTYPE_BYTES:
        return DTYPE_BYTES[format]
    if format in FORMATS:
        return FORMATS[format].block_bytes / FORMATS[format].block_size
    raise ValueError(f"a weight's format must be one of {', '.join([*DTYPE_BYTES, *FORMATS])}, got {format!r}")


def _bytes(count: float, dtype: str) -> int:
    return math.ceil(count * DTYPE_BYTES[dtype])


def _expected_experts_touched(n_experts: int, per_token: int, batch: int) -> float:
    """Distinct experts a layer runs for ``batch`` tokens, each routed to ``per_token`` of
    ``n_experts`` uniformly at random: n * (1 - (1 - k/n) ** batch)."""
    return n_experts * (1.0 - (1.0 - per_token / n_experts) ** batch)


@dataclasses.dataclass(frozen=True)
class DecodeBound:
    """The roofline of one decode step of ``batch`` sequences at ``context`` cached tokens."""

    batch: int
    context: int
    weight_bytes: int  # weights read per step
    kv_bytes: int  # KV cache read per step (every sequence's context)
    flops: int  # batch x forward FLOPs per token at this context
    memory_time_s: float
    compute_time_s: float
    memory_bytes: int  # weights + KV cache held for batch x context
    fits: Optional[bool]  # memory_bytes within the device's memory; None when unknown

    @property
    def step_time_s(self) -> float:
        return max(self.memory_time_s, self.compute_time_s)

    @property
    def tokens_per_s(self) -> float:
        """Tokens generated per second over the whole batch, at most."""
        return self.batch / self.step_time_s

    @property
    def bound(self) -> str:
        return "memory" if self.memory_time_s >= self.compute_time_s else "compute"

    def as_dict(self) -> Dict[str, Any]:
        return {
            "batch": self.batch, "context": self.context, "weight_bytes_per_step": self.weight_bytes,
            "kv_bytes_per_step": self.kv_bytes, "flops_per_step": self.flops,
            "memory_time_s": self.memory_time_s, "compute_time_s": self.compute_time_s,
            "tokens_per_s": self.tokens_per_s, "tokens_per_s_per_sequence": self.tokens_per_s / self.batch,
            "bound": self.bound, "memory_bytes": self.memory_bytes, "fits_in_memory": self.fits,
        }


@dataclasses.dataclass(frozen=True)
class TensorParallelBound:
    """A decode step split over ``world`` ranks: what each rank holds and reads, and the
    roofline with the all-reduces (see the module's docstring)."""

    world: int
    interconnect_gb_s: float
    n_heads: int  # query heads per rank
    n_kv_heads: int  # KV heads per rank
    kv_replicated: bool  # fewer KV heads than ranks: each rank holds one, shared
    weight_bytes: int  # weights held per rank
    kv_bytes: int  # KV cache held per rank (batch x context)
    step_weight_bytes: int  # weights one decode step reads per rank
    all_reduce_bytes_per_token: int  # activation bytes a rank sends per generated token
    batch: int
    context: int
    memory_time_s: float
    compute_time_s: float
    communication_time_s: float

    @property
    def step_time_s(self) -> float:
        return max(self.memory_time_s, self.compute_time_s) + self.communication_time_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_time_s

    def as_dict(self) -> Dict[str, Any]:
        return {
            "world": self.world, "interconnect_gb_s": self.interconnect_gb_s, "n_heads_per_rank": self.n_heads,
            "n_kv_heads_per_rank": self.n_kv_heads, "kv_heads_replicated": self.kv_replicated,
            "weight_bytes_per_rank": self.weight_bytes, "kv_bytes_per_rank": self.kv_bytes,
            "decode_weight_bytes_per_rank": self.step_weight_bytes,
            "all_reduce_bytes_per_token": self.all_reduce_bytes_per_token, "batch": self.batch,
            "context": self.context, "memory_time_s": self.memory_time_s, "compute_time_s": self.compute_time_s,
            "communication_time_s": self.communication_time_s, "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
        }


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """``model_stats(config, ...)``: every figure of ``fmkernels info``; ``as_dict`` gives the
    ``--json`` layout (keys documented in the README)."""

    config: Any
    dtype: str
    kv_dtype: str
    context: int
    batch: int
    device: DeviceSpec
    train_tokens: int
    table_batches: Tuple[int, ...]
    table_contexts: Tuple[int, ...]
    #: (weight name, format) of each weight held in another format than ``dtype``.
    weight_formats: Tuple[Tuple[str, str], ...] = ()

    @property
    def params(self) -> ParameterCounts:
        return parameter_counts(self.config)

    # -- memory ---------------------------------------------------------------------------

    @property
    def element_bytes(self) -> Dict[str, float]:
        """Bytes per weight of each part (``PARTS``): ``dtype``'s, or its weights' average
        where ``weight_formats`` names some of them (a part with no weights: ``dtype``'s)."""
        default = DTYPE_BYTES[self.dtype]
        if not self.weight_formats:
            return dict.fromkeys(PARTS, default)
        formats = dict(self.weight_formats)
        held, counts = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0)
        for name, part, size in _weights(self.config):
            held[part] += size * (element_bytes(formats[name]) if name in formats else default)
            counts[part] += size
        return {part: held[part] / counts[part] if counts[part] else default for part in PARTS}

    def _held(self, **counts: float) -> int:
        """Bytes of ``counts`` weights of each part (keyword: the part), at its bytes per weight."""
        per = self.element_bytes
        return math.ceil(sum(count * per[part] for part, count in counts.items()))

    @property
    def format_counts(self) -> Dict[str, int]:
        """Weights held in each format (``dtype`` for all but those ``weight_formats`` names)."""
        formats, out = dict(self.weight_formats), {}
        for name, _, size in _weights(self.config):
            format = formats.get(name, self.dtype)
            out[format] = out.get(format, 0) + size
        return out

    def weight_bytes(self, dtype: Optional[str] = None) -> int:
        """All weights held in ``dtype``; default: as held (the chosen dtype, and each
        quantized weight at its format's bytes)."""
        if dtype is not None:
            return _bytes(self.params.total, dtype)
        p = self.params
        return self._held(embedding=p.embedding, attention=p.attention, mlp=p.mlp, router=p.router, norms=p.norms,
                          lm_head=p.lm_head)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer: 2 x layers x kv_heads x head_dim elements."""
        c = self.config
        return _bytes(2 * c.n_layers * c.n_kv_heads * c.head_dim, self.kv_dtype)

    def kv_bytes(self, context: Optional[int] = None, batch: Optional[int] = None) -> int:
        context = self.context if context is None else context
        batch = self.batch if batch is None else batch
        return self.kv_bytes_per_token * context * batch

    # -- FLOPs ----------------------------------------------------------------------------

    @property
    def matmul_params_per_token(self) -> int:
        """Weights one token multiplies by: attention, router, its experts (or the MLP), LM head."""
        p, c = self.params, self.config
        return p.attention + p.router + p.active_mlp + c.vocab_size * c.dim

    def attention_flops_per_token(self, context: Optional[int] = None) -> int:
        """q k^T and p v of one token against ``context`` keys, every layer and head."""
        c = self.config
        context = self.context if context is None else context
        return 4 * c.n_layers * c.n_heads * c.head_dim * context

    def forward_flops_per_token(self, context: Optional[int] = None) -> int:
        return 2 * self.matmul_params_per_token + self.attention_flops_per_token(context)

    @property
    def prefill_flops(self) -> int:
        """One prompt of ``context`` tokens with causal attention (token i sees i + 1 keys)."""
        n = self.context
        return n * 2 * self.matmul_params_per_token + self.attention_flops_per_token(1) * n * (n + 1) // 2

    @property
    def training_flops(self) -> int:
        return TRAINING_FLOPS_PER_PARAMETER_TOKEN * self.params.active * self.train_tokens

    @property
    def chinchilla_tokens(self) -> int:
        return CHINCHILLA_TOKENS_PER_PARAMETER * self.params.total

    # -- rooflines ------------------------------------------------------------------------

    def decode_weight_bytes(self, batch: Optional[int] = None) -> int:
        """Weights one decode step of ``batch`` tokens reads (see the module's docstring)."""
        p, c = self.params, self.config
        batch = self.batch if batch is None else batch
        if c.n_experts:
            per_expert = p.mlp / c.n_experts
            experts = per_expert * _expected_experts_touched(c.n_experts, c.experts_per_token, batch)
        else:
            experts = p.mlp
        head = {"embedding" if c.tie_embeddings else "lm_head": c.vocab_size * c.dim}
        return self._held(attention=p.attention, router=p.router, norms=p.norms, mlp=experts, **head)

    def decode(self, batch: Optional[int] = None, context: Optional[int] = None) -> DecodeBound:
        batch = self.batch if batch is None else batch
        context = self.context if context is None else context
        weights = self.decode_weight_bytes(batch)
        kv = self.kv_bytes(context, batch)
        flops = batch * self.forward_flops_per_token(context)
        memory_bytes = self.weight_bytes() + kv
        capacity = self.device.memory_gb
        return DecodeBound(
            batch=batch, context=context, weight_bytes=weights, kv_bytes=kv, flops=flops,
            memory_time_s=(weights + kv) / (self.device.memory_bandwidth_gb_s * 1e9),
            compute_time_s=flops / (self.device.tflops * 1e12),
            memory_bytes=memory_bytes, fits=None if capacity is None else memory_bytes <= capacity * 1e9,
        )

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second at most: the device's matmul rate over the FLOPs per
        prompt token (a ``context``-token prompt)."""
        return self.device.tflops * 1e12 * self.context / self.prefill_flops

    def tensor_parallel(self, world: int, interconnect_gb_s: Optional[float] = None) -> TensorParallelBound:
        """The decode step at this batch and context split over ``world`` ranks, each a
        ``self.device``, joined at ``interconnect_gb_s`` per rank per direction (default: the
        named device's NVLink; required for a custom device). ValueError where the model does
        not split over ``world`` (``TensorParallel.plan``'s rules)."""
        from .parallel import TensorParallel

        world = _positive_int("world", world)
        if interconnect_gb_s is None:
            if self.device.name not in INTERCONNECT_GB_S:
                raise ValueError(f"the interconnect bandwidth is needed for device {self.device.name!r} "
                                 f"(known for {', '.join(sorted(INTERCONNECT_GB_S))})")
            interconnect_gb_s = INTERCONNECT_GB_S[self.device.name]
        if isinstance(interconnect_gb_s, bool) or not isinstance(interconnect_gb_s, (int, float)) \
                or not 0 < interconnect_gb_s < math.inf:
            raise ValueError(f"interconnect_gb_s must be a positive finite number, got {interconnect_gb_s!r}")
        c, p = self.config, self.params
        plan = TensorParallel.plan(c, 0, world)
        attention = c.n_layers * (2 * c.dim * plan.n_heads * c.head_dim + 2 * c.dim * plan.n_kv_heads * c.head_dim)
        per_expert = 3 * c.dim * plan.ffn_dim * c.n_layers
        experts = max(c.n_experts, 1)
        weights = self._held(embedding=p.embedding, router=p.router, norms=p.norms, lm_head=p.lm_head,
                             attention=attention, mlp=experts * per_expert)
        head = {"embedding": p.embedding} if c.tie_embeddings else {"lm_head": p.lm_head}
        touched = (_expected_experts_touched(c.n_experts, c.experts_per_token, self.batch) if c.n_experts else 1)
        step_weights = self._held(attention=attention, router=p.router, norms=p.norms, mlp=touched * per_expert,
                                  **head)
        kv = self.kv_bytes() * plan.n_kv_heads // c.n_kv_heads
        routed = c.experts_per_token if c.n_experts else 1
        matmuls = attention + p.router + c.vocab_size * c.dim + routed * per_expert
        attention_flops = self.attention_flops_per_token() * plan.n_heads // c.n_heads
        flops = self.batch * (2 * matmuls + attention_flops)
        activation = 4 if self.dtype == "fp32" else 2
        per_token = math.ceil(2 * c.n_layers * 2 * (world - 1) / world * c.dim * activation)
        return TensorParallelBound(
            world=world, interconnect_gb_s=float(interconnect_gb_s), n_heads=plan.n_heads,
            n_kv_heads=plan.n_kv_heads, kv_replicated=c.n_kv_heads % world != 0, weight_bytes=weights,
            kv_bytes=kv, step_weight_bytes=step_weights, all_reduce_bytes_per_token=per_token, batch=self.batch,
            context=self.context, memory_time_s=(step_weights + kv) / (self.device.memory_bandwidth_gb_s * 1e9),
            compute_time_s=flops / (self.device.tflops * 1e12),
            communication_time_s=self.batch * per_token / (interconnect_gb_s * 1e9),
        )

    def table(self) -> Sequence[DecodeBound]:
        return [self.decode(b, n) for n in self.table_contexts for b in self.table_batches]

    def as_dict(self) -> Dict[str, Any]:
        c, p = self.config, self.params
        decode = self.decode()
        return {
            "config": {
                "architecture": c.architecture, "vocab_size": c.vocab_size, "dim": c.dim, "n_layers": c.n_layers,
                "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "ffn_dim": c.ffn_dim,
                "n_experts": c.n_experts, "experts_per_token": c.experts_per_token,
                "tie_embeddings": c.tie_embeddings, "max_seq_len": c.max_seq_len,
            },
            "dtype": self.dtype,
            "kv_dtype": self.kv_dtype,
            "context": self.context,
            "batch": self.batch,
            "device": dataclasses.asdict(self.device),
            "parameters": p.as_dict(),
            "weight_bytes": {dtype: self.weight_bytes(dtype) for dtype in DTYPE_BYTES},
            "kv_cache": {"bytes_per_token": self.kv_bytes_per_token, "bytes": self.kv_bytes()},
            "flops": {
                "matmul_params_per_token": self.matmul_params_per_token,
                "forward_per_token": self.forward_flops_per_token(),
                "attention_per_token": self.attention_flops_per_token(),
                "prefill": self.prefill_flops,
                "training_tokens": self.train_tokens,
                "training": self.training_flops,
                "chinchilla_tokens": self.chinchilla_tokens,
            },
            "decode": decode.as_dict(),
            "prefill": {"tokens_per_s": self.prefill_tokens_per_s},
            "table": [row.as_dict() for row in self.table()],
            # Only for quantized weights, so the keys of a plain model's report stay as they are.
            **({"weight_formats": {"parameters": self.format_counts, "bytes": self.weight_bytes()}}
               if self.weight_formats else {}),
        }


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _dtype(name: str, value) -> str:
    if value not in DTYPE_BYTES:
        raise ValueError(f"{name} must be one of {', '.join(DTYPE_BYTES)}, got {value!r}")
    return value


def _positive_ints(name: str, values: Iterable[int]) -> Tuple[int, ...]:
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} must name at least one value, got none")
    return tuple(sorted(set(_positive_int(name, v) for v in values)))


def default_table_contexts(config, context: int) -> Tuple[int, ...]:
    """1k, 4k, 16k, ... up to max_seq_len, and ``context``."""
    contexts = {context}
    n = 1024
    while n <= config.max_seq_len:
        contexts.add(n)
        n *= 4
    return tuple(sorted(contexts))


DEFAULT_TABLE_BATCHES = (1, 4, 16, 64, 256)


def model_stats(
    config,
    *,
    dtype: str = "bf16",
    kv_dtype: Optional[str] = None,
    context: Optional[int] = None,
    batch: int = 1,
    device: Union[str, DeviceSpec] = "h100",
    train_tokens: Optional[int] = None,
    table_batches: Optional[Iterable[int]] = None,
    table_contexts: Optional[Iterable[int]] = None,
    weights=None,
) -> ModelStats:
    """What the model of ``config`` costs: parameters, memory, FLOPs and roofline bounds
    (``fmkernels info``).

    Parameters
    ----------
    config : ModelConfig
    dtype : str
        The weights' dtype: fp32, fp16, bf16, fp8, int8 or int4.
    kv_dtype : str, optional
        The KV cache's dtype; default ``dtype``.
    context : int, optional
        Tokens in each sequence's KV cache (and the prompt length for prefill); default
        ``max_seq_len``, at most 8192.
    batch : int
        Sequences decoded together.
    device : str or DeviceSpec
        "a100", "h100", "h200" (datasheet figures) or "BANDWIDTH_GBPS,TFLOPS[,MEMORY_GB]".
    train_tokens : int, optional
        The training budget in tokens; default the Chinchilla budget (20 per parameter).
    table_batches, table_contexts : iterables of int, optional
        The decode-bound table's grid; default batches 1, 4, 16, 64, 256 and contexts
        1k, 4k, 16k, ... up to ``max_seq_len`` plus ``context``.
    weights : Transformer or mapping of str to str, optional
        The formats weights are held in where not ``dtype``: a model (its ``QuantizedLinear``
        and ``QuantizedEmbedding`` weights' formats), or weight names (fmkernels', e.g.
        ``"layers.0.mlp.up_proj.weight"``) -> a block format (q8_0, q4_0, q4_1, q4_k, q6_k) or a
        dtype above. Memory and the decode rooflines count those weights' real bytes.

    Returns
    -------
    ModelStats
        Figures as properties and methods; ``as_dict()`` is ``fmkernels info --json``.
        How each is derived: this module's docstring.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    _dtype("dtype", dtype)
    kv_dtype = _dtype("kv_dtype", dtype if kv_dtype is None else kv_dtype)
    context = min(config.max_seq_len, 8192) if context is None else _positive_int("context", context)
    _positive_int("batch", batch)
    device = DeviceSpec.parse(device)
    params = parameter_counts(config)
    train_tokens = (CHINCHILLA_TOKENS_PER_PARAMETER * params.total if train_tokens is None
                    else _positive_int("train_tokens", train_tokens))
    batches = _positive_ints("table_batches", DEFAULT_TABLE_BATCHES if table_batches is None else table_batches)
    contexts = _positive_ints(
        "table_contexts", default_table_contexts(config, context) if table_contexts is None else table_contexts
    )
    return ModelStats(
        config=config, dtype=dtype, kv_dtype=kv_dtype, context=context, batch=batch, device=device,
        train_tokens=train_tokens, table_batches=batches, table_contexts=contexts,
        weight_formats=_weight_formats(config, weights),
    )


def _weight_formats(config, weights) -> Tuple[Tuple[str, str], ...]:
    """``model_stats``' ``weights`` as (name, format) pairs, every name and format checked."""
    if weights is None:
        return ()
    if hasattr(weights, "named_modules"):
        from .transformer import weight_formats

        weights = weight_formats(weights)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a model or a mapping of weight names to formats, got "
                        f"{type(weights).__name__}")
    names = {name for name, _, _ in _weights(config)}
    for name, format in weights.items():
        if name not in names:
            raise ValueError(f"weights names {name!r}, which is not a weight of the configured model")
        element_bytes(format)
    return tuple(sorted(weights.items()))
