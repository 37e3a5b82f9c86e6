#pragma once
// Fused dense multi-head attention (FlashAttention-style, CPU SIMD) and the
// DenseAttention layer.
//
// Two passes, both through parallel_for with fixed partitions (the block sizes
// depend only on T and Arch, never on the thread count), so results are
// bit-identical for any thread count:
// 1. per (batch b, kv head): pack K transposed and key-group-major
//    (Kt[g][d][G], G = NV registers of keys, zero padded) and V row-major with D
//    padded to whole registers. Memory: about the size of K and V, per call.
// 2. per (b, head h, block of ~256 query rows), per chunk of keys whose K and V fit in L2
//    (key_chunk), per tile of MR query rows (Q pre-multiplied by scale * log2(e), so softmax
//    uses exp2; each row's softmax state is kept between chunks):
//      for each block of up to KB keys of the chunk the tile can see:
//        S_blk = Q_tile . K_blk^T      register-tiled, MR rows x G keys at a time
//        mask S_blk (causal / bias / tail), online-softmax update of each row (the row maxima
//        of an unmasked block come from the score registers)
//        O_tile = O_tile * alpha + P . V_blk   register-tiled, MR rows x NV registers of D
//    then out = O_tile / l
// Causal tiles stop at their last visible key and key lengths cut the key
// range, so masked blocks cost nothing. A last tile under half full runs row by
// row (decoding with T = 1 computes no padding rows).
// The T x S score matrix is never stored: only MR x KB scores at a time.
//
// Optional, costing nothing when off:
// - active heads: an inactive (b, h) writes zeros and computes nothing; a KV head whose query
//   heads are all inactive is not even packed.
// - key mass: the attention probability each key receives, summed over the query heads of its
//   KV group and over the queries. Once a tile's final row max m and sum l are known, its scores
//   are recomputed block by block (K is read again, V is not) and 2^(s - m) / l is summed per key
//   into the task's own partial row; the partials are then reduced per (b, kv head) in a fixed
//   (head, query block) order, so the mass too is bit-identical for any thread count. The output
//   is computed exactly as without the option.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "switchyard/attention/attention_tiles.hpp"
#include "switchyard/attention/decode_kernels.hpp"
#include "switchyard/attention/kv_cache.hpp"
#include "switchyard/attention/mask.hpp"
#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/online_softmax.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace kernels {

/// Raw description of one dense attention call (checked by DenseAttention).
/// Strides are in elements; dims: q/out [B, T, H, D], k/v [B, S, Hkv, D]. KV: the type K and V
/// are stored as, T or bf16 for T = float (widened while they are packed).
template <class T, class KV = T>
struct DenseAttentionArgs {
  const T* q;
  std::int64_t q_stride[4];
  const KV* k;
  std::int64_t k_stride[4];
  const KV* v;
  std::int64_t v_stride[4];
  T* out;
  std::int64_t out_stride[4];
  std::int64_t B, T_q, S, H, Hkv, D;
  T scale;              // multiplies q . k
  bool causal = false;  // keys j <= i + causal_offset
  std::int64_t causal_offset = 0;
  const std::int64_t* key_lengths = nullptr;  // [B] or null
  const T* bias = nullptr;                    // [T, S] or null, added to scale * q . k
  std::int64_t bias_stride[2] = {0, 0};
  T* key_mass = nullptr;  // [B, Hkv, S] or null: attention mass per key (see the file comment)
  std::int64_t key_mass_stride[3] = {0, 0, 0};
  bool accumulate_key_mass = false;      // add to key_mass instead of overwriting it
  const std::uint8_t* active = nullptr;  // [H] or [B, H] (active_per_batch) or null; 0: skipped
  bool active_per_batch = false;
};

/// Whether head h of batch element b is computed.
template <class T, class KV>
bool dense_head_active(const DenseAttentionArgs<T, KV>& a, std::int64_t b,
                       std::int64_t h) noexcept {
  return !a.active || a.active[a.active_per_batch ? b * a.H + h : h] != 0;
}

