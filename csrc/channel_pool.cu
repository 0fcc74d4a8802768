// CBAM spatial-gate input and the AttnFD loss (docs/losses.md 6).
//
// channel_pool: for every pixel of x * gate[n, c] (never materialised), the max and the mean over
// the C channels, and the channel of the first maximum (for the backward). A lane per pixel and the
// channels split over the block's warps (channels P apart in memory, so the lanes of a warp read
// contiguous addresses), combined once in shared memory.
// channel_pool backward: one block per (n, c) row, or per range of it when the rows alone fill less
// than two waves (plan_row_split): dx = gate * (g_mean / C + [c == argmax] g_max) and dgate[n, c] =
// sum over the row of x * (g_mean / C + [c == argmax] g_max), reduced in-block (per-range partials
// then added in range order by combine_splits_kernel); 4 positions per access where the rows are
// aligned (as the cbam_gate row kernel).
// attnfd dots: <s,s>, <t,t>, <s,t> as fp64 per-block partials (the caller sums them in fp64);
// (the attnfd backward and the loss epilogue are in csrc/attnfd_loss.cu)
// cbam_gate: the gated product M_s * (M_c * x) and its backward (dx, dM_c and dM_s in one pass over g and x).
#include "common.cuh"

namespace segkd {
namespace {

constexpr int kThreads = 256;

// Channel reductions per pixel (channel_pool forward, cbam_gate dM_s): a block is kSplitWarps warps
// over the same 32 pixels (one per lane, so every warp load is 32 consecutive positions of one
// channel); warp w takes channels w, w + kSplitWarps, ... and the per-warp results are combined
// through shared memory once (one barrier). Grid: x = 32-pixel tiles of an image, y = images (looping
// past the grid's y limit), so no thread divides a flat pixel index.
constexpr int kSplitWarps = 16;
constexpr int kSplitThreads = kSplitWarps * 32;

template <typename T>
__global__ void __launch_bounds__(kSplitThreads)
channel_pool_forward_kernel(const T* __restrict__ x, const float* __restrict__ gate, T* __restrict__ out,
                            int32_t* __restrict__ argmax, int64_t batch, int channels, int64_t plane) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t p = blockIdx.x * 32LL + lane;
  const float inv_c = 1.f / static_cast<float>(channels);
  __shared__ float sh_sum[kSplitWarps][32], sh_best[kSplitWarps][32];
  __shared__ int sh_c[kSplitWarps][32];
  for (int64_t n = blockIdx.y; n < batch; n += gridDim.y) {
    float sum = 0.f, best = -INFINITY;
    int best_c = channels;  // loses every tie
    if (p < plane) {
      const T* px = x + n * channels * plane + p;
      const float* pg = gate == nullptr ? nullptr : gate + n * channels;
#pragma unroll 2  // 4 spills on sm_80 (ptxas keeps this kernel at 32 registers there)
      for (int c = warp; c < channels; c += kSplitWarps) {
        float v = to_float(px[c * plane]);
        if (pg != nullptr) v *= pg[c];
        sum += v;
        if (max_index_better(v, c, best, best_c)) { best = v; best_c = c; }
      }
    }
    if (n != blockIdx.y) __syncthreads();  // the previous image's combine has read the arrays
    sh_sum[warp][lane] = sum; sh_best[warp][lane] = best; sh_c[warp][lane] = best_c;
    __syncthreads();
    if (warp == 0 && p < plane) {
#pragma unroll
      for (int w = 1; w < kSplitWarps; ++w) {
        sum += sh_sum[w][lane];
        if (max_index_better(sh_best[w][lane], sh_c[w][lane], best, best_c)) {
          best = sh_best[w][lane];
          best_c = sh_c[w][lane];
        }
      }
      out[n * 2 * plane + p] = from_float<T>(best);
      out[n * 2 * plane + plane + p] = from_float<T>(sum * inv_c);
      argmax[n * plane + p] = static_cast<int32_t>(best_c);
    }
  }
}

inline dim3 split_grid(int64_t batch, int64_t plane) {
  return dim3(static_cast<unsigned>((plane + 31) / 32), static_cast<unsigned>(std::min<int64_t>(batch, 65535)));
}

// 8 blocks per SM: without the bound the fp32 instance takes 40 registers on sm_80 (6 blocks).
template <typename T>
__global__ void __launch_bounds__(kThreads, 8)
channel_pool_backward_kernel(const T* __restrict__ grad_out, const int32_t* __restrict__ argmax,
                             const T* __restrict__ x, const float* __restrict__ gate, T* __restrict__ dx,
                             float* __restrict__ dgate, int64_t channels, int64_t plane, int64_t chunk, bool vec) {
  const int64_t row = blockIdx.x;  // (n, c); blockIdx.y: the split of the row (plan_row_split)
  const int64_t n = row / channels, c = row - n * channels;
  const int64_t begin = blockIdx.y * chunk, end = begin + chunk < plane ? begin + chunk : plane;
  const T* g_max = grad_out + n * 2 * plane;
  const T* g_mean = g_max + plane;
  const int32_t* am = argmax + n * plane;
  const float inv_c = 1.f / static_cast<float>(channels);
  const float gv = gate == nullptr ? 1.f : gate[row];
  float dg = 0.f;
  if (vec) {  // plane % 4 == 0, chunk % 4 == 0 and aligned rows: 4 positions per access
    for (int64_t p = begin + threadIdx.x * 4LL; p < end; p += blockDim.x * 4LL) {
      float ga[4], gm[4], xv[4] = {0.f, 0.f, 0.f, 0.f}, out[4];
      load4(g_mean + p, ga);
      load4(g_max + p, gm);
      const int4 a = *reinterpret_cast<const int4*>(am + p);
      const int ai[4] = {a.x, a.y, a.z, a.w};
      if (dgate != nullptr) load4(x + row * plane + p, xv);
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        float d = ga[v] * inv_c;
        if (ai[v] == c) d += gm[v];
        out[v] = gv * d;
        dg += xv[v] * d;
      }
      store4(dx + row * plane + p, out);
    }
  } else {
    for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
      float d = to_float(g_mean[p]) * inv_c;
      if (am[p] == c) d += to_float(g_max[p]);
      dx[row * plane + p] = from_float<T>(gv * d);
      if (dgate != nullptr) dg += to_float(x[row * plane + p]) * d;
    }
  }
  if (dgate == nullptr) return;
  __shared__ float scratch[32];
  dg = block_sum(dg, scratch);
  // one split: the row's value; several: dgate is the (rows x splits) partials of combine_splits_kernel
  if (threadIdx.x == 0) dgate[row * gridDim.y + blockIdx.y] = dg;
}

