// filter_logits and sample on the CPU, matching fmkernels.reference without sorting the
// vocabulary. The kept set is always a prefix of the rank order (x descending, ties by
// lower id): top-k, top-p and min-p each keep a prefix, and -inf sorts last. So a row is
//   1. one pass for the max and per-block maxima (memory bound);
//   2. a candidate set that surely holds the kept prefix:
//      top-k: tokens >= the k-th largest block maximum (k blocks hold a token at least that
//             large, so the k-th largest token is too), about k tokens;
//      top-p alone: a histogram of probability mass over bins of x, cut where the mass
//             reaches p, plus one bin;
//   3. only the candidates sorted (O(c log c)), and the prefix walked with the reference's
//      arithmetic: probabilities exp(x - max) * (1 / sum) in fp32, the mass before a rank
//      as fp32(double cumulative sum) - p, kept while < top_p;
// or, with neither top-k nor top-p, no sort at all: min-p is a threshold on x.
// With an allowed bitmask, every pass visits only the allowed tokens (from the set bits of each
// 64-token block, for_each_token), so the filters see the allowed distribution and a grammar's
// sparse mask makes a pass cheaper, not dearer; a token read by id has x = -inf if disallowed.
#include "cpu/sampling.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <immintrin.h>

#include "common/philox.h"
#include "common/sampling_shapes.h"
#include "cpu/dtype.h"
#include "cpu/isa.h"

namespace fmkernels::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kBlock = 64;  // tokens per block maximum
// Top-p alone sorts rows up to this long whole, and so sums their probabilities in the
// reference's order; longer rows find the cut with a histogram and sum in double (which can
// differ from the reference's fp32 sum by ~1e-6 relative: a top-p cut that close to p may differ).
constexpr int64_t kSortAll = 4096;
constexpr int kBins = 512;      // top-p histogram over x: kBinsPerNat bins per nat below the max
constexpr float kBinsPerNat = 16.0f;
// Every draw has -log(-log u) <= -log(-log(1 - 2**-24)) = 16.64, so a token more than this
// below the best Gumbel score so far cannot win.
constexpr float kGumbelMax = 17.0f;

struct Params {
  float temperature;
  int64_t top_k;
  float top_p;
  float min_p;
};

// min-p as the reference computes it, exp(x - max) >= min_p, with exp evaluated only near
// the boundary log(min_p) (exp is monotone; 1e-3 is far beyond its rounding).
struct MinP {
  float xmax = 0.0f, min_p = 0.0f, lo = 0.0f, hi = 0.0f;
  MinP() = default;
  MinP(float max_x, float p) : xmax(max_x), min_p(p) {
    const float log_p = p > 0.0f ? std::log(p) : -kInf;
    lo = log_p - 1e-3f;
    hi = log_p + 1e-3f;
  }
  // Also false for -inf (and NaN): such tokens are never kept.
  bool keeps(float x) const {
    if (!(x > -kInf)) return false;
    if (!(min_p > 0.0f)) return true;
    const float d = x - xmax;
    if (d >= hi) return true;
    if (d < lo) return false;
    return std::exp(d) >= min_p;
  }
};

// Sort keys: ascending key = descending x, then ascending token id. -0 counts as +0.
inline uint64_t rank_key(float x, int64_t id) {
  x += 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(~ordered) << 32) | static_cast<uint32_t>(id);
}

inline int64_t key_id(uint64_t key) { return static_cast<int64_t>(key & 0xFFFFFFFFu); }

