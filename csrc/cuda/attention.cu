// Prefill attention on tensor cores (FlashAttention-2's schedule, mma.sync m16n8k16).
//
// One CTA computes a tile of kBlockM query rows of one (batch, q head); each of its warps
// owns 16 or 32 of them (the Schedule) and keeps their Q fragments in registers where they
// fit. Keys and values stream through shared memory kBlockN rows at a time, double-buffered
// with cp.async so the next tile loads while the current one computes. Per tile and 16-row
// block, a warp computes S = Q K^T (16 x kBlockN, fp32) in
// registers, updates its rows' running max and sum (softmax in base 2, the scale folded into
// log2(e)), rounds P to the input type in registers and feeds it straight back as the A
// operand of O += P V. O / l and the log-sum-exp are written once at the end.
//
// Shared memory rows of head_dim elements are split into 16-byte chunks stored at
// chunk ^ (row % 8): the eight row addresses an ldmatrix phase reads then fall in eight
// different bank groups, and so do the eight rows a cp.async or output store touches.
#include "cuda/attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>

namespace fmkernels::cuda {
namespace {

constexpr int kBlockM = 128;  // query rows per CTA, in every variant
constexpr int kMaxGridYZ = 65535;

// One schedule of the kernel: how the CTA's 128 query rows are split between warps, how
// many keys a shared-memory tile holds, and how the K and V copies are pipelined.
//   kWarps x kRowBlocks x 16 = kBlockM: each warp owns kRowBlocks blocks of 16 rows and
//     issues every K / V fragment it loads against all of them;
//   kSplitCopies: K and V tiles travel in separate cp.async groups, so S = Q K^T starts
//     once K has landed while V still loads, and the next K loads during P V; otherwise
//     one group carries both and the next tile's pair loads during the whole tile;
//   kMinBlocksPerSm: the occupancy __launch_bounds__ asks registers to allow.
template <int kWarps_, int kRowBlocks_, int kBlockN_, bool kSplitCopies_, int kMinBlocksPerSm_>
struct Schedule {
  static constexpr int kWarps = kWarps_;
  static constexpr int kRowBlocks = kRowBlocks_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr bool kSplitCopies = kSplitCopies_;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static constexpr int kThreads = kWarps * 32;
  static_assert(kWarps * kRowBlocks * 16 == kBlockM, "the warps cover the query tile");
};

struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;                     // nullptr: not returned
  const int32_t* cu_seqlens_q;    // nullptr: dense
  const int32_t* cu_seqlens_k;
  // Element strides; the batch strides are 0 for packed input, whose sequences start at
  // their cu_seqlens rows instead.
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int64_t lse_batch_stride, lse_head_stride, lse_row_stride;
  int seqlen_q, seqlen_k;  // dense
  int total_q, total_k;    // packed: the tensors' token counts, which bound cu_seqlens
  int group;               // q heads per kv head
  float scale_log2;        // scale * log2(e)
  bool causal;
};

// ---------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes global -> shared; with valid false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void copy_16_async(uint32_t destination, const void* source, bool valid) {
  const int source_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(source),
               "r"(source_bytes)
               : "memory");
}

__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's most recent copy groups are in flight.
template <int kPending>
__device__ __forceinline__ void wait_for_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void load_matrix_x4(uint32_t (&fragment)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(address));
}

__device__ __forceinline__ void load_matrix_x4_transposed(uint32_t (&fragment)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(address));
}

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// accumulator (16 x 8 fp32) += a (16 x 16, row-major) * b (16 x 8, column-major).
template <typename Element>
struct TensorCore;

