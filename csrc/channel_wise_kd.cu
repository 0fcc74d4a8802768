// Channel-wise distillation (docs/losses.md 1): for every (n, c) row of P positions, the KL between
// softmax(t / tau) and softmax(s / tau), and optionally d loss / d s for a unit upstream gradient.
//
// One block per row. Pass 1 keeps, per thread, an online softmax state for s and t and the
// rescaled accumulator sum exp(t - m_t) (t - s), merged by warp shuffles and then across warps:
//   KL_row = acc / l_t - lse_t + lse_s.
// Pass 2 writes grad = scale * (softmax(s) - softmax(t)) in fp32. Rows of up to kCacheItems values per
// thread stay in registers between the passes (the gradient costs no second read); longer rows
// are read again (mostly from L2). Loads and stores are 128-bit when the rows are 16-byte aligned.
// Few long rows are split over several blocks per row (two kernels, see the split kernels).
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
      t.l = t.l * sc + exp_self(b);
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
    const float nm = fmaxf(t.m, o.t.m);  // never NaN, see OnlineLse
    if (nm == -INFINITY) { t.l += o.t.l; acc += o.acc; return; }
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

// Stores V fp32 gradient values at [base, base + V) of a row (fewer at the row's end); with vec
// (plane % V == 0, aligned rows) as V / 4 128-bit stores. The gradient stays in fp32 whatever the
// input dtype: the backward scales it by grad_output and rounds once to the student's dtype.
template <int V>
__device__ __forceinline__ void store_chunk(float* __restrict__ row, int64_t base, int64_t plane, bool vec,
                                            const float (&val)[V]) {
  if (vec) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q)
      *reinterpret_cast<float4*>(row + base + 4 * q) = make_float4(val[4 * q], val[4 * q + 1], val[4 * q + 2],
                                                                   val[4 * q + 3]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (base + v < plane) row[base + v] = val[v];
  }
}

template <typename T>
__global__ void __launch_bounds__(kCwdMaxThreads)
channel_wise_kd_kernel(const T* __restrict__ s, const T* __restrict__ t, float* __restrict__ row_kl,
                       float* __restrict__ grad, int64_t plane, float inv_tau, float grad_scale, bool vec) {
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
  float* rg = grad + row * plane;
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

// Block-wide merge of the per-thread states; every thread gets the block's state.
__device__ __forceinline__ CwdState block_merge(CwdState st) {
  __shared__ float sh[5][32];
  __shared__ float merged[5];
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
      merged[0] = w.s.m; merged[1] = w.s.l; merged[2] = w.t.m; merged[3] = w.t.l; merged[4] = w.acc;
    }
  }
  __syncthreads();
  CwdState r;
  r.s.m = merged[0]; r.s.l = merged[1]; r.t.m = merged[2]; r.t.l = merged[3]; r.acc = merged[4];
  return r;
}

// Online statistics of positions [begin, end) of one row (begin, end multiples of V when vec).
template <typename T>
__device__ __forceinline__ void accumulate_range(const T* __restrict__ rs, const T* __restrict__ rt, int64_t begin,
                                                 int64_t end, bool vec, float inv_tau, CwdState& st) {
  constexpr int V = Vec16<T>::kSize;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * V;
#pragma unroll 4
  for (int64_t base = begin + threadIdx.x * static_cast<int64_t>(V); base < end; base += stride) {
    float xs[V], xt[V];
    load_chunk(rs, base, end, vec, xs);
    load_chunk(rt, base, end, vec, xt);
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (base + v < end) st.add(xs[v] * inv_tau, xt[v] * inv_tau);
  }
}

