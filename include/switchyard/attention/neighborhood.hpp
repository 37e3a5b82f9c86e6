#pragma once
// Neighborhood attention (NATTEN semantics, neighborhood_rule.hpp) over 1D, 2D and 3D token
// grids, NATTEN's [B, X, (Y, (Z,)) H, D] layout seen as [B, tokens, H, D], with kernel size,
// dilation, stride (GNA) and causality per axis, grouped-query attention and key lengths, on the
// tile executor of block_sparse.hpp.
//
// Packing: tokens are reordered so that each dilation group is a compact sub-grid (NATTEN's
// token permute): packed index = (group, compact coordinates) row-major, each axis padded to
// its largest group, so a window along the last axis is a run of consecutive packed keys, and
// one last-axis row of a group is one block of the packed keys.
// Tiles: up to MR queries of one group, a along the last axis times b along the one before
// (chosen per call to minimise the lanes computed per query: adjacent queries' windows overlap
// almost entirely, so a tile shares the union of its rows' windows). Runs: one per key row in
// the union of the tile's windows over the leading axes, covering the union along the last
// axis; each row sees its own window (or nothing) in each run. With a stride, the queries of a
// stride tile share one window, so tiles aligned to it compute no masked pair at all.
// Key lengths (optional, [B]): keys whose flattened token index is >= key_lengths[b] are
// masked (padding at the end of the flattened sequence).
// Row kernel (neighborhood_kernels.hpp): 2D and 3D calls that are non-causal with stride 1 on
// every axis and have no key lengths run instead on tiles of L adjacent queries along the last
// axis, one per SIMD lane, up to four query rows along the axis before it at a time (they share
// most key rows, and each key load serves every query row that sees its key row); outputs are
// written with non-temporal stores where aligned; keys are packed per row of a dilation group
// with zero padding around it, into per-thread buffers kept between calls. When every thread
// has a (batch, KV head) of its own: one KV head's, its rows packed as the tiles first need them
// into a cache of recent rows that fits in L2 (ring_rows; 2D at the benchmark's sizes), or all
// packed first; else every head's, packed first (about 1.5 to 2.5 times the size of K and V).
// Scalar Arch and 1D use the tile executor.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/attention/block_sparse.hpp"
#include "switchyard/attention/neighborhood_kernels.hpp"
#include "switchyard/attention/neighborhood_rule.hpp"
#include "switchyard/config.hpp"
#include "switchyard/core/simd/cache_info.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// Configuration of NeighborhoodAttention<Rank>: one NeighborhoodAxis per spatial axis
/// (kernel_size, dilation, stride, is_causal), and the scale (default 1/sqrt(D)).
template <int Rank>
struct NeighborhoodConfig {
  std::array<NeighborhoodAxis, Rank> axes{};
  std::optional<double> scale{};
};

namespace neighborhood_detail {

// Geometry of one call: extents, dilation groups and compact (per-group) extents.
template <int Rank>
struct Grid {
  std::array<std::int64_t, Rank> L{}, d{}, C{};  // extents, dilations, compact extents (max group)
  std::int64_t groups = 1, per_group = 1, tokens = 1;

  Grid(std::span<const std::int64_t> ext, const std::array<NeighborhoodAxis, Rank>& axes) {
    for (int a = 0; a < Rank; ++a) {
      L[a] = ext[a];
      d[a] = axes[a].dilation;
      C[a] = (L[a] + d[a] - 1) / d[a];
      groups *= d[a];
      per_group *= C[a];
      tokens *= L[a];
    }
  }
  std::int64_t packed_size() const noexcept { return groups * per_group; }
  // Packed index -> flattened token index, or -1 for padding.
  std::int64_t token(std::int64_t p) const noexcept {
    std::int64_t g = p / per_group, c = p % per_group;
    std::array<std::int64_t, Rank> x{};
    for (int a = Rank - 1; a >= 0; --a) {
      const std::int64_t ca = c % C[a], ga = g % d[a];
      c /= C[a];
      g /= d[a];
      x[a] = ca * d[a] + ga;
      if (x[a] >= L[a]) return -1;
    }
    std::int64_t t = 0;
    for (int a = 0; a < Rank; ++a) t = t * L[a] + x[a];
    return t;
  }
  // Tokens of packed row r (packed indices [r * C_last, (r + 1) * C_last)): one dilation group,
  // the same leading coordinates, so they step by the last axis' dilation until its extent
  // ends (or none, where a leading coordinate is past its extent).
  kernels::NeighborhoodRowTokens row_tokens(std::int64_t r) const noexcept {
    const std::int64_t first = token(r * C[Rank - 1]);
    if (first < 0) return {};
    const std::int64_t g = first % L[Rank - 1];  // its last-axis coordinate: the group's offset
    return {first, d[Rank - 1], (L[Rank - 1] - g + d[Rank - 1] - 1) / d[Rank - 1]};
  }
};

// Development switch: false routes every call to the tile executor.
inline constexpr bool row_kernel_enabled = true;

// Per-thread buffers of the row kernel, reused across calls.
template <class T>
struct RowWorkspace {
  static constexpr int MQ = kernels::detail::na_max_query_rows;
  kernels::detail::aligned_vector<T> qt[MQ], s[MQ], o[MQ], l[MQ], first;
  kernels::detail::aligned_vector<std::int32_t> idx;
  std::vector<std::int64_t> rows[MQ], key0, lo;
  std::vector<kernels::NeighborhoodValueRow<T>> pv;
};
// Which key rows sit in which storage rows (slots) of a row pack used as a cache of rows:
// rows are packed when a tile first needs them, into the least recently used slot. A tile
// touches all of its rows, then claims them, before it reads any: none of its rows is evicted
// under it, nor packed twice.
class RowSlots {
 public:
  /// `rows` key rows cached in `slots` slots (at least the rows of any one tile); all empty.
  void reset(std::int64_t rows, std::int64_t slots) {
    slot_of_.assign(std::size_t(rows), -1);
    row_in_.assign(std::size_t(slots), -1);
    used_.assign(std::size_t(slots), -1);
    now_ = 0;
  }
  /// Starts a tile: the rows claimed from here on stay until the next begin_tile.
  void begin_tile() noexcept { ++now_; }
  /// Marks those of `rows` that are present as used by this tile (no miss evicts them).
  void touch(std::span<const std::int64_t> rows) noexcept {
    for (const std::int64_t r : rows)
      if (const std::int32_t sl = slot_of_[std::size_t(r)]; sl >= 0) used_[std::size_t(sl)] = now_;
  }
  /// Marks `rows` as used by this tile and packs the absent ones with pack_into(slot, row).
  template <class PackInto>
  void claim(std::span<const std::int64_t> rows, PackInto&& pack_into) {
    touch(rows);
    for (const std::int64_t r : rows) {
      if (slot_of_[std::size_t(r)] >= 0) continue;
      const auto victim = std::min_element(used_.begin(), used_.end()) - used_.begin();
      SWITCHYARD_ASSERT(used_[std::size_t(victim)] != now_);  // ring_rows: slots >= tile rows
      if (const std::int64_t old = row_in_[std::size_t(victim)]; old >= 0)
        slot_of_[std::size_t(old)] = -1;
      row_in_[std::size_t(victim)] = r;
      used_[std::size_t(victim)] = now_;
      slot_of_[std::size_t(r)] = std::int32_t(victim);
      pack_into(std::int64_t(victim), r);
    }
  }
  /// The slot of a claimed row (-1: not cached).
  std::int64_t slot(std::int64_t r) const noexcept { return slot_of_[std::size_t(r)]; }

