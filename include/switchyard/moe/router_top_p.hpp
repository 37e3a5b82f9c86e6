#pragma once
// TopPRouter: dynamic (top-p) routing, "Harder Tasks Need More Experts: Dynamic
// Routing in MoE Models" (Huang et al., 2024): each token takes as many experts
// as it needs for their probabilities to reach a threshold.
//
// Semantics, per routed token t with logits x[t, :] ([T, E]):
//   p[t, :] = softmax(x[t, :]) over all E experts (as TopKRouter);
//   rank the experts by p descending, equal probabilities to the lower index;
//   c_m = sum of the m best probabilities (in double, best first);
//   m_p = the smallest m >= 1 with c_m >= threshold (E if no prefix reaches it, e.g.
//         threshold = 1 with a rounded sum just below 1). The expert whose
//         probability makes the sum cross the threshold IS included (the paper
//         adds experts until the cumulative probability reaches p);
//   the token takes the m = min(max(m_p, min_experts), max_experts) best experts;
//   weight = p[t, e] (renormalize = false, the paper's default: the weights sum to
//   c_m), or p[t, e] / (sum of the m chosen p, in T, best first) if renormalize.
// plan.top_k = max_experts: row t of the [T, K] views holds the m chosen experts
// best first, then -1 with weight 0. No capacity, nothing dropped. Masked tokens
// get no expert and count nowhere; T = 0 / all masked gives an empty plan.
//
// Statistics (routed tokens only, coefficient 1; T routed tokens, N = sum_t m_t
// assignments, n_e = tokens_per_expert = kept_per_expert, P_e = sum_t p[t, e]):
//   stats.aux_loss = E / (T * N) * sum_e n_e P_e: the Switch / Megatron balance loss
//     E/(T^2 k) sum_e n_e P_e with k = N / T, the mean number of experts per token,
//     so it is 1 for perfectly uniform routing whatever the per-token counts (the
//     paper adds the standard balance loss; with a variable count the fraction of
//     assignments n_e / N is the natural f_e);
//   stats.entropy = mean_t entropy of p[t, :] (nats): the paper's dynamic loss
//     L_d = -sum_e p log p, averaged over tokens, which pushes tokens to fewer experts;
//   stats.z_loss, mean_prob: as TopKRouter. Mean experts per token = nnz() / routed_tokens.
//
// Cost: the softmax pass, then the branch-free lane-parallel top-min(max_experts, 8)
// of TopKRouter; a token whose 8 best do not reach the threshold gets a longer
// ranked prefix: up to 64 experts its whole row ranked by branch-free counting
// (detail::rank_row, O(E^2 / lanes)); above, only the c candidates of a prefix that
// holds the needed mass (entries bucketed by bit-pattern distance to the best one,
// O(E)), ranked by the same counting (O(c^2 / lanes)); the full ranking remains the
// fallback. Thread-local buffers. Bit-identical for any thread count. Measured
// (1 thread, AVX-512, max_experts = E, threshold 0.5, about 42 of 256 experts per
// token): T = 16384, E = 256 41 -> 27 ms; E = 512 127 -> 52 ms.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router.hpp"
#include "switchyard/moe/router_topk.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

namespace detail {

/// TopPRouter ranks a whole row by counting (rank_row) up to this many experts;
/// above, only the candidates of a ranking prefix (prefix_candidates_by_mass).
inline constexpr std::int64_t top_p_rank_by_count_max = 64;

/// The candidates of a ranking prefix of one row p: [n] (entries >= 0, finite; top =
/// p's largest entry) that holds what a threshold count needs: bucketing the entries
/// by the distance of their bit pattern to top's (8 buckets per octave, 8 octaves),
/// the best buckets whose summed mass reaches `mass` with at least `min_count`
/// entries, or holding `max_count` entries. Writes those entries' values and indices
/// to val / idx in index order and returns their number c; every entry >= a
/// cutoff, ties included, so ranking them gives exactly the first c entries of
/// the row's ranking. O(n). Returns 0 if the buckets cannot tell (the needed mass
/// lies more than 8 octaves below top).
template <class T>
std::int64_t prefix_candidates_by_mass(const T* p, std::int64_t n, T top, double mass,
                                       std::int64_t min_count, std::int64_t max_count,
                                       std::vector<T>& val, std::vector<std::int32_t>& idx) {
  using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  constexpr int shift = std::numeric_limits<T>::digits - 1 - 3;  // 8 buckets per octave
  constexpr std::int64_t buckets = 64;                           // the last one: everything below
  const U top_bits = std::bit_cast<U>(top);
  const auto bucket_of = [&](T v) {  // 0 <= v <= top, so the difference does not wrap
    const U d = static_cast<U>(top_bits - std::bit_cast<U>(v)) >> shift;
    return static_cast<std::int64_t>(std::min<U>(d, buckets - 1));
  };
  double bucket_mass[buckets] = {};
  std::int64_t bucket_count[buckets] = {};
  for (std::int64_t e = 0; e < n; ++e) {
    const std::int64_t b = bucket_of(p[e]);
    bucket_mass[b] += static_cast<double>(p[e]);
    ++bucket_count[b];
  }
  std::int64_t cut = -1, count = 0;
  double sum = 0;
  for (std::int64_t b = 0; b < buckets - 1; ++b) {
    sum += bucket_mass[b];
    count += bucket_count[b];
    if ((sum >= mass && count >= min_count) || count >= max_count) {
      cut = b;
      break;
    }
  }
  if (cut < 0) return 0;
  val.resize(static_cast<std::size_t>(count + 1));
  idx.resize(static_cast<std::size_t>(count + 1));
  std::int64_t c = 0;
  for (std::int64_t e = 0; e < n && c < count; ++e) {  // branch-free compaction
    val[c] = p[e];
    idx[c] = static_cast<std::int32_t>(e);
    c += bucket_of(p[e]) <= cut;
  }
  return count;
}

}  // namespace detail

