// Channel-wise distillation (docs/losses.md 1): for every (n, c) row of P positions, the KL between
// softmax(t / tau) and softmax(s / tau), and optionally d loss / d s for a unit upstream gradient.
//
// One block per row. Pass 1 keeps, per thread, an online softmax state for s and t and the
// rescaled accumulator sum exp(t - m_t) (t - s), merged by warp shuffles and then across warps:
//   KL_row = acc / l_t - lse_t + lse_s.
// Everything runs in base 2: the inputs are scaled by log2(e) / tau once, so each element costs one
// exp2f (MUFU.EX2 plus a range fix-up, 2 ulp) instead of an accurate expf; KL_row is ln 2 times the
// base-2 expression. The running maximum moves once per loaded vector (its maximum first), never per
// element, so the per-element work is one exp2f and three adds / multiplies per input.
// Pass 2 writes grad = scale * (softmax(s) - softmax(t)) in the input dtype. Rows of up to kCacheItems values per
// thread stay in registers between the passes (the gradient costs no second read); longer rows
// are read again (mostly from L2). Loads and stores are 128-bit when the rows are 16-byte aligned.
// Longer rows with a gradient to write take one persistent launch that reads s and t from DRAM
// once (channel_wise_kd_stream_kernel: per-chunk statistics, then the gradient from L2-resident
// row groups); without a gradient, or for rows too long for the L2, few long rows are split over
// several blocks per row (two kernels, see the split kernels).
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kCwdMaxThreads = 256;
constexpr int kCacheItems = 8;  // values of s and of t per thread kept in registers
constexpr float kLn2 = 0.6931471805599453f;

// 2^(m_old - m_new): 0 (not NaN) while nothing has been seen yet (m_old = -inf).
__device__ __forceinline__ float rescale2(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
}

// Running max m and sum l of 2^(x - m) (base-2 logits x). m is never NaN: a NaN x fails every
// comparison with m and makes l NaN through its own term. An x = +inf becomes the maximum and
// contributes 2^(inf - inf) = NaN, as the reference's softmax of a row holding +inf; a row of -inf
// only gives 2^(-inf - -inf) = NaN too (the reference's log_softmax of it is NaN).
struct Lse2 {
  float m = -INFINITY, l = 0.f;
  __device__ __forceinline__ void merge(float om, float ol) {
    const float nm = fmaxf(m, om);
    // both states saw nothing or only -inf: l is 0, or NaN from 2^(-inf - (-inf)), which must stay
    if (nm == -INFINITY) { l += ol; return; }
    l = l * rescale2(m, nm) + ol * rescale2(om, nm);
    m = nm;
  }
  __device__ __forceinline__ float lse() const { return m + log2f(l); }  // base 2
};

struct CwdState {
  Lse2 s, t;
  float acc = 0.f;  // sum over seen positions of 2^(b - t.m) * (b - a), a, b the base-2 logits

  // The n <= N values a[v], b[v] (v < n): the running maxima move once, to the maxima of this
  // chunk (NaN never compares greater), then each value costs one exp2f per input.
  template <int N>
  __device__ __forceinline__ void add(const float (&a)[N], const float (&b)[N], int n) {
    float ma = -INFINITY, mb = -INFINITY;
#pragma unroll
    for (int v = 0; v < N; ++v) {
      if (v < n) {
        ma = a[v] > ma ? a[v] : ma;
        mb = b[v] > mb ? b[v] : mb;
      }
    }
    if (ma > s.m) { s.l *= rescale2(s.m, ma); s.m = ma; }
    if (mb > t.m) {
      const float sc = rescale2(t.m, mb);
      t.l *= sc;
      acc *= sc;
      t.m = mb;
    }
#pragma unroll
    for (int v = 0; v < N; ++v) {
      if (v < n) {
        s.l += exp2f(a[v] - s.m);
        const float e = exp2f(b[v] - t.m);
        t.l += e;
        acc = fmaf(e, b[v] - a[v], acc);
      }
    }
  }

  __device__ __forceinline__ void merge(const CwdState& o) {
    s.merge(o.s.m, o.s.l);
    const float nm = fmaxf(t.m, o.t.m);  // never NaN, see Lse2
    if (nm == -INFINITY) { t.l += o.t.l; acc += o.acc; return; }
    const float sa = rescale2(t.m, nm), sb = rescale2(o.t.m, nm);
    t.l = t.l * sa + o.t.l * sb;
    acc = acc * sa + o.acc * sb;
    t.m = nm;
  }

