#pragma once

#include "common/tensor_view.h"

namespace fmkernels::cpu {

// Prefill attention, softmax(q k^T * scale) v with fp32 accumulation, written into out
// (q's shape and dtype) and, when lse is given, the natural log-sum-exp of the scaled
// scores (float32).
//   dense:  q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), lse (B, Hq, Sq);
//   packed: q (total_q, Hq, D), k/v (total_k, Hkv, D), lse (Hq, total_q), with int32
//           cu_seqlens_q/k (B + 1): sequence b is rows cu[b] .. cu[b+1].
// GQA: query head h reads KV head h / (Hq / Hkv). causal: query i of a sequence sees
// keys j <= i + (Sk - Sq); a query that sees no key gets 0 and lse -inf.
// float32, float16 or bfloat16; 1 <= D <= 256; unit stride along D, other strides free.
// Runs on num_threads OpenMP threads. Shapes and the cu_seqlens bounds are checked
// before anything is written; nullptr on success, else the reason.
const char* attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const TensorView* lse,
                      const TensorView* cu_seqlens_q, const TensorView* cu_seqlens_k,
                      bool causal, float scale, int num_threads);

}  // namespace fmkernels::cpu
