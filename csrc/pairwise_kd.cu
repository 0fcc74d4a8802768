// Pairwise similarity distillation (docs/losses.md 3), Gram path: per image, the Gram matrix of the
// per-pixel L2-normalised features Z = [A | B] (P x (C_s + C_t)), never the P x P matrix.
//
// The loss ||G_aa||^2 - 2 ||G_ab||^2 + ||G_bb||^2 cancels when student ~ teacher, so with
// precision="exact" the Gram entries are accumulated in fp64; plain fp32 accumulation is percents
// off there. precision="fast" sums fp32 products in fp32 over kFastChunk pixels and adds those
// chunk sums in fp64 (the reference's rounding model, ops/pairwise_kd/reference.py).
// Inverse norms 1 / max(||x_p||, eps) are computed once per pixel (fp64); the Gram kernel stages
// each 64-channel x 16-pixel block normalised, in the accumulation type, once per tile, so the
// inner loop is pure FMA on a 4 x 4 register block per thread.
// Grid: (upper tiles of the C x C tile grid, pixel splits, images); each program writes its own
// partial tile, which the host sums over the splits in a fixed order (deterministic, no atomics).
// Also here: the per-pixel normalisation (fp32 copy) and its backward, shared with cross_image_kd.
#include <mma.h>

#include <cmath>
#include <type_traits>

#include "common.cuh"

