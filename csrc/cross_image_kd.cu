// Cross-image pixel-to-pixel distillation (docs/losses.md 4), flash-style: the N^2 P x P similarity
// matrices are never stored.
//
// Inputs are the raw features x_s (N, C_s, P), x_t (N, C_t, P) in one dtype and the inverse
// clamped per-pixel norms inv_s, inv_t (N, P) fp32: a similarity is
//     S[r, c] = (x_i[:, r] . x_j[:, c]) * inv_i[r] * inv_j[c] / tau,
// so the dot products run on the raw inputs (exact products, fp32 accumulation) and normalisation
// costs one scale per entry. A block owns 32 rows of one ordered pair (i, j); warp w owns rows
// 4w..4w+3 and lane l column l of every 32 x 32 tile, so row reductions are warp shuffles.
// Similarity tiles: half / bfloat16 inputs use tensor cores (wmma 16x16x16, fp32 accumulators;
// warps 0-3 compute the four 16x16 quarters of S, warps 4-7 those of T); float inputs use fp32
// FMA from shared-memory staging.
// Forward: per row, running max / sum-exp of S and of T and the rescaled accumulator
// sum exp(T - m_T) (T - S); KL_row = acc / l_T - lse_T + lse_S. The two log-sum-exps are saved.
// Backward recomputes every tile: dS = (softmax(S) - softmax(T)) * g / (N^2 P tau), then
// da_i[:, r] += sum_c dS[r, c] a_j[:, c] and da_j[:, c] += sum_r dS[r, c] a_i[:, r] with
// a = x * inv. Two kernels own the rows and the columns respectively and accumulate in shared
// memory (one flush each); for very wide C_s a single kernel adds per tile with fp32 atomics.
// da is zero-filled by the caller.
#include <mma.h>

#include <type_traits>

#include "common.cuh"