template <>
struct TensorCore<__half> {
  __device__ __forceinline__ static void mma(float (&accumulator)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(accumulator[0]), "+f"(accumulator[1]), "+f"(accumulator[2]), "+f"(accumulator[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Two floats as one register of two halves, the first in the low 16 bits.
  __device__ __forceinline__ static uint32_t pack(float low, float high) {
    const __half2 pair = __floats2half2_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&pair);
  }
};

template <>
struct TensorCore<__nv_bfloat16> {
  __device__ __forceinline__ static void mma(float (&accumulator)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(accumulator[0]), "+f"(accumulator[1]), "+f"(accumulator[2]), "+f"(accumulator[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float low, float high) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&pair);
  }
};

// ---------------------------------------------------------------------------------------
// Shared-memory tiles
// ---------------------------------------------------------------------------------------

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of kHeadDim columns.
template <int kHeadDim>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

// Starts copying rows [0, kRows) of a (rows, kHeadDim) global tile into shared memory; rows
// at or past rows_valid are zero-filled without being read. Consecutive threads copy
// consecutive 16-byte chunks of a row, so each warp reads whole rows.
template <typename Element, int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void load_tile_async(Element* tile, const Element* rows, int64_t row_stride,
                                                int rows_valid) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int index = static_cast<int>(threadIdx.x) + i * kThreads;
    const int row = index / kChunksPerRow, chunk = index % kChunksPerRow;
    const bool valid = row < rows_valid;
    const Element* source = valid ? rows + row * row_stride + chunk * 8 : rows;
    copy_16_async(shared_address(tile + swizzled<kHeadDim>(row, chunk)), source, valid);
  }
}

// ---------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------

// Shared memory: the Q tile (kBlockM x kHeadDim, reused to stage the output), then two
// stages of a K tile and a V tile (kBlockN x kHeadDim each).
template <int kHeadDim, class Sched>
constexpr int shared_bytes() {
  return (kBlockM + 2 * 2 * Sched::kBlockN) * kHeadDim * 2;
}