struct TopPRouterConfig {
  std::int64_t num_experts = 0;  ///< E; must be >= 1
  double threshold = 0.4;        ///< p in (0, 1]: cumulative probability to reach
  std::int64_t min_experts = 1;  ///< at least this many experts per token, 1..E
  std::int64_t max_experts = 0;  ///< at most this many, min_experts..E; 0 means E
  bool renormalize = false;      ///< weights = p / sum of the chosen p (else raw p)
};

template <class T = float, class Arch = simd::default_arch>
class TopPRouter {
 public:
  using config_type = TopPRouterConfig;
  static constexpr std::string_view name = "TopPRouter";

  /// Throws config_error (naming TopPRouter and the field) if num_experts < 1,
  /// threshold is not in (0, 1] (NaN included), min_experts is not in 1..E, or
  /// max_experts (after 0 -> E) is not in min_experts..E.
  explicit TopPRouter(const TopPRouterConfig& config) : config_(config) {
    const std::int64_t experts = config_.num_experts;
    detail::check_num_experts(name, experts);
    if (!(config_.threshold > 0 && config_.threshold <= 1)) {
      switchyard::detail::fail_config(name, "config", "threshold", config_.threshold,
                                      "a probability in (0, 1]");
    }
    if (config_.min_experts < 1 || config_.min_experts > experts) {
      switchyard::detail::fail_config(
          name, "config", "min_experts", config_.min_experts,
          "1 <= min_experts <= num_experts = " + std::to_string(experts));
    }
    if (config_.max_experts == 0) config_.max_experts = experts;
    if (config_.max_experts < config_.min_experts || config_.max_experts > experts) {
      switchyard::detail::fail_config(
          name, "config", "max_experts", config_.max_experts,
          "0 (= num_experts) or min_experts = " + std::to_string(config_.min_experts) +
              " <= max_experts <= num_experts = " + std::to_string(experts));
    }
  }

  /// The config in force (max_experts resolved: never 0).
  const TopPRouterConfig& config() const noexcept { return config_; }
  std::int64_t num_experts() const noexcept { return config_.num_experts; }

  /// logits: [T, E] (unit inner stride); mask: empty or [T]. Fills plan with
  /// K = max_experts slots per token (-1 past the token's m experts). Throws
  /// shape_error on a shape/stride/mask-length mismatch, config_error on a NaN
  /// or infinite logit of a routed token.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask = {}) const {
    const std::int64_t experts = config_.num_experts, kmax = config_.max_experts;
    const std::int64_t kmin = config_.min_experts;
    detail::check_logits(name, logits, experts, mask);
    const std::int64_t tokens = logits.extent(0);
    plan.reset(tokens, experts, kmax);
    auto& scratch = detail::topk_router_scratch<T>();
    detail::softmax_scores<T, Arch>(name, logits, mask, scratch.probs, scratch.prob_sum,
                                    plan.stats);
    const T* probs = scratch.probs.data();
    std::int32_t* choice = plan.choice_expert.data();
    T* weight = plan.choice_weight.data();
    const bool renorm = config_.renormalize;
    const double p_thr = config_.threshold;
    const std::int64_t k_fast = std::min<std::int64_t>(kmax, 8);

