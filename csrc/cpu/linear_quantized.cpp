// x @ W^T on the CPU for skinny x against a weight in one of GGUF's block formats, read as it
// is stored, never dequantized (llama.cpp's method).
//
// Memory bound at a decode step's few rows: the blocks (4.5 to 8.5 bits a weight) are read
// once. Each block of 32 of a row of x is rounded to int8 once per call (scale d = max|x| / 127),
// with each 4 values' sum kept; then every 4 weights' integers against x's give an int32 lane
// (vpdpbusd with AVX512_VNNI, vpmaddubsw + vpmaddwd without), and the lanes are scaled into
// fp32 accumulators: acc += (lane sum * weight scale) * x scale [+ weight offset * x scale *
// x's 4-value sum, for the formats with an offset]. Weights are unsigned bytes in that product
// (4- and 6-bit quants are; q8_0's are made so: |w| against x negated where w < 0).
//
// The per-thread code (linear_quantized_tile.inc) is compiled for AVX-512 with and without
// VNNI, AVX2 and the x86-64 baseline, and the widest the CPU has runs (cpu_isa(),
// cpu_has_avx512_vnni(); FMKERNELS_CPU_ISA caps it); q4_0 and q4_1 have a fourth, AVX-512 VNNI
// with VBMI and GFNI (one byte permutation and one affine map decode a pair of blocks' nibbles),
// which a CPU with those runs in place of the VNNI one.
//
// This file is compiled with -ffp-contract=off: dequantize must round each product as
// python/fmkernels/quantized.py does (no fused multiply-add the reference does not do).
#include "cpu/linear_quantized.h"

#include <algorithm>
#include <cmath>
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

constexpr int64_t kXAlign = 64;      // x is padded to this many values: the widest unit
constexpr int64_t kChunkBytes = 128 * 1024;  // weight bytes a thread takes at a time

// What the per-thread code reads and writes.
struct QProblem {
  int64_t rows, n, k;
  int64_t padded_k;        // K rounded up to kXAlign: the row length of the quantized x
  const int8_t* xq;        // rows x padded_k int8, zero past K
  const float* x_scale;    // rows x padded_k / 4: the scale of each 4 values' block of 32
  const float* x_sums;     // rows x padded_k / 4: the 4 values' sum times that scale
  const uint8_t* blocks;   // row n at blocks + n * row_stride bytes
  int64_t row_stride;
  void* out;               // element (r, n) at out + r * out_stride + n
  int64_t out_stride;
};

using MultiplyRows = void (*)(const QProblem& p, int64_t first, int64_t last);

// x's rows rounded to int8 per block of 32, with each 4 values' block scale and scaled sum.
class QuantizedX {
 public:
  QuantizedX(int64_t rows, int64_t padded_k)
      : bytes_(static_cast<size_t>(rows * padded_k + kXAlign)),
        floats_(static_cast<size_t>(2 * rows * padded_k / 4)) {
    const auto address = reinterpret_cast<uintptr_t>(bytes_.data());
    q_ = reinterpret_cast<int8_t*>(bytes_.data() + (kXAlign - address % kXAlign) % kXAlign);
    scale_ = floats_.data();
    sums_ = floats_.data() + rows * padded_k / 4;
  }
  int8_t* q() { return q_; }
  float* scale() { return scale_; }
  float* sums() { return sums_; }

 private:
  std::vector<int8_t> bytes_;
  std::vector<float> floats_;
  int8_t* q_;
  float* scale_;
  float* sums_;
};

// One instruction set's code for one dtype of x.
template <class Elem>
struct Kernels {
  void (*quantize_x)(const TensorView& x, int64_t padded_k, QuantizedX& dst);
  MultiplyRows multiply_rows;
};

inline float half_at(const uint8_t* p) {
  Float16 h;
  std::memcpy(&h.bits, p, sizeof h.bits);
  return to_float(h);
}

// q4_k's 6-bit scale and min of 32-group g from its 12 bytes (ggml's get_scale_min_k4).
inline void k4_scale_min(const uint8_t* s, int g, int& scale, int& minimum) {
  if (g < 4) {
    scale = s[g] & 63;
    minimum = s[g + 4] & 63;
  } else {
    scale = (s[g + 4] & 0xF) | ((s[g - 4] >> 6) << 4);
    minimum = (s[g + 4] >> 4) | ((s[g] >> 6) << 4);
  }
}

