#pragma once
// SpAtten's cascade token and head pruning (Wang, Zhang and Han, "SpAtten: Efficient Sparse
// Attention Architecture with Cascade Token and Head Pruning", HPCA 2021, arXiv:2012.09852,
// Sec. III-A/III-B and Algorithm 1), as routers that return plans.
//
// Tokens. The importance of a token is the attention probability it receives, summed over the
// heads and the queries of a layer, and accumulated over the layers so far:
//   s_t += sum_h sum_i P[h][i][t]
// (DenseAttention::forward's key mass, ForwardOptions::key_mass, gives the inner sums per KV
// head). After a layer, the top ceil(keep_ratio * N) tokens by s stay; the others are pruned
// for every later layer ("cascade"): the state keeps only the survivors and their scores.
//
// Heads. The importance of a head is the magnitude of its output, the L1 norm of the head's
// attention output E[h] summed over tokens and channels, accumulated over the layers so far:
//   s_h += sum_i sum_d |E[h][i][d]|
// (SpAtten ranks heads by the magnitude of their outputs; this is our reading of its cascade
// head pruning). The top ceil(keep_ratio * H_active) active heads stay active; a pruned head
// stays pruned in every later layer, and DenseAttention::forward skips it
// (ForwardOptions::active_heads takes HeadKeepPlan::active as is).
//
// Rules written down once:
// - count kept: ceil(keep_ratio * n) of the n current tokens (or active heads), at least 1 when
//   n >= 1, where a product within a relative 1e-12 of an integer counts as that integer (0.7 *
//   10 keeps 7 whatever the rounding of 0.7). Ceil rather than floor: any keep_ratio > 0 keeps
//   something and keep_ratio = 1 keeps everything.
// - ties: equal scores keep the lower index; a NaN score ranks below every number.
// - class token: with class_token set, the current token 0 (the class token, which therefore
//   stays first) is always kept and counts toward the kept number.
// - order: kept tokens and heads are listed in ascending index, so a gather keeps the original
//   order.
//
// Plans compose across layers as MergePlan::source does: TokenKeepPlan::original maps each kept
// token to its index among the first layer's tokens, TokenKeepPlan::then chains two plans, and
// TokenKeepPlan::gather applied to a [B, N, N0] source map (MergePlan::source) composes with
// token merging.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/topk.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace tokens {

/// Items kept out of n for keep_ratio in (0, 1]: ceil(keep_ratio * n), a product within a
/// relative 1e-12 of an integer counting as that integer, clamped to [1, n] (0 when n = 0).
inline std::int64_t pruning_keep_count(std::int64_t n, double keep_ratio) noexcept {
  if (n <= 0) return 0;
  const double p = keep_ratio * double(n);
  auto k = static_cast<std::int64_t>(std::ceil(p));
  if (k >= 1 && double(k - 1) >= p - p * 1e-12) --k;
  return std::clamp<std::int64_t>(k, 1, n);
}

namespace detail {

inline void check_keep_ratio(std::string_view layer, double keep_ratio) {
  if (!(keep_ratio > 0.0 && keep_ratio <= 1.0))
    switchyard::detail::fail_config(layer, layer, "keep_ratio", keep_ratio, "a value in (0, 1]");
}

// Indices of the k best of x[0, n) (ties: lower index; NaN lowest), ascending.
template <class T>
void top_indices_ascending(const T* x, std::int64_t n, std::int64_t k, std::int64_t* out,
                           std::vector<std::pair<T, std::int64_t>>& scratch,
                           std::vector<T>& values) {
  if (k <= 0) return;
  values.resize(std::size_t(k));
  kernels::topk_row_select(x, n, k, out, values.data(), scratch);
  std::sort(out, out + k);
}

}  // namespace detail