// out[row] = sum of the row's `splits` partials, in split order (the same bits run to run).
__global__ void __launch_bounds__(kThreads)
combine_splits_kernel(const float* __restrict__ partials, float* __restrict__ out, int64_t rows, int64_t splits) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < rows; row += step) {
    const float* p = partials + row * splits;
    float acc = p[0];
#pragma unroll 1
    for (int64_t k = 1; k < splits; ++k) acc += p[k];
    out[row] = acc;
  }
}

// Rows of the channel_pool / cbam_gate backward: 256-thread blocks (8 per SM), each split at least
// 4 positions per thread.
RowSplit plan_channel_rows(int64_t rows, int64_t plane, int device) {
  return plan_row_split(rows, plane, kThreads * 4LL, 4, 2048 / kThreads, device);
}

__device__ __forceinline__ double warp_sum_double(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Accumulated in fp64 (a product of two fp32 values is exact there): near s == t the loss is
// 2 - 2 cos, and fp32 dot products alone would leave it dominated by rounding.
// 128-bit loads (V values per thread and step) when both inputs are 16-byte aligned and total % V
// == 0, element by element otherwise.
template <typename T>
__global__ void __launch_bounds__(kThreads)
attnfd_dots_kernel(const T* __restrict__ s, const T* __restrict__ t, double* __restrict__ partials, int64_t total,
                   bool vec) {
  constexpr int V = Vec16<T>::kSize;
  double ss = 0.0, tt = 0.0, st = 0.0;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (vec) {
    for (int64_t i = first * V; i < total; i += step * V) {
      float a[V], b[V];
      load16(s + i, a);
      load16(t + i, b);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        ss = fma(static_cast<double>(a[v]), static_cast<double>(a[v]), ss);
        tt = fma(static_cast<double>(b[v]), static_cast<double>(b[v]), tt);
        st = fma(static_cast<double>(a[v]), static_cast<double>(b[v]), st);
      }
    }
  } else {
    for (int64_t i = first; i < total; i += step) {
      const double a = to_float(s[i]), b = to_float(t[i]);
      ss = fma(a, a, ss);
      tt = fma(b, b, tt);
      st = fma(a, b, st);
    }
  }
  __shared__ double scratch[3][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  ss = warp_sum_double(ss);
  tt = warp_sum_double(tt);
  st = warp_sum_double(st);
  if (lane == 0) { scratch[0][warp] = ss; scratch[1][warp] = tt; scratch[2][warp] = st; }
  __syncthreads();
  if (warp == 0) {
    ss = warp_sum_double(lane < n_warps ? scratch[0][lane] : 0.0);
    tt = warp_sum_double(lane < n_warps ? scratch[1][lane] : 0.0);
    st = warp_sum_double(lane < n_warps ? scratch[2][lane] : 0.0);
    if (lane == 0) {
      partials[blockIdx.x * 3 + 0] = ss;
      partials[blockIdx.x * 3 + 1] = tt;
      partials[blockIdx.x * 3 + 2] = st;
    }
  }
}

// CBAM gated product out = M_s[n, p] * (M_c[n, c] * x[n, c, p]) (fp32 math, one rounding).
// Grid: y = (n, c) rows (looping past the grid's y limit), x = positions, V per thread per step
// (128-bit loads and stores when the rows are 16-byte aligned), no per-element division.
template <typename T>
__global__ void __launch_bounds__(kThreads)
cbam_gate_forward_kernel(const T* __restrict__ x, const float* __restrict__ mc, const float* __restrict__ ms,
                         T* __restrict__ out, int64_t rows, int64_t channels, int64_t plane, bool vec) {
  constexpr int V = Vec16<T>::kSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const float gate_c = mc[row];
    const float* ms_n = ms + (row / channels) * plane;  // one division per row
    const T* xr = x + row * plane;
    T* outr = out + row * plane;
    for (int64_t base = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * V; base < plane;
         base += stride) {
      float v[V];
      if (vec) {
        load16(xr + base, v);
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = ms_n[base + i] * (gate_c * v[i]);
        store16(outr + base, v);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i)
          if (base + i < plane) outr[base + i] = from_float<T>(ms_n[base + i] * (gate_c * to_float(xr[base + i])));
      }
    }
  }
}

