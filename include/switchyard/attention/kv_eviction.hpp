#pragma once
// KV-cache eviction policies: routers over cached tokens. Each scores the positions of a
// KVCache (kv_cache.hpp), from their place in the cache or from the attention mass that
// DenseAttention::decode writes (DecodeOptions::key_mass), and returns a KVKeepPlan that
// KVCache::keep applies; side arrays (scores, original positions) follow with
// KVKeepPlan::apply. Positions are cache positions: after an eviction the survivors are
// renumbered 0, 1, ... in their order, so "first" and "last" always mean cache order.
//
//   StreamingLLM (Xiao et al., mit-han-lab/streaming-llm StartRecentKVCache): once a head holds
//     more than sinks + recent, keep the first `sinks` positions and the last `recent`.
//   H2O (Zhang et al., FMInference/H2O H2OKVCache_LayerWise): every step adds the step's
//     attention mass to a per-position score (H2OState, a new position starts at 0 and so
//     with its own attention); once a head holds more than heavy + recent, keep the `heavy`
//     best-scored positions before the recent window, and the last `recent`, per KV head;
//     evicted positions' scores are dropped, kept ones carried over.
//   TOVA (Oren et al., schwartz-lab-NLP/TOVA TOVACache.reduce): once a sequence holds more than
//     `budget`, keep the `budget` positions with the highest attention from the current query
//     averaged over heads; the same positions for every head of the sequence.
//   SnapKV (Li et al.): at the end of prefill, the attention of the last `window` queries to
//     the earlier keys, summed over those queries, pooled over `kernel` neighbours (average or
//     max, zero padding kernel / 2 each side, as avg_pool1d / max_pool1d), ranks the earlier
//     positions; keep the best budget - window of them per KV head, and the window.
//
// Ties go to the lower position. With grouped-query attention the mass of a KV head is summed
// over its query heads (the references are multi-head: one query head per KV head). H2O sums
// over the batch in the reference (one shared cache layout); here every sequence has its own.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "switchyard/attention/kv_cache.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

namespace detail {

// The plan skeleton: one (sequence, KV head) after another; `choose(i, len, out)` appends the
// kept positions of head i (ascending).
template <class T, class S, class Choose>
KVKeepPlan make_keep_plan(const KVCache<T, S>& cache, Choose&& choose) {
  KVKeepPlan plan;
  const std::int64_t heads = cache.batch() * cache.kv_heads();
  plan.lengths.assign(cache.lengths().begin(), cache.lengths().end());
  plan.offsets.reserve(std::size_t(heads + 1));
  plan.offsets.push_back(0);
  for (std::int64_t i = 0; i < heads; ++i) {
    choose(i, plan.lengths[std::size_t(i)], plan.positions);
    plan.offsets.push_back(std::int64_t(plan.positions.size()));
  }
  return plan;
}

// Appends to `out`, ascending, the `count` positions p in [0, n) with the highest score(p)
// (ties toward the lower position).
template <class Score>
void top_positions(std::int64_t n, std::int64_t count, Score&& score,
                   std::vector<std::int64_t>& out, std::vector<std::int64_t>& order) {
  order.resize(std::size_t(n));
  std::iota(order.begin(), order.end(), std::int64_t(0));
  count = std::min(count, n);
  std::partial_sort(order.begin(), order.begin() + count, order.end(),
                    [&](std::int64_t a, std::int64_t b) {
                      const auto sa = score(a), sb = score(b);
                      return sa > sb || (sa == sb && a < b);
                    });
  std::sort(order.begin(), order.begin() + count);
  out.insert(out.end(), order.begin(), order.begin() + count);
}

inline void append_range(std::vector<std::int64_t>& out, std::int64_t begin, std::int64_t end) {
  for (std::int64_t p = begin; p < end; ++p) out.push_back(p);
}

// Throws shape_error unless mass is [B, H_kv, capacity] of the cache; config_error for NaN in
// a head's stored positions.
template <class T, class S>
void check_mass(std::string_view policy, std::string_view fn, const KVCache<T, S>& cache,
                ConstView<T, 3> mass) {
  core::detail::check_shape<const T, 3>(policy, fn, "key_mass", mass, {"B", "H_kv", "S"},
                                        Shape<3>{cache.batch(), cache.kv_heads(), cache.capacity()},
                                        "[B, H_kv, capacity] of the cache");
  for (std::int64_t b = 0; b < cache.batch(); ++b)
    for (std::int64_t h = 0; h < cache.kv_heads(); ++h)
      for (std::int64_t j = 0; j < cache.length(b, h); ++j)
        if (std::isnan(static_cast<double>(mass(b, h, j))))
          switchyard::detail::fail_config(policy, fn, "key_mass", "NaN",
                                          "finite attention mass at every stored position");
}

}  // namespace detail

