#pragma once
// GroupedTopKRouter: DeepSeek-V2/V3 gate: group-limited top-k over softmax or sigmoid
// scores, with an optional selection-only bias (DeepSeek-V3's e_score_correction_bias,
// the auxiliary-loss-free balancing of moe/bias_balancer.hpp).
// Reference: deepseek-ai/DeepSeek-V3 @ 9b4e9788e4a3a731f7567338ed15d3ec549ce03b,
// inference/model.py Gate.forward (the golden fixtures deepseek_v3_gate_tiny_*).
//
// Semantics, per routed token t with logits x[t, :] ([T, E]), G = n_group, M = E / G:
//   s[t, :] = softmax(x[t, :]) over all E (score_func softmax), or sigmoid(x[t, :]);
//     these unbiased scores give the weights (and scores_out).
//   selection scores c[t, e] = s[t, e] + bias[e] (in T) with a bias, else s[t, e];
//     the bias only changes WHICH experts are picked, never their weights.
//   G > 1: groups are the contiguous expert ranges [g*M, (g+1)*M). Group score = max of the
//     group's c without a bias; the sum of the group's two largest c with a bias (just the
//     largest when M = 1, where torch.topk(2) would fail). The topk_group best groups are
//     kept (equal scores: the lower group first); the other groups' experts are excluded
//     (the reference sets them to -inf; a port that fills 0.0 instead differs only when a
//     kept expert's biased score is below 0).
//   indices = the top_k largest c among the kept experts, best first, equal ones to the
//     lower expert index (core::topk's order);
//   weights = s at those indices (UNbiased); if norm_topk_prob, divided by their sum (no
//     epsilon; summed best first; a sum of 0, every chosen sigmoid score underflowed, gives
//     weights 0 where the reference gives NaN); then times routed_scaling_factor (in T).
// DeepSeek-V3 is {sigmoid, bias, norm_topk_prob = true, routed_scaling_factor 2.5, E 256,
// k 8, G 8, topk_group 4}; the reference renormalises exactly when score_func is sigmoid,
// here norm_topk_prob says it for either function (HF's DeepseekV3 config flag).
// DeepSeek-V2 is {softmax, no bias, norm_topk_prob = false, its routed_scaling_factor}.
// No capacity: nothing is dropped (plan.capacity = -1); every routed token gets exactly k
// experts. Masked tokens (TokenMask) get no expert and count in no statistic or loss;
// T = 0 or all tokens masked gives a valid empty plan with zero losses.
//
// The bias is an argument of route, not part of the router, so a bias that changes every
// step (BiasBalancer) needs no new router: route(logits, plan, mask) routes without a bias,
// route(logits, bias, plan, mask) with one (even an all-zero bias selects groups by the
// top-2 sum, as the reference does whenever the gate has a bias). scores_out, when given,
// receives s ([T, E], masked rows 0); it costs nothing when not given.
//
// Statistics (coefficient 1; T = routed tokens, n_e = tokens_per_expert, all in double):
//   tokens_per_expert = kept_per_expert = n_e; mean_prob[e] = mean_t s[t, e] (unbiased);
//   z_loss = mean_t logsumexp(x[t])^2 and entropy = mean_t entropy of softmax(x[t]) in
//     nats, for both score functions (for sigmoid these are diagnostics of the raw logits,
//     as ReluRouter reports them: sigmoid scores are not a distribution);
//   aux_loss = DeepSeek-V3's complementary sequence-wise balance loss (alpha = 1) with the
//     routed batch as one sequence: sum_e f_e P_e, f_e = E / (k T) n_e, P_e = mean_t
//     s'[t, e], s'[t, :] = s[t, :] / sum_j s[t, j] (= E / (T^2 k) sum_e n_e sum_t s'[t, e],
//     Megatron's switch loss on normalised scores; 1 for perfectly uniform routing). For
//     per-sequence values use moe::sequence_wise_balance_loss (losses.hpp) on scores_out.
//
// Errors: config_error naming "GroupedTopKRouter" and the field for num_experts < 1,
// top_k < 1, n_group < 1, E not divisible by n_group, topk_group outside [1, n_group],
// top_k > topk_group * E / n_group (the experts of the kept groups), routed_scaling_factor
// not finite or <= 0; at route: config_error for a NaN or inf bias entry, or a routed token
// with a NaN or +inf logit or only -inf logits (its logsumexp is not finite); shape_error
// for logits not [T, E] with unit inner stride, a mask not [T], a bias not [E], or
// scores_out not [T, E] with unit inner stride or overlapping logits or bias.
//
// Cost per routed token: the scores in one vectorised pass after the row max (softmax: core
// softmax_row; sigmoid: the sigmoid and the softmax sums for z_loss and entropy fused), group
// scores (vectorised max, or per-lane top-2 registers folded in a tree), the kept groups by
// rank counting, then the top-k over the kept groups' experts gathered into one row (core's
// lane top-k, kernels::topk_rows_lanes: L tokens at a time; k > 8 or the scalar arch: core's
// row kernels). Token chunks are fixed (detail::router_chunk), so plans are bit-identical for
// any thread count. Measured (1 thread, AVX-512, gcc 12 -O3 -march=native, a busy shared
// machine, best of 100): DeepSeek-V3's shape, T = 4096, E = 256, k = 8, 8 groups, top-4,
// sigmoid with bias: 2.0-2.4 ms, the same as TopKRouter's top-8 of 256 on the same logits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/exp.hpp"
#include "switchyard/core/simd/softmax.hpp"
#include "switchyard/core/simd/topk_lanes.hpp"
#include "switchyard/core/simd/vector_ops.hpp"
#include "switchyard/core/topk.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/losses.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

