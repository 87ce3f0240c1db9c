// filter_logits and sample on the device: one thread block per row, no sort of the
// vocabulary. Every filter keeps a prefix of the rank order (x descending, ties by lower
// id), so a row's kept set is fixed by a few thresholds on order-preserving uint32 keys of
// x, each found by a radix select over three digits (11, 11 and 10 bits, shared-memory
// histograms), one pass over the row per digit (a 128k-token row is 513 KB of fp32: it
// stays in L2 between passes):
//   1. the max m of x and its lowest id (the greedy token); with top-k, the first digit's
//      token counts;
//   2. top-k: the k-th largest key t_k (two more passes); the r_k = k - count(key > t_k)
//      ties at t_k with the lowest ids survive;
//   3. top-p: the survivors' mass Z = sum exp(x - m) with r_k ties at t_k, and the largest
//      key t_p >= t_k with mass(key >= t_p) >= p * Z (three passes; keys above t_k only).
//      Every key above t_p is kept; the i-th tie at t_p (by id) while mass(key > t_p) +
//      i * exp(x_t_p - m) < p * Z, the reference's "mass before < p";
//   4. one pass that applies the thresholds and min-p (exp(x - m) >= min_p), ranking ties
//      per tile with a block scan, and writes the row or draws the token by Gumbel-max.
// Masses are fixed-point integers (exp(x - m) * 2**S, S chosen per vocabulary so no sum
// overflows): the sums are exact and independent of the order threads add them in, so a
// row's result does not depend on scheduling or on its batch.
#include "cuda/sampling.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "common/philox.h"
#include "common/sampling_shapes.h"

namespace fmkernels::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kPerThread = 4;  // consecutive tokens per thread and tile: one vector load, one Philox call
constexpr int64_t kTile = int64_t{kThreads} * kPerThread;
constexpr int kLevels = 3;      // radix digits per key
constexpr int kMaxBins = 2048;  // the widest digit's histogram
constexpr uint32_t kKeyNegInf = 0x007FFFFFu;  // order_key(-inf)

// Digits of a key, most significant first: bits 31..21, 20..10, 9..0.
__device__ __forceinline__ int level_shift(int level) { return level == 0 ? 21 : (level == 1 ? 10 : 0); }
__device__ __forceinline__ int level_bins(int level) { return level == 2 ? 1024 : 2048; }
// The bits of the digits above a level's, which a token must share with the prefix chosen so far.
__device__ __forceinline__ uint32_t level_prefix_mask(int level) {
  return level == 0 ? 0u : (level == 1 ? 0xFFE00000u : 0xFFFFFC00u);
}
__device__ __forceinline__ int level_digit(uint32_t key, int level) {
  return static_cast<int>((key >> level_shift(level)) & static_cast<uint32_t>(level_bins(level) - 1));
}

// key(a) < key(b) exactly when a < b for floats; -0 ranks with +0, as in the reference's sort.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kPerThread elements as one load or store: float4 for fp32, uint2 for 16-bit types.
template <typename T>
using Packed = std::conditional_t<sizeof(T) == 4, float4, uint2>;

template <typename T>
__device__ __forceinline__ bool is_packed_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Packed<T>) == 0;
}

static_assert(32 % kPerThread == 0, "a thread's tokens share one word of the allowed bitmask");

// A row of logits as the passes read it: the logits (unit stride) and, where given, the row's
// allowed bitmask words (token i allowed when bit i % 32 of word i / 32 is set).
template <typename T>
struct RowView {
  const T* __restrict__ logits;
  const uint32_t* __restrict__ allowed;  // null: every token allowed
};

// x = row[first + j] / divisor for j < kPerThread (IEEE division, as torch divides), -inf past
// the row and where the bitmask does not allow the token (set after the division: an infinite
// operand sends the division down its slow path).
template <typename T>
__device__ __forceinline__ void load_scaled(const RowView<T>& view, int64_t vocab, int64_t first,
                                            bool aligned, float divisor, float x[kPerThread]) {
  const T* __restrict__ row = view.logits;
  if (aligned && first + kPerThread <= vocab) {
    const Packed<T> packed = *reinterpret_cast<const Packed<T>*>(row + first);
    T elements[kPerThread];
    memcpy(elements, &packed, sizeof packed);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) x[j] = to_float(elements[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) x[j] = first + j < vocab ? to_float(row[first + j]) : -INFINITY;
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) x[j] = __fdiv_rn(x[j], divisor);
  if (view.allowed != nullptr) {
    // first is a multiple of kPerThread: the thread's tokens are bits of one word.
    const uint32_t word = first < vocab ? view.allowed[first >> 5] : 0u;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      if (((word >> ((first + j) & 31)) & 1u) == 0) x[j] = -INFINITY;
  }
}

