// Pairwise similarity distillation (docs/losses.md 3), Gram path: per image, the Gram matrices of the
// per-pixel L2-normalised features, G = X_hat X_hat^T / Y_hat (C_x x C_y), never the P x P matrix.
//
// The loss ||AA||^2 - 2 ||AB||^2 + ||BB||^2 cancels when student ~ teacher, so the Gram entries are
// accumulated in fp64 (products of two fp32 values are exact in fp64): plain fp32 accumulation is
// 2-10% off there. Normalisation is fused: a pass computes the per-pixel norms, and the Gram kernel
// divides each loaded value by its pixel's clamped norm while staging it in shared memory.
// Grid: (column tiles, row tiles, image x pixel splits); splits add into G with fp64 atomics.
// Also here: the per-pixel normalisation (fp32 copy) and its backward, shared with cross_image_kd.
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kNormThreads = 256;
constexpr int kGramTile = 32;       // 32 x 32 Gram entries per block
constexpr int kGramChunk = 32;      // pixels staged per step
constexpr int kGramThreads = 256;   // each thread owns 4 entries of one column
constexpr int64_t kPixelsPerSplit = 4096;

template <typename T>
__global__ void __launch_bounds__(kNormThreads)
pixel_norm_kernel(const T* __restrict__ x, float* __restrict__ norm, int64_t batch, int64_t channels, int64_t plane) {
  const int64_t pixels = batch * plane;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < pixels;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = g / plane, p = g - n * plane;
    const T* px = x + n * channels * plane + p;
    float ss = 0.f;
    for (int64_t c = 0; c < channels; ++c) {
      const float v = to_float(px[c * plane]);
      ss = fmaf(v, v, ss);
    }
    norm[g] = sqrtf(ss);
  }
}

// out[n, c, p] = x[n, c, p] / max(||x[n, :, p]||, eps) in fp32, and norm[n, p] = ||x[n, :, p]||.
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
normalize_pixels_kernel(const T* __restrict__ x, float* __restrict__ out, float* __restrict__ norm, int64_t batch,
                        int64_t channels, int64_t plane, float eps) {
  const int64_t pixels = batch * plane;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < pixels;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = g / plane, p = g - n * plane;
    const T* px = x + n * channels * plane + p;
    float ss = 0.f;
    for (int64_t c = 0; c < channels; ++c) {
      const float v = to_float(px[c * plane]);
      ss = fmaf(v, v, ss);
    }
    const float nv = sqrtf(ss), d = max_nan(nv, eps);
    norm[g] = nv;
    float* po = out + n * channels * plane + p;
    for (int64_t c = 0; c < channels; ++c) po[c * plane] = to_float(px[c * plane]) / d;
  }
}

// Backward of a = x / max(||x||, eps) per pixel: dx = (da - a (a . da)) / ||x|| where the norm is
// above eps and differentiable, else da / max(||x||, eps) (clamped, or detach_norm).
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
normalize_pixels_backward_kernel(const float* __restrict__ da, const T* __restrict__ x, const float* __restrict__ norm,
                                 T* __restrict__ dx, int64_t batch, int64_t channels, int64_t plane, float eps,
                                 bool detach_norm) {
  const int64_t pixels = batch * plane;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < pixels;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = g / plane, p = g - n * plane;
    const int64_t base = n * channels * plane + p;
    const float nv = norm[g], d = max_nan(nv, eps);
    // torch.clamp_min passes the gradient to the norm where norm >= eps
    const bool through_norm = !detach_norm && nv >= eps;
    float dot = 0.f;
    if (through_norm)
      for (int64_t c = 0; c < channels; ++c) dot = fmaf(to_float(x[base + c * plane]) / d, da[base + c * plane], dot);
    for (int64_t c = 0; c < channels; ++c) {
      float v = da[base + c * plane];
      if (through_norm) v -= (to_float(x[base + c * plane]) / d) * dot;
      dx[base + c * plane] = from_float<T>(v / d);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kGramThreads)
gram_kernel(const T* __restrict__ x, const float* __restrict__ norm_x, const T* __restrict__ y,
            const float* __restrict__ norm_y, double* __restrict__ gram, int64_t cx, int64_t cy, int64_t plane,
            int64_t splits, float eps) {
  __shared__ float xs[kGramTile][kGramChunk + 1];
  __shared__ float ys[kGramTile][kGramChunk + 1];
  const int64_t n = blockIdx.z / splits, split = blockIdx.z - n * splits;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kGramTile, j0 = static_cast<int64_t>(blockIdx.x) * kGramTile;
  const int64_t p_begin = split * kPixelsPerSplit;
  const int64_t p_end = p_begin + kPixelsPerSplit < plane ? p_begin + kPixelsPerSplit : plane;
  const T* xn = x + n * cx * plane;
  const T* yn = y + n * cy * plane;
  const float* nx = norm_x + n * plane;
  const float* ny = norm_y + n * plane;
  const int tx = threadIdx.x % kGramTile, ty = threadIdx.x / kGramTile;  // ty in [0, 8)
  double acc[4] = {0.0, 0.0, 0.0, 0.0};

  for (int64_t p0 = p_begin; p0 < p_end; p0 += kGramChunk) {
    // Stage 32 channels x 32 pixels of each operand, normalised (zero outside the ranges).
    for (int idx = threadIdx.x; idx < kGramTile * kGramChunk; idx += blockDim.x) {
      const int c = idx / kGramChunk, pp = idx - c * kGramChunk;
      const int64_t p = p0 + pp;
      float vx = 0.f, vy = 0.f;
      if (p < p_end) {
        if (i0 + c < cx) vx = to_float(xn[(i0 + c) * plane + p]) / max_nan(nx[p], eps);
        if (j0 + c < cy) vy = to_float(yn[(j0 + c) * plane + p]) / max_nan(ny[p], eps);
      }
      xs[c][pp] = vx;
      ys[c][pp] = vy;
    }
    __syncthreads();
#pragma unroll 8
    for (int pp = 0; pp < kGramChunk; ++pp) {
      const double yv = ys[tx][pp];
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[r] = fma(static_cast<double>(xs[ty * 4 + r][pp]), yv, acc[r]);
    }
    __syncthreads();
  }
  const int64_t j = j0 + tx;
  if (j >= cy) return;
  double* gn = gram + n * cx * cy;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + ty * 4 + r;
    if (i < cx) {
      if (splits == 1) gn[i * cy + j] = acc[r];
      else atomicAdd(gn + i * cy + j, acc[r]);
    }
  }
}

}  // namespace