// The fields and the block shapes of each format, as ggml lays them out.
struct Q8_0Layout {
  static constexpr int kBlockWeights = 32, kBlockBytes = 34;
};
struct Q4_0Layout {
  static constexpr int kBlockWeights = 32, kBlockBytes = 18;
};
struct Q4_1Layout {
  static constexpr int kBlockWeights = 32, kBlockBytes = 20;
};
struct Q4_KLayout {
  static constexpr int kBlockWeights = 256, kBlockBytes = 144;
};
struct Q6_KLayout {
  static constexpr int kBlockWeights = 256, kBlockBytes = 210;
};

// A 32-block format's decoder traits: kSuperWeights (the unit's weights, kUnit), no header.
template <class Layout, int Super, bool Signed, bool Bias>
struct Plain : Layout {
  static constexpr int kSuperWeights = Super;
  static constexpr bool kSigned = Signed, kBias = Bias;
  struct Header {};
  static void header(const uint8_t*, Header&) {}
};

// q4_k's per-group multipliers: scale d * sc_g and offset -(dmin * m_g), for 8 groups.
struct K4Header {
  float scale[8], bias[8];
};
inline void k4_header(const uint8_t* p, K4Header& h) {
  const float d = half_at(p), dmin = half_at(p + 2);
  for (int g = 0; g < 8; ++g) {
    int sc, m;
    k4_scale_min(p + 4, g, sc, m);
    h.scale[g] = d * static_cast<float>(sc);
    h.bias[g] = -(dmin * static_cast<float>(m));
  }
}

// q6_k's per-16 scales d * sc_g.
struct K6Header {
  float scale[16];
};
inline void k6_header(const uint8_t* p, K6Header& h) {
  const float d = half_at(p + 208);
  for (int g = 0; g < 16; ++g) h.scale[g] = d * static_cast<float>(static_cast<int8_t>(p[192 + g]));
}

// The k-quants' decoder traits where the header is these scalars.
struct K4Traits : Q4_KLayout {
  static constexpr int kSuperWeights = 256;
  static constexpr bool kSigned = false, kBias = true;
  using Header = K4Header;
  static void header(const uint8_t* p, Header& h) { k4_header(p, h); }
};
struct K6Traits : Q6_KLayout {
  static constexpr int kSuperWeights = 256;
  static constexpr bool kSigned = false, kBias = true;
  using Header = K6Header;
  static void header(const uint8_t* p, Header& h) { k6_header(p, h); }
};

}  // namespace
}  // namespace fmkernels::cpu

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FMKERNELS_X86_DISPATCH 1

// ---- AVX-512: units of 64 weights (two 32-blocks, or a quarter of a 256-block) -------------
// linear_quantized_avx512.inc holds the decoders; dot() is the one difference between the two.
// GCC 12 reports the _mm512_undefined_*() inside its cast and insert intrinsics wherever they
// are inlined (bug 105593, as above).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")
namespace fmkernels::cpu {
namespace {
namespace avx512_vnni {
inline __m512i dot(__m512i w, __m512i x) { return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x); }
#include "cpu/linear_quantized_avx512.inc"
#include "cpu/linear_quantized_tile.inc"
}  // namespace avx512_vnni
}  // namespace
}  // namespace fmkernels::cpu
#pragma GCC pop_options

// The same with AVX512_VBMI's byte permutation and GFNI's affine map for q4_0's and q4_1's
// nibbles (only those formats' code is taken from this copy).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx512vbmi,gfni,avx2,fma,f16c")
namespace fmkernels::cpu {
namespace {
namespace avx512_vbmi {
inline __m512i dot(__m512i w, __m512i x) { return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x); }
#define FMKERNELS_QUANT_VBMI 1
#include "cpu/linear_quantized_avx512.inc"
#include "cpu/linear_quantized_tile.inc"
#undef FMKERNELS_QUANT_VBMI
}  // namespace avx512_vbmi
}  // namespace
}  // namespace fmkernels::cpu
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
namespace fmkernels::cpu {
namespace {
namespace avx512 {
// Pairs of u8 x s8 products as int16 (|sum| <= 2 * 128 * 127 < 32767: no saturation), then
// pairs of those as int32.
inline __m512i dot(__m512i w, __m512i x) {
  return _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1));
}
#include "cpu/linear_quantized_avx512.inc"
#include "cpu/linear_quantized_tile.inc"
}  // namespace avx512
}  // namespace
}  // namespace fmkernels::cpu
#pragma GCC pop_options
#pragma GCC diagnostic pop

