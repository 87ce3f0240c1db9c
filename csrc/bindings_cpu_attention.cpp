#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bindings_cpu.h"
#include "bindings_views.h"
#include "cpu/attention.h"

namespace py = pybind11;

namespace fmkernels {
namespace {

void attention(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
               py::handle cu_seqlens_q, py::handle cu_seqlens_k, bool causal, float scale,
               int num_threads) {
  const TensorView q_view = view_from_python(q, "q");
  const TensorView k_view = view_from_python(k, "k");
  const TensorView v_view = view_from_python(v, "v");
  const TensorView out_view = view_from_python(out, "out");
  const OptionalView lse_view = optional_view_from_python(lse, "lse");
  const OptionalView cu_q_view = optional_view_from_python(cu_seqlens_q, "cu_seqlens_q");
  const OptionalView cu_k_view = optional_view_from_python(cu_seqlens_k, "cu_seqlens_k");
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = cpu::attention(q_view, k_view, v_view, out_view, lse_view.get(), cu_q_view.get(),
                           cu_k_view.get(), causal, scale, num_threads);
  }
  if (error != nullptr) throw std::invalid_argument(error);
}

}  // namespace

void bind_cpu_attention(py::module_& m) {
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("causal"),
        py::arg("scale"), py::arg("num_threads"),
        "Prefill attention, dense or packed (varlen), GQA and bottom-right causal masks.");
}

}  // namespace fmkernels
