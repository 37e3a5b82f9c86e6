#pragma once
// CapacityRouter: token-choice top-k routing with a per-expert capacity, as in
// Megatron-LM core (Switch Transformer top-1 when top_k = 1).
//
// Semantics, per routed token t with logits x[t, :] ([T, E]):
//   pre_softmax = true  (Switch top-1, Megatron --moe-router-pre-softmax):
//     p[t, :] = softmax(x[t, :]) over all E experts; the k experts with the
//     largest p[t, e], best first; gate = p[t, e] (the full-softmax probability,
//     not renormalised over the k).
//   pre_softmax = false (Megatron default):
//     the k experts with the largest logits, best first; gate = softmax over
//     those k logits (so the k gates sum to 1). Megatron refuses this with
//     top_k = 1 (the gate would always be 1), and so does this router.
//   Ties go to the lower expert index (core::topk's order).
// Capacity (Megatron get_capacity(T * k, E, cf, min_capacity)):
//   capacity = max(ceil(T * k / E * capacity_factor), min_capacity), T = routed
//   (unmasked) tokens. An expert can hold each token once, so a capacity above T
//   is clamped to T; plan.requested_capacity keeps the formula's value and
//   plan.capacity_clamped says so (Megatron's torch.topk would fail there).
// Dropping, per expert e whose n_e chosen assignments exceed the capacity:
//   drop_policy = probs    (Megatron "probs"): keep the `capacity` assignments
//     with the largest gate (a top-c over tokens of the dense gate column);
//     equal gates go to the lower token index;
//   drop_policy = position (Megatron "position"): keep the first `capacity`
//     tokens in token order that chose e. (Megatron takes a torch.topk of the
//     0/1 routing column, whose tie order is unspecified; token order is the
//     intent and is what this router does.)
//   Dropped pairs stay in plan.choice_expert with weight 0 and are listed in
//   plan.dropped; the surviving gates are NOT renormalised; a token left with
//   no expert outputs 0 (stats.tokens_without_expert counts them).
// Masked tokens (TokenMask) get no expert and count in no statistic, loss or
// capacity. T = 0 or all tokens masked gives a valid empty plan with zero losses.
//
// Statistics (coefficient 1; T = routed tokens, in double):
//   stats.tokens_per_expert = n_e, assignments chosen BEFORE dropping;
//   stats.kept_per_expert   = assignments kept (CSR run lengths);
//   stats.aux_loss = Megatron switch_load_balancing_loss = E / (T^2 k) sum_e n_e P_e,
//     P_e = sum_t softmax(x[t])[e], the FULL softmax of the logits in both
//     modes (Megatron TopKRouter.aux_loss_load_balancing passes
//     torch.softmax(logits) to the loss whatever pre_softmax is);
//   stats.z_loss = mean_t logsumexp(x[t])^2 (Megatron z_loss_func);
//   stats.entropy, stats.mean_prob[e] = P_e / T: of the full softmax.
// Reference: thu-ml/ReMoE @ 463c6af (vendored Megatron-LM core),
// megatron/core/transformer/moe/moe_utils.py topk_softmax_with_capacity
// (pad_to_capacity = false), get_capacity, switch_load_balancing_loss_func,
// z_loss_func; router.py TopKRouter.aux_loss_load_balancing (train mode).
//
// Cost: one vectorised softmax pass (detail::softmax_scores) into a
// thread-local buffer reused across calls, one top-k pass per token over fixed
// token chunks (k <= 8: a branch-free compare-exchange list run on SIMD lanes,
// one token per lane; larger k: core selection), a counting sort
// of the assignments by expert, a threshold selection (nth_element) for each
// expert over capacity, and the CSR build. Bit-identical for any thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
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

/// Which assignments an expert over capacity keeps.
enum class DropPolicy {
  probs,     ///< the largest gates (ties: lower token index); Megatron "probs"
  position,  ///< the first tokens in token order; Megatron "position"
};

struct CapacityRouterConfig {
  std::int64_t num_experts = 0;   ///< E (Megatron num_moe_experts); >= 1
  std::int64_t top_k = 1;         ///< K experts per token (Megatron moe_router_topk); 1..E
  double capacity_factor = 1.0;   ///< Megatron moe_expert_capacity_factor; finite, > 0
  std::int64_t min_capacity = 0;  ///< lower bound on the capacity; >= 0
  /// true: softmax over all experts, then top-k, gate = full probability;
  /// false: top-k of the logits, gate = softmax over the k (needs top_k >= 2).
  bool pre_softmax = true;
  DropPolicy drop_policy = DropPolicy::probs;  ///< Megatron moe_token_drop_policy
};

