// Cross-image pixel-to-pixel distillation (LOSSES.md 4), flash-style: the N^2 P x P similarity
// matrices are never stored.
//
// Inputs are the per-pixel normalised features a (N, C_s, P) and b (N, C_t, P) in fp32 (see
// normalize_pixels in pairwise_kd.cu). A block owns 32 rows of one ordered pair (i, j); warp w owns
// rows 4w..4w+3 and lane l column l of every 32 x 32 tile, so row reductions are warp shuffles.
// Forward: per row, running max / sum-exp of S = a_i^T a_j / tau and of T likewise, and the
// rescaled accumulator sum exp(T - m_T) (T - S); KL_row = acc / l_T - lse_T + lse_S. The two
// log-sum-exps are saved. Backward recomputes every tile: dS = (softmax(S) - softmax(T)) * coef,
// then da_i[:, r] += sum_c dS[r, c] a_j[:, c] and da_j[:, c] += sum_r dS[r, c] a_i[:, r] (fp32 atomics,
// both for the rows and the columns; da is zero-filled by the caller).
// Similarity tiles use fp32 FMA from fp32 shared-memory staging for every input dtype.
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kTile = 32;
constexpr int kThreads = 256;  // 8 warps x 4 rows
constexpr int kRowsPerWarp = kTile / (kThreads / 32);

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// acc[q] += sum_k x_i[k, r0 + 4w + q] * x_j[k, c0 + lane], staged 32 channels at a time.
__device__ __forceinline__ void tile_dots(const float* __restrict__ xi, const float* __restrict__ xj, int64_t channels,
                                          int64_t plane, int64_t r0, int64_t c0, float (*rows)[kTile + 1],
                                          float (*cols)[kTile + 1], float (&acc)[kRowsPerWarp]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) acc[q] = 0.f;
  for (int64_t k0 = 0; k0 < channels; k0 += kTile) {
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += blockDim.x) {
      const int kk = idx / kTile, pp = idx - kk * kTile;
      const int64_t k = k0 + kk;
      rows[kk][pp] = (k < channels && r0 + pp < plane) ? xi[k * plane + r0 + pp] : 0.f;
      cols[kk][pp] = (k < channels && c0 + pp < plane) ? xj[k * plane + c0 + pp] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const float xc = cols[kk][lane];
#pragma unroll
      for (int q = 0; q < kRowsPerWarp; ++q) acc[q] = fmaf(rows[kk][warp * kRowsPerWarp + q], xc, acc[q]);
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads)
cross_image_forward_kernel(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ row_kl,
                           float* __restrict__ lse, int64_t batch, int64_t cs, int64_t ct, int64_t plane,
                           int64_t row_tiles, float inv_tau) {
  __shared__ float rows[kTile][kTile + 1], cols[kTile][kTile + 1];
  const int64_t pair = blockIdx.x / row_tiles, rt = blockIdx.x - pair * row_tiles;
  const int64_t i = pair / batch, j = pair - i * batch;
  const int64_t r0 = rt * kTile;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float* ai = a + i * cs * plane;
  const float* aj = a + j * cs * plane;
  const float* bi = b + i * ct * plane;
  const float* bj = b + j * ct * plane;

  float ms[kRowsPerWarp], ls[kRowsPerWarp], mt[kRowsPerWarp], lt[kRowsPerWarp], acc[kRowsPerWarp];
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) { ms[q] = mt[q] = -INFINITY; ls[q] = lt[q] = acc[q] = 0.f; }

  for (int64_t c0 = 0; c0 < plane; c0 += kTile) {
    float sd[kRowsPerWarp], td[kRowsPerWarp];
    tile_dots(ai, aj, cs, plane, r0, c0, rows, cols, sd);
    tile_dots(bi, bj, ct, plane, r0, c0, rows, cols, td);
    const bool valid = c0 + lane < plane;
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const float sv = valid ? sd[q] * inv_tau : -INFINITY;
      const float tv = valid ? td[q] * inv_tau : -INFINITY;
      const float nms = fmaxf(ms[q], warp_max(sv));
      ls[q] = ls[q] * rescale(ms[q], nms) + warp_sum(valid ? expf(sv - nms) : 0.f);
      ms[q] = nms;
      const float nmt = fmaxf(mt[q], warp_max(tv));
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
      const int64_t r = r0 + warp * kRowsPerWarp + q;
      if (r < plane) {
        const float lse_s = ms[q] + logf(ls[q]), lse_t = mt[q] + logf(lt[q]);
        const int64_t at = pair * plane + r;
        row_kl[at] = acc[q] / lt[q] - lse_t + lse_s;
        lse[at] = lse_s;
        lse[rows_total + at] = lse_t;
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
cross_image_backward_kernel(const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ lse,
                            const float* __restrict__ grad_loss, float* __restrict__ da, int64_t batch, int64_t cs,
                            int64_t ct, int64_t plane, int64_t row_tiles, float inv_tau, float scale) {
  __shared__ float rows[kTile][kTile + 1], cols[kTile][kTile + 1], dsh[kTile][kTile + 1];
  const int64_t pair = blockIdx.x / row_tiles, rt = blockIdx.x - pair * row_tiles;
  const int64_t i = pair / batch, j = pair - i * batch;
  const int64_t r0 = rt * kTile;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float* ai = a + i * cs * plane;
  const float* aj = a + j * cs * plane;
  const float* bi = b + i * ct * plane;
  const float* bj = b + j * ct * plane;
  float* dai = da + i * cs * plane;
  float* daj = da + j * cs * plane;
  // d loss / d S_ij[r, c] = (p_S - p_T) * g / (N^2 P); S = a_i^T a_j / tau adds 1 / tau.
  const float coef = grad_loss[0] * scale * inv_tau;
  const int64_t rows_total = batch * batch * plane;
  float lse_s[kRowsPerWarp], lse_t[kRowsPerWarp];
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    const int64_t r = r0 + warp * kRowsPerWarp + q;
    lse_s[q] = r < plane ? lse[pair * plane + r] : 0.f;
    lse_t[q] = r < plane ? lse[rows_total + pair * plane + r] : 0.f;
  }
  const bool row_valid = r0 + lane < plane;

  for (int64_t c0 = 0; c0 < plane; c0 += kTile) {
    float sd[kRowsPerWarp], td[kRowsPerWarp];
    tile_dots(ai, aj, cs, plane, r0, c0, rows, cols, sd);
    tile_dots(bi, bj, ct, plane, r0, c0, rows, cols, td);
    const bool valid = c0 + lane < plane;
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const int64_t r = r0 + warp * kRowsPerWarp + q;
      float d = 0.f;
      if (valid && r < plane)
        d = coef * (expf(sd[q] * inv_tau - lse_s[q]) - expf(td[q] * inv_tau - lse_t[q]));
      dsh[warp * kRowsPerWarp + q][lane] = d;
    }
    __syncthreads();
    const bool col_valid = c0 + lane < plane;
    const int64_t c_count = plane - c0 < kTile ? plane - c0 : kTile;
    const int64_t r_count = plane - r0 < kTile ? plane - r0 : kTile;
    for (int64_t k = warp; k < cs; k += kThreads / 32) {
      // rows: lane = row r0 + lane; the a_j values are the same for every lane (broadcast loads)
      float vr = 0.f;
      for (int c = 0; c < c_count; ++c) vr = fmaf(dsh[lane][c], __ldg(aj + k * plane + c0 + c), vr);
      if (row_valid) atomicAdd(dai + k * plane + r0 + lane, vr);
      // columns: lane = column c0 + lane
      float vc = 0.f;
      for (int r = 0; r < r_count; ++r) vc = fmaf(dsh[r][lane], __ldg(ai + k * plane + r0 + r), vc);
      if (col_valid) atomicAdd(daj + k * plane + c0 + lane, vc);
    }
    __syncthreads();
  }
}

