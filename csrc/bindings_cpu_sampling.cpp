#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bindings_cpu.h"
#include "bindings_views.h"
#include "cpu/sampling.h"

namespace py = pybind11;

namespace fmkernels {
namespace {

void filter_logits(py::handle logits, py::handle out, py::handle temperature, py::handle top_k,
                   py::handle top_p, py::handle min_p, py::handle allowed, int num_threads) {
  const TensorView v_logits = view_from_python(logits, "logits");
  const TensorView v_out = view_from_python(out, "out");
  const TensorView v_temperature = view_from_python(temperature, "temperature");
  const TensorView v_top_k = view_from_python(top_k, "top_k");
  const TensorView v_top_p = view_from_python(top_p, "top_p");
  const TensorView v_min_p = view_from_python(min_p, "min_p");
  const OptionalView v_allowed = optional_view_from_python(allowed, "allowed");
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = cpu::filter_logits(v_logits, v_out, v_temperature, v_top_k, v_top_p, v_min_p, v_allowed.get(),
                               num_threads);
  }
  if (error != nullptr) throw std::invalid_argument(error);
}

void sample(py::handle logits, py::handle tokens, py::handle temperature, py::handle top_k,
            py::handle top_p, py::handle min_p, py::handle seeds, py::handle steps, py::handle allowed,
            py::handle logprobs, py::handle top_ids, py::handle top_logprobs, int num_threads) {
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
  const OptionalView v_top_ids = optional_view_from_python(top_ids, "top_ids");
  const OptionalView v_top_logprobs = optional_view_from_python(top_logprobs, "top_logprobs");
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = cpu::sample(v_logits, v_tokens, v_temperature, v_top_k, v_top_p, v_min_p, v_seeds,
                        v_steps, v_allowed.get(), v_logprobs.get(), v_top_ids.get(), v_top_logprobs.get(), num_threads);
  }
  if (error != nullptr) throw std::invalid_argument(error);
}

int64_t first_row_without_allowed(py::handle allowed, int64_t vocab) {
  const int64_t row = cpu::first_row_without_allowed(view_from_python(allowed, "allowed"), vocab);
  if (row == -2) throw std::invalid_argument("allowed must be int32 (batch, ceil(vocab / 32)), unit stride along its words");
  return row;
}

}  // namespace

void bind_cpu_sampling(py::module_& m) {
  m.def("first_row_without_allowed", &first_row_without_allowed, py::arg("allowed"), py::arg("vocab"),
        "The first row of the allowed bitmask that allows no token of the vocabulary, or -1.");
  m.def("filter_logits", &filter_logits, py::arg("logits"), py::arg("out"), py::arg("temperature"),
        py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("allowed"), py::arg("num_threads"),
        "Write logits / temperature into out with the tokens allowed, top-k, top-p and min-p remove at -inf.");
  m.def("sample", &sample, py::arg("logits"), py::arg("tokens"), py::arg("temperature"),
        py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("seeds"), py::arg("steps"),
        py::arg("allowed"), py::arg("logprobs"), py::arg("top_ids"), py::arg("top_logprobs"), py::arg("num_threads"),
        "Draw one token per row of logits (Gumbel-max over the filtered tokens), with log-probabilities.");
}

}  // namespace fmkernels