 private:
  std::vector<std::int32_t> slot_of_;        // [rows] slot, or -1
  std::vector<std::int64_t> row_in_, used_;  // [slots] row (-1: empty), tile that last used it
  std::int64_t now_ = 0;
};

template <class T, class Arch>
kernels::NeighborhoodRowPack<T, Arch>& row_pack() {
  static thread_local kernels::NeighborhoodRowPack<T, Arch> pack;
  return pack;
}
inline RowSlots& row_slots() {
  static thread_local RowSlots slots;
  return slots;
}
template <class T, class Arch>
RowWorkspace<T>& row_workspace() {
  static thread_local RowWorkspace<T> ws;
  return ws;
}

}  // namespace neighborhood_detail

/// Neighborhood attention over a Rank-dimensional token grid (see the file comment).
template <int Rank, class T = float, class Arch = simd::default_arch>
class NeighborhoodAttention {
  static_assert(Rank >= 1 && Rank <= 3, "NeighborhoodAttention: 1D, 2D or 3D");

 public:
  using config_type = NeighborhoodConfig<Rank>;
  static constexpr std::string_view name = "NeighborhoodAttention";

  /// Throws config_error for kernel_size, dilation or stride < 1, stride > kernel_size, or a
  /// scale that is not finite and > 0 (sizes against the extents are checked per call).
  explicit NeighborhoodAttention(config_type cfg) : cfg_(cfg) {
    for (int a = 0; a < Rank; ++a) {
      const NeighborhoodAxis& ax = cfg_.axes[std::size_t(a)];
      const std::string arg = "axes[" + std::to_string(a) + "].";
      if (ax.kernel_size < 1)
        switchyard::detail::fail_config(name, name, arg + "kernel_size", ax.kernel_size, ">= 1");
      if (ax.dilation < 1)
        switchyard::detail::fail_config(name, name, arg + "dilation", ax.dilation, ">= 1");
      if (ax.stride < 1 || ax.stride > ax.kernel_size)
        switchyard::detail::fail_config(
            name, name, arg + "stride", ax.stride,
            "1 <= stride <= kernel_size = " + std::to_string(ax.kernel_size));
    }
    if (cfg_.scale && !(std::isfinite(*cfg_.scale) && *cfg_.scale > 0))
      switchyard::detail::fail_config(name, name, "scale", *cfg_.scale, "a finite value > 0");
  }
  const config_type& config() const noexcept { return cfg_; }

  /// (query, key) pairs computed per (batch element, head) over a grid of `extents`
  /// (neighborhood_pairs); with key_lengths ([B]) the sum over the batch of the pairs whose
  /// key token index is below the element's length. Throws as forward for invalid extents.
  std::int64_t pairs(std::array<std::int64_t, Rank> extents,
                     std::span<const std::int64_t> key_lengths = {}) const {
    check_neighborhood_axes(name, "pairs", extents, cfg_.axes);
    if (key_lengths.empty()) return neighborhood_pairs(extents, cfg_.axes);
    std::int64_t tokens = 1;
    for (auto e : extents) tokens *= e;
    // Lengths as forward takes them: each in [0, tokens].
    const Mask<T> lengths{KeyLengths{key_lengths}};
    lengths.validate(name, "pairs", std::int64_t(key_lengths.size()), tokens, tokens);
    std::int64_t total = 0;
    for (const std::int64_t len : key_lengths)
      if (core::add_overflows(total, neighborhood_pairs_below(extents, cfg_.axes, len), total))
        switchyard::detail::fail_config(name, "pairs", "key_lengths",
                                        "[B=" + std::to_string(key_lengths.size()) + "]",
                                        "a batch whose pair count fits int64");
    return total;
  }

