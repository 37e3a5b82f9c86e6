#pragma once
// Non-temporal stores: for output rows written whole and not read back soon, they skip reading
// each line before writing it (a plain store's read for ownership) and leave the cache to the
// data still in use. x86 only (movntps / movntpd); elsewhere a plain aligned store.
// Non-temporal stores are weakly ordered: call stream_fence() before the data is handed to
// another thread.
#include <cstdint>
#include <type_traits>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/simd/arch.hpp"

SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace simd {

/// Whether store_stream<Arch, T> writes with a non-temporal hint (else it is a plain store).
template <class Arch, class T>
constexpr bool has_stream_store() noexcept {
  if constexpr (is_scalar_v<Arch> || !(std::is_same_v<T, float> || std::is_same_v<T, double>)) {
    return false;
  } else {
    constexpr std::size_t bytes = xsimd::batch<T, Arch>::size * sizeof(T);
#if defined(__AVX512F__)
    if (bytes == 64) return true;
#endif
#if defined(__AVX__)
    if (bytes == 32) return true;
#endif
#if defined(__SSE2__)
    if (bytes == 16) return true;
#endif
    return false;
  }
}

/// Stores x at p (aligned to the register's size) with a non-temporal hint where
/// has_stream_store<Arch, T>().
template <class Arch, class T>
inline void store_stream(T* p, const xsimd::batch<T, Arch>& x) noexcept {
  if constexpr (has_stream_store<Arch, T>()) {
    constexpr std::size_t bytes = xsimd::batch<T, Arch>::size * sizeof(T);
    if constexpr (bytes == 64) {
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>)
        _mm512_stream_ps(p, x);
      else
        _mm512_stream_pd(p, x);
#endif
    } else if constexpr (bytes == 32) {
#if defined(__AVX__)
      if constexpr (std::is_same_v<T, float>)
        _mm256_stream_ps(p, x);
      else
        _mm256_stream_pd(p, x);
#endif
    } else {
#if defined(__SSE2__)
      if constexpr (std::is_same_v<T, float>)
        _mm_stream_ps(p, x);
      else
        _mm_stream_pd(p, x);
#endif
    }
  } else {
    x.store_aligned(p);
  }
}

/// Orders earlier non-temporal stores before later stores (x86 sfence; nothing elsewhere).
inline void stream_fence() noexcept {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace simd
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
