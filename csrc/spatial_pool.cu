// CBAM spatial pooling: mean and max over H*W for every (n, c) row, and its backward.
// Forward: one block per row, or per range of a row when the rows alone fill less than two waves
// (plan_row_split; the ranges' sums, maxima and argmaxima are then combined per row in range order
// by a second kernel), fp32 accumulation, the first maximal position kept for the backward.
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
                            int64_t* __restrict__ argmax, float* __restrict__ partials, int64_t plane,
                            int64_t chunk, bool vec) {
  constexpr int V = Vec16<T>::kSize;
  const int64_t row = blockIdx.x;  // blockIdx.y: the range [begin, end) of the row
  const int64_t begin = blockIdx.y * chunk, end = begin + chunk < plane ? begin + chunk : plane;
  const T* row_x = x + row * plane;

  SumMax acc(plane);  // index `plane` is larger than any position: loses every tie
  if (vec) {  // plane % V == 0, chunk % V == 0 and the row is aligned
    const int64_t stride = static_cast<int64_t>(blockDim.x) * V;
    // two independent 128-bit loads per iteration keep more bytes in flight per thread
    int64_t base = begin + threadIdx.x * static_cast<int64_t>(V);
    for (; base + stride < end; base += 2 * stride) {
      float a[V], b[V];
      load16(row_x + base, a);
      load16(row_x + base + stride, b);
#pragma unroll
      for (int v = 0; v < V; ++v) acc.add(a[v], base + v);
#pragma unroll
      for (int v = 0; v < V; ++v) acc.add(b[v], base + stride + v);
    }
    if (base < end) {
      float a[V];
      load16(row_x + base, a);
#pragma unroll
      for (int v = 0; v < V; ++v) acc.add(a[v], base + v);
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) acc.add(to_float(row_x[i]), i);
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
      if (partials == nullptr) {
        avg[row] = from_float<T>(sum / static_cast<float>(plane));
        max_out[row] = from_float<T>(best);
        argmax[row] = best_i;
      } else {  // 4 floats per range: sum, maximum, its position (int64, 8-byte aligned)
        float* p = partials + (row * gridDim.y + blockIdx.y) * 4;
        p[0] = sum;
        p[1] = best;
        *reinterpret_cast<int64_t*>(p + 2) = best_i;
      }
    }
  }
}

// Per row: the ranges' partials of spatial_pool_forward_kernel combined in range order (ranges
// ascend in position, so the first maximum stays the first; the same bits run to run).
template <typename T>
__global__ void __launch_bounds__(kPoolThreads)
spatial_pool_combine_kernel(const float* __restrict__ partials, T* __restrict__ avg, T* __restrict__ max_out,
                            int64_t* __restrict__ argmax, int64_t rows, int64_t splits, int64_t plane) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < rows; row += step) {
    const float* p = partials + row * splits * 4;
    float sum = p[0], best = p[1];
    int64_t best_i = *reinterpret_cast<const int64_t*>(p + 2);
#pragma unroll 1  // a few ranges per row; unrolled, the fp32 instance spilled on sm_80
    for (int64_t k = 1; k < splits; ++k) {
      const float* q = p + k * 4;
      sum += q[0];
      const int64_t qi = *reinterpret_cast<const int64_t*>(q + 2);
      if (max_index_better(q[1], qi, best, best_i)) { best = q[1]; best_i = qi; }
    }
    avg[row] = from_float<T>(sum / static_cast<float>(plane));
    max_out[row] = from_float<T>(best);
    argmax[row] = best_i;
  }
}

// Ranges of at least two 128-bit loads per thread (one loop step), aligned to the vector width.
template <typename T>
RowSplit plan_pool_rows(int64_t rows, int64_t plane, int device) {
  constexpr int V = Vec16<T>::kSize;
  return plan_row_split(rows, plane, 2LL * kPoolThreads * V, V, 2048 / kPoolThreads, device);
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

int64_t spatial_pool_workspace(int64_t rows, int64_t plane, DType dtype, int device) {
  if (rows <= 0 || plane <= 0) return 0;
  DeviceGuard guard(device);
  int64_t floats = 0;
  dispatch_float_types(dtype, "spatial_pool_workspace", [&](auto tag) {
    const RowSplit plan = plan_pool_rows<decltype(tag)>(rows, plane, device);
    floats = plan.splits > 1 ? rows * plan.splits * 4 : 0;
  });
  return floats;
}

void spatial_pool_forward(std::uintptr_t x, std::uintptr_t avg, std::uintptr_t max, std::uintptr_t argmax,
                          std::uintptr_t workspace, int64_t workspace_floats, int64_t rows, int64_t plane, DType dtype,
                          int device, std::uintptr_t stream) {
  if (rows == 0) return;
  if (plane <= 0) throw std::invalid_argument("spatial_pool: H*W must be positive");
  if (rows > 2147483647LL) throw std::invalid_argument("spatial_pool: too many (n, c) rows for one grid");
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "spatial_pool_forward", [&](auto tag) {
    using T = decltype(tag);
    const RowSplit plan = plan_pool_rows<T>(rows, plane, device);
    const bool split = plan.splits > 1;
    if (split && (workspace == 0 || (workspace & 7u) != 0 || workspace_floats < rows * plan.splits * 4))
      throw std::invalid_argument("spatial_pool: workspace must hold spatial_pool_workspace() floats, 8-byte aligned");
    const bool vec = plane % Vec16<T>::kSize == 0 && aligned16(x);
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(plan.splits));
    SEGKD_LAUNCH(grid, kPoolThreads, 0, as_stream(stream), spatial_pool_forward_kernel<T>)(
        reinterpret_cast<const T*>(x), reinterpret_cast<T*>(avg), reinterpret_cast<T*>(max),
        reinterpret_cast<int64_t*>(argmax), split ? reinterpret_cast<float*>(workspace) : nullptr, plane, plan.chunk,
        vec);
    check_launch("spatial_pool_forward");
    if (split)
      SEGKD_LAUNCH(grid_for(rows, kPoolThreads), kPoolThreads, 0, as_stream(stream), spatial_pool_combine_kernel<T>)(
          reinterpret_cast<const float*>(workspace), reinterpret_cast<T*>(avg), reinterpret_cast<T*>(max),
          reinterpret_cast<int64_t*>(argmax), rows, plan.splits, plane);
  });
  check_launch("spatial_pool_forward (combine)");
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
