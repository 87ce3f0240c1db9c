// Decode attention on the CPU: a few new queries per sequence against a long KV cache.
//
// Memory bound: every key and value row of every sequence is read once, 2 * batch *
// kv_heads * L * head_dim elements, against ~4 flops per element per query head of a
// group. So the work is split into units (sequence b, KV heads [h_begin, h_end), positions
// [begin, end)): a unit reads each K and V row once, in tiles of kTile positions, for all
// group x n_new query rows that use that KV head (GQA), with an online softmax in fp32,
// and prefetches the rows of the next (head, tile) while it computes. A long context is
// cut into several units (split-KV, as flash-decoding) whose partial results are merged by
// their log-sum-exp, so one sequence keeps every thread busy.
//
// The hot loops are written once with GCC vector types of W floats and compiled three
// times (AVX-512: W=16, AVX2+FMA: W=8, baseline x86-64: W=4), chosen at run time.
#include "cpu/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/decode_attention_shapes.h"
#include "cpu/dtype.h"
#include "cpu/isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// The vector helpers take and return GCC vector types by value. They are always inlined
// into the per-ISA functions (attend_avx512, attend_avx2, attend_baseline), so no vector
// crosses a call and GCC's note that such calls change the ABI does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define FMK_INLINE inline __attribute__((always_inline))

