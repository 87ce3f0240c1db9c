// Which instruction set the CPU kernels' hot loops use, chosen at run time so that the
// default build runs on any x86-64.
#pragma once

namespace fmkernels::cpu {

enum class Isa { kGeneric, kAvx2, kAvx512 };

// The widest set this CPU supports that the kernels have a variant for (AVX-512 with
// VL/BW/DQ, or AVX2 with FMA), capped by FMKERNELS_CPU_ISA=avx2 or generic when set.
Isa cpu_isa();

// Whether the AVX-512 code may use AVX512_VNNI's vpdpbusd: cpu_isa() is kAvx512 and the CPU
// has it, unless FMKERNELS_CPU_ISA=avx512 asks for AVX-512 without it.
bool cpu_has_avx512_vnni();

}  // namespace fmkernels::cpu
