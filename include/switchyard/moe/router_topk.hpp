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
// for k <= 8 on a SIMD arch runs one token per lane (detail::topk_lanes: a
// branch-free sorted register list, L tokens at once from a transposed tile);
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

/// Top-K of L rows at once (L = lanes of T on Arch), one row per lane.
/// tile: [n][L] (column e of the L rows at tile + e*L), entries >= 0 and finite
/// (probabilities); 1 <= K <= n. Out: val[j*L + l], idx[j*L + l] = j-th best of
/// row l. Each new entry e (in index order) is pushed down a sorted register list
/// of K by compare-exchange on (value descending, index ascending): core::topk's
/// order, so equal values keep the lower index first. Branch-free: K compare
/// steps and 4 blends per entry, for L rows at once.
template <int K, class Arch, class T>
void topk_lanes(Arch, const T* tile, std::int64_t n, T* val, T* idx) noexcept {
  using B = xsimd::batch<T, Arch>;
  constexpr std::int64_t L = B::size;
  B v[K], vi[K];
  for (int j = 0; j < K; ++j) {
    v[j] = B(T(-1));  // below every probability, so all K slots fill with real entries
    vi[j] = B(T(0));
  }
  for (std::int64_t e = 0; e < n; ++e) {
    B x = B::load_unaligned(tile + e * L);
    B xi(static_cast<T>(e));
    for (int j = 0; j < K; ++j) {
      // x goes ahead if larger, or equal with a lower index (a displaced entry
      // moving down can meet an equal entry of higher index).
      const auto gt = (x > v[j]) | ((x == v[j]) & (xi < vi[j]));
      const B keep_v = xsimd::select(gt, x, v[j]), pass_v = xsimd::select(gt, v[j], x);
      const B keep_i = xsimd::select(gt, xi, vi[j]), pass_i = xsimd::select(gt, vi[j], xi);
      v[j] = keep_v;
      x = pass_v;
      vi[j] = keep_i;
      xi = pass_i;
    }
  }
  for (int j = 0; j < K; ++j) {
    v[j].store_unaligned(val + j * L);
    vi[j].store_unaligned(idx + j * L);
  }
}

template <class Arch, class T>
void topk_lanes(Arch arch, std::int64_t k, const T* tile, std::int64_t n, T* val, T* idx) noexcept {
  switch (k) {
    case 1:
      topk_lanes<1>(arch, tile, n, val, idx);
      break;
    case 2:
      topk_lanes<2>(arch, tile, n, val, idx);
      break;
    case 3:
      topk_lanes<3>(arch, tile, n, val, idx);
      break;
    case 4:
      topk_lanes<4>(arch, tile, n, val, idx);
      break;
    case 5:
      topk_lanes<5>(arch, tile, n, val, idx);
      break;
    case 6:
      topk_lanes<6>(arch, tile, n, val, idx);
      break;
    case 7:
      topk_lanes<7>(arch, tile, n, val, idx);
      break;
    default:
      topk_lanes<8>(arch, tile, n, val, idx);
      break;
  }
}

/// For each routed row t in [t0, t1) of probs [T, E] (entries >= 0, finite), the
/// k largest entries best first, ties to the lower index (core::topk's order):
/// calls visit(t, index_of, value_of) with index_of(j), value_of(j) for j < k.
/// Lanes path (SIMD Arch, k <= 8): L rows at a time through topk_lanes on a
/// transposed tile (thread-local, reused); otherwise the core row kernels.
template <class T, class Arch, class Visit>
void for_each_topk_row(const T* probs, std::int64_t t0, std::int64_t t1, std::int64_t experts,
                       std::int64_t k, const TokenMask& mask, Visit&& visit) {
  constexpr bool lanes_path = !simd::is_scalar_v<Arch>;
  // Index exactly representable in T for the lanes path (always true in practice).
  const bool small_index = experts < (std::int64_t{1} << std::numeric_limits<T>::digits);
  if constexpr (lanes_path) {
    if (k <= 8 && small_index) {
      constexpr std::int64_t L = simd::lanes_v<T, Arch>;
      thread_local std::vector<T> tile_buf;
      tile_buf.resize(static_cast<std::size_t>(experts * L));
      T* tile = tile_buf.data();
      alignas(64) T val[8 * L];
      alignas(64) T idx[8 * L];
      for (std::int64_t t = t0; t < t1; t += L) {
        const std::int64_t rows = std::min<std::int64_t>(L, t1 - t);
        for (std::int64_t l = 0; l < L; ++l) {
          const T* p = probs + (t + l) * experts;
          if (l < rows) {
            for (std::int64_t e = 0; e < experts; ++e) tile[e * L + l] = p[e];
          } else {
            for (std::int64_t e = 0; e < experts; ++e) tile[e * L + l] = T(0);
          }
        }
        topk_lanes(Arch{}, k, tile, experts, val, idx);
        for (std::int64_t l = 0; l < rows; ++l) {
          if (!mask.routed(t + l)) continue;
          visit(
              t + l, [&](std::int64_t j) { return static_cast<std::int32_t>(idx[j * L + l]); },
              [&](std::int64_t j) { return val[j * L + l]; });
        }
      }
      return;
    }
  }
  std::int64_t ix[8];
  T vx[8];
  std::vector<std::int64_t> big_idx;
  std::vector<T> big_val;
  std::vector<std::pair<T, std::int64_t>> select_scratch;
  if (k > 8) {
    big_idx.resize(static_cast<std::size_t>(k));
    big_val.resize(static_cast<std::size_t>(k));
  }
  std::int64_t* ip = k > 8 ? big_idx.data() : ix;
  T* vp = k > 8 ? big_val.data() : vx;
  for (std::int64_t t = t0; t < t1; ++t) {
    if (!mask.routed(t)) continue;
    const T* p = probs + t * experts;
    if (k == 1) {
      kernels::argmax_row(p, experts, ip, vp);
    } else if (k <= 8) {
      kernels::topk_row_insertion(p, experts, k, ip, vp);
    } else {
      kernels::topk_row_select(p, experts, k, ip, vp, select_scratch);
    }
    visit(
        t, [&](std::int64_t j) { return static_cast<std::int32_t>(ip[j]); },
        [&](std::int64_t j) { return vp[j]; });
  }
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
