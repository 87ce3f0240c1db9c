#pragma once

#include "common/tensor_view.h"

namespace fmkernels::cpu {

// The sampling pipeline of fmkernels.reference, one row of logits (batch, vocab) at a time:
//   x = logits / temperature (temperature 0: greedy, only the argmax is kept, unscaled)
//   -> top-k (exactly k tokens by descending x, ties by lower id; 0 or >= vocab is off)
//   -> top-p (the shortest prefix, by rank, of the top-k survivors' distribution whose
//      mass reaches p; 1 is off) -> min-p (exp(x - max x) >= min_p); -inf is never kept.
// Per-row parameters are (batch,) tensors: temperature, top_p, min_p float32, top_k int64.
// logits: float32, float16 or bfloat16 with unit stride along the vocabulary.
// Rows run in parallel on num_threads OpenMP threads; a row's result does not depend on
// its batch or on the thread count. allowed (null, or int32 (batch, ceil(vocab / 32)), unit
// stride along the words): token i of row b is allowed when bit i % 32 of word i / 32 is set;
// the others count as -inf before any filter. Each returns nullptr, or why the views do not
// fit (nothing is written then).

// out (batch, vocab), logits' dtype: x where kept, -inf elsewhere.
const char* filter_logits(const TensorView& logits, const TensorView& out,
                          const TensorView& temperature, const TensorView& top_k,
                          const TensorView& top_p, const TensorView& min_p, const TensorView* allowed,
                          int num_threads);

// tokens (batch,) int64: argmax over kept tokens of x_i - log(-log u_i), u_i from
// Philox4x32-10 keyed by seeds[b] (int64), counter (i / 4, steps[b]), word i % 4
// (common/philox.h). With logprobs (batch,) float32 (or null): the token's log-probability
// under softmax of the filtered logits; top_ids (batch, n) int64 and top_logprobs (batch, n)
// float32 (both or neither): the n most likely tokens, best first, ties by lower id.
const char* sample(const TensorView& logits, const TensorView& tokens,
                   const TensorView& temperature, const TensorView& top_k,
                   const TensorView& top_p, const TensorView& min_p, const TensorView& seeds,
                   const TensorView& steps, const TensorView* allowed, const TensorView* logprobs,
                   const TensorView* top_ids, const TensorView* top_logprobs, int num_threads);

// The first row of allowed (int32 (batch, ceil(vocab / 32)), unit stride along the words) that
// allows no token of the vocabulary (bits past it do not count), or -1 if every row allows one;
// -2 if the view is not such a bitmask. Reads each row only up to its first allowed token.
int64_t first_row_without_allowed(const TensorView& allowed, int64_t vocab);

}  // namespace fmkernels::cpu
