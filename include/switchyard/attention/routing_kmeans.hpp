#pragma once
// Routing Transformer k-means attention (lucidrains/routing-transformer @3f6c461,
// KmeansAttention + Kmeans, eval-mode forward; the training-mode centroid update
// is an explicit call), routed through an AttentionPlan and run by PlanExecutor.
//
// Per batch element b and head h, with centroids means[h] ([C, D], explicit state):
//   routing   xn = normalize(x) (L2, eps 1e-12); dists[c, t] = means[h, c] . xn_t;
//             cluster c takes its top-w tokens by dists[., c] (w = min(window_size, T);
//             ties toward the lower token index; a token may sit in 0, 1 or several
//             clusters). Shared QK: x = q, and the same windows serve queries and keys.
//             Separate QK: queries route by normalize(q), keys by normalize(k).
//   attention inside each cluster: logits = q . k * scale (default D^-0.5) with
//             shared QK keys = normalize(q) (queries are NOT normalised), separate
//             QK keys = k as given. Causal: a key later than the query (original
//             positions) is masked. Shared QK: a query's own token gets the logit
//             self_value (-5e4) after the causal mask, so a token with no earlier
//             window-mate attends to itself.
//   output    per token, the sum of its cluster outputs / (count + 1e-5); a token in
//             no cluster outputs exactly 0.
//   aux loss  commitment * mean((xn - means[argmax_c dists])^2) over all routed
//             vectors (q, and k when separate).
// Cost per (b, h): O(T C D) routing + O(C T) top-k + O(C w^2 D) attention; with the
// default C ~ sqrt(T) and w ~ T / C ~ sqrt(T) that is O(T^1.5 D), against O(T^2 D)
// for dense attention.
//
// Centroid state (KMeansState): means [H, C, D] plus an initialised flag. A forward
// with uninitialised state throws (the reference initialises silently on the first
// forward). init_kmeans_state() is the deterministic seeded initialiser: per head,
// C distinct samples drawn by a Philox-seeded permutation of the normalised vectors
// (with replacement when fewer than C), then 10 spherical k-means iterations (the
// reference's kmeans_init_iters). Empty-cluster rule: during initialisation an empty
// cluster is re-seeded with the sample least similar to its own centroid (lowest
// index on ties, each sample used once per iteration); in update_centroids (EMA) an
// empty cluster keeps its mean, as the reference does.
// update_centroids() is the reference's training step: new = normalize(sum of the
// vectors assigned to each cluster, summed over the batch); means = decay * means +
// (1 - decay) * new (ema_decay 0.999; means are not renormalised afterwards).
//
// Not implemented: the per-cluster memory key/value of separate-QK causal mode
// (reference num_mem_kv > 0); separate QK here is the reference with num_mem_kv = 0.
// Query/key padding masks are not supported. NaN in q, k or the centroids is an error
// (it would silently reorder the top-k windows).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/attention/plan_executor.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/rng.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/topk.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// Spherical k-means centroids per head: means [H, C, D]; initialised says whether
/// they hold centroids (init_kmeans_state, loaded weights, or set by the caller).
template <class T>
struct KMeansState {
  core::Tensor<T> means;
  bool initialised = false;

  KMeansState() = default;
  KMeansState(std::int64_t H, std::int64_t C, std::int64_t D) : means({H, C, D}) {
    for (auto& x : means) x = T(0);
  }
};

/// The default cluster count for T tokens: round(sqrt(T)), at least 1.
inline std::int64_t default_num_clusters(std::int64_t T) {
  return std::max<std::int64_t>(1, std::llround(std::sqrt(double(std::max<std::int64_t>(0, T)))));
}

/// Configuration of RoutingAttention (names as the reference's KmeansAttention).
struct RoutingAttentionConfig {
  std::int64_t num_clusters = 0;  // C; 0 = default_num_clusters(T) at each call
  std::int64_t window_size = 64;  // w: tokens per cluster (min(w, T) used)
  bool causal = false;
  bool shared_qk = true;
  double ema_decay = 0.999;
  double commitment = 1e-4;
  double self_value = -5e4;                    // TOKEN_SELF_ATTN_VALUE (shared QK only)
  double scatter_eps = 1e-5;                   // output = sum / (count + scatter_eps)
  std::optional<double> scale = std::nullopt;  // default D^-0.5
};

