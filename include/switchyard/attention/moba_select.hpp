#pragma once
// MoBA block selection (Mixture of Block Attention, Lu et al. 2025; MoonshotAI/MoBA
// moba/moba_naive.py) and its VMoBA extensions (Wu et al. 2025, arXiv 2506.23858;
// KwaiVGI/VMoBA src/vmoba.py): the routing half of MoBA. It decides which key blocks each
// (batch, head, query) attends to; an executor then attends over the keys of those blocks.
//
// Blocks. The S keys of a sequence are cut into blocks by a MobaPartition: contiguous runs of
// block_size keys (MoBA; the last block may be shorter), or boxes of a row-major token grid
// [X], [X, Y] or [X, Y, Z] (VMoBA's 1D-2D-3D partitions; edge boxes may be smaller). Blocks are
// numbered row-major over the grid of boxes.
//
// Gate. kmean[n] = mean of the keys of block n (of the query head's KV head, GQA);
// gate[t, n] = q[t] . kmean[n], WITHOUT the softmax scale (moba_naive).
//
// Own block. When queries and keys are the same positions (T == S, self-attention) the own
// block of query t is the block that holds key t; it is always selected (moba_naive sets its
// gate to +inf, VMoBA adds 1e9 in top-k mode and keeps it in threshold mode). When T != S
// (non-causal cross-attention) there is no own block.
//
// Candidates. Non-causal: every other block. Causal (requires T == S): the blocks whose keys
// all lie strictly before the query (last key < t). For contiguous blocks these are exactly
// the blocks before the own block, moba_naive's "-inf for t < (n+1)*chunk". Inside the own
// block the executor applies the usual causal mask (key <= t).
//
// Top-k rule (threshold == 0). The own block takes one of the top_k slots; the rest are the
// highest-gate candidates, ties toward the lower block index. A query with fewer candidates
// than slots takes them all (moba_naive's topk then also picks -inf blocks, which its causal
// mask removes again).
//
// Threshold rule (threshold = tau in (0, 1]), VMoBA "query_head" threshold selection
// (_select_threshold_query_head in src/vmoba.py), per (batch, head, query), over the valid
// blocks V = own block + candidates:
//   norm[n]  = (gate[n] - min_V gate) / (max_V gate - min_V gate)   (min-max normalised raw
//              gate, not a softmax; the denominator is 1 when max - min <= 1e-6)
//   total    = sum_V norm;  share(x) = x / (total + 1e-6)
//   need     = max(0, tau - share(norm[own]))          (norm[own] = 0 without an own block)
//   candidates sorted by gate, descending (ties: lower index); take them in that order until
//   share(sum of the taken norms) >= need. At least one candidate is always taken when there
//   is one (VMoBA's cutoff index starts at 0), and all of them when the share never reaches
//   need (e.g. tau = 1, because of the 1e-6).
// VMoBA sorts all C blocks with the own and invalid ones set to 0, so when the cutoff lands on
// a block of norm 0 (the minimum) it may take an arbitrary zero entry (torch.sort is not
// stable); we take the lowest-index valid candidate of norm 0. Only that corner differs.
// top_k is not used in threshold mode. The threshold applies per (batch, head, query), VMoBA's
// default "query_head" mode; its other modes (block, overall, head_global) pool the gates of
// many queries into one threshold and are a different routing rule, not offered here.
//
// Determinism: results are identical for any thread count (work split per (b, h), fixed).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/attention/attention_tiles.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// MoBA / VMoBA selection parameters (keep the field order: designated initialisers).
struct MobaConfig {
  std::int64_t block_size = 0;  ///< keys per contiguous block (moba_chunk_size); >= 1
  std::int64_t top_k = 0;       ///< blocks per query, own block included (moba_topk)
  double threshold = 0;      ///< 0: top-k rule; in (0, 1]: VMoBA threshold rule (simsum_threshold)
  bool causal = true;        ///< MoBA is causal; VMoBA (video diffusion) is not
  bool return_gate = false;  ///< fill MobaSelection::gate with the raw gate scores
};