/// Which tokens of a layer survive, per batch element: the routing decision of token pruning.
/// kept[b * N_keep + i] indexes the N input tokens and ascends with i, so gather() keeps the
/// original order; original[b * N_keep + i] is the same token's index among the N0 tokens of the
/// first layer (composed across layers).
struct TokenKeepPlan {
  std::int64_t batch = 0;              // B
  std::int64_t num_tokens = 0;         // N, tokens the plan is applied to
  std::int64_t num_kept = 0;           // N_keep <= N
  std::int64_t num_original = 0;       // N0 >= N, tokens of the first layer
  std::vector<std::int64_t> kept;      // [B, N_keep], ascending in [0, N)
  std::vector<std::int64_t> original;  // [B, N_keep], ascending in [0, N0)

  /// The plan that keeps all N tokens of a first layer.
  static TokenKeepPlan identity(std::int64_t batch, std::int64_t num_tokens) {
    if (batch < 0 || num_tokens < 0)
      throw config_error("TokenKeepPlan::identity: sizes B=" + std::to_string(batch) +
                         ", N=" + std::to_string(num_tokens) + " must be >= 0");
    // Two [B, N] index arrays: their size is checked before anything is allocated.
    const std::int64_t bn =
        switchyard::detail::checked_size("TokenKeepPlan", "identity", "sizes",
                                         {batch, num_tokens, 2}, sizeof(std::int64_t)) /
        2;
    TokenKeepPlan p{batch, num_tokens, num_tokens, num_tokens, {}, {}};
    p.kept.resize(std::size_t(bn));
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = 0; i < num_tokens; ++i) p.kept[std::size_t(b * num_tokens + i)] = i;
    p.original = p.kept;
    return p;
  }

  bool is_identity() const noexcept { return num_kept == num_tokens; }

  /// Throws config_error naming the first broken invariant of a plan edited or built by hand:
  /// 0 <= N_keep <= N <= N0, B >= 0, array lengths B * N_keep, kept strictly ascending in
  /// [0, N), original strictly ascending in [0, N0).
  void check() const {
    const auto fail = [](const std::string& what) {
      throw config_error("TokenKeepPlan::check: " + what);
    };
    if (batch < 0 || num_kept < 0 || num_kept > num_tokens || num_tokens > num_original)
      fail("sizes B=" + std::to_string(batch) + ", N_keep=" + std::to_string(num_kept) +
           ", N=" + std::to_string(num_tokens) + ", N0=" + std::to_string(num_original) +
           " are inconsistent; expected B >= 0 and 0 <= N_keep <= N <= N0");
    std::int64_t bk = 0;
    if (core::mul_overflows(batch, num_kept, bk))
      fail("sizes B=" + std::to_string(batch) + ", N_keep=" + std::to_string(num_kept) +
           " overflow");
    const auto field = [&](std::string_view name, const std::vector<std::int64_t>& v,
                           std::int64_t bound) {
      if (std::int64_t(v.size()) != bk)
        fail("field '" + std::string(name) + "' has " + std::to_string(v.size()) +
             " entries; expected B * N_keep = " + std::to_string(bk));
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t i = 0; i < num_kept; ++i) {
          const std::int64_t x = v[std::size_t(b * num_kept + i)];
          const std::int64_t prev = i ? v[std::size_t(b * num_kept + i - 1)] : -1;
          if (x < 0 || x >= bound || x <= prev)
            fail("field '" + std::string(name) + "[" + std::to_string(b * num_kept + i) +
                 "]' = " + std::to_string(x) + " is not in [0, " + std::to_string(bound) +
                 ") above the previous entry of its batch element");
        }
    };
    field("kept", kept, num_tokens);
    field("original", original, num_original);
  }

  /// x: [B, N, C] (unit inner stride) -> out: [B, N_keep, C], out[b, i] = x[b, kept[b, i]]: the
  /// kept tokens in their original order. Works for any tensor of these tokens (features, keys,
  /// a [B, N, N0] source map). out must not share memory with x (shape_error).
  template <class T>
  void gather(ConstView<T, 3> x, View<T, 3> out) const {
    check();
    core::detail::check_shape("TokenKeepPlan", "gather", "x", x, {"B", "N", "C"},
                              {batch, num_tokens, -1}, "the tokens the plan was made for");
    core::detail::check_shape("TokenKeepPlan", "gather", "out", out, {"B", "N_keep", "C"},
                              {batch, num_kept, x.extent(2)});
    core::detail::check_unit_inner_stride("TokenKeepPlan", "gather", "x", x);
    core::detail::check_unit_inner_stride("TokenKeepPlan", "gather", "out", out);
    core::detail::check_no_alias("TokenKeepPlan", "gather", "out", out, "x", x);
    const std::int64_t C = x.extent(2);
    if (C == 0) return;
    parallel_for(batch, [&](std::int64_t b) {
      for (std::int64_t i = 0; i < num_kept; ++i)
        std::copy_n(&x(b, kept[std::size_t(b * num_kept + i)], 0), C, &out(b, i, 0));
    });
  }

  /// x: [B, N, C]; returns gather(x) as a new [B, N_keep, C] tensor.
  template <class T>
  core::Tensor<T> gather(ConstView<T, 3> x) const {
    check();
    core::detail::check_shape("TokenKeepPlan", "gather", "x", x, {"B", "N", "C"},
                              {batch, num_tokens, -1}, "the tokens the plan was made for");
    core::Tensor<T> out({batch, num_kept, x.extent(2)});
    gather<T>(x, out.template view<3>());
    return out;
  }

  /// x: a [B, N, C] tensor; returns gather(x).
  template <class T>
  core::Tensor<T> gather(const core::Tensor<T>& x) const {
    return gather<T>(x.template view<3>());
  }

  /// The plan equal to this one followed by `next` (made for this plan's N_keep tokens):
  /// kept[b, i] = this.kept[b, next.kept[b, i]], N0 and original carried through. Throws
  /// config_error when next is not made for this plan's output (B, N_keep, N0 or original).
  TokenKeepPlan then(const TokenKeepPlan& next) const {
    check();
    next.check();
    if (next.batch != batch || next.num_tokens != num_kept || next.num_original != num_original)
      throw config_error(
          "TokenKeepPlan::then: next plan is for B=" + std::to_string(next.batch) +
          ", N=" + std::to_string(next.num_tokens) + ", N0=" + std::to_string(next.num_original) +
          "; expected B=" + std::to_string(batch) + ", N=" + std::to_string(num_kept) +
          " (this plan's N_keep), N0=" + std::to_string(num_original));
    TokenKeepPlan out{batch, num_tokens, next.num_kept, num_original, {}, {}};
    out.kept.resize(next.kept.size());
    out.original.resize(next.kept.size());
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = 0; i < next.num_kept; ++i) {
        const std::size_t at = std::size_t(b * next.num_kept + i);
        const std::size_t from = std::size_t(b * num_kept + next.kept[at]);
        out.kept[at] = kept[from];
        out.original[at] = original[from];
        if (out.original[at] != next.original[at])
          throw config_error("TokenKeepPlan::then: next plan's original[" + std::to_string(at) +
                             "] = " + std::to_string(next.original[at]) + " but its token " +
                             std::to_string(next.kept[at]) + " is original token " +
                             std::to_string(out.original[at]) + " (plans of different cascades)");
      }
    return out;
  }

  /// Returns the map [B, N_keep, N]: 1 where output token i is input token j, else 0 (the form
  /// of MergePlan::source; gather(previous) composes it with an earlier [B, N, N0] map).
  template <class T>
  core::Tensor<T> source() const {
    check();
    core::Tensor<T> out({batch, num_kept, num_tokens});
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = 0; i < num_kept; ++i)
        out(b, i, kept[std::size_t(b * num_kept + i)]) = T(1);
    return out;
  }
};