/// How logits become scores: softmax over all experts, or an independent sigmoid each.
enum class ScoreFunc { softmax, sigmoid };

struct GroupedTopKRouterConfig {
  std::int64_t num_experts = 0;  ///< E routed experts (DeepSeek n_routed_experts)
  std::int64_t top_k = 8;       ///< k experts per token (n_activated_experts / num_experts_per_tok)
  std::int64_t n_group = 1;     ///< G contiguous expert groups (n_expert_groups); must divide E
  std::int64_t topk_group = 1;  ///< groups kept per token (n_limited_groups), 1..G
  ScoreFunc score_func = ScoreFunc::softmax;
  /// Divide the chosen weights by their sum (DeepSeek-V3: true, with sigmoid; V2: false).
  bool norm_topk_prob = false;
  /// Multiplies the weights (route_scale); finite and > 0.
  double routed_scaling_factor = 1.0;
};

namespace detail {

/// Largest of x[0..n), n >= 1: per-lane maxima folded in a tree (core's row_max ends in a
/// serial scan of the lanes, slow for the many short rows and groups here). NaN entries
/// may or may not propagate, as in row_max; callers that care check for NaN themselves.
template <class Arch, class T>
T max_of(const T* x, std::int64_t n) noexcept {
  if constexpr (!simd::is_scalar_v<Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    if (n >= L) {
      B m0 = B::load_unaligned(x), m1 = m0;
      std::int64_t i = L;
      for (; i + 2 * L <= n; i += 2 * L) {  // two chains: the max latency is not serial
        m0 = xsimd::max(m0, B::load_unaligned(x + i));
        m1 = xsimd::max(m1, B::load_unaligned(x + i + L));
      }
      if (i + L <= n) m0 = xsimd::max(m0, B::load_unaligned(x + i));
      alignas(64) T a[L];
      xsimd::max(m0, m1).store_aligned(a);
      T m = a[0];
      for (std::int64_t j = n - n % L; j < n; ++j) m = std::max(m, x[j]);
      for (std::int64_t w = L / 2; w >= 1; w /= 2)
        for (std::int64_t l = 0; l < w; ++l) a[l] = std::max(a[l], a[l + w]);
      return std::max(m, a[0]);
    }
  }
  return kernels::row_max(Arch{}, x, n);
}

/// Sigmoid scores and the softmax diagnostics in one pass over x[0..n), n >= 1:
/// y[i] = sigmoid(x[i]); lse = log sum_i exp(x[i]); returns sum_i exp(x[i] - m)
/// max(x[i], lowest) / sum_i exp(x[i] - m) = sum_i softmax(x)[i] x[i] (m = max x; -inf
/// entries add 0), so that the entropy of softmax(x) is lse minus it. lse is not finite
/// when x holds NaN or +inf or only -inf.
/// One exp per entry when -80 <= m <= 20: with e = exp(x - m), the softmax term,
/// sigmoid(x) = e / (e + exp(-m)); an e that underflows (x < m - 87) gives 0 where
/// sigmoid(x) < 1e-29. Otherwise (exp(-m) would overflow, or large logits) the direct
/// 1 / (1 + exp(-x)), a second exp.
template <class Arch, class T>
T sigmoid_scores(const T* x, T* y, std::int64_t n, T& lse) noexcept {
  const T m = max_of<Arch>(x, n);
  const T lowest = std::numeric_limits<T>::lowest();
  const bool one_exp = m >= T(-80) && m <= T(20);
  const T c = one_exp ? simd::exp(-m) : T(0);
  T sum(0), dot(0);
  std::int64_t i = 0;
  if constexpr (!simd::is_scalar_v<Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    const B one(T(1)), mb(m), lo(lowest), cb(c);
    B s(T(0)), d(T(0));
    const auto step = [&](const B& v) {
      const B e = simd::exp(v - mb);
      s += e;
      d = xsimd::fma(e, xsimd::max(v, lo), d);
      return one_exp ? e / (e + cb) : one / (one + simd::exp(-v));
    };
    for (; i + L <= n; i += L) step(B::load_unaligned(x + i)).store_unaligned(y + i);
    if (i < n) {
      // The tail through the same vector code (padded with -inf, which adds 0), so equal
      // logits get equal scores wherever they sit: ties stay ties.
      alignas(64) T buf[L];
      std::fill_n(buf, L, -std::numeric_limits<T>::infinity());
      std::copy(x + i, x + n, buf);
      step(B::load_aligned(buf)).store_aligned(buf);
      std::copy(buf, buf + (n - i), y + i);
      i = n;
    }
    sum = simd::hsum(s);
    dot = simd::hsum(d);
  }
  for (; i < n; ++i) {
    const T e = simd::exp(x[i] - m);
    y[i] = one_exp ? e / (e + c) : T(1) / (T(1) + simd::exp(-x[i]));
    sum += e;
    dot += e * std::max(x[i], lowest);
  }
  lse = m + std::log(sum);
  return dot / sum;
}

/// Merges two top-2 pairs (a1 >= b1), (a2 >= b2) into the first: the larger of a1, a2,
/// then the larger of the other one and of b1, b2.
template <class T>
inline void merge_top2(T& a1, T& b1, T a2, T b2) noexcept {
  b1 = std::max(std::min(a1, a2), std::max(b1, b2));
  a1 = std::max(a1, a2);
}

/// Folds the top-2 pairs (a[l], b[l]), l < 2W, into (a[0], b[0]): W, W/2, ..., 1 pairs
/// merged per step, a fixed-width loop per step (the compiler vectorises the wide ones).
template <std::int64_t W, class T>
inline void fold_top2(T* a, T* b) noexcept {
  for (std::int64_t l = 0; l < W; ++l) merge_top2(a[l], b[l], a[l + W], b[l + W]);
  if constexpr (W > 1) fold_top2<W / 2>(a, b);
}

/// The two largest of x[0..n), n >= 1, as (largest, second largest; -inf when n = 1);
/// x finite. The values do not depend on the path.
template <class Arch, class T>
std::pair<T, T> top2(const T* x, std::int64_t n) noexcept {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  if constexpr (!simd::is_scalar_v<Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    if (n >= L) {
      // Per-lane largest (m1) and second largest (m2), the tail padded with -inf; then the
      // lanes are merged pairwise in a tree (log2 L steps, not a serial scan).
      B m1(ninf), m2(ninf);
      const auto push = [&](const B& v) {
        m2 = xsimd::max(m2, xsimd::min(m1, v));
        m1 = xsimd::max(m1, v);
      };
      std::int64_t i = 0;
      for (; i + L <= n; i += L) push(B::load_unaligned(x + i));
      alignas(64) T a[L], b[L];
      if (i < n) {
        std::fill_n(a, L, ninf);
        std::copy(x + i, x + n, a);
        push(B::load_aligned(a));
      }
      m1.store_aligned(a);
      m2.store_aligned(b);
      fold_top2<L / 2>(a, b);
      return {a[0], b[0]};
    }
  }
  T a = x[0], b = ninf;  // a >= b
  for (std::int64_t i = 1; i < n; ++i) merge_top2(a, b, x[i], ninf);
  return {a, b};
}

/// The tg best of the group scores gs[0..G) (larger first, equal ones to the lower group),
/// written to kept in ASCENDING group order. Small G: rank counting (a group is kept when
/// fewer than tg groups rank before it), branch-free and already in order; else core's
/// row top-k, then a sort.
template <class T>
void best_groups_ascending(const T* gs, std::int64_t G, std::int64_t tg, std::int32_t* kept,
                           std::vector<std::int64_t>& idx, std::vector<T>& val,
                           std::vector<std::pair<T, std::int64_t>>& select) {
  if (G <= 32) {
    std::int32_t rank[32] = {};
    for (std::int32_t h = 0; h < G; ++h) {  // the inner loop vectorises over g
      const T v = gs[h];
      for (std::int32_t g = 0; g < G; ++g) rank[g] += (v > gs[g]) | ((v == gs[g]) & (h < g));
    }
    std::int32_t list[33];  // branch-free append (which groups pass is unpredictable)
    std::int64_t n = 0;
    for (std::int32_t g = 0; g < G; ++g) {
      list[n] = g;
      n += rank[g] < tg;
    }
    std::copy_n(list, tg, kept);
    return;
  }
  idx.resize(static_cast<std::size_t>(tg));
  val.resize(static_cast<std::size_t>(tg));
  if (tg <= 8) {
    kernels::topk_row_insertion(gs, G, tg, idx.data(), val.data());
  } else {
    kernels::topk_row_select(gs, G, tg, idx.data(), val.data(), select);
  }
  std::sort(idx.begin(), idx.end());
  for (std::int64_t j = 0; j < tg; ++j) kept[j] = static_cast<std::int32_t>(idx[j]);
}

/// Per-thread buffers of GroupedTopKRouter, reused across calls.
template <class T>
struct GroupedTopKScratch {
  std::vector<T> scores;           // [chunk, E] unbiased scores when the caller gave no scores_out
  std::vector<T> sel;              // [E] biased selection scores of one token
  std::vector<T> compact;          // [chunk, n_kept] selection scores of the kept groups' experts
  std::vector<std::int32_t> kept;  // [chunk, topk_group] kept groups, ascending
  std::vector<T> group_score;      // [G]
  std::vector<std::int64_t> idx;   // core top-k scratch (large G)
  std::vector<T> val;
  std::vector<std::pair<T, std::int64_t>> select;
};

template <class T>
GroupedTopKScratch<T>& grouped_topk_scratch() {
  thread_local GroupedTopKScratch<T> s;
  return s;
}

}  // namespace detail

