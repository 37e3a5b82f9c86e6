#pragma once
// Lane top-k: the k <= 8 largest entries of L rows at once, one row per SIMD
// lane (L = lanes of T on Arch), branch-free.
//
// Order: exactly core::topk's (core/topk.hpp): larger values first; equal values
// (-0.0 == +0.0 included) to the lower index; NaN ranks below every number, -inf
// included, NaNs among themselves in index order (a NaN is returned only when a
// row has fewer than k numbers). Works on any values: probabilities, logits, -inf.
//
// Kernel (topk_lanes): the rows sit transposed in a tile [n][L] (entry e of the
// L rows at tile + e*L). Each entry, in index order, is pushed down a sorted
// register list of K slots by compare-exchange on (value descending, index
// ascending); the list starts at (-inf, index n), below every real entry, -inf
// included, so all K slots fill with real entries. A NaN never goes ahead of a
// slot, so it drops off the bottom; a row with fewer than K numbers therefore
// keeps a start slot (index n), and a scalar fix-up (rare: one test per L rows)
// fills those slots with the row's NaNs in index order. K compare steps and 4
// blends per entry, for L rows at once. Indices travel as T (exact: n < 2^digits).
//
// Driver (topk_rows_lanes): the rows [r0, r1) of a row-major matrix, transposed L
// at a time into a thread-local tile; rows the `routed` predicate rejects read as
// 0 (they may hold NaN or garbage) and are not visited. k > 8, n too large for an
// exact index in T, or the scalar arch: core's row kernels. Every path gives the
// same result.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/transpose.hpp"
#include "switchyard/core/topk.hpp"

// gcc: no -Wmaybe-uninitialized / -Wuninitialized from the intrinsics inlined into these
// kernels (false positives in gcc 12's AVX-512 headers; see core/diagnostics.hpp).
SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace kernels {

namespace detail {
/// topk_lanes' fix-up for rows with fewer than k numbers: the slots still at the
/// start index n take the row's NaNs in index order. Out of line: it is rare.
template <class T>
[[gnu::noinline, gnu::cold]] void topk_lanes_fill_nan(const T* tile, std::int64_t n, int k,
                                                      std::int64_t L, T* val, T* idx) noexcept {
  const T end = static_cast<T>(n);
  for (std::int64_t l = 0; l < L; ++l) {
    int c = 0;
    while (c < k && idx[c * L + l] != end) ++c;
    for (std::int64_t e = 0; e < n && c < k; ++e) {
      const T x = tile[e * L + l];
      if (x != x) {
        val[c * L + l] = x;
        idx[c * L + l] = static_cast<T>(e);
        ++c;
      }
    }
  }
}
}  // namespace detail

/// Top-K of L rows at once, one row per lane. tile: [n][L]; 1 <= K <= 8, K <= n.
/// Out: val[j*L + l], idx[j*L + l] (index as T) = the j-th best of row l, in
/// core::topk's order (see the file comment). Scalar Arch: L = 1, tile = the row.
template <int K, class Arch, class T>
[[gnu::always_inline]] inline void topk_lanes(Arch, const T* tile, std::int64_t n, T* val,
                                              T* idx) noexcept {
  if constexpr (simd::is_scalar_v<Arch>) {
    std::int64_t ix[K];
    if constexpr (K == 1) {
      argmax_row(tile, n, ix, val);
    } else {
      topk_row_insertion(tile, n, K, ix, val);
    }
    for (int j = 0; j < K; ++j) idx[j] = static_cast<T>(ix[j]);
  } else {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    const T end = static_cast<T>(n);
    B v[K], vi[K];
    for (int j = 0; j < K; ++j) {
      v[j] = B(-std::numeric_limits<T>::infinity());
      vi[j] = B(end);
    }
    for (std::int64_t e = 0; e < n; ++e) {
      B x = B::load_unaligned(tile + e * L);
      B xi(static_cast<T>(e));
      for (int j = 0; j < K; ++j) {
        // x goes ahead if larger, or equal with a lower index (a displaced entry
        // moving down can meet an equal entry of higher index). NaN never does.
        const auto ahead = (x > v[j]) | ((x == v[j]) & (xi < vi[j]));
        const B keep_v = xsimd::select(ahead, x, v[j]), pass_v = xsimd::select(ahead, v[j], x);
        const B keep_i = xsimd::select(ahead, xi, vi[j]), pass_i = xsimd::select(ahead, vi[j], xi);
        v[j] = keep_v;
        x = pass_v;
        vi[j] = keep_i;
        xi = pass_i;
      }
    }
    for (int j = 0; j < K; ++j) {
      v[j].store_unaligned(val + j * L);
      vi[j].store_unaligned(idx + j * L);
    }
    // (Tested from memory: a use of the registers here makes gcc spill the list.)
    if (xsimd::any(B::load_unaligned(idx + (K - 1) * L) == B(end))) {
      detail::topk_lanes_fill_nan(tile, n, K, L, val, idx);
    }
  }
}

/// Runtime k (1..8; larger k is treated as 8) form of topk_lanes.
template <class Arch, class T>
[[gnu::always_inline]] inline void topk_lanes(Arch arch, std::int64_t k, const T* tile,
                                              std::int64_t n, T* val, T* idx) noexcept {
  switch (k) {
    case 1:
      topk_lanes<1>(arch, tile, n, val, idx);
      break;
    case 2:
      topk_lanes<2>(arch, tile, n, val, idx);
      break;
    case 3:
      topk_lanes<3>(arch, tile, n, val, idx);
      break;
    case 4:
      topk_lanes<4>(arch, tile, n, val, idx);
      break;
    case 5:
      topk_lanes<5>(arch, tile, n, val, idx);
      break;
    case 6:
      topk_lanes<6>(arch, tile, n, val, idx);
      break;
    case 7:
      topk_lanes<7>(arch, tile, n, val, idx);
      break;
    default:
      topk_lanes<8>(arch, tile, n, val, idx);
      break;
  }
}

namespace detail {
/// The first entries of L full rows (row l at src + l * row_stride) into the tile [n][L] by
/// register transposes (float on AVX-512 / AVX; L x L entries at a time); returns how many
/// entries per row it moved (0 where no transpose applies; the caller copies the rest).
template <class Arch, class T>
std::int64_t transpose_rows(const T* src, std::int64_t row_stride, std::int64_t n,
                            T* tile) noexcept {
  [[maybe_unused]] constexpr std::int64_t L = simd::lanes_v<T, Arch>;  // unused on SSE2
  std::int64_t e = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && L == 16) {
    for (; e + L <= n; e += L) transpose16x16(Arch{}, src + e, row_stride, tile + e * L, L);
  }
#endif
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float> && L == 8) {
    for (; e + L <= n; e += L) transpose8x8(Arch{}, src + e, row_stride, tile + e * L, L);
  }
#endif
  (void)src, (void)row_stride, (void)n, (void)tile;
  return e;
}
}  // namespace detail

