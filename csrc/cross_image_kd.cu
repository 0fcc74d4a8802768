// Cross-image pixel-to-pixel distillation (docs/losses.md 4), flash-style: the N^2 P x P similarity
// matrices are never stored.
//
// Inputs are the raw features x_s (N, C_s, P), x_t (N, C_t, P) in one dtype and the inverse
// clamped per-pixel norms inv_s, inv_t (N, P) fp32: a similarity is
//     S[r, c] = (x_i[:, r] . x_j[:, c]) * inv_i[r] * inv_j[c] / tau,
// so the dot products run on the raw inputs (exact products, fp32 accumulation) and normalisation
// costs one scale per entry.
// Forward: per row, running max / sum-exp of S and of T and the rescaled accumulator
// sum exp(T - m_T) (T - S); KL_row = acc / l_T - lse_T + lse_S. The two log-sum-exps are saved.
// Backward recomputes every tile: dS = (softmax(S) - softmax(T)) * g / (N^2 P tau), then
// da_i[:, r] += sum_c dS[r, c] a_j[:, c] and da_j[:, c] += sum_r dS[r, c] a_i[:, r] with
// a = x * inv. da is zero-filled by the caller.
//
// Two families of kernels:
// - tensor cores on sm_80+ (at the end of this file): FlashAttention-2 structure, resident row
//   tiles, cp.async column tiles, wmma for the S/T tiles and for both gradient products, each tile
//   computed once: half / bfloat16 with C_s <= 256, C_t <= 512 ("tc", 64 x 32 tiles), and fp32
//   with C_s <= 256, C_t <= 512 ("f32", 32 x 16 tiles on tf32 wmma with the 3xTF32 split), where
//   the resident rows fit the device's opt-in shared memory.
// - everything else (wider channels, small shared memory, pre-sm_80): 32 x 32 tiles, warp w owning rows
//   4w..4w+3 and lane l column l of every tile; S/T on wmma for half / bfloat16 (warps 0-3 the four
//   16x16 quarters of S, warps 4-7 those of T), fp32 FMA from shared-memory staging for float; the
//   backward either as two kernels that own the rows and the columns respectively and accumulate in
//   shared memory (one flush each; each recomputes the tiles), or, for very wide C_s, one kernel that
//   adds per tile with fp32 atomics.
#include <cuda_pipeline.h>
#include <mma.h>

#include <type_traits>

#include "common.cuh"

