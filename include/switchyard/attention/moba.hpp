#pragma once
// MoBA (Mixture of Block Attention) and VMoBA as a layer: route with moba_select
// (moba_select.hpp: each query keeps its own block and its top-k - or threshold - blocks by
// q . mean key), then execute the selection with the tile executor (block_sparse.hpp).
//
// Execution is key-block-major: per (b, h, range of up to 1024 queries), the selection is
// inverted into, for each key block, the ascending list of queries that chose it; the blocks
// are visited in ascending order and each list is cut into tiles of MR queries that share the
// whole block (so queries with different selections never compute each other's blocks). Each
// query's online-softmax state (m, l, O) lives in memory between blocks, and the output is
// O / l after the last block. The order of blocks per query is fixed (ascending), so results
// are bit-identical for any thread count. Causal: inside the own block a query sees keys <= t
// (the other blocks of a causal selection lie entirely before t).
// route() and execute() are separate public calls, so routing time can be measured apart.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

#include "switchyard/attention/block_sparse.hpp"
#include "switchyard/attention/moba_select.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// Configuration of MobaAttention (keep the field order: designated initialisers). The first
/// four fields are MobaConfig's: block_size (contiguous blocks; not used with a partition),
/// top_k (own block included), threshold (0: top-k; (0, 1]: VMoBA threshold), causal.
struct MobaAttentionConfig {
  std::int64_t block_size = 0;
  std::int64_t top_k = 0;
  double threshold = 0;
  bool causal = true;
  std::optional<double> scale{};  ///< multiplies q . k; default 1/sqrt(D)
};

/// MoBA / VMoBA attention (see the file comment).
template <class T = float, class Arch = simd::default_arch>
class MobaAttention {
 public:
  using config_type = MobaAttentionConfig;
  static constexpr std::string_view name = "MobaAttention";

  /// Throws config_error for a scale that is not finite and > 0 (the selection parameters are
  /// checked against the shapes by route: block_size < 1, top_k outside [1, blocks], ...).
  explicit MobaAttention(config_type cfg) : cfg_(cfg) {
    if (cfg_.scale && !(std::isfinite(*cfg_.scale) && *cfg_.scale > 0))
      switchyard::detail::fail_config(name, name, "scale", *cfg_.scale, "a finite value > 0");
  }
  const config_type& config() const noexcept { return cfg_; }

  /// Contiguous blocks of config().block_size over the S keys.
  MobaPartition partition(std::int64_t S) const {
    if (cfg_.block_size < 1)
      switchyard::detail::fail_config(name, "route", "block_size", cfg_.block_size,
                                      ">= 1 (S=" + std::to_string(S) + ")");
    return MobaPartition::contiguous(S, cfg_.block_size);
  }

  /// Routing: q [B, T, H, D], k [B, S, H_kv, D] -> the blocks of every (b, h, query)
  /// (moba_select; its errors name the argument and shapes).
  void route(ConstView<T, 4> q, ConstView<T, 4> k, MobaSelection& sel) const {
    route(q, k, partition(k.extent(1)), sel);
  }
  /// Routing over a general (VMoBA 1D/2D/3D) partition of the keys.
  void route(ConstView<T, 4> q, ConstView<T, 4> k, const MobaPartition& part,
             MobaSelection& sel) const {
    moba_select(q, k, part, select_config(), sel);
  }

