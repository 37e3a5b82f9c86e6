#pragma once
// Naive references in double for structured sparse attention (neighbourhood attention, MoBA),
// written from the fixtures README's rules and the papers, NOT from the library's headers, so
// that comparing the two can fail: masked softmax attention over any visibility predicate,
// the keys a neighbourhood query sees by brute force over all keys, and MoBA / VMoBA block
// selection by brute force.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "switchyard/attention/neighborhood_rule.hpp"  // NeighborhoodAxis (plain parameters only)
#include "switchyard/core/view.hpp"

namespace test_support {

/// softmax(scale * q k^T over the visible keys) v in double, per (b, h, t).
/// q: [B, T, H, D], k: [B, S, Hkv, D], v: [B, S, Hkv, Dv], H % Hkv == 0 (query head h reads KV
/// head h / (H / Hkv)). visible(b, h, t, s) -> bool. Returns [B, T, H, Dv] row-major; a row
/// with no visible key is all zeros. When lse is given it receives [B, T, H] natural-log
/// log-sum-exp of the scaled visible logits (-inf for an empty row).
template <class Visible>
std::vector<double> ref_masked_attention(switchyard::ConstView<float, 4> q,
                                         switchyard::ConstView<float, 4> k,
                                         switchyard::ConstView<float, 4> v, double scale,
                                         Visible&& visible, std::vector<double>* lse = nullptr) {
  const std::int64_t B = q.extent(0), T = q.extent(1), H = q.extent(2), D = q.extent(3);
  const std::int64_t S = k.extent(1), Hkv = k.extent(2), Dv = v.extent(3);
  const std::int64_t group = H / Hkv;
  std::vector<double> out(static_cast<std::size_t>(B * T * H * Dv), 0.0);
  if (lse)
    lse->assign(static_cast<std::size_t>(B * T * H), -std::numeric_limits<double>::infinity());
  std::vector<double> logit(static_cast<std::size_t>(S));
  std::vector<char> seen(static_cast<std::size_t>(S));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < H; ++h) {
        const std::int64_t g = h / group;
        double mx = -std::numeric_limits<double>::infinity();
        for (std::int64_t s = 0; s < S; ++s) {
          seen[s] = visible(b, h, t, s) ? 1 : 0;
          if (!seen[s]) continue;
          double dot = 0;
          for (std::int64_t d = 0; d < D; ++d) dot += double(q(b, t, h, d)) * double(k(b, s, g, d));
          logit[s] = scale * dot;
          mx = std::max(mx, logit[s]);
        }
        if (mx == -std::numeric_limits<double>::infinity()) continue;
        double sum = 0;
        double* o = out.data() + ((b * T + t) * H + h) * Dv;
        for (std::int64_t s = 0; s < S; ++s) {
          if (!seen[s]) continue;
          const double p = std::exp(logit[s] - mx);
          sum += p;
          for (std::int64_t d = 0; d < Dv; ++d) o[d] += p * double(v(b, s, g, d));
        }
        for (std::int64_t d = 0; d < Dv; ++d) o[d] /= sum;
        if (lse) (*lse)[(b * T + t) * H + h] = mx + std::log(sum);
      }
  return out;
}

