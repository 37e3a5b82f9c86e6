#pragma once
// Architecture tags and the few xsimd 8.1 shims switchyard needs.
//
// Every kernel is a template on `Arch`: an xsimd architecture (sse2, fma3<avx2>,
// avx512bw, ...) or simd::scalar, the plain C++ path (xsimd 8.1 has no scalar
// arch). The architecture is chosen at compile time from the consumer's flags
// (simd::default_arch); define SWITCHYARD_FORCE_SCALAR to use the scalar path.
// Anything that changes between xsimd versions (hadd -> reduce_add, ...) goes
// through this file so an xsimd upgrade touches one place.
#include <algorithm>
#include <cstddef>
#include <type_traits>

#include "switchyard/config.hpp"
#include "switchyard/core/diagnostics.hpp"

// xsimd brings in the compiler's intrinsic headers: see core/diagnostics.hpp.
SWITCHYARD_DIAGNOSTIC_PUSH
#include <xsimd/xsimd.hpp>
SWITCHYARD_DIAGNOSTIC_POP

// The instruction set this translation unit is compiled for, as a namespace
// name. Plain C++ code is auto-vectorised for the TU's flags too, so the scalar
// tag lives in this namespace: kernel<scalar> built with -march=native and with
// -march=x86-64 are then different symbols, and the linker cannot hand one TU
// the other's instructions (NOTES 2.8). xsimd's arch tags differ per ISA already.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SWITCHYARD_ARCH_NS isa_avx512bw
#elif defined(__AVX512F__)
#define SWITCHYARD_ARCH_NS isa_avx512f
#elif defined(__AVX2__) && defined(__FMA__)
#define SWITCHYARD_ARCH_NS isa_avx2_fma
#elif defined(__AVX2__)
#define SWITCHYARD_ARCH_NS isa_avx2
#elif defined(__AVX__)
#define SWITCHYARD_ARCH_NS isa_avx
#elif defined(__SSE4_2__)
#define SWITCHYARD_ARCH_NS isa_sse4_2
#elif defined(__SSE2__)
#define SWITCHYARD_ARCH_NS isa_sse2
#elif defined(__ARM_NEON)
#define SWITCHYARD_ARCH_NS isa_neon
#else
#define SWITCHYARD_ARCH_NS isa_generic
#endif