// ---- AVX2: units of 32 weights (a 32-block, or an eighth of a 256-block) ------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace fmkernels::cpu {
namespace {
namespace avx2 {
constexpr int kUnit = 32;
constexpr int kRows = 2;  // 8 accumulators; two units' integers, scales and offsets
using VF = __m256;
using VI = __m256i;

struct Unit {
  VI w;     // unsigned weight bytes (q8_0: |w|)
  VI sign;  // q8_0: the signed weights
  VF scale, bias;
};

inline VF zero() { return _mm256_setzero_ps(); }
inline VF load(const float* p) { return _mm256_loadu_ps(p); }
inline VF add(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF madd(VF a, VF b, VF acc) { return _mm256_fmadd_ps(a, b, acc); }
inline VF to_float(VI v) { return _mm256_cvtepi32_ps(v); }
inline float hsum(VF v) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
inline VI load_x(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VI load_bytes(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VI dot(VI w, VI x) { return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)); }
inline VI dot_signed(const Unit& u, VI x) { return dot(u.w, _mm256_sign_epi8(x, u.sign)); }
inline float half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return _cvtsh_ss(bits);
}
inline float value_of(Float16 h) { return _cvtsh_ss(h.bits); }
// 16 bytes of nibbles -> 32 values: the low nibbles, then the high ones.
inline VI nibbles16(const uint8_t* p) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
}

struct Q8_0 : Plain<Q8_0Layout, kUnit, true, false> {
  static void unit(const uint8_t* p, const Header&, int, Unit& u) {
    u.sign = load_bytes(p + 2);
    u.w = _mm256_abs_epi8(u.sign);
    u.scale = _mm256_set1_ps(half(p));
  }
};

struct Q4_0 : Plain<Q4_0Layout, kUnit, false, true> {
  static void unit(const uint8_t* p, const Header&, int, Unit& u) {
    u.w = nibbles16(p + 2);
    const float d = half(p);
    u.scale = _mm256_set1_ps(d);
    u.bias = _mm256_set1_ps(-8.0f * d);
  }
};

struct Q4_1 : Plain<Q4_1Layout, kUnit, false, true> {
  static void unit(const uint8_t* p, const Header&, int, Unit& u) {
    u.w = nibbles16(p + 4);
    u.scale = _mm256_set1_ps(half(p));
    u.bias = _mm256_set1_ps(half(p + 2));
  }
};

struct Q4_K : K4Traits {
  // Unit j: group j, the low (j even) or high nibbles of the (j / 2)-th 32 bytes.
  static void unit(const uint8_t* p, const Header& h, int j, Unit& u) {
    VI q = load_bytes(p + 16 + 32 * (j / 2));
    if (j & 1) q = _mm256_srli_epi16(q, 4);
    u.w = _mm256_and_si256(q, _mm256_set1_epi8(0x0F));
    u.scale = _mm256_set1_ps(h.scale[j]);
    u.bias = _mm256_set1_ps(h.bias[j]);
  }
};

struct Q6_K : K6Traits {
  // Unit j: weights 32j.. = half j / 4, quarter i = j % 4 of it: ql's (i % 2)-th 32 bytes of
  // the half (low nibbles for i < 2), bits 2i, 2i + 1 of qh's 32 bytes of the half.
  static void unit(const uint8_t* p, const Header& h, int j, Unit& u) {
    const int half_index = j / 4, i = j % 4;
    VI low = load_bytes(p + 64 * half_index + 32 * (i % 2));
    if (i >= 2) low = _mm256_srli_epi16(low, 4);
    low = _mm256_and_si256(low, _mm256_set1_epi8(0x0F));
    VI high = _mm256_srl_epi16(load_bytes(p + 128 + 32 * half_index), _mm_cvtsi32_si128(2 * i));
    high = _mm256_slli_epi16(_mm256_and_si256(high, _mm256_set1_epi8(3)), 4);
    u.w = _mm256_or_si256(low, high);
    // Lanes 0-3 hold group 2j, lanes 4-7 group 2j + 1.
    u.scale = _mm256_set_m128(_mm_set1_ps(h.scale[2 * j + 1]), _mm_set1_ps(h.scale[2 * j]));
    u.bias = _mm256_mul_ps(u.scale, _mm256_set1_ps(-32.0f));
  }
};

#include "cpu/linear_quantized_tile.inc"
}  // namespace avx2
}  // namespace
}  // namespace fmkernels::cpu
#pragma GCC pop_options
#endif

