#pragma once

#include "common/tensor_view.h"

namespace fmkernels::cpu {

// Writes k, v (batch, n_new, kv_heads, head_dim) into the caches at each
// sequence's current length cache_seqlens[b] (int32, batch):
//   contiguous cache (batch, max_seqlen, kv_heads, head_dim): row b, slot pos;
//   paged cache (num_blocks, block_size, kv_heads, head_dim) with block_table
//   (int32, batch x max_blocks): block block_table[b][pos / block_size], slot
//   pos % block_size.
// Every position and block id is checked before anything is written; on a bad
// input nothing is written and the returned message says why. nullptr on success.
const char* append_kv(const TensorView& k_cache, const TensorView& v_cache,
                      const TensorView& k, const TensorView& v,
                      const TensorView& cache_seqlens, const TensorView* block_table);

}  // namespace fmkernels::cpu
