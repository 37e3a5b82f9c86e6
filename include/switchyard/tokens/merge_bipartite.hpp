#pragma once
// ToMe's bipartite soft matching (facebookresearch/ToMe, tome/merge.py), as a router that returns
// a MergePlan. Tokens alternate into set A (0, 2, 4, ...) and set B (1, 3, 5, ...); each A token
// finds its most similar B token by cosine similarity of the metric; the r A tokens with the best
// matches merge into their B partners. The class token (index 0, in A) and the distill token
// (index 1, in B) are never merged away.
//
// Ties: torch leaves the order of argsort and max ties unspecified. Here ties break toward the
// lower index everywhere (max keeps the first maximum, the ranking is a stable sort); a NaN score
// ranks like -inf. On data without ties the result is the reference's.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/core/eigen_map.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/tokens/merge_plan.hpp"

namespace switchyard {
inline namespace v0 {
namespace tokens {

struct BipartiteMatchingConfig {
  std::int64_t r = 0;          // tokens to remove per batch element; clamped to (N - protected) / 2
  bool class_token = false;    // token 0 is a class token: never merged, kept first
  bool distill_token = false;  // token 1 is a distillation token: never a merge destination
};

/// The r the reference actually uses: min(r, (N - protected) / 2), and 0 if that is negative.
constexpr std::int64_t effective_merges(std::int64_t num_tokens,
                                        const BipartiteMatchingConfig& cfg) noexcept {
  const std::int64_t protected_tokens = std::int64_t(cfg.class_token) + cfg.distill_token;
  const std::int64_t limit = (num_tokens - protected_tokens) / 2;
  return std::max<std::int64_t>(0, std::min(cfg.r, limit));
}

namespace detail {

// Ranks one batch element's A tokens and fills its part of the plan.
template <class T>
void match_one(ConstView<T, 2> metric, std::int64_t b, const BipartiteMatchingConfig& cfg,
               MergePlan<T>& plan, std::vector<T>& normed, std::vector<T>& scores) {
  const std::int64_t N = metric.extent(0), C = metric.extent(1);
  const std::int64_t num_a = (N + 1) / 2, num_b = N / 2, r = plan.r;
  const std::int64_t num_unm = num_a - r;

  // metric / ||metric|| with no epsilon, as the reference.
  normed.resize(std::size_t(N * C));
  for (std::int64_t i = 0; i < N; ++i) {
    T ss = 0;
    for (std::int64_t c = 0; c < C; ++c) ss += metric(i, c) * metric(i, c);
    const T norm = std::sqrt(ss);
    for (std::int64_t c = 0; c < C; ++c) normed[i * C + c] = metric(i, c) / norm;
  }
  using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Strided = Eigen::Map<const RowMat, Eigen::Unaligned, Eigen::OuterStride<>>;
  const Strided a(normed.data(), num_a, C, Eigen::OuterStride<>(2 * C));
  const Strided bm(normed.data() + C, num_b, C, Eigen::OuterStride<>(2 * C));
  scores.resize(std::size_t(num_a * num_b));
  Eigen::Map<RowMat> s(scores.data(), num_a, num_b);
  s.noalias() = a * bm.transpose();

  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  if (cfg.class_token)
    for (std::int64_t j = 0; j < num_b; ++j) s(0, j) = neg_inf;
  if (cfg.distill_token)
    for (std::int64_t i = 0; i < num_a; ++i) s(i, 0) = neg_inf;

  // Best B match of each A token: first maximum wins (lower index on ties).
  std::vector<T> node_max(static_cast<std::size_t>(num_a));
  std::vector<std::int64_t> node_idx(static_cast<std::size_t>(num_a));
  for (std::int64_t i = 0; i < num_a; ++i) {
    T best = s(i, 0);
    std::int64_t arg = 0;
    for (std::int64_t j = 1; j < num_b; ++j)
      if (s(i, j) > best) best = s(i, j), arg = j;
    node_max[i] = std::isnan(best) ? neg_inf : best;
    node_idx[i] = arg;
  }
  // Descending by best score; stable, so equal scores keep ascending A index.
  std::vector<std::int64_t> edge(static_cast<std::size_t>(num_a));
  std::iota(edge.begin(), edge.end(), 0);
  std::stable_sort(edge.begin(), edge.end(),
                   [&](std::int64_t x, std::int64_t y) { return node_max[x] > node_max[y]; });
  std::int64_t* src = plan.src_idx.data() + b * r;
  std::int64_t* dst = plan.dst_idx.data() + b * r;
  std::int64_t* unm = plan.unm_idx.data() + b * num_unm;
  for (std::int64_t i = 0; i < r; ++i) src[i] = edge[i], dst[i] = node_idx[edge[i]];
  std::copy(edge.begin() + r, edge.end(), unm);
  if (cfg.class_token) std::sort(unm, unm + num_unm);  // keeps the class token first

  // Output rows: [unm..., B...], or [unm[0], B[0], unm[1:], B[1:]] with a distill token.
  auto unm_row = [&](std::int64_t p) { return cfg.distill_token && p > 0 ? p + 1 : p; };
  auto b_row = [&](std::int64_t j) {
    if (!cfg.distill_token) return num_unm + j;
    return j == 0 ? std::int64_t(1) : num_unm + j;
  };
  const std::int64_t M = plan.num_out;
  std::int64_t* dest = plan.dest.data() + b * N;
  std::int64_t* off = plan.group_offsets.data() + b * (M + 1);
  std::int64_t* mem = plan.group_members.data() + b * N;
  std::vector<std::int64_t> count(static_cast<std::size_t>(M), 1);  // every row holds its own token
  for (std::int64_t p = 0; p < num_unm; ++p) dest[2 * unm[p]] = unm_row(p);
  for (std::int64_t j = 0; j < num_b; ++j) dest[2 * j + 1] = b_row(j);
  for (std::int64_t i = 0; i < r; ++i) {
    dest[2 * src[i]] = b_row(dst[i]);
    ++count[b_row(dst[i])];
  }
  off[0] = 0;
  for (std::int64_t o = 0; o < M; ++o) off[o + 1] = off[o] + count[o];
  std::vector<std::int64_t> fill(off, off + M);
  for (std::int64_t p = 0; p < num_unm; ++p) mem[fill[unm_row(p)]++] = 2 * unm[p];
  for (std::int64_t j = 0; j < num_b; ++j) mem[fill[b_row(j)]++] = 2 * j + 1;
  for (std::int64_t i = 0; i < r; ++i) mem[fill[b_row(dst[i])]++] = 2 * src[i];  // src order

  // Sizes after merging, summed in the same order merge_wavg sums.
  const T* s_in = plan.size_in.data() + b * N;
  T* s_out = plan.size_out.data() + b * M;
  for (std::int64_t o = 0; o < M; ++o) {
    T total = s_in[mem[off[o]]];
    for (std::int64_t k = off[o] + 1; k < off[o + 1]; ++k) total += s_in[mem[k]];
    s_out[o] = total;
  }
}

}  // namespace detail

/// metric: [B, N, C] similarity features (ToMe: keys averaged over heads); sizes: [B, N] token
/// sizes > 0, or none for all ones. Returns the MergePlan of ToMe's bipartite soft matching with
/// r clamped to min(r, (N - protected) / 2); r = 0 after clamping gives the identity plan.
/// Throws config_error for r < 0, a size that is <= 0, NaN or inf, or merged sizes that
/// overflow to inf; shape_error for sizes not [B, N] or a metric too large to index.
template <class T>
MergePlan<T> bipartite_soft_matching(ConstView<T, 3> metric, const BipartiteMatchingConfig& cfg,
                                     std::optional<ConstView<T, 2>> sizes = std::nullopt) {
  constexpr std::string_view layer = "ToMe", fn = "bipartite_soft_matching";
  if (cfg.r < 0) switchyard::detail::fail_config(layer, fn, "r", cfg.r, "r >= 0");
  const std::int64_t B = metric.extent(0), N = metric.extent(1);
  if (metric.extent(2) < 1)
    core::detail::check_shape(layer, fn, "metric", metric, {"B", "N", "C"}, {-1, -1, 1},
                              "the metric needs at least one channel");
  core::detail::check_shape(layer, fn, "metric", metric, {"B", "N", "C"}, {-1, -1, -1});
  // Buffers sized from the metric (a stride-0 view may claim any extent): the plan's [B, N]
  // index arrays, the per-thread normalised metric [N, C] and the [N/2, N/2] scores.
  switchyard::detail::checked_size(layer, fn, "metric", {B, N}, sizeof(std::int64_t) * 3);
  switchyard::detail::checked_size(layer, fn, "metric", {N, metric.extent(2)}, sizeof(T));
  switchyard::detail::checked_size(layer, fn, "metric", {(N + 1) / 2, N / 2}, sizeof(T));
  MergePlan<T> plan;
  plan.batch = B;
  plan.num_tokens = N;
  plan.class_token = cfg.class_token;
  plan.distill_token = cfg.distill_token;
  plan.size_in = core::Tensor<T>({B, N});
  if (sizes) {
    core::detail::check_shape(layer, fn, "sizes", *sizes, {"B", "N"}, {B, N},
                              "one size per token of the metric");
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < N; ++i) {
        const T v = (*sizes)(b, i);
        if (!(v > T(0)) || !std::isfinite(v)) {
          switchyard::detail::fail_config(
              layer, fn, "sizes",
              std::to_string(v) + " at [b=" + std::to_string(b) + ", n=" + std::to_string(i) +
                  "] of sizes with shape " +
                  switchyard::detail::format_shape({"B", "N"}, sizes->shape()),
              "every size finite and > 0");
        }
        plan.size_in(b, i) = v;
      }
  } else {
    plan.size_in.fill(T(1));
  }
  plan.r = effective_merges(N, cfg);
  plan.num_out = N - plan.r;
  plan.dest.resize(std::size_t(B * N));
  plan.group_offsets.resize(std::size_t(B * (plan.num_out + 1)));
  plan.group_members.resize(std::size_t(B * N));
  plan.size_out = core::Tensor<T>({B, plan.num_out});
  if (plan.r == 0) {  // identity: every token is its own group, sizes unchanged
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t i = 0; i < N; ++i) {
        plan.dest[b * N + i] = i;
        plan.group_members[b * N + i] = i;
        plan.group_offsets[b * (N + 1) + i] = i;
        plan.size_out(b, i) = plan.size_in(b, i);
      }
      plan.group_offsets[b * (N + 1) + N] = N;
    }
    return plan;
  }
  const std::int64_t num_a = (N + 1) / 2;
  plan.unm_idx.resize(std::size_t(B * (num_a - plan.r)));
  plan.src_idx.resize(std::size_t(B * plan.r));
  plan.dst_idx.resize(std::size_t(B * plan.r));
  parallel_for(B, [&](std::int64_t b) {
    std::vector<T> normed, scores;
    detail::match_one<T>(metric[b], b, cfg, plan, normed, scores);
  });
  // Finite sizes can still sum past the type's range; merge_wavg would then divide by inf.
  for (std::int64_t i = 0; i < plan.size_out.numel(); ++i) {
    if (!std::isfinite(plan.size_out[i])) {
      switchyard::detail::fail_config(layer, fn, "sizes", "a merged size of inf",
                                      "sizes whose merged sums stay finite");
    }
  }
  return plan;
}

/// metric: [B, N, C]; shorthand for bipartite_soft_matching(metric, {r, class_token,
/// distill_token}, sizes).
template <class T>
MergePlan<T> bipartite_soft_matching(ConstView<T, 3> metric, std::int64_t r,
                                     bool class_token = false, bool distill_token = false,
                                     std::optional<ConstView<T, 2>> sizes = std::nullopt) {
  return bipartite_soft_matching<T>(metric, BipartiteMatchingConfig{r, class_token, distill_token},
                                    sizes);
}

}  // namespace tokens
}  // namespace v0
}  // namespace switchyard
