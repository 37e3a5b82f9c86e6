#pragma once
// Packed GEMM in the BLIS/GotoBLAS style: C = alpha * op(A) * op(B) + beta * C.
//
// op(A) [M, K] is packed into micro-panels of MR rows (K-major), op(B) [K, N]
// into micro-panels of NR columns, and a register-blocked micro-kernel
// accumulates an MR x NR tile of C: NR/lanes vectors of B are loaded and each
// of the MR values of A is broadcast (C is row-major, so vectors run along N).
// Loop nest (outer to inner): N in nc, K in kc, pack B block (kept in L2),
// M in mc, pack A block, MR rows (A micro-panel stays in L1), NR columns.
//
// Every element of C is summed by one accumulator lane in ascending k within a
// kc block, block after block: the sum order is fixed by kc alone. (Full tiles
// and edge tiles round the final alpha/beta update separately, so callers that
// split C for threads keep gemm's micro-tile grid; see core::gemm_parallel.)
//
// Arbitrary strides (row and column, in elements) for A, B and C; transposes
// are strides. Packing A can gather rows through an index list, so the MoE
// layer can fuse its token gather into packing.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/cache_info.hpp"
#include "switchyard/core/simd/transpose.hpp"

// gcc: no -Wmaybe-uninitialized / -Wuninitialized from the intrinsics inlined into these
// kernels (false positives in gcc 12's AVX-512 headers; see core/diagnostics.hpp).
SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace kernels {

/// Register tile and cache blocking of the packed GEMM for one Arch and T.
template <class Arch, class T>
struct GemmTile {
  static constexpr std::size_t lanes = simd::lanes_v<T, Arch>;
  // 32 vector registers with AVX-512: 12 x 2 accumulators + 2 B vectors + 1 broadcast
  // (measured 1.5-2 % faster than 14 x 2, 8 x 3, 9 x 3 and 6 x 4 on Zen 4).
  // 16 registers with AVX/AVX2: 6 x 2 accumulators + 2 B + 1 broadcast. SSE has no
  // FMA, so mul + add needs a temporary: 4 x 2 (measured 35 vs 27 GFLOP/s for 6 x 2).
  static constexpr bool wide = !simd::is_scalar_v<Arch> && lanes * sizeof(T) == 64;
  static constexpr bool narrow = !simd::is_scalar_v<Arch> && lanes * sizeof(T) == 16;
  static constexpr int mr = simd::is_scalar_v<Arch> ? 4 : (wide ? 12 : (narrow ? 4 : 6));
  static constexpr int nv = simd::is_scalar_v<Arch> ? 4 : 2;  // vectors (or scalars) per row
  static constexpr int nr = nv * static_cast<int>(lanes);
  // Cache blocking from the L2 size per core (simd::cache_sizes), measured against OpenBLAS in
  // one process on both CPUs we run on. Zen 4 (L2 1 MiB): kc = 512 bytes of T (128 floats) ran
  // 1-3 % faster than 256 floats and 3-8 % faster than 384, with the AVX-512 and the AVX2
  // tile, with a 512 KiB block of B. Emerald Rapids (L2 2 MiB): kc = 256 floats with a 1 MiB
  // block of B ran 3-6 % faster at 4096^3 than 128 with 512 KiB (2 threads: 0.89-0.90 ->
  // 0.94-0.98 of OpenBLAS), a 2 MiB block 8-10 % slower. So kc x sizeof(T) = 1 KiB from 2 MiB of
  // L2 up, else 512 bytes (either divides kc_max: the MoE layer's hidden chunks hold whole k
  // blocks), and the kc x nc block of B = L2 / 2 (it stays in L2); kc x nr of B (16 or 32 KiB for
  // float AVX-512) streams from L2 per micro-kernel call; mr x kc of A is reused across the NR
  // loop. One value per process: every path sums k in the same blocks, so their bits agree.
  static constexpr std::int64_t kc_max = 1024 / static_cast<std::int64_t>(sizeof(T));
  /// Depth of a k block (elements of T), at most kc_max.
  static std::int64_t kc() noexcept {
    static const std::int64_t v =
        (simd::cache_sizes().l2 >= 2048 * 1024 ? 1024 : 512) / static_cast<std::int64_t>(sizeof(T));
    return v;
  }
  /// Columns of a block of B (a multiple of nr).
  static std::int64_t nc() noexcept {
    static const std::int64_t v = std::max<std::int64_t>(
        nr, ((std::clamp<std::int64_t>(simd::cache_sizes().l2 / 2, 256 * 1024, 2048 * 1024) /
              (kc() * static_cast<std::int64_t>(sizeof(T)))) /
             nr) *
                nr);
    return v;
  }
  static constexpr std::int64_t mc = ((1024 + mr - 1) / mr) * mr;
};

/// Elements of T the packed GEMM needs as workspace for an [m, k] x [k, n] product
/// (packed A block + packed B block + slack to align both to 64 bytes).
template <class Arch, class T>
std::size_t gemm_workspace_elems(Arch, std::int64_t m, std::int64_t n, std::int64_t k) noexcept {
  using G = GemmTile<Arch, T>;
  const std::int64_t kc = std::min<std::int64_t>(std::max<std::int64_t>(k, 1), G::kc());
  // Clamped before rounding up, so sizes near the int64 limit cannot overflow.
  const std::int64_t mc = std::min<std::int64_t>(
      ((std::clamp<std::int64_t>(m, 1, G::mc) + G::mr - 1) / G::mr) * G::mr, G::mc);
  const std::int64_t nc = std::min<std::int64_t>(
      ((std::clamp<std::int64_t>(n, 1, G::nc()) + G::nr - 1) / G::nr) * G::nr, G::nc());
  return std::size_t(mc * kc + nc * kc) + 2 * (64 / sizeof(T));
}

namespace detail {
// The helpers below are plain C++, but the compiler vectorises them with the TU's
// flags, so they take Arch too (NOTES 2.8: one symbol per arch, no ODR mix-up).

/// Packs op(A)[i0 : i0+m, p0 : p0+kc] into micro-panels of MR rows, zero-padding
/// the last panel: dst[panel][p][r]. Row i of op(A) is stored row rows[i] when
/// rows is non-null (gather), else row i. Element (i, p) is a[row * rsa + p * csa].
template <class Arch, int MR, class T>
void pack_a(Arch, const T* a, std::int64_t rsa, std::int64_t csa, const std::int32_t* rows,
            std::int64_t i0, std::int64_t m, std::int64_t p0, std::int64_t kc, T* dst) noexcept {
  for (std::int64_t ib = 0; ib < m; ib += MR) {
    const int mr = static_cast<int>(std::min<std::int64_t>(MR, m - ib));
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> && MR <= 16 && std::is_base_of_v<xsimd::avx512f, Arch>) {
      if (mr == MR && csa == 1) {
        // 16 values of k of the panel's rows at a time: one register transpose, each output
        // row (one k) storing its MR lanes, instead of MR x 16 scalar moves.
        const T* src[MR];
        for (int r = 0; r < MR; ++r) {
          const std::int64_t i = i0 + ib + r;
          src[r] = a + (rows ? std::int64_t(rows[i]) : i) * rsa + p0;
        }
        std::int64_t p = 0;
        for (; p + 16 <= kc; p += 16) {
          __m512 v[16];
          for (int r = 0; r < 16; ++r)
            v[r] = r < MR ? _mm512_loadu_ps(src[r] + p) : _mm512_setzero_ps();
          transpose16x16_registers(Arch{}, v, dst + p * MR, MR, __mmask16((1u << MR) - 1));
        }
        for (; p < kc; ++p)
          for (int r = 0; r < MR; ++r) dst[p * MR + r] = src[r][p];
        dst += MR * kc;
        continue;
      }
    }
#endif
    for (int r = 0; r < mr; ++r) {
      const std::int64_t i = i0 + ib + r;
      const T* src = a + (rows ? std::int64_t(rows[i]) : i) * rsa + p0 * csa;
      T* d = dst + r;
      if (csa == 1) {
        for (std::int64_t p = 0; p < kc; ++p) d[p * MR] = src[p];
      } else {
        for (std::int64_t p = 0; p < kc; ++p) d[p * MR] = src[p * csa];
      }
    }
    for (int r = mr; r < MR; ++r)
      for (std::int64_t p = 0; p < kc; ++p) dst[p * MR + r] = T(0);
    dst += MR * kc;
  }
}

/// Packs op(B)[p0 : p0+kc, j0 : j0+n] into micro-panels of NR columns, zero-padding
/// the last panel: dst[panel][p][c]. Element (p, j) is b[p * rsb + j * csb].
template <class Arch, int NR, class T>
void pack_b(Arch, const T* b, std::int64_t rsb, std::int64_t csb, std::int64_t p0, std::int64_t kc,
            std::int64_t j0, std::int64_t n, T* dst) noexcept {
  for (std::int64_t jb = 0; jb < n; jb += NR) {
    const int nr = static_cast<int>(std::min<std::int64_t>(NR, n - jb));
    const T* src = b + p0 * rsb + (j0 + jb) * csb;
    if (csb == 1 && nr == NR) {
      for (std::int64_t p = 0; p < kc; ++p)
        std::memcpy(dst + p * NR, src + p * rsb, sizeof(T) * NR);
    } else {
      for (int c = 0; c < nr; ++c) {
        const T* s = src + c * csb;
        for (std::int64_t p = 0; p < kc; ++p) dst[p * NR + c] = s[p * rsb];
      }
      for (int c = nr; c < NR; ++c)
        for (std::int64_t p = 0; p < kc; ++p) dst[p * NR + c] = T(0);
    }
    dst += NR * kc;
  }
}

// The cache lines of a block of rows (`rows` rows of `bytes` bytes, `stride` bytes apart),
// requested a share at a time (software prefetch), in row order. Addresses are integers: the
// last line requested may lie past the rows (a prefetch never faults), a pointer may not.
class RowBlockPrefetch {
 public:
  RowBlockPrefetch() = default;
  RowBlockPrefetch(const void* first, std::int64_t rows, std::int64_t bytes,
                   std::int64_t stride) noexcept
      : row_(reinterpret_cast<std::uintptr_t>(first)),
        bytes_(bytes),
        stride_(stride),
        rows_left_(bytes > 0 ? rows : 0) {}
  // Requests the next n lines (fewer at the end of the block).
  void issue(std::int64_t n) noexcept {
    for (; n > 0 && rows_left_ > 0; --n) {
      __builtin_prefetch(reinterpret_cast<const void*>(row_ + std::uintptr_t(offset_)));
      offset_ += 64;
      if (offset_ >= bytes_ + 63) {  // past the line of the row's last byte
        offset_ = 0;
        row_ += std::uintptr_t(stride_);
        --rows_left_;
      }
    }
  }
  // Lines still to request (an upper bound: one more per row than an aligned row has).
  std::int64_t lines_left() const noexcept {
    return rows_left_ > 0 ? rows_left_ * ((bytes_ + 63) / 64 + 1) : 0;
  }

 private:
  std::uintptr_t row_ = 0;
  std::int64_t bytes_ = 0, stride_ = 0, rows_left_ = 0, offset_ = 0;
};

/// C tile [m, n] (m <= MR, n <= NR) = alpha * acc + beta * C; beta == 0 never reads C.
template <class Arch, int MR, int NR, class T>
void store_tile_scalar(Arch, const T* acc, int m, int n, T alpha, T beta, T* c, std::int64_t rsc,
                       std::int64_t csc) noexcept {
  for (int i = 0; i < m; ++i) {
    T* ci = c + i * rsc;
    for (int j = 0; j < n; ++j) {
      const T v = alpha * acc[i * NR + j];
      ci[j * csc] = beta == T(0) ? v : v + beta * ci[j * csc];
    }
  }
}

/// Micro-kernel: acc[MU][NR] = Ap (kc x MR, first MU rows) ^T * Bp (kc x NR), then written to
/// the [m, n] corner of C (m <= MU) with alpha/beta. Full tiles with unit column stride store
/// vectors straight into C; edges go through a small buffer. MU < MR computes only the first
/// MU rows of the panel (skinny m: decoding); every element is summed the same way whatever
/// MU, and with alpha = 1 and beta 0 or 1 both stores round alike, so results do not depend on
/// the tile a row fell in.
///
/// `prefetch` (optional) is requested `prefetch_lines` lines spread evenly over the k loop: a
/// burst of misses before the loop would fill the line fill buffers and stall the loads of A
/// and B behind them (measured: a packed-weights MoE layer 12-16 % faster at 128 rows per expert).
template <class Arch, class T, int MU = GemmTile<Arch, T>::mr>
void micro_kernel(Arch, std::int64_t kc, const T* ap, const T* bp, int m, int n, T alpha, T beta,
                  T* c, std::int64_t rsc, std::int64_t csc, RowBlockPrefetch* prefetch = nullptr,
                  std::int64_t prefetch_lines = 0) noexcept {
  using G = GemmTile<Arch, T>;
  constexpr int MR = G::mr, NV = G::nv, NR = G::nr;
  static_assert(MU >= 1 && MU <= MR);
  if constexpr (simd::is_scalar_v<Arch>) {
    if (prefetch != nullptr) prefetch->issue(prefetch_lines);
    T acc[MR * NR] = {};
    for (std::int64_t p = 0; p < kc; ++p) {
      for (int i = 0; i < MU; ++i) {
        const T av = ap[i];
        for (int j = 0; j < NR; ++j) acc[i * NR + j] += av * bp[j];
      }
      ap += MR;
      bp += NR;
    }
    store_tile_scalar<Arch, MR, NR>(Arch{}, acc, m, n, alpha, beta, c, rsc, csc);
  } else {
    using B = xsimd::batch<T, Arch>;
    constexpr int L = static_cast<int>(B::size);
    B acc[MU][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MU; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = B(T(0));
    // C rows are far apart (one page each for large N): start fetching the tile now
    // so the write-out after the k loop does not stall on misses.
    if (csc == 1)
      for (int i = 0; i < m; ++i) {
        __builtin_prefetch(c + i * rsc, 1, 3);
        __builtin_prefetch(c + i * rsc + NR - 1, 1, 3);
      }
    const auto k_step = [&]() {
      B bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = B::load_aligned(bp + v * L);
#pragma GCC unroll 16
      for (int i = 0; i < MU; ++i) {
        const B av(ap[i]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = xsimd::fma(av, bv[v], acc[i][v]);
      }
      ap += MR;
      bp += NR;
    };
    if (prefetch == nullptr || prefetch_lines <= 0) {
      for (std::int64_t p = 0; p < kc; ++p) k_step();
    } else {
      // `per` lines every `every` steps: at least prefetch_lines in all (issue stops at the
      // block's end).
      const std::int64_t per = (prefetch_lines + kc - 1) / std::max<std::int64_t>(kc, 1);
      const std::int64_t every = std::max<std::int64_t>(1, kc / ((prefetch_lines + per - 1) / per));
      for (std::int64_t p0 = 0; p0 < kc; p0 += every) {
        prefetch->issue(per);
        const std::int64_t end = std::min(kc, p0 + every);
        for (std::int64_t p = p0; p < end; ++p) k_step();
      }
    }
    if (m == MU && n == NR && csc == 1) {
      const B va(alpha);
      if (beta == T(0)) {
#pragma GCC unroll 16
        for (int i = 0; i < MU; ++i)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) (va * acc[i][v]).store_unaligned(c + i * rsc + v * L);
      } else {
        const B vb(beta);
#pragma GCC unroll 16
        for (int i = 0; i < MU; ++i)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) {
            T* cp = c + i * rsc + v * L;
            (va * acc[i][v] + vb * B::load_unaligned(cp)).store_unaligned(cp);
          }
      }
    } else {
      alignas(64) T buf[MR * NR];
      for (int i = 0; i < MU; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v].store_aligned(buf + i * NR + v * L);
      store_tile_scalar<Arch, MR, NR>(Arch{}, buf, m, n, alpha, beta, c, rsc, csc);
    }
  }
}

/// Rows [i_begin, i_end) of C's columns [j0, j0 + nc) against the packed kc x nc block of B
/// (bpack, from pack_b): op(A)'s rows packed mc at a time into apack (mc x kc elements), then
/// every register tile. The inner loops of the packed GEMM, shared by kernels::gemm (all rows)
/// and core::gemm_parallel (a task's rows).
template <class Arch, class T>
void gemm_rows(Arch arch, std::int64_t i_begin, std::int64_t i_end, std::int64_t p0,
               std::int64_t kc, std::int64_t j0, std::int64_t nc, T alpha, const T* a,
               std::int64_t rsa, std::int64_t csa, const std::int32_t* a_rows, const T* bpack,
               T beta_eff, T* c, std::int64_t rsc, std::int64_t csc, T* apack) noexcept {
  using G = GemmTile<Arch, T>;
  for (std::int64_t i0 = i_begin; i0 < i_end; i0 += G::mc) {
    const std::int64_t mc = std::min<std::int64_t>(G::mc, i_end - i0);
    pack_a<Arch, G::mr>(arch, a, rsa, csa, a_rows, i0, mc, p0, kc, apack);
    for (std::int64_t ib = 0; ib < mc; ib += G::mr) {
      const int mr = static_cast<int>(std::min<std::int64_t>(G::mr, mc - ib));
      const T* ap = apack + ib * kc;
      for (std::int64_t jb = 0; jb < nc; jb += G::nr) {
        const int nr = static_cast<int>(std::min<std::int64_t>(G::nr, nc - jb));
        micro_kernel(arch, kc, ap, bpack + jb * kc, mr, nr, alpha, beta_eff,
                     c + (i0 + ib) * rsc + (j0 + jb) * csc, rsc, csc);
      }
    }
  }
}

using core::round_up;

template <class T>
T* align64(T* p) noexcept {
  const auto u = reinterpret_cast<std::uintptr_t>(p);
  return reinterpret_cast<T*>((u + 63) & ~std::uintptr_t(63));
}

}  // namespace detail

