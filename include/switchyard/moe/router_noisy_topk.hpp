#pragma once
// Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks")
// as implemented in davidmrau/mixture-of-experts @ f662999, moe.py:
// MoE.noisy_top_k_gating, MoE.forward (loss), cv_squared, _prob_in_top_k.
//
// Weights (NoisyTopKWeights): w_gate and w_noise are [d, E], the reference's
// [in, out] layout (clean_logits = x @ w_gate, no transpose, no bias), NOT the
// nn.Linear [out, in] layout of router_logits(). A transposed [E, d] weight is
// rejected with shape_error (unless d == E, where the shapes cannot tell).
//
// Gating, per routed token t (the reference's order):
//   eval:  logits = clean = x @ w_gate.
//   train: stddev = softplus(x @ w_noise) + noise_epsilon (softplus as torch:
//          x above 20 passes through, else log1p(exp(x))); noisy = clean + noise * stddev;
//          logits = noisy. The standard-normal noise is either given by the caller
//          (NoisyTopKNoise::normal, [T, E], e.g. a recorded torch.randn_like) or
//          drawn from the library's counter-based generator: noise[t, e] =
//          core::Rng(seed, stream).normal<T>(offset + t * E + e), i.e. exactly
//          core::fill_normal([T, E] view, seed, stream, offset). Draws depend only on
//          the position, so masking a token does not change the others' noise; use a
//          new stream (e.g. the step number) or offset for each training step.
//          With noisy_gating = false train mode is eval mode.
//   p = softmax(logits) over all E experts (BEFORE top-k); the k largest p, best
//   first, ties toward the lower expert index, are the chosen experts;
//   gate = p / (sum of the k chosen p + 1e-6) (so gates sum to slightly below 1).
//   plan.top_k = k; no capacity, nothing dropped; tokens_per_expert = kept = k per token
//   split by expert. (A chosen p that underflows to 0 stays in the plan with gate 0;
//   the reference's dispatcher would skip it, and `load` below does not count it.)
// Balance loss (plan.stats.aux_loss with coefficient 1, like every router; the reference
// returns it times loss_coef, which is plan.stats.aux_loss_scaled and details.loss):
//   importance[e] = sum_t gate[t, e];
//   load[e] = eval (or k == E, or noisy_gating off): number of tokens with gate > 0;
//             train: the reference's smooth estimate sum_t Phi((clean[t,e] - thr) / stddev[t,e]),
//             with top = the k+1 largest SOFTMAXED noisy values of the token, thr_in = top[k]
//             (the (k+1)-th), thr_out = top[k-1] (the k-th), and thr = thr_in if the
//             noisy LOGIT > thr_in, else thr_out. This mixes probability and logit scales:
//             a quirk of the reference, reproduced on purpose. Phi is the standard normal CDF.
//   cv2(v) = unbiased variance(v) / (mean(v)^2 + 1e-10), 0 when E == 1;
//   aux_loss = cv2(importance) + cv2(load); aux_loss_scaled = aux_loss * loss_coef.
//   NoisyTopKDetails (optional output) exposes importance, load, both cv2, the loss,
//   and the intermediate [T, E] arrays (clean logits, stddev, noise, noisy logits, p).
// Other stats (routed tokens): mean_prob = mean p, z_loss = mean lse(logits)^2 and
// entropy = mean entropy of p, all over the logits actually routed on (clean in
// eval, noisy in train); routed_tokens; dropped = tokens_without_expert = 0.
// Masked tokens are never routed and left out of importance, load, losses and stats.
// T = 0 gives an empty plan and zero losses.
// route(logits, plan, mask) is the LogitsRouter form: eval mode on precomputed clean
// logits (so the router runs in the shared benchmarks); details then leave
// clean_logits empty (the input is the clean logits).
// Errors: config_error naming "NoisyTopKRouter" for num_experts < 1, top_k outside
// [1, E], noise_epsilon < 0 or not finite, loss_coef < 0 or not finite, a NaN or
// +inf logit or a row of only -inf (clean, or noisy in train); shape_error for x,
// w_gate, w_noise, noise, logits and mask shapes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/rng.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/topk.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/losses.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router.hpp"
#include "switchyard/moe/router_topk.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

enum class NoisyMode { eval, train };

struct NoisyTopKRouterConfig {
  std::int64_t num_experts = 0;  ///< E (davidmrau num_experts)
  std::int64_t top_k = 4;        ///< k (davidmrau k, default 4)
  double noise_epsilon = 1e-2;   ///< added to softplus(x @ w_noise) (davidmrau noise_epsilon)
  double loss_coef = 1e-2;       ///< multiplies cv2(importance) + cv2(load) (davidmrau loss_coef)
  bool noisy_gating = true;      ///< false: train mode adds no noise (davidmrau noisy_gating)
};

