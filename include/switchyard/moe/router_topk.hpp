#pragma once
// TopKRouter: token-choice top-k routing, softmax before top-k (Mixtral, OLMoE,
// Qwen-MoE, DeepSeekMoE's routed part).
//
// Semantics, per routed token t with logits x[t, :] ([T, E]):
//   p[t, :] = softmax(x[t, :]) over all E experts (core softmax_row, in T);
//   the k experts with the largest p[t, e], best first; equal probabilities go
//   to the lower expert index (core::topk's order);
//   weight = p[t, e] if renormalize is false (OLMoE / Qwen2-MoE norm_topk_prob=False:
//   the weights sum to less than 1), else p[t, e] / (sum of the k chosen p), no
//   epsilon, the sum taken in T from the best slot to the worst (Mixtral / gpt-fast
//   MOEFeedForward: equal to a softmax over the k largest logits up to rounding).
// No capacity: nothing is dropped (plan.capacity = -1), every routed token gets
// exactly k experts. Masked tokens (TokenMask) get no expert (choice_expert -1,
// weight 0) and count in no statistic or loss. T = 0 or all tokens masked gives
// a valid empty plan with zero losses.
//
// Shared experts (DeepSeekMoE, the `shared_expert_topk` fixture) are a layer
// concern: the MoE layer adds them ungated. This router only sees and routes
// the E routed experts; num_experts counts routed experts only.
//
// Statistics (coefficient 1; T below = routed tokens, n_e = tokens_per_expert,
// P_e = sum_t p[t, e], all in double):
//   stats.aux_loss = Megatron switch_load_balancing_loss = E / (T^2 k) sum_e n_e P_e
//                    (1 for perfectly uniform routing);
//   stats.z_loss   = mean_t logsumexp(x[t])^2 (ST-MoE; equals llm-baselines router_z_loss);
//   stats.entropy  = mean_t of the entropy of p[t, :] in nats;
//   stats.mean_prob[e] = P_e / T; tokens_per_expert = kept_per_expert = n_e.
// The other published variants come from these through moe/losses.hpp (see
// TopKRouter::loss_variants below, which does exactly this):
//   HF load_balancing_loss_func (Mixtral/OLMoE/Qwen, before router_aux_loss_coef)
//     = k * stats.aux_loss = hf_load_balancing_loss(n, P, T, k);
//   llm-baselines load_balancing_loss with plain mean probabilities
//     = fraction_load_balancing_loss(n, P, T) = sum_e (n_e / T)(P_e / T) = aux_loss * k / E;
//   the same with the log-space mean, P_e / T = exp(logsumexp_t log_softmax[t, e] - log T)
//     = fraction_load_balancing_loss(n, T * log_space_mean_prob(logits, mask), T)
//     (identical maths; differs from the plain one only by float rounding in the reference);
//   llm-baselines entropy_reg = sum_e pbar_e log pbar_e, pbar_e = P_e / T
//     = mean_distribution_neg_entropy(P, T) (a NEGATIVE entropy).
// References: pytorch-labs/gpt-fast @ 32971d3 mixtral-moe/model.py MOEFeedForward
// (renormalize = true); epfml/llm-baselines @ c8a5105 src/models/moe.py MoE.forward,
// moe_softmax_order='softmax_topk' (renormalize = false); Megatron-LM
// moe_utils.switch_load_balancing_loss_func, z_loss_func.
//
// Cost: one vectorised softmax pass (core softmax_row, via detail::softmax_scores)
// into a thread-local probability buffer that is reused across calls (T*E values
// per calling thread, kept alive for the thread's lifetime), one top-k pass
// straight into the plan's [T, K] views, and a counting-sort CSR build. The top-k
// for k <= 8 on a SIMD arch runs one token per lane (kernels::topk_lanes in
// core/simd/topk_lanes.hpp: a branch-free sorted register list, L tokens at once
// from a transposed tile);
// k > 8 or the scalar arch use core's row kernels (insertion, selection). Both
// give core::topk's exact order. Token chunks are fixed (detail::router_chunk), so
// plans are bit-identical for any thread count. Measured (1 thread, AVX-512,
// -O2 -march=native): T = 4096, E = 64, k = 8 logits -> plan about 0.9 ms.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/topk_lanes.hpp"
#include "switchyard/core/topk.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/losses.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

struct TopKRouterConfig {
  std::int64_t num_experts = 0;  ///< E routed experts (HF num_local_experts); must be >= 1
  std::int64_t top_k = 2;        ///< K experts per token (HF num_experts_per_tok), 1..E
  /// true: weights = chosen probabilities / their sum (Mixtral); false: raw
  /// probabilities (OLMoE, Qwen2-MoE norm_topk_prob=False).
  bool renormalize = true;
};

/// The published load-balancing / regularisation variants of one top-k routing
/// call (coefficient 1), for comparing with other code bases. See the file comment.
struct TopKLossVariants {
  double megatron = 0;       ///< E/(T^2 k) sum_e n_e P_e (= stats.aux_loss)
  double hf = 0;             ///< k * megatron (HF load_balancing_loss_func)
  double llmb_probs = 0;     ///< llm-baselines sum_e f_e mean_t p[t,e]
  double llmb_logspace = 0;  ///< llm-baselines with the log-space mean probability
  double z_loss = 0;         ///< mean_t lse^2 (= stats.z_loss = llm-baselines router_z_loss)
  double entropy_reg = 0;    ///< llm-baselines entropy_reg: sum_e pbar_e log pbar_e
};

