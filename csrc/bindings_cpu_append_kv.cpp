#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bindings_cpu.h"
#include "bindings_views.h"
#include "cpu/append_kv.h"

namespace py = pybind11;

namespace fmkernels {
namespace {

void append_kv(py::handle k_cache, py::handle v_cache, py::handle k, py::handle v,
               py::handle cache_seqlens, py::handle block_table) {
  const auto views = append_kv_views(k_cache, v_cache, k, v, cache_seqlens, block_table);
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = cpu::append_kv(views.k_cache, views.v_cache, views.k, views.v, views.cache_seqlens,
                           views.block_table.get());
  }
  if (error != nullptr) throw std::invalid_argument(error);
}

}  // namespace

void bind_cpu_append_kv(py::module_& m) {
  m.def("append_kv", &append_kv, py::arg("k_cache"), py::arg("v_cache"), py::arg("k"),
        py::arg("v"), py::arg("cache_seqlens"), py::arg("block_table"),
        "Write k, v into a contiguous or paged KV cache at each sequence's length.");
}

}  // namespace fmkernels