namespace segkd {
namespace {

constexpr int kNormThreads = 256;
constexpr int kGramTile = 64;       // 64 x 64 entries of Z^T Z per block
constexpr int kGramStep = 16;       // pixels staged per step
constexpr int kGramThreads = 256;   // 16 x 16 threads, each owning a 4 x 4 block of entries
constexpr int kGramPad = 1;         // staged rows of 65: the 16 pixels of a staging store hit distinct banks
constexpr int kFastChunk = 64;      // precision="fast": pixels per fp32 partial sum (reference FAST_CHUNK)

// ||x[n, :, p]|| per pixel: a block is kPixelNormWarps warps over the same 32 pixels (one per lane,
// so every warp load is 32 consecutive positions of one channel); warp w sums the squares of
// channels w, w + kPixelNormWarps, ..., and warp 0 adds the per-warp sums in warp order through
// shared memory (deterministic). Grid: x = 32-pixel tiles of an image, y = images (looping past the
// grid's y limit), so no thread divides a flat pixel index; 8 x 64 x 128 pixels run 2,048 blocks
// of 512 threads (3.9 waves on 132 SMs) instead of 65,536 threads each looping over every channel.
constexpr int kPixelNormWarps = 16;

template <typename T>
__global__ void __launch_bounds__(kPixelNormWarps * 32)
pixel_norm_kernel(const T* __restrict__ x, float* __restrict__ norm, int64_t batch, int64_t channels, int64_t plane) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t p = blockIdx.x * 32LL + lane;
  __shared__ float sh[kPixelNormWarps][32];
  for (int64_t n = blockIdx.y; n < batch; n += gridDim.y) {
    float ss = 0.f;
    if (p < plane) {
      const T* px = x + n * channels * plane + p;
#pragma unroll 4
      for (int64_t c = warp; c < channels; c += kPixelNormWarps) {
        const float v = to_float(px[c * plane]);
        ss = fmaf(v, v, ss);
      }
    }
    if (n != blockIdx.y) __syncthreads();  // the previous image's combine has read sh
    sh[warp][lane] = ss;
    __syncthreads();
    if (warp == 0 && p < plane) {
#pragma unroll
      for (int w = 1; w < kPixelNormWarps; ++w) ss += sh[w][lane];
      norm[n * plane + p] = sqrtf(ss);
    }
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
    // one reciprocal per pixel, not a division per channel: the IEEE division's slow-path call
    // inside the loop made ptxas spill (fp32 instantiation); ss < 2^128 keeps 1/d a normal float
    const float inv = 1.f / d;
    for (int64_t c = 0; c < channels; ++c) po[c * plane] = to_float(px[c * plane]) * inv;
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
__global__ void __launch_bounds__(kNormThreads)
pixel_inv_norm_kernel(const T* __restrict__ x, double* __restrict__ norm, double* __restrict__ inv, int64_t batch,
                      int64_t channels, int64_t plane, double eps) {
  const int64_t pixels = batch * plane;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < pixels;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = g / plane, p = g - n * plane;
    const T* px = x + n * channels * plane + p;
    double ss = 0.0;
    for (int64_t c = 0; c < channels; ++c) {
      const double v = to_float(px[c * plane]);
      ss = fma(v, v, ss);
    }
    const double nv = sqrt(ss);
    norm[g] = nv;
    inv[g] = 1.0 / ((nv >= eps || nv != nv) ? nv : eps);  // NaN propagates, as torch's clamp_min
  }
}

// Tile rows of Z: tile r < tiles_s holds student channels r*64.., the rest teacher channels.
template <typename T>
struct ZTile {
  const T* base;      // first channel of the tile, image n
  const double* inv;  // inverse pixel norms of that tensor, image n
  int rows;           // channels of the tile that exist (the rest stage as 0)
};

template <typename T>
__device__ __forceinline__ ZTile<T> z_tile(int64_t r, int64_t tiles_s, const T* s, const double* inv_s, int64_t cs,
                                           const T* t, const double* inv_t, int64_t ct, int64_t n, int64_t plane) {
  const bool student = r < tiles_s;
  const int64_t c0 = (student ? r : r - tiles_s) * kGramTile, c = student ? cs : ct;
  const int64_t rows = c - c0 < kGramTile ? c - c0 : kGramTile;
  return {(student ? s + n * cs * plane : t + n * ct * plane) + c0 * plane,
          (student ? inv_s : inv_t) + n * plane, static_cast<int>(rows)};
}

__device__ __forceinline__ int64_t tile_start(int64_t r, int64_t tiles) { return r * tiles - r * (r - 1) / 2; }

template <typename Acc, typename T>
__device__ __forceinline__ Acc unit_value(T v, double inv) {
  return static_cast<Acc>(to_float(v)) * static_cast<Acc>(inv);
}

template <typename T, bool kFast>
__global__ void __launch_bounds__(kGramThreads)
zgram_kernel(const T* __restrict__ s, const double* __restrict__ inv_s, const T* __restrict__ t,
             const double* __restrict__ inv_t, double* __restrict__ part, int64_t cs, int64_t ct, int64_t plane,
             int64_t tiles_s, int64_t tiles, int64_t pix_per_split) {
  using Stage = typename std::conditional<kFast, float, double>::type;
  __shared__ Stage xs[kGramStep][kGramTile + kGramPad];
  __shared__ Stage ys[kGramStep][kGramTile + kGramPad];
  const int64_t k = blockIdx.x, split = blockIdx.y, n = blockIdx.z;
  int64_t ti = 0;
  while (ti + 1 < tiles && tile_start(ti + 1, tiles) <= k) ++ti;
  const int64_t tj = ti + k - tile_start(ti, tiles);
  const ZTile<T> zx = z_tile(ti, tiles_s, s, inv_s, cs, t, inv_t, ct, n, plane);
  const ZTile<T> zy = z_tile(tj, tiles_s, s, inv_s, cs, t, inv_t, ct, n, plane);
  const int64_t p_begin = split * pix_per_split;
  const int64_t p_end = p_begin + pix_per_split < plane ? p_begin + pix_per_split : plane;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  double acc[4][4] = {};
  Stage chunk[4][4] = {};  // fast: the fp32 sum of the current kFastChunk pixels

  for (int64_t p0 = p_begin; p0 < p_end; p0 += kGramStep) {
    // Stage 64 channels x 16 pixels of each operand, normalised once (zero outside the ranges);
    // consecutive threads read consecutive pixels of one channel.
    for (int idx = threadIdx.x; idx < kGramTile * kGramStep; idx += kGramThreads) {
      const int c = idx / kGramStep, pp = idx - c * kGramStep;
      const int64_t p = p0 + pp;
      Stage vx = 0, vy = 0;
      if (p < p_end) {
        if (c < zx.rows) vx = unit_value<Stage>(zx.base[c * plane + p], zx.inv[p]);
        if (c < zy.rows) vy = unit_value<Stage>(zy.base[c * plane + p], zy.inv[p]);
      }
      xs[pp][c] = vx;
      ys[pp][c] = vy;
    }
    __syncthreads();
#pragma unroll 4
    for (int pp = 0; pp < kGramStep; ++pp) {
      Stage xv[4], yv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        xv[r] = xs[pp][ty * 4 + r];
        yv[r] = ys[pp][tx * 4 + r];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (kFast) chunk[r][c] = fmaf(xv[r], yv[c], chunk[r][c]);
          else acc[r][c] = fma(static_cast<double>(xv[r]), static_cast<double>(yv[c]), acc[r][c]);
        }
    }
    __syncthreads();
    if (kFast && ((p0 + kGramStep - p_begin) % kFastChunk == 0 || p0 + kGramStep >= p_end)) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          acc[r][c] += static_cast<double>(chunk[r][c]);
          chunk[r][c] = 0;
        }
    }
  }
  double* out = part + ((n * gridDim.y + split) * gridDim.x + k) * (kGramTile * kGramTile);
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) out[(ty * 4 + r) * kGramTile + tx * 4 + c] = acc[r][c];
}