namespace fmkernels::cpu {
namespace {

constexpr int64_t kMaxHeadDim = kDecodeAttentionMaxHeadDim;
constexpr int64_t kTile = 32;       // positions per tile: a tile's scores, K and V rows stay in L1/L2
constexpr int64_t kMinSplit = 256;  // a split reads at least this many positions (merging costs ~1)
constexpr int64_t kUnitsPerThread = 8;  // splitting aims at this many units per thread, for balance
constexpr int64_t kUnitFloats = 16384;  // q (and acc) floats of the KV heads one unit reads together
constexpr int64_t kMaxWidth = 16;   // floats per vector on the widest ISA (AVX-512)
constexpr float kLog2e = 1.44269504088896340736f;
constexpr float kLn2 = 0.69314718055994530942f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------
// Vectors of W lanes
// ---------------------------------------------------------------------------

template <int W>
struct V {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
};

template <int W>
FMK_INLINE typename V<W>::f splat(float x) {
  typename V<W>::f v = {};
  return v + x;
}

template <int W>
FMK_INLINE typename V<W>::f load(const float* p) {
  typename V<W>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
FMK_INLINE void store(float* p, const typename V<W>::f& v) {
  std::memcpy(p, &v, sizeof v);
}

template <int W>
FMK_INLINE float hsum(const typename V<W>::f& x) {
  if constexpr (W == 4) {
    return (x[0] + x[2]) + (x[1] + x[3]);
  } else {
    typename V<W / 2>::f lo, hi;
    std::memcpy(&lo, &x, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof lo, sizeof hi);
    return hsum<W / 2>(lo + hi);
  }
}

// W elements widened to fp32. bf16 is the top half of an fp32; fp16 is rebuilt from its
// fields without touching an fp32 subnormal (so flush-to-zero modes cannot change it).
template <int W>
FMK_INLINE typename V<W>::f widen(const float* p) {
  return load<W>(p);
}

template <int W>
FMK_INLINE typename V<W>::f widen(const BFloat16* p) {
  using vf = typename V<W>::f;
  using vu = typename V<W>::u;
  typename V<W>::h bits;
  std::memcpy(&bits, p, sizeof bits);
  return (vf)(__builtin_convertvector(bits, vu) << 16);
}

template <int W>
FMK_INLINE typename V<W>::f widen(const Float16* p) {
  using vf = typename V<W>::f;
  using vu = typename V<W>::u;
  typename V<W>::h bits16;
  std::memcpy(&bits16, p, sizeof bits16);
  const vu h = __builtin_convertvector(bits16, vu);
  const vu shifted_exponent = vu{} + (0x7C00u << 13);
  vu o = (h & 0x7FFFu) << 13;                   // exponent and mantissa in fp32 position
  const vu exponent = o & shifted_exponent;
  o += (127u - 15u) << 23;                      // rebias the exponent
  o += (exponent == shifted_exponent) ? vu{} + ((128u - 16u) << 23) : vu{};  // inf, NaN
  // fp16 subnormal: 2^-14 * (1 + m/1024) - 2^-14, exactly m * 2^-24
  const vf magic = (vf)(vu{} + (113u << 23));
  const vf subnormal = (vf)(o + (1u << 23)) - magic;
  o = (exponent == 0) ? (vu)(subnormal) : o;
  return (vf)(o | ((h & 0x8000u) << 16));
}

// 2^x for x <= 0 (scores minus their running maximum), 0 below 2^-125: round x to
// n + f with |f| <= 1/2, then 2^f by its Taylor series to degree 7 (relative error < 1e-8
// before rounding), and n added to the exponent.
template <int W>
FMK_INLINE typename V<W>::f exp2_nonpositive(const typename V<W>::f& x) {
  using vf = typename V<W>::f;
  using vi = typename V<W>::i;
  const vf clamped = x < -125.0f ? splat<W>(-125.0f) : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf shifted = clamped + round_magic;
  const vf n = shifted - round_magic;
  const vf f = clamped - n;
  vf poly = splat<W>(1.5252733804059840e-5f);
  poly = poly * f + 1.5403530393381609e-4f;
  poly = poly * f + 1.3333558146428443e-3f;
  poly = poly * f + 9.6181291076284772e-3f;
  poly = poly * f + 5.5504108664821580e-2f;
  poly = poly * f + 2.4022650695910071e-1f;
  poly = poly * f + 6.9314718055994531e-1f;
  poly = poly * f + 1.0f;
  const vi exponent = ((vi)(shifted) - (vi)(splat<W>(round_magic))) << 23;
  const vf result = (vf)((vi)(poly) + exponent);
  return x < -125.0f ? vf{} : result;
}

// ---------------------------------------------------------------------------
// The problem, as the kernels index it
// ---------------------------------------------------------------------------

struct Problem {
  int64_t batch, n_new, q_heads, kv_heads, head_dim, group;
  const void* q;
  int64_t q_stride[3];
  const void* k;
  int64_t k_stride[3];
  const void* v;
  int64_t v_stride[3];
  const int32_t* seqlens;
  int64_t seqlens_stride;
  const int32_t* table;  // nullptr: a contiguous cache
  int64_t table_stride[2];
  int64_t block_size;
  void* out;
  int64_t out_stride[3];
  float* lse;  // nullptr: not wanted
  int64_t lse_stride[3];
  float scale_log2;  // scale * log2(e): scores are kept in base 2
  int64_t heads_per_unit;  // KV heads one unit reads together, position by position

  int64_t rows() const { return n_new * group; }  // query rows per KV head: r = i * group + g
  int64_t seqlen(int64_t b) const { return seqlens[b * seqlens_stride]; }

  // Element offset of (position pos, KV head h) of sequence b in a cache with these strides.
  int64_t cache_offset(const int64_t* stride, int64_t b, int64_t h, int64_t pos) const {
    if (table == nullptr) return b * stride[0] + pos * stride[1] + h * stride[2];
    const int64_t block = table[b * table_stride[0] + (pos / block_size) * table_stride[1]];
    return block * stride[0] + (pos % block_size) * stride[1] + h * stride[2];
  }
};

// Positions [begin, end) of sequence b against KV heads [h_begin, h_end). slot < 0: the
// unit covers the whole sequence and writes out/lse itself; otherwise it writes
// partials[slot].
struct Unit {
  int64_t b, h_begin, h_end, begin, end, slot;
};

// KV heads [h_begin, h_end) of sequence b cut into count units along the positions, whose
// partials are slots [first_slot, first_slot + count).
struct SplitPair {
  int64_t b, h_begin, h_end, first_slot, count;
};

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// Floats of scratch one thread needs (the widest ISA's padding, which covers the others).
int64_t scratch_floats(const Problem& p) {
  const int64_t dim = round_up(p.head_dim, kMaxWidth), rows = p.heads_per_unit * p.rows();
  return round_up(2 * kTile * dim + p.rows() * kTile + 2 * rows * dim + 2 * rows, kMaxWidth);
}

// A partial result: acc (heads x rows x padded dim, unnormalised), then m (base-2 running
// max) and l (sum of 2^(s - m)) per row.
int64_t partial_floats(const Problem& p) {
  const int64_t rows = p.heads_per_unit * p.rows();
  return rows * round_up(p.head_dim, kMaxWidth) + 2 * rows;
}

template <class Elem>
void store_output_row(const Problem& p, int64_t b, int64_t i, int64_t hq, const float* acc,
                      float m, float l) {
  Elem* dst = static_cast<Elem*>(p.out) + b * p.out_stride[0] + i * p.out_stride[1] +
              hq * p.out_stride[2];
  const float inv = 1.0f / l;
  for (int64_t d = 0; d < p.head_dim; ++d) dst[d] = from_float<Elem>(acc[d] * inv);
  if (p.lse != nullptr)
    p.lse[b * p.lse_stride[0] + hq * p.lse_stride[1] + i * p.lse_stride[2]] =
        (m + std::log2(l)) * kLn2;
}

// ---------------------------------------------------------------------------
// One unit, for vectors of W floats
// ---------------------------------------------------------------------------

// Row `src` (n elements) widened into dst, scaled, zero-padded to `padded`.
template <int W, class Elem>
FMK_INLINE void widen_row(const Elem* src, int64_t n, float scale, float* dst, int64_t padded) {
  int64_t d = 0;
  for (; d + W <= n; d += W) store<W>(dst + d, widen<W>(src + d) * scale);
  for (; d < n; ++d) dst[d] = to_float(src[d]) * scale;
  for (; d < padded; ++d) dst[d] = 0.0f;
}

// The fp32 row of (b, h, pos): the cache itself when it is fp32 with no padding needed,
// otherwise widened into buffer.
template <int W, class Elem>
FMK_INLINE const float* cache_row(const Problem& p, const void* cache, const int64_t* stride,
                                  int64_t b, int64_t h, int64_t pos, int64_t padded,
                                  float* buffer) {
  const Elem* src = static_cast<const Elem*>(cache) + p.cache_offset(stride, b, h, pos);
  if constexpr (std::is_same_v<Elem, float>) {
    if (padded == p.head_dim) return src;
  }
  widen_row<W>(src, p.head_dim, 1.0f, buffer, padded);
  return buffer;
}

// The next (head, tile) a unit reads, whose rows are prefetched while this one is computed:
// a unit's rows of one position are kv_heads x head_dim elements away from the next
// position's in a contiguous cache, too far apart for the hardware prefetchers.
struct Prefetch {
  const char* k[kTile];
  const char* v[kTile];
  int64_t n = 0;      // rows
  int64_t lines = 0;  // 64-byte lines per row
};

template <class Elem>
FMK_INLINE void plan_prefetch(const Problem& p, int64_t b, int64_t h, int64_t start, int64_t end,
                              Prefetch& next) {
  next.n = std::max<int64_t>(0, std::min(kTile, end - start));
  next.lines = (p.head_dim * static_cast<int64_t>(sizeof(Elem)) + 63) / 64;
  for (int64_t t = 0; t < next.n; ++t) {
    next.k[t] = reinterpret_cast<const char*>(static_cast<const Elem*>(p.k) +
                                              p.cache_offset(p.k_stride, b, h, start + t));
    next.v[t] = reinterpret_cast<const char*>(static_cast<const Elem*>(p.v) +
                                              p.cache_offset(p.v_stride, b, h, start + t));
  }
}

FMK_INLINE void prefetch_row(const char* const* rows, const Prefetch& next, int64_t t) {
  if (t >= next.n) return;
  for (int64_t line = 0; line < next.lines; ++line) __builtin_prefetch(rows[t] + 64 * line, 0, 1);
}

// scores[r * kTile + t] = q_r . k_t for 4 rows at a time.
template <int W>
FMK_INLINE void tile_scores(const float* q, int64_t rows, const float* const* k, int64_t n,
                            int64_t dim, float* scores, const Prefetch& next) {
  using vf = typename V<W>::f;
  // Key row t of the next (head, tile) is prefetched beside key t, spread over the work.
  if (rows < 4) {
    for (int64_t t = 0; t < next.n; ++t) prefetch_row(next.k, next, t);
  }
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float* q0 = q + r * dim;
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) {
      if (r == 0) {
        prefetch_row(next.k, next, t);
        prefetch_row(next.k, next, t + 1);
      }
      vf a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
      for (int64_t d = 0; d < dim; d += W) {
        const vf k0 = load<W>(k[t] + d), k1 = load<W>(k[t + 1] + d);
        const vf x0 = load<W>(q0 + d), x1 = load<W>(q0 + dim + d);
        const vf x2 = load<W>(q0 + 2 * dim + d), x3 = load<W>(q0 + 3 * dim + d);
        a0 += x0 * k0;
        a1 += x1 * k0;
        a2 += x2 * k0;
        a3 += x3 * k0;
        b0 += x0 * k1;
        b1 += x1 * k1;
        b2 += x2 * k1;
        b3 += x3 * k1;
      }
      scores[r * kTile + t] = hsum<W>(a0);
      scores[(r + 1) * kTile + t] = hsum<W>(a1);
      scores[(r + 2) * kTile + t] = hsum<W>(a2);
      scores[(r + 3) * kTile + t] = hsum<W>(a3);
      scores[r * kTile + t + 1] = hsum<W>(b0);
      scores[(r + 1) * kTile + t + 1] = hsum<W>(b1);
      scores[(r + 2) * kTile + t + 1] = hsum<W>(b2);
      scores[(r + 3) * kTile + t + 1] = hsum<W>(b3);
    }
    for (; t < n; ++t) {
      if (r == 0) prefetch_row(next.k, next, t);
      vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t d = 0; d < dim; d += W) {
        const vf kv = load<W>(k[t] + d);
        a0 += load<W>(q0 + d) * kv;
        a1 += load<W>(q0 + dim + d) * kv;
        a2 += load<W>(q0 + 2 * dim + d) * kv;
        a3 += load<W>(q0 + 3 * dim + d) * kv;
      }
      scores[r * kTile + t] = hsum<W>(a0);
      scores[(r + 1) * kTile + t] = hsum<W>(a1);
      scores[(r + 2) * kTile + t] = hsum<W>(a2);
      scores[(r + 3) * kTile + t] = hsum<W>(a3);
    }
  }
  for (; r < rows; ++r) {
    for (int64_t t = 0; t < n; ++t) {
      vf a = {};
      for (int64_t d = 0; d < dim; d += W) a += load<W>(q + r * dim + d) * load<W>(k[t] + d);
      scores[r * kTile + t] = hsum<W>(a);
    }
  }
}

