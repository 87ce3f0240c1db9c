#pragma once

#include <cuda_runtime_api.h>

#include "common/tensor_view.h"

namespace fmkernels::cuda {

// The sampling pipeline of fmkernels.reference on the device, one thread block per row of
// logits (batch, vocab), as fmkernels::cpu::filter_logits / sample define it:
//   x = logits / temperature (temperature 0: greedy, only the argmax is kept, unscaled)
//   -> top-k (exactly k tokens by descending x, ties by lower id; 0 or >= vocab is off)
//   -> top-p (the shortest prefix, by rank, of the top-k survivors' distribution whose
//      mass reaches p; 1 is off) -> min-p (exp(x - max x) >= min_p); -inf is never kept.
// Every view lives on the device; per-row parameters are (batch,) vectors: temperature,
// top_p, min_p float32, top_k int64. logits: float32, float16 or bfloat16 with unit
// stride along the vocabulary. A row's result does not depend on its batch. Returns
// cudaErrorInvalidValue when the views do not fit (see common/sampling_shapes.h; the
// bindings check them first to say why), else the launch's status. allowed (null, or int32
// (batch, ceil(vocab / 32)) with unit stride along the words): the tokens whose bit is clear
// count as -inf before any filter.

// out (batch, vocab), logits' dtype: x where kept, -inf elsewhere.
cudaError_t filter_logits(const TensorView& logits, const TensorView& out, const TensorView& temperature,
                          const TensorView& top_k, const TensorView& top_p, const TensorView& min_p,
                          const TensorView* allowed, cudaStream_t stream);

// tokens (batch,) int64: argmax over kept tokens of x_i - log(-log u_i), u_i from
// Philox4x32-10 keyed by seeds[b], counter (i / 4, steps[b]), word i % 4 (common/philox.h).
// Optional, float32: logprobs (batch,), the token's log-probability under softmax of the
// filtered logits; log_mass (batch,), log sum exp(x - m) over kept tokens, m = max x;
// filtered (batch, vocab) dense, x - m where kept, -inf elsewhere. Shifted by the max, as
// log_softmax computes, so a top alternative's (x - m) - log_mass keeps fp32's precision
// where x is large (a small temperature): x - (m + log_mass) would round the sum at x's scale.
cudaError_t sample(const TensorView& logits, const TensorView& tokens, const TensorView& temperature,
                   const TensorView& top_k, const TensorView& top_p, const TensorView& min_p,
                   const TensorView& seeds, const TensorView& steps, const TensorView* allowed,
                   const TensorView* logprobs, const TensorView* log_mass, const TensorView* filtered,
                   cudaStream_t stream);

// Why the views cannot be sampled from (nullptr if they can): common/sampling_shapes.h's
// checks plus those of the optional outputs above.
const char* check_sample_views(const TensorView& logits, const TensorView& tokens,
                               const TensorView& temperature, const TensorView& top_k,
                               const TensorView& top_p, const TensorView& min_p, const TensorView& seeds,
                               const TensorView& steps, const TensorView* allowed, const TensorView* logprobs,
                               const TensorView* log_mass, const TensorView* filtered);

// Why filter_logits cannot run on the views (nullptr if it can).
const char* check_filter_views(const TensorView& logits, const TensorView& out, const TensorView& temperature,
                               const TensorView& top_k, const TensorView& top_p, const TensorView& min_p,
                               const TensorView* allowed);

}  // namespace fmkernels::cuda
