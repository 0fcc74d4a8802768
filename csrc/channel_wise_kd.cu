// Channel-wise distillation (LOSSES.md 1): for every (n, c) row of P positions, the KL between
// softmax(t / tau) and softmax(s / tau), and optionally d loss / d s for a unit upstream gradient.
//
// One block per row. Pass 1 keeps, per thread, an online softmax state for s and t and the
// rescaled accumulator sum exp(t - m_t) (t - s), merged by warp shuffles and then across warps:
//   KL_row = acc / l_t - lse_t + lse_s.
// Pass 2 writes grad = scale * (softmax(s) - softmax(t)). Rows of up to kCacheItems values per
// thread stay in registers between the passes (the gradient costs no second read); longer rows
// are read again (mostly from L2). Loads and stores are 128-bit when the rows are 16-byte aligned.
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kCwdMaxThreads = 256;
constexpr int kCacheItems = 8;  // values of s and of t per thread kept in registers

struct CwdState {
  OnlineLse s, t;
  float acc = 0.f;  // sum over seen positions of exp(b - t.m) * (b - a), a = s / tau, b = t / tau

  __device__ __forceinline__ void add(float a, float b) {
    s.add(a);
    if (b > t.m) {
      const float sc = rescale(t.m, b);
      t.l = t.l * sc + 1.f;
      acc = acc * sc + (b - a);
      t.m = b;
    } else {
      const float e = expf(b - t.m);
      t.l += e;
      acc += e * (b - a);
    }
  }

  __device__ __forceinline__ void merge(const CwdState& o) {
    s.merge(o.s.m, o.s.l);
    const float nm = fmaxf(t.m, o.t.m);
    if (nm == -INFINITY) return;
    const float sa = rescale(t.m, nm), sb = rescale(o.t.m, nm);
    t.l = t.l * sa + o.t.l * sb;
    acc = acc * sa + o.acc * sb;
    t.m = nm;
  }

  __device__ __forceinline__ void warp_merge() {
    for (int offset = 16; offset > 0; offset >>= 1) {
      CwdState o;
      o.s.m = __shfl_xor_sync(kFullMask, s.m, offset);
      o.s.l = __shfl_xor_sync(kFullMask, s.l, offset);
      o.t.m = __shfl_xor_sync(kFullMask, t.m, offset);
      o.t.l = __shfl_xor_sync(kFullMask, t.l, offset);
      o.acc = __shfl_xor_sync(kFullMask, acc, offset);
      merge(o);
    }
  }
};

