#pragma once

#include "common/tensor_view.h"

namespace fmkernels::cpu {

// Attention of n_new new queries per sequence against its KV cache (decode, or a
// prefill chunk whose keys and values are already in the cache).
//   q (batch, n_new, q_heads, head_dim): float32, float16 or bfloat16.
//   k_cache, v_cache: contiguous (batch, max_seqlen, kv_heads, head_dim), or paged
//     (num_blocks, block_size, kv_heads, head_dim) with block_table (int32,
//     batch x max_blocks): position p of sequence b lives in block
//     block_table[b][p / block_size], slot p % block_size. q's dtype.
//   cache_seqlens (int32, batch): L_b tokens in sequence b's cache, the new ones included.
//   out (batch, n_new, q_heads, head_dim), q's dtype; lse (float32, batch x q_heads x
//     n_new) or nullptr.
// Query i sees positions j <= i + L_b - n_new; query head h reads KV head
// h / (q_heads / kv_heads). Softmax of scale * q.k in fp32; out = softmax . v,
// lse = log(sum exp(scale * q.k)) (natural log).
// Strides are in elements, arbitrary except head_dim's, which must be 1. Runs on
// num_threads OpenMP threads. Every shape, dtype, length and block id is checked before
// anything is read; on a bad input nothing is written and the returned message says
// why. nullptr on success.
const char* decode_attention(const TensorView& q, const TensorView& k_cache,
                             const TensorView& v_cache, const TensorView& cache_seqlens,
                             const TensorView* block_table, const TensorView& out,
                             const TensorView* lse, float scale, int num_threads);

}  // namespace fmkernels::cpu