namespace detail {

/// Per-thread buffers of CapacityRouter, reused across calls.
template <class T>
struct CapacityScratch {
  std::vector<T> probs;
  std::vector<double> prob_sum;
  std::vector<std::uint8_t> keep;
  std::vector<std::int64_t> offsets;
  std::vector<std::int32_t> bucket;
  std::vector<T> gates;
};

template <class T>
CapacityScratch<T>& capacity_scratch() {
  thread_local CapacityScratch<T> s;
  return s;
}

/// Top-K of L rows at once (L = lanes of T on Arch), one row per lane. tile:
/// [n][L] (entry e of the L rows at tile + e*L), no NaN; 1 <= K <= n. Out:
/// val[j*L + l], idx[j*L + l] = the j-th best of row l, in core::topk's order
/// (value descending, then index ascending). Each entry, in index order, is
/// pushed down a sorted register list by compare-exchange; the list starts at
/// (-inf, index n), below every real entry, -inf included. Branch-free.
template <int K, class Arch, class T>
void capacity_topk_lanes(Arch, const T* tile, std::int64_t n, T* val, T* idx) noexcept {
  using B = xsimd::batch<T, Arch>;
  constexpr std::int64_t L = B::size;
  B v[K], vi[K];
  for (int j = 0; j < K; ++j) {
    v[j] = B(-std::numeric_limits<T>::infinity());
    vi[j] = B(static_cast<T>(n));
  }
  for (std::int64_t e = 0; e < n; ++e) {
    B x = B::load_unaligned(tile + e * L);
    B xi(static_cast<T>(e));
    for (int j = 0; j < K; ++j) {
      const auto ahead = (x > v[j]) | ((x == v[j]) & (xi < vi[j]));
      const B keep_v = xsimd::select(ahead, x, v[j]), pass_v = xsimd::select(ahead, v[j], x);
      const B keep_i = xsimd::select(ahead, xi, vi[j]), pass_i = xsimd::select(ahead, vi[j], xi);
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

/// For each routed row t in [t0, t1) of src (row t at src + t * row_stride, n
/// entries, no NaN in routed rows), the k largest entries best first (ties to
/// the lower index): visit(t, index_of, value_of) with index_of(j), value_of(j)
/// for j < k. SIMD lanes path for k <= 8 (rows transposed L at a time into a
/// thread-local tile), else the core row kernels. Same result on every path.
template <class T, class Arch, class Visit>
void capacity_topk_rows(const T* src, std::int64_t row_stride, std::int64_t t0, std::int64_t t1,
                        std::int64_t n, std::int64_t k, const TokenMask& mask, Visit&& visit) {
  if constexpr (!simd::is_scalar_v<Arch>) {
    if (k <= 8 && n < (std::int64_t{1} << std::numeric_limits<T>::digits)) {
      constexpr std::int64_t L = simd::lanes_v<T, Arch>;
      thread_local std::vector<T> tile_buf;
      tile_buf.resize(static_cast<std::size_t>(n * L));
      T* tile = tile_buf.data();
      alignas(64) T val[8 * L];
      alignas(64) T idx[8 * L];
      for (std::int64_t t = t0; t < t1; t += L) {
        const std::int64_t rows = std::min<std::int64_t>(L, t1 - t);
        for (std::int64_t l = 0; l < L; ++l) {
          const bool real = l < rows && mask.routed(t + l);  // masked rows may hold NaN
          const T* p = src + (t + l) * row_stride;
          for (std::int64_t e = 0; e < n; ++e) tile[e * L + l] = real ? p[e] : T(0);
        }
        switch (k) {
          case 1:
            capacity_topk_lanes<1>(Arch{}, tile, n, val, idx);
            break;
          case 2:
            capacity_topk_lanes<2>(Arch{}, tile, n, val, idx);
            break;
          case 3:
            capacity_topk_lanes<3>(Arch{}, tile, n, val, idx);
            break;
          case 4:
            capacity_topk_lanes<4>(Arch{}, tile, n, val, idx);
            break;
          case 5:
            capacity_topk_lanes<5>(Arch{}, tile, n, val, idx);
            break;
          case 6:
            capacity_topk_lanes<6>(Arch{}, tile, n, val, idx);
            break;
          case 7:
            capacity_topk_lanes<7>(Arch{}, tile, n, val, idx);
            break;
          default:
            capacity_topk_lanes<8>(Arch{}, tile, n, val, idx);
            break;
        }
        for (std::int64_t l = 0; l < rows; ++l) {
          if (!mask.routed(t + l)) continue;
          visit(
              t + l, [&](std::int64_t j) { return static_cast<std::int64_t>(idx[j * L + l]); },
              [&](std::int64_t j) { return val[j * L + l]; });
        }
      }
      return;
    }
  }
  std::int64_t ix_small[8];
  T vx_small[8];
  std::vector<std::int64_t> ix_big;
  std::vector<T> vx_big;
  std::vector<std::pair<T, std::int64_t>> select_scratch;
  if (k > 8) {
    ix_big.resize(static_cast<std::size_t>(k));
    vx_big.resize(static_cast<std::size_t>(k));
  }
  std::int64_t* ix = k > 8 ? ix_big.data() : ix_small;
  T* vx = k > 8 ? vx_big.data() : vx_small;
  for (std::int64_t t = t0; t < t1; ++t) {
    if (!mask.routed(t)) continue;
    const T* p = src + t * row_stride;
    if (k == 1) {
      kernels::argmax_row(p, n, ix, vx);
    } else if (k <= 8) {
      kernels::topk_row_insertion(p, n, k, ix, vx);
    } else {
      kernels::topk_row_select(p, n, k, ix, vx, select_scratch);
    }
    visit(
        t, [&](std::int64_t j) { return ix[j]; }, [&](std::int64_t j) { return vx[j]; });
  }
}

/// Marks keep[entries[j]] = 0 for all but the `cap` entries with the largest
/// gate[entries[j]]; among equal gates the earlier entry (lower token) wins.
/// `entries` is in token order. `work` is scratch.
template <class T>
void keep_top_gates(const std::int32_t* entries, std::int64_t n, std::int64_t cap, const T* gate,
                    std::uint8_t* keep, std::vector<T>& work) {
  if (cap >= n) return;
  if (cap <= 0) {
    for (std::int64_t j = 0; j < n; ++j) keep[entries[j]] = 0;
    return;
  }
  work.resize(static_cast<std::size_t>(n));
  for (std::int64_t j = 0; j < n; ++j) work[j] = gate[entries[j]];
  std::nth_element(work.begin(), work.begin() + (cap - 1), work.end(), std::greater<T>());
  const T thr = work[cap - 1];
  std::int64_t above = 0;
  for (std::int64_t j = 0; j < n; ++j) above += gate[entries[j]] > thr;
  std::int64_t equal_quota = cap - above;  // >= 1: thr itself is among the top cap
  for (std::int64_t j = 0; j < n; ++j) {
    const T g = gate[entries[j]];
    if (g > thr) continue;
    if (g == thr && equal_quota > 0) {
      --equal_quota;
      continue;
    }
    keep[entries[j]] = 0;
  }
}

}  // namespace detail

template <class T = float, class Arch = simd::default_arch>
class CapacityRouter {
 public:
  using config_type = CapacityRouterConfig;
  static constexpr std::string_view name = "CapacityRouter";

  /// Throws config_error (naming CapacityRouter and the field) if num_experts < 1,
  /// top_k outside 1..num_experts, capacity_factor not finite or <= 0,
  /// min_capacity < 0, or pre_softmax = false with top_k = 1.
  explicit CapacityRouter(const CapacityRouterConfig& config) : config_(config) {
    detail::check_num_experts(name, config_.num_experts);
    detail::check_top_k(name, config_.top_k, config_.num_experts);
    detail::check_positive_finite(name, "capacity_factor", config_.capacity_factor);
    if (config_.min_capacity < 0) {
      switchyard::detail::fail_config(name, "config", "min_capacity", config_.min_capacity, ">= 0");
    }
    if (!config_.pre_softmax && config_.top_k == 1) {
      switchyard::detail::fail_config(name, "config", "pre_softmax", "false",
                                      "true when top_k = 1 (a softmax over one selected logit "
                                      "is always 1; Megatron refuses it too)");
    }
  }

  const CapacityRouterConfig& config() const noexcept { return config_; }
  std::int64_t num_experts() const noexcept { return config_.num_experts; }
  std::int64_t top_k() const noexcept { return config_.top_k; }

  /// logits: [T, E] (unit inner stride); mask: empty or [T] (True = routed).
  /// Fills plan (reusing its memory): K = top_k choices per routed token,
  /// plan.capacity as in the file comment, dropped pairs in plan.dropped.
  /// Throws shape_error on a shape/stride/mask-length mismatch, config_error on
  /// a NaN or infinite logit of a routed token.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask = {}) const {
    const std::int64_t experts = config_.num_experts, k = config_.top_k;
    detail::check_logits(name, logits, experts, mask);
    const std::int64_t tokens = logits.extent(0);
    plan.reset(tokens, experts, k);
    auto& s = detail::capacity_scratch<T>();
    detail::softmax_scores<T, Arch>(name, logits, mask, s.probs, s.prob_sum, plan.stats);
    const std::int64_t routed = plan.stats.routed_tokens;

    // 1. Top-k per token into the [T, K] views (gates before capacity).
    const T* probs = s.probs.data();
    std::int32_t* choice = plan.choice_expert.data();
    T* weight = plan.choice_weight.data();
    const bool pre = config_.pre_softmax;
    const T* src = pre ? probs : logits.data();
    const std::int64_t row_stride = pre ? experts : logits.stride(0);
    parallel_for(num_chunks(tokens, detail::router_chunk), [&](std::int64_t c) {
      const std::int64_t t0 = c * detail::router_chunk;
      detail::capacity_topk_rows<T, Arch>(
          src, row_stride, t0, std::min(tokens, t0 + detail::router_chunk), experts, k, mask,
          [&](std::int64_t t, auto&& index_of, auto&& value_of) {
            std::int32_t* ce = choice + t * k;
            T* cw = weight + t * k;
            for (std::int64_t j = 0; j < k; ++j) ce[j] = static_cast<std::int32_t>(index_of(j));
            if (pre) {
              for (std::int64_t j = 0; j < k; ++j) cw[j] = value_of(j);
            } else {  // softmax over the k selected logits; value_of(0) is their maximum
              const T top = value_of(0);
              T sum(0);
              for (std::int64_t j = 0; j < k; ++j) {
                cw[j] = std::exp(value_of(j) - top);
                sum += cw[j];
              }
              for (std::int64_t j = 0; j < k; ++j) cw[j] /= sum;
            }
          });
    });

    // 2. Counts before capacity, and the capacity.
    auto& n_e = plan.stats.tokens_per_expert;
    for (std::int64_t i = 0; i < tokens * k; ++i) {
      if (choice[i] >= 0) ++n_e[choice[i]];
    }
    const Capacity cap = compute_capacity(routed, k, experts, config_.capacity_factor,
                                          CapacityRounding::ceil, config_.min_capacity);
    set_capacity(plan, cap);

    // 3. Drop what exceeds capacity: assignments bucketed by expert in token order.
    s.keep.assign(static_cast<std::size_t>(tokens * k), 1);
    bool any_over = false;
    for (std::int64_t e = 0; e < experts; ++e) any_over |= n_e[e] > cap.value;
    if (any_over) {
      s.offsets.assign(static_cast<std::size_t>(experts + 1), 0);
      for (std::int64_t e = 0; e < experts; ++e) s.offsets[e + 1] = s.offsets[e] + n_e[e];
      s.bucket.resize(static_cast<std::size_t>(s.offsets[experts]));
      std::vector<std::int64_t>& cursor = s.offsets;  // advanced to the run ends, then restored
      for (std::int64_t i = 0; i < tokens * k; ++i) {
        if (choice[i] >= 0) s.bucket[cursor[choice[i]]++] = static_cast<std::int32_t>(i);
      }
      for (std::int64_t e = experts; e > 0; --e) cursor[e] = cursor[e - 1];
      cursor[0] = 0;
      for (std::int64_t e = 0; e < experts; ++e) {
        if (n_e[e] <= cap.value) continue;
        const std::int32_t* entries = s.bucket.data() + s.offsets[e];
        if (config_.drop_policy == DropPolicy::position) {
          for (std::int64_t j = cap.value; j < n_e[e]; ++j) s.keep[entries[j]] = 0;
        } else {
          detail::keep_top_gates(entries, n_e[e], cap.value, weight, s.keep.data(), s.gates);
        }
      }
    }
    detail::build_csr_from_choices(
        plan, any_over ? std::span<const std::uint8_t>(s.keep) : std::span<const std::uint8_t>());
    plan.stats.aux_loss = switch_load_balancing_loss(n_e, s.prob_sum, routed, k);
  }

  /// Allocating convenience: a fresh plan.
  DispatchPlan<T> route(ConstView<T, 2> logits, const TokenMask& mask = {}) const {
    DispatchPlan<T> plan;
    route(logits, plan, mask);
    return plan;
  }

 private:
  CapacityRouterConfig config_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
