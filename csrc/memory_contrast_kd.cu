// Memory-bank contrast (docs/losses.md 4b): M anchor rows against a bank of Q entries, the M x Q
// similarity matrices never stored.
//
// Inputs are the unit anchor rows a (student) and b (teacher), (M, C), and the bank (Q, C), row-major
// in one dtype; logits are S = a . bank * inv_temp and T = b . bank * inv_temp with
// inv_temp = 1 / (tau kd_tau), computed with fp32 FMA. A block owns 32 anchors; warp w owns anchors
// 4w..4w+3 and lane l entry l of every 32-entry bank tile, so row reductions are warp shuffles.
// Each channel chunk of the 32 anchors (student and teacher) and of the bank tile is staged in
// shared memory channel-major (coalesced global reads along the channels).
// Forward: per anchor, running max / sum-exp of S and of T and the rescaled accumulator
// sum exp(T - m_T) (T - S); KL = acc / l_T - lse_T + lse_S; writes the KL and both log-sum-exps.
// Backward: block (anchor tile, 32-channel tile) recomputes the tiles,
// dS = exp(S - lse_S) - exp(T - lse_T), stages it and the bank tile's channel slice, and
// accumulates da[m, d] = grad_scale * g * sum_q dS[m, q] bank[q, d] in registers: no atomics.
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kTile = 32;
constexpr int kThreads = 256;  // 8 warps x 4 anchors
constexpr int kRowsPerWarp = kTile / (kThreads / 32);

__device__ __forceinline__ float warp_max_all(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max_nan(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

struct Stage {
  float a[kTile][kTile + 1], b[kTile][kTile + 1], q[kTile][kTile + 1];  // [channel][anchor or entry]
};

// s[k], t[k]: raw dots of anchors r0 + 4w + k (student, teacher) with bank entry q0 + lane.
template <typename T>
__device__ __forceinline__ void tile_dots(const T* __restrict__ a, const T* __restrict__ b,
                                          const T* __restrict__ bank, int64_t rows, int64_t channels,
                                          int64_t entries, int64_t r0, int64_t q0, Stage& sm,
                                          float (&s)[kRowsPerWarp], float (&t)[kRowsPerWarp]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) s[k] = t[k] = 0.f;
  for (int64_t c0 = 0; c0 < channels; c0 += kTile) {
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += blockDim.x) {
      const int cc = idx % kTile, pp = idx / kTile;  // consecutive threads: consecutive channels
      const int64_t c = c0 + cc, r = r0 + pp, e = q0 + pp;
      const bool row_ok = c < channels && r < rows, entry_ok = c < channels && e < entries;
      sm.a[cc][pp] = row_ok ? to_float(a[r * channels + c]) : 0.f;
      sm.b[cc][pp] = row_ok ? to_float(b[r * channels + c]) : 0.f;
      sm.q[cc][pp] = entry_ok ? to_float(bank[e * channels + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int cc = 0; cc < kTile; ++cc) {
      const float x = sm.q[cc][lane];
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        s[k] = fmaf(sm.a[cc][warp * kRowsPerWarp + k], x, s[k]);
        t[k] = fmaf(sm.b[cc][warp * kRowsPerWarp + k], x, t[k]);
      }
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) memory_contrast_forward_kernel(
    const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ bank, float* __restrict__ row_kl,
    float* __restrict__ lse, int64_t rows, int64_t channels, int64_t entries, float inv_temp) {
  __shared__ Stage sm;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float m_s[kRowsPerWarp], l_s[kRowsPerWarp], m_t[kRowsPerWarp], l_t[kRowsPerWarp], acc[kRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    m_s[k] = m_t[k] = -INFINITY;
    l_s[k] = l_t[k] = acc[k] = 0.f;
  }
  for (int64_t q0 = 0; q0 < entries; q0 += kTile) {
    float s[kRowsPerWarp], t[kRowsPerWarp];
    tile_dots(a, b, bank, rows, channels, entries, r0, q0, sm, s, t);
    const bool valid = q0 + lane < entries;
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const float sv = valid ? s[k] * inv_temp : -INFINITY, tv = valid ? t[k] * inv_temp : -INFINITY;
      const float ms = max_nan(m_s[k], warp_max_all(sv)), mt = max_nan(m_t[k], warp_max_all(tv));
      const float es = valid ? expf(sv - ms) : 0.f, et = valid ? expf(tv - mt) : 0.f;
      const float alpha_t = rescale(m_t[k], mt);
      l_s[k] = l_s[k] * rescale(m_s[k], ms) + warp_sum(es);
      l_t[k] = l_t[k] * alpha_t + warp_sum(et);
      acc[k] = acc[k] * alpha_t + warp_sum(valid ? et * (tv - sv) : 0.f);
      m_s[k] = ms;
      m_t[k] = mt;
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int64_t r = r0 + warp * kRowsPerWarp + k;
      if (r >= rows) continue;
      const float lse_s = m_s[k] + logf(l_s[k]), lse_t = m_t[k] + logf(l_t[k]);
      row_kl[r] = acc[k] / l_t[k] - lse_t + lse_s;
      lse[r] = lse_s;
      lse[rows + r] = lse_t;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) memory_contrast_backward_kernel(
    const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ bank, const float* __restrict__ lse,
    const float* __restrict__ grad_loss, float* __restrict__ da, int64_t rows, int64_t channels, int64_t entries,
    float inv_temp, float grad_scale) {
  __shared__ Stage sm;
  __shared__ float dsh[kTile][kTile + 1];   // [anchor][entry]
  __shared__ float qsh[kTile][kTile + 1];   // [entry][channel of this block's tile]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile, d0 = static_cast<int64_t>(blockIdx.y) * kTile;
  float lse_s[kRowsPerWarp], lse_t[kRowsPerWarp], acc[kRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int64_t r = r0 + warp * kRowsPerWarp + k;
    lse_s[k] = r < rows ? lse[r] : 0.f;
    lse_t[k] = r < rows ? lse[rows + r] : 0.f;
    acc[k] = 0.f;
  }
  for (int64_t q0 = 0; q0 < entries; q0 += kTile) {
    float s[kRowsPerWarp], t[kRowsPerWarp];
    tile_dots(a, b, bank, rows, channels, entries, r0, q0, sm, s, t);
    const bool valid = q0 + lane < entries;
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const bool ok = valid && r0 + warp * kRowsPerWarp + k < rows;
      dsh[warp * kRowsPerWarp + k][lane] =
          ok ? expf(s[k] * inv_temp - lse_s[k]) - expf(t[k] * inv_temp - lse_t[k]) : 0.f;
    }
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += blockDim.x) {
      const int dd = idx % kTile, ee = idx / kTile;
      const int64_t d = d0 + dd, e = q0 + ee;
      qsh[ee][dd] = (d < channels && e < entries) ? to_float(bank[e * channels + d]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int ee = 0; ee < kTile; ++ee) {
      const float x = qsh[ee][lane];
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) acc[k] = fmaf(dsh[warp * kRowsPerWarp + k][ee], x, acc[k]);
    }
    __syncthreads();
  }
  const float g = grad_loss[0] * grad_scale;
  const int64_t d = d0 + lane;
  if (d < channels) {
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int64_t r = r0 + warp * kRowsPerWarp + k;
      if (r < rows) da[r * channels + d] = acc[k] * g;
    }
  }
}

void check_args(double inv_temp, int64_t rows, int64_t channels, const char* what) {
  if (!(inv_temp > 0) || !(inv_temp < 1e30)) {
    throw std::invalid_argument(std::string(what) + ": inv_temp must be positive and finite");
  }
  if (rows < 0 || channels < 0) throw std::invalid_argument(std::string(what) + ": negative size");
  check_grid_dim((rows + kTile - 1) / kTile, what, "anchor tiles");
  if ((channels + kTile - 1) / kTile > 65535) throw std::invalid_argument(std::string(what) + ": too many channels");
}

}  // namespace

