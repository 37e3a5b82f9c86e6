#pragma once
// Neighborhood attention kernels (neighborhood.hpp): one tile is L adjacent queries along the
// last axis of one dilation group (L = the register width), one query per SIMD lane.
//
// Keys are packed per last-axis row of a dilation group (NeighborhoodRowPack): K transposed,
// [D][W], and V [W][Dp], with zero padding around the row's keys, so the key of lane j at
// offset o along the last axis (compact position x0 + j + o) is lane j of one unaligned load
// at x0 + o, for every lane at once: a tile scores L pairs per FMA.
// Per key row of the tile's window (the rows of the leading axes' windows, the same for all
// its queries) and per d: one load of q^T[d] (the L queries, pre-scaled by scale * log2(e)),
// and per offset o one load of keys and one FMA into accumulator o. Interior tiles compute
// exactly kernel_size offsets per row, every lane a real pair; at the borders of the last axis
// windows shift differently per lane, so a tile computes the union of offsets and masks each
// lane to its own window (-inf).
// The window (all rows x offsets) fits in a buffer, so the softmax is exact in one pass,
// lane-wise: max, p = 2^(s - max), sum. P . V runs G adjacent queries at a time key-major:
// adjacent queries' windows are one key apart, so each V row loaded serves G queries (lanes
// outside their window read a zero p from the buffer's padding or mask).
#include <algorithm>
#include <cstdint>
#include <limits>

#include "switchyard/attention/attention_tiles.hpp"
#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/online_softmax.hpp"

SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace kernels {

/// Keys and values of every (b, kv head), per last-axis row of a dilation group: row r holds
/// compact positions x in [-P, W - P), K^T [D][W] and V [W][Dp]; positions that are not keys of
/// the row are zeros.
template <class T, class Arch>
struct NeighborhoodRowPack {
  static constexpr std::int64_t L = detail::Reg<T, Arch>::lanes;
  static constexpr std::int64_t P = L + 1;  // positions before 0 (a tile reads from -L)
  std::int64_t D = 0, Dp = 0, rows = 0, C = 0, W = 0, heads = 0;
  detail::aligned_vector<T> kt, vp;

  NeighborhoodRowPack() = default;
  /// Storage for `heads` (b, kv head) pairs of `rows` rows of C positions, dimension D.
  NeighborhoodRowPack(std::int64_t heads_, std::int64_t rows_, std::int64_t C_, std::int64_t D_) {
    reset(heads_, rows_, C_, D_);
  }
  /// Positions stored per row of C keys (padding included).
  static constexpr std::int64_t width(std::int64_t C) noexcept {
    return core::round_up(P + C + L + 2, L);
  }
  /// Resizes for `heads` x `rows` rows of C positions, dimension D. Storage is reused when the
  /// sizes do not change (its padding is still zero: pack writes positions [0, C) only), and
  /// zeroed otherwise.
  void reset(std::int64_t heads_, std::int64_t rows_, std::int64_t C_, std::int64_t D_) {
    if (heads_ == heads && rows_ == rows && C_ == C && D_ == D && !kt.empty()) return;
    D = D_;
    Dp = core::round_up(std::max<std::int64_t>(D_, 1), L);
    rows = rows_;
    C = C_;
    W = width(C_);
    heads = heads_;
    kt.assign(std::size_t(std::max<std::int64_t>(1, heads * rows * D * W)), T(0));
    vp.assign(std::size_t(std::max<std::int64_t>(1, heads * rows * W * Dp)), T(0));
  }
  /// K^T of (head, row) at position 0 (row d at + d * W).
  const T* k_row(std::int64_t head, std::int64_t r) const noexcept {
    return kt.data() + (head * rows + r) * D * W + P;
  }
  /// V of (head, row) at position 0 (position x at + x * Dp).
  const T* v_row(std::int64_t head, std::int64_t r) const noexcept {
    return vp.data() + ((head * rows + r) * W + P) * Dp;
  }

  /// Packs head `head` from k/v [S, D] of (b, hk) (element strides ks/kd, vs/vd): position x
  /// of row r is key token(r, x), zeros where token < 0 and in the padding.
  template <class TokenOf>
  void pack(std::int64_t head, const T* k, std::int64_t ks, std::int64_t kd, const T* v,
            std::int64_t vs, std::int64_t vd, TokenOf&& token) noexcept {
    constexpr std::int64_t XB = 16;  // keys per transposed block
    const T* src[XB];
    for (std::int64_t r = 0; r < rows; ++r) {
      T* const k0 = kt.data() + (head * rows + r) * D * W;
      T* const v0 = vp.data() + (head * rows + r) * W * Dp;
      for (std::int64_t x0 = 0; x0 < C; x0 += XB) {
        const std::int64_t n = std::min(XB, C - x0);
        for (std::int64_t i = 0; i < n; ++i) {
          const std::int64_t tok = token(r, x0 + i);
          src[i] = tok < 0 ? nullptr : k + tok * ks;
          T* vdst = v0 + (P + x0 + i) * Dp;
          if (tok < 0) {
            std::fill_n(vdst, Dp, T(0));
          } else {
            const T* vsrc = v + tok * vs;
            if (vd == 1) {
              std::copy_n(vsrc, D, vdst);
            } else {
              for (std::int64_t d = 0; d < D; ++d) vdst[d] = vsrc[d * vd];
            }
          }
        }
        bool full = n == XB;
        for (std::int64_t i = 0; i < n; ++i) full = full && src[i];
        if (full) {  // the common case: XB keys, no padding
          for (std::int64_t d = 0; d < D; ++d) {
            T* kdst = k0 + d * W + P + x0;
            for (std::int64_t i = 0; i < XB; ++i) kdst[i] = src[i][d * kd];
          }
        } else {
          for (std::int64_t d = 0; d < D; ++d) {
            T* kdst = k0 + d * W + P + x0;
            for (std::int64_t i = 0; i < n; ++i) kdst[i] = src[i] ? src[i][d * kd] : T(0);
          }
        }
      }
    }
  }
};

/// One neighborhood tile (see the file comment): L query lanes, `n_rows` key rows.
template <class T>
struct NeighborhoodTile {
  const T* const* v_rows;      ///< per key row: V at the tile's first position x0 (stride Dp)
  std::int64_t n_rows = 0;     ///< key rows
  std::int64_t n_offsets = 0;  ///< offsets computed per row (kernel_size inside the grid)
  std::int64_t kernel = 0;     ///< kernel size along the last axis
  const T* first;              ///< [L] first offset of each lane's window (as T)
  bool masked = false;         ///< lanes' windows differ (border tile): mask per lane
};

namespace detail {

// Offsets per score group (accumulators kept in registers, plus q and k).
template <class T, class Arch>
inline constexpr int na_offsets_per_group = DenseTiling<T, Arch>::wide ? 24 : 12;
template <class T, class Arch>
inline constexpr int na_offsets_per_group2 = DenseTiling<T, Arch>::wide ? 14 : 6;
// Adjacent queries per P . V group and registers of D per accumulator row.
template <class T, class Arch>
inline constexpr int na_pv_queries = DenseTiling<T, Arch>::wide ? 4 : 2;
inline constexpr int na_pv_regs = 4;

// s[o * L .. + L) = sum_d qt[d * L .. + L) * k[d * W + o .. + L) for o < OG.
template <class Arch, class T, int OG>
inline void na_score_offsets(const T* qt, std::int64_t D, const T* k, std::int64_t W,
                             T* s) noexcept {
  using R = Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes;
  typename R::V acc[OG];
#pragma GCC unroll 32
  for (int o = 0; o < OG; ++o) acc[o] = R::zero();
  for (std::int64_t d = 0; d < D; ++d) {
    const auto qv = R::load(qt + d * L);
    const T* kd = k + d * W;
#pragma GCC unroll 32
    for (int o = 0; o < OG; ++o)
      acc[o] = R::fma(qv, xsimd::batch<T, Arch>::load_unaligned(kd + o), acc[o]);
  }
#pragma GCC unroll 32
  for (int o = 0; o < OG; ++o) R::store(s + o * L, acc[o]);
}

template <class Arch, class T, int OG>
inline void na_score_dispatch(int n, const T* qt, std::int64_t D, const T* k, std::int64_t W,
                              T* s) noexcept {
  if constexpr (OG > 1) {
    if (n < OG) {
      na_score_dispatch<Arch, T, OG - 1>(n, qt, D, k, W, s);
      return;
    }
  }
  na_score_offsets<Arch, T, OG>(qt, D, k, W, s);
}

// As na_score_offsets for two query tiles (q^T qt0, qt1) that see the same key row: each key
// load serves both.
template <class Arch, class T, int OG>
inline void na_score_offsets2(const T* qt0, const T* qt1, std::int64_t D, const T* k,
                              std::int64_t W, T* s0, T* s1) noexcept {
  using R = Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes;
  typename R::V acc0[OG], acc1[OG];
#pragma GCC unroll 32
  for (int o = 0; o < OG; ++o) {
    acc0[o] = R::zero();
    acc1[o] = R::zero();
  }
  for (std::int64_t d = 0; d < D; ++d) {
    const auto q0 = R::load(qt0 + d * L);
    const auto q1 = R::load(qt1 + d * L);
    const T* kd = k + d * W;
#pragma GCC unroll 32
    for (int o = 0; o < OG; ++o) {
      const auto kv = xsimd::batch<T, Arch>::load_unaligned(kd + o);
      acc0[o] = R::fma(q0, kv, acc0[o]);
      acc1[o] = R::fma(q1, kv, acc1[o]);
    }
  }
#pragma GCC unroll 32
  for (int o = 0; o < OG; ++o) {
    R::store(s0 + o * L, acc0[o]);
    R::store(s1 + o * L, acc1[o]);
  }
}

template <class Arch, class T, int OG>
inline void na_score_dispatch2(int n, const T* qt0, const T* qt1, std::int64_t D, const T* k,
                               std::int64_t W, T* s0, T* s1) noexcept {
  if constexpr (OG > 1) {
    if (n < OG) {
      na_score_dispatch2<Arch, T, OG - 1>(n, qt0, qt1, D, k, W, s0, s1);
      return;
    }
  }
  na_score_offsets2<Arch, T, OG>(qt0, qt1, D, k, W, s0, s1);
}

// o[j][c .. c + NV*L) += sum over rows, t of p(j, t) * v[j + t] for the G lanes j0 .. j0+G-1:
// lane j0 + g reads its p at buffer index (G - 1) + t - g of each row (padding reads 0).
template <class Arch, class T, int G, int NV>
inline void na_value_group(const T* s, std::int64_t s_row, std::int64_t steps, int j0,
                           const T* const* v_rows, std::int64_t n_rows, std::int64_t Dp,
                           std::int64_t c, T* o) noexcept {
  using R = Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes;
  typename R::V acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int n = 0; n < NV; ++n) acc[g][n] = R::zero();
  for (std::int64_t r = 0; r < n_rows; ++r) {
    const T* sr = s + r * s_row + j0 + (G - 1) * L;
    const T* vr = v_rows[r] + j0 * Dp + c;
    for (std::int64_t t = 0; t < steps; ++t) {
      typename R::V vv[NV];
      for (int n = 0; n < NV; ++n) vv[n] = R::load(vr + t * Dp + n * L);
      for (int g = 0; g < G; ++g) {
        const auto pb = R::splat(sr[(t - g) * L + g]);
        for (int n = 0; n < NV; ++n) acc[g][n] = R::fma(pb, vv[n], acc[g][n]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int n = 0; n < NV; ++n) R::store(o + (j0 + g) * Dp + c + n * L, acc[g][n]);
}

}  // namespace detail

/// Elements per key row of a tile's score buffer (aligned): padded offsets x L lanes.
template <class Arch, class T>
constexpr std::int64_t na_score_row_stride(std::int64_t n_offsets) noexcept {
  constexpr std::int64_t L = detail::Reg<T, Arch>::lanes;
  constexpr int G = detail::na_pv_queries<T, Arch>;
  return (n_offsets + 2 * (G - 1)) * L;
}

/// Scores of one key row (K^T at k, row stride W) for offsets [0, n_offsets) into the score
/// rows s0 (and s1 when qt1 is not null: a second query tile that sees the same key row).
template <class Arch, class T>
void na_score_row(Arch, const T* qt0, const T* qt1, std::int64_t D, const T* k, std::int64_t W,
                  std::int64_t n_offsets, T* s0, T* s1) noexcept {
  static_assert(!simd::is_scalar_v<Arch>, "na_score_row: SIMD archs only");
  constexpr std::int64_t L = detail::Reg<T, Arch>::lanes;
  constexpr int G = detail::na_pv_queries<T, Arch>;
  const std::int64_t NO = n_offsets, pad = G - 1;
  for (T* sr : {s0, s1}) {
    if (!sr) continue;
    for (std::int64_t i = 0; i < pad * L; ++i) {
      sr[i] = T(0);
      sr[(pad + NO) * L + i] = T(0);
    }
  }
  if (qt1) {
    constexpr int OG = detail::na_offsets_per_group2<T, Arch>;
    const std::int64_t groups = (NO + OG - 1) / OG, per = (NO + groups - 1) / groups;
    for (std::int64_t o0 = 0; o0 < NO; o0 += per)
      detail::na_score_dispatch2<Arch, T, OG>(int(std::min(per, NO - o0)), qt0, qt1, D, k + o0, W,
                                              s0 + (pad + o0) * L, s1 + (pad + o0) * L);
  } else {
    constexpr int OG = detail::na_offsets_per_group<T, Arch>;
    const std::int64_t groups = (NO + OG - 1) / OG, per = (NO + groups - 1) / groups;
    for (std::int64_t o0 = 0; o0 < NO; o0 += per)
      detail::na_score_dispatch<Arch, T, OG>(int(std::min(per, NO - o0)), qt0, D, k + o0, W,
                                             s0 + (pad + o0) * L);
  }
}

/// Softmax and P . V of one tile whose scores are in s (key row r at
/// r * na_score_row_stride, filled by na_score_row): o [L][Dp] unnormalised outputs, l [L] softmax
/// sums (out = o / l).
template <class Arch, class T>
void na_softmax_value(Arch, const NeighborhoodTile<T>& t, std::int64_t Dp, T* s, T* o,
                      T* l) noexcept {
  static_assert(!simd::is_scalar_v<Arch>, "na_softmax_value: SIMD archs only");
  using V = xsimd::batch<T, Arch>;
  constexpr std::int64_t L = V::size;
  constexpr int G = detail::na_pv_queries<T, Arch>;
  constexpr int NV = detail::na_pv_regs;
  static_assert(L % G == 0);
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const std::int64_t NO = t.n_offsets;
  const std::int64_t pad = G - 1, s_row = (NO + 2 * pad) * L;
  // Border tiles: each lane keeps offsets [first, first + kernel) only.
  if (t.masked) {
    const V lo = V::load_unaligned(t.first), hi = lo + V(T(t.kernel));
    for (std::int64_t r = 0; r < t.n_rows; ++r)
      for (std::int64_t i = 0; i < NO; ++i) {
        T* p = s + r * s_row + (pad + i) * L;
        const V ov = V(T(i));
        xsimd::select((ov >= lo) && (ov < hi), V::load_aligned(p), V(neg_inf)).store_aligned(p);
      }
  }
  // Exact softmax per lane over the whole window (every lane sees at least one key).
  V mv(neg_inf);
  for (std::int64_t r = 0; r < t.n_rows; ++r)
    for (std::int64_t i = 0; i < NO; ++i)
      mv = xsimd::max(mv, V::load_aligned(s + r * s_row + (pad + i) * L));
  V sum(T(0));
  for (std::int64_t r = 0; r < t.n_rows; ++r)
    for (std::int64_t i = 0; i < NO; ++i) {
      T* p = s + r * s_row + (pad + i) * L;
      const V e = simd::exp2_nonpositive(V::load_aligned(p) - mv);
      e.store_aligned(p);
      sum += e;
    }
  sum.store_unaligned(l);
  // P . V, G adjacent lanes at a time, key-major.
  for (int j0 = 0; j0 < int(L); j0 += G) {
    std::int64_t c = 0;
    for (; c + NV * L <= Dp; c += NV * L)
      detail::na_value_group<Arch, T, G, NV>(s, s_row, NO + G - 1, j0, t.v_rows, t.n_rows, Dp, c,
                                             o);
    for (; c < Dp; c += L)
      detail::na_value_group<Arch, T, G, 1>(s, s_row, NO + G - 1, j0, t.v_rows, t.n_rows, Dp, c, o);
  }
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