template <typename T>
__device__ __forceinline__ void store_row(T* __restrict__ row, int64_t vocab, int64_t first, bool aligned,
                                          const float y[kPerThread]) {
  T elements[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) elements[j] = from_float<T>(y[j]);
  if (aligned && first + kPerThread <= vocab) {
    Packed<T> packed;
    memcpy(&packed, elements, sizeof packed);
    *reinterpret_cast<Packed<T>*>(row + first) = packed;
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      if (first + j < vocab) row[first + j] = elements[j];
  }
}

// exp(x - m) in fixed point, units of 1 / mass_scale.
__device__ __forceinline__ uint64_t fixed_mass(float x, float m, float mass_scale) {
  return __float2ull_rn(expf(x - m) * mass_scale);
}

struct BestToken {
  float score;
  int32_t id;
};

// The higher Gumbel score, the lower id on ties.
struct BetterToken {
  __device__ BestToken operator()(const BestToken& a, const BestToken& b) const {
    return (a.score > b.score || (a.score == b.score && a.id < b.id)) ? a : b;
  }
};

struct MaxU64 {
  __device__ uint64_t operator()(uint64_t a, uint64_t b) const { return a > b ? a : b; }
};

struct SumU64 {
  __device__ uint64_t operator()(uint64_t a, uint64_t b) const { return a + b; }
};

using ScanU64 = cub::BlockScan<uint64_t, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;
using ReduceU64 = cub::BlockReduce<uint64_t, kThreads>;
using ReduceBest = cub::BlockReduce<BestToken, kThreads>;

struct Shared {
  union {
    ScanU64::TempStorage scan;
    ReduceU64::TempStorage reduce;
    ReduceBest::TempStorage reduce_best;
  } temp;
  uint32_t count[kMaxBins];  // tokens per digit value (top-k)
  uint64_t mass[kMaxBins];   // fixed-point mass per digit value (top-p)
  int chosen_bin;            // choose_bin's answer, -1 for none
  uint64_t chosen_above;     // the total of the bins above it
  uint64_t broadcast;
};

// The per-row filter parameters, (batch,) vectors on the device.
struct RowParams {
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const float* min_p;
  int64_t temperature_stride, top_k_stride, top_p_stride, min_p_stride;
};

// The numbers that fix a row's kept set (see the file comment).
struct KeptSet {
  float divisor;  // x = logit / divisor
  float m;        // max x
  int64_t greedy_id;
  bool greedy;    // only greedy_id is kept
  uint32_t t_k;   // keys above survive top-k, and the first r_k ties at it
  int64_t r_k;
  bool top_p_on;
  uint32_t t_p;   // keys above survive top-p; the i-th tie while mass_above_p + i * q_p < target
  uint64_t mass_above_p, q_p, target;
  float min_p;
};

// Every thread of the block visits its kPerThread tokens of each tile, first to last.
template <typename T, typename Visit>
__device__ __forceinline__ void for_each_tile(const RowView<T>& row, int64_t vocab, bool aligned,
                                              float divisor, Visit&& visit) {
  for (int64_t base = 0; base < vocab; base += kTile) {
    const int64_t first = base + int64_t{threadIdx.x} * kPerThread;
    float x[kPerThread];
    load_scaled(row, vocab, first, aligned, divisor, x);
    visit(first, x);
  }
}

template <typename Op>
__device__ uint64_t block_all_reduce(Shared& s, uint64_t value, Op op) {
  const uint64_t result = ReduceU64(s.temp.reduce).Reduce(value, op);
  if (threadIdx.x == 0) s.broadcast = result;
  __syncthreads();
  const uint64_t all = s.broadcast;
  __syncthreads();  // temp and broadcast are free again
  return all;
}

__device__ void clear_histograms(Shared& s) {
  for (int i = threadIdx.x; i < kMaxBins; i += kThreads) {
    s.count[i] = 0;
    s.mass[i] = 0;
  }
  if (threadIdx.x == 0) {
    s.chosen_bin = -1;
    s.chosen_above = 0;
  }
}

