#pragma once
// Block-sparse attention: the general tile executor behind every structured pattern
// (neighborhood.hpp, sliding_window.hpp, moba.hpp) and the BlockSparseAttention layer over a
// user block mask.
//
// Keys are packed once per (batch b, KV head) in an order the pattern chooses (a dilation
// group's keys side by side, or only a decode window), in blocks of NB packed keys. A block is
// stored transposed, [D][NBp] (NBp = NB rounded up to whole registers plus one register), so
// any L consecutive keys of a block are one unaligned vector load per d; V is [N][Dp].
// A pattern describes work as query tiles: up to MR query rows and runs of packed keys, each
// run with the range [begin, end) of it that each row sees (causal band, window, selected
// block or nothing). The executor cuts runs into chunks of at most L keys (a run inside one
// block starts its chunks at its first key; a longer run is cut at register boundaries of its
// blocks, so only its ends are partial), drops chunks no row sees, and runs the fused
// FlashAttention loop of dense.hpp over the chunks, KB lanes at a time:
//   S = Q_tile . K_chunks^T   register tile MR rows x NV chunks (one pointer per chunk)
//   mask only chunks that are partial or that some row sees in part (-inf)
//   base-2 online softmax (online_softmax.hpp), O = O * alpha + P . V_chunks
// Q is pre-multiplied by scale * log2(e) as in dense.hpp; the T x S matrix is never stored.
// Rows that see no key give zeros. Work is split by a fixed partition (per (b, h), blocks of
// tiles), so results are bit-identical for any thread count.
// A stateful variant keeps (m, l, O) of each query in memory between tiles, so a query can
// meet its keys in several tiles (MoBA groups queries by selected block, moba.hpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "switchyard/attention/attention_tiles.hpp"
#include "switchyard/attention/dense.hpp"
#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/online_softmax.hpp"
#include "switchyard/core/simd/transpose.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace kernels {

/// Raw operands of a structured attention call (checked by the layers). Strides in elements;
/// q/out [B, T, H, D], k/v [B, S, Hkv, D]. KV: the type K and V are stored as, T or bf16 for
/// T = float (a bf16 KV cache; widened while packed).
template <class T, class KV = T>
struct SparseAttentionArgs {
  const T* q;
  std::int64_t q_stride[4];
  const KV* k;
  std::int64_t k_stride[4];
  const KV* v;
  std::int64_t v_stride[4];
  T* out;
  std::int64_t out_stride[4];
  std::int64_t B, T_q, S, H, Hkv, D;
  T scale;  // multiplies q . k
};

/// Most query rows of a tile (>= DenseTiling<T, Arch>::MR for every Arch).
inline constexpr int max_tile_rows = 8;

/// Packed keys [begin, end).
struct KeyRange {
  std::int64_t begin = 0, end = 0;
};

/// A run of packed keys and the part of it each tile row sees (empty range: none).
struct TileRun {
  std::int64_t begin = 0, end = 0;
  KeyRange rows[max_tile_rows];
};

/// One query tile: rows (query token indices) and the runs of keys they see.
struct QueryTile {
  int n_rows = 0;
  std::int64_t rows[max_tile_rows] = {};
  std::vector<TileRun> runs;
  void clear() noexcept {
    n_rows = 0;
    runs.clear();
  }
};

/// Per-query online-softmax state kept between tiles (stateful execution): for query row i,
/// m[i], l[i] and o[i * Dp .. + Dp). Start at m = -inf, l = 0, o = 0.
template <class T>
struct SparseRowState {
  T* m;
  T* l;
  T* o;
  std::int64_t Dp;
  std::int64_t first = 0;  ///< query row `first` is entry 0
};

