// nvcuda::wmma for the host execution layer: 16x16x16 fragments of __half / __nv_bfloat16 with
// fp32 accumulators (what csrc/ uses).
//
// Fragment layout (CUDA leaves it unspecified; kernels must not depend on it): every fragment is
// a 16 x 16 matrix, row-major by its logical indices (matrix_a: M x K, matrix_b: K x N,
// accumulator: M x N); lane l holds elements 8l .. 8l+7, i.e. row l / 2, columns 8 (l % 2) .. +7.
//
// Every *_sync call is a warp collective over the full warp (all 32 lanes must call it, with the
// same arguments), as the CUDA API requires. mma_sync computes D = A B + C with each product of two
// 16-bit inputs exact in fp32 and the K products added in order in fp32 (tensor cores add with
// at least fp32 precision, in an unspecified order). Pointers must be 256-bit aligned and ldm a
// multiple of 16 bytes, as the CUDA documentation requires; a violation fails the launch.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "half.h"
#include "runtime.h"

// Everything the layer defines stays private to the library that includes it: two libraries built
// on it (the test module, a mutant) loaded into one process must not share its state.
#pragma GCC visibility push(hidden)

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the host layer provides 16x16x16 fragments");
  static constexpr int num_elements = 8;
  T x[num_elements];
};

namespace detail {

inline int lane() { return segkd_host::self()->lane; }

inline void warp_sync(const char* what) {
  segkd_host::collective(segkd_host::WarpOp::Sync, 0xffffffffu, 0, 0, 32, what);
}

template <typename T> inline void check_access(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) segkd_host::fail(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) segkd_host::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

// element e (0..255) of the logical 16 x 16 matrix
inline int row_of(int e) { return e / 16; }
inline int col_of(int e) { return e % 16; }

template <typename L> struct IsColMajor { static constexpr bool value = false; };
template <> struct IsColMajor<col_major> { static constexpr bool value = true; };

struct MmaArgs {
  const float* a;  // 256 values each, gathered per lane before the call
  const float* b;
  const float* c;
  float* d;
};

// The completing lane computes the whole warp's product from every lane's fragments.
inline void mma_collective(segkd_host::Fiber* const* lanes, int count) {
  float a[256], b[256], c[256], d[256];
  for (int i = 0; i < count; ++i) {
    const auto* m = static_cast<const MmaArgs*>(lanes[i]->custom_data);
    const int base = lanes[i]->lane * 8;
    for (int e = 0; e < 8; ++e) {
      a[base + e] = m->a[e];
      b[base + e] = m->b[e];
      c[base + e] = m->c[e];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col) {
      float acc = c[r * 16 + col];
      for (int k = 0; k < 16; ++k) acc += a[r * 16 + k] * b[k * 16 + col];
      d[r * 16 + col] = acc;
    }
  for (int i = 0; i < count; ++i) {
    const auto* m = static_cast<const MmaArgs*>(lanes[i]->custom_data);
    std::memcpy(m->d, d + lanes[i]->lane * 8, 8 * sizeof(float));
  }
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = T(static_cast<float>(v));
}

template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  detail::check_access(p, ldm, "wmma::load_matrix_sync");
  detail::warp_sync("wmma::load_matrix_sync");
  const int base = detail::lane() * 8;
  for (int e = 0; e < 8; ++e) {
    const int r = detail::row_of(base + e), c = detail::col_of(base + e);
    f.x[e] = detail::IsColMajor<L>::value ? p[r + static_cast<size_t>(c) * ldm] : p[static_cast<size_t>(r) * ldm + c];
  }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  detail::check_access(p, ldm, "wmma::load_matrix_sync");
  detail::warp_sync("wmma::load_matrix_sync");
  const int base = detail::lane() * 8;
  for (int e = 0; e < 8; ++e) {
    const int r = detail::row_of(base + e), c = detail::col_of(base + e);
    f.x[e] = l == mem_col_major ? p[r + static_cast<size_t>(c) * ldm] : p[static_cast<size_t>(r) * ldm + c];
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  detail::check_access(p, ldm, "wmma::store_matrix_sync");
  detail::warp_sync("wmma::store_matrix_sync");
  const int base = detail::lane() * 8;
  for (int e = 0; e < 8; ++e) {
    const int r = detail::row_of(base + e), c = detail::col_of(base + e);
    (l == mem_col_major ? p[r + static_cast<size_t>(c) * ldm] : p[static_cast<size_t>(r) * ldm + c]) = f.x[e];
  }
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float av[8], bv[8], cv[8], dv[8];
  for (int e = 0; e < 8; ++e) {
    av[e] = static_cast<float>(a.x[e]);
    bv[e] = static_cast<float>(b.x[e]);
    cv[e] = c.x[e];
  }
  detail::MmaArgs args{av, bv, cv, dv};
  segkd_host::collective(segkd_host::WarpOp::Custom, 0xffffffffu, 0, 0, 32, "wmma::mma_sync", detail::mma_collective,
                         &args);
  for (int e = 0; e < 8; ++e) d.x[e] = dv[e];
}

}  // namespace wmma
}  // namespace nvcuda

#pragma GCC visibility pop