// The whole cbam_gate backward in one pass over g and x. A block is kGateWarps warps over the same
// kGateTile pixels of one image (4 consecutive pixels per lane: 128-bit fp32 / 64-bit bf16 accesses
// where the rows are aligned) and one slice of the channels; warp w takes the slice's channels w,
// w + kGateWarps, ... For each channel it writes dx = g * M_c * M_s, adds g * x * M_c to its
// per-pixel dM_s sums (registers, through the whole loop) and reduces g * x * M_s over its pixels
// inside the warp (shuffles, no barrier) into dM_c's partial for (row, pixel tile). After the loop
// the warps' dM_s sums are combined once in shared memory (one barrier). Partials of several
// pixel tiles (dM_c) or channel slices (dM_s) are added by combine_splits_kernel /
// combine_slices_kernel in tile / slice order (deterministic).
constexpr int kGateWarps = kThreads / 32;
constexpr int kGateTile = 32 * 4;

template <typename T>
__global__ void __launch_bounds__(kThreads)
cbam_gate_backward_kernel(const T* __restrict__ g, const T* __restrict__ x, const float* __restrict__ mc,
                          const float* __restrict__ ms, T* __restrict__ dx, float* __restrict__ dmc_part,
                          float* __restrict__ dms_part, int64_t batch, int channels, int64_t plane, int slice_channels,
                          bool vec) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tile = blockIdx.x, tiles = gridDim.x, n = blockIdx.y;
  const int slice = blockIdx.z;
  const int64_t p0 = tile * kGateTile + lane * 4LL;
  const int c_begin = slice * slice_channels;
  const int c_end = c_begin + slice_channels < channels ? c_begin + slice_channels : channels;
  float sv[4], acc[4] = {0.f, 0.f, 0.f, 0.f};
  const float* ms_n = ms + n * plane;
  if (vec) {  // plane % 4 == 0: a lane's 4 pixels are all inside or all outside the plane
    if (p0 < plane) {
      const float4 s4 = __ldg(reinterpret_cast<const float4*>(ms_n + p0));
      sv[0] = s4.x; sv[1] = s4.y; sv[2] = s4.z; sv[3] = s4.w;
    } else {
      sv[0] = sv[1] = sv[2] = sv[3] = 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) sv[i] = p0 + i < plane ? ms_n[p0 + i] : 0.f;
  }