namespace detail {

template <class Arch, class T>
inline typename Reg<T, Arch>::V load_unaligned(const T* p) noexcept {
  if constexpr (simd::is_scalar_v<Arch>) {
    return *p;
  } else {
    return xsimd::batch<T, Arch>::load_unaligned(p);
  }
}

// s[r][n*L .. n*L + L) = sum_d qp[r][d] * kp[n][d * k_stride .. + L) for r < M, n < NV: the
// score tile of dense.hpp with one key pointer per register (any alignment). row_max (or null):
// per row, a register of lane-wise maxima that takes the scores of each register n whose bit is
// set in `unmasked` (registers whose lanes are masked later are left out).
template <class Arch, class T, int M, int NV>
inline void score_chunks(const T* qp, std::int64_t D, const T* const* kp, std::int64_t k_stride,
                         T* s, std::int64_t s_stride, typename Reg<T, Arch>::V* row_max = nullptr,
                         unsigned unmasked = 0) noexcept {
  using R = Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes;
  typename R::V acc[M][NV];
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = R::zero();
  for (std::int64_t d = 0; d < D; ++d) {
    typename R::V kv[NV];
    for (int n = 0; n < NV; ++n) kv[n] = load_unaligned<Arch>(kp[n] + d * k_stride);
    for (int r = 0; r < M; ++r) {
      const auto qb = R::splat(qp[r * D + d]);
      for (int n = 0; n < NV; ++n) acc[r][n] = R::fma(qb, kv[n], acc[r][n]);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < NV; ++n) R::store(s + r * s_stride + n * L, acc[r][n]);
  if constexpr (!simd::is_scalar_v<Arch>) {
    if (row_max)
      for (int r = 0; r < M; ++r)
        for (int n = 0; n < NV; ++n)
          if (unmasked >> n & 1u) row_max[r] = xsimd::max(row_max[r], acc[r][n]);
  }
}

// One chunk of a tile: packed keys [p, p + c), c <= L, scored into one register of lanes;
// k_off: where its first key's lane of row d = 0 sits in the packed head (SparseKeyPack).
struct SparseChunk {
  std::int64_t p = 0, c = 0, k_off = 0;
  std::int32_t run = 0;
  bool mask = false;
};

// o[r][0 .. NV*L) = o[r] * alpha[r] + sum over chunks i, keys jj < c_i of
// p[r][i * L + jj] * vp[(p_i + jj) * v_stride .. + NV*L): dense.hpp's value_tile over chunks,
// accumulators kept in registers across the chunks.
template <class Arch, class T, int M, int NV>
inline void value_chunks(const T* p, std::int64_t p_stride, const T* alpha,
                         const SparseChunk* chunks, std::int64_t n_chunks, const T* vp,
                         std::int64_t v_stride, T* o, std::int64_t o_stride) noexcept {
  using R = Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes;
  typename R::V acc[M][NV];
  for (int r = 0; r < M; ++r) {
    const auto a = R::splat(alpha[r]);
    for (int n = 0; n < NV; ++n) acc[r][n] = R::load(o + r * o_stride + n * L) * a;
  }
  for (std::int64_t i = 0; i < n_chunks; ++i) {
    const T* vrow = vp + chunks[i].p * v_stride;
    const T* prow = p + i * L;
    for (std::int64_t jj = 0; jj < chunks[i].c; ++jj) {
      typename R::V vv[NV];
      for (int n = 0; n < NV; ++n) vv[n] = R::load(vrow + jj * v_stride + n * L);
      for (int r = 0; r < M; ++r) {
        const auto pb = R::splat(prow[r * p_stride + jj]);
        for (int n = 0; n < NV; ++n) acc[r][n] = R::fma(pb, vv[n], acc[r][n]);
      }
    }
  }
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < NV; ++n) R::store(o + r * o_stride + n * L, acc[r][n]);
}

// s[j] = -inf for lanes j < L outside [vb, ve) (one register; small windows mask most chunks).
template <class Arch, class T>
inline void mask_lanes(T* s, std::int64_t vb, std::int64_t ve) noexcept {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  if constexpr (simd::is_scalar_v<Arch>) {
    if (vb > 0 || ve < 1) *s = neg_inf;
  } else {
    using V = xsimd::batch<T, Arch>;
    alignas(64) static constexpr T iota[64] = {
        0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
        22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
        44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63};
    static_assert(V::size <= 64);
    const V idx = V::load_aligned(iota);
    const auto keep = (idx >= V(T(vb))) && (idx < V(T(ve)));
    xsimd::select(keep, V::load_aligned(s), V(neg_inf)).store_aligned(s);
  }
}

template <class T>
struct SparseTileWorkspace {
  aligned_vector<T> qp, s, o, m, l, alpha;
  std::vector<SparseChunk> chunks;
};

template <class T, class Arch>
SparseTileWorkspace<T>& sparse_tile_workspace() {
  static thread_local SparseTileWorkspace<T> ws;
  return ws;
}

// Storage of key packs kept by each thread between calls: a long sequence's pack takes tens of
// MiB, and fresh pages on every call cost page faults worth ~6 % of a 1D pattern's time at
// T 16384. At most two buffers (K and V of the last pack) of at most 256 MiB each are kept.
template <class T>
struct PackStoragePool {
  static constexpr std::size_t max_kept = 2;
  static constexpr std::size_t max_bytes = std::size_t(256) << 20;
  std::vector<aligned_vector<T>> kept;

  static PackStoragePool& local() {
    static thread_local PackStoragePool pool;
    return pool;
  }
  aligned_vector<T> take() {
    if (kept.empty()) return {};
    aligned_vector<T> v = std::move(kept.back());
    kept.pop_back();
    return v;
  }
  void give(aligned_vector<T>&& v) {
    if (v.capacity() > 0 && v.capacity() * sizeof(T) <= max_bytes && kept.size() < max_kept)
      kept.push_back(std::move(v));
  }
};

}  // namespace detail

/// Keys and values of every (b, KV head) in a pattern's packed order (see the file comment):
/// N packed keys in blocks of NB, block layout [D][NBp], V [N][Dp]. Padding keys are zeros.
/// Its storage comes from (and returns to) the calling thread's detail::PackStoragePool and
/// holds stale values until packed: pack_key each key below n, then finish_head(head, n)
/// zeroes the rest (sparse_pack_all does both).
template <class T, class Arch>
struct SparseKeyPack {
  static constexpr std::int64_t L = detail::Reg<T, Arch>::lanes;
  std::int64_t D = 0, Dp = 0, N = 0, NB = 1, NBp = 0, blocks = 0, heads = 0;
  detail::aligned_vector<T> kt, vp;

  /// Bytes per element of kt + vp for `heads` (b, kv head) pairs: for size checks.
  static std::int64_t padded_block(std::int64_t NB) noexcept { return core::round_up(NB, L) + L; }

  SparseKeyPack() = default;
  /// Storage for `heads` (b, kv head) pairs of N packed keys of dimension D, blocks of NB.
  SparseKeyPack(std::int64_t heads_, std::int64_t N_, std::int64_t NB_, std::int64_t D_)
      : D(D_),
        Dp(core::round_up(std::max<std::int64_t>(D_, 1), L)),
        N(N_),
        NB(std::max<std::int64_t>(NB_, 1)),
        NBp(padded_block(NB)),
        blocks(num_chunks(N_, NB)),
        heads(heads_) {
    auto& pool = detail::PackStoragePool<T>::local();
    vp = pool.take();  // the reverse of the order given back, so each gets its own again
    kt = pool.take();
    fit(kt, heads * blocks * D * NBp);
    fit(vp, heads * N * Dp);
  }
  SparseKeyPack(const SparseKeyPack&) = default;
  SparseKeyPack(SparseKeyPack&&) noexcept = default;
  SparseKeyPack& operator=(const SparseKeyPack&) = default;
  SparseKeyPack& operator=(SparseKeyPack&&) noexcept = default;
  ~SparseKeyPack() {
    auto& pool = detail::PackStoragePool<T>::local();
    pool.give(std::move(kt));
    pool.give(std::move(vp));
  }

