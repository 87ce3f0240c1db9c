#include "cuda/append_kv.cuh"

#include <cstdint>

namespace fmkernels::cuda {
namespace {

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

Strides4 strides_of(const TensorView& view) {
  return {view.strides[0], view.strides[1], view.strides[2], view.strides[3]};
}

// One block per (token, sequence); its threads copy the token's kv_heads x head_dim
// elements of k and of v.
template <typename Element>
__global__ void append_kv_kernel(Element* __restrict__ k_cache, Element* __restrict__ v_cache,
                                 Strides4 k_cache_strides, Strides4 v_cache_strides,
                                 const Element* __restrict__ k,
                                 const Element* __restrict__ v, Strides4 k_strides,
                                 Strides4 v_strides, const int32_t* __restrict__ cache_seqlens,
                                 int64_t seqlens_stride, const int32_t* __restrict__ block_table,
                                 int64_t table_stride0, int64_t table_stride1, int64_t capacity,
                                 int64_t block_size, int64_t num_blocks, int64_t heads,
                                 int64_t head_dim) {
  const int64_t t = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t n_new = gridDim.x;
  const int64_t start = cache_seqlens[b * seqlens_stride];
  const int64_t pos = start + t;
  if (start < 0 || start + n_new > capacity) return;
  int64_t row = b;
  if (block_table != nullptr) {
    row = block_table[b * table_stride0 + (pos / block_size) * table_stride1];
    if (row < 0 || row >= num_blocks) return;
  }
  const int64_t slot = pos % block_size;
  const int64_t elements = heads * head_dim;
  for (int64_t i = threadIdx.x; i < elements; i += blockDim.x) {
    const int64_t h = i / head_dim, d = i % head_dim;
    // The two caches may be laid out differently (a slice of a fused KV buffer, say).
    const int64_t k_dst = row * k_cache_strides.s0 + slot * k_cache_strides.s1 +
                          h * k_cache_strides.s2 + d * k_cache_strides.s3;
    const int64_t v_dst = row * v_cache_strides.s0 + slot * v_cache_strides.s1 +
                          h * v_cache_strides.s2 + d * v_cache_strides.s3;
    k_cache[k_dst] = k[b * k_strides.s0 + t * k_strides.s1 + h * k_strides.s2 + d * k_strides.s3];
    v_cache[v_dst] = v[b * v_strides.s0 + t * v_strides.s1 + h * v_strides.s2 + d * v_strides.s3];
  }
}

template <typename Element>
cudaError_t launch(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
                   const TensorView& v, const TensorView& cache_seqlens,
                   const TensorView* block_table, cudaStream_t stream) {
  const int64_t batch = k.sizes[0], n_new = k.sizes[1];
  if (batch == 0 || n_new == 0 || k.sizes[2] * k.sizes[3] == 0) return cudaSuccess;
  if (batch > 65535 || n_new > 2147483647) return cudaErrorInvalidConfiguration;
  const int64_t block_size = k_cache.sizes[1];
  const int64_t capacity = block_table ? block_table->sizes[1] * block_size : block_size;
  const int64_t elements = k.sizes[2] * k.sizes[3];
  const int threads = static_cast<int>(elements < 256 ? 32 * ((elements + 31) / 32) : 256);
  const dim3 grid(static_cast<unsigned>(n_new), static_cast<unsigned>(batch));
  append_kv_kernel<Element><<<grid, threads, 0, stream>>>(
      static_cast<Element*>(k_cache.data), static_cast<Element*>(v_cache.data),
      strides_of(k_cache), strides_of(v_cache), static_cast<const Element*>(k.data),
      static_cast<const Element*>(v.data), strides_of(k), strides_of(v),
      static_cast<const int32_t*>(cache_seqlens.data), cache_seqlens.strides[0],
      block_table ? static_cast<const int32_t*>(block_table->data) : nullptr,
      block_table ? block_table->strides[0] : 0, block_table ? block_table->strides[1] : 0,
      capacity, block_size, k_cache.sizes[0], k.sizes[2], k.sizes[3]);
  return cudaGetLastError();
}

}  // namespace

cudaError_t append_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
                      const TensorView& v, const TensorView& cache_seqlens,
                      const TensorView* block_table, cudaStream_t stream) {
  // The copy moves bits, so the element width is all that matters.
  if (element_size(k.dtype) == 2)
    return launch<uint16_t>(k_cache, v_cache, k, v, cache_seqlens, block_table, stream);
  return launch<uint32_t>(k_cache, v_cache, k, v, cache_seqlens, block_table, stream);
}

}  // namespace fmkernels::cuda
