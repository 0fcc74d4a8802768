// AttnFD loss epilogue (docs/losses.md 6) on the device, so a call costs launches, not torch ops.
//
// attnfd_finish: one block sums the fp64 per-block partials of attnfd_dots (csrc/channel_pool.cu)
// in a fixed order (thread i takes partials i, i + 256, ...; then warp shuffles and one pass over
// the warp sums: the same order on every run, so the loss is deterministic), and writes the dots
// <s,s>, <t,t>, <s,t> and the loss in the output dtype with exactly the clamped form of
// reference.py:  (ss / ns^2 + tt / nt^2 - 2 st / (ns nt)) / N,  ns = max(||s||, eps), nt likewise.
// attnfd_backward_dots: ds = g * (alpha * s + beta * t), with alpha, beta recomputed by every
// thread from the three dots (a few fp64 flops, cheaper than a launch or a barrier):
//   ||s|| >= eps: alpha = 2 st / (N ns^3 nt)  (the ss-terms cancel where the clamp passes the gradient)
//   ||s|| <  eps: alpha = 2 / (N ns^2)        (ns is the constant eps there)
//   beta = -2 / (N ns nt).
// A NaN norm stays NaN through the clamp (as torch.clamp_min), never becomes eps.
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kFinishThreads = 256;
constexpr int kThreads = 256;

__device__ __forceinline__ double warp_sum_f64(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// max(v, eps) that keeps a NaN (fmax would return eps).
__device__ __forceinline__ double clamp_min_nan(double v, double eps) { return v < eps ? eps : v; }

template <typename L>
__global__ void __launch_bounds__(kFinishThreads)
attnfd_finish_kernel(const double* __restrict__ partials, int64_t num_partials, L* __restrict__ loss,
                     double* __restrict__ dots, double batch, double eps) {
  double ss = 0.0, tt = 0.0, st = 0.0;
  for (int64_t i = threadIdx.x; i < num_partials; i += kFinishThreads) {
    ss += partials[i * 3 + 0];
    tt += partials[i * 3 + 1];
    st += partials[i * 3 + 2];
  }
  __shared__ double scratch[3][kFinishThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  ss = warp_sum_f64(ss);
  tt = warp_sum_f64(tt);
  st = warp_sum_f64(st);
  if (lane == 0) { scratch[0][warp] = ss; scratch[1][warp] = tt; scratch[2][warp] = st; }
  __syncthreads();
  if (threadIdx.x == 0) {
    ss = scratch[0][0]; tt = scratch[1][0]; st = scratch[2][0];
#pragma unroll
    for (int w = 1; w < kFinishThreads / 32; ++w) { ss += scratch[0][w]; tt += scratch[1][w]; st += scratch[2][w]; }
    const double ns = clamp_min_nan(sqrt(ss), eps), nt = clamp_min_nan(sqrt(tt), eps);
    const double value = (ss / (ns * ns) + tt / (nt * nt) - 2.0 * st / (ns * nt)) / batch;
    dots[0] = ss;
    dots[1] = tt;
    dots[2] = st;
    *loss = from_float<L>(static_cast<float>(value));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
attnfd_backward_dots_kernel(const T* __restrict__ s, const T* __restrict__ t, const double* __restrict__ dots,
                            const T* __restrict__ grad, T* __restrict__ ds, int64_t total, double batch,
                            double eps, bool vec) {
  const double ss = dots[0], tt = dots[1], st = dots[2];
  const double norm_s = sqrt(ss);
  const double ns = clamp_min_nan(norm_s, eps), nt = clamp_min_nan(sqrt(tt), eps);
  const double g = static_cast<double>(to_float(grad[0]));  // as reference: coefficients / N, then * g
  const float alpha = static_cast<float>((norm_s >= eps ? 2.0 * st / (ns * ns * ns * nt) : 2.0 / (ns * ns)) / batch * g);
  const float beta = static_cast<float>(-2.0 / (ns * nt) / batch * g);
  constexpr int V = Vec16<T>::kSize;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (vec) {  // 128-bit accesses: total % V == 0 and s, t, ds 16-byte aligned
    for (int64_t i = first * V; i < total; i += step * V) {
      float a[V], b[V];
      load16(s + i, a);
      load16(t + i, b);
#pragma unroll
      for (int v = 0; v < V; ++v) a[v] = alpha * a[v] + beta * b[v];
      store16(ds + i, a);
    }
  } else {
    for (int64_t i = first; i < total; i += step) ds[i] = from_float<T>(alpha * to_float(s[i]) + beta * to_float(t[i]));
  }
}

}  // namespace

void attnfd_finish(std::uintptr_t partials, int64_t num_partials, std::uintptr_t loss, std::uintptr_t dots,
                   int64_t batch, double eps, DType loss_dtype, int device, std::uintptr_t stream) {
  if (num_partials < 0) throw std::invalid_argument("attnfd_finish: num_partials must be >= 0");
  if (batch < 1) throw std::invalid_argument("attnfd_finish: batch must be >= 1");
  DeviceGuard guard(device);
  dispatch_float_types(loss_dtype, "attnfd_finish", [&](auto tag) {
    using L = decltype(tag);
    SEGKD_LAUNCH(1, kFinishThreads, 0, as_stream(stream), attnfd_finish_kernel<L>)(
        reinterpret_cast<const double*>(partials), num_partials, reinterpret_cast<L*>(loss),
        reinterpret_cast<double*>(dots), static_cast<double>(batch), eps);
  });
  check_launch("attnfd_finish");
}

void attnfd_backward_dots(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t dots, std::uintptr_t grad,
                          std::uintptr_t ds, int64_t total, int64_t batch, double eps, DType dtype, int device,
                          std::uintptr_t stream) {
  if (total == 0) return;
  if (batch < 1) throw std::invalid_argument("attnfd_backward_dots: batch must be >= 1");
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "attnfd_backward_dots", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Vec16<T>::kSize;
    const bool vec = total % V == 0 && aligned16(student) && aligned16(teacher) && aligned16(ds);
    SEGKD_LAUNCH(grid_for((total + V - 1) / V, kThreads), kThreads, 0, as_stream(stream),
                 attnfd_backward_dots_kernel<T>)(
        reinterpret_cast<const T*>(student), reinterpret_cast<const T*>(teacher),
        reinterpret_cast<const double*>(dots), reinterpret_cast<const T*>(grad), reinterpret_cast<T*>(ds), total,
        static_cast<double>(batch), eps, vec);
  });
  check_launch("attnfd_backward_dots");
}

}  // namespace segkd
