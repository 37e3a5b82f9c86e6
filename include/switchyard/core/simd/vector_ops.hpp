#pragma once
// Level-1 vector kernels on contiguous arrays: dot, axpy, scale, row_max, row_sum.
//
// Each is a template on Arch (an xsimd architecture or simd::scalar) and on T
// (float or double), takes raw pointers plus a length n >= 0 and handles any n
// (full registers first, then a scalar tail). Reductions keep four independent
// accumulators so the adds are not one long dependency chain; their result
// therefore depends on Arch (summation order), but not on the thread count.
// Loads and stores are unaligned: head slices of a view are rarely aligned.
#include <cstdint>
#include <limits>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/simd/arch.hpp"

// gcc: no -Wmaybe-uninitialized / -Wuninitialized from the intrinsics inlined into these
// kernels (false positives in gcc 12's AVX-512 headers; see core/diagnostics.hpp).
SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace kernels {

/// a: [n], b: [n]; returns sum_i a[i] * b[i] (0 for n = 0).
template <class Arch, class T>
T dot(Arch, const T* a, const T* b, std::int64_t n) noexcept {
  std::int64_t i = 0;
  if constexpr (simd::is_scalar_v<Arch>) {
    T s0(0), s1(0), s2(0), s3(0);
    for (; i + 4 <= n; i += 4) {
      s0 += a[i] * b[i];
      s1 += a[i + 1] * b[i + 1];
      s2 += a[i + 2] * b[i + 2];
      s3 += a[i + 3] * b[i + 3];
    }
    T s = (s0 + s1) + (s2 + s3);
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
  } else {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    B s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
    for (; i + 4 * L <= n; i += 4 * L) {
      s0 = xsimd::fma(B::load_unaligned(a + i), B::load_unaligned(b + i), s0);
      s1 = xsimd::fma(B::load_unaligned(a + i + L), B::load_unaligned(b + i + L), s1);
      s2 = xsimd::fma(B::load_unaligned(a + i + 2 * L), B::load_unaligned(b + i + 2 * L), s2);
      s3 = xsimd::fma(B::load_unaligned(a + i + 3 * L), B::load_unaligned(b + i + 3 * L), s3);
    }
    for (; i + L <= n; i += L) {
      s0 = xsimd::fma(B::load_unaligned(a + i), B::load_unaligned(b + i), s0);
    }
    T s = simd::hsum((s0 + s1) + (s2 + s3));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
  }
}

/// x: [n], y: [n]; y[i] += alpha * x[i]. x and y must not partially overlap.
template <class Arch, class T>
void axpy(Arch, T alpha, const T* x, T* y, std::int64_t n) noexcept {
  std::int64_t i = 0;
  if constexpr (!simd::is_scalar_v<Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    const B a(alpha);
    for (; i + 2 * L <= n; i += 2 * L) {
      const B y0 = xsimd::fma(a, B::load_unaligned(x + i), B::load_unaligned(y + i));
      const B y1 = xsimd::fma(a, B::load_unaligned(x + i + L), B::load_unaligned(y + i + L));
      y0.store_unaligned(y + i);
      y1.store_unaligned(y + i + L);
    }
    for (; i + L <= n; i += L) {
      xsimd::fma(a, B::load_unaligned(x + i), B::load_unaligned(y + i)).store_unaligned(y + i);
    }
  }
  for (; i < n; ++i) y[i] += alpha * x[i];
}

/// x: [n]; x[i] *= alpha.
template <class Arch, class T>
void scale(Arch, T alpha, T* x, std::int64_t n) noexcept {
  std::int64_t i = 0;
  if constexpr (!simd::is_scalar_v<Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    const B a(alpha);
    for (; i + 2 * L <= n; i += 2 * L) {
      const B x0 = B::load_unaligned(x + i) * a;
      const B x1 = B::load_unaligned(x + i + L) * a;
      x0.store_unaligned(x + i);
      x1.store_unaligned(x + i + L);
    }
    for (; i + L <= n; i += L) (B::load_unaligned(x + i) * a).store_unaligned(x + i);
  }
  for (; i < n; ++i) x[i] *= alpha;
}

/// x: [n]; returns max_i x[i], -inf for n = 0. NaN entries may or may not be
/// propagated (x86 max instructions drop one side), so callers that care check
/// for NaN themselves.
template <class Arch, class T>
T row_max(Arch, const T* x, std::int64_t n) noexcept {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  std::int64_t i = 0;
  T m = ninf;
  if constexpr (simd::is_scalar_v<Arch>) {
    T m0 = ninf, m1 = ninf;
    for (; i + 2 <= n; i += 2) {
      m0 = x[i] > m0 ? x[i] : m0;
      m1 = x[i + 1] > m1 ? x[i + 1] : m1;
    }
    m = m0 > m1 ? m0 : m1;
  } else {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    B m0(ninf), m1(ninf), m2(ninf), m3(ninf);
    for (; i + 4 * L <= n; i += 4 * L) {
      m0 = xsimd::max(m0, B::load_unaligned(x + i));
      m1 = xsimd::max(m1, B::load_unaligned(x + i + L));
      m2 = xsimd::max(m2, B::load_unaligned(x + i + 2 * L));
      m3 = xsimd::max(m3, B::load_unaligned(x + i + 3 * L));
    }
    for (; i + L <= n; i += L) m0 = xsimd::max(m0, B::load_unaligned(x + i));
    m = simd::hmax(xsimd::max(xsimd::max(m0, m1), xsimd::max(m2, m3)));
  }
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

/// x: [n] without NaN, n >= 1 (n >= 2 when skip is in range): the index of the first
/// maximum among the entries other than `skip` (-1: none skipped), ties toward the lower
/// index. A vector max, then a scan for the first index holding it: no data-dependent
/// branch per element (the scan's exit is taken once).
template <class Arch, class T>
std::int64_t argmax_first(Arch arch, const T* x, std::int64_t n, std::int64_t skip = -1) noexcept {
  T m;
  if (skip >= 0 && skip < n) {
    const T a = row_max(arch, x, skip), b = row_max(arch, x + skip + 1, n - skip - 1);
    m = a > b ? a : b;
  } else {
    m = row_max(arch, x, n);
  }
  for (std::int64_t i = 0; i < n; ++i)
    if (x[i] == m && i != skip) return i;
  return skip == 0 ? 1 : 0;  // unreachable without NaN
}

/// x: [n]; returns sum_i x[i] (0 for n = 0).
template <class Arch, class T>
T row_sum(Arch, const T* x, std::int64_t n) noexcept {
  std::int64_t i = 0;
  if constexpr (simd::is_scalar_v<Arch>) {
    T s0(0), s1(0), s2(0), s3(0);
    for (; i + 4 <= n; i += 4) {
      s0 += x[i];
      s1 += x[i + 1];
      s2 += x[i + 2];
      s3 += x[i + 3];
    }
    T s = (s0 + s1) + (s2 + s3);
    for (; i < n; ++i) s += x[i];
    return s;
  } else {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    B s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
    for (; i + 4 * L <= n; i += 4 * L) {
      s0 += B::load_unaligned(x + i);
      s1 += B::load_unaligned(x + i + L);
      s2 += B::load_unaligned(x + i + 2 * L);
      s3 += B::load_unaligned(x + i + 3 * L);
    }
    for (; i + L <= n; i += L) s0 += B::load_unaligned(x + i);
    T s = simd::hsum((s0 + s1) + (s2 + s3));
    for (; i < n; ++i) s += x[i];
    return s;
  }
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