namespace segkd {
namespace {

// Launch bounds with a minimum of blocks per SM: ptxas otherwise held some of these kernels at 40-64
// registers and spilled (static report); 2 blocks of 256 threads per SM leave them up to 128.
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
__global__ void __launch_bounds__(kThreads, 2)
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
__global__ void __launch_bounds__(kThreads, 1)
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
__global__ void __launch_bounds__(kThreads, 2)
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

// ---- tensor-core kernels (half / bfloat16, sm_80+) ------------------------------------------------
// FlashAttention-2 structure on wmma 16x16x16 (fp32 accumulators). A block owns kBM = 64 rows of
// image i for one ordered pair (i, j). The row tiles x_i[:, rows] of the student and the teacher
// stay resident in shared memory for the whole loop over j's column tiles (kBN = 32 pixels); each
// column tile of x_j (both feature maps) is fetched with cp.async (16-byte copies where the plane
// allows it) into one of two buffers while the tensor cores work on the other. Warp w computes the
// 16 x 16 fragment w of the 64 x 32 S tile and of the T tile (all channels), so every warp issues
// the same number of MMAs; the row statistics then read the tiles from shared memory, four threads
// per row (8 columns each, reductions by two shuffles).
// Backward: every S/T tile is computed once. dS (unscaled p_S - p_T, in [-1, 1], so fp16 neither
// underflows nor overflows; coef scales the fp32 results) is written to shared memory twice, scaled
// by inv_j[c] for the rows side and by inv_i[r] for the columns side, as 16-bit MMA operands:
//     rows:    dA_i[:, rows] += X_j D_row^T   (C_s x 64 fp32 fragments held in registers all along)
//     columns: dA_j[:, cols] += X_i D_col     (C_s x 32, added to dA_j with fp32 atomics per tile)
// so the MMAs executed are the algorithm's (C padded to 16). Channel counts up to kTcMaxCs (student)
// and kTcMaxCt (teacher); wider ones and pre-sm_80 devices take the kernels above, fp32 the 3xTF32
// kernels below.
constexpr int kBM = 64, kBN = 32;
// The dynamic shared memory, 128-byte aligned (wmma needs 32-byte aligned tile pointers).
#if defined(SEGKD_HOST_EXECUTION)
#define SEGKD_TC_SHARED(name) unsigned char* name = ::segkd_host::dynamic_shared<unsigned char>()
#else
#define SEGKD_TC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif
constexpr int kRowLd = kBM + 8;  // halves per resident row-tile line: 144 B, 32-B aligned fragments
constexpr int kColLd = kBN + 8;  // halves per column-tile line: 80 B
constexpr int kOutLd2 = kBN + 4; // floats per S / T / column-gradient line: 144 B
constexpr int kQuad = 4;                            // threads per tile row in the statistics
constexpr int kColsPerThread = kBN / kQuad;         // 8 columns each
static_assert(kBM * kQuad == kThreads, "one quad of threads per tile row");
constexpr int kTcMaxCs = 256, kTcMaxCt = 512;
constexpr int kRowFrags = kTcMaxCs / 16 * (kBM / 16) / (kThreads / 32);  // row-gradient fragments per warp

__host__ __device__ constexpr int64_t round16(int64_t c) { return (c + 15) / 16 * 16; }
__host__ __device__ constexpr int64_t align128(int64_t bytes) { return (bytes + 127) / 128 * 128; }

// Byte offsets of the dynamic shared-memory regions (each 128-B aligned).
struct TcLayout {
  int64_t xi_s, xi_t, xj0, xj_bytes, out, d_row, d_col, colbuf, total;
  __host__ __device__ TcLayout(int64_t cs16, int64_t ct16, int64_t elem, bool backward) {
    int64_t at = 0;
    xi_s = at; at += align128(cs16 * kRowLd * elem);
    xi_t = at; at += align128(ct16 * kRowLd * elem);
    xj0 = at;
    xj_bytes = align128((cs16 + ct16) * kColLd * elem);
    at += 2 * xj_bytes;
    out = at; at += align128(2 * kBM * kOutLd2 * 4);
    d_row = d_col = colbuf = at;
    if (backward) {
      d_row = at; at += align128(kBM * kColLd * elem);
      d_col = at; at += align128(kBM * kColLd * elem);
      colbuf = at; at += align128(cs16 * kOutLd2 * 4);
    }
    total = at;
  }
  // column-tile buffer b (0 or 1), by arithmetic: an indexed member array would live in local memory
  __host__ __device__ int64_t xj(int b) const { return xj0 + b * xj_bytes; }
};

// Rows [0, c16) x pixels [p0, p0 + width) of a (C, P) plane into dst[k][0..width) (line ld), zero
// outside C and P. 16-byte cp.async copies where the whole vector is inside P and aligned; the rest
// element by element (plain stores, visible after the caller's barrier).
template <typename T, int kWidth>
__device__ __forceinline__ void stage_tile(T* dst, int ld, const T* __restrict__ src, int64_t channels, int64_t c16,
                                           int64_t plane, int64_t p0, bool vec_ok) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // 16 bytes: 8 16-bit values or 4 floats
  constexpr int kPerLine = kWidth / kVec;
  for (int64_t idx = threadIdx.x; idx < c16 * kPerLine; idx += blockDim.x) {
    const int64_t k = idx / kPerLine;
    const int v = static_cast<int>(idx - k * kPerLine) * kVec;
    T* d = dst + k * ld + v;
    const int64_t p = p0 + v;
    if (k < channels && vec_ok && p + kVec <= plane) {
      __pipeline_memcpy_async(d, src + k * plane + p, 16);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        d[e] = (k < channels && p + e < plane) ? src[k * plane + p + e] : from_float<T>(0.f);
    }
  }
}

template <typename T>
__device__ __forceinline__ void stage_columns(unsigned char* smem, const TcLayout& L, int buf, const T* xj_s,
                                              const T* xj_t, int64_t cs, int64_t ct, int64_t cs16, int64_t ct16,
                                              int64_t plane, int64_t c0, bool vec_ok) {
  T* dst = reinterpret_cast<T*>(smem + L.xj(buf));
  stage_tile<T, kBN>(dst, kColLd, xj_s, cs, cs16, plane, c0, vec_ok);
  stage_tile<T, kBN>(dst + cs16 * kColLd, kColLd, xj_t, ct, ct16, plane, c0, vec_ok);
  __pipeline_commit();
}

// Raw S and T dots of the row tile against the column tile in buffer buf, into L.out (fp32).
template <typename T>
__device__ __forceinline__ void tc_tile_dots(unsigned char* smem, const TcLayout& L, int buf, int64_t cs16,
                                             int64_t ct16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  const int warp = threadIdx.x / 32, rf = warp / 2, cf = warp % 2;
  const T* xi_s = reinterpret_cast<const T*>(smem + L.xi_s);
  const T* xi_t = reinterpret_cast<const T*>(smem + L.xi_t);
  const T* xj = reinterpret_cast<const T*>(smem + L.xj(buf));
  float* out = reinterpret_cast<float*>(smem + L.out);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;  // (r, k) at x_i[k][r]
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;  // (k, c) at x_j[k][c]
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int64_t k0 = 0; k0 < cs16; k0 += 16) {
    wmma::load_matrix_sync(fa, xi_s + k0 * kRowLd + rf * 16, kRowLd);
    wmma::load_matrix_sync(fb, xj + k0 * kColLd + cf * 16, kColLd);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(out + (rf * 16) * kOutLd2 + cf * 16, acc, kOutLd2, wmma::mem_row_major);
  wmma::fill_fragment(acc, 0.f);
  for (int64_t k0 = 0; k0 < ct16; k0 += 16) {
    wmma::load_matrix_sync(fa, xi_t + k0 * kRowLd + rf * 16, kRowLd);
    wmma::load_matrix_sync(fb, xj + (cs16 + k0) * kColLd + cf * 16, kColLd);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(out + kBM * kOutLd2 + (rf * 16) * kOutLd2 + cf * 16, acc, kOutLd2, wmma::mem_row_major);
#endif
}

// The forward keeps each warp's A fragments (its 16 rows of the resident row tiles, every 16-channel
// block of C_s then C_t, up to kHeldA of them) in registers for the whole column loop, as
// FlashAttention keeps Q: each MMA then reads only its B fragment from shared memory (half the
// shared-memory traffic of loading both). Blocks past kHeldA (C_s + C_t > 384) come from shared memory.
constexpr int kHeldA = 24;

template <typename T, typename Held>
__device__ __forceinline__ void tc_load_held(unsigned char* smem, const TcLayout& L, int64_t cs16, int64_t ct16,
                                             Held& held) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  const int rf = (threadIdx.x / 32) / 2;
  const int nks = static_cast<int>(cs16 / 16), nkt = static_cast<int>(ct16 / 16);
  const T* xi_s = reinterpret_cast<const T*>(smem + L.xi_s);
  const T* xi_t = reinterpret_cast<const T*>(smem + L.xi_t);
#pragma unroll
  for (int q = 0; q < kHeldA; ++q) {  // warp-uniform guards
    if (q < nks) wmma::load_matrix_sync(held[q], xi_s + (q * 16) * kRowLd + rf * 16, kRowLd);
    else if (q < nks + nkt) wmma::load_matrix_sync(held[q], xi_t + ((q - nks) * 16) * kRowLd + rf * 16, kRowLd);
  }
#endif
}

// tc_tile_dots with the A fragments of tc_load_held.
template <typename T, typename Held>
__device__ __forceinline__ void tc_tile_dots_held(unsigned char* smem, const TcLayout& L, int buf, int64_t cs16,
                                                  int64_t ct16, const Held& held) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  const int warp = threadIdx.x / 32, rf = warp / 2, cf = warp % 2;
  const int nks = static_cast<int>(cs16 / 16), nkt = static_cast<int>(ct16 / 16);
  const T* xi_s = reinterpret_cast<const T*>(smem + L.xi_s);
  const T* xi_t = reinterpret_cast<const T*>(smem + L.xi_t);
  const T* xj = reinterpret_cast<const T*>(smem + L.xj(buf));
  float* out = reinterpret_cast<float*>(smem + L.out);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  // S: channel blocks q < nks of the student; B (k, c) at x_j[k][c]
  wmma::fill_fragment(acc, 0.f);
#pragma unroll
  for (int q = 0; q < kHeldA; ++q) {
    if (q < nks) {
      wmma::load_matrix_sync(fb, xj + (q * 16) * kColLd + cf * 16, kColLd);
      wmma::mma_sync(acc, held[q], fb, acc);
    }
  }
  for (int q = kHeldA; q < nks; ++q) {
    wmma::load_matrix_sync(fa, xi_s + (q * 16) * kRowLd + rf * 16, kRowLd);
    wmma::load_matrix_sync(fb, xj + (q * 16) * kColLd + cf * 16, kColLd);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(out + (rf * 16) * kOutLd2 + cf * 16, acc, kOutLd2, wmma::mem_row_major);
  // T: blocks nks .. nks + nkt - 1 (the teacher's lines follow the student's in the column tile)
  wmma::fill_fragment(acc, 0.f);
#pragma unroll
  for (int q = 0; q < kHeldA; ++q) {
    if (q >= nks && q < nks + nkt) {
      wmma::load_matrix_sync(fb, xj + (q * 16) * kColLd + cf * 16, kColLd);
      wmma::mma_sync(acc, held[q], fb, acc);
    }
  }
  for (int q = nks > kHeldA ? nks : kHeldA; q < nks + nkt; ++q) {
    wmma::load_matrix_sync(fa, xi_t + ((q - nks) * 16) * kRowLd + rf * 16, kRowLd);
    wmma::load_matrix_sync(fb, xj + (q * 16) * kColLd + cf * 16, kColLd);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(out + kBM * kOutLd2 + (rf * 16) * kOutLd2 + cf * 16, acc, kOutLd2, wmma::mem_row_major);
#endif
}

__device__ __forceinline__ float quad_max(float v) {
  v = max_nan(v, __shfl_xor_sync(kFullMask, v, 1));
  return max_nan(v, __shfl_xor_sync(kFullMask, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}

// One column tile of a row's online statistics (the tensor-core forwards): the thread's kCols
// entries of S and T (-inf past the plane; the first `valid` of them are real) and their maxima
// tile_ms / tile_mt (taken by the caller as it reads the entries: a separate pass made ptxas spill
// the 16-bit forward on sm_80), merged with the rest of its quad into the running maxima ms / mt,
// sums of exp ls / lt and acc = sum exp(T - m_T) (T - S).
template <int kCols>
__device__ __forceinline__ void online_row_step(const float (&sv)[kCols], const float (&tv)[kCols], float tile_ms,
                                                float tile_mt, int valid, float& ms, float& mt, float& ls, float& lt,
                                                float& acc) {
  const float nms = max_nan(ms, quad_max(tile_ms)), nmt = max_nan(mt, quad_max(tile_mt));
  float sum_s = 0.f, sum_t = 0.f, sum_kl = 0.f;
#pragma unroll
  for (int e = 0; e < kCols; ++e) {
    if (e < valid) {  // a whole-invalid row keeps -inf maxima: exp(-inf - -inf) would be NaN
      const float et = expf(tv[e] - nmt);
      sum_s += expf(sv[e] - nms);
      sum_t += et;
      sum_kl += et * (tv[e] - sv[e]);
    }
  }
  const float sc = rescale(mt, nmt);
  ls = ls * rescale(ms, nms) + quad_sum(sum_s);
  lt = lt * sc + quad_sum(sum_t);
  acc = acc * sc + quad_sum(sum_kl);
  ms = nms;
  mt = nmt;
}

// How many of the `cap` columns from c on are inside the plane (0 past it).
__device__ __forceinline__ int columns_left(int64_t plane, int64_t c, int cap) {
  return plane - c < cap ? static_cast<int>(plane - c > 0 ? plane - c : 0) : cap;
}

// The row's KL and its two log-sum-exps, written by the first thread of its quad.
__device__ __forceinline__ void finish_row(int64_t r, int64_t plane, int64_t batch, int64_t pair, float ms, float mt,
                                           float ls, float lt, float acc, float* __restrict__ row_kl,
                                           float* __restrict__ lse) {
  if (threadIdx.x % kQuad == 0 && r < plane) {
    const float lse_s = ms + logf(ls), lse_t = mt + logf(lt);
    const int64_t at = pair * plane + r;
    row_kl[at] = acc / lt - lse_t + lse_s;
    lse[at] = lse_s;
    lse[batch * batch * plane + at] = lse_t;
  }
}

// The column gradient of one tile into dA_j: thread t adds column t % kCols (coalesced) of
// channels t / kCols, + kThreads / kCols, ... of colbuf (line kLd), scaled by coef, with fp32 atomics.
template <int kCols, int kBlockThreads, int kLd>
__device__ __forceinline__ void add_column_gradient(const float* colbuf, float* __restrict__ daj, int64_t c0,
                                                    int64_t cs, int64_t plane, float coef) {
  const int col = threadIdx.x % kCols;
  if (c0 + col < plane)
    for (int64_t k = threadIdx.x / kCols; k < cs; k += kBlockThreads / kCols)
      atomicAdd(daj + k * plane + c0 + col, coef * colbuf[k * kLd + col]);
}

// The row gradient held in registers into dA_i at the end of a backward: fragment f = warp + q
// kWarps of the (C_s / 16) x (kRows / 16) grid passes through the warp's own 16 x 16 slice of
// scratch (256 floats a warp) and is added, scaled by coef, with fp32 atomics.
template <int kRows, int kWarps, typename Frag, int kFrags>
__device__ __forceinline__ void add_row_gradient(float* scratch, const Frag (&racc)[kFrags], int row_frags,
                                                 float* __restrict__ dai, int64_t r0, int64_t cs, int64_t plane,
                                                 float coef) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  scratch += warp * 16 * 16;
#pragma unroll
  for (int q = 0; q < kFrags; ++q) {
    const int f = warp + q * kWarps;
    if (f < row_frags) {  // warp-uniform
      const int kf = f / (kRows / 16), rf = f % (kRows / 16);
      nvcuda::wmma::store_matrix_sync(scratch, racc[q], 16, nvcuda::wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t k = kf * 16 + e / 16, r = r0 + rf * 16 + e % 16;
        if (k < cs && r < plane) atomicAdd(dai + k * plane + r, coef * scratch[e]);
      }
      __syncwarp();
    }
  }
}

// Top of a pipelined column-tile step: with `prefetch`, the copy of tile + 1 into the other buffer
// (stage_next) is issued before waiting for tile `tile`, so it streams in while this one is
// multiplied; then a barrier makes tile `tile` (and the row tiles) visible to every thread.
template <typename Stage>
__device__ __forceinline__ void column_tile_ready(int64_t tile, int64_t tiles, bool prefetch, const Stage& stage_next) {
  if (prefetch && tile + 1 < tiles) {
    stage_next();
    __pipeline_wait_prior(1);
  } else {
    __pipeline_wait_prior(0);
  }
  __syncthreads();
}

struct TcBlock {
  int64_t pair, i, j, r0;
};

__device__ __forceinline__ TcBlock tc_block(int64_t batch, int64_t row_tiles, int rows = kBM) {
  TcBlock v;
  v.pair = blockIdx.x / row_tiles;
  v.r0 = (blockIdx.x - v.pair * row_tiles) * rows;
  v.i = v.pair / batch;
  v.j = v.pair - v.i * batch;
  return v;
}

// What a backward thread keeps of its row r: the two saved log-sum-exps and the inverse norms
// (zeros past the plane).
struct BwdRow {
  bool ok;
  float lse_s, lse_t, inv_s, inv_t;
};

__device__ __forceinline__ BwdRow bwd_row(const TcBlock& v, int64_t r, int64_t batch, int64_t plane,
                                          const float* __restrict__ lse, const float* __restrict__ inv_s,
                                          const float* __restrict__ inv_t) {
  BwdRow row;
  row.ok = r < plane;
  row.lse_s = row.ok ? lse[v.pair * plane + r] : 0.f;
  row.lse_t = row.ok ? lse[batch * batch * plane + v.pair * plane + r] : 0.f;
  row.inv_s = row.ok ? inv_s[v.i * plane + r] : 0.f;
  row.inv_t = row.ok ? inv_t[v.i * plane + r] : 0.f;
  return row;
}

// Where a backward block of pair v = (i, j) reads and writes: the partner image j's student and
// teacher planes, both images' gradient planes, its shared-memory regions (S and T in out, dS for
// the row and the column products, the column-gradient buffer, image i's resident student rows at
// byte xi_s) and d loss / d S_ij's common factor g * scale / tau. Shared by the 16-bit and the fp32
// backward kernels (Layout: TcLayout or F32Layout; T: their operand type in shared memory).
template <typename T>
struct BwdBlock {
  const T* xj_s;
  const T* xj_t;
  float* dai;
  float* daj;
  const float* out;
  T* d_row;
  T* d_col;
  float* colbuf;
  const T* xi_s;
  float coef;
};

template <typename T, typename Layout>
__device__ __forceinline__ BwdBlock<T> bwd_block(unsigned char* smem, const Layout& L, int64_t xi_s, const T* xs,
                                                 const T* xt, float* da, const TcBlock& v, int64_t cs, int64_t ct,
                                                 int64_t plane, const float* __restrict__ grad_loss, float scale,
                                                 float inv_tau) {
  BwdBlock<T> b;
  b.xj_s = xs + v.j * cs * plane;
  b.xj_t = xt + v.j * ct * plane;
  b.dai = da + v.i * cs * plane;
  b.daj = da + v.j * cs * plane;
  b.out = reinterpret_cast<const float*>(smem + L.out);
  b.d_row = reinterpret_cast<T*>(smem + L.d_row);
  b.d_col = reinterpret_cast<T*>(smem + L.d_col);
  b.colbuf = reinterpret_cast<float*>(smem + L.colbuf);
  b.xi_s = reinterpret_cast<const T*>(smem + xi_s);
  // d loss / d S_ij[r, c] = (p_S - p_T) * g / (N^2 P); S = a_i^T a_j / tau adds 1 / tau.
  b.coef = grad_loss[0] * scale * inv_tau;
  return b;
}

// Loads the resident row tiles and starts the first column tile; returns whether 16-byte copies apply.
template <typename T>
__device__ __forceinline__ bool tc_prologue(unsigned char* smem, const TcLayout& L, const T* xs, const T* xt,
                                            const TcBlock& v, int64_t cs, int64_t ct, int64_t cs16, int64_t ct16,
                                            int64_t plane) {
  // 16-byte copies need every line start (k * plane + p, p a multiple of 8) 16-byte aligned
  const bool vec_ok = plane % 8 == 0 && reinterpret_cast<std::uintptr_t>(xs) % 16 == 0 &&
                      reinterpret_cast<std::uintptr_t>(xt) % 16 == 0;
  stage_tile<T, kBM>(reinterpret_cast<T*>(smem + L.xi_s), kRowLd, xs + v.i * cs * plane, cs, cs16, plane, v.r0, vec_ok);
  stage_tile<T, kBM>(reinterpret_cast<T*>(smem + L.xi_t), kRowLd, xt + v.i * ct * plane, ct, ct16, plane, v.r0, vec_ok);
  __pipeline_commit();
  stage_columns<T>(smem, L, 0, xs + v.j * cs * plane, xt + v.j * ct * plane, cs, ct, cs16, ct16, plane, 0, vec_ok);
  return vec_ok;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
cross_image_forward_tc_kernel(const T* __restrict__ xs, const T* __restrict__ xt, const float* __restrict__ inv_s,
                              const float* __restrict__ inv_t, float* __restrict__ row_kl, float* __restrict__ lse,
                              int64_t batch, int64_t cs, int64_t ct, int64_t plane, int64_t row_tiles, float inv_tau) {
  SEGKD_TC_SHARED(smem);
  const int64_t cs16 = round16(cs), ct16 = round16(ct);
  const TcLayout L(cs16, ct16, sizeof(T), false);
  const TcBlock v = tc_block(batch, row_tiles);
  const T* xj_s = xs + v.j * cs * plane;
  const T* xj_t = xt + v.j * ct * plane;
  const bool vec_ok = tc_prologue<T>(smem, L, xs, xt, v, cs, ct, cs16, ct16, plane);
  const float* out = reinterpret_cast<const float*>(smem + L.out);
  // Row statistics: thread t owns row t / 4 of the tile and its 8 columns 8 (t % 4) .. + 7, so a
  // row's reductions are two shuffles within its quad.
  const int srow = threadIdx.x / kQuad, scol = (threadIdx.x % kQuad) * kColsPerThread;
  const int64_t r = v.r0 + srow;
  const float row_scale_s = r < plane ? inv_s[v.i * plane + r] * inv_tau : 0.f;
  const float row_scale_t = r < plane ? inv_t[v.i * plane + r] * inv_tau : 0.f;
  float ms = -INFINITY, mt = -INFINITY, ls = 0.f, lt = 0.f, acc = 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::col_major> held[kHeldA];
#endif
  const int64_t tiles = (plane + kBN - 1) / kBN;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t c0 = tile * kBN;
    const int buf = static_cast<int>(tile % 2);
    column_tile_ready(tile, tiles, true, [&] {
      stage_columns<T>(smem, L, buf ^ 1, xj_s, xj_t, cs, ct, cs16, ct16, plane, c0 + kBN, vec_ok);
    });  // L.out free too
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (tile == 0) tc_load_held<T>(smem, L, cs16, ct16, held);
    tc_tile_dots_held<T>(smem, L, buf, cs16, ct16, held);
#endif
    __syncthreads();  // S and T in L.out
    float sv[kColsPerThread], tv[kColsPerThread];
    float tile_ms = -INFINITY, tile_mt = -INFINITY;
#pragma unroll
    for (int e = 0; e < kColsPerThread; ++e) {
      const int64_t c = c0 + scol + e;
      const bool valid = c < plane;
      sv[e] = valid ? out[srow * kOutLd2 + scol + e] * row_scale_s * inv_s[v.j * plane + c] : -INFINITY;
      tv[e] = valid ? out[(kBM + srow) * kOutLd2 + scol + e] * row_scale_t * inv_t[v.j * plane + c] : -INFINITY;
      tile_ms = max_nan(tile_ms, sv[e]);
      tile_mt = max_nan(tile_mt, tv[e]);
    }
    online_row_step(sv, tv, tile_ms, tile_mt, columns_left(plane, c0 + scol, kColsPerThread), ms, mt, ls, lt, acc);
  }
  finish_row(r, plane, batch, v.pair, ms, mt, ls, lt, acc, row_kl, lse);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
cross_image_backward_tc_kernel(const T* __restrict__ xs, const T* __restrict__ xt, const float* __restrict__ inv_s,
                               const float* __restrict__ inv_t, const float* __restrict__ lse,
                               const float* __restrict__ grad_loss, float* __restrict__ da, int64_t batch, int64_t cs,
                               int64_t ct, int64_t plane, int64_t row_tiles, float inv_tau, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  SEGKD_TC_SHARED(smem);
  const int64_t cs16 = round16(cs), ct16 = round16(ct);
  const TcLayout L(cs16, ct16, sizeof(T), true);
  const TcBlock v = tc_block(batch, row_tiles);
  const int warp = threadIdx.x / 32;
  const bool vec_ok = tc_prologue<T>(smem, L, xs, xt, v, cs, ct, cs16, ct16, plane);
  const BwdBlock<T> bk = bwd_block<T>(smem, L, L.xi_s, xs, xt, da, v, cs, ct, plane, grad_loss, scale, inv_tau);
  const int srow = threadIdx.x / kQuad, scol = (threadIdx.x % kQuad) * kColsPerThread;
  const BwdRow row = bwd_row(v, v.r0 + srow, batch, plane, lse, inv_s, inv_t);
  const bool row_ok = row.ok;
  const float lse_s = row.lse_s, lse_t = row.lse_t, row_inv_s = row.inv_s, row_inv_t = row.inv_t;
  // Row-side gradient: fragment f = warp + 8 q of the (C_s / 16) x (kBM / 16) grid, in registers.
  const int row_frags = static_cast<int>(cs16 / 16) * (kBM / 16);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> racc[kRowFrags];
#pragma unroll
  for (int q = 0; q < kRowFrags; ++q) wmma::fill_fragment(racc[q], 0.f);
  const int col_frags = static_cast<int>(cs16 / 16) * (kBN / 16);

  const int64_t tiles = (plane + kBN - 1) / kBN;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t c0 = tile * kBN;
    const int buf = static_cast<int>(tile % 2);
    column_tile_ready(tile, tiles, true, [&] {
      stage_columns<T>(smem, L, buf ^ 1, bk.xj_s, bk.xj_t, cs, ct, cs16, ct16, plane, c0 + kBN, vec_ok);
    });
    tc_tile_dots<T>(smem, L, buf, cs16, ct16);
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kColsPerThread; ++e) {
      const int64_t c = c0 + scol + e;
      float d = 0.f, col_s = 0.f;
      if (c < plane && row_ok) {
        col_s = inv_s[v.j * plane + c];
        const float sv = bk.out[srow * kOutLd2 + scol + e] * row_inv_s * col_s * inv_tau;
        const float tv = bk.out[(kBM + srow) * kOutLd2 + scol + e] * row_inv_t * inv_t[v.j * plane + c] * inv_tau;
        d = expf(sv - lse_s) - expf(tv - lse_t);
      }
      // rows: the partner a_j[:, c] = x_j[:, c] inv_j[c]; columns: a_i[:, r] = x_i[:, r] inv_i[r]
      bk.d_row[srow * kColLd + scol + e] = from_float<T>(d * col_s);
      bk.d_col[srow * kColLd + scol + e] = from_float<T>(d * row_inv_s);
    }
    __syncthreads();
    const T* xj_sm = reinterpret_cast<const T*>(smem + L.xj(buf));
    {
      // rows: racc(k, r) += sum_c x_j[k][c] d_row[r][c]; A (k, c) row-major, B (c, r) = d_row[r][c] col-major
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
#pragma unroll
      for (int q = 0; q < kRowFrags; ++q) {
        const int f = warp + q * (kThreads / 32);
        if (f < row_frags) {  // warp-uniform
          const int kf = f / (kBM / 16), rf = f % (kBM / 16);
#pragma unroll
          for (int cc = 0; cc < kBN / 16; ++cc) {
            wmma::load_matrix_sync(fa, xj_sm + (kf * 16) * kColLd + cc * 16, kColLd);
            wmma::load_matrix_sync(fb, bk.d_row + (rf * 16) * kColLd + cc * 16, kColLd);
            wmma::mma_sync(racc[q], fa, fb, racc[q]);
          }
        }
      }
    }
    {
      // columns: col(k, c) = sum_r x_i[k][r] d_col[r][c]; A (k, r) row-major, B (r, c) row-major
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> cacc;
      for (int f = warp; f < col_frags; f += kThreads / 32) {
        const int kf = f / (kBN / 16), cf = f % (kBN / 16);
        wmma::fill_fragment(cacc, 0.f);
#pragma unroll
        for (int rr = 0; rr < kBM / 16; ++rr) {
          wmma::load_matrix_sync(fa, bk.xi_s + (kf * 16) * kRowLd + rr * 16, kRowLd);
          wmma::load_matrix_sync(fb, bk.d_col + (rr * 16) * kColLd + cf * 16, kColLd);
          wmma::mma_sync(cacc, fa, fb, cacc);
        }
        wmma::store_matrix_sync(bk.colbuf + (kf * 16) * kOutLd2 + cf * 16, cacc, kOutLd2, wmma::mem_row_major);
      }
    }
    __syncthreads();
    add_column_gradient<kBN, kThreads, kOutLd2>(bk.colbuf, bk.daj, c0, cs, plane, bk.coef);
    // the next step's first barrier orders these reads of colbuf, d_row, d_col and L.out before reuse
  }
  // Rows side into dA_i, through L.out (8 warps x 256 floats fit in its 2 x 64 x 36)
  __syncthreads();
  add_row_gradient<kBM, kThreads / 32>(reinterpret_cast<float*>(smem + L.out), racc, row_frags, bk.dai, v.r0, cs, plane,
                                       bk.coef);
#endif
}

// ---- tensor-core kernels for fp32 (sm_80+): 3xTF32 ------------------------------------------------
// The same FlashAttention-2 structure on wmma m16n16k8 tf32 fragments. Each fp32 operand is split in
// registers after its load_matrix_sync: hi = tf32(x), lo = tf32(x - hi) (x - hi is exact in fp32), so
// |x - hi - lo| <= 2^-22 |x|; a product is lo hi' + hi lo' + hi hi' (smallest first, fp32
// accumulators, the tf32 products exact), which drops only the lo lo' term (<= 2^-22 relative)
// and keeps the dots at fp32 accuracy: the error budget of the FMA kernels, at three MMAs per
// product of the algorithm.
// fp32 operands take twice the shared memory of 16-bit ones, so the tiles are smaller: a block of 4
// warps owns kFBM = 32 rows of image i (resident, student then teacher lines, C padded to 16) and
// streams kFBN = 16-pixel column tiles of x_j, double-buffered with cp.async where the device's
// shared memory allows, single-buffered otherwise (the next tile is fetched as soon as the current
// one has been read; sm_80 with C_s = C_t = 256 in the backward). Warp w multiplies row fragment
// w % 2 over half w / 2 of the combined channel blocks (student blocks then teacher blocks), so the
// four warps issue the same number of MMAs for any C_s / C_t; the two halves are added when the
// statistics read them (fixed order). The backward computes each S / T tile once and runs both
// gradient products on 3xTF32 as the 16-bit kernels do (dS in fp32 in shared memory).
constexpr int kFThreads = 128;
constexpr int kFBM = 32, kFBN = 16;
constexpr int kFK = 8;                  // wmma K of tf32
constexpr int kFRowLd = kFBM + 4;       // floats per resident row-tile line: 144 B
constexpr int kFColLd = kFBN + 4;       // floats per column-tile / dS line: 80 B
constexpr int kFOutLd = kFBN + 4;       // floats per S / T / column-gradient line
constexpr int kFCols = kFBN / kQuad;    // columns per thread in the statistics
static_assert(kFBM * kQuad == kFThreads, "one quad of threads per tile row");
constexpr int kFMaxCs = 256, kFMaxCt = 512;
constexpr int kFRowFrags = kFMaxCs / 16 * (kFBM / 16) / (kFThreads / 32);  // row-gradient fragments per warp

// Byte offsets of the dynamic shared-memory regions (each 128-B aligned). The resident rows are
// (C_s + C_t) lines, teacher after student (cs16 lines of 144 B: a multiple of 128, so the teacher
// block starts exactly at line cs16), and so is each column-tile buffer.
struct F32Layout {
  int64_t xi, xj0, xj_bytes, out, d_row, d_col, colbuf, total;
  int stages;
  __host__ __device__ F32Layout(int64_t cs16, int64_t ct16, bool backward, int stages_) : stages(stages_) {
    int64_t at = 0;
    xi = at; at += align128((cs16 + ct16) * kFRowLd * 4);
    xj0 = at;
    xj_bytes = align128((cs16 + ct16) * kFColLd * 4);
    at += stages * xj_bytes;
    out = at; at += align128(2 * 2 * kFBM * kFOutLd * 4);  // [half][S, T][row][column]
    d_row = d_col = colbuf = at;
    if (backward) {
      d_row = at; at += align128(kFBM * kFColLd * 4);
      d_col = at; at += align128(kFBM * kFColLd * 4);
      colbuf = at; at += align128(cs16 * kFOutLd * 4);
    }
    total = at;
  }
  __host__ __device__ int64_t xj(int b) const { return xj0 + b * xj_bytes; }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <typename Frag>
__device__ __forceinline__ void tf32_split(const Frag& x, Frag& hi, Frag& lo) {
#pragma unroll
  for (int e = 0; e < x.num_elements; ++e) {
    const float h = nvcuda::wmma::__float_to_tf32(x.x[e]);
    hi.x[e] = h;
    lo.x[e] = nvcuda::wmma::__float_to_tf32(x.x[e] - h);
  }
}

// acc += a b at fp32 accuracy on tf32 tensor cores (3xTF32, see above).
template <typename FragA, typename FragB, typename Acc>
__device__ __forceinline__ void mma_3xtf32(Acc& acc, const FragA& a, const FragB& b) {
  FragA a_hi, a_lo;
  FragB b_hi, b_lo;
  tf32_split(a, a_hi, a_lo);
  tf32_split(b, b_hi, b_lo);
  nvcuda::wmma::mma_sync(acc, a_lo, b_hi, acc);
  nvcuda::wmma::mma_sync(acc, a_hi, b_lo, acc);
  nvcuda::wmma::mma_sync(acc, a_hi, b_hi, acc);
}
#endif

template <typename T>
__device__ __forceinline__ void f32_stage_columns(unsigned char* smem, const F32Layout& L, int buf, const T* xj_s,
                                                  const T* xj_t, int64_t cs, int64_t ct, int64_t cs16, int64_t ct16,
                                                  int64_t plane, int64_t c0, bool vec_ok) {
  T* dst = reinterpret_cast<T*>(smem + L.xj(buf));
  stage_tile<T, kFBN>(dst, kFColLd, xj_s, cs, cs16, plane, c0, vec_ok);
  stage_tile<T, kFBN>(dst + cs16 * kFColLd, kFColLd, xj_t, ct, ct16, plane, c0, vec_ok);
  __pipeline_commit();
}

// Loads the resident row tiles and starts the first column tile; returns whether 16-byte copies apply.
__device__ __forceinline__ bool f32_prologue(unsigned char* smem, const F32Layout& L, const float* xs,
                                             const float* xt, const TcBlock& v, int64_t cs, int64_t ct, int64_t cs16,
                                             int64_t ct16, int64_t plane) {
  const bool vec_ok = plane % 4 == 0 && reinterpret_cast<std::uintptr_t>(xs) % 16 == 0 &&
                      reinterpret_cast<std::uintptr_t>(xt) % 16 == 0;
  float* xi = reinterpret_cast<float*>(smem + L.xi);
  stage_tile<float, kFBM>(xi, kFRowLd, xs + v.i * cs * plane, cs, cs16, plane, v.r0, vec_ok);
  stage_tile<float, kFBM>(xi + cs16 * kFRowLd, kFRowLd, xt + v.i * ct * plane, ct, ct16, plane, v.r0, vec_ok);
  __pipeline_commit();
  f32_stage_columns<float>(smem, L, 0, xs + v.j * cs * plane, xt + v.j * ct * plane, cs, ct, cs16, ct16, plane, 0,
                           vec_ok);
  return vec_ok;
}

// Raw S and T dots of the row tile against column buffer buf: warp w's half of the channel blocks
// for row fragment w % 2, into L.out[w / 2].
__device__ __forceinline__ void f32_tile_dots(unsigned char* smem, const F32Layout& L, int buf, int64_t cs16,
                                              int64_t ct16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  const int warp = threadIdx.x / 32, rf = warp % 2, half = warp / 2;
  const int nks = static_cast<int>(cs16 / kFK), nk = nks + static_cast<int>(ct16 / kFK);  // nk even
  const int q0 = half * (nk / 2), q1 = q0 + nk / 2;
  const float* xi = reinterpret_cast<const float*>(smem + L.xi) + rf * 16;
  const float* xj = reinterpret_cast<const float*>(smem + L.xj(buf));
  float* out = reinterpret_cast<float*>(smem + L.out) + (half * 2 * kFBM + rf * 16) * kFOutLd;
  wmma::fragment<wmma::matrix_a, 16, 16, kFK, wmma::precision::tf32, wmma::col_major> fa;  // (r, k) at x_i[k][r]
  wmma::fragment<wmma::matrix_b, 16, 16, kFK, wmma::precision::tf32, wmma::row_major> fb;  // (k, c) at x_j[k][c]
  wmma::fragment<wmma::accumulator, 16, 16, kFK, float> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int q = q0; q < (q1 < nks ? q1 : nks); ++q) {  // student blocks of this half
    wmma::load_matrix_sync(fa, xi + (q * kFK) * kFRowLd, kFRowLd);
    wmma::load_matrix_sync(fb, xj + (q * kFK) * kFColLd, kFColLd);
    mma_3xtf32(acc, fa, fb);
  }
  wmma::store_matrix_sync(out, acc, kFOutLd, wmma::mem_row_major);
  wmma::fill_fragment(acc, 0.f);
  for (int q = q0 > nks ? q0 : nks; q < q1; ++q) {  // teacher blocks of this half
    wmma::load_matrix_sync(fa, xi + (q * kFK) * kFRowLd, kFRowLd);
    wmma::load_matrix_sync(fb, xj + (q * kFK) * kFColLd, kFColLd);
    mma_3xtf32(acc, fa, fb);
  }
  wmma::store_matrix_sync(out + kFBM * kFOutLd, acc, kFOutLd, wmma::mem_row_major);
#endif
}

// Entry (row, column) of the S (which = 0) or T (1) tile: the two halves' sums, in a fixed order.
__device__ __forceinline__ float f32_tile_entry(const float* out, int which, int row, int col) {
  return out[(which * kFBM + row) * kFOutLd + col] + out[((2 + which) * kFBM + row) * kFOutLd + col];
}

__global__ void __launch_bounds__(kFThreads, 1)
cross_image_forward_f32_kernel(const float* __restrict__ xs, const float* __restrict__ xt,
                               const float* __restrict__ inv_s, const float* __restrict__ inv_t,
                               float* __restrict__ row_kl, float* __restrict__ lse, int64_t batch, int64_t cs,
                               int64_t ct, int64_t plane, int64_t row_tiles, float inv_tau, int stages) {
  SEGKD_TC_SHARED(smem);
  const int64_t cs16 = round16(cs), ct16 = round16(ct);
  const F32Layout L(cs16, ct16, false, stages);
  const TcBlock v = tc_block(batch, row_tiles, kFBM);
  const float* xj_s = xs + v.j * cs * plane;
  const float* xj_t = xt + v.j * ct * plane;
  const bool vec_ok = f32_prologue(smem, L, xs, xt, v, cs, ct, cs16, ct16, plane);
  const float* out = reinterpret_cast<const float*>(smem + L.out);
  const int srow = threadIdx.x / kQuad, scol = (threadIdx.x % kQuad) * kFCols;
  const int64_t r = v.r0 + srow;
  const float row_scale_s = r < plane ? inv_s[v.i * plane + r] * inv_tau : 0.f;
  const float row_scale_t = r < plane ? inv_t[v.i * plane + r] * inv_tau : 0.f;
  float ms = -INFINITY, mt = -INFINITY, ls = 0.f, lt = 0.f, acc = 0.f;
  const int64_t tiles = (plane + kFBN - 1) / kFBN;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t c0 = tile * kFBN;
    const int buf = static_cast<int>(tile % stages);
    column_tile_ready(tile, tiles, stages == 2, [&] {
      f32_stage_columns<float>(smem, L, buf ^ 1, xj_s, xj_t, cs, ct, cs16, ct16, plane, c0 + kFBN, vec_ok);
    });  // L.out free too
    f32_tile_dots(smem, L, buf, cs16, ct16);
    __syncthreads();  // S and T in L.out; the column buffer has been read
    if (stages == 1 && tile + 1 < tiles)
      f32_stage_columns<float>(smem, L, 0, xj_s, xj_t, cs, ct, cs16, ct16, plane, c0 + kFBN, vec_ok);
    float sv[kFCols], tv[kFCols];
    float tile_ms = -INFINITY, tile_mt = -INFINITY;
#pragma unroll
    for (int e = 0; e < kFCols; ++e) {
      const int64_t c = c0 + scol + e;
      const bool valid = c < plane;
      sv[e] = valid ? f32_tile_entry(out, 0, srow, scol + e) * row_scale_s * inv_s[v.j * plane + c] : -INFINITY;
      tv[e] = valid ? f32_tile_entry(out, 1, srow, scol + e) * row_scale_t * inv_t[v.j * plane + c] : -INFINITY;
      tile_ms = max_nan(tile_ms, sv[e]);
      tile_mt = max_nan(tile_mt, tv[e]);
    }
    online_row_step(sv, tv, tile_ms, tile_mt, columns_left(plane, c0 + scol, kFCols), ms, mt, ls, lt, acc);
  }
  finish_row(r, plane, batch, v.pair, ms, mt, ls, lt, acc, row_kl, lse);
}

__global__ void __launch_bounds__(kFThreads, 1)
cross_image_backward_f32_kernel(const float* __restrict__ xs, const float* __restrict__ xt,
                                const float* __restrict__ inv_s, const float* __restrict__ inv_t,
                                const float* __restrict__ lse, const float* __restrict__ grad_loss,
                                float* __restrict__ da, int64_t batch, int64_t cs, int64_t ct, int64_t plane,
                                int64_t row_tiles, float inv_tau, float scale, int stages) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, kFK, float>;
  SEGKD_TC_SHARED(smem);
  const int64_t cs16 = round16(cs), ct16 = round16(ct);
  const F32Layout L(cs16, ct16, true, stages);
  const TcBlock v = tc_block(batch, row_tiles, kFBM);
  const int warp = threadIdx.x / 32;
  const bool vec_ok = f32_prologue(smem, L, xs, xt, v, cs, ct, cs16, ct16, plane);
  const BwdBlock<float> bk = bwd_block<float>(smem, L, L.xi, xs, xt, da, v, cs, ct, plane, grad_loss, scale, inv_tau);
  const int srow = threadIdx.x / kQuad, scol = (threadIdx.x % kQuad) * kFCols;
  const BwdRow row = bwd_row(v, v.r0 + srow, batch, plane, lse, inv_s, inv_t);
  const bool row_ok = row.ok;
  const float lse_s = row.lse_s, lse_t = row.lse_t, row_inv_s = row.inv_s, row_inv_t = row.inv_t;
  // Row-side gradient: fragment f = warp + 4 q of the (C_s / 16) x (kFBM / 16) grid, in registers.
  const int row_frags = static_cast<int>(cs16 / 16) * (kFBM / 16);
  FragAcc racc[kFRowFrags];
#pragma unroll
  for (int q = 0; q < kFRowFrags; ++q) wmma::fill_fragment(racc[q], 0.f);
  const int col_frags = static_cast<int>(cs16 / 16) * (kFBN / 16);