/// Does query position qi see key position kj along one axis of length L? Written from the
/// fixtures README ("Neighborhood attention (NATTEN semantics)"): same dilation group
/// (index mod d), compacted coordinates i = qi / d over the group's length; non-causal window
/// start = max(i-left, 0) + (i+right >= Lg) * (Lg - right - i - 1), keys [start, start + k);
/// causal: i - (k-1) <= j <= i. Stride (GNA, NATTEN's single_dim_tiling_mask): the window is
/// the one of the tile's leader (non-causal: centre query s*floor(i/s) + floor(s/2); causal: last
/// query s*floor(i/s) + s - 1; both clipped to the group's last position), and causally the
/// query still never sees a key after itself.
inline bool ref_axis_visible(std::int64_t L, const switchyard::attention::NeighborhoodAxis& a,
                             std::int64_t qi, std::int64_t kj) {
  const std::int64_t d = a.dilation, k = a.kernel_size, s = a.stride;
  if (qi % d != kj % d) return false;
  std::int64_t lg = 0;  // group length, counted rather than computed
  for (std::int64_t x = 0; x < L; ++x) lg += (x % d == qi % d) ? 1 : 0;
  const std::int64_t i = qi / d, j = kj / d;
  std::int64_t tile_start = i;
  while (tile_start % s != 0) --tile_start;
  if (a.is_causal) {
    std::int64_t leader = tile_start + s - 1;
    if (leader > lg - 1) leader = lg - 1;
    return j <= i && j >= leader - (k - 1);
  }
  std::int64_t leader = tile_start + s / 2;
  if (leader > lg - 1) leader = lg - 1;
  const std::int64_t left = k / 2, right = k / 2 + (k % 2) - 1;
  const std::int64_t start = std::max<std::int64_t>(leader - left, 0) +
                             (leader + right >= lg ? lg - right - leader - 1 : 0);
  return start <= j && j < start + k;
}

/// Flattened (row-major) key ids that token `query` of a grid of `extents` sees, ascending, by
/// testing every key of the grid axis by axis (the neighbourhood is the product of the
/// per-axis windows).
inline std::vector<std::int64_t> neighborhood_reference_keys(
    std::span<const std::int64_t> extents,
    std::span<const switchyard::attention::NeighborhoodAxis> axes, std::int64_t query) {
  std::int64_t n = 1;
  for (auto e : extents) n *= e;
  std::vector<std::int64_t> keys;
  for (std::int64_t key = 0; key < n; ++key) {
    bool ok = true;
    std::int64_t qr = query, kr = key;
    for (std::size_t a = extents.size(); a-- > 0;) {
      ok = ok && ref_axis_visible(extents[a], axes[a], qr % extents[a], kr % extents[a]);
      qr /= extents[a];
      kr /= extents[a];
    }
    if (ok) keys.push_back(key);
  }
  return keys;
}

/// Block id of flattened key `key` when a row-major grid of `extents` is cut into boxes of
/// `block` (boxes numbered row-major over the grid of boxes).
inline std::int64_t ref_block_id(std::span<const std::int64_t> extents,
                                 std::span<const std::int64_t> block, std::int64_t key) {
  std::vector<std::int64_t> coord(extents.size());
  for (std::size_t a = extents.size(); a-- > 0;) {
    coord[a] = key % extents[a];
    key /= extents[a];
  }
  std::int64_t id = 0;
  for (std::size_t a = 0; a < extents.size(); ++a) {
    const std::int64_t nb = (extents[a] + block[a] - 1) / block[a];
    id = id * nb + coord[a] / block[a];
  }
  return id;
}

/// One query's reference MoBA selection.
struct RefMobaQuery {
  std::vector<std::int32_t> blocks;  ///< ascending
  std::vector<double> gate;          ///< raw gate per block
  /// Smallest distance of any comparison that decided the selection (gate order at the
  /// cut, or cumulative share vs need); a float implementation may disagree below ~1e-5.
  double margin = std::numeric_limits<double>::infinity();
};

