// fmkernels._C: the C++ CPU kernels, called with tensor views from the ops layer.
#include "bindings_cpu.h"

#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fmkernels C++ CPU kernels";
  fmkernels::bind_cpu_append_kv(m);
  fmkernels::bind_cpu_attention(m);
  fmkernels::bind_cpu_decode_attention(m);
  fmkernels::bind_cpu_sampling(m);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
