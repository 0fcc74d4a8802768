// Shared helpers for segkd_kernels' CUDA kernels: dtype conversion (every kernel accumulates in
// fp32), error checks that become Python exceptions, a device guard and warp/block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launchers.h"

// One launch syntax for both builds: the real launch under nvcc, the emulated one of the host
// execution layer (csrc/host/) under g++. The kernel comes last so that template arguments may
// contain commas:  SEGKD_LAUNCH(grid, block, dynamic_smem, stream, kernel<T, true>)(args...);
// Dynamic shared memory is declared with SEGKD_DYNAMIC_SHARED(type, name) (an array of type).
#if defined(SEGKD_HOST_EXECUTION)
#define SEGKD_LAUNCH(grid, block, smem, stream, ...) \
  ::segkd_host::make_launch(&__VA_ARGS__, grid, block, smem, stream, #__VA_ARGS__)
#define SEGKD_DYNAMIC_SHARED(type, name) type* name = ::segkd_host::dynamic_shared<type>()
#else
#define SEGKD_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define SEGKD_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace segkd {

// ---- dtype helpers ------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls F with a value whose type is the element type of `dtype`.
template <typename F> void dispatch_float_types(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); break;
    case DType::Float16: f(__half{}); break;
    case DType::BFloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string(op) + ": unsupported dtype code");
  }
}

// ---- errors ---------------------------------------------------------------------------------
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// Surfaces launch-configuration errors (and earlier asynchronous errors) right after a launch.
inline void check_launch(const char* op) { check_cuda(cudaGetLastError(), op); }

// Makes `device` current for the lifetime of the guard, so kernels run where the tensors live.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// ---- reductions -----------------------------------------------------------------------------
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// NaN-propagating max / clamp, as torch.max / torch.clamp: fmaxf / fminf return the other operand
// when one is NaN (IEEE maxNum), which would turn a NaN into a finite value (e.g. max(NaN, eps) =
// eps). One compare-and-select more than fmaxf; a NaN in either operand gives NaN.
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ float min_nan(float a, float b) { return (a < b || a != a) ? a : b; }
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) { return min_nan(max_nan(v, lo), hi); }

// Max with the index of its first occurrence; NaN wins (as in torch.max), ties keep the lower index.
__device__ __forceinline__ bool max_index_better(float v, int64_t i, float best, int64_t best_i) {
  if (isnan(v)) return !isnan(best) || i < best_i;
  if (isnan(best)) return false;
  return v > best || (v == best && i < best_i);
}

__device__ __forceinline__ void warp_max_index(float& v, int64_t& i) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, v, offset);
    const int64_t oi = __shfl_xor_sync(kFullMask, i, offset);
    if (max_index_better(ov, oi, v, i)) { v = ov; i = oi; }
  }
}


// ---- vectorised loads -------------------------------------------------------------------------
// 128-bit loads: 4 floats or 8 halves / bfloat16 per transaction. Callers check 16-byte alignment.
template <typename T> struct Vec16 { static constexpr int kSize = 16 / sizeof(T); };

template <typename T>
__device__ __forceinline__ void load16(const T* __restrict__ p, float (&out)[Vec16<T>::kSize]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kSize; ++i) out[i] = to_float(e[i]);
}

// 128-bit store of 4 floats or 8 halves / bfloat16 converted from fp32 (p 16-byte aligned).
template <typename T>
__device__ __forceinline__ void store16(T* __restrict__ p, const float (&val)[Vec16<T>::kSize]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kSize; ++i) e[i] = from_float<T>(val[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

inline bool aligned16(std::uintptr_t p) { return (p & 15u) == 0; }

// 4 consecutive values as one 128-bit (fp32) or 64-bit (fp16 / bf16) access; p aligned to 4 values.
template <typename T> struct Vec4Raw { using type = uint2; };
template <> struct Vec4Raw<float> { using type = uint4; };

template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ p, float (&out)[4]) {
  using R = typename Vec4Raw<T>::type;
  const R raw = __ldg(reinterpret_cast<const R*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ void store4(T* __restrict__ p, const float (&val)[4]) {
  using R = typename Vec4Raw<T>::type;
  R raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) e[i] = from_float<T>(val[i]);
  *reinterpret_cast<R*>(p) = raw;
}

// ---- online softmax ---------------------------------------------------------------------------
// expf / logf, not the __expf / __logf intrinsics: a KL is a small difference of log-sum-exps, and
// the intrinsics' error (growing with |x|) would be amplified past the fp32 tolerances.
// exp(m_old - m_new) that is 0 (not NaN) while nothing has been seen yet (m_old = -inf).
__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : expf(m_old - m_new);
}

// exp(x - x) for a new running max x: 1, or NaN when x = +inf (inf - inf), as the reference's
// softmax computes it (torch's log_softmax of a row holding +inf is NaN everywhere). A plain 1 would
// make the log-sum-exp +inf instead, and the other entries' softmax a finite 0.
__device__ __forceinline__ float exp_self(float x) { return x - x + 1.f; }

// Running max m and sum l of exp(x - m) over the values seen so far. m is never NaN (a NaN x fails
// x > m and makes l NaN instead), so merge may take fmaxf of two maxima.
struct OnlineLse {
  float m = -INFINITY, l = 0.f;
  __device__ __forceinline__ void add(float x) {
    if (x > m) { l = l * rescale(m, x) + exp_self(x); m = x; }
    else l += expf(x - m);
  }
  __device__ __forceinline__ void merge(float om, float ol) {
    const float nm = fmaxf(m, om);
    // both states saw nothing or only -inf: l is 0, or NaN from exp(-inf - (-inf)), which must stay
    if (nm == -INFINITY) { l += ol; return; }
    l = l * rescale(m, nm) + ol * rescale(om, nm);
    m = nm;
  }
  __device__ __forceinline__ float lse() const { return m + logf(l); }
};

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024). Every thread gets the result.
// `scratch` holds 32 floats; the call starts with a barrier, so it may follow another use of it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

inline unsigned grid_for(int64_t total, int threads, int64_t cap = 65535LL * 16) {
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

inline void check_grid_dim(int64_t n, const char* op, const char* what) {
  if (n > 2147483647LL) throw std::invalid_argument(std::string(op) + ": too many " + what + " for one grid");
}

// Splits of the rows of kernels that reduce one row per block (spatial_pool forward, the channel_pool
// and cbam_gate backward rows): when the rows alone fill less than two waves of `blocks_per_sm`
// blocks on every SM, each row is cut into `splits` ranges of `chunk` values (a multiple of `align`,
// so vector accesses stay aligned; at least `min_chunk`), aiming at two waves. The kernels write one
// partial per (row, split) and a second kernel combines them per row in split order (deterministic).
struct RowSplit {
  int64_t splits = 1, chunk = 0;
};

inline RowSplit plan_row_split(int64_t rows, int64_t plane, int64_t min_chunk, int64_t align, int blocks_per_sm,
                               int device) {
  RowSplit plan;
  plan.chunk = plane;
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t target = 2LL * blocks_per_sm * sms;
  if (rows <= 0 || rows >= target || plane < 2 * min_chunk) return plan;
  int64_t splits = (target + rows - 1) / rows;
  if (splits > plane / min_chunk) splits = plane / min_chunk;
  if (splits < 2) return plan;
  int64_t chunk = (plane + splits - 1) / splits;
  chunk = (chunk + align - 1) / align * align;
  plan.splits = (plane + chunk - 1) / chunk;
  plan.chunk = chunk;
  return plan;
}

}  // namespace segkd
