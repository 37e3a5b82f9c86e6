#pragma once
// PiToMe's energy-based token merging (hchautran/PiToMe, algo/pitome/merge.py: pitome_vision with
// pitome and pitome_bsm; pitome_text's Gaussian energy and split as options), as a router that
// returns a MergePlan, so merge_wavg, merge, unmerge, sizes and the source map work unchanged.
//
// Each mergeable token (all tokens but the class token) gets an energy score from its cosine
// similarities to all mergeable tokens (itself included): the mean of elu(cos - margin, alpha)
// (vision), or of a Gaussian kernel of 1 - cos with sigma = 1 - margin (text). High energy means
// many similar tokens: those are merged, low-energy tokens are protected.
// - default path (pitome): the 2r highest-energy tokens are the candidates, split into sources a
//   and destinations b (vision: alternating, a = order[0:2r:2], b = order[1:2r:2]; text: halves,
//   a = order[:r], b = order[r:2r]); every a merges into its most similar b (several may share
//   one); the other T - 2r tokens are protected. Output rows: [class, protected in energy order,
//   b tokens in b order].
// - bsm path (pitome_bsm): all T tokens split by energy order into A = order[0::2] and
//   B = order[1::2]; ToMe's bipartite soft matching between them (the r A tokens with the best
//   matches merge). Output rows: [class, unmerged A by descending best match, all B in order].
//
// Ties: torch leaves the order of argsort and max ties unspecified. Here ties break toward the
// lower index everywhere (stable sorts, max keeps the first maximum); a NaN score ranks like -inf.
// On data without ties the result is the reference's.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/core/eigen_map.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/tokens/energy_kernels.hpp"
#include "switchyard/tokens/merge_plan.hpp"

