#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bindings_cuda.h"
#include "bindings_views.h"
#include "cuda/sampling.cuh"

namespace py = pybind11;

namespace fmkernels {
namespace {

void filter_logits(py::handle logits, py::handle out, py::handle temperature, py::handle top_k,
                   py::handle top_p, py::handle min_p, py::handle allowed, uintptr_t stream) {
  const TensorView v_logits = view_from_python(logits, "logits");
  const TensorView v_out = view_from_python(out, "out");
  const TensorView v_temperature = view_from_python(temperature, "temperature");
  const TensorView v_top_k = view_from_python(top_k, "top_k");
  const TensorView v_top_p = view_from_python(top_p, "top_p");
  const TensorView v_min_p = view_from_python(min_p, "min_p");
  const OptionalView v_allowed = optional_view_from_python(allowed, "allowed");
  if (const char* error =
          cuda::check_filter_views(v_logits, v_out, v_temperature, v_top_k, v_top_p, v_min_p, v_allowed.get()))
    throw std::invalid_argument(error);
  raise_on_cuda_error(cuda::filter_logits(v_logits, v_out, v_temperature, v_top_k, v_top_p, v_min_p,
                                          v_allowed.get(), reinterpret_cast<cudaStream_t>(stream)),
                      "filter_logits");
}

void sample(py::handle logits, py::handle tokens, py::handle temperature, py::handle top_k,
            py::handle top_p, py::handle min_p, py::handle seeds, py::handle steps, py::handle allowed,
            py::handle logprobs, py::handle log_mass, py::handle filtered, uintptr_t stream) {
  const TensorView v_logits = view_from_python(logits, "logits");
  const TensorView v_tokens = view_from_python(tokens, "tokens");
  const TensorView v_temperature = view_from_python(temperature, "temperature");
  const TensorView v_top_k = view_from_python(top_k, "top_k");
  const TensorView v_top_p = view_from_python(top_p, "top_p");
  const TensorView v_min_p = view_from_python(min_p, "min_p");
  const TensorView v_seeds = view_from_python(seeds, "seeds");
  const TensorView v_steps = view_from_python(steps, "steps");
  const OptionalView v_allowed = optional_view_from_python(allowed, "allowed");
  const OptionalView v_logprobs = optional_view_from_python(logprobs, "logprobs");
  const OptionalView v_log_mass = optional_view_from_python(log_mass, "log_mass");
  const OptionalView v_filtered = optional_view_from_python(filtered, "filtered");
  if (const char* error = cuda::check_sample_views(v_logits, v_tokens, v_temperature, v_top_k, v_top_p, v_min_p,
                                                   v_seeds, v_steps, v_allowed.get(), v_logprobs.get(),
                                                   v_log_mass.get(), v_filtered.get()))
    throw std::invalid_argument(error);
  raise_on_cuda_error(cuda::sample(v_logits, v_tokens, v_temperature, v_top_k, v_top_p, v_min_p, v_seeds, v_steps,
                                   v_allowed.get(), v_logprobs.get(), v_log_mass.get(), v_filtered.get(),
                                   reinterpret_cast<cudaStream_t>(stream)),
                      "sample");
}

}  // namespace

void bind_cuda_sampling(py::module_& m) {
  m.def("filter_logits", &filter_logits, py::arg("logits"), py::arg("out"), py::arg("temperature"),
        py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("allowed"), py::arg("stream"),
        "Write logits / temperature into out with the tokens allowed, top-k, top-p and min-p remove at -inf.");
  m.def("sample", &sample, py::arg("logits"), py::arg("tokens"), py::arg("temperature"), py::arg("top_k"),
        py::arg("top_p"), py::arg("min_p"), py::arg("seeds"), py::arg("steps"), py::arg("allowed"), py::arg("logprobs"),
        py::arg("log_mass"), py::arg("filtered"), py::arg("stream"),
        "Draw one token per row of logits (Gumbel-max over the filtered tokens); optionally the token's "
        "log-probability, the log of the kept mass and the filtered fp32 logits less their maximum.");
}

}  // namespace fmkernels
