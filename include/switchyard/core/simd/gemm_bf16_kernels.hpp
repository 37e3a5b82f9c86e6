#pragma once
// bf16 GEMM kernels: a 32 x 32 block of C (float) += A (bf16) B (bf16), accumulated in float.
//  - AMX: TDPBF16PS on four 16 x 16 float tiles, where the build targets AMX and the OS grants
//    the tile state (simd/amx.hpp);
//  - AVX512-BF16: VDPBF16PS with the block in registers, 8 rows x 32 columns at a time.
// Both read one packed layout, 32 values of k ("a step") at a time:
//  - A: panels of 32 rows; per step two 16-row tiles of [row][32 k] (64 bytes per row);
//  - B: panels of 32 columns; per step two 16-column tiles of [k pair][column][2] ("VNNI":
//    the two k of a pair side by side, 64 bytes per k pair).
// Both instructions multiply bf16 pairs exactly and add in float; denormal inputs count as
// zero and denormal results flush to zero (Intel SDM), so the error bound is float
// accumulation's: |C - A B| <= K * 2^-24 * sum_k |A_ik B_kj| for normal data.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/simd/amx.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/transpose.hpp"

SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace kernels {
// The arch namespace (simd/arch.hpp): these plain functions differ with the instruction set.
inline namespace SWITCHYARD_ARCH_NS {

/// Rows / columns of a C block, k per step, and bf16 values per packed step of a panel.
inline constexpr std::int64_t bf16_block = 32;
inline constexpr std::int64_t bf16_step = 32;
inline constexpr std::int64_t bf16_panel_step = bf16_block * bf16_step;

/// Whether this build has the AVX512-BF16 block kernel.
inline constexpr bool avx512_bf16_compiled =
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    true;
#else
    false;
#endif

/// Packs op(A)(i, p) = a[r(i) * rsa + p * csa], i < m, p < k, r(i) = rows ? rows[i] : i (a
/// token gather), into panels of 32 rows by `steps` steps of 32 (zeros past m and k): panel
/// i / 32 at dst + (i / 32) * steps * 1024. S: bf16 (copied) or float (rounded to the nearest
/// bf16, ties to even, as bf16::from_float).
template <class S>
void pack_bf16_a(const S* a, std::int64_t rsa, std::int64_t csa, const std::int32_t* rows,
                 std::int64_t m, std::int64_t k, std::int64_t steps, bf16* dst) noexcept {
  static_assert(std::is_same_v<S, bf16> || std::is_same_v<S, float>);
  for (std::int64_t i0 = 0; i0 < m; i0 += bf16_block) {
    bf16* panel = dst + (i0 / bf16_block) * steps * bf16_panel_step;
    for (std::int64_t r = 0; r < bf16_block; ++r) {
      const std::int64_t i = i0 + r;
      const S* src = i < m ? a + (rows ? std::int64_t(rows[i]) : i) * rsa : nullptr;
      for (std::int64_t s = 0; s < steps; ++s) {
        // Row r of the panel: tile r / 16, row r % 16.
        bf16* out = panel + s * bf16_panel_step + (r / 16) * 512 + (r % 16) * bf16_step;
        const std::int64_t p0 = s * bf16_step;
        const std::int64_t kn = src ? std::clamp<std::int64_t>(k - p0, 0, bf16_step) : 0;
        std::int64_t p = 0;
        if constexpr (std::is_same_v<S, bf16>) {
          if (csa == 1 && kn > 0) {  // padding rows (src null) copy nothing
            std::memcpy(out, src + p0, std::size_t(kn) * sizeof(bf16));
            p = kn;
          }
          for (; p < kn; ++p) out[p] = src[(p0 + p) * csa];
        } else {
          for (; p < kn; ++p) out[p] = bf16::from_float(src[(p0 + p) * csa]);
        }
        for (; p < bf16_step; ++p) out[p] = bf16{};
      }
    }
  }
}

/// Packs op(B)(p, j) = b[p * rsb + j * csb], p < k, j < n, into panels of 32 columns by
/// `steps` steps (zeros past k and n): panel j / 32 at dst + (j / 32) * steps * 1024; within a
/// step, tile h (columns 16h..16h+15) holds [k pair][column][2].
inline void pack_bf16_b(const bf16* b, std::int64_t rsb, std::int64_t csb, std::int64_t k,
                        std::int64_t n, std::int64_t steps, bf16* dst) noexcept {
  for (std::int64_t j0 = 0; j0 < n; j0 += bf16_block) {
    bf16* panel = dst + (j0 / bf16_block) * steps * bf16_panel_step;
    for (std::int64_t s = 0; s < steps; ++s) {
      const std::int64_t p0 = s * bf16_step;
      for (std::int64_t h = 0; h < 2; ++h) {
        bf16* tile = panel + s * bf16_panel_step + h * 512;
        const std::int64_t jt = j0 + 16 * h;
        [[maybe_unused]] const bool full = p0 + bf16_step <= k && jt + 16 <= n;
#if defined(__AVX512F__)
        if (full && rsb == 1 && csb % 2 == 0) {
          // nn.Linear's [N, K] weight: a k pair is one 32-bit word of a weight row, so the
          // tile is a 16 x 16 transpose of 32-bit words.
          transpose16x16(xsimd::avx512f{}, reinterpret_cast<const float*>(b + jt * csb + p0),
                         csb / 2, reinterpret_cast<float*>(tile), 16);
          continue;
        }
        if (full && csb == 1) {
          // Row-major [K, N]: interleave rows 2q and 2q + 1, 16 columns at a time.
          for (std::int64_t q = 0; q < 16; ++q) {
            const bf16* r0 = b + (p0 + 2 * q) * rsb + jt;
            const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)r0));
            const __m512i hi =
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r0 + rsb)));
            _mm512_storeu_si512(tile + q * 32, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
          }
          continue;
        }
#endif
        for (std::int64_t q = 0; q < 16; ++q)
          for (std::int64_t c = 0; c < 16; ++c)
            for (std::int64_t e = 0; e < 2; ++e) {
              const std::int64_t p = p0 + 2 * q + e, j = jt + c;
              tile[q * 32 + c * 2 + e] = p < k && j < n ? b[p * rsb + j * csb] : bf16{};
            }
      }
    }
  }
}