  // ln 2 * (acc / l_t - lse2_t + lse2_s): the row's KL in natural units
  __device__ __forceinline__ float kl() const { return kLn2 * (acc / t.l - t.lse() + s.lse()); }

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

// Stores V gradient values at [base, base + V) of a row (fewer at the row's end), rounded to the
// input dtype; with vec (plane % V == 0, aligned rows) as one 128-bit store.
template <typename T>
__device__ __forceinline__ void store_chunk(T* __restrict__ row, int64_t base, int64_t plane, bool vec,
                                            const float (&val)[Vec16<T>::kSize]) {
  if (vec) {
    store16(row + base, val);
  } else {
#pragma unroll
    for (int v = 0; v < Vec16<T>::kSize; ++v)
      if (base + v < plane) row[base + v] = from_float<T>(val[v]);
  }
}

// Multiplies the V values by k (1 / tau in base 2: log2(e) / tau).
template <int V>
__device__ __forceinline__ void scale_chunk(float (&x)[V], float k) {
#pragma unroll
  for (int v = 0; v < V; ++v) x[v] *= k;
}

__device__ __forceinline__ int chunk_count(int64_t base, int64_t end, int V) {
  return end - base >= V ? V : static_cast<int>(end - base);
}

// grad_scale * (softmax(s) - softmax(t)) of V base-2 logits, given both base-2 log-sum-exps.
template <int V>
__device__ __forceinline__ void grad_chunk(const float (&a)[V], const float (&b)[V], float lse_s, float lse_t,
                                           float grad_scale, float (&g)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) g[v] = grad_scale * (exp2f(a[v] - lse_s) - exp2f(b[v] - lse_t));
}

// The gradient's multiplier for a recomputation in the backward: grad_mult (one value on the device,
// grad_output) when given, and false (nothing to do) when that value is exactly 1, in which case the
// gradient the forward wrote is already the answer. Read by every thread, never by the host.
template <typename T>
__device__ __forceinline__ bool gradient_multiplier(const T* __restrict__ grad_mult, float& grad_scale) {
  if (grad_mult == nullptr) return true;
  const float m = to_float(*grad_mult);
  if (m == 1.f) return false;
  grad_scale *= m;
  return true;
}

// The block's merged state in thread 0 (other threads: unspecified): warps first, their states
// through sh (one barrier), then warp 0 merges them. Every thread of the block must call it.
__device__ __forceinline__ CwdState merge_to_thread0(CwdState st, float (&sh)[5][32]) {
  st.warp_merge();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  if (lane == 0) {
    sh[0][warp] = st.s.m; sh[1][warp] = st.s.l; sh[2][warp] = st.t.m; sh[3][warp] = st.t.l; sh[4][warp] = st.acc;
  }
  __syncthreads();
  CwdState w;
  if (warp == 0) {
    if (lane < n_warps) {
      w.s.m = sh[0][lane]; w.s.l = sh[1][lane]; w.t.m = sh[2][lane]; w.t.l = sh[3][lane]; w.acc = sh[4][lane];
    }
    w.warp_merge();
  }
  return w;
}