  /// extents: the token grid [L], [X, Y] or [X, Y, Z]. q: [B, tokens, H, D] with tokens the
  /// product of the extents - NATTEN's [B, X, Y, (Z,) H, D] layout, row-major, seen as one
  /// token axis (a reshape, no copy); k and v: [B, tokens, H_kv, D] (H_kv dividing H); out:
  /// like q. key_lengths: empty or [B], each in [0, tokens]. Any strides; out must not share
  /// memory with q, k, v. Throws shape_error / config_error naming the argument and shapes
  /// (kernel_size * dilation > extent, ...).
  void forward(std::array<std::int64_t, Rank> extents, ConstView<T, 4> q, ConstView<T, 4> k,
               ConstView<T, 4> v, View<T, 4> out,
               std::span<const std::int64_t> key_lengths = {}) const {
    const std::string_view fn = "forward";
    check_neighborhood_axes(name, fn, extents, cfg_.axes);
    const std::int64_t tokens = core::bounded_product(std::span<const std::int64_t>(extents));
    if (tokens < 0) {
      switchyard::detail::fail_shape(name, fn, "extents", switchyard::detail::format_shape(extents),
                                     "extents whose product fits in memory");
    }
    if (q.extent(1) != tokens) {
      switchyard::detail::fail_shape(
          name, fn, "q", switchyard::detail::format_shape({"B", "tokens", "H", "D"}, q.shape()),
          "[B, tokens=" + std::to_string(tokens) + ", H, D]",
          "tokens = the product of the extents " + switchyard::detail::format_shape(extents));
    }
    const auto a = structured_detail::make_args<T>(name, fn, q, k, v, out, cfg_.scale);
    const neighborhood_detail::Grid<Rank> grid(extents, cfg_.axes);
    const std::int64_t B = a.B, Hkv = a.Hkv, D = a.D;
    if (!key_lengths.empty() || key_lengths.data()) {
      const Mask<T> m{KeyLengths{key_lengths}};
      m.validate(name, fn, B, grid.tokens, grid.tokens);
    }
    if (use_row_kernel(!key_lengths.empty() || key_lengths.data())) {
      const std::int64_t W = kernels::NeighborhoodRowPack<T, Arch>::width(grid.C[Rank - 1]);
      structured_detail::check_pack<T, Arch>(name, fn, a, grid.packed_size() / grid.C[Rank - 1] * W,
                                             W);
      forward_rows(grid, a);
      return;
    }
    const std::int64_t N = grid.packed_size();
    const std::int64_t C_last = grid.C[Rank - 1];
    const std::int64_t NB = C_last <= 1024 ? C_last : 512;
    structured_detail::check_pack<T, Arch>(name, fn, a, N, NB);
    kernels::SparseKeyPack<T, Arch> pack(B * Hkv, N, NB, D);
    kernels::sparse_pack_all<Arch>(
        a, pack, [&](std::int64_t, std::int64_t, std::int64_t p) { return grid.token(p); },
        [&](std::int64_t, std::int64_t) { return N; });

    using Tl = kernels::detail::DenseTiling<T, Arch>;
    const Shape2 shape = choose_tile(grid, Tl::MR, Tl::L);
    // Compact window of every (group, compact coordinate) per axis, looked up by the tiles.
    Tables tables;
    for (int ax = 0; ax < Rank; ++ax) {
      auto& tab = tables[std::size_t(ax)];
      tab.resize(std::size_t(grid.d[ax] * grid.C[ax]));
      for (std::int64_t g = 0; g < grid.d[ax]; ++g)
        for (std::int64_t c = 0; c < grid.C[ax]; ++c)
          if (c * grid.d[ax] + g < grid.L[ax])
            tab[std::size_t(g * grid.C[ax] + c)] = compact_window(grid, ax, g, c);
    }
    // Tiles: per group, per leading compact row (axes before the last two), per b-block of the
    // second-to-last axis, per a-block of the last axis.
    const std::int64_t Cz = grid.C[Rank - 1];
    const std::int64_t Cy = Rank >= 2 ? grid.C[Rank - 2] : 1;
    const std::int64_t tz = num_chunks(Cz, shape.a), ty = num_chunks(Cy, shape.b);
    const std::int64_t lead = grid.per_group / (Cz * Cy);
    const std::int64_t tiles = grid.groups * lead * ty * tz;
    kernels::sparse_attention(
        Arch{}, a, pack, tiles, std::max<std::int64_t>(1, 256 / Tl::MR),
        [&](std::int64_t b, std::int64_t, std::int64_t t, kernels::QueryTile& tile) {
          make_tile(grid, tables, shape, t, tz, ty,
                    key_lengths.empty() ? grid.tokens : key_lengths[b], tile);
        });
  }

  /// As above, returning a new [B, tokens, H, D] tensor.
  core::Tensor<T> forward(std::array<std::int64_t, Rank> extents, ConstView<T, 4> q,
                          ConstView<T, 4> k, ConstView<T, 4> v,
                          std::span<const std::int64_t> key_lengths = {}) const {
    core::Tensor<T> out(q.shape());
    forward(extents, q, k, v, out.template view<4>(), key_lengths);
    return out;
  }