// ---- backward, half / bfloat16: da = ((G_aa S) * inv_s - (G_ab T) * inv_t) * coef on tensor cores.
// The per-pixel inverse norms factor out of the channel sums, so the MMA operands are the raw 16-bit
// features (exact) and G, scaled by 2^-g_shift (|G| <= P: no fp16 overflow) and split into 16-bit
// hi + lo parts (about 2^-17 relative for bf16, 2^-22 for fp16); fp32 accumulators.
constexpr int kBwdTile = 64;     // student channels x pixels per block
constexpr int kBwdK = 16;        // k-step (wmma K)
constexpr int kBwdThreads = 128; // 4 warps, each a 16-channel x 64-pixel strip (4 fragments per product)
constexpr int kBwdGLd = kBwdK + 8;      // 16-bit elements per staged G row (multiple of 8 for wmma)
constexpr int kBwdXLd = kBwdTile + 8;   // per staged feature row
constexpr int kBwdOutLd = kBwdTile + 4; // floats per epilogue row

template <typename T>
struct BwdSmem {
  __align__(32) T g_hi[kBwdTile][kBwdGLd];
  __align__(32) T g_lo[kBwdTile][kBwdGLd];
  __align__(32) T x[kBwdK][kBwdXLd];
  __align__(32) float out[2][kBwdTile][kBwdOutLd];  // the two products, for the epilogue
};