// Grid: (q_heads, batch, query tiles), the query tiles in reverse so that the longest causal
// tiles start first.
template <typename Element, int kHeadDim, class Sched>
__global__ void __launch_bounds__(Sched::kThreads, Sched::kMinBlocksPerSm)
    attention_kernel(const AttentionParams p) {
  using Core = TensorCore<Element>;
  constexpr int kThreads = Sched::kThreads;
  constexpr int kBlockN = Sched::kBlockN;
  constexpr int kRowBlocks = Sched::kRowBlocks;  // 16-row blocks per warp
  constexpr int kWarpRows = 16 * kRowBlocks;
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kKeySteps = kHeadDim / 16;    // k-steps of S = Q K^T
  constexpr int kKeyBlocks = kBlockN / 8;     // 8-key column blocks of S
  constexpr int kValueSteps = kBlockN / 16;   // k-steps of O = P V
  constexpr int kOutBlocks = kHeadDim / 8;    // 8-column blocks of O
  // A warp keeps its Q fragments in registers while they take at most 32 per thread (16
  // rows of head_dim 128, 32 rows of 64); past that it reads them from the Q tile again at
  // every k-step, as the registers go to the accumulators.
  constexpr bool kQInRegisters = kRowBlocks * kHeadDim <= 128;

  extern __shared__ uint4 shared_memory[];
  Element* const q_tile = reinterpret_cast<Element*>(shared_memory);
  Element* const kv_tiles = q_tile + kBlockM * kHeadDim;  // [stage][K, V][kBlockN][kHeadDim]
  auto k_tile = [&](int stage) { return kv_tiles + (2 * stage) * kBlockN * kHeadDim; };
  auto v_tile = [&](int stage) { return kv_tiles + (2 * stage + 1) * kBlockN * kHeadDim; };

  const int head = blockIdx.x, batch = blockIdx.y;
  const int query_tile = static_cast<int>(gridDim.z - 1 - blockIdx.z);

  int64_t q_start = 0, k_start = 0;
  int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
  if (p.cu_seqlens_q != nullptr) {
    const int q_begin = min(max(p.cu_seqlens_q[batch], 0), p.total_q);
    const int q_end = min(max(p.cu_seqlens_q[batch + 1], q_begin), p.total_q);
    const int k_begin = min(max(p.cu_seqlens_k[batch], 0), p.total_k);
    const int k_end = min(max(p.cu_seqlens_k[batch + 1], k_begin), p.total_k);
    q_start = q_begin;
    k_start = k_begin;
    seqlen_q = q_end - q_begin;
    seqlen_k = k_end - k_begin;
  }
  const int m0 = query_tile * kBlockM;
  if (m0 >= seqlen_q) return;

  // Query i sees key j when j <= i + diagonal (causal) and j < seqlen_k.
  const int diagonal = seqlen_k - seqlen_q;
  int key_end = seqlen_k;  // keys past key_end are hidden from every row of the tile
  int unmasked_tiles = seqlen_k / kBlockN;  // key tiles every row sees in full
  if (p.causal) {
    const int last_row = min(m0 + kBlockM, seqlen_q) - 1;
    key_end = min(max(last_row + diagonal + 1, 0), seqlen_k);
    unmasked_tiles = min(max(m0 + diagonal + 1, 0), seqlen_k) / kBlockN;
  }
  const int key_tiles = (key_end + kBlockN - 1) / kBlockN;

  const int kv_head = head / p.group;
  const Element* const q = static_cast<const Element*>(p.q) + batch * p.q_batch_stride +
                           (q_start + m0) * p.q_row_stride + head * p.q_head_stride;
  const Element* const k = static_cast<const Element*>(p.k) + batch * p.k_batch_stride +
                           k_start * p.k_row_stride + kv_head * p.k_head_stride;
  const Element* const v = static_cast<const Element*>(p.v) + batch * p.v_batch_stride +
                           k_start * p.v_row_stride + kv_head * p.v_head_stride;
  // Key tile `tile` into stage tile % 2.
  auto load_keys = [&](int tile) {
    const int first = tile * kBlockN;
    load_tile_async<Element, kHeadDim, kBlockN, kThreads>(k_tile(tile & 1), k + first * p.k_row_stride,
                                                          p.k_row_stride, seqlen_k - first);
  };
  auto load_values = [&](int tile) {
    const int first = tile * kBlockN;
    load_tile_async<Element, kHeadDim, kBlockN, kThreads>(v_tile(tile & 1), v + first * p.v_row_stride,
                                                          p.v_row_stride, seqlen_k - first);
  };

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int quad_row = lane / 4, quad_col = lane % 4;  // (g, t) of the mma fragment layouts
  const int warp_row = warp * kWarpRows;               // first tile row of this warp

  // Row block b of this thread's accumulators holds rows warp_row + 16 b + quad_row (index 0)
  // and + 8 (index 1).
  float o[kRowBlocks][kOutBlocks][4];
  float row_max[kRowBlocks][2], row_sum[kRowBlocks][2];  // max: base-2 scaled scores
#pragma unroll
  for (int b = 0; b < kRowBlocks; ++b) {
#pragma unroll
    for (int d = 0; d < kOutBlocks; ++d) o[b][d][0] = o[b][d][1] = o[b][d][2] = o[b][d][3] = 0.0f;
    row_max[b][0] = row_max[b][1] = -INFINITY;
    row_sum[b][0] = row_sum[b][1] = 0.0f;  // this thread's part; the quad's sum is the row's
  }
  // Q's A fragments: every k-step's when kept in registers, else the current k-step's.
  uint32_t q_fragments[kQInRegisters ? kKeySteps : 1][kRowBlocks][4];
  // Matrices 0-3 of the A fragment: rows 0-7 / 8-15 of chunk 2 step, then of chunk 2 step + 1.
  auto load_q_fragment = [&](uint32_t(&fragment)[4], int block, int step) {
    load_matrix_x4(fragment, shared_address(q_tile + swizzled<kHeadDim>(warp_row + 16 * block + lane % 16,
                                                                        2 * step + lane / 16)));
  };

  // Copy groups. Joint: (Q, K0, V0), then (K, V) of tile t + 1 issued at the start of tile t.
  // Split: (Q, K0), (V0), then K of tile t + 1 at the start of tile t and V of tile t + 1 once
  // every warp has V of tile t; a group is committed at each of those points even when there
  // is no next tile, so that the groups in flight are always the two named.
  if (key_tiles > 0) {
    load_tile_async<Element, kHeadDim, kBlockM, kThreads>(q_tile, q, p.q_row_stride, seqlen_q - m0);
    load_keys(0);
    if constexpr (Sched::kSplitCopies) {
      commit_copies();
      load_values(0);
      commit_copies();
      wait_for_copies<1>();
    } else {
      load_values(0);
      commit_copies();
      wait_for_copies<0>();
    }
    __syncthreads();
    if constexpr (kQInRegisters) {
#pragma unroll
      for (int s = 0; s < kKeySteps; ++s)
#pragma unroll
        for (int b = 0; b < kRowBlocks; ++b) load_q_fragment(q_fragments[s][b], b, s);
    }
  }

  for (int tile = 0; tile < key_tiles; ++tile) {
    const bool has_next = tile + 1 < key_tiles;
    if (tile > 0) {
      // This tile's K (joint: and V) has landed; split copies leave V in flight.
      wait_for_copies<Sched::kSplitCopies ? 1 : 0>();
      // It is in shared memory for every warp, and every warp is done with the stage the
      // next copies overwrite.
      __syncthreads();
    }
    if (has_next) {
      load_keys(tile + 1);
      if constexpr (!Sched::kSplitCopies) load_values(tile + 1);
    }
    commit_copies();
    const Element* const keys = k_tile(tile & 1);
    const Element* const values = v_tile(tile & 1);

    // S = Q K^T, 16 x kBlockN per row block. One ldmatrix.x4 gives the B fragments of key
    // blocks 2j and 2j + 1 for k-step `step`: keys 16j + 0-7 (chunks 2 step, 2 step + 1),
    // then keys 16j + 8-15; each serves every row block of the warp.
    float s[kRowBlocks][kKeyBlocks][4];
#pragma unroll
    for (int b = 0; b < kRowBlocks; ++b)
#pragma unroll
      for (int n = 0; n < kKeyBlocks; ++n) s[b][n][0] = s[b][n][1] = s[b][n][2] = s[b][n][3] = 0.0f;
#pragma unroll
    for (int step = 0; step < kKeySteps; ++step) {
      uint32_t(&a)[kRowBlocks][4] = q_fragments[kQInRegisters ? step : 0];
      if constexpr (!kQInRegisters) {
#pragma unroll
        for (int b = 0; b < kRowBlocks; ++b) load_q_fragment(a[b], b, step);
      }
#pragma unroll
      for (int j = 0; j < kKeyBlocks / 2; ++j) {
        uint32_t key_fragment[4];
        load_matrix_x4(key_fragment, shared_address(keys + swizzled<kHeadDim>(16 * j + lane % 8 + (lane / 16) * 8,
                                                                              2 * step + (lane / 8) % 2)));
#pragma unroll
        for (int b = 0; b < kRowBlocks; ++b) {
          Core::mma(s[b][2 * j], a[b], key_fragment[0], key_fragment[1]);
          Core::mma(s[b][2 * j + 1], a[b], key_fragment[2], key_fragment[3]);
        }
      }
    }

    // Scale into base 2; hide keys past seqlen_k and, when causal, past each row's diagonal.
    const bool masked = tile >= unmasked_tiles;
#pragma unroll
    for (int b = 0; b < kRowBlocks; ++b) {
#pragma unroll
      for (int n = 0; n < kKeyBlocks; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[b][n][e] *= p.scale_log2;
          if (masked) {
            const int key = tile * kBlockN + n * 8 + 2 * quad_col + (e & 1);
            const int row = m0 + warp_row + 16 * b + quad_row + 8 * (e >> 1);
            if (key >= seqlen_k || (p.causal && key > row + diagonal)) s[b][n][e] = -INFINITY;
          }
        }
      }
    }

    // Online softmax per row; the four threads of a quad hold one row's columns.
#pragma unroll
    for (int b = 0; b < kRowBlocks; ++b) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tile_max = row_max[b][r];
#pragma unroll
        for (int n = 0; n < kKeyBlocks; ++n) tile_max = fmaxf(tile_max, fmaxf(s[b][n][2 * r], s[b][n][2 * r + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        // A row that has seen no key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0.
        const float shift = tile_max == -INFINITY ? 0.0f : tile_max;
        const float correction = exp2_approx(row_max[b][r] - shift);
        row_max[b][r] = tile_max;
        row_sum[b][r] *= correction;
#pragma unroll
        for (int d = 0; d < kOutBlocks; ++d) {
          o[b][d][2 * r] *= correction;
          o[b][d][2 * r + 1] *= correction;
        }
#pragma unroll
        for (int n = 0; n < kKeyBlocks; ++n) {
          s[b][n][2 * r] = exp2_approx(s[b][n][2 * r] - shift);
          s[b][n][2 * r + 1] = exp2_approx(s[b][n][2 * r + 1] - shift);
          row_sum[b][r] += s[b][n][2 * r] + s[b][n][2 * r + 1];
        }
      }
    }

    if constexpr (Sched::kSplitCopies) {
      // This tile's V has landed (the next K may still be in flight), for every warp; every
      // warp is done with the V stage the next copies overwrite.
      wait_for_copies<1>();
      __syncthreads();
      if (has_next) load_values(tile + 1);
      commit_copies();
    }

    // O += P V. P's A fragment for k-step j is S's accumulators of key blocks 2j and 2j + 1,
    // rounded to the input type. One ldmatrix.x4.trans gives the B fragments of output
    // blocks 2c and 2c + 1: keys 16j + 0-7 and 16j + 8-15 of chunk 2c, then of chunk 2c + 1.
#pragma unroll
    for (int j = 0; j < kValueSteps; ++j) {
      uint32_t a[kRowBlocks][4];
#pragma unroll
      for (int b = 0; b < kRowBlocks; ++b) {
        a[b][0] = Core::pack(s[b][2 * j][0], s[b][2 * j][1]);
        a[b][1] = Core::pack(s[b][2 * j][2], s[b][2 * j][3]);
        a[b][2] = Core::pack(s[b][2 * j + 1][0], s[b][2 * j + 1][1]);
        a[b][3] = Core::pack(s[b][2 * j + 1][2], s[b][2 * j + 1][3]);
      }
#pragma unroll
      for (int c = 0; c < kOutBlocks / 2; ++c) {
        uint32_t value_fragment[4];
        load_matrix_x4_transposed(
            value_fragment, shared_address(values + swizzled<kHeadDim>(16 * j + lane % 8 + ((lane / 8) % 2) * 8,
                                                                       2 * c + lane / 16)));
#pragma unroll
        for (int b = 0; b < kRowBlocks; ++b) {
          Core::mma(o[b][2 * c], a[b], value_fragment[0], value_fragment[1]);
          Core::mma(o[b][2 * c + 1], a[b], value_fragment[2], value_fragment[3]);
        }
      }
    }
  }

  // O / l through this warp's own rows of the Q tile (no other warp reads or writes them),
  // then out in 16-byte stores. A row that saw no key has l = 0: its output is 0 and its
  // lse -inf.
  float inverse_sum[kRowBlocks][2], total_sum[kRowBlocks][2];
#pragma unroll
  for (int b = 0; b < kRowBlocks; ++b) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[b][r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      total_sum[b][r] = sum;
      inverse_sum[b][r] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
  }
  __syncwarp();
#pragma unroll
  for (int b = 0; b < kRowBlocks; ++b) {
#pragma unroll
    for (int d = 0; d < kOutBlocks; ++d) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp_row + 16 * b + quad_row + 8 * r;
        *reinterpret_cast<uint32_t*>(q_tile + swizzled<kHeadDim>(row, d) + 2 * quad_col) =
            Core::pack(o[b][d][2 * r] * inverse_sum[b][r], o[b][d][2 * r + 1] * inverse_sum[b][r]);
      }
    }
  }
  __syncwarp();
  Element* const out = static_cast<Element*>(p.out) + batch * p.out_batch_stride +
                       (q_start + m0) * p.out_row_stride + head * p.out_head_stride;
