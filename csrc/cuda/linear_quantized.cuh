#pragma once

#include <cuda_runtime_api.h>

#include "common/tensor_view.h"

namespace fmkernels::cuda {

// GGUF's block formats, numbered as the binding maps their names (fmkernels.quantized).
enum class QuantFormat : int32_t {
  kQ8_0 = 0,  // 32 weights in 34 bytes: fp16 d, int8 q[32]
  kQ4_0 = 1,  // 32 weights in 18 bytes: fp16 d, nibbles q[16]
  kQ4_1 = 2,  // 32 weights in 20 bytes: fp16 d, fp16 m, nibbles q[16]
  kQ4_K = 3,  // 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 scale bytes, q[128]
  kQ6_K = 4,  // 256 weights in 210 bytes: ql[128], qh[64], int8 scales[16], fp16 d
};

// The most rows of x linear_quantized takes (a decode step's few rows).
constexpr int64_t kLinearQuantizedMaxRows = 64;

// Why linear_quantized cannot run on the views (nullptr if it can): x (rows, K) float32,
// float16 or bfloat16, any strides, rows <= kLinearQuantizedMaxRows; blocks (N, K / B * bytes)
// uint8, unit stride along a row, rows at least that many bytes apart; out (rows, N) in x's
// dtype, any strides; format one of QuantFormat's numbers, K a multiple of its block.
const char* check_linear_quantized_views(const TensorView& x, const TensorView& blocks, int format,
                                         const TensorView& out);

// out = x @ dequantize(blocks)^T, every weight dequantized to fp32 as
// fmkernels.quantized.dequantize computes it (the same roundings, no contraction), the
// products accumulated in fp32, the result rounded once to out's dtype. All views live on
// the device. Returns nullptr once launched, else why not: the views' error
// (check_linear_quantized_views) or the launch's CUDA error string.
const char* linear_quantized(const TensorView& x, const TensorView& blocks, int format, const TensorView& out,
                             cudaStream_t stream);

}  // namespace fmkernels::cuda