struct StreamingLLMConfig {
  std::int64_t sinks = 4;      ///< first positions always kept (attention sinks), >= 0
  std::int64_t recent = 1020;  ///< last positions kept, >= 1
};

/// StreamingLLM: attention sinks plus a recent window (see the file comment).
class StreamingLLMPolicy {
 public:
  static constexpr std::string_view name = "StreamingLLMPolicy";
  explicit StreamingLLMPolicy(StreamingLLMConfig cfg) : cfg_(cfg) {
    if (cfg.sinks < 0) switchyard::detail::fail_config(name, name, "sinks", cfg.sinks, ">= 0");
    if (cfg.recent < 1) switchyard::detail::fail_config(name, name, "recent", cfg.recent, ">= 1");
    if (cfg.sinks > std::int64_t(1) << 40)
      switchyard::detail::fail_config(name, name, "sinks", cfg.sinks, "<= 2^40");
    if (cfg.recent > std::int64_t(1) << 40)
      switchyard::detail::fail_config(name, name, "recent", cfg.recent, "<= 2^40");
  }
  const StreamingLLMConfig& config() const noexcept { return cfg_; }
  /// Positions kept per head: sinks + recent.
  std::int64_t budget() const noexcept { return cfg_.sinks + cfg_.recent; }

  template <class T, class S>
  KVKeepPlan plan(const KVCache<T, S>& cache) const {
    return detail::make_keep_plan(cache, [&](std::int64_t, std::int64_t len, auto& out) {
      if (len <= budget()) return detail::append_range(out, 0, len);
      detail::append_range(out, 0, cfg_.sinks);
      detail::append_range(out, len - cfg_.recent, len);
    });
  }
  /// plan(cache) applied to the cache.
  template <class T, class S>
  void evict(KVCache<T, S>& cache) const {
    cache.keep(plan(cache));
  }

 private:
  StreamingLLMConfig cfg_;
};

struct H2OConfig {
  std::int64_t heavy = 128;   ///< heavy hitters kept per KV head (hh_size), >= 0
  std::int64_t recent = 128;  ///< last positions kept (recent_size), >= 1
};

/// H2O's accumulated attention per cached position, [B, H_kv, capacity] like the cache. Pass
/// scores() as DecodeOptions::key_mass with accumulate_key_mass = true: each decode step adds
/// its mass, and a position appended after an eviction starts from 0.
template <class T>
class H2OState {
 public:
  template <class S>
  explicit H2OState(const KVCache<T, S>& cache)
      : scores_({cache.batch(), cache.kv_heads(), cache.capacity()}) {}
  View<T, 3> scores() noexcept { return scores_.template view<3>(); }
  ConstView<T, 3> scores() const noexcept { return scores_.template view<3>(); }
  void reset() { std::fill(scores_.begin(), scores_.end(), T(0)); }

 private:
  core::Tensor<T> scores_;
};

