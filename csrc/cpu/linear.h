#pragma once

#include "common/tensor_view.h"

namespace fmkernels::cpu {

// out = x @ weight^T for a few rows of x (a decode step's tokens):
//   x (rows, K), weight (N, K) as nn.Linear holds it, out (rows, N), one float dtype
//   (float32, float16 or bfloat16), the last dimension of each at unit stride.
// Accumulation is fp32; out is rounded to its dtype once. Each weight element is read once
// for all rows, so a call streams the weight at the memory bandwidth for rows up to ~16.
// nullptr on success, else why the views cannot be multiplied (nothing is written then).
const char* linear(const TensorView& x, const TensorView& weight, const TensorView& out,
                   int num_threads);

}  // namespace fmkernels::cpu