/// Cascade state of token pruning: the live tokens of every batch element (as indices among the
/// first layer's N0 tokens, ascending) and their importance accumulated over the layers so far.
template <class T = float>
struct TokenImportance {
  std::int64_t batch = 0;              // B
  std::int64_t num_tokens = 0;         // N, live tokens
  std::int64_t num_original = 0;       // N0
  std::vector<std::int64_t> original;  // [B, N], ascending in [0, N0)
  core::Tensor<T> score;               // [B, N], accumulated attention mass

  /// The state before the first layer: N live tokens, scores 0.
  static TokenImportance start(std::int64_t batch, std::int64_t num_tokens) {
    const TokenKeepPlan id = TokenKeepPlan::identity(batch, num_tokens);
    TokenImportance s;
    s.batch = batch;
    s.num_tokens = s.num_original = num_tokens;
    s.original = id.original;
    s.score = core::Tensor<T>({batch, num_tokens});
    return s;
  }

  /// Throws config_error naming the first broken invariant (sizes, lengths, original ascending).
  void check() const {
    const auto fail = [](const std::string& what) {
      throw config_error("TokenImportance::check: " + what);
    };
    if (batch < 0 || num_tokens < 0 || num_tokens > num_original)
      fail("sizes B=" + std::to_string(batch) + ", N=" + std::to_string(num_tokens) +
           ", N0=" + std::to_string(num_original) + " are inconsistent; expected 0 <= N <= N0");
    if (score.rank() != 2 || score.extent(0) != batch || score.extent(1) != num_tokens)
      fail("field 'score' has shape " + switchyard::detail::format_shape(score.shape()) +
           "; expected [B=" + std::to_string(batch) + ", N=" + std::to_string(num_tokens) + "]");
    if (std::int64_t(original.size()) != score.numel())
      fail("field 'original' has " + std::to_string(original.size()) + " entries; expected B * N");
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = 0; i < num_tokens; ++i) {
        const std::int64_t x = original[std::size_t(b * num_tokens + i)];
        const std::int64_t prev = i ? original[std::size_t(b * num_tokens + i - 1)] : -1;
        if (x < 0 || x >= num_original || x <= prev)
          fail("field 'original[" + std::to_string(b * num_tokens + i) +
               "]' = " + std::to_string(x) + " is not in [0, N0) above the previous entry");
      }
  }
};

