// Decode attention on the GPU: a few new queries per sequence against a long KV cache.
//
// Memory bound: every K and V row of every sequence is read once, against ~4 flops per
// element per query row of its GQA group. Split-KV (flash-decoding), two launches: a split
// kernel, one CTA per (sequence, KV head, split of the positions, block of kRows query
// rows), and a merge kernel. The query rows of a KV head are its group's query heads times
// the n_new new tokens (row r: head h * group + r / n_new, token r % n_new), so each K/V
// row read serves all of them. One split writes out and lse directly; several write fp32
// partials (the normalised output and m + log2 l) that decode_merge_kernel, one CTA per
// (sequence, token, query head), merges by their log-sum-exps. Scores are fp32 on CUDA
// cores, in base 2 (q is pre-scaled by scale x log2 e). One split kernel,
// decode_tiled_kernel, at two pipeline depths (DecodeVariant: 4 or 2 stages): tiles of
// kTile = 32 positions stream through a kStages-deep cp.async pipeline into shared memory
// (K rows padded by one vector so that 32 threads reading 32 rows hit distinct banks). Per
// tile, lane i of warp w computes the whole dot of position i with query rows w, w + 4, ...;
// one warp max per row and tile updates the running max; then thread (group g, vector c)
// accumulates P x V for vector c of the positions g, g + 128 / kVectors, ... . The groups'
// sums are merged through shared memory at the end.
//
// A masked position never contributes a value: positions at or past the split's end, or
// whose block id lies outside the pool, are not read (zeros instead) and score -inf, as do
// positions past a query row's causal limit; probabilities exp2(-inf - m) are exactly 0.
#include "cuda/decode_attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "common/decode_attention_shapes.h"

namespace fmkernels::cuda {
namespace {

constexpr int kThreads = 128;       // threads of a split CTA
constexpr int kMergeThreads = 128;  // threads of a merge CTA
constexpr float kLn2 = 0.69314718055994530942f;
constexpr float kLog2e = 1.44269504088896340736f;
constexpr float kNegInf = -INFINITY;
constexpr int64_t kMaxPositions = int64_t{1} << 30;  // positions are 32-bit in the kernels

struct DecodeParams {
  const void* q;
  int64_t q_stride[3];  // batch, token, head (elements)
  const void* k_cache;
  const void* v_cache;
  int64_t k_stride[3];  // row (sequence or block), slot, head
  int64_t v_stride[3];
  const int32_t* seqlens;
  int64_t seqlens_stride;
  const int32_t* block_table;  // nullptr: a contiguous cache
  int64_t table_stride[2];
  int64_t num_blocks;  // rows of the cache
  int32_t block_size;  // slots per row
  int32_t capacity;    // positions a sequence can hold (< 2^30: positions are 32-bit)
  void* out;
  int64_t out_stride[3];  // batch, token, head
  float* lse;             // nullptr: not wanted
  int64_t lse_stride[3];  // batch, head, token
  float* partial_out;  // (batch, num_splits, q_heads, n_new, head_dim), used when num_splits > 1
  float* partial_lse;  // (batch, num_splits, q_heads, n_new), base 2
  int32_t n_new, q_heads, kv_heads, group, head_dim;
  int32_t rows;        // group x n_new query rows per KV head
  int32_t row_blocks;  // CTAs sharing one KV head's rows
  int32_t num_splits;
  float scale_log2;
};

// 16 bytes of the cache as fp32.
template <typename Element>
struct Vector;

template <>
struct Vector<float> {
  static constexpr int kElements = 4;
  __device__ static void widen(const uint4& bits, float* x) {
    x[0] = __uint_as_float(bits.x);
    x[1] = __uint_as_float(bits.y);
    x[2] = __uint_as_float(bits.z);
    x[3] = __uint_as_float(bits.w);
  }
};

template <>
struct Vector<__nv_bfloat16> {
  static constexpr int kElements = 8;
  __device__ static void widen_word(uint32_t word, float* x) {
    x[0] = __uint_as_float(word << 16);
    x[1] = __uint_as_float(word & 0xFFFF0000u);
  }
  __device__ static void widen(const uint4& bits, float* x) {
    widen_word(bits.x, x);
    widen_word(bits.y, x + 2);
    widen_word(bits.z, x + 4);
    widen_word(bits.w, x + 6);
  }
};

template <>
struct Vector<__half> {
  static constexpr int kElements = 8;
  __device__ static void widen_word(uint32_t word, float* x) {
    x[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xFFFFu)));
    x[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
  }
  __device__ static void widen(const uint4& bits, float* x) {
    widen_word(bits.x, x);
    widen_word(bits.y, x + 2);
    widen_word(bits.z, x + 4);
    widen_word(bits.w, x + 6);
  }
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Element>
__device__ __forceinline__ Element from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Element d of query row `row` of KV head h, sequence b: to out with one split, else to
// this split's fp32 partial.
template <typename Element>
__device__ __forceinline__ void store_output(const DecodeParams& p, int64_t b, int h, int split, int row, int d,
                                             float value) {
  const int head = h * p.group + row / p.n_new, token = row % p.n_new;
  if (p.num_splits == 1) {
    static_cast<Element*>(p.out)[b * p.out_stride[0] + token * p.out_stride[1] + head * p.out_stride[2] + d] =
        from_float<Element>(value);
  } else {
    p.partial_out[(((b * p.num_splits + split) * p.q_heads + head) * p.n_new + token) * p.head_dim + d] = value;
  }
}

// The same row's log-sum-exp, lse2 in base 2: to lse (natural log, if wanted) with one
// split, else to this split's partial.
__device__ __forceinline__ void store_lse(const DecodeParams& p, int64_t b, int h, int split, int row, float lse2) {
  const int head = h * p.group + row / p.n_new, token = row % p.n_new;
  if (p.num_splits > 1) {
    p.partial_lse[((b * p.num_splits + split) * p.q_heads + head) * p.n_new + token] = lse2;
  } else if (p.lse != nullptr) {
    p.lse[b * p.lse_stride[0] + head * p.lse_stride[1] + token * p.lse_stride[2]] = lse2 * kLn2;
  }
}

// 16 bytes from global to shared memory without passing through registers; zeros instead
// when !valid (the source is then not read).
__device__ __forceinline__ void copy_16_bytes(void* destination, const void* source, bool valid) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(destination));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(source),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most kPending committed groups of copies are still in flight.
template <int kPending>
__device__ __forceinline__ void wait_for_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, offset));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xFFFFFFFFu, x, offset);
  return x;
}

