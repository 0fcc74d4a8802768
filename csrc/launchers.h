// Host launchers of every CUDA kernel. Plain C++ types only (no CUDA headers), so bindings.cpp is
// compiled by the host compiler. Pointers come from torch's data_ptr(); Python allocates every
// output and passes the stream (torch.cuda.current_stream().cuda_stream) and the device index.
#pragma once

#include <cstdint>

namespace segkd {

// Matches segkd_kernels/ops/_cuda_common.py: DTYPE_CODES.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// spatial_pool: mean and max over the `plane` contiguous elements of each of `rows` rows.
// avg/max have x's dtype; argmax is int64 (first maximal position, used by the backward).
void spatial_pool_forward(std::uintptr_t x, std::uintptr_t avg, std::uintptr_t max, std::uintptr_t argmax,
                          int64_t rows, int64_t plane, DType dtype, int device, std::uintptr_t stream);

// dx[r, p] = grad_avg[r] / plane + (p == argmax[r]) * grad_max[r]; grads have dx's dtype.
void spatial_pool_backward(std::uintptr_t grad_avg, std::uintptr_t grad_max, std::uintptr_t argmax,
                           std::uintptr_t dx, int64_t rows, int64_t plane, DType dtype, int device,
                           std::uintptr_t stream);

}  // namespace segkd