  const T* k_head(std::int64_t head) const noexcept { return kt.data() + head * blocks * D * NBp; }
  const T* v_head(std::int64_t head) const noexcept { return vp.data() + head * N * Dp; }

  /// Packs key p of head `head` (p < N): key and value vectors k/v of D elements (element
  /// strides kd/vd) stored as T or bf16 (widened), or zeros where k is null.
  template <class KV>
  void pack_key(std::int64_t head, std::int64_t p, const KV* k, std::int64_t kd, const KV* v,
                std::int64_t vd) noexcept {
    T* kdst = kt.data() + head * blocks * D * NBp + (p / NB) * D * NBp + p % NB;
    T* vdst = vp.data() + head * N * Dp + p * Dp;
    std::fill(vdst + D, vdst + Dp, T(0));
    if (!k) {
      for (std::int64_t d = 0; d < D; ++d) kdst[d * NBp] = T(0);
      std::fill_n(vdst, D, T(0));
      return;
    }
    if (kd == 1) {  // unit strides: contiguous reads (vectorised for V)
      for (std::int64_t d = 0; d < D; ++d) kdst[d * NBp] = T(to_float(k[d]));
    } else {
      for (std::int64_t d = 0; d < D; ++d) kdst[d * NBp] = T(to_float(k[d * kd]));
    }
    if (vd == 1) {
      for (std::int64_t d = 0; d < D; ++d) vdst[d] = T(to_float(v[d]));
    } else {
      for (std::int64_t d = 0; d < D; ++d) vdst[d] = T(to_float(v[d * vd]));
    }
  }

  /// Packs keys [p, p + L) of head `head`, all in one block, from float rows k + j * ks and
  /// v + j * vs (unit element strides) through register transposes (transpose_rows). Returns
  /// false (nothing written) where the build has none for this arch.
  bool pack_keys_transposed(std::int64_t head, std::int64_t p, const T* k, std::int64_t ks,
                            const T* v, std::int64_t vs) noexcept {
    T* kdst = kt.data() + head * blocks * D * NBp + (p / NB) * D * NBp + p % NB;
    if (!transpose_rows<T, Arch>(k, ks, kdst, NBp, D)) return false;
    for (std::int64_t j = 0; j < L; ++j) {
      T* vdst = vp.data() + head * N * Dp + (p + j) * Dp;
      std::copy_n(v + j * vs, D, vdst);
      std::fill(vdst + D, vdst + Dp, T(0));
    }
    return true;
  }

  /// Zeroes what pack_key left unwritten in head `head` whose keys [0, n) are packed: the
  /// padding lanes of every block row and keys [n, N).
  void finish_head(std::int64_t head, std::int64_t n) noexcept {
    T* kh = kt.data() + head * blocks * D * NBp;
    for (std::int64_t blk = 0; blk < blocks; ++blk) {
      const std::int64_t valid = std::clamp<std::int64_t>(n - blk * NB, 0, NB);
      for (std::int64_t d = 0; d < D; ++d)
        std::fill(kh + (blk * D + d) * NBp + valid, kh + (blk * D + d + 1) * NBp, T(0));
    }
    std::fill(vp.data() + (head * N + std::min(n, N)) * Dp, vp.data() + (head + 1) * N * Dp, T(0));
  }

 private:
  // Sizes v to n elements (at least 1) without clearing what it holds: a vector from the pool
  // keeps its earlier contents, which packing overwrites.
  static void fit(detail::aligned_vector<T>& v, std::int64_t n) {
    const std::size_t want = std::size_t(std::max<std::int64_t>(1, n));
    if (v.capacity() < want) v = detail::aligned_vector<T>();  // no copy of stale values
    v.resize(want);
  }
};

