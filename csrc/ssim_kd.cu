// SSIM feature distillation (docs/losses.md 5): kornia's ssim_loss with reflect / zeros / valid padding.
//
// Work layout (both kernels): a block of kCols threads owns kCols output columns of one map (one
// column per thread) and a tall strip of output rows (grid y), and walks down the strip. The
// vertical filter is a register sliding window: each thread keeps the last K horizontally filtered
// rows of every statistic in registers, so an output row costs K FMAs per statistic and the K - 1
// halo rows are filtered once per strip, not once per output row. K is a template parameter: the
// loops over taps and over the window are unrolled, the ring of K rows needs no register moves
// (the row loop advances K rows per step), and the taps are kernel-parameter (constant bank)
// operands of the FMAs, never local memory.
//
// Forward: each step stages the next K padded input rows (tile columns plus the halo of
// window // 2) in shared memory, min-max rescaled and with the padding resolved at the load
// (reflected index, zero, or nothing for valid), as one (x, y, x^2 + y^2, x y) vector per pixel:
// the products are formed once per pixel, and the horizontal pass reads each of its K neighbours
// with one 16-byte load and adds the symmetric pairs of taps before their multiply (4 FADD + 4
// FFMA per pair of slots); the vertical pass slides over rows, then the SSIM map, the clamp and the loss sum of the
// block (one fp32 partial per block; the caller adds them in fp64). With a gradient requested the
// block also writes three per-pixel maps: l'(p) * d map / d {mu_x, E[x^2], E[xy]}, l' the
// derivative of clamp((1-m)/2, 0, 1) (inclusive bounds, as torch.clamp) over the number of map
// pixels.
// Backward: the filter with padding is a linear map G; dx = G^T D1 + 2 x G^T D2 + y G^T D3. G^T
// is separable, and each axis of it is again a K-tap gather over the (zero-extended) maps with
// weights that fold in the adjoint of the padding: for reflect a pixel also collects the taps of
// the padded positions that reflect onto it. The weights differ from the taps only within
// window // 2 of an edge; the host tabulates those rows and columns plus one interior entry
// (the taps) in a FoldTable that every row and column reads, so there is no padded buffer, no fold
// pass and no branch on edge rows. Same shared-memory staging (the three maps as a (D1, D2) pair
// and D3: two loads per window slot) and sliding window as the forward, three maps instead of
// four, fused with the combination with x and y and the min-max scale.
#include "common.cuh"

#include <cmath>
#include <type_traits>