namespace segkd {
namespace {

constexpr int kTile = 32;
constexpr int kThreads = 256;  // 8 warps x 4 rows
constexpr int kRowsPerWarp = kTile / (kThreads / 32);
constexpr int kMmaK = 16;
constexpr int kStageLd = kTile + 8;  // halves per staged row: a multiple of 8 (wmma), skewed banks
constexpr int kOutLd = kTile + 4;    // floats per row of the accumulator tiles: a multiple of 4

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max_nan(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

struct FmaSmem {
  float rows[kTile][kTile + 1], cols[kTile][kTile + 1];
};

// acc[q] = sum_k x_i[k, r0 + 4w + q] * x_j[k, c0 + lane] (raw dots), 32 channels staged at a time.
template <typename T>
__device__ __forceinline__ void tile_dots_fma(const T* __restrict__ xi, const T* __restrict__ xj, int64_t channels,
                                              int64_t plane, int64_t r0, int64_t c0, FmaSmem& sm,
                                              float (&acc)[kRowsPerWarp]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) acc[q] = 0.f;
  for (int64_t k0 = 0; k0 < channels; k0 += kTile) {
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += blockDim.x) {
      const int kk = idx / kTile, pp = idx - kk * kTile;
      const int64_t k = k0 + kk;
      sm.rows[kk][pp] = (k < channels && r0 + pp < plane) ? to_float(xi[k * plane + r0 + pp]) : 0.f;
      sm.cols[kk][pp] = (k < channels && c0 + pp < plane) ? to_float(xj[k * plane + c0 + pp]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const float xc = sm.cols[kk][lane];
#pragma unroll
      for (int q = 0; q < kRowsPerWarp; ++q) acc[q] = fmaf(sm.rows[kk][warp * kRowsPerWarp + q], xc, acc[q]);
    }
    __syncthreads();
  }
}

template <typename T>
struct MmaSmem {
  __align__(32) T stage[4][kMmaK][kStageLd];  // S rows, S columns, T rows, T columns
  __align__(32) float out[2][kTile][kOutLd];  // raw S and T tiles
};

// Raw S and T tiles on tensor cores (half / bfloat16, sm_80+), returned in the FMA layout.
template <typename T>
__device__ __forceinline__ void tile_dots_mma(const T* __restrict__ xi_s, const T* __restrict__ xj_s, int64_t cs,
                                              const T* __restrict__ xi_t, const T* __restrict__ xj_t, int64_t ct,
                                              int64_t plane, int64_t r0, int64_t c0, MmaSmem<T>& sm,
                                              float (&sd)[kRowsPerWarp], float (&td)[kRowsPerWarp]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int which = warp / 4, sub = warp % 4;  // which: 0 = S, 1 = T; sub: quarter of the 32 x 32 tile
  const int64_t channels_mine = which == 0 ? cs : ct;
  const int64_t k_max = cs > ct ? cs : ct;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int64_t k0 = 0; k0 < k_max; k0 += kMmaK) {
    for (int idx = threadIdx.x; idx < 4 * kMmaK * kTile; idx += blockDim.x) {
      const int buf = idx / (kMmaK * kTile), rem = idx - buf * (kMmaK * kTile);
      const int kk = rem / kTile, pp = rem - kk * kTile;
      const int64_t k = k0 + kk;
      const bool student = buf < 2, row_side = (buf % 2) == 0;
      const int64_t channels = student ? cs : ct;
      const int64_t p = (row_side ? r0 : c0) + pp;
      const T* src = student ? (row_side ? xi_s : xj_s) : (row_side ? xi_t : xj_t);
      sm.stage[buf][kk][pp] = (k < channels && p < plane) ? src[k * plane + p] : from_float<T>(0.f);
    }
    __syncthreads();
    if (k0 < channels_mine) {  // warp-uniform
      // A = rows^T: element (r, k) at stage[k][r] -> col_major; B = columns: (k, c) at stage[k][c] -> row_major
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, &sm.stage[2 * which][0][(sub / 2) * 16], kStageLd);
      wmma::load_matrix_sync(fb, &sm.stage[2 * which + 1][0][(sub % 2) * 16], kStageLd);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(&sm.out[which][(sub / 2) * 16][(sub % 2) * 16], acc, kOutLd, wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    sd[q] = sm.out[0][warp * kRowsPerWarp + q][lane];
    td[q] = sm.out[1][warp * kRowsPerWarp + q][lane];
  }
  __syncthreads();
#endif
}

// Tensor cores for half / bfloat16 where the architecture has them, FMA otherwise.
template <typename T>
struct TileDots {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  static constexpr bool kMma = false;
#else
  static constexpr bool kMma = !std::is_same<T, float>::value;
#endif
  using Smem = typename std::conditional<kMma, MmaSmem<T>, FmaSmem>::type;