namespace detail {

// Cuts the tile's runs into chunks for rows [r0, r0 + n): see the file comment. Blocks of NB
// packed keys lie block_stride elements apart; no division per chunk (this runs once per tile
// and chunk, beside the chunk's 2 D multiply-adds per row and key).
template <std::int64_t L>
void build_chunks(const QueryTile& tile, int r0, int n, std::int64_t NB, std::int64_t block_stride,
                  std::vector<SparseChunk>& out) {
  out.clear();
  for (std::size_t ri = 0; ri < tile.runs.size(); ++ri) {
    const TileRun& run = tile.runs[ri];
    std::int64_t lo = std::numeric_limits<std::int64_t>::max(), hi = 0;
    // [all_lo, all_hi): the keys every row sees; whole chunks inside it need no per-row test.
    std::int64_t all_lo = 0, all_hi = std::numeric_limits<std::int64_t>::max();
    for (int r = r0; r < r0 + n; ++r) {
      const std::int64_t b = std::max(run.begin, run.rows[r].begin);
      const std::int64_t e = std::min(run.end, run.rows[r].end);
      if (b < e) {
        lo = std::min(lo, b);
        hi = std::max(hi, e);
      }
      all_lo = std::max(all_lo, run.rows[r].begin);
      all_hi = std::min(all_hi, run.rows[r].end);
    }
    if (lo >= hi) continue;
    // The block holding p starts at key bstart and element b_off of the packed head.
    std::int64_t bstart = lo / NB * NB, b_off = lo / NB * block_stride;
    const bool one_block = hi <= bstart + NB;
    for (std::int64_t p = lo; p < hi;) {
      if (p == bstart + NB) {
        bstart += NB;
        b_off += block_stride;
      }
      const std::int64_t off = p - bstart;
      const std::int64_t next =
          one_block ? std::min(hi, p + L) : std::min({hi, bstart + NB, bstart + (off / L + 1) * L});
      if (next - p == L && p >= all_lo && next <= all_hi) {
        out.push_back({p, L, b_off + off, std::int32_t(ri), false});
        p = next;
        continue;
      }
      bool any = false, all = next - p == L;
      for (int r = r0; r < r0 + n; ++r) {
        const KeyRange& rg = run.rows[r];
        const bool covers = rg.begin <= p && rg.end >= next;
        const bool touches = std::max(rg.begin, p) < std::min(rg.end, next);
        all = all && covers;
        any = any || touches;
      }
      if (any) out.push_back({p, next - p, b_off + off, std::int32_t(ri), !all});
      p = next;
    }
  }
}

// Scores of chunks [i0, i0 + cnt) (cnt <= NV) into s at lane i0_local * L; row_max (or null)
// takes the scores of the unmasked chunks (score_chunks). kh: the packed head, rows of its
// blocks NBp apart.
template <class Arch, class T, int M, int NV>
inline void score_group(const T* qp, std::int64_t D, const SparseChunk* ch, int cnt, const T* kh,
                        std::int64_t NBp, T* s, std::int64_t s_stride,
                        typename Reg<T, Arch>::V* row_max) noexcept {
  const T* kp[NV];
  unsigned unmasked = 0;
  for (int n = 0; n < cnt; ++n) {
    kp[n] = kh + ch[n].k_off;
    unmasked |= unsigned(!ch[n].mask) << n;
  }
  if constexpr (NV > 1) {
    if (cnt < NV) {
      score_group<Arch, T, M, NV - 1>(qp, D, ch, cnt, kh, NBp, s, s_stride, row_max);
      return;
    }
  }
  score_chunks<Arch, T, M, NV>(qp, D, kp, NBp, s, s_stride, row_max, unmasked);
}

// Rows [r0, r0 + n) of `tile` (n <= M; rows past n are zero padding) of (b, h) over the packed
// head (kh, vh). state: null = start fresh and write the rows to out; else continue each row's
// state and store it back (stateful execution).
template <class Arch, class T, int M, class KV>
void sparse_micro_tile(const SparseAttentionArgs<T, KV>& a, const T* kh, const T* vh,
                       std::int64_t NB, std::int64_t NBp, std::int64_t b, std::int64_t h,
                       const QueryTile& tile, int r0, int n, SparseTileWorkspace<T>& ws,
                       const SparseRowState<T>* state) {
  using Tl = DenseTiling<T, Arch>;
  constexpr int NV = Tl::NV;
  constexpr std::int64_t L = Tl::L, KB = Tl::KB, CB = KB / L;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  constexpr T log2e = T(1.44269504088896340736);
  const std::int64_t D = a.D, Dp = round_up(D, L);
  build_chunks<L>(tile, r0, n, NB, D * NBp, ws.chunks);
  const T qscale = a.scale * log2e;
  for (int r = 0; r < M; ++r) {
    T* qd = ws.qp.data() + r * D;
    T* od = ws.o.data() + r * Dp;
    if (r < n) {
      const std::int64_t i = tile.rows[r0 + r];
      const T* src = a.q + b * a.q_stride[0] + i * a.q_stride[1] + h * a.q_stride[2];
      for (std::int64_t d = 0; d < D; ++d) qd[d] = src[d * a.q_stride[3]] * qscale;
      if (state) {
        const std::int64_t e = i - state->first;
        ws.m[r] = state->m[e];
        ws.l[r] = state->l[e];
        std::copy_n(state->o + e * state->Dp, Dp, od);
        continue;
      }
    } else {
      std::fill_n(qd, D, T(0));
    }
    ws.m[r] = neg_inf;
    ws.l[r] = T(0);
    std::fill_n(od, Dp, T(0));
  }
  const std::int64_t total = std::int64_t(ws.chunks.size());
  for (std::int64_t c0 = 0; c0 < total; c0 += CB) {
    const std::int64_t nc = std::min(CB, total - c0);
    const SparseChunk* ch = ws.chunks.data() + c0;
    // Row maxima: the unmasked chunks' from the score registers, the masked ones' after
    // masking (scalar arch: the softmax's own pass).
    typename Reg<T, Arch>::V row_max[M];
    for (int r = 0; r < M; ++r) row_max[r] = Reg<T, Arch>::splat(neg_inf);
    constexpr bool fused_max = !simd::is_scalar_v<Arch>;
    for (std::int64_t i = 0; i < nc; i += NV) {
      score_group<Arch, T, M, NV>(ws.qp.data(), D, ch + i, int(std::min<std::int64_t>(NV, nc - i)),
                                  kh, NBp, ws.s.data() + i * L, KB, fused_max ? row_max : nullptr);
    }
    for (std::int64_t i = 0; i < nc; ++i) {
      if (!ch[i].mask) continue;
      const TileRun& run = tile.runs[std::size_t(ch[i].run)];
      for (int r = 0; r < M; ++r) {
        T* srow = ws.s.data() + r * KB + i * L;
        std::int64_t vb = 0, ve = ch[i].c;  // visible lanes [vb, ve)
        if (r < n) {
          const KeyRange& rg = run.rows[r0 + r];
          vb = std::clamp<std::int64_t>(rg.begin - ch[i].p, 0, ch[i].c);
          ve = std::clamp<std::int64_t>(rg.end - ch[i].p, vb, ch[i].c);
        }
        mask_lanes<Arch>(srow, vb, ve);
        if constexpr (fused_max) row_max[r] = xsimd::max(row_max[r], Reg<T, Arch>::load(srow));
      }
    }
    for (int r = 0; r < M; ++r) {
      if constexpr (fused_max) {
        ws.alpha[r] = online_softmax_update_with_max(Arch{}, ws.s.data() + r * KB, nc * L,
                                                     simd::hmax(row_max[r]), ws.m[r], ws.l[r]);
      } else {
        ws.alpha[r] = online_softmax_update(Arch{}, ws.s.data() + r * KB, nc * L, ws.m[r], ws.l[r]);
      }
    }
    std::int64_t c = 0;
    for (; c + NV * L <= Dp; c += NV * L) {
      value_chunks<Arch, T, M, NV>(ws.s.data(), KB, ws.alpha.data(), ch, nc, vh + c, Dp,
                                   ws.o.data() + c, Dp);
    }
    for (; c < Dp; c += L) {
      value_chunks<Arch, T, M, 1>(ws.s.data(), KB, ws.alpha.data(), ch, nc, vh + c, Dp,
                                  ws.o.data() + c, Dp);
    }
  }
  for (int r = 0; r < n; ++r) {
    const std::int64_t i = tile.rows[r0 + r];
    if (state) {
      const std::int64_t e = i - state->first;
      state->m[e] = ws.m[r];
      state->l[e] = ws.l[r];
      std::copy_n(ws.o.data() + r * Dp, Dp, state->o + e * state->Dp);
    } else {
      T* dst = a.out + b * a.out_stride[0] + i * a.out_stride[1] + h * a.out_stride[2];
      online_softmax_finish(Arch{}, ws.o.data() + r * Dp, D, ws.l[r], dst, a.out_stride[3]);
    }
  }
}

}  // namespace detail