// acc_r += sum_t p[r][t] * v_t over the first `visible` positions, 4 vectors of acc at a time.
// acc_j += sum_t p_j[t] * v_t over the first `visible` positions, for `count` (1 or 2) rows
// that share every V load, 4 vectors of each acc at a time. With `first` set, value row t of
// the next (head, tile) is prefetched beside row t.
template <int W>
FMK_INLINE void tile_accumulate(const float* p0, const float* p1, int count,
                                const float* const* v, int64_t visible, int64_t dim, float* acc0,
                                float* acc1, const Prefetch& next, bool first) {
  using vf = typename V<W>::f;
  if (first && (dim < 4 * W || visible < next.n)) {
    for (int64_t t = 0; t < next.n; ++t) prefetch_row(next.v, next, t);
    first = false;
  }
  int64_t d = 0;
  for (; d + 4 * W <= dim; d += 4 * W) {
    vf a0 = load<W>(acc0 + d), a1 = load<W>(acc0 + d + W);
    vf a2 = load<W>(acc0 + d + 2 * W), a3 = load<W>(acc0 + d + 3 * W);
    if (count == 2) {
      vf b0 = load<W>(acc1 + d), b1 = load<W>(acc1 + d + W);
      vf b2 = load<W>(acc1 + d + 2 * W), b3 = load<W>(acc1 + d + 3 * W);
      for (int64_t t = 0; t < visible; ++t) {
        if (first && d == 0) prefetch_row(next.v, next, t);
        const float* row = v[t] + d;
        const vf v0 = load<W>(row), v1 = load<W>(row + W);
        const vf v2 = load<W>(row + 2 * W), v3 = load<W>(row + 3 * W);
        const float w0 = p0[t], w1 = p1[t];
        a0 += w0 * v0;
        a1 += w0 * v1;
        a2 += w0 * v2;
        a3 += w0 * v3;
        b0 += w1 * v0;
        b1 += w1 * v1;
        b2 += w1 * v2;
        b3 += w1 * v3;
      }
      store<W>(acc1 + d, b0);
      store<W>(acc1 + d + W, b1);
      store<W>(acc1 + d + 2 * W, b2);
      store<W>(acc1 + d + 3 * W, b3);
    } else {
      for (int64_t t = 0; t < visible; ++t) {
        if (first && d == 0) prefetch_row(next.v, next, t);
        const float* row = v[t] + d;
        const float w0 = p0[t];
        a0 += w0 * load<W>(row);
        a1 += w0 * load<W>(row + W);
        a2 += w0 * load<W>(row + 2 * W);
        a3 += w0 * load<W>(row + 3 * W);
      }
    }
    store<W>(acc0 + d, a0);
    store<W>(acc0 + d + W, a1);
    store<W>(acc0 + d + 2 * W, a2);
    store<W>(acc0 + d + 3 * W, a3);
  }
  for (; d < dim; d += W) {
    vf a = load<W>(acc0 + d), c = count == 2 ? load<W>(acc1 + d) : vf{};
    for (int64_t t = 0; t < visible; ++t) {
      const vf row = load<W>(v[t] + d);
      a += p0[t] * row;
      c += p1[t] * row;  // p1 is p0 for a single row; its sum is dropped
    }
    store<W>(acc0 + d, a);
    if (count == 2) store<W>(acc1 + d, c);
  }
}