template <typename T>
__device__ __forceinline__ void write_grad_range(const T* __restrict__ rs, const T* __restrict__ rt,
                                                 float* __restrict__ rg,
                                                 int64_t begin, int64_t end, bool vec, float inv_tau, float lse_s,
                                                 float lse_t, float grad_scale) {
  constexpr int V = Vec16<T>::kSize;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * V;
#pragma unroll 4
  for (int64_t base = begin + threadIdx.x * static_cast<int64_t>(V); base < end; base += stride) {
    float xs[V], xt[V], g[V];
    load_chunk(rs, base, end, vec, xs);
    load_chunk(rt, base, end, vec, xt);
#pragma unroll
    for (int v = 0; v < V; ++v) g[v] = grad_scale * (expf(xs[v] * inv_tau - lse_s) - expf(xt[v] * inv_tau - lse_t));
    store_chunk(rg, base, end, vec, g);
  }
}

// Long rows and few of them (full-resolution logits: N*C ~ 150 rows of ~10^6 positions): one
// block per row would leave most SMs idle, so each row is split over gridDim.x blocks. Pass 1
// writes one state per (row, split); pass 2 merges the states of its row (every block redoes this
// tiny merge), writes the row's KL (split 0) and the gradient of its own range.
template <typename T>
__global__ void __launch_bounds__(kCwdMaxThreads)
channel_wise_kd_split_stats_kernel(const T* __restrict__ s, const T* __restrict__ t, float* __restrict__ partials,
                                   int64_t plane, int64_t chunk, float inv_tau, bool vec) {
  const int64_t split = blockIdx.x, row = blockIdx.y, splits = gridDim.x;
  const int64_t begin = split * chunk, end = begin + chunk < plane ? begin + chunk : plane;
  CwdState st;
  accumulate_range(s + row * plane, t + row * plane, begin, end, vec, inv_tau, st);
  st = block_merge(st);
  if (threadIdx.x == 0) {
    float* p = partials + (row * splits + split) * 5;
    p[0] = st.s.m; p[1] = st.s.l; p[2] = st.t.m; p[3] = st.t.l; p[4] = st.acc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kCwdMaxThreads)
channel_wise_kd_split_finish_kernel(const T* __restrict__ s, const T* __restrict__ t,
                                    const float* __restrict__ partials, int64_t splits, float* __restrict__ row_kl,
                                    float* __restrict__ grad, int64_t plane, int64_t chunk, float inv_tau,
                                    float grad_scale, bool vec) {
  const int64_t split = blockIdx.x, row = blockIdx.y;
  __shared__ float lse_sh[2];
  if (threadIdx.x < 32) {  // warp 0 merges the row's states
    CwdState w;
    for (int64_t k = threadIdx.x; k < splits; k += 32) {
      const float* p = partials + (row * splits + k) * 5;
      CwdState o;
      o.s.m = p[0]; o.s.l = p[1]; o.t.m = p[2]; o.t.l = p[3]; o.acc = p[4];
      w.merge(o);
    }
    w.warp_merge();
    if (threadIdx.x == 0) {
      const float lse_s = w.s.lse(), lse_t = w.t.lse();
      if (split == 0) row_kl[row] = w.acc / w.t.l - lse_t + lse_s;
      lse_sh[0] = lse_s;
      lse_sh[1] = lse_t;
    }
  }
  if (grad == nullptr) return;
  __syncthreads();
  const int64_t begin = split * chunk, end = begin + chunk < plane ? begin + chunk : plane;
  write_grad_range(s + row * plane, t + row * plane, grad + row * plane, begin, end, vec, inv_tau, lse_sh[0],
                   lse_sh[1], grad_scale);
}

struct SplitPlan {
  int64_t splits = 1, chunk = 0;
};

// Splits only when there are fewer rows than about two blocks per SM and each split still gets
// at least 16 vector loads per thread.
template <typename T>
SplitPlan plan_split(int64_t rows, int64_t plane, int sms) {
  constexpr int V = Vec16<T>::kSize;
  SplitPlan plan;
  const int64_t min_chunk = static_cast<int64_t>(kCwdMaxThreads) * V * 16;
  if (rows >= 2 * sms || rows > 65535 || plane < 2 * min_chunk) return plan;
  int64_t splits = (2 * sms + rows - 1) / rows;
  const int64_t most = plane / min_chunk;
  if (splits > most) splits = most;
  if (splits < 2) return plan;
  int64_t chunk = (plane + splits - 1) / splits;
  chunk = (chunk + V - 1) / V * V;  // chunk starts stay 16-byte aligned
  plan.splits = (plane + chunk - 1) / chunk;
  plan.chunk = chunk;
  return plan;
}

int multiprocessors(int device) {
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms;
}

}  // namespace

