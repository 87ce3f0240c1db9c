"""Quantized weights in GGUF's block formats: ``QuantizedWeight``, and the reference
dequantization every kernel is held to.

A weight (N, K), ``torch.nn.Linear``'s layout, is stored row by row; each row is K / B
blocks of B weights, each block a fixed number of bytes laid out exactly as ggml lays it out
(``ggml-common.h``), so a GGUF tensor's data is this object's ``blocks`` as it is, copied or
memory-mapped, never transcoded. The formats, with w the weight, fp16 fields widened to fp32:

========  ======  =====  ===============================================================
format    B       bytes  one block
========  ======  =====  ===============================================================
q8_0      32      34     fp16 d, int8 q[32]; w = d * q
q4_0      32      18     fp16 d, q[16] nibbles (low nibbles: weights 0-15, high: 16-31);
                         w = d * (q - 8)
q4_1      32      20     fp16 d, fp16 m, nibbles as q4_0; w = d * q + m
q4_k      256     144    fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, one
                         per 32 weights, q[128] nibbles (each 32 bytes: low nibbles weights
                         64i..64i+31, high 64i+32..64i+63); w = (d * scale) * q - dmin * min
q6_k      256     210    ql[128] low nibbles, qh[64] 2-bit high parts, int8 scales[16] (one
                         per 16 weights), fp16 d; w = (d * scale) * (q - 32)
========  ======  =====  ===============================================================

``dequantize`` computes each weight with those operations in that order in fp32, as ggml's
``dequantize_row_*`` does (the tests hold it to the ``gguf`` package's dequantization, bit
for bit). ``quantize`` makes a weight of any format from a float tensor: q8_0, q4_0 and q4_1
by ggml's reference rounding (``quantize_row_*_ref``), the k-quants by a plain
round-to-nearest choice of scales (ggml's search for them is not reproduced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch


@dataclass(frozen=True)
class BlockFormat:
    """One block format: its name, weights and bytes per block, and GGML's type number."""

    name: str
    block_size: int
    block_bytes: int
    ggml_type: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_size


FORMATS: Dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("q4_0", 32, 18, 2),
        BlockFormat("q4_1", 32, 20, 3),
        BlockFormat("q8_0", 32, 34, 8),
        BlockFormat("q4_k", 256, 144, 12),
        BlockFormat("q6_k", 256, 210, 14),
    )
}

#: GGML's type number -> format name, for the formats here.
GGML_TYPES: Dict[int, str] = {f.ggml_type: f.name for f in FORMATS.values()}


def block_format(name) -> BlockFormat:
    """The format named ``name`` (case-insensitive: "Q4_K" and "q4_k" alike)."""
    if not isinstance(name, str):
        raise TypeError(f"format must be a str, one of {sorted(FORMATS)}, got {type(name).__name__}")
    found = FORMATS.get(name.lower())
    if found is None:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {name!r}")
    return found