// The block's merged state, in every thread (two barriers).
__device__ __forceinline__ CwdState block_merge(CwdState st) {
  __shared__ float sh[5][32];
  __shared__ float merged[5];
  const CwdState w = merge_to_thread0(st, sh);
  if (threadIdx.x == 0) {
    merged[0] = w.s.m; merged[1] = w.s.l; merged[2] = w.t.m; merged[3] = w.t.l; merged[4] = w.acc;
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
  // unrolled so that several 128-bit loads are in flight per thread (long rows are latency-bound)
#pragma unroll 4
  for (int64_t base = begin + threadIdx.x * static_cast<int64_t>(V); base < end; base += stride) {
    float xs[V], xt[V];
    load_chunk(rs, base, end, vec, xs);
    load_chunk(rt, base, end, vec, xt);
    scale_chunk(xs, inv_tau);
    scale_chunk(xt, inv_tau);
    st.add(xs, xt, chunk_count(base, end, V));
  }
}

template <typename T>
__device__ __forceinline__ void write_grad_range(const T* __restrict__ rs, const T* __restrict__ rt,
                                                 T* __restrict__ rg,
                                                 int64_t begin, int64_t end, bool vec, float inv_tau, float lse_s,
                                                 float lse_t, float grad_scale) {
  constexpr int V = Vec16<T>::kSize;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * V;
#pragma unroll 4
  for (int64_t base = begin + threadIdx.x * static_cast<int64_t>(V); base < end; base += stride) {
    float xs[V], xt[V], g[V];
    load_chunk(rs, base, end, vec, xs);
    load_chunk(rt, base, end, vec, xt);
    scale_chunk(xs, inv_tau);
    scale_chunk(xt, inv_tau);
    grad_chunk(xs, xt, lse_s, lse_t, grad_scale, g);
    store_chunk(rg, base, end, vec, g);
  }
}

template <typename T>
__global__ void __launch_bounds__(kCwdMaxThreads)
channel_wise_kd_kernel(const T* __restrict__ s, const T* __restrict__ t, float* __restrict__ row_kl,
                       T* __restrict__ grad, int64_t plane, float inv_tau, float grad_scale,
                       const T* __restrict__ grad_mult, bool vec) {
  if (!gradient_multiplier(grad_mult, grad_scale)) return;
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
        scale_chunk(cs[k], inv_tau);
        scale_chunk(ct[k], inv_tau);
        st.add(cs[k], ct[k], chunk_count(base, plane, V));
      }
    }
  } else {
    accumulate_range(rs, rt, 0, plane, vec, inv_tau, st);
  }

  const CwdState w = block_merge(st);
  if (threadIdx.x == 0 && row_kl != nullptr) row_kl[row] = w.kl();
  if (grad == nullptr) return;
  const float lse_s = w.s.lse(), lse_t = w.t.lse();
  T* rg = grad + row * plane;
  if (cached) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int64_t base = threadIdx.x * static_cast<int64_t>(V) + k * stride;
      if (base < plane) {
        float g[V];
        grad_chunk(cs[k], ct[k], lse_s, lse_t, grad_scale, g);
        store_chunk(rg, base, plane, vec, g);
      }
    }
  } else {
    write_grad_range(rs, rt, rg, 0, plane, vec, inv_tau, lse_s, lse_t, grad_scale);
  }
}

// Long rows and few of them (full-resolution logits: N*C ~ 150 rows of ~10^6 positions): one
// block per row would leave most SMs idle, so each row is split over gridDim.x blocks. Pass 1
// writes one state per (row, split); pass 2 merges the states of its row (every block redoes this
// tiny merge), writes the row's KL (split 0) and the gradient of its own range.
template <typename T>
__global__ void __launch_bounds__(kCwdMaxThreads)
channel_wise_kd_split_stats_kernel(const T* __restrict__ s, const T* __restrict__ t, float* __restrict__ partials,
                                   int64_t plane, int64_t chunk, float inv_tau, const T* __restrict__ grad_mult,
                                   bool vec) {
  float unused = 1.f;
  if (!gradient_multiplier(grad_mult, unused)) return;
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
                                    T* __restrict__ grad, int64_t plane, int64_t chunk, float inv_tau,
                                    float grad_scale, const T* __restrict__ grad_mult, bool vec) {
  if (!gradient_multiplier(grad_mult, grad_scale)) return;
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
      if (split == 0 && row_kl != nullptr) row_kl[row] = w.kl();
      lse_sh[0] = w.s.lse();
      lse_sh[1] = w.t.lse();
    }
  }
  if (grad == nullptr) return;
  __syncthreads();
  const int64_t begin = split * chunk, end = begin + chunk < plane ? begin + chunk : plane;
  write_grad_range(s + row * plane, t + row * plane, grad + row * plane, begin, end, vec, inv_tau, lse_sh[0],
                   lse_sh[1], grad_scale);
}

