// Prefill attention on tensor cores (FlashAttention-2's schedule, mma.sync m16n8k16).
//
// One CTA computes a tile of kBlockM query rows of one (batch, q head); each of its kWarps
// warps owns 16 rows and keeps their Q fragments in registers. Keys and values stream through
// shared memory kBlockN rows at a time, double-buffered with cp.async so the next tile loads
// while the current one computes. Per tile, a warp computes S = Q K^T (16 x kBlockN, fp32) in
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

constexpr int kBlockM = 128;  // query rows per CTA
constexpr int kBlockN = 64;   // keys per shared-memory tile
constexpr int kWarps = kBlockM / 16;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxGridYZ = 65535;

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

__device__ __forceinline__ void wait_for_copies() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

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
template <typename Element, int kHeadDim, int kRows>
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
template <int kHeadDim>
constexpr int shared_bytes() {
  return (kBlockM + 2 * 2 * kBlockN) * kHeadDim * 2;
}

// Grid: (q_heads, batch, query tiles), the query tiles in reverse so that the longest causal
// tiles start first.
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 1) attention_kernel(const AttentionParams p) {
  using Core = TensorCore<Element>;
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kKeySteps = kHeadDim / 16;    // k-steps of S = Q K^T
  constexpr int kKeyBlocks = kBlockN / 8;     // 8-key column blocks of S
  constexpr int kValueSteps = kBlockN / 16;   // k-steps of O = P V
  constexpr int kOutBlocks = kHeadDim / 8;    // 8-column blocks of O

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

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int quad_row = lane / 4, quad_col = lane % 4;  // (g, t) of the mma fragment layouts
  const int warp_row = warp * 16;                      // first tile row of this warp

  // This thread's accumulator rows: warp_row + quad_row (index 0) and + 8 (index 1).
  float o[kOutBlocks][4];
#pragma unroll
  for (int d = 0; d < kOutBlocks; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // base-2 scaled scores
  float row_sum[2] = {0.0f, 0.0f};            // this thread's part; the quad's sum is the row's
  uint32_t q_fragments[kKeySteps][4];

  if (key_tiles > 0) {
    load_tile_async<Element, kHeadDim, kBlockM>(q_tile, q, p.q_row_stride, seqlen_q - m0);
    load_tile_async<Element, kHeadDim, kBlockN>(k_tile(0), k, p.k_row_stride, seqlen_k);
    load_tile_async<Element, kHeadDim, kBlockN>(v_tile(0), v, p.v_row_stride, seqlen_k);
    commit_copies();
    wait_for_copies();
    __syncthreads();
    // Matrices 0-3 of the A fragment: rows 0-7 / 8-15 of chunk 2s, then of chunk 2s + 1.
#pragma unroll
    for (int s = 0; s < kKeySteps; ++s)
      load_matrix_x4(q_fragments[s],
                     shared_address(q_tile + swizzled<kHeadDim>(warp_row + lane % 16, 2 * s + lane / 16)));
  }

  for (int tile = 0; tile < key_tiles; ++tile) {
    if (tile > 0) {
      wait_for_copies();
      // The tile is in shared memory for every warp, and every warp is done with the stage
      // the next copies overwrite.
      __syncthreads();
    }
    if (tile + 1 < key_tiles) {
      const int next = (tile + 1) * kBlockN;
      load_tile_async<Element, kHeadDim, kBlockN>(k_tile((tile + 1) & 1), k + next * p.k_row_stride,
                                                  p.k_row_stride, seqlen_k - next);
      load_tile_async<Element, kHeadDim, kBlockN>(v_tile((tile + 1) & 1), v + next * p.v_row_stride,
                                                  p.v_row_stride, seqlen_k - next);
      commit_copies();
    }
    const Element* const keys = k_tile(tile & 1);
    const Element* const values = v_tile(tile & 1);

    // S = Q K^T, 16 x kBlockN. One ldmatrix.x4 gives the B fragments of key blocks 2j and
    // 2j + 1 for k-step s: keys 16j + 0-7 (chunks 2s, 2s + 1), then keys 16j + 8-15.
    float s[kKeyBlocks][4];
#pragma unroll
    for (int n = 0; n < kKeyBlocks; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int step = 0; step < kKeySteps; ++step) {
#pragma unroll
      for (int j = 0; j < kKeyBlocks / 2; ++j) {
        uint32_t b[4];
        load_matrix_x4(b, shared_address(keys + swizzled<kHeadDim>(16 * j + lane % 8 + (lane / 16) * 8,
                                                                   2 * step + (lane / 8) % 2)));
        Core::mma(s[2 * j], q_fragments[step], b[0], b[1]);
        Core::mma(s[2 * j + 1], q_fragments[step], b[2], b[3]);
      }
    }

    // Scale into base 2; hide keys past seqlen_k and, when causal, past each row's diagonal.
    const bool masked = tile >= unmasked_tiles;
#pragma unroll
    for (int n = 0; n < kKeyBlocks; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] *= p.scale_log2;
        if (masked) {
          const int key = tile * kBlockN + n * 8 + 2 * quad_col + (e & 1);
          const int row = m0 + warp_row + quad_row + 8 * (e >> 1);
          if (key >= seqlen_k || (p.causal && key > row + diagonal)) s[n][e] = -INFINITY;
        }
      }
    }

    // Online softmax per row; the four threads of a quad hold one row's columns.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = row_max[r];
#pragma unroll
      for (int n = 0; n < kKeyBlocks; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      // A row that has seen no key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0.
      const float shift = tile_max == -INFINITY ? 0.0f : tile_max;
      const float correction = exp2_approx(row_max[r] - shift);
      row_max[r] = tile_max;
      row_sum[r] *= correction;
#pragma unroll
      for (int d = 0; d < kOutBlocks; ++d) {
        o[d][2 * r] *= correction;
        o[d][2 * r + 1] *= correction;
      }
#pragma unroll
      for (int n = 0; n < kKeyBlocks; ++n) {
        s[n][2 * r] = exp2_approx(s[n][2 * r] - shift);
        s[n][2 * r + 1] = exp2_approx(s[n][2 * r + 1] - shift);
        row_sum[r] += s[n][2 * r] + s[n][2 * r + 1];
      }
    }

    // O += P V. P's A fragment for k-step j is S's accumulators of key blocks 2j and 2j + 1,
    // rounded to the input type. One ldmatrix.x4.trans gives the B fragments of output
    // blocks 2c and 2c + 1: keys 16j + 0-7 and 16j + 8-15 of chunk 2c, then of chunk 2c + 1.
#pragma unroll
    for (int j = 0; j < kValueSteps; ++j) {
      const uint32_t a[4] = {Core::pack(s[2 * j][0], s[2 * j][1]), Core::pack(s[2 * j][2], s[2 * j][3]),
                             Core::pack(s[2 * j + 1][0], s[2 * j + 1][1]),
                             Core::pack(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
      for (int c = 0; c < kOutBlocks / 2; ++c) {
        uint32_t b[4];
        load_matrix_x4_transposed(
            b, shared_address(values + swizzled<kHeadDim>(16 * j + lane % 8 + ((lane / 8) % 2) * 8,
                                                          2 * c + lane / 16)));
        Core::mma(o[2 * c], a, b[0], b[1]);
        Core::mma(o[2 * c + 1], a, b[2], b[3]);
      }
    }
  }

  // O / l through this warp's own rows of the Q tile (no other warp reads them), then out in
  // 16-byte stores. A row that saw no key has l = 0: its output is 0 and its lse -inf.
  float inverse_sum[2], total_sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    total_sum[r] = sum;
    inverse_sum[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  __syncwarp();
#pragma unroll
  for (int d = 0; d < kOutBlocks; ++d) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row + quad_row + 8 * r;
      *reinterpret_cast<uint32_t*>(q_tile + swizzled<kHeadDim>(row, d) + 2 * quad_col) =
          Core::pack(o[d][2 * r] * inverse_sum[r], o[d][2 * r + 1] * inverse_sum[r]);
    }
  }
  __syncwarp();
  Element* const out = static_cast<Element*>(p.out) + batch * p.out_batch_stride +
                       (q_start + m0) * p.out_row_stride + head * p.out_head_stride;
#pragma unroll
  for (int i = 0; i < 16 * kChunksPerRow / 32; ++i) {
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
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + warp_row + quad_row + 8 * r;
      if (row < seqlen_q)
        lse[row * p.lse_row_stride] =
            total_sum[r] > 0.0f ? row_max[r] * 0.69314718055994531f + logf(total_sum[r]) : -INFINITY;
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

template <typename Element, int kHeadDim>
cudaError_t launch(const AttentionParams& params, dim3 grid, cudaStream_t stream) {
  constexpr int bytes = shared_bytes<kHeadDim>();
  const cudaError_t status = cudaFuncSetAttribute(attention_kernel<Element, kHeadDim>,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (status != cudaSuccess) return status;
  attention_kernel<Element, kHeadDim><<<grid, kThreads, bytes, stream>>>(params);
  return cudaGetLastError();
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
                      int64_t max_seqlen_q, bool causal, float scale, cudaStream_t stream) {
  if (attention_unsupported(q, k, v, out, cu_seqlens_q, cu_seqlens_k) != nullptr)
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
    return head_dim == 64 ? launch<__half, 64>(params, grid, stream) : launch<__half, 128>(params, grid, stream);
  return head_dim == 64 ? launch<__nv_bfloat16, 64>(params, grid, stream)
                        : launch<__nv_bfloat16, 128>(params, grid, stream);
}

}  // namespace fmkernels::cuda
