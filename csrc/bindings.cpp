// pybind11 module segkd_kernels._cuda: thin wrappers around the launchers in launchers.h.
// Tensors travel as integer addresses; every call releases the GIL while it launches.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "launchers.h"

namespace py = pybind11;
using segkd::DType;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "segkd_kernels hand-written CUDA kernels (raw pointers, no libtorch)";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(DType::Float32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(DType::Float16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(DType::BFloat16);

  m.def(
      "spatial_pool_forward",
      [](std::uintptr_t x, std::uintptr_t avg, std::uintptr_t max, std::uintptr_t argmax, int64_t rows,
         int64_t plane, int dtype, int device, std::uintptr_t stream) {
        segkd::spatial_pool_forward(x, avg, max, argmax, rows, plane, static_cast<DType>(dtype), device, stream);
      },
      py::arg("x"), py::arg("avg"), py::arg("max"), py::arg("argmax"), py::arg("rows"), py::arg("plane"),
      py::arg("dtype"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "spatial_pool_backward",
      [](std::uintptr_t grad_avg, std::uintptr_t grad_max, std::uintptr_t argmax, std::uintptr_t dx, int64_t rows,
         int64_t plane, int dtype, int device, std::uintptr_t stream) {
        segkd::spatial_pool_backward(grad_avg, grad_max, argmax, dx, rows, plane, static_cast<DType>(dtype),
                                     device, stream);
      },
      py::arg("grad_avg"), py::arg("grad_max"), py::arg("argmax"), py::arg("dx"), py::arg("rows"),
      py::arg("plane"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
}