    // Writes the first m of a ranked row into the plan.
    const auto write = [&](std::int64_t t, std::int64_t m, auto&& index_of, auto&& value_of) {
      std::int32_t* ce = choice + t * kmax;
      T* cw = weight + t * kmax;
      T s(0);
      if (renorm) {
        for (std::int64_t j = 0; j < m; ++j) s += value_of(j);
      }
      for (std::int64_t j = 0; j < m; ++j) {
        ce[j] = index_of(j);
        cw[j] = renorm ? value_of(j) / s : value_of(j);
      }
    };
    // Number of experts taken from a ranked prefix of length `have`, or -1 if more are needed.
    const auto count = [&](std::int64_t have, auto&& value_of) -> std::int64_t {
      double c = 0;
      for (std::int64_t j = 0; j < have; ++j) {
        c += static_cast<double>(value_of(j));
        const std::int64_t m = j + 1;
        if (m >= kmax) return kmax;
        if (m >= kmin && c >= p_thr) return m;
      }
      return -1;  // only when have < kmax (have = kmax always returns above)
    };

    parallel_for(num_chunks(tokens, detail::router_chunk), [&](std::int64_t c) {
      const std::int64_t t0 = c * detail::router_chunk;
      const std::int64_t t1 = std::min(tokens, t0 + detail::router_chunk);
      thread_local std::vector<std::int32_t> rank_idx;
      thread_local std::vector<T> rank_val, rank_buf;
      thread_local std::vector<T> cand_val;
      thread_local std::vector<std::int32_t> cand_idx;
      detail::for_each_topk_row<T, Arch>(
          probs, t0, t1, experts, k_fast, mask,
          [&](std::int64_t t, auto&& index_of, auto&& value_of) {
            const std::int64_t m = count(k_fast, value_of);
            if (m >= 0) {
              write(t, m, index_of, value_of);
              return;
            }
            // Slow path (the 8 best do not reach the threshold). Many experts: rank
            // only the candidates of a ranking prefix holding the needed mass,
            // O(E + c^2 / lanes) for c candidates.
            const T* p = probs + t * experts;
            if (experts > detail::top_p_rank_by_count_max) {
              const std::int64_t c = detail::prefix_candidates_by_mass(
                  p, experts, value_of(0), p_thr, kmin, kmax, cand_val, cand_idx);
              if (c > 0) {
                const std::int64_t have = std::min(kmax, c);
                rank_idx.resize(static_cast<std::size_t>(have));
                rank_val.resize(static_cast<std::size_t>(have));
                detail::rank_row(Arch{}, cand_val.data(), c, have, rank_idx.data(), rank_val.data(),
                                 rank_buf);
                const auto ci = [&](std::int64_t j) { return cand_idx[rank_idx[j]]; };
                const auto cv = [&](std::int64_t j) { return rank_val[j]; };
                const std::int64_t m = count(have, cv);
                if (m >= 0) {  // else (rounding at the threshold): the whole row
                  write(t, m, ci, cv);
                  return;
                }
              }
            }
            // Few experts: rank the whole row by branch-free counting.
            rank_idx.resize(static_cast<std::size_t>(kmax));
            rank_val.resize(static_cast<std::size_t>(kmax));
            detail::rank_row(Arch{}, p, experts, kmax, rank_idx.data(), rank_val.data(), rank_buf);
            const auto ri = [&](std::int64_t j) { return rank_idx[j]; };
            const auto rv = [&](std::int64_t j) { return rank_val[j]; };
            write(t, count(kmax, rv), ri, rv);
          });
    });
    detail::build_csr_from_choices(plan);
    plan.stats.tokens_per_expert = plan.stats.kept_per_expert;
    const std::int64_t routed = plan.stats.routed_tokens, assignments = plan.nnz();
    if (routed > 0 && assignments > 0) {
      double s = 0;
      for (std::int64_t e = 0; e < experts; ++e)
        s += static_cast<double>(plan.stats.tokens_per_expert[e]) * scratch.prob_sum[e];
      plan.stats.aux_loss = static_cast<double>(experts) /
                            (static_cast<double>(routed) * static_cast<double>(assignments)) * s;
      plan.stats.aux_loss_scaled = plan.stats.aux_loss;
    }
  }

  /// route(logits, plan, mask) that also writes the routing scores [T, E] into `scores`
  /// (softmax(logits), the probabilities the nucleus is taken from; rows of masked tokens 0).
  /// Throws shape_error for a scores buffer that is not [T, E] with unit inner stride or that
  /// overlaps logits, before routing.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask,
             View<T, 2> scores) const {
    detail::check_scores_out(name, logits, scores);
    route(logits, plan, mask);
    detail::write_scores<T, Arch>(logits, mask, detail::ScoreKind::softmax, scores);
  }

  /// Allocating convenience: a fresh plan.
  DispatchPlan<T> route(ConstView<T, 2> logits, const TokenMask& mask = {}) const {
    DispatchPlan<T> plan;
    route(logits, plan, mask);
    return plan;
  }

 private:
  TopPRouterConfig config_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