/// Configuration of CascadeTokenPruner.
struct TokenPruningConfig {
  double keep_ratio = 1.0;   // fraction of the current tokens kept, in (0, 1]
  bool class_token = false;  // the current token 0 (class token) is always kept
};

/// SpAtten cascade token pruning: accumulate each layer's attention mass into the state, route
/// (top tokens by accumulated importance), advance the state to the survivors.
template <class T = float>
class CascadeTokenPruner {
 public:
  using config_type = TokenPruningConfig;
  static constexpr std::string_view name = "CascadeTokenPruner";

  /// Throws config_error if keep_ratio is not in (0, 1] (NaN included).
  explicit CascadeTokenPruner(config_type cfg = {}) : cfg_(cfg) {
    detail::check_keep_ratio(name, cfg_.keep_ratio);
  }
  const config_type& config() const noexcept { return cfg_; }

  /// Tokens kept out of n live ones (pruning_keep_count).
  std::int64_t keep_count(std::int64_t n) const noexcept {
    return pruning_keep_count(n, cfg_.keep_ratio);
  }

  /// key_mass: [B, H_kv, N], the layer's attention mass per key (DenseAttention::forward with
  /// ForwardOptions::key_mass, over the N live tokens as keys). Adds sum over H_kv (in order) to
  /// each live token's score. Throws shape_error on another shape.
  void accumulate(TokenImportance<T>& state, ConstView<T, 3> key_mass) const {
    state.check();
    core::detail::check_shape(name, "accumulate", "key_mass", key_mass, {"B", "H_kv", "N"},
                              {state.batch, -1, state.num_tokens},
                              "the live tokens of the state as keys");
    const std::int64_t Hkv = key_mass.extent(1), N = state.num_tokens;
    parallel_for(state.batch, [&](std::int64_t b) {
      T* s = state.score.data() + b * N;
      for (std::int64_t j = 0; j < N; ++j) {
        T sum(0);
        for (std::int64_t h = 0; h < Hkv; ++h) sum += key_mass(b, h, j);
        s[j] += sum;
      }
    });
  }