// ---- the x86-64 baseline (and any other CPU): scalar decoders, GCC vectors -----------------
namespace fmkernels::cpu {
namespace {
namespace generic {
constexpr int kUnit = 32;
constexpr int kRows = 2;
// Eight lanes in plain arrays (a GCC vector this wide would change the baseline's ABI).
struct VF {
  float v[8];
};
struct VI {
  int32_t v[8];
};

struct IntUnit {
  int32_t v[kUnit];
};
struct Unit {
  IntUnit w;  // the weights' integers (signed for q8_0)
  VF scale, bias;
};

inline VF zero() { return VF{}; }
inline VF load(const float* p) {
  VF a;
  std::memcpy(a.v, p, sizeof a.v);
  return a;
}
inline VF add(VF a, VF b) {
  for (int l = 0; l < 8; ++l) a.v[l] += b.v[l];
  return a;
}
inline VF mul(VF a, VF b) {
  for (int l = 0; l < 8; ++l) a.v[l] *= b.v[l];
  return a;
}
inline VF madd(VF a, VF b, VF acc) {
  for (int l = 0; l < 8; ++l) acc.v[l] += a.v[l] * b.v[l];
  return acc;
}
inline VF to_float(VI i) {
  VF a;
  for (int l = 0; l < 8; ++l) a.v[l] = static_cast<float>(i.v[l]);
  return a;
}
inline float hsum(VF a) {
  const float* v = a.v;
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}
struct XBytes {
  const int8_t* p;
};
inline XBytes load_x(const int8_t* p) { return {p}; }
inline VI dot(const IntUnit& w, XBytes x) {
  VI lanes;
  for (int l = 0; l < kUnit / 4; ++l) {
    int32_t sum = 0;
    for (int i = 4 * l; i < 4 * l + 4; ++i) sum += w.v[i] * x.p[i];
    lanes.v[l] = sum;
  }
  return lanes;
}
inline VI dot_signed(const Unit& u, XBytes x) { return dot(u.w, x); }
inline VF splat(float v) { return VF{{v, v, v, v, v, v, v, v}}; }

struct Q8_0 : Plain<Q8_0Layout, kUnit, true, false> {
  static void unit(const uint8_t* p, const Header&, int, Unit& u) {
    for (int i = 0; i < 32; ++i) u.w.v[i] = static_cast<int8_t>(p[2 + i]);
    u.scale = splat(half_at(p));
  }
};

inline void nibbles(const uint8_t* q, IntUnit& w) {
  for (int i = 0; i < 16; ++i) {
    w.v[i] = q[i] & 0xF;
    w.v[i + 16] = q[i] >> 4;
  }
}

struct Q4_0 : Plain<Q4_0Layout, kUnit, false, true> {
  static void unit(const uint8_t* p, const Header&, int, Unit& u) {
    nibbles(p + 2, u.w);
    const float d = half_at(p);
    u.scale = splat(d);
    u.bias = splat(-8.0f * d);
  }
};

struct Q4_1 : Plain<Q4_1Layout, kUnit, false, true> {
  static void unit(const uint8_t* p, const Header&, int, Unit& u) {
    nibbles(p + 4, u.w);
    u.scale = splat(half_at(p));
    u.bias = splat(half_at(p + 2));
  }
};

struct Q4_K : K4Traits {
  static void unit(const uint8_t* p, const Header& h, int j, Unit& u) {
    const uint8_t* q = p + 16 + 32 * (j / 2);
    const int shift = (j & 1) * 4;
    for (int i = 0; i < 32; ++i) u.w.v[i] = (q[i] >> shift) & 0xF;
    u.scale = splat(h.scale[j]);
    u.bias = splat(h.bias[j]);
  }
};

struct Q6_K : K6Traits {
  static void unit(const uint8_t* p, const Header& h, int j, Unit& u) {
    const int half_index = j / 4, i = j % 4;
    const uint8_t* ql = p + 64 * half_index + 32 * (i % 2);
    const uint8_t* qh = p + 128 + 32 * half_index;
    const int low_shift = i >= 2 ? 4 : 0;
    for (int l = 0; l < 32; ++l) u.w.v[l] = ((ql[l] >> low_shift) & 0xF) | (((qh[l] >> (2 * i)) & 3) << 4);
    const float a = h.scale[2 * j], b = h.scale[2 * j + 1];
    u.scale = VF{{a, a, a, a, b, b, b, b}};
    u.bias = mul(u.scale, splat(-32.0f));
  }
};

#include "cpu/linear_quantized_tile.inc"
}  // namespace generic

template <class Elem>
Kernels<Elem> kernels(QuantFormat format) {
#ifdef FMKERNELS_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::kAvx512:
      if ((format == QuantFormat::kQ4_0 || format == QuantFormat::kQ4_1) && cpu_has_avx512_vnni() &&
          __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("gfni"))
        return {&avx512_vbmi::quantize_x<Elem>, format == QuantFormat::kQ4_0
                                                     ? &avx512_vbmi::multiply_rows<avx512_vbmi::Q4_0, Elem>
                                                     : &avx512_vbmi::multiply_rows<avx512_vbmi::Q4_1, Elem>};
      if (cpu_has_avx512_vnni())
        return {&avx512_vnni::quantize_x<Elem>, avx512_vnni::multiply_rows_for<Elem>(format)};
      return {&avx512::quantize_x<Elem>, avx512::multiply_rows_for<Elem>(format)};
    case Isa::kAvx2:
      return {&avx2::quantize_x<Elem>, avx2::multiply_rows_for<Elem>(format)};
    case Isa::kGeneric:
      break;
  }
#endif
  return {&generic::quantize_x<Elem>, generic::multiply_rows_for<Elem>(format)};
}

struct FormatInfo {
  int block_weights, block_bytes;
};

bool format_info(int format, FormatInfo& info) {
  switch (static_cast<QuantFormat>(format)) {
    case QuantFormat::kQ8_0:
      info = {Q8_0Layout::kBlockWeights, Q8_0Layout::kBlockBytes};
      return true;
    case QuantFormat::kQ4_0:
      info = {Q4_0Layout::kBlockWeights, Q4_0Layout::kBlockBytes};
      return true;
    case QuantFormat::kQ4_1:
      info = {Q4_1Layout::kBlockWeights, Q4_1Layout::kBlockBytes};
      return true;
    case QuantFormat::kQ4_K:
      info = {Q4_KLayout::kBlockWeights, Q4_KLayout::kBlockBytes};
      return true;
    case QuantFormat::kQ6_K:
      info = {Q6_KLayout::kBlockWeights, Q6_KLayout::kBlockBytes};
      return true;
  }
  return false;
}

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// The checks both entry points make of the blocks: their format, K's fit, their shape and strides.
const char* check_blocks(const TensorView& blocks, int format, int64_t k, FormatInfo& info) {
  if (!format_info(format, info))
    return "quantized weight: unknown format (GGML type number); expected 2 (q4_0), 3 (q4_1), 8 (q8_0), "
           "12 (q4_k) or 14 (q6_k)";
  if (blocks.rank != 2 || blocks.dtype != DType::kUInt8) return "quantized weight: blocks must be a 2-D uint8 view";
  if (k % info.block_weights != 0) return "quantized weight: K must be a multiple of the format's block";
  const int64_t row_bytes = k / info.block_weights * info.block_bytes;
  if (blocks.sizes[1] != row_bytes)
    return "quantized weight: blocks must be (N, K / block_weights * block_bytes) bytes";
  if (row_bytes > 1 && blocks.sizes[0] > 0 && blocks.strides[1] != 1)
    return "quantized weight: blocks must have unit stride along a row";
  if (blocks.sizes[0] > 1 && blocks.strides[0] < row_bytes)
    return "quantized weight: blocks' rows overlap (row stride < row bytes)";
  return nullptr;
}

const char* check_views(const TensorView& x, const TensorView& blocks, int format, const TensorView& out,
                        FormatInfo& info) {
  if (x.rank != 2 || out.rank != 2) return "linear_quantized: x and out must be 2-D (rows, K) and (rows, N)";
  if (x.dtype != DType::kFloat32 && x.dtype != DType::kFloat16 && x.dtype != DType::kBFloat16)
    return "linear_quantized: x must be float32, float16 or bfloat16";
  if (out.dtype != x.dtype) return "linear_quantized: out must have x's dtype";
  if (const char* error = check_blocks(blocks, format, x.sizes[1], info)) return error;
  if (out.sizes[0] != x.sizes[0] || out.sizes[1] != blocks.sizes[0])
    return "linear_quantized: out must be (rows, N)";
  if ((x.sizes[1] > 1 && x.strides[1] != 1) || (out.sizes[1] > 1 && out.strides[1] != 1))
    return "linear_quantized: x and out must have unit stride along their last dimension";
  if (x.sizes[0] > 1 && x.strides[0] < 0) return "linear_quantized: x's row stride must not be negative";
  if (out.sizes[0] > 1 && out.sizes[1] > 0 && out.strides[0] < out.sizes[1])
    return "linear_quantized: out's rows overlap";
  return nullptr;
}


template <class Elem>
void run(const TensorView& x, const TensorView& blocks, QuantFormat format, const TensorView& out,
         const FormatInfo& info, int num_threads) {
  QProblem p{};
  p.rows = x.sizes[0];
  p.n = blocks.sizes[0];
  p.k = x.sizes[1];
  p.padded_k = round_up(p.k, kXAlign);
  const Kernels<Elem> code = kernels<Elem>(format);
  QuantizedX xq(p.rows, p.padded_k);
  code.quantize_x(x, p.padded_k, xq);
  p.xq = xq.q();
  p.x_scale = xq.scale();
  p.x_sums = xq.sums();
  p.blocks = static_cast<const uint8_t*>(blocks.data);
  p.row_stride = blocks.strides[0];
  p.out = out.data;
  p.out_stride = out.strides[0];

  const int64_t pairs = (p.n + 1) / 2;
  const int64_t pair_bytes = std::max<int64_t>(1, 2 * p.k / info.block_weights * info.block_bytes);
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / pair_bytes);  // pairs per chunk
  const int64_t chunks = (pairs + chunk - 1) / chunk;
  const int threads = static_cast<int>(std::min<int64_t>(num_threads, chunks));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) code.multiply_rows(p, c * chunk, std::min(pairs, (c + 1) * chunk));
}