// Scanning the bins from the highest down, the bin where the running total first reaches
// need: sets s.chosen_bin (stays -1 if the total of all bins is below need) and
// s.chosen_above, the total of the bins above it. Ends with the block synchronised.
template <typename Count>
__device__ void choose_bin(Shared& s, const Count* hist, int bins, uint64_t need) {
  const int per_thread = bins / kThreads;      // 4 or 2
  const int first = threadIdx.x * per_thread;  // positions counted from the highest bin
  uint64_t total = 0;
  for (int j = 0; j < per_thread; ++j) total += hist[bins - 1 - first - j];
  uint64_t above = 0;
  ScanU64(s.temp.scan).ExclusiveSum(total, above);
  for (int j = 0; j < per_thread; ++j) {
    const int bin = bins - 1 - first - j;
    const uint64_t h = hist[bin];
    if (above < need && need - above <= h) {
      s.chosen_bin = bin;
      s.chosen_above = above;
    }
    above += h;
  }
  __syncthreads();
}

template <typename T>
__device__ KeptSet find_kept_set(Shared& s, const RowView<T>& row, int64_t vocab, bool aligned,
                                 const RowParams& params, int64_t b, float mass_scale) {
  KeptSet ks;
  const float temperature = params.temperature[b * params.temperature_stride];
  const int64_t top_k = params.top_k[b * params.top_k_stride];
  const float top_p = params.top_p[b * params.top_p_stride];
  ks.min_p = params.min_p[b * params.min_p_stride];
  ks.greedy = !(temperature > 0.0f);
  ks.divisor = ks.greedy ? 1.0f : temperature;
  const int64_t k = (top_k <= 0 || top_k >= vocab) ? vocab : top_k;
  bool top_k_on = k < vocab && !ks.greedy;

  // Pass 1: the largest key with the lowest id, packed (key, ~id) so one max finds both;
  // with top-k, the first digit's counts.
  clear_histograms(s);
  __syncthreads();
  uint64_t best = 0;
  for_each_tile(row, vocab, aligned, ks.divisor, [&](int64_t first, const float* x) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (first + j >= vocab) break;
      const uint32_t key = order_key(x[j]);
      const uint64_t packed = (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(first + j));
      best = packed > best ? packed : best;
      if (top_k_on) atomicAdd(&s.count[level_digit(key, 0)], 1u);
    }
  });
  const uint64_t top = block_all_reduce(s, best, MaxU64());  // also orders the counts before their use
  ks.m = key_value(static_cast<uint32_t>(top >> 32));
  const int64_t top_id = 0xFFFFFFFFu - static_cast<uint32_t>(top);
  ks.greedy_id = top_id < vocab ? top_id : 0;
  if (!(ks.m > -INFINITY)) {  // nothing finite: the first token alone
    ks.greedy = true;
    top_k_on = false;
  }
  ks.top_p_on = top_p < 1.0f && !ks.greedy;

  // Passes 2-3 (top-k): the largest key t_k with count(key >= t_k) >= k.
  ks.t_k = kKeyNegInf;
  ks.r_k = vocab;
  if (top_k_on) {
    uint32_t prefix = 0;
    uint64_t need = static_cast<uint64_t>(k);
    for (int level = 0; level < kLevels; ++level) {
      if (level > 0) {
        clear_histograms(s);
        __syncthreads();
        const uint32_t mask = level_prefix_mask(level);
        for_each_tile(row, vocab, aligned, ks.divisor, [&](int64_t first, const float* x) {
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) {
            const uint32_t key = order_key(x[j]);
            if (first + j < vocab && (key & mask) == prefix) atomicAdd(&s.count[level_digit(key, level)], 1u);
          }
        });
        __syncthreads();
      }
      choose_bin(s, s.count, level_bins(level), need);
      // Found at every level: the counts of the chosen prefix's tokens reach need.
      const int bin = s.chosen_bin < 0 ? 0 : s.chosen_bin;
      need -= s.chosen_above;
      prefix |= static_cast<uint32_t>(bin) << level_shift(level);
      __syncthreads();  // the choice is read before the next clear
    }
    ks.t_k = prefix;
    ks.r_k = static_cast<int64_t>(need);
  }

  // Passes 4-6 (top-p): the survivors' mass, then the largest key t_p above t_k with
  // mass(t_k < key, key >= t_p) >= p * Z, or t_k itself if the keys above it fall short.
  ks.t_p = ks.t_k;
  ks.mass_above_p = 0;
  ks.q_p = 0;
  ks.target = 0;
  if (ks.top_p_on) {
    const float m = ks.m;
    const uint32_t t_k = ks.t_k;
    clear_histograms(s);
    __syncthreads();
    uint64_t partial = 0;
    for_each_tile(row, vocab, aligned, ks.divisor, [&](int64_t first, const float* x) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const uint32_t key = order_key(x[j]);
        if (first + j < vocab && key > t_k) {
          const uint64_t e = fixed_mass(x[j], m, mass_scale);
          partial += e;
          atomicAdd(reinterpret_cast<unsigned long long*>(&s.mass[level_digit(key, 0)]),
                    static_cast<unsigned long long>(e));
        }
      }
    });
    const uint64_t mass_above_k = block_all_reduce(s, partial, SumU64());  // also orders the histogram
    const uint64_t q_k = fixed_mass(key_value(t_k), m, mass_scale);
    const uint64_t z = mass_above_k + static_cast<uint64_t>(ks.r_k) * q_k;
    const double target = static_cast<double>(top_p) * static_cast<double>(z);
    ks.target = target >= 1.0 ? static_cast<uint64_t>(target) : 1;  // at least the top token's mass

    uint32_t prefix = 0;
    uint64_t need = ks.target;
    bool found = true;
    for (int level = 0; level < kLevels; ++level) {
      if (level > 0) {
        clear_histograms(s);
        __syncthreads();
        const uint32_t mask = level_prefix_mask(level);
        for_each_tile(row, vocab, aligned, ks.divisor, [&](int64_t first, const float* x) {
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) {
            const uint32_t key = order_key(x[j]);
            if (first + j < vocab && key > t_k && (key & mask) == prefix)
              atomicAdd(reinterpret_cast<unsigned long long*>(&s.mass[level_digit(key, level)]),
                        static_cast<unsigned long long>(fixed_mass(x[j], m, mass_scale)));
          }
        });
        __syncthreads();
      }
      choose_bin(s, s.mass, level_bins(level), need);
      // Past the first level a bin is always found (integer sums are exact); the first
      // finds none when the mass above t_k falls short of the target.
      const int bin = s.chosen_bin;
      const uint64_t above = s.chosen_above;
      __syncthreads();  // the choice is read before the next clear
      if (bin < 0) {
        found = false;
        break;
      }
      need -= above;
      prefix |= static_cast<uint32_t>(bin) << level_shift(level);
    }
    if (found) {
      ks.t_p = prefix;
      ks.mass_above_p = ks.target - need;
      ks.q_p = fixed_mass(key_value(prefix), m, mass_scale);
    } else {
      ks.mass_above_p = mass_above_k;
      ks.q_p = q_k;
    }
  }
  return ks;
}

