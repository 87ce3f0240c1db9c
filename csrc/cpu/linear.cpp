// x @ weight^T on the CPU for skinny x: a decode step's few tokens against a weight that
// streams from DRAM.
//
// Memory bound: the weight (N x K elements) is read once, against 2 x rows FLOPs per
// element; x (rows x K, rows <= 16 in use) and out are small. So the weight rows are cut
// into contiguous chunks that the threads take one at a time; a thread streams its chunk
// once, kUnroll rows at a time, and computes every row of x from them in registers
// (linear_tile.inc), with fp32 accumulation. 16-bit weights are widened to fp32 as they are read (bf16: shifted
// into the top half of an fp32; fp16: F16C's vcvtph2ps).
//
// The per-thread code is compiled three times (AVX-512, AVX2+FMA+F16C and the x86-64
// baseline) and the widest the CPU supports runs (cpu_isa(); FMKERNELS_CPU_ISA caps it).
#include "cpu/linear.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/isa.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wmaybe-uninitialized
// reports wherever they are inlined (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace fmkernels::cpu {
namespace {

constexpr int kUnroll = 4;          // weight rows per register tile
constexpr int64_t kMaxLanes = 16;   // floats per vector on the widest ISA: x's rows are padded to it
constexpr int64_t kPrefetchGroups = 2;  // how many groups of kUnroll rows ahead a thread prefetches
// Threads take the weight in contiguous chunks of about this many bytes, one at a time, so a
// thread the OS deschedules (other work on the cores) holds up one chunk, not a fixed share.
constexpr int64_t kChunkBytes = 128 * 1024;

// What the per-thread code reads and writes.
struct LinearProblem {
  int64_t rows, n, k;
  int64_t padded_k;       // K rounded up to kMaxLanes: the row length of the widened x
  const float* x;         // rows x padded_k, widened, zero past K, 64-byte aligned
  const void* weight;     // row n at weight + n * weight_stride (elements), unit stride along K
  int64_t weight_stride;
  void* out;              // element (r, n) at out + r * out_stride + n
  int64_t out_stride;
};

// One instruction set's code for one dtype (linear_tile.inc).
template <class Elem>
struct Kernels {
  void (*widen_x)(const Elem* x, int64_t rows, int64_t stride, int64_t k, int64_t padded_k,
                  float* dst);
  void (*multiply_rows)(const LinearProblem& p, int64_t first, int64_t last);
};

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

}  // namespace
}  // namespace fmkernels::cpu

// The per-thread code, once per instruction set. Internal linkage throughout, so the linker
// never mixes code built for different targets.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FMKERNELS_X86_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
namespace fmkernels::cpu {
namespace {
namespace avx512 {
constexpr int kLanes = 16;
constexpr int kRows = 6;  // 24 accumulators + 4 weight vectors of the 32 zmm registers
using VF = __m512;

inline VF zero() { return _mm512_setzero_ps(); }
inline VF load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF madd(VF a, VF b, VF acc) { return _mm512_fmadd_ps(a, b, acc); }

// Pairs within each 128-bit lane, then the four lanes: sums = (sum a, sum b, sum c, sum d).
inline void sum4(VF a, VF b, VF c, VF d, float* sums) {
  const VF ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const VF cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const VF abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
}

inline VF widen_bits(__m256i bits, const BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline VF widen_bits(__m256i bits, const Float16*) { return _mm512_cvtph_ps(bits); }

inline VF widen(const float* p) { return _mm512_loadu_ps(p); }
template <class Half>
inline VF widen(const Half* p) {
  return widen_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), p);
}

// Masked loads: the lanes from n on are zero and their memory is not touched.
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline VF widen_tail(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
template <class Half>
inline VF widen_tail(const Half* p, int64_t n) {
  return widen_bits(_mm256_maskz_loadu_epi16(first_lanes(n), p), p);
}

#include "cpu/linear_tile.inc"
}  // namespace avx512
}  // namespace
}  // namespace fmkernels::cpu
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace fmkernels::cpu {
namespace {
namespace avx2 {
constexpr int kLanes = 8;
constexpr int kRows = 3;  // 12 accumulators + 4 weight vectors: all 16 ymm registers
using VF = __m256;

inline VF zero() { return _mm256_setzero_ps(); }
inline VF load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF madd(VF a, VF b, VF acc) { return _mm256_fmadd_ps(a, b, acc); }

inline void sum4(VF a, VF b, VF c, VF d, float* sums) {
  const VF ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  const VF cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const VF abcd = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}

inline VF widen_bits(__m128i bits, const BFloat16*) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline VF widen_bits(__m128i bits, const Float16*) { return _mm256_cvtph_ps(bits); }

inline VF widen(const float* p) { return _mm256_loadu_ps(p); }
template <class Half>
inline VF widen(const Half* p) {
  return widen_bits(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), p);
}

// AVX2 has no 16-bit masked load: the tail goes through a zeroed copy of its elements.
template <class Elem>
inline VF widen_tail(const Elem* p, int64_t n) {
  Elem tail[kLanes] = {};
  std::memcpy(tail, p, static_cast<size_t>(n) * sizeof(Elem));
  return widen(tail);
}

#include "cpu/linear_tile.inc"
}  // namespace avx2
}  // namespace
}  // namespace fmkernels::cpu
#pragma GCC pop_options
#endif

