// CBAM spatial-gate input and the AttnFD loss (LOSSES.md 6).
//
// channel_pool: for every pixel of x * gate[n, c] (never materialised), the max and the mean over
// the C channels, and the channel of the first maximum (for the backward). One thread per pixel,
// channels P apart in memory, so the threads of a warp read contiguous addresses.
// channel_pool backward: one block per (n, c) row: dx = gate * (g_mean / C + [c == argmax] g_max)
// and dgate[n, c] = sum over the row of x * (g_mean / C + [c == argmax] g_max), reduced in-block.
// attnfd dots: <s,s>, <t,t>, <s,t> as fp32 per-block partials (the caller sums them in fp64);
// attnfd backward: ds = alpha * s + beta * t with alpha, beta (fp64, on the device) from the caller.
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
channel_pool_forward_kernel(const T* __restrict__ x, const float* __restrict__ gate, T* __restrict__ out,
                            int32_t* __restrict__ argmax, int64_t batch, int64_t channels, int64_t plane) {
  const int64_t pixels = batch * plane;
  const float inv_c = 1.f / static_cast<float>(channels);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < pixels;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = g / plane, p = g - n * plane;
    const T* px = x + n * channels * plane + p;
    const float* pg = gate == nullptr ? nullptr : gate + n * channels;
    float sum = 0.f, best = -INFINITY;
    int64_t best_c = channels;  // loses every tie
    for (int64_t c = 0; c < channels; ++c) {
      float v = to_float(px[c * plane]);
      if (pg != nullptr) v *= pg[c];
      sum += v;
      if (max_index_better(v, c, best, best_c)) { best = v; best_c = c; }
    }
    out[n * 2 * plane + p] = from_float<T>(best);
    out[n * 2 * plane + plane + p] = from_float<T>(sum * inv_c);
    argmax[g] = static_cast<int32_t>(best_c);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
channel_pool_backward_kernel(const T* __restrict__ grad_out, const int32_t* __restrict__ argmax,
                             const T* __restrict__ x, const float* __restrict__ gate, T* __restrict__ dx,
                             float* __restrict__ dgate, int64_t channels, int64_t plane) {
  const int64_t row = blockIdx.x;  // (n, c)
  const int64_t n = row / channels, c = row - n * channels;
  const T* g_max = grad_out + n * 2 * plane;
  const T* g_mean = g_max + plane;
  const int32_t* am = argmax + n * plane;
  const float inv_c = 1.f / static_cast<float>(channels);
  const float gv = gate == nullptr ? 1.f : gate[row];
  float dg = 0.f;
  for (int64_t p = threadIdx.x; p < plane; p += blockDim.x) {
    float d = to_float(g_mean[p]) * inv_c;
    if (am[p] == c) d += to_float(g_max[p]);
    dx[row * plane + p] = from_float<T>(gv * d);
    if (dgate != nullptr) dg += to_float(x[row * plane + p]) * d;
  }
  if (dgate == nullptr) return;
  __shared__ float scratch[32];
  dg = block_sum(dg, scratch);
  if (threadIdx.x == 0) dgate[row] = dg;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
attnfd_dots_kernel(const T* __restrict__ s, const T* __restrict__ t, float* __restrict__ partials, int64_t total) {
  float ss = 0.f, tt = 0.f, st = 0.f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float a = to_float(s[i]), b = to_float(t[i]);
    ss = fmaf(a, a, ss);
    tt = fmaf(b, b, tt);
    st = fmaf(a, b, st);
  }
  __shared__ float scratch[32];
  ss = block_sum(ss, scratch);
  tt = block_sum(tt, scratch);
  st = block_sum(st, scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x * 3 + 0] = ss;
    partials[blockIdx.x * 3 + 1] = tt;
    partials[blockIdx.x * 3 + 2] = st;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
attnfd_backward_kernel(const T* __restrict__ s, const T* __restrict__ t, const double* __restrict__ coefs,
                       T* __restrict__ ds, int64_t total) {
  const float alpha = static_cast<float>(coefs[0]), beta = static_cast<float>(coefs[1]);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    ds[i] = from_float<T>(alpha * to_float(s[i]) + beta * to_float(t[i]));
  }
}

}  // namespace

void channel_pool_forward(std::uintptr_t x, std::uintptr_t gate, std::uintptr_t out, std::uintptr_t argmax,
                          int64_t batch, int64_t channels, int64_t plane, DType dtype, int device,
                          std::uintptr_t stream) {
  const int64_t pixels = batch * plane;
  if (pixels == 0) return;
  if (channels <= 0) throw std::invalid_argument("channel_pool: C must be positive");
  if (channels > 2147483647LL) throw std::invalid_argument("channel_pool: C does not fit the int32 argmax");
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "channel_pool_forward", [&](auto tag) {
    using T = decltype(tag);
    channel_pool_forward_kernel<T><<<grid_for(pixels, kThreads), kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(gate), reinterpret_cast<T*>(out),
        reinterpret_cast<int32_t*>(argmax), batch, channels, plane);
  });
  check_launch("channel_pool_forward");
}

void channel_pool_backward(std::uintptr_t grad_out, std::uintptr_t argmax, std::uintptr_t x, std::uintptr_t gate,
                           std::uintptr_t dx, std::uintptr_t dgate, int64_t batch, int64_t channels, int64_t plane,
                           DType dtype, int device, std::uintptr_t stream) {
  const int64_t rows = batch * channels;
  if (rows == 0 || plane == 0) return;
  if (dgate != 0 && (x == 0 || gate == 0)) throw std::invalid_argument("channel_pool_backward: dgate needs x and gate");
  check_grid_dim(rows, "channel_pool_backward", "(n, c) rows");
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "channel_pool_backward", [&](auto tag) {
    using T = decltype(tag);
    channel_pool_backward_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const T*>(grad_out), reinterpret_cast<const int32_t*>(argmax), reinterpret_cast<const T*>(x),
        reinterpret_cast<const float*>(gate), reinterpret_cast<T*>(dx), reinterpret_cast<float*>(dgate), channels,
        plane);
  });
  check_launch("channel_pool_backward");
}

int64_t attnfd_num_partials(int64_t total) {
  return static_cast<int64_t>(grid_for(total, kThreads * 4, 1024));
}

void attnfd_dots(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t partials, int64_t total,
                 int64_t num_partials, DType dtype, int device, std::uintptr_t stream) {
  if (total == 0) return;
  if (num_partials != attnfd_num_partials(total))
    throw std::invalid_argument("attnfd_dots: partials must hold attnfd_num_partials(total) * 3 floats");
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "attnfd_dots", [&](auto tag) {
    using T = decltype(tag);
    attnfd_dots_kernel<T><<<static_cast<unsigned>(num_partials), kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const T*>(student), reinterpret_cast<const T*>(teacher), reinterpret_cast<float*>(partials),
        total);
  });
  check_launch("attnfd_dots");
}

void attnfd_backward(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t coefs, std::uintptr_t ds,
                     int64_t total, DType dtype, int device, std::uintptr_t stream) {
  if (total == 0) return;
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "attnfd_backward", [&](auto tag) {
    using T = decltype(tag);
    attnfd_backward_kernel<T><<<grid_for(total, kThreads), kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const T*>(student), reinterpret_cast<const T*>(teacher),
        reinterpret_cast<const double*>(coefs), reinterpret_cast<T*>(ds), total);
  });
  check_launch("attnfd_backward");
}

}  // namespace segkd
