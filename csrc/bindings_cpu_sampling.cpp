// (being written: bindings for the sampling CPU kernel)
#include "bindings_cpu.h"

namespace fmkernels {
void bind_cpu_sampling(pybind11::module_&) {}
}  // namespace fmkernels
