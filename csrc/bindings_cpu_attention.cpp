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
  const AttentionViews views = attention_views(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k);
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = cpu::attention(views.q, views.k, views.v, views.out, views.lse.get(), views.cu_seqlens_q.get(),
                           views.cu_seqlens_k.get(), causal, scale, num_threads);
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