  /// The plan for the next layer: per batch element the keep_count(N) live tokens of highest
  /// score (ties: lower index; NaN lowest; the class token first when protected), ascending.
  /// The state is not changed (advance() does that).
  TokenKeepPlan route(const TokenImportance<T>& state) const {
    state.check();
    const std::int64_t N = state.num_tokens, k = keep_count(N);
    TokenKeepPlan p{state.batch, N, k, state.num_original, {}, {}};
    p.kept.resize(std::size_t(state.batch * k));
    p.original.resize(p.kept.size());
    const bool cls = cfg_.class_token && N > 0;
    parallel_for(state.batch, [&](std::int64_t b) {
      std::vector<std::pair<T, std::int64_t>> scratch;
      std::vector<T> values;
      std::int64_t* kept = p.kept.data() + b * k;
      const T* s = state.score.data() + b * N;
      if (cls) {
        kept[0] = 0;
        detail::top_indices_ascending(s + 1, N - 1, k - 1, kept + 1, scratch, values);
        for (std::int64_t i = 1; i < k; ++i) ++kept[i];
      } else {
        detail::top_indices_ascending(s, N, k, kept, scratch, values);
      }
      for (std::int64_t i = 0; i < k; ++i)
        p.original[std::size_t(b * k + i)] = state.original[std::size_t(b * N + kept[i])];
    });
    return p;
  }

  /// Moves the state to the plan's kept tokens (their scores and original indices). Throws
  /// config_error when the plan was not made for this state.
  void advance(TokenImportance<T>& state, const TokenKeepPlan& plan) const {
    state.check();
    plan.check();
    if (plan.batch != state.batch || plan.num_tokens != state.num_tokens ||
        plan.num_original != state.num_original)
      throw config_error(
          std::string(name) + "::advance: plan is for B=" + std::to_string(plan.batch) +
          ", N=" + std::to_string(plan.num_tokens) + ", N0=" + std::to_string(plan.num_original) +
          "; the state has B=" + std::to_string(state.batch) +
          ", N=" + std::to_string(state.num_tokens) + ", N0=" + std::to_string(state.num_original));
    const std::int64_t N = state.num_tokens, k = plan.num_kept;
    for (std::int64_t b = 0; b < state.batch; ++b)
      for (std::int64_t i = 0; i < k; ++i) {
        const std::size_t at = std::size_t(b * k + i);
        if (state.original[std::size_t(b * N + plan.kept[at])] != plan.original[at])
          throw config_error(std::string(name) + "::advance: plan's original[" +
                             std::to_string(at) + "] = " + std::to_string(plan.original[at]) +
                             " is not the state's token " + std::to_string(plan.kept[at]) +
                             " (a plan of another cascade)");
      }
    core::Tensor<T> score({state.batch, k});
    std::vector<std::int64_t> original(plan.original);
    for (std::int64_t b = 0; b < state.batch; ++b)
      for (std::int64_t i = 0; i < k; ++i)
        score(b, i) = state.score(b, plan.kept[std::size_t(b * k + i)]);
    state.num_tokens = k;
    state.score = std::move(score);
    state.original = std::move(original);
  }

  /// accumulate, route and advance in one call; returns the plan to gather the layer's tokens.
  TokenKeepPlan prune(TokenImportance<T>& state, ConstView<T, 3> key_mass) const {
    accumulate(state, key_mass);
    TokenKeepPlan p = route(state);
    advance(state, p);
    return p;
  }

 private:
  config_type cfg_;
};

