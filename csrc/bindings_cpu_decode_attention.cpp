#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bindings_cpu.h"
#include "bindings_views.h"
#include "cpu/decode_attention.h"

namespace py = pybind11;

namespace fmkernels {
namespace {

void decode_attention(py::handle q, py::handle k_cache, py::handle v_cache,
                      py::handle cache_seqlens, py::handle block_table, py::handle out,
                      py::handle lse, float scale, int num_threads) {
  const TensorView q_view = view_from_python(q, "q");
  const TensorView k_view = view_from_python(k_cache, "k_cache");
  const TensorView v_view = view_from_python(v_cache, "v_cache");
  const TensorView seqlens_view = view_from_python(cache_seqlens, "cache_seqlens");
  const OptionalView table_view = optional_view_from_python(block_table, "block_table");
  const TensorView out_view = view_from_python(out, "out");
  const OptionalView lse_view = optional_view_from_python(lse, "lse");
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = cpu::decode_attention(q_view, k_view, v_view, seqlens_view, table_view.get(), out_view,
                                  lse_view.get(), scale, num_threads);
  }
  if (error != nullptr) throw std::invalid_argument(error);
}

}  // namespace

void bind_cpu_decode_attention(py::module_& m) {
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("block_table"), py::arg("out"),
        py::arg("lse"), py::arg("scale"), py::arg("num_threads"),
        "Attention of n_new new queries per sequence against a contiguous or paged KV cache.");
}

}  // namespace fmkernels
