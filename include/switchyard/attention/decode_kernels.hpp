#pragma once
// Split-KV decode attention (flash-decoding): T_new new queries per sequence against a KV cache
// (kv_cache.hpp), where the cost is reading K and V once.
//
// Work is cut into tasks of (sequence b, KV head hk, chunk of C keys). A task takes all query
// rows of that KV group together (T_new x H / H_kv rows, r = t * group + g), so every K/V byte is
// read once per step, and computes for each row a partial (max m, sum l, unnormalised weighted
// sum of V) over its chunk with the online softmax (online_softmax.hpp), in blocks of KB keys:
//   scores  s[r][j] = q_r . k_j          a register of (key, row) accumulators at a time
//   mask    causal inside the new block: row t sees keys j < length - T_new + t + 1; bias
//   values  o[r] = o[r] * alpha[r] + sum_j p[r][j] v_j     (attention_tiles.hpp value_tile)
// Then per (b, hk) the partials merge in chunk order: M = max_c m_c, l = sum_c l_c 2^(m_c - M),
// out = sum_c o_c 2^(m_c - M) / l. C depends only on the head's length and on the number of
// rows (decode_chunk_keys), never on the thread count: the output is bit-identical for any.
//
// Key mass (optional): the attention probability each cached key received, summed over the rows
// of its group. The scores of every chunk are kept (rows x length values, a few per cent of K's
// size at T_new = 1) and, once the final max and sum of each row are known, summed per key in
// row order: K and V are still read once.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "switchyard/attention/attention_tiles.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/online_softmax.hpp"
#include "switchyard/core/simd/vector_ops.hpp"