// Loads the V = 16 / sizeof(T) values at [base, base + V) of a row (fewer at the row's end).
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t base, int64_t plane, bool vec,
                                           float (&out)[Vec16<T>::kSize]) {
  constexpr int V = Vec16<T>::kSize;
  if (vec) {  // plane % V == 0 and the row is aligned, so the whole chunk is in the row
    load16(row + base, out);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = base + v < plane ? to_float(row[base + v]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* __restrict__ row, int64_t base, int64_t plane, bool vec,
                                            const float (&val)[Vec16<T>::kSize]) {
  constexpr int V = Vec16<T>::kSize;
  if (vec) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int v = 0; v < V; ++v) e[v] = from_float<T>(val[v]);
    *reinterpret_cast<uint4*>(row + base) = raw;
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (base + v < plane) row[base + v] = from_float<T>(val[v]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kCwdMaxThreads)
channel_wise_kd_kernel(const T* __restrict__ s, const T* __restrict__ t, float* __restrict__ row_kl,
                       T* __restrict__ grad, int64_t plane, float inv_tau, float grad_scale, bool vec) {
  constexpr int V = Vec16<T>::kSize;
  constexpr int kChunks = kCacheItems / V > 0 ? kCacheItems / V : 1;
  const int64_t row = blockIdx.x;
  const T* rs = s + row * plane;
  const T* rt = t + row * plane;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * V;
  const bool cached = grad != nullptr && plane <= stride * kChunks;

  CwdState st;
  float cs[kChunks][V], ct[kChunks][V];
  if (cached) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int64_t base = threadIdx.x * static_cast<int64_t>(V) + k * stride;
      if (base < plane) {
        load_chunk(rs, base, plane, vec, cs[k]);
        load_chunk(rt, base, plane, vec, ct[k]);
#pragma unroll
        for (int v = 0; v < V; ++v)
          if (base + v < plane) st.add(cs[k][v] * inv_tau, ct[k][v] * inv_tau);
      }
    }
  } else {
    // unrolled so that several 128-bit loads are in flight per thread (long rows are latency-bound)
#pragma unroll 4
    for (int64_t base = threadIdx.x * static_cast<int64_t>(V); base < plane; base += stride) {
      float xs[V], xt[V];
      load_chunk(rs, base, plane, vec, xs);
      load_chunk(rt, base, plane, vec, xt);
#pragma unroll
      for (int v = 0; v < V; ++v)
        if (base + v < plane) st.add(xs[v] * inv_tau, xt[v] * inv_tau);
    }
  }

  // Block merge: warps first, then warp 0 merges the per-warp states.
  __shared__ float sh[5][32];
  __shared__ float lse_sh[2];
  st.warp_merge();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  if (lane == 0) {
    sh[0][warp] = st.s.m; sh[1][warp] = st.s.l; sh[2][warp] = st.t.m; sh[3][warp] = st.t.l; sh[4][warp] = st.acc;
  }
  __syncthreads();
  if (warp == 0) {
    CwdState w;
    if (lane < n_warps) {
      w.s.m = sh[0][lane]; w.s.l = sh[1][lane]; w.t.m = sh[2][lane]; w.t.l = sh[3][lane]; w.acc = sh[4][lane];
    }
    w.warp_merge();
    if (lane == 0) {
      const float lse_s = w.s.lse(), lse_t = w.t.lse();
      row_kl[row] = w.acc / w.t.l - lse_t + lse_s;
      lse_sh[0] = lse_s;
      lse_sh[1] = lse_t;
    }
  }
  if (grad == nullptr) return;
  __syncthreads();
  const float lse_s = lse_sh[0], lse_t = lse_sh[1];
  T* rg = grad + row * plane;
  if (cached) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int64_t base = threadIdx.x * static_cast<int64_t>(V) + k * stride;
      if (base < plane) {
        float g[V];
#pragma unroll
        for (int v = 0; v < V; ++v)
          g[v] = grad_scale * (expf(cs[k][v] * inv_tau - lse_s) - expf(ct[k][v] * inv_tau - lse_t));
        store_chunk(rg, base, plane, vec, g);
      }
    }
  } else {
#pragma unroll 4
    for (int64_t base = threadIdx.x * static_cast<int64_t>(V); base < plane; base += stride) {
      float xs[V], xt[V], g[V];
      load_chunk(rs, base, plane, vec, xs);
      load_chunk(rt, base, plane, vec, xt);
#pragma unroll
      for (int v = 0; v < V; ++v) g[v] = grad_scale * (expf(xs[v] * inv_tau - lse_s) - expf(xt[v] * inv_tau - lse_t));
      store_chunk(rg, base, plane, vec, g);
    }
  }
}

}  // namespace

void channel_wise_kd_forward(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t row_kl,
                             std::uintptr_t grad, int64_t rows, int64_t plane, double tau, double grad_scale,
                             DType dtype, int device, std::uintptr_t stream) {
  if (rows == 0) return;
  if (plane <= 0) throw std::invalid_argument("channel_wise_kd: H*W must be positive");
  if (!(tau > 0)) throw std::invalid_argument("channel_wise_kd: tau must be positive");
  check_grid_dim(rows, "channel_wise_kd", "(n, c) rows");
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "channel_wise_kd_forward", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Vec16<T>::kSize;
    // 128-bit accesses need every row start 16-byte aligned: aligned bases and plane % V == 0.
    const bool vec = plane % V == 0 && aligned16(student) && aligned16(teacher) && (grad == 0 || aligned16(grad));
    // Short rows get fewer threads (whole warps) instead of idle lanes.
    int64_t chunks = (plane + V - 1) / V;
    int threads = static_cast<int>(std::min<int64_t>(kCwdMaxThreads, ((chunks + 31) / 32) * 32));
    channel_wise_kd_kernel<T><<<static_cast<unsigned>(rows), threads, 0, as_stream(stream)>>>(
        reinterpret_cast<const T*>(student), reinterpret_cast<const T*>(teacher), reinterpret_cast<float*>(row_kl),
        reinterpret_cast<T*>(grad), plane, static_cast<float>(1.0 / tau), static_cast<float>(grad_scale), vec);
  });
  check_launch("channel_wise_kd_forward");
}

}  // namespace segkd