constexpr int kTile = 32;  // positions per pipeline stage of decode_tiled_kernel: one per lane
constexpr int kWarps = kThreads / 32;
constexpr size_t kTiledSmemBudget = 112 * 1024;  // bytes of pipeline stages one CTA may hold

// Shared memory of decode_tiled_kernel for rows of kVectors 16-byte vectors (head_dim
// padded up), kRows query rows and up to kWantedStages pipeline stages, in this order:
//   stages  kStages x [K: kTile x (kVectors + 1) vectors][V: kTile x kVectors vectors],
//           reused after the loop as merge: [kGroups][kRows][kDim] floats
//   q       [kRows][kDim] floats, pre-scaled, zero past head_dim and past the rows
//   probs   [kRows][kTile] floats: the current tile's probabilities
//   alpha   [kRows] floats: the current tile's rescale of the running sums
//   row_m, row_l  [kRows] floats: each row's final max and sum
//   live    [kStages][kTile] ints: whether a staged position was read (not masked)
template <typename Element, int kVectors, int kRows, int kWantedStages>
struct TiledLayout {
  static constexpr int kVec = Vector<Element>::kElements;
  static constexpr int kDim = kVectors * kVec;
  static constexpr int kKPitch = kVectors + 1;         // vectors per staged K row
  static constexpr int kGroups = kThreads / kVectors;  // P x V position groups
  static constexpr int kCopies = kTile / kGroups;      // K (and V) vectors one thread stages per tile
  static constexpr size_t kStageBytes = size_t{kTile} * (kKPitch + kVectors) * 16;
  static constexpr int kBudgetStages = static_cast<int>(kTiledSmemBudget / kStageBytes);
  static constexpr int kStages =
      kWantedStages < kBudgetStages ? kWantedStages : (kBudgetStages > 2 ? kBudgetStages : 2);
  static constexpr size_t kPipelineBytes = kStages * kStageBytes;
  static constexpr size_t kMergeBytes = size_t{kGroups} * kRows * kDim * sizeof(float);
  static constexpr size_t kBufferBytes = kPipelineBytes > kMergeBytes ? kPipelineBytes : kMergeBytes;
  static constexpr size_t kQOffset = kBufferBytes;
  static constexpr size_t kProbsOffset = kQOffset + size_t{kRows} * kDim * sizeof(float);
  static constexpr size_t kAlphaOffset = kProbsOffset + size_t{kRows} * kTile * sizeof(float);
  static constexpr size_t kRowMOffset = kAlphaOffset + kRows * sizeof(float);
  static constexpr size_t kRowLOffset = kRowMOffset + kRows * sizeof(float);
  static constexpr size_t kLiveOffset = kRowLOffset + kRows * sizeof(float);
  static constexpr size_t kBytes = kLiveOffset + size_t{kStages} * kTile * sizeof(int);
  static_assert(kThreads % kVectors == 0 && kTile % kGroups == 0, "a tile's vectors split evenly over the threads");
  static_assert(kRows % kWarps == 0, "each warp scores the same number of rows");
  static_assert(kBufferBytes % 16 == 0 && kDim % 4 == 0, "16-byte aligned regions");
};

