#pragma once
// Vectorised exp for float and double, used by softmax and fused attention.
//
// Method: x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite two-constant reduction),
// exp(r) by a polynomial (float: Cephes expf's degree-5 minimax; double:
// degree-13 Taylor), times 2^n built from the exponent bits.
// Error bound (tested against std::exp in long double in test_simd_exp.cpp, on
// every arch and the scalar twin): at most 2 ulp for results in the normal range.
// Worst seen on ~400k points: 1.22 ulp (float) and 1.21 ulp (double) when the
// multiply-adds are fused (FMA archs, the scalar twin's std::fma, or SSE archs
// in a TU where the compiler contracts a*b+c); 1.26 and 1.23 ulp when they are
// not (-march=x86-64, where xsimd::fma is a multiply then an add).
// Results below 2^-0.5 times the smallest normal number flush to +0 (so
// exp(-inf) = 0); between that and the smallest normal they are subnormal,
// within two subnormal steps of the true value. Results above the largest
// finite number give +inf, and NaN stays NaN.
#include <cmath>
#include <cstdint>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/simd/arch.hpp"

// gcc: no -Wmaybe-uninitialized / -Wuninitialized from the intrinsics inlined into these
// kernels (false positives in gcc 12's AVX-512 headers; see core/diagnostics.hpp).
SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace simd {

namespace detail {
template <class T>
struct exp_constants;
template <>
struct exp_constants<float> {
  using int_type = std::int32_t;
  static constexpr float lo = -88.0f;          // n = -127: scale is +0
  static constexpr float hi = 88.73f;          // just past log(FLT_MAX); overflows to inf
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23: rounds to an integer in the low bits
  static constexpr int mantissa_bits = 23;
  static constexpr int bias = 127;
  static constexpr float max_n = 127.0f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;
  static constexpr float ln2_lo = -2.12194440e-4f;
};
template <>
struct exp_constants<double> {
  using int_type = std::int64_t;
  static constexpr double lo = -709.0;  // n = -1023: scale is +0
  static constexpr double hi = 709.79;
  static constexpr double magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int mantissa_bits = 52;
  static constexpr int bias = 1023;
  static constexpr double max_n = 1023.0;
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 0.693145751953125;
  static constexpr double ln2_lo = 1.42860682030941723212e-6;
};

template <class T>
inline T madd(T a, T b, T c) noexcept {
  return std::fma(a, b, c);
}
template <class T, class A>
inline xsimd::batch<T, A> madd(const xsimd::batch<T, A>& a, const xsimd::batch<T, A>& b,
                               const xsimd::batch<T, A>& c) noexcept {
  return xsimd::fma(a, b, c);
}

// exp(r) for |r| <= ln2/2; V is float or double, scalar or batch.
template <class V>
inline V exp_poly(const V& r, float) noexcept {
  V p(1.9875691500e-4f);
  p = madd(p, r, V(1.3981999507e-3f));
  p = madd(p, r, V(8.3334519073e-3f));
  p = madd(p, r, V(4.1665795894e-2f));
  p = madd(p, r, V(1.6666665459e-1f));
  p = madd(p, r, V(5.0000001201e-1f));
  return madd(p, r * r, r + V(1.0f));
}
template <class V>
inline V exp_poly(const V& r, double) noexcept {
  // Taylor coefficients 1/k!, k = 13 .. 2.
  constexpr double c[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                          1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,
                          1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,        0.5};
  V p(c[0]);
  for (int i = 1; i < 12; ++i) p = madd(p, r, V(c[i]));
  return madd(p, r * r, r + V(1.0));
}
}  // namespace detail

/// exp of every lane (see the file comment for the error bound and edge cases).
template <class T, class A>
inline xsimd::batch<T, A> exp(const xsimd::batch<T, A>& x) noexcept {
  using V = xsimd::batch<T, A>;
  using C = detail::exp_constants<T>;
  using I = xsimd::batch<typename C::int_type, A>;
  const V xc = xsimd::min(xsimd::max(x, V(C::lo)), V(C::hi));
  const V t = xsimd::fma(xc, V(C::log2e), V(C::magic));
  const V n = t - V(C::magic);  // round(x * log2(e))
  V r = xsimd::fnma(n, V(C::ln2_hi), xc);
  r = xsimd::fnma(n, V(C::ln2_lo), r);
  const V p = detail::exp_poly(r, T{});
  // 2^min(n, max_n) from the exponent bits; n = max_n + 1 needs one more doubling.
  const V n_capped = xsimd::min(n, V(C::max_n));
  const I bits =
      xsimd::bitwise_cast<I>(n_capped + V(C::magic)) - xsimd::bitwise_cast<I>(V(C::magic));
  const V scale = xsimd::bitwise_cast<V>((bits + I(C::bias)) << C::mantissa_bits);
  V y = p * scale;
  y = xsimd::select(n > V(C::max_n), y + y, y);
  return xsimd::select(xsimd::isnan(x), x, y);
}

/// Scalar twin of simd::exp with the same algorithm (the scalar path's exp).
template <class T>
inline T exp(T x) noexcept {
  using C = detail::exp_constants<T>;
  if (std::isnan(x)) return x;
  const T xc = std::min(std::max(x, C::lo), C::hi);
  const T n = std::nearbyint(xc * C::log2e);
  T r = std::fma(-n, C::ln2_hi, xc);
  r = std::fma(-n, C::ln2_lo, r);
  const T p = detail::exp_poly(r, T{});
  const T y = std::ldexp(p, static_cast<int>(std::min(n, C::max_n)));
  return n > C::max_n ? y + y : (n <= -C::bias ? T(0) : y);
}

}  // namespace simd
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
