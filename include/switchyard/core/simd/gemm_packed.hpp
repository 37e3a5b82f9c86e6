#pragma once
// Packing for the packed GEMM when the whole of k is packed at once (the MoE layer packs a
// tile of gathered tokens and an expert's weight chunk once and reuses them): nn.Linear
// [out, in] weights packed by register transposes (AVX-512 16x16, AVX 8x8, float), all-k
// A packing, and the loop nest over both packed operands. The micro-kernel and the A
// packing itself are gemm_kernel.hpp's, so this is the same GEMM path, not a second one.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/gemm_kernel.hpp"
#include "switchyard/core/simd/transpose.hpp"

// gcc: no -Wmaybe-uninitialized / -Wuninitialized from the intrinsics inlined into these
// kernels (false positives in gcc 12's AVX-512 headers; see core/diagnostics.hpp).
SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace kernels {

/// Widens a 16-bit storage type to float (bf16: the upper half of a float; f16: IEEE half).
/// n values; plain loops that the compiler vectorises for bf16 (a shift).
template <class S>
void widen_to_float(const S* src, std::int64_t n, float* dst) noexcept {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

/// Packs op(B)(p, j) = w[j * ldj + p * ldp] (p < k, j < n) for the packed GEMM micro-kernel,
/// all of k at once: dst[j / NR][p][j % NR], the last panel zero-padded. This is nn.Linear's
/// [out, in] weight read as [in, out]: each panel is a transpose of NR weight rows. Rows are
/// read sequentially (ldp == 1 takes L x L register transposes on AVX and AVX-512 for float).
/// S is the stored element type: T itself, or bf16 / f16 weights packed into float (widened
/// L x L at a time into an L1 tile, then transposed), so a bf16 checkpoint is never copied
/// whole into float.
template <class Arch, int NR, class T, class S>
void pack_b_rows(Arch, const S* w, std::int64_t ldj, std::int64_t ldp, std::int64_t n,
                 std::int64_t k, T* dst) noexcept {
  static_assert(std::is_same_v<S, T> || (std::is_same_v<T, float> && is_half_v<S>),
                "pack_b_rows: weights of T, or bf16 / f16 weights packed into float");
  for (std::int64_t jb = 0; jb < n; jb += NR, dst += NR * k) {
    const int nr = static_cast<int>(std::min<std::int64_t>(NR, n - jb));
    const S* src = w + jb * ldj;
    std::int64_t p = 0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> && std::is_base_of_v<xsimd::avx512f, Arch> &&
                  NR % 16 == 0) {
      if (ldp == 1 && nr == NR) {
        for (; p + 16 <= k; p += 16)
          for (int cb = 0; cb < NR; cb += 16) {
            if constexpr (std::is_same_v<S, float>) {
              transpose16x16(Arch{}, src + cb * ldj + p, ldj, dst + p * NR + cb, NR);
            } else {
              alignas(64) float tile[16 * 16];
              for (int r = 0; r < 16; ++r)
                widen_to_float(src + (cb + r) * ldj + p, 16, tile + r * 16);
              transpose16x16(Arch{}, tile, 16, dst + p * NR + cb, NR);
            }
          }
      }
    }
#endif
#if defined(__AVX__)
    if constexpr (std::is_same_v<T, float> && std::is_base_of_v<xsimd::avx, Arch> && NR % 8 == 0) {
      if (ldp == 1 && nr == NR) {
        for (; p + 8 <= k; p += 8)
          for (int cb = 0; cb < NR; cb += 8) {
            if constexpr (std::is_same_v<S, float>) {
              transpose8x8(Arch{}, src + cb * ldj + p, ldj, dst + p * NR + cb, NR);
            } else {
              alignas(32) float tile[8 * 8];
              for (int r = 0; r < 8; ++r) widen_to_float(src + (cb + r) * ldj + p, 8, tile + r * 8);
              transpose8x8(Arch{}, tile, 8, dst + p * NR + cb, NR);
            }
          }
      }
    }
#endif
    if (p < k) {
      for (int c = 0; c < nr; ++c) {
        const S* s = src + c * ldj;
        for (std::int64_t q = p; q < k; ++q) dst[q * NR + c] = T(to_float(s[q * ldp]));
      }
      for (int c = nr; c < NR; ++c)
        for (std::int64_t q = p; q < k; ++q) dst[q * NR + c] = T(0);
    }
  }
}

/// The micro-kernel for the first `rows` rows of a panel (rows <= MR): the smallest row count
/// that covers them, so a one-token panel does not pay for MR rows of FMAs.
template <class Arch, class T>
void micro_kernel_rows(Arch arch, int rows, std::int64_t kc, const T* ap, const T* bp, int n,
                       T beta, T* c, std::int64_t rsc, detail::RowBlockPrefetch* prefetch = nullptr,
                       std::int64_t prefetch_lines = 0) noexcept {
  constexpr int MR = GemmTile<Arch, T>::mr;
  const auto run = [&]<int MU>() {
    detail::micro_kernel<Arch, T, MU>(arch, kc, ap, bp, rows, n, T(1), beta, c, rsc, 1, prefetch,
                                      prefetch_lines);
  };
  if (rows <= 1) return run.template operator()<1>();
  if (rows <= 2 && MR >= 2) return run.template operator()<std::min(2, MR)>();
  if (rows <= 4 && MR >= 4) return run.template operator()<std::min(4, MR)>();
  if (rows <= 8 && MR >= 8) return run.template operator()<std::min(8, MR)>();
  run.template operator()<MR>();
}

/// C [m, n] = A B + beta C with both operands packed for all of k: A as pack_a leaves it
/// block after block (block p0 at ap + p0 * round_up(m, MR)), B as pack_b_rows leaves it.
/// The loop nest of kernels::gemm: k blocks of kc, MR-row panels of A, NR-column panels of B;
/// the last row panel through micro_kernel_rows, as gemm_packed_streamed (the same bits).
template <class Arch, class T>
void gemm_packed(Arch arch, std::int64_t m, std::int64_t n, std::int64_t k, const T* ap,
                 const T* bp, T beta, T* c, std::int64_t rsc) noexcept {
  using G = kernels::GemmTile<Arch, T>;
  const std::int64_t m_pad = core::round_up(m, G::mr);
  for (std::int64_t p0 = 0; p0 < k; p0 += G::kc()) {
    const std::int64_t kc = std::min<std::int64_t>(G::kc(), k - p0);
    const T beta_eff = p0 == 0 ? beta : T(1);
    const T* ab = ap + p0 * m_pad;
    for (std::int64_t ib = 0; ib < m; ib += G::mr) {
      const int mr = static_cast<int>(std::min<std::int64_t>(G::mr, m - ib));
      for (std::int64_t jb = 0; jb < n; jb += G::nr) {
        const int nr = static_cast<int>(std::min<std::int64_t>(G::nr, n - jb));
        micro_kernel_rows(arch, mr, kc, ab + ib * kc, bp + jb * k + p0 * G::nr, nr, beta_eff,
                          c + ib * rsc + jb, rsc);
      }
    }
  }
}

namespace detail {

// The loop of gemm_packed_streamed and gemm_packed_panels: per NR-column panel of B, per kc
// block, block(jb, nr, p0, kc) gives the packed kc x NR block (packing it where needed), which
// serves every row panel of A, while next_block(jb, p0, kc) (a RowBlockPrefetch of the next
// block's source) is requested a share per micro-kernel call: before the call, or `spread`
// over the call's k loop. Spread is 12-16 % faster for packed panels at 128 rows per expert
// and 5 % for streamed weights at 128 rows (Emerald Rapids: a burst before the call stalls the
// kernel's loads); before the call is 2-5 % faster for decode's streamed weights (a few rows:
// one or two calls per block, bandwidth-bound).
template <class Arch, class T, class Block, class NextBlock>
void gemm_by_b_blocks(Arch arch, std::int64_t m, std::int64_t n, std::int64_t k, const T* ap,
                      T beta, T* c, std::int64_t rsc, bool spread, Block&& block,
                      NextBlock&& next_block) noexcept {
  using G = kernels::GemmTile<Arch, T>;
  const std::int64_t m_pad = core::round_up(m, G::mr);
  const std::int64_t kc_full = G::kc(), calls = (m + G::mr - 1) / G::mr;
  for (std::int64_t jb = 0; jb < n; jb += G::nr) {
    const int nr = static_cast<int>(std::min<std::int64_t>(G::nr, n - jb));
    for (std::int64_t p0 = 0; p0 < k; p0 += kc_full) {
      const std::int64_t kc = std::min<std::int64_t>(kc_full, k - p0);
      const T* bb = block(jb, nr, p0, kc);
      // The next block: this panel's next k block, or the next panel's first.
      const bool same_panel = p0 + kc < k;
      const std::int64_t nj = same_panel ? jb : jb + G::nr, np = same_panel ? p0 + kc : 0;
      RowBlockPrefetch next;
      if (nj < n) next = next_block(nj, np, std::min(kc_full, k - np));
      const std::int64_t per_call =
          (next.lines_left() + calls - 1) / std::max<std::int64_t>(calls, 1);
      const T beta_eff = p0 == 0 ? beta : T(1);
      for (std::int64_t ib = 0; ib < m; ib += G::mr) {
        const int rows = static_cast<int>(std::min<std::int64_t>(G::mr, m - ib));
        if (!spread) next.issue(per_call);
        micro_kernel_rows(arch, rows, kc, ap + p0 * m_pad + ib * kc, bb, nr, beta_eff,
                          c + ib * rsc + jb, rsc, spread ? &next : nullptr, per_call);
      }
    }
  }
}

}  // namespace detail

/// C [m, n] = A B + beta C for skinny m (decoding, or a few rows per expert), with A packed for
/// all of k (pack_a_all) and B read straight from nn.Linear-layout weights (of T, or bf16 / f16
/// widened while packing), op(B)(p, j) = w[j * ldj + p * ldp]: each kc x NR block of B is packed
/// into `bblock` (kc_max * NR elements, stays in L1) just before the micro-kernel uses it, so the
/// weights stream from memory once and nothing of their size is written. While a block's
/// micro-kernels run, the weights of the next block are requested (a share per micro-kernel
/// call; where they are contiguous along k), so the next pack finds them in cache. Every
/// element is summed as gemm_packed sums it (kc blocks in ascending k, beta on the first), so
/// both give the same bits.
template <class Arch, class T, class S>
void gemm_packed_streamed(Arch arch, std::int64_t m, std::int64_t n, std::int64_t k, const T* ap,
                          const S* w, std::int64_t ldj, std::int64_t ldp, T beta, T* c,
                          std::int64_t rsc, T* bblock) noexcept {
  using G = kernels::GemmTile<Arch, T>;
  detail::gemm_by_b_blocks(
      arch, m, n, k, ap, beta, c, rsc, /*spread=*/m > 4 * G::mr,  // more than decode's rows
      [&](std::int64_t jb, int nr, std::int64_t p0, std::int64_t kc) {
        pack_b_rows<Arch, G::nr>(arch, w + jb * ldj + p0 * ldp, ldj, ldp, nr, kc, bblock);
        return static_cast<const T*>(bblock);
      },
      [&](std::int64_t nj, std::int64_t np, std::int64_t kc) {
        if (ldp != 1) return detail::RowBlockPrefetch{};  // rows not contiguous along k
        return detail::RowBlockPrefetch(w + nj * ldj + np, std::min<std::int64_t>(G::nr, n - nj),
                                        kc * std::int64_t(sizeof(S)),
                                        ldj * std::int64_t(sizeof(S)));
      });
}

/// gemm_packed for B packed once ahead (pack_b_rows, e.g. MoELayer::pack_weights) and read
/// from memory: gemm_packed_streamed's order, each kc x NR block of B serving every row panel
/// of A while the next block (contiguous) is requested, spread over the micro-kernels' k
/// loops, so B streams once, overlapped with them, instead of each block waiting on memory. Same
/// bits as gemm_packed and gemm_packed_streamed.
template <class Arch, class T>
void gemm_packed_panels(Arch arch, std::int64_t m, std::int64_t n, std::int64_t k, const T* ap,
                        const T* bp, T beta, T* c, std::int64_t rsc) noexcept {
  using G = kernels::GemmTile<Arch, T>;
  detail::gemm_by_b_blocks(
      arch, m, n, k, ap, beta, c, rsc, /*spread=*/true,
      [&](std::int64_t jb, int, std::int64_t p0, std::int64_t) { return bp + jb * k + p0 * G::nr; },
      [&](std::int64_t nj, std::int64_t np, std::int64_t kc) {
        return detail::RowBlockPrefetch(bp + nj * k + np * G::nr, 1,
                                        kc * G::nr * std::int64_t(sizeof(T)), 0);
      });
}

/// Packs all of op(A) [m, k] (row r = a[rows[r] * rsa ...] when rows is non-null) for
/// gemm_packed: block p0 of kc columns at dst + p0 * round_up(m, MR).
template <class Arch, class T>
void pack_a_all(Arch arch, const T* a, std::int64_t rsa, std::int64_t csa, const std::int32_t* rows,
                std::int64_t m, std::int64_t k, T* dst) noexcept {
  using G = kernels::GemmTile<Arch, T>;
  const std::int64_t m_pad = core::round_up(m, G::mr);
  for (std::int64_t p0 = 0; p0 < k; p0 += G::kc()) {
    const std::int64_t kc = std::min<std::int64_t>(G::kc(), k - p0);
    detail::pack_a<Arch, G::mr>(arch, a, rsa, csa, rows, 0, m, p0, kc, dst + p0 * m_pad);
  }
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