// One tile of positions [start, start + n) against KV head h, for its rows query rows:
// scores, online softmax, and acc += p . V.
template <int W, class Elem>
FMK_INLINE void attend_tile(const Problem& p, int64_t b, int64_t h, int64_t start, int64_t n,
                            int64_t last_seen_by_first, const float* q, float* acc, float* m,
                            float* l, float* scores, float* k_buffer, float* v_buffer,
                            const Prefetch& next) {
  using vf = typename V<W>::f;
  const int64_t dim = round_up(p.head_dim, W), rows = p.rows(), group = p.group;
  const float* k_rows[kTile];
  const float* v_rows[kTile];
  for (int64_t t = 0; t < n; ++t)
    k_rows[t] = cache_row<W, Elem>(p, p.k, p.k_stride, b, h, start + t, dim, k_buffer + t * dim);
  tile_scores<W>(q, rows, k_rows, n, dim, scores, next);

  // Online softmax: mask, new running max, probabilities, rescale what came before.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t visible = std::clamp<int64_t>(last_seen_by_first + r / group - start + 1, 0, n);
    float* s = scores + r * kTile;
    if (visible == 0) continue;
    float tile_max = s[0];
    for (int64_t t = 1; t < visible; ++t) tile_max = std::max(tile_max, s[t]);
    for (int64_t t = visible; t < kTile; ++t) s[t] = kNegInf;
    const float m_new = std::max(m[r], tile_max);
    const float correction = std::exp2(m[r] - m_new);  // 0 on the first tile (m = -inf)
    vf sum = {};
    for (int64_t t = 0; t < kTile; t += W) {
      const vf prob = exp2_nonpositive<W>(load<W>(s + t) - m_new);
      store<W>(s + t, prob);
      sum += prob;
    }
    l[r] = l[r] * correction + hsum<W>(sum);
    m[r] = m_new;
    if (correction != 1.0f) {
      float* a = acc + r * dim;
      for (int64_t d = 0; d < dim; d += W) store<W>(a + d, load<W>(a + d) * correction);
    }
  }

  for (int64_t t = 0; t < n; ++t)
    v_rows[t] = cache_row<W, Elem>(p, p.v, p.v_stride, b, h, start + t, dim, v_buffer + t * dim);
  // Rows in pairs of the same query position (they see the same positions).
  for (int64_t r = 0; r < rows;) {
    const int64_t visible = std::clamp<int64_t>(last_seen_by_first + r / group - start + 1, 0, n);
    const int count = (r + 1 < rows && (r + 1) / group == r / group) ? 2 : 1;
    tile_accumulate<W>(scores + r * kTile, scores + (r + count - 1) * kTile, count, v_rows,
                       visible, dim, acc + r * dim, acc + (r + count - 1) * dim, next, r == 0);
    r += count;
  }
}

