// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
// and the uniform numbers fmkernels draws from it, exactly as fmkernels.reference
// defines them: token i of a row uses word i % 4 of philox(key = (seed low, seed high),
// counter = (i / 4, step low, step high, 0)), and u = ((word >> 9) + 0.5) / 2**23, which
// is exact in fp32 and lies in [2**-24, 1 - 2**-24].
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FMKERNELS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FMKERNELS_HOST_DEVICE inline
#endif

namespace fmkernels {

struct PhiloxWords {
  uint32_t w[4];
};

FMKERNELS_HOST_DEVICE PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return {{c0, c1, c2, c3}};
}

// The four uniforms of tokens 4 * group .. 4 * group + 3 of a row with this seed and step.
FMKERNELS_HOST_DEVICE void uniform4(uint64_t seed, uint64_t step, uint64_t group, float u[4]) {
  const PhiloxWords words =
      philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(step),
                    static_cast<uint32_t>(step >> 32), 0u, static_cast<uint32_t>(seed),
                    static_cast<uint32_t>(seed >> 32));
  for (int i = 0; i < 4; ++i)
    u[i] = (static_cast<float>(words.w[i] >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

}  // namespace fmkernels
