#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bindings_cpu.h"
#include "bindings_views.h"
#include "cpu/linear.h"
#include "cpu/linear_quantized.h"

namespace py = pybind11;

namespace fmkernels {
namespace {

void linear(py::handle x, py::handle weight, py::handle out, int num_threads) {
  const TensorView x_view = view_from_python(x, "x");
  const TensorView weight_view = view_from_python(weight, "weight");
  const TensorView out_view = view_from_python(out, "out");
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = cpu::linear(x_view, weight_view, out_view, num_threads);
  }
  if (error != nullptr) throw std::invalid_argument(error);
}

void linear_quantized(py::handle x, py::handle blocks, int format, py::handle out, int num_threads) {
  const TensorView x_view = view_from_python(x, "x");
  const TensorView blocks_view = view_from_python(blocks, "blocks");
  const TensorView out_view = view_from_python(out, "out");
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = cpu::linear_quantized(x_view, blocks_view, format, out_view, num_threads);
  }
  if (error != nullptr) throw std::invalid_argument(error);
}

void dequantize(py::handle blocks, int format, py::handle out, int num_threads) {
  const TensorView blocks_view = view_from_python(blocks, "blocks");
  const TensorView out_view = view_from_python(out, "out");
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = cpu::dequantize(blocks_view, format, out_view, num_threads);
  }
  if (error != nullptr) throw std::invalid_argument(error);
}

}  // namespace

void bind_cpu_linear(py::module_& m) {
  m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("num_threads"),
        "out = x @ weight^T for a few rows of x: x (rows, K), weight (N, K), out (rows, N).");
  m.def("linear_quantized", &linear_quantized, py::arg("x"), py::arg("blocks"), py::arg("format"), py::arg("out"),
        py::arg("num_threads"),
        "out = x @ W^T for a few rows of x against W (N, K) in a GGUF block format: x (rows, K), blocks "
        "(N, K / block * bytes) uint8, format = GGML's type number, out (rows, N) in x's dtype.");
  m.def("dequantize", &dequantize, py::arg("blocks"), py::arg("format"), py::arg("out"), py::arg("num_threads"),
        "out (N, K) float32 = the weight that blocks (N, K / block * bytes) uint8 of GGML type format hold.");
}

}  // namespace fmkernels
