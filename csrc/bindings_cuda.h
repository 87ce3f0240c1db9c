// fmkernels._cuda is assembled from one bindings file per op; each adds its functions here.
#pragma once

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace fmkernels {

void bind_cuda_attention(pybind11::module_& m);
void bind_cuda_decode_attention(pybind11::module_& m);
// filter_logits and sample (bindings_cuda_sampling.cpp).
void bind_cuda_sampling(pybind11::module_& m);
// linear against GGUF-quantized weights (bindings_cuda_linear.cpp).
void bind_cuda_linear(pybind11::module_& m);

// Raises RuntimeError naming the op and the CUDA error when a launch failed.
inline void raise_on_cuda_error(cudaError_t status, const char* op) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fmkernels.") + op + " (cuda): " + cudaGetErrorName(status) +
                             ": " + cudaGetErrorString(status));
}

}  // namespace fmkernels
