// fmkernels._C: the C++ CPU kernels, called with tensor views from the ops layer.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bindings_views.h"
#include "cpu/append_kv.h"

namespace py = pybind11;
using fmkernels::view_from_python;

namespace {

void append_kv(py::handle k_cache, py::handle v_cache, py::handle k, py::handle v,
               py::handle cache_seqlens, py::handle block_table) {
  const auto k_cache_view = view_from_python(k_cache, "k_cache");
  const auto v_cache_view = view_from_python(v_cache, "v_cache");
  const auto k_view = view_from_python(k, "k");
  const auto v_view = view_from_python(v, "v");
  const auto seqlens_view = view_from_python(cache_seqlens, "cache_seqlens");
  fmkernels::TensorView table_view;
  const bool paged = !block_table.is_none();
  if (paged) table_view = view_from_python(block_table, "block_table");
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = fmkernels::cpu::append_kv(k_cache_view, v_cache_view, k_view, v_view, seqlens_view,
                                      paged ? &table_view : nullptr);
  }
  if (error != nullptr) throw std::invalid_argument(error);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fmkernels C++ CPU kernels";
  m.def("append_kv", &append_kv, py::arg("k_cache"), py::arg("v_cache"), py::arg("k"),
        py::arg("v"), py::arg("cache_seqlens"), py::arg("block_table"),
        "Write k, v into a contiguous or paged KV cache at each sequence's length.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
