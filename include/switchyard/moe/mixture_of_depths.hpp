#pragma once
// Mixture-of-Depths: a block that only some tokens go through (Raposo et al. 2024,
// "Mixture-of-Depths: Dynamically allocating compute in transformer-based language models",
// arXiv:2404.02258), with the threshold router of Router-Tuning's MindSkip (arXiv:2410.13184)
// for decoding.
//
// Route, then execute:
//   scores = mixture_of_depths_scores(x, w_r)        // [B, T] router logits, x . w_r (+ bias)
//   plan   = router.route(scores)                    // or router.route_threshold(scores)
//   router.apply(plan, x, block, out)                // out = x, out[kept t] += r_t * f(x)[t]
// router.forward(x, w_r, block, out) does all three.
//
// Rules written down once (B sequences of T tokens, one router score s[b, t] per token):
// - weight: r = activation(s): the raw logit for ScoreActivation::none (Raposo: the block
//   output is multiplied by the router weight itself, which may be negative), or
//   1 / (1 + exp(-s)) for ScoreActivation::sigmoid (MindSkip), computed in double and rounded
//   to T once.
// - expert choice (route): the block is the one "expert" and picks, per sequence, its top
//   k = ceil(capacity_fraction * n) tokens, n = T (or lengths[b]), where a product within a
//   relative 1e-12 of an integer counts as that integer (0.25 * 16 keeps 4 whatever the
//   rounding), clamped to [1, n] (so any capacity_fraction keeps at least one token of a
//   non-empty sequence and 1.0 keeps all of them); k = 0 when n = 0. This is the rule of
//   tokens::pruning_keep_count. Ranking is by the raw score s (the activation is increasing,
//   so this is the activated order, but distinct logits that the activation rounds to one
//   value still rank by logit); equal scores (-0 == +0) keep the lower token index. The top-k
//   looks at the whole sequence, future tokens included: it is for training and prefill, not
//   for sampling one token at a time.
// - threshold (route_threshold): token t is kept iff double(r_t) > threshold, r_t the weight
//   as stored in T. The decision for t reads s[b, t] only, never a later token, so it is
//   causal and fits decoding (MindSkip; also Raposo's Sec. 3.5 "auxiliary predictor": route
//   its sigmoid output with threshold 0.5, trained on DepthPlan::keep_mask() of the
//   expert-choice plan). Kept counts differ per sequence (a ragged plan).
// - order: each sequence's kept tokens are listed in ASCENDING token order, so the block sees
//   them in sequence order and causal attention inside it stays causal.
// - lengths (optional, [B], each in [0, T]): tokens t >= lengths[b] are padding: never kept,
//   never read (they may hold NaN), and left out of every statistic.
// - scores must be finite (config_error naming the token), like the MoE routers' logits.
//
// Execution (apply): the kept rows of x are gathered into one contiguous buffer, the user's
// block is called ONCE on all of them, and
//   out[b, t] = x[b, t]                                  for a skipped token,
//   out[b, t] = x[b, t] + r_t * block_out[row of (b, t)] for a kept token
// (the scaled add is kernels::axpy on Arch, so its last-bit rounding depends on Arch). out may
// be x itself (in place). The block is one of four callables, told apart by their parameter types
// (declare them: a generic lambda with `auto` parameters is ambiguous):
//   uniform (every sequence keeps the same k; always so for route() without lengths):
//     void(ConstView<T, 3> in, View<T, 3> out)             in, out: [B, k, d]
//     core::Tensor<T>(ConstView<T, 3> in)                  returns [B, k, d]
//   ragged (any plan; sequence b owns rows [offsets[b], offsets[b + 1])):
//     void(ConstView<T, 2> rows, std::span<const std::int64_t> offsets, View<T, 2> out)
//     core::Tensor<T>(ConstView<T, 2> rows, std::span<const std::int64_t> offsets)
//                                                          rows, out: [N, d]; offsets: [B + 1]
// A callable offering both kinds gets the uniform call when the plan is uniform. The writing
// forms get a zeroed out buffer and must write all of it; a returned tensor of another shape
// is a shape_error. The block runs on the calling thread (it may use parallel_for itself), its
// exceptions propagate, and it is not called at all when no token is kept (out = x).
//
// Determinism: every pass splits its work into tasks fixed by the shapes alone (sequences,
// chunks of rows), so plans, scores and outputs are bit-identical for any thread count
// (given a block that is). Scores and the scaled add depend on Arch (summation order).
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/vector_ops.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/topk.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

/// How a router score becomes the weight r_t that multiplies the block output.
enum class ScoreActivation {
  none,     ///< r = s, the raw logit (Raposo et al.)
  sigmoid,  ///< r = 1 / (1 + exp(-s)) (Router-Tuning's MindSkip)
};

