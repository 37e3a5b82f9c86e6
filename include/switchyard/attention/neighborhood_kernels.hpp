#pragma once
// Neighborhood attention kernels (neighborhood.hpp): one tile is L adjacent queries along the
// last axis of one dilation group (L = the register width), one query per SIMD lane.
//
// Keys are packed per last-axis row of a dilation group (NeighborhoodRowPack): K transposed,
// [D][W], and V [W][Dp], with zero padding around the row's keys, so the key of lane j at
// offset o along the last axis (compact position x0 + j + o) is lane j of one unaligned load
// at x0 + o, for every lane at once: a tile scores L pairs per FMA.
// A tile has up to na_query_rows query rows (adjacent along the second-to-last axis, the same
// lanes: four with 32 vector registers, two with 16); their windows share most key rows, and
// the query rows that see one key row are always consecutive.
// Per key row and per d: one load of q^T[d] per query row that sees it (the L queries,
// pre-scaled by scale * log2(e)), and per offset o one load of keys, kept in a register, and one
// FMA per such query row. Interior tiles compute exactly kernel_size offsets per row, every
// lane a real pair. At the borders of the last axis windows shift differently per lane: with
// AVX-512 (float) each lane's own window is gathered from 2L keys (two loads per d) by one
// two-source permute per window position (na_score_row_exact), so border tiles score exactly
// kernel_size per row too; elsewhere a border tile scores the union of offsets and masks each
// lane to its own window (-inf).
// The window (all rows x offsets) fits in a buffer, so the softmax is exact in one pass,
// lane-wise: max, p = 2^(s - max), sum. P . V runs key row by key row, G adjacent queries
// (na_pv_group) of every query row that sees the key row at a time, key-major: adjacent
// queries' windows are one key apart (or the same, at a border), so each V row loaded serves
// G queries of each of those rows over the union of the G windows only (lanes outside their
// window read a zero p from the buffer's padding or mask).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "switchyard/attention/attention_tiles.hpp"
#include "switchyard/config.hpp"
#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/online_softmax.hpp"
#include "switchyard/core/simd/transpose.hpp"

SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace kernels {

/// The keys of one packed row: position x is token first + x * step for x < count, none past
/// (count 0: a row of padding).
struct NeighborhoodRowTokens {
  std::int64_t first = 0, step = 0, count = 0;
  /// Token of position x, or -1.
  std::int64_t operator()(std::int64_t x) const noexcept {
    return x >= 0 && x < count ? first + x * step : -1;
  }
};

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

  /// Packs head `head` from k/v [S, D] of (b, hk) (element strides ks/kd, vs/vd): the keys of
  /// row r are row_tokens(r) (a NeighborhoodRowTokens), zeros past them and in the padding.
  template <class RowTokensOf>
  void pack(std::int64_t head, const T* k, std::int64_t ks, std::int64_t kd, const T* v,
            std::int64_t vs, std::int64_t vd, RowTokensOf&& row_tokens) noexcept {
    for (std::int64_t r = 0; r < rows; ++r) pack_row(head, r, row_tokens(r), k, ks, kd, v, vs, vd);
  }

  /// Packs the key row whose position x is key token(x) into storage row `slot` of head `head`,
  /// from k/v as in pack. A pack used as a cache of rows (neighborhood.hpp's RowSlots) reuses
  /// slots.
  void pack_row(std::int64_t head, std::int64_t slot, NeighborhoodRowTokens token, const T* k,
                std::int64_t ks, std::int64_t kd, const T* v, std::int64_t vs,
                std::int64_t vd) noexcept {
    constexpr std::int64_t XB = 16;  // keys per transposed block
    const T* src[XB];
    T* const k0 = kt.data() + (head * rows + slot) * D * W;
    T* const v0 = vp.data() + (head * rows + slot) * W * Dp;
    for (std::int64_t x0 = 0; x0 < C; x0 += XB) {
      const std::int64_t n = std::min(XB, C - x0);
      for (std::int64_t i = 0; i < n; ++i) {
        // Keys and values PD tokens ahead: head slices of tokens far apart wait on memory.
        constexpr std::int64_t PD = 8;
        if (const std::int64_t pt = token(x0 + i + PD); pt >= 0)
          for (std::int64_t d = 0; d < D; d += 64 / std::int64_t(sizeof(T))) {
            __builtin_prefetch(k + pt * ks + d * kd);
            __builtin_prefetch(v + pt * vs + d * vd);
          }
        const std::int64_t tok = token(x0 + i);
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
// that uses v, and a key vector shared by several query tiles is loaded once per tile (most of
// these loads cross a cache line, so the score loop becomes load-bound).
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

// Query rows per tile (adjacent along the second-to-last axis, the same lanes): each key load
// of the score loop serves every query row that sees its key row, so more rows mean fewer loads
// per FMA (most key loads cross a cache line). Four with 32 registers; two with 16, where more
// rows would leave too few offsets per group.
template <class T, class Arch>
inline constexpr int na_query_rows = na_wide<T, Arch> ? 4 : 2;
inline constexpr int na_max_query_rows = 4;

// Offsets per score group for NQ query rows (NQ x OG accumulators in registers, plus NQ q
// registers and the key).
template <class T, class Arch, int NQ>
inline constexpr int na_offsets_per_group = na_wide<T, Arch> ? (NQ == 1   ? 24
                                                                : NQ == 2 ? 14
                                                                : NQ == 3 ? 7
                                                                          : 5)
                                                             : (NQ == 1 ? 12 : 6);
// Adjacent queries per P . V group: at most na_pv_queries (the score rows' padding allows
// that many), fewer where more query rows share each V load; registers of D per accumulator
// row (NQ x G x NV accumulators).
template <class T, class Arch>
inline constexpr int na_pv_queries = 2;
template <class T, class Arch, int NQ>
inline constexpr int na_pv_group = NQ >= 3 ? 1 : 2;
template <class T, class Arch>
inline constexpr int na_pv_regs = na_wide<T, Arch> ? 4 : 2;

// s[m][so + o * L .. + L) = sum_d qt[m][d * L .. + L) * k[d * W + o .. + L) for o < OG and
// m < NQ: NQ query tiles that see the same key row, each key load serving all of them.
template <class Arch, class T, int NQ, int OG>
inline void na_score_offsets(const T* const* qt, std::int64_t D, const T* k, std::int64_t W,
                             T* const* s, std::int64_t so) noexcept {
  using R = Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes;
  typename R::V acc[NQ][OG];
#pragma GCC unroll 4
  for (int m = 0; m < NQ; ++m)
#pragma GCC unroll 32
    for (int o = 0; o < OG; ++o) acc[m][o] = R::zero();
  for (std::int64_t d = 0; d < D; ++d) {
    typename R::V q[NQ];
#pragma GCC unroll 4
    for (int m = 0; m < NQ; ++m) q[m] = R::load(qt[m] + d * L);
    const T* kd = k + d * W;
#pragma GCC unroll 32
    for (int o = 0; o < OG; ++o) {
      auto kv = xsimd::batch<T, Arch>::load_unaligned(kd + o);
      if constexpr (NQ > 1) keep_in_register(kv);
#pragma GCC unroll 4
      for (int m = 0; m < NQ; ++m) acc[m][o] = R::fma(q[m], kv, acc[m][o]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < NQ; ++m)
#pragma GCC unroll 32
    for (int o = 0; o < OG; ++o) R::store(s[m] + so + o * L, acc[m][o]);
}

template <class Arch, class T, int NQ, int OG>
inline void na_score_dispatch(int n, const T* const* qt, std::int64_t D, const T* k, std::int64_t W,
                              T* const* s, std::int64_t so) noexcept {
  if constexpr (OG > 1) {
    if (n < OG) {
      na_score_dispatch<Arch, T, NQ, OG - 1>(n, qt, D, k, W, s, so);
      return;
    }
  }
  na_score_offsets<Arch, T, NQ, OG>(qt, D, k, W, s, so);
}

// na_score_row for NQ query tiles.
template <class Arch, class T, int NQ>
inline void na_score_row_n(const T* const* qt, std::int64_t D, const T* k, std::int64_t W,
                           std::int64_t NO, T* const* s) noexcept {
  constexpr std::int64_t L = Reg<T, Arch>::lanes;
  constexpr int OG = na_offsets_per_group<T, Arch, NQ>;
  const std::int64_t pad = na_pv_queries<T, Arch> - 1;
  // Groups of sizes that differ by one at most (13 offsets in groups of at most 5: 5, 4, 4).
  const std::int64_t groups = (NO + OG - 1) / OG;
  for (std::int64_t g = 0, o0 = 0; g < groups; ++g) {
    const std::int64_t n = NO / groups + (g < NO % groups);
    na_score_dispatch<Arch, T, NQ, OG>(int(n), qt, D, k + o0, W, s, (pad + o0) * L);
    o0 += n;
  }
}

// Zeroes the padding before and after the scores of each of the nq score rows.
template <class Arch, class T>
inline void na_score_padding(T* const* s, int nq, std::int64_t NO) noexcept {
  constexpr std::int64_t L = Reg<T, Arch>::lanes;
  const std::int64_t pad = na_pv_queries<T, Arch> - 1;
  for (int m = 0; m < nq; ++m)
    for (std::int64_t i = 0; i < pad * L; ++i) {
      s[m][i] = T(0);
      s[m][(pad + NO) * L + i] = T(0);
    }
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
/// rows s[m] of the nq query tiles q^T qt[m] that see it (1 <= nq <= na_query_rows).
template <class Arch, class T>
void na_score_row(Arch, const T* const* qt, int nq, std::int64_t D, const T* k, std::int64_t W,
                  std::int64_t n_offsets, T* const* s) noexcept {
  static_assert(!simd::is_scalar_v<Arch>, "na_score_row: SIMD archs only");
  SWITCHYARD_ASSERT((nq >= 1 && nq <= detail::na_query_rows<T, Arch>));
  detail::na_score_padding<Arch, T>(s, nq, n_offsets);
  switch (nq) {
    case 1:
      detail::na_score_row_n<Arch, T, 1>(qt, D, k, W, n_offsets, s);
      break;
    case 2:
      detail::na_score_row_n<Arch, T, 2>(qt, D, k, W, n_offsets, s);
      break;
    default:
      if constexpr (detail::na_query_rows<T, Arch> >= 4) {
        if (nq == 3)
          detail::na_score_row_n<Arch, T, 3>(qt, D, k, W, n_offsets, s);
        else
          detail::na_score_row_n<Arch, T, 4>(qt, D, k, W, n_offsets, s);
      }
  }
}

#if defined(__AVX512F__)
namespace detail {

// s[m][so + i * 16 .. + 16) = sum_d qt[m][d * 16 .. + 16) * k[d * W + idx_i[lane]] for i < OG
// and m < NQ: each lane's own window, gathered from 32 keys (two loads per d) by one two-source
// permute per offset, serving all NQ query tiles.
template <int NQ, int OG>
inline void na_score_exact(const float* const* qt, std::int64_t D, const float* k, std::int64_t W,
                           const std::int32_t* idx, float* const* s, std::int64_t so) noexcept {
  __m512 acc[NQ][OG];
  __m512i ix[OG];
#pragma GCC unroll 32
  for (int o = 0; o < OG; ++o) {
#pragma GCC unroll 4
    for (int m = 0; m < NQ; ++m) acc[m][o] = _mm512_setzero_ps();
    ix[o] = _mm512_load_si512(idx + o * 16);
  }
  for (std::int64_t d = 0; d < D; ++d) {
    __m512 q[NQ];
#pragma GCC unroll 4
    for (int m = 0; m < NQ; ++m) q[m] = _mm512_load_ps(qt[m] + d * 16);
    const __m512 lo = _mm512_loadu_ps(k + d * W), hi = _mm512_loadu_ps(k + d * W + 16);
#pragma GCC unroll 32
    for (int o = 0; o < OG; ++o) {
      const __m512 kv = _mm512_permutex2var_ps(lo, ix[o], hi);
#pragma GCC unroll 4
      for (int m = 0; m < NQ; ++m) acc[m][o] = _mm512_fmadd_ps(q[m], kv, acc[m][o]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < NQ; ++m)
#pragma GCC unroll 32
    for (int o = 0; o < OG; ++o) _mm512_store_ps(s[m] + so + o * 16, acc[m][o]);
}

template <int NQ, int OG>
inline void na_score_exact_dispatch(int n, const float* const* qt, std::int64_t D, const float* k,
                                    std::int64_t W, const std::int32_t* idx, float* const* s,
                                    std::int64_t so) noexcept {
  if constexpr (OG > 1) {
    if (n < OG) {
      na_score_exact_dispatch<NQ, OG - 1>(n, qt, D, k, W, idx, s, so);
      return;
    }
  }
  na_score_exact<NQ, OG>(qt, D, k, W, idx, s, so);
}

// na_score_row_exact for NQ query tiles. Registers: NQ x OG accumulators, OG indices, NQ q,
// two key loads and a permuted key.
template <int NQ>
inline void na_score_exact_row_n(const float* const* qt, std::int64_t D, const float* k,
                                 std::int64_t W, std::int64_t kernel, const std::int32_t* idx,
                                 float* const* s) noexcept {
  constexpr int OG = NQ == 1 ? 12 : NQ == 2 ? 8 : NQ == 3 ? 6 : 4;
  const std::int64_t pad = na_pv_queries<float, xsimd::avx512f> - 1;
  const std::int64_t groups = (kernel + OG - 1) / OG;
  for (std::int64_t g = 0, o0 = 0; g < groups; ++g) {
    const std::int64_t n = kernel / groups + (g < kernel % groups);
    na_score_exact_dispatch<NQ, OG>(int(n), qt, D, k, W, idx + o0 * 16, s, (pad + o0) * 16);
    o0 += n;
  }
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
/// into the score rows s[m] of the nq query tiles qt[m], as na_score_row does for offsets. Only
/// where na_has_exact_border().
template <class Arch, class T>
void na_score_row_exact(Arch, const T* const* qt, int nq, std::int64_t D, const T* k,
                        std::int64_t W, std::int64_t kernel, const std::int32_t* idx,
                        T* const* s) noexcept {
  static_assert(na_has_exact_border<Arch, T>(), "na_score_row_exact: float on AVX-512 only");
#if defined(__AVX512F__)
  SWITCHYARD_ASSERT((nq >= 1 && nq <= detail::na_query_rows<T, Arch>));
  detail::na_score_padding<Arch, T>(s, nq, kernel);
  switch (nq) {
    case 1:
      detail::na_score_exact_row_n<1>(qt, D, k, W, kernel, idx, s);
      break;
    case 2:
      detail::na_score_exact_row_n<2>(qt, D, k, W, kernel, idx, s);
      break;
    case 3:
      detail::na_score_exact_row_n<3>(qt, D, k, W, kernel, idx, s);
      break;
    default:
      detail::na_score_exact_row_n<4>(qt, D, k, W, kernel, idx, s);
  }
#else
  (void)qt, (void)nq, (void)D, (void)k, (void)W, (void)kernel, (void)idx, (void)s;
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

/// One key row of a tile's P . V (na_value): V at the tiles' first position (stride Dp), and
/// the nq query rows that see it: query row m[i], whose p row is p[i].
template <class T>
struct NeighborhoodValueRow {
  const T* v = nullptr;
  int nq = 0;
  int m[detail::na_max_query_rows] = {};
  const T* p[detail::na_max_query_rows] = {};
};

namespace detail {

// For each of the row's NQ query rows i: o[row.m[i]] [L][Dp] columns [c, c + NV*L) of lanes
// j0 .. j0+G-1 += sum over keys t in [t0, t1) of one key row of p_i(j, t - key0[j]) * v[t],
// all at once: each V load serves G lanes of each query row. Keys outside a lane's window read 0
// (the p rows' padding, or masked scores).
template <class Arch, class T, int NQ, int G, int NV>
inline void na_value_group(const NeighborhoodValueRow<T>& row, const std::int64_t* key0,
                           std::int64_t t0, std::int64_t t1, int j0, std::int64_t Dp,
                           std::int64_t c, T* const* o) noexcept {
  using R = Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes;
  typename R::V acc[NQ][G][NV];
  // Buffer index of lane j0 + g's p for key x: at[g] + x * L.
  std::int64_t at[G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) at[g] = (na_pv_queries<T, Arch> - 1 - key0[j0 + g]) * L + j0 + g;
  T* out[NQ];
  const T* p[NQ];
#pragma GCC unroll 4
  for (int m = 0; m < NQ; ++m) {
    out[m] = o[row.m[m]] + j0 * Dp + c;
    p[m] = row.p[m];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) acc[m][g][n] = R::load(out[m] + g * Dp + n * L);
  }
  const T* vr = row.v + c;
  for (std::int64_t t = t0; t < t1; ++t) {
    typename R::V vv[NV];
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) vv[n] = R::load(vr + t * Dp + n * L);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
      for (int m = 0; m < NQ; ++m) {
        const auto a = R::splat(p[m][at[g] + t * L]);
#pragma GCC unroll 4
        for (int n = 0; n < NV; ++n) acc[m][g][n] = R::fma(a, vv[n], acc[m][g][n]);
      }
  }
#pragma GCC unroll 4
  for (int m = 0; m < NQ; ++m)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) R::store(out[m] + g * Dp + n * L, acc[m][g][n]);
}

// One key row of na_value for its NQ query rows.
template <class Arch, class T, int NQ>
inline void na_value_row(const NeighborhoodTile<T>& t, const NeighborhoodValueRow<T>& row,
                         std::int64_t Dp, T* const* o) noexcept {
  constexpr std::int64_t L = Reg<T, Arch>::lanes;
  constexpr int G = na_pv_group<T, Arch, NQ>;
  constexpr int NV = na_pv_regs<T, Arch>;
  static_assert(L % G == 0 && G <= na_pv_queries<T, Arch>);
  for (int j0 = 0; j0 < int(L); j0 += G) {
    // The union of the G lanes' windows (their starts never decrease along the lanes).
    const std::int64_t t0 = t.key0[j0] + t.lo[j0];
    const std::int64_t t1 = t.key0[j0 + G - 1] + t.lo[j0 + G - 1] + t.kernel;
    std::int64_t c = 0;
    for (; c + NV * L <= Dp; c += NV * L)
      na_value_group<Arch, T, NQ, G, NV>(row, t.key0, t0, t1, j0, Dp, c, o);
    for (; c < Dp; c += L) na_value_group<Arch, T, NQ, G, 1>(row, t.key0, t0, t1, j0, Dp, c, o);
  }
}

}  // namespace detail

/// P . V of a tile of nq query rows (the same lanes, `t` describing each: the same offsets and
/// lane windows) after na_softmax: o[m] [L][Dp] unnormalised outputs of query row m. Key row
/// by key row (one row's V stays in L1 while every lane uses it; a whole tile's V does not
/// fit), each V load serving every query row that sees the key row, adjacent lanes at a time,
/// key-major, over the union of their windows only (at the borders adjacent lanes' windows
/// coincide instead of shifting by one). Each output sums its key rows in order, and keys in
/// order within a row.
template <class Arch, class T>
void na_value(Arch, const NeighborhoodTile<T>& t, const NeighborhoodValueRow<T>* rows,
              std::int64_t n_rows, std::int64_t Dp, T* const* o, int nq) noexcept {
  static_assert(!simd::is_scalar_v<Arch>, "na_value: SIMD archs only");
  SWITCHYARD_ASSERT((nq >= 1 && nq <= detail::na_query_rows<T, Arch>));
  constexpr std::int64_t L = detail::Reg<T, Arch>::lanes;
  for (int m = 0; m < nq; ++m) std::fill_n(o[m], L * Dp, T(0));
  for (std::int64_t r = 0; r < n_rows; ++r) {
    SWITCHYARD_ASSERT(rows[r].nq >= 1 && rows[r].nq <= nq);
    switch (rows[r].nq) {
      case 1:
        detail::na_value_row<Arch, T, 1>(t, rows[r], Dp, o);
        break;
      case 2:
        detail::na_value_row<Arch, T, 2>(t, rows[r], Dp, o);
        break;
      default:
        if constexpr (detail::na_query_rows<T, Arch> >= 4) {
          if (rows[r].nq == 3)
            detail::na_value_row<Arch, T, 3>(t, rows[r], Dp, o);
          else
            detail::na_value_row<Arch, T, 4>(t, rows[r], Dp, o);
        }
    }
  }
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