/// Keys [begin, begin + count) of the flattened sequence.
struct KeyRun {
  std::int64_t begin = 0;
  std::int64_t count = 0;
};

/// How the S keys, a row-major token grid of `extents` ([X], [X, Y] or [X, Y, Z]), are cut into
/// blocks of shape `block` (same rank; edge blocks are smaller). Blocks are numbered row-major
/// over the grid of blocks. Contiguous MoBA blocks are contiguous(S, block_size). VMoBA's
/// partitions of a video [F, H, W] (process_moba_input in src/vmoba.py): 1D chunk of c frames
/// = block [c, H, W]; 2D chunk (ch, cw) = block [F, ch, cw]; 3D chunk (ct, ch, cw) = block
/// [ct, ch, cw] (VMoBA requires divisibility; here edge blocks may be smaller).
/// Member functions assume a valid partition (moba_select checks it: check_moba_partition).
struct MobaPartition {
  std::vector<std::int64_t> extents;
  std::vector<std::int64_t> block;

  /// S keys in contiguous blocks of block_size (the last one may be shorter).
  static MobaPartition contiguous(std::int64_t num_keys, std::int64_t block_size) {
    return MobaPartition{{num_keys}, {block_size}};
  }

  int rank() const noexcept { return static_cast<int>(extents.size()); }
  /// Blocks along axis a: ceil(extents[a] / block[a]).
  std::int64_t blocks_along(int a) const noexcept {
    return extents[a] / block[a] + (extents[a] % block[a] != 0);  // no overflow for huge blocks
  }
  /// S, the product of the extents.
  std::int64_t num_keys() const noexcept {
    std::int64_t n = 1;
    for (auto e : extents) n *= e;
    return n;
  }
  /// Number of blocks, the product of blocks_along.
  std::int64_t num_blocks() const noexcept {
    std::int64_t n = 1;
    for (int a = 0; a < rank(); ++a) n *= blocks_along(a);
    return n;
  }
  /// The block holding flattened key index `key` (0 <= key < S).
  std::int64_t block_of(std::int64_t key) const noexcept {
    std::int64_t idx = 0, stride = 1;
    for (int a = rank() - 1; a >= 0; --a) {
      const std::int64_t c = key % extents[a];
      key /= extents[a];
      idx += (c / block[a]) * stride;
      stride *= blocks_along(a);
    }
    return idx;
  }
  /// Box of block n along axis a: [lo, hi).
  void block_box(std::int64_t n, int a, std::int64_t& lo, std::int64_t& hi) const noexcept {
    std::int64_t rest = n;
    for (int b = rank() - 1; b > a; --b) rest /= blocks_along(b);
    const std::int64_t c = rest % blocks_along(a);
    lo = c * block[a];
    hi = lo + std::min(block[a], extents[a] - lo);  // lo + block[a] may not be representable
  }
  /// Number of keys in block n.
  std::int64_t block_size(std::int64_t n) const noexcept {
    std::int64_t size = 1;
    for (int a = 0; a < rank(); ++a) {
      std::int64_t lo = 0, hi = 0;
      block_box(n, a, lo, hi);
      size *= hi - lo;
    }
    return size;
  }
  /// Largest flattened key index in block n (its far corner).
  std::int64_t block_last_key(std::int64_t n) const noexcept {
    std::int64_t key = 0;
    for (int a = 0; a < rank(); ++a) {
      std::int64_t lo = 0, hi = 0;
      block_box(n, a, lo, hi);
      key = key * extents[a] + (hi - 1);
    }
    return key;
  }
  /// Replaces `out` with the keys of block n as runs along the last axis, ascending.
  void block_runs(std::int64_t n, std::vector<KeyRun>& out) const {
    out.clear();
    std::int64_t lo[3] = {0, 0, 0}, hi[3] = {1, 1, 1}, ext[3] = {1, 1, 1};
    const int r = rank();
    // Pad to 3 axes on the left so one loop nest serves 1D, 2D and 3D.
    for (int a = 0; a < r; ++a) {
      block_box(n, a, lo[3 - r + a], hi[3 - r + a]);
      ext[3 - r + a] = extents[a];
    }
    for (std::int64_t x = lo[0]; x < hi[0]; ++x)
      for (std::int64_t y = lo[1]; y < hi[1]; ++y)
        out.push_back({(x * ext[1] + y) * ext[2] + lo[2], hi[2] - lo[2]});
  }
};