/// Which router MixtureOfDepthsRouter::forward uses.
enum class DepthRouting {
  expert_choice,  ///< route(): top capacity_fraction of each sequence (training, prefill)
  threshold,      ///< route_threshold(): r_t > threshold per token (causal; decoding)
};

struct MixtureOfDepthsConfig {
  /// Fraction of each sequence's tokens that go through the block (expert choice):
  /// k = ceil(capacity_fraction * T), at least 1; in (0, 1]. Raposo et al. use 0.125.
  double capacity_fraction = 0.125;
  ScoreActivation activation = ScoreActivation::none;
  /// route_threshold keeps token t iff r_t > threshold; not NaN (+-inf keep none / all).
  double threshold = 0.0;
};

/// Tokens kept out of n for capacity_fraction f in (0, 1]: ceil(f * n), a product within a
/// relative 1e-12 of an integer counting as that integer, clamped to [1, n]; 0 when n <= 0.
/// (Outside the domain: f <= 0 or NaN gives 1, f >= 1 gives n; the router rejects both.)
inline std::int64_t depth_capacity(std::int64_t n, double capacity_fraction) noexcept {
  if (n <= 0) return 0;
  if (!(capacity_fraction > 0.0)) return 1;
  if (capacity_fraction >= 1.0) return n;
  const double p = capacity_fraction * double(n);
  auto k = static_cast<std::int64_t>(std::min(std::ceil(p), double(n)));
  if (k >= 1 && double(k - 1) >= p - p * 1e-12) --k;
  return std::clamp<std::int64_t>(k, 1, n);
}

/// Routing statistics over the routed tokens (all B * T, or those within lengths).
struct DepthStats {
  std::int64_t routed_tokens = 0;  ///< tokens considered
  std::int64_t kept_tokens = 0;    ///< tokens that go through the block (N)
  double fraction_kept = 0;        ///< kept / routed; 0 when nothing is routed
  double mean_score = 0;           ///< mean of r_t = activation(s) over routed tokens
  double mean_kept_score = 0;      ///< mean of r_t over kept tokens; 0 when none is kept
};

/// Which tokens of each sequence go through the block, and with which weight: CSR by sequence.
/// Sequence b's kept tokens are entries [offsets[b], offsets[b + 1]) of token_index / weight,
/// token indices strictly ascending inside the sequence.
template <class T>
struct DepthPlan {
  std::int64_t batch = 0;                 ///< B
  std::int64_t num_tokens = 0;            ///< T, tokens per sequence
  std::vector<std::int64_t> offsets;      ///< [B + 1], from 0 to N
  std::vector<std::int64_t> token_index;  ///< [N] kept tokens, ascending per sequence, in [0, T)
  std::vector<T> weight;                  ///< [N] r_t of each kept token (finite)
  DepthStats stats;

