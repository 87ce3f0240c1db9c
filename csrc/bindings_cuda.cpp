// fmkernels._cuda: the CUDA kernels, called with device tensor views and the
// current stream from the ops layer. The CUDA runtime is linked statically, so
// this module imports on a machine without a GPU; device_status() says why the
// kernels cannot run there.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "bindings_cuda.h"
#include "bindings_views.h"
#include "common/append_kv_shapes.h"
#include "cuda/append_kv.cuh"

namespace py = pybind11;
namespace {

// (device_count, error name or "") without raising: used by fmkernels.backends().
py::tuple device_status() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return py::make_tuple(0, std::string(cudaGetErrorName(status)));
  }
  return py::make_tuple(count, std::string());
}

int runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

void append_kv(py::handle k_cache, py::handle v_cache, py::handle k, py::handle v,
               py::handle cache_seqlens, py::handle block_table, uintptr_t stream) {
  const auto views = fmkernels::append_kv_views(k_cache, v_cache, k, v, cache_seqlens, block_table);
  const fmkernels::TensorView* table = views.block_table.get();
  if (const char* error = fmkernels::check_append_kv_shapes(views.k_cache, views.v_cache, views.k,
                                                            views.v, views.cache_seqlens, table))
    throw std::invalid_argument(error);
  fmkernels::raise_on_cuda_error(fmkernels::cuda::append_kv(views.k_cache, views.v_cache, views.k, views.v,
                                            views.cache_seqlens, table,
                                            reinterpret_cast<cudaStream_t>(stream)),
                 "append_kv");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fmkernels CUDA kernels";
  m.def("device_status", &device_status,
        "(device_count, error_name): what the CUDA runtime sees, without raising.");
  m.def("runtime_version", &runtime_version, "The CUDA runtime version this module links.");
  m.def("append_kv", &append_kv, py::arg("k_cache"), py::arg("v_cache"), py::arg("k"),
        py::arg("v"), py::arg("cache_seqlens"), py::arg("block_table"), py::arg("stream"),
        "Write k, v into a contiguous or paged KV cache on the device.");
  fmkernels::bind_cuda_attention(m);
  fmkernels::bind_cuda_decode_attention(m);
  fmkernels::bind_cuda_sampling(m);
  fmkernels::bind_cuda_linear(m);
}