// A unit: heads [h_begin, h_end) of sequence b over positions [begin, end), tile by tile,
// every head of a tile before the next tile (so the cache is read in address order).
template <int W, class Elem>
FMK_INLINE void attend(const Problem& p, const Unit& u, float* scratch, float* partials) {
  const int64_t dim = round_up(p.head_dim, W), rows = p.rows(), group = p.group;
  const int64_t heads = u.h_end - u.h_begin;
  float* k_buffer = scratch;                  // kTile x dim
  float* v_buffer = k_buffer + kTile * dim;   // kTile x dim
  float* scores = v_buffer + kTile * dim;     // rows x kTile: scores, then probabilities
  float* q = scores + rows * kTile;           // heads x rows x dim, times scale * log2(e)
  float* acc = q + heads * rows * dim;        // heads x rows x dim
  float* m = acc + heads * rows * dim;        // heads x rows
  float* l = m + heads * rows;                // heads x rows

  const int64_t b = u.b;
  const int64_t last_seen_by_first = p.seqlen(b) - p.n_new;  // query i sees positions <= this + i
  for (int64_t h = u.h_begin; h < u.h_end; ++h) {
    for (int64_t i = 0; i < p.n_new; ++i) {
      for (int64_t g = 0; g < group; ++g) {
        const Elem* src = static_cast<const Elem*>(p.q) + b * p.q_stride[0] +
                          i * p.q_stride[1] + (h * group + g) * p.q_stride[2];
        widen_row<W>(src, p.head_dim, p.scale_log2,
                     q + ((h - u.h_begin) * rows + i * group + g) * dim, dim);
      }
    }
  }
  std::fill(acc, acc + heads * rows * dim, 0.0f);
  std::fill(m, m + heads * rows, kNegInf);
  std::fill(l, l + heads * rows, 0.0f);

  Prefetch next;
  for (int64_t start = u.begin; start < u.end; start += kTile) {
    const int64_t n = std::min(kTile, u.end - start);
    for (int64_t h = u.h_begin; h < u.h_end; ++h) {
      if (h + 1 < u.h_end) {
        plan_prefetch<Elem>(p, b, h + 1, start, u.end, next);
      } else {
        plan_prefetch<Elem>(p, b, u.h_begin, start + kTile, u.end, next);
      }
      const int64_t offset = (h - u.h_begin) * rows;
      attend_tile<W, Elem>(p, b, h, start, n, last_seen_by_first, q + offset * dim,
                           acc + offset * dim, m + offset, l + offset, scores, k_buffer, v_buffer,
                           next);
    }
  }

  if (u.slot < 0) {
    for (int64_t h = u.h_begin; h < u.h_end; ++h) {
      const int64_t offset = (h - u.h_begin) * rows;
      for (int64_t r = 0; r < rows; ++r)
        store_output_row<Elem>(p, b, r / group, h * group + r % group, acc + (offset + r) * dim,
                               m[offset + r], l[offset + r]);
    }
    return;
  }
  const int64_t partial_dim = round_up(p.head_dim, kMaxWidth);
  float* partial = partials + u.slot * partial_floats(p);
  for (int64_t r = 0; r < heads * rows; ++r)
    std::copy(acc + r * dim, acc + r * dim + p.head_dim, partial + r * partial_dim);
  std::copy(m, m + heads * rows, partial + heads * rows * partial_dim);
  std::copy(l, l + heads * rows, partial + heads * rows * partial_dim + heads * rows);
}