class QuantizedWeight:
    """A weight (N, K) held in one of GGUF's block formats (see the module's docstring).

    ``blocks`` is a uint8 tensor (N, K / block_size * block_bytes): row n holds weight row n's
    blocks at unit stride; rows may be further apart than that (a slice of a wider buffer).
    Nothing is copied: the object refers to ``blocks`` as given; it is immutable, checked once
    when made.

    ``fmkernels.linear(x, weight)`` takes one in place of a float weight, on every backend;
    ``dequantize()`` gives the float weight; ``quantize(tensor, format)`` makes one.
    """

    __slots__ = ("format", "shape", "blocks")

    def __init__(self, blocks: torch.Tensor, format: str, shape):
        fmt = block_format(format)
        if not isinstance(blocks, torch.Tensor):
            raise TypeError(f"blocks must be a torch.Tensor of uint8, got {type(blocks).__name__}")
        if blocks.dtype != torch.uint8:
            raise TypeError(f"blocks must have dtype uint8, got {str(blocks.dtype).replace('torch.', '')}")
        if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise ValueError(f"shape must be two non-negative ints (N, K), got {shape!r}")
        n, k = int(shape[0]), int(shape[1])
        if k % fmt.block_size:
            raise ValueError(
                f"shape's K must be a multiple of {fmt.name}'s block of {fmt.block_size} weights, got K = {k}")
        row_bytes = k // fmt.block_size * fmt.block_bytes
        if blocks.dim() != 2 or tuple(blocks.shape) != (n, row_bytes):
            raise ValueError(
                f"blocks must be (N, K / {fmt.block_size} * {fmt.block_bytes}) = ({n}, {row_bytes}) bytes for a "
                f"{fmt.name} weight of shape ({n}, {k}), got shape {tuple(blocks.shape)}")
        if row_bytes > 1 and n > 0 and blocks.stride(1) != 1:
            raise ValueError(f"blocks must have unit stride along a row, got strides {blocks.stride()}")
        if n > 1 and row_bytes > 0 and blocks.stride(0) < row_bytes:
            raise ValueError(f"blocks' rows overlap: row stride {blocks.stride(0)} < {row_bytes} bytes")
        object.__setattr__(self, "format", fmt.name)
        object.__setattr__(self, "shape", torch.Size((n, k)))
        object.__setattr__(self, "blocks", blocks)

    def __setattr__(self, name, value):
        raise AttributeError(f"QuantizedWeight is immutable: make a new one instead of setting {name}")

    # -- what it is -------------------------------------------------------------------------

    @property
    def block_format(self) -> BlockFormat:
        return FORMATS[self.format]

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def nbytes(self) -> int:
        """The bytes the weight's blocks take (what a matmul against it reads)."""
        return self.shape[0] * self.shape[1] // self.block_format.block_size * self.block_format.block_bytes

    def __repr__(self) -> str:
        return (f"QuantizedWeight(format={self.format!r}, shape={tuple(self.shape)}, "
                f"device={str(self.device)!r}, nbytes={self.nbytes})")

    # -- what it becomes ----------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (N, K) as floats, computed in fp32 as ggml does, then cast to ``dtype``."""
        return dequantize(self.blocks, self.format, self.shape[1]).to(dtype)

    def to(self, device) -> "QuantizedWeight":
        """The same weight on ``device`` (itself when it is there already)."""
        return self if self.blocks.device == torch.device(device) else \
            QuantizedWeight(self.blocks.to(device), self.format, self.shape)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Weight rows start..stop-1 (output features), a view of the same blocks."""
        n = self.shape[0]
        if not (0 <= start <= stop <= n):
            raise ValueError(f"rows must satisfy 0 <= start <= stop <= {n}, got {start}..{stop}")
        return QuantizedWeight(self.blocks[start:stop], self.format, (stop - start, self.shape[1]))

    def columns(self, start: int, stop: int) -> "QuantizedWeight":
        """Weight columns start..stop-1 (input features): whole blocks only, a view."""
        fmt, k = self.block_format, self.shape[1]
        if not (0 <= start <= stop <= k) or start % fmt.block_size or stop % fmt.block_size:
            raise ValueError(
                f"columns must be whole {fmt.name} blocks of {fmt.block_size} within 0..{k}, got {start}..{stop}")
        first, last = start // fmt.block_size * fmt.block_bytes, stop // fmt.block_size * fmt.block_bytes
        return QuantizedWeight(self.blocks[:, first:last], self.format, (self.shape[0], stop - start))

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` of the weight as floats (..., K): an embedding lookup that dequantizes
        only the rows it reads."""
        rows = self.blocks.index_select(0, ids.reshape(-1))
        return dequantize(rows, self.format, self.shape[1]).to(dtype).view(*ids.shape, self.shape[1])


# ----------------------------------------------------------------------------
# Dequantization, as ggml's dequantize_row_*
# ----------------------------------------------------------------------------


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte ``offset`` of every block (..., nb, bytes) as fp32 (..., nb, 1)."""
    return blocks[..., offset:offset + 2].contiguous().view(torch.float16).float()


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """Bytes (..., m) -> their low nibbles then their high nibbles (..., 2m), as int32."""
    q = q.to(torch.int32)
    return torch.cat((q & 0xF, q >> 4), dim=-1)


def _k4_scales(scales: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q4_k's 12 scale bytes (..., 12) -> the eight 6-bit scales and mins (..., 8) each, int32
    (ggml's get_scale_min_k4)."""
    s = scales.to(torch.int32)
    low, high, extra = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scale = torch.cat((low & 63, (extra & 0xF) | ((low >> 6) << 4)), dim=-1)
    minimum = torch.cat((high & 63, (extra >> 4) | ((high >> 6) << 4)), dim=-1)
    return scale, minimum