// The last pass: visit(first, x, keep) for every tile, keep[j] saying whether token
// first + j is kept. Ties at t_k and t_p are ranked by id with a block scan per tile.
template <typename T, typename Visit>
__device__ void visit_kept(Shared& s, const RowView<T>& row, int64_t vocab, bool aligned, const KeptSet& ks,
                           Visit&& visit) {
  int64_t ties_k_before = 0, ties_p_before = 0;  // in earlier tiles
  for_each_tile(row, vocab, aligned, ks.divisor, [&](int64_t first, const float* x) {
    uint32_t key[kPerThread];
    bool tie_k[kPerThread], tie_p[kPerThread];
    uint64_t ties = 0;  // this thread's ties: at t_k in the low word, at t_p in the high word
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const bool valid = first + j < vocab;
      key[j] = order_key(x[j]);
      tie_k[j] = valid && key[j] == ks.t_k;
      tie_p[j] = valid && key[j] == ks.t_p;
      ties += static_cast<uint64_t>(tie_k[j]) + (static_cast<uint64_t>(tie_p[j]) << 32);
    }
    uint64_t ties_before = 0, tile_ties = 0;  // a tile holds at most kTile ties: no carry between words
    if (!ks.greedy) {
      ScanU64(s.temp.scan).ExclusiveSum(ties, ties_before, tile_ties);
      __syncthreads();  // temp is reused by the next tile's scan
    }
    int64_t rank_k = ties_k_before + static_cast<int64_t>(ties_before & 0xFFFFFFFFu);
    int64_t rank_p = ties_p_before + static_cast<int64_t>(ties_before >> 32);
    bool keep[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t id = first + j;
      bool kept = id == ks.greedy_id;
      if (!ks.greedy) {
        const bool top_k_keeps = key[j] > ks.t_k || (tie_k[j] && rank_k < ks.r_k);
        const bool top_p_keeps =
            !ks.top_p_on || key[j] > ks.t_p ||
            (tie_p[j] && (rank_p == 0 || ks.mass_above_p + static_cast<uint64_t>(rank_p) * ks.q_p < ks.target));
        const bool min_p_keeps = x[j] > -INFINITY && (ks.min_p <= 0.0f || expf(x[j] - ks.m) >= ks.min_p);
        kept = kept || (top_k_keeps && top_p_keeps && min_p_keeps);
      }
      keep[j] = kept && id < vocab;
      rank_k += tie_k[j];
      rank_p += tie_p[j];
    }
    ties_k_before += static_cast<int64_t>(tile_ties & 0xFFFFFFFFu);
    ties_p_before += static_cast<int64_t>(tile_ties >> 32);
    visit(first, x, keep);
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    filter_logits_kernel(const T* __restrict__ logits,  // (batch, vocab), unit stride along vocab
                         int64_t logits_stride, const uint32_t* __restrict__ allowed, int64_t allowed_stride,
                         T* __restrict__ out, int64_t out_stride, int64_t vocab, RowParams params,
                         float mass_scale) {
  __shared__ Shared s;
  const int64_t b = blockIdx.x;
  const RowView<T> row{logits + b * logits_stride, allowed != nullptr ? allowed + b * allowed_stride : nullptr};
  T* out_row = out + b * out_stride;
  const bool aligned = is_packed_aligned(row.logits);
  const bool out_aligned = is_packed_aligned(out_row);
  const KeptSet ks = find_kept_set(s, row, vocab, aligned, params, b, mass_scale);
  visit_kept(s, row, vocab, aligned, ks, [&](int64_t first, const float* x, const bool* keep) {
    float y[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) y[j] = keep[j] ? x[j] : -INFINITY;
    store_row(out_row, vocab, first, out_aligned, y);
  });
}

// sample's outputs; null pointers are not written.
struct SampleOutputs {
  int64_t* tokens;
  float* logprobs;
  float* log_mass;  // log(sum over kept of exp(x - m))
  float* filtered;  // x - m where kept, -inf elsewhere
  int64_t tokens_stride, logprobs_stride, log_mass_stride, filtered_stride;
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    sample_kernel(const T* __restrict__ logits,  // (batch, vocab), unit stride along vocab
                  int64_t logits_stride, const uint32_t* __restrict__ allowed, int64_t allowed_stride,
                  int64_t vocab, RowParams params, const int64_t* __restrict__ seeds, int64_t seeds_stride,
                  const int64_t* __restrict__ steps, int64_t steps_stride, SampleOutputs o, float mass_scale) {
  __shared__ Shared s;
  const int64_t b = blockIdx.x;
  const RowView<T> row{logits + b * logits_stride, allowed != nullptr ? allowed + b * allowed_stride : nullptr};
  const bool aligned = is_packed_aligned(row.logits);
  const KeptSet ks = find_kept_set(s, row, vocab, aligned, params, b, mass_scale);
  int64_t token = ks.greedy_id;
  uint64_t kept_mass = fixed_mass(ks.m, ks.m, mass_scale);  // a greedy row's one token
  float* filtered_row = o.filtered != nullptr ? o.filtered + b * o.filtered_stride : nullptr;
  if (!ks.greedy || filtered_row != nullptr) {
    const uint64_t seed = static_cast<uint64_t>(seeds[b * seeds_stride]);
    const uint64_t step = static_cast<uint64_t>(steps[b * steps_stride]);
    const bool filtered_aligned = filtered_row != nullptr && is_packed_aligned(filtered_row);
    BestToken best{-INFINITY, INT_MAX};
    uint64_t partial_mass = 0;
    visit_kept(s, row, vocab, aligned, ks, [&](int64_t first, const float* x, const bool* keep) {
      bool any = false;
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) any = any || keep[j];
      if (any) {
        float u[4];
        uniform4(seed, step, static_cast<uint64_t>(first) / 4, u);  // first is a multiple of 4
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          if (!keep[j]) continue;
          const BestToken candidate{x[j] - logf(-logf(u[j])), static_cast<int32_t>(first + j)};
          best = BetterToken()(candidate, best);
          if (o.logprobs != nullptr) partial_mass += fixed_mass(x[j], ks.m, mass_scale);
        }
      }
      if (filtered_row != nullptr) {
        float y[kPerThread];
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) y[j] = keep[j] ? x[j] - ks.m : -INFINITY;
        store_row(filtered_row, vocab, first, filtered_aligned, y);
      }
    });
    const BestToken winner = ReduceBest(s.temp.reduce_best).Reduce(best, BetterToken());
    __syncthreads();
    const uint64_t mass = ReduceU64(s.temp.reduce).Reduce(partial_mass, SumU64());
    if (winner.id >= 0 && winner.id < vocab) token = winner.id;  // thread 0's values are the block's
    if (o.logprobs != nullptr) kept_mass = mass;
  }
  if (threadIdx.x != 0) return;
  o.tokens[b * o.tokens_stride] = token;
  if (o.logprobs == nullptr) return;
  const float x_token = __fdiv_rn(to_float(row.logits[token]), ks.divisor);  // an allowed token
  const float log_mass = static_cast<float>(log(static_cast<double>(kept_mass) / static_cast<double>(mass_scale)));
  o.logprobs[b * o.logprobs_stride] = (x_token - ks.m) - log_mass;
  if (o.log_mass != nullptr) o.log_mass[b * o.log_mass_stride] = log_mass;
}