/// Runs one tile of (b, h) against packed head `head` of `pack`: a tile at least half full
/// runs as one MR-row register tile, a smaller one row by row (decoding). state: see
/// detail::sparse_micro_tile.
template <class Arch, class T, class KV>
void sparse_tile(const SparseAttentionArgs<T, KV>& a, const SparseKeyPack<T, Arch>& pack,
                 std::int64_t head, std::int64_t b, std::int64_t h, const QueryTile& tile,
                 const SparseRowState<T>* state = nullptr) {
  using Tl = detail::DenseTiling<T, Arch>;
  constexpr int MR = Tl::MR;
  static_assert(MR <= max_tile_rows);
  auto& ws = detail::sparse_tile_workspace<T, Arch>();
  ws.qp.resize(std::size_t(std::max<std::int64_t>(1, MR * a.D)));
  ws.s.resize(std::size_t(MR * Tl::KB));
  ws.o.resize(std::size_t(MR * pack.Dp));
  ws.m.resize(MR);
  ws.l.resize(MR);
  ws.alpha.resize(MR);
  const T* kh = pack.k_head(head);
  const T* vh = pack.v_head(head);
  for (int r0 = 0; r0 < tile.n_rows; r0 += MR) {
    const int n = std::min(MR, tile.n_rows - r0);
    if (2 * n >= MR) {
      detail::sparse_micro_tile<Arch, T, MR>(a, kh, vh, pack.NB, pack.NBp, b, h, tile, r0, n, ws,
                                             state);
    } else {
      for (int r = 0; r < n; ++r)
        detail::sparse_micro_tile<Arch, T, 1>(a, kh, vh, pack.NB, pack.NBp, b, h, tile, r0 + r, 1,
                                              ws, state);
    }
  }
}

/// Packs every (b, kv head) of a.k / a.v: head index b * Hkv + hk; token(b, hk, p) gives the
/// key token of packed key p (< 0: padding), n(b, hk) how many packed keys are read (keys past
/// it are zeros and never read). Tasks are (b, span of packed keys) with every KV head inside,
/// so the reads walk each token's heads, adjacent in [B, S, H_kv, D], in order; L keys of
/// consecutive tokens in one block go through register transposes.
template <class Arch, class T, class KV, class TokenOf, class Count>
void sparse_pack_all(const SparseAttentionArgs<T, KV>& a, SparseKeyPack<T, Arch>& pack,
                     TokenOf&& token, Count&& count) {
  constexpr std::int64_t L = SparseKeyPack<T, Arch>::L, span = 256;
  std::vector<std::int64_t> n(std::size_t(a.B * a.Hkv));
  for (std::int64_t b = 0; b < a.B; ++b)
    for (std::int64_t hk = 0; hk < a.Hkv; ++hk)
      n[std::size_t(b * a.Hkv + hk)] = std::clamp<std::int64_t>(count(b, hk), 0, pack.N);
  const bool unit = a.k_stride[3] == 1 && a.v_stride[3] == 1;
  const std::int64_t spans = num_chunks(pack.N, span);
  parallel_for(a.B * spans, [&](std::int64_t task) {
    const std::int64_t b = task / spans, p1 = std::min(pack.N, (task % spans + 1) * span);
    for (std::int64_t p = task % spans * span; p < p1;) {
      // Keys [p, g): one block, at most L.
      const std::int64_t g = std::min({p1, p + L, (p / pack.NB + 1) * pack.NB});
      for (std::int64_t hk = 0; hk < a.Hkv; ++hk) {
        const std::int64_t head = b * a.Hkv + hk;
        const KV* k = a.k + b * a.k_stride[0] + hk * a.k_stride[2];
        const KV* v = a.v + b * a.v_stride[0] + hk * a.v_stride[2];
        const std::int64_t end = std::min(g, n[std::size_t(head)]);
        if constexpr (std::is_same_v<KV, T>) {
          if (unit && end - p == L) {
            const std::int64_t tok = token(b, hk, p);
            bool consecutive = tok >= 0;
            for (std::int64_t j = 1; j < L && consecutive; ++j)
              consecutive = token(b, hk, p + j) == tok + j;
            if (consecutive &&
                pack.pack_keys_transposed(head, p, k + tok * a.k_stride[1], a.k_stride[1],
                                          v + tok * a.v_stride[1], a.v_stride[1]))
              continue;
          }
        }
        for (std::int64_t q = p; q < end; ++q) {
          const std::int64_t tok = token(b, hk, q);
          if (tok < 0) {
            pack.pack_key(head, q, static_cast<const KV*>(nullptr), 0, v, 0);
          } else {
            pack.pack_key(head, q, k + tok * a.k_stride[1], a.k_stride[3], v + tok * a.v_stride[1],
                          a.v_stride[3]);
          }
        }
      }
      p = g;
    }
  });
  parallel_for(a.B * a.Hkv,
               [&](std::int64_t head) { pack.finish_head(head, n[std::size_t(head)]); });
}

