#pragma once
// Online (streaming) softmax: the update fused attention applies to each block
// of scores, so a row of T x S scores is never stored whole (Milakov &
// Gimelshein 2018; FlashAttention).
//
// Per query row it keeps the running max m and the running sum l of
// 2^(s - m) over the keys seen so far, and an accumulator acc = sum p_j v_j.
// For a new block of scores s_j:
//   m' = max(m, max_j s_j);  alpha = 2^(m - m');  p_j = 2^(s_j - m')
//   l' = l * alpha + sum_j p_j;  the caller sets acc' = acc * alpha + sum_j p_j v_j
// and at the end out = acc / l.
// Scores are in base-2 units: the caller folds log2(e) into them (attention
// folds it into Q together with the 1/sqrt(D) scale), so each exponential is a
// cheap exp2 of a non-positive argument.
//
// Fully masked rows: while every score seen is -inf, m stays -inf, l stays 0,
// p = 0 and alpha = 1 (2^(-inf - -inf) is never evaluated), and finish() gives
// exact zeros. Once m is finite, -inf scores give p = 0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/exp.hpp"
#include "switchyard/core/simd/stream_store.hpp"

// gcc: no -Wmaybe-uninitialized / -Wuninitialized from the intrinsics inlined into these
// kernels (false positives in gcc 12's AVX-512 headers; see core/diagnostics.hpp).
SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace simd {

namespace detail {
// Cephes exp2f minimax coefficients for 2^f - 1 = f * P(f), |f| <= 1/2; relative
// error below 2e-7 (about 2 ulp in float).
template <class V>
inline V exp2_poly_f(const V& f) noexcept {
  V p(1.535336188319500e-4f);
  p = madd(p, f, V(1.339887440266574e-3f));
  p = madd(p, f, V(9.618437357674640e-3f));
  p = madd(p, f, V(5.550332471162809e-2f));
  p = madd(p, f, V(2.402264791363012e-1f));
  p = madd(p, f, V(6.931472028550421e-1f));
  return madd(p, f, V(1.0f));
}
}  // namespace detail

/// 2^x for x <= 0 (including -inf, which gives 0); results below 2^-126 flush
/// to 0. Float: ~2 ulp (one polynomial, no range reduction branches). Double:
/// via exp(x ln 2), relative error ~|x| * 1e-16 plus exp's 2 ulp. Not for x > 0.
template <class A>
inline xsimd::batch<float, A> exp2_nonpositive(const xsimd::batch<float, A>& x) noexcept {
  using V = xsimd::batch<float, A>;
  using I = xsimd::batch<std::int32_t, A>;
  const V xc = xsimd::max(x, V(-127.0f));
  const V t = xc + V(12582912.0f);  // 1.5 * 2^23: the integer round(xc) sits in the low bits
  const V n = t - V(12582912.0f);
  const V p = detail::exp2_poly_f(xc - n);
  // (n + 127) << 23 is 2^n; n = -127 gives the bit pattern 0, so 2^-127 -> 0.
  const I bits = (xsimd::bitwise_cast<I>(t) << 23) + I(127 << 23);
  return p * xsimd::bitwise_cast<V>(bits);
}
template <class A>
inline xsimd::batch<double, A> exp2_nonpositive(const xsimd::batch<double, A>& x) noexcept {
  return simd::exp(x * xsimd::batch<double, A>(0.69314718055994530942));
}
/// Scalar twin of exp2_nonpositive.
inline float exp2_nonpositive(float x) noexcept {
  // NaN stays NaN; the clamp keeps the int conversion below defined for any input (+inf
  // from a NaN-free but overflowing score gives a large finite value, not UB).
  if (std::isnan(x)) return x;
  const float xc = std::clamp(x, -127.0f, 127.0f);
  const float n = std::nearbyint(xc);
  if (n <= -127.0f) return 0.0f;
  return std::ldexp(detail::exp2_poly_f(xc - n), static_cast<int>(n));
}
inline double exp2_nonpositive(double x) noexcept { return simd::exp(x * 0.69314718055994530942); }

}  // namespace simd