template <typename Element, int kVectors, int kRows, int kWantedStages>
__global__ void __launch_bounds__(kThreads) decode_tiled_kernel(const DecodeParams p) {
  using Layout = TiledLayout<Element, kVectors, kRows, kWantedStages>;
  constexpr int kVec = Layout::kVec;
  constexpr int kDim = Layout::kDim;
  constexpr int kKPitch = Layout::kKPitch;
  constexpr int kGroups = Layout::kGroups;
  constexpr int kCopies = Layout::kCopies;
  constexpr int kStages = Layout::kStages;
  constexpr int kStageVectors = kTile * (kKPitch + kVectors);
  constexpr int kWarpRows = kRows / kWarps;  // query rows each thread scores

  extern __shared__ __align__(16) unsigned char shared[];
  uint4* staged = reinterpret_cast<uint4*>(shared);
  float* merge = reinterpret_cast<float*>(shared);  // after the loop only
  float* q_scaled = reinterpret_cast<float*>(shared + Layout::kQOffset);
  float* probs = reinterpret_cast<float*>(shared + Layout::kProbsOffset);
  float* alpha_shared = reinterpret_cast<float*>(shared + Layout::kAlphaOffset);
  float* row_m = reinterpret_cast<float*>(shared + Layout::kRowMOffset);
  float* row_l = reinterpret_cast<float*>(shared + Layout::kRowLOffset);
  int* live_shared = reinterpret_cast<int*>(shared + Layout::kLiveOffset);

  // blockIdx.x enumerates (b, h, split, row_block), row_block fastest.
  int unit = static_cast<int>(blockIdx.x);
  const int row_block = unit % p.row_blocks;
  unit /= p.row_blocks;
  const int split = unit % p.num_splits;
  unit /= p.num_splits;
  const int h = unit % p.kv_heads;
  const int64_t b = unit / p.kv_heads;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int column = threadIdx.x % kVectors;  // the vector of a row this thread stages and sums
  const int group = threadIdx.x / kVectors;   // its first position in a tile
  const int vectors = p.head_dim / kVec;

  // This split's positions [begin, end): the sequence cut evenly, in whole tiles.
  const int length = min(max(p.seqlens[b * p.seqlens_stride], 0), p.capacity);
  const int per_split = ((length + p.num_splits - 1) / p.num_splits + kTile - 1) / kTile * kTile;
  const int begin = min(split * per_split, length);
  const int end = min(begin + per_split, length);
  const int tiles = (end - begin + kTile - 1) / kTile;

  const Element* k_cache = static_cast<const Element*>(p.k_cache);
  const Element* v_cache = static_cast<const Element*>(p.v_cache);
  // Stages the K and V rows of positions [start, start + kTile) (zeros where masked).
  auto stage_tile = [&](int start, int stage) {
    uint4* k_stage = staged + stage * kStageVectors;
    uint4* v_stage = k_stage + kTile * kKPitch;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int slot_in_tile = group + i * kGroups;
      const int pos = start + slot_in_tile;
      bool live = pos < end;
      int64_t cache_row = b;
      int slot = pos;
      if (p.block_table != nullptr) {
        int64_t block = -1;
        if (live) block = p.block_table[b * p.table_stride[0] + (pos / p.block_size) * p.table_stride[1]];
        live = live && block >= 0 && block < p.num_blocks;
        cache_row = block;
        slot = pos % p.block_size;
      }
      const bool read = live && column < vectors;
      const Element* k_source = k_cache;
      const Element* v_source = v_cache;
      if (read) {
        k_source += cache_row * p.k_stride[0] + slot * p.k_stride[1] + h * p.k_stride[2] + column * kVec;
        v_source += cache_row * p.v_stride[0] + slot * p.v_stride[1] + h * p.v_stride[2] + column * kVec;
      }
      copy_16_bytes(k_stage + slot_in_tile * kKPitch + column, k_source, read);
      copy_16_bytes(v_stage + slot_in_tile * kVectors + column, v_source, read);
      if (column == 0) live_shared[stage * kTile + slot_in_tile] = live;
    }
  };

  // The pipeline's first kStages - 1 tiles go out before q is staged.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) stage_tile(begin + s * kTile, s);
    commit_copies();
  }

  for (int i = threadIdx.x; i < kRows * kDim; i += kThreads) {
    const int r = i / kDim, d = i % kDim;
    const int row = row_block * kRows + r;
    float value = 0.0f;
    if (row < p.rows && d < p.head_dim) {
      const int head = h * p.group + row / p.n_new, token = row % p.n_new;
      value = to_float(static_cast<const Element*>(p.q)[b * p.q_stride[0] + token * p.q_stride[1] +
                                                       head * p.q_stride[2] + d]) * p.scale_log2;
    }
    q_scaled[i] = value;
  }

  // Rows warp, warp + kWarps, ...: causal, bottom-right, token i sees positions <= i + L - n_new.
  int last_visible[kWarpRows];
  float m[kWarpRows], l[kWarpRows];  // m: the row's running max (the same in every lane); l: this lane's share of its sum