#pragma unroll 2
  for (int c = c_begin + warp; c < c_end; c += kGateWarps) {
    const int64_t row = n * channels + c;
    const float gate_c = mc[row];
    const T* gr = g + row * plane;
    const T* xr = x + row * plane;
    float gv[4] = {0.f, 0.f, 0.f, 0.f}, xv[4] = {0.f, 0.f, 0.f, 0.f}, out[4];
    if (vec) {
      if (p0 < plane) {
        load4(gr + p0, gv);
        load4(xr + p0, xv);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (p0 + i < plane) {
          gv[i] = to_float(gr[p0 + i]);
          xv[i] = to_float(xr[p0 + i]);
        }
      }
    }
    float d = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[i] = gv[i] * gate_c * sv[i];
      const float gx = gv[i] * xv[i];
      d = fmaf(gx, sv[i], d);
      acc[i] = fmaf(gx, gate_c, acc[i]);
    }
    if (vec) {
      if (p0 < plane) store4(dx + row * plane + p0, out);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (p0 + i < plane) dx[row * plane + p0 + i] = from_float<T>(out[i]);
    }
    d = warp_sum(d);
    if (lane == 0) dmc_part[row * tiles + tile] = d;
  }
  __shared__ float sh[kGateWarps][kGateTile];
#pragma unroll
  for (int i = 0; i < 4; ++i) sh[warp][lane * 4 + i] = acc[i];
  __syncthreads();
  if (threadIdx.x < kGateTile) {
    const int64_t p = tile * kGateTile + threadIdx.x;
    float sum = sh[0][threadIdx.x];
#pragma unroll
    for (int w = 1; w < kGateWarps; ++w) sum += sh[w][threadIdx.x];
    if (p < plane) dms_part[(slice * batch + n) * plane + p] = sum;
  }
}

// out[i] = sum over the slices of partials[s * count + i], in slice order.
__global__ void __launch_bounds__(kThreads)
combine_slices_kernel(const float* __restrict__ partials, float* __restrict__ out, int64_t count, int64_t slices) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count; i += step) {
    float acc = partials[i];
#pragma unroll 1
    for (int64_t k = 1; k < slices; ++k) acc += partials[k * count + i];
    out[i] = acc;
  }
}

// The cbam_gate backward's grid: pixel tiles x images x channel slices, the slices as many as it
// takes for 4 waves of 8 blocks per SM (at most one per kGateWarps channels).
struct GatePlan {
  int64_t tiles = 1, slices = 1, slice_channels = 1;
};

GatePlan plan_gate(int64_t batch, int64_t channels, int64_t plane, int device) {
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  GatePlan plan;
  plan.tiles = (plane + kGateTile - 1) / kGateTile;
  const int64_t target = 4LL * (2048 / kThreads) * sms, base = plan.tiles * batch;
  int64_t slices = (target + base - 1) / base;
  const int64_t most = (channels + kGateWarps - 1) / kGateWarps;
  if (slices > most) slices = most;
  if (slices < 1) slices = 1;
  plan.slice_channels = (channels + slices - 1) / slices;
  plan.slices = (channels + plan.slice_channels - 1) / plan.slice_channels;
  return plan;
}

// Workspace floats: dM_c partials per (row, pixel tile) when there are several tiles, dM_s partials
// per (slice, pixel) when there are several slices.
int64_t gate_workspace(const GatePlan& plan, int64_t batch, int64_t channels, int64_t plane) {
  return (plan.tiles > 1 ? batch * channels * plan.tiles : 0) + (plan.slices > 1 ? plan.slices * batch * plane : 0);
}
}  // namespace

void channel_pool_forward(std::uintptr_t x, std::uintptr_t gate, std::uintptr_t out, std::uintptr_t argmax,
                          int64_t batch, int64_t channels, int64_t plane, DType dtype, int device,
                          std::uintptr_t stream) {
  const int64_t pixels = batch * plane;
  if (pixels == 0) return;
  if (channels <= 0) throw std::invalid_argument("channel_pool: C must be positive");
  if (channels > 2147483647LL) throw std::invalid_argument("channel_pool: C does not fit the int32 argmax");
  check_grid_dim((plane + 31) / 32, "channel_pool", "positions");
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "channel_pool_forward", [&](auto tag) {
    using T = decltype(tag);
    SEGKD_LAUNCH(split_grid(batch, plane), kSplitThreads, 0, as_stream(stream), channel_pool_forward_kernel<T>)(
        reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(gate), reinterpret_cast<T*>(out),
        reinterpret_cast<int32_t*>(argmax), batch, static_cast<int>(channels), plane);
  });
  check_launch("channel_pool_forward");
}