inline float key_x(uint64_t key) {
  const uint32_t ordered = ~static_cast<uint32_t>(key >> 32);
  const uint32_t bits = (ordered & 0x80000000u) ? (ordered & 0x7FFFFFFFu) : ~ordered;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// Per-thread buffers, allocated once per call.
struct Scratch {
  std::vector<uint64_t> keys;        // candidates (vocab)
  std::vector<float> block_max;      // per-block maxima of x
  std::vector<float> block_select;   // a copy nth_element may reorder
  std::vector<double> bin_mass;      // top-p histogram
  std::vector<int64_t> bin_count;
  std::vector<uint8_t> kept;         // kept flags, for top_ids past the kept tokens

  explicit Scratch(int64_t vocab)
      : keys(vocab), block_max((vocab + kBlock - 1) / kBlock),
        block_select((vocab + kBlock - 1) / kBlock), bin_mass(kBins), bin_count(kBins) {}
};

// The kept tokens of a row: keys[0, count) in rank order (ranked), or every token whose
// x passes min_p (no top-k, no top-p: nothing to sort).
struct Selection {
  bool ranked = true;
  int64_t count = 0;
  float xmax = -kInf;
  MinP min_p;
};

template <typename T>
struct Row {
  const T* logits;
  int64_t vocab;
  float temperature;        // 1 for greedy rows
  const uint32_t* allowed;  // the row's bitmask words, or null (every token allowed)
  bool allows(int64_t i) const { return allowed == nullptr || ((allowed[i >> 5] >> (i & 31)) & 1u) != 0; }
  // The logit, -inf where disallowed.
  float raw(int64_t i) const { return allows(i) ? to_float(logits[i]) : -kInf; }
  float x(int64_t i) const { return allows(i) ? to_float(logits[i]) / temperature : -kInf; }
  // The 64 allowed bits of block b (bit j: token b * kBlock + j), clear past the vocabulary.
  uint64_t block_bits(int64_t b) const {
    const int64_t begin = b * kBlock, n = std::min(kBlock, vocab - begin);
    uint64_t bits = allowed[2 * b];
    if (n > 32) bits |= static_cast<uint64_t>(allowed[2 * b + 1]) << 32;
    return n == 64 ? bits : bits & ((uint64_t{1} << n) - 1);
  }
};

// Calls visit(i, x) for each token of block b (each allowed one, with a mask), in id order.
// With a mask the allowed tokens are found from the set bits, so a pass over a row does no
// work, and no branch the predictor cannot learn, for the tokens a grammar removes.
template <typename T, typename Visit>
inline void for_each_in_block(const Row<T>& row, int64_t b, Visit&& visit) {
  const int64_t begin = b * kBlock;
  if (row.allowed == nullptr) {
    const int64_t end = std::min(row.vocab, begin + kBlock);
    for (int64_t i = begin; i < end; ++i) visit(i, to_float(row.logits[i]) / row.temperature);
    return;
  }
  for (uint64_t bits = row.block_bits(b); bits != 0; bits &= bits - 1) {
    const int64_t i = begin + __builtin_ctzll(bits);
    visit(i, to_float(row.logits[i]) / row.temperature);
  }
}

// for_each_in_block over the whole row.
template <typename T, typename Visit>
inline void for_each_token(const Row<T>& row, Visit&& visit) {
  if (row.allowed == nullptr) {
    for (int64_t i = 0; i < row.vocab; ++i) visit(i, to_float(row.logits[i]) / row.temperature);
    return;
  }
  const int64_t blocks = (row.vocab + kBlock - 1) / kBlock;
  for (int64_t b = 0; b < blocks; ++b) for_each_in_block(row, b, visit);
}

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
float block_maximum(const T* logits, int64_t n) {
  float m = -kInf;
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(logits[i]);
    m = v > m ? v : m;
  }
  return m;
}

// The sum of exp(x - max) over ranks [0, c) as the reference's fp32 softmax takes it over
// the sorted row (torch's AVX-512 reduction): rank r is added to lane r % 16 in rank order,
// then the lanes are halved pairwise; rows shorter than 16 are summed in order. Ranks past c
// add zeros. Matching the order matters: top-p compares a running mass with p.
float reference_sum(const uint64_t* keys, int64_t c, int64_t vocab) {
  constexpr int kLanes = 16;
  const float xmax = key_x(keys[0]);
  if (vocab < kLanes) {
    float sum = 0.0f;
    for (int64_t r = 0; r < c; ++r) sum += std::exp(key_x(keys[r]) - xmax);
    return sum;
  }
  float lanes[kLanes] = {};
  for (int64_t r = 0; r < c; ++r) lanes[r % kLanes] += std::exp(key_x(keys[r]) - xmax);
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
}