/// C [m, n] = alpha * op(A) [m, k] * op(B) [k, n] + beta * C, serial.
/// op(A)(i, p) = a[r(i) * rsa + p * csa] with r(i) = a_rows ? a_rows[i] : i (row gather);
/// op(B)(p, j) = b[p * rsb + j * csb]; C(i, j) = c[i * rsc + j * csc]. Any strides.
/// beta == 0 overwrites C without reading it (NaN in C is discarded); alpha == 0 or
/// k == 0 scales C by beta without reading A or B. `workspace` holds at least
/// gemm_workspace_elems(Arch{}, m, n, k) elements and must not alias A, B or C.
template <class Arch, class T>
void gemm(Arch arch, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* a,
          std::int64_t rsa, std::int64_t csa, const std::int32_t* a_rows, const T* b,
          std::int64_t rsb, std::int64_t csb, T beta, T* c, std::int64_t rsc, std::int64_t csc,
          T* workspace) noexcept {
  using G = GemmTile<Arch, T>;
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == T(0)) {
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        T& cij = c[i * rsc + j * csc];
        cij = beta == T(0) ? T(0) : beta * cij;
      }
    return;
  }
  const std::int64_t kc_max = std::min<std::int64_t>(k, G::kc());
  const std::int64_t mc_max = std::min<std::int64_t>(detail::round_up(m, G::mr), G::mc);
  T* apack = detail::align64(workspace);
  T* bpack = detail::align64(apack + mc_max * kc_max);
  for (std::int64_t j0 = 0; j0 < n; j0 += G::nc()) {
    const std::int64_t nc = std::min<std::int64_t>(G::nc(), n - j0);
    for (std::int64_t p0 = 0; p0 < k; p0 += G::kc()) {
      const std::int64_t kc = std::min<std::int64_t>(G::kc(), k - p0);
      const T beta_eff = p0 == 0 ? beta : T(1);
      detail::pack_b<Arch, G::nr>(arch, b, rsb, csb, p0, kc, j0, nc, bpack);
      detail::gemm_rows(arch, 0, m, p0, kc, j0, nc, alpha, a, rsa, csa, a_rows, bpack, beta_eff, c,
                        rsc, csc, apack);
    }
  }
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