int64_t channel_pool_backward_workspace(int64_t batch, int64_t channels, int64_t plane, int device) {
  const int64_t rows = batch * channels;
  if (rows <= 0 || plane <= 0) return 0;
  DeviceGuard guard(device);
  const RowSplit plan = plan_channel_rows(rows, plane, device);
  return plan.splits > 1 ? rows * plan.splits : 0;
}

void channel_pool_backward(std::uintptr_t grad_out, std::uintptr_t argmax, std::uintptr_t x, std::uintptr_t gate,
                           std::uintptr_t dx, std::uintptr_t dgate, std::uintptr_t workspace, int64_t workspace_floats,
                           int64_t batch, int64_t channels, int64_t plane, DType dtype, int device,
                           std::uintptr_t stream) {
  const int64_t rows = batch * channels;
  if (rows == 0 || plane == 0) return;
  if (dgate != 0 && (x == 0 || gate == 0)) throw std::invalid_argument("channel_pool_backward: dgate needs x and gate");
  check_grid_dim(rows, "channel_pool_backward", "(n, c) rows");
  DeviceGuard guard(device);
  const RowSplit plan = plan_channel_rows(rows, plane, device);
  const bool split = plan.splits > 1;
  if (split && dgate != 0 && (workspace == 0 || workspace_floats < rows * plan.splits))
    throw std::invalid_argument("channel_pool_backward: workspace must hold channel_pool_backward_workspace() floats");
  dispatch_float_types(dtype, "channel_pool_backward", [&](auto tag) {
    using T = decltype(tag);
    // 4 positions per access: every row start aligned (plane % 4 == 0, 16-byte aligned bases)
    const bool vec = plane % 4 == 0 && aligned16(grad_out) && aligned16(argmax) && aligned16(dx) &&
                     (dgate == 0 || aligned16(x));
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(plan.splits));
    SEGKD_LAUNCH(grid, kThreads, 0, as_stream(stream), channel_pool_backward_kernel<T>)(
        reinterpret_cast<const T*>(grad_out), reinterpret_cast<const int32_t*>(argmax), reinterpret_cast<const T*>(x),
        reinterpret_cast<const float*>(gate), reinterpret_cast<T*>(dx),
        reinterpret_cast<float*>(split && dgate != 0 ? workspace : dgate), channels, plane, plan.chunk, vec);
  });
  check_launch("channel_pool_backward");
  if (split && dgate != 0) {
    SEGKD_LAUNCH(grid_for(rows, kThreads), kThreads, 0, as_stream(stream), combine_splits_kernel)(
        reinterpret_cast<const float*>(workspace), reinterpret_cast<float*>(dgate), rows, plan.splits);
    check_launch("channel_pool_backward (combine)");
  }
}

// At least 4 values per thread, at most 4,096 blocks (3.9 waves of 8 blocks on 132 SMs): the
// caller sums the partials in fp64, a few hundred KB at most.
int64_t attnfd_num_partials(int64_t total) {
  return static_cast<int64_t>(grid_for(total, kThreads * 4, 4096));
}

void attnfd_dots(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t partials, int64_t total,
                 int64_t num_partials, DType dtype, int device, std::uintptr_t stream) {
  if (total == 0) return;
  if (num_partials != attnfd_num_partials(total))
    throw std::invalid_argument("attnfd_dots: partials must hold attnfd_num_partials(total) * 3 doubles");
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "attnfd_dots", [&](auto tag) {
    using T = decltype(tag);
    const bool vec = total % Vec16<T>::kSize == 0 && aligned16(student) && aligned16(teacher);
    SEGKD_LAUNCH(static_cast<unsigned>(num_partials), kThreads, 0, as_stream(stream), attnfd_dots_kernel<T>)(
        reinterpret_cast<const T*>(student), reinterpret_cast<const T*>(teacher), reinterpret_cast<double*>(partials),
        total, vec);
  });
  check_launch("attnfd_dots");
}

