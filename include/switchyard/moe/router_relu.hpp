#pragma once
// ReLU routing (ReMoE, Wang et al. 2024) and its adaptive L1 coefficient.
//
// Mirrors thu-ml/ReMoE @ 463c6af, megatron/core/transformer/moe/router.py,
// ReLURouter.routing -> l1_reg_load_balancing -> apply_l1_reg (train mode), and
// the coefficient update of megatron/training/training.py.
//
// ReluRouter::route(logits [T, E]):
//   gate[t,e] = relu(logits[t,e]); expert e is active for token t iff
//   logits[t,e] > 0 (strictly: 0 and -0 are inactive). No softmax, no top-k, no
//   normalisation, no capacity: a token uses 0..E experts, each with weight gate.
//   plan.top_k = K, the most active experts of any routed token (at least 1). The
//   [T, K] choice views list a token's active experts best first (larger gate first,
//   ties toward the lower expert index), then -1 / weight 0 in the unused slots; slot
//   s of a CSR entry is that rank. capacity = -1 (dropless), nothing is dropped.
// stats (routed tokens only; T below = routed tokens):
//   tokens_per_expert = kept_per_expert = n_e, active tokens of expert e;
//   mean_prob[e] = mean_t gate[t,e];
//   aux_loss = E / (T^2 k) * sum_e n_e * sum_t gate[t,e] with k = topk_for_target:
//     the UNSCALED L1 term (Megatron switch_load_balancing_loss_func with
//     coefficient 1 on the ReLU gates, what the reference logs as l1_reg_loss).
//     Multiply by the L1Controller coefficient (L1Controller::loss) for the
//     term added to the training loss;
//   z_loss = mean_t logsumexp(logits[t])^2 and entropy = mean_t entropy of
//     softmax(logits[t]) (diagnostics on the raw logits, computed as in the
//     softmax routers; the ReLU gates are not a distribution);
//   tokens_without_expert = routed tokens with no positive logit (output 0);
//   dropped = 0.
// ReluRouter::sparsity(plan) = 1 - active pairs / (T * E) over routed tokens
// (1 when no token is routed); target_sparsity() = 1 - k/E.
// Masked tokens (TokenMask keep = 0) get no expert and count in no statistic,
// loss or sparsity. T = 0 gives an empty plan with zero losses.
// Errors: config_error (naming "ReluRouter") for num_experts < 1,
// topk_for_target outside [1, E], a NaN or +inf logit or a row of only -inf (its
// logsumexp is not finite; a single -inf logit is simply inactive); shape_error for logits
// not [T, E] or a mask not [T].
//
// Cost per routed token: a softmax pass for the diagnostics, then the ordering of the
// active experts: with E >= 32 the a active ones are gathered branch-free and ranked
// by branch-free counting among themselves (detail::rank_row, O(E + a^2 / lanes));
// below, all E at once (relu_ranks, O(E^2 / lanes)). A counting pass first sizes the
// [T, K] views to the most active experts of one token, so no [T, E] view is cleared or
// written. Measured (1 thread, Emerald Rapids, about 8 of 256 active, T = 4096): 3.5 ms
// with [T, E] views, 2.2 ms now.
//
// L1Controller: the adaptive coefficient lambda of the L1 term, with its state
// kept outside (L1ControllerState) so the controller itself is immutable.
//   loss(state, l1_unscaled) = state.coeff * l1_unscaled;
//   update(state, sparsity): if sparsity < target_sparsity then coeff *= multiplier,
//   else coeff /= multiplier (strict '<': a sparsity equal to the target lowers
//   the coefficient), as the reference does once per iteration, after the step,
//   from that iteration's sparsity; the iteration's loss uses the coefficient
//   before the update. With several MoE layers or micro-batches, call update once
//   per iteration with one value for all of them (e.g. their mean sparsity).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/softmax.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/losses.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

