#pragma once

#include <cuda_runtime_api.h>

#include "common/tensor_view.h"

namespace fmkernels::cuda {

// Writes k, v (batch, n_new, kv_heads, head_dim) into a contiguous or paged
// cache at each sequence's current length, as fmkernels::cpu::append_kv does.
// All views live on the device; shapes are checked by the caller
// (check_append_kv_shapes), positions and block ids by the Python layer, and the
// kernel skips any position that would still fall outside the cache.
cudaError_t append_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
                      const TensorView& v, const TensorView& cache_seqlens,
                      const TensorView* block_table, cudaStream_t stream);

}  // namespace fmkernels::cuda
