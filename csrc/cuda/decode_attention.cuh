#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/tensor_view.h"

namespace fmkernels::cuda {

// The most splits of one sequence's positions that decode_attention merges.
constexpr int64_t kDecodeAttentionMaxSplits = 256;

// The split kernels decode_attention can run (see decode_attention.cu): kTiled stages tiles
// of 32 positions in shared memory through a 4-deep cp.async pipeline, kTiledShallow through
// a 2-deep one (less shared memory per CTA, more CTAs per SM). The same results to rounding.
enum class DecodeVariant : int { kTiled = 0, kTiledShallow = 1 };
constexpr int kDecodeAttentionVariants = 2;

// What the kernels need beyond check_decode_attention_shapes: fewer than 2^30 positions per
// sequence and n_new x q_heads within 32 bits, head_dim a whole number of 16-byte vectors, 16-byte aligned cache rows (the cache is read in 16-byte loads), a
// split count in [1, kDecodeAttentionMaxSplits], a variant in [0, kDecodeAttentionVariants), and, with more than one split, fp32
// contiguous scratch of at least
//   partial_out: batch x num_splits x q_heads x n_new x head_dim elements,
//   partial_lse: batch x num_splits x q_heads x n_new elements.
// nullptr when the launch can run, else the reason it cannot.
const char* check_decode_attention_launch(const TensorView& q, const TensorView& k_cache,
                                          const TensorView& v_cache, const TensorView* block_table,
                                          int64_t num_splits,
                                          const TensorView* partial_out,
                                          const TensorView* partial_lse, int variant);

// Attention of n_new new queries per sequence against its KV cache, as
// fmkernels::cpu::decode_attention computes it (same views, same semantics), split-KV:
// each sequence's positions are cut into num_splits pieces whose fp32 partial results
// (in partial_out / partial_lse) a second kernel merges by their log-sum-exps. With one
// split the first kernel writes out and lse itself and the scratch is not used.
// All views live on the device and have passed check_decode_attention_shapes and
// check_decode_attention_launch; variant: a DecodeVariant. Lengths are clamped into [0, capacity] and positions whose
// block id lies outside the pool are skipped, so no input reads outside the views.
cudaError_t decode_attention(const TensorView& q, const TensorView& k_cache,
                             const TensorView& v_cache, const TensorView& cache_seqlens,
                             const TensorView* block_table, const TensorView& out,
                             const TensorView* lse, float scale, int64_t num_splits,
                             const TensorView* partial_out, const TensorView* partial_lse,
                             int variant, cudaStream_t stream);

}  // namespace fmkernels::cuda
