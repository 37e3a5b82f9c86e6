#pragma once
// Small register-blocked SIMD kernels behind linear attention: a tile GEMM
// (C (+)= A B over a chunk of <= a few hundred rows), a dot product and a row
// sum. They work on packed per-head buffers that stay in L1/L2, so they need
// no cache blocking of their own; each output element is accumulated in one
// fixed order (p = 0, 1, ..., k-1), which keeps results independent of how
// the caller splits work into blocks or threads.
#include <cstddef>
#include <cstdint>

#include "switchyard/core/simd/arch.hpp"

namespace switchyard {
inline namespace v0 {
namespace kernels {

namespace linear_detail {

// Rows of one register tile: 4 rows x NB batches, NB = 4 on 32-register
// AVX-512 (16 accumulators), 2 elsewhere (8 accumulators of 16 registers).
template <class T, class Arch>
inline constexpr int tile_batches = sizeof(xsimd::batch<T, Arch>) >= 64 ? 4 : 2;

template <int MR, int NB, class Arch, class T>
inline void gemm_tile(std::int64_t k, const T* a, std::ptrdiff_t ars, std::ptrdiff_t acs,
                      const T* b, std::ptrdiff_t ldb, T* c, std::ptrdiff_t ldc,
                      bool accumulate) noexcept {
  using B = xsimd::batch<T, Arch>;
  constexpr std::ptrdiff_t L = B::size;
  B r[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j)
      r[i][j] = accumulate ? B::load_unaligned(c + i * ldc + j * L) : B(T(0));
  for (std::int64_t p = 0; p < k; ++p) {
    B bv[NB];
    for (int j = 0; j < NB; ++j) bv[j] = B::load_unaligned(b + p * ldb + j * L);
    for (int i = 0; i < MR; ++i) {
      const B ai(a[i * ars + p * acs]);
      for (int j = 0; j < NB; ++j) r[i][j] = xsimd::fma(ai, bv[j], r[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) r[i][j].store_unaligned(c + i * ldc + j * L);
}

// Columns that do not fill a register: plain loops, same accumulation order.
template <class T>
inline void gemm_cols_scalar(std::int64_t m, std::int64_t n0, std::int64_t n, std::int64_t k,
                             const T* a, std::ptrdiff_t ars, std::ptrdiff_t acs, const T* b,
                             std::ptrdiff_t ldb, T* c, std::ptrdiff_t ldc,
                             bool accumulate) noexcept {
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = n0; j < n; ++j) {
      T s = accumulate ? c[i * ldc + j] : T(0);
      for (std::int64_t p = 0; p < k; ++p) s += a[i * ars + p * acs] * b[p * ldb + j];
      c[i * ldc + j] = s;
    }
  }
}

template <int MR, class Arch, class T>
inline void gemm_rows(std::int64_t n, std::int64_t k, const T* a, std::ptrdiff_t ars,
                      std::ptrdiff_t acs, const T* b, std::ptrdiff_t ldb, T* c, std::ptrdiff_t ldc,
                      bool accumulate) noexcept {
  constexpr std::int64_t L = xsimd::batch<T, Arch>::size;
  constexpr int NB = tile_batches<T, Arch>;
  std::int64_t j = 0;
  for (; j + NB * L <= n; j += NB * L)
    gemm_tile<MR, NB, Arch>(k, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);
  for (; j + L <= n; j += L)
    gemm_tile<MR, 1, Arch>(k, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);
  if (j < n) gemm_cols_scalar(MR, j, n, k, a, ars, acs, b, ldb, c, ldc, accumulate);
}

}  // namespace linear_detail

/// c: [m, n] (row stride ldc), b: [k, n] (row stride ldb), a(i, p) = a[i*ars + p*acs].
/// c = (accumulate ? c : 0) + a b, each element summed over p in increasing order.
/// b and c rows must be contiguous; a may have any strides (so a^T is free).
template <class Arch, class T>
void small_gemm(Arch, std::int64_t m, std::int64_t n, std::int64_t k, const T* a,
                std::ptrdiff_t ars, std::ptrdiff_t acs, const T* b, std::ptrdiff_t ldb, T* c,
                std::ptrdiff_t ldc, bool accumulate) noexcept {
  if constexpr (simd::is_scalar_v<Arch>) {
    linear_detail::gemm_cols_scalar(m, 0, n, k, a, ars, acs, b, ldb, c, ldc, accumulate);
  } else {
    std::int64_t i = 0;
    for (; i + 4 <= m; i += 4)
      linear_detail::gemm_rows<4, Arch>(n, k, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc,
                                        accumulate);
    for (; i < m; ++i)
      linear_detail::gemm_rows<1, Arch>(n, k, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc,
                                        accumulate);
  }
}

/// x, y: [n] contiguous; returns sum_i x[i] y[i] (lane-wise partial sums, then a fixed reduction).
template <class Arch, class T>
T linear_dot(Arch, const T* x, const T* y, std::int64_t n) noexcept {
  if constexpr (simd::is_scalar_v<Arch>) {
    T s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += x[i] * y[i];
    return s;
  } else {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    B acc(T(0));
    std::int64_t i = 0;
    for (; i + L <= n; i += L)
      acc = xsimd::fma(B::load_unaligned(x + i), B::load_unaligned(y + i), acc);
    T s = simd::hsum(acc);
    for (; i < n; ++i) s += x[i] * y[i];
    return s;
  }
}

/// y[0:n] += x[0:n], both contiguous.
template <class Arch, class T>
void linear_add(Arch, const T* x, T* y, std::int64_t n) noexcept {
  std::int64_t i = 0;
  if constexpr (!simd::is_scalar_v<Arch>) {
    using B = xsimd::batch<T, Arch>;
    for (; i + std::int64_t(B::size) <= n; i += B::size)
      (B::load_unaligned(y + i) + B::load_unaligned(x + i)).store_unaligned(y + i);
  }
  for (; i < n; ++i) y[i] += x[i];
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
