#pragma once
// One register of float from bf16 storage: a bf16 is the upper half of the float it stands for,
// so widening is a zero extension and a shift (exact). Used where kernels stream bf16 data that
// they compute on in float (a bf16 KV cache, attention/decode_kernels.hpp).
#include <cstdint>
#include <type_traits>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/simd/arch.hpp"

SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace simd {

/// The L = batch<float, Arch>::size values p[0 .. L) as floats; p needs no alignment.
template <class Arch>
inline xsimd::batch<float, Arch> load_widened(const bf16* p) noexcept {
  using V = xsimd::batch<float, Arch>;
#if defined(__AVX512F__)
  if constexpr (std::is_base_of_v<xsimd::avx512f, Arch>) {
    const __m512i w =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return V(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
#endif
#if defined(__AVX2__)
  if constexpr (std::is_base_of_v<xsimd::avx2, Arch>) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return V(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_base_of_v<xsimd::sse2, Arch> && V::size == 4) {
    // Interleaving zeros below each 16-bit value puts it in the upper half of a 32-bit lane.
    const __m128i w = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return V(_mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), w)));
  }
#endif
  alignas(64) float tmp[V::size];
  for (std::size_t i = 0; i < V::size; ++i) tmp[i] = to_float(p[i]);
  return V::load_aligned(tmp);
}

}  // namespace simd
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