/// Routing decision of one call: the plan plus what produced it.
template <class T>
struct KMeansRouting {
  AttentionPlan plan;                     // groups (b, h, c) in that order, accumulate mode
  core::Tensor<std::int64_t> indices;     // [B, H, C * w] query windows, cluster-major
  core::Tensor<std::int64_t> kv_indices;  // [B, H, C * w_kv] key windows (== indices if shared)
  core::Tensor<std::int64_t> buckets;     // [B, H, T (+ S)] argmax cluster of each routed vector
  core::Tensor<T> dists;                  // [B, H, C, T (+ S)] means . normalize(x)
  core::Tensor<T> normalized;             // [B, H, T (+ S), D] normalize(q) (then normalize(k))
  double aux_loss = 0;                    // commitment loss
};

namespace detail {

// x [B, N, H, D] (any strides) -> xn [B, H, N, D] contiguous, L2-normalised.
template <class T>
void normalize_rows(ConstView<T, 4> x, T* xn, std::int64_t n_total, std::int64_t n_off) {
  const std::int64_t B = x.extent(0), N = x.extent(1), H = x.extent(2), D = x.extent(3);
  parallel_for(B * H, [&](std::int64_t task) {
    const std::int64_t b = task / H, h = task % H;
    for (std::int64_t t = 0; t < N; ++t) {
      T* dst = xn + ((b * H + h) * n_total + n_off + t) * D;
      double ss = 0;
      for (std::int64_t d = 0; d < D; ++d) {
        const double v = double(x(b, t, h, d));
        ss += v * v;
      }
      const T inv = T(1) / std::max(T(std::sqrt(ss)), T(1e-12));
      for (std::int64_t d = 0; d < D; ++d) dst[d] = x(b, t, h, d) * inv;
    }
  });
}

template <class T>
bool has_nan(ConstView<T, 4> x) {
  for (std::int64_t a = 0; a < x.extent(0); ++a)
    for (std::int64_t b = 0; b < x.extent(1); ++b)
      for (std::int64_t c = 0; c < x.extent(2); ++c)
        for (std::int64_t d = 0; d < x.extent(3); ++d)
          if (std::isnan(x(a, b, c, d))) return true;
  return false;
}

// One spherical k-means step on xn [B, H, N, D] for every head: means_new[h, c] =
// normalize(sum of vectors whose argmax cluster is c); counts[h, c] = members.
template <class T>
void kmeans_sums(const T* xn, std::int64_t B, std::int64_t H, std::int64_t N, std::int64_t D,
                 const T* means, std::int64_t C, std::vector<double>& sums,
                 std::vector<std::int64_t>& counts, std::vector<double>* best = nullptr,
                 std::vector<std::int64_t>* bucket_of = nullptr) {
  sums.assign(std::size_t(H * C * D), 0.0);
  counts.assign(std::size_t(H * C), 0);
  if (best) best->assign(std::size_t(H * B * N), 0.0);
  if (bucket_of) bucket_of->assign(std::size_t(H * B * N), 0);
  parallel_for(H, [&](std::int64_t h) {
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < N; ++t) {
        const T* x = xn + ((b * H + h) * N + t) * D;
        std::int64_t arg = 0;
        T bv = -std::numeric_limits<T>::infinity();
        for (std::int64_t c = 0; c < C; ++c) {
          const T* m = means + (h * C + c) * D;
          T s(0);
          for (std::int64_t d = 0; d < D; ++d) s += x[d] * m[d];
          if (s > bv) bv = s, arg = c;
        }
        if (best) (*best)[std::size_t((h * B + b) * N + t)] = double(bv);
        if (bucket_of) (*bucket_of)[std::size_t((h * B + b) * N + t)] = arg;
        ++counts[std::size_t(h * C + arg)];
        double* dst = sums.data() + (h * C + arg) * D;
        for (std::int64_t d = 0; d < D; ++d) dst[d] += double(x[d]);
      }
  });
}

// Top-k of x[0 .. n) into idx, sorted by value descending, ties toward the lower
// index (core::topk's rule, NaN-free input): one scan keeping the k best in a heap
// whose top is the worst kept (lowest value, then highest index); a later element
// enters only if strictly greater than that top. O(n + k log k log(n / k)) typical.
template <class T>
void top_window(const T* x, std::int64_t n, std::int64_t k, std::int64_t* idx,
                std::vector<std::pair<T, std::int64_t>>& heap) {
  // "a before b in the heap order" = a is better, so the heap top is the worst.
  const auto better = [](const std::pair<T, std::int64_t>& a, const std::pair<T, std::int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  heap.clear();
  for (std::int64_t i = 0; i < k; ++i) heap.emplace_back(x[i], i);
  std::make_heap(heap.begin(), heap.end(), better);
  T worst = heap.front().first;
  for (std::int64_t i = k; i < n; ++i) {
    if (x[i] > worst) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = {x[i], i};
      std::push_heap(heap.begin(), heap.end(), better);
      worst = heap.front().first;
    }
  }
  std::sort(heap.begin(), heap.end(), better);
  for (std::int64_t i = 0; i < k; ++i) idx[i] = heap[std::size_t(i)].second;
}

}  // namespace detail

