// Shape agreement for decode_attention, checked on the host by every backend before a
// kernel runs, so that the indexing inside the kernels stays within the views.
#pragma once

#include <cstdint>

#include "common/tensor_view.h"

namespace fmkernels {

// The largest head_dim the decode_attention kernels accept.
constexpr int64_t kDecodeAttentionMaxHeadDim = 256;

// q and out (batch, n_new, q_heads, head_dim); k_cache, v_cache (batch, capacity,
// kv_heads, head_dim), or (num_blocks, block_size, kv_heads, head_dim) with block_table
// int32 (batch, max_blocks); cache_seqlens int32 (batch); lse float32
// (batch, q_heads, n_new). Rows of head_dim are read and written at unit stride.
inline const char* check_decode_attention_shapes(const TensorView& q, const TensorView& k_cache,
                                                 const TensorView& v_cache,
                                                 const TensorView& cache_seqlens,
                                                 const TensorView* block_table,
                                                 const TensorView& out, const TensorView* lse) {
  if (q.rank != 4 || k_cache.rank != 4 || v_cache.rank != 4 || out.rank != 4)
    return "decode_attention: q, k_cache, v_cache and out must be 4-D";
  if (q.dtype != DType::kFloat32 && q.dtype != DType::kFloat16 && q.dtype != DType::kBFloat16)
    return "decode_attention: q must be float32, float16 or bfloat16";
  if (k_cache.dtype != q.dtype || v_cache.dtype != q.dtype || out.dtype != q.dtype)
    return "decode_attention: q, k_cache, v_cache and out must share one dtype";
  for (int d = 0; d < 4; ++d) {
    if (k_cache.sizes[d] != v_cache.sizes[d]) return "decode_attention: k_cache and v_cache shapes differ";
    if (out.sizes[d] != q.sizes[d]) return "decode_attention: out must have q's shape";
  }
  const int64_t batch = q.sizes[0], n_new = q.sizes[1], q_heads = q.sizes[2], head_dim = q.sizes[3];
  const int64_t kv_heads = k_cache.sizes[2];
  if (n_new < 1) return "decode_attention: q must hold at least one new token (n_new >= 1)";
  if (head_dim < 1 || head_dim > kDecodeAttentionMaxHeadDim)
    return "decode_attention: head_dim must be in [1, 256]";
  if (k_cache.sizes[3] != head_dim) return "decode_attention: k_cache must have q's head_dim";
  if (kv_heads < 1 || q_heads % kv_heads != 0)
    return "decode_attention: q_heads must be a multiple of kv_heads";
  if (k_cache.sizes[1] < 1) return "decode_attention: the cache must hold at least one position per row";
  if (q.strides[3] != 1 || k_cache.strides[3] != 1 || v_cache.strides[3] != 1 || out.strides[3] != 1)
    return "decode_attention: q, k_cache, v_cache and out must have unit stride along head_dim";
  if (cache_seqlens.rank != 1 || cache_seqlens.dtype != DType::kInt32 || cache_seqlens.sizes[0] != batch)
    return "decode_attention: cache_seqlens must be int32 of shape (batch,)";
  if (block_table != nullptr) {
    if (block_table->rank != 2 || block_table->dtype != DType::kInt32 || block_table->sizes[0] != batch)
      return "decode_attention: block_table must be int32 of shape (batch, max_blocks)";
  } else if (k_cache.sizes[0] != batch) {
    return "decode_attention: a contiguous cache's batch must equal q's batch";
  }
  if (lse != nullptr &&
      (lse->rank != 3 || lse->dtype != DType::kFloat32 || lse->sizes[0] != batch ||
       lse->sizes[1] != q_heads || lse->sizes[2] != n_new))
    return "decode_attention: lse must be float32 of shape (batch, q_heads, n_new)";
  return nullptr;
}

}  // namespace fmkernels
