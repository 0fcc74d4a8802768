// CBAM spatial pooling: mean and max over H*W for every (n, c) row, and its backward.
// Forward: one block per row, fp32 accumulation, the first maximal position kept for the backward.
// Rows that start 16-byte aligned (aligned base, H*W a multiple of the vector width) are read with
// 128-bit loads, two in flight per thread; others element by element.
// Backward: dx = g_avg / P everywhere plus g_max at the argmax, on a 2-D grid (y: rows, x: positions)
// so that no thread divides a flat index by P; 128-bit stores when the rows are aligned.
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kPoolThreads = 256;

struct SumMax {
  float sum = 0.f, best = -INFINITY;
  int64_t best_i;
  __device__ __forceinline__ explicit SumMax(int64_t none) : best_i(none) {}
  __device__ __forceinline__ void add(float v, int64_t i) {
    sum += v;
    if (max_index_better(v, i, best, best_i)) { best = v; best_i = i; }
  }
};

template <typename T>
__global__ void __launch_bounds__(kPoolThreads)
spatial_pool_forward_kernel(const T* __restrict__ x, T* __restrict__ avg, T* __restrict__ max_out,
                            int64_t* __restrict__ argmax, int64_t plane, bool vec) {
  constexpr int V = Vec16<T>::kSize;
  const int64_t row = blockIdx.x;
  const T* row_x = x + row * plane;

  SumMax acc(plane);  // index `plane` is larger than any position: loses every tie
  if (vec) {  // plane % V == 0 and the row is aligned
    const int64_t stride = static_cast<int64_t>(blockDim.x) * V;
    // two independent 128-bit loads per iteration keep more bytes in flight per thread
    int64_t base = threadIdx.x * static_cast<int64_t>(V);
    for (; base + stride < plane; base += 2 * stride) {
      float a[V], b[V];
      load16(row_x + base, a);
      load16(row_x + base + stride, b);
#pragma unroll
      for (int v = 0; v < V; ++v) acc.add(a[v], base + v);
#pragma unroll
      for (int v = 0; v < V; ++v) acc.add(b[v], base + stride + v);
    }
    if (base < plane) {
      float a[V];
      load16(row_x + base, a);
#pragma unroll
      for (int v = 0; v < V; ++v) acc.add(a[v], base + v);
    }
  } else {
    for (int64_t i = threadIdx.x; i < plane; i += blockDim.x) acc.add(to_float(row_x[i]), i);
  }
  float sum = warp_sum(acc.sum), best = acc.best;
  int64_t best_i = acc.best_i;
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

// grid (x: position blocks, y: rows, looping when rows exceed the grid's y limit); each thread
// writes V consecutive positions per step.
template <typename T>
__global__ void __launch_bounds__(kPoolThreads)
spatial_pool_backward_kernel(const T* __restrict__ grad_avg, const T* __restrict__ grad_max,
                             const int64_t* __restrict__ argmax, T* __restrict__ dx, int64_t rows, int64_t plane,
                             bool vec) {
  constexpr int V = Vec16<T>::kSize;
  const float inv_plane = 1.f / static_cast<float>(plane);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const float ga = to_float(grad_avg[row]) * inv_plane, gm = to_float(grad_max[row]);
    const int64_t am = argmax[row];
    T* out = dx + row * plane;
    for (int64_t base = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * V; base < plane;
         base += stride) {
      float g[V];
#pragma unroll
      for (int v = 0; v < V; ++v) g[v] = base + v == am ? ga + gm : ga;
      if (vec) {
        store16(out + base, g);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v)
          if (base + v < plane) out[base + v] = from_float<T>(g[v]);
      }
    }
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
    const bool vec = plane % Vec16<T>::kSize == 0 && aligned16(x);
    SEGKD_LAUNCH(static_cast<unsigned>(rows), kPoolThreads, 0, as_stream(stream), spatial_pool_forward_kernel<T>)(
        reinterpret_cast<const T*>(x), reinterpret_cast<T*>(avg), reinterpret_cast<T*>(max),
        reinterpret_cast<int64_t*>(argmax), plane, vec);
  });
  check_launch("spatial_pool_forward");
}

void spatial_pool_backward(std::uintptr_t grad_avg, std::uintptr_t grad_max, std::uintptr_t argmax,
                           std::uintptr_t dx, int64_t rows, int64_t plane, DType dtype, int device,
                           std::uintptr_t stream) {
  const int64_t total = rows * plane;
  if (total == 0) return;
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "spatial_pool_backward", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Vec16<T>::kSize;
    const bool vec = plane % V == 0 && aligned16(dx);
    // x covers a row's positions (V per thread), y the rows up to the grid's y limit
    const int64_t per_row = (plane + static_cast<int64_t>(kPoolThreads) * V - 1) / (static_cast<int64_t>(kPoolThreads) * V);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(per_row, 65535)),
                    static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
    SEGKD_LAUNCH(grid, kPoolThreads, 0, as_stream(stream), spatial_pool_backward_kernel<T>)(
        reinterpret_cast<const T*>(grad_avg), reinterpret_cast<const T*>(grad_max),
        reinterpret_cast<const int64_t*>(argmax), reinterpret_cast<T*>(dx), rows, plane, vec);
  });
  check_launch("spatial_pool_backward");
}

}  // namespace segkd