  __device__ __forceinline__ static void run(const T* xi_s, const T* xj_s, int64_t cs, const T* xi_t, const T* xj_t,
                                             int64_t ct, int64_t plane, int64_t r0, int64_t c0, Smem& sm,
                                             float (&sd)[kRowsPerWarp], float (&td)[kRowsPerWarp]) {
    if constexpr (kMma) {
      tile_dots_mma<T>(xi_s, xj_s, cs, xi_t, xj_t, ct, plane, r0, c0, sm, sd, td);
    } else {
      tile_dots_fma<T>(xi_s, xj_s, cs, plane, r0, c0, sm, sd);
      tile_dots_fma<T>(xi_t, xj_t, ct, plane, r0, c0, sm, td);
    }
  }
};

struct PairView {
  int64_t pair, i, j, r0;
};

__device__ __forceinline__ PairView pair_of_block(int64_t batch, int64_t row_tiles) {
  PairView v;
  v.pair = blockIdx.x / row_tiles;
  const int64_t rt = blockIdx.x - v.pair * row_tiles;
  v.i = v.pair / batch;
  v.j = v.pair - v.i * batch;
  v.r0 = rt * kTile;
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
cross_image_forward_kernel(const T* __restrict__ xs, const T* __restrict__ xt, const float* __restrict__ inv_s,
                           const float* __restrict__ inv_t, float* __restrict__ row_kl, float* __restrict__ lse,
                           int64_t batch, int64_t cs, int64_t ct, int64_t plane, int64_t row_tiles, float inv_tau) {
  __shared__ typename TileDots<T>::Smem sm;
  const PairView v = pair_of_block(batch, row_tiles);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* xi_s = xs + v.i * cs * plane;
  const T* xj_s = xs + v.j * cs * plane;
  const T* xi_t = xt + v.i * ct * plane;
  const T* xj_t = xt + v.j * ct * plane;

  float row_scale_s[kRowsPerWarp], row_scale_t[kRowsPerWarp];
  float ms[kRowsPerWarp], ls[kRowsPerWarp], mt[kRowsPerWarp], lt[kRowsPerWarp], acc[kRowsPerWarp];
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    const int64_t r = v.r0 + warp * kRowsPerWarp + q;
    row_scale_s[q] = r < plane ? inv_s[v.i * plane + r] * inv_tau : 0.f;
    row_scale_t[q] = r < plane ? inv_t[v.i * plane + r] * inv_tau : 0.f;
    ms[q] = mt[q] = -INFINITY;
    ls[q] = lt[q] = acc[q] = 0.f;
  }

  for (int64_t c0 = 0; c0 < plane; c0 += kTile) {
    float sd[kRowsPerWarp], td[kRowsPerWarp];
    TileDots<T>::run(xi_s, xj_s, cs, xi_t, xj_t, ct, plane, v.r0, c0, sm, sd, td);
    const bool valid = c0 + lane < plane;
    const float col_s = valid ? inv_s[v.j * plane + c0 + lane] : 0.f;
    const float col_t = valid ? inv_t[v.j * plane + c0 + lane] : 0.f;
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const float sv = valid ? sd[q] * row_scale_s[q] * col_s : -INFINITY;
      const float tv = valid ? td[q] * row_scale_t[q] * col_t : -INFINITY;
      const float nms = max_nan(ms[q], warp_max(sv));
      ls[q] = ls[q] * rescale(ms[q], nms) + warp_sum(valid ? expf(sv - nms) : 0.f);
      ms[q] = nms;
      const float nmt = max_nan(mt[q], warp_max(tv));
      const float e = valid ? expf(tv - nmt) : 0.f;
      const float sc = rescale(mt[q], nmt);
      lt[q] = lt[q] * sc + warp_sum(e);
      acc[q] = acc[q] * sc + warp_sum(valid ? e * (tv - sv) : 0.f);
      mt[q] = nmt;
    }
  }
  if (lane == 0) {
    const int64_t rows_total = batch * batch * plane;
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const int64_t r = v.r0 + warp * kRowsPerWarp + q;
      if (r < plane) {
        const float lse_s = ms[q] + logf(ls[q]), lse_t = mt[q] + logf(lt[q]);
        const int64_t at = v.pair * plane + r;
        row_kl[at] = acc[q] / lt[q] - lse_t + lse_s;
        lse[at] = lse_s;
        lse[rows_total + at] = lse_t;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
cross_image_backward_kernel(const T* __restrict__ xs, const T* __restrict__ xt, const float* __restrict__ inv_s,
                            const float* __restrict__ inv_t, const float* __restrict__ lse,
                            const float* __restrict__ grad_loss, float* __restrict__ da, int64_t batch, int64_t cs,
                            int64_t ct, int64_t plane, int64_t row_tiles, float inv_tau, float scale) {
  __shared__ typename TileDots<T>::Smem sm;
  // dS scaled for the row update (by inv_j[c]) and for the column update (by inv_i[r])
  __shared__ float d_row[kTile][kTile + 1], d_col[kTile][kTile + 1];
  const PairView v = pair_of_block(batch, row_tiles);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* xi_s = xs + v.i * cs * plane;
  const T* xj_s = xs + v.j * cs * plane;
  const T* xi_t = xt + v.i * ct * plane;
  const T* xj_t = xt + v.j * ct * plane;
  float* dai = da + v.i * cs * plane;
  float* daj = da + v.j * cs * plane;
  // d loss / d S_ij[r, c] = (p_S - p_T) * g / (N^2 P); S = a_i^T a_j / tau adds 1 / tau.
  const float coef = grad_loss[0] * scale * inv_tau;
  const int64_t rows_total = batch * batch * plane;
  float lse_s[kRowsPerWarp], lse_t[kRowsPerWarp], row_inv_s[kRowsPerWarp], row_inv_t[kRowsPerWarp];
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    const int64_t r = v.r0 + warp * kRowsPerWarp + q;
    const bool ok = r < plane;
    lse_s[q] = ok ? lse[v.pair * plane + r] : 0.f;
    lse_t[q] = ok ? lse[rows_total + v.pair * plane + r] : 0.f;
    row_inv_s[q] = ok ? inv_s[v.i * plane + r] : 0.f;
    row_inv_t[q] = ok ? inv_t[v.i * plane + r] : 0.f;
  }
  const bool row_valid = v.r0 + lane < plane;
  const int64_t r_count = plane - v.r0 < kTile ? plane - v.r0 : kTile;

  for (int64_t c0 = 0; c0 < plane; c0 += kTile) {
    float sd[kRowsPerWarp], td[kRowsPerWarp];
    TileDots<T>::run(xi_s, xj_s, cs, xi_t, xj_t, ct, plane, v.r0, c0, sm, sd, td);
    const bool valid = c0 + lane < plane;
    const float col_s = valid ? inv_s[v.j * plane + c0 + lane] : 0.f;
    const float col_t = valid ? inv_t[v.j * plane + c0 + lane] : 0.f;
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const int64_t r = v.r0 + warp * kRowsPerWarp + q;
      float d = 0.f;
      if (valid && r < plane) {
        const float sv = sd[q] * row_inv_s[q] * col_s * inv_tau, tv = td[q] * row_inv_t[q] * col_t * inv_tau;
        d = coef * (expf(sv - lse_s[q]) - expf(tv - lse_t[q]));
      }
      d_row[warp * kRowsPerWarp + q][lane] = d * col_s;
      d_col[warp * kRowsPerWarp + q][lane] = d * row_inv_s[q];
    }
    __syncthreads();
    const int64_t c_count = plane - c0 < kTile ? plane - c0 : kTile;
    for (int64_t k = warp; k < cs; k += kThreads / 32) {
      // rows: lane = row r0 + lane; the x_j values are the same for every lane (broadcast loads)
      float vr = 0.f;
      for (int c = 0; c < c_count; ++c) vr = fmaf(d_row[lane][c], to_float(xj_s[k * plane + c0 + c]), vr);
      if (row_valid) atomicAdd(dai + k * plane + v.r0 + lane, vr);
      // columns: lane = column c0 + lane
      float vc = 0.f;
      for (int r = 0; r < r_count; ++r) vc = fmaf(d_col[r][lane], to_float(xi_s[k * plane + v.r0 + r]), vc);
      if (valid) atomicAdd(daj + k * plane + c0 + lane, vc);
    }
    __syncthreads();
  }
}

// The same backward without per-tile atomics: one kernel owns 32 rows of image i (loops over the
// column tiles of j) and accumulates da_i for its rows in shared memory; the other owns 32
// columns of image j (loops over the row tiles of i) and accumulates da_j for its columns. Each
// recomputes the tiles (twice the similarity work) and flushes its accumulator once with atomics
// (several pairs add into the same image). Dynamic shared memory: C_s x 32 floats.
template <typename T, bool kOwnRows>
__global__ void __launch_bounds__(kThreads)
cross_image_backward_owned_kernel(const T* __restrict__ xs, const T* __restrict__ xt, const float* __restrict__ inv_s,
                                  const float* __restrict__ inv_t, const float* __restrict__ lse,
                                  const float* __restrict__ grad_loss, float* __restrict__ da, int64_t batch,
                                  int64_t cs, int64_t ct, int64_t plane, int64_t tiles, float inv_tau, float scale) {
  __shared__ typename TileDots<T>::Smem sm;
  __shared__ float dsh[kTile][kTile + 1];
  SEGKD_DYNAMIC_SHARED(float, acc);  // [cs][kTile]: da of the owned pixels
  const int64_t pair = blockIdx.x / tiles, owned0 = (blockIdx.x - pair * tiles) * kTile;
  const int64_t i = pair / batch, j = pair - i * batch;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* xi_s = xs + i * cs * plane;
  const T* xj_s = xs + j * cs * plane;
  const T* xi_t = xt + i * ct * plane;
  const T* xj_t = xt + j * ct * plane;
  const float coef = grad_loss[0] * scale * inv_tau;
  const int64_t rows_total = batch * batch * plane;
  for (int64_t e = threadIdx.x; e < cs * kTile; e += blockDim.x) acc[e] = 0.f;
  // no barrier needed here: the first tile_dots call synchronises before acc is touched again

  for (int64_t other0 = 0; other0 < plane; other0 += kTile) {
    const int64_t r0 = kOwnRows ? owned0 : other0, c0 = kOwnRows ? other0 : owned0;
    float sd[kRowsPerWarp], td[kRowsPerWarp];
    TileDots<T>::run(xi_s, xj_s, cs, xi_t, xj_t, ct, plane, r0, c0, sm, sd, td);
    const bool valid = c0 + lane < plane;
    const float col_s = valid ? inv_s[j * plane + c0 + lane] : 0.f;
    const float col_t = valid ? inv_t[j * plane + c0 + lane] : 0.f;
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const int64_t r = r0 + warp * kRowsPerWarp + q;
      float d = 0.f;
      if (valid && r < plane) {
        const float sv = sd[q] * inv_s[i * plane + r] * col_s * inv_tau;
        const float tv = td[q] * inv_t[i * plane + r] * col_t * inv_tau;
        d = coef * (expf(sv - lse[pair * plane + r]) - expf(tv - lse[rows_total + pair * plane + r]));
        // rows: the partner a_j[:, c] = x_j[:, c] inv_j[c]; columns: a_i[:, r] = x_i[:, r] inv_i[r]
        d *= kOwnRows ? col_s : inv_s[i * plane + r];
      }
      dsh[warp * kRowsPerWarp + q][lane] = d;
    }
    __syncthreads();
    // thread (warp, lane) owns acc[k][lane] for k = warp, warp + 8, ...: no two threads share one
    if (kOwnRows) {
      const int64_t c_count = plane - c0 < kTile ? plane - c0 : kTile;
      for (int64_t k = warp; k < cs; k += kThreads / 32) {
        float v = 0.f;
        for (int c = 0; c < c_count; ++c) v = fmaf(dsh[lane][c], to_float(xj_s[k * plane + c0 + c]), v);
        acc[k * kTile + lane] += v;
      }
    } else {
      const int64_t r_count = plane - r0 < kTile ? plane - r0 : kTile;
      for (int64_t k = warp; k < cs; k += kThreads / 32) {
        float v = 0.f;
        for (int r = 0; r < r_count; ++r) v = fmaf(dsh[r][lane], to_float(xi_s[k * plane + r0 + r]), v);
        acc[k * kTile + lane] += v;
      }
    }
    __syncthreads();
  }
  float* target = da + (kOwnRows ? i : j) * cs * plane;
  if (owned0 + lane < plane)
    for (int64_t k = warp; k < cs; k += kThreads / 32)
      atomicAdd(target + k * plane + owned0 + lane, acc[k * kTile + lane]);
}

void check_sizes(int64_t batch, int64_t plane, int64_t& row_tiles) {
  row_tiles = (plane + kTile - 1) / kTile;
  check_grid_dim(batch * batch * row_tiles, "cross_image_kd", "image pairs x row tiles");
}

}  // namespace

