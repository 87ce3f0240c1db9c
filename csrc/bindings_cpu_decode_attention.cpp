// (being written: bindings for the decode_attention CPU kernel)
#include "bindings_cpu.h"

namespace fmkernels {
void bind_cpu_decode_attention(pybind11::module_&) {}
}  // namespace fmkernels