// Walks the candidates keys[0, c) in rank order and returns how many the filters keep:
// the first rank that is -inf, below min_p, or whose mass before reaches top_p ends the
// prefix (at least one is kept). Returns -1 if all c pass (the prefix may go on).
int64_t walk_prefix(const uint64_t* keys, int64_t c, const MinP& min_p, bool top_p_on,
                    float top_p, float sum) {
  const float inverse = 1.0f / sum;
  const float xmax = key_x(keys[0]);
  double cumulative = 0.0;
  for (int64_t r = 0; r < c; ++r) {
    const float x = key_x(keys[r]);
    if (!min_p.keeps(x)) return std::max<int64_t>(r, 1);
    if (top_p_on) {
      const float p = std::exp(x - xmax) * inverse;
      cumulative += p;
      const float before = static_cast<float>(cumulative) - p;
      if (!(before < top_p)) return std::max<int64_t>(r, 1);
    }
  }
  return -1;
}

// The largest of a full 64-token block's logits whose bit is set, with vector masks: AVX-512
// masks 16 lanes with 16 bits at a time, AVX2 blends 8 lanes by 8 bits.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
inline __m512 load16_avx512(const float* x) { return _mm512_loadu_ps(x); }
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
inline __m512 load16_avx512(const BFloat16* x) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
inline __m512 load16_avx512(const Float16* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
float masked_block_maximum_avx512(const T* logits, uint64_t bits) {
  __m512 m = _mm512_set1_ps(-kInf);
  for (int k = 0; k < 4; ++k)
    m = _mm512_mask_max_ps(m, static_cast<__mmask16>(bits >> (16 * k)), m, load16_avx512(logits + 16 * k));
  return _mm512_reduce_max_ps(m);
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_avx2(const float* x) { return _mm256_loadu_ps(x); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_avx2(const BFloat16* x) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_avx2(const Float16* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

template <typename T>
__attribute__((target("avx2,fma,f16c")))
float masked_block_maximum_avx2(const T* logits, uint64_t bits) {
  const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 removed = _mm256_set1_ps(-kInf);
  __m256 m = removed;
  for (int k = 0; k < 8; ++k) {
    const __m256i byte = _mm256_set1_epi32(static_cast<int>((bits >> (8 * k)) & 0xFFu));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(byte, lanes), lanes));
    m = _mm256_max_ps(m, _mm256_blendv_ps(removed, load8_avx2(logits + 8 * k), keep));
  }
  const __m128 half = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  const __m128 quarter = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}

// The largest allowed logit of block b (-inf if it allows none): nothing read for a block
// with no bit set, vector masks for any other full block (as cheap for one bit as for 64),
// the bits one by one elsewhere (the last, partial block; a CPU without AVX2).
template <typename T>
float allowed_block_maximum(const Row<T>& row, int64_t b, Isa isa) {
  const int64_t begin = b * kBlock, n = std::min(kBlock, row.vocab - begin);
  uint64_t bits = row.allowed == nullptr ? ~uint64_t{0} : row.block_bits(b);
  if (bits == 0) return -kInf;
  if (n == kBlock) {
    if (isa == Isa::kAvx512) return masked_block_maximum_avx512(row.logits + begin, bits);
    if (isa == Isa::kAvx2) return masked_block_maximum_avx2(row.logits + begin, bits);
  }
  if (row.allowed == nullptr || bits == (n == kBlock ? ~uint64_t{0} : (uint64_t{1} << n) - 1))
    return block_maximum(row.logits + begin, n);
  float m = -kInf;
  for (; bits != 0; bits &= bits - 1) {
    const float v = to_float(row.logits[begin + __builtin_ctzll(bits)]);
    m = v > m ? v : m;
  }
  return m;
}

template <typename T>
Selection select_row(const Row<T>& row, const Params& params, Scratch& s) {
  const int64_t vocab = row.vocab;
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  Selection sel;
  float raw_max = -kInf;
  const Isa isa = cpu_isa();
  for (int64_t b = 0; b < blocks; ++b) {
    const float m = allowed_block_maximum(row, b, isa);
    s.block_max[b] = m;
    raw_max = m > raw_max ? m : raw_max;
  }
  uint64_t* keys = s.keys.data();

  if (!(raw_max > -kInf) || params.temperature == 0.0f) {
    // Greedy, or nothing finite: the first token of rank 0 alone.
    int64_t id = 0;
    if (raw_max > -kInf) {
      int64_t b = 0;
      while (!(s.block_max[b] == raw_max)) ++b;
      id = b * kBlock;
      while (!(row.raw(id) == raw_max)) ++id;
    }
    keys[0] = rank_key(row.x(id), id);
    sel.count = 1;
    sel.xmax = key_x(keys[0]);
    return sel;
  }

  // The maximum commutes with division by a positive temperature (rounding is monotone).
  sel.xmax = raw_max / row.temperature;
  sel.min_p = MinP(sel.xmax, params.min_p);
  const int64_t k = (params.top_k <= 0 || params.top_k >= vocab) ? vocab : params.top_k;
  const bool top_p_on = params.top_p < 1.0f;

  if (k < vocab) {
    for (int64_t b = 0; b < blocks; ++b) s.block_max[b] /= row.temperature;
    float threshold = -kInf;
    if (blocks >= k) {
      std::copy(s.block_max.begin(), s.block_max.begin() + blocks, s.block_select.begin());
      std::nth_element(s.block_select.begin(), s.block_select.begin() + (k - 1),
                       s.block_select.begin() + blocks, std::greater<float>());
      threshold = s.block_select[k - 1];
    }
    int64_t c = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      if (!(s.block_max[b] >= threshold)) continue;
      for_each_in_block(row, b, [&](int64_t i, float x) {
        if (x >= threshold) keys[c++] = rank_key(x, i);
      });
    }
    // With a mask, fewer than k tokens may be allowed (the threshold is then -inf): all are candidates.
    const int64_t ranked = std::min(k, c);
    if (c > ranked) std::nth_element(keys, keys + ranked, keys + c);
    std::sort(keys, keys + ranked);
    const float sum = top_p_on ? reference_sum(keys, ranked, vocab) : 1.0f;
    const int64_t kept = walk_prefix(keys, ranked, sel.min_p, top_p_on, params.top_p, sum);
    sel.count = kept < 0 ? ranked : kept;
    return sel;
  }

  if (top_p_on && vocab <= kSortAll) {
    int64_t c = 0;
    for_each_token(row, [&](int64_t i, float x) {
      if (x > -kInf) keys[c++] = rank_key(x, i);
    });
    std::sort(keys, keys + c);
    const int64_t kept = walk_prefix(keys, c, sel.min_p, true, params.top_p, reference_sum(keys, c, vocab));
    sel.count = kept < 0 ? c : kept;
    return sel;
  }

  if (top_p_on) {
    // Probability mass per bin of x below the max; the cut bin holds the rank where the
    // mass reaches p. One bin more covers the reference's rounding.
    std::fill(s.bin_mass.begin(), s.bin_mass.end(), 0.0);
    std::fill(s.bin_count.begin(), s.bin_count.end(), 0);
    double sum = 0.0;
    for_each_token(row, [&](int64_t, float x) {
      const float d = x - sel.xmax;
      if (!(d > -kInf)) return;
      const float e = std::exp(d);
      sum += e;
      const int bin = static_cast<int>(std::min(-d * kBinsPerNat, static_cast<float>(kBins - 1)));
      s.bin_mass[bin] += e;
      ++s.bin_count[bin];
    });
    const double target = static_cast<double>(params.top_p) * sum;
    int cut = 0;
    for (double mass = s.bin_mass[0]; cut < kBins - 1 && mass < target;) mass += s.bin_mass[++cut];
    cut = std::min(cut + 1, kBins - 1);
    for (int lo = 0;;) {
      // Candidates: bins [lo, cut], appended after the sorted bins before lo.
      int64_t c0 = 0;
      for (int b = 0; b < lo; ++b) c0 += s.bin_count[b];
      int64_t c = c0;
      for_each_token(row, [&](int64_t i, float x) {
        const float d = x - sel.xmax;
        if (!(d > -kInf)) return;
        const int bin = static_cast<int>(std::min(-d * kBinsPerNat, static_cast<float>(kBins - 1)));
        if (bin >= lo && bin <= cut) keys[c++] = rank_key(x, i);
      });
      std::sort(keys + c0, keys + c);
      const int64_t kept = walk_prefix(keys, c, sel.min_p, true, params.top_p, static_cast<float>(sum));
      if (kept >= 0 || cut == kBins - 1) {
        sel.count = kept < 0 ? c : kept;
        return sel;
      }
      lo = cut + 1;
      cut = kBins - 1;
    }
  }

  sel.ranked = false;
  return sel;
}

template <typename T>
void filter_row(const Row<T>& row, const Selection& sel, const uint64_t* keys, T* out) {
  const T removed = from_float<T>(-kInf);
  if (sel.ranked) {
    std::fill(out, out + row.vocab, removed);
    for (int64_t r = 0; r < sel.count; ++r) {
      const int64_t id = key_id(keys[r]);
      out[id] = from_float<T>(row.x(id));
    }
    return;
  }
  if (row.allowed != nullptr) std::fill(out, out + row.vocab, removed);
  for_each_token(row, [&](int64_t i, float x) { out[i] = sel.min_p.keeps(x) ? from_float<T>(x) : removed; });
}

// The Gumbel-max draw: argmax over kept tokens of x - log(-log u), lowest id on ties.
template <typename T>
int64_t draw_row(const Row<T>& row, const Selection& sel, const uint64_t* keys, uint64_t seed,
                 uint64_t step) {
  float best = -kInf;
  int64_t best_id = -1;
  uint64_t group = ~uint64_t{0};
  float u[4];
  auto score = [&](float x, int64_t id) {
    if (static_cast<uint64_t>(id) / 4 != group) {
      group = static_cast<uint64_t>(id) / 4;
      uniform4(seed, step, group, u);
    }
    return x - std::log(-std::log(u[id % 4]));
  };
  if (sel.ranked) {
    for (int64_t r = 0; r < sel.count; ++r) {
      const float x = key_x(keys[r]);
      if (x + kGumbelMax < best) break;  // ranks go down in x: nothing after can win
      const int64_t id = key_id(keys[r]);
      const float g = score(x, id);
      if (g > best || (g == best && id < best_id)) {
        best = g;
        best_id = id;
      }
    }
    return best_id < 0 ? key_id(keys[0]) : best_id;
  }
  for_each_token(row, [&](int64_t i, float x) {
    if (!sel.min_p.keeps(x)) return;
    if (best_id < 0) best_id = i;
    if (x + kGumbelMax < best) return;
    const float g = score(x, i);
    if (g > best) {
      best = g;
      best_id = i;
    }
  });
  return best_id < 0 ? 0 : best_id;
}

struct LogprobOutputs {
  float* logprob;       // the token's, or null
  int64_t* top_ids;     // n of them, stride top_ids_stride
  float* top_logprobs;
  int64_t n, ids_stride, logprobs_stride;
};

// log_softmax of the filtered logits: (x - max) - log(sum of exp(x - max) over kept).
template <typename T>
void logprob_row(const Row<T>& row, const Selection& sel, Scratch& s, int64_t token,
                 const LogprobOutputs& o) {
  const float xmax = sel.xmax;
  double sum = 0.0;
  int64_t kept = sel.count;
  uint64_t* keys = s.keys.data();
  if (sel.ranked) {
    for (int64_t r = 0; r < sel.count; ++r) sum += std::exp(key_x(keys[r]) - xmax);
  } else {
    kept = 0;
    for_each_token(row, [&](int64_t i, float x) {
      if (!sel.min_p.keeps(x)) return;
      sum += std::exp(x - xmax);
      keys[kept++] = rank_key(x, i);  // for top_ids
    });
    const int64_t n = std::min(o.n, kept);
    std::partial_sort(keys, keys + n, keys + kept);
  }
  const float log_sum = static_cast<float>(std::log(sum));
  auto logprob = [&](float x) { return x > -kInf ? (x - xmax) - log_sum : -kInf; };
  *o.logprob = logprob(row.x(token));
  const int64_t n_kept = std::min(o.n, kept);
  for (int64_t j = 0; j < n_kept; ++j) {
    o.top_ids[j * o.ids_stride] = key_id(keys[j]);
    o.top_logprobs[j * o.logprobs_stride] = logprob(key_x(keys[j]));
  }
  if (n_kept == o.n) return;
  // The removed tokens follow at -inf, lowest id first.
  std::fill(s.kept.begin(), s.kept.begin() + row.vocab, 0);
  for (int64_t r = 0; r < kept; ++r) s.kept[key_id(keys[r])] = 1;
  int64_t j = n_kept;
  for (int64_t i = 0; i < row.vocab && j < o.n; ++i) {
    if (s.kept[i]) continue;
    o.top_ids[j * o.ids_stride] = i;
    o.top_logprobs[j * o.logprobs_stride] = -kInf;
    ++j;
  }
}

Params row_params(const TensorView& temperature, const TensorView& top_k, const TensorView& top_p,
                  const TensorView& min_p, int64_t b) {
  const float t = static_cast<const float*>(temperature.data)[b * temperature.strides[0]];
  return {t > 0.0f ? t : 0.0f, static_cast<const int64_t*>(top_k.data)[b * top_k.strides[0]],
          static_cast<const float*>(top_p.data)[b * top_p.strides[0]],
          static_cast<const float*>(min_p.data)[b * min_p.strides[0]]};
}

template <typename T>
Row<T> make_row(const TensorView& logits, const TensorView* allowed, int64_t b, const Params& params) {
  return {static_cast<const T*>(logits.data) + b * logits.strides[0], logits.sizes[1],
          params.temperature == 0.0f ? 1.0f : params.temperature,
          allowed == nullptr ? nullptr : static_cast<const uint32_t*>(allowed->data) + b * allowed->strides[0]};
}

template <typename T>
void filter_rows(const TensorView& logits, const TensorView& out, const TensorView& temperature,
                 const TensorView& top_k, const TensorView& top_p, const TensorView& min_p,
                 const TensorView* allowed, int num_threads) {
  const int64_t batch = logits.sizes[0], vocab = logits.sizes[1];
#pragma omp parallel num_threads(num_threads)
  {
    Scratch scratch(vocab);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const Params params = row_params(temperature, top_k, top_p, min_p, b);
      const Row<T> row = make_row<T>(logits, allowed, b, params);
      const Selection sel = select_row(row, params, scratch);
      filter_row(row, sel, scratch.keys.data(), static_cast<T*>(out.data) + b * out.strides[0]);
    }
  }
}

