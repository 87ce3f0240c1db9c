#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "bindings_cuda.h"
#include "bindings_views.h"
#include "common/decode_attention_shapes.h"
#include "cuda/decode_attention.cuh"

namespace py = pybind11;

namespace fmkernels {
namespace {

void decode_attention(py::handle q, py::handle k_cache, py::handle v_cache,
                      py::handle cache_seqlens, py::handle block_table, py::handle out,
                      py::handle lse, float scale, int64_t num_splits, py::handle partial_out,
                      py::handle partial_lse, int variant, uintptr_t stream) {
  const DecodeAttentionViews views =
      decode_attention_views(q, k_cache, v_cache, cache_seqlens, block_table, out, lse);
  const OptionalView partial_out_view = optional_view_from_python(partial_out, "partial_out");
  const OptionalView partial_lse_view = optional_view_from_python(partial_lse, "partial_lse");
  if (const char* error = check_decode_attention_shapes(views.q, views.k_cache, views.v_cache,
                                                        views.cache_seqlens, views.block_table.get(),
                                                        views.out, views.lse.get()))
    throw std::invalid_argument(error);
  if (const char* error = cuda::check_decode_attention_launch(
          views.q, views.k_cache, views.v_cache, views.block_table.get(), num_splits,
          partial_out_view.get(), partial_lse_view.get(), variant))
    throw std::invalid_argument(error);
  raise_on_cuda_error(
      cuda::decode_attention(views.q, views.k_cache, views.v_cache, views.cache_seqlens,
                             views.block_table.get(), views.out, views.lse.get(), scale, num_splits,
                             partial_out_view.get(), partial_lse_view.get(), variant,
                             reinterpret_cast<cudaStream_t>(stream)),
      "decode_attention");
}

}  // namespace

void bind_cuda_decode_attention(py::module_& m) {
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("block_table"), py::arg("out"),
        py::arg("lse"), py::arg("scale"), py::arg("num_splits"), py::arg("partial_out"),
        py::arg("partial_lse"), py::arg("variant"), py::arg("stream"),
        "Split-KV attention of n_new new queries per sequence against a contiguous or paged KV "
        "cache on the device; partial_out/partial_lse: fp32 scratch when num_splits > 1; variant: the "
        "split kernel (0: tiled, 1: tiled_shallow; others raise ValueError).");
}

}  // namespace fmkernels
