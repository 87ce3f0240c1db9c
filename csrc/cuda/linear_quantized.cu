// linear for GGUF-quantized weights on the device: a weight-only dequantizing GEMV for a
// decode step's 1..64 rows of x, out = x @ dequantize(blocks)^T.
//
// One warp per output feature n, kWarps warps per CTA. K is walked in spans of kSpan = 1024
// weights: 32 sub-blocks of 32 weights, one per lane. For each span:
//   1. the CTA stages the span of x (a group of up to 8 rows) in shared memory as fp32, each
//      row padded by 4 floats after every 32, so that a lane's float4 reads of its own 32
//      columns fall on other banks than its neighbours';
//   2. each warp copies its weight row's bytes of the span into its own shared buffer:
//      16-byte loads over the 16-byte aligned middle, byte loads at the two ends, so that no
//      byte outside the row is read whatever the row's alignment (column slices, odd K);
//   3. each lane dequantizes its sub-block's 32 weights into registers in fp32, rounded as
//      fmkernels.quantized.dequantize rounds them (__fmul_rn/__fadd_rn: no contraction into
//      an FMA), and accumulates their products with each row of the group in fp32.
// After the last span the lanes' sums are added with warp shuffles and lane 0 stores the
// group's outputs in x's dtype. Rows beyond a group run as further groups, each reading the
// weight row again (the CTA's few rows of bytes are still in L1/L2 from the group before).
#include "cuda/linear_quantized.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

namespace fmkernels::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kSubBlock = 32;                     // weights a lane dequantizes at a time
constexpr int kSpan = 32 * kSubBlock;             // weights of K per span, a sub-block per lane
constexpr int kPaddedSpan = kSpan + kSpan / 8;    // 4 floats of padding after every 32
constexpr int kMaxSpanBytes = kSpan / 32 * 34;    // q8_0's 32 blocks of 34 bytes: the most
constexpr int kBufferBytes = kMaxSpanBytes + 16;  // room to keep the source's 16-byte phase
constexpr int kMaxGroup = 8;                      // rows of x accumulated in registers at once

// (weights, bytes) of a block of `format`, or (0, 0) for a number that names none.
struct BlockShape {
  int weights, bytes;
};
constexpr BlockShape block_shape(int format) {
  switch (static_cast<QuantFormat>(format)) {
    case QuantFormat::kQ8_0:
      return {32, 34};
    case QuantFormat::kQ4_0:
      return {32, 18};
    case QuantFormat::kQ4_1:
      return {32, 20};
    case QuantFormat::kQ4_K:
      return {256, 144};
    case QuantFormat::kQ6_K:
      return {256, 210};
  }
  return {0, 0};
}

template <QuantFormat F>
struct Format {
  static constexpr int kWeights = block_shape(static_cast<int>(F)).weights;
  static constexpr int kBytes = block_shape(static_cast<int>(F)).bytes;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The little-endian fp16 field at p (any alignment) widened to fp32.
__device__ __forceinline__ float half_at(const uint8_t* p) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(p[0] | (p[1] << 8))));
}

// Weights 32 * sub .. 32 * sub + 31 of the block at `block` (shared memory), as fp32.
template <QuantFormat F>
__device__ __forceinline__ void dequantize(const uint8_t* block, int sub, float (&w)[kSubBlock]);

template <>
__device__ __forceinline__ void dequantize<QuantFormat::kQ8_0>(const uint8_t* block, int, float (&w)[kSubBlock]) {
  const float d = half_at(block);
#pragma unroll
  for (int i = 0; i < kSubBlock; ++i) w[i] = __fmul_rn(d, static_cast<float>(static_cast<int8_t>(block[2 + i])));
}

template <>
__device__ __forceinline__ void dequantize<QuantFormat::kQ4_0>(const uint8_t* block, int, float (&w)[kSubBlock]) {
  const float d = half_at(block);
#pragma unroll
  for (int i = 0; i < kSubBlock; ++i) {
    const int q = (block[2 + i % 16] >> (i < 16 ? 0 : 4)) & 0xF;
    w[i] = __fmul_rn(d, static_cast<float>(q - 8));
  }
}

