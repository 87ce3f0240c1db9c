// Shape agreement for attention (prefill), checked on the host by every backend before a
// kernel runs, so that the indexing inside the kernels stays within the views.
#pragma once

#include "common/tensor_view.h"

namespace fmkernels {

// The largest head_dim the attention kernels accept (python/fmkernels/ops/_cpu.py agrees).
constexpr int64_t kAttentionMaxHeadDim = 256;

// Dense: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), lse (B, Hq, Sq).
// Packed: q (total_q, Hq, D), k/v (total_k, Hkv, D), lse (Hq, total_q), cu_seqlens_q/k
// int32 (B + 1). out is shaped and typed like q; lse is float32. Rows of head_dim are read
// and written at unit stride.
inline const char* check_attention_shapes(const TensorView& q, const TensorView& k,
                                          const TensorView& v, const TensorView& out,
                                          const TensorView* lse, const TensorView* cu_seqlens_q,
                                          const TensorView* cu_seqlens_k) {
  if ((cu_seqlens_q == nullptr) != (cu_seqlens_k == nullptr))
    return "attention: packed input needs both cu_seqlens_q and cu_seqlens_k";
  const bool packed = cu_seqlens_q != nullptr;
  const int rank = packed ? 3 : 4;
  if (q.rank != rank || k.rank != rank || v.rank != rank || out.rank != rank)
    return packed ? "attention: packed q, k, v and out must be 3-D (total_tokens, heads, head_dim)"
                  : "attention: q, k, v and out must be 4-D (batch, seqlen, heads, head_dim)";
  if (q.dtype != DType::kFloat32 && q.dtype != DType::kFloat16 && q.dtype != DType::kBFloat16)
    return "attention: q must be float32, float16 or bfloat16";
  if (k.dtype != q.dtype || v.dtype != q.dtype || out.dtype != q.dtype)
    return "attention: q, k, v and out must share one dtype";
  for (int d = 0; d < rank; ++d) {
    if (out.sizes[d] != q.sizes[d]) return "attention: out must have q's shape";
    if (v.sizes[d] != k.sizes[d]) return "attention: v must have k's shape";
  }
  if (!packed && k.sizes[0] != q.sizes[0]) return "attention: k must have q's batch size";
  const int64_t head_dim = q.sizes[rank - 1];
  if (head_dim < 1 || head_dim > kAttentionMaxHeadDim)
    return "attention: head_dim must be between 1 and 256";
  if (k.sizes[rank - 1] != head_dim) return "attention: k must have q's head_dim";
  const int64_t q_heads = q.sizes[rank - 2], kv_heads = k.sizes[rank - 2];
  if (kv_heads < 1 || q_heads % kv_heads != 0)
    return "attention: q_heads must be a multiple of kv_heads (>= 1)";
  if (q.strides[rank - 1] != 1 || k.strides[rank - 1] != 1 || v.strides[rank - 1] != 1 ||
      out.strides[rank - 1] != 1)
    return "attention: q, k, v and out must have unit stride along head_dim";
  if (lse != nullptr) {
    if (lse->dtype != DType::kFloat32) return "attention: lse must be float32";
    const bool lse_ok = packed ? (lse->rank == 2 && lse->sizes[0] == q_heads && lse->sizes[1] == q.sizes[0])
                               : (lse->rank == 3 && lse->sizes[0] == q.sizes[0] &&
                                  lse->sizes[1] == q_heads && lse->sizes[2] == q.sizes[1]);
    if (!lse_ok)
      return packed ? "attention: lse must have shape (q_heads, total_q)"
                    : "attention: lse must have shape (batch, q_heads, seqlen_q)";
  }
  if (packed) {
    if (cu_seqlens_q->rank != 1 || cu_seqlens_q->dtype != DType::kInt32 ||
        cu_seqlens_k->rank != 1 || cu_seqlens_k->dtype != DType::kInt32)
      return "attention: cu_seqlens_q and cu_seqlens_k must be 1-D int32";
    if (cu_seqlens_q->sizes[0] < 1 || cu_seqlens_k->sizes[0] != cu_seqlens_q->sizes[0])
      return "attention: cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries";
  }
  return nullptr;
}

}  // namespace fmkernels
