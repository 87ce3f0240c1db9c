#pragma once

#include "common/tensor_view.h"

namespace fmkernels::cpu {

// GGML's type numbers of the block formats the kernels below read (ggml.h's ggml_type).
enum class QuantFormat : int {
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ6_K = 14,
};

// out = x @ W^T for a few rows of x against a weight W (N, K) held in a GGUF block format,
// read as it is stored (python/fmkernels/quantized.py documents the layouts):
//   x (rows, K) float32, float16 or bfloat16, unit stride along K;
//   blocks (N, K / B * block_bytes) uint8, unit stride along a row, rows at any stride
//   >= the row's bytes; format = GGML's type number (QuantFormat);
//   out (rows, N) in x's dtype, unit stride along N.
// Each block of 32 of a row of x is rounded to int8 with the scale max|x| / 127, the weight's
// integers are multiplied with those in integer arithmetic, and the blocks' sums are scaled
// and accumulated in fp32; out is rounded to its dtype once.
// nullptr on success, else why the views do not fit (nothing is written then).
const char* linear_quantized(const TensorView& x, const TensorView& blocks, int format,
                             const TensorView& out, int num_threads);

// out (N, K) float32, unit stride along K = the weight the blocks hold, computed with the same
// fp32 operations in the same order as python/fmkernels/quantized.py's dequantize (bit for bit).
const char* dequantize(const TensorView& blocks, int format, const TensorView& out, int num_threads);

}  // namespace fmkernels::cpu