// 2**S for the fixed-point masses: vocab terms of at most 2**S sum below 2**62.
float mass_scale_for(int64_t vocab) {
  int bits = 0;
  while ((int64_t{1} << bits) <= vocab) ++bits;  // vocab < 2**bits
  const int shift = 62 - bits < 46 ? 62 - bits : 46;
  return std::ldexp(1.0f, shift);
}

RowParams row_params(const TensorView& temperature, const TensorView& top_k, const TensorView& top_p,
                     const TensorView& min_p) {
  return {static_cast<const float*>(temperature.data), static_cast<const int64_t*>(top_k.data),
          static_cast<const float*>(top_p.data),       static_cast<const float*>(min_p.data),
          temperature.strides[0],                      top_k.strides[0],
          top_p.strides[0],                            min_p.strides[0]};
}

const uint32_t* allowed_words(const TensorView* allowed) {
  return allowed != nullptr ? static_cast<const uint32_t*>(allowed->data) : nullptr;
}

int64_t allowed_row_stride(const TensorView* allowed) { return allowed != nullptr ? allowed->strides[0] : 0; }

template <typename T>
cudaError_t launch_filter(const TensorView& logits, const TensorView* allowed, const TensorView& out,
                          const RowParams& params, cudaStream_t stream) {
  const int64_t batch = logits.sizes[0], vocab = logits.sizes[1];
  filter_logits_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
      static_cast<const T*>(logits.data), logits.strides[0], allowed_words(allowed), allowed_row_stride(allowed),
      static_cast<T*>(out.data), out.strides[0], vocab, params, mass_scale_for(vocab));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sample(const TensorView& logits, const TensorView* allowed, const RowParams& params,
                          const TensorView& seeds, const TensorView& steps, const SampleOutputs& outputs,
                          cudaStream_t stream) {
  const int64_t batch = logits.sizes[0], vocab = logits.sizes[1];
  sample_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
      static_cast<const T*>(logits.data), logits.strides[0], allowed_words(allowed), allowed_row_stride(allowed),
      vocab, params,
      static_cast<const int64_t*>(seeds.data), seeds.strides[0], static_cast<const int64_t*>(steps.data),
      steps.strides[0], outputs, mass_scale_for(vocab));
  return cudaGetLastError();
}

