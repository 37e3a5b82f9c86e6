#pragma once
// What every MoE router shares: the LogitsRouter concept, router logits from
// tokens and a router weight, boundary checks, the capacity formula, and the
// softmax pass that also yields the statistics (mean probability, z-loss,
// entropy) over routed tokens.
//
// Routers take logits [T, E] so they can be compared on the same input; a
// router that needs more (noise weights, token ids) takes it as extra arguments.
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/linear.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/softmax.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/plan.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

/// A router that turns logits [T, E] (unit inner stride) into a DispatchPlan,
/// reusing the plan's memory: r.route(logits, plan, mask).
template <class R, class T>
concept LogitsRouter = requires(const R& r, ConstView<T, 2> logits, DispatchPlan<T>& plan,
                                const TokenMask& mask) {
  { r.route(logits, plan, mask) } -> std::same_as<void>;
  { r.num_experts() } -> std::convertible_to<std::int64_t>;
  { R::name } -> std::convertible_to<std::string_view>;
};

/// Convenience: a fresh plan from a LogitsRouter.
template <class T, LogitsRouter<T> R>
DispatchPlan<T> route(const R& router, ConstView<T, 2> logits, const TokenMask& mask = {}) {
  DispatchPlan<T> plan;
  router.route(logits, plan, mask);
  return plan;
}

/// logits [T, E] = x [T, d] * router_weight^T, router_weight in nn.Linear layout
/// [E, d] (no bias). Throws shape_error naming "router_logits" and both shapes.
template <class T, class Arch = simd::default_arch>
void router_logits(ConstView<T, 2> x, ConstView<T, 2> router_weight, View<T, 2> logits) {
  const std::int64_t d = x.extent(1), experts = router_weight.extent(0);
  core::detail::check_shape("moe", "router_logits", "router_weight", router_weight, {"E", "d"},
                            {-1, d}, "nn.Linear layout [out, in]: d must equal x's columns");
  core::detail::check_shape("moe", "router_logits", "logits", logits, {"T", "E"},
                            {x.extent(0), experts});
  core::detail::check_no_alias("moe", "router_logits", "logits", logits, "x", x);
  core::detail::check_no_alias("moe", "router_logits", "logits", logits, "router_weight",
                               router_weight);
  if (x.extent(0) == 0) return;
  core::linear<Arch>(x, router_weight, logits);
}

template <class T, class Arch = simd::default_arch>
Tensor<T> router_logits(ConstView<T, 2> x, ConstView<T, 2> router_weight) {
  Tensor<T> logits({x.extent(0), router_weight.extent(0)});
  router_logits<T, Arch>(x, router_weight, logits.template view<2>());
  return logits;
}

/// How capacity = f(tokens * k / E * capacity_factor) rounds.
enum class CapacityRounding { ceil, floor };

/// Per-expert capacity from `tokens` routed tokens; `requested` is the formula's
/// value, or `fixed` when that is >= 0 (a capacity given as a number), at least
/// min_capacity; `value` what is used: clamped to `tokens`, since an expert can take
/// each token once. `clamped` says whether the clamp bit.
struct Capacity {
  std::int64_t requested = 0;
  std::int64_t value = 0;
  bool clamped = false;
};

inline Capacity compute_capacity(std::int64_t tokens, std::int64_t k, std::int64_t experts,
                                 double capacity_factor, CapacityRounding rounding,
                                 std::int64_t min_capacity = 0, std::int64_t fixed = -1) noexcept {
  const double raw = static_cast<double>(tokens) * static_cast<double>(k) /
                     static_cast<double>(experts) * capacity_factor;
  // The small slack keeps e.g. 16*2/4*1.0 = 8 from becoming 9 through rounding noise.
  const double r =
      rounding == CapacityRounding::ceil ? std::ceil(raw - 1e-9) : std::floor(raw + 1e-9);
  Capacity c;
  // A formula value past int64 (a capacity_factor like 1e300 gives inf) saturates, so the
  // clamp below stays visible instead of the cast being undefined.
  constexpr double int64_limit = 9.2e18;  // < 2^63, exactly representable as a double
  const std::int64_t formula = r < int64_limit ? static_cast<std::int64_t>(std::max(r, 0.0))
                                               : std::numeric_limits<std::int64_t>::max();
  c.requested = std::max<std::int64_t>(fixed >= 0 ? fixed : formula, min_capacity);
  c.value = std::min(c.requested, tokens);
  c.clamped = c.value != c.requested;
  return c;
}