/// For each row r in [r0, r1) of src (row r at src + r * row_stride, n entries,
/// 1 <= k <= n) with routed(r): the k largest entries in core::topk's order, as
/// visit(r, index_of, value_of) with index_of(j) (std::int32_t) and value_of(j)
/// for j < k. Rows are visited in increasing order. SIMD Arch and k <= 8: L rows
/// at a time through topk_lanes on a thread-local transposed tile (reused across
/// calls; full float tiles are transposed in registers); otherwise argmax_row / topk_row_insertion
/// / topk_row_select.
template <class T, class Arch, class Routed, class Visit>
void topk_rows_lanes(const T* src, std::int64_t row_stride, std::int64_t r0, std::int64_t r1,
                     std::int64_t n, std::int64_t k, Routed&& routed, Visit&& visit) {
  if constexpr (!simd::is_scalar_v<Arch>) {
    // The lanes carry indices as T: exact below 2^digits (always true in practice).
    if (k <= 8 && n < (std::int64_t{1} << std::numeric_limits<T>::digits)) {
      constexpr std::int64_t L = simd::lanes_v<T, Arch>;
      thread_local std::vector<T> tile_buf;
      tile_buf.resize(static_cast<std::size_t>(n * L));
      T* tile = tile_buf.data();
      alignas(64) T val[8 * L];
      alignas(64) T idx[8 * L];
      bool real[L];
      for (std::int64_t r = r0; r < r1; r += L) {
        const std::int64_t rows = std::min<std::int64_t>(L, r1 - r);
        bool all_real = rows == L;
        for (std::int64_t l = 0; l < L; ++l) {
          real[l] = l < rows && routed(r + l);
          all_real = all_real && real[l];
        }
        std::int64_t e0 = 0;  // entries [0, e0) already in the tile
        if (all_real) e0 = detail::transpose_rows<Arch>(src + r * row_stride, row_stride, n, tile);
        for (std::int64_t l = 0; l < L; ++l) {
          if (real[l]) {
            const T* p = src + (r + l) * row_stride;
            for (std::int64_t e = e0; e < n; ++e) tile[e * L + l] = p[e];
          } else {
            for (std::int64_t e = e0; e < n; ++e) tile[e * L + l] = T(0);
          }
        }
        topk_lanes(Arch{}, k, tile, n, val, idx);
        for (std::int64_t l = 0; l < rows; ++l) {
          if (!real[l]) continue;
          visit(
              r + l, [&](std::int64_t j) { return static_cast<std::int32_t>(idx[j * L + l]); },
              [&](std::int64_t j) { return val[j * L + l]; });
        }
      }
      return;
    }
  }
  std::int64_t ix_small[8];
  T vx_small[8];
  std::vector<std::int64_t> ix_big;
  std::vector<T> vx_big;
  std::vector<std::pair<T, std::int64_t>> select_scratch;
  if (k > 8) {
    ix_big.resize(static_cast<std::size_t>(k));
    vx_big.resize(static_cast<std::size_t>(k));
  }
  std::int64_t* ix = k > 8 ? ix_big.data() : ix_small;
  T* vx = k > 8 ? vx_big.data() : vx_small;
  for (std::int64_t r = r0; r < r1; ++r) {
    if (!routed(r)) continue;
    const T* p = src + r * row_stride;
    if (k == 1) {
      argmax_row(p, n, ix, vx);
    } else if (k <= 8) {
      topk_row_insertion(p, n, k, ix, vx);
    } else {
      topk_row_select(p, n, k, ix, vx, select_scratch);
    }
    visit(
        r, [&](std::int64_t j) { return static_cast<std::int32_t>(ix[j]); },
        [&](std::int64_t j) { return vx[j]; });
  }
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