template <typename T>
void sample_rows(const TensorView& logits, const TensorView& tokens, const TensorView& temperature,
                 const TensorView& top_k, const TensorView& top_p, const TensorView& min_p,
                 const TensorView& seeds, const TensorView& steps, const TensorView* allowed,
                 const TensorView* logprobs, const TensorView* top_ids, const TensorView* top_logprobs,
                 int num_threads) {
  const int64_t batch = logits.sizes[0], vocab = logits.sizes[1];
#pragma omp parallel num_threads(num_threads)
  {
    Scratch scratch(vocab);
    if (logprobs != nullptr) scratch.kept.resize(vocab);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const Params params = row_params(temperature, top_k, top_p, min_p, b);
      const Row<T> row = make_row<T>(logits, allowed, b, params);
      const Selection sel = select_row(row, params, scratch);
      const auto seed = static_cast<uint64_t>(static_cast<const int64_t*>(seeds.data)[b * seeds.strides[0]]);
      const auto step = static_cast<uint64_t>(static_cast<const int64_t*>(steps.data)[b * steps.strides[0]]);
      const int64_t token = draw_row(row, sel, scratch.keys.data(), seed, step);
      static_cast<int64_t*>(tokens.data)[b * tokens.strides[0]] = token;
      if (logprobs == nullptr) continue;
      const int64_t n = top_ids->sizes[1];
      const LogprobOutputs o{
          static_cast<float*>(logprobs->data) + b * logprobs->strides[0],
          n > 0 ? static_cast<int64_t*>(top_ids->data) + b * top_ids->strides[0] : nullptr,
          n > 0 ? static_cast<float*>(top_logprobs->data) + b * top_logprobs->strides[0] : nullptr,
          n, top_ids->strides[1], top_logprobs->strides[1]};
      logprob_row(row, sel, scratch, token, o);
    }
  }
}

}  // namespace