  /// N, kept tokens over all sequences.
  std::int64_t num_kept() const noexcept { return static_cast<std::int64_t>(token_index.size()); }
  /// Kept tokens of sequence b.
  std::int64_t num_kept(std::int64_t b) const noexcept { return offsets[b + 1] - offsets[b]; }
  /// Sequence b's kept tokens, ascending.
  std::span<const std::int64_t> kept(std::int64_t b) const noexcept {
    return {token_index.data() + offsets[b], static_cast<std::size_t>(num_kept(b))};
  }
  /// Sequence b's weights r_t, matching kept(b).
  std::span<const T> weights(std::int64_t b) const noexcept {
    return {weight.data() + offsets[b], static_cast<std::size_t>(num_kept(b))};
  }
  /// True when every sequence keeps the same number of tokens (B = 0 included): apply() can
  /// then hand the block a [B, k, d] tensor.
  bool uniform() const noexcept {
    for (std::int64_t b = 1; b < batch; ++b)
      if (num_kept(b) != num_kept(0)) return false;
    return true;
  }
  /// [B * T] (row-major [B, T]): 1 where the token is kept, else 0. As a target for a causal
  /// predictor of the expert-choice decision (Raposo et al. Sec. 3.5).
  std::vector<std::uint8_t> keep_mask() const {
    check();
    std::vector<std::uint8_t> m(static_cast<std::size_t>(batch * num_tokens), 0);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t t : kept(b)) m[static_cast<std::size_t>(b * num_tokens + t)] = 1;
    return m;
  }

  /// Empties the plan for B sequences of T tokens, keeping the allocated memory.
  void reset(std::int64_t b, std::int64_t t) {
    batch = b;
    num_tokens = t;
    offsets.assign(static_cast<std::size_t>(b + 1), 0);
    token_index.clear();
    weight.clear();
    stats = {};
  }

  /// Throws switchyard::error naming the first broken invariant: B, T >= 0 with B * T
  /// representable; offsets sized B + 1, from 0 to N, never decreasing; weight sized N; token
  /// indices in [0, T) and strictly ascending inside each sequence (so at most T per sequence);
  /// finite weights. Safe on any field values; allocates nothing.
  void check() const {
    const auto fail = [](const std::string& what) {
      throw switchyard::error("DepthPlan::check: " + what);
    };
    std::int64_t bt = 0;
    if (batch < 0 || num_tokens < 0 || core::mul_overflows(batch, num_tokens, bt))
      fail("sizes B=" + std::to_string(batch) + ", T=" + std::to_string(num_tokens) +
           " must be >= 0 with B * T representable");
    if (offsets.empty() || static_cast<std::int64_t>(offsets.size()) - 1 != batch ||
        offsets.front() != 0 || offsets.back() != num_kept())
      fail("offsets must have B+1 = " + std::to_string(batch + 1) + " entries from 0 to N = " +
           std::to_string(num_kept()) + " (it has " + std::to_string(offsets.size()) + ")");
    for (std::int64_t b = 0; b < batch; ++b)
      if (offsets[b + 1] < offsets[b]) fail("offsets decrease at sequence " + std::to_string(b));
    if (weight.size() != token_index.size())
      fail("weight has " + std::to_string(weight.size()) +
           " entries; expected N = " + std::to_string(token_index.size()));
    for (std::int64_t b = 0; b < batch; ++b) {
      for (std::int64_t i = offsets[b]; i < offsets[b + 1]; ++i) {
        const std::int64_t t = token_index[i];
        if (t < 0 || t >= num_tokens)
          fail("token_index[" + std::to_string(i) + "] = " + std::to_string(t) +
               " is outside [0, T=" + std::to_string(num_tokens) + ") in sequence " +
               std::to_string(b));
        if (i > offsets[b] && token_index[i - 1] >= t)
          fail("tokens of sequence " + std::to_string(b) + " are not strictly ascending at entry " +
               std::to_string(i) + " (duplicate?)");
        if (!std::isfinite(static_cast<double>(weight[i])))
          fail("weight[" + std::to_string(i) + "] is not finite");
      }
    }
  }
};

/// A callable run on a uniform plan's kept tokens: block(in [B, k, d], out [B, k, d]).
template <class F, class T>
concept DepthBlockUniformInto = std::invocable<F&, ConstView<T, 3>, View<T, 3>>;
/// A callable run on a uniform plan's kept tokens that returns its output [B, k, d].
template <class F, class T>
concept DepthBlockUniformReturning = requires(F& f, ConstView<T, 3> in) {
  { f(in) } -> std::convertible_to<core::Tensor<T>>;
};
/// A callable run on any plan's kept tokens: block(rows [N, d], offsets [B + 1], out [N, d]).
template <class F, class T>
concept DepthBlockRaggedInto =
    std::invocable<F&, ConstView<T, 2>, std::span<const std::int64_t>, View<T, 2>>;
/// A callable run on any plan's kept tokens that returns its output [N, d].
template <class F, class T>
concept DepthBlockRaggedReturning = requires(F& f, ConstView<T, 2> rows,
                                             std::span<const std::int64_t> offsets) {
  { f(rows, offsets) } -> std::convertible_to<core::Tensor<T>>;
};
template <class F, class T>
concept DepthBlockUniform = DepthBlockUniformInto<F, T> || DepthBlockUniformReturning<F, T>;
template <class F, class T>
concept DepthBlockRagged = DepthBlockRaggedInto<F, T> || DepthBlockRaggedReturning<F, T>;
/// Any of the four block forms (see the file comment).
template <class F, class T>
concept DepthBlock = DepthBlockUniform<F, T> || DepthBlockRagged<F, T>;

/// Tokens per parallel task in the scoring and scatter passes (and rows in the gather), fixed
/// so the split never depends on the thread count.
inline constexpr std::int64_t mixture_of_depths_chunk = 256;