// The epilogue of both backward kernels: warp w's fragments (rows 16 w.., the S-side products
// acc[0] and the T-side ones acc[1]) through shared memory `out`, then
// da[c, p] = (out[0] inv_s[p] - out[1] inv_t[p]) coef in fp64, coalesced over the pixels.
template <typename Acc>
__device__ __forceinline__ void grad_epilogue(Acc (&acc)[2][4], float (&out)[2][kBwdTile][kBwdOutLd],
                                              const double* __restrict__ inv_s, const double* __restrict__ inv_t,
                                              float* __restrict__ da, int64_t n, int64_t c0, int64_t p0, int64_t cs,
                                              int64_t plane, double coef) {
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int part = 0; part < 2; ++part)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      nvcuda::wmma::store_matrix_sync(&out[part][warp * 16][j * 16], acc[part][j], kBwdOutLd,
                                      nvcuda::wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kBwdTile * kBwdTile; idx += kBwdThreads) {
    const int r = idx / kBwdTile, pp = idx - r * kBwdTile;
    const int64_t c = c0 + r, p = p0 + pp;
    if (c < cs && p < plane) {
      const double v = static_cast<double>(out[0][r][pp]) * inv_s[n * plane + p] -
                       static_cast<double>(out[1][r][pp]) * inv_t[n * plane + p];
      da[(n * cs + c) * plane + p] = static_cast<float>(v * coef);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads)
pairwise_grad_mma_kernel(const double* __restrict__ aa, const double* __restrict__ ab, const T* __restrict__ s,
                         const T* __restrict__ t, const double* __restrict__ inv_s, const double* __restrict__ inv_t,
                         const float* __restrict__ grad_loss, float* __restrict__ da, int64_t cs, int64_t ct,
                         int64_t plane, double scale, int g_shift) {
  using namespace nvcuda;
  __shared__ BwdSmem<T> sm;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kBwdTile, p0 = static_cast<int64_t>(blockIdx.y) * kBwdTile;
  const int64_t n = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const double g_scale = std::ldexp(1.0, -g_shift);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
  for (int part = 0; part < 2; ++part)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[part][j], 0.f);
#pragma unroll  // acc[part] must be registers, not a stack array indexed at run time
  for (int part = 0; part < 2; ++part) {
    const int64_t kc = part == 0 ? cs : ct;  // G_aa (cs x cs) with S, then G_ab (cs x ct) with T
    const double* g = (part == 0 ? aa : ab) + n * cs * kc;
    const T* x = (part == 0 ? s : t) + n * kc * plane;
    for (int64_t k0 = 0; k0 < kc; k0 += kBwdK) {
      for (int idx = threadIdx.x; idx < kBwdTile * kBwdK; idx += kBwdThreads) {
        const int r = idx / kBwdK, kk = idx - r * kBwdK;
        const double v = (c0 + r < cs && k0 + kk < kc) ? g[(c0 + r) * kc + k0 + kk] * g_scale : 0.0;
        const T hi = from_float<T>(static_cast<float>(v));
        sm.g_hi[r][kk] = hi;
        sm.g_lo[r][kk] = from_float<T>(static_cast<float>(v - static_cast<double>(to_float(hi))));
      }
      for (int idx = threadIdx.x; idx < kBwdK * kBwdTile; idx += kBwdThreads) {
        const int kk = idx / kBwdTile, pp = idx - kk * kBwdTile;  // consecutive threads, consecutive pixels
        sm.x[kk][pp] = (k0 + kk < kc && p0 + pp < plane) ? x[(k0 + kk) * plane + p0 + pp] : from_float<T>(0.f);
      }
      __syncthreads();
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> f_hi, f_lo;
      wmma::load_matrix_sync(f_hi, &sm.g_hi[warp * 16][0], kBwdGLd);
      wmma::load_matrix_sync(f_lo, &sm.g_lo[warp * 16][0], kBwdGLd);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, &sm.x[0][j * 16], kBwdXLd);
        wmma::mma_sync(acc[part][j], f_hi, fb, acc[part][j]);
        wmma::mma_sync(acc[part][j], f_lo, fb, acc[part][j]);
      }
      __syncthreads();
    }
  }
  grad_epilogue(acc, sm.out, inv_s, inv_t, da, n, c0, p0, cs, plane,
                scale * static_cast<double>(grad_loss[0]) / g_scale);
}

