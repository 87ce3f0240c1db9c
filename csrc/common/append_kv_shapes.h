// Shape agreement for append_kv, checked on the host by every backend before a
// kernel runs, so that the indexing inside the kernels stays within the views.
#pragma once

#include "common/tensor_view.h"

namespace fmkernels {

inline const char* check_append_kv_shapes(const TensorView& k_cache, const TensorView& v_cache,
                                          const TensorView& k, const TensorView& v,
                                          const TensorView& cache_seqlens,
                                          const TensorView* block_table) {
  if (k_cache.rank != 4 || v_cache.rank != 4 || k.rank != 4 || v.rank != 4)
    return "append_kv: k_cache, v_cache, k and v must be 4-D";
  for (int d = 0; d < 4; ++d) {
    if (k_cache.sizes[d] != v_cache.sizes[d]) return "append_kv: k_cache and v_cache shapes differ";
    if (k.sizes[d] != v.sizes[d]) return "append_kv: k and v shapes differ";
  }
  if (k_cache.sizes[1] < 1) return "append_kv: the cache must hold at least one position per row";
  if (k_cache.dtype != DType::kFloat32 && k_cache.dtype != DType::kFloat16 &&
      k_cache.dtype != DType::kBFloat16)
    return "append_kv: the cache must be float32, float16 or bfloat16";
  if (k.dtype != k_cache.dtype || v.dtype != k_cache.dtype || v_cache.dtype != k_cache.dtype)
    return "append_kv: k, v, k_cache and v_cache must share one dtype";
  if (k.sizes[2] != k_cache.sizes[2] || k.sizes[3] != k_cache.sizes[3])
    return "append_kv: k's (kv_heads, head_dim) differ from the cache's";
  if (cache_seqlens.rank != 1 || cache_seqlens.dtype != DType::kInt32 ||
      cache_seqlens.sizes[0] != k.sizes[0])
    return "append_kv: cache_seqlens must be int32 of shape (batch,)";
  if (block_table != nullptr) {
    if (block_table->rank != 2 || block_table->dtype != DType::kInt32 ||
        block_table->sizes[0] != k.sizes[0])
      return "append_kv: block_table must be int32 of shape (batch, max_blocks)";
  } else if (k_cache.sizes[0] != k.sizes[0]) {
    return "append_kv: a contiguous cache's batch must equal k's batch";
  }
  return nullptr;
}

}  // namespace fmkernels