namespace switchyard {
inline namespace v0 {
namespace tokens {

/// The energy kernel f(cos) whose mean over all mergeable tokens is a token's energy.
/// elu: PiToMe's vision formula, elu(cos - margin, alpha). gaussian: pitome_text's kernel,
/// exp(-((1 - cos) / sigma)^2 / 2) / (sigma sqrt(2 pi)) with sigma = 1 - margin.
enum class EnergyKernel { elu, gaussian };

/// How the 2r highest-energy tokens split into sources a and destinations b (default path only).
/// alternate: pitome (vision), a = order[0:2r:2], b = order[1:2r:2]. halves: pitome_text,
/// a = order[:r] (the highest energies), b = order[r:2r].
enum class EnergySplit { alternate, halves };

struct EnergyMatchingConfig {
  std::int64_t r = 0;        // merges per batch element; 0 = identity (see energy_merges for ratio)
  double margin = 0.5;       // PiToMe's margin (per layer in its patches, DeiT: 0.75 - 0.75 l / L)
  double alpha = 1.0;        // ELU alpha (kernel elu only)
  bool class_token = false;  // token 0 is a class token: no energy, never merged, kept first
  bool bsm = false;          // pitome_bsm: bipartite matching over all tokens split by energy
  EnergyKernel kernel = EnergyKernel::elu;
  EnergySplit split = EnergySplit::alternate;
};

/// Merges per batch element for PiToMe's `ratio` (tokens kept over tokens mergeable), as the
/// reference computes it: floor(T - T*ratio) with T = N - class_token, and 0 for ratio >= 1.
/// Throws config_error for a ratio that is NaN, infinite or <= 0.
inline std::int64_t energy_merges(std::int64_t num_tokens, double ratio, bool class_token = false) {
  if (!(ratio > 0) || !std::isfinite(ratio)) {
    switchyard::detail::fail_config("PiToMe", "energy_merges", "ratio", ratio,
                                    "a finite ratio > 0 (tokens kept / tokens mergeable)");
  }
  const std::int64_t t = std::max<std::int64_t>(0, num_tokens - std::int64_t(class_token));
  if (ratio >= 1.0) return 0;
  return static_cast<std::int64_t>(std::floor(double(t) - double(t) * ratio));
}

/// The largest r energy_matching accepts for N tokens: T / 2 on the default path (2r candidates
/// among the T = N - class_token mergeable tokens), ceil(T / 2) = |A| with bsm (0 when T < 2: no
/// set B to merge into).
constexpr std::int64_t max_energy_merges(std::int64_t num_tokens,
                                         const EnergyMatchingConfig& cfg) noexcept {
  const std::int64_t t = std::max<std::int64_t>(0, num_tokens - std::int64_t(cfg.class_token));
  if (!cfg.bsm) return t / 2;
  return t < 2 ? 0 : (t + 1) / 2;
}

/// energy_matching_detail's result: the plan and the reference's intermediate tensors. Token
/// indices here count the T mergeable tokens (add 1 for the metric row when there is a class
/// token), as PiToMe's do. With r = 0 the plan is the identity and only energy and order are
/// filled.
template <class T = float>
struct EnergyMatching {
  MergePlan<T> plan;
  std::int64_t num_mergeable = 0;   // T = N - class_token
  core::Tensor<T> energy;           // [B, T] energy score of each mergeable token
  std::vector<std::int64_t> order;  // [B, T] tokens by descending energy (stable)
  std::vector<std::int64_t> a_idx;  // [B, |a|] sources (default: r) or set A (bsm: ceil(T/2))
  std::vector<std::int64_t> b_idx;  // [B, |b|] destinations (default: r) or set B (bsm: T/2)
  std::vector<std::int64_t> protected_idx;  // [B, T - 2r] default path: order[2r:]; empty with bsm
  std::vector<std::int64_t> unm_idx;        // [B, |A| - r] bsm: positions in A kept; else empty
  std::vector<std::int64_t> src_idx;  // [B, r] positions in a_idx that merge (default: 0..r-1)
  std::vector<std::int64_t> dst_idx;  // [B, r] position in b_idx each source merges into
};

namespace detail {

// NaN ranks like -inf, so sorts keep a strict weak order.
template <class T>
T energy_rank_key(T v) noexcept {
  return std::isnan(v) ? -std::numeric_limits<T>::infinity() : v;
}

// Energies, ranking, matching and plan rows of one batch element. metric: [N, C].
template <class T, class Arch>
void energy_match_one(ConstView<T, 2> metric, std::int64_t b, const EnergyMatchingConfig& cfg,
                      EnergyMatching<T>& res, std::vector<T>& normed, std::vector<T>& sim) {
  MergePlan<T>& plan = res.plan;
  const std::int64_t N = metric.extent(0), C = metric.extent(1);
  const std::int64_t off = cfg.class_token && N > 0 ? 1 : 0;
  const std::int64_t tn = N - off, r = plan.r;

  // F.normalize(metric, dim=-1): x / max(||x||, 1e-12).
  normed.resize(std::size_t(tn * C));
  for (std::int64_t t = 0; t < tn; ++t) {
    double ss = 0;
    for (std::int64_t c = 0; c < C; ++c) ss += double(metric(off + t, c)) * metric(off + t, c);
    const T norm = std::max(static_cast<T>(std::sqrt(ss)), static_cast<T>(1e-12));
    for (std::int64_t c = 0; c < C; ++c) normed[t * C + c] = metric(off + t, c) / norm;
  }
  using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const RowMat> m(normed.data(), tn, C);
  sim.resize(std::size_t(tn * tn));
  Eigen::Map<RowMat> s(sim.data(), tn, tn);
  s.noalias() = m * m.transpose();

  // Energy: mean over j of the kernel of sim(i, j), the kernel in T as the reference, the sum in
  // double.
  T* energy = res.energy.data() + b * tn;
  const T margin = static_cast<T>(cfg.margin), alpha = static_cast<T>(cfg.alpha);
  const T sigma = T(1) - margin;
  const double gauss_scale = 1.0 / (double(sigma) * std::sqrt(2.0 * std::numbers::pi));
  for (std::int64_t i = 0; i < tn; ++i) {
    double acc = 0;
    if (cfg.kernel == EnergyKernel::elu) {
      acc = kernels::elu_energy_row_sum(Arch{}, &s(i, 0), tn, margin, alpha);
      energy[i] = static_cast<T>(acc / double(tn));
    } else {
      for (std::int64_t j = 0; j < tn; ++j) {
        const T v = (T(1) - s(i, j)) / sigma;
        acc += std::exp(T(-0.5) * v * v);
      }
      energy[i] = static_cast<T>(acc / double(tn) * gauss_scale);
    }
  }
  // Descending energy; stable, so equal energies keep ascending token index.
  std::int64_t* order = res.order.data() + b * tn;
  std::iota(order, order + tn, std::int64_t(0));
  std::stable_sort(order, order + tn, [&](std::int64_t x, std::int64_t y) {
    return energy_rank_key(energy[x]) > energy_rank_key(energy[y]);
  });
  if (r == 0) return;  // identity plan, filled by the caller

  // Candidates: sources a (set A with bsm) and destinations b (set B).
  const std::int64_t na = cfg.bsm ? (tn + 1) / 2 : r, nb = cfg.bsm ? tn / 2 : r;
  std::int64_t* a = res.a_idx.data() + b * na;
  std::int64_t* bi = res.b_idx.data() + b * nb;
  std::int64_t* src = res.src_idx.data() + b * r;
  std::int64_t* dst = res.dst_idx.data() + b * r;
  // Best destination of a source by sim(source, b): the first maximum, NaN like -inf.
  const auto best_match = [&](std::int64_t t, T& best) {
    best = -std::numeric_limits<T>::infinity();
    std::int64_t arg = 0;
    for (std::int64_t j = 0; j < nb; ++j) {
      const T v = energy_rank_key(s(t, bi[j]));
      if (v > best) best = v, arg = j;
    }
    return arg;
  };
  const std::int64_t* kept = nullptr;  // tokens that keep a row of their own, in output order
  std::int64_t num_kept = 0;
  std::vector<std::int64_t> kept_tokens;
  if (!cfg.bsm) {
    for (std::int64_t i = 0; i < r; ++i) {
      const bool halves = cfg.split == EnergySplit::halves;
      a[i] = halves ? order[i] : order[2 * i];
      bi[i] = halves ? order[r + i] : order[2 * i + 1];
    }
    std::int64_t* prot = res.protected_idx.data() + b * (tn - 2 * r);
    std::copy(order + 2 * r, order + tn, prot);
    T best;
    for (std::int64_t i = 0; i < r; ++i) src[i] = i, dst[i] = best_match(a[i], best);
    kept = prot;
    num_kept = tn - 2 * r;
  } else {
    for (std::int64_t p = 0; p < na; ++p) a[p] = order[2 * p];
    for (std::int64_t q = 0; q < nb; ++q) bi[q] = order[2 * q + 1];
    std::vector<T> node_max(static_cast<std::size_t>(na));
    std::vector<std::int64_t> node_idx(static_cast<std::size_t>(na));
    for (std::int64_t p = 0; p < na; ++p) node_idx[p] = best_match(a[p], node_max[p]);
    std::vector<std::int64_t> edge(static_cast<std::size_t>(na));
    std::iota(edge.begin(), edge.end(), std::int64_t(0));
    std::stable_sort(edge.begin(), edge.end(),
                     [&](std::int64_t x, std::int64_t y) { return node_max[x] > node_max[y]; });
    std::int64_t* unm = res.unm_idx.data() + b * (na - r);
    for (std::int64_t i = 0; i < r; ++i) src[i] = edge[i], dst[i] = node_idx[edge[i]];
    std::copy(edge.begin() + r, edge.end(), unm);  // not re-sorted, as the reference
    kept_tokens.resize(static_cast<std::size_t>(na - r));
    for (std::int64_t q = 0; q < na - r; ++q) kept_tokens[q] = a[unm[q]];
    kept = kept_tokens.data();
    num_kept = na - r;
  }

  // Output rows: [class, kept..., b...]; each b row holds b first, then its sources in src order.
  const std::int64_t M = plan.num_out;
  std::int64_t* dest = plan.dest.data() + b * N;
  std::int64_t* offs = plan.group_offsets.data() + b * (M + 1);
  std::int64_t* mem = plan.group_members.data() + b * N;
  const std::int64_t b_row0 = off + num_kept;
  std::vector<std::int64_t> count(static_cast<std::size_t>(M), 1);
  if (off) dest[0] = 0;
  for (std::int64_t q = 0; q < num_kept; ++q) dest[off + kept[q]] = off + q;
  for (std::int64_t j = 0; j < nb; ++j) dest[off + bi[j]] = b_row0 + j;
  for (std::int64_t i = 0; i < r; ++i) {
    dest[off + a[src[i]]] = b_row0 + dst[i];
    ++count[b_row0 + dst[i]];
  }
  offs[0] = 0;
  for (std::int64_t o = 0; o < M; ++o) offs[o + 1] = offs[o] + count[o];
  std::vector<std::int64_t> fill(offs, offs + M);
  if (off) mem[fill[0]++] = 0;
  for (std::int64_t q = 0; q < num_kept; ++q) mem[fill[off + q]++] = off + kept[q];
  for (std::int64_t j = 0; j < nb; ++j) mem[fill[b_row0 + j]++] = off + bi[j];
  for (std::int64_t i = 0; i < r; ++i) mem[fill[b_row0 + dst[i]]++] = off + a[src[i]];

  // Sizes after merging, summed in the order merge_wavg sums.
  const T* s_in = plan.size_in.data() + b * N;
  T* s_out = plan.size_out.data() + b * M;
  for (std::int64_t o = 0; o < M; ++o) {
    T total = s_in[mem[offs[o]]];
    for (std::int64_t k = offs[o] + 1; k < offs[o + 1]; ++k) total += s_in[mem[k]];
    s_out[o] = total;
  }
}

template <class T, class Arch>
EnergyMatching<T> energy_matching_impl(std::string_view fn, ConstView<T, 3> metric,
                                       const EnergyMatchingConfig& cfg,
                                       std::optional<ConstView<T, 2>> sizes) {
  constexpr std::string_view layer = "PiToMe";
  using switchyard::detail::fail_config;
  const std::int64_t B = metric.extent(0), N = metric.extent(1);
  if (metric.extent(2) < 1)
    core::detail::check_shape(layer, fn, "metric", metric, {"B", "N", "C"}, {-1, -1, 1},
                              "the metric needs at least one channel");
  core::detail::check_shape(layer, fn, "metric", metric, {"B", "N", "C"}, {-1, -1, -1});
  if (!std::isfinite(cfg.margin)) fail_config(layer, fn, "margin", cfg.margin, "a finite margin");
  if (!std::isfinite(cfg.alpha)) fail_config(layer, fn, "alpha", cfg.alpha, "a finite alpha");
  if (cfg.kernel == EnergyKernel::gaussian && !(cfg.margin < 1.0))
    fail_config(layer, fn, "margin", cfg.margin,
                "margin < 1 with the gaussian kernel (its sigma is 1 - margin)");
  if (cfg.bsm && cfg.split != EnergySplit::alternate)
    fail_config(layer, fn, "split", "halves",
                "split = alternate with bsm (pitome_bsm splits all tokens alternately)");
  if (cfg.r < 0) fail_config(layer, fn, "r", cfg.r, "r >= 0");
  const std::int64_t tn = std::max<std::int64_t>(0, N - std::int64_t(cfg.class_token));
  const std::int64_t r_max = max_energy_merges(N, cfg);
  if (cfg.r > r_max) {
    const std::string why =
        cfg.bsm ? "r <= " + std::to_string(r_max) +
                      " = |A|, set A holding ceil(T/2) of the T = " + std::to_string(tn) +
                      " mergeable tokens (with a set B to merge into)"
                : "r <= " + std::to_string(r_max) +
                      " = T/2, 2r merge candidates among the T = " + std::to_string(tn) +
                      " mergeable tokens";
    fail_config(
        layer, fn, "r", cfg.r,
        why + " of metric " + switchyard::detail::format_shape({"B", "N", "C"}, metric.shape()));
  }
  // Buffers sized from the metric (a stride-0 view may claim any extent): the plan's [B, N] index
  // arrays, the per-thread normalised metric [T, C] and similarities [T, T].
  switchyard::detail::checked_size(layer, fn, "metric", {B, N}, sizeof(std::int64_t) * 8);
  switchyard::detail::checked_size(layer, fn, "metric", {N, metric.extent(2)}, sizeof(T));
  switchyard::detail::checked_size(layer, fn, "metric", {N, N}, sizeof(T));

  EnergyMatching<T> res;
  MergePlan<T>& plan = res.plan;
  plan.batch = B;
  plan.num_tokens = N;
  plan.class_token = cfg.class_token;
  plan.tome_indices = false;
  plan.size_in = core::Tensor<T>({B, N});
  if (sizes) {
    core::detail::check_shape(layer, fn, "sizes", *sizes, {"B", "N"}, {B, N},
                              "one size per token of the metric");
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < N; ++i) {
        const T v = (*sizes)(b, i);
        if (!(v > T(0)) || !std::isfinite(v)) {
          fail_config(layer, fn, "sizes",
                      std::to_string(v) + " at [b=" + std::to_string(b) +
                          ", n=" + std::to_string(i) + "] of sizes with shape " +
                          switchyard::detail::format_shape({"B", "N"}, sizes->shape()),
                      "every size finite and > 0");
        }
        plan.size_in(b, i) = v;
      }
  } else {
    plan.size_in.fill(T(1));
  }
  const std::int64_t r = cfg.r;
  plan.r = r;
  plan.num_out = N - r;
  plan.dest.resize(std::size_t(B * N));
  plan.group_offsets.resize(std::size_t(B * (plan.num_out + 1)));
  plan.group_members.resize(std::size_t(B * N));
  plan.size_out = core::Tensor<T>({B, plan.num_out});
  res.num_mergeable = tn;
  res.energy = core::Tensor<T>({B, tn});
  res.order.resize(std::size_t(B * tn));
  if (r > 0) {
    const std::int64_t na = cfg.bsm ? (tn + 1) / 2 : r, nb = cfg.bsm ? tn / 2 : r;
    res.a_idx.resize(std::size_t(B * na));
    res.b_idx.resize(std::size_t(B * nb));
    if (cfg.bsm)
      res.unm_idx.resize(std::size_t(B * (na - r)));
    else
      res.protected_idx.resize(std::size_t(B * (tn - 2 * r)));
    res.src_idx.resize(std::size_t(B * r));
    res.dst_idx.resize(std::size_t(B * r));
  }
  parallel_for(B, [&](std::int64_t b) {
    std::vector<T> normed, sim;
    energy_match_one<T, Arch>(metric[b], b, cfg, res, normed, sim);
  });
  if (r == 0) {  // identity: every token is its own group, sizes unchanged
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t i = 0; i < N; ++i) {
        plan.dest[b * N + i] = i;
        plan.group_members[b * N + i] = i;
        plan.group_offsets[b * (N + 1) + i] = i;
        plan.size_out(b, i) = plan.size_in(b, i);
      }
      plan.group_offsets[b * (N + 1) + N] = N;
    }
    return res;
  }
  // Finite sizes can still sum past the type's range; merge_wavg would then divide by inf.
  for (std::int64_t i = 0; i < plan.size_out.numel(); ++i) {
    if (!std::isfinite(plan.size_out[i])) {
      fail_config(layer, fn, "sizes", "a merged size of inf",
                  "sizes whose merged sums stay finite");
    }
  }
  return res;
}

}  // namespace detail

