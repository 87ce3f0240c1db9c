// fmkernels._C: the C++ CPU kernels, called with tensor views from the ops layer.
#include "bindings_cpu.h"

#include <pybind11/pybind11.h>

#include "cpu/isa.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fmkernels C++ CPU kernels";
  fmkernels::bind_cpu_append_kv(m);
  fmkernels::bind_cpu_attention(m);
  fmkernels::bind_cpu_decode_attention(m);
  fmkernels::bind_cpu_linear(m);
  fmkernels::bind_cpu_sampling(m);
  // The instruction set the kernels' hot loops run (benchmarks name it beside the CPU).
  m.def("isa", [] {
    switch (fmkernels::cpu::cpu_isa()) {
      case fmkernels::cpu::Isa::kAvx512: return "avx512";
      case fmkernels::cpu::Isa::kAvx2: return "avx2";
      default: return "generic";
    }
  });
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