#pragma unroll
  for (int j = 0; j < kWarpRows; ++j) {
    const int row = row_block * kRows + warp + j * kWarps;
    last_visible[j] = row < p.rows ? row % p.n_new + length - p.n_new : -1;
    m[j] = kNegInf;
    l[j] = 0.0f;
  }
  float acc[kRows][kVec];  // unnormalised P x V of vector `column`, over this thread's positions
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[r][e] = 0.0f;

  for (int t = 0; t < tiles; ++t) {
    wait_for_copies<kStages - 2>();  // tile t has landed (for this thread's copies) ...
    __syncthreads();                 // ... for every thread's, and tile t - 1 is no longer read
    if (t + kStages - 1 < tiles) stage_tile(begin + (t + kStages - 1) * kTile, (t + kStages - 1) % kStages);
    commit_copies();

    const int stage = t % kStages;
    const uint4* k_stage = staged + stage * kStageVectors;
    const uint4* v_stage = k_stage + kTile * kKPitch;

    // Scores of position `lane` against rows warp + j * kWarps; two partial sums per row.
    float dot[kWarpRows][2];
#pragma unroll
    for (int j = 0; j < kWarpRows; ++j) dot[j][0] = dot[j][1] = 0.0f;
#pragma unroll(kVectors <= 16 ? kVectors : 4)
    for (int c = 0; c < kVectors; ++c) {
      float k[kVec];
      Vector<Element>::widen(k_stage[lane * kKPitch + c], k);
#pragma unroll
      for (int j = 0; j < kWarpRows; ++j) {
        const float4* q4 = reinterpret_cast<const float4*>(q_scaled + (warp + j * kWarps) * kDim + c * kVec);
#pragma unroll
        for (int e = 0; e < kVec / 4; ++e) {
          const float4 qv = q4[e];
          dot[j][0] = fmaf(qv.x, k[4 * e], dot[j][0]);
          dot[j][1] = fmaf(qv.y, k[4 * e + 1], dot[j][1]);
          dot[j][0] = fmaf(qv.z, k[4 * e + 2], dot[j][0]);
          dot[j][1] = fmaf(qv.w, k[4 * e + 3], dot[j][1]);
        }
      }
    }
    const int pos = begin + t * kTile + lane;
    const bool live = live_shared[stage * kTile + lane] != 0;
#pragma unroll
    for (int j = 0; j < kWarpRows; ++j) {
      const int r = warp + j * kWarps;
      const float score = live && pos <= last_visible[j] ? dot[j][0] + dot[j][1] : kNegInf;
      const float m_new = fmaxf(m[j], warp_max(score));
      // A row that has seen nothing keeps m = -inf: subtract 0 instead, so exp2 gives 0, not NaN.
      const float m_base = m_new == kNegInf ? 0.0f : m_new;
      const float alpha = exp2f(m[j] - m_base);
      const float prob = exp2f(score - m_base);
      l[j] = l[j] * alpha + prob;
      m[j] = m_new;
      probs[r * kTile + lane] = prob;
      if (lane == 0) alpha_shared[r] = alpha;
    }
    __syncthreads();

#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float alpha = alpha_shared[r];
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[r][e] *= alpha;
    }
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int slot_in_tile = group + i * kGroups;
      float v[kVec];
      Vector<Element>::widen(v_stage[slot_in_tile * kVectors + column], v);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float prob = probs[r * kTile + slot_in_tile];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[r][e] = fmaf(prob, v[e], acc[r][e]);
      }
    }
  }
  wait_for_copies<0>();  // only empty groups remain; the buffers become the merge area
  __syncthreads();