/// H2O: heavy hitters by accumulated attention plus a recent window (see the file comment).
class H2OPolicy {
 public:
  static constexpr std::string_view name = "H2OPolicy";
  explicit H2OPolicy(H2OConfig cfg) : cfg_(cfg) {
    if (cfg.heavy < 0) switchyard::detail::fail_config(name, name, "heavy", cfg.heavy, ">= 0");
    if (cfg.recent < 1) switchyard::detail::fail_config(name, name, "recent", cfg.recent, ">= 1");
    if (cfg.heavy > std::int64_t(1) << 40 || cfg.recent > std::int64_t(1) << 40)
      switchyard::detail::fail_config(name, name, "heavy + recent", cfg.heavy, "<= 2^41");
  }
  const H2OConfig& config() const noexcept { return cfg_; }
  std::int64_t budget() const noexcept { return cfg_.heavy + cfg_.recent; }

  /// Keep plan from the accumulated scores (state of this cache).
  template <class T, class S>
  KVKeepPlan plan(const KVCache<T, S>& cache, const H2OState<T>& state) const {
    detail::check_mass(name, "plan", cache, state.scores());
    const auto sc = state.scores();
    std::vector<std::int64_t> order;
    return detail::make_keep_plan(cache, [&](std::int64_t i, std::int64_t len, auto& out) {
      if (len <= budget()) return detail::append_range(out, 0, len);
      const std::int64_t b = i / cache.kv_heads(), h = i % cache.kv_heads();
      detail::top_positions(
          len - cfg_.recent, cfg_.heavy, [&](std::int64_t p) { return sc(b, h, p); }, out, order);
      detail::append_range(out, len - cfg_.recent, len);
    });
  }
  /// Evicts and carries the kept positions' scores along (the others are dropped).
  template <class T, class S>
  void evict(KVCache<T, S>& cache, H2OState<T>& state) const {
    const KVKeepPlan p = plan(cache, state);
    cache.keep(p);
    p.apply(state.scores());
  }

 private:
  H2OConfig cfg_;
};

struct TOVAConfig {
  std::int64_t budget = 512;  ///< positions kept per sequence, >= 1
};

/// TOVA: keep the positions the current query attends to most, averaged over heads (see the
/// file comment).
class TOVAPolicy {
 public:
  static constexpr std::string_view name = "TOVAPolicy";
  explicit TOVAPolicy(TOVAConfig cfg) : cfg_(cfg) {
    if (cfg.budget < 1) switchyard::detail::fail_config(name, name, "budget", cfg.budget, ">= 1");
  }
  const TOVAConfig& config() const noexcept { return cfg_; }
  std::int64_t budget() const noexcept { return cfg_.budget; }

  /// key_mass: [B, H_kv, capacity] from the decode step of one query per sequence (T_new = 1);
  /// every head of a sequence must hold the same positions (TOVA keeps the same ones for all).
  template <class T, class S>
  KVKeepPlan plan(const KVCache<T, S>& cache,
                  std::type_identity_t<ConstView<T, 3>> key_mass) const {
    detail::check_mass(name, "plan", cache, key_mass);
    const std::int64_t Hkv = cache.kv_heads();
    std::vector<std::int64_t> order, seq;
    std::vector<double> score;
    std::int64_t cached_b = -1;
    return detail::make_keep_plan(cache, [&](std::int64_t i, std::int64_t len, auto& out) {
      const std::int64_t b = i / Hkv;
      if (b != cached_b) {  // one choice per sequence, made at its first head
        cached_b = b;
        const std::int64_t n = cache.length(b);  // config_error when the heads differ
        seq.clear();
        if (n <= cfg_.budget) {
          detail::append_range(seq, 0, n);
        } else {
          score.assign(std::size_t(n), 0.0);
          for (std::int64_t h = 0; h < Hkv; ++h)  // the sum ranks as the mean does
            for (std::int64_t p = 0; p < n; ++p) score[std::size_t(p)] += double(key_mass(b, h, p));
          detail::top_positions(
              n, cfg_.budget, [&](std::int64_t p) { return score[std::size_t(p)]; }, seq, order);
        }
      }
      (void)len;
      out.insert(out.end(), seq.begin(), seq.end());
    });
  }
  template <class T, class S>
  void evict(KVCache<T, S>& cache, std::type_identity_t<ConstView<T, 3>> key_mass) const {
    cache.keep(plan(cache, key_mass));
  }