/// scores[b, t] = x[b, t, :] . router_weight + bias (Raposo's linear router), one
/// kernels::dot on Arch per token. x: [B, T, d] (unit inner stride), router_weight: [d] (unit
/// stride), scores: [B, T] (any strides, not sharing memory with x or router_weight). Throws
/// shape_error naming "mixture_of_depths_scores", the argument and both shapes.
template <class T, class Arch = simd::default_arch>
void mixture_of_depths_scores(ConstView<std::type_identity_t<T>, 3> x,
                              ConstView<std::type_identity_t<T>, 1> router_weight,
                              View<T, 2> scores, std::type_identity_t<T> bias = T(0)) {
  constexpr std::string_view layer = "MixtureOfDepths", fn = "mixture_of_depths_scores";
  core::detail::check_shape(layer, fn, "x", x, {"B", "T", "d"}, {-1, -1, -1});
  const std::int64_t B = x.extent(0), Tn = x.extent(1), d = x.extent(2);
  core::detail::check_shape(layer, fn, "router_weight", router_weight, {"d"}, {d},
                            "one weight per feature of x");
  core::detail::check_shape(layer, fn, "scores", scores, {"B", "T"}, {B, Tn});
  core::detail::check_unit_inner_stride(layer, fn, "x", x);
  core::detail::check_unit_inner_stride(layer, fn, "router_weight", router_weight);
  core::detail::check_no_alias(layer, fn, "scores", scores, "x", x);
  core::detail::check_no_alias(layer, fn, "scores", scores, "router_weight", router_weight);
  const std::int64_t chunks = num_chunks(Tn, mixture_of_depths_chunk);
  parallel_for(B * chunks, [&](std::int64_t task) {
    const std::int64_t b = task / chunks, t0 = (task % chunks) * mixture_of_depths_chunk;
    for (std::int64_t t = t0; t < std::min(Tn, t0 + mixture_of_depths_chunk); ++t) {
      const T* row = x.data() + b * x.stride(0) + t * x.stride(1);
      scores.data()[b * scores.stride(0) + t * scores.stride(1)] =
          kernels::dot(Arch{}, row, router_weight.data(), d) + bias;
    }
  });
}

/// As above, returning scores [B, T]. Call as mixture_of_depths_scores<float>(x, w).
template <class T, class Arch = simd::default_arch>
core::Tensor<T> mixture_of_depths_scores(ConstView<std::type_identity_t<T>, 3> x,
                                         ConstView<std::type_identity_t<T>, 1> router_weight,
                                         std::type_identity_t<T> bias = T(0)) {
  core::detail::check_shape("MixtureOfDepths", "mixture_of_depths_scores", "x", x, {"B", "T", "d"},
                            {-1, -1, -1});
  core::Tensor<T> scores({x.extent(0), x.extent(1)});
  mixture_of_depths_scores<T, Arch>(x, router_weight, scores.template view<2>(), bias);
  return scores;
}

/// The Mixture-of-Depths router (expert choice or threshold) and executor. Immutable after
/// construction; every method is const and the object may be shared between threads.
template <class T = float, class Arch = simd::default_arch>
class MixtureOfDepthsRouter {
 public:
  using config_type = MixtureOfDepthsConfig;
  using plan_type = DepthPlan<T>;
  static constexpr std::string_view name = "MixtureOfDepthsRouter";

  /// Throws config_error (naming MixtureOfDepthsRouter and the field) if capacity_fraction is
  /// NaN or outside (0, 1], threshold is NaN, or activation is not a ScoreActivation.
  explicit MixtureOfDepthsRouter(const config_type& config) : config_(config) {
    if (!(config_.capacity_fraction > 0.0 && config_.capacity_fraction <= 1.0))
      switchyard::detail::fail_config(name, "config", "capacity_fraction",
                                      config_.capacity_fraction, "a value in (0, 1]");
    if (std::isnan(config_.threshold))
      switchyard::detail::fail_config(name, "config", "threshold", config_.threshold,
                                      "a number (+-inf keep no / every token)");
    if (config_.activation != ScoreActivation::none &&
        config_.activation != ScoreActivation::sigmoid)
      switchyard::detail::fail_config(name, "config", "activation",
                                      static_cast<int>(config_.activation), "none or sigmoid");
  }

  const config_type& config() const noexcept { return config_; }

  /// Tokens kept by route() in a sequence of n tokens: depth_capacity(n, capacity_fraction).
  std::int64_t capacity(std::int64_t n) const noexcept {
    return depth_capacity(n, config_.capacity_fraction);
  }

  /// r = activation(s), computed in double and rounded to T once.
  T weight(T score) const noexcept {
    if (config_.activation == ScoreActivation::sigmoid)
      return static_cast<T>(1.0 / (1.0 + std::exp(-static_cast<double>(score))));
    return score;
  }

  /// Scores [B, T] from x [B, T, d] and router_weight [d]: mixture_of_depths_scores on Arch.
  core::Tensor<T> scores(ConstView<T, 3> x, ConstView<T, 1> router_weight, T bias = T(0)) const {
    return mixture_of_depths_scores<T, Arch>(x, router_weight, bias);
  }