/// Routing Transformer k-means attention (see the file comment), executed by
/// PlanExecutor on Arch.
template <class T = float, class Arch = simd::default_arch>
class RoutingAttention {
 public:
  using config_type = RoutingAttentionConfig;
  static constexpr std::string_view name = "RoutingAttention";

  /// Throws config_error for window_size < 1, num_clusters < 0, ema_decay outside
  /// [0, 1], commitment or scatter_eps negative or NaN, self_value NaN, a scale not
  /// finite and > 0.
  explicit RoutingAttention(config_type cfg = {}) : cfg_(cfg) {
    const auto fail = [](std::string_view arg, auto v, std::string_view want) {
      switchyard::detail::fail_config(name, "RoutingAttention", arg, v, want);
    };
    if (cfg_.window_size < 1) fail("window_size", cfg_.window_size, ">= 1");
    if (cfg_.num_clusters < 0) fail("num_clusters", cfg_.num_clusters, ">= 0 (0 = sqrt(T))");
    if (!(cfg_.ema_decay >= 0 && cfg_.ema_decay <= 1)) fail("ema_decay", cfg_.ema_decay, "[0, 1]");
    if (!(cfg_.commitment >= 0)) fail("commitment", cfg_.commitment, ">= 0");
    if (!(cfg_.scatter_eps >= 0)) fail("scatter_eps", cfg_.scatter_eps, ">= 0");
    if (std::isnan(cfg_.self_value)) fail("self_value", cfg_.self_value, "not NaN");
    if (cfg_.scale && !(std::isfinite(*cfg_.scale) && *cfg_.scale > 0))
      fail("scale", *cfg_.scale, "a finite value > 0");
  }
  const config_type& config() const noexcept { return cfg_; }

  /// Clusters used for T tokens (config value, or default_num_clusters(T)).
  std::int64_t num_clusters(std::int64_t T_len) const noexcept {
    return cfg_.num_clusters > 0 ? cfg_.num_clusters : default_num_clusters(T_len);
  }