/// MoBA / VMoBA block selection by brute force, in double. q: [B, T, H, D], k: [B, S, Hkv, D];
/// blocks: boxes `block` of the key grid `extents` (1D contiguous: extents {S}, block {bs}).
/// Rules (MoonshotAI/MoBA moba_naive.py; VMoBA src/vmoba.py _select_threshold_query_head):
/// kmean = mean key of the block; gate = q . kmean; own block = block of key t when T == S,
/// always kept; candidates = the other blocks, and when causal only those whose every key is
/// < t; threshold == 0: the best top_k - (own ? 1 : 0) candidates by gate (ties: lower index);
/// threshold > 0: min-max normalise the gate over own + candidates, then take candidates in
/// gate order, at least one, until (own + taken) / (total + 1e-6) >= threshold.
/// Returns one entry per (b, h, t) at index (b * H + h) * T + t.
inline std::vector<RefMobaQuery> moba_reference_select(switchyard::ConstView<float, 4> q,
                                                       switchyard::ConstView<float, 4> k,
                                                       std::span<const std::int64_t> extents,
                                                       std::span<const std::int64_t> block,
                                                       std::int64_t top_k, double threshold,
                                                       bool causal) {
  const std::int64_t B = q.extent(0), T = q.extent(1), H = q.extent(2), D = q.extent(3);
  const std::int64_t S = k.extent(1), Hkv = k.extent(2);
  std::vector<std::int64_t> key_block(static_cast<std::size_t>(S));
  std::int64_t N = 0;
  for (std::int64_t s = 0; s < S; ++s) {
    key_block[s] = ref_block_id(extents, block, s);
    N = std::max(N, key_block[s] + 1);
  }
  std::vector<RefMobaQuery> result(static_cast<std::size_t>(B * H * T));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t g = h / (H / Hkv);
      std::vector<double> mean(static_cast<std::size_t>(N * D), 0.0);
      std::vector<double> count(static_cast<std::size_t>(N), 0.0);
      for (std::int64_t s = 0; s < S; ++s) {
        count[key_block[s]] += 1;
        for (std::int64_t d = 0; d < D; ++d) mean[key_block[s] * D + d] += k(b, s, g, d);
      }
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t d = 0; d < D; ++d) mean[n * D + d] /= count[n];
      for (std::int64_t t = 0; t < T; ++t) {
        RefMobaQuery& r = result[(b * H + h) * T + t];
        r.gate.assign(static_cast<std::size_t>(N), 0.0);
        for (std::int64_t n = 0; n < N; ++n)
          for (std::int64_t d = 0; d < D; ++d) r.gate[n] += double(q(b, t, h, d)) * mean[n * D + d];
        const std::int64_t own = T == S ? key_block[t] : -1;
        std::vector<std::int32_t> cand;
        for (std::int64_t n = 0; n < N; ++n) {
          if (n == own) continue;
          bool past = true;
          for (std::int64_t s = 0; s < S; ++s) past = past && (key_block[s] != n || s < t);
          if (!causal || past) cand.push_back(static_cast<std::int32_t>(n));
        }
        std::stable_sort(cand.begin(), cand.end(),
                         [&](std::int32_t x, std::int32_t y) { return r.gate[x] > r.gate[y]; });
        std::size_t take = 0;
        if (threshold == 0) {
          const std::int64_t slots = top_k - (own >= 0 ? 1 : 0);
          take = static_cast<std::size_t>(
              std::clamp<std::int64_t>(slots, 0, std::int64_t(cand.size())));
          if (take > 0 && take < cand.size())
            r.margin = r.gate[cand[take - 1]] - r.gate[cand[take]];
        } else if (!cand.empty()) {
          double lo = own >= 0 ? r.gate[own] : r.gate[cand[0]], hi = lo;
          for (auto n : cand) {
            lo = std::min(lo, r.gate[n]);
            hi = std::max(hi, r.gate[n]);
          }
          const double denom = hi - lo > 1e-6 ? hi - lo : 1.0;
          const double self = own >= 0 ? (r.gate[own] - lo) / denom : 0.0;
          double total = self;
          for (auto n : cand) total += (r.gate[n] - lo) / denom;
          // Smallest m >= 1 with (self + first m) / (total + eps) >= threshold, else all.
          double cum = self;
          take = cand.size();
          for (std::size_t m = 1; m <= cand.size(); ++m) {
            cum += (r.gate[cand[m - 1]] - lo) / denom;
            const double gap = cum / (total + 1e-6) - threshold;
            if (self / (total + 1e-6) < threshold) r.margin = std::min(r.margin, std::abs(gap));
            if (m + 1 <= cand.size())
              r.margin = std::min(r.margin, r.gate[cand[m - 1]] - r.gate[cand[m]]);
            if (gap >= 0) {
              take = m;
              break;
            }
          }
        }
        if (own >= 0) r.blocks.push_back(static_cast<std::int32_t>(own));
        r.blocks.insert(r.blocks.end(), cand.begin(),
                        cand.begin() + static_cast<std::ptrdiff_t>(take));
        std::sort(r.blocks.begin(), r.blocks.end());
      }
    }
  return result;
}

}  // namespace test_support
