#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "bindings_cuda.h"
#include "bindings_views.h"
#include "common/attention_shapes.h"
#include "cuda/attention.cuh"

namespace py = pybind11;

namespace fmkernels {
namespace {

void attention(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
               py::handle cu_seqlens_q, py::handle cu_seqlens_k, bool causal, float scale,
               int64_t max_seqlen_q, uintptr_t stream) {
  const TensorView q_view = view_from_python(q, "q");
  const TensorView k_view = view_from_python(k, "k");
  const TensorView v_view = view_from_python(v, "v");
  const TensorView out_view = view_from_python(out, "out");
  const OptionalView lse_view = optional_view_from_python(lse, "lse");
  const OptionalView cu_q_view = optional_view_from_python(cu_seqlens_q, "cu_seqlens_q");
  const OptionalView cu_k_view = optional_view_from_python(cu_seqlens_k, "cu_seqlens_k");
  if (const char* error = check_attention_shapes(q_view, k_view, v_view, out_view, lse_view.get(),
                                                 cu_q_view.get(), cu_k_view.get()))
    throw std::invalid_argument(error);
  if (const char* error = cuda::attention_unsupported(q_view, k_view, v_view, out_view, cu_q_view.get(),
                                                     cu_k_view.get()))
    throw std::invalid_argument(error);
  raise_on_cuda_error(cuda::attention(q_view, k_view, v_view, out_view, lse_view.get(), cu_q_view.get(),
                                      cu_k_view.get(), max_seqlen_q, causal, scale,
                                      reinterpret_cast<cudaStream_t>(stream)),
                      "attention");
}

}  // namespace

void bind_cuda_attention(py::module_& m) {
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("causal"),
        py::arg("scale"), py::arg("max_seqlen_q"), py::arg("stream"),
        "Prefill attention on tensor cores, dense or packed (varlen), GQA and bottom-right causal "
        "masks; max_seqlen_q bounds the packed query tiles launched.");
}

}  // namespace fmkernels