void check_sizes(int64_t batch, int64_t plane, int64_t& row_tiles) {
  row_tiles = (plane + kTile - 1) / kTile;
  check_grid_dim(batch * batch * row_tiles, "cross_image_kd", "image pairs x row tiles");
}

}  // namespace

void cross_image_forward(std::uintptr_t a, std::uintptr_t b, std::uintptr_t row_kl, std::uintptr_t lse, int64_t batch,
                         int64_t cs, int64_t ct, int64_t plane, double tau, int device, std::uintptr_t stream) {
  if (batch == 0 || plane == 0) return;
  if (!(tau > 0)) throw std::invalid_argument("cross_image_kd: tau must be positive");
  int64_t row_tiles = 0;
  check_sizes(batch, plane, row_tiles);
  DeviceGuard guard(device);
  cross_image_forward_kernel<<<static_cast<unsigned>(batch * batch * row_tiles), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(b), reinterpret_cast<float*>(row_kl),
      reinterpret_cast<float*>(lse), batch, cs, ct, plane, row_tiles, static_cast<float>(1.0 / tau));
  check_launch("cross_image_forward");
}

void cross_image_backward(std::uintptr_t a, std::uintptr_t b, std::uintptr_t lse, std::uintptr_t grad_loss,
                          std::uintptr_t da, int64_t batch, int64_t cs, int64_t ct, int64_t plane, double tau,
                          int device, std::uintptr_t stream) {
  if (batch == 0 || plane == 0) return;
  if (!(tau > 0)) throw std::invalid_argument("cross_image_kd: tau must be positive");
  int64_t row_tiles = 0;
  check_sizes(batch, plane, row_tiles);
  DeviceGuard guard(device);
  const double scale = 1.0 / (static_cast<double>(batch) * batch * plane);
  cross_image_backward_kernel<<<static_cast<unsigned>(batch * batch * row_tiles), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(b), reinterpret_cast<const float*>(lse),
      reinterpret_cast<const float*>(grad_loss), reinterpret_cast<float*>(da), batch, cs, ct, plane, row_tiles,
      static_cast<float>(1.0 / tau), static_cast<float>(scale));
  check_launch("cross_image_backward");
}

}  // namespace segkd