namespace kernels {

/// online_softmax_update (below) for a caller that already knows block_max, the
/// largest of s[0 .. n) (attention's score tile takes it from its registers).
template <class Arch, class T>
T online_softmax_update_with_max(Arch, T* s, std::int64_t n, T block_max, T& m, T& l) noexcept {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  std::int64_t j = 0;
  const T m_new = std::max(m, block_max);
  if (m_new == neg_inf) {  // nothing seen yet: keep m = -inf, l = 0
    for (std::int64_t i = 0; i < n; ++i) s[i] = T(0);
    return T(1);
  }
  const T alpha = simd::exp2_nonpositive(m - m_new);
  T sum(0);
  j = 0;
  if constexpr (!simd::is_scalar_v<Arch>) {
    using V = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = V::size;
    const V mv(m_new);
    V acc0(T(0)), acc1(T(0));
    for (; j + 2 * L <= n; j += 2 * L) {
      const V p0 = simd::exp2_nonpositive(V::load_unaligned(s + j) - mv);
      const V p1 = simd::exp2_nonpositive(V::load_unaligned(s + j + L) - mv);
      p0.store_unaligned(s + j);
      p1.store_unaligned(s + j + L);
      acc0 += p0;
      acc1 += p1;
    }
    for (; j + L <= n; j += L) {
      const V p = simd::exp2_nonpositive(V::load_unaligned(s + j) - mv);
      p.store_unaligned(s + j);
      acc0 += p;
    }
    sum = simd::hsum(acc0 + acc1);
  }
  for (; j < n; ++j) {
    const T p = simd::exp2_nonpositive(s[j] - m_new);
    s[j] = p;
    sum += p;
  }
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

/// s: [n] scores of one row in base-2 units; m, l: the row's running max and
/// sum (start at -inf and 0). Overwrites s with p_j = 2^(s_j - m'), updates m and
/// l, and returns alpha = 2^(m - m'), the factor the caller multiplies its
/// accumulator row by before adding sum_j p_j v_j. NaN scores give NaN.
template <class Arch, class T>
T online_softmax_update(Arch, T* s, std::int64_t n, T& m, T& l) noexcept {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  T block_max = neg_inf;
  std::int64_t j = 0;
  if constexpr (!simd::is_scalar_v<Arch>) {
    using V = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = V::size;
    if (n >= L) {
      V mv(neg_inf);
      for (; j + L <= n; j += L) mv = xsimd::max(mv, V::load_unaligned(s + j));
      block_max = simd::hmax(mv);
    }
  }
  for (; j < n; ++j) block_max = std::max(block_max, s[j]);
  return online_softmax_update_with_max(Arch{}, s, n, block_max, m, l);
}

/// acc: [d]; out: [d] with element stride out_stride. out = acc / l, or exact
/// zeros when l == 0 (the row saw no key).
template <class Arch, class T>
void online_softmax_finish(Arch, const T* acc, std::int64_t d, T l, T* out,
                           std::int64_t out_stride = 1) noexcept {
  const T inv = l > T(0) ? T(1) / l : T(0);
  std::int64_t j = 0;
  if constexpr (!simd::is_scalar_v<Arch>) {
    using V = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = V::size;
    if (out_stride == 1) {
      for (; j + L <= d; j += L) (V::load_unaligned(acc + j) * V(inv)).store_unaligned(out + j);
    }
  }
  for (; j < d; ++j) out[j * out_stride] = acc[j] * inv;
}

/// As online_softmax_finish (the same values), with non-temporal stores (simd::store_stream)
/// where out is contiguous, aligned to the register and d a multiple of its width: for rows
/// written once and not read back soon. Call simd::stream_fence() before another thread reads
/// out.
template <class Arch, class T>
void online_softmax_finish_stream(Arch arch, const T* acc, std::int64_t d, T l, T* out,
                                  std::int64_t out_stride = 1) noexcept {
  if constexpr (simd::has_stream_store<Arch, T>()) {
    using V = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = V::size;
    if (out_stride == 1 && d % L == 0 &&
        reinterpret_cast<std::uintptr_t>(out) % (L * sizeof(T)) == 0) {
      const T inv = l > T(0) ? T(1) / l : T(0);
      for (std::int64_t j = 0; j < d; j += L)
        simd::store_stream<Arch, T>(out + j, V::load_unaligned(acc + j) * V(inv));
      return;
    }
  }
  online_softmax_finish(arch, acc, d, l, out, out_stride);
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