template <class Elem>
void write_zeros(const TensorView& out) {
  for (int64_t r = 0; r < out.sizes[0]; ++r) {
    Elem* row = static_cast<Elem*>(out.data) + r * out.strides[0];
    for (int64_t n = 0; n < out.sizes[1]; ++n) row[n] = from_float<Elem>(0.0f);
  }
}

// ---- dequantize: one weight row, in python/fmkernels/quantized.py's fp32 operations ----------

void dequantize_row(const uint8_t* p, QuantFormat format, int64_t k, float* w) {
  switch (format) {
    case QuantFormat::kQ8_0:
      for (int64_t b = 0; b < k; b += 32, p += Q8_0Layout::kBlockBytes) {
        const float d = half_at(p);
        for (int i = 0; i < 32; ++i) w[b + i] = d * static_cast<float>(static_cast<int8_t>(p[2 + i]));
      }
      break;
    case QuantFormat::kQ4_0:
      for (int64_t b = 0; b < k; b += 32, p += Q4_0Layout::kBlockBytes) {
        const float d = half_at(p);
        for (int i = 0; i < 16; ++i) {
          w[b + i] = d * static_cast<float>((p[2 + i] & 0xF) - 8);
          w[b + 16 + i] = d * static_cast<float>((p[2 + i] >> 4) - 8);
        }
      }
      break;
    case QuantFormat::kQ4_1:
      for (int64_t b = 0; b < k; b += 32, p += Q4_1Layout::kBlockBytes) {
        const float d = half_at(p), m = half_at(p + 2);
        for (int i = 0; i < 16; ++i) {
          w[b + i] = d * static_cast<float>(p[4 + i] & 0xF) + m;
          w[b + 16 + i] = d * static_cast<float>(p[4 + i] >> 4) + m;
        }
      }
      break;
    case QuantFormat::kQ4_K:
      for (int64_t b = 0; b < k; b += 256, p += Q4_KLayout::kBlockBytes) {
        K4Header h;
        k4_header(p, h);
        for (int g = 0; g < 8; ++g) {
          const uint8_t* q = p + 16 + 32 * (g / 2);
          const int shift = (g & 1) * 4;
          // (d * sc) * q - dmin * m: h.bias holds -(dmin * m), and x - y = x + -y exactly.
          for (int i = 0; i < 32; ++i)
            w[b + 32 * g + i] = h.scale[g] * static_cast<float>((q[i] >> shift) & 0xF) + h.bias[g];
        }
      }
      break;
    case QuantFormat::kQ6_K:
      for (int64_t b = 0; b < k; b += 256, p += Q6_KLayout::kBlockBytes) {
        K6Header h;
        k6_header(p, h);
        for (int j = 0; j < 8; ++j) {  // weights 32j..32j+31
          const int half_index = j / 4, i = j % 4;
          const uint8_t* ql = p + 64 * half_index + 32 * (i % 2);
          const uint8_t* qh = p + 128 + 32 * half_index;
          const int low_shift = i >= 2 ? 4 : 0;
          for (int l = 0; l < 32; ++l) {
            const int q = (((ql[l] >> low_shift) & 0xF) | (((qh[l] >> (2 * i)) & 3) << 4)) - 32;
            w[b + 32 * j + l] = h.scale[2 * j + l / 16] * static_cast<float>(q);
          }
        }
      }
      break;
  }
}

}  // namespace