int64_t first_row_without_allowed(const TensorView& allowed, int64_t vocab) {
  const int64_t words = (vocab + 31) / 32;
  if (vocab < 1 || allowed.rank != 2 || allowed.dtype != DType::kInt32 || allowed.sizes[1] != words ||
      (allowed.data == nullptr && allowed.sizes[0] > 0) || (words > 1 && allowed.strides[1] != 1) ||
      (allowed.sizes[0] > 1 && allowed.strides[0] < 0))
    return -2;
  const uint32_t tail = vocab % 32 == 0 ? ~0u : (1u << (vocab % 32)) - 1;
  for (int64_t b = 0; b < allowed.sizes[0]; ++b) {
    const uint32_t* row = static_cast<const uint32_t*>(allowed.data) + b * allowed.strides[0];
    int64_t w = 0;
    while (w < words - 1 && row[w] == 0) ++w;
    if (w == words - 1 && (row[w] & tail) == 0) return b;
  }
  return -1;
}

const char* filter_logits(const TensorView& logits, const TensorView& out,
                          const TensorView& temperature, const TensorView& top_k,
                          const TensorView& top_p, const TensorView& min_p, const TensorView* allowed,
                          int num_threads) {
  if (const char* error = check_sampling_logits(logits)) return error;
  const int64_t batch = logits.sizes[0];
  if (const char* error = check_filtered_rows(logits, out)) return error;
  if (const char* error = check_sampling_parameters(batch, temperature, top_k, top_p, min_p)) return error;
  if (const char* error = check_allowed(logits, allowed)) return error;
  if (batch == 0) return nullptr;
  num_threads = std::max(1, num_threads);
  switch (logits.dtype) {
    case DType::kFloat32:
      filter_rows<float>(logits, out, temperature, top_k, top_p, min_p, allowed, num_threads);
      break;
    case DType::kFloat16:
      filter_rows<Float16>(logits, out, temperature, top_k, top_p, min_p, allowed, num_threads);
      break;
    default:
      filter_rows<BFloat16>(logits, out, temperature, top_k, top_p, min_p, allowed, num_threads);
      break;
  }
  return nullptr;
}

