// Small kernels that exercise the host execution layer (csrc/host/) directly, for
// test_cuda_host_layer.py: each entry point launches one kernel and returns the CUDA error code
// (0 on success); segkd_layer_error() gives the text of the last error.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstring>

#define LAUNCH(grid, block, smem, ...) ::segkd_host::make_launch(&__VA_ARGS__, grid, block, smem, nullptr, #__VA_ARGS__)

namespace {

std::string last_error;

int finish() {
  const cudaError_t e = cudaGetLastError();
  last_error = e == cudaSuccess ? "" : std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  return static_cast<int>(e);
}

// out[6 x threads]: shfl (lane + 3) % 32, up 1, down 2, xor 5, shfl width 8 (lane 1 of each 8),
// xor 4 width 8
__global__ void shuffles(int* out) {
  const int tid = threadIdx.x, lane = tid % 32, n = blockDim.x;
  const int v = tid * 10;
  out[0 * n + tid] = __shfl_sync(0xffffffffu, v, (lane + 3) % 32);
  out[1 * n + tid] = __shfl_up_sync(0xffffffffu, v, 1);
  out[2 * n + tid] = __shfl_down_sync(0xffffffffu, v, 2);
  out[3 * n + tid] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[4 * n + tid] = __shfl_sync(0xffffffffu, v, 1, 8);
  out[5 * n + tid] = __shfl_xor_sync(0xffffffffu, v, 4, 8);
}

// out[5 x threads]: ballot, any, all of tid % 3 == 0; all of true; the two half-warps shuffle
// separately with their own masks (lane ^ 1 within each half).
__global__ void votes(unsigned* out) {
  const int tid = threadIdx.x, lane = tid % 32, n = blockDim.x;
  const int p = tid % 3 == 0;
  out[0 * n + tid] = __ballot_sync(0xffffffffu, p);
  out[1 * n + tid] = __any_sync(0xffffffffu, p);
  out[2 * n + tid] = __all_sync(0xffffffffu, p);
  out[3 * n + tid] = __all_sync(0xffffffffu, 1);
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  out[4 * n + tid] = __shfl_xor_sync(half, static_cast<unsigned>(tid), 1);
}

// out[3 x threads]: __syncthreads_count / _and / _or of tid % 4 == 1, plus 3-D indices.
__global__ void barriers(int* out, int* ids) {
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int n = blockDim.x * blockDim.y * blockDim.z;
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int p = t % 4 == 1;
  const int c = __syncthreads_count(p), a = __syncthreads_and(p), o = __syncthreads_or(p);
  if (b == 0) { out[t] = c; out[n + t] = a; out[2 * n + t] = o; }
  ids[b * n + t] = b * 1000 + t;
}

// A value a thread writes to shared memory before the barrier, read by its neighbour after it;
// `skip` threads never write: their neighbours read whatever shared memory held.
__global__ void neighbour(float* out, int skip) {
  __shared__ float buf[256];
  const int t = threadIdx.x;
  if (t % 64 != skip) buf[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = buf[(t + 1) % blockDim.x];
}

__global__ void dynamic_smem(float* out) {
  float* d = ::segkd_host::dynamic_shared<float>();  // what SEGKD_DYNAMIC_SHARED declares
  d[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = d[(threadIdx.x + 1) % blockDim.x];
}

// Lanes 16-31 wait at a barrier while lanes 0-15 wait for them in a full-warp shuffle: a deadlock.
__global__ void deadlock(int* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  else __syncthreads();
}

// Lane 31 exits, then the others shuffle with a mask that still names it.
__global__ void exited_lane(int* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}

__global__ void atomics(double* d, float* f) {
  atomicAdd(d, 0.5);
  atomicAdd(f, 1.f);
}

// One warp: D = A B + C for 16 x 16 half matrices, A row-major, B col-major, C and D row-major.
template <typename T>
__global__ void mma(const T* a, const T* b, const float* c, float* d) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::load_matrix_sync(fc, c, 16, wmma::mem_row_major);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}

// One warp: D = A B + C for a 16 x 8 tf32 A (row-major) and 8 x 16 B (col-major), C and D 16 x 16
// row-major; with round != 0 each operand element is rounded with __float_to_tf32 after the load,
// as CUDA requires, else passed as loaded.
__global__ void mma_tf32(const float* a, const float* b, const float* c, float* d, int round) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> fc;
  wmma::load_matrix_sync(fa, a, 8);
  wmma::load_matrix_sync(fb, b, 8);
  wmma::load_matrix_sync(fc, c, 16, wmma::mem_row_major);
  if (round) {
    for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
    for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
  }
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}

}  // namespace

