// CBAM spatial pooling: mean and max over H*W for every (n, c) row, and its backward.
// Forward: one block per row, fp32 accumulation, the first maximal position kept for the backward.
// Backward: elementwise, dx = g_avg / P everywhere plus g_max at the argmax.
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kPoolThreads = 256;

template <typename T>
__global__ void spatial_pool_forward_kernel(const T* __restrict__ x, T* __restrict__ avg,
                                            T* __restrict__ max_out, int64_t* __restrict__ argmax,
                                            int64_t plane) {
  const int64_t row = blockIdx.x;
  const T* row_x = x + row * plane;

  float sum = 0.f;
  float best = -INFINITY;
  int64_t best_i = plane;  // larger than any index: loses every tie
  for (int64_t i = threadIdx.x; i < plane; i += blockDim.x) {
    const float v = to_float(row_x[i]);
    sum += v;
    if (max_index_better(v, i, best, best_i)) { best = v; best_i = i; }
  }
  sum = warp_sum(sum);
  warp_max_index(best, best_i);

  __shared__ float warp_sums[kPoolThreads / 32];
  __shared__ float warp_best[kPoolThreads / 32];
  __shared__ int64_t warp_best_i[kPoolThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) { warp_sums[warp] = sum; warp_best[warp] = best; warp_best_i[warp] = best_i; }
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x / 32;
    sum = lane < n_warps ? warp_sums[lane] : 0.f;
    best = lane < n_warps ? warp_best[lane] : -INFINITY;
    best_i = lane < n_warps ? warp_best_i[lane] : plane;
    sum = warp_sum(sum);
    warp_max_index(best, best_i);
    if (lane == 0) {
      avg[row] = from_float<T>(sum / static_cast<float>(plane));
      max_out[row] = from_float<T>(best);
      argmax[row] = best_i;
    }
  }
}

template <typename T>
__global__ void spatial_pool_backward_kernel(const T* __restrict__ grad_avg, const T* __restrict__ grad_max,
                                             const int64_t* __restrict__ argmax, T* __restrict__ dx,
                                             int64_t rows, int64_t plane) {
  const int64_t total = rows * plane;
  const float inv_plane = 1.f / static_cast<float>(plane);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = k / plane, i = k - row * plane;
    float g = to_float(grad_avg[row]) * inv_plane;
    if (i == argmax[row]) g += to_float(grad_max[row]);
    dx[k] = from_float<T>(g);
  }
}

}  // namespace

void spatial_pool_forward(std::uintptr_t x, std::uintptr_t avg, std::uintptr_t max, std::uintptr_t argmax,
                          int64_t rows, int64_t plane, DType dtype, int device, std::uintptr_t stream) {
  if (rows == 0) return;
  if (plane <= 0) throw std::invalid_argument("spatial_pool: H*W must be positive");
  if (rows > 2147483647LL) throw std::invalid_argument("spatial_pool: too many (n, c) rows for one grid");
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "spatial_pool_forward", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(static_cast<unsigned>(rows), kPoolThreads, 0, as_stream(stream), spatial_pool_forward_kernel<T>)(
        reinterpret_cast<const T*>(x), reinterpret_cast<T*>(avg), reinterpret_cast<T*>(max),
        reinterpret_cast<int64_t*>(argmax), plane);
  });
  check_launch("spatial_pool_forward");
}

void spatial_pool_backward(std::uintptr_t grad_avg, std::uintptr_t grad_max, std::uintptr_t argmax,
                           std::uintptr_t dx, int64_t rows, int64_t plane, DType dtype, int device,
                           std::uintptr_t stream) {
  const int64_t total = rows * plane;
  if (total == 0) return;
  DeviceGuard guard(device);
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 8);
  dispatch_float_types(dtype, "spatial_pool_backward", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(static_cast<unsigned>(blocks), threads, 0, as_stream(stream), spatial_pool_backward_kernel<T>)(
        reinterpret_cast<const T*>(grad_avg), reinterpret_cast<const T*>(grad_max),
        reinterpret_cast<const int64_t*>(argmax), reinterpret_cast<T*>(dx), rows, plane);
  });
  check_launch("spatial_pool_backward");
}

}  // namespace segkd