 private:
  TOVAConfig cfg_;
};

enum class SnapKVPooling { avg, max };

struct SnapKVConfig {
  std::int64_t budget = 1024;  ///< positions kept per KV head (max_capacity_prompt), >= window
  std::int64_t window = 32;    ///< observation window: the last queries, always kept, 1..64
  std::int64_t kernel = 5;     ///< pooling width, odd, >= 1
  SnapKVPooling pooling = SnapKVPooling::avg;
};

/// SnapKV: prompt compression at the end of prefill (see the file comment).
class SnapKVPolicy {
 public:
  static constexpr std::string_view name = "SnapKVPolicy";
  explicit SnapKVPolicy(SnapKVConfig cfg) : cfg_(cfg) {
    if (cfg.window < 1 || cfg.window > 64)
      switchyard::detail::fail_config(name, name, "window", cfg.window,
                                      "1..64 (the window's queries run through decode)");
    if (cfg.budget < cfg.window)
      switchyard::detail::fail_config(name, name, "budget", cfg.budget,
                                      ">= window = " + std::to_string(cfg.window));
    if (cfg.kernel < 1 || cfg.kernel % 2 == 0 || cfg.kernel > (std::int64_t(1) << 20))
      switchyard::detail::fail_config(name, name, "kernel", cfg.kernel, "an odd width >= 1");
  }
  const SnapKVConfig& config() const noexcept { return cfg_; }

  /// key_mass: [B, H_kv, capacity], the attention of the last `window` queries of the prompt
  /// (DenseAttention::decode of those queries with DecodeOptions::key_mass, after the whole
  /// prompt is cached).
  template <class T, class S>
  KVKeepPlan plan(const KVCache<T, S>& cache,
                  std::type_identity_t<ConstView<T, 3>> key_mass) const {
    detail::check_mass(name, "plan", cache, key_mass);
    const std::int64_t W = cfg_.window, K = cfg_.kernel, half = K / 2;
    std::vector<std::int64_t> order;
    std::vector<double> pooled;
    return detail::make_keep_plan(cache, [&](std::int64_t i, std::int64_t len, auto& out) {
      if (len <= cfg_.budget) return detail::append_range(out, 0, len);
      const std::int64_t b = i / cache.kv_heads(), h = i % cache.kv_heads(), n = len - W;
      pooled.assign(std::size_t(n), 0.0);
      for (std::int64_t p = 0; p < n; ++p) {
        double acc = cfg_.pooling == SnapKVPooling::avg ? 0.0 : -1.0;
        for (std::int64_t q = std::max<std::int64_t>(0, p - half); q <= std::min(n - 1, p + half);
             ++q) {
          const double m = double(key_mass(b, h, q));
          acc = cfg_.pooling == SnapKVPooling::avg ? acc + m : std::max(acc, m);
        }
        // avg_pool1d counts the zero padding; max_pool1d pads with -inf (ignored here).
        pooled[std::size_t(p)] = cfg_.pooling == SnapKVPooling::avg ? acc / double(K) : acc;
      }
      detail::top_positions(
          n, cfg_.budget - W, [&](std::int64_t p) { return pooled[std::size_t(p)]; }, out, order);
      detail::append_range(out, n, len);
    });
  }
  template <class T, class S>
  void evict(KVCache<T, S>& cache, std::type_identity_t<ConstView<T, 3>> key_mass) const {
    cache.keep(plan(cache, key_mass));
  }

 private:
  SnapKVConfig cfg_;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
