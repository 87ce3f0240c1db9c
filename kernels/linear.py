"""linear in Triton for GGUF-quantized weights: x @ dequantize(weight)^T without a float copy.

Weight-only quantization (``fmkernels.quantized.QuantizedWeight``: q8_0, q4_0, q4_1, q4_k,
q6_k in ggml's block layout) against a decode step's few rows of x (at most
``MAX_ROWS``). Each program computes a tile of BLOCK_M rows of x by BLOCK_N output features:
it walks K in slices of BLOCK_K weights, gathers the slice's bytes of BLOCK_N weight rows,
dequantizes them in registers to fp32 exactly as ``fmkernels.quantized.dequantize`` does
(fp16 fields read as two bytes, bit-cast, widened; the same products in the same order), and
accumulates x (upcast to fp32) times those weights in fp32: with ``tl.dot`` in IEEE fp32 when
the tile has 16 rows or more, else with a broadcast multiply and a sum. The result is stored
in x's dtype.

Every weight is dequantized from its own (row, column) coordinates, so a slice may cross
blocks and sub-blocks freely; blocks' row stride is read from the tensor (a column slice of
a wider weight keeps its parent's stride).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fmkernels import platform
from fmkernels.quantized import FORMATS, QuantizedWeight

#: The most rows of x (its leading dimensions flattened) a call takes: the kernel is for a
#: decode step; a prefill's many rows want a dequantize-then-matmul instead.
MAX_ROWS = 64

#: The formats the kernel dequantizes, as its FORMAT constexpr numbers them.
FORMAT_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q4_k": 3, "q6_k": 4}


@triton.jit
def _byte(ptr):
    """One weight byte as int32 (0..255)."""
    return tl.load(ptr).to(tl.int32)


@triton.jit
def _half(ptr):
    """The little-endian fp16 field at ``ptr`` (two bytes) as fp32."""
    bits = (_byte(ptr) | (_byte(ptr + 1) << 8)).to(tl.uint16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequantize(row_ptr, k, FORMAT: tl.constexpr):
    """Weights (row, k) as fp32: ``row_ptr`` points at each row's first block (int64
    offsets applied), ``k`` the columns; both broadcast to the tile's shape."""
    if FORMAT == 0:  # q8_0: fp16 d, int8 q[32]; w = d * q
        block = row_ptr + (k // 32) * 34
        q = _byte(block + 2 + k % 32).to(tl.int8).to(tl.float32)
        w = _half(block) * q
    elif FORMAT == 1:  # q4_0: fp16 d, nibbles q[16]; w = d * (q - 8)
        pos = k % 32
        block = row_ptr + (k // 32) * 18
        q = (_byte(block + 2 + pos % 16) >> ((pos // 16) * 4)) & 0xF
        w = _half(block) * (q - 8).to(tl.float32)
    elif FORMAT == 2:  # q4_1: fp16 d, fp16 m, nibbles q[16]; w = d * q + m
        pos = k % 32
        block = row_ptr + (k // 32) * 20
        q = (_byte(block + 4 + pos % 16) >> ((pos // 16) * 4)) & 0xF
        w = _half(block) * q.to(tl.float32) + _half(block + 2)
    elif FORMAT == 3:  # q4_k: fp16 d, fp16 dmin, 12 scale bytes, q[128]
        pos = k % 256
        block = row_ptr + (k // 256) * 144
        sub = pos // 32  # sub-block 0..7: its 6-bit (scale, min), ggml's get_scale_min_k4
        low = _byte(block + 4 + sub)  # scale byte `sub` (the scales' low bits for sub < 4)
        mid = _byte(block + 8 + sub)  # mins' low bits for sub < 4, packed low bits for sub >= 4
        top = _byte(block + sub)  # for sub >= 4: scale byte sub - 4 (its top two bits)
        first = sub < 4
        scale = tl.where(first, low & 63, (mid & 0xF) | ((top >> 6) << 4))
        minimum = tl.where(first, mid & 63, (mid >> 4) | ((low >> 6) << 4))
        # Sub-blocks 2i and 2i + 1 share 32 bytes: low nibbles, then high.
        q = (_byte(block + 16 + (sub // 2) * 32 + pos % 32) >> ((sub % 2) * 4)) & 0xF
        w = (_half(block) * scale.to(tl.float32)) * q.to(tl.float32) \
            - _half(block + 2) * minimum.to(tl.float32)
    else:  # q6_k: ql[128], qh[64], int8 scales[16], fp16 d
        pos = k % 256
        block = row_ptr + (k // 256) * 210
        half = pos // 128
        j = (pos % 128) // 32  # weights 32j.. of the half: ql's (j % 2)-th 32 bytes, qh's bits 2j
        lane = pos % 32
        low = (_byte(block + half * 64 + (j % 2) * 32 + lane) >> ((j // 2) * 4)) & 0xF
        high = (_byte(block + 128 + half * 32 + lane) >> (j * 2)) & 3
        q = (low | (high << 4)) - 32
        scale = _byte(block + 192 + pos // 16).to(tl.int8).to(tl.float32)
        w = (_half(block + 208) * scale) * q.to(tl.float32)
    return w


@triton.jit
def _linear_quantized_kernel(
    X_ptr, Blocks_ptr, Out_ptr,
    rows, n_features, k_features,
    x_stride_row, x_stride_k, blocks_stride_row, out_stride_row,
    FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    # Program (pid_n, pid_m): output features pid_n * BLOCK_N.. of rows pid_m * BLOCK_M..
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_n = offs_n < n_features
    valid_m = offs_m < rows
    # Rows past N read row 0 (always there when the launcher runs): no out-of-bounds load.
    row_ptr = Blocks_ptr + tl.where(valid_n, offs_n, 0).to(tl.int64)[:, None] * blocks_stride_row
    x_rows = X_ptr + offs_m.to(tl.int64)[:, None] * x_stride_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        inside_k = offs_k < k_features
        k = tl.where(inside_k, offs_k, 0)[None, :]  # columns past K re-read column 0, then count 0
        w = _dequantize(row_ptr, k, FORMAT)  # [BLOCK_N, BLOCK_K]
        w = tl.where(inside_k[None, :], w, 0.0)
        x = tl.load(x_rows + offs_k.to(tl.int64)[None, :] * x_stride_k,
                    mask=valid_m[:, None] & inside_k[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    out = Out_ptr + offs_m.to(tl.int64)[:, None] * out_stride_row + offs_n[None, :]
    tl.store(out, acc.to(Out_ptr.dtype.element_ty), mask=valid_m[:, None] & valid_n[None, :])


def linear_supports(x, weight, **_) -> str | None:
    """None when the kernel runs this (validated) call, else why not."""
    if isinstance(weight, torch.Tensor):
        return "a float weight: torch's matmul (the reference) is the tool"
    if not isinstance(weight, QuantizedWeight):
        return f"triton linear takes a QuantizedWeight, got {type(weight).__name__}"
    if weight.format not in FORMAT_CODES:
        return f"triton linear dequantizes {sorted(FORMAT_CODES)}, got {weight.format}"
    rows = math.prod(x.shape[:-1])
    if rows > MAX_ROWS:
        return f"{rows} rows of x > {MAX_ROWS}: the quantized kernel is for a decode step's few rows"
    return None


def _tile(rows: int, k_features: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT) for ``rows`` rows of x."""
    block_m = triton.next_power_of_2(max(rows, 1))
    if block_m >= 16:
        return block_m, 32, 64 if k_features % 64 == 0 else 32, True
    # The broadcast product is BLOCK_M x BLOCK_N x BLOCK_K: keep it to 8K elements.
    return block_m, 32, 32 if block_m >= 4 else 64, False


def linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x (..., K) @ dequantize(weight)^T -> (..., N) in x's dtype, accumulated in fp32.

    Reads the weight's bytes once per tile of rows (once in all for up to 64 rows)."""
    reason = linear_supports(x, weight)
    if reason is not None:
        raise ValueError(reason)
    n_features, k_features = weight.shape
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x_rows = x.reshape(rows, k_features)
    # The interpreter's fp32 -> bf16 conversion truncates: write fp32 and let torch round.
    staged = platform.triton_interpreting() and x.dtype == torch.bfloat16
    out = torch.empty((rows, n_features), dtype=torch.float32 if staged else x.dtype, device=x.device)
    if rows == 0 or n_features == 0 or k_features == 0:
        return out.zero_().to(x.dtype).view(*lead, n_features)
    block_m, block_n, block_k, use_dot = _tile(rows, k_features)
    blocks = weight.blocks
    grid = (triton.cdiv(n_features, block_n), triton.cdiv(rows, block_m))
    _linear_quantized_kernel[grid](
        x_rows, blocks, out,
        rows, n_features, k_features,
        x_rows.stride(0), x_rows.stride(1), blocks.stride(0), out.stride(0),
        FORMAT=FORMAT_CODES[weight.format],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot,
    )
    return out.to(x.dtype).view(*lead, n_features)


assert set(FORMAT_CODES) == set(FORMATS), "every QuantizedWeight format has a kernel path"