 private:
  // Whether forward runs on the row kernel (neighborhood_kernels.hpp): 2D or 3D, a SIMD Arch,
  // every axis non-causal with stride 1, no key lengths, and a window that fits the tile buffer.
  // Everything else runs on the tile executor (block_sparse.hpp).
  bool use_row_kernel(bool lengths) const noexcept {
    if constexpr (simd::is_scalar_v<Arch> || Rank < 2) {
      return false;
    } else {
      if (!neighborhood_detail::row_kernel_enabled || lengths) return false;
      std::int64_t rows = 1;
      for (int a = 0; a < Rank; ++a) {
        const NeighborhoodAxis& ax = cfg_.axes[std::size_t(a)];
        if (ax.is_causal || ax.stride != 1) return false;
        if (a + 1 < Rank) rows *= ax.kernel_size;
      }
      constexpr std::int64_t L = kernels::detail::Reg<T, Arch>::lanes;
      return rows * (cfg_.axes[Rank - 1].kernel_size + 2 * L) * L <= (std::int64_t(1) << 18);
    }
  }

  // The row kernel over all (b, h): tiles of L adjacent queries along the last axis of one
  // dilation group's row, up to four rows at a time, in a fixed partition (per (b, kv head), or per
  // (b, h, block of tiles)), so results do not depend on the thread count.
  void forward_rows(const neighborhood_detail::Grid<Rank>& grid,
                    const kernels::SparseAttentionArgs<T>& a) const {
    if constexpr (!simd::is_scalar_v<Arch>) {
      using Pack = kernels::NeighborhoodRowPack<T, Arch>;
      constexpr std::int64_t L = Pack::L;
      constexpr T log2e = T(1.44269504088896340736);
      const std::int64_t Cz = grid.C[Rank - 1];
      const std::int64_t NR = grid.packed_size() / Cz, rows_per_group = grid.per_group / Cz;
      const std::int64_t D = a.D;
      const std::int64_t Dp = core::round_up(std::max<std::int64_t>(D, 1), L);
      // Packs (b, kv head) `task` into head `slot` of `pack`.
      const auto pack_head = [&](Pack& pack, std::int64_t slot, std::int64_t task) {
        const std::int64_t b = task / a.Hkv, hk = task % a.Hkv;
        pack.pack(slot, a.k + b * a.k_stride[0] + hk * a.k_stride[2], a.k_stride[1], a.k_stride[3],
                  a.v + b * a.v_stride[0] + hk * a.v_stride[2], a.v_stride[1], a.v_stride[3],
                  [&](std::int64_t r) { return grid.row_tokens(r); });
      };
      // Compact windows of the leading axes.
      std::array<std::vector<AxisWindow>, Rank> tables;
      for (int ax = 0; ax + 1 < Rank; ++ax) {
        auto& tab = tables[std::size_t(ax)];
        tab.resize(std::size_t(grid.d[ax] * grid.C[ax]));
        for (std::int64_t g = 0; g < grid.d[ax]; ++g)
          for (std::int64_t c = 0; c < grid.C[ax]; ++c)
            if (c * grid.d[ax] + g < grid.L[ax])
              tab[std::size_t(g * grid.C[ax] + c)] = compact_window(grid, ax, g, c);
      }
      // Tiles: MQ query rows along the second-to-last axis (they share most key rows), times
      // blocks of L along the last axis.
      constexpr int MQ = kernels::detail::na_query_rows<T, Arch>;
      const std::int64_t Cy = grid.C[Rank - 2], cols = NR / Cy, row_tiles = num_chunks(Cy, MQ);
      const std::int64_t tz = num_chunks(Cz, L), tiles = cols * row_tiles * tz;
      constexpr std::int64_t per = 8;
      const std::int64_t blocks = num_chunks(tiles, per), group = a.H / a.Hkv;
      const std::int64_t kz = cfg_.axes[Rank - 1].kernel_size, left = kz / 2;
      const std::int64_t dz = grid.d[Rank - 1];
      const T qscale = a.scale * log2e;
      // Where tile t is: its dilation group g (coordinates gc), the compact coordinates c of its
      // first query (the last axis's: z0), the group's compact extents lg, its query rows n_q
      // (0: outside the group's grid).
      struct TileAt {
        std::int64_t g = 0, z0 = 0;
        std::array<std::int64_t, Rank> gc{}, c{}, lg{};
        int n_q = 0;
      };
      const auto tile_at = [&](std::int64_t t) {
        TileAt at;
        at.z0 = (t % tz) * L;
        const std::int64_t yt = (t / tz) % row_tiles, col = t / (tz * row_tiles);
        at.g = col / (cols / grid.groups);
        for (std::int64_t ax = Rank - 1, gg = at.g; ax >= 0; --ax) {
          at.gc[std::size_t(ax)] = gg % grid.d[ax];
          gg /= grid.d[ax];
        }
        at.c[Rank - 2] = MQ * yt;
        for (std::int64_t ax = Rank - 3, rest = col % (cols / grid.groups); ax >= 0; --ax) {
          at.c[std::size_t(ax)] = rest % grid.C[ax];
          rest /= grid.C[ax];
        }
        bool valid = true;
        for (int ax = 0; ax < Rank; ++ax) {
          at.lg[std::size_t(ax)] =
              (grid.L[ax] - at.gc[std::size_t(ax)] + grid.d[ax] - 1) / grid.d[ax];
          if (ax + 1 < Rank) valid = valid && at.c[std::size_t(ax)] < at.lg[std::size_t(ax)];
        }
        if (valid && at.z0 < at.lg[Rank - 1])
          at.n_q = int(std::min<std::int64_t>(MQ, at.lg[Rank - 2] - at.c[Rank - 2]));
        return at;
      };
      // Key rows of query row m of a tile: the product of the leading axes' windows, row-major
      // (ascending packed rows).
      const auto key_rows = [&](const TileAt& at, int m, std::vector<std::int64_t>& rows) {
        std::array<std::int64_t, Rank> cm = at.c;
        cm[Rank - 2] += m;
        std::array<AxisWindow, Rank> w{};
        std::int64_t n_rows = 1;
        for (int ax = 0; ax + 1 < Rank; ++ax) {
          w[std::size_t(ax)] =
              tables[std::size_t(ax)]
                    [std::size_t(at.gc[std::size_t(ax)] * grid.C[ax] + cm[std::size_t(ax)])];
          n_rows *= w[std::size_t(ax)].count;
        }
        rows.resize(std::size_t(n_rows));
        for (std::int64_t i = 0; i < n_rows; ++i) {
          std::int64_t row = 0;
          for (std::int64_t ax = 0, rest = i, span = n_rows; ax + 1 < Rank; ++ax) {
            span /= w[std::size_t(ax)].count;
            row = row * grid.C[ax] + w[std::size_t(ax)].start + rest / span;
            rest %= span;
          }
          rows[std::size_t(i)] = at.g * rows_per_group + row;
        }
      };
      // Tiles [t_begin, t_end) of query head (b, h), whose keys are head `head` of `pack`:
      // claim(rows, n_q) makes the key rows of a tile's n_q query rows present, key row r is
      // storage row slot(r).
      const auto run_tiles = [&](const Pack& pack, std::int64_t head, std::int64_t b,
                                 std::int64_t h, std::int64_t t_begin, std::int64_t t_end,
                                 auto&& claim, auto&& slot) {
        auto& ws = neighborhood_detail::row_workspace<T, Arch>();
        for (auto& q : ws.qt) q.resize(std::size_t(std::max<std::int64_t>(1, D) * L));
        for (auto& o : ws.o) o.resize(std::size_t(L * Dp));
        for (auto& l : ws.l) l.resize(std::size_t(L));
        ws.first.resize(std::size_t(L));
        ws.key0.resize(std::size_t(L));
        ws.lo.resize(std::size_t(L));
        ws.idx.resize(std::size_t(kz * L));
        const T* qb = a.q + b * a.q_stride[0] + h * a.q_stride[2];
        T* ob = a.out + b * a.out_stride[0] + h * a.out_stride[2];
        for (std::int64_t t = t_begin; t < t_end; ++t) {
          const TileAt at = tile_at(t);
          const int n_q = at.n_q;
          if (n_q == 0) continue;
          const std::int64_t z0 = at.z0, lgz = at.lg[Rank - 1], nvalid = std::min(L, lgz - z0);
          const auto& gc = at.gc;
          const auto& c = at.c;
          // Lanes: window start along the last axis relative to the lane, and their range.
          std::int64_t rel[L];
          for (std::int64_t j = 0; j < L; ++j) {
            const std::int64_t jj = std::min(j, nvalid - 1);
            rel[j] = std::clamp<std::int64_t>(z0 + jj - left, 0, lgz - kz) - jj;
          }
          const std::int64_t omin = *std::min_element(rel, rel + L);
          const std::int64_t omax = *std::max_element(rel, rel + L);
          // Interior tiles score kernel_size offsets, every lane a real pair. Border tiles
          // (lanes' windows shift differently) score each lane's own window in window order
          // where two-source permutes can gather it from 2L keys (exact), else the union of
          // offsets, masked per lane.
          const std::int64_t start0 = rel[0], spread = (L - 1 + rel[L - 1]) - start0;
          const bool exact = omin != omax && kernels::na_has_exact_border<Arch, T>() &&
                             spread + kz <= 2 * L && start0 + 2 * L <= pack.W - Pack::P;
          const bool masked = omin != omax && !exact;
          const std::int64_t NO = exact ? kz : omax - omin + kz;
          const std::int64_t s_row = kernels::na_score_row_stride<Arch, T>(NO);
          for (std::int64_t j = 0; j < L; ++j) {
            ws.first[std::size_t(j)] = exact ? T(0) : T(rel[j] - omin);
            ws.key0[std::size_t(j)] = exact ? j + rel[j] - start0 : j;
            ws.lo[std::size_t(j)] = exact ? 0 : rel[j] - omin;
          }
          if (exact)
            for (std::int64_t i = 0; i < kz; ++i)
              for (std::int64_t j = 0; j < L; ++j)
                ws.idx[std::size_t(i * L + j)] = std::int32_t(ws.key0[std::size_t(j)] + i);
          const std::int64_t base = exact ? start0 : omin;  // key position of V / K pointers
          std::int64_t tok0[MQ] = {};
          for (int m = 0; m < n_q; ++m) {
            std::array<std::int64_t, Rank> cm = c;
            cm[Rank - 2] += m;
            key_rows(at, m, ws.rows[m]);
            const std::int64_t n_rows = std::int64_t(ws.rows[m].size());
            ws.s[m].resize(std::size_t(n_rows * s_row));
            // q^T of the lanes (zeros past the row's end), pre-scaled.
            std::int64_t tk = 0;
            for (int ax = 0; ax + 1 < Rank; ++ax)
              tk = tk * grid.L[ax] + cm[std::size_t(ax)] * grid.d[ax] + gc[std::size_t(ax)];
            tok0[m] = tk * grid.L[Rank - 1] + z0 * dz + gc[Rank - 1];
            T* qt = ws.qt[m].data();
            {  // the queries of the next tile (same rows, next block; or the next rows)
              const std::int64_t next =
                  z0 + L < lgz ? tok0[m] + L * dz
                               : tok0[m] - z0 * dz + MQ * grid.d[Rank - 2] * grid.L[Rank - 1];
              if (next + (L - 1) * dz < grid.tokens)
                for (std::int64_t j = 0; j < L; ++j)
                  for (std::int64_t d = 0; d < D; d += 64 / std::int64_t(sizeof(T)))
                    __builtin_prefetch(qb + (next + j * dz) * a.q_stride[1] + d * a.q_stride[3]);
            }
            const T* q0 = qb + tok0[m] * a.q_stride[1];
            if (nvalid == L && a.q_stride[3] == 1 &&
                kernels::transpose_rows<T, Arch>(q0, dz * a.q_stride[1], qt, L, D)) {
              const auto sv = xsimd::batch<T, Arch>(qscale);
              for (std::int64_t d = 0; d < D; ++d)
                (xsimd::batch<T, Arch>::load_aligned(qt + d * L) * sv).store_aligned(qt + d * L);
            } else {
              for (std::int64_t j = 0; j < L; ++j) {
                const T* src = q0 + j * dz * a.q_stride[1];
                for (std::int64_t d = 0; d < D; ++d)
                  qt[d * L + j] = j < nvalid ? src[d * a.q_stride[3]] * qscale : T(0);
              }
            }
          }
          claim(ws.rows, n_q);
          // Scores: a key row is scored for every query row that sees it at once (and its V
          // rows serve them all in P . V), in ascending order (each query row's rows ascend).
          std::int64_t next_row[MQ] = {};
          T* s_rows[MQ];
          const T* q_rows[MQ];
          ws.pv.clear();
          for (;;) {
            std::int64_t r = std::numeric_limits<std::int64_t>::max();
            for (int m = 0; m < n_q; ++m)
              if (next_row[m] < std::int64_t(ws.rows[m].size()))
                r = std::min(r, ws.rows[m][std::size_t(next_row[m])]);
            if (r == std::numeric_limits<std::int64_t>::max()) break;
            kernels::NeighborhoodValueRow<T> row;
            const std::int64_t sr = slot(r);
            row.v = pack.v_row(head, sr) + base * Dp;
            for (int m = 0; m < n_q; ++m) {
              const std::int64_t i = next_row[m];
              if (i >= std::int64_t(ws.rows[m].size()) || ws.rows[m][std::size_t(i)] != r) continue;
              row.m[row.nq] = m;
              s_rows[row.nq] = ws.s[m].data() + i * s_row;
              q_rows[row.nq] = ws.qt[m].data();
              row.p[row.nq] = s_rows[row.nq];
              ++row.nq;
              ++next_row[m];
            }
            if constexpr (kernels::na_has_exact_border<Arch, T>()) {
              if (exact)
                kernels::na_score_row_exact(Arch{}, q_rows, row.nq, D, pack.k_row(head, sr) + base,
                                            pack.W, kz, ws.idx.data(), s_rows);
            }
            if (!exact)
              kernels::na_score_row(Arch{}, q_rows, row.nq, D, pack.k_row(head, sr) + base, pack.W,
                                    NO, s_rows);
            ws.pv.push_back(row);
          }
          for (int m = 0; m < n_q; ++m) {
            const kernels::NeighborhoodTile<T> tile{std::int64_t(ws.rows[m].size()), NO, kz,
                                                    ws.first.data(), masked};
            kernels::na_softmax(Arch{}, tile, ws.s[m].data(), ws.l[m].data());
          }
          const kernels::NeighborhoodTile<T> tile{
              0, NO, kz, ws.first.data(), masked, ws.key0.data(), ws.lo.data()};
          T* o_rows[MQ];
          for (int m = 0; m < n_q; ++m) o_rows[m] = ws.o[m].data();
          kernels::na_value(Arch{}, tile, ws.pv.data(), std::int64_t(ws.pv.size()), Dp, o_rows,
                            n_q);
          // Output rows are written whole, once: non-temporal stores skip reading their lines
          // first (finishing a tile waited ~10 % of a 2D 13 x 13 forward on them).
          for (int m = 0; m < n_q; ++m)
            for (std::int64_t j = 0; j < nvalid; ++j)
              kernels::online_softmax_finish_stream(
                  Arch{}, ws.o[m].data() + j * Dp, D, ws.l[m][std::size_t(j)],
                  ob + (tok0[m] + j * dz) * a.out_stride[1], a.out_stride[3]);
        }
        simd::stream_fence();  // before the outputs are handed to another thread
      };
      if (a.B * a.Hkv >= num_threads()) {
        // Enough (b, kv head) pairs for every thread: each runs one's query heads, band of
        // tiles by band (the tiles of one band share their key rows), packing key rows into its
        // own buffer as the tiles first need them, a cache of the last bands' rows, where that
        // fits in L2 (ring_rows); else packing all rows of the head first.
        const std::int64_t slots = ring_rows(grid, MQ, NR, D, Dp);
        parallel_for(a.B * a.Hkv, [&](std::int64_t task) {
          Pack& pack = neighborhood_detail::row_pack<T, Arch>();  // this worker's
          const std::int64_t b = task / a.Hkv, hk = task % a.Hkv;
          if (slots == 0) {  // every row packed first
            pack.reset(1, NR, Cz, D);
            pack_head(pack, 0, task);
            for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h)
              run_tiles(
                  pack, 0, b, h, 0, tiles, [](const std::vector<std::int64_t>*, int) {},
                  [](std::int64_t r) { return r; });
            return;
          }
          neighborhood_detail::RowSlots& cache = neighborhood_detail::row_slots();
          pack.reset(1, slots, Cz, D);
          cache.reset(NR, slots);
          const T* k = a.k + b * a.k_stride[0] + hk * a.k_stride[2];
          const T* v = a.v + b * a.v_stride[0] + hk * a.v_stride[2];
          const auto claim = [&](const std::vector<std::int64_t>* rows, int n_q) {
            cache.begin_tile();
            for (int m = 0; m < n_q; ++m) cache.touch(rows[m]);
            for (int m = 0; m < n_q; ++m)
              cache.claim(rows[m], [&](std::int64_t slot, std::int64_t r) {
                pack.pack_row(0, slot, grid.row_tokens(r), k, a.k_stride[1], a.k_stride[3], v,
                              a.v_stride[1], a.v_stride[3]);
              });
          };
          const auto slot = [&](std::int64_t r) { return cache.slot(r); };
          for (std::int64_t t0 = 0; t0 < tiles; t0 += tz)
            for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h)
              run_tiles(pack, 0, b, h, t0, std::min(tiles, t0 + tz), claim, slot);
        });
      } else {
        // Fewer heads than threads: pack them all, then split every head's tiles into blocks.
        // The caller's buffer, reused across calls (no page faults for a repeated shape).
        Pack& pack = neighborhood_detail::row_pack<T, Arch>();
        pack.reset(a.B * a.Hkv, NR, Cz, D);
        parallel_for(a.B * a.Hkv, [&](std::int64_t task) { pack_head(pack, task, task); });
        parallel_for(a.B * a.H * blocks, [&](std::int64_t task) {
          const std::int64_t blk = task % blocks, bh = task / blocks;
          const std::int64_t b = bh / a.H, h = bh % a.H;
          run_tiles(
              pack, b * a.Hkv + h / group, b, h, blk * per, std::min(tiles, (blk + 1) * per),
              [](const std::vector<std::int64_t>*, int) {}, [](std::int64_t r) { return r; });
        });
      }
    } else {
      (void)grid;
      (void)a;
    }
  }

  // Slots of the row kernel's per-thread cache of packed key rows (rows are packed when a
  // tile first needs them). Bands (the tiles of na_query_rows query rows) run along the
  // second-to-last axis, then along the axis before: one band's rows and the next band's new
  // ones (2D), or kernel_size + 1 planes of rows (3D), keep every row packed once per head. Those
  // slots when they fit in L2 (the packed rows are then read back from L2), else 0: every row
  // packed first (packing as the tiles go would only add misses to theirs).
  std::int64_t ring_rows(const neighborhood_detail::Grid<Rank>& grid, std::int64_t rows_per_tile,
                         std::int64_t rows, std::int64_t D, std::int64_t Dp) const {
    const std::int64_t Cy = grid.C[Rank - 2], ky = cfg_.axes[Rank - 2].kernel_size;
    std::int64_t slots = std::min(ky + rows_per_tile - 1, Cy) + rows_per_tile;
    if constexpr (Rank == 3) slots = (cfg_.axes[0].kernel_size + 1) * Cy;
    const std::int64_t W = kernels::NeighborhoodRowPack<T, Arch>::width(grid.C[Rank - 1]);
    const std::int64_t row_bytes = std::int64_t(sizeof(T)) * W * (D + Dp);
    return slots <= simd::cache_sizes().l2 / row_bytes ? std::min(slots, rows) : 0;
  }

  struct Shape2 {
    std::int64_t a = 1, b = 1;  // queries along the last axis, along the one before
  };
  using Tables = std::array<std::vector<AxisWindow>, Rank>;

  // Window of compact coordinate c of group g along axis ax, in compact coordinates.
  AxisWindow compact_window(const neighborhood_detail::Grid<Rank>& grid, int ax, std::int64_t g,
                            std::int64_t c) const noexcept {
    const AxisWindow w = neighborhood_window(grid.L[ax], c * grid.d[ax] + g, cfg_.axes[ax]);
    return {(w.start - g) / grid.d[ax], w.count};
  }

  // Union length of the windows of `n` consecutive compact queries from c0 along axis ax.
  std::int64_t union_len(const neighborhood_detail::Grid<Rank>& grid, int ax, std::int64_t c0,
                         std::int64_t n) const noexcept {
    const std::int64_t lg = (grid.L[ax] + grid.d[ax] - 1) / grid.d[ax];  // group 0
    std::int64_t lo = std::numeric_limits<std::int64_t>::max(), hi = 0;
    for (std::int64_t c = c0; c < std::min(lg, c0 + n); ++c) {
      const AxisWindow w = compact_window(grid, ax, 0, c);
      lo = std::min(lo, w.start);
      hi = std::max(hi, w.start + w.count);
    }
    return hi > lo ? hi - lo : 0;
  }

  // The tile shape with the fewest key lanes per query at interior positions (aligned tiles,
  // as the executor cuts them): lanes = key rows x registers per run.
  Shape2 choose_tile(const neighborhood_detail::Grid<Rank>& grid, std::int64_t MR,
                     std::int64_t L) const {
    const std::int64_t Cz = grid.C[Rank - 1];
    Shape2 best{std::min(MR, Cz), 1};
    double best_cost = std::numeric_limits<double>::infinity();
    for (std::int64_t b = 1; b <= (Rank >= 2 ? MR : 1); ++b)
      for (std::int64_t a = 1; a * b <= MR; ++a) {
        if (2 * a * b < MR) continue;  // would run row by row
        if (a > Cz || (Rank >= 2 && b > grid.C[Rank - 2])) continue;
        double lanes = 0;
        int samples = 0;
        const std::int64_t zmid = Cz / 2 / a * a;
        const std::int64_t ymid = Rank >= 2 ? grid.C[Rank - 2] / 2 / b * b : 0;
        for (std::int64_t s = 0; s < 4; ++s) {
          const std::int64_t z0 = std::min(zmid + s * a, Cz - a);
          const std::int64_t regs =
              num_chunks(std::max<std::int64_t>(1, union_len(grid, Rank - 1, z0, a)), L);
          std::int64_t rows = 1;
          if (Rank >= 2) {
            const std::int64_t y0 = std::min(ymid + s * b, grid.C[Rank - 2] - b);
            rows = union_len(grid, Rank - 2, y0, b);
          }
          lanes += double(regs * L * rows);
          ++samples;
        }
        const double cost = lanes / samples / double(a * b);
        if (cost < best_cost) {
          best_cost = cost;
          best = {a, b};
        }
      }
    return best;
  }

  // Tile t: rows and runs (see the file comment). len: keys with token index >= len masked.
  void make_tile(const neighborhood_detail::Grid<Rank>& grid, const Tables& tables, Shape2 sh,
                 std::int64_t t, std::int64_t tz, std::int64_t ty, std::int64_t len,
                 kernels::QueryTile& tile) const {
    const std::int64_t Cz = grid.C[Rank - 1];
    const std::int64_t Cy = Rank >= 2 ? grid.C[Rank - 2] : 1;
    const std::int64_t zt = t % tz, yt = (t / tz) % ty, rest = t / (tz * ty);
    const std::int64_t lead_n = grid.per_group / (Cz * Cy);
    const std::int64_t lead = rest % lead_n, g = rest / lead_n;
    // Group coordinates per axis and the leading compact coordinates (3D: axis 0).
    std::array<std::int64_t, Rank> gc{}, lc{};
    {
      std::int64_t gg = g;
      for (int a = Rank - 1; a >= 0; --a) {
        gc[a] = gg % grid.d[a];
        gg /= grid.d[a];
      }
      if (Rank == 3) lc[0] = lead;
    }
    // Valid compact extent of this group per axis.
    std::array<std::int64_t, Rank> lg{};
    for (int a = 0; a < Rank; ++a) lg[a] = (grid.L[a] - gc[a] + grid.d[a] - 1) / grid.d[a];
    if (Rank == 3 && lc[0] >= lg[0]) return;
    // Rows: (yb, za) with compact coords y = yt*b + yb, z = zt*a + za.
    struct RowGeo {
      std::array<AxisWindow, Rank> w;  // compact windows
    };
    std::array<RowGeo, kernels::max_tile_rows> geo{};
    for (std::int64_t yb = 0; yb < sh.b; ++yb)
      for (std::int64_t za = 0; za < sh.a; ++za) {
        std::array<std::int64_t, Rank> c = lc;
        c[Rank - 1] = zt * sh.a + za;
        if (Rank >= 2) c[Rank - 2] = yt * sh.b + yb;
        bool valid = true;
        for (int a = 0; a < Rank; ++a) valid = valid && c[a] < lg[a];
        if (!valid) continue;
        const int r = tile.n_rows++;
        std::int64_t tok = 0;
        for (int a = 0; a < Rank; ++a) tok = tok * grid.L[a] + c[a] * grid.d[a] + gc[a];
        tile.rows[r] = tok;
        for (int a = 0; a < Rank; ++a)
          geo[r].w[a] = tables[std::size_t(a)][std::size_t(gc[a] * grid.C[a] + c[a])];
      }
    if (tile.n_rows == 0) return;
    // Union of the rows' windows per axis.
    std::array<std::int64_t, Rank> ulo{}, uhi{};
    for (int a = 0; a < Rank; ++a) {
      ulo[a] = std::numeric_limits<std::int64_t>::max();
      uhi[a] = 0;
      for (int r = 0; r < tile.n_rows; ++r) {
        ulo[a] = std::min(ulo[a], geo[r].w[a].start);
        uhi[a] = std::max(uhi[a], geo[r].w[a].start + geo[r].w[a].count);
      }
    }
    // One run per key row (compact leading coordinates) of the union.
    std::array<std::int64_t, Rank> kr = ulo;
    while (true) {
      std::int64_t row_base = g;  // packed index of the row's first key
      for (int a = 0; a + 1 < Rank; ++a) row_base = row_base * grid.C[a] + kr[a];
      row_base *= Cz;
      // Key token index of compact z: base_tok + z * dz + gz; masked when >= len.
      std::int64_t base_tok = 0;
      for (int a = 0; a + 1 < Rank; ++a)
        base_tok = base_tok * grid.L[a] + kr[a] * grid.d[a] + gc[a];
      base_tok = base_tok * grid.L[Rank - 1] + gc[Rank - 1];
      const std::int64_t dz = grid.d[Rank - 1];
      const std::int64_t zlim = len > base_tok ? (len - base_tok + dz - 1) / dz : 0;
      kernels::TileRun run;
      run.begin = row_base + ulo[Rank - 1];
      run.end = row_base + std::min(uhi[Rank - 1], zlim);
      bool any = false;
      for (int r = 0; r < tile.n_rows; ++r) {
        bool in = true;
        for (int a = 0; a + 1 < Rank; ++a)
          in = in && kr[a] >= geo[r].w[a].start && kr[a] < geo[r].w[a].start + geo[r].w[a].count;
        const AxisWindow& z = geo[r].w[Rank - 1];
        const std::int64_t e = std::min(z.start + z.count, zlim);
        if (in && z.start < e) {
          run.rows[r] = {row_base + z.start, row_base + e};
          any = true;
        }
      }
      if (any && run.begin < run.end) tile.runs.push_back(run);
      int a = Rank - 2;
      for (; a >= 0; --a) {
        if (++kr[a] < uhi[a]) break;
        kr[a] = ulo[a];
      }
      if (a < 0) break;
    }
  }

  config_type cfg_;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