  /// Expert choice. scores: [B, T] router logits (any strides); lengths: empty or [B], each
  /// in [0, T]. Fills plan (reusing its memory): per sequence the top capacity(n) tokens by
  /// score (ties: lower index), ascending, with r_t. Throws shape_error on a wrong shape,
  /// config_error on a non-finite score of a routed token or a length outside [0, T].
  void route(ConstView<T, 2> scores, plan_type& plan,
             std::span<const std::int64_t> lengths = {}) const {
    check_scores("route", scores, lengths);
    const std::int64_t B = scores.extent(0), Tn = scores.extent(1);
    plan.reset(B, Tn);
    for (std::int64_t b = 0; b < B; ++b)
      plan.offsets[b + 1] = plan.offsets[b] + capacity(length(lengths, b, Tn));
    const auto n = static_cast<std::size_t>(plan.offsets[B]);
    plan.token_index.resize(n);
    plan.weight.resize(n);
    std::vector<double> score_sum(static_cast<std::size_t>(B), 0.0);
    parallel_for(B, [&](std::int64_t b) {
      const std::int64_t len = length(lengths, b, Tn), k = plan.num_kept(b);
      std::int64_t* idx = plan.token_index.data() + plan.offsets[b];
      const T* row = scores.data() + b * scores.stride(0);
      const std::int64_t st = scores.stride(1);
      if (k == len) {
        for (std::int64_t t = 0; t < len; ++t) idx[t] = t;
      } else {
        // Contiguous copy of the row for the selection; scratch per task (tasks do not throw:
        // a failed allocation terminates, as in core::topk).
        std::vector<T> values(static_cast<std::size_t>(len + k));
        for (std::int64_t t = 0; t < len; ++t) values[t] = row[t * st];
        std::vector<std::pair<T, std::int64_t>> scratch;
        kernels::topk_row_select(values.data(), len, k, idx, values.data() + len, scratch);
        std::sort(idx, idx + k);
      }
      double sum = 0;
      for (std::int64_t t = 0; t < len; ++t) sum += static_cast<double>(weight(row[t * st]));
      score_sum[b] = sum;
      T* w = plan.weight.data() + plan.offsets[b];
      for (std::int64_t i = 0; i < k; ++i) w[i] = weight(row[idx[i] * st]);
    });
    finish_stats(plan, score_sum, lengths);
  }

  /// Allocating convenience: a fresh expert-choice plan.
  plan_type route(ConstView<T, 2> scores, std::span<const std::int64_t> lengths = {}) const {
    plan_type plan;
    route(scores, plan, lengths);
    return plan;
  }

  /// Threshold routing (causal): token t of sequence b is kept iff double(r_t) > threshold,
  /// reading s[b, t] only. Shapes, lengths and errors as route(); the plan is ragged.
  void route_threshold(ConstView<T, 2> scores, plan_type& plan,
                       std::span<const std::int64_t> lengths = {}) const {
    check_scores("route_threshold", scores, lengths);
    const std::int64_t B = scores.extent(0), Tn = scores.extent(1);
    plan.reset(B, Tn);
    const std::int64_t st = scores.stride(1);
    const auto keep = [&](const T* row, std::int64_t t) {
      return static_cast<double>(weight(row[t * st])) > config_.threshold;
    };
    parallel_for(B, [&](std::int64_t b) {
      const T* row = scores.data() + b * scores.stride(0);
      std::int64_t count = 0;
      for (std::int64_t t = 0; t < length(lengths, b, Tn); ++t) count += keep(row, t);
      plan.offsets[b + 1] = count;  // counts now, prefix sums below
    });
    for (std::int64_t b = 0; b < B; ++b) plan.offsets[b + 1] += plan.offsets[b];
    const auto n = static_cast<std::size_t>(plan.offsets[B]);
    plan.token_index.resize(n);
    plan.weight.resize(n);
    std::vector<double> score_sum(static_cast<std::size_t>(B), 0.0);
    parallel_for(B, [&](std::int64_t b) {
      const T* row = scores.data() + b * scores.stride(0);
      std::int64_t i = plan.offsets[b];
      double sum = 0;
      for (std::int64_t t = 0; t < length(lengths, b, Tn); ++t) {
        const T r = weight(row[t * st]);
        sum += static_cast<double>(r);
        if (static_cast<double>(r) > config_.threshold) {
          plan.token_index[i] = t;
          plan.weight[i] = r;
          ++i;
        }
      }
      score_sum[b] = sum;
    });
    finish_stats(plan, score_sum, lengths);
  }

