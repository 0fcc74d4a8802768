// Pixel-wise KD (docs/losses.md 2) and its knowledge-gap weighting (2b), NCHW-native.
//
// One thread per pixel (n, h, w) on a 2-D grid (x: 256-pixel tiles of an image, y: images, looping
// past the grid's y limit, so no thread divides a flat pixel index); the K classes of a pixel are P elements apart, so consecutive
// threads read consecutive addresses for every class (coalesced, no permute copy). Up to
// kRegClasses classes stay in registers: the thread takes the maxima of s and t first, then one
// exp2f per value (base-2 logits), and writes the gradient from the registers. More classes: an
// online softmax over them, then a second read of the pixel's classes for the gradient.
// Ignored pixels are never read: their value and gradient are exactly 0 whatever the logits hold.
//
//   out[p]  = w_p * KL_p (0 where ignored)                      (if out is given)
//   partials[b] = sum of w_p * KL_p over the pixels of block b   (if partials is given: the loss
//                 without a per-pixel map, pixel_kd_num_partials() values)
//   grad    = coef[0] * w_p * (softmax(s / tau) - softmax(t / tau)) (input dtype, if grad is given)
// w_p = 1 without weight, weight[p], or max(weight[p], 0) / coef[1] with clamp_weight (the gap
// weights of PFS: `weight` is this kernel's own earlier KL output, coef[1] the clamped mean gap,
// divided as in the reference so that an all-zero gap gives weights 0, never 0 * inf). coef lives
// on the device so the caller never synchronises to compute 1 / #valid pixels.
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kPixelThreads = 256;
constexpr int kRegClasses = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

inline dim3 pixel_grid(int64_t batch, int64_t plane) {
  return dim3(static_cast<unsigned>((plane + kPixelThreads - 1) / kPixelThreads),
              static_cast<unsigned>(std::min<int64_t>(batch, 65535)));
}

template <typename T>
__global__ void __launch_bounds__(kPixelThreads)
pixel_kd_kernel(const T* __restrict__ s, const T* __restrict__ t, const uint8_t* __restrict__ ignore,
                const float* __restrict__ weight, bool clamp_weight, const float* __restrict__ coef,
                float* __restrict__ out, float* __restrict__ partials, T* __restrict__ grad,
                const T* __restrict__ grad_mult, int64_t batch, int64_t classes, int64_t plane, float inv_tau) {
  // grad_mult: the backward's recomputation for grad_output = *grad_mult, nothing to do when it is 1
  float mult = 1.f;
  if (grad_mult != nullptr) {
    mult = to_float(*grad_mult);
    if (mult == 1.f) return;
  }
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  float part = 0.f;  // this thread's share of the block's sum of w * KL
  for (int64_t n = blockIdx.y; n < batch && p < plane; n += gridDim.y) {
    const int64_t g = n * plane + p;
    const int64_t base = n * classes * plane + p;
    if (ignore != nullptr && ignore[g]) {
      if (out != nullptr) out[g] = 0.f;
      if (grad != nullptr)
        for (int64_t k = 0; k < classes; ++k) grad[base + k * plane] = from_float<T>(0.f);
      continue;
    }
    float w = 1.f;
    if (weight != nullptr) w = clamp_weight ? max_nan(weight[g], 0.f) / coef[1] : weight[g];

    const bool in_regs = classes <= kRegClasses;
    if (in_regs) {
      // Base-2 logits in registers: the maxima first, then one exp2f per value (no running
      // rescale, no accurate expf). NaN never becomes a maximum and makes its sum NaN through its
      // own term; a +inf maximum gives 2^(inf - inf) = NaN, and a row of -inf only 2^(-inf + inf)
      // = NaN, as the reference's softmax of such rows.
      const float scale2 = inv_tau * kLog2e;
      float ra[kRegClasses], rb[kRegClasses];
      float ms = -INFINITY, mt = -INFINITY;
#pragma unroll
      for (int k = 0; k < kRegClasses; ++k) {
        if (k < classes) {
          ra[k] = to_float(s[base + k * plane]) * scale2;
          rb[k] = to_float(t[base + k * plane]) * scale2;
          ms = ra[k] > ms ? ra[k] : ms;
          mt = rb[k] > mt ? rb[k] : mt;
        }
      }
      float ls = 0.f, lt = 0.f, acc = 0.f;  // acc: sum 2^(b - mt) (b - a)
#pragma unroll
      for (int k = 0; k < kRegClasses; ++k) {
        if (k < classes) {
          ls += exp2f(ra[k] - ms);
          const float e = exp2f(rb[k] - mt);
          lt += e;
          acc = fmaf(e, rb[k] - ra[k], acc);
        }
      }
      const float lse_s = ms + log2f(ls), lse_t = mt + log2f(lt);
      const float kl = w * (kLn2 * (acc / lt - lse_t + lse_s));
      if (out != nullptr) out[g] = kl;
      part += kl;
      if (grad == nullptr) continue;
      const float c = coef[0] * w * mult;
#pragma unroll
      for (int k = 0; k < kRegClasses; ++k)
        if (k < classes) grad[base + k * plane] = from_float<T>(c * (exp2f(ra[k] - lse_s) - exp2f(rb[k] - lse_t)));
      continue;
    }
    // more classes than registers: an online softmax over the classes, read again for the gradient
    OnlineLse ls, lt;
    float acc = 0.f;
    auto add = [&](float a, float b) {
      ls.add(a);
      if (b > lt.m) {
        const float sc = rescale(lt.m, b);
        lt.l = lt.l * sc + exp_self(b);
        acc = acc * sc + (b - a);
        lt.m = b;
      } else {
        const float e = expf(b - lt.m);
        lt.l += e;
        acc += e * (b - a);
      }
    };
    for (int64_t k = 0; k < classes; ++k)
      add(to_float(s[base + k * plane]) * inv_tau, to_float(t[base + k * plane]) * inv_tau);
    const float kl = w * (acc / lt.l - lt.lse() + ls.lse());
    if (out != nullptr) out[g] = kl;
    part += kl;
    if (grad == nullptr) continue;
    const float c = coef[0] * w * mult, lse_s = ls.lse(), lse_t = lt.lse();
    for (int64_t k = 0; k < classes; ++k) {
      const float a = to_float(s[base + k * plane]) * inv_tau, b = to_float(t[base + k * plane]) * inv_tau;
      grad[base + k * plane] = from_float<T>(c * (expf(a - lse_s) - expf(b - lse_t)));
    }
  }
  if (partials == nullptr) return;
  // once per block, after the loop: two barriers
  __shared__ float scratch[32];
  part = block_sum(part, scratch);
  if (threadIdx.x == 0) partials[blockIdx.y * static_cast<int64_t>(gridDim.x) + blockIdx.x] = part;
}

}  // namespace