template <class T = float, class Arch = simd::default_arch>
class GroupedTopKRouter {
 public:
  using config_type = GroupedTopKRouterConfig;
  static constexpr std::string_view name = "GroupedTopKRouter";

  /// Throws config_error naming the field (see the file comment for the rules).
  explicit GroupedTopKRouter(const config_type& config) : cfg_(config) {
    detail::check_num_experts(name, cfg_.num_experts);
    const std::int64_t E = cfg_.num_experts, G = cfg_.n_group;
    if (G < 1 || G > E || E % G != 0) {
      switchyard::detail::fail_config(
          name, "config", "n_group", G,
          "a divisor of num_experts = " + std::to_string(E) +
              " (groups are contiguous ranges of num_experts / n_group experts)");
    }
    if (cfg_.topk_group < 1 || cfg_.topk_group > G) {
      switchyard::detail::fail_config(name, "config", "topk_group", cfg_.topk_group,
                                      "1 <= topk_group <= n_group = " + std::to_string(G));
    }
    const std::int64_t kept = cfg_.topk_group * (E / G);
    if (cfg_.top_k < 1 || cfg_.top_k > kept) {
      switchyard::detail::fail_config(
          name, "config", "top_k", cfg_.top_k,
          "1 <= top_k <= topk_group * num_experts / n_group = " + std::to_string(kept) +
              " (the experts of the kept groups)");
    }
    if (cfg_.score_func != ScoreFunc::softmax && cfg_.score_func != ScoreFunc::sigmoid) {
      switchyard::detail::fail_config(name, "config", "score_func",
                                      static_cast<int>(cfg_.score_func), "softmax or sigmoid");
    }
    detail::check_positive_finite(name, "routed_scaling_factor", cfg_.routed_scaling_factor);
  }

