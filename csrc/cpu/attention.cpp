// Prefill attention on CPU: flash-attention's tiling and online softmax, in fp32.
//
// Work is split into tiles of up to kTileRows query rows: a run of consecutive positions of
// one sequence times the query heads of one GQA group (so each key/value tile is read, and
// widened from 16-bit, once for the group). Tiles are handed to OpenMP threads one at a
// time, one head group after another and within a group the most expensive first; each walks its sequence's keys kTileKeys at a time (stopping at the
// causal limit), keeping a running max and sum per row, and never holds more than one
// kTileKeys x kTileRows block of scores. Per-thread scratch is allocated once per call.
//
// The per-tile code (attention_tile.inc) is compiled three times, for AVX-512, AVX2+FMA and
// the x86-64 baseline, and the widest the CPU supports is picked at run time, so the default
// build runs on any x86-64. FMKERNELS_CPU_ISA=avx2 or generic caps the choice (for tests).
#include "cpu/attention.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <vector>

#include "common/attention_shapes.h"
#include "cpu/dtype.h"
#include "cpu/isa.h"

namespace fmkernels::cpu {
namespace {

constexpr int64_t kTileRows = 64;  // query rows (positions x heads) per tile: a multiple of 16
constexpr int64_t kTileKeys = 64;  // keys per online-softmax step

// Where the tensors are, their strides in elements, and the scalar parameters.
struct AttentionProblem {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // nullptr when not wanted
  bool packed;
  // Dense: element (b, token, head, d) at b * x_batch + token * x_token + head * x_head + d.
  // Packed: x_batch is unused and token counts from the start of the packed tensor.
  int64_t q_batch, q_token, q_head;
  int64_t k_batch, k_token, k_head;
  int64_t v_batch, v_token, v_head;
  int64_t out_batch, out_token, out_head;
  int64_t lse_batch, lse_token, lse_head;
  int64_t head_dim;
  bool causal;
  float q_scale;  // scale * log2(e): the kernel works with exp2
};

// One unit of parallel work: positions [first_position, first_position + positions) of
// sequence `batch`, query heads [first_head, first_head + heads) reading KV head kv_head.
struct AttentionTile {
  int64_t batch;
  int64_t q_start, k_start;  // first token of the sequence in packed input; 0 for dense
  int64_t seqlen_q, seqlen_k;
  int64_t kv_head, first_head, heads;
  int64_t first_position, positions;
  int64_t cost;  // rows x keys visited, to schedule the largest tiles first
};

// Floats of per-thread scratch (attention_tile.inc's layout), each part 64-byte aligned.
int64_t scratch_floats(int64_t head_dim) {
  return 2 * head_dim * kTileRows + kTileKeys * kTileRows + 2 * kTileKeys * head_dim +
         3 * kTileRows;
}

// The natural log-sum-exp of a row from its max m (log2 units) and sum l of exp2(s - m).
inline float log_sum_exp(float m, float l) {
  return static_cast<float>(static_cast<double>(m) * 0.69314718055994530942 +
                            std::log(static_cast<double>(l)));
}

using TileFunction = void (*)(const AttentionProblem&, const AttentionTile&, float*, int32_t*);

}  // namespace
}  // namespace fmkernels::cpu

// The per-tile kernel, once per instruction set. Internal linkage throughout, so the
// linker never mixes code built for different targets.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FMKERNELS_X86_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma")
namespace fmkernels::cpu {
namespace {
namespace avx512 {
constexpr int kLanes = 16;
constexpr int kScoreAR = 6, kScoreNV = 4;
constexpr int kValueAR = 6, kValueNV = 4;
#include "cpu/attention_tile.inc"
}  // namespace avx512
}  // namespace
}  // namespace fmkernels::cpu
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace fmkernels::cpu {
namespace {
namespace avx2 {
constexpr int kLanes = 8;
constexpr int kScoreAR = 4, kScoreNV = 2;
constexpr int kValueAR = 4, kValueNV = 2;
#include "cpu/attention_tile.inc"
}  // namespace avx2
}  // namespace
}  // namespace fmkernels::cpu
#pragma GCC pop_options
#endif

