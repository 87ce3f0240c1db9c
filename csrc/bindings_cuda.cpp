// fmkernels._cuda: the CUDA kernels, called with device tensor views and the
// current stream from the ops layer. The CUDA runtime is linked statically, so
// this module imports on a machine without a GPU; device_status() says why the
// kernels cannot run there.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "bindings_views.h"
#include "common/append_kv_shapes.h"
#include "cuda/append_kv.cuh"

namespace py = pybind11;
using fmkernels::view_from_python;

namespace {

void raise_on_error(cudaError_t status, const char* op) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fmkernels.") + op + " (cuda): " +
                             cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

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
  const auto k_cache_view = view_from_python(k_cache, "k_cache");
  const auto v_cache_view = view_from_python(v_cache, "v_cache");
  const auto k_view = view_from_python(k, "k");
  const auto v_view = view_from_python(v, "v");
  const auto seqlens_view = view_from_python(cache_seqlens, "cache_seqlens");
  fmkernels::TensorView table_view;
  const bool paged = !block_table.is_none();
  if (paged) table_view = view_from_python(block_table, "block_table");
  const fmkernels::TensorView* table = paged ? &table_view : nullptr;
  if (const char* error = fmkernels::check_append_kv_shapes(k_cache_view, v_cache_view, k_view,
                                                            v_view, seqlens_view, table))
    throw std::invalid_argument(error);
  raise_on_error(fmkernels::cuda::append_kv(k_cache_view, v_cache_view, k_view, v_view,
                                            seqlens_view, table,
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
}