#pragma unroll
  for (int j = 0; j < kWarpRows; ++j) {
    const float total = warp_sum(l[j]);
    if (lane == 0) {
      row_m[warp + j * kWarps] = m[j];
      row_l[warp + j * kWarps] = total;
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float4* destination = reinterpret_cast<float4*>(merge + (group * kRows + r) * kDim + column * kVec);
#pragma unroll
    for (int e = 0; e < kVec / 4; ++e)
      destination[e] = make_float4(acc[r][4 * e], acc[r][4 * e + 1], acc[r][4 * e + 2], acc[r][4 * e + 3]);
  }
  __syncthreads();

  for (int i = threadIdx.x; i < kRows * p.head_dim; i += kThreads) {
    const int r = i / p.head_dim, d = i % p.head_dim;
    const int row = row_block * kRows + r;
    if (row >= p.rows) continue;
    float value = 0.0f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) value += merge[(g * kRows + r) * kDim + d];
    value = row_l[r] > 0.0f ? value / row_l[r] : 0.0f;
    store_output<Element>(p, b, h, split, row, d, value);
  }
  if (threadIdx.x < kRows) {
    const int r = threadIdx.x;
    const int row = row_block * kRows + r;
    if (row < p.rows) store_lse(p, b, h, split, row, row_l[r] > 0.0f ? row_m[r] + log2f(row_l[r]) : kNegInf);
  }
}

// One CTA per (b, token, head), blockIdx.x enumerating them head fastest:
// out = sum_s 2^(lse_s - M) out_s / sum_s 2^(lse_s - M), lse = M + log2 sum_s 2^(lse_s - M).
template <typename Element>
__global__ void __launch_bounds__(kMergeThreads) decode_merge_kernel(const DecodeParams p) {
  __shared__ float weight[kDecodeAttentionMaxSplits];
  const int row = static_cast<int>(blockIdx.x);
  const int head = row % p.q_heads;
  const int token = row / p.q_heads % p.n_new;
  const int64_t b = row / (p.q_heads * p.n_new);
  const int64_t split_stride = p.q_heads * p.n_new;
  const int64_t first = (b * p.num_splits * p.q_heads + head) * p.n_new + token;  // split 0's row

  float top = kNegInf;
  for (int s = 0; s < p.num_splits; ++s) top = fmaxf(top, p.partial_lse[first + s * split_stride]);
  const float base = top == kNegInf ? 0.0f : top;
  for (int s = threadIdx.x; s < p.num_splits; s += kMergeThreads)
    weight[s] = exp2f(p.partial_lse[first + s * split_stride] - base);
  __syncthreads();
  float total = 0.0f;
  for (int s = 0; s < p.num_splits; ++s) total += weight[s];
  const float inverse = total > 0.0f ? 1.0f / total : 0.0f;

  for (int d = threadIdx.x; d < p.head_dim; d += kMergeThreads) {
    float value = 0.0f;
    for (int s = 0; s < p.num_splits; ++s)
      value = fmaf(weight[s], p.partial_out[(first + s * split_stride) * p.head_dim + d], value);
    static_cast<Element*>(p.out)[b * p.out_stride[0] + token * p.out_stride[1] + head * p.out_stride[2] + d] =
        from_float<Element>(value * inverse);
  }
  if (threadIdx.x == 0 && p.lse != nullptr)
    p.lse[b * p.lse_stride[0] + head * p.lse_stride[1] + token * p.lse_stride[2]] =
        total > 0.0f ? (base + log2f(total)) * kLn2 : kNegInf;
}