namespace switchyard {
inline namespace v0 {
namespace kernels {

/// Raw description of one decode step (checked by DenseAttention::decode). S: the cache's
/// storage type, T or bf16 (for T = float; widened as it is read).
template <class T, class S = T>
struct DecodeAttentionArgs {
  const T* q;  ///< [B, T_new, H, D], strides q_stride (elements)
  std::int64_t q_stride[4];
  const S* k;  ///< cache storage [B, H_kv, capacity, kv_stride], 64-byte aligned rows, zero padding
  const S* v;
  std::int64_t capacity, kv_stride;  ///< kv_stride: elements of S per cached row, >= Dp
  std::int64_t Dp;                   ///< D rounded up to 64 bytes of T: the rows computed on
  const std::int64_t* lengths;       ///< [B * H_kv], each >= T_new
  T* out;                            ///< [B, T_new, H, D]
  std::int64_t out_stride[4];
  std::int64_t B, T_new, H, Hkv, D;
  T scale;                  ///< multiplies q . k
  const T* bias = nullptr;  ///< [H, T_new, capacity] or null, added to scale * q . k
  std::int64_t bias_stride[3] = {0, 0, 0};
  T* key_mass = nullptr;  ///< [B, H_kv, capacity] or null
  std::int64_t key_mass_stride[3] = {0, 0, 0};
  bool accumulate_key_mass = false;
  const std::uint8_t* active = nullptr;  ///< [B, T_new, H] row-major or null; 0: not computed
};

/// Keys per split-KV chunk for a head of `length` keys read by `rows` query rows: 256, doubled
/// while the head would have more than 4096 (chunk, row) partials (bounding the partials'
/// memory to about 4096 rows of D per head).
inline std::int64_t decode_chunk_keys(std::int64_t length, std::int64_t rows) noexcept {
  std::int64_t c = 256;
  while (c < length && num_chunks(length, c) * std::max<std::int64_t>(rows, 1) > 4096) c *= 2;
  return c;
}

namespace detail {

// Query rows per group of the score kernel: a group of rows and a group of keys together fill
// one register of accumulators (one per (key, row) pair), so each key vector loaded serves
// every row of the group.
template <class T, class Arch>
inline constexpr std::int64_t decode_row_group = simd::is_scalar_v<Arch>
                                                     ? 1
                                                     : (simd::lanes_v<T, Arch> >= 16 ? 4 : 2);

// s[i * s_stride + j] = q_i . k_j over d < Dp for i < n_rows (a multiple of decode_row_group;
// padding rows are zeros), j < nk; q rows are Dp apart, k rows ks apart (ks >= Dp), both
// 64-byte aligned and zero padded past D; k stored as T, or as bf16 for T = float (widened on
// load). Only Dp, never ks, sets the summation order: a bf16 cache gives the float cache's bits.
// widened: Dp values of scratch (bf16 keys past the last whole group of keys).
// Per group of RG rows and KG = L / RG keys: L accumulators, acc[u * RG + r] for key u and row
// r, then one transpose-add (simd::hsum_rows) gives those L scores.
// `ahead`: the rows (ks apart) the caller reads next, the values of these keys: fetched into
// the cache while the scores are computed, so K and V stream together rather than in turn.
template <class Arch, class T, class S>
void decode_scores(const T* qp, std::int64_t n_rows, const S* k, std::int64_t nk, std::int64_t Dp,
                   std::int64_t ks, T* s, std::int64_t s_stride, const S* ahead,
                   T* widened) noexcept {
  constexpr std::int64_t line = 64 / sizeof(S);
  std::int64_t j = 0;
  if constexpr (!simd::is_scalar_v<Arch>) {
    using V = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = V::size, RG = decode_row_group<T, Arch>, KG = L / RG;
    static_assert(RG * KG == L);
    alignas(64) T lanes[L];
    for (; j + KG <= nk; j += KG) {
      const S* kb = k + j * ks;
      for (std::int64_t p = 0; p < KG * ks; p += line) __builtin_prefetch(ahead + j * ks + p, 0, 3);
      for (std::int64_t i = 0; i < n_rows; i += RG) {
        const T* qi = qp + i * Dp;
        V acc[L];
        for (std::int64_t u = 0; u < L; ++u) acc[u] = V(T(0));
        for (std::int64_t d = 0; d < Dp; d += L) {
          V qv[RG];
          for (std::int64_t r = 0; r < RG; ++r) qv[r] = V::load_aligned(qi + r * Dp + d);
          for (std::int64_t u = 0; u < KG; ++u) {
            const V kv = Reg<T, Arch>::load(kb + u * ks + d);
            for (std::int64_t r = 0; r < RG; ++r)
              acc[u * RG + r] = xsimd::fma(kv, qv[r], acc[u * RG + r]);
          }
        }
        simd::hsum_rows(acc).store_aligned(lanes);
        for (std::int64_t u = 0; u < KG; ++u)
          for (std::int64_t r = 0; r < RG; ++r) s[(i + r) * s_stride + j + u] = lanes[u * RG + r];
      }
    }
  }
  for (; j < nk; ++j) {
    const T* kj = nullptr;
    if constexpr (std::is_same_v<S, T>) {
      kj = k + j * ks;
    } else {  // widened into a row of T, so dot sums in its own order (as for a float cache)
      for (std::int64_t d = 0; d < Dp; ++d) widened[d] = to_float(k[j * ks + d]);
      kj = widened;
    }
    for (std::int64_t i = 0; i < n_rows; ++i)
      s[i * s_stride + j] = dot(Arch{}, qp + i * Dp, kj, Dp);
  }
}

// Per-thread buffers of one task, reused across calls.
template <class T>
struct DecodeTaskWorkspace {
  aligned_vector<T> qp, s, o, widened;
  std::vector<T> m, l, alpha;
  std::vector<std::int64_t> rows;  // active rows (r = t * group + g) of the task's group
};

template <class T, class Arch>
DecodeTaskWorkspace<T>& decode_task_workspace() {
  static thread_local DecodeTaskWorkspace<T> ws;
  return ws;
}

// Per call: task and partial offsets, the partials, and the kept scores for the key mass.
template <class T>
struct DecodeCallWorkspace {
  std::vector<std::int64_t> task_off, chunk_keys, score_off;
  aligned_vector<T> part_o;  // [task][row][Dp]
  std::vector<T> part_ml;    // [task][row][2]
  std::vector<T> final_ml;   // [b * H_kv + hk][row][2]: the merged max and 1 / sum
  std::vector<T> scores;     // [b * H_kv + hk][row][length] (key mass only)
};

template <class T, class Arch>
DecodeCallWorkspace<T>& decode_call_workspace() {
  static thread_local DecodeCallWorkspace<T> ws;
  return ws;
}

template <class T, class S>
bool decode_row_active(const DecodeAttentionArgs<T, S>& a, std::int64_t b, std::int64_t t,
                       std::int64_t h) noexcept {
  return !a.active || a.active[(b * a.T_new + t) * a.H + h] != 0;
}

// One task: (b, hk), chunk of keys [j0, j1). Writes the rows' partials.
template <class Arch, class T, class S>
void decode_chunk_task(const DecodeAttentionArgs<T, S>& a, std::int64_t b, std::int64_t hk,
                       std::int64_t j0, std::int64_t j1, T* part_o, T* part_ml, T* scores) {
  constexpr int MR = 4;  // query rows per value tile
  using R = Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes;
  constexpr int NV = simd::is_scalar_v<Arch> ? 4 : 2;
  constexpr std::int64_t KB = 128;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  constexpr T log2e = T(1.44269504088896340736);
  const std::int64_t group = a.H / a.Hkv, Dp = a.Dp;
  const std::int64_t len = a.lengths[b * a.Hkv + hk];
  const std::int64_t first_new = len - a.T_new;  // row t sees keys j < first_new + t + 1

  auto& ws = decode_task_workspace<T, Arch>();
  ws.rows.clear();
  for (std::int64_t t = 0; t < a.T_new; ++t)
    for (std::int64_t g = 0; g < group; ++g)
      if (decode_row_active(a, b, t, hk * group + g)) ws.rows.push_back(t * group + g);
  const std::int64_t na = std::int64_t(ws.rows.size());
  if (na == 0) return;
  // Scores run on whole row groups: padding rows of zeros, their scores never used.
  const std::int64_t na_pad = core::round_up(na, decode_row_group<T, Arch>);
  ws.qp.assign(std::size_t(na_pad * Dp), T(0));
  ws.o.assign(std::size_t(na * Dp), T(0));
  ws.s.resize(std::size_t(na_pad * KB));
  ws.m.assign(std::size_t(na), neg_inf);
  ws.l.assign(std::size_t(na), T(0));
  ws.alpha.resize(std::size_t(na));
  if constexpr (!std::is_same_v<S, T>) ws.widened.resize(std::size_t(Dp));

  // Queries scaled into base-2 units, D padded with zeros.
  const T qscale = a.scale * log2e;
  std::int64_t vis_end = j0;  // keys any active row of this chunk can see end here
  for (std::int64_t i = 0; i < na; ++i) {
    const std::int64_t r = ws.rows[std::size_t(i)], t = r / group, h = hk * group + r % group;
    const T* src = a.q + b * a.q_stride[0] + t * a.q_stride[1] + h * a.q_stride[2];
    T* dst = ws.qp.data() + i * Dp;
    for (std::int64_t d = 0; d < a.D; ++d) dst[d] = src[d * a.q_stride[3]] * qscale;
    std::fill(dst + a.D, dst + Dp, T(0));
    vis_end = std::max(vis_end, std::min(j1, first_new + t + 1));
  }
  const std::int64_t ks = a.kv_stride;
  const S* kh = a.k + (b * a.Hkv + hk) * a.capacity * ks;
  const S* vh = a.v + (b * a.Hkv + hk) * a.capacity * ks;

  for (std::int64_t jb = j0; jb < vis_end; jb += KB) {
    const std::int64_t nk = std::min(KB, vis_end - jb);
    decode_scores<Arch>(ws.qp.data(), na_pad, kh + jb * ks, nk, Dp, ks, ws.s.data(), KB,
                        vh + jb * ks, ws.widened.data());
    for (std::int64_t i = 0; i < na; ++i) {
      const std::int64_t r = ws.rows[std::size_t(i)], t = r / group, h = hk * group + r % group;
      T* srow = ws.s.data() + i * KB;
      if (a.bias) {
        const T* brow = a.bias + h * a.bias_stride[0] + t * a.bias_stride[1];
        for (std::int64_t j = 0; j < nk; ++j) srow[j] += brow[(jb + j) * a.bias_stride[2]] * log2e;
      }
      const std::int64_t visible = std::clamp<std::int64_t>(first_new + t + 1 - jb, 0, nk);
      std::fill(srow + visible, srow + nk, neg_inf);
      if (scores) std::copy_n(srow, nk, scores + r * len + jb);
      ws.alpha[std::size_t(i)] =
          online_softmax_update(Arch{}, srow, nk, ws.m[std::size_t(i)], ws.l[std::size_t(i)]);
    }
    // While the first tile accumulates values, the keys of the next block are fetched.
    const std::int64_t next = std::min(KB, vis_end - jb - nk);
    std::int64_t i0 = 0;
    const auto tile = [&]<int M>(std::int64_t i) {
      const T* p = ws.s.data() + i * KB;
      std::int64_t c = 0;
      for (; c + NV * L <= Dp; c += NV * L) {
        const bool fetch = i == 0 && c == 0;
        value_tile<Arch, T, M, NV>(p, KB, ws.alpha.data() + i, nk, vh + jb * ks + c, ks,
                                   ws.o.data() + i * Dp + c, Dp, kh + (jb + nk) * ks, ks,
                                   fetch ? std::min(nk, next) : 0);
      }
      for (; c < Dp; c += L)
        value_tile<Arch, T, M, 1>(p, KB, ws.alpha.data() + i, nk, vh + jb * ks + c, ks,
                                  ws.o.data() + i * Dp + c, Dp);
    };
    for (; i0 + MR <= na; i0 += MR) tile.template operator()<MR>(i0);
    for (; i0 < na; ++i0) tile.template operator()<1>(i0);
  }
  for (std::int64_t i = 0; i < na; ++i) {
    const std::int64_t r = ws.rows[std::size_t(i)];
    std::copy_n(ws.o.data() + i * Dp, Dp, part_o + r * Dp);
    part_ml[2 * r] = ws.m[std::size_t(i)];
    part_ml[2 * r + 1] = ws.l[std::size_t(i)];
  }
}

}  // namespace detail

/// Split-KV decode attention on Arch (see the file comment). Rows of inactive heads and rows
/// that see no key get zeros. Bit-identical for any thread count.
template <class Arch, class T, class S>
void decode_attention(Arch, const DecodeAttentionArgs<T, S>& a) {
  if (a.B == 0 || a.T_new == 0 || a.H == 0) return;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const std::int64_t group = a.H / a.Hkv, n_rows = a.T_new * group, Dp = a.Dp;
  const std::int64_t heads = a.B * a.Hkv;
  auto& cw = detail::decode_call_workspace<T, Arch>();
  cw.task_off.assign(std::size_t(heads + 1), 0);
  cw.chunk_keys.resize(std::size_t(heads));
  cw.score_off.assign(std::size_t(heads + 1), 0);
  for (std::int64_t i = 0; i < heads; ++i) {
    const std::int64_t len = a.lengths[i];
    cw.chunk_keys[std::size_t(i)] = decode_chunk_keys(len, n_rows);
    cw.task_off[std::size_t(i + 1)] =
        cw.task_off[std::size_t(i)] + num_chunks(len, cw.chunk_keys[std::size_t(i)]);
    cw.score_off[std::size_t(i + 1)] = cw.score_off[std::size_t(i)] + n_rows * len;
  }
  const std::int64_t tasks = cw.task_off[std::size_t(heads)];
  cw.part_o.resize(std::size_t(tasks * n_rows * Dp));
  cw.part_ml.resize(std::size_t(tasks * n_rows * 2));
  cw.final_ml.resize(std::size_t(heads * n_rows * 2));
  if (a.key_mass) cw.scores.resize(std::size_t(cw.score_off[std::size_t(heads)]));

  parallel_for(tasks, [&](std::int64_t task) {
    const std::int64_t i =
        std::upper_bound(cw.task_off.begin(), cw.task_off.end(), task) - cw.task_off.begin() - 1;
    const std::int64_t c = task - cw.task_off[std::size_t(i)], C = cw.chunk_keys[std::size_t(i)];
    const std::int64_t j0 = c * C, j1 = std::min(a.lengths[i], j0 + C);
    detail::decode_chunk_task<Arch>(
        a, i / a.Hkv, i % a.Hkv, j0, j1, cw.part_o.data() + task * n_rows * Dp,
        cw.part_ml.data() + task * n_rows * 2,
        a.key_mass ? cw.scores.data() + cw.score_off[std::size_t(i)] : nullptr);
  });

  // Merge the chunks of each (b, hk, row) in chunk order.
  parallel_for(heads * a.T_new, [&](std::int64_t task) {
    const std::int64_t i = task / a.T_new, t = task % a.T_new;
    const std::int64_t b = i / a.Hkv, hk = i % a.Hkv;
    const std::int64_t t0 = cw.task_off[std::size_t(i)], nc = cw.task_off[std::size_t(i + 1)] - t0;
    for (std::int64_t g = 0; g < group; ++g) {
      const std::int64_t r = t * group + g, h = hk * group + g;
      T* out = a.out + b * a.out_stride[0] + t * a.out_stride[1] + h * a.out_stride[2];
      T* fml = cw.final_ml.data() + (i * n_rows + r) * 2;
      if (!detail::decode_row_active(a, b, t, h)) {
        for (std::int64_t d = 0; d < a.D; ++d) out[d * a.out_stride[3]] = T(0);
        fml[0] = neg_inf;
        fml[1] = T(0);
        continue;
      }
      T m = neg_inf;
      for (std::int64_t c = 0; c < nc; ++c)
        m = std::max(m, cw.part_ml[std::size_t(((t0 + c) * n_rows + r) * 2)]);
      T l(0);
      // The first chunk's partial is the accumulator: chunk 0 always exists, and scaling it in
      // place keeps the merge allocation-free.
      T* acc = cw.part_o.data() + (t0 * n_rows + r) * Dp;
      if (m != neg_inf) {
        for (std::int64_t c = 0; c < nc; ++c) {
          const T* ml = cw.part_ml.data() + ((t0 + c) * n_rows + r) * 2;
          const T f = simd::exp2_nonpositive(ml[0] - m);
          l += ml[1] * f;
          if (c == 0) {
            scale(Arch{}, f, acc, Dp);
          } else {
            axpy(Arch{}, f, cw.part_o.data() + ((t0 + c) * n_rows + r) * Dp, acc, Dp);
          }
        }
      }
      online_softmax_finish(Arch{}, acc, a.D, l, out, a.out_stride[3]);
      fml[0] = m;
      fml[1] = l > T(0) ? T(1) / l : T(0);
    }
  });

  if (!a.key_mass) return;
  // Key mass: per (b, hk, chunk), mass[j] = sum over active rows r of 2^(s[r][j] - m_r) / l_r.
  parallel_for(tasks, [&](std::int64_t task) {
    const std::int64_t i =
        std::upper_bound(cw.task_off.begin(), cw.task_off.end(), task) - cw.task_off.begin() - 1;
    const std::int64_t b = i / a.Hkv, hk = i % a.Hkv, len = a.lengths[i];
    const std::int64_t c = task - cw.task_off[std::size_t(i)], C = cw.chunk_keys[std::size_t(i)];
    const std::int64_t j0 = c * C, j1 = std::min(len, j0 + C);
    const T* sc = cw.scores.data() + cw.score_off[std::size_t(i)];
    const T* fml = cw.final_ml.data() + i * n_rows * 2;
    const std::int64_t first_new = len - a.T_new;
    T* mass = a.key_mass + b * a.key_mass_stride[0] + hk * a.key_mass_stride[1];
    // Row by row (fixed order) into a chunk-long row, each row up to its own last visible key.
    auto& row = detail::decode_task_workspace<T, Arch>().o;
    row.assign(std::size_t(std::max<std::int64_t>(j1 - j0, 1)), T(0));
    for (std::int64_t r = 0; r < n_rows; ++r) {
      const T inv_l = fml[2 * r + 1];
      if (inv_l == T(0)) continue;  // inactive row, or a row that saw no key
      const std::int64_t end = std::min(j1, first_new + r / group + 1);
      if (end > j0)
        detail::add_key_mass<Arch>(sc + r * len + j0, end - j0, fml[2 * r], inv_l, row.data());
    }
    for (std::int64_t j = j0; j < j1; ++j) {
      T& dst = mass[j * a.key_mass_stride[2]];
      dst = a.accumulate_key_mass ? dst + row[std::size_t(j - j0)] : row[std::size_t(j - j0)];
    }
  });
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
