#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/tensor_view.h"

namespace fmkernels::cuda {

// The most splits of one sequence's positions that decode_attention merges.
constexpr int64_t kDecodeAttentionMaxSplits = 256;

// What the kernels need beyond check_decode_attention_shapes: fewer than 2^30 positions per
// sequence and n_new x q_heads within 32 bits, head_dim a whole number of 16-byte vectors, 16-byte aligned cache rows (the cache is read in 16-byte loads), a
// split count in [1, kDecodeAttentionMaxSplits], and, with more than one split, fp32
// contiguous scratch of at least
//   partial_out: batch x num_splits x q_heads x n_new x head_dim elements,
//   partial_lse: batch x num_splits x q_heads x n_new elements.
// nullptr when the launch can run, else the reason it cannot.
const char* check_decode_attention_launch(const TensorView& q, const TensorView& k_cache,
                                          const TensorView& v_cache, const TensorView* block_table,
                                          int64_t num_splits,
                                          const TensorView* partial_out,
                                          const TensorView* partial_lse);

// Attention of n_new new queries per sequence against its KV cache, as
// fmkernels::cpu::decode_attention computes it (same views, same semantics), split-KV:
// each sequence's positions are cut into num_splits pieces whose fp32 partial results
// (in partial_out / partial_lse) a second kernel merges by their log-sum-exps. With one
// split the first kernel writes out and lse itself and the scratch is not used.
// All views live on the device and have passed check_decode_attention_shapes and
// check_decode_attention_launch. Lengths are clamped into [0, capacity] and positions whose
// block id lies outside the pool are skipped, so no input reads outside the views.
cudaError_t decode_attention(const TensorView& q, const TensorView& k_cache,
                             const TensorView& v_cache, const TensorView& cache_seqlens,
                             const TensorView* block_table, const TensorView& out,
                             const TensorView* lse, float scale, int64_t num_splits,
                             const TensorView* partial_out, const TensorView* partial_lse,
                             cudaStream_t stream);

}  // namespace fmkernels::cuda
