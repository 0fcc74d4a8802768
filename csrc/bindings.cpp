// pybind11 module segkd_kernels._cuda: thin wrappers around the launchers in launchers.h.
// Tensors travel as integer addresses; every call releases the GIL while it launches.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "launchers.h"

namespace py = pybind11;
using segkd::DType;

// The same bindings build segkd_kernels._cuda (nvcc) and the host-execution test module
// segkd_kernels._cuda_host (g++, csrc/host/), which also exposes the layer's test controls.
#ifndef SEGKD_MODULE_NAME
#define SEGKD_MODULE_NAME _cuda
#endif
#ifdef SEGKD_HOST_EXECUTION_MODULE
#include "segkd_host/controls.h"
#endif

PYBIND11_MODULE(SEGKD_MODULE_NAME, m) {
  m.doc() = "segkd_kernels hand-written CUDA kernels (raw pointers, no libtorch)";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(DType::Float32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(DType::Float16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(DType::BFloat16);

  m.def(
      "spatial_pool_workspace",
      [](int64_t rows, int64_t plane, int dtype, int device) {
        return segkd::spatial_pool_workspace(rows, plane, static_cast<DType>(dtype), device);
      },
      py::arg("rows"), py::arg("plane"), py::arg("dtype"), py::arg("device"));
  m.def(
      "spatial_pool_forward",
      [](std::uintptr_t x, std::uintptr_t avg, std::uintptr_t max, std::uintptr_t argmax, std::uintptr_t workspace,
         int64_t workspace_floats, int64_t rows, int64_t plane, int dtype, int device, std::uintptr_t stream) {
        segkd::spatial_pool_forward(x, avg, max, argmax, workspace, workspace_floats, rows, plane,
                                    static_cast<DType>(dtype), device, stream);
      },
      py::arg("x"), py::arg("avg"), py::arg("max"), py::arg("argmax"), py::arg("workspace"),
      py::arg("workspace_floats"), py::arg("rows"), py::arg("plane"), py::arg("dtype"), py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
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

  // Generated one-to-one from launchers.h: same names, same argument order; dtype is an int.
  m.def(
      "channel_wise_kd_workspace",
      [](int64_t rows, int64_t plane, int dtype, int device) {
        return segkd::channel_wise_kd_workspace(rows, plane, static_cast<DType>(dtype), device);
      },
      py::arg("rows"), py::arg("plane"), py::arg("dtype"), py::arg("device"));
  m.def(
      "channel_wise_kd_forward",
      [](std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t row_kl, std::uintptr_t grad,
          std::uintptr_t workspace, int64_t workspace_floats, int64_t rows, int64_t plane, double tau,
          double grad_scale, std::uintptr_t grad_mult, int dtype, int device, std::uintptr_t stream) {
        segkd::channel_wise_kd_forward(student, teacher, row_kl, grad, workspace, workspace_floats, rows, plane, tau,
          grad_scale, grad_mult, static_cast<DType>(dtype), device, stream);
      },
      py::arg("student"), py::arg("teacher"), py::arg("row_kl"), py::arg("grad"), py::arg("workspace"),
      py::arg("workspace_floats"), py::arg("rows"), py::arg("plane"), py::arg("tau"), py::arg("grad_scale"),
      py::arg("grad_mult"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "saved_grad_scale",
      [](std::uintptr_t x, std::uintptr_t g, int64_t n, int dtype, int device, std::uintptr_t stream) {
        segkd::saved_grad_scale(x, g, n, static_cast<DType>(dtype), device, stream);
      },
      py::arg("x"), py::arg("g"), py::arg("n"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "pixel_kd_num_partials",
      [](int64_t batch, int64_t plane) { return segkd::pixel_kd_num_partials(batch, plane); },
      py::arg("batch"), py::arg("plane"));
  m.def(
      "pixel_kd_forward",
      [](std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t ignore, std::uintptr_t weight,
          bool clamp_weight, std::uintptr_t coef, std::uintptr_t out, std::uintptr_t partials, std::uintptr_t grad,
          std::uintptr_t grad_mult, int64_t batch, int64_t classes, int64_t plane, double tau, int dtype, int device,
          std::uintptr_t stream) {
        segkd::pixel_kd_forward(student, teacher, ignore, weight, clamp_weight, coef, out, partials, grad, grad_mult,
          batch, classes, plane, tau, static_cast<DType>(dtype), device, stream);
      },
      py::arg("student"), py::arg("teacher"), py::arg("ignore"), py::arg("weight"), py::arg("clamp_weight"),
      py::arg("coef"), py::arg("out"), py::arg("partials"), py::arg("grad"), py::arg("grad_mult"), py::arg("batch"), py::arg("classes"), py::arg("plane"),
      py::arg("tau"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "channel_pool_forward",
      [](std::uintptr_t x, std::uintptr_t gate, std::uintptr_t out, std::uintptr_t argmax, int64_t batch,
          int64_t channels, int64_t plane, int dtype, int device, std::uintptr_t stream) {
        segkd::channel_pool_forward(x, gate, out, argmax, batch, channels, plane, static_cast<DType>(dtype), device,
          stream);
      },
      py::arg("x"), py::arg("gate"), py::arg("out"), py::arg("argmax"), py::arg("batch"), py::arg("channels"),
      py::arg("plane"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "channel_pool_backward_workspace",
      [](int64_t batch, int64_t channels, int64_t plane, int device) {
        return segkd::channel_pool_backward_workspace(batch, channels, plane, device);
      },
      py::arg("batch"), py::arg("channels"), py::arg("plane"), py::arg("device"));
  m.def(
      "channel_pool_backward",
      [](std::uintptr_t grad_out, std::uintptr_t argmax, std::uintptr_t x, std::uintptr_t gate, std::uintptr_t dx,
          std::uintptr_t dgate, std::uintptr_t workspace, int64_t workspace_floats, int64_t batch, int64_t channels,
          int64_t plane, int dtype, int device, std::uintptr_t stream) {
        segkd::channel_pool_backward(grad_out, argmax, x, gate, dx, dgate, workspace, workspace_floats, batch,
          channels, plane, static_cast<DType>(dtype), device, stream);
      },
      py::arg("grad_out"), py::arg("argmax"), py::arg("x"), py::arg("gate"), py::arg("dx"), py::arg("dgate"),
      py::arg("workspace"), py::arg("workspace_floats"), py::arg("batch"), py::arg("channels"), py::arg("plane"),
      py::arg("dtype"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "attnfd_num_partials",
      [](int64_t total) {
        return segkd::attnfd_num_partials(total);
      },
      py::arg("total"));
  m.def(
      "attnfd_dots",
      [](std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t partials, int64_t total, int64_t num_partials,
          int dtype, int device, std::uintptr_t stream) {
        segkd::attnfd_dots(student, teacher, partials, total, num_partials, static_cast<DType>(dtype), device, stream);
      },
      py::arg("student"), py::arg("teacher"), py::arg("partials"), py::arg("total"), py::arg("num_partials"),
      py::arg("dtype"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  // attnfd_loss epilogue (csrc/attnfd_loss.cu)
  m.def(
      "attnfd_finish",
      [](std::uintptr_t partials, int64_t num_partials, std::uintptr_t loss, std::uintptr_t dots, int64_t batch,
          double eps, int loss_dtype, int device, std::uintptr_t stream) {
        segkd::attnfd_finish(partials, num_partials, loss, dots, batch, eps, static_cast<DType>(loss_dtype), device,
          stream);
      },
      py::arg("partials"), py::arg("num_partials"), py::arg("loss"), py::arg("dots"), py::arg("batch"),
      py::arg("eps"), py::arg("loss_dtype"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "attnfd_backward_dots",
      [](std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t dots, std::uintptr_t grad, std::uintptr_t ds,
          int64_t total, int64_t batch, double eps, int dtype, int device, std::uintptr_t stream) {
        segkd::attnfd_backward_dots(student, teacher, dots, grad, ds, total, batch, eps, static_cast<DType>(dtype),
          device, stream);
      },
      py::arg("student"), py::arg("teacher"), py::arg("dots"), py::arg("grad"), py::arg("ds"), py::arg("total"),
      py::arg("batch"), py::arg("eps"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "cbam_gate_forward",
      [](std::uintptr_t x, std::uintptr_t channel_gate, std::uintptr_t spatial_gate, std::uintptr_t out,
          int64_t batch, int64_t channels, int64_t plane, int dtype, int device, std::uintptr_t stream) {
        segkd::cbam_gate_forward(x, channel_gate, spatial_gate, out, batch, channels, plane,
          static_cast<DType>(dtype), device, stream);
      },
      py::arg("x"), py::arg("channel_gate"), py::arg("spatial_gate"), py::arg("out"), py::arg("batch"),
      py::arg("channels"), py::arg("plane"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "cbam_gate_backward_workspace",
      [](int64_t batch, int64_t channels, int64_t plane, int device) {
        return segkd::cbam_gate_backward_workspace(batch, channels, plane, device);
      },
      py::arg("batch"), py::arg("channels"), py::arg("plane"), py::arg("device"));
  m.def(
      "cbam_gate_backward",
      [](std::uintptr_t grad_out, std::uintptr_t x, std::uintptr_t channel_gate, std::uintptr_t spatial_gate,
          std::uintptr_t dx, std::uintptr_t d_channel_gate, std::uintptr_t d_spatial_gate, std::uintptr_t workspace,
          int64_t workspace_floats, int64_t batch, int64_t channels, int64_t plane, int dtype, int device,
          std::uintptr_t stream) {
        segkd::cbam_gate_backward(grad_out, x, channel_gate, spatial_gate, dx, d_channel_gate, d_spatial_gate,
          workspace, workspace_floats, batch, channels, plane, static_cast<DType>(dtype), device, stream);
      },
      py::arg("grad_out"), py::arg("x"), py::arg("channel_gate"), py::arg("spatial_gate"), py::arg("dx"),
      py::arg("d_channel_gate"), py::arg("d_spatial_gate"), py::arg("workspace"), py::arg("workspace_floats"),
      py::arg("batch"), py::arg("channels"), py::arg("plane"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "ssim_num_partials",
      [](int64_t maps, int64_t h, int64_t w, int64_t window, int64_t padding) {
        return segkd::ssim_num_partials(maps, h, w, window, padding);
      },
      py::arg("maps"), py::arg("h"), py::arg("w"), py::arg("window"), py::arg("padding"));
  m.def(
      "ssim_forward",
      [](std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t lo_s, std::uintptr_t scale_s,
          std::uintptr_t lo_t, std::uintptr_t scale_t, std::uintptr_t partials, std::uintptr_t dmaps, int64_t maps,
          int64_t h, int64_t w, int64_t window, double sigma, double data_range, int64_t padding, int dtype,
          int device, std::uintptr_t stream) {
        segkd::ssim_forward(student, teacher, lo_s, scale_s, lo_t, scale_t, partials, dmaps, maps, h, w, window,
          sigma, data_range, padding, static_cast<DType>(dtype), device, stream);
      },
      py::arg("student"), py::arg("teacher"), py::arg("lo_s"), py::arg("scale_s"), py::arg("lo_t"),
      py::arg("scale_t"), py::arg("partials"), py::arg("dmaps"), py::arg("maps"), py::arg("h"), py::arg("w"),
      py::arg("window"), py::arg("sigma"), py::arg("data_range"), py::arg("padding"), py::arg("dtype"),
      py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "ssim_backward",
      [](std::uintptr_t dmaps, std::uintptr_t emaps, std::uintptr_t student, std::uintptr_t teacher,
          std::uintptr_t lo_s, std::uintptr_t scale_s, std::uintptr_t lo_t, std::uintptr_t scale_t,
          std::uintptr_t grad_loss, std::uintptr_t ds, int64_t maps, int64_t h, int64_t w, int64_t window,
          double sigma, int64_t padding, int dtype, int device, std::uintptr_t stream) {
        segkd::ssim_backward(dmaps, emaps, student, teacher, lo_s, scale_s, lo_t, scale_t, grad_loss, ds, maps, h, w,
          window, sigma, padding, static_cast<DType>(dtype), device, stream);
      },
      py::arg("dmaps"), py::arg("emaps"), py::arg("student"), py::arg("teacher"), py::arg("lo_s"), py::arg("scale_s"),
      py::arg("lo_t"), py::arg("scale_t"), py::arg("grad_loss"), py::arg("ds"), py::arg("maps"), py::arg("h"),
      py::arg("w"), py::arg("window"), py::arg("sigma"), py::arg("padding"), py::arg("dtype"), py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "pixel_norm",
      [](std::uintptr_t x, std::uintptr_t norm, int64_t batch, int64_t channels, int64_t plane, int dtype, int device,
          std::uintptr_t stream) {
        segkd::pixel_norm(x, norm, batch, channels, plane, static_cast<DType>(dtype), device, stream);
      },
      py::arg("x"), py::arg("norm"), py::arg("batch"), py::arg("channels"), py::arg("plane"), py::arg("dtype"),
      py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "normalize_pixels",
      [](std::uintptr_t x, std::uintptr_t out, std::uintptr_t norm, int64_t batch, int64_t channels, int64_t plane,
          double eps, int dtype, int device, std::uintptr_t stream) {
        segkd::normalize_pixels(x, out, norm, batch, channels, plane, eps, static_cast<DType>(dtype), device, stream);
      },
      py::arg("x"), py::arg("out"), py::arg("norm"), py::arg("batch"), py::arg("channels"), py::arg("plane"),
      py::arg("eps"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "normalize_pixels_backward",
      [](std::uintptr_t da, std::uintptr_t x, std::uintptr_t norm, std::uintptr_t dx, int64_t batch, int64_t channels,
          int64_t plane, double eps, bool detach_norm, int dtype, int device, std::uintptr_t stream) {
        segkd::normalize_pixels_backward(da, x, norm, dx, batch, channels, plane, eps, detach_norm,
          static_cast<DType>(dtype), device, stream);
      },
      py::arg("da"), py::arg("x"), py::arg("norm"), py::arg("dx"), py::arg("batch"), py::arg("channels"),
      py::arg("plane"), py::arg("eps"), py::arg("detach_norm"), py::arg("dtype"), py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "pixel_inv_norm",
      [](std::uintptr_t x, std::uintptr_t norm, std::uintptr_t inv, int64_t batch, int64_t channels, int64_t plane,
          double eps, int dtype, int device, std::uintptr_t stream) {
        segkd::pixel_inv_norm(x, norm, inv, batch, channels, plane, eps, static_cast<DType>(dtype), device, stream);
      },
      py::arg("x"), py::arg("norm"), py::arg("inv"), py::arg("batch"), py::arg("channels"), py::arg("plane"),
      py::arg("eps"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "pairwise_gram",
      [](std::uintptr_t s, std::uintptr_t inv_s, std::uintptr_t t, std::uintptr_t inv_t, std::uintptr_t part,
          int64_t batch, int64_t cs, int64_t ct, int64_t plane, int64_t splits, bool fast, int dtype, int device,
          std::uintptr_t stream) {
        segkd::pairwise_gram(s, inv_s, t, inv_t, part, batch, cs, ct, plane, splits, fast, static_cast<DType>(dtype),
          device, stream);
      },
      py::arg("s"), py::arg("inv_s"), py::arg("t"), py::arg("inv_t"), py::arg("part"), py::arg("batch"),
      py::arg("cs"), py::arg("ct"), py::arg("plane"), py::arg("splits"), py::arg("fast"), py::arg("dtype"),
      py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "pairwise_grad_mma",
      [](std::uintptr_t aa, std::uintptr_t ab, std::uintptr_t s, std::uintptr_t t, std::uintptr_t inv_s,
          std::uintptr_t inv_t, std::uintptr_t grad_loss, std::uintptr_t da, int64_t batch, int64_t cs, int64_t ct,
          int64_t plane, double scale, int dtype, int device, std::uintptr_t stream) {
        segkd::pairwise_grad_mma(aa, ab, s, t, inv_s, inv_t, grad_loss, da, batch, cs, ct, plane, scale,
          static_cast<DType>(dtype), device, stream);
      },
      py::arg("aa"), py::arg("ab"), py::arg("s"), py::arg("t"), py::arg("inv_s"), py::arg("inv_t"),
      py::arg("grad_loss"), py::arg("da"), py::arg("batch"), py::arg("cs"), py::arg("ct"), py::arg("plane"),
      py::arg("scale"), py::arg("dtype"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "cross_image_forward",
      [](std::uintptr_t xs, std::uintptr_t xt, std::uintptr_t inv_s, std::uintptr_t inv_t, std::uintptr_t row_kl,
          std::uintptr_t lse, int64_t batch, int64_t cs, int64_t ct, int64_t plane, double tau, int dtype, int device,
          std::uintptr_t stream) {
        segkd::cross_image_forward(xs, xt, inv_s, inv_t, row_kl, lse, batch, cs, ct, plane, tau,
          static_cast<DType>(dtype), device, stream);
      },
      py::arg("xs"), py::arg("xt"), py::arg("inv_s"), py::arg("inv_t"), py::arg("row_kl"), py::arg("lse"),
      py::arg("batch"), py::arg("cs"), py::arg("ct"), py::arg("plane"), py::arg("tau"), py::arg("dtype"),
      py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "cross_image_backward",
      [](std::uintptr_t xs, std::uintptr_t xt, std::uintptr_t inv_s, std::uintptr_t inv_t, std::uintptr_t lse,
          std::uintptr_t grad_loss, std::uintptr_t da, int64_t batch, int64_t cs, int64_t ct, int64_t plane,
          double tau, int dtype, int device, std::uintptr_t stream) {
        segkd::cross_image_backward(xs, xt, inv_s, inv_t, lse, grad_loss, da, batch, cs, ct, plane, tau,
          static_cast<DType>(dtype), device, stream);
      },
      py::arg("xs"), py::arg("xt"), py::arg("inv_s"), py::arg("inv_t"), py::arg("lse"), py::arg("grad_loss"),
      py::arg("da"), py::arg("batch"), py::arg("cs"), py::arg("ct"), py::arg("plane"), py::arg("tau"),
      py::arg("dtype"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "memory_contrast_forward",
      [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t bank, std::uintptr_t row_kl, std::uintptr_t lse,
          int64_t rows, int64_t channels, int64_t entries, double inv_temp, int dtype, int device,
          std::uintptr_t stream) {
        segkd::memory_contrast_forward(a, b, bank, row_kl, lse, rows, channels, entries, inv_temp,
          static_cast<DType>(dtype), device, stream);
      },
      py::arg("a"), py::arg("b"), py::arg("bank"), py::arg("row_kl"), py::arg("lse"), py::arg("rows"),
      py::arg("channels"), py::arg("entries"), py::arg("inv_temp"), py::arg("dtype"), py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "memory_contrast_backward",
      [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t bank, std::uintptr_t lse, std::uintptr_t grad_loss,
          std::uintptr_t da, int64_t rows, int64_t channels, int64_t entries, double inv_temp, double grad_scale,
          int dtype, int device, std::uintptr_t stream) {
        segkd::memory_contrast_backward(a, b, bank, lse, grad_loss, da, rows, channels, entries, inv_temp,
          grad_scale, static_cast<DType>(dtype), device, stream);
      },
      py::arg("a"), py::arg("b"), py::arg("bank"), py::arg("lse"), py::arg("grad_loss"), py::arg("da"),
      py::arg("rows"), py::arg("channels"), py::arg("entries"), py::arg("inv_temp"), py::arg("grad_scale"),
      py::arg("dtype"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
#ifdef SEGKD_HOST_EXECUTION_MODULE
  segkd_host::bind_controls(m);
#endif
}