namespace detail {

inline std::int64_t relu_padded(std::int64_t n, std::size_t lanes) noexcept {
  const auto l = static_cast<std::int64_t>(lanes);
  return (n + l - 1) / l * l;
}

/// x: [n] (finite or -inf, no NaN). rank[e] = #{j : x_j > x_e}, counted with SIMD over
/// e and no branches (faster than sorting at router sizes). For a positive x_e no
/// non-positive x_j counts, so without ties the ranks of the a positive entries are a
/// permutation of 0..a-1 (they sum to a(a-1)/2); a tie lowers that sum.
/// padded, rank: scratch of relu_padded(n, lanes) entries each.
template <class Arch, class T>
void relu_ranks(const T* x, T* padded, T* rank, std::int64_t n) noexcept {
  if constexpr (simd::is_scalar_v<Arch>) {
    (void)padded;
    for (std::int64_t e = 0; e < n; ++e) {
      std::int64_t r = 0;
      for (std::int64_t j = 0; j < n; ++j) r += x[j] > x[e];
      rank[e] = static_cast<T>(r);
    }
  } else {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    const std::int64_t np = relu_padded(n, L);
    std::copy(x, x + n, padded);
    std::fill(padded + n, padded + np, -std::numeric_limits<T>::infinity());
    const B one(T(1)), zero(T(0));
    for (std::int64_t eb = 0; eb < np; eb += L) {
      const B xe = B::load_unaligned(padded + eb);
      B a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
      std::int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        a0 += xsimd::select(B(x[j]) > xe, one, zero);
        a1 += xsimd::select(B(x[j + 1]) > xe, one, zero);
        a2 += xsimd::select(B(x[j + 2]) > xe, one, zero);
        a3 += xsimd::select(B(x[j + 3]) > xe, one, zero);
      }
      for (; j < n; ++j) a0 += xsimd::select(B(x[j]) > xe, one, zero);
      ((a0 + a1) + (a2 + a3)).store_unaligned(rank + eb);
    }
  }
}

/// count[e] += (x_e > 0) for e < n; padded: x with a -inf tail (relu_ranks leaves it
/// so); count: relu_padded(n, lanes) entries. Exact: a chunk adds at most 2^24 ones.
template <class Arch, class T>
void relu_count_active(const T* x, const T* padded, T* count, std::int64_t n) noexcept {
  if constexpr (simd::is_scalar_v<Arch>) {
    (void)padded;
    for (std::int64_t e = 0; e < n; ++e) count[e] += x[e] > T(0) ? T(1) : T(0);
  } else {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    const B one(T(1)), zero(T(0));
    for (std::int64_t e = 0; e < relu_padded(n, L); e += L) {
      const B c = B::load_unaligned(count + e) +
                  xsimd::select(B::load_unaligned(padded + e) > zero, one, zero);
      c.store_unaligned(count + e);
    }
  }
}

/// From this many experts on ReluRouter ranks only a row's active experts
/// (relu_order_actives); below, all experts at once (relu_ranks).
inline constexpr std::int64_t relu_rank_actives_min_experts = 32;

/// Scratch of relu_order_actives, reused across rows.
template <class T>
struct ReluActives {
  std::vector<T> val, buf;
  std::vector<std::int32_t> idx, ord;
};

/// One row x: [n] (no NaN, no +inf): its a active experts (x_e > 0) into ce / cw
/// best first (larger gate, then lower index), and count[e] += (x_e > 0), as the
/// relu_ranks path does. The actives are gathered branch-free in index order and
/// ranked among themselves by counting (rank_row): O(n + a^2 / lanes).
/// padded, count: relu_padded(n, lanes) entries.
template <class Arch, class T>
[[gnu::noinline]] void relu_order_actives(const T* x, std::int64_t n, T* padded, T* count,
                                          std::int32_t* ce, T* cw, ReluActives<T>& s) {
  s.val.resize(static_cast<std::size_t>(n + 1));
  s.idx.resize(static_cast<std::size_t>(n + 1));
  s.ord.resize(static_cast<std::size_t>(n + 1));
  std::int64_t active = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    s.val[active] = x[j];
    s.idx[active] = static_cast<std::int32_t>(j);
    active += x[j] > T(0);
  }
  const std::int64_t np = relu_padded(n, simd::lanes_v<T, Arch>);
  std::copy(x, x + n, padded);  // relu_count_active reads the -inf tail
  std::fill(padded + n, padded + np, -std::numeric_limits<T>::infinity());
  relu_count_active<Arch>(x, padded, count, n);
  rank_row(Arch{}, s.val.data(), active, active, s.ord.data(), cw, s.buf);
  for (std::int64_t i = 0; i < active; ++i) ce[i] = s.idx[s.ord[i]];
}

}  // namespace detail

struct ReluRouterConfig {
  std::int64_t num_experts = 0;      ///< E (Megatron num_moe_experts)
  std::int64_t topk_for_target = 1;  ///< k (Megatron moe_router_topk): target 1 - k/E, L1 1/k
};

template <class T = float, class Arch = simd::default_arch>
class ReluRouter {
 public:
  using config_type = ReluRouterConfig;
  static constexpr std::string_view name = "ReluRouter";