  const int64_t tiles = (plane + kFBN - 1) / kFBN;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t c0 = tile * kFBN;
    const int buf = static_cast<int>(tile % stages);
    column_tile_ready(tile, tiles, stages == 2, [&] {
      f32_stage_columns<float>(smem, L, buf ^ 1, bk.xj_s, bk.xj_t, cs, ct, cs16, ct16, plane, c0 + kFBN, vec_ok);
    });
    f32_tile_dots(smem, L, buf, cs16, ct16);
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kFCols; ++e) {
      const int64_t c = c0 + scol + e;
      float d = 0.f, col_s = 0.f;
      if (c < plane && row_ok) {
        col_s = inv_s[v.j * plane + c];
        const float sv = f32_tile_entry(bk.out, 0, srow, scol + e) * row_inv_s * col_s * inv_tau;
        const float tv = f32_tile_entry(bk.out, 1, srow, scol + e) * row_inv_t * inv_t[v.j * plane + c] * inv_tau;
        d = expf(sv - lse_s) - expf(tv - lse_t);
      }
      // rows: the partner a_j[:, c] = x_j[:, c] inv_j[c]; columns: a_i[:, r] = x_i[:, r] inv_i[r]
      bk.d_row[srow * kFColLd + scol + e] = d * col_s;
      bk.d_col[srow * kFColLd + scol + e] = d * row_inv_s;
    }
    __syncthreads();
    const float* xj_sm = reinterpret_cast<const float*>(smem + L.xj(buf));
    {
      // rows: racc(k, r) += sum_c x_j[k][c] d_row[r][c]; A (k, c) row-major, B (c, r) = d_row[r][c] col-major
      wmma::fragment<wmma::matrix_a, 16, 16, kFK, wmma::precision::tf32, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, kFK, wmma::precision::tf32, wmma::col_major> fb;
#pragma unroll
      for (int q = 0; q < kFRowFrags; ++q) {
        const int f = warp + q * (kFThreads / 32);
        if (f < row_frags) {  // warp-uniform
          const int kf = f / (kFBM / 16), rf = f % (kFBM / 16);
#pragma unroll 1  // unrolled too: 254 of 255 registers on sm_90 (238 rolled)
          for (int cc = 0; cc < kFBN / kFK; ++cc) {
            wmma::load_matrix_sync(fa, xj_sm + (kf * 16) * kFColLd + cc * kFK, kFColLd);
            wmma::load_matrix_sync(fb, bk.d_row + (rf * 16) * kFColLd + cc * kFK, kFColLd);
            mma_3xtf32(racc[q], fa, fb);
          }
        }
      }
    }
    {
      // columns: col(k, c) = sum_r x_i[k][r] d_col[r][c]; A (k, r) row-major, B (r, c) row-major
      wmma::fragment<wmma::matrix_a, 16, 16, kFK, wmma::precision::tf32, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, kFK, wmma::precision::tf32, wmma::row_major> fb;
      FragAcc cacc;
      for (int f = warp; f < col_frags; f += kFThreads / 32) {
        const int kf = f / (kFBN / 16), cf = f % (kFBN / 16);
        wmma::fill_fragment(cacc, 0.f);
#pragma unroll
        for (int rr = 0; rr < kFBM / kFK; ++rr) {
          wmma::load_matrix_sync(fa, bk.xi_s + (kf * 16) * kFRowLd + rr * kFK, kFRowLd);
          wmma::load_matrix_sync(fb, bk.d_col + (rr * kFK) * kFColLd + cf * 16, kFColLd);
          mma_3xtf32(cacc, fa, fb);
        }
        wmma::store_matrix_sync(bk.colbuf + (kf * 16) * kFOutLd + cf * 16, cacc, kFOutLd, wmma::mem_row_major);
      }
    }
    __syncthreads();  // colbuf complete; the column buffer, d_row and d_col have been read
    if (stages == 1 && tile + 1 < tiles)
      f32_stage_columns<float>(smem, L, 0, bk.xj_s, bk.xj_t, cs, ct, cs16, ct16, plane, c0 + kFBN, vec_ok);
    add_column_gradient<kFBN, kFThreads, kFOutLd>(bk.colbuf, bk.daj, c0, cs, plane, bk.coef);
    // the next step's first barrier orders these reads of colbuf, d_row, d_col and L.out before reuse
  }
  // Rows side into dA_i, through L.out (4 warps x 256 floats fit in its 2 x 2 x 32 x 20)
  __syncthreads();
  add_row_gradient<kFBM, kFThreads / 32>(reinterpret_cast<float*>(smem + L.out), racc, row_frags, bk.dai, v.r0, cs,
                                         plane, bk.coef);