template <typename Element, int kVectors, int kRows, int kWantedStages>
cudaError_t launch_tiled(const DecodeParams& p, int64_t ctas, cudaStream_t stream) {
  constexpr auto kernel = decode_tiled_kernel<Element, kVectors, kRows, kWantedStages>;
  constexpr size_t bytes = TiledLayout<Element, kVectors, kRows, kWantedStages>::kBytes;
  cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (status != cudaSuccess) return status;
  kernel<<<static_cast<unsigned>(ctas), kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename Element, int kVectors, int kWantedStages>
cudaError_t launch_tiled_rows(const DecodeParams& p, int rows_per_cta, int64_t ctas, cudaStream_t stream) {
  if (rows_per_cta == 4) return launch_tiled<Element, kVectors, 4, kWantedStages>(p, ctas, stream);
  return launch_tiled<Element, kVectors, 8, kWantedStages>(p, ctas, stream);
}

// Rows padded to 8, 16, 32 or (fp32 only) 64 vectors of 16 bytes.
template <typename Element, int kWantedStages>
cudaError_t launch_tiled_dims(const DecodeParams& p, int rows_per_cta, int64_t ctas, cudaStream_t stream) {
  const int vectors = p.head_dim / Vector<Element>::kElements;
  if (vectors <= 8) return launch_tiled_rows<Element, 8, kWantedStages>(p, rows_per_cta, ctas, stream);
  if (vectors <= 16) return launch_tiled_rows<Element, 16, kWantedStages>(p, rows_per_cta, ctas, stream);
  if (vectors <= 32) return launch_tiled_rows<Element, 32, kWantedStages>(p, rows_per_cta, ctas, stream);
  if constexpr (Vector<Element>::kElements == 4) {
    return launch_tiled_rows<Element, 64, kWantedStages>(p, rows_per_cta, ctas, stream);
  } else {
    return cudaErrorInvalidValue;  // 16-bit rows of head_dim <= 256 are at most 32 vectors
  }
}

template <typename Element>
cudaError_t launch(DecodeParams p, int64_t batch, DecodeVariant variant, cudaStream_t stream) {
  // Rows per CTA: 4 (a decode step of GQA up to 4, or MHA), else 8, in as many CTAs as the
  // rows need (each reads the KV head's positions again, mostly from L2).
  const int rows_per_cta = p.rows <= 4 ? 4 : 8;
  p.row_blocks = (p.rows + rows_per_cta - 1) / rows_per_cta;
  const int64_t ctas = batch * p.kv_heads * p.num_splits * p.row_blocks;
  const int64_t merge_ctas = batch * p.n_new * static_cast<int64_t>(p.q_heads);
  if (ctas > INT32_MAX || merge_ctas > INT32_MAX) return cudaErrorInvalidConfiguration;

  cudaError_t status;
  switch (variant) {
    case DecodeVariant::kTiled:
      status = launch_tiled_dims<Element, 4>(p, rows_per_cta, ctas, stream);
      break;
    case DecodeVariant::kTiledShallow:
      status = launch_tiled_dims<Element, 2>(p, rows_per_cta, ctas, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (status != cudaSuccess || p.num_splits == 1) return status;
  decode_merge_kernel<Element><<<static_cast<unsigned>(merge_ctas), kMergeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

bool is_flat_float32(const TensorView* view, int64_t elements) {
  return view != nullptr && view->rank == 1 && view->dtype == DType::kFloat32 &&
         view->strides[0] == 1 && view->sizes[0] >= elements;
}

}  // namespace

const char* check_decode_attention_launch(const TensorView& q, const TensorView& k_cache,
                                          const TensorView& v_cache, const TensorView* block_table,
                                          int64_t num_splits,
                                          const TensorView* partial_out,
                                          const TensorView* partial_lse, int variant) {
  if (variant < 0 || variant >= kDecodeAttentionVariants)
    return "decode_attention (cuda): unknown kernel variant (0: tiled, 1: tiled_shallow)";
  const int64_t vec = 16 / element_size(q.dtype);
  const int64_t max_blocks = block_table != nullptr ? block_table->sizes[1] : 1;
  if (k_cache.sizes[1] >= kMaxPositions || max_blocks >= kMaxPositions ||
      k_cache.sizes[1] * max_blocks >= kMaxPositions)
    return "decode_attention (cuda): a sequence must hold fewer than 2^30 positions";
  // Query rows (group x n_new, at most n_new x q_heads) are counted in int, rounded up to
  // whole blocks of 8.
  if (q.sizes[1] * q.sizes[2] > INT32_MAX - 8)
    return "decode_attention (cuda): n_new x q_heads must be below 2^31 - 8";
  if (q.sizes[3] % vec != 0)
    return "decode_attention (cuda): head_dim must be a multiple of 8 (float16, bfloat16) or 4 (float32)";
  for (const TensorView* cache : {&k_cache, &v_cache}) {
    if (reinterpret_cast<uintptr_t>(cache->data) % 16 != 0 || cache->strides[0] % vec != 0 ||
        cache->strides[1] % vec != 0 || cache->strides[2] % vec != 0)
      return "decode_attention (cuda): k_cache and v_cache rows must be 16-byte aligned";
  }
  if (num_splits < 1 || num_splits > kDecodeAttentionMaxSplits)
    return "decode_attention (cuda): num_splits must be in [1, 256]";
  if (num_splits > 1) {
    const int64_t rows = q.sizes[0] * num_splits * q.sizes[2] * q.sizes[1];
    if (!is_flat_float32(partial_out, rows * q.sizes[3]) || !is_flat_float32(partial_lse, rows))
      return "decode_attention (cuda): split scratch must be flat float32 tensors of "
             "batch x num_splits x q_heads x n_new (x head_dim) elements";
  }
  return nullptr;
}

cudaError_t decode_attention(const TensorView& q, const TensorView& k_cache,
                             const TensorView& v_cache, const TensorView& cache_seqlens,
                             const TensorView* block_table, const TensorView& out,
                             const TensorView* lse, float scale, int64_t num_splits,
                             const TensorView* partial_out, const TensorView* partial_lse,
                             int variant, cudaStream_t stream) {
  const int64_t batch = q.sizes[0];
  if (batch == 0 || q.sizes[2] == 0) return cudaSuccess;  // no query row: nothing to launch
  DecodeParams p{};
  p.q = q.data;
  p.k_cache = k_cache.data;
  p.v_cache = v_cache.data;
  p.out = out.data;
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = q.strides[d];
    p.k_stride[d] = k_cache.strides[d];
    p.v_stride[d] = v_cache.strides[d];
    p.out_stride[d] = out.strides[d];
  }
  p.seqlens = static_cast<const int32_t*>(cache_seqlens.data);
  p.seqlens_stride = cache_seqlens.strides[0];
  p.num_blocks = k_cache.sizes[0];
  p.block_size = static_cast<int32_t>(k_cache.sizes[1]);
  p.capacity = static_cast<int32_t>(k_cache.sizes[1]);
  if (block_table != nullptr) {
    p.block_table = static_cast<const int32_t*>(block_table->data);
    p.table_stride[0] = block_table->strides[0];
    p.table_stride[1] = block_table->strides[1];
    p.capacity = static_cast<int32_t>(block_table->sizes[1] * k_cache.sizes[1]);
  }
  if (lse != nullptr) {
    p.lse = static_cast<float*>(lse->data);
    for (int d = 0; d < 3; ++d) p.lse_stride[d] = lse->strides[d];
  }
  if (num_splits > 1) {
    p.partial_out = static_cast<float*>(partial_out->data);
    p.partial_lse = static_cast<float*>(partial_lse->data);
  }
  p.n_new = static_cast<int32_t>(q.sizes[1]);
  p.q_heads = static_cast<int32_t>(q.sizes[2]);
  p.head_dim = static_cast<int32_t>(q.sizes[3]);
  p.kv_heads = static_cast<int32_t>(k_cache.sizes[2]);
  p.group = p.q_heads / p.kv_heads;
  p.rows = p.group * p.n_new;
  p.num_splits = static_cast<int32_t>(num_splits);
  p.scale_log2 = scale * kLog2e;
  switch (q.dtype) {
    case DType::kFloat32:
      return launch<float>(p, batch, static_cast<DecodeVariant>(variant), stream);
    case DType::kFloat16:
      return launch<__half>(p, batch, static_cast<DecodeVariant>(variant), stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(p, batch, static_cast<DecodeVariant>(variant), stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace fmkernels::cuda
