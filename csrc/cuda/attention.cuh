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

// The kernel's schedules, numbered for benchmarking (`variant` below); all compute the same
// thing. Every one covers 128 query rows per CTA and double-buffers K and V in shared memory:
//   0: 8 warps x 16 query rows, 64-key tiles, K and V copied together (one CTA per SM);
//   1: as 0 with K and V copied in separate groups, so S = Q K^T starts once K has landed and
//      the next K loads during P V (two CTAs per SM at head_dim 64);
//   2: 4 warps x 32 query rows, each K / V fragment serving two 16-row blocks (half the
//      shared-memory reads per mma), 64-key tiles, split copies, two CTAs per SM;
//   3: as 2 with 32-key tiles;
//   4: as 1 with 128-key tiles.
constexpr int kAttentionVariants = 5;

// Prefill attention as fmkernels::cpu::attention computes it: dense q (B, Sq, Hq, D),
// k/v (B, Sk, Hkv, D), or packed (total, H, D) with int32 cu_seqlens_q/k (B + 1) on the
// device; GQA by head index, bottom-right causal mask, fp32 lse (B, Hq, Sq) or (Hq, total_q)
// when lse is given. max_seqlen_q is the longest packed query sequence (ignored when dense):
// query tiles past it are not launched, and cu_seqlens entries are clamped into the packed
// tensors, so no table can make the kernel read or write out of bounds. All views live on
// the device; shapes are checked by the caller (check_attention_shapes), and views that
// attention_unsupported refuses, or a variant outside [0, kAttentionVariants), return
// cudaErrorInvalidValue without a launch.
cudaError_t attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const TensorView* lse,
                      const TensorView* cu_seqlens_q, const TensorView* cu_seqlens_k,
                      int64_t max_seqlen_q, bool causal, float scale, int variant, cudaStream_t stream);

}  // namespace fmkernels::cuda