template <>
__device__ __forceinline__ void dequantize<QuantFormat::kQ4_1>(const uint8_t* block, int, float (&w)[kSubBlock]) {
  const float d = half_at(block), m = half_at(block + 2);
#pragma unroll
  for (int i = 0; i < kSubBlock; ++i) {
    const int q = (block[4 + i % 16] >> (i < 16 ? 0 : 4)) & 0xF;
    w[i] = __fadd_rn(__fmul_rn(d, static_cast<float>(q)), m);
  }
}

template <>
__device__ __forceinline__ void dequantize<QuantFormat::kQ4_K>(const uint8_t* block, int sub,
                                                               float (&w)[kSubBlock]) {
  // The sub-block's 6-bit scale and min (ggml's get_scale_min_k4).
  const uint8_t* s = block + 4;
  int scale, minimum;
  if (sub < 4) {
    scale = s[sub] & 63;
    minimum = s[sub + 4] & 63;
  } else {
    scale = (s[sub + 4] & 0xF) | ((s[sub - 4] >> 6) << 4);
    minimum = (s[sub + 4] >> 4) | ((s[sub] >> 6) << 4);
  }
  const float step = __fmul_rn(half_at(block), static_cast<float>(scale));
  const float shift = __fmul_rn(half_at(block + 2), static_cast<float>(minimum));
  // Sub-blocks 2i and 2i + 1 share 32 bytes: low nibbles, then high.
  const uint8_t* q = block + 16 + (sub / 2) * 32;
  const int bits = (sub % 2) * 4;
#pragma unroll
  for (int i = 0; i < kSubBlock; ++i)
    w[i] = __fsub_rn(__fmul_rn(step, static_cast<float>((q[i] >> bits) & 0xF)), shift);
}

template <>
__device__ __forceinline__ void dequantize<QuantFormat::kQ6_K>(const uint8_t* block, int sub,
                                                               float (&w)[kSubBlock]) {
  // Weights 32j.. of each half of 128: ql's (j % 2)-th 32 bytes (low nibbles for j < 2,
  // high for j >= 2), bits 2j..2j+1 of qh's 32 bytes, an int8 scale per 16 weights.
  const int part = sub / 4, j = sub % 4;  // the half of 128 weights, the 32 within it
  const uint8_t* ql = block + part * 64 + (j % 2) * 32;
  const uint8_t* qh = block + 128 + part * 32;
  const int8_t* scales = reinterpret_cast<const int8_t*>(block + 192 + part * 8 + j * 2);
  const float d = half_at(block + 208);
  const float step_low = __fmul_rn(d, static_cast<float>(scales[0]));
  const float step_high = __fmul_rn(d, static_cast<float>(scales[1]));
  const int low_bits = (j / 2) * 4, high_bits = 2 * j;
#pragma unroll
  for (int i = 0; i < kSubBlock; ++i) {
    const int q = (((ql[i] >> low_bits) & 0xF) | (((qh[i] >> high_bits) & 3) << 4)) - 32;
    w[i] = __fmul_rn(i < 16 ? step_low : step_high, static_cast<float>(q));
  }
}

// The warp copies `count` bytes at `src` (global) to `buffer` + (src % 16), and returns that
// offset: 16-byte loads over the aligned middle, single bytes before and after it.
__device__ __forceinline__ int copy_row_bytes(const uint8_t* src, int count, uint8_t* buffer, int lane) {
  const int offset = static_cast<int>(reinterpret_cast<uintptr_t>(src) & 15);
  uint8_t* dst = buffer + offset;
  const int head = min(count, (16 - offset) & 15);
  if (lane < head) dst[lane] = src[lane];
  const int chunks = (count - head) / 16;
  const uint4* src_chunks = reinterpret_cast<const uint4*>(src + head);
  uint4* dst_chunks = reinterpret_cast<uint4*>(dst + head);
  for (int i = lane; i < chunks; i += 32) dst_chunks[i] = __ldg(src_chunks + i);
  const int done = head + chunks * 16;
  if (lane < count - done) dst[done + lane] = src[done + lane];
  __syncwarp();
  return offset;
}

