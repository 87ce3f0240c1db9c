// append_kv on the GPU: a strided copy of each new token's kv_heads x head_dim elements of k
// and v into its cache slot. When every tensor keeps head_dim at unit stride, 16-byte aligned,
// the copy moves 16-byte vectors (uint4) instead of single elements.
#include "cuda/append_kv.cuh"

#include <cstdint>

namespace fmkernels::cuda {
namespace {

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

// A view's strides counted in words of `word_elements` elements.
Strides4 strides_in_words(const TensorView& view, int64_t word_elements) {
  return {view.strides[0] / word_elements, view.strides[1] / word_elements,
          view.strides[2] / word_elements, view.strides[3]};
}

// One CTA per (token, sequence); its threads copy the token's kv_heads x row_words words of
// k and of v. A word is one element, or a 16-byte vector of them (head_dim at unit stride).
template <typename Word>
__global__ void append_kv_kernel(Word* __restrict__ k_cache, Word* __restrict__ v_cache,
                                 Strides4 k_cache_strides, Strides4 v_cache_strides,
                                 const Word* __restrict__ k, const Word* __restrict__ v,
                                 Strides4 k_strides, Strides4 v_strides,
                                 const int32_t* __restrict__ cache_seqlens, int64_t seqlens_stride,
                                 const int32_t* __restrict__ block_table, int64_t table_stride0,
                                 int64_t table_stride1, int64_t capacity, int64_t block_size,
                                 int64_t num_blocks, int heads, int row_words) {
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
  // The two caches may be laid out differently (a slice of a fused KV buffer, say).
  Word* k_dst = k_cache + row * k_cache_strides.s0 + slot * k_cache_strides.s1;
  Word* v_dst = v_cache + row * v_cache_strides.s0 + slot * v_cache_strides.s1;
  const Word* k_src = k + b * k_strides.s0 + t * k_strides.s1;
  const Word* v_src = v + b * v_strides.s0 + t * v_strides.s1;
  const int words = heads * row_words;
  for (int i = threadIdx.x; i < words; i += blockDim.x) {
    const int h = i / row_words, w = i % row_words;
    k_dst[h * k_cache_strides.s2 + w * k_cache_strides.s3] = k_src[h * k_strides.s2 + w * k_strides.s3];
    v_dst[h * v_cache_strides.s2 + w * v_cache_strides.s3] = v_src[h * v_strides.s2 + w * v_strides.s3];
  }
}

// Whether `view` can be read as 16-byte vectors of `word_elements` elements along head_dim.
bool vectorizable(const TensorView& view, int64_t word_elements) {
  return reinterpret_cast<uintptr_t>(view.data) % 16 == 0 && view.strides[3] == 1 &&
         view.sizes[3] % word_elements == 0 && view.strides[0] % word_elements == 0 &&
         view.strides[1] % word_elements == 0 && view.strides[2] % word_elements == 0;
}

template <typename Word>
cudaError_t launch(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
                   const TensorView& v, const TensorView& cache_seqlens,
                   const TensorView* block_table, int64_t word_elements, cudaStream_t stream) {
  const int64_t batch = k.sizes[0], n_new = k.sizes[1];
  const int64_t block_size = k_cache.sizes[1];
  const int64_t capacity = block_table ? block_table->sizes[1] * block_size : block_size;
  const int64_t row_words = k.sizes[3] / word_elements;
  const int64_t words = k.sizes[2] * row_words;
  const int threads = static_cast<int>(words < 256 ? 32 * ((words + 31) / 32) : 256);
  const dim3 grid(static_cast<unsigned>(n_new), static_cast<unsigned>(batch));
  append_kv_kernel<Word><<<grid, threads, 0, stream>>>(
      static_cast<Word*>(k_cache.data), static_cast<Word*>(v_cache.data),
      strides_in_words(k_cache, word_elements), strides_in_words(v_cache, word_elements),
      static_cast<const Word*>(k.data), static_cast<const Word*>(v.data),
      strides_in_words(k, word_elements), strides_in_words(v, word_elements),
      static_cast<const int32_t*>(cache_seqlens.data), cache_seqlens.strides[0],
      block_table ? static_cast<const int32_t*>(block_table->data) : nullptr,
      block_table ? block_table->strides[0] : 0, block_table ? block_table->strides[1] : 0,
      capacity, block_size, k_cache.sizes[0], static_cast<int>(k.sizes[2]),
      static_cast<int>(row_words));
  return cudaGetLastError();
}

}  // namespace

cudaError_t append_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
                      const TensorView& v, const TensorView& cache_seqlens,
                      const TensorView* block_table, cudaStream_t stream) {
  const int64_t batch = k.sizes[0], n_new = k.sizes[1];
  if (batch == 0 || n_new == 0 || k.sizes[2] * k.sizes[3] == 0) return cudaSuccess;
  // The copy loop's int counter steps past its last word by up to a block (256 threads).
  if (batch > 65535 || n_new > INT32_MAX || k.sizes[2] * k.sizes[3] > INT32_MAX - 256)
    return cudaErrorInvalidConfiguration;
  // The copy moves bits, so the element width is all that matters.
  const int64_t size = element_size(k.dtype), vector_elements = 16 / size;
  if (vectorizable(k_cache, vector_elements) && vectorizable(v_cache, vector_elements) &&
      vectorizable(k, vector_elements) && vectorizable(v, vector_elements))
    return launch<uint4>(k_cache, v_cache, k, v, cache_seqlens, block_table, vector_elements, stream);
  if (size == 2) return launch<uint16_t>(k_cache, v_cache, k, v, cache_seqlens, block_table, 1, stream);
  return launch<uint32_t>(k_cache, v_cache, k, v, cache_seqlens, block_table, 1, stream);
}

}  // namespace fmkernels::cuda
