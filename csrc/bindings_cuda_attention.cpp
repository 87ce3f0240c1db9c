#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings_cuda.h"
#include "bindings_views.h"
#include "common/attention_shapes.h"
#include "cuda/attention.cuh"

namespace py = pybind11;

namespace fmkernels {
namespace {

void attention(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
               py::handle cu_seqlens_q, py::handle cu_seqlens_k, bool causal, float scale,
               int64_t max_seqlen_q, int variant, uintptr_t stream) {
  if (variant < 0 || variant >= cuda::kAttentionVariants)
    throw std::invalid_argument("attention (cuda): variant must be in [0, " +
                                std::to_string(cuda::kAttentionVariants) + "); got " + std::to_string(variant));
  const AttentionViews views = attention_views(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k);
  const TensorView* lse_view = views.lse.get();
  const TensorView* cu_q = views.cu_seqlens_q.get();
  const TensorView* cu_k = views.cu_seqlens_k.get();
  if (const char* error = check_attention_shapes(views.q, views.k, views.v, views.out, lse_view, cu_q, cu_k))
    throw std::invalid_argument(error);
  if (const char* error = cuda::attention_unsupported(views.q, views.k, views.v, views.out, cu_q, cu_k))
    throw std::invalid_argument(error);
  raise_on_cuda_error(cuda::attention(views.q, views.k, views.v, views.out, lse_view, cu_q, cu_k, max_seqlen_q,
                                      causal, scale, variant, reinterpret_cast<cudaStream_t>(stream)),
                      "attention");
}

}  // namespace

void bind_cuda_attention(py::module_& m) {
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("causal"),
        py::arg("scale"), py::arg("max_seqlen_q"), py::arg("variant"), py::arg("stream"),
        "Prefill attention on tensor cores, dense or packed (varlen), GQA and bottom-right causal "
        "masks; max_seqlen_q bounds the packed query tiles launched; variant picks the kernel's "
        "schedule (0 <= variant < ATTENTION_VARIANTS; all compute the same result).");
  m.attr("ATTENTION_VARIANTS") = cuda::kAttentionVariants;
}

}  // namespace fmkernels