const char* linear_quantized(const TensorView& x, const TensorView& blocks, int format, const TensorView& out,
                             int num_threads) {
  FormatInfo info{};
  if (const char* error = check_views(x, blocks, format, out, info)) return error;
  if (x.sizes[0] == 0 || blocks.sizes[0] == 0) return nullptr;
  const auto quant = static_cast<QuantFormat>(format);
  num_threads = std::max(1, num_threads);
  switch (x.dtype) {
    case DType::kFloat32:
      if (x.sizes[1] == 0) return write_zeros<float>(out), nullptr;
      run<float>(x, blocks, quant, out, info, num_threads);
      break;
    case DType::kFloat16:
      if (x.sizes[1] == 0) return write_zeros<Float16>(out), nullptr;
      run<Float16>(x, blocks, quant, out, info, num_threads);
      break;
    default:
      if (x.sizes[1] == 0) return write_zeros<BFloat16>(out), nullptr;
      run<BFloat16>(x, blocks, quant, out, info, num_threads);
      break;
  }
  return nullptr;
}

const char* dequantize(const TensorView& blocks, int format, const TensorView& out, int num_threads) {
  if (out.rank != 2 || out.dtype != DType::kFloat32) return "dequantize: out must be a 2-D float32 (N, K) view";
  FormatInfo info{};
  if (const char* error = check_blocks(blocks, format, out.sizes[1], info)) return error;
  if (out.sizes[0] != blocks.sizes[0]) return "dequantize: out must have the blocks' N rows";
  if (out.sizes[1] > 1 && out.strides[1] != 1) return "dequantize: out must have unit stride along K";
  if (out.sizes[0] > 1 && out.sizes[1] > 0 && out.strides[0] < out.sizes[1]) return "dequantize: out's rows overlap";
  const int64_t n = out.sizes[0], k = out.sizes[1];
  if (n == 0 || k == 0) return nullptr;
  const auto quant = static_cast<QuantFormat>(format);
  const auto* src = static_cast<const uint8_t*>(blocks.data);
  auto* dst = static_cast<float*>(out.data);
  const int threads = static_cast<int>(std::min<int64_t>(std::max(1, num_threads), n));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < n; ++row)
    dequantize_row(src + row * blocks.strides[0], quant, k, dst + row * out.strides[0]);
  return nullptr;
}

}  // namespace fmkernels::cpu
