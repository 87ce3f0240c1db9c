"""GGUF checkpoints (llama.cpp's single-file format): the configuration from the metadata,
the weights, kept in their block format or dequantized at load, and the tokenizer the
metadata describes.

``weights="quantized"`` keeps every matrix of a format ``fmkernels.quantized`` runs (q8_0,
q4_0, q4_1, q4_k, q6_k) as the file's own bytes (a ``QuantizedLinear`` / ``QuantizedEmbedding``
over a ``QuantizedWeight``: copied from the file, never re-encoded); every other tensor (F32,
F16, BF16, Q5_K, ..., the norms) is dequantized with the ``gguf`` package
(``gguf.quants.dequantize``) into the model's dtype, as ``weights="dequantized"`` does for all
of them. Tensors are read from the file a slab of rows at a time, so loading holds about one
copy of the model as it is kept.

Two things llama.cpp's converter does to a Hugging Face Llama are undone here: it stores
shapes in ggml order (``ne``: the row length first), and it interleaves each head's two
rotary halves in the rows of the Q and K projections
(``w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)``, n_kv_heads for K).

References: llama.cpp's ``convert_hf_to_gguf.py`` (tensor names, the permutation, the
Llama-3 ``rope_freqs`` factors), ``src/llama-vocab.cpp`` (the pre-tokenizer of each
``tokenizer.ggml.pre``), ``gguf-py/gguf/constants.py`` (keys and types), and transformers'
``integrations/gguf`` (the tokenizers its GGUF loader builds, which the tests compare with).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ...quantized import FORMATS, GGML_TYPES
from ..network.config import ModelConfig
from ..network.parallel import resolve, whole_blocks
from ..network.transformer import materialize, meta_model, quantize_modules, rope_frequencies
from .tokenizer import HFTokenizer

_MAGIC = b"GGUF"
_ARCHITECTURE = "llama"
_INSTALL = "pip install 'fmkernels[gguf]'"
# Elements dequantized per slab (16 MiB of float32): the transient memory beside the model.
_SLAB_ELEMENTS = 1 << 22
# llama.cpp's token types (gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4
# The pre-tokenizer regexes llama.cpp applies for each tokenizer.ggml.pre of a byte-level
# (gpt2) vocabulary, in order; each splits the pieces the previous left (src/llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS: Dict[str, Tuple[str, ...]] = {
    **dict.fromkeys(("gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2"), (_GPT2_SPLIT,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), (_QWEN2_SPLIT,)),
}
# llama.cpp takes a whole word that is in the vocabulary as one token for these, before any merge.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}


def is_gguf(path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == _MAGIC


class GGUFFile:
    """An open GGUF file: metadata values by key (``get``, ``require``) and tensor records
    (``gguf.ReaderTensor``: name, ggml type, ``ne`` shape, offset) by name.

    Raises FileNotFoundError for a missing file, ValueError for one that is not GGUF, and
    ImportError naming the extra when the ``gguf`` package is not installed.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != _MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file: it starts with {magic!r}, not {_MAGIC!r}")
        gguf = _import_gguf(self.path)
        self.reader = gguf.GGUFReader(self.path)
        if self.reader.byte_order != "I":
            raise ValueError(f"{self.path} is a GGUF file of the other byte order (big-endian), which is not supported")
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key`` (a str, int, float, bool or list), or ``default``."""
        field = self.reader.fields.get(key)
        return default if field is None else _field_value(field)

    def require(self, key: str) -> Any:
        if key not in self:
            raise ValueError(f"GGUF file {self.path} has no metadata key {key!r}, which a {_ARCHITECTURE} model needs")
        return self.get(key)


def _import_gguf(path: str):
    try:
        import gguf
    except ImportError as exc:
        raise ImportError(f"reading the GGUF file {path} needs the 'gguf' package: {_INSTALL}") from exc
    return gguf


def _field_value(field) -> Any:
    """A metadata field's value: ``field.data`` indexes the parts holding its element(s)."""
    from gguf import GGUFValueType

    if field.types[-1] == GGUFValueType.STRING:
        values = [field.parts[index].tobytes().decode("utf-8") for index in field.data]
    else:
        values = [field.parts[index][0].item() for index in field.data]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