def dequantize(blocks: torch.Tensor, format: str, k: int) -> torch.Tensor:
    """Rows of blocks (N, K / B * bytes) uint8 -> the weights (N, K) fp32, on blocks' device."""
    fmt = block_format(format)
    n = blocks.shape[0]
    b = blocks.reshape(n, k // fmt.block_size, fmt.block_bytes)  # [N, nb, bytes]
    if fmt.name == "q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()
        w = _half(b, 0) * q
    elif fmt.name == "q4_0":
        w = _half(b, 0) * (_nibbles(b[..., 2:]) - 8).float()
    elif fmt.name == "q4_1":
        w = _half(b, 0) * _nibbles(b[..., 4:]).float() + _half(b, 2)
    elif fmt.name == "q4_k":
        d, dmin = _half(b, 0), _half(b, 2)  # [N, nb, 1]
        scale, minimum = _k4_scales(b[..., 4:16])  # [N, nb, 8]
        qs = b[..., 16:].reshape(n, -1, 4, 32)  # [N, nb, 4 chunks, 32 bytes]
        q = _nibbles(qs).reshape(n, -1, 8, 32).float()  # [N, nb, 8 sub-blocks, 32]
        w = (d * scale.float())[..., None] * q - (dmin * minimum.float())[..., None]
    else:  # q6_k
        ql = b[..., 0:128].to(torch.int32).reshape(n, -1, 2, 2, 32)  # [N, nb, half, 2, 32]
        qh = b[..., 128:192].to(torch.int32).reshape(n, -1, 2, 1, 32)  # [N, nb, half, 1, 32]
        scales = b[..., 192:208].contiguous().view(torch.int8).float()  # [N, nb, 16]
        d = _half(b, 208)  # [N, nb, 1]
        # Within each half of 128: weights 32j..32j+31 take ql's (j % 2)-th 32 bytes, low
        # nibbles for j < 2, high for j >= 2, and bits 2j..2j+1 of qh.
        low = torch.cat((ql & 0xF, ql >> 4), dim=3)  # [N, nb, half, 4, 32]
        high = torch.cat([(qh >> (2 * j)) & 3 for j in range(4)], dim=3)  # [N, nb, half, 4, 32]
        q = ((low | (high << 4)) - 32).float().reshape(n, -1, 16, 16)  # [N, nb, 16 groups, 16]
        w = (d * scales)[..., None] * q
    return w.reshape(n, k)


# ----------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _half_bytes(values: torch.Tensor) -> torch.Tensor:
    """fp32 (..., nb) -> their fp16 encodings (..., nb, 2) as bytes."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(*values.shape, 2)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 2m) values 0..15 -> (..., m) bytes: the first m in the low nibbles."""
    m = q.shape[-1] // 2
    return (q[..., :m] | (q[..., m:] << 4)).to(torch.uint8)


def quantize(tensor: torch.Tensor, format: str) -> QuantizedWeight:
    """A float tensor (N, K) as a ``QuantizedWeight`` of ``format`` (K a multiple of its block).

    q8_0, q4_0 and q4_1 round as ggml's reference quantizers do; q4_k and q6_k take each
    group's scale from its largest magnitude (and q4_k's min from its smallest value) and
    round to the nearest step, which is valid for every kernel but not ggml's own choice."""
    fmt = block_format(format)
    if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
        raise TypeError(f"tensor must be a floating-point torch.Tensor, got {getattr(tensor, 'dtype', type(tensor))}")
    if tensor.dim() != 2:
        raise ValueError(f"tensor must be 2-D (N, K), got shape {tuple(tensor.shape)}")
    n, k = tensor.shape
    if k % fmt.block_size:
        raise ValueError(f"tensor's K must be a multiple of {fmt.name}'s block of {fmt.block_size}, got K = {k}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("tensor must be finite to quantize, got NaN or infinity")
    x = tensor.detach().float().reshape(n, k // fmt.block_size, fmt.block_size)  # [N, nb, B]
    parts = {"q8_0": _quantize_q8_0, "q4_0": _quantize_q4_0, "q4_1": _quantize_q4_1,
             "q4_k": _quantize_q4_k, "q6_k": _quantize_q6_k}[fmt.name](x)
    blocks = torch.cat(parts, dim=-1)
    assert blocks.shape[-1] == fmt.block_bytes
    return QuantizedWeight(blocks.reshape(n, -1).contiguous(), fmt.name, (n, k))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)


def _quantize_q8_0(x):
    d = x.abs().amax(dim=-1) / 127  # [N, nb]
    q = _round_away(x * _inverse(d)[..., None]).to(torch.int8).view(torch.uint8)
    return _half_bytes(d), q


def _quantize_q4_0(x):
    # The value of largest magnitude, its sign kept, maps to -8.
    extreme = torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))[..., 0]
    d = extreme / -8
    q = torch.clamp((x * _inverse(d)[..., None] + 8.5).to(torch.int8).to(torch.int32), max=15)
    return _half_bytes(d), _pack_nibbles(q)


