#pragma once
// HashRouter: "Hash Layers For Large Sparse Models" (Roller et al., 2021). No
// parameters: a token goes to an expert fixed by a hash of its token id, with
// gate 1, so routing needs no training and is perfectly reproducible.
//
// Hash: SplitMix64 (Steele, Lea and Flood 2014; Vigna's splitmix64.c) seeded with
// s = uint64(token_id) XOR seed. Draw j (j = 0, 1, 2, ...) is the (j+1)-th output of
// that generator:
//   z = s + (j + 1) * 0x9E3779B97F4A7C15            (mod 2^64)
//   z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
//   z = (z ^ (z >> 27)) * 0x94D049BB133111EB
//   hash = z ^ (z >> 31)
// and candidate expert j = hash % E (the modulo bias, below E / 2^64, is negligible).
// E.g. token 0, seed 0: draw 0 = 0xE220A8397B1DCDAF, so expert 47 of 64.
// top_k = 1 (the paper's setting): expert = candidate 0, gate 1.
// top_k = k > 1: the first k DISTINCT candidates in draw order (a repeated
// candidate is skipped), slot j = the j-th distinct one, each with gate 1/k so the
// combine is the mean of the k experts' outputs (k = 1 gives gate 1).
// The paper's "random hash" is a random lookup table over the vocabulary; a fixed
// 64-bit mix is the same in distribution for a fixed seed, needs no table and
// works for any id. Change `seed` to get a different assignment.
//
// It takes token ids, not logits, so it does not model LogitsRouter: there is no
// [T, E] score to route on, and pretending (ignoring logits) would hide that the
// routing cannot adapt to the input. route(token_ids, plan, mask) and its alias
// route_ids (for benchmarks that hold several router kinds) are its interface.
//
// Plan: top_k slots per token, no capacity, nothing dropped. Token ids must be
// >= 0 (a negative id is usually padding such as -100: mask it instead); masked
// tokens are not hashed, get no expert and count nowhere. T = 0 / all masked
// gives an empty plan.
// Statistics: tokens_per_expert = kept_per_expert = n_e; mean_prob[e] = mean gate
// of expert e over routed tokens = n_e / (k T) (the 0/1 assignment as a fraction;
// it sums to 1); routed_tokens; aux_loss = z_loss = entropy = 0 (no router scores).
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "switchyard/core/error.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

struct HashRouterConfig {
  std::int64_t num_experts = 0;  ///< E; must be >= 1
  std::int64_t top_k = 1;        ///< distinct experts per token, 1..E (gate 1/k each)
  std::uint64_t seed = 0;        ///< XORed into the token id before hashing
};

template <class T = float, class Arch = simd::default_arch>
class HashRouter {
 public:
  using config_type = HashRouterConfig;
  static constexpr std::string_view name = "HashRouter";

  /// Throws config_error (naming HashRouter and the field) if num_experts < 1 or
  /// top_k is outside 1..num_experts.
  explicit HashRouter(const HashRouterConfig& config) : config_(config) {
    detail::check_num_experts(name, config_.num_experts);
    detail::check_top_k(name, config_.top_k, config_.num_experts);
  }

  const HashRouterConfig& config() const noexcept { return config_; }
  std::int64_t num_experts() const noexcept { return config_.num_experts; }

  /// The SplitMix64 output number draw + 1 for state s (see the file comment).
  static constexpr std::uint64_t splitmix64(std::uint64_t s, std::uint64_t draw = 0) noexcept {
    std::uint64_t z = s + (draw + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

  /// Candidate expert of draw `draw` for a token id (before duplicate skipping).
  std::int64_t candidate(std::int64_t token_id, std::uint64_t draw = 0) const noexcept {
    const std::uint64_t s = static_cast<std::uint64_t>(token_id) ^ config_.seed;
    return static_cast<std::int64_t>(splitmix64(s, draw) %
                                     static_cast<std::uint64_t>(config_.num_experts));
  }

  /// token_ids: [T] (>= 0 where routed); mask: empty or [T]. Fills plan with
  /// K = top_k experts per routed token. Throws shape_error if the mask length
  /// differs from T, config_error on a negative id of a routed token.
  void route(std::span<const std::int64_t> token_ids, DispatchPlan<T>& plan,
             const TokenMask& mask = {}) const {
    const auto tokens = static_cast<std::int64_t>(token_ids.size());
    const std::int64_t experts = config_.num_experts, k = config_.top_k;
    if (!mask.keep.empty() && static_cast<std::int64_t>(mask.keep.size()) != tokens) {
      const std::int64_t got[1] = {static_cast<std::int64_t>(mask.keep.size())};
      switchyard::detail::fail_shape(
          name, "route", "mask", switchyard::detail::format_shape({"T"}, got),
          "[T=" + std::to_string(tokens) + "]", "one entry per token id, or empty");
    }
    for (std::int64_t t = 0; t < tokens; ++t) {
      if (mask.routed(t) && token_ids[t] < 0) {
        switchyard::detail::fail_config(
            name, "route", "token_ids", token_ids[t],
            "ids >= 0 (token " + std::to_string(t) + "; mask padding tokens instead)");
      }
    }
    plan.reset(tokens, experts, k);
    const T gate = T(1) / static_cast<T>(k);
    std::int64_t routed = 0;
    for (std::int64_t t = 0; t < tokens; ++t) {
      if (!mask.routed(t)) continue;
      ++routed;
      std::int32_t* ce = plan.choice_expert.data() + t * k;
      T* cw = plan.choice_weight.data() + t * k;
      std::int64_t filled = 0;
      for (std::uint64_t draw = 0; filled < k; ++draw) {
        const auto e = static_cast<std::int32_t>(candidate(token_ids[t], draw));
        bool seen = false;
        for (std::int64_t j = 0; j < filled; ++j) seen = seen || ce[j] == e;
        if (seen) continue;
        ce[filled] = e;
        cw[filled] = gate;
        ++filled;
      }
    }
    plan.stats.routed_tokens = routed;
    detail::build_csr_from_choices(plan);
    plan.stats.tokens_per_expert = plan.stats.kept_per_expert;
    if (routed > 0) {
      const double denom = static_cast<double>(k) * static_cast<double>(routed);
      for (std::int64_t e = 0; e < experts; ++e)
        plan.stats.mean_prob[e] = static_cast<double>(plan.stats.kept_per_expert[e]) / denom;
    }
  }

  /// Allocating convenience: a fresh plan.
  DispatchPlan<T> route(std::span<const std::int64_t> token_ids, const TokenMask& mask = {}) const {
    DispatchPlan<T> plan;
    route(token_ids, plan, mask);
    return plan;
  }

  /// Same as route(token_ids, plan, mask); the name benchmarks call on every router
  /// kind that takes token ids.
  void route_ids(std::span<const std::int64_t> token_ids, DispatchPlan<T>& plan,
                 const TokenMask& mask = {}) const {
    route(token_ids, plan, mask);
  }

 private:
  HashRouterConfig config_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