// Long rows with a gradient to write: one persistent launch in which s and t come from DRAM once.
// Work items are (row, chunk of kStreamChunk vector loads per thread) of two kinds: a statistics
// item (S) reduces its chunk to a CwdState and stores it; a gradient item (D) writes the chunk's
// gradient from the finished row statistics, reading the chunk again. Rows go in groups of
// group_rows, and the items in the order
//   S(0), S(1), D(0), S(2), D(1), ..., S(G-1), D(G-2), D(G-1)
// (S(g) / D(g): the statistics / gradient items of group g), handed out by an atomic ticket. The
// launcher sizes a group to a quarter of the L2, so a group's second read (its D items, one group
// after its S items) finds it in L2. The last S item of a row to arrive (arrival count K - 1)
// merges the row's K states in chunk order (deterministic), writes the row's KL and both
// log-sum-exps and publishes them (count K + 1); a D item waits for that.
// No deadlock at any grid size: a block waits only while holding a D ticket it has not started,
// and only on S items of lower tickets, each taken by a running block that is working on it (S
// items never wait); the unfinished item with the lowest ticket therefore always progresses. A
// launch that runs its blocks one after another (the host layer) runs every item in its first
// block, and there every wait finds its row already published.
// Thread 0 takes the next ticket (and, for a D item, waits for and reads its row's statistics) at
// the end of the current item, and shares it through one barrier; S items add one more for the
// block reduction: at most two barriers per item, none inside the loops over positions. The
// shared slots alternate between items (a thread reads a slot after the barrier that fills it,
// and the next write to that slot comes after the following item's barrier).
constexpr int kStreamUnroll = 4;      // vector loads per thread and tensor in one work item
constexpr int kStreamBlocksPerSm = 4;  // resident blocks per SM the launch bounds guarantee (<= 64 registers)

struct StreamItem {
  int64_t row = 0, chunk = 0;
  bool stats = false, valid = false;
};

__device__ __forceinline__ StreamItem stream_item(int64_t ticket, int64_t k_chunks, int64_t group_rows,
                                                  int64_t n_groups, int64_t rows) {
  StreamItem it;
  const int64_t per_group = group_rows * k_chunks, last = 2 * n_groups - 1;
  if (ticket >= 2 * n_groups * per_group) return it;
  const int64_t b = ticket / per_group, j = ticket % per_group;
  it.stats = b == 0 || (b % 2 == 1 && b < last);
  const int64_t g = it.stats ? (b + 1) / 2 : (b == last ? n_groups - 1 : b / 2 - 1);
  it.row = g * group_rows + j / k_chunks;
  it.chunk = j % k_chunks;
  it.valid = true;
  return it;
}

