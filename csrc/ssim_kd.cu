// SSIM feature distillation (docs/losses.md 5): kornia's ssim_loss with reflect / zeros / valid padding.
//
// Forward: grid over (n*c map x column tile, row tile). A block loads its input tile plus the halo
// of window // 2 pixels into shared memory (min-max rescaled on the fly, padding resolved at load),
// filters the five statistics (x, y, x^2, y^2, xy) along W into shared memory, then along H, and
// evaluates the SSIM map. The loss mean is reduced in-kernel to one fp32 partial per block (the
// caller adds the partials in fp64). With a gradient requested, the block also writes three
// per-pixel maps: l'(p) * d map / d {mu_x, E[x^2], E[xy]}, l' the derivative of clamp((1-m)/2, 0, 1)
// (inclusive bounds, as torch.clamp) divided by the number of map pixels.
// Backward: the Gaussian filter with padding is a linear map G; its adjoint applied to the three
// maps gives dx = G^T D1 + 2 x G^T D2 + y G^T D3. G is separable with per-axis padding, so G^T is
// two 1-d passes: along H (folding reflected positions back onto their source), then along W,
// fused with the final combination and the min-max scale.
// The taps are passed by value as a kernel parameter (the constant bank): each launch carries its
// own window, so concurrent launches on different streams cannot see each other's taps.
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kMaxWindow = 15;
constexpr int kMaxRadius = kMaxWindow / 2;
constexpr int kTileW = 32, kTileH = 8;  // one output pixel per thread: 256 threads
constexpr int kInW = kTileW + 2 * kMaxRadius, kInH = kTileH + 2 * kMaxRadius;

enum Padding : int { kReflect = 0, kZeros = 1, kValid = 2 };

struct Taps {
  float w[kMaxWindow];
  int size;
};

struct SsimConsts {
  float c1, c2, grad_coef;  // grad_coef = -1 / (2 * number of map pixels)
};

// Input index for padded position i of an axis of length n, or -1 where the value is zero padding.
__device__ __forceinline__ int64_t source_index(int64_t i, int64_t n, int mode) {
  if (mode == kReflect) {
    if (i < 0) i = -i;
    if (i >= n) i = 2 * (n - 1) - i;
    // Positions only needed by out-of-range outputs of the last tile: clamp, never used.
    return i < 0 ? 0 : (i >= n ? n - 1 : i);
  }
  return (i >= 0 && i < n) ? i : -1;
}

