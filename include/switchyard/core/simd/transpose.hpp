#pragma once
// Register transposes of square float blocks (AVX-512 16 x 16, AVX 8 x 8): the weight
// packing of the packed GEMM (gemm_packed.hpp), the row tiles of lane top-k
// (topk_lanes.hpp) and the key packs of structured attention (block_sparse.hpp,
// neighborhood_kernels.hpp) move data between rows and columns with them.
#include <cstdint>
#include <type_traits>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/simd/arch.hpp"

SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace kernels {

#if defined(__AVX512F__)
/// dst[q * ldd + i] = lane q of r[i]: the 16 x 16 block held in registers (row i in r[i]),
/// transposed into memory; each output row stores only the lanes in `lanes` (a packing of
/// fewer than 16 rows stores their width). r is clobbered.
template <class Arch>
void transpose16x16_registers(Arch, __m512 (&r)[16], float* dst, std::int64_t ldd,
                              __mmask16 lanes = 0xFFFF) noexcept {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  const auto store = [&](float* p, __m512 v) {
    if (lanes == 0xFFFF) {
      _mm512_storeu_ps(p, v);
    } else {
      _mm512_mask_storeu_ps(p, lanes, v);
    }
  };
  // r[4i + j], 128-bit lane L: rows 4i..4i+3 of column 4L + j.
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    const __m512 b = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    const __m512 d = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    store(dst + (0 + j) * ldd, _mm512_shuffle_f32x4(a, c, 0x88));
    store(dst + (8 + j) * ldd, _mm512_shuffle_f32x4(a, c, 0xDD));
    store(dst + (4 + j) * ldd, _mm512_shuffle_f32x4(b, d, 0x88));
    store(dst + (12 + j) * ldd, _mm512_shuffle_f32x4(b, d, 0xDD));
  }
}

/// dst[q * ldd + r] = src[r * lds + q] for a 16 x 16 float block.
template <class Arch>
void transpose16x16(Arch arch, const float* src, std::int64_t lds, float* dst,
                    std::int64_t ldd) noexcept {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  transpose16x16_registers(arch, r, dst, ldd);
}
#endif

#if defined(__AVX__)
/// dst[q * ldd + r] = src[r * lds + q] for an 8 x 8 float block.
template <class Arch>
void transpose8x8(Arch, const float* src, std::int64_t lds, float* dst, std::int64_t ldd) noexcept {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[4i + j], 128-bit lane L: rows 4i..4i+3 of column 4L + j.
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ldd, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
    _mm256_storeu_ps(dst + (4 + j) * ldd, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
  }
}
#endif

/// dst[c * ldd + j] = src[j * lds + c] for j < L rows and c < D, L = the float lanes of Arch:
/// register transposes of L x L blocks where the build has them (float with AVX-512 or AVX),
/// the last D % L columns element by element. Returns false, writing nothing, where it has
/// none (the caller transposes element by element).
template <class T, class Arch>
bool transpose_rows(const T* src, std::int64_t lds, T* dst, std::int64_t ldd,
                    std::int64_t D) noexcept {
  constexpr std::int64_t L = std::int64_t(simd::lanes_v<T, Arch>);
  std::int64_t c = 0;
  if constexpr (std::is_same_v<T, float> && L == 16) {
#if defined(__AVX512F__)
    for (; c + 16 <= D; c += 16) transpose16x16(Arch{}, src + c, lds, dst + c * ldd, ldd);
#else
    return false;
#endif
  } else if constexpr (std::is_same_v<T, float> && L == 8) {
#if defined(__AVX__)
    for (; c + 8 <= D; c += 8) transpose8x8(Arch{}, src + c, lds, dst + c * ldd, ldd);
#else
    return false;
#endif
  } else {
    (void)src, (void)lds, (void)dst, (void)ldd, (void)D;
    return false;
  }
  for (; c < D; ++c)
    for (std::int64_t j = 0; j < L; ++j) dst[c * ldd + j] = src[j * lds + c];
  return true;
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