using AttendFn = void (*)(const Problem&, const Unit&, float*, float*);

template <class Elem>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
void attend_avx512(const Problem& p, const Unit& u, float* scratch, float* partials) {
  attend<16, Elem>(p, u, scratch, partials);
}

template <class Elem>
__attribute__((target("avx2,fma,f16c")))
void attend_avx2(const Problem& p, const Unit& u, float* scratch, float* partials) {
  attend<8, Elem>(p, u, scratch, partials);
}

template <class Elem>
void attend_baseline(const Problem& p, const Unit& u, float* scratch, float* partials) {
  attend<4, Elem>(p, u, scratch, partials);
}

template <class Elem>
AttendFn pick_attend() {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return attend_avx512<Elem>;
    case Isa::kAvx2:
      return attend_avx2<Elem>;
    case Isa::kGeneric:
      break;
  }
  return attend_baseline<Elem>;
}

// ---------------------------------------------------------------------------
// Splits, the parallel run, and the merge
// ---------------------------------------------------------------------------

// out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, with M the largest m_s.
template <class Elem>
void merge(const Problem& p, const SplitPair& pair, const float* partials) {
  const int64_t rows = (pair.h_end - pair.h_begin) * p.rows();
  const int64_t partial_dim = round_up(p.head_dim, kMaxWidth), stride = partial_floats(p);
  const float* first = partials + pair.first_slot * stride;
  float merged[kMaxHeadDim];
  for (int64_t r = 0; r < rows; ++r) {
    float top = kNegInf;
    for (int64_t s = 0; s < pair.count; ++s) top = std::max(top, first[s * stride + rows * partial_dim + r]);
    float total = 0.0f;
    std::fill(merged, merged + p.head_dim, 0.0f);
    for (int64_t s = 0; s < pair.count; ++s) {
      const float* partial = first + s * stride;
      const float m = partial[rows * partial_dim + r];
      if (m == kNegInf) continue;  // this split holds no position row r sees
      const float weight = std::exp2(m - top);
      total += weight * partial[rows * partial_dim + rows + r];
      for (int64_t d = 0; d < p.head_dim; ++d) merged[d] += weight * partial[r * partial_dim + d];
    }
    const int64_t h = pair.h_begin + r / p.rows(), row = r % p.rows();
    store_output_row<Elem>(p, pair.b, row / p.group, h * p.group + row % p.group, merged, top, total);
  }
}