namespace detail {

// Tile sizes per (T, Arch): MR query rows x NV registers, so MR * NV
// accumulators plus NV loads and one broadcast fit the register file
// (32 registers with AVX-512, 16 otherwise).
template <class T, class Arch>
struct DenseTiling {
  static constexpr std::int64_t L = Reg<T, Arch>::lanes;
  static constexpr bool wide = !simd::is_scalar_v<Arch> && L * sizeof(T) == 64;
  static constexpr int MR = simd::is_scalar_v<Arch> ? 4 : (wide ? 6 : 6);
  static constexpr int NV = simd::is_scalar_v<Arch> ? 4 : (wide ? 4 : 2);
  static constexpr std::int64_t G = NV * L;  // keys per score micro-tile
  static constexpr std::int64_t KB = 512;    // keys per online-softmax block (multiple of G)
  static constexpr std::int64_t rows_per_task = MR * ((256 + MR - 1) / MR);
  // Keys per chunk that every tile of a task visits before the next chunk: K and V of a chunk
  // take about 512 KiB, half of the smallest L2 we run on (1 MiB per core), whole KB blocks.
  static constexpr std::int64_t key_chunk(std::int64_t D) noexcept {
    const std::int64_t bytes_per_key = 2 * std::max<std::int64_t>(D, 1) * std::int64_t(sizeof(T));
    return std::max<std::int64_t>(1, (std::int64_t(512) << 10) / bytes_per_key / KB) * KB;
  }
  static_assert(KB % G == 0);
};

using core::round_up;

// s[r][0 .. G) = sum_d qp[r][d] * kt[d][0 .. G) for r < MR; kt: one key group.
// row_max (or null): per row, MR registers of running lane-wise maxima, updated with the scores.
template <class Arch, class T, int MR, int NV>
inline void score_tile(const T* qp, std::int64_t D, const T* kt, T* s, std::int64_t s_stride,
                       typename Reg<T, Arch>::V* row_max = nullptr) noexcept {
  using R = Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes;
  typename R::V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = R::zero();
  for (std::int64_t d = 0; d < D; ++d) {
    typename R::V kv[NV];
    for (int n = 0; n < NV; ++n) kv[n] = R::load(kt + d * NV * L + n * L);
    for (int r = 0; r < MR; ++r) {
      const auto qb = R::splat(qp[r * D + d]);
      for (int n = 0; n < NV; ++n) acc[r][n] = R::fma(qb, kv[n], acc[r][n]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NV; ++n) R::store(s + r * s_stride + n * L, acc[r][n]);
  if constexpr (!simd::is_scalar_v<Arch>) {
    if (row_max)
      for (int r = 0; r < MR; ++r)
        for (int n = 0; n < NV; ++n) row_max[r] = xsimd::max(row_max[r], acc[r][n]);
  }
}

// Per-thread buffers of one task (a few hundred KiB at most), reused across calls: the
// online-softmax state of every row of the task (scaled q, running max m and sum l,
// accumulator o), one tile's scores, and the task's list of tiles.
template <class T>
struct DenseTileWorkspace {
  struct Tile {
    std::int64_t i0, rows;  // query rows [i0, i0 + rows)
    int M;                  // rows of the register tile (MR, or 1 for a lone tail row)
    std::int64_t state;     // first state row (rows past `rows` are zero padding)
  };
  aligned_vector<T> qp, s, o, m, l, alpha;
  std::vector<Tile> tiles;
};

template <class T, class Arch>
DenseTileWorkspace<T>& dense_tile_workspace() {
  static thread_local DenseTileWorkspace<T> ws;
  return ws;
}

// K and V of every (b, kv head), packed once per call: Kt group-major and zero
// padded to whole groups of G keys, V with D padded to whole registers.
template <class T, class Arch>
struct DensePacked {
  using Tl = DenseTiling<T, Arch>;
  std::int64_t D, Dp, S, s_pad, Hkv;
  aligned_vector<T> kt, vp;

  template <class KV>
  explicit DensePacked(const DenseAttentionArgs<T, KV>& a)
      : D(a.D), Dp(round_up(a.D, Tl::L)), S(a.S), s_pad(round_up(a.S, Tl::G)), Hkv(a.Hkv) {
    kt.resize(std::size_t(std::max<std::int64_t>(1, a.B * Hkv * s_pad * D)));
    vp.resize(std::size_t(std::max<std::int64_t>(1, a.B * Hkv * S * Dp)));
  }
  T* k_head(std::int64_t b, std::int64_t hk) noexcept {
    return kt.data() + (b * Hkv + hk) * s_pad * D;
  }
  T* v_head(std::int64_t b, std::int64_t hk) noexcept {
    return vp.data() + (b * Hkv + hk) * S * Dp;
  }

  // Packs keys [0, n) of (b, hk); later keys are never read.
  template <class KV>
  void pack(const DenseAttentionArgs<T, KV>& a, std::int64_t b, std::int64_t hk,
            std::int64_t n) noexcept {
    constexpr std::int64_t G = Tl::G;
    const KV* k_bh = a.k + b * a.k_stride[0] + hk * a.k_stride[2];
    const KV* v_bh = a.v + b * a.v_stride[0] + hk * a.v_stride[2];
    T* const kt_bh = k_head(b, hk);
    for (std::int64_t g = 0; g < round_up(n, G); g += G) {
      T* dst = kt_bh + g * D;
      for (std::int64_t d = 0; d < D; ++d) {
        const KV* src = k_bh + g * a.k_stride[1] + d * a.k_stride[3];
        const std::int64_t valid = std::min(G, n - g);
        for (std::int64_t jj = 0; jj < valid; ++jj)
          dst[d * G + jj] = T(to_float(src[jj * a.k_stride[1]]));
        for (std::int64_t jj = valid; jj < G; ++jj) dst[d * G + jj] = T(0);
      }
    }
    T* const vp_bh = v_head(b, hk);
    for (std::int64_t j = 0; j < n; ++j) {
      const KV* src = v_bh + j * a.v_stride[1];
      T* dst = vp_bh + j * Dp;
      for (std::int64_t d = 0; d < D; ++d) dst[d] = T(to_float(src[d * a.v_stride[3]]));
      for (std::int64_t d = D; d < Dp; ++d) dst[d] = T(0);
    }
  }
};

// One task: batch b, head h, query rows [i_begin, i_end). mass (or null): the task's partial
// key mass [S], zero on entry; the rows' probabilities are added to it.
// Keys are visited in chunks of Tl::key_chunk(D) (K and V of a chunk fit in L2), each chunk by
// every tile of the task in turn, so a chunk is read from memory once per task rather than once
// per tile. Each row still sees the same blocks of KB keys in the same order: the chunking changes
// no bit of the result.
template <class Arch, class T, bool Causal, bool Bias, class KV>
void dense_attention_task(const DenseAttentionArgs<T, KV>& a, DensePacked<T, Arch>& packed,
                          std::int64_t b, std::int64_t h, std::int64_t i_begin, std::int64_t i_end,
                          T* mass) {
  using Tl = DenseTiling<T, Arch>;
  constexpr int MR = Tl::MR, NV = Tl::NV;
  constexpr std::int64_t L = Tl::L, G = Tl::G, KB = Tl::KB;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  constexpr T log2e = T(1.44269504088896340736);
  const std::int64_t D = a.D, Dp = round_up(D, L);
  const std::int64_t hk = h / (a.H / a.Hkv);
  T* const out_bh = a.out + b * a.out_stride[0] + h * a.out_stride[2];

  // Keys this block can see at all.
  std::int64_t s_end = a.key_lengths ? a.key_lengths[b] : a.S;
  if constexpr (Causal) s_end = std::min(s_end, std::max<std::int64_t>(0, i_end + a.causal_offset));

  // Tiles: whole MR-row tiles; the tail as one padded tile when at least half full, else row by
  // row (decoding, T = 1, computes no padding rows).
  auto& ws = dense_tile_workspace<T, Arch>();
  ws.tiles.clear();
  std::int64_t i0 = i_begin, state_rows = 0;
  for (; i0 + MR <= i_end; i0 += MR, state_rows += MR) ws.tiles.push_back({i0, MR, MR, state_rows});
  const std::int64_t rest = i_end - i0;
  if (2 * rest >= MR) {
    ws.tiles.push_back({i0, rest, MR, state_rows});
    state_rows += MR;
  } else {
    for (std::int64_t r = 0; r < rest; ++r) ws.tiles.push_back({i0 + r, 1, 1, state_rows++});
  }
  ws.qp.resize(std::size_t(std::max<std::int64_t>(1, state_rows * D)));
  ws.o.resize(std::size_t(std::max<std::int64_t>(1, state_rows * Dp)));
  ws.m.resize(std::size_t(state_rows));
  ws.l.resize(std::size_t(state_rows));
  ws.s.resize(std::size_t(MR * KB));
  ws.alpha.resize(MR);
  const T* const kt = packed.k_head(b, hk);
  const T* const vp = packed.v_head(b, hk);

  const T qscale = a.scale * log2e;
  // Keys tile t can see.
  const auto tile_end = [&](const typename DenseTileWorkspace<T>::Tile& t) {
    std::int64_t end = s_end;
    if constexpr (Causal)
      end = std::min(end, std::max<std::int64_t>(0, t.i0 + t.rows + a.causal_offset));
    return end;
  };
  // Scaled q rows of tile t (zero padding rows), m = -inf, l = 0, o = 0.
  const auto start = [&]<int M>(const typename DenseTileWorkspace<T>::Tile& t) {
    for (int r = 0; r < M; ++r) {
      T* qd = ws.qp.data() + (t.state + r) * D;
      if (r < t.rows) {
        const T* src = a.q + b * a.q_stride[0] + (t.i0 + r) * a.q_stride[1] + h * a.q_stride[2];
        for (std::int64_t d = 0; d < D; ++d) qd[d] = src[d * a.q_stride[3]] * qscale;
      } else {
        std::fill_n(qd, D, T(0));
      }
      ws.m[std::size_t(t.state + r)] = neg_inf;
      ws.l[std::size_t(t.state + r)] = T(0);
    }
    std::fill_n(ws.o.data() + t.state * Dp, M * Dp, T(0));
  };
  // Masked base-2 scores of tile t for keys [j0, j0 + nk) into ws.s (the key-mass pass
  // recomputes them through this same code, so they are the very values the softmax saw).
  // row_max (or null: masks applied): M registers that receive the lane-wise row maxima of
  // a block of unmasked keys.
  const auto block_scores = [&]<int M>(const typename DenseTileWorkspace<T>::Tile& t,
                                       std::int64_t j0, std::int64_t nk,
                                       typename Reg<T, Arch>::V* row_max = nullptr) {
    const std::int64_t nk_pad = round_up(nk, G);
    const T* qp = ws.qp.data() + t.state * D;
    for (std::int64_t g = 0; g < nk_pad; g += G) {
      score_tile<Arch, T, M, NV>(qp, D, kt + (j0 + g) * D, ws.s.data() + g, KB, row_max);
    }
    if (row_max) return;
    for (int r = 0; r < M; ++r) {
      T* srow = ws.s.data() + r * KB;
      std::fill(srow + nk, srow + nk_pad, neg_inf);
      if (r >= t.rows) continue;
      const std::int64_t i = t.i0 + r;
      if constexpr (Bias) {
        const T* brow = a.bias + i * a.bias_stride[0] + j0 * a.bias_stride[1];
        for (std::int64_t j = 0; j < nk; ++j) srow[j] += brow[j * a.bias_stride[1]] * log2e;
      }
      if constexpr (Causal) {
        const std::int64_t first_masked = std::max<std::int64_t>(0, i + a.causal_offset + 1 - j0);
        for (std::int64_t j = first_masked; j < nk; ++j) srow[j] = neg_inf;
      }
    }
  };
  constexpr bool unmasked = !Causal && !Bias && !simd::is_scalar_v<Arch>;
  // Tile t over keys [from, to): blocks of KB keys starting at multiples of KB.
  const auto run_keys = [&]<int M>(const typename DenseTileWorkspace<T>::Tile& t, std::int64_t from,
                                   std::int64_t to) {
    T* const o = ws.o.data() + t.state * Dp;
    for (std::int64_t j0 = from; j0 < to; j0 += KB) {
      const std::int64_t nk = std::min(KB, to - j0);
      const std::int64_t nk_pad = round_up(nk, G);
      // Blocks no mask touches take their row maxima from the score registers.
      bool softmax_done = false;
      if constexpr (unmasked) {
        if (nk == nk_pad) {
          typename Reg<T, Arch>::V row_max[M];
          for (int r = 0; r < M; ++r) row_max[r] = Reg<T, Arch>::splat(neg_inf);
          block_scores.template operator()<M>(t, j0, nk, row_max);
          for (int r = 0; r < M; ++r) {
            ws.alpha[r] = online_softmax_update_with_max(
                Arch{}, ws.s.data() + r * KB, nk, simd::hmax(row_max[r]),
                ws.m[std::size_t(t.state + r)], ws.l[std::size_t(t.state + r)]);
          }
          softmax_done = true;
        }
      }
      if (!softmax_done) {
        block_scores.template operator()<M>(t, j0, nk);
        for (int r = 0; r < M; ++r) {
          ws.alpha[r] =
              online_softmax_update(Arch{}, ws.s.data() + r * KB, nk_pad,
                                    ws.m[std::size_t(t.state + r)], ws.l[std::size_t(t.state + r)]);
        }
      }
      std::int64_t c = 0;
      for (; c + NV * L <= Dp; c += NV * L) {
        value_tile<Arch, T, M, NV>(ws.s.data(), KB, ws.alpha.data(), nk, vp + j0 * Dp + c, Dp,
                                   o + c, Dp);
      }
      for (; c < Dp; c += L) {
        value_tile<Arch, T, M, 1>(ws.s.data(), KB, ws.alpha.data(), nk, vp + j0 * Dp + c, Dp, o + c,
                                  Dp);
      }
    }
  };
  // Out rows of tile t, then (optionally) its key mass: p = 2^(s - m) / l with the rows' final m
  // and l, summed in row order.
  const auto finish = [&]<int M>(const typename DenseTileWorkspace<T>::Tile& t) {
    for (std::int64_t r = 0; r < t.rows; ++r) {
      online_softmax_finish(Arch{}, ws.o.data() + (t.state + r) * Dp, D,
                            ws.l[std::size_t(t.state + r)], out_bh + (t.i0 + r) * a.out_stride[1],
                            a.out_stride[3]);
    }
    if (!mass) return;
    const std::int64_t end = tile_end(t);
    for (std::int64_t j0 = 0; j0 < end; j0 += KB) {
      const std::int64_t nk = std::min(KB, end - j0);
      block_scores.template operator()<M>(t, j0, nk);
      for (std::int64_t r = 0; r < t.rows; ++r) {
        const T l = ws.l[std::size_t(t.state + r)];
        if (!(l > T(0))) continue;  // the row saw no key
        add_key_mass<Arch>(ws.s.data() + r * KB, nk, ws.m[std::size_t(t.state + r)], T(1) / l,
                           mass + j0);
      }
    }
  };
  const auto each_tile = [&](auto&& f) {
    for (const auto& t : ws.tiles)
      t.M == MR ? f.template operator()<MR>(t) : f.template operator()<1>(t);
  };

  each_tile(start);
  const std::int64_t chunk = Tl::key_chunk(D);
  for (std::int64_t c0 = 0; c0 < s_end; c0 += chunk) {
    each_tile([&]<int M>(const typename DenseTileWorkspace<T>::Tile& t) {
      run_keys.template operator()<M>(t, c0, std::min(c0 + chunk, tile_end(t)));
    });
  }
  each_tile(finish);
}

}  // namespace detail

/// Fused dense attention on Arch: out[b,i,h] = softmax_j(scale * q.k_j + bias) v_j
/// over the visible keys (see DenseAttentionArgs). Parallel over batch x heads x
/// fixed query blocks; bit-identical for any thread count.
template <class Arch, class T, class KV>
void dense_attention(Arch, const DenseAttentionArgs<T, KV>& a) {
  if (a.B == 0 || a.H == 0) return;
  const std::int64_t group = a.Hkv > 0 ? a.H / a.Hkv : 1;
  if (a.T_q == 0) {  // no query: every key's mass is 0
    if (a.key_mass && !a.accumulate_key_mass)
      for (std::int64_t b = 0; b < a.B; ++b)
        for (std::int64_t hk = 0; hk < a.Hkv; ++hk)
          for (std::int64_t j = 0; j < a.S; ++j)
            a.key_mass[b * a.key_mass_stride[0] + hk * a.key_mass_stride[1] +
                       j * a.key_mass_stride[2]] = T(0);
    return;
  }
  const std::int64_t block = detail::DenseTiling<T, Arch>::rows_per_task;
  const std::int64_t blocks = num_chunks(a.T_q, block);
  // Pack each (b, kv head) once: keys past the key length, or past the last
  // query's causal limit, are never read; nor are the keys of a group with no active head.
  detail::DensePacked<T, Arch> packed(a);
  parallel_for(a.B * a.Hkv, [&](std::int64_t task) {
    const std::int64_t b = task / a.Hkv, hk = task % a.Hkv;
    bool any = false;
    for (std::int64_t g = 0; g < group; ++g) any = any || dense_head_active(a, b, hk * group + g);
    if (!any) return;
    std::int64_t n = a.key_lengths ? a.key_lengths[b] : a.S;
    if (a.causal) n = std::min(n, std::max<std::int64_t>(0, a.T_q + a.causal_offset));
    packed.pack(a, b, hk, n);
  });
  // Key mass partials: one row of S per task, zero until the task adds to it.
  detail::aligned_vector<T> parts;
  if (a.key_mass) parts.assign(std::size_t(a.B * a.H * blocks * a.S), T(0));
  const auto run = [&](auto causal, auto bias) {
    parallel_for(a.B * a.H * blocks, [&](std::int64_t task) {
      const std::int64_t qb = task % blocks;
      const std::int64_t bh = task / blocks;
      const std::int64_t b = bh / a.H, h = bh % a.H;
      const std::int64_t i_begin = qb * block, i_end = std::min(a.T_q, (qb + 1) * block);
      if (!dense_head_active(a, b, h)) {
        T* out_bh = a.out + b * a.out_stride[0] + h * a.out_stride[2];
        for (std::int64_t i = i_begin; i < i_end; ++i)
          for (std::int64_t d = 0; d < a.D; ++d)
            out_bh[i * a.out_stride[1] + d * a.out_stride[3]] = T(0);
        return;
      }
      detail::dense_attention_task<Arch, T, decltype(causal)::value, decltype(bias)::value>(
          a, packed, b, h, i_begin, i_end, a.key_mass ? parts.data() + task * a.S : nullptr);
    });
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (a.causal) {
    a.bias ? run(yes{}, yes{}) : run(yes{}, no{});
  } else {
    a.bias ? run(no{}, yes{}) : run(no{}, no{});
  }
  if (!a.key_mass) return;
  // Reduce the partials of each (b, kv head): heads of the group, then query blocks, in order.
  parallel_for(a.B * a.Hkv, [&](std::int64_t task) {
    const std::int64_t b = task / a.Hkv, hk = task % a.Hkv;
    std::vector<T> sum(std::size_t(a.S), T(0));
    for (std::int64_t g = 0; g < group; ++g) {
      const std::int64_t h = hk * group + g;
      if (!dense_head_active(a, b, h)) continue;
      for (std::int64_t qb = 0; qb < blocks; ++qb) {
        const T* part = parts.data() + ((b * a.H + h) * blocks + qb) * a.S;
        for (std::int64_t j = 0; j < a.S; ++j) sum[std::size_t(j)] += part[j];
      }
    }
    T* dst = a.key_mass + b * a.key_mass_stride[0] + hk * a.key_mass_stride[1];
    for (std::int64_t j = 0; j < a.S; ++j) {
      T& m = dst[j * a.key_mass_stride[2]];
      m = a.accumulate_key_mass ? m + sum[std::size_t(j)] : sum[std::size_t(j)];
    }
  });
}

}  // namespace kernels

namespace attention {

/// Configuration of DenseAttention. scale multiplies q . k; default 1/sqrt(D).
struct DenseAttentionConfig {
  std::optional<double> scale;
};

/// Optional parts of DenseAttention::forward (prefill). Both cost nothing when left empty, and
/// neither changes the output of the heads that are computed (bit for bit).
template <class T>
struct ForwardOptions {
  /// [B, H_kv, S] or empty: receives, for every key j, the attention probability it got summed
  /// over the query heads of KV head h (active ones only) and over the T queries: SpAtten's token
  /// importance (tokens/prune_cascade.hpp) or an eviction score. Every entry is written (0 for a
  /// key no query sees). Costs one more Q . K^T pass (K is read again, V is not).
  View<T, 3> key_mass;
  bool accumulate_key_mass = false;  ///< add to key_mass instead of overwriting it
  /// Empty, [H] (one flag per head for every sequence) or [B * H] (row-major [B, H]): 0 = head
  /// not computed, its output rows are zeros and it adds nothing to key_mass (head pruning).
  std::span<const std::uint8_t> active_heads;
};

/// Optional parts of DenseAttention::decode.
template <class T>
struct DecodeOptions {
  /// [H, T_new, capacity] or empty: added to the scaled scores of head h, new query t, cached
  /// key j (ALiBi-style; a stride-0 dimension broadcasts). -inf masks.
  ConstView<T, 3> bias;
  /// [B, H_kv, capacity] or empty: receives, for every cached key j < length(b, h), the
  /// attention probability it got summed over the query heads of KV head h and the T_new
  /// queries (eviction scores, attention/kv_cache.hpp keep()). Entries past the length are not
  /// touched.
  View<T, 3> key_mass;
  bool accumulate_key_mass = false;  ///< add to key_mass instead of overwriting it
  /// [B * T_new * H] (row-major [B, T_new, H]) or empty: 0 = head not computed (zeros out).
  std::span<const std::uint8_t> active_heads;
};

/// Most new queries per sequence DenseAttention::decode takes; longer blocks are prefill
/// (DenseAttention::forward over KVCache::keys_as_sequence).
inline constexpr std::int64_t max_decode_queries = 64;

/// Dense multi-head attention with grouped-query attention and typed masks
/// (mask.hpp), computed by the fused kernel on Arch (default: the compile-time arch).
template <class T = float, class Arch = simd::default_arch>
class DenseAttention {
 public:
  using config_type = DenseAttentionConfig;
  static constexpr std::string_view name = "DenseAttention";

  /// Throws config_error if scale is set and not finite and > 0.
  explicit DenseAttention(config_type cfg = {}) : cfg_(cfg) {
    if (cfg_.scale && !(std::isfinite(*cfg_.scale) && *cfg_.scale > 0)) {
      switchyard::detail::fail_config(name, "DenseAttention", "scale", *cfg_.scale,
                                      "a finite value > 0");
    }
  }
  const config_type& config() const noexcept { return cfg_; }

  /// q: [B, T, H, D], k and v: [B, S, H_kv, D] with H % H_kv == 0 (grouped-query
  /// attention: query head h reads K/V head h / (H / H_kv)), out: [B, T, H, D].
  /// Any strides; out must not share memory with q, k, v or the bias (shape_error; two heads
  /// of one buffer do not share memory). Rows that see no key get zeros.
  /// Allocates a packed copy of K and V (about their size) per call. NaN or +inf
  /// inputs give unspecified outputs. opts: the optional per-key attention mass and active heads
  /// (ForwardOptions); key_mass must not share memory with out, q, k, v or the bias, and
  /// active_heads must hold H or B * H flags (shape_error).
  void forward(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v, View<T, 4> out,
               const attention::Mask<T>& mask = {}, const ForwardOptions<T>& opts = {}) const {
    forward_stored(q, k, v, out, mask, opts);
  }

  /// As above with K and V stored as bf16 (a KVCache<float, bf16>'s keys_as_sequence, or
  /// bf16 projections), for T = float: widened exactly while they are packed, so the result is
  /// the float forward on the bf16 values.
  void forward(ConstView<T, 4> q, ConstView<bf16, 4> k, ConstView<bf16, 4> v, View<T, 4> out,
               const attention::Mask<T>& mask = {},
               const ForwardOptions<T>& opts = {}) const requires std::is_same_v<T, float> {
    forward_stored(q, k, v, out, mask, opts);
  }

 private:
  template <class KV>
  void forward_stored(ConstView<T, 4> q, ConstView<KV, 4> k, ConstView<KV, 4> v, View<T, 4> out,
                      const attention::Mask<T>& mask, const ForwardOptions<T>& opts) const {
    const std::string_view fn = "forward";
    check(q, k, v, mask, opts);
    core::detail::check_shape<T, 4>(name, fn, "out", out, {"B", "T", "H", "D"}, q.shape(),
                                    "out has the shape of q");
    core::detail::check_no_alias(name, fn, "out", out, "q", q);
    core::detail::check_no_alias(name, fn, "out", out, "k", k);
    core::detail::check_no_alias(name, fn, "out", out, "v", v);
    if (mask.bias) core::detail::check_no_alias(name, fn, "out", out, "bias", mask.bias->bias);
    const bool mass = has_key_mass(opts);
    if (mass) {
      const View<T, 3>& km = opts.key_mass;
      core::detail::check_no_alias(name, fn, "key_mass", km, "out", out);
      core::detail::check_no_alias(name, fn, "key_mass", km, "q", q);
      core::detail::check_no_alias(name, fn, "key_mass", km, "k", k);
      core::detail::check_no_alias(name, fn, "key_mass", km, "v", v);
      if (mask.bias)
        core::detail::check_no_alias(name, fn, "key_mass", km, "bias", mask.bias->bias);
    }
    kernels::DenseAttentionArgs<T, KV> a{};
    a.q = q.data();
    a.k = k.data();
    a.v = v.data();
    a.out = out.data();
    for (int i = 0; i < 4; ++i) {
      a.q_stride[i] = q.stride(i);
      a.k_stride[i] = k.stride(i);
      a.v_stride[i] = v.stride(i);
      a.out_stride[i] = out.stride(i);
    }
    a.B = q.extent(0);
    a.T_q = q.extent(1);
    a.H = q.extent(2);
    a.D = q.extent(3);
    a.S = k.extent(1);
    a.Hkv = k.extent(2);
    a.scale = static_cast<T>(cfg_.scale ? *cfg_.scale
                                        : 1.0 / std::sqrt(double(std::max<std::int64_t>(1, a.D))));
    if (mask.causal) {
      // Offsets past S (every key visible) or below -T (none) act like S and -T; clamping
      // keeps i + offset from overflowing for offsets near the int64 limits.
      a.causal = true;
      a.causal_offset = std::clamp<std::int64_t>(mask.causal->offset, -a.T_q, a.S);
    }
    if (mask.key_lengths) a.key_lengths = mask.key_lengths->lengths.data();
    if (mask.bias) {
      a.bias = mask.bias->bias.data();
      a.bias_stride[0] = mask.bias->bias.stride(0);
      a.bias_stride[1] = mask.bias->bias.stride(1);
    }
    if (mass) {
      a.key_mass = opts.key_mass.data();
      for (int i = 0; i < 3; ++i) a.key_mass_stride[i] = opts.key_mass.stride(i);
      a.accumulate_key_mass = opts.accumulate_key_mass;
    }
    if (!opts.active_heads.empty()) {
      a.active = opts.active_heads.data();
      a.active_per_batch = std::int64_t(opts.active_heads.size()) != a.H;
    }
    kernels::dense_attention(Arch{}, a);
  }

 public:
  /// Decoding against a KV cache: q [B, T_new, H, D] are the queries of the last T_new positions
  /// of each (sequence, KV head) of `cache` (append their keys and values first), 1 <= T_new
  /// <= max_decode_queries; query t sees cached keys j < length - T_new + t + 1 (causal inside
  /// the new block). out: [B, T_new, H, D], any strides, not sharing memory with q, the cache,
  /// the bias or the key mass. Split-KV (decode_kernels.hpp): K and V are read once, by all
  /// threads; bit-identical for any thread count. Rows that see no key get zeros. A bf16 cache
  /// (KVCache<float, bf16>) is widened as it is read: half the bytes per step.
  template <class S>
  void decode(ConstView<T, 4> q, const KVCache<T, S>& cache, View<T, 4> out,
              const DecodeOptions<T>& opts = {}) const {
    const std::string_view fn = "decode";
    const std::int64_t B = cache.batch(), Hkv = cache.kv_heads(), D = cache.head_dim();
    const std::int64_t cap = cache.capacity();
    core::detail::check_shape<const T, 4>(name, fn, "q", q, {"B", "T_new", "H", "D"},
                                          Shape<4>{B, -1, -1, D}, "the cache's batch and head_dim");
    const std::int64_t Tn = q.extent(1), H = q.extent(2);
    if (Tn < 1 || Tn > max_decode_queries)
      switchyard::detail::fail_shape(
          name, fn, "q", switchyard::detail::format_shape({"B", "T_new", "H", "D"}, q.shape()),
          "1 <= T_new <= " + std::to_string(max_decode_queries),
          "longer blocks are prefill: forward over KVCache::keys_as_sequence");
    if (H < 1 || H % Hkv != 0)
      switchyard::detail::fail_shape(
          name, fn, "q", switchyard::detail::format_shape({"B", "T_new", "H", "D"}, q.shape()),
          "H a multiple of the cache's H_kv=" + std::to_string(Hkv), "grouped-query attention");
    core::detail::check_shape<T, 4>(name, fn, "out", out, {"B", "T_new", "H", "D"}, q.shape(),
                                    "out has the shape of q");
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < Hkv; ++h)
        if (cache.length(b, h) < Tn)
          throw config_error(std::string(name) + "::decode: sequence " + std::to_string(b) +
                             " (KV head " + std::to_string(h) + ") holds " +
                             std::to_string(cache.length(b, h)) + " positions, fewer than the " +
                             std::to_string(Tn) + " new queries (append their keys first)");
    if (!opts.bias.empty() || opts.bias.data())
      core::detail::check_shape(name, fn, "bias", opts.bias, {"H", "T_new", "S"}, {H, Tn, cap},
                                "[H, T_new, capacity]");
    const bool mass = !opts.key_mass.empty() || opts.key_mass.data();
    if (mass)
      core::detail::check_shape(name, fn, "key_mass", opts.key_mass, {"B", "H_kv", "S"},
                                {B, Hkv, cap}, "[B, H_kv, capacity]");
    if (!opts.active_heads.empty() && std::int64_t(opts.active_heads.size()) != B * Tn * H) {
      const std::int64_t got = std::int64_t(opts.active_heads.size());
      switchyard::detail::fail_shape(name, fn, "active_heads",
                                     switchyard::detail::format_shape({"n"}, std::span(&got, 1)),
                                     "[B * T_new * H=" + std::to_string(B * Tn * H) + "]",
                                     "one flag per (sequence, new query, head), or empty");
    }
    const ConstView<S, 4> ks = cache.keys(), vs = cache.values();
    core::detail::check_no_alias(name, fn, "out", out, "q", q);
    core::detail::check_no_alias(name, fn, "out", out, "cache keys", ks);
    core::detail::check_no_alias(name, fn, "out", out, "cache values", vs);
    if (opts.bias.data()) core::detail::check_no_alias(name, fn, "out", out, "bias", opts.bias);
    if (mass) {
      core::detail::check_no_alias(name, fn, "key_mass", opts.key_mass, "out", out);
      core::detail::check_no_alias(name, fn, "key_mass", opts.key_mass, "q", q);
      core::detail::check_no_alias(name, fn, "key_mass", opts.key_mass, "cache keys", ks);
      core::detail::check_no_alias(name, fn, "key_mass", opts.key_mass, "cache values", vs);
      if (opts.bias.data())
        core::detail::check_no_alias(name, fn, "key_mass", opts.key_mass, "bias", opts.bias);
    }
    // Scratch: one partial of Dp + 2 values per (chunk, row) and, with the key mass, one score
    // per (row, cached key).
    const std::int64_t rows = Tn * (H / Hkv);
    std::int64_t chunks = 0, keys = 0;
    for (std::int64_t len : cache.lengths()) {
      chunks += num_chunks(len, kernels::decode_chunk_keys(len, rows));
      keys += len;
    }
    switchyard::detail::checked_size(name, fn, "q", {chunks, rows, cache.row_stride() + 2},
                                     sizeof(T));
    if (mass) switchyard::detail::checked_size(name, fn, "key_mass", {rows, keys}, sizeof(T));

    kernels::DecodeAttentionArgs<T, S> a{};
    a.q = q.data();
    a.k = ks.data();
    a.v = vs.data();
    a.capacity = cap;
    a.kv_stride = cache.row_stride();
    a.Dp = core::round_up(D, std::int64_t(64 / sizeof(T)));
    a.lengths = cache.lengths().data();
    a.out = out.data();
    for (int i = 0; i < 4; ++i) {
      a.q_stride[i] = q.stride(i);
      a.out_stride[i] = out.stride(i);
    }
    a.B = B;
    a.T_new = Tn;
    a.H = H;
    a.Hkv = Hkv;
    a.D = D;
    a.scale = static_cast<T>(cfg_.scale ? *cfg_.scale : 1.0 / std::sqrt(double(D)));
    if (opts.bias.data()) {
      a.bias = opts.bias.data();
      for (int i = 0; i < 3; ++i) a.bias_stride[i] = opts.bias.stride(i);
    }
    if (mass) {
      a.key_mass = opts.key_mass.data();
      for (int i = 0; i < 3; ++i) a.key_mass_stride[i] = opts.key_mass.stride(i);
      a.accumulate_key_mass = opts.accumulate_key_mass;
    }
    if (!opts.active_heads.empty()) a.active = opts.active_heads.data();
    kernels::decode_attention(Arch{}, a);
  }

  /// As above, returning a new [B, T, H, D] tensor.
  core::Tensor<T> forward(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
                          const attention::Mask<T>& mask = {},
                          const ForwardOptions<T>& opts = {}) const {
    check(q, k, v, mask, opts);
    core::Tensor<T> out(q.shape());
    forward(q, k, v, out.template view<4>(), mask, opts);
    return out;
  }

 private:
  static bool has_key_mass(const ForwardOptions<T>& opts) noexcept {
    return !opts.key_mass.empty() || opts.key_mass.data();
  }

  template <class KV>
  void check(ConstView<T, 4> q, ConstView<KV, 4> k, ConstView<KV, 4> v,
             const attention::Mask<T>& mask, const ForwardOptions<T>& opts) const {
    const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
    core::detail::check_shape<const T, 4>(name, "forward", "q", q, {"B", "T", "H", "D"},
                                          Shape<4>{-1, -1, -1, -1});
    core::detail::check_shape<const KV, 4>(name, "forward", "k", k, {"B", "S", "H_kv", "D"},
                                           Shape<4>{B, -1, -1, D}, "k matches q in B and D");
    core::detail::check_shape<const KV, 4>(name, "forward", "v", v, {"B", "S", "H_kv", "D"},
                                           k.shape(), "v has the shape of k");
    const std::int64_t Hkv = k.extent(2);
    if ((Hkv == 0 && H > 0) || (Hkv > 0 && H % Hkv != 0)) {
      switchyard::detail::fail_shape(
          name, "forward", "k",
          switchyard::detail::format_shape({"B", "S", "H_kv", "D"}, k.shape()),
          "[B, S, H_kv, D] with H_kv dividing H=" + std::to_string(H), "grouped-query attention");
    }
    mask.validate(name, "forward", B, Tq, k.extent(1));
    // The packed copies of K and V: [B, H_kv, S (padded), D (padded)] each. A stride-0 view can
    // claim any extents, so the size is checked before it is allocated.
    switchyard::detail::checked_size(
        name, "forward", "k", {B, Hkv, core::pad_extent(k.extent(1), 64), core::pad_extent(D, 64)},
        2 * sizeof(T));
    switchyard::detail::checked_size(name, "forward", "q", {B, H, Tq, D}, sizeof(T));
    if (has_key_mass(opts)) {
      core::detail::check_shape(name, "forward", "key_mass", opts.key_mass, {"B", "H_kv", "S"},
                                {B, Hkv, k.extent(1)}, "[B, H_kv, S] of k");
      // One partial row of S per (b, head, block of query rows).
      const std::int64_t blocks =
          num_chunks(Tq, kernels::detail::DenseTiling<T, Arch>::rows_per_task);
      switchyard::detail::checked_size(name, "forward", "key_mass", {B, H, blocks, k.extent(1)},
                                       sizeof(T));
    }
    if (!opts.active_heads.empty()) {
      const std::int64_t n = std::int64_t(opts.active_heads.size());
      if (n != H && !(H > 0 && n % H == 0 && n / H == B))
        switchyard::detail::fail_shape(
            name, "forward", "active_heads",
            switchyard::detail::format_shape({"n"}, std::span(&n, 1)),
            "[H=" + std::to_string(H) + "] or [B * H=" + std::to_string(B * H) + "]",
            "one flag per head, or per (sequence, head), or empty");
    }
  }

  config_type cfg_;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
