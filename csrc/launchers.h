// Host launchers of every CUDA kernel. Plain C++ types only (no CUDA headers), so bindings.cpp is
// compiled by the host compiler. Pointers come from torch's data_ptr(); Python allocates every
// output and passes the stream (torch.cuda.current_stream().cuda_stream) and the device index.
#pragma once

#include <cstdint>

namespace segkd {

// Matches segkd_kernels/ops/_cuda_common.py: DTYPE_CODES.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// spatial_pool: mean and max over the `plane` contiguous elements of each of `rows` rows.
// avg/max have x's dtype; argmax is int64 (first maximal position, used by the backward).
// workspace: spatial_pool_workspace() fp32 values, 8-byte aligned (0 when rows are not split over blocks).
int64_t spatial_pool_workspace(int64_t rows, int64_t plane, DType dtype, int device);
void spatial_pool_forward(std::uintptr_t x, std::uintptr_t avg, std::uintptr_t max, std::uintptr_t argmax,
                          std::uintptr_t workspace, int64_t workspace_floats, int64_t rows, int64_t plane, DType dtype,
                          int device, std::uintptr_t stream);

// dx[r, p] = grad_avg[r] / plane + (p == argmax[r]) * grad_max[r]; grads have dx's dtype.
void spatial_pool_backward(std::uintptr_t grad_avg, std::uintptr_t grad_max, std::uintptr_t argmax,
                           std::uintptr_t dx, int64_t rows, int64_t plane, DType dtype, int device,
                           std::uintptr_t stream);

// channel_wise_kd (csrc/channel_wise_kd.cu): row_kl[r] = KL(softmax(t_r / tau) || softmax(s_r / tau))
// in fp32 for each of `rows` rows of `plane` values; if grad != 0 it also writes
// grad = grad_scale * (softmax(s_r / tau) - softmax(t_r / tau)) in the input dtype (the gradient
// for grad_output == 1, handed out as it is; see saved_grad_scale). row_kl may be 0. With grad_mult
// (one value of the input dtype on the device, grad_output) the gradient is multiplied by it, and
// there is no work when it is exactly 1 (every thread returns): the backward's
// recomputation, rounded once, of a gradient the forward wrote for grad_output == 1.
// workspace: channel_wise_kd_workspace() fp32 values (0 when the rows are not split over blocks).
int64_t channel_wise_kd_workspace(int64_t rows, int64_t plane, DType dtype, int device);
void channel_wise_kd_forward(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t row_kl,
                             std::uintptr_t grad, std::uintptr_t workspace, int64_t workspace_floats, int64_t rows,
                             int64_t plane, double tau, double grad_scale, std::uintptr_t grad_mult, DType dtype,
                             int device, std::uintptr_t stream);
// saved_grad_scale (csrc/channel_wise_kd.cu): x[0:n] *= g[0] in place, in x's dtype; g (same dtype)
// is read on the device, and g == 1 leaves x untouched (the backward of the ops that save their
// student gradient in the forward).
void saved_grad_scale(std::uintptr_t x, std::uintptr_t g, int64_t n, DType dtype, int device, std::uintptr_t stream);

// pixel_kd (csrc/pixel_kd.cu): logits (batch, classes, plane). Per pixel g: out[g] = w_g * KL_g (fp32,
// 0 where ignore[g]); grad (input dtype) = coef[0] * w_g * (softmax(s / tau) - softmax(t / tau)) (0 where ignored).
// partials (fp32, pixel_kd_num_partials(batch, plane) values): per-block sums of w_g * KL_g, whose
// total is the sum of out (the loss needs no per-pixel map).
// ignore (bool), weight (fp32), out, partials and grad may be 0 (absent); coef is fp32 on the device.
// grad_mult (0 or one value of the input dtype on the device) as in channel_wise_kd_forward: the
// gradient times grad_mult, and no work at all (out and partials unset too) when it is exactly 1.
// w_g = 1, weight[g], or max(weight[g], 0) / coef[1] when clamp_weight.
int64_t pixel_kd_num_partials(int64_t batch, int64_t plane);
void pixel_kd_forward(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t ignore, std::uintptr_t weight,
                      bool clamp_weight, std::uintptr_t coef, std::uintptr_t out, std::uintptr_t partials,
                      std::uintptr_t grad, std::uintptr_t grad_mult, int64_t batch,
                      int64_t classes, int64_t plane, double tau, DType dtype, int device, std::uintptr_t stream);

// channel_pool (csrc/channel_pool.cu): out (batch, 2, plane) = [max_c, mean_c] of x * gate (gate fp32
// (batch, channels) or 0), argmax int32 (batch, plane): first maximal channel.
void channel_pool_forward(std::uintptr_t x, std::uintptr_t gate, std::uintptr_t out, std::uintptr_t argmax,
                          int64_t batch, int64_t channels, int64_t plane, DType dtype, int device,
                          std::uintptr_t stream);
// dx (x's dtype) and, if dgate != 0, dgate (fp32, batch x channels) from grad_out (batch, 2, plane).
// workspace: channel_pool_backward_workspace() fp32 values, needed with dgate (0 when rows are not
// split over blocks).
int64_t channel_pool_backward_workspace(int64_t batch, int64_t channels, int64_t plane, int device);
void channel_pool_backward(std::uintptr_t grad_out, std::uintptr_t argmax, std::uintptr_t x, std::uintptr_t gate,
                           std::uintptr_t dx, std::uintptr_t dgate, std::uintptr_t workspace, int64_t workspace_floats,
                           int64_t batch, int64_t channels, int64_t plane, DType dtype, int device,
                           std::uintptr_t stream);

// attnfd_loss (csrc/channel_pool.cu): partials (num_partials x 3 fp64) of <s,s>, <t,t>, <s,t>.
int64_t attnfd_num_partials(int64_t total);
void attnfd_dots(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t partials, int64_t total,
                 int64_t num_partials, DType dtype, int device, std::uintptr_t stream);

// attnfd_loss epilogue (csrc/attnfd_loss.cu). attnfd_finish: one block sums num_partials (>= 0) rows
// of attnfd_dots partials in a fixed order into dots (3 fp64) and writes the loss (one value of
// loss_dtype) with the clamped form of reference.py (eps = its NORM_EPS, batch = N >= 1).
void attnfd_finish(std::uintptr_t partials, int64_t num_partials, std::uintptr_t loss, std::uintptr_t dots,
                   int64_t batch, double eps, DType loss_dtype, int device, std::uintptr_t stream);
// ds = g * (alpha * s + beta * t), alpha and beta computed on the device from dots (3 fp64); grad: one
// value g of dtype.
void attnfd_backward_dots(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t dots, std::uintptr_t grad,
                          std::uintptr_t ds, int64_t total, int64_t batch, double eps, DType dtype, int device,
                          std::uintptr_t stream);

// cbam_gate (csrc/channel_pool.cu): out = M_s[n, p] * (M_c[n, c] * x[n, c, p]); gates fp32,
// channel_gate (batch, channels), spatial_gate (batch, plane). Backward: dx (x's dtype), the gate
// gradients fp32.
void cbam_gate_forward(std::uintptr_t x, std::uintptr_t channel_gate, std::uintptr_t spatial_gate, std::uintptr_t out,
                       int64_t batch, int64_t channels, int64_t plane, DType dtype, int device, std::uintptr_t stream);
// workspace: cbam_gate_backward_workspace() fp32 values (0 when rows are not split over blocks).
int64_t cbam_gate_backward_workspace(int64_t batch, int64_t channels, int64_t plane, int device);
void cbam_gate_backward(std::uintptr_t grad_out, std::uintptr_t x, std::uintptr_t channel_gate,
                        std::uintptr_t spatial_gate, std::uintptr_t dx, std::uintptr_t d_channel_gate,
                        std::uintptr_t d_spatial_gate, std::uintptr_t workspace, int64_t workspace_floats,
                        int64_t batch, int64_t channels, int64_t plane, DType dtype, int device, std::uintptr_t stream);

// ssim_kd (csrc/ssim_kd.cu): `maps` maps of h x w. lo_*, scale_* (fp32 per map, or 0 when not
// normalising): x = (s - lo) * scale. padding: 0 reflect, 1 zeros, 2 valid. partials: one fp32 per
// block, ssim_num_partials() of them, summing to the sum of the loss map. dmaps (3 x maps x h' x w'
// fp32, or 0) receives what ssim_backward needs; emaps is not read (the fused adjoint needs no
// scratch; callers pass 0).
int64_t ssim_num_partials(int64_t maps, int64_t h, int64_t w, int64_t window, int64_t padding);
void ssim_forward(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t lo_s, std::uintptr_t scale_s,
                  std::uintptr_t lo_t, std::uintptr_t scale_t, std::uintptr_t partials, std::uintptr_t dmaps,
                  int64_t maps, int64_t h, int64_t w, int64_t window, double sigma, double data_range, int64_t padding,
                  DType dtype, int device, std::uintptr_t stream);
void ssim_backward(std::uintptr_t dmaps, std::uintptr_t emaps, std::uintptr_t student, std::uintptr_t teacher,
                   std::uintptr_t lo_s, std::uintptr_t scale_s, std::uintptr_t lo_t, std::uintptr_t scale_t,
                   std::uintptr_t grad_loss, std::uintptr_t ds, int64_t maps, int64_t h, int64_t w, int64_t window,
                   double sigma, int64_t padding, DType dtype, int device, std::uintptr_t stream);

// Per-pixel L2 normalisation over channels (csrc/pairwise_kd.cu), x (batch, channels, plane):
// norm (fp32, batch x plane); out = x / max(norm, eps) in fp32.
void pixel_norm(std::uintptr_t x, std::uintptr_t norm, int64_t batch, int64_t channels, int64_t plane, DType dtype,
                int device, std::uintptr_t stream);
void normalize_pixels(std::uintptr_t x, std::uintptr_t out, std::uintptr_t norm, int64_t batch, int64_t channels,
                      int64_t plane, double eps, DType dtype, int device, std::uintptr_t stream);
// dx (x's dtype) from da (fp32, d loss / d normalised x).
void normalize_pixels_backward(std::uintptr_t da, std::uintptr_t x, std::uintptr_t norm, std::uintptr_t dx,
                               int64_t batch, int64_t channels, int64_t plane, double eps, bool detach_norm,
                               DType dtype, int device, std::uintptr_t stream);
// pairwise_kd: norm (fp64, batch x plane) = ||x_p||, inv (fp64) = 1 / max(||x_p||, eps).
void pixel_inv_norm(std::uintptr_t x, std::uintptr_t norm, std::uintptr_t inv, int64_t batch, int64_t channels,
                    int64_t plane, double eps, DType dtype, int device, std::uintptr_t stream);
// pairwise_kd: the upper 64 x 64 tiles of Z^T Z, Z = [s_hat; t_hat] per image with the student's
// channels padded to whole tiles (tiles = ceil(cs/64) + ceil(ct/64), n_up = tiles (tiles + 1) / 2),
// over `splits` pixel ranges of ceil(plane / splits) rounded up to a multiple of 64 pixels (splits
// must equal ceil(plane / that)): part (fp64, batch x splits x n_up x 64 x 64), every entry written.
// fast: fp32 sums over 64-pixel chunks added in fp64; else fp64 throughout.
void pairwise_gram(std::uintptr_t s, std::uintptr_t inv_s, std::uintptr_t t, std::uintptr_t inv_t,
                   std::uintptr_t part, int64_t batch, int64_t cs, int64_t ct, int64_t plane, int64_t splits,
                   bool fast, DType dtype, int device, std::uintptr_t stream);
// pairwise_kd backward, half / bfloat16 / float features s (batch, cs, plane), t (batch, ct, plane):
// da (fp32, batch x cs x plane) = scale * grad_loss[0] * ((aa s) * inv_s - (ab t) * inv_t) per image,
// with aa (fp64, batch x cs x cs), ab (fp64, batch x cs x ct), inv_s / inv_t (fp64, batch x plane),
// grad_loss one fp32 on the device. Tensor cores (wmma; 3xTF32 for float).
void pairwise_grad_mma(std::uintptr_t aa, std::uintptr_t ab, std::uintptr_t s, std::uintptr_t t,
                       std::uintptr_t inv_s, std::uintptr_t inv_t, std::uintptr_t grad_loss, std::uintptr_t da,
                       int64_t batch, int64_t cs, int64_t ct, int64_t plane, double scale, DType dtype, int device,
                       std::uintptr_t stream);

// cross_image_kd (csrc/cross_image_kd.cu): raw features xs (batch, cs, plane), xt (batch, ct, plane)
// in one dtype, inverse clamped pixel norms inv_s, inv_t (fp32, batch x plane).
// row_kl (fp32, batch x batch x plane), lse (fp32, 2 x batch x batch x plane: student, teacher).
void cross_image_forward(std::uintptr_t xs, std::uintptr_t xt, std::uintptr_t inv_s, std::uintptr_t inv_t,
                         std::uintptr_t row_kl, std::uintptr_t lse, int64_t batch, int64_t cs, int64_t ct,
                         int64_t plane, double tau, DType dtype, int device, std::uintptr_t stream);
// da (fp32, batch x cs x plane, zero-filled by the caller) += d loss / d (x_s * inv_s) for
// loss = sum row_kl / (batch^2 plane) times grad_loss[0] (one fp32 on the device).
void cross_image_backward(std::uintptr_t xs, std::uintptr_t xt, std::uintptr_t inv_s, std::uintptr_t inv_t,
                          std::uintptr_t lse, std::uintptr_t grad_loss, std::uintptr_t da, int64_t batch, int64_t cs,
                          int64_t ct, int64_t plane, double tau, DType dtype, int device, std::uintptr_t stream);

// memory_contrast_kd (csrc/memory_contrast_kd.cu): unit anchor rows a, b (rows x channels) and the bank
// (entries x channels, entries >= 1), row-major in one dtype; logits = dot * inv_temp.
// row_kl (fp32, rows), lse (fp32, 2 x rows: student, teacher).
void memory_contrast_forward(std::uintptr_t a, std::uintptr_t b, std::uintptr_t bank, std::uintptr_t row_kl,
                             std::uintptr_t lse, int64_t rows, int64_t channels, int64_t entries, double inv_temp,
                             DType dtype, int device, std::uintptr_t stream);
// da (fp32, rows x channels, every element written) = grad_scale * grad_loss[0] *
// sum_q (exp(S - lse_S) - exp(T - lse_T))[., q] bank[q, .]; grad_loss is one fp32 on the device.
void memory_contrast_backward(std::uintptr_t a, std::uintptr_t b, std::uintptr_t bank, std::uintptr_t lse,
                              std::uintptr_t grad_loss, std::uintptr_t da, int64_t rows, int64_t channels,
                              int64_t entries, double inv_temp, double grad_scale, DType dtype, int device,
                              std::uintptr_t stream);

}  // namespace segkd