/// Router weights in the reference's [in, out] layout. w_noise is only read in train
/// mode with noisy_gating (it may be left empty otherwise).
template <class T>
struct NoisyTopKWeights {
  ConstView<T, 2> w_gate;   ///< [d, E]: clean_logits = x @ w_gate
  ConstView<T, 2> w_noise;  ///< [d, E]: stddev = softplus(x @ w_noise) + noise_epsilon
};

/// Where train-mode noise comes from: `normal` when it has data, else the generator.
template <class T>
struct NoisyTopKNoise {
  ConstView<T, 2> normal{};  ///< [T, E] standard-normal sample supplied by the caller
  std::uint64_t seed = 0;    ///< else noise[t,e] = Rng(seed, stream).normal<T>(offset + t*E + e)
  std::uint64_t stream = 0;
  std::uint64_t offset = 0;
};

/// Optional output of NoisyTopKRouter::route: the balance-loss parts and the
/// intermediate arrays ([T*E] row-major). Reuse one object across calls to keep memory.
template <class T>
struct NoisyTopKDetails {
  std::int64_t num_tokens = 0;
  std::int64_t num_experts = 0;
  bool smooth_load = false;        ///< load is the train-mode smooth estimate (else counts)
  std::vector<double> importance;  ///< [E] sum over routed tokens of the gates
  std::vector<double> load;        ///< [E] eval: tokens with gate > 0; train: smooth load
  double cv2_importance = 0;
  double cv2_load = 0;
  double loss = 0;              ///< (cv2_importance + cv2_load) * loss_coef = stats.aux_loss_scaled
  std::vector<T> clean_logits;  ///< x @ w_gate (x overloads only)
  std::vector<T> noise_stddev;  ///< train only: softplus(x @ w_noise) + noise_epsilon
  std::vector<T> noise;         ///< train only: the standard-normal sample used
  std::vector<T> noisy_logits;  ///< train only: clean + noise * stddev
  std::vector<T> probs;         ///< softmax of the logits routed on; masked rows 0

  ConstView<T, 2> view(const std::vector<T>& v) const noexcept {
    return {v.data(), {v.empty() ? 0 : num_tokens, num_experts}};
  }
};

namespace detail {
/// Standard normal CDF, Phi(z) = erfc(-z / sqrt 2) / 2 (torch Normal(0, 1).cdf).
inline double standard_normal_cdf(double z) noexcept {
  return 0.5 * std::erfc(-z / std::numbers::sqrt2);
}
/// torch.nn.Softplus (beta 1, threshold 20).
template <class T>
T softplus(T x) noexcept {
  return x > T(20) ? x : static_cast<T>(std::log1p(std::exp(x)));
}
}  // namespace detail

template <class T = float, class Arch = simd::default_arch>
class NoisyTopKRouter {
 public:
  using config_type = NoisyTopKRouterConfig;
  using weights_type = NoisyTopKWeights<T>;
  static constexpr std::string_view name = "NoisyTopKRouter";

  explicit NoisyTopKRouter(config_type cfg) : cfg_(cfg) {
    detail::check_num_experts(name, cfg_.num_experts);
    detail::check_top_k(name, cfg_.top_k, cfg_.num_experts);
    if (!(cfg_.noise_epsilon >= 0) || !std::isfinite(cfg_.noise_epsilon)) {
      switchyard::detail::fail_config(name, "config", "noise_epsilon", cfg_.noise_epsilon,
                                      "a finite value >= 0");
    }
    if (!(cfg_.loss_coef >= 0) || !std::isfinite(cfg_.loss_coef)) {
      switchyard::detail::fail_config(name, "config", "loss_coef", cfg_.loss_coef,
                                      "a finite value >= 0");
    }
  }

  std::int64_t num_experts() const noexcept { return cfg_.num_experts; }
  const config_type& config() const noexcept { return cfg_; }