  const config_type& config() const noexcept { return cfg_; }
  std::int64_t num_experts() const noexcept { return cfg_.num_experts; }
  std::int64_t top_k() const noexcept { return cfg_.top_k; }

  /// logits: [T, E] (unit inner stride); mask: empty or [T]; scores_out: empty, or [T, E]
  /// (unit inner stride) receiving the unbiased scores (masked rows 0). Routes WITHOUT a
  /// bias (group score = max). Fills plan (reusing its memory) with k choices per routed token.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask = {},
             View<T, 2> scores_out = {}) const {
    route_impl(logits, nullptr, plan, mask, scores_out);
  }

  /// The same with the selection bias (e_score_correction_bias): bias [E], finite; it
  /// changes which groups and experts are chosen, never the weights.
  void route(ConstView<T, 2> logits, std::span<const T> bias, DispatchPlan<T>& plan,
             const TokenMask& mask = {}, View<T, 2> scores_out = {}) const {
    if (static_cast<std::int64_t>(bias.size()) != cfg_.num_experts) {
      const std::int64_t got[1] = {static_cast<std::int64_t>(bias.size())};
      switchyard::detail::fail_shape(name, "route", "bias",
                                     switchyard::detail::format_shape({"E"}, got),
                                     "[E=" + std::to_string(cfg_.num_experts) + "]",
                                     "e_score_correction_bias: one entry per routed expert");
    }
    for (std::size_t e = 0; e < bias.size(); ++e) {
      if (!std::isfinite(static_cast<double>(bias[e]))) {
        switchyard::detail::fail_config(name, "route", "bias", static_cast<double>(bias[e]),
                                        "finite entries (entry " + std::to_string(e) + ")");
      }
    }
    route_impl(logits, bias.data(), plan, mask, scores_out);
  }

  /// Allocating conveniences: a fresh plan.
  DispatchPlan<T> route(ConstView<T, 2> logits, const TokenMask& mask = {}) const {
    DispatchPlan<T> plan;
    route(logits, plan, mask);
    return plan;
  }
  DispatchPlan<T> route(ConstView<T, 2> logits, std::span<const T> bias,
                        const TokenMask& mask = {}) const {
    DispatchPlan<T> plan;
    route(logits, bias, plan, mask);
    return plan;
  }

 private:
  void route_impl(ConstView<T, 2> logits, const T* bias, DispatchPlan<T>& plan,
                  const TokenMask& mask, View<T, 2> scores_out) const {
    const std::int64_t E = cfg_.num_experts, k = cfg_.top_k, G = cfg_.n_group;
    detail::check_logits(name, logits, E, mask);
    const std::int64_t tokens = logits.extent(0);
    const bool want_scores = scores_out.data() != nullptr;
    if (want_scores) {
      core::detail::check_shape(name, "route", "scores_out", scores_out, {"T", "E"}, {tokens, E},
                                "one unbiased score per token and expert");
      core::detail::check_unit_inner_stride(name, "route", "scores_out", scores_out);
      core::detail::check_no_alias(name, "route", "scores_out", scores_out, "logits", logits);
      if (bias) {
        core::detail::check_no_alias(name, "route", "scores_out", scores_out, "bias",
                                     ConstView<T, 1>(bias, {E}));
      }
    }
    plan.reset(tokens, E, k);

    // With every group kept, group limiting changes nothing: one row of all E experts.
    const bool grouped = G > 1 && cfg_.topk_group < G;
    const std::int64_t M = E / G, tg = grouped ? cfg_.topk_group : 1;
    const std::int64_t n_kept = grouped ? tg * M : E;
    const bool sigmoid = cfg_.score_func == ScoreFunc::sigmoid;
    const bool renorm = cfg_.norm_topk_prob;
    const T route_scale = static_cast<T>(cfg_.routed_scaling_factor);
    constexpr std::int64_t chunk = detail::router_chunk;
    const std::int64_t chunks = num_chunks(tokens, chunk);
    // Per chunk: score sums [E], normalised score sums [E], lse^2, entropy, first bad token.
    const std::int64_t width = 2 * E + 3;
    std::vector<double> partial(static_cast<std::size_t>(chunks * width), 0.0);
    std::vector<std::int64_t> partial_count(static_cast<std::size_t>(chunks * E), 0);

    parallel_for(chunks, [&](std::int64_t c) {
      double* score_sum = partial.data() + c * width;
      double* norm_sum = score_sum + E;
      double* tail = norm_sum + E;  // lse^2, entropy, first bad token
      tail[2] = -1;
      std::int64_t* count = partial_count.data() + c * E;
      const std::int64_t t0 = c * chunk, t1 = std::min(tokens, t0 + chunk), rows = t1 - t0;
      auto& s = detail::grouped_topk_scratch<T>();
      if (!want_scores) s.scores.resize(static_cast<std::size_t>(rows * E));
      if (bias) s.sel.resize(static_cast<std::size_t>(E));
      s.compact.resize(static_cast<std::size_t>(rows * n_kept));
      if (grouped) {
        s.kept.resize(static_cast<std::size_t>(rows * tg));
        s.group_score.resize(static_cast<std::size_t>(G));
      }
      const auto score_row = [&](std::int64_t t) -> T* {
        return want_scores ? scores_out.data() + t * scores_out.stride(0)
                           : s.scores.data() + (t - t0) * E;
      };
      // The plan entries of token t from its k experts, best first: unbiased weights.
      const auto emit = [&](std::int64_t t, auto&& expert_of) {
        const T* sc = score_row(t);
        std::int32_t* ce = plan.choice_expert.data() + t * k;
        T* cw = plan.choice_weight.data() + t * k;
        T sum(0);
        for (std::int64_t j = 0; j < k; ++j) {
          const std::int32_t e = expert_of(j);
          ce[j] = e;
          cw[j] = sc[e];
          sum += cw[j];
          ++count[e];
        }
        for (std::int64_t j = 0; j < k; ++j) {
          if (renorm) cw[j] = sum > T(0) ? cw[j] / sum : T(0);
          cw[j] *= route_scale;
        }
      };

      // Pass 1, per token: scores, statistics, the kept groups and the selection row of
      // their experts.
      for (std::int64_t t = t0; t < t1; ++t) {
        T* sc = score_row(t);
        if (!mask.routed(t)) {
          if (want_scores) std::fill_n(sc, E, T(0));
          continue;
        }
        const T* x = logits.data() + t * logits.stride(0);
        // entropy of softmax(x) = lse - sum_e p x (log p = x - lse); -inf logits add 0.
        T lse;
        double px;
        if (sigmoid) {
          px = static_cast<double>(detail::sigmoid_scores<Arch>(x, sc, E, lse));
        } else {
          kernels::softmax_row(Arch{}, x, sc, E, &lse);
          px = detail::clamped_dot<Arch>(sc, x, E);
        }
        if (!std::isfinite(lse)) {
          tail[2] = static_cast<double>(t);
          return;  // the call throws; the rest of the chunk does not matter
        }
        tail[0] += static_cast<double>(lse) * lse;
        tail[1] += static_cast<double>(lse) - px;
        // Score sums in double, so a token's share does not depend on its chunk-mates
        // (no reduction inside the loop: it vectorises).
        const T row_sum = kernels::row_sum(Arch{}, sc, E);
        const double inv = row_sum > T(0) ? 1.0 / static_cast<double>(row_sum) : 0.0;
        for (std::int64_t e = 0; e < E; ++e) {
          const auto v = static_cast<double>(sc[e]);
          score_sum[e] += v;
          norm_sum[e] += v * inv;
        }
        const T* sel = sc;
        if (bias) {
          T* b = s.sel.data();
          for (std::int64_t e = 0; e < E; ++e) b[e] = sc[e] + bias[e];
          sel = b;
        }
        if (!grouped) {
          std::copy_n(sel, E, s.compact.data() + (t - t0) * n_kept);
          continue;
        }
        T* gs = s.group_score.data();
        for (std::int64_t g = 0; g < G; ++g) {
          if (bias) {
            const auto [a, b] = detail::top2<Arch>(sel + g * M, M);
            gs[g] = M > 1 ? a + b : a;
          } else {
            gs[g] = detail::max_of<Arch>(sel + g * M, M);
          }
        }
        // Kept groups in ascending order: the gathered row keeps expert order, so equal
        // selection scores still go to the lower expert index.
        std::int32_t* kept = s.kept.data() + (t - t0) * tg;
        detail::best_groups_ascending(gs, G, tg, kept, s.idx, s.val, s.select);
        T* row = s.compact.data() + (t - t0) * n_kept;
        for (std::int64_t j = 0; j < tg; ++j) std::copy_n(sel + kept[j] * M, M, row + j * M);
      }

      // Pass 2: top-k of the gathered rows (L tokens at a time), weights from the scores.
      const auto m32 = static_cast<std::int32_t>(M);
      kernels::topk_rows_lanes<T, Arch>(
          s.compact.data(), n_kept, 0, rows, n_kept, k,
          [&](std::int64_t r) { return mask.routed(t0 + r); },
          [&](std::int64_t r, auto&& index_of, auto&&) {
            const std::int32_t* kept = grouped ? s.kept.data() + r * tg : nullptr;
            emit(t0 + r, [&](std::int64_t j) {
              // Position i of the gathered row: expert i % M of the (i / M)-th kept group.
              const std::int32_t i = index_of(j);
              return grouped ? kept[i / m32] * m32 + i % m32 : i;
            });
          });
    });

    auto& st = plan.stats;
    std::vector<double> norm_sum(static_cast<std::size_t>(E), 0.0);
    double lse2 = 0, entropy = 0;
    for (std::int64_t c = 0; c < chunks; ++c) {
      const double* acc = partial.data() + c * width;
      if (acc[2 * E + 2] >= 0)
        detail::fail_non_finite_logits(name, static_cast<std::int64_t>(acc[2 * E + 2]));
      for (std::int64_t e = 0; e < E; ++e) {
        st.mean_prob[e] += acc[e];
        norm_sum[e] += acc[E + e];
        st.tokens_per_expert[e] += partial_count[c * E + e];
      }
      lse2 += acc[2 * E];
      entropy += acc[2 * E + 1];
    }
    const std::int64_t routed = mask.count(tokens);
    st.routed_tokens = routed;
    if (routed > 0) {
      for (auto& m : st.mean_prob) m /= static_cast<double>(routed);
      st.z_loss = lse2 / static_cast<double>(routed);
      st.entropy = entropy / static_cast<double>(routed);
    }
    detail::build_csr_from_choices(plan);
    // The sequence-wise loss with the routed batch as one sequence is the switch loss on
    // normalised scores: sum_e (E n_e / (k T)) (sum_t s'[t, e] / T).
    st.aux_loss = switch_load_balancing_loss(st.tokens_per_expert, norm_sum, routed, k);
  }

  config_type cfg_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