  /// Execution of a selection made by route for these q, k (contiguous blocks).
  void execute(const MobaSelection& sel, ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
               View<T, 4> out) const {
    execute(sel, partition(k.extent(1)), q, k, v, out);
  }
  /// Execution over a general partition: q [B, T, H, D], k and v [B, S, H_kv, D], out like q;
  /// sel must have extents B, H, T and the partition's block count. Throws shape_error.
  void execute(const MobaSelection& sel, const MobaPartition& part, ConstView<T, 4> q,
               ConstView<T, 4> k, ConstView<T, 4> v, View<T, 4> out) const {
    const std::string_view fn = "execute";
    const auto a = structured_detail::make_args<T>(name, fn, q, k, v, out, cfg_.scale);
    check_moba_partition(name, fn, part, a.S);
    check_selection(fn, sel, part, a);
    using Tl = kernels::detail::DenseTiling<T, Arch>;
    constexpr std::int64_t MR = Tl::MR, NB = 512, QR = 1024;
    structured_detail::check_pack<T, Arch>(name, fn, a, a.S, NB);
    kernels::SparseKeyPack<T, Arch> pack(a.B * a.Hkv, a.S, NB, a.D);
    kernels::sparse_pack_all<Arch>(
        a, pack, [](std::int64_t, std::int64_t, std::int64_t p) { return p; },
        [&](std::int64_t, std::int64_t) { return a.S; });
    const std::int64_t nblocks = part.num_blocks();
    std::vector<std::vector<KeyRun>> runs(static_cast<std::size_t>(nblocks));
    for (std::int64_t n = 0; n < nblocks; ++n) part.block_runs(n, runs[std::size_t(n)]);
    const bool has_own = a.T_q == a.S;
    const std::int64_t ranges = num_chunks(a.T_q, QR), group = a.H / a.Hkv, Dp = pack.Dp;
    parallel_for(a.B * a.H * ranges, [&](std::int64_t task) {
      const std::int64_t rg = task % ranges, bh = task / ranges;
      const std::int64_t b = bh / a.H, h = bh % a.H;
      const std::int64_t t0 = rg * QR, t1 = std::min(a.T_q, t0 + QR);
      kernels::detail::aligned_vector<T> m(std::size_t(t1 - t0),
                                           -std::numeric_limits<T>::infinity());
      kernels::detail::aligned_vector<T> l(std::size_t(t1 - t0), T(0));
      kernels::detail::aligned_vector<T> o(std::size_t((t1 - t0) * Dp), T(0));
      const kernels::SparseRowState<T> state{m.data(), l.data(), o.data(), Dp, t0};
      // Queries per block, ascending (CSR by block).
      std::vector<std::int64_t> off(std::size_t(nblocks + 1), 0), list;
      for (std::int64_t t = t0; t < t1; ++t)
        for (std::int32_t n : sel.of(bh * a.T_q + t)) ++off[std::size_t(n + 1)];
      for (std::int64_t n = 0; n < nblocks; ++n) off[std::size_t(n + 1)] += off[std::size_t(n)];
      list.resize(std::size_t(off[std::size_t(nblocks)]));
      std::vector<std::int64_t> fill(off.begin(), off.end() - 1);
      for (std::int64_t t = t0; t < t1; ++t)
        for (std::int32_t n : sel.of(bh * a.T_q + t)) list[std::size_t(fill[std::size_t(n)]++)] = t;
      kernels::QueryTile tile;
      for (std::int64_t n = 0; n < nblocks; ++n) {
        for (std::int64_t e = off[std::size_t(n)]; e < off[std::size_t(n + 1)]; e += MR) {
          tile.clear();
          tile.n_rows = int(std::min(MR, off[std::size_t(n + 1)] - e));
          for (int r = 0; r < tile.n_rows; ++r) tile.rows[r] = list[std::size_t(e + r)];
          for (const KeyRun& kr : runs[std::size_t(n)]) {
            kernels::TileRun run;
            run.begin = kr.begin;
            run.end = kr.begin + kr.count;
            for (int r = 0; r < tile.n_rows; ++r) {
              const std::int64_t t = tile.rows[r];
              const bool own = has_own && part.block_of(t) == n;
              run.rows[r] = {run.begin, cfg_.causal && own ? std::min(run.end, t + 1) : run.end};
            }
            tile.runs.push_back(run);
          }
          kernels::sparse_tile<Arch, T>(a, pack, b * a.Hkv + h / group, b, h, tile, &state);
        }
      }
      for (std::int64_t t = t0; t < t1; ++t) {
        T* dst = a.out + b * a.out_stride[0] + t * a.out_stride[1] + h * a.out_stride[2];
        kernels::online_softmax_finish(Arch{}, o.data() + (t - t0) * Dp, a.D,
                                       l[std::size_t(t - t0)], dst, a.out_stride[3]);
      }
    });
  }

  /// route then execute (contiguous blocks).
  void forward(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v, View<T, 4> out) const {
    MobaSelection sel;
    route(q, k, sel);
    execute(sel, q, k, v, out);
  }
  /// As above, returning a new [B, T, H, D] tensor.
  core::Tensor<T> forward(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v) const {
    core::Tensor<T> out(q.shape());
    forward(q, k, v, out.template view<4>());
    return out;
  }

  /// (query, key) pairs execute computes for `sel` (moba_pairs): contiguous blocks of S keys,
  /// or a general partition.
  std::int64_t pairs(const MobaSelection& sel, std::int64_t S) const {
    return moba_pairs(sel, partition(S), cfg_.causal);
  }
  std::int64_t pairs(const MobaSelection& sel, const MobaPartition& part) const {
    return moba_pairs(sel, part, cfg_.causal);
  }

 private:
  MobaConfig select_config() const {
    MobaConfig c;
    c.block_size = cfg_.block_size;
    c.top_k = cfg_.top_k;
    c.threshold = cfg_.threshold;
    c.causal = cfg_.causal;
    return c;
  }

  void check_selection(std::string_view fn, const MobaSelection& sel, const MobaPartition& part,
                       const kernels::SparseAttentionArgs<T>& a) const {
    if (sel.batch != a.B || sel.heads != a.H || sel.queries != a.T_q ||
        sel.num_blocks != part.num_blocks()) {
      const std::int64_t got[4] = {sel.batch, sel.heads, sel.queries, sel.num_blocks};
      const std::int64_t want[4] = {a.B, a.H, a.T_q, part.num_blocks()};
      switchyard::detail::fail_shape(name, fn, "sel",
                                     switchyard::detail::format_shape({"B", "H", "T", "N"}, got),
                                     switchyard::detail::format_shape({"B", "H", "T", "N"}, want),
                                     "a selection routed for these q and k");
    }
    // CSR offsets and blocks: every read of sel.of() in execute stays inside sel.blocks.
    check_moba_selection(name, fn, sel, part.num_blocks());
  }

  config_type cfg_;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
