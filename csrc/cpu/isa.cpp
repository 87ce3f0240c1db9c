#include "cpu/isa.h"

#include <cstdlib>
#include <cstring>

namespace fmkernels::cpu {

Isa cpu_isa() {
  Isa best = Isa::kGeneric;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma")) {
    best = Isa::kAvx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = Isa::kAvx2;
  }
#endif
  const char* cap = std::getenv("FMKERNELS_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "generic") == 0) return Isa::kGeneric;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) return Isa::kAvx2;
  return best;
}

bool cpu_has_avx512_vnni() {
  if (cpu_isa() != Isa::kAvx512) return false;
  const char* cap = std::getenv("FMKERNELS_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "avx512") == 0) return false;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

}  // namespace fmkernels::cpu