extern "C" {

const char* segkd_layer_error() { return last_error.c_str(); }
void segkd_layer_seed(uint64_t seed) { segkd_host::set_seed(seed); }
void segkd_layer_poison(int on) { segkd_host::state().poison = on != 0; }
void segkd_layer_attribute(int attr, int value) { segkd_host::set_attribute(attr, value); }
void segkd_layer_reset() { segkd_host::reset_attributes(); }

int segkd_layer_shuffles(int* out, int threads) {
  LAUNCH(1, threads, 0, shuffles)(out);
  return finish();
}
int segkd_layer_votes(unsigned* out, int threads) {
  LAUNCH(1, threads, 0, votes)(out);
  return finish();
}
int segkd_layer_barriers(int* out, int* ids, int bx, int by, int bz, int gx, int gy, int gz) {
  LAUNCH(dim3(gx, gy, gz), dim3(bx, by, bz), 0, barriers)(out, ids);
  return finish();
}
int segkd_layer_neighbour(float* out, int threads, int skip) {
  LAUNCH(1, threads, 0, neighbour)(out, skip);
  return finish();
}
int segkd_layer_dynamic(float* out, int threads, int smem, int attribute) {
  if (attribute >= 0) {
    const cudaError_t e = cudaFuncSetAttribute(dynamic_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, attribute);
    if (e != cudaSuccess) return -static_cast<int>(e);
  }
  LAUNCH(1, threads, smem, dynamic_smem)(out);
  return finish();
}
int segkd_layer_deadlock(int* out) {
  LAUNCH(1, 64, 0, deadlock)(out);
  return finish();
}
int segkd_layer_exited_lane(int* out) {
  LAUNCH(1, 32, 0, exited_lane)(out);
  return finish();
}
int segkd_layer_atomics(double* d, float* f, int blocks, int threads) {
  LAUNCH(blocks, threads, 0, atomics)(d, f);
  return finish();
}
int segkd_layer_mma_half(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  LAUNCH(1, 32, 0, mma<__half>)(reinterpret_cast<const __half*>(a), reinterpret_cast<const __half*>(b), c, d);
  return finish();
}
int segkd_layer_mma_bf16(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  LAUNCH(1, 32, 0, mma<__nv_bfloat16>)(reinterpret_cast<const __nv_bfloat16*>(a),
                                       reinterpret_cast<const __nv_bfloat16*>(b), c, d);
  return finish();
}
int segkd_layer_mma_tf32(const float* a, const float* b, const float* c, float* d, int round) {
  LAUNCH(1, 32, 0, mma_tf32)(a, b, c, d, round);
  return finish();
}
void segkd_layer_tf32(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = nvcuda::wmma::__float_to_tf32(in[i]);
}
int segkd_layer_tf32_fragment_elements() {  // matrix_a, matrix_b, accumulator of m16n16k8 per lane
  using namespace nvcuda::wmma;
  return fragment<matrix_a, 16, 16, 8, precision::tf32, row_major>::num_elements * 100 +
         fragment<matrix_b, 16, 16, 8, precision::tf32, col_major>::num_elements * 10 +
         fragment<accumulator, 16, 16, 8, float>::num_elements;
}
void segkd_layer_convert(const float* in, uint16_t* half_bits, uint16_t* bf16_bits, float* half_back,
                         float* bf16_back, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const __half h = __float2half_rn(in[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(in[i]);
    std::memcpy(half_bits + i, &h, 2);
    std::memcpy(bf16_bits + i, &b, 2);
    half_back[i] = __half2float(h);
    bf16_back[i] = __bfloat162float(b);
  }
}

}  // extern "C"