/// Which heads the next layer computes, per batch element: active[b * H + h] (1 = computed),
/// the form ForwardOptions::active_heads takes, and the kept heads as indices, ascending.
struct HeadKeepPlan {
  std::int64_t batch = 0;            // B
  std::int64_t num_heads = 0;        // H
  std::int64_t num_kept = 0;         // H_keep, the same for every batch element
  std::vector<std::uint8_t> active;  // [B, H]
  std::vector<std::int64_t> kept;    // [B, H_keep], ascending in [0, H)
};

/// Cascade state of head pruning: per (batch element, head) the accumulated output magnitude
/// and whether the head is still active.
template <class T = float>
struct HeadImportance {
  std::int64_t batch = 0;            // B
  std::int64_t num_heads = 0;        // H
  core::Tensor<T> score;             // [B, H]
  std::vector<std::uint8_t> active;  // [B, H], 1 = computed

  /// The state before the first layer: every head active, scores 0.
  static HeadImportance start(std::int64_t batch, std::int64_t num_heads) {
    if (batch < 0 || num_heads < 0)
      throw config_error("HeadImportance::start: sizes B=" + std::to_string(batch) +
                         ", H=" + std::to_string(num_heads) + " must be >= 0");
    switchyard::detail::checked_size("HeadImportance", "start", "sizes", {batch, num_heads},
                                     sizeof(T) + 1);
    HeadImportance s;
    s.batch = batch;
    s.num_heads = num_heads;
    s.score = core::Tensor<T>({batch, num_heads});
    s.active.assign(std::size_t(s.score.numel()), 1);
    return s;
  }

  /// Active heads of batch element b.
  std::int64_t num_active(std::int64_t b) const noexcept {
    return std::count_if(active.begin() + b * num_heads, active.begin() + (b + 1) * num_heads,
                         [](std::uint8_t f) { return f != 0; });
  }

  /// Throws config_error on inconsistent sizes or lengths.
  void check() const {
    if (batch < 0 || num_heads < 0 || score.rank() != 2 || score.extent(0) != batch ||
        score.extent(1) != num_heads || std::int64_t(active.size()) != score.numel())
      throw config_error("HeadImportance::check: sizes B=" + std::to_string(batch) +
                         ", H=" + std::to_string(num_heads) + ", score " +
                         switchyard::detail::format_shape(score.shape()) + ", active " +
                         std::to_string(active.size()) + " entries are inconsistent");
  }
};

/// Configuration of CascadeHeadPruner.
struct HeadPruningConfig {
  double keep_ratio = 1.0;  // fraction of the active heads kept, in (0, 1]
};

/// SpAtten cascade head pruning: accumulate each layer's head-output magnitudes, route (top
/// active heads by accumulated importance), advance the state.
template <class T = float>
class CascadeHeadPruner {
 public:
  using config_type = HeadPruningConfig;
  static constexpr std::string_view name = "CascadeHeadPruner";

  /// Throws config_error if keep_ratio is not in (0, 1] (NaN included).
  explicit CascadeHeadPruner(config_type cfg = {}) : cfg_(cfg) {
    detail::check_keep_ratio(name, cfg_.keep_ratio);
  }
  const config_type& config() const noexcept { return cfg_; }

  /// Heads kept out of n active ones (pruning_keep_count).
  std::int64_t keep_count(std::int64_t n) const noexcept {
    return pruning_keep_count(n, cfg_.keep_ratio);
  }

  /// head_out: [B, T, H, D], the layer's attention output per head (before the output
  /// projection). Adds sum_t sum_d |head_out[b, t, h, d]| (summed in double, in (t, d) order) to
  /// the score of each active head; inactive heads are not read. Throws shape_error on a B or H
  /// other than the state's.
  void accumulate(HeadImportance<T>& state, ConstView<T, 4> head_out) const {
    state.check();
    core::detail::check_shape(name, "accumulate", "head_out", head_out, {"B", "T", "H", "D"},
                              {state.batch, -1, state.num_heads, -1},
                              "the state's batch and heads");
    const std::int64_t H = state.num_heads, Tn = head_out.extent(1), D = head_out.extent(3);
    parallel_for(state.batch * H, [&](std::int64_t task) {
      const std::int64_t b = task / H, h = task % H;
      if (!state.active[std::size_t(task)]) return;
      double sum = 0;
      for (std::int64_t t = 0; t < Tn; ++t)
        for (std::int64_t d = 0; d < D; ++d) sum += std::abs(double(head_out(b, t, h, d)));
      state.score.data()[task] += T(sum);
    });
  }