// ---- backward, float: the same products on tensor cores with the 3xTF32 split. Each operand v
// (G scaled as above, and the raw fp32 features) is v_hi + v_lo with v_hi = tf32(v) and
// v_lo = tf32(v - v_hi), so |v - v_hi - v_lo| <= 2^-22 |v|; a product is v_lo w_hi + v_hi w_lo +
// v_hi w_hi (smallest first, fp32 accumulators: the tf32 products are exact), which drops
// v_lo w_lo <= 2^-22 |v w|: about 3 * 2^-22 relative per product against fp32 FMA's 2^-24, then the
// same fp32 sums over the channels as the 16-bit path. The split is done once per staged element
// (shared memory holds tf32 values, so the fragments need no rounding after the load).
constexpr int kTf32K = 8;               // wmma K of tf32
constexpr int kTf32GLd = kBwdK + 4;     // floats per staged G row (multiple of 4: 16 bytes for wmma)
constexpr int kTf32XLd = kBwdTile + 4;  // floats per staged feature row

struct BwdStageTf32 {
  __align__(32) float g_hi[kBwdTile][kTf32GLd];
  __align__(32) float g_lo[kBwdTile][kTf32GLd];
  __align__(32) float x_hi[kBwdK][kTf32XLd];
  __align__(32) float x_lo[kBwdK][kTf32XLd];
};

// The staging buffers are dead once the channel loop ends, so the epilogue tile reuses them: 34 KB
// in all instead of 53 KB (over the 48 KB of static shared memory).
union BwdSmemTf32 {
  BwdStageTf32 in;
  __align__(32) float out[2][kBwdTile][kBwdOutLd];
};

__device__ __forceinline__ float tf32_round(float v) { return nvcuda::wmma::__float_to_tf32(v); }

__global__ void __launch_bounds__(kBwdThreads)
pairwise_grad_tf32_kernel(const double* __restrict__ aa, const double* __restrict__ ab, const float* __restrict__ s,
                          const float* __restrict__ t, const double* __restrict__ inv_s,
                          const double* __restrict__ inv_t, const float* __restrict__ grad_loss,
                          float* __restrict__ da, int64_t cs, int64_t ct, int64_t plane, double scale, int g_shift) {
  using namespace nvcuda;
  __shared__ BwdSmemTf32 sm;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kBwdTile, p0 = static_cast<int64_t>(blockIdx.y) * kBwdTile;
  const int64_t n = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const double g_scale = std::ldexp(1.0, -g_shift);
  wmma::fragment<wmma::accumulator, 16, 16, kTf32K, float> acc[2][4];
#pragma unroll
  for (int part = 0; part < 2; ++part)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[part][j], 0.f);
