#pragma once
// Register-level building blocks shared by the fused attention kernels (dense.hpp and the
// split-KV decode kernel, decode_kernels.hpp): one register type per Arch (scalar: T), the
// P . V tile update of the online softmax, and the per-key attention mass of a score row.
#include <cmath>
#include <cstdint>
#include <vector>

#include "switchyard/core/half.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/online_softmax.hpp"
#include "switchyard/core/simd/widen.hpp"

namespace switchyard {
inline namespace v0 {
namespace kernels {
namespace detail {

// Register-level operations, so one micro-kernel serves every Arch (scalar: T).
template <class T, class Arch, bool = simd::is_scalar_v<Arch>>
struct Reg {
  using V = xsimd::batch<T, Arch>;
  static constexpr std::int64_t lanes = V::size;
  static V zero() noexcept { return V(T(0)); }
  static V load(const T* p) noexcept { return V::load_aligned(p); }
  static void store(T* p, const V& x) noexcept { x.store_aligned(p); }
  static V splat(T x) noexcept { return V(x); }
  static V fma(const V& a, const V& b, const V& c) noexcept { return xsimd::fma(a, b, c); }
  static V load(const bf16* p) noexcept { return simd::load_widened<Arch>(p); }  // T = float
};
template <class T, class Arch>
struct Reg<T, Arch, true> {
  using V = T;
  static constexpr std::int64_t lanes = 1;
  static V zero() noexcept { return T(0); }
  static V load(const T* p) noexcept { return *p; }
  static void store(T* p, V x) noexcept { *p = x; }
  static V splat(T x) noexcept { return x; }
  // An explicit fused multiply-add where the target has one: `a * b + c` would be contracted
  // into one, or not, as the compiler vectorises each instantiation (gnu++20 -O3), so the
  // same values could round differently in two kernels of the same arch.
  static V fma(V a, V b, V c) noexcept {
#if defined(__FMA__)
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
  }
  static V load(const bf16* p) noexcept { return to_float(*p); }
};

// o[r][0 .. NV*L) = o[r] * alpha[r] + sum_{j < nk} p[r][j] * vp[j][0 .. NV*L).
// vp: values stored as T (64-byte aligned rows), or as bf16 for T = float (widened on load).
// ahead (optional): n_ahead rows of ahead_stride elements the caller reads next; row j is
// fetched into the cache while key j is accumulated (the decode kernel's next keys).
template <class Arch, class T, int MR, int NV, class S = T>
inline void value_tile(const T* p, std::int64_t p_stride, const T* alpha, std::int64_t nk,
                       const S* vp, std::int64_t v_stride, T* o, std::int64_t o_stride,
                       const S* ahead = nullptr, std::int64_t ahead_stride = 0,
                       std::int64_t n_ahead = 0) noexcept {
  using R = Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes;
  constexpr std::int64_t line = 64 / sizeof(S);
  typename R::V acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    const auto a = R::splat(alpha[r]);
    for (int n = 0; n < NV; ++n) acc[r][n] = R::load(o + r * o_stride + n * L) * a;
  }
  for (std::int64_t j = 0; j < nk; ++j) {
    if (j < n_ahead)
      for (std::int64_t q = 0; q < ahead_stride; q += line)
        __builtin_prefetch(ahead + j * ahead_stride + q, 0, 3);
    typename R::V vv[NV];
    for (int n = 0; n < NV; ++n) vv[n] = R::load(vp + j * v_stride + n * L);
    for (int r = 0; r < MR; ++r) {
      const auto pb = R::splat(p[r * p_stride + j]);
      for (int n = 0; n < NV; ++n) acc[r][n] = R::fma(pb, vv[n], acc[r][n]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NV; ++n) R::store(o + r * o_stride + n * L, acc[r][n]);
}

// mass[j] += 2^(s[j] - m) * inv_l for j < n; s: base-2 scores with m their row's final max,
// so every exponent is <= 0 (-inf scores add 0).
template <class Arch, class T>
inline void add_key_mass(const T* s, std::int64_t n, T m, T inv_l, T* mass) noexcept {
  std::int64_t j = 0;
  if constexpr (!simd::is_scalar_v<Arch>) {
    using V = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = V::size;
    const V mv(m), il(inv_l);
    for (; j + L <= n; j += L) {
      const V p = simd::exp2_nonpositive(V::load_unaligned(s + j) - mv) * il;
      (V::load_unaligned(mass + j) + p).store_unaligned(mass + j);
    }
  }
  for (; j < n; ++j) mass[j] += simd::exp2_nonpositive(s[j] - m) * inv_l;
}

template <class T>
using aligned_vector = std::vector<T, xsimd::aligned_allocator<T, 64>>;

}  // namespace detail
}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