  explicit ReluRouter(config_type cfg) : cfg_(cfg) {
    detail::check_num_experts(name, cfg_.num_experts);
    if (cfg_.topk_for_target < 1 || cfg_.topk_for_target > cfg_.num_experts) {
      switchyard::detail::fail_config(
          name, "config", "topk_for_target", cfg_.topk_for_target,
          "1 <= topk_for_target <= num_experts = " + std::to_string(cfg_.num_experts));
    }
  }

  std::int64_t num_experts() const noexcept { return cfg_.num_experts; }
  const config_type& config() const noexcept { return cfg_; }
  /// 1 - k/E, the sparsity the L1 coefficient steers toward.
  double target_sparsity() const noexcept {
    return 1.0 - static_cast<double>(cfg_.topk_for_target) / static_cast<double>(cfg_.num_experts);
  }

  /// logits: [T, E], unit inner stride. Fills plan (memory reused); see the file comment.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask = {}) const {
    const std::int64_t E = cfg_.num_experts;
    detail::check_logits(name, logits, E, mask);
    const std::int64_t tokens = logits.extent(0);
    const std::int64_t chunks = num_chunks(tokens, detail::router_chunk);
    // K = the most active experts of one routed token (at least 1): a counting pass first, so
    // the [T, K] views are sized once (not [T, E]).
    std::vector<std::int64_t> most(static_cast<std::size_t>(chunks), 1);
    parallel_for(chunks, [&](std::int64_t c) {
      const std::int64_t end = std::min(tokens, (c + 1) * detail::router_chunk);
      for (std::int64_t t = c * detail::router_chunk; t < end; ++t) {
        if (!mask.routed(t)) continue;
        const T* x = logits.data() + t * logits.stride(0);
        std::int64_t active = 0;
        for (std::int64_t e = 0; e < E; ++e) active += x[e] > T(0);
        most[c] = std::max(most[c], active);
      }
    });
    std::int64_t K = 1;
    for (const std::int64_t n : most) K = std::max(K, n);
    plan.reset(tokens, E, K);
    // Per chunk: active count [E], lse^2, entropy, first bad token.
    const std::int64_t width = E + 3;
    std::vector<double> partial(static_cast<std::size_t>(chunks * width), 0.0);
    parallel_for(chunks, [&](std::int64_t c) {
      double* acc = partial.data() + c * width;
      double* count = acc;
      acc[E + 2] = -1;
      std::vector<T> scratch(static_cast<std::size_t>(E));
      const auto np = static_cast<std::size_t>(detail::relu_padded(E, simd::lanes_v<T, Arch>));
      std::vector<T> padded(np), rank(np), active_count(np, T(0)), wt(E + 1);
      std::vector<std::int32_t> ord(E + 1);
      detail::ReluActives<T> act;
      const std::int64_t end = std::min(tokens, (c + 1) * detail::router_chunk);
      for (std::int64_t t = c * detail::router_chunk; t < end; ++t) {
        if (!mask.routed(t)) continue;
        const T* x = logits.data() + t * logits.stride(0);
        T lse;
        kernels::softmax_row(Arch{}, x, scratch.data(), E, &lse);
        if (!std::isfinite(lse)) {
          if (acc[E + 2] < 0) acc[E + 2] = static_cast<double>(t);
          continue;
        }
        // entropy = lse - sum_e p x, as the softmax routers compute it (a -inf logit has
        // p = 0 and contributes 0)
        acc[E] += static_cast<double>(lse) * lse;
        acc[E + 1] += static_cast<double>(lse) - detail::clamped_dot<Arch>(scratch.data(), x, E);
        if (E >= detail::relu_rank_actives_min_experts) {
          // Many experts: rank only the active ones, O(E + a^2 / lanes).
          detail::relu_order_actives<Arch>(x, E, padded.data(), active_count.data(),
                                           plan.choice_expert.data() + t * K,
                                           plan.choice_weight.data() + t * K, act);
          continue;
        }
        // Slot of an active expert = its rank (larger gate first); written branch-free,
        // inactive experts go to a dummy. Ties (equal gates) are re-ordered below.
        detail::relu_ranks<Arch>(x, padded.data(), rank.data(), E);
        detail::relu_count_active<Arch>(x, padded.data(), active_count.data(), E);
        std::int32_t* ce = plan.choice_expert.data() + t * K;
        T* cw = plan.choice_weight.data() + t * K;
        std::int64_t active = 0, rank_sum = 0;
        for (std::int64_t j = 0; j < E; ++j) {
          // Integer masks, not a ternary: compilers turn that into a branch that
          // mispredicts on the random signs of logits. Inactive experts go to slot E.
          const std::int64_t on = x[j] > T(0);
          const auto r = static_cast<std::int64_t>(rank[j]);
          const std::int64_t m = -on;
          const std::int64_t slot = (r & m) | (E & ~m);
          ord[slot] = static_cast<std::int32_t>(j);
          wt[slot] = x[j];
          active += on;
          rank_sum += r & m;
        }
        std::copy_n(ord.data(), active, ce);
        std::copy_n(wt.data(), active, cw);
        if (rank_sum != active * (active - 1) / 2) {  // equal gates: lower expert first
          std::int64_t a = 0;
          for (std::int64_t j = 0; j < E; ++j) {
            if (!(x[j] > T(0))) continue;
            std::int64_t i = a++;
            for (; i > 0 && x[ce[i - 1]] < x[j]; --i) ce[i] = ce[i - 1];
            ce[i] = static_cast<std::int32_t>(j);
          }
          for (std::int64_t i = 0; i < active; ++i) cw[i] = x[ce[i]];
        }
      }
      for (std::int64_t e = 0; e < E; ++e) count[e] = static_cast<double>(active_count[e]);
    });
    // Reduce in chunk order (bit-identical for any thread count); chunk c's first
    // CSR position inside expert e is the sum of the earlier chunks' counts.
    std::vector<std::int64_t> start(static_cast<std::size_t>(chunks * E), 0);
    double lse2 = 0, entropy = 0;
    for (std::int64_t c = 0; c < chunks; ++c) {
      const double* acc = partial.data() + c * width;
      if (acc[E + 2] >= 0)
        detail::fail_non_finite_logits(name, static_cast<std::int64_t>(acc[E + 2]));
      for (std::int64_t e = 0; e < E; ++e) {
        start[c * E + e] = plan.stats.tokens_per_expert[e];
        plan.stats.tokens_per_expert[e] += static_cast<std::int64_t>(acc[e]);
      }
      lse2 += acc[E];
      entropy += acc[E + 1];
    }
    auto& offsets = plan.expert_offsets;
    for (std::int64_t e = 0; e < E; ++e) {
      plan.stats.kept_per_expert[e] = plan.stats.tokens_per_expert[e];
      offsets[e + 1] = offsets[e] + plan.stats.tokens_per_expert[e];
    }
    const auto nnz = static_cast<std::size_t>(offsets[E]);
    plan.token_index.resize(nnz);
    plan.slot.resize(nnz);
    plan.gate.resize(nnz);
    std::vector<std::int64_t> without(static_cast<std::size_t>(chunks), 0);
    std::vector<double> gate_partial(static_cast<std::size_t>(chunks * E), 0.0);
    parallel_for(chunks, [&](std::int64_t c) {
      std::int64_t* cursor = start.data() + c * E;
      double* gsum = gate_partial.data() + c * E;
      for (std::int64_t e = 0; e < E; ++e) cursor[e] += offsets[e];
      const std::int64_t end = std::min(tokens, (c + 1) * detail::router_chunk);
      for (std::int64_t t = c * detail::router_chunk; t < end; ++t) {
        if (!mask.routed(t)) continue;
        const std::int32_t* ce = plan.choice_expert.data() + t * K;
        const T* cw = plan.choice_weight.data() + t * K;
        if (ce[0] < 0) ++without[c];
        for (std::int64_t s = 0; s < K && ce[s] >= 0; ++s) {
          const std::int64_t p = cursor[ce[s]]++;
          plan.token_index[p] = static_cast<std::int32_t>(t);
          plan.slot[p] = static_cast<std::int32_t>(s);
          plan.gate[p] = cw[s];
          gsum[ce[s]] += static_cast<double>(cw[s]);
        }
      }
    });
    std::vector<double> gate_sum(static_cast<std::size_t>(E), 0.0);  // in chunk order
    for (std::int64_t c = 0; c < chunks; ++c)
      for (std::int64_t e = 0; e < E; ++e) gate_sum[e] += gate_partial[c * E + e];
    const std::int64_t routed = mask.count(tokens);
    auto& st = plan.stats;
    st.routed_tokens = routed;
    for (std::int64_t c = 0; c < chunks; ++c) st.tokens_without_expert += without[c];
    if (routed > 0) {
      for (std::int64_t e = 0; e < E; ++e) st.mean_prob[e] = gate_sum[e] / routed;
      st.z_loss = lse2 / routed;
      st.entropy = entropy / routed;
      st.aux_loss =
          switch_load_balancing_loss(st.tokens_per_expert, gate_sum, routed, cfg_.topk_for_target);
      st.aux_loss_scaled = st.aux_loss;  // the coefficient is the L1Controller's state
    }
    detail::fill_choice_kept(plan);
  }

  /// route(logits, plan, mask) that also writes the routing scores [T, E] into `scores`
  /// (relu(logits), the gates; rows of masked tokens 0). Throws shape_error for a scores buffer
  /// that is not [T, E] with unit inner stride or that overlaps logits, before routing.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask,
             View<T, 2> scores) const {
    detail::check_scores_out(name, logits, scores);
    route(logits, plan, mask);
    detail::write_scores<T, Arch>(logits, mask, detail::ScoreKind::relu, scores);
  }

  /// Convenience: a fresh plan.
  DispatchPlan<T> route(ConstView<T, 2> logits, const TokenMask& mask = {}) const {
    DispatchPlan<T> plan;
    route(logits, plan, mask);
    return plan;
  }

  /// 1 - active pairs / (routed tokens * E) of a plan this router made; 1 if no token was routed.
  static double sparsity(const DispatchPlan<T>& plan) noexcept {
    const std::int64_t routed = plan.stats.routed_tokens;
    if (routed <= 0 || plan.num_experts <= 0) return 1.0;
    return 1.0 - static_cast<double>(plan.nnz()) /
                     (static_cast<double>(routed) * static_cast<double>(plan.num_experts));
  }

 private:
  config_type cfg_;
};