/// Records a capacity in the plan, including the visible clamp flag.
template <class T>
void set_capacity(DispatchPlan<T>& plan, const Capacity& c) noexcept {
  plan.capacity = c.value;
  plan.requested_capacity = c.requested;
  plan.capacity_clamped = c.clamped;
}

namespace detail {

/// Boundary checks shared by the routers; each names the router and the argument.
template <class T>
void check_logits(std::string_view router, ConstView<T, 2> logits, std::int64_t experts,
                  const TokenMask& mask) {
  core::detail::check_shape(router, "route", "logits", logits, {"T", "E"}, {-1, experts},
                            "E must equal the router's num_experts");
  core::detail::check_unit_inner_stride(router, "route", "logits", logits);
  // Plans store token ids as int32 (DispatchPlan::token_index).
  if (logits.extent(0) > std::numeric_limits<std::int32_t>::max()) {
    switchyard::detail::fail_shape(router, "route", "logits",
                                   switchyard::detail::format_shape({"T", "E"}, logits.shape()),
                                   "[T <= 2^31 - 1, E]", "plans index tokens with int32");
  }
  if (!mask.keep.empty() && static_cast<std::int64_t>(mask.keep.size()) != logits.extent(0)) {
    const std::int64_t got[1] = {static_cast<std::int64_t>(mask.keep.size())};
    switchyard::detail::fail_shape(
        router, "route", "mask", switchyard::detail::format_shape({"T"}, got),
        "[T=" + std::to_string(logits.extent(0)) + "]", "one entry per token of logits, or empty");
  }
}

inline void check_num_experts(std::string_view router, std::int64_t experts) {
  // Plans store expert ids as int32 (DispatchPlan::choice_expert).
  if (experts < 1 || experts > std::numeric_limits<std::int32_t>::max())
    switchyard::detail::fail_config(router, "config", "num_experts", experts,
                                    "1 <= num_experts <= 2^31 - 1");
}

inline void check_top_k(std::string_view router, std::int64_t k, std::int64_t experts) {
  if (k < 1 || k > experts) {
    switchyard::detail::fail_config(router, "config", "top_k", k,
                                    "1 <= top_k <= num_experts = " + std::to_string(experts));
  }
}

inline void check_positive_finite(std::string_view router, std::string_view arg, double v) {
  if (!(v > 0) || !std::isfinite(v)) {
    switchyard::detail::fail_config(router, "config", arg, v, "a finite value > 0");
  }
}

/// The capacity settings every capacity router shares: capacity_factor finite and > 0,
/// min_capacity >= 0, capacity -1 (use the factor) or >= 0 (tokens per expert).
inline void check_capacity_settings(std::string_view router, double capacity_factor,
                                    std::int64_t min_capacity, std::int64_t capacity) {
  check_positive_finite(router, "capacity_factor", capacity_factor);
  if (min_capacity < 0) {
    switchyard::detail::fail_config(router, "config", "min_capacity", min_capacity, ">= 0");
  }
  if (capacity < -1) {
    switchyard::detail::fail_config(router, "config", "capacity", capacity,
                                    "-1 (from capacity_factor) or a count >= 0");
  }
}

[[noreturn]] inline void fail_non_finite_logits(std::string_view router, std::int64_t token) {
  switchyard::detail::fail_config(router, "route", "logits", "NaN or inf",
                                  "finite logits (token " + std::to_string(token) +
                                      " has a NaN or infinite logit; routing it would silently "
                                      "pick arbitrary experts)");
}

/// Fixed token chunk of the router passes: independent of the thread count, so
/// per-chunk partial sums added in chunk order give bit-identical statistics.
inline constexpr std::int64_t router_chunk = 256;

/// sum_e p[e] * max(x[e], lowest), vectorised in a fixed order (deterministic).
template <class Arch, class T>
double clamped_dot(const T* p, const T* x, std::int64_t n) noexcept {
  const T lowest = std::numeric_limits<T>::lowest();
  std::int64_t e = 0;
  T dot(0);
  if constexpr (!simd::is_scalar_v<Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    B d(T(0));
    const B lo(lowest);
    for (; e + L <= n; e += L) {
      d = xsimd::fma(B::load_unaligned(p + e), xsimd::max(B::load_unaligned(x + e), lo), d);
    }
    dot = simd::hsum(d);
  }
  for (; e < n; ++e) dot += p[e] * std::max(x[e], lowest);
  return static_cast<double>(dot);
}

/// What a router writes into a caller's scores buffer: softmax(logits) (the routing
/// probabilities of the softmax routers) or relu(logits) (ReLU routing's gates).
enum class ScoreKind { softmax, relu };

/// Checks a caller's scores buffer before routing: [T, E] like logits, unit inner stride,
/// not overlapping logits. Names the router and both shapes.
template <class T>
void check_scores_out(std::string_view router, ConstView<T, 2> logits, View<T, 2> scores) {
  core::detail::check_shape<T, 2>(router, "route", "scores", scores, {"T", "E"}, logits.shape(),
                                  "one score per (token, expert), like logits");
  core::detail::check_unit_inner_stride(router, "route", "scores", scores);
  core::detail::check_no_alias(router, "route", "scores", scores, "logits", logits);
}

/// scores[t, :] = the router's per-expert scores of routed token t (same kernel, so the
/// same values the router chose from), 0 for masked tokens. Run after route(), which has
/// rejected non-finite logits. Costs one pass over [T, E]; only callers who ask pay it.
template <class T, class Arch = simd::default_arch>
void write_scores(ConstView<T, 2> logits, const TokenMask& mask, ScoreKind kind,
                  View<T, 2> scores) {
  const std::int64_t tokens = logits.extent(0), experts = logits.extent(1);
  parallel_for(num_chunks(tokens, router_chunk), [&](std::int64_t c) {
    for (std::int64_t t = c * router_chunk; t < std::min(tokens, (c + 1) * router_chunk); ++t) {
      T* out = scores.data() + t * scores.stride(0);
      const T* x = logits.data() + t * logits.stride(0);
      if (!mask.routed(t)) {
        std::fill_n(out, experts, T(0));
      } else if (kind == ScoreKind::softmax) {
        kernels::softmax_row(Arch{}, x, out, experts);
      } else {
        for (std::int64_t e = 0; e < experts; ++e) out[e] = std::max(x[e], T(0));
      }
    }
  });
}

/// probs [T*E] = row softmax of the routed tokens' logits (masked rows are 0),
/// and the softmax statistics over routed tokens: stats.mean_prob, z_loss,
/// entropy, routed_tokens. prob_sum [E] gets sum_t p[t,e]. Throws config_error
/// (naming the router and the token) on a NaN or infinite logit.
template <class T, class Arch = simd::default_arch>
void softmax_scores(std::string_view router, ConstView<T, 2> logits, const TokenMask& mask,
                    std::vector<T>& probs, std::vector<double>& prob_sum, RouterStats& stats) {
  const std::int64_t tokens = logits.extent(0), experts = logits.extent(1);
  probs.resize(static_cast<std::size_t>(tokens * experts));
  const std::int64_t chunks = num_chunks(tokens, router_chunk);
  const std::int64_t width = experts + 3;  // prob sums, lse^2, entropy, first bad token
  std::vector<double> partial(static_cast<std::size_t>(chunks * width), 0.0);
  parallel_for(chunks, [&](std::int64_t c) {
    double* acc = partial.data() + c * width;
    acc[experts + 2] = -1;
    for (std::int64_t t = c * router_chunk; t < std::min(tokens, (c + 1) * router_chunk); ++t) {
      T* p = probs.data() + t * experts;
      if (!mask.routed(t)) {
        std::fill_n(p, experts, T(0));
        continue;
      }
      const T* x = logits.data() + t * logits.stride(0);
      T lse;
      kernels::softmax_row(Arch{}, x, p, experts, &lse);
      if (!std::isfinite(lse)) {
        if (acc[experts + 2] < 0) acc[experts + 2] = static_cast<double>(t);
        continue;
      }
      // entropy = lse - sum_e p x, since log p = x - lse. A -inf logit (expert ruled
      // out) has p = 0; clamping x to the lowest finite value makes its term 0, not NaN.
      // The probability sums stay in double so a token's contribution does not depend
      // on which other tokens share its chunk (masked and unmasked runs agree).
      for (std::int64_t e = 0; e < experts; ++e) acc[e] += static_cast<double>(p[e]);
      const double px = clamped_dot<Arch>(p, x, experts);
      acc[experts] += static_cast<double>(lse) * lse;
      acc[experts + 1] += static_cast<double>(lse) - px;
    }
  });
  prob_sum.assign(static_cast<std::size_t>(experts), 0.0);
  double lse2 = 0, entropy = 0;
  for (std::int64_t c = 0; c < chunks; ++c) {
    const double* acc = partial.data() + c * width;
    if (acc[experts + 2] >= 0)
      fail_non_finite_logits(router, static_cast<std::int64_t>(acc[experts + 2]));
    for (std::int64_t e = 0; e < experts; ++e) prob_sum[e] += acc[e];
    lse2 += acc[experts];
    entropy += acc[experts + 1];
  }
  const std::int64_t routed = mask.count(tokens);
  stats.routed_tokens = routed;
  stats.mean_prob.assign(static_cast<std::size_t>(experts), 0.0);
  if (routed > 0) {
    for (std::int64_t e = 0; e < experts; ++e) stats.mean_prob[e] = prob_sum[e] / routed;
    stats.z_loss = lse2 / routed;
    stats.entropy = entropy / routed;
  }
}

/// Full ranking of one row p: [n] (no NaN) by (value descending, index ascending):
/// writes the first `keep` ranked entries to idx / val. Each entry's rank is the
/// number of entries ranked before it, counted for L entries at a time against
/// every entry: branch-free, O(n^2 / L) (TopPRouter's full rows, and the candidates
/// of TopPRouter's and ReluRouter's sorted prefixes). `buf` is scratch.
template <class Arch, class T>
void rank_row(Arch, const T* p, std::int64_t n, std::int64_t keep, std::int32_t* idx, T* val,
              std::vector<T>& buf) {
  if constexpr (simd::is_scalar_v<Arch>) {
    std::vector<std::pair<T, std::int32_t>> v(static_cast<std::size_t>(n));
    for (std::int64_t e = 0; e < n; ++e) v[e] = {p[e], static_cast<std::int32_t>(e)};
    std::stable_sort(v.begin(), v.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    for (std::int64_t j = 0; j < keep; ++j) {
      idx[j] = v[j].second;
      val[j] = v[j].first;
    }
  } else {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    const std::int64_t np = (n + L - 1) / L * L;
    buf.assign(static_cast<std::size_t>(np), T(-1));  // padding: its lanes' ranks go unused
    std::copy(p, p + n, buf.begin());
    alignas(64) T lane[L];
    for (std::int64_t l = 0; l < L; ++l) lane[l] = static_cast<T>(l);
    const B iota = B::load_aligned(lane), one(T(1)), zero(T(0));
    alignas(64) T cnt_out[L];
    for (std::int64_t a0 = 0; a0 < np; a0 += L) {
      const B va = B::load_unaligned(buf.data() + a0);
      const B ia = iota + B(static_cast<T>(a0));
      // Entry b ranks before entry a if larger, or equal with b < a: entries before
      // the block count when >=, entries after it when >, and only the block itself
      // needs the index test.
      // Four counters: the adds are not one serial dependency chain.
      B c0(T(0)), c1(T(0)), c2(T(0)), c3(T(0));
      const std::int64_t b_mid = std::min(n, a0 + L);
      std::int64_t b = 0;
      for (; b + 4 <= a0; b += 4) {
        c0 += xsimd::select(B(buf[b]) >= va, one, zero);
        c1 += xsimd::select(B(buf[b + 1]) >= va, one, zero);
        c2 += xsimd::select(B(buf[b + 2]) >= va, one, zero);
        c3 += xsimd::select(B(buf[b + 3]) >= va, one, zero);
      }
      for (; b < a0; ++b) c0 += xsimd::select(B(buf[b]) >= va, one, zero);
      for (; b < b_mid; ++b) {
        const B vb(buf[b]), ib(static_cast<T>(b));
        c1 += xsimd::select((vb > va) | ((vb == va) & (ib < ia)), one, zero);
      }
      for (; b + 4 <= n; b += 4) {
        c0 += xsimd::select(B(buf[b]) > va, one, zero);
        c1 += xsimd::select(B(buf[b + 1]) > va, one, zero);
        c2 += xsimd::select(B(buf[b + 2]) > va, one, zero);
        c3 += xsimd::select(B(buf[b + 3]) > va, one, zero);
      }
      for (; b < n; ++b) c0 += xsimd::select(B(buf[b]) > va, one, zero);
      const B cnt = (c0 + c1) + (c2 + c3);
      cnt.store_aligned(cnt_out);
      for (std::int64_t l = 0; l < L && a0 + l < n; ++l) {
        const auto r = static_cast<std::int64_t>(cnt_out[l]);
        if (r < keep) {
          idx[r] = static_cast<std::int32_t>(a0 + l);
          val[r] = buf[a0 + l];
        }
      }
    }
  }
}

}  // namespace detail
}  // namespace moe
}  // namespace v0
}  // namespace switchyard
