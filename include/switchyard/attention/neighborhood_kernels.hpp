#pragma once
// Neighborhood attention kernels (neighborhood.hpp): one tile is L adjacent queries along the
// last axis of one dilation group (L = the register width), one query per SIMD lane.
//
// Keys are packed per last-axis row of a dilation group (NeighborhoodRowPack): K transposed,
// [D][W], and V [W][Dp], with zero padding around the row's keys, so the key of lane j at
// offset o along the last axis (compact position x0 + j + o) is lane j of one unaligned load
// at x0 + o, for every lane at once: a tile scores L pairs per FMA.
// Tiles come in pairs of query rows (adjacent along the second-to-last axis, the same lanes):
// their key rows are the same but one at each end.
// Per key row and per d: one load of q^T[d] per query row (the L queries, pre-scaled by
// scale * log2(e)), and per offset o one load of keys, kept in a register, and one FMA per query
// row that sees the key row. Interior tiles compute exactly kernel_size offsets per row, every
// lane a real pair. At the borders of the last axis windows shift differently per lane: with
// AVX-512 (float) each lane's own window is gathered from 2L keys (two loads per d) by one
// two-source permute per window position (na_score_row_exact), so border tiles score exactly
// kernel_size per row too; elsewhere a border tile scores the union of offsets and masks each
// lane to its own window (-inf).
// The window (all rows x offsets) fits in a buffer, so the softmax is exact in one pass,
// lane-wise: max, p = 2^(s - max), sum. P . V runs G adjacent queries of both query rows at a
// time, key-major: adjacent queries' windows are one key apart (or the same, at a border), so
// each V row loaded serves 2 x G queries over the union of the G windows only (lanes outside
// their window read a zero p from the buffer's padding or mask).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "switchyard/attention/attention_tiles.hpp"
#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/online_softmax.hpp"
#include "switchyard/core/simd/transpose.hpp"

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
            if (vd == 1) {  // a vector loop: a memmove call per key costs more than the copy
              std::int64_t d = 0;
              for (; d + L <= D; d += L)
                xsimd::batch<T, Arch>::load_unaligned(vsrc + d).store_aligned(vdst + d);
              for (; d < D; ++d) vdst[d] = vsrc[d];
            } else {
              for (std::int64_t d = 0; d < D; ++d) vdst[d] = vsrc[d * vd];
            }
          }
        }
        bool full = n == XB;
        for (std::int64_t i = 0; i < n; ++i) full = full && src[i];
        // Evenly spaced keys (the common case) take register transposes, L keys at a time.
        bool even = full && kd == 1;
        for (std::int64_t i = 1; even && i < n; ++i) even = src[i] - src[i - 1] == src[1] - src[0];
        if (even) {
          const std::int64_t step = n > 1 ? src[1] - src[0] : 0;
          for (std::int64_t i = 0; even && i < XB; i += L)
            even = transpose_rows<T, Arch>(src[i], step, k0 + P + x0 + i, W, D);
          if (even) continue;
        }
        if (full) {  // XB keys, no padding
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
  std::int64_t n_rows = 0;     ///< key rows
  std::int64_t n_offsets = 0;  ///< scores per row and lane (p indices)
  std::int64_t kernel = 0;     ///< kernel size along the last axis
  const T* first;              ///< [L] first p index of each lane's window (as T)
  bool masked = false;         ///< p indices outside [first, first + kernel) are masked
  /// [L] key of each lane's p index 0 (relative to the key rows' V pointers: p index i of lane
  /// j is key key0[j] + i), and [L] its first p index in its window (first, as integers).
  const std::int64_t* key0 = nullptr;
  const std::int64_t* lo = nullptr;
};

namespace detail {

// Keeps v in a register: without it the compiler folds one unaligned load into each FMA
// that uses v, and a key vector shared by two query tiles is loaded twice (most of these
// loads cross a cache line, so the score loop becomes load-bound).
template <class V>
inline void keep_in_register(V& v) noexcept {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v.data));
#else
  (void)v;
#endif
}

// 32 vector registers (AVX-512) rather than 16.
template <class T, class Arch>
inline constexpr bool na_wide = Reg<T, Arch>::lanes * sizeof(T) == 64;

// Offsets per score group (accumulators kept in registers, plus q and k).
template <class T, class Arch>
inline constexpr int na_offsets_per_group = na_wide<T, Arch> ? 24 : 12;
template <class T, class Arch>
inline constexpr int na_offsets_per_group2 = na_wide<T, Arch> ? 14 : 6;
// Adjacent queries per P . V group and registers of D per accumulator row (two query rows'
// accumulators: 2 x G x NV registers).
template <class T, class Arch>
inline constexpr int na_pv_queries = 2;
template <class T, class Arch>
inline constexpr int na_pv_regs = na_wide<T, Arch> ? 4 : 2;

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
      auto kv = xsimd::batch<T, Arch>::load_unaligned(kd + o);
      keep_in_register(kv);
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