#if SWITCHYARD_HAS_AMX
/// c [32, 32] (row stride ldc, unit column stride) = (accumulate ? c : 0) + A B over `steps`
/// packed steps (a: an A panel, b: a B panel). Tiles 0-7 must be configured (AmxTileScope).
inline void amx_block(std::int64_t steps, const bf16* a, const bf16* b, float* c, std::int64_t ldc,
                      bool accumulate) noexcept {
  const std::int64_t ldb = ldc * std::int64_t(sizeof(float));
  if (accumulate) {
    _tile_loadd(0, c, ldb);
    _tile_loadd(1, c + 16, ldb);
    _tile_loadd(2, c + 16 * ldc, ldb);
    _tile_loadd(3, c + 16 * ldc + 16, ldb);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (std::int64_t s = 0; s < steps; ++s) {
    const bf16* as = a + s * bf16_panel_step;
    const bf16* bs = b + s * bf16_panel_step;
    // Each load as late as its first use allows: tile registers are not renamed, so a load
    // waits for the products still reading the previous step's tile.
    // A streams from L2 (a new panel per block): fetch two steps ahead into L1, which runs
    // into the next panel, the next block's, at the end.
    for (int line = 0; line < 32; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(as + 2 * bf16_panel_step) + 64 * line,
                   _MM_HINT_T0);
    _tile_loadd(4, as, 64);
    _tile_loadd(6, bs, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, bs + 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, as + 512, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, ldb);
  _tile_stored(1, c + 16, ldb);
  _tile_stored(2, c + 16 * ldc, ldb);
  _tile_stored(3, c + 16 * ldc + 16, ldb);
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/// The same block as amx_block with VDPBF16PS: 8 rows x 32 columns of C in 16 registers at a
/// time; per k pair, two B loads and one broadcast A pair per row.
inline void avx512_bf16_block(std::int64_t steps, const bf16* a, const bf16* b, float* c,
                              std::int64_t ldc, bool accumulate) noexcept {
  for (std::int64_t r0 = 0; r0 < bf16_block; r0 += 8) {
    __m512 acc[8][2];
    for (int r = 0; r < 8; ++r)
      for (int h = 0; h < 2; ++h)
        acc[r][h] = accumulate ? _mm512_loadu_ps(c + (r0 + r) * ldc + 16 * h) : _mm512_setzero_ps();
    for (std::int64_t s = 0; s < steps; ++s) {
      const bf16* as = a + s * bf16_panel_step + (r0 / 16) * 512 + (r0 % 16) * bf16_step;
      const bf16* bs = b + s * bf16_panel_step;
      for (int q = 0; q < 16; ++q) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bs + q * 32);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bs + 512 + q * 32);
        for (int r = 0; r < 8; ++r) {
          std::int32_t pair;
          std::memcpy(&pair, as + r * bf16_step + 2 * q, sizeof(pair));
          const __m512bh ap = (__m512bh)_mm512_set1_epi32(pair);
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ap, b0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ap, b1);
        }
      }
    }
    for (int r = 0; r < 8; ++r)
      for (int h = 0; h < 2; ++h) _mm512_storeu_ps(c + (r0 + r) * ldc + 16 * h, acc[r][h]);
  }
}
#endif

}  // namespace SWITCHYARD_ARCH_NS
}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
