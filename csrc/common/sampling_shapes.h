// Shape and dtype agreement for filter_logits and sample, checked on the host by every
// backend before a kernel runs, so that the indexing inside the kernels stays within the
// views. Each returns nullptr, or why the views do not fit.
#pragma once

#include <cstdint>

#include "common/tensor_view.h"

namespace fmkernels {

// A (batch,) vector of dtype with data (unless empty) and a usable stride.
inline bool is_sampling_vector(const TensorView& v, int64_t batch, DType dtype) {
  return (v.data != nullptr || batch == 0) && v.rank == 1 && v.sizes[0] == batch && v.dtype == dtype &&
         (batch <= 1 || v.strides[0] >= 1);
}

// logits (batch, vocab): float32, float16 or bfloat16, unit stride along the vocabulary.
inline const char* check_sampling_logits(const TensorView& logits) {
  if (logits.rank != 2) return "logits must be (batch, vocab)";
  if (logits.data == nullptr && logits.sizes[0] > 0) return "logits has no data";
  if (logits.dtype != DType::kFloat32 && logits.dtype != DType::kFloat16 &&
      logits.dtype != DType::kBFloat16)
    return "logits must be float32, float16 or bfloat16";
  if (logits.sizes[1] < 1) return "logits must have a non-empty vocabulary";
  if (logits.sizes[1] >= (int64_t{1} << 31)) return "logits: vocab must be < 2**31";
  if (logits.sizes[1] > 1 && logits.strides[1] != 1) return "logits must have unit stride along the vocabulary";
  if (logits.sizes[0] > 1 && logits.strides[0] < 0) return "logits: negative row stride";
  return nullptr;
}

// The filtered rows out (batch, vocab): logits' dtype, unit stride, rows that do not overlap.
inline const char* check_filtered_rows(const TensorView& logits, const TensorView& out) {
  const int64_t batch = logits.sizes[0];
  if ((out.data == nullptr && batch > 0) || out.rank != 2 || out.dtype != logits.dtype || out.sizes[0] != batch ||
      out.sizes[1] != logits.sizes[1] || (logits.sizes[1] > 1 && out.strides[1] != 1) ||
      (batch > 1 && out.strides[0] < logits.sizes[1]))
    return "out must be shaped and typed like logits, rows dense and apart";
  return nullptr;
}

// The per-row filter parameters: temperature, top_p, min_p float32 and top_k int64, (batch,).
inline const char* check_sampling_parameters(int64_t batch, const TensorView& temperature,
                                             const TensorView& top_k, const TensorView& top_p,
                                             const TensorView& min_p) {
  if (!is_sampling_vector(temperature, batch, DType::kFloat32)) return "temperature must be float32 (batch,)";
  if (!is_sampling_vector(top_k, batch, DType::kInt64)) return "top_k must be int64 (batch,)";
  if (!is_sampling_vector(top_p, batch, DType::kFloat32)) return "top_p must be float32 (batch,)";
  if (!is_sampling_vector(min_p, batch, DType::kFloat32)) return "min_p must be float32 (batch,)";
  return nullptr;
}

// The allowed bitmask, when given: int32 (batch, ceil(vocab / 32)), unit stride along the words.
inline const char* check_allowed(const TensorView& logits, const TensorView* allowed) {
  if (allowed == nullptr) return nullptr;
  const int64_t batch = logits.sizes[0], words = (logits.sizes[1] + 31) / 32;
  if (allowed->rank != 2 || allowed->dtype != DType::kInt32 || allowed->sizes[0] != batch ||
      allowed->sizes[1] != words)
    return "allowed must be int32 (batch, ceil(vocab / 32))";
  if (allowed->data == nullptr && batch > 0) return "allowed has no data";
  if ((words > 1 && allowed->strides[1] != 1) || (batch > 1 && allowed->strides[0] < 0))
    return "allowed must have unit stride along its words and a non-negative row stride";
  return nullptr;
}

// sample's tokens, seeds and steps: int64 (batch,).
inline const char* check_sample_vectors(int64_t batch, const TensorView& tokens, const TensorView& seeds,
                                        const TensorView& steps) {
  if (!is_sampling_vector(tokens, batch, DType::kInt64)) return "tokens must be int64 (batch,)";
  if (!is_sampling_vector(seeds, batch, DType::kInt64)) return "seeds must be int64 (batch,)";
  if (!is_sampling_vector(steps, batch, DType::kInt64)) return "steps must be int64 (batch,)";
  return nullptr;
}

}  // namespace fmkernels