  /// Routing only. q: [B, T, H, D]; k: [B, S, H, D] (separate QK; ignored and may be
  /// empty when shared_qk). state.means: [H, C, D], initialised.
  KMeansRouting<T> route(ConstView<T, 4> q, ConstView<T, 4> k, const KMeansState<T>& state) const {
    const bool shared = cfg_.shared_qk;
    const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
    const std::int64_t S = shared ? Tq : k.extent(1);
    check_state(q, state, "route");
    if (!shared) {
      core::detail::check_shape<const T, 4>(name, "route", "k", k, {"B", "S", "H", "D"},
                                            Shape<4>{B, -1, H, D}, "k matches q in B, H and D");
      if (detail::has_nan(k)) nan_error("route", "k");
    }
    if (detail::has_nan(q)) nan_error("route", "q");
    const std::int64_t C = state.means.extent(1);
    const std::int64_t w = std::min(cfg_.window_size, Tq), wk = std::min(cfg_.window_size, S);
    const std::int64_t N = shared ? Tq : Tq + S;  // routed vectors per (b, h)

    KMeansRouting<T> r;
    r.normalized = core::Tensor<T>({B, H, std::max<std::int64_t>(1, N), D});
    const auto& xn = r.normalized;
    detail::normalize_rows<T>(q, r.normalized.data(), N, 0);
    if (!shared) detail::normalize_rows<T>(k, r.normalized.data(), N, Tq);
    r.dists = core::Tensor<T>({B, H, C, std::max<std::int64_t>(1, N)});
    r.buckets = core::Tensor<std::int64_t>({B, H, N});
    r.indices = core::Tensor<std::int64_t>({B, H, C * w});
    r.kv_indices = core::Tensor<std::int64_t>({B, H, C * wk});
    std::vector<double> loss(std::size_t(B * H), 0.0);
    parallel_for(B * H, [&](std::int64_t task) {
      const std::int64_t b = task / H, h = task % H;
      const T* x = xn.data() + task * N * D;
      const T* m = state.means.data() + h * C * D;
      // dists [C, N] = means[h] . xn^T
      T* const dt = &r.dists(b, h, 0, 0);
      core::gemm<T, Arch>(ConstView<T, 2>(m, {C, D}), core::Trans::no, ConstView<T, 2>(x, {N, D}),
                          core::Trans::yes, View<T, 2>(dt, {C, N}));
      // argmax over clusters, ties toward the lower cluster, rows read in order
      std::int64_t* const bk = &r.buckets(b, h, 0);
      std::vector<T> best(dt, dt + N);
      std::fill_n(bk, N, 0);
      for (std::int64_t c = 1; c < C; ++c)
        for (std::int64_t t = 0; t < N; ++t)
          if (dt[c * N + t] > best[std::size_t(t)]) best[std::size_t(t)] = dt[c * N + t], bk[t] = c;
      double l = 0;
      for (std::int64_t t = 0; t < N; ++t) {
        const std::int64_t arg = bk[t];
        for (std::int64_t d = 0; d < D; ++d) {
          const double e = double(x[t * D + d]) - double(m[arg * D + d]);
          l += e * e;
        }
      }
      loss[std::size_t(task)] = l;
      const auto windows = [&](std::int64_t off, std::int64_t len, std::int64_t ww,
                               std::int64_t* dst) {
        std::vector<std::pair<T, std::int64_t>> scratch;
        for (std::int64_t c = 0; c < C; ++c)
          detail::top_window(dt + c * N + off, len, ww, dst + c * ww, scratch);
      };
      windows(0, Tq, w, &r.indices(b, h, 0));
      if (shared) {
        std::copy_n(&r.indices(b, h, 0), C * w, &r.kv_indices(b, h, 0));
      } else {
        windows(Tq, S, wk, &r.kv_indices(b, h, 0));
      }
    });
    double total = 0;
    for (const double l : loss) total += l;
    r.aux_loss = B * H * N * D > 0 ? cfg_.commitment * total / double(B * H * N * D) : 0.0;

    r.plan = AttentionPlan(B, H, Tq, S);
    r.plan.output = PlanOutput::accumulate;
    r.plan.rule.causal = cfg_.causal;
    if (shared) r.plan.rule.self_value = cfg_.self_value;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t c = 0; c < C; ++c) {
          r.plan.add_group(b, h, std::span<const std::int64_t>(&r.indices(b, h, c * w), w),
                           std::span<const std::int64_t>(&r.kv_indices(b, h, c * wk), wk));
        }
    return r;
  }

  /// Shared QK: q, v and out [B, T, H, D] (any strides); keys are normalize(q).
  /// Returns the commitment loss. Throws shape_error / config_error (see check_state).
  double forward(ConstView<T, 4> q, ConstView<T, 4> v, const KMeansState<T>& state,
                 View<T, 4> out) const {
    if (!cfg_.shared_qk) {
      switchyard::detail::fail_config(name, "forward", "k", "missing",
                                      "k when shared_qk is false (use forward(q, k, v, ...))");
    }
    core::detail::check_shape<const T, 4>(name, "forward", "v", v, {"B", "T", "H", "D"}, q.shape(),
                                          "v has the shape of q");
    core::detail::check_shape<T, 4>(name, "forward", "out", out, {"B", "T", "H", "D"}, q.shape(),
                                    "out has the shape of q");
    const auto r = route(q, ConstView<T, 4>{}, state);
    // keys = normalize(q): r.normalized [B, H, T, D] seen as [B, T, H, D], no copy
    const std::int64_t H = q.extent(2), Tq = q.extent(1), D = q.extent(3);
    const ConstView<T, 4> kn(r.normalized.data(), q.shape(), {H * Tq * D, D, Tq * D, 1});
    execute(r.plan, q, kn, v, out);
    return r.aux_loss;
  }

  /// Separate QK: q [B, T, H, D], k and v [B, S, H, D], out [B, T, H, D]. Keys are
  /// used as given (only routing normalises them). Returns the commitment loss.
  double forward(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
                 const KMeansState<T>& state, View<T, 4> out) const {
    if (cfg_.shared_qk) {
      switchyard::detail::fail_config(name, "forward", "k", "given",
                                      "no k when shared_qk is true (use forward(q, v, ...))");
    }
    core::detail::check_shape<const T, 4>(name, "forward", "v", v, {"B", "S", "H", "D"}, k.shape(),
                                          "v has the shape of k");
    core::detail::check_shape<T, 4>(name, "forward", "out", out, {"B", "T", "H", "D"}, q.shape(),
                                    "out has the shape of q");
    const auto r = route(q, k, state);
    execute(r.plan, q, k, v, out);
    return r.aux_loss;
  }

  /// Allocating shared-QK forward: returns out [B, T, H, D].
  core::Tensor<T> forward(ConstView<T, 4> q, ConstView<T, 4> v, const KMeansState<T>& state,
                          double* aux_loss = nullptr) const {
    core::Tensor<T> out(q.shape());
    const double l = forward(q, v, state, out.template view<4>());
    if (aux_loss) *aux_loss = l;
    return out;
  }

  /// Runs a routing plan (from route): out = per-token sum of cluster outputs /
  /// (count + scatter_eps); tokens in no cluster get exactly 0.
  void execute(const AttentionPlan& plan, ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
               View<T, 4> out) const {
    const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
    core::Tensor<T> counts({B, H, Tq});
    PlanExecutor<T, Arch>({.scale = cfg_.scale}).execute(plan, q, k, v, out, counts);
    const T eps = T(cfg_.scatter_eps);
    parallel_for(B * H, [&](std::int64_t task) {
      const std::int64_t b = task / H, h = task % H;
      for (std::int64_t t = 0; t < Tq; ++t) {
        const T den = counts(b, h, t) + eps;
        for (std::int64_t d = 0; d < D; ++d) out(b, t, h, d) = out(b, t, h, d) / den;
      }
    });
  }

  /// Deterministic seeded initialiser (see the file comment): returns initialised
  /// state [H, C, D] from q [B, T, H, D] (and k [B, S, H, D] when separate QK; pass
  /// an empty view otherwise). C = num_clusters(T). Throws config_error if C > B * N.
  KMeansState<T> init_state(ConstView<T, 4> q, ConstView<T, 4> k, std::uint64_t seed,
                            int iterations = 10) const {
    const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
    const std::int64_t C = num_clusters(Tq);
    const bool sep = !cfg_.shared_qk && k.data() != nullptr;
    const std::int64_t N = Tq + (sep ? k.extent(1) : 0);
    if (B * N < 1) {
      switchyard::detail::fail_config(name, "init_state", "q", "empty", "at least one token");
    }
    core::Tensor<T> xn({B, H, N, D});
    detail::normalize_rows<T>(q, xn.data(), N, 0);
    if (sep) detail::normalize_rows<T>(k, xn.data(), N, Tq);
    KMeansState<T> st(H, C, D);
    const std::int64_t M = B * N;  // samples per head, in (b, t) order
    const auto sample = [&](std::int64_t h, std::int64_t s) {
      return xn.data() + (((s / N) * H + h) * N + s % N) * D;
    };
    const core::Rng rng(seed, 0x6b6d65616e73ull);  // "kmeans"
    for (std::int64_t h = 0; h < H; ++h) {
      std::vector<std::int64_t> perm(static_cast<std::size_t>(M));
      for (std::int64_t i = 0; i < M; ++i) perm[std::size_t(i)] = i;
      for (std::int64_t c = 0; c < C; ++c) {
        std::int64_t pick;
        const std::uint64_t draw = std::uint64_t(h * C + c);
        if (M >= C) {  // partial Fisher-Yates
          const std::int64_t j =
              c + std::min<std::int64_t>(M - c - 1,
                                         std::int64_t(rng.uniform<double>(draw) * double(M - c)));
          std::swap(perm[std::size_t(c)], perm[std::size_t(j)]);
          pick = perm[std::size_t(c)];
        } else {
          pick = std::min<std::int64_t>(M - 1, std::int64_t(rng.uniform<double>(draw) * double(M)));
        }
        std::copy_n(sample(h, pick), D, st.means.data() + (h * C + c) * D);
      }
    }
    std::vector<double> sums, best;
    std::vector<std::int64_t> counts, bucket_of;
    for (int it = 0; it < iterations; ++it) {
      detail::kmeans_sums<T>(xn.data(), B, H, N, D, st.means.data(), C, sums, counts, &best,
                             &bucket_of);
      for (std::int64_t h = 0; h < H; ++h) {
        std::vector<char> used(static_cast<std::size_t>(M), 0);
        for (std::int64_t c = 0; c < C; ++c) {
          T* m = st.means.data() + (h * C + c) * D;
          if (counts[std::size_t(h * C + c)] > 0) {
            const double* s = sums.data() + (h * C + c) * D;
            double n2 = 0;
            for (std::int64_t d = 0; d < D; ++d) n2 += s[d] * s[d];
            const double inv = 1.0 / std::max(std::sqrt(n2), 1e-12);
            for (std::int64_t d = 0; d < D; ++d) m[d] = T(s[d] * inv);
          } else {  // re-seed: the least well-served sample not used yet
            std::int64_t arg = -1;
            for (std::int64_t s = 0; s < M; ++s) {
              const std::size_t at = std::size_t(h * B * N + s);
              if (used[std::size_t(s)]) continue;
              if (arg < 0 || best[at] < best[std::size_t(h * B * N + arg)]) arg = s;
            }
            if (arg >= 0) {
              used[std::size_t(arg)] = 1;
              std::copy_n(sample(h, arg), D, m);
            }
          }
        }
      }
    }
    st.initialised = true;
    return st;
  }

  /// Training-mode centroid update (the reference's Kmeans.update after a forward):
  /// buckets of normalize(q) (and normalize(k) when separate QK) under the current
  /// means; new[h, c] = normalize(sum of members over the batch), an empty cluster
  /// keeping its mean; means = ema_decay * means + (1 - ema_decay) * new.
  void update_centroids(KMeansState<T>& state, ConstView<T, 4> q, ConstView<T, 4> k = {}) const {
    check_state(q, state, "update_centroids");
    const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
    const bool sep = !cfg_.shared_qk && k.data() != nullptr;
    const std::int64_t N = Tq + (sep ? k.extent(1) : 0);
    const std::int64_t C = state.means.extent(1);
    core::Tensor<T> xn({B, H, std::max<std::int64_t>(1, N), D});
    detail::normalize_rows<T>(q, xn.data(), N, 0);
    if (sep) detail::normalize_rows<T>(k, xn.data(), N, Tq);
    std::vector<double> sums;
    std::vector<std::int64_t> counts;
    detail::kmeans_sums<T>(xn.data(), B, H, N, D, state.means.data(), C, sums, counts);
    const T decay = T(cfg_.ema_decay);
    for (std::int64_t hc = 0; hc < H * C; ++hc) {
      if (counts[std::size_t(hc)] == 0) continue;
      const double* s = sums.data() + hc * D;
      double n2 = 0;
      for (std::int64_t d = 0; d < D; ++d) n2 += s[d] * s[d];
      const double inv = 1.0 / std::max(std::sqrt(n2), 1e-12);
      T* m = state.means.data() + hc * D;
      for (std::int64_t d = 0; d < D; ++d) m[d] = m[d] * decay + T(s[d] * inv) * (T(1) - decay);
    }
  }

 private:
  // Throws for an uninitialised state, wrong means shape, C > T, NaN in the means.
  void check_state(ConstView<T, 4> q, const KMeansState<T>& state, std::string_view fn) const {
    const std::int64_t Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
    const std::int64_t C = num_clusters(Tq);
    if (!state.initialised) {
      switchyard::detail::fail_config(
          name, fn, "state", "uninitialised",
          "initialised centroids (init_state, or set means and initialised = true)");
    }
    if (C > Tq) {
      switchyard::detail::fail_config(name, fn, "num_clusters", C,
                                      "<= T = " + std::to_string(Tq) + " tokens");
    }
    const auto& m = state.means;
    const Shape<3> got =
        m.rank() == 3 ? Shape<3>{m.extent(0), m.extent(1), m.extent(2)} : Shape<3>{-1, -1, -1};
    if (m.rank() != 3 || got[0] != H || got[1] != C || got[2] != D) {
      const std::int64_t want[3] = {H, C, D};
      switchyard::detail::fail_shape(name, fn, "state.means",
                                     m.rank() == 3
                                         ? switchyard::detail::format_shape({"H", "C", "D"}, got)
                                         : "rank " + std::to_string(m.rank()),
                                     switchyard::detail::format_shape({"H", "C", "D"}, want),
                                     "one centroid per head and cluster, C = num_clusters(T)");
    }
    for (const T x : m)
      if (std::isnan(x)) nan_error(fn, "state.means");
  }

  [[noreturn]] static void nan_error(std::string_view fn, std::string_view arg) {
    switchyard::detail::fail_config(name, fn, arg, "NaN", "finite values (NaN would reroute)");
  }

  config_type cfg_;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