/// The L1 coefficient lambda in force; the controller updates it once per iteration.
struct L1ControllerState {
  double coeff = 1e-8;
};

struct L1ControllerConfig {
  double initial_coeff = 1e-8;  ///< ReMoE moe_relu_l1_reg_coeff (initial lambda)
  double multiplier = 1.2;      ///< ReMoE moe_relu_l1_reg_coeff_multiplier (alpha)
  /// Target sparsity in [0, 1); empty = 1 - topk_for_target / num_experts of the router
  /// config passed to the constructor (required when none is passed).
  std::optional<double> target_sparsity;
};

class L1Controller {
 public:
  using config_type = L1ControllerConfig;
  using state_type = L1ControllerState;
  static constexpr std::string_view name = "L1Controller";

  /// cfg.target_sparsity must be set.
  explicit L1Controller(config_type cfg) : cfg_(cfg) {
    if (!cfg_.target_sparsity) {
      switchyard::detail::fail_config(name, "config", "target_sparsity", "unset",
                                      "a value in [0, 1] (or construct from a ReluRouterConfig)");
    }
    validate();
  }
  /// Target from the router config (1 - k/E) unless cfg.target_sparsity is set.
  L1Controller(const ReluRouterConfig& router, config_type cfg = {}) : cfg_(cfg) {
    detail::check_num_experts(name, router.num_experts);
    if (router.topk_for_target < 1 || router.topk_for_target > router.num_experts) {
      switchyard::detail::fail_config(
          name, "config", "topk_for_target", router.topk_for_target,
          "1 <= topk_for_target <= num_experts = " + std::to_string(router.num_experts));
    }
    if (!cfg_.target_sparsity) {
      cfg_.target_sparsity = 1.0 - static_cast<double>(router.topk_for_target) /
                                       static_cast<double>(router.num_experts);
    }
    validate();
  }