__device__ __forceinline__ int padded(int k) { return k + (k / 32) * 4; }

struct LinearArgs {
  const void* x;
  const uint8_t* blocks;
  void* out;
  int rows;
  int64_t n, k;
  int64_t x_stride_row, x_stride_k, blocks_stride_row, out_stride_row, out_stride_n;
};

template <QuantFormat F, typename T, int GROUP>
__global__ void __launch_bounds__(kThreads) linear_quantized_kernel(LinearArgs a) {
  using Fmt = Format<F>;
  __shared__ __align__(16) float xs[GROUP][kPaddedSpan];
  __shared__ __align__(16) uint8_t bytes[kWarps][kBufferBytes];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = int64_t{blockIdx.x} * kWarps + warp;
  const bool has_feature = n < a.n;  // warps past N still stage x with the others
  const uint8_t* row = a.blocks + (has_feature ? n : 0) * a.blocks_stride_row;
  const T* x = static_cast<const T*>(a.x);
  uint8_t* buffer = bytes[warp];
  // The lane's sub-block within a span: its block and the sub-block within that.
  const int lane_block = lane * kSubBlock / Fmt::kWeights;
  const int lane_sub = lane * kSubBlock % Fmt::kWeights / kSubBlock;

  for (int group = 0; group < a.rows; group += GROUP) {
    float acc[GROUP];
#pragma unroll
    for (int r = 0; r < GROUP; ++r) acc[r] = 0.0f;
    for (int64_t k0 = 0; k0 < a.k; k0 += kSpan) {
      const int span = static_cast<int>(a.k - k0 < kSpan ? a.k - k0 : kSpan);
      __syncthreads();  // every warp is done with the previous span's x and bytes
      for (int i = threadIdx.x; i < GROUP * span; i += kThreads) {
        const int r = i / span, kk = i % span;
        const int x_row = group + r;
        xs[r][padded(kk)] =
            x_row < a.rows ? to_float(x[x_row * a.x_stride_row + (k0 + kk) * a.x_stride_k]) : 0.0f;
      }
      int offset = 0;
      if (has_feature)
        offset = copy_row_bytes(row + k0 / Fmt::kWeights * Fmt::kBytes, span / Fmt::kWeights * Fmt::kBytes, buffer,
                                lane);
      __syncthreads();  // x is staged
      if (has_feature && lane * kSubBlock < span) {
        float w[kSubBlock];
        dequantize<F>(buffer + offset + lane_block * Fmt::kBytes, lane_sub, w);
#pragma unroll
        for (int r = 0; r < GROUP; ++r) {
          const float4* xr = reinterpret_cast<const float4*>(&xs[r][padded(lane * kSubBlock)]);
          float sum = acc[r];
#pragma unroll
          for (int c = 0; c < kSubBlock / 4; ++c) {
            const float4 v = xr[c];
            sum = fmaf(w[4 * c], v.x, sum);
            sum = fmaf(w[4 * c + 1], v.y, sum);
            sum = fmaf(w[4 * c + 2], v.z, sum);
            sum = fmaf(w[4 * c + 3], v.w, sum);
          }
          acc[r] = sum;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < GROUP; ++r) {
      float sum = acc[r];
#pragma unroll
      for (int step = 16; step > 0; step /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, step);
      acc[r] = sum;
    }
    if (lane == 0 && has_feature) {
      T* out = static_cast<T*>(a.out);
#pragma unroll
      for (int r = 0; r < GROUP; ++r)
        if (group + r < a.rows) out[(group + r) * a.out_stride_row + n * a.out_stride_n] = from_float<T>(acc[r]);
    }
  }
}

template <QuantFormat F, typename T, int GROUP>
cudaError_t launch(const LinearArgs& args, cudaStream_t stream) {
  const unsigned ctas = static_cast<unsigned>((args.n + kWarps - 1) / kWarps);
  linear_quantized_kernel<F, T, GROUP><<<ctas, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

// Rows accumulated at once: the fewest of 1, 2, 4, 8 that hold min(rows, 8).
template <QuantFormat F, typename T>
cudaError_t launch_rows(const LinearArgs& args, cudaStream_t stream) {
  if (args.rows >= 5) return launch<F, T, kMaxGroup>(args, stream);
  if (args.rows >= 3) return launch<F, T, 4>(args, stream);
  if (args.rows == 2) return launch<F, T, 2>(args, stream);
  return launch<F, T, 1>(args, stream);
}

template <typename T>
cudaError_t launch_format(int format, const LinearArgs& args, cudaStream_t stream) {
  switch (static_cast<QuantFormat>(format)) {
    case QuantFormat::kQ8_0:
      return launch_rows<QuantFormat::kQ8_0, T>(args, stream);
    case QuantFormat::kQ4_0:
      return launch_rows<QuantFormat::kQ4_0, T>(args, stream);
    case QuantFormat::kQ4_1:
      return launch_rows<QuantFormat::kQ4_1, T>(args, stream);
    case QuantFormat::kQ4_K:
      return launch_rows<QuantFormat::kQ4_K, T>(args, stream);
    case QuantFormat::kQ6_K:
      return launch_rows<QuantFormat::kQ6_K, T>(args, stream);
  }
  return cudaErrorInvalidValue;
}

bool is_float(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

}  // namespace

const char* check_linear_quantized_views(const TensorView& x, const TensorView& blocks, int format,
                                         const TensorView& out) {
  const BlockShape shape = block_shape(format);
  if (shape.weights == 0) return "format must be 0-4: q8_0, q4_0, q4_1, q4_k or q6_k";
  if (x.rank != 2 || !is_float(x.dtype)) return "x must be float32, float16 or bfloat16 (rows, K)";
  const int64_t rows = x.sizes[0], k = x.sizes[1];
  if (rows > kLinearQuantizedMaxRows) return "x must have at most 64 rows";
  if (k % shape.weights != 0) return "x's K must be a multiple of the format's block of weights";
  if (blocks.rank != 2 || blocks.dtype != DType::kUInt8) return "blocks must be uint8 (N, K / B * block bytes)";
  const int64_t n = blocks.sizes[0], row_bytes = k / shape.weights * shape.bytes;
  if (blocks.sizes[1] != row_bytes) return "blocks must have K / B * block bytes columns for x's K";
  if (n > 0 && row_bytes > 1 && blocks.strides[1] != 1) return "blocks must have unit stride along a row";
  if (n > 1 && row_bytes > 0 && blocks.strides[0] < row_bytes) return "blocks' rows must not overlap";
  if ((n + kWarps - 1) / kWarps > INT_MAX) return "blocks must have at most 8 x (2**31 - 1) rows (the grid's limit)";
  if (out.rank != 2 || out.dtype != x.dtype || out.sizes[0] != rows || out.sizes[1] != n)
    return "out must be (rows, N) in x's dtype";
  if (rows * k > 0 && x.data == nullptr) return "x has no data";
  if (n * row_bytes > 0 && blocks.data == nullptr) return "blocks has no data";
  if (rows * n > 0 && out.data == nullptr) return "out has no data";
  return nullptr;
}

const char* linear_quantized(const TensorView& x, const TensorView& blocks, int format, const TensorView& out,
                             cudaStream_t stream) {
  if (const char* error = check_linear_quantized_views(x, blocks, format, out)) return error;
  const LinearArgs args{x.data,          static_cast<const uint8_t*>(blocks.data),
                        out.data,        static_cast<int>(x.sizes[0]),
                        blocks.sizes[0], x.sizes[1],
                        x.strides[0],    x.strides[1],
                        blocks.strides[0], out.strides[0],
                        out.strides[1]};
  if (args.rows == 0 || args.n == 0) return nullptr;
  cudaError_t status = cudaErrorInvalidValue;
  switch (x.dtype) {
    case DType::kFloat32:
      status = launch_format<float>(format, args, stream);
      break;
    case DType::kFloat16:
      status = launch_format<__half>(format, args, stream);
      break;
    default:
      status = launch_format<__nv_bfloat16>(format, args, stream);
      break;
  }
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace fmkernels::cuda