/// The tile executor: for every (b, h), tiles 0 .. tiles_per_head - 1, each described by
/// make_tile(b, h, tile_index, QueryTile&), against the packed head b * Hkv + h / (H / Hkv).
/// Tasks are (b, h, block of tiles_per_task tiles): a fixed partition.
template <class Arch, class T, class KV, class MakeTile>
void sparse_attention(Arch, const SparseAttentionArgs<T, KV>& a, const SparseKeyPack<T, Arch>& pack,
                      std::int64_t tiles_per_head, std::int64_t tiles_per_task,
                      MakeTile&& make_tile) {
  if (a.B == 0 || a.H == 0 || tiles_per_head == 0) return;
  const std::int64_t per = std::max<std::int64_t>(1, tiles_per_task);
  const std::int64_t blocks = num_chunks(tiles_per_head, per);
  const std::int64_t group = a.H / a.Hkv;
  parallel_for(a.B * a.H * blocks, [&](std::int64_t task) {
    const std::int64_t blk = task % blocks, bh = task / blocks;
    const std::int64_t b = bh / a.H, h = bh % a.H;
    QueryTile local;
    for (std::int64_t t = blk * per; t < std::min(tiles_per_head, (blk + 1) * per); ++t) {
      local.clear();
      make_tile(b, h, t, local);
      sparse_tile<Arch, T>(a, pack, b * a.Hkv + h / group, b, h, local);
    }
  });
}

}  // namespace kernels

namespace attention {

namespace structured_detail {

/// Checks q, k, v, out as every structured layer does ([B, T, H, D] / [B, S, H_kv, D], GQA,
/// no aliasing) and fills the kernel arguments. Shared by the structured layers.
template <class T>
kernels::SparseAttentionArgs<T> make_args(std::string_view layer, std::string_view fn,
                                          ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
                                          View<T, 4> out, const std::optional<double>& scale) {
  core::detail::check_shape<const T, 4>(layer, fn, "q", q, {"B", "T", "H", "D"},
                                        Shape<4>{-1, -1, -1, -1});
  const std::int64_t B = q.extent(0), D = q.extent(3), H = q.extent(2);
  core::detail::check_shape<const T, 4>(layer, fn, "k", k, {"B", "S", "H_kv", "D"},
                                        Shape<4>{B, -1, -1, D}, "k matches q in B and D");
  core::detail::check_shape<const T, 4>(layer, fn, "v", v, {"B", "S", "H_kv", "D"}, k.shape(),
                                        "v has the shape of k");
  core::detail::check_shape<T, 4>(layer, fn, "out", out, {"B", "T", "H", "D"}, q.shape(),
                                  "out has the shape of q");
  // The executors loop over every query: q (and out) must be sizes a tensor could have, even
  // as a stride-0 view that claims any extents (k and v: check_pack bounds their pack).
  switchyard::detail::checked_size(layer, fn, "q",
                                   {B, q.extent(1), H, std::max<std::int64_t>(D, 1)}, sizeof(T));
  const std::int64_t Hkv = k.extent(2);
  if ((Hkv == 0 && H > 0) || (Hkv > 0 && H % Hkv != 0))
    switchyard::detail::fail_shape(
        layer, fn, "k", switchyard::detail::format_shape({"B", "S", "H_kv", "D"}, k.shape()),
        "[B, S, H_kv, D] with H_kv dividing H=" + std::to_string(H), "grouped-query attention");
  core::detail::check_no_alias(layer, fn, "out", out, "q", q);
  core::detail::check_no_alias(layer, fn, "out", out, "k", k);
  core::detail::check_no_alias(layer, fn, "out", out, "v", v);
  kernels::SparseAttentionArgs<T> a{};
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
  a.B = B;
  a.T_q = q.extent(1);
  a.H = H;
  a.D = D;
  a.S = k.extent(1);
  a.Hkv = Hkv;
  a.scale = static_cast<T>(scale ? *scale : 1.0 / std::sqrt(double(std::max<std::int64_t>(1, D))));
  return a;
}

/// Throws shape_error when packing N keys per (b, kv head) in blocks of NB would pass
/// core::max_buffer_bytes.
template <class T, class Arch, class KV>
void check_pack(std::string_view layer, std::string_view fn,
                const kernels::SparseAttentionArgs<T, KV>& a, std::int64_t N, std::int64_t NB) {
  using Pack = kernels::SparseKeyPack<T, Arch>;
  const std::int64_t nb = std::max<std::int64_t>(1, NB);
  switchyard::detail::checked_size(layer, fn, "k",
                                   {a.B, a.Hkv, core::pad_extent(N, nb),
                                    Pack::padded_block(nb) / nb + 1, core::pad_extent(a.D, 64)},
                                   2 * sizeof(T));
}

}  // namespace structured_detail

/// Which (query block, key block) pairs are computed: queries in blocks of query_block, keys
/// in blocks of key_block; for each (batch b, head h) - or for all heads when heads == 1 and
/// shared_heads - a CSR list of key blocks per query block. indices of query block qb of
/// (b, h): indices[offsets[i] .. offsets[i + 1]) with i = (b * mask_heads + h) * QB + qb,
/// strictly ascending, each in [0, KB). QB = ceil(T / query_block), KB = ceil(S / key_block).
struct BlockMask {
  std::int64_t batch = 1;        ///< B
  std::int64_t heads = 1;        ///< H, or 1 = the same mask for every head
  std::int64_t num_queries = 0;  ///< T
  std::int64_t num_keys = 0;     ///< S
  std::int64_t query_block = 0;  ///< queries per block, >= 1
  std::int64_t key_block = 0;    ///< keys per block, >= 1
  std::vector<std::int64_t> offsets{};
  std::vector<std::int32_t> indices{};

  std::int64_t query_blocks() const noexcept { return num_chunks(num_queries, query_block); }
  std::int64_t key_blocks() const noexcept { return num_chunks(num_keys, key_block); }