  /// The plan for the next layer: per batch element the keep_count(active) active heads of
  /// highest score (ties: lower index; NaN lowest), ascending. Throws config_error when batch
  /// elements have different numbers of active heads (a state edited by hand).
  HeadKeepPlan route(const HeadImportance<T>& state) const {
    state.check();
    const std::int64_t B = state.batch, H = state.num_heads;
    const std::int64_t n = B > 0 ? state.num_active(0) : H;
    for (std::int64_t b = 1; b < B; ++b)
      if (state.num_active(b) != n)
        throw config_error(std::string(name) + "::route: batch element " + std::to_string(b) +
                           " has " + std::to_string(state.num_active(b)) +
                           " active heads, batch element 0 has " + std::to_string(n) +
                           "; expected the same number");
    const std::int64_t k = keep_count(n);
    HeadKeepPlan p{B, H, k, std::vector<std::uint8_t>(std::size_t(B * H), 0),
                   std::vector<std::int64_t>(std::size_t(B * k))};
    std::vector<std::pair<T, std::int64_t>> scratch;
    std::vector<T> values, cand_score;
    std::vector<std::int64_t> cand, pick(static_cast<std::size_t>(k));
    for (std::int64_t b = 0; b < B; ++b) {
      cand.clear();
      cand_score.clear();
      for (std::int64_t h = 0; h < H; ++h)
        if (state.active[std::size_t(b * H + h)]) {
          cand.push_back(h);
          cand_score.push_back(state.score(b, h));
        }
      detail::top_indices_ascending(cand_score.data(), n, k, pick.data(), scratch, values);
      for (std::int64_t i = 0; i < k; ++i) {
        const std::int64_t h = cand[std::size_t(pick[std::size_t(i)])];
        p.kept[std::size_t(b * k + i)] = h;
        p.active[std::size_t(b * H + h)] = 1;
      }
    }
    return p;
  }

  /// Sets the state's active heads to the plan's. Throws config_error when the plan was not made
  /// for this state (sizes) or activates a head the state has pruned.
  void advance(HeadImportance<T>& state, const HeadKeepPlan& plan) const {
    state.check();
    if (plan.batch != state.batch || plan.num_heads != state.num_heads ||
        plan.active.size() != state.active.size())
      throw config_error(std::string(name) + "::advance: plan is for B=" +
                         std::to_string(plan.batch) + ", H=" + std::to_string(plan.num_heads) +
                         "; the state has B=" + std::to_string(state.batch) +
                         ", H=" + std::to_string(state.num_heads));
    for (std::size_t i = 0; i < plan.active.size(); ++i)
      if (plan.active[i] && !state.active[i])
        throw config_error(
            std::string(name) + "::advance: plan activates head " +
            std::to_string(std::int64_t(i) % std::max<std::int64_t>(1, plan.num_heads)) +
            " of batch element " +
            std::to_string(std::int64_t(i) / std::max<std::int64_t>(1, plan.num_heads)) +
            ", which is pruned (pruned heads stay pruned)");
    state.active = plan.active;
  }

  /// accumulate, route and advance in one call; returns the plan (its active flags are the next
  /// layer's ForwardOptions::active_heads).
  HeadKeepPlan prune(HeadImportance<T>& state, ConstView<T, 4> head_out) const {
    accumulate(state, head_out);
    HeadKeepPlan p = route(state);
    advance(state, p);
    return p;
  }

 private:
  config_type cfg_;
};

}  // namespace tokens
}  // namespace v0
}  // namespace switchyard