void cbam_gate_forward(std::uintptr_t x, std::uintptr_t channel_gate, std::uintptr_t spatial_gate, std::uintptr_t out,
                       int64_t batch, int64_t channels, int64_t plane, DType dtype, int device, std::uintptr_t stream) {
  const int64_t total = batch * channels * plane;
  if (total == 0) return;
  DeviceGuard guard(device);
  dispatch_float_types(dtype, "cbam_gate_forward", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Vec16<T>::kSize;
    const bool vec = plane % V == 0 && aligned16(x) && aligned16(out);
    const int64_t rows = batch * channels;
    const int64_t per_row = (plane + static_cast<int64_t>(kThreads) * V - 1) / (static_cast<int64_t>(kThreads) * V);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(per_row, 65535)),
                    static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
    SEGKD_LAUNCH(grid, kThreads, 0, as_stream(stream), cbam_gate_forward_kernel<T>)(
        reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(channel_gate),
        reinterpret_cast<const float*>(spatial_gate), reinterpret_cast<T*>(out), rows, channels, plane, vec);
  });
  check_launch("cbam_gate_forward");
}

int64_t cbam_gate_backward_workspace(int64_t batch, int64_t channels, int64_t plane, int device) {
  if (batch <= 0 || channels <= 0 || plane <= 0) return 0;
  DeviceGuard guard(device);
  return gate_workspace(plan_gate(batch, channels, plane, device), batch, channels, plane);
}
void cbam_gate_backward(std::uintptr_t grad_out, std::uintptr_t x, std::uintptr_t channel_gate,
                        std::uintptr_t spatial_gate, std::uintptr_t dx, std::uintptr_t d_channel_gate,
                        std::uintptr_t d_spatial_gate, std::uintptr_t workspace, int64_t workspace_floats,
                        int64_t batch, int64_t channels, int64_t plane, DType dtype, int device,
                        std::uintptr_t stream) {
  const int64_t rows = batch * channels;
  if (rows == 0 || plane == 0) return;
  if (batch > 65535) throw std::invalid_argument("cbam_gate_backward: batch above 65535");
  if (channels > 2147483647LL) throw std::invalid_argument("cbam_gate_backward: C above 2^31 - 1");
  check_grid_dim((plane + kGateTile - 1) / kGateTile, "cbam_gate_backward", "positions");
  DeviceGuard guard(device);
  const GatePlan plan = plan_gate(batch, channels, plane, device);
  const int64_t need = gate_workspace(plan, batch, channels, plane);
  if (need > 0 && (workspace == 0 || workspace_floats < need))
    throw std::invalid_argument("cbam_gate_backward: workspace must hold cbam_gate_backward_workspace() floats");
  auto* dmc = reinterpret_cast<float*>(d_channel_gate);
  auto* dms = reinterpret_cast<float*>(d_spatial_gate);
  auto* ws = reinterpret_cast<float*>(workspace);
  float* dmc_part = plan.tiles > 1 ? ws : dmc;
  float* dms_part = plan.slices > 1 ? ws + (plan.tiles > 1 ? rows * plan.tiles : 0) : dms;
  dispatch_float_types(dtype, "cbam_gate_backward", [&](auto tag) {
    using T = decltype(tag);
    // 4 pixels per access: every row start aligned (plane % 4 == 0, 16-byte aligned bases)
    const bool vec = plane % 4 == 0 && aligned16(grad_out) && aligned16(x) && aligned16(spatial_gate) &&
                     aligned16(dx);
    const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(batch),
                    static_cast<unsigned>(plan.slices));
    SEGKD_LAUNCH(grid, kThreads, 0, as_stream(stream), cbam_gate_backward_kernel<T>)(
        reinterpret_cast<const T*>(grad_out), reinterpret_cast<const T*>(x),
        reinterpret_cast<const float*>(channel_gate), reinterpret_cast<const float*>(spatial_gate),
        reinterpret_cast<T*>(dx), dmc_part, dms_part, batch, static_cast<int>(channels), plane,
        static_cast<int>(plan.slice_channels), vec);
  });
  check_launch("cbam_gate_backward");
  if (plan.tiles > 1) {
    SEGKD_LAUNCH(grid_for(rows, kThreads), kThreads, 0, as_stream(stream), combine_splits_kernel)(
        dmc_part, dmc, rows, plan.tiles);
    check_launch("cbam_gate_backward (dM_c partials)");
  }
  if (plan.slices > 1) {
    SEGKD_LAUNCH(grid_for(batch * plane, kThreads), kThreads, 0, as_stream(stream), combine_slices_kernel)(
        dms_part, dms, batch * plane, plan.slices);
    check_launch("cbam_gate_backward (dM_s partials)");
  }
}
}  // namespace segkd