/// The blocks each (batch, head, query) attends to, CSR by query.
struct MobaSelection {
  std::int64_t batch = 0, heads = 0, queries = 0, num_blocks = 0;
  /// [batch * heads * queries + 1]; the blocks of query t of head h of batch b are
  /// blocks[offsets[i] .. offsets[i + 1]) with i = (b * heads + h) * queries + t.
  std::vector<std::int64_t> offsets;
  /// Selected block indices, ascending per query (the own block included).
  std::vector<std::int32_t> blocks;
  /// Raw gate q . kmean before any masking, [batch, heads, queries, num_blocks] row-major;
  /// filled only when MobaConfig::return_gate, else empty.
  std::vector<float> gate;

  /// Selected blocks of query i = (b * heads + h) * queries + t.
  std::span<const std::int32_t> of(std::int64_t i) const noexcept {
    return {blocks.data() + offsets[i], static_cast<std::size_t>(offsets[i + 1] - offsets[i])};
  }
};

/// Throws unless `part` is a valid partition of S keys: rank 1-3, block of the same rank,
/// every block extent >= 1 (config_error), extents >= 0 whose product is S (shape_error).
inline void check_moba_partition(std::string_view layer, std::string_view fn,
                                 const MobaPartition& part, std::int64_t num_keys) {
  const std::string ext = switchyard::detail::format_shape(part.extents);
  const std::string blk = switchyard::detail::format_shape(part.block);
  if (part.extents.empty() || part.extents.size() > 3 || part.block.size() != part.extents.size()) {
    switchyard::detail::fail_shape(layer, fn, "partition", "extents " + ext + ", block " + blk,
                                   "extents [X], [X, Y] or [X, Y, Z] and a block of the same rank");
  }
  for (std::size_t a = 0; a < part.block.size(); ++a) {
    if (part.block[a] < 1) {
      switchyard::detail::fail_config(layer, fn, "partition.block[" + std::to_string(a) + "]",
                                      part.block[a],
                                      ">= 1 (block " + blk + ", extents " + ext + ")");
    }
  }
  const std::int64_t n = core::bounded_product(std::span<const std::int64_t>(part.extents), 1);
  if (n < 0 || n != num_keys) {
    switchyard::detail::fail_shape(
        layer, fn, "partition", "extents " + ext,
        "extents whose product is the key count S = " + std::to_string(num_keys));
  }
}

