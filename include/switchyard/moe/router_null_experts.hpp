#pragma once
// NullExpertRouter: top-k routing over E real experts plus N null experts (AdaMoE,
// Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with Null Experts for
// Mixture-of-Experts Language Models"). A null expert is an empty operation: a token
// that picks it spends no compute there, so the number of real experts per token
// adapts (0..k) while the router stays a plain top-k.
//
// Semantics, per routed token t with logits x[t, :] of width E + N (router outputs
// 0..E-1 are the real experts, E..E+N-1 the null ones):
//   p[t, :] = softmax(x[t, :]) over all E + N outputs;
//   the k largest p, best first, ties toward the lower index (core::topk's order);
//   gate = p / (sum of the k chosen p, nulls included) when renormalize (the paper,
//   on Mixtral's top-k), else p. So the real experts' gates of a token sum to less
//   than one whenever it picked a null expert.
// Plan: num_experts = E (only real experts; the CSR never names a null one), top_k = k;
// a token's [T, K] views list its real choices best first, then -1 / weight 0 (one
// per null pick). plan.mean_experts_per_token() is the mean number of real experts per
// routed token; null_choices(plan) the number of null picks.
// Statistics (routed tokens, coefficient 1, arrays of length E for the real experts):
//   tokens_per_expert = kept_per_expert = n_e, mean_prob[e] = mean_t p[t, e];
//   z_loss = mean_t logsumexp(x[t])^2 and entropy of p over all E + N outputs;
//   aux_loss = AdaMoE's balance loss: the Switch / Megatron loss over all E + N outputs,
//     (E + N) / (T^2 k) * sum_i n_i P_i, with the null experts' n_i and P_i each replaced
//     by their mean over the N null experts (the paper's rule: null experts are
//     interchangeable, so the loss should not push tokens from one to another).
//     This follows the paper's text; no reference code is among the fixtures.
// Masked tokens get nothing and count in nothing. No capacity: nothing is dropped.
// Errors: config_error (naming NullExpertRouter) for num_experts < 1, null_experts < 0,
// top_k outside 1..E+N, E + N past int32; shape_error for logits not [T, E + N] or a
// mask not [T]; config_error for a NaN or infinite logit of a routed token.
#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
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

struct NullExpertRouterConfig {
  std::int64_t num_experts = 0;   ///< E real experts; >= 1
  std::int64_t null_experts = 0;  ///< N null experts (router width E + N); >= 0
  std::int64_t top_k = 2;         ///< k choices per token over all E + N; 1..E+N
  bool renormalize = true;        ///< gates = p / (sum of the k chosen p, nulls included)
};

template <class T = float, class Arch = simd::default_arch>
class NullExpertRouter {
 public:
  using config_type = NullExpertRouterConfig;
  static constexpr std::string_view name = "NullExpertRouter";

  /// Throws config_error (naming NullExpertRouter and the field): see the file comment.
  explicit NullExpertRouter(const config_type& config) : cfg_(config) {
    detail::check_num_experts(name, cfg_.num_experts);
    if (cfg_.null_experts < 0 || cfg_.null_experts > max_plan_extent - cfg_.num_experts) {
      switchyard::detail::fail_config(name, "config", "null_experts", cfg_.null_experts,
                                      ">= 0, with num_experts + null_experts <= 2^31 - 1");
    }
    if (cfg_.top_k < 1 || cfg_.top_k > router_width()) {
      switchyard::detail::fail_config(
          name, "config", "top_k", cfg_.top_k,
          "1 <= top_k <= num_experts + null_experts = " + std::to_string(router_width()));
    }
  }

  const config_type& config() const noexcept { return cfg_; }
  /// Real experts: the plan's E.
  std::int64_t num_experts() const noexcept { return cfg_.num_experts; }
  std::int64_t top_k() const noexcept { return cfg_.top_k; }
  /// Width of the logits: E + N.
  std::int64_t router_width() const noexcept { return cfg_.num_experts + cfg_.null_experts; }