void pixel_norm(std::uintptr_t x, std::uintptr_t norm, int64_t batch, int64_t channels, int64_t plane, DType dtype,
                int device, std::uintptr_t stream) {
  const int64_t pixels = batch * plane;
  if (pixels == 0) return;
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "pixel_norm", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(grid_for(pixels, kNormThreads), kNormThreads, 0, as_stream(stream), pixel_norm_kernel<T>)(
        reinterpret_cast<const T*>(x), reinterpret_cast<float*>(norm), batch, channels, plane);
  });
  check_launch("pixel_norm");
}

void normalize_pixels(std::uintptr_t x, std::uintptr_t out, std::uintptr_t norm, int64_t batch, int64_t channels,
                      int64_t plane, double eps, DType dtype, int device, std::uintptr_t stream) {
  const int64_t pixels = batch * plane;
  if (pixels == 0) return;
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "normalize_pixels", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(grid_for(pixels, kNormThreads), kNormThreads, 0, as_stream(stream), normalize_pixels_kernel<T>)(
        reinterpret_cast<const T*>(x), reinterpret_cast<float*>(out), reinterpret_cast<float*>(norm), batch, channels,
        plane, static_cast<float>(eps));
  });
  check_launch("normalize_pixels");
}

void normalize_pixels_backward(std::uintptr_t da, std::uintptr_t x, std::uintptr_t norm, std::uintptr_t dx,
                               int64_t batch, int64_t channels, int64_t plane, double eps, bool detach_norm,
                               DType dtype, int device, std::uintptr_t stream) {
  const int64_t pixels = batch * plane;
  if (pixels == 0) return;
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "normalize_pixels_backward", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(grid_for(pixels, kNormThreads), kNormThreads, 0, as_stream(stream),
                 normalize_pixels_backward_kernel<T>)(
        reinterpret_cast<const float*>(da), reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(norm),
        reinterpret_cast<T*>(dx), batch, channels, plane, static_cast<float>(eps), detach_norm);
  });
  check_launch("normalize_pixels_backward");
}

void normalized_gram(std::uintptr_t x, std::uintptr_t norm_x, std::uintptr_t y, std::uintptr_t norm_y,
                     std::uintptr_t gram, int64_t batch, int64_t cx, int64_t cy, int64_t plane, double eps,
                     DType dtype, int device, std::uintptr_t stream) {
  // gram must be zero-filled by the caller: pixel splits add into it.
  if (batch == 0 || cx == 0 || cy == 0 || plane == 0) return;
  const int64_t splits = (plane + kPixelsPerSplit - 1) / kPixelsPerSplit;
  const int64_t gx = (cy + kGramTile - 1) / kGramTile, gy = (cx + kGramTile - 1) / kGramTile;
  if (gy > 65535 || batch * splits > 65535)
    throw std::invalid_argument("normalized_gram: problem too large for one grid");
  DeviceGuard guard(device);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(batch * splits));
  dispatch_float_types(dtype, "normalized_gram", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(grid, kGramThreads, 0, as_stream(stream), gram_kernel<T>)(
        reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(norm_x), reinterpret_cast<const T*>(y),
        reinterpret_cast<const float*>(norm_y), reinterpret_cast<double*>(gram), cx, cy, plane, splits,
        static_cast<float>(eps));
  });
  check_launch("normalized_gram");
}

}  // namespace segkd
