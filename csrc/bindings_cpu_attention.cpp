// (being written: bindings for the attention CPU kernel)
#include "bindings_cpu.h"

namespace fmkernels {
void bind_cpu_attention(pybind11::module_&) {}
}  // namespace fmkernels