template <typename T>
__global__ void __launch_bounds__(kCwdMaxThreads, kStreamBlocksPerSm)
channel_wise_kd_stream_kernel(const T* __restrict__ s, const T* __restrict__ t, float* __restrict__ row_kl,
                              T* __restrict__ grad, float* __restrict__ partials, float* __restrict__ row_lse,
                              unsigned* __restrict__ sync, int64_t rows, int64_t plane, int64_t k_chunks,
                              int64_t group_rows, int64_t n_groups, float inv_tau, float grad_scale,
                              const T* __restrict__ grad_mult, bool vec) {
  if (!gradient_multiplier(grad_mult, grad_scale)) return;
  constexpr int V = Vec16<T>::kSize;
  const int64_t chunk_len = static_cast<int64_t>(blockDim.x) * V * kStreamUnroll;
  unsigned* const ticket_counter = sync;
  unsigned* const arrivals = sync + 1;  // per row: S items arrived, K + 1 once published
  __shared__ long long ticket_sh[2];
  __shared__ float lse_sh[2][2];
  __shared__ float sh[5][32];

  // Thread 0: the next ticket, and for a gradient item its row's published log-sum-exps.
  auto take = [&](int slot) {
    const long long ticket = atomicAdd(ticket_counter, 1u);
    const StreamItem it = stream_item(ticket, k_chunks, group_rows, n_groups, rows);
    if (it.valid && !it.stats && it.row < rows) {
      const volatile unsigned* count = arrivals + it.row;
      while (*count < static_cast<unsigned>(k_chunks) + 1u) {
      }
      __threadfence();
      const volatile float* l = row_lse + 2 * it.row;
      lse_sh[slot][0] = l[0];
      lse_sh[slot][1] = l[1];
    }
    ticket_sh[slot] = ticket;
  };

  if (threadIdx.x == 0) take(0);
  __syncthreads();
  for (int slot = 0;; slot ^= 1) {
    const StreamItem it = stream_item(ticket_sh[slot], k_chunks, group_rows, n_groups, rows);
    if (!it.valid) return;  // every thread read the same ticket: the whole block leaves
    const int64_t begin = it.chunk * chunk_len;
    const int64_t end = begin + chunk_len < plane ? begin + chunk_len : plane;
    const T* rs = s + it.row * plane;
    const T* rt = t + it.row * plane;
    if (it.row < rows && it.stats) {
      CwdState st;
      accumulate_range(rs, rt, begin, end, vec, inv_tau, st);
      const CwdState w = merge_to_thread0(st, sh);
      if (threadIdx.x == 0) {
        float* p = partials + (it.row * k_chunks + it.chunk) * 5;
        p[0] = w.s.m; p[1] = w.s.l; p[2] = w.t.m; p[3] = w.t.l; p[4] = w.acc;
        __threadfence();  // the state before its arrival
        const unsigned arrived = atomicAdd(arrivals + it.row, 1u);
        if (arrived == static_cast<unsigned>(k_chunks) - 1u) {
          // the row's last chunk: merge its K states in chunk order (read past L1: other SMs wrote them)
          __threadfence();
          CwdState r;
          const volatile float* q = partials + it.row * k_chunks * 5;
          for (int64_t k = 0; k < k_chunks; ++k) {
            CwdState o;
            o.s.m = q[5 * k]; o.s.l = q[5 * k + 1]; o.t.m = q[5 * k + 2]; o.t.l = q[5 * k + 3]; o.acc = q[5 * k + 4];
            r.merge(o);
          }
          if (row_kl != nullptr) row_kl[it.row] = r.kl();
          row_lse[2 * it.row] = r.s.lse();
          row_lse[2 * it.row + 1] = r.t.lse();
          __threadfence();  // the statistics before their publication
          atomicAdd(arrivals + it.row, 1u);
        }
      }
    } else if (it.row < rows) {
      write_grad_range(rs, rt, grad + it.row * plane, begin, end, vec, inv_tau, lse_sh[slot][0], lse_sh[slot][1],
                       grad_scale);
    }
    if (threadIdx.x == 0) take(slot ^ 1);
    __syncthreads();
  }
}

struct SplitPlan {
  int64_t splits = 1, chunk = 0;
};

// Blocks of kCwdMaxThreads threads an SM holds at most (2048 threads per SM on sm_80 / sm_90).
constexpr int kBlocksPerSm = 2048 / kCwdMaxThreads;

// Splits when the rows alone give less than two full waves (kBlocksPerSm blocks on every SM, twice)
// and a row holds at least four splits of one vector load per thread (shorter rows keep the
// single-pass kernel, which caches rows of up to 2,048 values in registers); then aims at two
// waves, each split still getting at least one vector load per thread.
template <typename T>
SplitPlan plan_split(int64_t rows, int64_t plane, int sms) {
  constexpr int V = Vec16<T>::kSize;
  SplitPlan plan;
  const int64_t min_chunk = static_cast<int64_t>(kCwdMaxThreads) * V;
  const int64_t target = 2LL * kBlocksPerSm * sms;
  if (rows >= target || rows > 65535 || plane < 4 * min_chunk) return plan;
  int64_t splits = (target + rows - 1) / rows;
  const int64_t most = plane / min_chunk;
  if (splits > most) splits = most;
  if (splits < 2) return plan;
  int64_t chunk = (plane + splits - 1) / splits;
  chunk = (chunk + V - 1) / V * V;  // chunk starts stay 16-byte aligned
  plan.splits = (plane + chunk - 1) / chunk;
  plan.chunk = chunk;
  return plan;
}

// The persistent long-row plan (channel_wise_kd_stream_kernel), for a forward that writes the
// gradient: rows longer than the kernel's register cache (kCacheItems values per thread), whose
// s and t fit in a quarter of the L2 (a group of at least one row must stay resident between its
// two reads: the group, the next group read meanwhile and the gradient writes stay in L2
// together); K chunks per row, groups of group_rows rows; one block per resident slot.
struct StreamPlan {
  int64_t k = 0, group_rows = 0, n_groups = 0, blocks = 0;
  bool use() const { return k > 0; }
  int64_t workspace(int64_t rows) const { return use() ? rows * k * 5 + 2 * rows + 1 + rows : 0; }
};