template <class Elem>
void run(Problem& p, int num_threads) {
  // Head grouping: a unit reads as many KV heads together as keep its q and acc within
  // kUnitFloats each (all of them for decode), so a contiguous cache is read in address
  // order. Split policy: cut sequences into pieces of split_length positions so that there
  // are about kUnitsPerThread units per thread, never pieces shorter than kMinSplit; with
  // one thread, or enough sequences, nothing is split.
  const int64_t row_floats = p.rows() * round_up(p.head_dim, kMaxWidth);
  const int64_t head_chunks =
      (p.kv_heads + std::max<int64_t>(1, kUnitFloats / row_floats) - 1) /
      std::max<int64_t>(1, kUnitFloats / row_floats);
  p.heads_per_unit = (p.kv_heads + head_chunks - 1) / head_chunks;
  int64_t total = 0, longest = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    total += p.seqlen(b) * p.kv_heads;
    longest = std::max<int64_t>(longest, p.seqlen(b));
  }
  int64_t split_length = longest;
  if (num_threads > 1) {
    const int64_t wanted = num_threads * kUnitsPerThread;
    const int64_t positions = (total + wanted * p.heads_per_unit - 1) / (wanted * p.heads_per_unit);
    split_length = round_up(std::max(kMinSplit, positions), kTile);
  }
  std::vector<Unit> units;
  std::vector<SplitPair> pairs;
  int64_t slots = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t length = p.seqlen(b);
    const int64_t count = (length + split_length - 1) / split_length;
    for (int64_t h = 0; h < p.kv_heads; h += p.heads_per_unit) {
      const int64_t h_end = std::min(p.kv_heads, h + p.heads_per_unit);
      if (count <= 1) {
        units.push_back({b, h, h_end, 0, length, -1});
        continue;
      }
      pairs.push_back({b, h, h_end, slots, count});
      for (int64_t s = 0; s < count; ++s)
        units.push_back({b, h, h_end, s * split_length, std::min(length, (s + 1) * split_length), slots + s});
      slots += count;
    }
  }
  // Longest first, so that the dynamic schedule ends with short units on every thread.
  std::stable_sort(units.begin(), units.end(), [](const Unit& x, const Unit& y) {
    return x.end - x.begin > y.end - y.begin;
  });

  const int threads = static_cast<int>(std::min<int64_t>(num_threads, static_cast<int64_t>(units.size())));
  const int64_t per_thread = scratch_floats(p);
  // One allocation per call, aligned to 64 bytes for the vector loads.
  std::vector<float> scratch(static_cast<size_t>(threads * per_thread + kMaxWidth));
  float* scratch_base = scratch.data() + (kMaxWidth - reinterpret_cast<uintptr_t>(scratch.data()) / sizeof(float) % kMaxWidth) % kMaxWidth;
  std::vector<float> partials(static_cast<size_t>(slots * partial_floats(p)));
  const AttendFn attend_unit = pick_attend<Elem>();
  const int64_t unit_count = static_cast<int64_t>(units.size());
  const int64_t pair_count = static_cast<int64_t>(pairs.size());

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    float* mine = scratch_base + omp_get_thread_num() * per_thread;
#else
    float* mine = scratch_base;
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < unit_count; ++j) attend_unit(p, units[j], mine, partials.data());
#pragma omp for schedule(static)
    for (int64_t j = 0; j < pair_count; ++j) merge<Elem>(p, pairs[j], partials.data());
  }
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