#endif
}

// The plan of the tensor-core kernels: dynamic shared memory (0 where they do not apply) and, for
// fp32, the column-tile stages (2, or 1 where two do not fit). Not taken: channel counts past
// kTcMaxCs / kTcMaxCt (16-bit) or kFMaxCs / kFMaxCt (fp32), devices before sm_80, or more shared
// memory than the device's opt-in per block; then the 32 x 32 kernels above run.
struct TcPlan {
  int64_t bytes = 0;
  int stages = 2;
};

TcPlan tc_plan(int64_t cs, int64_t ct, DType dtype, int device, bool backward) {
  TcPlan plan;
  const bool fp32 = dtype == DType::Float32;
  if (fp32 ? (cs > kFMaxCs || ct > kFMaxCt) : (cs > kTcMaxCs || ct > kTcMaxCt)) return plan;
  int major = 0, optin = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  if (major < 8) return plan;
  if (!fp32) {
    const int64_t bytes = TcLayout(round16(cs), round16(ct), 2, backward).total;
    if (bytes <= optin) plan.bytes = bytes;
    return plan;
  }
  for (int stages = 2; stages >= 1; --stages) {
    const int64_t bytes = F32Layout(round16(cs), round16(ct), backward, stages).total;
    if (bytes <= optin) {
      plan.bytes = bytes;
      plan.stages = stages;
      return plan;
    }
  }
  return plan;
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
  const TcPlan tc = tc_plan(cs, ct, dtype, device, false);
  dispatch_float_types(dtype, "cross_image_forward", [&](auto tag) {
    using T = decltype(tag);
    if (tc.bytes > 0) {
      const int dyn = static_cast<int>(tc.bytes);
      if constexpr (std::is_same<T, float>::value) {
        const int64_t tiles = (plane + kFBM - 1) / kFBM;
        check_grid_dim(batch * batch * tiles, "cross_image_kd", "image pairs x row tiles");
        check_cuda(cudaFuncSetAttribute(cross_image_forward_f32_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        dyn), "cudaFuncSetAttribute");
        SEGKD_LAUNCH(static_cast<unsigned>(batch * batch * tiles), kFThreads, dyn, as_stream(stream),
                     cross_image_forward_f32_kernel)(
            reinterpret_cast<const float*>(xs), reinterpret_cast<const float*>(xt),
            reinterpret_cast<const float*>(inv_s), reinterpret_cast<const float*>(inv_t),
            reinterpret_cast<float*>(row_kl), reinterpret_cast<float*>(lse), batch, cs, ct, plane, tiles,
            static_cast<float>(1.0 / tau), tc.stages);
      } else {
        const int64_t tiles = (plane + kBM - 1) / kBM;
        check_grid_dim(batch * batch * tiles, "cross_image_kd", "image pairs x row tiles");
        check_cuda(cudaFuncSetAttribute(cross_image_forward_tc_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        dyn), "cudaFuncSetAttribute");
        SEGKD_LAUNCH(static_cast<unsigned>(batch * batch * tiles), kThreads, dyn, as_stream(stream),
                     cross_image_forward_tc_kernel<T>)(
            reinterpret_cast<const T*>(xs), reinterpret_cast<const T*>(xt), reinterpret_cast<const float*>(inv_s),
            reinterpret_cast<const float*>(inv_t), reinterpret_cast<float*>(row_kl), reinterpret_cast<float*>(lse),
            batch, cs, ct, plane, tiles, static_cast<float>(1.0 / tau));
      }
      return;
    }
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
    const TcPlan tc = tc_plan(cs, ct, dtype, device, true);
    if (tc.bytes > 0) {
      const int dyn = static_cast<int>(tc.bytes);
      if constexpr (std::is_same<T, float>::value) {
        const int64_t tiles = (plane + kFBM - 1) / kFBM;
        check_grid_dim(batch * batch * tiles, "cross_image_kd", "image pairs x row tiles");
        check_cuda(cudaFuncSetAttribute(cross_image_backward_f32_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        dyn), "cudaFuncSetAttribute");
        SEGKD_LAUNCH(static_cast<unsigned>(batch * batch * tiles), kFThreads, dyn, as_stream(stream),
                     cross_image_backward_f32_kernel)(s, t, is, it, l, g, d, batch, cs, ct, plane, tiles, inv_tau, sc,
                                                      tc.stages);
      } else {
        const int64_t tiles = (plane + kBM - 1) / kBM;
        check_grid_dim(batch * batch * tiles, "cross_image_kd", "image pairs x row tiles");
        check_cuda(cudaFuncSetAttribute(cross_image_backward_tc_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        dyn), "cudaFuncSetAttribute");
        SEGKD_LAUNCH(static_cast<unsigned>(batch * batch * tiles), kThreads, dyn, as_stream(stream),
                     cross_image_backward_tc_kernel<T>)(s, t, is, it, l, g, d, batch, cs, ct, plane, tiles, inv_tau, sc);
      }
      return;
    }
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