/// Throws unless `sel` is a well-formed selection over `num_blocks` blocks: extents >= 0,
/// offsets of batch * heads * queries + 1 entries from 0 to blocks.size(), non-decreasing,
/// block indices in [0, num_blocks) (shape_error / config_error naming `sel`).
inline void check_moba_selection(std::string_view layer, std::string_view fn,
                                 const MobaSelection& sel, std::int64_t num_blocks) {
  const std::int64_t rows = core::bounded_product({sel.batch, sel.heads, sel.queries}, 8);
  if (rows < 0 || sel.num_blocks != num_blocks || std::int64_t(sel.offsets.size()) != rows + 1) {
    const std::int64_t got[4] = {sel.batch, sel.heads, sel.queries, sel.num_blocks};
    switchyard::detail::fail_shape(
        layer, fn, "sel", switchyard::detail::format_shape({"B", "H", "T", "N"}, got),
        "[B, H, T, N=" + std::to_string(num_blocks) + "] with B * H * T + 1 offsets (" +
            std::to_string(sel.offsets.size()) + " given)");
  }
  if (sel.offsets[0] != 0 || sel.offsets.back() != std::int64_t(sel.blocks.size()))
    switchyard::detail::fail_config(
        layer, fn, "sel.offsets", sel.offsets.back(),
        "offsets from 0 to blocks.size() = " + std::to_string(sel.blocks.size()));
  for (std::size_t i = 1; i < sel.offsets.size(); ++i)
    if (sel.offsets[i] < sel.offsets[i - 1])
      switchyard::detail::fail_config(layer, fn, "sel.offsets[" + std::to_string(i) + "]",
                                      sel.offsets[i], "non-decreasing offsets");
  for (std::int64_t i = 0; i < rows; ++i) {
    const auto blocks = sel.of(i);
    for (std::size_t e = 0; e < blocks.size(); ++e)
      if (blocks[e] < 0 || blocks[e] >= num_blocks || (e > 0 && blocks[e - 1] >= blocks[e]))
        switchyard::detail::fail_config(
            layer, fn, "sel.blocks[" + std::to_string(sel.offsets[std::size_t(i)] + e) + "]",
            blocks[e],
            "strictly ascending blocks per query in [0, N=" + std::to_string(num_blocks) +
                ") (query row " + std::to_string(i) + ")");
  }
}

/// Query-keys pairs attended per the selection, summed over batch, heads and queries: the
/// sizes of the selected blocks, except that with `causal` the own block only counts its keys
/// <= t (the other selected blocks of a causal selection lie entirely before t). Throws for a
/// malformed partition (check_moba_partition) or a selection that does not match it.
inline std::int64_t moba_pairs(const MobaSelection& sel, const MobaPartition& part, bool causal) {
  const std::int64_t keys =
      part.extents.empty() || part.block.size() != part.extents.size()
          ? -1
          : core::bounded_product(std::span<const std::int64_t>(part.extents), 1);
  check_moba_partition("MoBA", "moba_pairs", part, keys);
  const std::int64_t nb = part.num_blocks();
  check_moba_selection("MoBA", "moba_pairs", sel, nb);
  const bool has_own = sel.queries == part.num_keys();
  std::vector<KeyRun> runs;
  std::int64_t pairs = 0;
  for (std::int64_t bh = 0; bh < sel.batch * sel.heads; ++bh) {
    for (std::int64_t t = 0; t < sel.queries; ++t) {
      const std::int64_t own = has_own ? part.block_of(t) : -1;
      for (std::int32_t n : sel.of(bh * sel.queries + t)) {
        if (causal && n == own) {
          part.block_runs(n, runs);
          for (const KeyRun& r : runs)
            pairs += std::clamp<std::int64_t>(t - r.begin + 1, 0, r.count);
        } else {
          pairs += part.block_size(n);  // O(rank): no table of every block
        }
      }
    }
  }
  return pairs;
}