// Every length in [n_new, capacity], and every block a sequence reads inside the pool.
const char* check_positions(const Problem& p, int64_t capacity, int64_t num_blocks) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t length = p.seqlen(b);
    if (length < p.n_new)
      return "decode_attention: cache_seqlens[b] must count the new tokens (>= n_new)";
    if (length > capacity) return "decode_attention: cache_seqlens[b] exceeds the cache capacity";
    if (p.table == nullptr) continue;
    for (int64_t j = 0; j <= (length - 1) / p.block_size; ++j) {
      const int64_t block = p.table[b * p.table_stride[0] + j * p.table_stride[1]];
      if (block < 0 || block >= num_blocks)
        return "decode_attention: block_table holds a block id outside the pool";
    }
  }
  return nullptr;
}

}  // namespace

const char* decode_attention(const TensorView& q, const TensorView& k_cache,
                             const TensorView& v_cache, const TensorView& cache_seqlens,
                             const TensorView* block_table, const TensorView& out,
                             const TensorView* lse, float scale, int num_threads) {
  if (const char* error =
          check_decode_attention_shapes(q, k_cache, v_cache, cache_seqlens, block_table, out, lse))
    return error;
  Problem p{};
  p.batch = q.sizes[0];
  p.n_new = q.sizes[1];
  p.q_heads = q.sizes[2];
  p.head_dim = q.sizes[3];
  p.kv_heads = k_cache.sizes[2];
  p.group = p.q_heads / p.kv_heads;
  p.q = q.data;
  p.k = k_cache.data;
  p.v = v_cache.data;
  p.out = out.data;
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = q.strides[d];
    p.k_stride[d] = k_cache.strides[d];
    p.v_stride[d] = v_cache.strides[d];
    p.out_stride[d] = out.strides[d];
  }
  p.seqlens = static_cast<const int32_t*>(cache_seqlens.data);
  p.seqlens_stride = cache_seqlens.strides[0];
  p.block_size = k_cache.sizes[1];
  int64_t capacity = k_cache.sizes[1];
  if (block_table != nullptr) {
    p.table = static_cast<const int32_t*>(block_table->data);
    p.table_stride[0] = block_table->strides[0];
    p.table_stride[1] = block_table->strides[1];
    capacity = block_table->sizes[1] * p.block_size;
  }
  if (lse != nullptr) {
    p.lse = static_cast<float*>(lse->data);
    for (int d = 0; d < 3; ++d) p.lse_stride[d] = lse->strides[d];
  }
  p.scale_log2 = scale * kLog2e;
  if (!std::isfinite(scale)) return "decode_attention: scale must be finite";
  if (const char* error = check_positions(p, capacity, k_cache.sizes[0])) return error;
  if (p.batch == 0) return nullptr;

  num_threads = std::max(1, num_threads);
  switch (q.dtype) {
    case DType::kFloat32:
      run<float>(p, num_threads);
      break;
    case DType::kFloat16:
      run<Float16>(p, num_threads);
      break;
    case DType::kBFloat16:
      run<BFloat16>(p, num_threads);
      break;
    default:
      return "decode_attention: q must be float32, float16 or bfloat16";
  }
  return nullptr;
}

}  // namespace fmkernels::cpu