  /// Allocating convenience: a fresh threshold plan.
  plan_type route_threshold(ConstView<T, 2> scores,
                            std::span<const std::int64_t> lengths = {}) const {
    plan_type plan;
    route_threshold(scores, plan, lengths);
    return plan;
  }

  /// Bytes of workspace apply() needs for `plan` and token width d: the gathered input and
  /// the block output, [N, d] each, plus alignment.
  static std::size_t workspace_bytes(const plan_type& plan, std::int64_t d) {
    const std::int64_t nd = switchyard::detail::checked_size(name, "workspace_bytes", "[N, d]",
                                                             {plan.num_kept(), d}, 2 * sizeof(T));
    return static_cast<std::size_t>(nd) * 2 * sizeof(T) + 2 * 64;
  }

  /// Runs `block` on the plan's kept tokens and writes out = x + r * block output on them,
  /// out = x elsewhere (see the file comment for the four block forms).
  /// plan: checked with plan.check() (switchyard::error when malformed); x: [B, T, d] with
  /// B, T the plan's (unit inner stride); out: [B, T, d] (unit inner stride), either x itself
  /// (same data and strides: in place) or not sharing memory with x (shape_error).
  /// workspace: at least workspace_bytes(plan, d) bytes, not sharing memory with x or out;
  /// nothing is allocated here (the block may allocate). Throws config_error for a uniform-only
  /// block with a non-uniform plan, shape_error for a returned block output of the wrong shape.
  template <DepthBlock<T> Block>
  void apply(const plan_type& plan, ConstView<T, 3> x, Block&& block, View<T, 3> out,
             std::span<std::byte> workspace) const {
    check_x(plan, x);
    check_out(x, out);
    apply_checked(plan, x, std::forward<Block>(block), out, workspace);
  }

  /// As above with an allocated workspace.
  template <DepthBlock<T> Block>
  void apply(const plan_type& plan, ConstView<T, 3> x, Block&& block, View<T, 3> out) const {
    check_x(plan, x);
    check_out(x, out);
    const std::size_t bytes = workspace_bytes(plan, x.extent(2));
    std::unique_ptr<std::byte[]> ws(new std::byte[bytes]);
    apply_checked(plan, x, std::forward<Block>(block), out, std::span<std::byte>(ws.get(), bytes));
  }

  /// As above, returning out: [B, T, d].
  template <DepthBlock<T> Block>
  core::Tensor<T> apply(const plan_type& plan, ConstView<T, 3> x, Block&& block) const {
    check_x(plan, x);
    core::Tensor<T> out({x.extent(0), x.extent(1), x.extent(2)});
    const std::size_t bytes = workspace_bytes(plan, x.extent(2));
    std::unique_ptr<std::byte[]> ws(new std::byte[bytes]);
    apply_checked(plan, x, std::forward<Block>(block), out.template view<3>(),
                  std::span<std::byte>(ws.get(), bytes));
    return out;
  }

  /// Scores, routes (expert choice or threshold) and applies in one call; returns the plan.
  /// x: [B, T, d], router_weight: [d], out: [B, T, d] (may be x itself); as the three calls.
  template <DepthBlock<T> Block>
  plan_type forward(ConstView<T, 3> x, ConstView<T, 1> router_weight, Block&& block, View<T, 3> out,
                    DepthRouting routing = DepthRouting::expert_choice,
                    std::span<const std::int64_t> lengths = {}) const {
    const core::Tensor<T> s = scores(x, router_weight);
    plan_type plan;
    if (routing == DepthRouting::threshold) {
      route_threshold(s.template view<2>(), plan, lengths);
    } else {
      route(s.template view<2>(), plan, lengths);
    }
    apply(plan, x, std::forward<Block>(block), out);
    return plan;
  }

 private:
  static std::int64_t length(std::span<const std::int64_t> lengths, std::int64_t b,
                             std::int64_t t) noexcept {
    return lengths.empty() ? t : lengths[b];
  }

  static T* align64(std::byte* p) noexcept {
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    return reinterpret_cast<T*>(p + ((64 - a % 64) % 64));
  }