namespace moba_detail {

inline constexpr std::string_view layer = "MoBA";
inline constexpr std::string_view fn = "moba_select";

/// Queries whose gates moba_gate_tile computes together.
inline constexpr std::int64_t gate_queries = 4;

// moba_gate_tile's register tile: every query x NV registers of blocks from block n0.
template <class Arch, class T, int NV>
inline void moba_gate_registers(const T* q, std::int64_t D, const T* km, std::int64_t Np,
                                std::int64_t n0, T* gate) noexcept {
  using R = kernels::detail::Reg<T, Arch>;
  constexpr std::int64_t L = R::lanes, Q = gate_queries;
  typename R::V acc[Q][NV];
  for (int i = 0; i < Q; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = R::zero();
  for (std::int64_t d = 0; d < D; ++d) {
    typename R::V kv[NV];
    for (int v = 0; v < NV; ++v) kv[v] = R::load(km + d * Np + n0 + v * L);
    for (int i = 0; i < Q; ++i) {
      const auto qb = R::splat(q[i * D + d]);
      for (int v = 0; v < NV; ++v) acc[i][v] = R::fma(qb, kv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < Q; ++i)
    for (int v = 0; v < NV; ++v) R::store(gate + i * Np + n0 + v * L, acc[i][v]);
}

/// gate[i * Np + n] = sum_d q[i * D + d] * km[d * Np + n] for i < gate_queries, n < Np (km:
/// the block means transposed, rows 64-byte aligned, Np a multiple of 16): register tiles of
/// every query x up to four registers of blocks, each gate summed over d in order with one
/// multiply-add per step (fused where the target has it), so a gate does not depend on which
/// queries share its tile.
template <class T, class Arch = simd::default_arch>
void moba_gate_tile(const T* q, std::int64_t D, const T* km, std::int64_t Np, T* gate) noexcept {
  constexpr std::int64_t L = kernels::detail::Reg<T, Arch>::lanes;
  std::int64_t n0 = 0;
  for (; n0 + 4 * L <= Np; n0 += 4 * L) moba_gate_registers<Arch, T, 4>(q, D, km, Np, n0, gate);
  for (; n0 < Np; n0 += L) moba_gate_registers<Arch, T, 1>(q, D, km, Np, n0, gate);
}

/// NaN sorts below everything, so the order is a strict weak order whatever the data.
inline double order_key(double g) noexcept {
  return std::isnan(g) ? -std::numeric_limits<double>::infinity() : g;
}

/// Picks from `cand` (block indices, ascending) into `chosen` by the rule of the file header;
/// `gate` is the query's raw gate over all N blocks. `cand` is reordered; `keys`: scratch.
inline void select_one(const float* gate, std::int64_t N, std::int64_t own,
                       std::vector<std::int32_t>& cand, const MobaConfig& cfg,
                       std::vector<std::int32_t>& chosen, std::vector<float>& keys) {
  chosen.clear();
  if (own >= 0) chosen.push_back(static_cast<std::int32_t>(own));
  // order_key once per block, as a float (a float's double is exact: the same order).
  keys.resize(static_cast<std::size_t>(N));
  for (std::int64_t n = 0; n < N; ++n) keys[n] = static_cast<float>(order_key(gate[n]));
  auto better = [k = keys.data()](std::int32_t a, std::int32_t b) {
    return k[a] > k[b] || (k[a] == k[b] && a < b);
  };
  if (cfg.threshold == 0) {
    const std::int64_t slots = cfg.top_k - (own >= 0 ? 1 : 0);
    const auto take = static_cast<std::ptrdiff_t>(
        std::clamp<std::int64_t>(slots, 0, static_cast<std::int64_t>(cand.size())));
    // Insertion into a short sorted list: O(blocks * take), no sort of all candidates.
    // Candidates come in ascending index, so an equal gate never displaces an earlier block.
    const std::size_t first = chosen.size();
    for (auto n : cand) {
      if (take == 0) break;
      const std::size_t held = chosen.size() - first;
      if (held == static_cast<std::size_t>(take)) {
        if (!better(n, chosen.back())) continue;
        chosen.back() = n;
      } else {
        chosen.push_back(n);
      }
      for (std::size_t j = chosen.size() - 1; j > first && better(chosen[j], chosen[j - 1]); --j)
        std::swap(chosen[j], chosen[j - 1]);
    }
  } else if (!cand.empty()) {
    double lo = std::numeric_limits<double>::infinity(), hi = -lo;
    auto widen = [&](std::int64_t n) {
      lo = std::min(lo, double(gate[n]));
      hi = std::max(hi, double(gate[n]));
    };
    if (own >= 0) widen(own);
    for (auto n : cand) widen(n);
    double denom = hi - lo;
    if (!(denom > 1e-6)) denom = 1;  // VMoBA: avoid dividing by ~0 (NaN lands here too)
    auto norm = [&](std::int64_t n) { return (double(gate[n]) - lo) / denom; };
    // `cand` is in ascending block order (moba_select builds it so), so the total is summed
    // in one fixed order.
    double total = own >= 0 ? norm(own) : 0.0;
    for (auto n : cand) total += norm(n);
    const double self = own >= 0 ? norm(own) : 0.0;
    const double need = std::max(0.0, cfg.threshold - self / (total + 1e-6));
    std::sort(cand.begin(), cand.end(), better);
    double cum = 0;
    for (auto n : cand) {
      chosen.push_back(n);
      cum += norm(n);
      if (cum / (total + 1e-6) >= need) break;
    }
  }
  std::sort(chosen.begin(), chosen.end());
}

}  // namespace moba_detail

/// MoBA / VMoBA block selection over a general partition (rules in the file header).
/// q: [B, T, H, D]; k: [B, S, Hkv, D] with H % Hkv == 0 (query head h uses KV head
/// h / (H / Hkv)); `part` cuts the S keys into blocks (its extents multiply to S).
/// cfg.block_size is not used here. causal requires T == S. Fills `out` (previous contents
/// replaced): offsets [B*H*T + 1], blocks ascending per query, gate if cfg.return_gate.
/// Throws shape_error (shapes, partition extents, causal with T != S) and config_error
/// (partition block < 1, threshold NaN or outside [0, 1], top_k outside [1, blocks] in top-k
/// mode). An empty batch (B, T or H = 0) gives an empty selection.
template <class T>
void moba_select(ConstView<T, 4> q, ConstView<T, 4> k, const MobaPartition& part,
                 const MobaConfig& cfg, MobaSelection& out) {
  using namespace moba_detail;
  core::detail::check_shape(layer, fn, "q", q, {"B", "T", "H", "D"}, {-1, -1, -1, -1});
  const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
  core::detail::check_shape(layer, fn, "k", k, {"B", "S", "Hkv", "D"}, {B, -1, -1, D},
                            "batch and head dim must match q " +
                                switchyard::detail::format_shape({"B", "T", "H", "D"}, q.shape()));
  const std::int64_t S = k.extent(1), Hkv = k.extent(2);
  if (Hkv < 1 || H % Hkv != 0) {
    switchyard::detail::fail_shape(
        layer, fn, "k", switchyard::detail::format_shape({"B", "S", "Hkv", "D"}, k.shape()),
        "Hkv >= 1 dividing H = " + std::to_string(H),
        "grouped-query attention: each KV head serves H / Hkv query heads");
  }
  check_moba_partition(layer, fn, part, S);
  if (cfg.causal && Tq != S) {
    switchyard::detail::fail_shape(
        layer, fn, "q", switchyard::detail::format_shape({"B", "T", "H", "D"}, q.shape()),
        "T = S = " + std::to_string(S) + " (k " +
            switchyard::detail::format_shape({"B", "S", "Hkv", "D"}, k.shape()) + ")",
        "causal MoBA: queries and keys are the same positions");
  }
  if (std::isnan(cfg.threshold) || cfg.threshold < 0 || cfg.threshold > 1) {
    switchyard::detail::fail_config(layer, fn, "threshold", cfg.threshold,
                                    "0 (top-k rule) or a share in (0, 1] (VMoBA threshold rule)");
  }
  const std::int64_t N = part.num_blocks();
  if (cfg.threshold == 0 && (cfg.top_k < 1 || cfg.top_k > N)) {
    switchyard::detail::fail_config(
        layer, fn, "top_k", cfg.top_k,
        "1 <= top_k <= number of blocks = " + std::to_string(N) + " (k " +
            switchyard::detail::format_shape({"B", "S", "Hkv", "D"}, k.shape()) +
            ", partition extents " + switchyard::detail::format_shape(part.extents) + ", block " +
            switchyard::detail::format_shape(part.block) + ")");
  }
  if (N > std::numeric_limits<std::int32_t>::max()) {
    switchyard::detail::fail_config(layer, fn, "partition", N, "at most 2^31 - 1 blocks");
  }

  // Sizes of the selection and of the block means: errors, not absurd allocations, for extents
  // no tensor could hold (stride-0 views may claim any).
  const std::int64_t rows =
      switchyard::detail::checked_size(layer, fn, "sel.offsets", {B, H, Tq}, sizeof(std::int64_t));
  const std::int64_t Np = core::round_up(N, 16);
  switchyard::detail::checked_size(layer, fn, "block means", {B, Hkv, D, Np}, sizeof(T));
  switchyard::detail::checked_size(layer, fn, "partition", {N}, 64);  // per-block tables
  out.batch = B;
  out.heads = H;
  out.queries = Tq;
  out.num_blocks = N;
  out.offsets.assign(static_cast<std::size_t>(rows + 1), 0);
  out.blocks.clear();
  out.gate.clear();
  if (rows == 0) return;
  if (cfg.return_gate) {
    out.gate.assign(static_cast<std::size_t>(switchyard::detail::checked_size(
                        layer, fn, "gate", {rows, N}, sizeof(float))),
                    0.0f);
  }

  // Block geometry, shared by every (b, h).
  std::vector<std::vector<KeyRun>> runs(static_cast<std::size_t>(N));
  std::vector<std::int64_t> last_key(static_cast<std::size_t>(N));
  for (std::int64_t n = 0; n < N; ++n) {
    part.block_runs(n, runs[n]);
    last_key[n] = part.block_last_key(n);
  }
  const bool has_own = Tq == S;

  // Block means once per (b, KV head), stored transposed [D, Np] (rows padded to 16 elements,
  // so every row is 64-byte aligned for moba_gate_tile's register loads).
  const std::int64_t kv_tasks = B * Hkv;
  kernels::detail::aligned_vector<T> kmean_t(static_cast<std::size_t>(kv_tasks * D * Np), T(0));
  parallel_for(kv_tasks, [&](std::int64_t task) {
    const std::int64_t b = task / Hkv, g = task % Hkv;
    T* dst = kmean_t.data() + task * D * Np;
    std::vector<double> sum(static_cast<std::size_t>(D));
    for (std::int64_t n = 0; n < N; ++n) {
      std::fill(sum.begin(), sum.end(), 0.0);
      std::int64_t count = 0;
      for (const KeyRun& r : runs[n]) {
        for (std::int64_t s = r.begin; s < r.begin + r.count; ++s) {
          const T* kp = k.data() + b * k.stride(0) + s * k.stride(1) + g * k.stride(2);
          for (std::int64_t d = 0; d < D; ++d) sum[d] += double(kp[d * k.stride(3)]);
        }
        count += r.count;
      }
      for (std::int64_t d = 0; d < D; ++d) dst[d * Np + n] = T(sum[d] / double(count));
    }
  });

  // Gate and selection per (b, h): each task keeps its own blocks and per-query counts.
  const std::int64_t tasks = B * H;
  std::vector<std::vector<std::int32_t>> task_blocks(static_cast<std::size_t>(tasks));
  parallel_for(tasks, [&](std::int64_t task) {
    const std::int64_t b = task / H, h = task % H, g = h / (H / Hkv);
    const T* km = kmean_t.data() + (b * Hkv + g) * D * Np;
    // Gates of gate_queries queries at once (moba_gate_tile).
    constexpr std::int64_t lanes = moba_detail::gate_queries;
    kernels::detail::aligned_vector<T> qrow(static_cast<std::size_t>(lanes * D));
    kernels::detail::aligned_vector<T> acc(static_cast<std::size_t>(lanes * Np));
    std::vector<float> gate(static_cast<std::size_t>(N)), keys;
    std::vector<std::int32_t> cand, chosen;
    cand.reserve(static_cast<std::size_t>(N));
    std::vector<std::int32_t>& mine = task_blocks[task];
    // top_k blocks per query under the top-k rule; the threshold rule ignores top_k, so it is
    // no size there. A hint only: capped, the vector grows past it if it must.
    const std::int64_t per_query = cfg.threshold == 0 ? cfg.top_k : 1, cap = 1 << 20;
    mine.reserve(static_cast<std::size_t>(Tq <= cap / per_query ? Tq * per_query : cap));
    const T* qh = q.data() + b * q.stride(0) + h * q.stride(2);
    for (std::int64_t t = 0; t < Tq; ++t) {
      const std::int64_t lane = t % lanes;
      if (lane == 0) {
        std::fill(qrow.begin(), qrow.end(), T(0));  // missing queries of the last group: 0
        for (std::int64_t i = 0; i < lanes && t + i < Tq; ++i) {
          // Pointer arithmetic, not q(b, t, h, 0): valid also when D == 0.
          const T* qp = qh + (t + i) * q.stride(1);
          for (std::int64_t d = 0; d < D; ++d) qrow[i * D + d] = qp[d * q.stride(3)];
          // The next group's rows: one head's rows lie H * D apart, too far for the hardware
          // prefetchers.
          if (t + lanes + i < Tq)
            for (std::int64_t d = 0; d < D; d += 64 / std::int64_t(sizeof(T)))
              __builtin_prefetch(qh + (t + lanes + i) * q.stride(1) + d * q.stride(3));
        }
        moba_detail::moba_gate_tile<T>(qrow.data(), D, km, Np, acc.data());
      }
      for (std::int64_t n = 0; n < N; ++n) gate[n] = static_cast<float>(acc[lane * Np + n]);
      const std::int64_t row_index = task * Tq + t;
      if (cfg.return_gate) {
        std::copy(gate.begin(), gate.begin() + N, out.gate.begin() + row_index * N);
      }
      const std::int64_t own = has_own ? part.block_of(t) : -1;
      cand.clear();
      for (std::int64_t n = 0; n < N; ++n) {
        if (n != own && (!cfg.causal || last_key[n] < t))
          cand.push_back(static_cast<std::int32_t>(n));
      }
      select_one(gate.data(), N, own, cand, cfg, chosen, keys);
      out.offsets[row_index + 1] = static_cast<std::int64_t>(chosen.size());
      mine.insert(mine.end(), chosen.begin(), chosen.end());
    }
  });
  for (std::int64_t i = 0; i < rows; ++i) out.offsets[i + 1] += out.offsets[i];
  out.blocks.resize(static_cast<std::size_t>(out.offsets[rows]));
  parallel_for(tasks, [&](std::int64_t task) {
    std::copy(task_blocks[task].begin(), task_blocks[task].end(),
              out.blocks.begin() + out.offsets[task * Tq]);
  });
}

/// MoBA block selection over contiguous blocks of cfg.block_size keys (moba_naive).
/// q: [B, T, H, D]; k: [B, S, Hkv, D]. As the partition overload, plus config_error when
/// cfg.block_size < 1.
template <class T>
void moba_select(ConstView<T, 4> q, ConstView<T, 4> k, const MobaConfig& cfg, MobaSelection& out) {
  if (cfg.block_size < 1) {
    switchyard::detail::fail_config(
        moba_detail::layer, moba_detail::fn, "block_size", cfg.block_size,
        ">= 1 (k " + switchyard::detail::format_shape({"B", "S", "Hkv", "D"}, k.shape()) + ")");
  }
  moba_select(q, k, MobaPartition::contiguous(k.extent(1), cfg.block_size), cfg, out);
}

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