#pragma unroll
  for (int i = 0; i < kWarpRows * kChunksPerRow / 32; ++i) {
    const int index = lane + 32 * i;
    const int row = warp_row + index / kChunksPerRow, chunk = index % kChunksPerRow;
    if (m0 + row < seqlen_q)
      *reinterpret_cast<uint4*>(out + row * p.out_row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(q_tile + swizzled<kHeadDim>(row, chunk));
  }
  if (p.lse != nullptr && quad_col == 0) {
    float* const lse = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride +
                       q_start * p.lse_row_stride;
#pragma unroll
    for (int b = 0; b < kRowBlocks; ++b) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = m0 + warp_row + 16 * b + quad_row + 8 * r;
        if (row < seqlen_q)
          lse[row * p.lse_row_stride] = total_sum[b][r] > 0.0f
                                            ? row_max[b][r] * 0.69314718055994531f + logf(total_sum[b][r])
                                            : -INFINITY;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

bool rows_aligned(const TensorView& view) {
  if (reinterpret_cast<uintptr_t>(view.data) % 16 != 0) return false;
  for (int d = 0; d + 1 < view.rank; ++d)
    if (view.sizes[d] > 1 && view.strides[d] % 8 != 0) return false;
  return true;
}

template <typename Element, int kHeadDim, class Sched>
cudaError_t launch(const AttentionParams& params, dim3 grid, cudaStream_t stream) {
  constexpr int bytes = shared_bytes<kHeadDim, Sched>();
  const cudaError_t status = cudaFuncSetAttribute(attention_kernel<Element, kHeadDim, Sched>,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (status != cudaSuccess) return status;
  attention_kernel<Element, kHeadDim, Sched><<<grid, Sched::kThreads, bytes, stream>>>(params);
  return cudaGetLastError();
}

// The schedules by variant number (see attention.cuh).
template <typename Element, int kHeadDim>
cudaError_t launch_variant(int variant, const AttentionParams& params, dim3 grid, cudaStream_t stream) {
  switch (variant) {
    case 0:
      return launch<Element, kHeadDim, Schedule<8, 1, 64, false, 1>>(params, grid, stream);
    case 1:
      return launch<Element, kHeadDim, Schedule<8, 1, 64, true, kHeadDim == 64 ? 2 : 1>>(params, grid, stream);
    case 2:
      return launch<Element, kHeadDim, Schedule<4, 2, 64, true, 2>>(params, grid, stream);
    case 3:
      return launch<Element, kHeadDim, Schedule<4, 2, 32, true, 2>>(params, grid, stream);
    case 4:
      return launch<Element, kHeadDim, Schedule<8, 1, 128, true, 1>>(params, grid, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

const char* attention_unsupported(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, const TensorView* cu_seqlens_q,
                                  const TensorView* cu_seqlens_k) {
  const int64_t head_dim = q.sizes[q.rank - 1];
  if (q.dtype != DType::kFloat16 && q.dtype != DType::kBFloat16)
    return "attention (cuda): runs float16 and bfloat16 only";
  if (head_dim != 64 && head_dim != 128) return "attention (cuda): runs head_dim 64 or 128 only";
  if (!rows_aligned(q) || !rows_aligned(k) || !rows_aligned(v) || !rows_aligned(out))
    return "attention (cuda): q, k, v and out need 16-byte aligned data pointers and strides";
  const bool packed = cu_seqlens_q != nullptr;
  if (packed != (cu_seqlens_k != nullptr))
    return "attention (cuda): packed input needs both cu_seqlens_q and cu_seqlens_k";
  if (packed && ((cu_seqlens_q->sizes[0] > 1 && cu_seqlens_q->strides[0] != 1) ||
                 (cu_seqlens_k->sizes[0] > 1 && cu_seqlens_k->strides[0] != 1)))
    return "attention (cuda): cu_seqlens_q and cu_seqlens_k must be contiguous";
  const int64_t batch = packed ? cu_seqlens_q->sizes[0] - 1 : q.sizes[0];
  if (batch > kMaxGridYZ) return "attention (cuda): batch must be at most 65535";
  if (q.sizes[q.rank - 2] > INT_MAX) return "attention (cuda): too many q heads";
  const int64_t tokens_q = q.sizes[packed ? 0 : 1], tokens_k = k.sizes[packed ? 0 : 1];
  if (tokens_q > INT_MAX - kBlockM || tokens_k > INT_MAX - kBlockM)
    return "attention (cuda): sequences must be shorter than 2^31 - 128 tokens";
  if (!packed && (tokens_q + kBlockM - 1) / kBlockM > kMaxGridYZ)
    return "attention (cuda): seqlen_q must be at most 65535 * 128";
  return nullptr;
}

cudaError_t attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const TensorView* lse,
                      const TensorView* cu_seqlens_q, const TensorView* cu_seqlens_k,
                      int64_t max_seqlen_q, bool causal, float scale, int variant, cudaStream_t stream) {
  if (attention_unsupported(q, k, v, out, cu_seqlens_q, cu_seqlens_k) != nullptr || variant < 0 ||
      variant >= kAttentionVariants)
    return cudaErrorInvalidValue;
  const bool packed = cu_seqlens_q != nullptr;
  AttentionParams params{};
  params.q = q.data;
  params.k = k.data;
  params.v = v.data;
  params.out = out.data;
  params.lse = lse != nullptr ? static_cast<float*>(lse->data) : nullptr;
  params.cu_seqlens_q = packed ? static_cast<const int32_t*>(cu_seqlens_q->data) : nullptr;
  params.cu_seqlens_k = packed ? static_cast<const int32_t*>(cu_seqlens_k->data) : nullptr;
  // Dense (B, S, H, D) and packed (total, H, D): batch, row and head strides.
  const int first = packed ? 0 : 1;
  auto strides = [&](const TensorView& view, int64_t& batch_stride, int64_t& row_stride,
                     int64_t& head_stride) {
    batch_stride = packed ? 0 : view.strides[0];
    row_stride = view.strides[first];
    head_stride = view.strides[first + 1];
  };
  strides(q, params.q_batch_stride, params.q_row_stride, params.q_head_stride);
  strides(k, params.k_batch_stride, params.k_row_stride, params.k_head_stride);
  strides(v, params.v_batch_stride, params.v_row_stride, params.v_head_stride);
  strides(out, params.out_batch_stride, params.out_row_stride, params.out_head_stride);
  if (lse != nullptr) {
    // Dense (B, Hq, Sq); packed (Hq, total_q).
    params.lse_batch_stride = packed ? 0 : lse->strides[0];
    params.lse_head_stride = lse->strides[packed ? 0 : 1];
    params.lse_row_stride = lse->strides[packed ? 1 : 2];
  }
  const int64_t batch = packed ? cu_seqlens_q->sizes[0] - 1 : q.sizes[0];
  const int64_t q_heads = q.sizes[first + 1];
  if (packed) {
    params.total_q = static_cast<int>(q.sizes[0]);
    params.total_k = static_cast<int>(k.sizes[0]);
    max_seqlen_q = max_seqlen_q < 0 ? 0 : (max_seqlen_q > q.sizes[0] ? q.sizes[0] : max_seqlen_q);
  } else {
    params.seqlen_q = static_cast<int>(q.sizes[1]);
    params.seqlen_k = static_cast<int>(k.sizes[1]);
    max_seqlen_q = q.sizes[1];
  }
  params.group = static_cast<int>(q_heads / k.sizes[first + 1]);
  params.scale_log2 = static_cast<float>(static_cast<double>(scale) * 1.4426950408889634);
  params.causal = causal;

  const int64_t query_tiles = (max_seqlen_q + kBlockM - 1) / kBlockM;
  if (batch == 0 || q_heads == 0 || query_tiles == 0) return cudaSuccess;
  if (query_tiles > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(q_heads), static_cast<unsigned>(batch),
                  static_cast<unsigned>(query_tiles));
  const int64_t head_dim = q.sizes[first + 2];
  if (q.dtype == DType::kFloat16)
    return head_dim == 64 ? launch_variant<__half, 64>(variant, params, grid, stream)
                          : launch_variant<__half, 128>(variant, params, grid, stream);
  return head_dim == 64 ? launch_variant<__nv_bfloat16, 64>(variant, params, grid, stream)
                        : launch_variant<__nv_bfloat16, 128>(variant, params, grid, stream);
}

}  // namespace fmkernels::cuda