  const config_type& config() const noexcept { return cfg_; }
  double target_sparsity() const noexcept { return *cfg_.target_sparsity; }
  /// State at the start of training: coeff = initial_coeff.
  state_type initial_state() const noexcept { return {cfg_.initial_coeff}; }

  /// The term added to the training loss: state.coeff * l1_unscaled
  /// (l1_unscaled = ReluRouter's plan.stats.aux_loss).
  double loss(const state_type& state, double l1_unscaled) const noexcept {
    return state.coeff * l1_unscaled;
  }

  /// After an iteration: coeff *= multiplier if sparsity < target, else coeff /= multiplier.
  /// Throws config_error on a NaN sparsity.
  void update(state_type& state, double sparsity) const {
    if (std::isnan(sparsity)) {
      switchyard::detail::fail_config(name, "update", "sparsity", sparsity, "a number in [0, 1]");
    }
    if (sparsity < *cfg_.target_sparsity) {
      state.coeff *= cfg_.multiplier;
    } else {
      state.coeff /= cfg_.multiplier;
    }
  }

 private:
  void validate() const {
    detail::check_positive_finite(name, "initial_coeff", cfg_.initial_coeff);
    detail::check_positive_finite(name, "multiplier", cfg_.multiplier);
    const double t = *cfg_.target_sparsity;
    if (!(t >= 0.0 && t <= 1.0)) {
      switchyard::detail::fail_config(name, "config", "target_sparsity", t, "a value in [0, 1]");
    }
  }

  config_type cfg_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
