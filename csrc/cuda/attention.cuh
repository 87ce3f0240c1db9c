#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/tensor_view.h"

namespace fmkernels::cuda {

// Why the tensor-core attention kernel cannot run these (shape-checked) views, or nullptr:
// it runs head_dim 64 or 128 in float16/bfloat16, reads and writes rows with 16-byte
// copies (so data pointers and the strides of every dimension longer than one are 16-byte
// aligned), reads cu_seqlens at unit stride, and launches (q_heads, batch, query tiles)
// grids within CUDA's limits.
const char* attention_unsupported(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, const TensorView* cu_seqlens_q,
                                  const TensorView* cu_seqlens_k);

// Prefill attention as fmkernels::cpu::attention computes it: dense q (B, Sq, Hq, D),
// k/v (B, Sk, Hkv, D), or packed (total, H, D) with int32 cu_seqlens_q/k (B + 1) on the
// device; GQA by head index, bottom-right causal mask, fp32 lse (B, Hq, Sq) or (Hq, total_q)
// when lse is given. max_seqlen_q is the longest packed query sequence (ignored when dense):
// query tiles past it are not launched, and cu_seqlens entries are clamped into the packed
// tensors, so no table can make the kernel read or write out of bounds. All views live on
// the device; shapes are checked by the caller (check_attention_shapes), and views that
// attention_unsupported refuses return cudaErrorInvalidValue without a launch.
cudaError_t attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const TensorView* lse,
                      const TensorView* cu_seqlens_q, const TensorView* cu_seqlens_k,
                      int64_t max_seqlen_q, bool causal, float scale, cudaStream_t stream);

}  // namespace fmkernels::cuda