namespace segkd {
namespace {

constexpr int kMaxWindow = 15;
constexpr int kMaxRadius = kMaxWindow / 2;
constexpr int kCols = 128;  // output columns per block, one per thread

enum Padding : int { kReflect = 0, kZeros = 1, kValid = 2 };

struct Taps {
  float w[kMaxWindow];
  int size;
};

// Backward weights of one axis: entry e < kEdge is position e, entry kEdge + e is position
// n - kEdge + e (n the axis length), entry kInterior the plain taps (every other position, and
// every position of zeros / valid padding); w[e][k] multiplies map position p - off + k. Only
// positions within window // 2 of an edge differ from the plain taps (reflect). Every row of the
// backward reads its weights from the table (a block-uniform index): no branch on edge rows.
constexpr int kEdge = kMaxRadius + 1;
constexpr int kInterior = 2 * kEdge;
struct FoldTable {
  float w[2 * kEdge + 1][kMaxWindow];
};

// The table entry of position p of an axis of length n (see FoldTable).
__host__ __device__ __forceinline__ int fold_entry(int p, int n, int mode) {
  if (mode != kReflect) return kInterior;
  return p < kEdge ? p : (p >= n - kEdge && p < n ? kEdge + p - (n - kEdge) : kInterior);
}

struct SsimConsts {
  float c1, c2, grad_coef;  // grad_coef = -1 / (2 * number of map pixels)
};

// Rows per block: tall strips (the K - 1 halo rows are filtered once per strip); small maps take
// short strips so that they still spread over several blocks.
inline int64_t strip_rows(int64_t rows) { return rows >= 64 ? 64 : 16; }

// Input index for padded position i of an axis of length n, or -1 where the value is zero padding.
__device__ __forceinline__ int source_index(int i, int n, int mode) {
  if (mode == kReflect) {
    if (i < 0) i = -i;
    if (i >= n) i = 2 * (n - 1) - i;
    // Positions only needed by out-of-range outputs of the last tile: clamp, never used.
    return i < 0 ? 0 : (i >= n ? n - 1 : i);
  }
  return (i >= 0 && i < n) ? i : -1;
}

// source_index without a test of the mode, for the loops: zero_mask = -1 for zeros / valid padding,
// 0 for reflect (a loop-invariant test of the mode lets the compiler unswitch the loop: a second
// copy of its body, as it did for the 16-bit types).
__device__ __forceinline__ int source_index_masked(int i, int n, int zero_mask) {
  if (i >= 0 && i < n) return i;
  int r = i < 0 ? -i : i;
  r = r >= n ? 2 * (n - 1) - r : r;
  r = r < 0 ? 0 : (r >= n ? n - 1 : r);
  return r | zero_mask;  // r >= 0: the reflected index, or -1
}

// p + offset, computed once as an address: the per-element reads inside the map (__ldg: global,
// read-only) are then one wide multiply-add of a 32-bit offset, not 64-bit index arithmetic redone
// for every access.
template <typename T> __device__ __forceinline__ T* map_pointer(T* p, int64_t offset) {
  return reinterpret_cast<T*>(reinterpret_cast<std::uintptr_t>(p) + static_cast<std::uintptr_t>(offset) * sizeof(T));
}

template <int K, typename T>
__global__ void __launch_bounds__(kCols, 3)  // 168 registers: the windows 13 and 15 spill at 128 (4 blocks)
ssim_forward_kernel(const T* __restrict__ s, const T* __restrict__ t, const float* __restrict__ lo_s,
                    const float* __restrict__ scale_s, const float* __restrict__ lo_t,
                    const float* __restrict__ scale_t, float* __restrict__ partials, float* __restrict__ dmaps,
                    int h, int w, int h_out, int w_out, int tiles_x, int strip, int mode, const Taps taps,
                    const SsimConsts k) {
  constexpr int R = K / 2, kInW = kCols + K - 1;
  // one 16-byte vector per staged pixel: (x, y, x^2 + y^2, x y), the products formed once per
  // pixel at the load, not once per window slot; a window slot is then one LDS.128
  __shared__ float4 in_v[K][kInW];
  __shared__ float scratch[32];

  const int map = blockIdx.x / tiles_x;
  const int ox0 = (blockIdx.x - map * tiles_x) * kCols, oy0 = blockIdx.y * strip;
  const int off = mode == kValid ? 0 : R;
  const int rows = strip < h_out - oy0 ? strip : h_out - oy0, in_rows = rows + K - 1;
  const int64_t base = static_cast<int64_t>(map) * h * w;
  const T* ms = map_pointer(s, base);
  const T* mt = map_pointer(t, base);
  const float ls = lo_s == nullptr ? 0.f : lo_s[map], ks = scale_s == nullptr ? 1.f : scale_s[map];
  const float lt = lo_t == nullptr ? 0.f : lo_t[map], kt = scale_t == nullptr ? 1.f : scale_t[map];
  const int tid = threadIdx.x, ox = ox0 + tid;
  const bool live = ox < w_out;
  // the staged column of this thread: source column or -1 (zero padding)
  const int gx0 = source_index(ox0 - off + tid, w, mode);
  const int zero_mask = mode == kReflect ? 0 : -1;

  // sliding window: slot j holds padded row i0 + j. Four statistics, not five: the map uses
  // E[x^2] and E[y^2] only through their sum (var_x + var_y), so x^2 + y^2 is filtered as one.
  float wx[K], wy[K], wss[K], wxy[K];
  float loss = 0.f;
  const int64_t plane = static_cast<int64_t>(h_out) * w_out, maps = gridDim.x / tiles_x;
  float* dm0 = dmaps == nullptr ? nullptr : dmaps + map * plane;  // the three maps of this (n, c)
  float* dm1 = dmaps == nullptr ? nullptr : dm0 + maps * plane;
  float* dm2 = dmaps == nullptr ? nullptr : dm1 + maps * plane;
  for (int i0 = 0; i0 < in_rows; i0 += K) {
    __syncthreads();  // the previous step has read the staged rows
    // stage padded rows i0 .. i0 + K - 1: column tid of each row (every thread, no branch), then
    // the K - 1 halo columns kCols .. kInW - 1 of the K rows, one element per thread
#pragma unroll
    for (int ly = 0; ly < K; ++ly) {
      const int gy = i0 + ly < in_rows ? source_index_masked(oy0 - off + i0 + ly, h, zero_mask) : -1;
      // 32-bit offsets inside a map (the host checks h * w < 2^31): one wide multiply-add each
      const int at = gy * w + gx0;
      float vx = 0.f, vy = 0.f;
      if (gy >= 0 && gx0 >= 0) {
        vx = (to_float(__ldg(ms + at)) - ls) * ks;
        vy = (to_float(__ldg(mt + at)) - lt) * kt;
      }
      in_v[ly][tid] = make_float4(vx, vy, fmaf(vx, vx, vy * vy), vx * vy);
    }
    for (int e = tid; e < K * (K - 1); e += kCols) {
      const int ly = e / (K - 1), lx = kCols + e - ly * (K - 1);
      const int gy = i0 + ly < in_rows ? source_index_masked(oy0 - off + i0 + ly, h, zero_mask) : -1;
      const int gx = source_index_masked(ox0 - off + lx, w, zero_mask);
      float vx = 0.f, vy = 0.f;
      if (gy >= 0 && gx >= 0) {
        vx = (to_float(__ldg(ms + gy * w + gx)) - ls) * ks;
        vy = (to_float(__ldg(mt + gy * w + gx)) - lt) * kt;
      }
      in_v[ly][lx] = make_float4(vx, vy, fmaf(vx, vx, vy * vy), vx * vy);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int i = i0 + j;  // padded row; block-uniform branches
      if (i >= in_rows) break;
      // The taps are symmetric (w[q] = w[K - 1 - q]; the padding is already in the staged rows):
      // the two slots of a pair are combined before their one multiply by the tap.
      const float4 c = in_v[j][tid + R];
      float h0 = taps.w[R] * c.x, h1 = taps.w[R] * c.y, h2 = taps.w[R] * c.z, h3 = taps.w[R] * c.w;
#pragma unroll
      for (int q = 0; q < R; ++q) {
        const float4 a = in_v[j][tid + q], b = in_v[j][tid + K - 1 - q];
        const float wq = taps.w[q];
        h0 = fmaf(wq, a.x + b.x, h0);
        h1 = fmaf(wq, a.y + b.y, h1);
        h2 = fmaf(wq, a.z + b.z, h2);
        h3 = fmaf(wq, a.w + b.w, h3);
      }
      wx[j] = h0; wy[j] = h1; wss[j] = h2; wxy[j] = h3;
      if (i < K - 1) continue;
      // output row oy0 + i - (K - 1): window slots j + 1 .. j + K (mod K), oldest first
      float mu_x = 0.f, mu_y = 0.f, e_ss = 0.f, e_xy = 0.f;
#pragma unroll
      for (int q = 0; q < K; ++q) {
        const int slot = (j + 1 + q) % K;
        mu_x = fmaf(taps.w[q], wx[slot], mu_x);
        mu_y = fmaf(taps.w[q], wy[slot], mu_y);
        e_ss = fmaf(taps.w[q], wss[slot], e_ss);
        e_xy = fmaf(taps.w[q], wxy[slot], e_xy);
      }
      const float cov = e_xy - mu_x * mu_y, m2 = mu_x * mu_x + mu_y * mu_y;
      const float a1 = 2.f * mu_x * mu_y + k.c1, a2 = 2.f * cov + k.c2;
      const float b1 = m2 + k.c1, b2 = (e_ss - m2) + k.c2;  // var_x + var_y = E[x^2 + y^2] - mu_x^2 - mu_y^2
      const float num = a1 * a2, den = b1 * b2 + 1e-12f;
      // The hardware reciprocal (MUFU.RCP, within 1 ulp) instead of the IEEE division's refinement
      // and slow path; den is scaled by 2^-32 first so that it stays below 2^126, where the fast
      // reciprocal would flush to 0 (den up to the fp32 maximum), and 1 / den comes back with one
      // exact multiply by 2^-32 (subnormal results kept).
      const float inv_den = __fdividef(1.f, den * 0x1p-32f) * 0x1p-32f;
      const float ssim = num * inv_den;
      const float u = (1.f - ssim) * 0.5f;
      if (live) loss += clamp_nan(u, 0.f, 1.f);  // a NaN term stays NaN, as in torch.clamp
      if (dmaps != nullptr && live) {
        // torch.clamp passes the gradient where min <= u <= max (inclusive). With
        // g = l' / den: d/d E[xy] = 2 a1 g, d/d E[x^2] = -ssim b1 g and
        // d/d mu_x = 2 g (mu_y (a2 - a1) - ssim mu_x (b2 - b1)).
        const float g = ((u >= 0.f && u <= 1.f) ? k.grad_coef : 0.f) * inv_den, g2 = 2.f * g;
        const int at = (oy0 + i - (K - 1)) * w_out + ox;
        dm0[at] = g2 * fmaf(mu_y, a2 - a1, -ssim * mu_x * (b2 - b1));
        dm1[at] = -ssim * b1 * g;
        dm2[at] = g2 * a1;
      }
    }
  }
  loss = block_sum(loss, scratch);
  if (tid == 0) partials[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = loss;
}

// Backward: ds[map, p, x] = scale * g * (A1 + 2 x A2 + y A3), A = G^T of the three maps D.
template <int K, typename T>
__global__ void __launch_bounds__(kCols, 3)  // without the bound ptxas keeps 64 registers and spills
ssim_backward_kernel(const float* __restrict__ dmaps, const T* __restrict__ s, const T* __restrict__ t,
                     const float* __restrict__ lo_s, const float* __restrict__ scale_s, const float* __restrict__ lo_t,
                     const float* __restrict__ scale_t, const float* __restrict__ grad_loss, T* __restrict__ ds,
                     int h, int w, int h_out, int w_out, int tiles_x, int strip, int mode, const Taps taps,
                     const FoldTable rows_fold, const FoldTable cols_fold) {
  constexpr int R = K / 2, kInW = kCols + K - 1;
  // the staged map pixels as (D1, D2) pairs and D3: a window slot is two loads, not three (a
  // 16-byte vector with an unused lane costs registers that the unrolled rows need)
  __shared__ float2 in_d01[K][kInW];
  __shared__ float in_d2[K][kInW];

  const int map = blockIdx.x / tiles_x;
  const int ox0 = (blockIdx.x - map * tiles_x) * kCols, py0 = blockIdx.y * strip;
  // output position p collects map positions p - off .. p - off + K - 1
  const int off = mode == kValid ? K - 1 : R;
  const int rows = strip < h - py0 ? strip : h - py0, in_rows = rows + K - 1;
  const int64_t plane = static_cast<int64_t>(h_out) * w_out, channel = static_cast<int64_t>(gridDim.x / tiles_x) * plane;
  const float* md0 = map_pointer(dmaps, map * plane);  // the three maps of this (n, c)
  const float* md1 = md0 + channel;
  const float* md2 = md1 + channel;
  const int tid = threadIdx.x, px = ox0 + tid;
  const bool live = px < w;
  const int gq0 = ox0 - off + tid;  // the staged map column of this thread

  const bool q0_in = gq0 >= 0 && gq0 < w_out;

  // column weights of this thread: the taps, or its row of the fold table near a reflect edge
  float cw[K];
  const int ce = fold_entry(px, w, mode);
#pragma unroll
  for (int q = 0; q < K; ++q) cw[q] = cols_fold.w[ce][q];

  const float ks = scale_s == nullptr ? 1.f : scale_s[map];
  const float ls = lo_s == nullptr ? 0.f : lo_s[map];
  const float lt = lo_t == nullptr ? 0.f : lo_t[map], kt = scale_t == nullptr ? 1.f : scale_t[map];
  const float g = grad_loss[0] * ks;
  const int64_t base = static_cast<int64_t>(map) * h * w;
  const T* ms = map_pointer(s, base);
  const T* mt = map_pointer(t, base);
  T* mds = ds + base;

  // rows p < edge_lo and edge_hi <= p < h use their own fold-table entry (reflect only; see fold_entry)
  const int edge_lo = mode == kReflect ? kEdge : 0, edge_hi = mode == kReflect ? h - kEdge : h;
  float w0[K], w1[K], w2[K];  // sliding window over map rows
  for (int i0 = 0; i0 < in_rows; i0 += K) {
    __syncthreads();
#pragma unroll
    for (int ly = 0; ly < K; ++ly) {
      const int gy = py0 - off + i0 + ly;
      const bool row_in = i0 + ly < in_rows && gy >= 0 && gy < h_out;  // block-uniform
      const int at = gy * w_out + gq0;
      float v0 = 0.f, v1 = 0.f, v2 = 0.f;  // the maps are zero outside h' x w'
      if (row_in && q0_in) {
        v0 = __ldg(md0 + at);
        v1 = __ldg(md1 + at);
        v2 = __ldg(md2 + at);
      }
      in_d01[ly][tid] = make_float2(v0, v1);
      in_d2[ly][tid] = v2;
    }
    for (int e = tid; e < K * (K - 1); e += kCols) {  // the halo columns, one element per thread
      const int ly = e / (K - 1), lx = kCols + e - ly * (K - 1);
      const int gy = py0 - off + i0 + ly, gq = ox0 - off + lx;
      float v0 = 0.f, v1 = 0.f, v2 = 0.f;
      if (i0 + ly < in_rows && gy >= 0 && gy < h_out && gq >= 0 && gq < w_out) {
        v0 = __ldg(md0 + gy * w_out + gq);
        v1 = __ldg(md1 + gy * w_out + gq);
        v2 = __ldg(md2 + gy * w_out + gq);
      }
      in_d01[ly][lx] = make_float2(v0, v1);
      in_d2[ly][lx] = v2;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int i = i0 + j;
      // no early exit on the last, partial step: its rows past the strip read zeros from the
      // staged rows and store nothing, and the step stays one straight-line body
      float a0 = 0.f, a1 = 0.f, a2 = 0.f;
#pragma unroll
      for (int q = 0; q < K; ++q) {
        const float2 v = in_d01[j][tid + q];
        a0 = fmaf(cw[q], v.x, a0);
        a1 = fmaf(cw[q], v.y, a1);
        a2 = fmaf(cw[q], in_d2[j][tid + q], a2);
      }
      w0[j] = a0; w1[j] = a1; w2[j] = a2;
      if (i < K - 1) continue;
      const int p = py0 + i - (K - 1);  // output row
      // block-uniform; the padding mode is folded into edge_lo / edge_hi above, not tested here:
      // a test of the mode inside the loop lets the compiler unswitch it (a second copy of the
      // whole unrolled body, as it did for the 16-bit types)
      const int re = p < edge_lo ? p : (p >= edge_hi && p < h ? p - edge_hi + kEdge : kInterior);
      float z0 = 0.f, z1 = 0.f, z2 = 0.f;
#pragma unroll
      for (int q = 0; q < K; ++q) {
        const int slot = (j + 1 + q) % K;
        const float rw = rows_fold.w[re][q];
        z0 = fmaf(rw, w0[slot], z0);
        z1 = fmaf(rw, w1[slot], z1);
        z2 = fmaf(rw, w2[slot], z2);
      }
      if (live && i < in_rows) {
        const int at = p * w + px;
        const float x = (to_float(__ldg(ms + at)) - ls) * ks;
        const float y = (to_float(__ldg(mt + at)) - lt) * kt;
        mds[at] = from_float<T>(g * (z0 + 2.f * x * z1 + y * z2));
      }
    }
  }
}

Taps make_taps(int window, double sigma) {
  if (window < 3 || window > kMaxWindow || window % 2 == 0)
    throw std::invalid_argument("ssim_kd: window_size must be odd, in [3, 15]");
  if (!(sigma > 0)) throw std::invalid_argument("ssim_kd: sigma must be positive");
  Taps taps{};
  taps.size = window;
  double v[kMaxWindow], sum = 0;
  for (int i = 0; i < window; ++i) {
    const double x = i - (window - 1) / 2.0;
    v[i] = std::exp(-(x * x) / (2.0 * sigma * sigma));
    sum += v[i];
  }
  for (int i = 0; i < window; ++i) taps.w[i] = static_cast<float>(v[i] / sum);
  return taps;
}

// Backward weights of the positions within kEdge of each end of a reflect axis of length n:
// position p collects map position m = p - R + k with the taps between m and every padded
// position that reflects onto p (p itself, -p and 2 (n - 1) - p). Fp32 sums of fp32 taps, in the
// order the reference's fold adds them.
FoldTable make_fold(const Taps& taps, int64_t n) {
  FoldTable f{};
  const int K = taps.size, R = K / 2;
  auto tap = [&](int64_t d) { return (d >= -R && d <= R) ? taps.w[d + R] : 0.f; };
  for (int k = 0; k < K; ++k) f.w[kInterior][k] = taps.w[k];
  for (int e = 0; e < 2 * kEdge; ++e) {
    const int64_t p = e < kEdge ? e : n - kEdge + (e - kEdge);
    for (int k = 0; k < K; ++k) {
      const int64_t m = p - R + k;
      float v = 0.f;
      if (p >= 0 && p < n) {
        v = tap(p - m);
        if (p >= 1) v += tap(-p - m);
        if (p <= n - 2) v += tap(2 * (n - 1) - p - m);
      }
      f.w[e][k] = v;
    }
  }
  return f;
}

void check_geometry(int64_t h, int64_t w, int window, int mode, int64_t& h_out, int64_t& w_out) {
  if (mode < kReflect || mode > kValid) throw std::invalid_argument("ssim_kd: padding code must be 0, 1 or 2");
  const int r = window / 2;
  if (mode == kValid) {
    if (h < window || w < window) throw std::invalid_argument("ssim_kd: map smaller than the window (valid)");
    h_out = h - 2 * r;
    w_out = w - 2 * r;
  } else {
    if (mode == kReflect && (h <= r || w <= r))
      throw std::invalid_argument("ssim_kd: reflect padding needs H, W > window // 2");
    h_out = h;
    w_out = w;
  }
  // 32-bit indices inside a map (offsets of whole maps are 64-bit)
  if (h * w > 2147483647LL) throw std::invalid_argument("ssim_kd: a map of more than 2^31 - 1 pixels");
}

// Calls f with std::integral_constant<int, window> for the odd windows 3 .. 15.
template <typename F> void dispatch_window(int window, F&& f) {
  switch (window) {
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 9: f(std::integral_constant<int, 9>{}); break;
    case 11: f(std::integral_constant<int, 11>{}); break;
    case 13: f(std::integral_constant<int, 13>{}); break;
    case 15: f(std::integral_constant<int, 15>{}); break;
    default: throw std::invalid_argument("ssim_kd: window_size must be odd, in [3, 15]");
  }
}

}  // namespace

int64_t ssim_num_partials(int64_t maps, int64_t h, int64_t w, int64_t window, int64_t padding) {
  int64_t h_out = h, w_out = w;
  if (padding == kValid) { h_out = h - 2 * (window / 2); w_out = w - 2 * (window / 2); }
  if (maps <= 0 || h_out <= 0 || w_out <= 0) return 0;
  const int64_t strip = strip_rows(h_out);
  return maps * ((w_out + kCols - 1) / kCols) * ((h_out + strip - 1) / strip);
}

void ssim_forward(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t lo_s, std::uintptr_t scale_s,
                  std::uintptr_t lo_t, std::uintptr_t scale_t, std::uintptr_t partials, std::uintptr_t dmaps,
                  int64_t maps, int64_t h, int64_t w, int64_t window, double sigma, double data_range, int64_t padding,
                  DType dtype, int device, std::uintptr_t stream) {
  if (maps == 0) return;
  const Taps taps = make_taps(static_cast<int>(window), sigma);
  int64_t h_out = 0, w_out = 0;
  check_geometry(h, w, static_cast<int>(window), static_cast<int>(padding), h_out, w_out);
  if (!(data_range > 0)) throw std::invalid_argument("ssim_kd: data_range must be positive");
  const int64_t strip = strip_rows(h_out);
  const int64_t tiles_x = (w_out + kCols - 1) / kCols, tiles_y = (h_out + strip - 1) / strip;
  check_grid_dim(maps * tiles_x, "ssim_kd", "maps x column tiles");
  if (tiles_y > 65535) throw std::invalid_argument("ssim_kd: too many rows for one grid");
  SsimConsts k;
  k.c1 = static_cast<float>((0.01 * data_range) * (0.01 * data_range));
  k.c2 = static_cast<float>((0.03 * data_range) * (0.03 * data_range));
  k.grad_coef = static_cast<float>(-0.5 / (static_cast<double>(maps) * h_out * w_out));
  DeviceGuard guard(device);
  const dim3 grid(static_cast<unsigned>(maps * tiles_x), static_cast<unsigned>(tiles_y));
  dispatch_float_types(dtype, "ssim_forward", [&](auto tag) {
    using T = decltype(tag);
    dispatch_window(static_cast<int>(window), [&](auto kw) {
      constexpr int K = decltype(kw)::value;
      SEGKD_LAUNCH(grid, kCols, 0, as_stream(stream), ssim_forward_kernel<K, T>)(
          reinterpret_cast<const T*>(student), reinterpret_cast<const T*>(teacher),
          reinterpret_cast<const float*>(lo_s), reinterpret_cast<const float*>(scale_s),
          reinterpret_cast<const float*>(lo_t), reinterpret_cast<const float*>(scale_t),
          reinterpret_cast<float*>(partials), reinterpret_cast<float*>(dmaps), static_cast<int>(h),
          static_cast<int>(w), static_cast<int>(h_out), static_cast<int>(w_out), static_cast<int>(tiles_x),
          static_cast<int>(strip), static_cast<int>(padding), taps, k);
    });
  });
  check_launch("ssim_forward");
}

void ssim_backward(std::uintptr_t dmaps, std::uintptr_t /*emaps: unused, the adjoint needs no scratch*/,
                   std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t lo_s, std::uintptr_t scale_s,
                   std::uintptr_t lo_t, std::uintptr_t scale_t, std::uintptr_t grad_loss, std::uintptr_t ds,
                   int64_t maps, int64_t h, int64_t w, int64_t window, double sigma, int64_t padding, DType dtype,
                   int device, std::uintptr_t stream) {
  if (maps == 0) return;
  const Taps taps = make_taps(static_cast<int>(window), sigma);
  int64_t h_out = 0, w_out = 0;
  check_geometry(h, w, static_cast<int>(window), static_cast<int>(padding), h_out, w_out);
  const int64_t strip = strip_rows(h);
  const int64_t tiles_x = (w + kCols - 1) / kCols, tiles_y = (h + strip - 1) / strip;
  check_grid_dim(maps * tiles_x, "ssim_kd", "maps x column tiles");
  if (tiles_y > 65535) throw std::invalid_argument("ssim_kd: too many rows for one grid");
  const FoldTable rows_fold = make_fold(taps, h), cols_fold = make_fold(taps, w);
  DeviceGuard guard(device);
  const dim3 grid(static_cast<unsigned>(maps * tiles_x), static_cast<unsigned>(tiles_y));
  dispatch_float_types(dtype, "ssim_backward", [&](auto tag) {
    using T = decltype(tag);
    dispatch_window(static_cast<int>(window), [&](auto kw) {
      constexpr int K = decltype(kw)::value;
      SEGKD_LAUNCH(grid, kCols, 0, as_stream(stream), ssim_backward_kernel<K, T>)(
          reinterpret_cast<const float*>(dmaps), reinterpret_cast<const T*>(student),
          reinterpret_cast<const T*>(teacher), reinterpret_cast<const float*>(lo_s),
          reinterpret_cast<const float*>(scale_s), reinterpret_cast<const float*>(lo_t),
          reinterpret_cast<const float*>(scale_t), reinterpret_cast<const float*>(grad_loss), reinterpret_cast<T*>(ds),
          static_cast<int>(h), static_cast<int>(w), static_cast<int>(h_out), static_cast<int>(w_out),
          static_cast<int>(tiles_x), static_cast<int>(strip), static_cast<int>(padding), taps, rows_fold, cols_fold);
    });
  });
  check_launch("ssim_backward");
}

}  // namespace segkd