/// metric: [B, N, C] similarity features (PiToMe: keys averaged over heads, class token row
/// included when cfg.class_token); sizes: [B, N] token sizes > 0, or none for all ones. Returns
/// the MergePlan of PiToMe's energy-based merging with exactly cfg.r merges (N - r output rows),
/// and the reference's energies and index tensors. r = 0 gives the identity plan.
/// Throws config_error for r < 0 or r > max_energy_merges(N, cfg), a margin or alpha that is not
/// finite, margin >= 1 with the gaussian kernel, bsm with split = halves, a size that is <= 0,
/// NaN or inf, or merged sizes that overflow to inf; shape_error for a metric without channels,
/// sizes not [B, N], or a metric too large to index.
template <class T, class Arch = simd::default_arch>
EnergyMatching<T> energy_matching_detail(ConstView<T, 3> metric, const EnergyMatchingConfig& cfg,
                                         std::optional<ConstView<T, 2>> sizes = std::nullopt) {
  return detail::energy_matching_impl<T, Arch>("energy_matching_detail", metric, cfg, sizes);
}

/// metric: [B, N, C]; sizes: [B, N] or none. The MergePlan of energy_matching_detail (same
/// rules, same errors) without the intermediate tensors.
template <class T, class Arch = simd::default_arch>
MergePlan<T> energy_matching(ConstView<T, 3> metric, const EnergyMatchingConfig& cfg,
                             std::optional<ConstView<T, 2>> sizes = std::nullopt) {
  return std::move(
      detail::energy_matching_impl<T, Arch>("energy_matching", metric, cfg, sizes).plan);
}

}  // namespace tokens
}  // namespace v0
}  // namespace switchyard