  /// logits: [T, E + N] (unit inner stride); mask: empty or [T]. Fills plan with the
  /// real experts of each token's top-k (see the file comment).
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask = {}) const {
    const std::int64_t E = cfg_.num_experts, W = router_width(), k = cfg_.top_k;
    detail::check_logits(name, logits, W, mask);
    const std::int64_t tokens = logits.extent(0);
    plan.reset(tokens, E, k);
    auto& scratch = detail::topk_router_scratch<T>();
    RouterStats all;  // softmax statistics over all E + N outputs
    detail::softmax_scores<T, Arch>(name, logits, mask, scratch.probs, scratch.prob_sum, all);
    const T* probs = scratch.probs.data();
    const bool renorm = cfg_.renormalize;
    std::int32_t* choice = plan.choice_expert.data();
    T* weight = plan.choice_weight.data();
    parallel_for(num_chunks(tokens, detail::router_chunk), [&](std::int64_t c) {
      const std::int64_t t0 = c * detail::router_chunk;
      detail::for_each_topk_row<T, Arch>(
          probs, t0, std::min(tokens, t0 + detail::router_chunk), W, k, mask,
          [&](std::int64_t t, auto&& index_of, auto&& value_of) {
            T s(0);
            if (renorm) {
              for (std::int64_t j = 0; j < k; ++j) s += value_of(j);
            }
            std::int32_t* ce = choice + t * k;
            T* cw = weight + t * k;
            std::int64_t real = 0;
            for (std::int64_t j = 0; j < k; ++j) {
              const std::int32_t e = index_of(j);
              if (e >= E) continue;  // a null expert: no compute, no plan entry
              ce[real] = e;
              cw[real++] = renorm ? value_of(j) / s : value_of(j);
            }
          });
    });
    detail::build_csr_from_choices(plan);
    auto& st = plan.stats;
    st.tokens_per_expert = st.kept_per_expert;
    st.routed_tokens = all.routed_tokens;
    st.z_loss = all.z_loss;
    st.entropy = all.entropy;
    std::copy_n(all.mean_prob.begin(), E, st.mean_prob.begin());
    // A token whose k picks were all null experts has no expert (output 0); the CSR
    // builder takes a row without choices for a masked one, so count them here.
    st.tokens_without_expert = 0;
    for (std::int64_t t = 0; t < tokens; ++t)
      st.tokens_without_expert += mask.routed(t) && choice[t * k] < 0;
    st.aux_loss = st.aux_loss_scaled = balance_loss(plan, scratch.prob_sum);
  }

  /// route(logits, plan, mask) that also writes the routing probabilities softmax(logits)
  /// [T, E + N] (rows of masked tokens 0) into `scores`. Throws shape_error for a scores
  /// buffer that is not [T, E + N] with unit inner stride or that overlaps logits.
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

  /// Null picks in a plan this router made: routed tokens * k - real choices.
  static std::int64_t null_choices(const DispatchPlan<T>& plan) noexcept {
    return plan.stats.routed_tokens * plan.top_k - plan.nnz();
  }

 private:
  // AdaMoE's loss (file comment): the null experts' counts and probability sums enter
  // as their mean, N times. prob_sum holds sum_t p[t, i] for all E + N outputs.
  double balance_loss(const DispatchPlan<T>& plan, const std::vector<double>& prob_sum) const {
    const std::int64_t E = cfg_.num_experts, N = cfg_.null_experts, k = cfg_.top_k;
    const double routed = static_cast<double>(plan.stats.routed_tokens);
    if (routed <= 0) return 0;
    double s = 0;
    for (std::int64_t e = 0; e < E; ++e)
      s += static_cast<double>(plan.stats.tokens_per_expert[e]) * prob_sum[e];
    if (N > 0) {
      const double null_count = static_cast<double>(null_choices(plan)) / static_cast<double>(N);
      double null_prob = 0;
      for (std::int64_t i = E; i < E + N; ++i) null_prob += prob_sum[i];
      null_prob /= static_cast<double>(N);
      s += static_cast<double>(N) * null_count * null_prob;
    }
    return static_cast<double>(E + N) / (routed * routed * static_cast<double>(k)) * s;
  }

  config_type cfg_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
