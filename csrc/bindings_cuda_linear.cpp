#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "bindings_cuda.h"
#include "bindings_views.h"
#include "cuda/linear_quantized.cuh"

namespace py = pybind11;

namespace fmkernels {
namespace {

// fmkernels.quantized's format names as cuda::QuantFormat numbers them.
int format_number(const std::string& format) {
  static const char* const names[] = {"q8_0", "q4_0", "q4_1", "q4_k", "q6_k"};
  for (int i = 0; i < 5; ++i)
    if (format == names[i]) return i;
  throw std::invalid_argument("format must be one of q8_0, q4_0, q4_1, q4_k, q6_k; got '" + format + "'");
}

void linear_quantized(py::handle x, py::handle blocks, const std::string& format, py::handle out, uintptr_t stream) {
  const TensorView v_x = view_from_python(x, "x");
  const TensorView v_blocks = view_from_python(blocks, "blocks");
  const TensorView v_out = view_from_python(out, "out");
  const int number = format_number(format);
  if (const char* error = cuda::check_linear_quantized_views(v_x, v_blocks, number, v_out))
    throw std::invalid_argument(error);
  if (const char* error =
          cuda::linear_quantized(v_x, v_blocks, number, v_out, reinterpret_cast<cudaStream_t>(stream)))
    throw std::runtime_error(std::string("fmkernels.linear (cuda): ") + error);
}

}  // namespace

void bind_cuda_linear(py::module_& m) {
  m.def("linear_quantized", &linear_quantized, py::arg("x"), py::arg("blocks"), py::arg("format"), py::arg("out"),
        py::arg("stream"),
        "out = x @ dequantize(blocks)^T for up to 64 rows of x (rows, K) against a GGUF-quantized weight's "
        "blocks (N, K / B * block bytes) uint8, format one of q8_0, q4_0, q4_1, q4_k, q6_k; out (rows, N) "
        "in x's dtype.");
}

}  // namespace fmkernels
