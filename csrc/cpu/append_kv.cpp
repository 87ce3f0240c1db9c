#include "cpu/append_kv.h"

#include <cstring>

#include "common/append_kv_shapes.h"

namespace fmkernels::cpu {
namespace {

struct CacheLayout {
  int64_t capacity;    // positions a sequence can hold
  int64_t block_size;  // positions per block (max_seqlen for a contiguous cache)
  int64_t num_blocks;  // blocks in the pool (unused for a contiguous cache)
};

int32_t read_int32(const TensorView& view, int64_t i0, int64_t i1 = 0) {
  const auto* base = static_cast<const int32_t*>(view.data);
  return base[i0 * view.strides[0] + (view.rank > 1 ? i1 * view.strides[1] : 0)];
}

// Returns the cache row (batch index or block id) holding position pos of sequence b.
int64_t cache_row(const TensorView* block_table, const CacheLayout& layout, int64_t b,
                  int64_t pos) {
  if (block_table == nullptr) return b;
  return read_int32(*block_table, b, pos / layout.block_size);
}

const char* check_positions(const TensorView& cache_seqlens, const TensorView* block_table,
                            const CacheLayout& layout, int64_t batch, int64_t n_new) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = read_int32(cache_seqlens, b);
    if (start < 0 || start + n_new > layout.capacity)
      return "append_kv: cache_seqlens[b] + n_new exceeds the cache capacity";
    if (block_table == nullptr || n_new == 0) continue;
    for (int64_t j = start / layout.block_size; j <= (start + n_new - 1) / layout.block_size; ++j) {
      const int64_t block = read_int32(*block_table, b, j);
      if (block < 0 || block >= layout.num_blocks)
        return "append_kv: block_table holds a block id outside the pool";
    }
  }
  return nullptr;
}

template <typename Element>
void copy_tokens(const TensorView& cache, const TensorView& src, const TensorView& cache_seqlens,
                 const TensorView* block_table, const CacheLayout& layout) {
  const int64_t batch = src.sizes[0], n_new = src.sizes[1];
  const int64_t heads = src.sizes[2], head_dim = src.sizes[3];
  auto* dst_base = static_cast<Element*>(cache.data);
  const auto* src_base = static_cast<const Element*>(src.data);
  const bool rows_are_dense = cache.strides[3] == 1 && src.strides[3] == 1;

#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < n_new; ++t) {
      const int64_t pos = read_int32(cache_seqlens, b) + t;
      const int64_t row = cache_row(block_table, layout, b, pos);
      const int64_t slot = pos % layout.block_size;
      for (int64_t h = 0; h < heads; ++h) {
        Element* dst = dst_base + row * cache.strides[0] + slot * cache.strides[1] +
                       h * cache.strides[2];
        const Element* from = src_base + b * src.strides[0] + t * src.strides[1] +
                              h * src.strides[2];
        if (rows_are_dense) {
          std::memcpy(dst, from, head_dim * sizeof(Element));
        } else {
          for (int64_t d = 0; d < head_dim; ++d) dst[d * cache.strides[3]] = from[d * src.strides[3]];
        }
      }
    }
  }
}

}  // namespace

const char* append_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
                      const TensorView& v, const TensorView& cache_seqlens,
                      const TensorView* block_table) {
  if (const char* error = check_append_kv_shapes(k_cache, v_cache, k, v, cache_seqlens, block_table))
    return error;
  CacheLayout layout{};
  if (block_table == nullptr) {
    layout = {k_cache.sizes[1], k_cache.sizes[1], k_cache.sizes[0]};
  } else {
    layout = {block_table->sizes[1] * k_cache.sizes[1], k_cache.sizes[1], k_cache.sizes[0]};
  }
  if (const char* error = check_positions(cache_seqlens, block_table, layout, k.sizes[0], k.sizes[1]))
    return error;

  switch (element_size(k.dtype)) {
    case 2:
      copy_tokens<uint16_t>(k_cache, k, cache_seqlens, block_table, layout);
      copy_tokens<uint16_t>(v_cache, v, cache_seqlens, block_table, layout);
      return nullptr;
    case 4:
      copy_tokens<uint32_t>(k_cache, k, cache_seqlens, block_table, layout);
      copy_tokens<uint32_t>(v_cache, v, cache_seqlens, block_table, layout);
      return nullptr;
    default:
      return "append_kv: k must be float32, float16 or bfloat16";
  }
}

}  // namespace fmkernels::cpu