void cross_image_forward(std::uintptr_t xs, std::uintptr_t xt, std::uintptr_t inv_s, std::uintptr_t inv_t,
                         std::uintptr_t row_kl, std::uintptr_t lse, int64_t batch, int64_t cs, int64_t ct,
                         int64_t plane, double tau, DType dtype, int device, std::uintptr_t stream) {
  if (!(tau > 0)) throw std::invalid_argument("cross_image_kd: tau must be positive");
  if (batch == 0 || plane == 0) return;
  int64_t row_tiles = 0;
  check_sizes(batch, plane, row_tiles);
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "cross_image_forward", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(static_cast<unsigned>(batch * batch * row_tiles), kThreads, 0, as_stream(stream),
                 cross_image_forward_kernel<T>)(
        reinterpret_cast<const T*>(xs), reinterpret_cast<const T*>(xt), reinterpret_cast<const float*>(inv_s),
        reinterpret_cast<const float*>(inv_t), reinterpret_cast<float*>(row_kl), reinterpret_cast<float*>(lse), batch,
        cs, ct, plane, row_tiles, static_cast<float>(1.0 / tau));
  });
  check_launch("cross_image_forward");
}

void cross_image_backward(std::uintptr_t xs, std::uintptr_t xt, std::uintptr_t inv_s, std::uintptr_t inv_t,
                          std::uintptr_t lse, std::uintptr_t grad_loss, std::uintptr_t da, int64_t batch, int64_t cs,
                          int64_t ct, int64_t plane, double tau, DType dtype, int device, std::uintptr_t stream) {
  if (!(tau > 0)) throw std::invalid_argument("cross_image_kd: tau must be positive");
  if (batch == 0 || plane == 0 || cs == 0) return;
  int64_t row_tiles = 0;
  check_sizes(batch, plane, row_tiles);
  DeviceGuard guard(device);
  const double scale = 1.0 / (static_cast<double>(batch) * batch * plane);
  const unsigned blocks = static_cast<unsigned>(batch * batch * row_tiles);
  // The owned-pixel kernels keep C_s x 32 fp32 accumulators in shared memory; beyond what the
  // device offers per block, fall back to per-tile atomics.
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  const int64_t acc_bytes = cs * kTile * static_cast<int64_t>(sizeof(float));
  dispatch_float_types(dtype, "cross_image_backward", [&](auto tag) {
    using T = decltype(tag);
    const auto* s = reinterpret_cast<const T*>(xs);
    const auto* t = reinterpret_cast<const T*>(xt);
    const auto* is = reinterpret_cast<const float*>(inv_s);
    const auto* it = reinterpret_cast<const float*>(inv_t);
    const auto* l = reinterpret_cast<const float*>(lse);
    const auto* g = reinterpret_cast<const float*>(grad_loss);
    auto* d = reinterpret_cast<float*>(da);
    const float inv_tau = static_cast<float>(1.0 / tau), sc = static_cast<float>(scale);
    const int64_t static_bytes = static_cast<int64_t>(sizeof(typename TileDots<T>::Smem)) +
                                 kTile * (kTile + 1) * static_cast<int64_t>(sizeof(float));
    if (acc_bytes + static_bytes <= optin) {
      const int dyn = static_cast<int>(acc_bytes);
      check_cuda(cudaFuncSetAttribute(cross_image_backward_owned_kernel<T, true>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, dyn), "cudaFuncSetAttribute");
      check_cuda(cudaFuncSetAttribute(cross_image_backward_owned_kernel<T, false>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, dyn), "cudaFuncSetAttribute");
      SEGKD_LAUNCH(blocks, kThreads, dyn, as_stream(stream), cross_image_backward_owned_kernel<T, true>)(
          s, t, is, it, l, g, d, batch, cs, ct, plane, row_tiles, inv_tau, sc);
      check_launch("cross_image_backward (rows)");
      SEGKD_LAUNCH(blocks, kThreads, dyn, as_stream(stream), cross_image_backward_owned_kernel<T, false>)(
          s, t, is, it, l, g, d, batch, cs, ct, plane, row_tiles, inv_tau, sc);
    } else {
      SEGKD_LAUNCH(blocks, kThreads, 0, as_stream(stream), cross_image_backward_kernel<T>)(
          s, t, is, it, l, g, d, batch, cs, ct, plane, row_tiles, inv_tau, sc);
    }
  });
  check_launch("cross_image_backward");
}

}  // namespace segkd