template <typename T>
__global__ void __launch_bounds__(kTileW * kTileH)
ssim_forward_kernel(const T* __restrict__ s, const T* __restrict__ t, const float* __restrict__ lo_s,
                    const float* __restrict__ scale_s, const float* __restrict__ lo_t,
                    const float* __restrict__ scale_t, float* __restrict__ partials, float* __restrict__ dmaps,
                    int64_t h, int64_t w, int64_t h_out, int64_t w_out, int64_t tiles_x, int mode, const Taps taps,
                    const SsimConsts k) {
  __shared__ float in_x[kInH][kInW], in_y[kInH][kInW];
  __shared__ float hs[5][kInH][kTileW];
  __shared__ float scratch[32];

  const int64_t map = blockIdx.x / tiles_x;
  const int64_t ox0 = (blockIdx.x - map * tiles_x) * kTileW, oy0 = static_cast<int64_t>(blockIdx.y) * kTileH;
  const int r = taps.size / 2, off = mode == kValid ? 0 : r;
  const int in_h = kTileH + 2 * r, in_w = kTileW + 2 * r;
  const T* ms = s + map * h * w;
  const T* mt = t + map * h * w;
  const float ls = lo_s == nullptr ? 0.f : lo_s[map], ks = scale_s == nullptr ? 1.f : scale_s[map];
  const float lt = lo_t == nullptr ? 0.f : lo_t[map], kt = scale_t == nullptr ? 1.f : scale_t[map];
  const int tid = threadIdx.x;

  for (int idx = tid; idx < in_h * in_w; idx += blockDim.x) {
    const int ly = idx / in_w, lx = idx - ly * in_w;
    const int64_t gy = source_index(oy0 - off + ly, h, mode), gx = source_index(ox0 - off + lx, w, mode);
    float vx = 0.f, vy = 0.f;
    if (gy >= 0 && gx >= 0) {
      vx = (to_float(ms[gy * w + gx]) - ls) * ks;
      vy = (to_float(mt[gy * w + gx]) - lt) * kt;
    }
    in_x[ly][lx] = vx;
    in_y[ly][lx] = vy;
  }
  __syncthreads();
  for (int idx = tid; idx < in_h * kTileW; idx += blockDim.x) {
    const int ly = idx / kTileW, lx = idx - ly * kTileW;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f;
    for (int j = 0; j < taps.size; ++j) {
      const float wt = taps.w[j], vx = in_x[ly][lx + j], vy = in_y[ly][lx + j];
      a0 = fmaf(wt, vx, a0);
      a1 = fmaf(wt, vy, a1);
      a2 = fmaf(wt, vx * vx, a2);
      a3 = fmaf(wt, vy * vy, a3);
      a4 = fmaf(wt, vx * vy, a4);
    }
    hs[0][ly][lx] = a0; hs[1][ly][lx] = a1; hs[2][ly][lx] = a2; hs[3][ly][lx] = a3; hs[4][ly][lx] = a4;
  }
  __syncthreads();

  const int ty = tid / kTileW, tx = tid - ty * kTileW;
  const int64_t oy = oy0 + ty, ox = ox0 + tx;
  float term = 0.f;
  if (oy < h_out && ox < w_out) {
    float mu_x = 0.f, mu_y = 0.f, e_xx = 0.f, e_yy = 0.f, e_xy = 0.f;
    for (int j = 0; j < taps.size; ++j) {
      const float wt = taps.w[j];
      mu_x = fmaf(wt, hs[0][ty + j][tx], mu_x);
      mu_y = fmaf(wt, hs[1][ty + j][tx], mu_y);
      e_xx = fmaf(wt, hs[2][ty + j][tx], e_xx);
      e_yy = fmaf(wt, hs[3][ty + j][tx], e_yy);
      e_xy = fmaf(wt, hs[4][ty + j][tx], e_xy);
    }
    const float var_x = e_xx - mu_x * mu_x, var_y = e_yy - mu_y * mu_y, cov = e_xy - mu_x * mu_y;
    const float a1 = 2.f * mu_x * mu_y + k.c1, a2 = 2.f * cov + k.c2;
    const float b1 = mu_x * mu_x + mu_y * mu_y + k.c1, b2 = var_x + var_y + k.c2;
    const float num = a1 * a2, den = b1 * b2 + 1e-12f;
    const float m = num / den;
    const float u = (1.f - m) * 0.5f;
    term = clamp_nan(u, 0.f, 1.f);  // a NaN term stays NaN, as in torch.clamp
    if (dmaps != nullptr) {
      // torch.clamp passes the gradient where min <= u <= max (inclusive).
      const float lp = (u >= 0.f && u <= 1.f) ? k.grad_coef : 0.f;
      const float inv_den = 1.f / den, q = num * inv_den * inv_den;
      const float d_mu = 2.f * mu_y * (a2 - a1) * inv_den - q * 2.f * mu_x * (b2 - b1);
      const float d_exx = -q * b1;
      const float d_exy = 2.f * a1 * inv_den;
      const int64_t plane = h_out * w_out, at = map * plane + oy * w_out + ox;
      const int64_t maps = static_cast<int64_t>(gridDim.x / tiles_x);
      dmaps[at] = lp * d_mu;
      dmaps[maps * plane + at] = lp * d_exx;
      dmaps[2 * maps * plane + at] = lp * d_exy;
    }
  }
  term = block_sum(term, scratch);
  if (tid == 0) partials[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = term;
}

// sum over padded positions j that read input q, and taps k, of w[k] * D[j + off - k].
__device__ __forceinline__ float adjoint_1d(const float* __restrict__ d, int64_t stride, int64_t q, int64_t n,
                                            int64_t n_out, int mode, int off, const Taps& taps) {
  int64_t images[3];
  int count = 0;
  images[count++] = q;
  if (mode == kReflect) {
    if (q > 0) images[count++] = -q;
    if (q < n - 1) images[count++] = 2 * (n - 1) - q;
  }
  float acc = 0.f;
  for (int i = 0; i < count; ++i) {
    for (int k = 0; k < taps.size; ++k) {
      const int64_t p = images[i] + off - k;
      if (p >= 0 && p < n_out) acc = fmaf(taps.w[k], d[p * stride], acc);
    }
  }
  return acc;
}

// E[c, map, q_y, x] = adjoint along H of D[c, map, :, x]; three maps c.
__global__ void ssim_adjoint_h_kernel(const float* __restrict__ dmaps, float* __restrict__ emaps, int64_t maps,
                                      int64_t h, int64_t h_out, int64_t w_out, int mode, const Taps taps) {
  const int off = mode == kValid ? 0 : taps.size / 2;
  const int64_t per_map = h * w_out, total = 3 * maps * per_map;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t cm = g / per_map, rem = g - cm * per_map;  // cm = c * maps + map
    const int64_t qy = rem / w_out, x = rem - qy * w_out;
    const float* d = dmaps + cm * h_out * w_out + x;
    emaps[g] = adjoint_1d(d, w_out, qy, h, h_out, mode, off, taps);
  }
}