const char* sample(const TensorView& logits, const TensorView& tokens,
                   const TensorView& temperature, const TensorView& top_k,
                   const TensorView& top_p, const TensorView& min_p, const TensorView& seeds,
                   const TensorView& steps, const TensorView* allowed, const TensorView* logprobs,
                   const TensorView* top_ids, const TensorView* top_logprobs, int num_threads) {
  if (const char* error = check_sampling_logits(logits)) return error;
  const int64_t batch = logits.sizes[0], vocab = logits.sizes[1];
  if (const char* error = check_sample_vectors(batch, tokens, seeds, steps)) return error;
  if (const char* error = check_sampling_parameters(batch, temperature, top_k, top_p, min_p)) return error;
  if (const char* error = check_allowed(logits, allowed)) return error;
  if ((logprobs == nullptr) != (top_ids == nullptr) || (top_ids == nullptr) != (top_logprobs == nullptr))
    return "logprobs, top_ids and top_logprobs come together or not at all";
  if (logprobs != nullptr) {
    if (!is_sampling_vector(*logprobs, batch, DType::kFloat32)) return "logprobs must be float32 (batch,)";
    const int64_t n = top_ids->rank == 2 ? top_ids->sizes[1] : -1;
    if (batch > 0 && n > 0 && (top_ids->data == nullptr || top_logprobs->data == nullptr))
      return "top_ids and top_logprobs have no data";
    if (top_ids->rank != 2 || top_ids->dtype != DType::kInt64 || top_ids->sizes[0] != batch || n > vocab)
      return "top_ids must be int64 (batch, n) with n <= vocab";
    if (top_logprobs->rank != 2 || top_logprobs->dtype != DType::kFloat32 ||
        top_logprobs->sizes[0] != batch || top_logprobs->sizes[1] != n)
      return "top_logprobs must be float32 (batch, n) like top_ids";
    if ((n > 1 && (top_ids->strides[1] < 1 || top_logprobs->strides[1] < 1)) ||
        (batch > 1 && n > 0 && (top_ids->strides[0] < 1 || top_logprobs->strides[0] < 1)))
      return "top_ids and top_logprobs must have positive strides";
  }
  if (batch == 0) return nullptr;
  num_threads = std::max(1, num_threads);
  switch (logits.dtype) {
    case DType::kFloat32:
      sample_rows<float>(logits, tokens, temperature, top_k, top_p, min_p, seeds, steps, allowed, logprobs,
                         top_ids, top_logprobs, num_threads);
      break;
    case DType::kFloat16:
      sample_rows<Float16>(logits, tokens, temperature, top_k, top_p, min_p, seeds, steps, allowed, logprobs,
                           top_ids, top_logprobs, num_threads);
      break;
    default:
      sample_rows<BFloat16>(logits, tokens, temperature, top_k, top_p, min_p, seeds, steps, allowed,
                            logprobs, top_ids, top_logprobs, num_threads);
      break;
  }
  return nullptr;
}

}  // namespace fmkernels::cpu
