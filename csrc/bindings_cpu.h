// fmkernels._C is assembled from one bindings file per op; each adds its functions here.
#pragma once

#include <pybind11/pybind11.h>

namespace fmkernels {

void bind_cpu_append_kv(pybind11::module_& m);
void bind_cpu_attention(pybind11::module_& m);
void bind_cpu_decode_attention(pybind11::module_& m);
void bind_cpu_linear(pybind11::module_& m);
void bind_cpu_sampling(pybind11::module_& m);

}  // namespace fmkernels