  /// Throws config_error / shape_error naming `layer::fn` unless the mask is well formed:
  /// sizes >= 1 (T, S >= 0), offsets of batch * heads * QB + 1 entries from 0 to
  /// indices.size(), non-decreasing, indices strictly ascending per query block and in range.
  void check(std::string_view layer, std::string_view fn) const {
    using switchyard::detail::fail_config;
    if (query_block < 1) fail_config(layer, fn, "mask.query_block", query_block, ">= 1");
    if (key_block < 1) fail_config(layer, fn, "mask.key_block", key_block, ">= 1");
    if (batch < 0 || heads < 1 || num_queries < 0 || num_keys < 0) {
      const std::int64_t got[4] = {batch, heads, num_queries, num_keys};
      switchyard::detail::fail_shape(layer, fn, "mask",
                                     switchyard::detail::format_shape({"B", "H", "T", "S"}, got),
                                     "B, T, S >= 0 and H >= 1");
    }
    const std::int64_t rows = core::bounded_product({batch, heads, query_blocks()}, 8);
    if (rows < 0 || std::int64_t(offsets.size()) != rows + 1) {
      const std::int64_t n = std::int64_t(offsets.size());
      switchyard::detail::fail_shape(
          layer, fn, "mask.offsets", switchyard::detail::format_shape({"n"}, std::span(&n, 1)),
          "[B * H * QB + 1 = " + std::to_string(rows + 1) + "]",
          "one CSR row per (batch, head, query block) (B=" + std::to_string(batch) +
              ", H=" + std::to_string(heads) + ", QB=" + std::to_string(query_blocks()) + ")");
    }
    if (offsets[0] != 0 || offsets[std::size_t(rows)] != std::int64_t(indices.size()))
      fail_config(layer, fn, "mask.offsets", offsets[std::size_t(rows)],
                  "offsets from 0 to indices.size() = " + std::to_string(indices.size()));
    const std::int64_t kb = key_blocks();
    for (std::int64_t i = 0; i < rows; ++i) {
      const std::int64_t b0 = offsets[std::size_t(i)], b1 = offsets[std::size_t(i + 1)];
      if (b1 < b0 || b1 > std::int64_t(indices.size()))
        fail_config(
            layer, fn, "mask.offsets[" + std::to_string(i + 1) + "]", b1,
            "non-decreasing offsets within indices.size() = " + std::to_string(indices.size()));
      for (std::int64_t e = b0; e < b1; ++e) {
        const std::int64_t idx = indices[std::size_t(e)];
        if (idx < 0 || idx >= kb)
          fail_config(layer, fn, "mask.indices[" + std::to_string(e) + "]", idx,
                      "a key block in [0, KB=" + std::to_string(kb) + ") (S=" +
                          std::to_string(num_keys) + ", key_block=" + std::to_string(key_block) +
                          ", query block row " + std::to_string(i) + ")");
        if (e > b0 && indices[std::size_t(e - 1)] >= idx)
          fail_config(layer, fn, "mask.indices[" + std::to_string(e) + "]", idx,
                      "strictly ascending key blocks per query block (previous " +
                          std::to_string(indices[std::size_t(e - 1)]) + ", query block row " +
                          std::to_string(i) + ")");
      }
    }
  }

  /// Key blocks of query block qb of (b, h).
  std::span<const std::int32_t> of(std::int64_t b, std::int64_t h, std::int64_t qb) const {
    const std::int64_t i = (b * heads + (heads == 1 ? 0 : h)) * query_blocks() + qb;
    return {indices.data() + offsets[std::size_t(i)],
            std::size_t(offsets[std::size_t(i + 1)] - offsets[std::size_t(i)])};
  }
};

/// Configuration of BlockSparseAttention. scale multiplies q . k (default 1/sqrt(D)); causal
/// additionally masks keys j > i + S - T inside the computed blocks.
struct BlockSparseConfig {
  std::optional<double> scale{};
  bool causal = false;
};

/// Attention over a user block mask (BlockMask), with the structured tile executor.
template <class T = float, class Arch = simd::default_arch>
class BlockSparseAttention {
 public:
  using config_type = BlockSparseConfig;
  static constexpr std::string_view name = "BlockSparseAttention";

  /// Throws config_error if scale is set and not finite and > 0.
  explicit BlockSparseAttention(config_type cfg = {}) : cfg_(cfg) {
    if (cfg_.scale && !(std::isfinite(*cfg_.scale) && *cfg_.scale > 0))
      switchyard::detail::fail_config(name, name, "scale", *cfg_.scale, "a finite value > 0");
  }
  const config_type& config() const noexcept { return cfg_; }

  /// (query, key) pairs computed for q [B, T, H, ...] under `mask` (a causal config counts
  /// only keys j <= i + S - T). Throws as forward for a malformed mask or H it cannot serve.
  std::int64_t pairs(const BlockMask& mask, std::int64_t H) const {
    mask.check(name, "pairs");
    check_heads(mask, H, "pairs");
    std::int64_t total = 0;
    const std::int64_t QB = mask.query_blocks(), T_ = mask.num_queries, S = mask.num_keys;
    const auto too_many = [&] {
      switchyard::detail::fail_config(name, "pairs", "mask", T_,
                                      "a mask whose pairs fit int64 (T=" + std::to_string(T_) +
                                          ", S=" + std::to_string(S) + ")");
    };
    // Per (query block, key block) in closed form: a block's rows are not looped over (a mask
    // may claim T and S no tensor could hold).
    for (std::int64_t b = 0; b < mask.batch; ++b)
      for (std::int64_t h = 0; h < mask.heads; ++h)
        for (std::int64_t qb = 0; qb < QB; ++qb)
          for (std::int32_t kb : mask.of(b, h, qb)) {
            const std::int64_t k0 = kb * mask.key_block;
            const std::int64_t w = std::min(mask.key_block, S - k0);  // the block's keys
            const std::int64_t i0 = qb * mask.query_block;
            const std::int64_t i1 = i0 + std::min(mask.query_block, T_ - i0);
            // Causal: row i sees keys [k0, i + S - T + 1), clamp(i - a, 0, w) of the block.
            std::int64_t block = 0;
            if (cfg_.causal)
              block = block_pairs_causal(i0, i1, k0 - S + T_ - 1, w);
            else if (core::mul_overflows(i1 - i0, w, block))
              block = -1;
            if (block < 0 || core::add_overflows(total, block, total)) too_many();
          }
    if (mask.heads == 1 && core::mul_overflows(total, H, total))
      switchyard::detail::fail_config(name, "pairs", "H", H, "a head count whose pairs fit int64");
    return total;
  }