def _quantize_q4_1(x):
    low, high = x.amin(dim=-1), x.amax(dim=-1)
    d = (high - low) / 15
    q = torch.clamp(((x - low[..., None]) * _inverse(d)[..., None] + 0.5).to(torch.int8).to(torch.int32), max=15)
    return _half_bytes(d), _half_bytes(low), _pack_nibbles(q)


def _fp16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).float()


def _quantize_q4_k(x):
    n, nb = x.shape[:2]
    groups = x.reshape(n, nb, 8, 32)
    shift = torch.clamp(-groups.amin(dim=-1), min=0)  # [N, nb, 8]: w = step * q - shift
    step = (groups.amax(dim=-1) + shift) / 15
    d, dmin = _fp16(step.amax(dim=-1) / 63), _fp16(shift.amax(dim=-1) / 63)  # [N, nb]
    scale = torch.clamp(_round_away(step * _inverse(d)[..., None]), 0, 63).to(torch.int32)
    minimum = torch.clamp(_round_away(shift * _inverse(dmin)[..., None]), 0, 63).to(torch.int32)
    group_step = (d[..., None] * scale.float())[..., None]
    group_shift = (dmin[..., None] * minimum.float())[..., None]
    q = torch.clamp(_round_away((groups + group_shift) * _inverse(group_step)), 0, 15).to(torch.int32)
    packed = torch.cat((
        (scale[..., :4] & 63) | ((scale[..., 4:] >> 4) << 6),
        (minimum[..., :4] & 63) | ((minimum[..., 4:] >> 4) << 6),
        (scale[..., 4:] & 0xF) | ((minimum[..., 4:] & 0xF) << 4),
    ), dim=-1).to(torch.uint8)
    # Each 32 bytes: low nibbles group 2i, high nibbles group 2i + 1.
    qs = q.reshape(n, nb, 4, 2, 32)
    qs = (qs[:, :, :, 0] | (qs[:, :, :, 1] << 4)).to(torch.uint8).reshape(n, nb, 128)
    return _half_bytes(d), _half_bytes(dmin), packed, qs


def _quantize_q6_k(x):
    n, nb = x.shape[:2]
    groups = x.reshape(n, nb, 16, 16)
    step = groups.abs().amax(dim=-1) / 32  # [N, nb, 16]: q - 32 in [-32, 31]
    d = _fp16(step.amax(dim=-1) / 127)  # [N, nb]
    scale = torch.clamp(_round_away(step * _inverse(d)[..., None]), -128, 127)
    group_step = (d[..., None] * scale)[..., None]
    q = (torch.clamp(_round_away(groups * _inverse(group_step)), -32, 31) + 32).to(torch.int32)
    q = q.reshape(n, nb, 2, 4, 32)  # [N, nb, half, j, 32]: weights 32j.. of each half
    ql = torch.cat((q[:, :, :, 0] & 0xF | ((q[:, :, :, 2] & 0xF) << 4),
                    q[:, :, :, 1] & 0xF | ((q[:, :, :, 3] & 0xF) << 4)), dim=-1)  # [N, nb, half, 64]
    qh = sum(((q[:, :, :, j] >> 4) & 3) << (2 * j) for j in range(4))  # [N, nb, half, 32]
    return (ql.reshape(n, nb, 128).to(torch.uint8), qh.reshape(n, nb, 64).to(torch.uint8),
            scale.to(torch.int8).view(torch.uint8), _half_bytes(d))
