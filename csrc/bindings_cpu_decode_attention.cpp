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
  const DecodeAttentionViews views =
      decode_attention_views(q, k_cache, v_cache, cache_seqlens, block_table, out, lse);
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = cpu::decode_attention(views.q, views.k_cache, views.v_cache, views.cache_seqlens,
                                  views.block_table.get(), views.out, views.lse.get(), scale,
                                  num_threads);
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