namespace fmkernels::cpu {
namespace {
namespace generic {
constexpr int kLanes = 4;
constexpr int kScoreAR = 4, kScoreNV = 2;
constexpr int kValueAR = 4, kValueNV = 2;
#include "cpu/attention_tile.inc"
}  // namespace generic

template <typename T>
TileFunction tile_function(Isa isa) {
#ifdef FMKERNELS_X86_DISPATCH
  if (isa == Isa::kAvx512) return &avx512::attend_tile<T>;
  if (isa == Isa::kAvx2) return &avx2::attend_tile<T>;
#endif
  (void)isa;
  return &generic::attend_tile<T>;
}

TileFunction pick_tile_function(DType dtype) {
  const Isa isa = cpu_isa();
  switch (dtype) {
    case DType::kFloat16:
      return tile_function<Float16>(isa);
    case DType::kBFloat16:
      return tile_function<BFloat16>(isa);
    default:
      return tile_function<float>(isa);
  }
}

int32_t read_int32(const TensorView& view, int64_t i) {
  return static_cast<const int32_t*>(view.data)[i * view.strides[0]];
}

// Every sequence's rows lie inside the packed tensors: 0 <= cu[b] <= cu[b+1] <= total.
bool cu_seqlens_in_bounds(const TensorView& cu_seqlens, int64_t total) {
  int64_t previous = 0;
  for (int64_t i = 0; i < cu_seqlens.sizes[0]; ++i) {
    const int64_t bound = read_int32(cu_seqlens, i);
    if (bound < previous || bound > total) return false;
    previous = bound;
  }
  return true;
}

AttentionProblem make_problem(const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView& out, const TensorView* lse, bool packed,
                              bool causal, float scale) {
  AttentionProblem p{};
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  p.lse = lse != nullptr ? static_cast<float*>(lse->data) : nullptr;
  p.packed = packed;
  const int t = packed ? 0 : 1;  // the token dimension
  p.q_batch = packed ? 0 : q.strides[0];
  p.k_batch = packed ? 0 : k.strides[0];
  p.v_batch = packed ? 0 : v.strides[0];
  p.out_batch = packed ? 0 : out.strides[0];
  p.q_token = q.strides[t], p.q_head = q.strides[t + 1];
  p.k_token = k.strides[t], p.k_head = k.strides[t + 1];
  p.v_token = v.strides[t], p.v_head = v.strides[t + 1];
  p.out_token = out.strides[t], p.out_head = out.strides[t + 1];
  if (lse != nullptr) {
    // Dense (B, Hq, Sq); packed (Hq, total_q).
    p.lse_batch = packed ? 0 : lse->strides[0];
    p.lse_head = packed ? lse->strides[0] : lse->strides[1];
    p.lse_token = packed ? lse->strides[1] : lse->strides[2];
  }
  p.head_dim = q.sizes[t + 2];
  p.causal = causal;
  p.q_scale = scale * 1.44269504088896340736f;
  return p;
}

// Cuts every sequence x GQA group into tiles.
std::vector<AttentionTile> make_tiles(const TensorView& q, const TensorView& k,
                                      const TensorView* cu_seqlens_q,
                                      const TensorView* cu_seqlens_k, bool causal) {
  const bool packed = cu_seqlens_q != nullptr;
  const int t = packed ? 0 : 1;
  const int64_t batch = packed ? cu_seqlens_q->sizes[0] - 1 : q.sizes[0];
  const int64_t q_heads = q.sizes[t + 1], kv_heads = k.sizes[t + 1];
  const int64_t group = q_heads / kv_heads;
  std::vector<AttentionTile> tiles;
  if (group == 0) return tiles;  // no query heads
  const int64_t heads_per_tile = std::min(group, kTileRows);
  const int64_t positions_per_tile = std::max<int64_t>(1, kTileRows / heads_per_tile);
  for (int64_t b = 0; b < batch; ++b) {
    AttentionTile tile{};
    tile.batch = b;
    if (packed) {
      tile.q_start = read_int32(*cu_seqlens_q, b);
      tile.k_start = read_int32(*cu_seqlens_k, b);
      tile.seqlen_q = read_int32(*cu_seqlens_q, b + 1) - tile.q_start;
      tile.seqlen_k = read_int32(*cu_seqlens_k, b + 1) - tile.k_start;
    } else {
      tile.seqlen_q = q.sizes[1];
      tile.seqlen_k = k.sizes[1];
    }
    for (int64_t kv_head = 0; kv_head < kv_heads; ++kv_head) {
      for (int64_t h0 = 0; h0 < group; h0 += heads_per_tile) {
        for (int64_t p0 = 0; p0 < tile.seqlen_q; p0 += positions_per_tile) {
          tile.kv_head = kv_head;
          tile.first_head = kv_head * group + h0;
          tile.heads = std::min(heads_per_tile, group - h0);
          tile.first_position = p0;
          tile.positions = std::min(positions_per_tile, tile.seqlen_q - p0);
          const int64_t last_visible = p0 + tile.positions - 1 + tile.seqlen_k - tile.seqlen_q;
          const int64_t keys =
              causal ? std::clamp<int64_t>(last_visible + 1, 0, tile.seqlen_k) : tile.seqlen_k;
          tile.cost = tile.heads * tile.positions * (keys + kTileKeys);
          tiles.push_back(tile);
        }
      }
    }
  }
  // Within each (sequence, head group), the most expensive (causal: last) positions first.
  // Groups stay in order, so both threads work on one KV head at a time and share its keys
  // and values in the cache (measured ~8% less CPU time than one global largest-first order).
  auto group_begin = tiles.begin();
  while (group_begin != tiles.end()) {
    auto group_end = group_begin;
    while (group_end != tiles.end() && group_end->batch == group_begin->batch &&
           group_end->first_head == group_begin->first_head)
      ++group_end;
    std::stable_sort(group_begin, group_end, [](const AttentionTile& a, const AttentionTile& b) {
      return a.cost > b.cost;
    });
    group_begin = group_end;
  }
  return tiles;
}

}  // namespace

const char* attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const TensorView* lse,
                      const TensorView* cu_seqlens_q, const TensorView* cu_seqlens_k,
                      bool causal, float scale, int num_threads) {
  if (const char* error = check_attention_shapes(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k))
    return error;
  const bool packed = cu_seqlens_q != nullptr;
  if (packed) {
    if (!cu_seqlens_in_bounds(*cu_seqlens_q, q.sizes[0]))
      return "attention: cu_seqlens_q must be non-decreasing and within q's tokens";
    if (!cu_seqlens_in_bounds(*cu_seqlens_k, k.sizes[0]))
      return "attention: cu_seqlens_k must be non-decreasing and within k's tokens";
  }
  // Key and query indices are compared as int32 inside the kernel.
  if (q.sizes[packed ? 0 : 1] > INT32_MAX || k.sizes[packed ? 0 : 1] > INT32_MAX)
    return "attention: sequences must be shorter than 2^31 tokens";

  const AttentionProblem problem = make_problem(q, k, v, out, lse, packed, causal, scale);
  std::vector<AttentionTile> tiles;
  std::vector<float> scratch;
  std::vector<int32_t> limits;
  const int threads = std::max(1, num_threads);
  const int64_t per_thread = scratch_floats(problem.head_dim);
  constexpr int64_t kAlignFloats = 16;  // 64 bytes
  try {
    tiles = make_tiles(q, k, cu_seqlens_q, cu_seqlens_k, causal);
    if (tiles.empty()) return nullptr;
    scratch.resize(static_cast<size_t>(threads * per_thread + kAlignFloats));
    limits.resize(static_cast<size_t>(threads * kTileRows + kAlignFloats));
  } catch (const std::bad_alloc&) {
    return "attention: out of memory for the tile list or per-thread scratch";
  }
  // Both hold 4-byte elements: step to the first 64-byte boundary.
  float* aligned = scratch.data();
  while (reinterpret_cast<uintptr_t>(aligned) % 64 != 0) ++aligned;
  int32_t* aligned_limits = limits.data();
  while (reinterpret_cast<uintptr_t>(aligned_limits) % 64 != 0) ++aligned_limits;
  const TileFunction attend_tile = pick_tile_function(q.dtype);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int thread = omp_get_thread_num();
#else
    const int thread = 0;
#endif
    float* thread_scratch = aligned + thread * per_thread;
    int32_t* thread_limits = aligned_limits + thread * kTileRows;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_tiles; ++i) attend_tile(problem, tiles[i], thread_scratch, thread_limits);
  }
  return nullptr;
}

}  // namespace fmkernels::cpu