  /// LogitsRouter form: eval-mode gating on precomputed clean logits [T, E] (unit inner stride).
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask = {},
             NoisyTopKDetails<T>* details = nullptr) const {
    detail::check_logits(name, logits, cfg_.num_experts, mask);
    NoisyTopKDetails<T> local;
    NoisyTopKDetails<T>& d = details ? *details : local;
    begin(d, logits.extent(0));
    d.clean_logits.clear();
    gate(logits, logits, nullptr, false, plan, mask, d);
  }

  /// route(logits, plan, mask) that also writes the routing scores [T, E] into `scores`
  /// (softmax(logits): in this eval-mode form the probabilities routed on; rows of masked
  /// tokens 0; train mode's noisy probabilities are in NoisyTopKDetails::probs). Throws
  /// shape_error for a scores buffer that is not [T, E] with unit inner stride or that
  /// overlaps logits, before routing.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask,
             View<T, 2> scores) const {
    detail::check_scores_out(name, logits, scores);
    route(logits, plan, mask);
    detail::write_scores<T, Arch>(logits, mask, detail::ScoreKind::softmax, scores);
  }

  DispatchPlan<T> route(ConstView<T, 2> logits, const TokenMask& mask = {}) const {
    DispatchPlan<T> plan;
    route(logits, plan, mask);
    return plan;
  }

  /// x: [T, d]; weights [d, E]. Eval or train mode (see the file comment); noise is
  /// only used in train mode with noisy_gating.
  void route(ConstView<T, 2> x, const weights_type& w, DispatchPlan<T>& plan,
             const TokenMask& mask = {}, NoisyMode mode = NoisyMode::eval,
             const NoisyTopKNoise<T>& noise = {}, NoisyTopKDetails<T>* details = nullptr) const {
    const std::int64_t tokens = x.extent(0), dim = x.extent(1), E = cfg_.num_experts;
    const bool noisy = mode == NoisyMode::train && cfg_.noisy_gating;
    core::detail::check_shape(name, "route", "x", x, {"T", "d"}, {-1, -1});
    core::detail::check_shape(name, "route", "w_gate", w.w_gate, {"d", "E"}, {dim, E},
                              "[in, out] layout: clean_logits = x @ w_gate, d = x's columns");
    if (noisy) {
      core::detail::check_shape(name, "route", "w_noise", w.w_noise, {"d", "E"}, {dim, E},
                                "[in, out] layout: x @ w_noise, d = x's columns");
      if (noise.normal.data() != nullptr) {
        core::detail::check_shape(name, "route", "noise", noise.normal, {"T", "E"}, {tokens, E},
                                  "one standard-normal draw per token and expert");
      }
    }
    if (!mask.keep.empty() && static_cast<std::int64_t>(mask.keep.size()) != tokens) {
      const std::int64_t got[1] = {static_cast<std::int64_t>(mask.keep.size())};
      switchyard::detail::fail_shape(
          name, "route", "mask", switchyard::detail::format_shape({"T"}, got),
          "[T=" + std::to_string(tokens) + "]", "one entry per token of x, or empty");
    }
    NoisyTopKDetails<T> local;
    NoisyTopKDetails<T>& d = details ? *details : local;
    begin(d, tokens);
    const auto n = static_cast<std::size_t>(tokens * E);
    d.clean_logits.resize(n);
    View<T, 2> clean(d.clean_logits.data(), {tokens, E});
    if (tokens > 0) core::gemm<T, Arch>(x, core::Trans::no, w.w_gate, core::Trans::no, clean);
    if (!noisy) {
      d.noise_stddev.clear();
      d.noise.clear();
      d.noisy_logits.clear();
      gate(clean, clean, nullptr, false, plan, mask, d);
      return;
    }
    d.noise_stddev.resize(n);
    d.noise.resize(n);
    d.noisy_logits.resize(n);
    View<T, 2> stddev(d.noise_stddev.data(), {tokens, E});
    View<T, 2> draws(d.noise.data(), {tokens, E});
    if (tokens > 0) {
      core::gemm<T, Arch>(x, core::Trans::no, w.w_noise, core::Trans::no, stddev);
      if (noise.normal.data() != nullptr) {
        for (std::int64_t t = 0; t < tokens; ++t)
          for (std::int64_t e = 0; e < E; ++e) draws(t, e) = noise.normal(t, e);
      } else {
        core::fill_normal(draws, noise.seed, noise.stream, noise.offset);
      }
    }
    const T eps = static_cast<T>(cfg_.noise_epsilon);
    for (std::size_t i = 0; i < n; ++i) {
      d.noise_stddev[i] = detail::softplus(d.noise_stddev[i]) + eps;
      d.noisy_logits[i] = d.clean_logits[i] + d.noise[i] * d.noise_stddev[i];
    }
    ConstView<T, 2> noisy_view(d.noisy_logits.data(), {tokens, E});
    gate(noisy_view, clean, d.noise_stddev.data(), cfg_.top_k < E, plan, mask, d);
  }

  DispatchPlan<T> route(ConstView<T, 2> x, const weights_type& w, const TokenMask& mask = {},
                        NoisyMode mode = NoisyMode::eval, const NoisyTopKNoise<T>& noise = {},
                        NoisyTopKDetails<T>* details = nullptr) const {
    DispatchPlan<T> plan;
    route(x, w, plan, mask, mode, noise, details);
    return plan;
  }

 private:
  void begin(NoisyTopKDetails<T>& d, std::int64_t tokens) const {
    d.num_tokens = tokens;
    d.num_experts = cfg_.num_experts;
    d.importance.assign(static_cast<std::size_t>(cfg_.num_experts), 0.0);
    d.load.assign(static_cast<std::size_t>(cfg_.num_experts), 0.0);
    d.cv2_importance = d.cv2_load = d.loss = 0;
    d.smooth_load = false;
  }

  // logits: what the top-k runs on; clean/stddev: for the smooth load (smooth only).
  void gate(ConstView<T, 2> logits, ConstView<T, 2> clean, const T* stddev, bool smooth,
            DispatchPlan<T>& plan, const TokenMask& mask, NoisyTopKDetails<T>& d) const {
    const std::int64_t tokens = logits.extent(0), E = cfg_.num_experts, k = cfg_.top_k;
    const std::int64_t m = smooth ? k + 1 : k;  // the smooth load needs the (k+1)-th (k < E)
    plan.reset(tokens, E, k);
    std::vector<double> prob_sum;
    detail::softmax_scores<T, Arch>(name, logits, mask, d.probs, prob_sum, plan.stats);
    d.smooth_load = smooth;
    const std::int64_t chunks = num_chunks(tokens, detail::router_chunk);
    std::vector<double> partial(static_cast<std::size_t>(chunks * 2 * E), 0.0);
    std::vector<std::int64_t> partial_count(static_cast<std::size_t>(chunks * E), 0);
    parallel_for(chunks, [&](std::int64_t c) {
      double* importance = partial.data() + c * 2 * E;
      double* load = importance + E;
      std::int64_t* count = partial_count.data() + c * E;
      std::vector<std::int64_t> idx(static_cast<std::size_t>(m));
      std::vector<T> top(static_cast<std::size_t>(m));
      const std::int64_t end = std::min(tokens, (c + 1) * detail::router_chunk);
      // The m largest p of each routed row, best first, ties to the lower index
      // (TopKRouter's row visitor: SIMD lanes for m <= 8, else the core::topk kernels).
      detail::for_each_topk_row<T, Arch>(
          d.probs.data(), c * detail::router_chunk, end, E, m, mask,
          [&](std::int64_t t, auto index_of, auto value_of) {
            for (std::int64_t s = 0; s < m; ++s) {
              idx[s] = index_of(s);
              top[s] = value_of(s);
            }
            T sum = T(0);
            for (std::int64_t s = 0; s < k; ++s) sum += top[s];
            const T denom = sum + static_cast<T>(1e-6);
            std::int32_t* ce = plan.choice_expert.data() + t * k;
            T* cw = plan.choice_weight.data() + t * k;
            for (std::int64_t s = 0; s < k; ++s) {
              const T g = top[s] / denom;
              ce[s] = static_cast<std::int32_t>(idx[s]);
              cw[s] = g;
              ++count[idx[s]];
              importance[idx[s]] += static_cast<double>(g);
              if (!smooth && g > T(0)) load[idx[s]] += 1.0;
            }
            if (smooth) {
              const T thr_in = top[k], thr_out = top[k - 1];
              const T* noisy = logits.data() + t * logits.stride(0);
              const T* cl = clean.data() + t * clean.stride(0);
              const T* sd = stddev + t * E;
              for (std::int64_t e = 0; e < E; ++e) {
                const T thr = noisy[e] > thr_in ? thr_in : thr_out;
                load[e] += detail::standard_normal_cdf(
                    (static_cast<double>(cl[e]) - static_cast<double>(thr)) /
                    static_cast<double>(sd[e]));
              }
            }
          });
    });
    auto& st = plan.stats;
    for (std::int64_t c = 0; c < chunks; ++c) {
      const double* importance = partial.data() + c * 2 * E;
      for (std::int64_t e = 0; e < E; ++e) {
        d.importance[e] += importance[e];
        d.load[e] += importance[E + e];
        st.tokens_per_expert[e] += partial_count[c * E + e];
      }
    }
    detail::build_csr_from_choices(plan);
    d.cv2_importance = cv_squared(d.importance);
    d.cv2_load = cv_squared(d.load);
    st.aux_loss = d.cv2_importance + d.cv2_load;  // coefficient 1, as every router
    d.loss = st.aux_loss * cfg_.loss_coef;        // what the reference returns
    st.aux_loss_scaled = d.loss;
  }

  config_type cfg_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