// ds[map, y, q_x] = scale * g * (A1 + 2 x A2 + y A3), A = adjoint along W of E[c, map, y, :].
template <typename T>
__global__ void ssim_adjoint_w_kernel(const float* __restrict__ emaps, const T* __restrict__ s,
                                      const T* __restrict__ t, const float* __restrict__ lo_s,
                                      const float* __restrict__ scale_s, const float* __restrict__ lo_t,
                                      const float* __restrict__ scale_t, const float* __restrict__ grad_loss,
                                      T* __restrict__ ds, int64_t maps, int64_t h, int64_t w, int64_t w_out, int mode,
                                      const Taps taps) {
  const int off = mode == kValid ? 0 : taps.size / 2;
  const float g = grad_loss[0];
  const int64_t total = maps * h * w, channel = maps * h * w_out;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / w, qx = i - row * w;  // row = map * h + y
    const int64_t map = row / h;
    const float* e = emaps + row * w_out;
    const float a1 = adjoint_1d(e, 1, qx, w, w_out, mode, off, taps);
    const float a2 = adjoint_1d(e + channel, 1, qx, w, w_out, mode, off, taps);
    const float a3 = adjoint_1d(e + 2 * channel, 1, qx, w, w_out, mode, off, taps);
    const float ks = scale_s == nullptr ? 1.f : scale_s[map];
    const float x = (to_float(s[i]) - (lo_s == nullptr ? 0.f : lo_s[map])) * ks;
    const float y = (to_float(t[i]) - (lo_t == nullptr ? 0.f : lo_t[map])) * (scale_t == nullptr ? 1.f : scale_t[map]);
    ds[i] = from_float<T>(g * ks * (a1 + 2.f * x * a2 + y * a3));
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
}

}  // namespace

int64_t ssim_num_partials(int64_t maps, int64_t h, int64_t w, int64_t window, int64_t padding) {
  int64_t h_out = h, w_out = w;
  if (padding == kValid) { h_out = h - 2 * (window / 2); w_out = w - 2 * (window / 2); }
  if (maps <= 0 || h_out <= 0 || w_out <= 0) return 0;
  return maps * ((w_out + kTileW - 1) / kTileW) * ((h_out + kTileH - 1) / kTileH);
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
  const int64_t tiles_x = (w_out + kTileW - 1) / kTileW, tiles_y = (h_out + kTileH - 1) / kTileH;
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
    SEGKD_LAUNCH(grid, kTileW * kTileH, 0, as_stream(stream), ssim_forward_kernel<T>)(
        reinterpret_cast<const T*>(student), reinterpret_cast<const T*>(teacher), reinterpret_cast<const float*>(lo_s),
        reinterpret_cast<const float*>(scale_s), reinterpret_cast<const float*>(lo_t),
        reinterpret_cast<const float*>(scale_t), reinterpret_cast<float*>(partials), reinterpret_cast<float*>(dmaps),
        h, w, h_out, w_out, tiles_x, static_cast<int>(padding), taps, k);
  });
  check_launch("ssim_forward");
}

void ssim_backward(std::uintptr_t dmaps, std::uintptr_t emaps, std::uintptr_t student, std::uintptr_t teacher,
                   std::uintptr_t lo_s, std::uintptr_t scale_s, std::uintptr_t lo_t, std::uintptr_t scale_t,
                   std::uintptr_t grad_loss, std::uintptr_t ds, int64_t maps, int64_t h, int64_t w, int64_t window,
                   double sigma, int64_t padding, DType dtype, int device, std::uintptr_t stream) {
  if (maps == 0) return;
  const Taps taps = make_taps(static_cast<int>(window), sigma);
  int64_t h_out = 0, w_out = 0;
  check_geometry(h, w, static_cast<int>(window), static_cast<int>(padding), h_out, w_out);
  DeviceGuard guard(device);
  constexpr int threads = 256;
  SEGKD_LAUNCH(grid_for(3 * maps * h * w_out, threads), threads, 0, as_stream(stream), ssim_adjoint_h_kernel)(
      reinterpret_cast<const float*>(dmaps), reinterpret_cast<float*>(emaps), maps, h, h_out, w_out,
      static_cast<int>(padding), taps);
  check_launch("ssim_backward (H pass)");
  dispatch_float_types(dtype, "ssim_backward", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(grid_for(maps * h * w, threads), threads, 0, as_stream(stream), ssim_adjoint_w_kernel<T>)(
        reinterpret_cast<const float*>(emaps), reinterpret_cast<const T*>(student), reinterpret_cast<const T*>(teacher),
        reinterpret_cast<const float*>(lo_s), reinterpret_cast<const float*>(scale_s),
        reinterpret_cast<const float*>(lo_t), reinterpret_cast<const float*>(scale_t),
        reinterpret_cast<const float*>(grad_loss), reinterpret_cast<T*>(ds), maps, h, w, w_out,
        static_cast<int>(padding), taps);
  });
  check_launch("ssim_backward (W pass)");
}

}  // namespace segkd