template <typename T>
StreamPlan plan_stream(int64_t rows, int64_t plane, int sms, int64_t l2_bytes) {
  constexpr int V = Vec16<T>::kSize;
  constexpr int kChunks = kCacheItems / V > 0 ? kCacheItems / V : 1;
  StreamPlan plan;
  const int64_t row_bytes = 2 * plane * static_cast<int64_t>(sizeof(T));  // s and t
  if (plane <= static_cast<int64_t>(kCwdMaxThreads) * V * kChunks || row_bytes > l2_bytes / 4) return plan;
  const int64_t chunk = static_cast<int64_t>(kCwdMaxThreads) * V * kStreamUnroll;
  const int64_t k = (plane + chunk - 1) / chunk;
  const int64_t group_rows = std::max<int64_t>(1, std::min<int64_t>(rows, l2_bytes / 4 / row_bytes));
  const int64_t n_groups = (rows + group_rows - 1) / group_rows;
  const int64_t slots = static_cast<int64_t>(sms) * kStreamBlocksPerSm;
  // every ticket (2 per item of every group, plus one final take per block) fits the 32-bit counter
  if (2 * n_groups * group_rows * k + slots >= (1LL << 31)) return plan;
  plan.k = k;
  plan.group_rows = group_rows;
  plan.n_groups = n_groups;
  plan.blocks = std::min<int64_t>(slots, rows * k);
  return plan;
}

int64_t l2_bytes(int device) {
  int l2 = 0;
  check_cuda(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device), "cudaDeviceGetAttribute");
  return l2;
}

int multiprocessors(int device) {
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms;
}

// x *= g in place, in x's dtype (fp32 arithmetic, one rounding), g one value on the device. A g of
// exactly 1 (a plain loss.backward()) leaves x untouched: every thread reads g and returns, so the
// saved gradient is handed out without a pass over it and the host never reads g.
template <typename T>
__global__ void __launch_bounds__(kCwdMaxThreads)
saved_grad_scale_kernel(T* __restrict__ x, const T* __restrict__ g, int64_t n, bool vec) {
  const float gv = to_float(*g);
  if (gv == 1.f) return;
  constexpr int V = Vec16<T>::kSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t base = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * V; base < n; base += stride) {
    if (vec) {  // n % V == 0 and x aligned
      float v[V];
      load16(x + base, v);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] *= gv;
      store16(x + base, v);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i)
        if (base + i < n) x[base + i] = from_float<T>(to_float(x[base + i]) * gv);
    }
  }
}

}  // namespace

int64_t channel_wise_kd_workspace(int64_t rows, int64_t plane, DType dtype, int device) {
  if (rows <= 0 || plane <= 0) return 0;
  DeviceGuard guard(device);
  const int sms = multiprocessors(device);
  const int64_t l2 = l2_bytes(device);
  int64_t floats = 0;
  // the larger of the two plans' needs: the split plan's (no gradient) or the persistent one's
  dispatch_float_types(dtype, "channel_wise_kd_workspace", [&](auto tag) {
    const SplitPlan plan = plan_split<decltype(tag)>(rows, plane, sms);
    floats = std::max(plan.splits > 1 ? rows * plan.splits * 5 : 0,
                      plan_stream<decltype(tag)>(rows, plane, sms, l2).workspace(rows));
  });
  return floats;
}