#pragma unroll  // acc[part] must be registers, not a stack array indexed at run time
  for (int part = 0; part < 2; ++part) {
    const int64_t kc = part == 0 ? cs : ct;  // G_aa (cs x cs) with S, then G_ab (cs x ct) with T
    const double* g = (part == 0 ? aa : ab) + n * cs * kc;
    const float* x = (part == 0 ? s : t) + n * kc * plane;
    for (int64_t k0 = 0; k0 < kc; k0 += kBwdK) {
      for (int idx = threadIdx.x; idx < kBwdTile * kBwdK; idx += kBwdThreads) {
        const int r = idx / kBwdK, kk = idx - r * kBwdK;
        const double v = (c0 + r < cs && k0 + kk < kc) ? g[(c0 + r) * kc + k0 + kk] * g_scale : 0.0;
        const float hi = tf32_round(static_cast<float>(v));
        sm.in.g_hi[r][kk] = hi;
        sm.in.g_lo[r][kk] = tf32_round(static_cast<float>(v - static_cast<double>(hi)));
      }
      for (int idx = threadIdx.x; idx < kBwdK * kBwdTile; idx += kBwdThreads) {
        const int kk = idx / kBwdTile, pp = idx - kk * kBwdTile;  // consecutive threads, consecutive pixels
        const float v = (k0 + kk < kc && p0 + pp < plane) ? x[(k0 + kk) * plane + p0 + pp] : 0.f;
        const float hi = tf32_round(v);
        sm.in.x_hi[kk][pp] = hi;
        sm.in.x_lo[kk][pp] = tf32_round(v - hi);  // v - hi is exact in fp32
      }
      __syncthreads();
#pragma unroll 1  // unrolled, ptxas spilled 8-12 bytes (168 registers); one k8 step at a time: 128, none
      for (int ks = 0; ks < kBwdK; ks += kTf32K) {
        wmma::fragment<wmma::matrix_a, 16, 16, kTf32K, wmma::precision::tf32, wmma::row_major> f_hi, f_lo;
        wmma::load_matrix_sync(f_hi, &sm.in.g_hi[warp * 16][ks], kTf32GLd);
        wmma::load_matrix_sync(f_lo, &sm.in.g_lo[warp * 16][ks], kTf32GLd);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, kTf32K, wmma::precision::tf32, wmma::row_major> b_hi, b_lo;
          wmma::load_matrix_sync(b_hi, &sm.in.x_hi[ks][j * 16], kTf32XLd);
          wmma::load_matrix_sync(b_lo, &sm.in.x_lo[ks][j * 16], kTf32XLd);
          wmma::mma_sync(acc[part][j], f_lo, b_hi, acc[part][j]);
          wmma::mma_sync(acc[part][j], f_hi, b_lo, acc[part][j]);
          wmma::mma_sync(acc[part][j], f_hi, b_hi, acc[part][j]);
        }
      }
      __syncthreads();  // also orders the last reads of the staging before the epilogue reuses it
    }
  }
  grad_epilogue(acc, sm.out, inv_s, inv_t, da, n, c0, p0, cs, plane,
                scale * static_cast<double>(grad_loss[0]) / g_scale);
}

}  // namespace

void pixel_norm(std::uintptr_t x, std::uintptr_t norm, int64_t batch, int64_t channels, int64_t plane, DType dtype,
                int device, std::uintptr_t stream) {
  const int64_t pixels = batch * plane;
  if (pixels == 0) return;
  check_grid_dim((plane + 31) / 32, "pixel_norm", "positions");
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "pixel_norm", [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>((plane + 31) / 32), static_cast<unsigned>(std::min<int64_t>(batch, 65535)));
    SEGKD_LAUNCH(grid, kPixelNormWarps * 32, 0, as_stream(stream), pixel_norm_kernel<T>)(
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

void pixel_inv_norm(std::uintptr_t x, std::uintptr_t norm, std::uintptr_t inv, int64_t batch, int64_t channels,
                    int64_t plane, double eps, DType dtype, int device, std::uintptr_t stream) {
  const int64_t pixels = batch * plane;
  if (pixels == 0) return;
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "pixel_inv_norm", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(grid_for(pixels, kNormThreads), kNormThreads, 0, as_stream(stream), pixel_inv_norm_kernel<T>)(
        reinterpret_cast<const T*>(x), reinterpret_cast<double*>(norm), reinterpret_cast<double*>(inv), batch,
        channels, plane, eps);
  });
  check_launch("pixel_inv_norm");
}