int64_t channel_wise_kd_workspace(int64_t rows, int64_t plane, DType dtype, int device) {
  if (rows <= 0 || plane <= 0) return 0;
  DeviceGuard guard(device);
  const int sms = multiprocessors(device);
  int64_t floats = 0;
  dispatch_float_types(dtype, "channel_wise_kd_workspace", [&](auto tag) {
    const SplitPlan plan = plan_split<decltype(tag)>(rows, plane, sms);
    floats = plan.splits > 1 ? rows * plan.splits * 5 : 0;
  });
  return floats;
}

void channel_wise_kd_forward(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t row_kl,
                             std::uintptr_t grad, std::uintptr_t workspace, int64_t workspace_floats, int64_t rows,
                             int64_t plane, double tau, double grad_scale, DType dtype, int device,
                             std::uintptr_t stream) {
  if (rows == 0) return;
  if (plane <= 0) throw std::invalid_argument("channel_wise_kd: H*W must be positive");
  if (!(tau > 0)) throw std::invalid_argument("channel_wise_kd: tau must be positive");
  check_grid_dim(rows, "channel_wise_kd", "(n, c) rows");
  DeviceGuard guard(device);
  const int sms = multiprocessors(device);
  dispatch_float_types(dtype, "channel_wise_kd_forward", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Vec16<T>::kSize;
    // 128-bit accesses need every row start 16-byte aligned: aligned bases and plane % V == 0.
    const bool vec = plane % V == 0 && aligned16(student) && aligned16(teacher) && (grad == 0 || aligned16(grad));
    const auto* s = reinterpret_cast<const T*>(student);
    const auto* t = reinterpret_cast<const T*>(teacher);
    auto* kl = reinterpret_cast<float*>(row_kl);
    auto* g = reinterpret_cast<float*>(grad);
    const float inv_tau = static_cast<float>(1.0 / tau), scale = static_cast<float>(grad_scale);
    const SplitPlan plan = plan_split<T>(rows, plane, sms);
    if (plan.splits > 1) {
      if (workspace == 0 || workspace_floats < rows * plan.splits * 5)
        throw std::invalid_argument("channel_wise_kd: workspace smaller than channel_wise_kd_workspace()");
      const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(rows));
      auto* partials = reinterpret_cast<float*>(workspace);
      SEGKD_LAUNCH(grid, kCwdMaxThreads, 0, as_stream(stream), channel_wise_kd_split_stats_kernel<T>)(
          s, t, partials, plane, plan.chunk, inv_tau, vec);
      check_launch("channel_wise_kd_forward (split statistics)");
      // without a gradient one block per row is enough to write the KL
      const dim3 grid2(g == nullptr ? 1u : static_cast<unsigned>(plan.splits), static_cast<unsigned>(rows));
      SEGKD_LAUNCH(grid2, kCwdMaxThreads, 0, as_stream(stream), channel_wise_kd_split_finish_kernel<T>)(
          s, t, partials, plan.splits, kl, g, plane, plan.chunk, inv_tau, scale, vec);
      return;
    }
    // Short rows get fewer threads (whole warps) instead of idle lanes.
    const int64_t chunks = (plane + V - 1) / V;
    const int threads = static_cast<int>(std::min<int64_t>(kCwdMaxThreads, ((chunks + 31) / 32) * 32));
    SEGKD_LAUNCH(static_cast<unsigned>(rows), threads, 0, as_stream(stream), channel_wise_kd_kernel<T>)(
        s, t, kl, g, plane, inv_tau, scale, vec);
  });
  check_launch("channel_wise_kd_forward");
}

}  // namespace segkd