// gcc: no -Wmaybe-uninitialized / -Wuninitialized from the intrinsics inlined into these
// kernels (false positives in gcc 12's AVX-512 headers; see core/diagnostics.hpp).
SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace simd {
inline namespace SWITCHYARD_ARCH_NS {
/// The plain C++ path: one lane, no xsimd.
struct scalar {
  static constexpr const char* name() noexcept { return "scalar"; }
  static constexpr bool available() noexcept { return true; }
  static constexpr std::size_t alignment() noexcept { return alignof(double); }
};
}  // namespace SWITCHYARD_ARCH_NS

#if defined(SWITCHYARD_FORCE_SCALAR)
using default_arch = scalar;
#else
using default_arch = xsimd::default_arch;
#endif

template <class Arch>
inline constexpr bool is_scalar_v = std::is_same_v<Arch, scalar>;

namespace detail {
template <class T, class Arch, bool = is_scalar_v<Arch>>
struct lanes_of {
  static constexpr std::size_t value = 1;
};
template <class T, class Arch>
struct lanes_of<T, Arch, false> {
  static constexpr std::size_t value = xsimd::batch<T, Arch>::size;
};
}  // namespace detail

/// Lanes of one register of T on Arch (1 for scalar).
template <class T, class Arch>
inline constexpr std::size_t lanes_v = detail::lanes_of<T, Arch>::value;

/// Sum of the lanes of a batch (xsimd 8.1 calls it hadd; 9.0+ reduce_add).
template <class T, class A>
inline T hsum(const xsimd::batch<T, A>& b) noexcept {
#if XSIMD_VERSION_MAJOR >= 9
  return xsimd::reduce_add(b);
#else
  return xsimd::hadd(b);
#endif
}

/// Max of the lanes of a batch.
template <class T, class A>
inline T hmax(const xsimd::batch<T, A>& b) noexcept {
  alignas(64) T lanes[xsimd::batch<T, A>::size];
  b.store_aligned(lanes);
  T m = lanes[0];
  for (std::size_t i = 1; i < xsimd::batch<T, A>::size; ++i) m = std::max(m, lanes[i]);
  return m;
}

/// Lane i of the result is the sum of the lanes of rows[i], for size() rows: the transpose-add
/// that turns one accumulator per output into a vector of outputs. xsimd 8.1's haddp returns
/// the float AVX-512 sums in a permuted lane order (rows 0 1 4 5 2 3 6 7 ...), so that case is
/// done here: fold each pair of rows to 8 lanes, gather rows k, 4 + k, 8 + k, 12 + k into the
/// four 128-bit chunks of one vector, then a 4 x 4 transpose-add inside the chunks.
template <class T, class A>
inline xsimd::batch<T, A> hsum_rows(const xsimd::batch<T, A>* rows) noexcept {
#if defined(__AVX512F__) && XSIMD_VERSION_MAJOR < 9
  if constexpr (std::is_same_v<T, float> && std::is_base_of_v<xsimd::avx512f, A>) {
    // [a lo 8 + a hi 8, b lo 8 + b hi 8] as 128-bit chunks [a0+a2, a1+a3, b0+b2, b1+b3]
    const auto fold = [](__m512 a, __m512 b) {
      return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    };
    __m512 u[4];  // chunk j of u[k]: 4 partial sums of row 4j + k
    for (int k = 0; k < 4; ++k) {
      const __m512 ab = fold(rows[k], rows[4 + k]), cd = fold(rows[8 + k], rows[12 + k]);
      u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
    }
    const __m512 w01 = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 w23 = _mm512_add_ps(_mm512_shuffle_ps(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_ps(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
  }
#endif
  return xsimd::haddp(rows);
}

/// One xsimd architecture per instruction-set level that changes switchyard's code: the
/// default architecture of a build at that level (-march=x86-64-v4 or any AVX-512 CPU since
/// Skylake-SP, x86-64-v3, AVX, x86-64-v2, SSE2; AArch64 and 32-bit NEON). The levels
/// between them (sse3, ssse3, sse4_1; avx2 without FMA, fma3<avx>; avx512f/cd/dq) run the
/// same register width, FMA or not, and the same code of ours as one of these.
template <class... Archs>
struct arch_set {};
using level_architectures = arch_set<xsimd::avx512bw, xsimd::fma3<xsimd::avx2>, xsimd::avx,
                                     xsimd::sse4_2, xsimd::sse2, xsimd::neon64, xsimd::neon>;

namespace detail {
// Walks the arch list ourselves: xsimd 8.1's arch_list::for_each is noexcept, so
// an exception from f (a failed Catch2 REQUIRE) would std::terminate the run. Archs the
// translation unit's flags do not allow are never instantiated.
template <class A, class F>
void call_if_available(F& f) {
  if constexpr (A::supported()) {
    if (A::available()) f(A{});
  }
}
template <class F, class... Archs>
void for_each_available(F& f, arch_set<Archs...>) {
  (call_if_available<Archs>(f), ...);
}
template <class A, class... Archs>
constexpr bool in_list(arch_set<Archs...>) noexcept {
  return (std::is_same_v<A, Archs> || ...);
}
}  // namespace detail

/// Calls f(arch) for simd::scalar, for each of level_architectures that this translation
/// unit's flags allow and this CPU runs, and for simd::default_arch when it is none of them
/// (a build for AVX-512F without BW, say): every path the build can take, each once. Used by
/// the tests.
template <class F>
void for_each_arch(F&& f) {
  f(scalar{});
  detail::for_each_available(f, level_architectures{});
  if constexpr (!is_scalar_v<default_arch> &&
                !detail::in_list<default_arch>(level_architectures{})) {
    if (default_arch::available()) f(default_arch{});
  }
}

}  // namespace simd
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