#if defined(__AVX512F__)
namespace detail {

// s*[i * 16 .. + 16) = sum_d qt*[d * 16 .. + 16) * k[d * W + idx_i[lane]] for i < OG: each lane's
// own window, gathered from 32 keys (two loads per d) by one two-source permute per offset.
template <int OG, bool Two>
inline void na_score_exact(const float* qt0, const float* qt1, std::int64_t D, const float* k,
                           std::int64_t W, const std::int32_t* idx, float* s0, float* s1) noexcept {
  __m512 acc0[OG], acc1[OG];
  __m512i ix[OG];
#pragma GCC unroll 32
  for (int o = 0; o < OG; ++o) {
    acc0[o] = acc1[o] = _mm512_setzero_ps();
    ix[o] = _mm512_load_si512(idx + o * 16);
  }
  for (std::int64_t d = 0; d < D; ++d) {
    const __m512 q0 = _mm512_load_ps(qt0 + d * 16);
    const __m512 q1 = Two ? _mm512_load_ps(qt1 + d * 16) : q0;
    const __m512 lo = _mm512_loadu_ps(k + d * W), hi = _mm512_loadu_ps(k + d * W + 16);
#pragma GCC unroll 32
    for (int o = 0; o < OG; ++o) {
      const __m512 kv = _mm512_permutex2var_ps(lo, ix[o], hi);
      acc0[o] = _mm512_fmadd_ps(q0, kv, acc0[o]);
      if constexpr (Two) acc1[o] = _mm512_fmadd_ps(q1, kv, acc1[o]);
    }
  }
#pragma GCC unroll 32
  for (int o = 0; o < OG; ++o) {
    _mm512_store_ps(s0 + o * 16, acc0[o]);
    if constexpr (Two) _mm512_store_ps(s1 + o * 16, acc1[o]);
  }
}

template <int OG, bool Two>
inline void na_score_exact_dispatch(int n, const float* qt0, const float* qt1, std::int64_t D,
                                    const float* k, std::int64_t W, const std::int32_t* idx,
                                    float* s0, float* s1) noexcept {
  if constexpr (OG > 1) {
    if (n < OG) {
      na_score_exact_dispatch<OG - 1, Two>(n, qt0, qt1, D, k, W, idx, s0, s1);
      return;
    }
  }
  na_score_exact<OG, Two>(qt0, qt1, D, k, W, idx, s0, s1);
}

}  // namespace detail
#endif

/// Whether na_score_row_exact runs for (T, Arch): float on AVX-512.
template <class Arch, class T>
constexpr bool na_has_exact_border() noexcept {
#if defined(__AVX512F__)
  return std::is_same_v<T, float> && detail::Reg<T, Arch>::lanes == 16;
#else
  return false;
#endif
}

/// Scores of one key row for a border tile in window order: p index i of lane j is the key at
/// k[idx[i * L + j]] (idx < 2L: the 2L keys from k cover every lane's window), for i < kernel,
/// into s0 (and s1 when qt1 is not null), as na_score_row does for offsets. Only where
/// na_has_exact_border().
template <class Arch, class T>
void na_score_row_exact(Arch, const T* qt0, const T* qt1, std::int64_t D, const T* k,
                        std::int64_t W, std::int64_t kernel, const std::int32_t* idx, T* s0,
                        T* s1) noexcept {
  static_assert(na_has_exact_border<Arch, T>(), "na_score_row_exact: float on AVX-512 only");
#if defined(__AVX512F__)
  constexpr std::int64_t L = 16;
  constexpr int G = detail::na_pv_queries<T, Arch>;
  const std::int64_t pad = G - 1;
  for (T* sr : {s0, s1}) {
    if (!sr) continue;
    for (std::int64_t i = 0; i < pad * L; ++i) {
      sr[i] = T(0);
      sr[(pad + kernel) * L + i] = T(0);
    }
  }
  // Registers: 2 x OG accumulators (one query row: OG), OG indices, q, two key loads.
  constexpr int OG2 = 8, OG1 = 12;
  const int og = qt1 ? OG2 : OG1;
  const std::int64_t groups = (kernel + og - 1) / og, per = (kernel + groups - 1) / groups;
  for (std::int64_t o0 = 0; o0 < kernel; o0 += per) {
    const int n = int(std::min(per, kernel - o0));
    if (qt1)
      detail::na_score_exact_dispatch<OG2, true>(n, qt0, qt1, D, k, W, idx + o0 * L,
                                                 s0 + (pad + o0) * L, s1 + (pad + o0) * L);
    else
      detail::na_score_exact_dispatch<OG1, false>(n, qt0, nullptr, D, k, W, idx + o0 * L,
                                                  s0 + (pad + o0) * L, nullptr);
  }
#else
  (void)qt0, (void)qt1, (void)D, (void)k, (void)W, (void)kernel, (void)idx, (void)s0, (void)s1;
#endif
}

/// Softmax of one tile whose scores are in s (key row r at r * na_score_row_stride, filled by
/// na_score_row), in place: s becomes p = 2^(s - max) per lane (0 outside each lane's window),
/// l [L] the softmax sums.
template <class Arch, class T>
void na_softmax(Arch, const NeighborhoodTile<T>& t, T* s, T* l) noexcept {
  static_assert(!simd::is_scalar_v<Arch>, "na_softmax: SIMD archs only");
  using V = xsimd::batch<T, Arch>;
  constexpr std::int64_t L = V::size;
  constexpr int G = detail::na_pv_queries<T, Arch>;
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
}