void memory_contrast_forward(std::uintptr_t a, std::uintptr_t b, std::uintptr_t bank, std::uintptr_t row_kl,
                             std::uintptr_t lse, int64_t rows, int64_t channels, int64_t entries, double inv_temp,
                             DType dtype, int device, std::uintptr_t stream) {
  check_args(inv_temp, rows, channels, "memory_contrast_forward");
  if (entries <= 0) throw std::invalid_argument("memory_contrast_forward: the bank needs at least one entry");
  if (rows == 0 || channels == 0) return;
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "memory_contrast_forward", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(static_cast<unsigned>((rows + kTile - 1) / kTile), kThreads, 0, as_stream(stream),
                 memory_contrast_forward_kernel<T>)(
        reinterpret_cast<const T*>(a), reinterpret_cast<const T*>(b), reinterpret_cast<const T*>(bank),
        reinterpret_cast<float*>(row_kl), reinterpret_cast<float*>(lse), rows, channels, entries,
        static_cast<float>(inv_temp));
  });
  check_launch("memory_contrast_forward");
}

void memory_contrast_backward(std::uintptr_t a, std::uintptr_t b, std::uintptr_t bank, std::uintptr_t lse,
                              std::uintptr_t grad_loss, std::uintptr_t da, int64_t rows, int64_t channels,
                              int64_t entries, double inv_temp, double grad_scale, DType dtype, int device,
                              std::uintptr_t stream) {
  check_args(inv_temp, rows, channels, "memory_contrast_backward");
  if (entries <= 0) throw std::invalid_argument("memory_contrast_backward: the bank needs at least one entry");
  if (rows == 0 || channels == 0) return;
  DeviceGuard guard(device);
  const dim3 grid(static_cast<unsigned>((rows + kTile - 1) / kTile), static_cast<unsigned>((channels + kTile - 1) / kTile));
  dispatch_float_types(dtype, "memory_contrast_backward", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(grid, kThreads, 0, as_stream(stream), memory_contrast_backward_kernel<T>)(
        reinterpret_cast<const T*>(a), reinterpret_cast<const T*>(b), reinterpret_cast<const T*>(bank),
        reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(grad_loss), reinterpret_cast<float*>(da),
        rows, channels, entries, static_cast<float>(inv_temp), static_cast<float>(grad_scale));
  });
  check_launch("memory_contrast_backward");
}

}  // namespace segkd