namespace fmkernels::cpu {
namespace {
namespace generic {
constexpr int kLanes = 4;
constexpr int kRows = 2;
typedef float VF __attribute__((vector_size(kLanes * sizeof(float))));

inline VF zero() { return VF{}; }
inline VF load(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, VF v) { std::memcpy(p, &v, sizeof v); }
inline VF madd(VF a, VF b, VF acc) { return a * b + acc; }
inline void sum4(VF a, VF b, VF c, VF d, float* sums) {
  const VF lanes[4] = {a, b, c, d};
  for (int j = 0; j < 4; ++j) sums[j] = (lanes[j][0] + lanes[j][2]) + (lanes[j][1] + lanes[j][3]);
}

template <class Elem>
inline VF widen(const Elem* p) {
  return VF{to_float(p[0]), to_float(p[1]), to_float(p[2]), to_float(p[3])};
}
template <class Elem>
inline VF widen_tail(const Elem* p, int64_t n) {
  VF v = {};
  for (int64_t i = 0; i < n; ++i) v[i] = to_float(p[i]);
  return v;
}

#include "cpu/linear_tile.inc"
}  // namespace generic

template <class Elem>
Kernels<Elem> kernels() {
#ifdef FMKERNELS_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return {&avx512::widen_x<Elem>, &avx512::multiply_rows<Elem>};
    case Isa::kAvx2:
      return {&avx2::widen_x<Elem>, &avx2::multiply_rows<Elem>};
    case Isa::kGeneric:
      break;
  }
#endif
  return {&generic::widen_x<Elem>, &generic::multiply_rows<Elem>};
}

// A 64-byte aligned block of floats (the widened x).
class AlignedFloats {
 public:
  explicit AlignedFloats(int64_t count) : storage_(static_cast<size_t>(count + kMaxLanes)) {}
  float* data() {
    const auto address = reinterpret_cast<uintptr_t>(storage_.data());
    const auto misaligned = address / sizeof(float) % kMaxLanes;
    return storage_.data() + (misaligned == 0 ? 0 : kMaxLanes - misaligned);
  }

 private:
  std::vector<float> storage_;
};

const char* check_views(const TensorView& x, const TensorView& weight, const TensorView& out) {
  if (x.rank != 2 || weight.rank != 2 || out.rank != 2)
    return "linear: x, weight and out must be 2-D (rows, K), (N, K) and (rows, N)";
  if (x.dtype != DType::kFloat32 && x.dtype != DType::kFloat16 && x.dtype != DType::kBFloat16)
    return "linear: x must be float32, float16 or bfloat16";
  if (weight.dtype != x.dtype || out.dtype != x.dtype)
    return "linear: x, weight and out must share one dtype";
  if (weight.sizes[1] != x.sizes[1]) return "linear: weight's K differs from x's";
  if (out.sizes[0] != x.sizes[0] || out.sizes[1] != weight.sizes[0])
    return "linear: out must be (rows, N)";
  if ((x.sizes[1] > 1 && x.strides[1] != 1) || (weight.sizes[1] > 1 && weight.strides[1] != 1) ||
      (out.sizes[1] > 1 && out.strides[1] != 1))
    return "linear: x, weight and out must have unit stride along their last dimension";
  if (out.sizes[0] > 1 && out.sizes[1] > 0 && out.strides[0] < out.sizes[1])
    return "linear: out's rows overlap";
  return nullptr;
}

template <class Elem>
void run(const TensorView& x, const TensorView& weight, const TensorView& out, int num_threads) {
  const Kernels<Elem> code = kernels<Elem>();
  LinearProblem p{};
  p.rows = x.sizes[0];
  p.n = weight.sizes[0];
  p.k = x.sizes[1];
  p.padded_k = round_up(p.k, kMaxLanes);
  p.weight = weight.data;
  p.weight_stride = weight.strides[0];
  p.out = out.data;
  p.out_stride = out.strides[0];
  AlignedFloats widened(p.rows * p.padded_k);
  code.widen_x(static_cast<const Elem*>(x.data), p.rows, x.strides[0], p.k, p.padded_k, widened.data());
  p.x = widened.data();

  const int64_t groups = (p.n + kUnroll - 1) / kUnroll;
  const int64_t group_bytes = std::max<int64_t>(1, kUnroll * p.k * static_cast<int64_t>(sizeof(Elem)));
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / group_bytes);  // groups per chunk
  const int64_t chunks = (groups + chunk - 1) / chunk;
  const int threads = static_cast<int>(std::min<int64_t>(num_threads, chunks));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) code.multiply_rows(p, c * chunk, std::min(groups, (c + 1) * chunk));
}

}  // namespace

const char* linear(const TensorView& x, const TensorView& weight, const TensorView& out,
                   int num_threads) {
  if (const char* error = check_views(x, weight, out)) return error;
  if (x.sizes[0] == 0 || weight.sizes[0] == 0) return nullptr;
  num_threads = std::max(1, num_threads);
  switch (x.dtype) {
    case DType::kFloat32:
      run<float>(x, weight, out, num_threads);
      break;
    case DType::kFloat16:
      run<Float16>(x, weight, out, num_threads);
      break;
    default:
      run<BFloat16>(x, weight, out, num_threads);
      break;
  }
  return nullptr;
}

}  // namespace fmkernels::cpu