bool is_float_vector(const TensorView* v, int64_t batch) {
  return v == nullptr || is_sampling_vector(*v, batch, DType::kFloat32);
}

}  // namespace

const char* check_filter_views(const TensorView& logits, const TensorView& out, const TensorView& temperature,
                               const TensorView& top_k, const TensorView& top_p, const TensorView& min_p,
                               const TensorView* allowed) {
  if (const char* error = check_sampling_logits(logits)) return error;
  if (const char* error = check_filtered_rows(logits, out)) return error;
  if (logits.sizes[0] > INT_MAX) return "batch must be < 2**31";
  if (const char* error = check_allowed(logits, allowed)) return error;
  return check_sampling_parameters(logits.sizes[0], temperature, top_k, top_p, min_p);
}

const char* check_sample_views(const TensorView& logits, const TensorView& tokens,
                               const TensorView& temperature, const TensorView& top_k,
                               const TensorView& top_p, const TensorView& min_p, const TensorView& seeds,
                               const TensorView& steps, const TensorView* allowed, const TensorView* logprobs,
                               const TensorView* log_mass, const TensorView* filtered) {
  if (const char* error = check_sampling_logits(logits)) return error;
  const int64_t batch = logits.sizes[0], vocab = logits.sizes[1];
  if (batch > INT_MAX) return "batch must be < 2**31";
  if (const char* error = check_allowed(logits, allowed)) return error;
  if (const char* error = check_sample_vectors(batch, tokens, seeds, steps)) return error;
  if (const char* error = check_sampling_parameters(batch, temperature, top_k, top_p, min_p)) return error;
  if (!is_float_vector(logprobs, batch)) return "logprobs must be float32 (batch,)";
  if (!is_float_vector(log_mass, batch)) return "log_mass must be float32 (batch,)";
  if ((log_mass != nullptr || filtered != nullptr) && logprobs == nullptr)
    return "log_mass and filtered come with logprobs";
  if (filtered != nullptr &&
      ((filtered->data == nullptr && batch > 0) || filtered->rank != 2 || filtered->dtype != DType::kFloat32 ||
       filtered->sizes[0] != batch || filtered->sizes[1] != vocab || (vocab > 1 && filtered->strides[1] != 1) ||
       (batch > 1 && filtered->strides[0] < vocab)))
    return "filtered must be float32 (batch, vocab), rows dense and apart";
  return nullptr;
}