# --- configuration ---------------------------------------------------------------------------

def read_config(file: GGUFFile) -> ModelConfig:
    """``ModelConfig`` from a GGUF file's ``llama.*`` metadata (Llama, Mistral, Mixtral)."""
    architecture = file.require("general.architecture")
    if architecture != _ARCHITECTURE:
        raise ValueError(
            f"GGUF general.architecture must be {_ARCHITECTURE!r} (llama.cpp writes Llama, Mistral and Mixtral "
            f"so), got {architecture!r} in {file.path}"
        )

    def key(name: str, default: Any = None, kind=int) -> Any:
        full = f"{_ARCHITECTURE}.{name}"
        value = file.require(full) if default is None else file.get(full, default)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (kind is int and not isinstance(value, int)):
            raise ValueError(f"GGUF metadata {full!r} must be a single {kind.__name__}, got {value!r}")
        return kind(value)

    dim = key("embedding_length")
    n_heads = key("attention.head_count")
    # A head count of 0 leaves head_dim 0 for ModelConfig to reject, naming n_heads.
    head_dim = key("attention.key_length",
                   file.get(f"{_ARCHITECTURE}.rope.dimension_count", dim // n_heads if n_heads > 0 else 0))
    for name in ("rope.dimension_count", "attention.value_length"):
        value = key(name, head_dim)
        if value != head_dim:
            raise ValueError(
                f"GGUF metadata '{_ARCHITECTURE}.{name}' is {value}, but the heads are {head_dim} wide: only "
                f"full-width rotary embeddings and equal key/value widths are supported"
            )
    n_experts = key("expert_count", 0)
    rope_theta = key("rope.freq_base", 10000.0, float)
    rope_scaling, factors = _rope_scaling(file, head_dim, rope_theta)
    eos = [file.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    config = ModelConfig(
        vocab_size=_vocab_size(file),
        dim=dim,
        n_layers=key("block_count"),
        n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv", n_heads),
        ffn_dim=key("feed_forward_length"),
        head_dim=head_dim,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=key("attention.layer_norm_rms_epsilon", kind=float),
        tie_embeddings="output.weight" not in file.tensors,
        n_experts=n_experts,
        experts_per_token=key("expert_used_count") if n_experts else 0,
        max_seq_len=key("context_length"),
        architecture="mixtral" if n_experts else "llama",
        eos_token_ids=tuple(dict.fromkeys(token for token in eos if token is not None)),
    )
    if factors is not None:
        inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        if not np.allclose(rope_frequencies(config).double().numpy(), inv_freq / factors, rtol=1e-5, atol=0.0):
            raise _not_llama3()
    return config


def _vocab_size(file: GGUFFile) -> int:
    size = file.get(f"{_ARCHITECTURE}.vocab_size")
    if size is not None:
        return size
    field = file.reader.fields.get("tokenizer.ggml.tokens")
    if field is not None:
        return len(field.data)
    raise ValueError(f"GGUF file {file.path} has neither '{_ARCHITECTURE}.vocab_size' nor 'tokenizer.ggml.tokens'")


def _not_llama3() -> ValueError:
    return ValueError(
        "GGUF tensor 'rope_freqs.weight' does not follow Llama-3 RoPE scaling (1 for high frequencies, a factor for "
        "low ones, a smooth blend between), the only scaling ModelConfig expresses"
    )


def _rope_scaling(file: GGUFFile, head_dim: int, rope_theta: float) -> Tuple[Optional[Dict[str, Any]], Any]:
    """(None, None), or the Llama-3 scaling that reproduces the file's ``rope_freqs.weight``
    factors and the factors, which ``read_config`` holds the model's frequencies to.

    ModelConfig expresses no scaling and Llama-3's; linear, YaRN and LongRoPE are refused.
    llama.cpp's converter writes Llama-3 scaling as per-frequency divisors (``rope_freqs``):
    1 for short wavelengths, ``factor`` for long ones, ``1 / ((1 - s) / factor + s)`` between,
    with s linear in 1 / wavelength. The four parameters are recovered from them (with
    ``low_freq_factor`` 1; only the ratios matter), and the frequencies they give must equal
    the file's to 1e-5 relative, or the file is refused.
    """
    kind = file.get(f"{_ARCHITECTURE}.rope.scaling.type", "none")
    linear = file.get(f"{_ARCHITECTURE}.rope.scale_linear", 1.0)
    if kind != "none" or linear != 1.0:
        got = f"rope.scaling.type {kind!r}" if kind != "none" else f"rope.scale_linear {linear}"
        raise ValueError(f"GGUF {_ARCHITECTURE}.{got}: ModelConfig expresses only Llama-3 RoPE scaling (rope_freqs) "
                         f"or none")
    tensor = file.tensors.get("rope_freqs.weight")
    if tensor is None:
        return None, None
    from gguf.quants import dequantize

    factors = dequantize(tensor.data, tensor.tensor_type).astype(np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"GGUF tensor 'rope_freqs.weight' has {factors.size} factors, the heads need {head_dim // 2}")
    if np.all(factors == 1.0):
        return None, None
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(factors.max())
    medium = (factors > 1.0) & (factors < factor)
    if medium.sum() < 2 or not np.isclose(factors.min(), 1.0):
        raise _not_llama3()
    # s = (old / wavelength - 1) / (high - 1) = a / wavelength + b
    smooth = (1.0 / factors[medium] - 1.0 / factor) / (1.0 - 1.0 / factor)
    a, b = np.polyfit(inv_freq[medium] / (2 * math.pi), smooth, 1)
    if not (b < 0 < a):
        raise _not_llama3()
    high, old = 1.0 - 1.0 / b, -a / b
    return {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(high),
        "original_max_position_embeddings": round(old) if math.isclose(old, round(old), rel_tol=1e-4) else float(old),
    }, factors


# --- weights ---------------------------------------------------------------------------------

class _Source(NamedTuple):
    """One GGUF tensor to copy: where its rows are and which parameters they fill, in order."""

    name: str
    kind: Any  # gguf.GGMLQuantizationType
    cols: int  # row length (ne[0])
    row_bytes: int
    offset: int  # of its first byte in the file
    params: Tuple[str, ...]
    head_dim: int  # > 0: llama.cpp's rotary-permuted Q/K rows

    @property
    def format(self) -> Optional[str]:
        """The ``fmkernels.quantized`` format of a matrix of a type it runs, else None."""
        return None if self.params[0].endswith("norm.weight") else GGML_TYPES.get(int(self.kind))


#: What ``load_gguf``'s ``weights`` may be.
WEIGHTS = ("auto", "quantized", "dequantized")


def resolve_weights(weights, device) -> str:
    """``weights`` ("auto", "quantized" or "dequantized") -> "quantized" or "dequantized":
    "auto" keeps the blocks on the CPU (the C++ kernel reads them) and dequantizes on a GPU,
    where the quantized kernels have not yet run. ValueError for any other value."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(repr(w) for w in WEIGHTS)}, got {weights!r}")
    if weights == "auto":
        return "quantized" if device is None or torch.device(device).type == "cpu" else "dequantized"
    return weights


def load_gguf(path, *, dtype: Optional[torch.dtype], device, backend: str, tensor_parallel=False,
              weights: str = "auto"):
    """A Transformer with a GGUF file's configuration and weights (see ``fmkernels.model.load_pretrained``);
    with ``tensor_parallel``, this rank's share (``fmkernels.model.network.parallel``): a
    quantized matrix stays quantized where the rank's slice is whole blocks (``whole_blocks``),
    else that tensor's share is dequantized."""
    from gguf.quants import dequantize

    keep = resolve_weights(weights, device) == "quantized"
    model, sources, default_dtype = _plan(path, backend)
    config = model.config
    plan = resolve(tensor_parallel, config, device)
    rows = {name: param.shape[0] if param.dim() > 1 else 1 for name, param in model.named_parameters()}
    if plan is not None:
        model = meta_model(config, backend=backend, tensor_parallel=plan)
    slices = {name: None if plan is None else plan.slice_of(name, config.head_dim)
              for source in sources for name in source.params}
    formats = {name: source.format for source in sources if keep and source.format
               for name in source.params if whole_blocks(slices[name], FORMATS[source.format].block_size)}
    model = materialize(quantize_modules(model, formats), dtype=dtype or default_dtype, device=device)
    params = dict(model.named_parameters())
    params.update({f"{name}.weight": module.blocks for name, module in model.named_modules()
                   if f"{name}.weight" in formats})
    with torch.no_grad(), open(path, "rb") as f:
        for source in sources:
            _copy_rows(f, source, [params[name] for name in source.params], dequantize,
                       [rows[name] for name in source.params], [slices[name] for name in source.params],
                       [name in formats for name in source.params])
    return model.eval()


def tensor_types(path) -> Dict[str, Tuple[str, Optional[str]]]:
    """Each weight of a GGUF file's model (fmkernels' names) -> (its GGUF type's name: "Q4_1",
    "F32", ...; the ``fmkernels.quantized`` format ``weights="quantized"`` keeps it in, or None
    where it is dequantized): what ``fmkernels info`` shows and counts the bytes of. The file
    is checked as ``load_pretrained`` checks it."""
    _, sources, _ = _plan(path, "reference")
    return {name: (source.kind.name, source.format) for source in sources for name in source.params}


def _plan(path, backend: str):
    """(meta model, the tensors to copy, the default dtype), everything checked. The reader is
    dropped on return: its metadata views (two per vocabulary entry and merge) are about
    150 MiB for a 49k vocabulary, which would otherwise sit beside the weights."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    file = GGUFFile(path)
    config = read_config(file)
    model = meta_model(config, backend=backend)
    plan = _tensor_plan(config, file.tensors)
    _check_tensors(file, plan, {name: tuple(param.shape) for name, param in model.named_parameters()})
    sources = []
    for name, (ours, permuted) in plan.items():
        tensor = file.tensors[name]
        block, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
        cols = int(tensor.shape[0])
        sources.append(_Source(name, tensor.tensor_type, cols, cols // block * type_size, tensor.data_offset, ours,
                               config.head_dim if permuted else 0))
    kinds = {file.tensors[name].tensor_type for name in plan if len(file.tensors[name].shape) > 1}
    default_dtype = {GGMLQuantizationType.F16: torch.float16, GGMLQuantizationType.BF16: torch.bfloat16}.get(
        kinds.pop() if len(kinds) == 1 else None, torch.float32)
    return model, sources, default_dtype


def _tensor_plan(config: ModelConfig, names) -> Dict[str, Tuple[Tuple[str, ...], bool]]:
    """GGUF tensor name -> (our parameters it fills, in row order; whether its rows are
    llama.cpp's rotary-permuted Q/K). A Mixtral file stacks each layer's experts in one tensor
    (``ffn_gate_exps``: ne (dim, ffn, experts)); older ones have one per expert (``ffn_gate.E``)."""
    plan = {"token_embd.weight": (("embed_tokens.weight",), False), "output_norm.weight": (("norm.weight",), False)}
    if not config.tie_embeddings:
        plan["output.weight"] = (("lm_head.weight",), False)
    for i in range(config.n_layers):
        blk, layer = f"blk.{i}.", f"layers.{i}."
        attention = {"attn_q": ("q_proj", True), "attn_k": ("k_proj", True), "attn_v": ("v_proj", False),
                     "attn_output": ("o_proj", False)}
        for theirs, (ours, permuted) in attention.items():
            plan[f"{blk}{theirs}.weight"] = ((f"{layer}self_attn.{ours}.weight",), permuted)
        plan[blk + "attn_norm.weight"] = ((layer + "input_layernorm.weight",), False)
        plan[blk + "ffn_norm.weight"] = ((layer + "post_attention_layernorm.weight",), False)
        if not config.n_experts:
            for theirs, ours in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                plan[f"{blk}ffn_{theirs}.weight"] = ((f"{layer}mlp.{ours}.weight",), False)
            continue
        moe = layer + "block_sparse_moe."
        plan[blk + "ffn_gate_inp.weight"] = ((moe + "gate.weight",), False)
        for theirs, ours in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            experts = [f"{moe}experts.{e}.{ours}.weight" for e in range(config.n_experts)]
            if f"{blk}ffn_{theirs}.0.weight" in names:
                plan.update({f"{blk}ffn_{theirs}.{e}.weight": ((expert,), False) for e, expert in enumerate(experts)})
            else:
                plan[f"{blk}ffn_{theirs}_exps.weight"] = (tuple(experts), False)
    return plan


def _check_tensors(file: GGUFFile, plan, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Every tensor the model needs, in the shape it needs, of a type gguf dequantizes; and
    no tensor the model has no place for (a bias, another architecture's) -- before loading."""
    for problem, names in (("has no tensor", sorted(set(plan) - set(file.tensors))),
                           ("has tensor", sorted(set(file.tensors) - set(plan) - {"rope_freqs.weight"}))):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            need = "which the config needs" if problem == "has no tensor" else "which a llama model has no place for"
            raise ValueError(f"GGUF file {file.path} {problem} {names[0]!r}{more}, {need}")
    supported = {}
    for name, (ours, _) in plan.items():
        tensor = file.tensors[name]
        kind = tensor.tensor_type
        if kind not in supported:
            supported[kind] = _dequantizes(kind)
        if not supported[kind]:
            raise ValueError(f"GGUF tensor {name!r} has type {kind.name}, which the installed gguf package cannot "
                             f"dequantize")
        want = shapes[ours[0]] if len(ours) == 1 else (len(ours), *shapes[ours[0]])
        got = tuple(int(n) for n in reversed(tensor.shape))  # ne order is the row length first
        if got != want:
            raise ValueError(f"GGUF tensor {name!r} has shape {got} (ne {tuple(int(n) for n in tensor.shape)}), "
                             f"the config expects {want}")


def _dequantizes(kind) -> bool:
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[kind][1]), dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def _copy_rows(f, source: _Source, params: List[torch.Tensor], dequantize, full_rows: List[int],
               slices: List[Optional[Tuple[int, int, int]]], quantized: List[bool]) -> None:
    """Copies a tensor a slab of rows at a time into ``params`` (its rows, in order: each
    param ``full_rows[i]`` rows of the tensor): dequantized into a float parameter, or, where
    ``quantized[i]``, the file's bytes as they are into a QuantizedLinear's blocks (N, row
    bytes). The slabs of a permuted Q/K hold whole heads, whose rows are put back in HF's
    order: for blocks that is a permutation of whole rows, a copy. ``slices[i]`` (dim, start,
    stop), a tensor-parallel rank's share of param i: rows (dim 0) read only those rows;
    columns (dim 1) read every row and keep those columns (of blocks: whole blocks' bytes)."""
    cols, row_bytes, head_dim = source.cols, source.row_bytes, source.head_dim
    group = head_dim or 1
    step = max(1, _SLAB_ELEMENTS // cols // group) * group
    row = 0
    for param, rows, where, raw_bytes in zip(params, full_rows, slices, quantized):
        first, last, keep = 0, rows, slice(None)
        if where is not None and where[0] == 0:
            first, last = where[1], where[2]  # whole heads of a permuted Q/K: the slice is per head
        elif where is not None:
            # Columns of blocks are their bytes (the slice is whole blocks: whole_blocks).
            scale = (lambda c: c * row_bytes // cols) if raw_bytes else (lambda c: c)
            keep = slice(scale(where[1]), scale(where[2]))
        dest = param.view(last - first, -1)  # [rows, cols or row bytes]; a norm is one row
        for start in range(first, last, step):
            n = min(step, last - start)
            raw = bytearray(n * row_bytes)
            f.seek(source.offset + (row + start) * row_bytes)
            if f.readinto(raw) != len(raw):
                raise ValueError(f"GGUF file {f.name} ends inside tensor {source.name!r}")
            blocks = np.frombuffer(raw, dtype=np.uint8).reshape(n, row_bytes)
            # [n, row_bytes] uint8 as in the file, or [n, cols] fp32
            values = torch.from_numpy(blocks) if raw_bytes else torch.from_numpy(dequantize(blocks, source.kind))
            if head_dim:
                # rows (head, D/2, 2) -> (head, 2, D/2): each head's two rotary halves back in HF's order
                width = values.shape[1]
                values = values.view(n // head_dim, head_dim // 2, 2, width).transpose(1, 2).reshape(n, width)
            dest[start - first:start - first + n].copy_(values[:, keep])
        row += rows


# --- tokenizer -------------------------------------------------------------------------------

def read_tokenizer(file: GGUFFile):
    """The ``HFTokenizer`` a GGUF file's ``tokenizer.*`` metadata describes.

    ``tokenizer.ggml.model`` "gpt2" is byte-level BPE with the pre-tokenizer llama.cpp applies
    for ``tokenizer.ggml.pre`` (GPT-2's regex when the key is absent; an unknown one is refused);
    "llama" is SentencePiece BPE as transformers' LlamaTokenizer builds it (merges from the
    scores, byte fallback, a "▁" prefix unless ``tokenizer.ggml.add_space_prefix`` is false).
    Control tokens (and the BOS/EOS/EOT/UNK/PAD ones) are special: matched whole in the text,
    skipped by ``decode``; user-defined ones are matched whole. ``encode`` adds BOS (EOS) when
    ``tokenizer.ggml.add_bos_token`` (``add_eos_token``) says so; absent, BOS for "llama"
    vocabularies and none for "gpt2" ones, as transformers and llama.cpp.
    """
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError(f"reading the tokenizer of {file.path} needs the 'tokenizers' package "
                          f"(pip install tokenizers)") from exc
    kind = file.require("tokenizer.ggml.model")
    tokens = file.require("tokenizer.ggml.tokens")
    types = file.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        tokenizer = _byte_level(tokenizers, file, tokens)
        add_bos = file.get("tokenizer.ggml.add_bos_token", False)
    elif kind == "llama":
        tokenizer = _sentencepiece(tokenizers, file, tokens)
        add_bos = file.get("tokenizer.ggml.add_bos_token", True)  # llama.cpp's default for these vocabularies
    else:
        raise ValueError(f"GGUF tokenizer.ggml.model must be 'gpt2' or 'llama', got {kind!r} in {file.path}")
    ids = {name: file.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "eot", "unknown", "padding")}
    for name, token_id in ids.items():
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ValueError(f"GGUF tokenizer.ggml.{name}_token_id is {token_id}, outside the {len(tokens)} tokens")
    # Control tokens stay whole and are skipped in decode; user-defined ones stay whole only. In a
    # byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp mislabel
    # (transformers skips it too).
    alphabet = set(_bytes_to_unicode().values()) if kind == "gpt2" else None
    named = {token_id for token_id in ids.values() if token_id is not None}
    whole = [i for i in range(len(tokens)) if alphabet is None or set(tokens[i]) <= alphabet]
    special = [tokens[i] for i in whole if types[i] == _CONTROL or i in named]
    tokenizer.add_special_tokens([tokenizers.AddedToken(token, normalized=False, special=True) for token in special])
    user = [tokens[i] for i in whole if types[i] == _USER_DEFINED and i not in named]
    tokenizer.add_tokens([tokenizers.AddedToken(token, normalized=False, special=False) for token in user])
    add_eos = file.get("tokenizer.ggml.add_eos_token", False)
    tokenizer.post_processor = _template(tokenizers, tokens, ids["bos"] if add_bos else None,
                                         ids["eos"] if add_eos else None)
    return HFTokenizer(tokenizer, ids["eos"], file.path, bos_token_id=ids["bos"], eot_token_id=ids["eot"],
                       chat_template=file.get("tokenizer.chat_template"))


def _byte_level(tokenizers, file: GGUFFile, tokens: List[str]):
    pre = file.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not one fmkernels knows the pre-tokenizer of: "
                         f"{', '.join(sorted(_PRE_TOKENIZERS))}")
    merges = file.require("tokenizer.ggml.merges")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token spelled outside the byte alphabet (raw text) is looked up by its bytes' spelling.
    vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
             for index, token in enumerate(tokens)}
    model = tokenizers.models.BPE(vocab=vocab, merges=[tuple(merge.split(" ", 1)) for merge in merges], dropout=None,
                                  continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                  ignore_merges=pre in _IGNORE_MERGES)
    tokenizer = tokenizers.Tokenizer(model)
    pre_tokenizers = tokenizers.pre_tokenizers
    splits = _PRE_TOKENIZERS[pre]
    if splits == (_GPT2_SPLIT,):  # ByteLevel's own regex
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated") for split in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    return tokenizer


def _sentencepiece(tokenizers, file: GGUFFile, tokens: List[str]):
    """SentencePiece BPE as transformers' LlamaTokenizer builds it: merges best-scored first
    (from the file, or rebuilt from the scores), "▁" for spaces, bytes for unknown characters."""
    if "tokenizer.ggml.merges" in file:
        merges = [tuple(merge.split(" ", 1)) for merge in file.get("tokenizer.ggml.merges")]
    else:
        merges = _merges_from_scores(tokens, file.require("tokenizer.ggml.scores"))
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, fuse_unk=True,
                                                           byte_fallback=True, dropout=None))
    prefix = file.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    decoders = tokenizers.decoders
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tokenizer


def _merges_from_scores(tokens: List[str], scores: List[float]) -> List[Tuple[str, str]]:
    """Every split of a token into two tokens is a merge, ranked by the token's score (best
    first; ties: longer left part first, then longer right part, then vocabulary order), as
    transformers rebuilds SentencePiece merges."""
    index = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for token, score in dict(zip(tokens, scores)).items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in index and token[k:] in index]
        pairs.sort(key=lambda pair: (index[pair[0]], index[pair[1]]))
        ranked.extend((left, right, score) for left, right in pairs)
    ranked.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _template(tokenizers, tokens: List[str], bos: Optional[int], eos: Optional[int]):
    """The post-processor: BOS before and EOS after the text, where the file asks for them."""
    def sequence(name: str, type_id: int) -> List[str]:
        parts = [f"${name}:{type_id}"]
        if bos is not None:
            parts.insert(0, f"{tokens[bos]}:{type_id}")
        if eos is not None:
            parts.append(f"{tokens[eos]}:{type_id}")
        return parts

    return tokenizers.processors.TemplateProcessing(
        single=sequence("A", 0), pair=sequence("A", 0) + sequence("B", 1),
        special_tokens=[(tokens[i], i) for i in dict.fromkeys((bos, eos)) if i is not None])


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level tokens are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
