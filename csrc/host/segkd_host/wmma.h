// nvcuda::wmma for the host execution layer: 16x16x16 fragments of __half / __nv_bfloat16 and
// 16x16x8 fragments of wmma::precision::tf32, with fp32 accumulators (what csrc/ uses).
//
// Fragment layout (CUDA leaves it unspecified; kernels must not depend on it): every fragment is
// its logical matrix (matrix_a: M x K, matrix_b: K x N, accumulator: M x N) row-major by its
// logical indices, split evenly over the lanes: lane l holds elements n l .. n l + n - 1 for
// n = num_elements (8 for 16 x 16, 4 for the 16 x 8 and 8 x 16 tf32 operands).
//
// tf32 (m16n16k8): the fragments hold floats, as CUDA's; a kernel rounds the operands to tf32 with
// wmma::__float_to_tf32 (round to nearest, ties away from zero: cvt.rna.tf32.f32, 10 mantissa
// bits kept, the low 13 bits zero). The tensor cores read only the top 19 bits of an operand, so
// an operand that is not a tf32 value gives a result CUDA does not specify: here mma_sync fails
// the launch on any finite operand with a low bit set, which catches a kernel that forgot to round.
// Products of two tf32 values (11-bit significands) are exact in fp32.
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

namespace precision {
struct tf32 {};
}  // namespace precision

namespace detail {

template <typename Use, int K> struct Shape { static constexpr int rows = 16, cols = 16; };  // accumulator
template <int K> struct Shape<matrix_a, K> { static constexpr int rows = 16, cols = K; };
template <int K> struct Shape<matrix_b, K> { static constexpr int rows = K, cols = 16; };

template <typename T> struct Storage { using type = T; };
template <> struct Storage<precision::tf32> { using type = float; };

template <typename A, typename B> struct Same { static constexpr bool value = false; };
template <typename A> struct Same<A, A> { static constexpr bool value = true; };

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || K == 8),
                "the host layer provides 16x16x16 and 16x16x8 fragments");
  static_assert(detail::Same<Use, accumulator>::value || (K == 8) == detail::Same<T, precision::tf32>::value,
                "tf32 operands are m16n16k8, half / bfloat16 operands m16n16k16");
  using element_type = typename detail::Storage<T>::type;
  static constexpr int rows = detail::Shape<Use, K>::rows, cols = detail::Shape<Use, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  element_type x[num_elements];
};

// cvt.rna.tf32.f32: round to the nearest value with 10 mantissa bits, ties away from zero; the
// result is a float whose low 13 bits are zero. Infinities stay; NaN stays a (quiet) NaN.
inline float __float_to_tf32(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u) {
    if (u & 0x007fffffu) u |= 0x00400000u;  // NaN: quiet, payload cut to the tf32 bits
    u &= 0xffffe000u;
  } else {
    u = (u + 0x1000u) & 0xffffe000u;  // ties away from zero: add half an ulp to the magnitude
  }
  std::memcpy(&v, &u, sizeof v);
  return v;
}

namespace detail {

inline int lane() { return segkd_host::self()->lane; }

// a finite float with the low 13 mantissa bits zero (or a non-finite one)
inline bool tf32_value(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x7f800000u) == 0x7f800000u || (u & 0x1fffu) == 0;
}

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
  const float* a;  // k values each (16 * k / 32 per lane), gathered per lane before the call
  const float* b;
  const float* c;  // 8 per lane
  float* d;
  int k;           // 16 (half / bfloat16) or 8 (tf32)
};

// The completing lane computes the whole warp's product from every lane's fragments.
inline void mma_collective(segkd_host::Fiber* const* lanes, int count) {
  float a[256], b[256], c[256], d[256];
  const int k_dim = static_cast<const MmaArgs*>(lanes[0]->custom_data)->k, per = k_dim / 2;
  for (int i = 0; i < count; ++i) {
    const auto* m = static_cast<const MmaArgs*>(lanes[i]->custom_data);
    for (int e = 0; e < per; ++e) {
      a[lanes[i]->lane * per + e] = m->a[e];
      b[lanes[i]->lane * per + e] = m->b[e];
    }
    for (int e = 0; e < 8; ++e) c[lanes[i]->lane * 8 + e] = m->c[e];
  }
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col) {
      float acc = c[r * 16 + col];
      for (int k = 0; k < k_dim; ++k) acc += a[r * k_dim + k] * b[k * 16 + col];
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
  using E = typename fragment<Use, M, N, K, T, L>::element_type;
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = E(static_cast<float>(v));
}

template <typename Use, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, K, T, L>& f, const typename detail::Storage<T>::type* p,
                             unsigned ldm) {
  using F = fragment<Use, 16, 16, K, T, L>;
  detail::check_access(p, ldm, "wmma::load_matrix_sync");
  detail::warp_sync("wmma::load_matrix_sync");
  const int base = detail::lane() * F::num_elements;
  for (int e = 0; e < F::num_elements; ++e) {
    const int r = (base + e) / F::cols, c = (base + e) % F::cols;
    f.x[e] = detail::IsColMajor<L>::value ? p[r + static_cast<size_t>(c) * ldm] : p[static_cast<size_t>(r) * ldm + c];
  }
}

template <int K>
inline void load_matrix_sync(fragment<accumulator, 16, 16, K, float>& f, const float* p, unsigned ldm, layout_t l) {
  detail::check_access(p, ldm, "wmma::load_matrix_sync");
  detail::warp_sync("wmma::load_matrix_sync");
  const int base = detail::lane() * 8;
  for (int e = 0; e < 8; ++e) {
    const int r = detail::row_of(base + e), c = detail::col_of(base + e);
    f.x[e] = l == mem_col_major ? p[r + static_cast<size_t>(c) * ldm] : p[static_cast<size_t>(r) * ldm + c];
  }
}

template <int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f, unsigned ldm, layout_t l) {
  detail::check_access(p, ldm, "wmma::store_matrix_sync");
  detail::warp_sync("wmma::store_matrix_sync");
  const int base = detail::lane() * 8;
  for (int e = 0; e < 8; ++e) {
    const int r = detail::row_of(base + e), c = detail::col_of(base + e);
    (l == mem_col_major ? p[r + static_cast<size_t>(c) * ldm] : p[static_cast<size_t>(r) * ldm + c]) = f.x[e];
  }
}

template <int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, K, float>& d, const fragment<matrix_a, 16, 16, K, T, LA>& a,
                     const fragment<matrix_b, 16, 16, K, T, LB>& b, const fragment<accumulator, 16, 16, K, float>& c) {
  constexpr int per = K / 2;  // operand elements per lane
  float av[8], bv[8], cv[8], dv[8];
  for (int e = 0; e < per; ++e) {
    av[e] = static_cast<float>(a.x[e]);
    bv[e] = static_cast<float>(b.x[e]);
    if (detail::Same<T, precision::tf32>::value && (!detail::tf32_value(av[e]) || !detail::tf32_value(bv[e])))
      segkd_host::fail("wmma::mma_sync: a tf32 operand is not a tf32 value (round it with wmma::__float_to_tf32)");
  }
  for (int e = 0; e < 8; ++e) cv[e] = c.x[e];
  detail::MmaArgs args{av, bv, cv, dv, K};
  segkd_host::collective(segkd_host::WarpOp::Custom, 0xffffffffu, 0, 0, 32, "wmma::mma_sync", detail::mma_collective,
                         &args);
  for (int e = 0; e < 8; ++e) d.x[e] = dv[e];
}

}  // namespace wmma
}  // namespace nvcuda

#pragma GCC visibility pop