cudaError_t filter_logits(const TensorView& logits, const TensorView& out, const TensorView& temperature,
                          const TensorView& top_k, const TensorView& top_p, const TensorView& min_p,
                          const TensorView* allowed, cudaStream_t stream) {
  if (check_filter_views(logits, out, temperature, top_k, top_p, min_p, allowed) != nullptr)
    return cudaErrorInvalidValue;
  if (logits.sizes[0] == 0) return cudaSuccess;
  const RowParams params = row_params(temperature, top_k, top_p, min_p);
  switch (logits.dtype) {
    case DType::kFloat32:
      return launch_filter<float>(logits, allowed, out, params, stream);
    case DType::kFloat16:
      return launch_filter<__half>(logits, allowed, out, params, stream);
    default:
      return launch_filter<__nv_bfloat16>(logits, allowed, out, params, stream);
  }
}

cudaError_t sample(const TensorView& logits, const TensorView& tokens, const TensorView& temperature,
                   const TensorView& top_k, const TensorView& top_p, const TensorView& min_p,
                   const TensorView& seeds, const TensorView& steps, const TensorView* allowed,
                   const TensorView* logprobs, const TensorView* log_mass, const TensorView* filtered,
                   cudaStream_t stream) {
  if (check_sample_views(logits, tokens, temperature, top_k, top_p, min_p, seeds, steps, allowed, logprobs,
                         log_mass, filtered) != nullptr)
    return cudaErrorInvalidValue;
  if (logits.sizes[0] == 0) return cudaSuccess;
  const RowParams params = row_params(temperature, top_k, top_p, min_p);
  const SampleOutputs outputs{static_cast<int64_t*>(tokens.data),
                              logprobs != nullptr ? static_cast<float*>(logprobs->data) : nullptr,
                              log_mass != nullptr ? static_cast<float*>(log_mass->data) : nullptr,
                              filtered != nullptr ? static_cast<float*>(filtered->data) : nullptr,
                              tokens.strides[0],
                              logprobs != nullptr ? logprobs->strides[0] : 0,
                              log_mass != nullptr ? log_mass->strides[0] : 0,
                              filtered != nullptr ? filtered->strides[0] : 0};
  switch (logits.dtype) {
    case DType::kFloat32:
      return launch_sample<float>(logits, allowed, params, seeds, steps, outputs, stream);
    case DType::kFloat16:
      return launch_sample<__half>(logits, allowed, params, seeds, steps, outputs, stream);
    default:
      return launch_sample<__nv_bfloat16>(logits, allowed, params, seeds, steps, outputs, stream);
  }
}

}  // namespace fmkernels::cuda