/// One key row of a tile pair's P . V (na_value): V at the tiles' first position (stride Dp)
/// and the p rows of the query rows that see it (null for one that does not).
template <class T>
struct NeighborhoodValueRow {
  const T* v;
  const T* p0;
  const T* p1;
};

namespace detail {

// o0 / o1 [L][Dp] columns [c, c + NV*L) of lanes j0 .. j0+G-1 = sum over rows, keys t in
// [t0, t1) of p(j, t - key0[j]) * v[t], for the two query rows at once: each V load serves G
// lanes of both. Keys outside a lane's window read 0 (the p rows' padding, or masked scores).
template <class Arch, class T, int G, int NV>
inline void na_value_group(const NeighborhoodValueRow<T>* rows, std::int64_t n_rows,
                           const std::int64_t* key0, std::int64_t t0, std::int64_t t1, int j0,
                           std::int64_t Dp, std::int64_t c, T* o0, T* o1) noexcept {
  using R = Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes;
  typename R::V acc0[G][NV], acc1[G][NV];
  for (int g = 0; g < G; ++g)
    for (int n = 0; n < NV; ++n) acc0[g][n] = acc1[g][n] = R::zero();
  // Buffer index of lane j0 + g's p for key x: at[g] + x * L.
  std::int64_t at[G];
  for (int g = 0; g < G; ++g) at[g] = (G - 1 - key0[j0 + g]) * L + j0 + g;
  for (std::int64_t r = 0; r < n_rows; ++r) {
    const T* vr = rows[r].v + c;
    const T* p0 = rows[r].p0;
    const T* p1 = rows[r].p1;
    if (p0 && p1) {
      for (std::int64_t t = t0; t < t1; ++t) {
        typename R::V vv[NV];
        for (int n = 0; n < NV; ++n) vv[n] = R::load(vr + t * Dp + n * L);
        for (int g = 0; g < G; ++g) {
          const auto a = R::splat(p0[at[g] + t * L]);
          const auto b = R::splat(p1[at[g] + t * L]);
          for (int n = 0; n < NV; ++n) {
            acc0[g][n] = R::fma(a, vv[n], acc0[g][n]);
            acc1[g][n] = R::fma(b, vv[n], acc1[g][n]);
          }
        }
      }
    } else {
      const T* p = p0 ? p0 : p1;
      auto& acc = p0 ? acc0 : acc1;
      for (std::int64_t t = t0; t < t1; ++t) {
        typename R::V vv[NV];
        for (int n = 0; n < NV; ++n) vv[n] = R::load(vr + t * Dp + n * L);
        for (int g = 0; g < G; ++g) {
          const auto a = R::splat(p[at[g] + t * L]);
          for (int n = 0; n < NV; ++n) acc[g][n] = R::fma(a, vv[n], acc[g][n]);
        }
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int n = 0; n < NV; ++n) {
      R::store(o0 + (j0 + g) * Dp + c + n * L, acc0[g][n]);
      if (o1) R::store(o1 + (j0 + g) * Dp + c + n * L, acc1[g][n]);
    }
}

}  // namespace detail

/// P . V of a tile pair (two query rows with the same lanes, `t` describing either: the same
/// offsets and lane windows) after na_softmax: o0 / o1 [L][Dp] unnormalised outputs (o1 null when
/// there is one query row). Adjacent lanes at a time, key-major, over the union of their windows
/// only (at the borders adjacent lanes' windows coincide instead of shifting by one).
template <class Arch, class T>
void na_value(Arch, const NeighborhoodTile<T>& t, const NeighborhoodValueRow<T>* rows,
              std::int64_t n_rows, std::int64_t Dp, T* o0, T* o1) noexcept {
  static_assert(!simd::is_scalar_v<Arch>, "na_value: SIMD archs only");
  constexpr std::int64_t L = detail::Reg<T, Arch>::lanes;
  constexpr int G = detail::na_pv_queries<T, Arch>;
  constexpr int NV = detail::na_pv_regs<T, Arch>;
  static_assert(L % G == 0);
  for (int j0 = 0; j0 < int(L); j0 += G) {
    // The union of the G lanes' windows (their starts never decrease along the lanes).
    const std::int64_t t0 = t.key0[j0] + t.lo[j0];
    const std::int64_t t1 = t.key0[j0 + G - 1] + t.lo[j0 + G - 1] + t.kernel;
    std::int64_t c = 0;
    for (; c + NV * L <= Dp; c += NV * L)
      detail::na_value_group<Arch, T, G, NV>(rows, n_rows, t.key0, t0, t1, j0, Dp, c, o0, o1);
    for (; c < Dp; c += L)
      detail::na_value_group<Arch, T, G, 1>(rows, n_rows, t.key0, t0, t1, j0, Dp, c, o0, o1);
  }
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