namespace detail {

/// Per-thread buffers of the softmax routers, reused across calls.
template <class T>
struct TopKRouterScratch {
  std::vector<T> probs;
  std::vector<double> prob_sum;
};

template <class T>
TopKRouterScratch<T>& topk_router_scratch() {
  thread_local TopKRouterScratch<T> s;
  return s;
}

/// For each routed row t in [t0, t1) of probs [T, E], the k largest entries best
/// first, ties to the lower index (core::topk's order): calls visit(t, index_of,
/// value_of) with index_of(j) (std::int32_t), value_of(j) for j < k. The lane
/// top-k of core/simd/topk_lanes.hpp (kernels::topk_rows_lanes): SIMD Arch and
/// k <= 8, L rows at a time on a transposed thread-local tile; else core's row kernels.
template <class T, class Arch, class Visit>
void for_each_topk_row(const T* probs, std::int64_t t0, std::int64_t t1, std::int64_t experts,
                       std::int64_t k, const TokenMask& mask, Visit&& visit) {
  kernels::topk_rows_lanes<T, Arch>(
      probs, experts, t0, t1, experts, k, [&](std::int64_t t) { return mask.routed(t); },
      std::forward<Visit>(visit));
}

}  // namespace detail

template <class T = float, class Arch = simd::default_arch>
class TopKRouter {
 public:
  using config_type = TopKRouterConfig;
  static constexpr std::string_view name = "TopKRouter";

  /// Throws config_error (naming TopKRouter and the field) if num_experts < 1 or
  /// top_k is outside 1..num_experts.
  explicit TopKRouter(const TopKRouterConfig& config) : config_(config) {
    detail::check_num_experts(name, config_.num_experts);
    detail::check_top_k(name, config_.top_k, config_.num_experts);
  }

  const TopKRouterConfig& config() const noexcept { return config_; }
  std::int64_t num_experts() const noexcept { return config_.num_experts; }
  std::int64_t top_k() const noexcept { return config_.top_k; }

  /// logits: [T, E] (unit inner stride); mask: empty or [T] (True = routed).
  /// Fills plan (reusing its memory) with K = top_k choices per routed token.
  /// Throws shape_error on a shape/stride/mask-length mismatch, config_error on
  /// a NaN or infinite logit of a routed token.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask = {}) const {
    const std::int64_t experts = config_.num_experts, k = config_.top_k;
    detail::check_logits(name, logits, experts, mask);
    const std::int64_t tokens = logits.extent(0);
    plan.reset(tokens, experts, k);
    auto& scratch = detail::topk_router_scratch<T>();
    detail::softmax_scores<T, Arch>(name, logits, mask, scratch.probs, scratch.prob_sum,
                                    plan.stats);
    const T* probs = scratch.probs.data();
    std::int32_t* choice = plan.choice_expert.data();
    T* weight = plan.choice_weight.data();
    const bool renorm = config_.renormalize;
    parallel_for(num_chunks(tokens, detail::router_chunk), [&](std::int64_t c) {
      const std::int64_t t0 = c * detail::router_chunk;
      detail::for_each_topk_row<T, Arch>(probs, t0, std::min(tokens, t0 + detail::router_chunk),
                                         experts, k, mask,
                                         [&](std::int64_t t, auto&& index_of, auto&& value_of) {
                                           std::int32_t* ce = choice + t * k;
                                           T* cw = weight + t * k;
                                           T s(0);
                                           if (renorm) {
                                             for (std::int64_t j = 0; j < k; ++j) s += value_of(j);
                                           }
                                           for (std::int64_t j = 0; j < k; ++j) {
                                             ce[j] = index_of(j);
                                             cw[j] = renorm ? value_of(j) / s : value_of(j);
                                           }
                                         });
    });
    detail::build_csr_from_choices(plan);
    plan.stats.tokens_per_expert = plan.stats.kept_per_expert;  // dropless: chosen == kept
    plan.stats.aux_loss = switch_load_balancing_loss(plan.stats.tokens_per_expert, scratch.prob_sum,
                                                     plan.stats.routed_tokens, k);
    plan.stats.aux_loss_scaled = plan.stats.aux_loss;
  }

  /// route(logits, plan, mask) that also writes the routing scores [T, E] into `scores`
  /// (softmax(logits), the probabilities top-k chose from; rows of masked tokens 0). Throws
  /// shape_error for a scores buffer that is not [T, E] with unit inner stride or that overlaps
  /// logits, before routing.
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

  /// The published loss variants for `plan`, which route(logits, plan, mask) produced
  /// from these logits and mask (see the file comment for the formulas).
  TopKLossVariants loss_variants(ConstView<T, 2> logits, const DispatchPlan<T>& plan,
                                 const TokenMask& mask = {}) const {
    detail::check_logits(name, logits, config_.num_experts, mask);
    TopKLossVariants v;
    const std::int64_t routed = plan.stats.routed_tokens;
    std::vector<double> prob_sum(plan.stats.mean_prob.size());
    for (std::size_t e = 0; e < prob_sum.size(); ++e)
      prob_sum[e] = plan.stats.mean_prob[e] * static_cast<double>(routed);
    const auto& n = plan.stats.tokens_per_expert;
    v.megatron = plan.stats.aux_loss;
    v.hf = hf_load_balancing_loss(n, prob_sum, routed, config_.top_k);
    v.llmb_probs = fraction_load_balancing_loss(n, prob_sum, routed);
    std::vector<double> log_sum = log_space_mean_prob<T>(logits, mask);
    for (auto& q : log_sum) q *= static_cast<double>(routed);
    v.llmb_logspace = fraction_load_balancing_loss(n, log_sum, routed);
    v.z_loss = plan.stats.z_loss;
    v.entropy_reg = mean_distribution_neg_entropy(prob_sum, routed);
    return v;
  }

 private:
  TopKRouterConfig config_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