  /// Sum over rows i in [i0, i1) of clamp(i - a, 0, w): the keys of a causal block of w keys
  /// that its rows see (row i sees its first i - a). -1 when the sum does not fit int64.
  static std::int64_t block_pairs_causal(std::int64_t i0, std::int64_t i1, std::int64_t a,
                                         std::int64_t w) noexcept {
    std::int64_t aw = 0;  // the first row that sees all w keys (saturated)
    if (core::add_overflows(a, w, aw)) aw = std::numeric_limits<std::int64_t>::max();
    std::int64_t sum = 0;
    // Rows [r0, r1) see 0 <= i - a < w keys: an arithmetic series.
    const std::int64_t r0 = std::max(i0, a), r1 = std::min(i1, aw);
    if (r1 > r0) {
      const std::int64_t n = r1 - r0, first = r0 - a, last = r1 - 1 - a;  // both < w
      std::int64_t ends = 0;
      if (core::add_overflows(first, last, ends)) return -1;
      if (n % 2 == 0 ? core::mul_overflows(n / 2, ends, sum)
                     : core::mul_overflows(n, ends / 2, sum))
        return -1;
    }
    // Rows [max(i0, aw), i1) see all w keys.
    const std::int64_t f0 = std::max(i0, aw);
    std::int64_t flat = 0;
    if (i1 > f0 && (core::mul_overflows(i1 - f0, w, flat) || core::add_overflows(sum, flat, sum)))
      return -1;
    return sum;
  }

  /// q: [B, T, H, D], k and v: [B, S, H_kv, D] (H_kv divides H), out: [B, T, H, D]; mask
  /// extents B, T, S and heads 1 or H. Any strides; out must not share memory with q, k, v.
  /// Query rows that see no key get zeros. Throws shape_error / config_error.
  void forward(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v, const BlockMask& mask,
               View<T, 4> out) const {
    const std::string_view fn = "forward";
    const auto a = structured_detail::make_args<T>(name, fn, q, k, v, out, cfg_.scale);
    mask.check(name, fn);
    if (mask.batch != a.B || mask.num_queries != a.T_q || mask.num_keys != a.S) {
      const std::int64_t got[3] = {mask.batch, mask.num_queries, mask.num_keys};
      const std::int64_t want[3] = {a.B, a.T_q, a.S};
      switchyard::detail::fail_shape(
          name, fn, "mask", switchyard::detail::format_shape({"B", "T", "S"}, got),
          switchyard::detail::format_shape({"B", "T", "S"}, want), "mask extents match q and k");
    }
    check_heads(mask, a.H, fn);
    using Tl = kernels::detail::DenseTiling<T, Arch>;
    constexpr std::int64_t MR = Tl::MR;
    // Keys in natural order, blocks of key_block rounded to whole registers (at most 1024).
    // (Clamped before rounding: a huge key_block must not overflow; L divides 1024.)
    const std::int64_t NB = core::round_up(std::min<std::int64_t>(1024, mask.key_block), Tl::L);
    structured_detail::check_pack<T, Arch>(name, fn, a, a.S, NB);
    kernels::SparseKeyPack<T, Arch> pack(a.B * a.Hkv, a.S, NB, a.D);
    kernels::sparse_pack_all<Arch>(
        a, pack, [](std::int64_t, std::int64_t, std::int64_t p) { return p; },
        [&](std::int64_t, std::int64_t) { return a.S; });
    const std::int64_t QB = mask.query_blocks();
    // A query block holds at most T queries (query_block may be far larger than T).
    const std::int64_t tiles_per_qb =
        num_chunks(std::min<std::int64_t>(mask.query_block, std::max<std::int64_t>(a.T_q, 1)), MR);
    const std::int64_t off = a.S - a.T_q;
    kernels::sparse_attention(
        Arch{}, a, pack, QB * tiles_per_qb, std::max<std::int64_t>(1, 256 / MR),
        [&](std::int64_t b, std::int64_t h, std::int64_t t, kernels::QueryTile& tile) {
          const std::int64_t qb = t / tiles_per_qb;
          const std::int64_t i0 = qb * mask.query_block + (t % tiles_per_qb) * MR;
          const std::int64_t i1 = std::min({a.T_q, (qb + 1) * mask.query_block, i0 + MR});
          tile.n_rows = int(std::max<std::int64_t>(0, i1 - i0));
          for (int r = 0; r < tile.n_rows; ++r) tile.rows[r] = i0 + r;
          for (std::int32_t kb : mask.of(b, h, qb)) {
            kernels::TileRun run;
            run.begin = kb * mask.key_block;
            run.end = run.begin + std::min(mask.key_block, a.S - run.begin);
            for (int r = 0; r < tile.n_rows; ++r)
              run.rows[r] = {run.begin,
                             cfg_.causal ? std::min(run.end, i0 + r + off + 1) : run.end};
            tile.runs.push_back(run);
          }
        });
  }

  /// As above, returning a new [B, T, H, D] tensor.
  core::Tensor<T> forward(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
                          const BlockMask& mask) const {
    core::Tensor<T> out(q.shape());
    forward(q, k, v, mask, out.template view<4>());
    return out;
  }

 private:
  static void check_heads(const BlockMask& mask, std::int64_t H, std::string_view fn) {
    if (mask.heads != 1 && mask.heads != H)
      switchyard::detail::fail_config(name, fn, "mask.heads", mask.heads,
                                      "1 (shared by all heads) or H = " + std::to_string(H));
  }

  config_type cfg_;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