  void check_scores(std::string_view fn, const ConstView<T, 2>& scores,
                    std::span<const std::int64_t> lengths) const {
    core::detail::check_shape(name, fn, "scores", scores, {"B", "T"}, {-1, -1});
    const std::int64_t B = scores.extent(0), Tn = scores.extent(1);
    if (!lengths.empty() && static_cast<std::int64_t>(lengths.size()) != B) {
      const std::int64_t got[1] = {static_cast<std::int64_t>(lengths.size())};
      switchyard::detail::fail_shape(
          name, fn, "lengths", switchyard::detail::format_shape({"B"}, got),
          "[B=" + std::to_string(B) + "]", "one length per sequence of scores, or empty");
    }
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t len = length(lengths, b, Tn);
      if (len < 0 || len > Tn)
        switchyard::detail::fail_config(name, fn, "lengths[" + std::to_string(b) + "]", len,
                                        "a length in [0, T=" + std::to_string(Tn) + "]");
      const T* row = scores.data() + b * scores.stride(0);
      for (std::int64_t t = 0; t < len; ++t) {
        if (!std::isfinite(static_cast<double>(row[t * scores.stride(1)])))
          switchyard::detail::fail_config(name, fn, "scores",
                                          static_cast<double>(row[t * scores.stride(1)]),
                                          "finite scores (sequence " + std::to_string(b) +
                                              ", token " + std::to_string(t) + " is not)");
      }
    }
  }

  static void finish_stats(plan_type& plan, const std::vector<double>& score_sum,
                           std::span<const std::int64_t> lengths) {
    DepthStats& s = plan.stats;
    double sum = 0, kept_sum = 0;
    for (std::int64_t b = 0; b < plan.batch; ++b) {
      sum += score_sum[b];
      s.routed_tokens += length(lengths, b, plan.num_tokens);
    }
    for (const T w : plan.weight) kept_sum += static_cast<double>(w);
    s.kept_tokens = plan.num_kept();
    if (s.routed_tokens > 0) {
      s.fraction_kept = double(s.kept_tokens) / double(s.routed_tokens);
      s.mean_score = sum / double(s.routed_tokens);
    }
    if (s.kept_tokens > 0) s.mean_kept_score = kept_sum / double(s.kept_tokens);
  }

  /// plan.check(), then x: [B, T, d] of the plan with unit inner stride.
  void check_x(const plan_type& plan, const ConstView<T, 3>& x) const {
    plan.check();
    core::detail::check_shape(name, "apply", "x", x, {"B", "T", "d"},
                              {plan.batch, plan.num_tokens, -1}, "B and T of the plan");
    core::detail::check_unit_inner_stride(name, "apply", "x", x);
  }

  /// out: the shape of x, unit inner stride, x itself or separate from it.
  void check_out(const ConstView<T, 3>& x, const View<T, 3>& out) const {
    core::detail::check_shape<T, 3>(name, "apply", "out", out, {"B", "T", "d"}, x.shape(),
                                    "out has the shape of x");
    core::detail::check_unit_inner_stride(name, "apply", "out", out);
    const bool in_place = out.data() == x.data() && out.strides() == x.strides();
    if (!in_place)
      core::detail::check_no_alias(name, "apply", "out", out, "x", x, "or out is x itself");
  }

  /// apply() after the argument checks: the workspace, then run().
  template <class Block>
  void apply_checked(const plan_type& plan, const ConstView<T, 3>& x, Block&& block,
                     const View<T, 3>& out, std::span<std::byte> workspace) const {
    const std::string_view fn = "apply";
    const std::int64_t d = x.extent(2), n = plan.num_kept();
    const std::size_t need = workspace_bytes(plan, d);
    if (workspace.size() < need)
      switchyard::detail::fail_shape(
          name, fn, "workspace", "[bytes=" + std::to_string(workspace.size()) + "]",
          "[bytes>=" + std::to_string(need) + "]", "workspace_bytes(plan, d)");
    const View<std::byte, 1> ws(workspace.data(), {static_cast<std::int64_t>(workspace.size())});
    core::detail::check_no_alias(name, fn, "workspace", ws, "x", x);
    core::detail::check_no_alias(name, fn, "workspace", ws, "out", out);
    T* in_rows = align64(workspace.data());
    T* out_rows = align64(reinterpret_cast<std::byte*>(in_rows + n * d));
    run(plan, x, std::forward<Block>(block), out, in_rows, out_rows);
  }

  /// Whether the block gets the uniform call: a block offering only the uniform forms needs a
  /// uniform plan (config_error otherwise); one offering both gets it when the plan is uniform.
  template <class Block>
  bool use_uniform_call(const plan_type& plan) const {
    if constexpr (!DepthBlockUniform<Block, T>) {
      return false;
    } else if constexpr (!DepthBlockRagged<Block, T>) {
      if (!plan.uniform())
        switchyard::detail::fail_config(
            name, "apply", "block", "a uniform block (in [B, k, d])",
            "a ragged block (rows [N, d], offsets [B + 1]): this plan keeps different counts "
            "per sequence (threshold routing or lengths)");
      return true;
    } else {
      return plan.uniform();
    }
  }

  /// Throws shape_error unless the tensor a block returned has the extents `want`.
  static void check_returned(const core::Tensor<T>& y, std::initializer_list<std::int64_t> want) {
    const bool ok = y.rank() == static_cast<int>(want.size()) &&
                    std::equal(want.begin(), want.end(), y.shape().begin());
    if (ok) return;
    std::string exp = "[";
    for (auto it = want.begin(); it != want.end(); ++it)
      exp += (it == want.begin() ? "" : ", ") + std::to_string(*it);
    switchyard::detail::fail_shape(name, "apply", "block output",
                                   switchyard::detail::format_shape(y.shape()), exp + "]",
                                   "the block must return one row of width d per kept token");
  }

  /// Calls the block once on the gathered rows; returns its output rows [N, d] (out_rows, or
  /// the data of the tensor it returned, kept alive in `held`).
  template <class Block>
  const T* call_block(const plan_type& plan, Block& block, bool uniform, const T* in_rows,
                      T* out_rows, std::int64_t d, core::Tensor<T>& held) const {
    const std::int64_t B = plan.batch, n = plan.num_kept();
    if constexpr (DepthBlockUniform<Block, T>) {
      if (uniform) {
        const std::int64_t k = B > 0 ? plan.num_kept(0) : 0;
        const ConstView<T, 3> in(in_rows, {B, k, d});
        if constexpr (DepthBlockUniformInto<Block, T>) {
          block(in, View<T, 3>(out_rows, {B, k, d}));
          return out_rows;
        } else {
          held = block(in);
          check_returned(held, {B, k, d});
          return held.data();
        }
      }
    }
    if constexpr (DepthBlockRagged<Block, T>) {
      const ConstView<T, 2> rows(in_rows, {n, d});
      const std::span<const std::int64_t> offsets(plan.offsets);
      if constexpr (DepthBlockRaggedInto<Block, T>) {
        block(rows, offsets, View<T, 2>(out_rows, {n, d}));
        return out_rows;
      } else {
        held = block(rows, offsets);
        check_returned(held, {n, d});
        return held.data();
      }
    }
    return out_rows;  // not reached: use_uniform_call chose a form the block has
  }

  template <class Block>
  void run(const plan_type& plan, const ConstView<T, 3>& x, Block&& block, const View<T, 3>& out,
           T* in_rows, T* out_rows) const {
    const std::int64_t B = plan.batch, Tn = plan.num_tokens, d = x.extent(2);
    const std::int64_t n = plan.num_kept();
    const bool uniform = use_uniform_call<Block>(plan);  // throws before any work
    const bool in_place = out.data() == x.data() && out.strides() == x.strides();
    const auto x_row = [&](std::int64_t b, std::int64_t t) {
      return x.data() + b * x.stride(0) + t * x.stride(1);
    };
    const std::int64_t chunks = num_chunks(Tn, mixture_of_depths_chunk);
    // Gather: row i of in_rows is kept entry i (sequence-major, tokens ascending).
    parallel_for(num_chunks(n, mixture_of_depths_chunk), [&](std::int64_t c) {
      const std::int64_t i0 = c * mixture_of_depths_chunk;
      const std::int64_t i1 = std::min(n, i0 + mixture_of_depths_chunk);
      std::int64_t b =
          std::upper_bound(plan.offsets.begin(), plan.offsets.end(), i0) - plan.offsets.begin() - 1;
      for (std::int64_t i = i0; i < i1; ++i) {
        while (plan.offsets[b + 1] <= i) ++b;
        std::copy_n(x_row(b, plan.token_index[i]), d, in_rows + i * d);
      }
    });
    std::fill_n(out_rows, n * d, T(0));
    core::Tensor<T> held;
    const T* y = n > 0 ? call_block(plan, block, uniform, in_rows, out_rows, d, held) : out_rows;
    // Scatter: every (sequence, chunk of tokens) writes its own rows of out once.
    parallel_for(B * chunks, [&](std::int64_t task) {
      const std::int64_t b = task / chunks, t0 = (task % chunks) * mixture_of_depths_chunk;
      const std::int64_t t1 = std::min(Tn, t0 + mixture_of_depths_chunk);
      const auto kept = plan.kept(b);
      std::int64_t j = std::lower_bound(kept.begin(), kept.end(), t0) - kept.begin();
      for (std::int64_t t = t0; t < t1; ++t) {
        T* o = out.data() + b * out.stride(0) + t * out.stride(1);
        if (!in_place) std::copy_n(x_row(b, t), d, o);
        if (j < static_cast<std::int64_t>(kept.size()) && kept[j] == t) {
          const std::int64_t i = plan.offsets[b] + j;
          kernels::axpy(Arch{}, plan.weight[i], y + i * d, o, d);
          ++j;
        }
      }
    });
  }

  config_type config_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
