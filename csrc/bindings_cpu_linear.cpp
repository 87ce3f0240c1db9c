#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bindings_cpu.h"
#include "bindings_views.h"
#include "cpu/linear.h"

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

}  // namespace

void bind_cpu_linear(py::module_& m) {
  m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("num_threads"),
        "out = x @ weight^T for a few rows of x: x (rows, K), weight (N, K), out (rows, N).");
}

}  // namespace fmkernels