int64_t pixel_kd_num_partials(int64_t batch, int64_t plane) {
  if (batch <= 0 || plane <= 0) return 0;
  const dim3 grid = pixel_grid(batch, plane);
  return static_cast<int64_t>(grid.x) * grid.y;
}

void pixel_kd_forward(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t ignore, std::uintptr_t weight,
                      bool clamp_weight, std::uintptr_t coef, std::uintptr_t out, std::uintptr_t partials,
                      std::uintptr_t grad, std::uintptr_t grad_mult, int64_t batch,
                      int64_t classes, int64_t plane, double tau, DType dtype, int device, std::uintptr_t stream) {
  const int64_t pixels = batch * plane;
  if (pixels == 0) return;
  if (classes <= 0) throw std::invalid_argument("pixel_kd: the class axis must not be empty");
  if (!(tau > 0)) throw std::invalid_argument("pixel_kd: tau must be positive");
  if (grad != 0 && coef == 0) throw std::invalid_argument("pixel_kd: a gradient needs its coefficient");
  check_grid_dim((plane + kPixelThreads - 1) / kPixelThreads, "pixel_kd", "pixels per image");
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "pixel_kd_forward", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(pixel_grid(batch, plane), kPixelThreads, 0, as_stream(stream), pixel_kd_kernel<T>)(
        reinterpret_cast<const T*>(student), reinterpret_cast<const T*>(teacher),
        reinterpret_cast<const uint8_t*>(ignore), reinterpret_cast<const float*>(weight), clamp_weight,
        reinterpret_cast<const float*>(coef), reinterpret_cast<float*>(out), reinterpret_cast<float*>(partials),
        reinterpret_cast<T*>(grad), reinterpret_cast<const T*>(grad_mult), batch, classes, plane, static_cast<float>(1.0 / tau));
  });
  check_launch("pixel_kd_forward");
}

}  // namespace segkd
