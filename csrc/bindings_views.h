// Turns the Python layer's tensor descriptions into TensorViews.
// Python passes each tensor as (data_ptr, dtype_code, sizes, strides); see
// python/fmkernels/_views.py.
#pragma once

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "common/tensor_view.h"

namespace fmkernels {

inline TensorView view_from_python(const pybind11::handle& description, const char* name) {
  namespace py = pybind11;
  auto items = py::cast<py::tuple>(description);
  if (items.size() != 4)
    throw std::invalid_argument(std::string(name) + ": expected (data_ptr, dtype, sizes, strides)");
  TensorView view;
  view.data = reinterpret_cast<void*>(py::cast<uintptr_t>(items[0]));
  const int dtype = py::cast<int>(items[1]);
  if (dtype < 0 || dtype > static_cast<int>(DType::kUInt8))
    throw std::invalid_argument(std::string(name) + ": unknown dtype code " + std::to_string(dtype));
  view.dtype = static_cast<DType>(dtype);
  auto sizes = py::cast<py::tuple>(items[2]);
  auto strides = py::cast<py::tuple>(items[3]);
  if (sizes.size() != strides.size() || sizes.size() > static_cast<size_t>(kMaxRank))
    throw std::invalid_argument(std::string(name) + ": sizes and strides must have one rank <= 4");
  view.rank = static_cast<int32_t>(sizes.size());
  for (int d = 0; d < view.rank; ++d) {
    view.sizes[d] = py::cast<int64_t>(sizes[d]);
    view.strides[d] = py::cast<int64_t>(strides[d]);
    if (view.sizes[d] < 0) throw std::invalid_argument(std::string(name) + ": negative size");
  }
  return view;
}

// A view Python may pass as None (such as block_table for a contiguous cache).
struct OptionalView {
  TensorView view;
  bool present = false;
  const TensorView* get() const { return present ? &view : nullptr; }
};

inline OptionalView optional_view_from_python(const pybind11::handle& description, const char* name) {
  OptionalView optional;
  if (!description.is_none()) {
    optional.view = view_from_python(description, name);
    optional.present = true;
  }
  return optional;
}

// append_kv's arguments, as every backend's binding receives them.
struct AppendKVViews {
  TensorView k_cache, v_cache, k, v, cache_seqlens;
  OptionalView block_table;
};

inline AppendKVViews append_kv_views(pybind11::handle k_cache, pybind11::handle v_cache,
                                     pybind11::handle k, pybind11::handle v,
                                     pybind11::handle cache_seqlens, pybind11::handle block_table) {
  return {view_from_python(k_cache, "k_cache"),
          view_from_python(v_cache, "v_cache"),
          view_from_python(k, "k"),
          view_from_python(v, "v"),
          view_from_python(cache_seqlens, "cache_seqlens"),
          optional_view_from_python(block_table, "block_table")};
}

// attention's arguments, as every backend's binding receives them.
struct AttentionViews {
  TensorView q, k, v, out;
  OptionalView lse, cu_seqlens_q, cu_seqlens_k;
};

inline AttentionViews attention_views(pybind11::handle q, pybind11::handle k, pybind11::handle v,
                                      pybind11::handle out, pybind11::handle lse,
                                      pybind11::handle cu_seqlens_q, pybind11::handle cu_seqlens_k) {
  return {view_from_python(q, "q"),
          view_from_python(k, "k"),
          view_from_python(v, "v"),
          view_from_python(out, "out"),
          optional_view_from_python(lse, "lse"),
          optional_view_from_python(cu_seqlens_q, "cu_seqlens_q"),
          optional_view_from_python(cu_seqlens_k, "cu_seqlens_k")};
}

// decode_attention's tensor arguments, as every backend's binding receives them.
struct DecodeAttentionViews {
  TensorView q, k_cache, v_cache, cache_seqlens;
  OptionalView block_table;
  TensorView out;
  OptionalView lse;
};

inline DecodeAttentionViews decode_attention_views(pybind11::handle q, pybind11::handle k_cache,
                                                   pybind11::handle v_cache,
                                                   pybind11::handle cache_seqlens,
                                                   pybind11::handle block_table,
                                                   pybind11::handle out, pybind11::handle lse) {
  return {view_from_python(q, "q"),
          view_from_python(k_cache, "k_cache"),
          view_from_python(v_cache, "v_cache"),
          view_from_python(cache_seqlens, "cache_seqlens"),
          optional_view_from_python(block_table, "block_table"),
          view_from_python(out, "out"),
          optional_view_from_python(lse, "lse")};
}

}  // namespace fmkernels