void channel_wise_kd_forward(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t row_kl,
                             std::uintptr_t grad, std::uintptr_t workspace, int64_t workspace_floats, int64_t rows,
                             int64_t plane, double tau, double grad_scale, std::uintptr_t grad_mult, DType dtype,
                             int device, std::uintptr_t stream) {
  if (rows == 0) return;
  if (plane <= 0) throw std::invalid_argument("channel_wise_kd: H*W must be positive");
  if (!(tau > 0)) throw std::invalid_argument("channel_wise_kd: tau must be positive");
  check_grid_dim(rows, "channel_wise_kd", "(n, c) rows");
  if (grad_mult != 0 && grad == 0) throw std::invalid_argument("channel_wise_kd: grad_mult scales a gradient");
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
    auto* g = reinterpret_cast<T*>(grad);
    const auto* gm = reinterpret_cast<const T*>(grad_mult);
    // base-2 logits: x * log2(e) / tau (rounded once, from double)
    const float inv_tau = static_cast<float>(1.4426950408889634 / tau), scale = static_cast<float>(grad_scale);
    const StreamPlan stream_plan = g == nullptr ? StreamPlan{} : plan_stream<T>(rows, plane, sms, l2_bytes(device));
    if (stream_plan.use()) {
      if (workspace == 0 || workspace_floats < stream_plan.workspace(rows))
        throw std::invalid_argument("channel_wise_kd: workspace smaller than channel_wise_kd_workspace()");
      auto* partials = reinterpret_cast<float*>(workspace);
      float* lse = partials + rows * stream_plan.k * 5;
      auto* sync = reinterpret_cast<unsigned*>(lse + 2 * rows);
      // the ticket counter and the per-row arrival counts start at 0
      check_cuda(cudaMemsetAsync(sync, 0, static_cast<size_t>(rows + 1) * sizeof(unsigned), as_stream(stream)),
                 "cudaMemsetAsync");
      SEGKD_LAUNCH(static_cast<unsigned>(stream_plan.blocks), kCwdMaxThreads, 0, as_stream(stream),
                   channel_wise_kd_stream_kernel<T>)(s, t, kl, g, partials, lse, sync, rows, plane, stream_plan.k,
                                                     stream_plan.group_rows, stream_plan.n_groups, inv_tau, scale,
                                                     gm, vec);
      return;
    }
    const SplitPlan plan = plan_split<T>(rows, plane, sms);
    if (plan.splits > 1) {
      if (workspace == 0 || workspace_floats < rows * plan.splits * 5)
        throw std::invalid_argument("channel_wise_kd: workspace smaller than channel_wise_kd_workspace()");
      const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(rows));
      auto* partials = reinterpret_cast<float*>(workspace);
      SEGKD_LAUNCH(grid, kCwdMaxThreads, 0, as_stream(stream), channel_wise_kd_split_stats_kernel<T>)(
          s, t, partials, plane, plan.chunk, inv_tau, gm, vec);
      check_launch("channel_wise_kd_forward (split statistics)");
      // without a gradient one block per row is enough to write the KL
      const dim3 grid2(g == nullptr ? 1u : static_cast<unsigned>(plan.splits), static_cast<unsigned>(rows));
      SEGKD_LAUNCH(grid2, kCwdMaxThreads, 0, as_stream(stream), channel_wise_kd_split_finish_kernel<T>)(
          s, t, partials, plan.splits, kl, g, plane, plan.chunk, inv_tau, scale, gm, vec);
      return;
    }
    // Short rows get fewer threads (whole warps) instead of idle lanes.
    const int64_t chunks = (plane + V - 1) / V;
    const int threads = static_cast<int>(std::min<int64_t>(kCwdMaxThreads, ((chunks + 31) / 32) * 32));
    SEGKD_LAUNCH(static_cast<unsigned>(rows), threads, 0, as_stream(stream), channel_wise_kd_kernel<T>)(
        s, t, kl, g, plane, inv_tau, scale, gm, vec);
  });
  check_launch("channel_wise_kd_forward");
}

void saved_grad_scale(std::uintptr_t x, std::uintptr_t g, int64_t n, DType dtype, int device, std::uintptr_t stream) {
  if (n == 0) return;
  if (g == 0) throw std::invalid_argument("saved_grad_scale: the scale lives on the device and must be given");
  DeviceGuard guard(device);
  const int sms = multiprocessors(device);
  dispatch_float_types(dtype, "saved_grad_scale", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Vec16<T>::kSize;
    const bool vec = n % V == 0 && aligned16(x);
    // at most two full waves (the loop strides over the rest): when g is 1 they only read g
    const unsigned blocks = grid_for((n + V - 1) / V, kCwdMaxThreads, 2LL * kBlocksPerSm * sms);
    SEGKD_LAUNCH(blocks, kCwdMaxThreads, 0, as_stream(stream), saved_grad_scale_kernel<T>)(
        reinterpret_cast<T*>(x), reinterpret_cast<const T*>(g), n, vec);
  });
  check_launch("saved_grad_scale");
}

}  // namespace segkd