void pairwise_gram(std::uintptr_t s, std::uintptr_t inv_s, std::uintptr_t t, std::uintptr_t inv_t,
                   std::uintptr_t part, int64_t batch, int64_t cs, int64_t ct, int64_t plane, int64_t splits,
                   bool fast, DType dtype, int device, std::uintptr_t stream) {
  if (batch == 0 || cs == 0 || ct == 0 || plane == 0) return;
  const int64_t tiles_s = (cs + kGramTile - 1) / kGramTile, tiles = tiles_s + (ct + kGramTile - 1) / kGramTile;
  const int64_t n_up = tiles * (tiles + 1) / 2;
  // whole fast chunks per split, so a chunk never straddles two splits
  int64_t pix = (plane + splits - 1) / splits;
  pix = (pix + kFastChunk - 1) / kFastChunk * kFastChunk;
  if ((plane + pix - 1) / pix != splits)
    throw std::invalid_argument("pairwise_gram: splits must be ceil(plane / pix) for pix a multiple of 64");
  if (n_up > 2147483647LL || splits > 65535 || batch > 65535)
    throw std::invalid_argument("pairwise_gram: problem too large for one grid");
  DeviceGuard guard(device);
  const dim3 grid(static_cast<unsigned>(n_up), static_cast<unsigned>(splits), static_cast<unsigned>(batch));
  dispatch_float_types(dtype, "pairwise_gram", [&](auto tag) {
    using T = decltype(tag);
    const T* ps = reinterpret_cast<const T*>(s);
    const T* pt = reinterpret_cast<const T*>(t);
    const double* pis = reinterpret_cast<const double*>(inv_s);
    const double* pit = reinterpret_cast<const double*>(inv_t);
    double* pp = reinterpret_cast<double*>(part);
    if (fast)
      SEGKD_LAUNCH(grid, kGramThreads, 0, as_stream(stream), zgram_kernel<T, true>)(
          ps, pis, pt, pit, pp, cs, ct, plane, tiles_s, tiles, pix);
    else
      SEGKD_LAUNCH(grid, kGramThreads, 0, as_stream(stream), zgram_kernel<T, false>)(
          ps, pis, pt, pit, pp, cs, ct, plane, tiles_s, tiles, pix);
  });
  check_launch("pairwise_gram");
}

void pairwise_grad_mma(std::uintptr_t aa, std::uintptr_t ab, std::uintptr_t s, std::uintptr_t t,
                       std::uintptr_t inv_s, std::uintptr_t inv_t, std::uintptr_t grad_loss, std::uintptr_t da,
                       int64_t batch, int64_t cs, int64_t ct, int64_t plane, double scale, DType dtype, int device,
                       std::uintptr_t stream) {
  if (batch == 0 || cs == 0 || plane == 0) return;
  const int64_t gx = (cs + kBwdTile - 1) / kBwdTile, gy = (plane + kBwdTile - 1) / kBwdTile;
  if (gy > 65535 || batch > 65535) throw std::invalid_argument("pairwise_grad_mma: problem too large for one grid");
  int g_shift = 0;  // 2^g_shift >= plane >= |G| (fp16's range; a power of two, exact for every type)
  while ((int64_t{1} << g_shift) < plane) ++g_shift;
  DeviceGuard guard(device);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(batch));
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(grid, kBwdThreads, 0, as_stream(stream), pairwise_grad_mma_kernel<T>)(
        reinterpret_cast<const double*>(aa), reinterpret_cast<const double*>(ab), reinterpret_cast<const T*>(s),
        reinterpret_cast<const T*>(t), reinterpret_cast<const double*>(inv_s), reinterpret_cast<const double*>(inv_t),
        reinterpret_cast<const float*>(grad_loss), reinterpret_cast<float*>(da), cs, ct, plane, scale, g_shift);
  };
  if (dtype == DType::Float16) launch(__half{});
  else if (dtype == DType::BFloat16) launch(__nv_bfloat16{});
  else if (dtype == DType::Float32)
    SEGKD_LAUNCH(grid, kBwdThreads, 0, as_stream(stream), pairwise_grad_tf32_kernel)(
        reinterpret_cast<const double*>(aa), reinterpret_cast<const double*>(ab), reinterpret_cast<const float*>(s),
        reinterpret_cast<const float*>(t), reinterpret_cast<const double*>(inv_s),
        reinterpret_cast<const double*>(inv_t), reinterpret_cast<const float*>(grad_loss),
        reinterpret_cast<float*>(da), cs, ct, plane, scale, g_shift);
  else throw std::invalid_argument("pairwise_grad_mma: half, bfloat16 or float features only");
  check_launch("pairwise_grad_mma");
}

}  // namespace segkd
