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

}  // namespace segkd
