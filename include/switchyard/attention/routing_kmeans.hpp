#pragma once
// Routing Transformer k-means attention (lucidrains/routing-transformer @3f6c461,
// KmeansAttention + Kmeans, eval-mode forward; the training-mode centroid update
// is an explicit call), routed through an AttentionPlan and run by PlanExecutor.
//
// Per batch element b and head h, with centroids means[h] ([C, D], explicit state):
//   routing   xn = normalize(x) (L2, eps 1e-12); dists[c, t] = means[h, c] . xn_t.
//             Shared QK: x = q, and the same clusters serve queries and keys.
//             Separate QK: queries route by normalize(q), keys by normalize(k).
//             Which tokens a cluster takes depends on config.selection:
//     top_window (default, the reference's `distribution`): cluster c takes its
//             top-w tokens by dists[., c] among ALL tokens (w = min(window_size, T);
//             ties toward the lower token index; a token may sit in 0, 1 or several
//             clusters). Not causal by construction: a later token can push an
//             earlier one out of a window, changing earlier outputs.
//     nearest_centroid (the Routing Transformer paper's formulation): each token
//             joins the cluster argmax_c dists[c, t] (ties toward the lower cluster),
//             so clusters have variable sizes and every token lies in exactly one.
//             A token's cluster depends only on its own vector, so with causal = true
//             each output depends only on tokens at positions <= its own (bit for
//             bit: tested by perturbing future tokens).
//   memory    M = memory_kv() = max(num_mem_kv, 1 if causal and separate QK) memory
//             keys/values per head and cluster (the reference's mem_key / mem_value,
//             [H, C, M, D], passed in RoutingExtras): prepended to every cluster's
//             keys/values, used as given (not normalised, also with shared QK),
//             scaled like every logit, never masked (causal or padding), never a
//             self pair. The reference forces M >= 1 for causal separate QK so that
//             no query is left without a visible key; we mirror that rule, so such a
//             layer requires memory (a trained model runs unchanged).
//   attention inside each cluster: logits = q . k * scale (default D^-0.5) with
//             shared QK keys = normalize(q) (queries are NOT normalised), separate
//             QK keys = k as given. Masked pairs get the lowest finite logit (the
//             reference's masked_fill(-FLT_MAX)), in this order:
//               keep masks  (query_mask [B, T], key_mask [B, S], nonzero = keep;
//                           key_mask defaults to query_mask as in the reference):
//                           a pair is kept iff its query and its key are kept;
//               causal      a key later than the query (original positions);
//               self        shared QK: a query's own token gets self_value (-5e4),
//                           even when masked, so a token with no other visible key
//                           attends to itself.
//             A row whose every logit is masked (only possible for separate QK
//             without memory) averages its cluster's values uniformly, as the
//             reference's softmax of equal -FLT_MAX logits does. Masks change
//             neither the routing nor the aux loss (the reference routes all tokens).
//             A masked query still gets an output (memory, itself, or that uniform
//             average), as in the reference; callers usually ignore those rows.
//   output    top_window: per token, the sum of its cluster outputs / (count + 1e-5)
//             (scatter_mean); a token in no cluster outputs exactly 0.
//             nearest_centroid: the token's one cluster output (no division); a
//             token whose cluster has no key and no memory (separate QK) outputs 0.
//   aux loss  commitment * mean((xn - means[argmax_c dists])^2) over all routed
//             vectors (q, and k when separate).
// Cost per (b, h): O(T C D) routing + O(C T) top-k + O(C (w + M) w D) attention; with
// the default C ~ sqrt(T) and w ~ T / C ~ sqrt(T) that is O(T^1.5 D), against
// O(T^2 D) for dense attention. nearest_centroid: O(T C D) routing + sum over
// clusters of n_c (n_c + M) D attention, O(T^2 D / C) for balanced clusters but up to
// O(T^2 D) when most tokens pick one centroid (no window caps a cluster). Use
// top_window to reproduce the reference (and trained models) exactly and for a
// bounded cost; nearest_centroid for autoregressive use, where an output must not
// depend on later tokens (streaming / incremental decoding, strict causal training).
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
// Not implemented: the reference's receives_context / context_window_size mode
// (cross-attention with a separate key window size) and dropout (eval mode only).
// NaN in q, k or the centroids is an error (it would silently reorder the windows).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/attention/plan_executor.hpp"
#include "switchyard/attention/routing_decode.hpp"
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

/// How clusters pick their tokens (see the file comment).
enum class RoutingSelection {
  top_window,        // the reference: each cluster takes its top-w tokens among all T
  nearest_centroid,  // the paper: each token joins its most similar centroid; causal-safe
};

/// Configuration of RoutingAttention (names as the reference's KmeansAttention).
struct RoutingAttentionConfig {
  std::int64_t num_clusters = 0;  // C; 0 = default_num_clusters(T) at each call
  std::int64_t window_size = 64;  // w: tokens per cluster (min(w, T) used; top_window only)
  bool causal = false;
  bool shared_qk = true;
  double ema_decay = 0.999;
  double commitment = 1e-4;
  double self_value = -5e4;                    // TOKEN_SELF_ATTN_VALUE (shared QK only)
  double scatter_eps = 1e-5;                   // output = sum / (count + scatter_eps)
  std::optional<double> scale = std::nullopt;  // default D^-0.5
  std::int64_t num_mem_kv = 0;  // memory keys/values per cluster; at least 1 when causal and
                                // separate QK (the reference's rule, see memory_kv())
  RoutingSelection selection = RoutingSelection::top_window;
};

/// Optional operands of a RoutingAttention forward. Views and spans are not owned;
/// empty members are absent.
template <class T>
struct RoutingExtras {
  ConstView<T, 4> mem_key{};    // [H, C, M, D] the reference's mem_key, M = memory_kv()
  ConstView<T, 4> mem_value{};  // [H, C, M, D] the reference's mem_value
  std::span<const std::uint8_t> query_mask{};  // [B, T] row-major keep flags, nonzero = keep
  std::span<const std::uint8_t> key_mask{};    // [B, S] keep flags; empty = query_mask
};

/// Routing decision of one call: the plan plus what produced it.
template <class T>
struct KMeansRouting {
  // Groups (b, h, c) in that order, each with memory row h * C + c when memory_kv() > 0.
  // top_window: accumulate mode; nearest_centroid: write mode.
  AttentionPlan plan;
  // top_window: [B, H, C * w] query windows, cluster-major (top-w by similarity).
  // nearest_centroid: [B, H, T], the tokens ordered by (cluster, position).
  core::Tensor<std::int64_t> indices;
  core::Tensor<std::int64_t> kv_indices;  // the same for keys ([B, H, C * w_kv] or [B, H, S])
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
    // The row's address by strides: x(b, t, h, 0) would assert when D is 0.
    for (std::int64_t t = 0; t < N; ++t)
      normalize_row(x.data() + b * x.stride(0) + t * x.stride(1) + h * x.stride(2), x.stride(3), D,
                    xn + ((b * H + h) * n_total + n_off + t) * D);
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

// Row (b, h) of a [B, H, n] index tensor; n may be 0 (an empty window), where taking the
// address of element (b, h, 0) would index past the row.
inline std::int64_t* row_of(core::Tensor<std::int64_t>& t, std::int64_t b,
                            std::int64_t h) noexcept {
  return t.data() + (b * t.extent(1) + h) * t.extent(2);
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
  if (k <= 0) return;  // an empty window (no queries or no keys in this sequence)
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
  /// [0, 1], commitment or scatter_eps negative, NaN or inf, self_value NaN, a scale not
  /// finite and > 0, num_mem_kv < 0, an unknown selection.
  explicit RoutingAttention(config_type cfg = {}) : cfg_(cfg) {
    const auto fail = [](std::string_view arg, auto v, std::string_view want) {
      switchyard::detail::fail_config(name, "RoutingAttention", arg, v, want);
    };
    if (cfg_.window_size < 1) fail("window_size", cfg_.window_size, ">= 1");
    if (cfg_.num_clusters < 0) fail("num_clusters", cfg_.num_clusters, ">= 0 (0 = sqrt(T))");
    if (!(cfg_.ema_decay >= 0 && cfg_.ema_decay <= 1)) fail("ema_decay", cfg_.ema_decay, "[0, 1]");
    if (!(cfg_.commitment >= 0 && std::isfinite(cfg_.commitment)))
      fail("commitment", cfg_.commitment, "finite and >= 0");
    if (!(cfg_.scatter_eps >= 0 && std::isfinite(cfg_.scatter_eps)))
      fail("scatter_eps", cfg_.scatter_eps, "finite and >= 0");
    if (std::isnan(cfg_.self_value)) fail("self_value", cfg_.self_value, "not NaN");
    if (cfg_.scale && !(std::isfinite(*cfg_.scale) && *cfg_.scale > 0))
      fail("scale", *cfg_.scale, "a finite value > 0");
    if (cfg_.num_mem_kv < 0) fail("num_mem_kv", cfg_.num_mem_kv, ">= 0");
    if (cfg_.selection != RoutingSelection::top_window &&
        cfg_.selection != RoutingSelection::nearest_centroid)
      fail("selection", int(cfg_.selection), "top_window or nearest_centroid");
  }
  const config_type& config() const noexcept { return cfg_; }

  /// Clusters used for T tokens (config value, or default_num_clusters(T)).
  std::int64_t num_clusters(std::int64_t T_len) const noexcept {
    return cfg_.num_clusters > 0 ? cfg_.num_clusters : default_num_clusters(T_len);
  }

  /// Routing only (config.selection picks the tokens of each cluster). q: [B, T, H, D];
  /// k: [B, S, H, D] (separate QK; ignored and may be empty when shared_qk).
  /// state.means: [H, C, D], initialised. Masks do not change the routing.
  KMeansRouting<T> route(ConstView<T, 4> q, ConstView<T, 4> k, const KMeansState<T>& state) const {
    const bool shared = cfg_.shared_qk;
    const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
    const std::int64_t S = shared ? Tq : k.extent(1);
    core::detail::check_shape<const T, 4>(name, "route", "q", q, {"B", "T", "H", "D"},
                                          Shape<4>{-1, -1, -1, -1});
    check_state(q, state, "route");
    // The routing buffers: normalised q (and k) [B, H, T + S, D] and distances [B, H, C, T + S].
    // Stride-0 views may claim any extents, so sizes are checked before anything is read.
    switchyard::detail::checked_size(name, "route", "q", {B, H, Tq, core::pad_extent(D, 1)},
                                     2 * sizeof(T));
    if (!shared)
      switchyard::detail::checked_size(name, "route", "k", {B, H, S, core::pad_extent(D, 1)},
                                       2 * sizeof(T));
    switchyard::detail::checked_size(
        name, "route", "state.means",
        {B, H, core::pad_extent(state.means.extent(1), 1), core::pad_extent(Tq, 1)}, sizeof(T));
    if (!shared)
      switchyard::detail::checked_size(
          name, "route", "state.means",
          {B, H, core::pad_extent(state.means.extent(1), 1), core::pad_extent(S, 1)}, sizeof(T));
    if (!shared) {
      core::detail::check_shape<const T, 4>(name, "route", "k", k, {"B", "S", "H", "D"},
                                            Shape<4>{B, -1, H, D}, "k matches q in B, H and D");
      if (detail::has_nan(k)) nan_error("route", "k");
    }
    if (detail::has_nan(q)) nan_error("route", "q");
    const std::int64_t C = state.means.extent(1);
    const bool nearest = cfg_.selection == RoutingSelection::nearest_centroid;
    const std::int64_t w = nearest ? Tq : std::min(cfg_.window_size, Tq);
    const std::int64_t wk = nearest ? S : std::min(cfg_.window_size, S);
    const std::int64_t N = shared ? Tq : Tq + S;  // routed vectors per (b, h)

    KMeansRouting<T> r;
    r.normalized = core::Tensor<T>({B, H, std::max<std::int64_t>(1, N), D});
    const auto& xn = r.normalized;
    detail::normalize_rows<T>(q, r.normalized.data(), N, 0);
    if (!shared) detail::normalize_rows<T>(k, r.normalized.data(), N, Tq);
    r.dists = core::Tensor<T>({B, H, C, std::max<std::int64_t>(1, N)});
    r.buckets = core::Tensor<std::int64_t>({B, H, N});
    r.indices = core::Tensor<std::int64_t>({B, H, nearest ? Tq : C * w});
    r.kv_indices = core::Tensor<std::int64_t>({B, H, nearest ? S : C * wk});
    // nearest_centroid: cluster c's members are [off[c], off[c + 1]) of indices
    std::vector<std::int64_t> q_off(nearest ? std::size_t(B * H * (C + 1)) : 0),
        k_off(nearest ? std::size_t(B * H * (C + 1)) : 0);
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
      // Counting sort of tokens off .. off + len by bucket, positions ascending.
      const auto by_cluster = [&](std::int64_t off, std::int64_t len, std::int64_t* dst,
                                  std::int64_t* o) {
        std::fill_n(o, C + 1, 0);
        for (std::int64_t t = 0; t < len; ++t) ++o[bk[off + t] + 1];
        for (std::int64_t c = 0; c < C; ++c) o[c + 1] += o[c];
        std::vector<std::int64_t> fill(o, o + C);
        for (std::int64_t t = 0; t < len; ++t) dst[fill[std::size_t(bk[off + t])]++] = t;
      };
      std::int64_t* const qo = nearest ? q_off.data() + task * (C + 1) : nullptr;
      std::int64_t* const ko = nearest ? k_off.data() + task * (C + 1) : nullptr;
      if (nearest) {
        by_cluster(0, Tq, detail::row_of(r.indices, b, h), qo);
      } else {
        windows(0, Tq, w, detail::row_of(r.indices, b, h));
      }
      if (shared) {
        std::copy_n(detail::row_of(r.indices, b, h), r.indices.extent(2),
                    detail::row_of(r.kv_indices, b, h));
        if (nearest) std::copy_n(qo, C + 1, ko);
      } else if (nearest) {
        by_cluster(Tq, S, detail::row_of(r.kv_indices, b, h), ko);
      } else {
        windows(Tq, S, wk, detail::row_of(r.kv_indices, b, h));
      }
    });
    double total = 0;
    for (const double l : loss) total += l;
    r.aux_loss = B * H * N * D > 0 ? cfg_.commitment * total / double(B * H * N * D) : 0.0;

    r.plan = AttentionPlan(B, H, Tq, S);
    r.plan.output = nearest ? PlanOutput::write : PlanOutput::accumulate;
    r.plan.rule.causal = cfg_.causal;
    r.plan.rule.finite_mask = true;  // masked_fill(max_neg_value), reference lines 430, 437
    if (shared) r.plan.rule.self_value = cfg_.self_value;
    const std::int64_t M = memory_kv();
    r.plan.memory_keys = M;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t c = 0; c < C; ++c) {
          const std::int64_t mem = M > 0 ? h * C + c : -1;
          if (nearest) {
            const std::int64_t* qo = q_off.data() + (b * H + h) * (C + 1);
            const std::int64_t* ko = k_off.data() + (b * H + h) * (C + 1);
            r.plan.add_group(b, h,
                             std::span<const std::int64_t>(detail::row_of(r.indices, b, h) + qo[c],
                                                           qo[c + 1] - qo[c]),
                             std::span<const std::int64_t>(
                                 detail::row_of(r.kv_indices, b, h) + ko[c], ko[c + 1] - ko[c]),
                             mem);
          } else {
            r.plan.add_group(
                b, h, std::span<const std::int64_t>(detail::row_of(r.indices, b, h) + c * w, w),
                std::span<const std::int64_t>(detail::row_of(r.kv_indices, b, h) + c * wk, wk),
                mem);
          }
        }
    return r;
  }

  /// Shared QK: q, v and out [B, T, H, D] (any strides); keys are normalize(q).
  /// extras: memory keys/values (required iff memory_kv() > 0) and keep masks.
  /// Returns the commitment loss. Throws shape_error / config_error (see check_state
  /// and run).
  double forward(ConstView<T, 4> q, ConstView<T, 4> v, const KMeansState<T>& state, View<T, 4> out,
                 const RoutingExtras<T>& extras = {}) const {
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
    run(r.plan, q, kn, v, out, extras, state.means.extent(1), "forward");
    return r.aux_loss;
  }

  /// Separate QK: q [B, T, H, D], k and v [B, S, H, D], out [B, T, H, D]. Keys are
  /// used as given (only routing normalises them). extras as above; when causal,
  /// memory keys/values are required (memory_kv() >= 1). Returns the commitment loss.
  double forward(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
                 const KMeansState<T>& state, View<T, 4> out,
                 const RoutingExtras<T>& extras = {}) const {
    if (cfg_.shared_qk) {
      switchyard::detail::fail_config(name, "forward", "k", "given",
                                      "no k when shared_qk is true (use forward(q, v, ...))");
    }
    core::detail::check_shape<const T, 4>(name, "forward", "v", v, {"B", "S", "H", "D"}, k.shape(),
                                          "v has the shape of k");
    core::detail::check_shape<T, 4>(name, "forward", "out", out, {"B", "T", "H", "D"}, q.shape(),
                                    "out has the shape of q");
    const auto r = route(q, k, state);
    run(r.plan, q, k, v, out, extras, state.means.extent(1), "forward");
    return r.aux_loss;
  }

  /// Allocating shared-QK forward: returns out [B, T, H, D].
  core::Tensor<T> forward(ConstView<T, 4> q, ConstView<T, 4> v, const KMeansState<T>& state,
                          double* aux_loss = nullptr, const RoutingExtras<T>& extras = {}) const {
    core::Tensor<T> out(q.shape());
    const double l = forward(q, v, state, out.template view<4>(), extras);
    if (aux_loss) *aux_loss = l;
    return out;
  }

  /// Runs a routing plan (from route). top_window (accumulate mode): out = per-token
  /// sum of cluster outputs / (count + scatter_eps), tokens in no cluster get exactly
  /// 0; nearest_centroid (write mode): out = the token's cluster output. k: the keys
  /// as attended (normalize(q) for shared QK). extras as in forward (C is then
  /// taken from mem_key).
  void execute(const AttentionPlan& plan, ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
               View<T, 4> out, const RoutingExtras<T>& extras = {}) const {
    run(plan, q, k, v, out, extras, -1, "execute");
  }

  /// Memory keys/values per cluster: max(num_mem_kv, 1 if causal and separate QK
  /// else 0), the reference's rule (KmeansAttention.__init__).
  std::int64_t memory_kv() const noexcept {
    return std::max<std::int64_t>(cfg_.num_mem_kv, cfg_.causal && !cfg_.shared_qk ? 1 : 0);
  }

  /// Deterministic seeded initialiser (see the file comment): returns initialised
  /// state [H, C, D] from q [B, T, H, D] (and k [B, S, H, D] when separate QK; pass
  /// an empty view otherwise). C = num_clusters(T). Throws config_error if C > B * N.
  KMeansState<T> init_state(ConstView<T, 4> q, ConstView<T, 4> k, std::uint64_t seed,
                            int iterations = 10) const {
    const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
    core::detail::check_shape<const T, 4>(name, "init_state", "q", q, {"B", "T", "H", "D"},
                                          Shape<4>{-1, -1, -1, -1});
    const std::int64_t C = num_clusters(Tq);
    const bool sep = !cfg_.shared_qk && k.data() != nullptr;
    if (sep) {
      core::detail::check_shape<const T, 4>(name, "init_state", "k", k, {"B", "S", "H", "D"},
                                            Shape<4>{B, -1, H, D}, "k matches q in B, H and D");
    }
    const std::int64_t N = Tq + (sep ? k.extent(1) : 0);
    // Normalised samples [B, H, N, D] and the per-head permutation [B * N] (each view is
    // bounded by check_shape, but their sum and products are not).
    switchyard::detail::checked_size(name, "init_state", "q", {B, H, N, core::pad_extent(D, 1)},
                                     sizeof(T));
    switchyard::detail::checked_size(name, "init_state", "num_clusters", {H, C, D}, sizeof(T));
    if (B * N < 1) {
      switchyard::detail::fail_config(name, "init_state", "q", "empty", "at least one token");
    }
    // Each cluster is seeded from a distinct sample, so C <= B * N; this also bounds the
    // assignment work (B * N * C per head), which D = 0 would otherwise leave unbounded.
    if (C > B * N) {
      switchyard::detail::fail_config(
          name, "init_state", "num_clusters", C,
          "at most B * N = " + std::to_string(B * N) + " samples (one distinct seed each)");
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
        // partial Fisher-Yates (M >= C was checked above)
        const std::uint64_t draw = std::uint64_t(h * C + c);
        const std::int64_t j =
            c + std::min<std::int64_t>(M - c - 1,
                                       std::int64_t(rng.uniform<double>(draw) * double(M - c)));
        std::swap(perm[std::size_t(c)], perm[std::size_t(j)]);
        const std::int64_t pick = perm[std::size_t(c)];
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

  /// Incremental decoding (routing_decode.hpp holds the state). Whatever config.selection and
  /// config.causal say, decoding is the nearest-centroid form, which is causal by construction:
  /// each token's key joins the cluster of its nearest centroid (argmax of means[h] .
  /// normalize(key), dots in double, ties toward the lower cluster) when it is cached, and a
  /// query attends to the cached keys of its own nearest centroid's cluster (itself included
  /// when its key is a member), after that cluster's memory keys/values (extras, required iff
  /// memory_kv() > 0, as forward). Logits are q . key * scale; with shared QK the keys are
  /// normalize(q) and a query's own key gets self_value, as forward. Softmax and weighted sum in
  /// double; a query with no key and no memory in its cluster (separate QK) outputs zeros. For a
  /// layer with selection = nearest_centroid and causal = true this is what forward computes,
  /// up to rounding. The layer has no local-window attention, so there is none here either. Masks
  /// are not supported (extras.query_mask / key_mask must be empty): feed each sequence only its
  /// real tokens (prefill(b, ...) takes one sequence). Every check runs before anything is
  /// written, so a call that throws leaves the state unchanged. Work is split by (sequence,
  /// head), so results are bit-identical for any thread count, and prefilling equals stepping
  /// token by token bit for bit.

  /// A decode state for `batch` sequences of up to `capacity` positions each, with the heads,
  /// clusters and head dim of centroids.means [H, C, D].
  RoutingDecodeState<T> make_decode_state(const KMeansState<T>& centroids, std::int64_t batch,
                                          std::int64_t capacity) const {
    check_decode_centroids(centroids, -1, -1, -1, "make_decode_state");
    const auto& m = centroids.means;
    return RoutingDecodeState<T>(batch, m.extent(0), m.extent(2), m.extent(1), capacity);
  }

  /// One token for every sequence: q_t, v_t, out_t [B, H, D] (any strides); k_t [B, H, D] with
  /// separate QK, an empty view with shared QK. Appends at position state.length(b) of each
  /// sequence b; out_t gets the new token's attention output. Throws config_error when a
  /// sequence is full (naming it, its length and the capacity).
  void step(ConstView<T, 3> q_t, ConstView<T, 3> k_t, ConstView<T, 3> v_t,
            const KMeansState<T>& centroids, RoutingDecodeState<T>& state, View<T, 3> out_t,
            const RoutingExtras<T>& extras = {}) const {
    constexpr std::string_view fn = "step";
    const Shape<3> want{state.batch(), state.heads(), state.head_dim()};
    constexpr std::string_view why = "the decode state's batch, heads and head_dim";
    check_decode_k(k_t.data() != nullptr, "k_t", fn);
    core::detail::check_shape<const T, 3>(name, fn, "q_t", q_t, {"B", "H", "D"}, want, why);
    if (k_t.data())
      core::detail::check_shape<const T, 3>(name, fn, "k_t", k_t, {"B", "H", "D"}, want, why);
    core::detail::check_shape<const T, 3>(name, fn, "v_t", v_t, {"B", "H", "D"}, want, why);
    core::detail::check_shape<T, 3>(name, fn, "out_t", out_t, {"B", "H", "D"}, want, why);
    check_decode_alias<3>(fn, {"q_t", "k_t", "v_t", "out_t"}, q_t, k_t, v_t, out_t, extras, state);
    // [B, H, D] as [B, 1, H, D]
    const auto as4 = [](auto x) {
      return View<typename decltype(x)::element_type, 4>(
          x.data(), {x.extent(0), 1, x.extent(1), x.extent(2)},
          {x.stride(0), 0, x.stride(1), x.stride(2)});
    };
    decode(fn, {"q_t", "k_t", "v_t", "out_t"}, 0, as4(q_t), as4(k_t), as4(v_t), centroids, state,
           as4(out_t), extras);
  }

  /// A chunk of T tokens for every sequence: q, v, out [B, T, H, D] (any strides); k
  /// [B, T, H, D] with separate QK, an empty view with shared QK. Equals T calls of step.
  void prefill(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
               const KMeansState<T>& centroids, RoutingDecodeState<T>& state, View<T, 4> out,
               const RoutingExtras<T>& extras = {}) const {
    constexpr std::string_view fn = "prefill";
    check_decode_k(k.data() != nullptr, "k", fn);
    core::detail::check_shape<const T, 4>(
        name, fn, "q", q, {"B", "T", "H", "D"},
        Shape<4>{state.batch(), -1, state.heads(), state.head_dim()},
        "the decode state's batch, heads and head_dim");
    constexpr std::string_view why = "the shape of q";
    if (k.data())
      core::detail::check_shape<const T, 4>(name, fn, "k", k, {"B", "T", "H", "D"}, q.shape(), why);
    core::detail::check_shape<const T, 4>(name, fn, "v", v, {"B", "T", "H", "D"}, q.shape(), why);
    core::detail::check_shape<T, 4>(name, fn, "out", out, {"B", "T", "H", "D"}, q.shape(), why);
    check_decode_alias<4>(fn, {"q", "k", "v", "out"}, q, k, v, out, extras, state);
    decode(fn, {"q", "k", "v", "out"}, 0, q, k, v, centroids, state, out, extras);
  }

  /// A chunk of T tokens for sequence b only (ragged prompts): q, v, out [T, H, D]; k [T, H, D]
  /// with separate QK, an empty view with shared QK. Other sequences are untouched.
  void prefill(std::int64_t b, ConstView<T, 3> q, ConstView<T, 3> k, ConstView<T, 3> v,
               const KMeansState<T>& centroids, RoutingDecodeState<T>& state, View<T, 3> out,
               const RoutingExtras<T>& extras = {}) const {
    constexpr std::string_view fn = "prefill";
    if (b < 0 || b >= state.batch()) {
      switchyard::detail::fail_config(
          name, fn, "b", b,
          "a sequence of the decode state, in [0, B=" + std::to_string(state.batch()) + ")");
    }
    check_decode_k(k.data() != nullptr, "k", fn);
    core::detail::check_shape<const T, 3>(name, fn, "q", q, {"T", "H", "D"},
                                          Shape<3>{-1, state.heads(), state.head_dim()},
                                          "the decode state's heads and head_dim");
    constexpr std::string_view why = "the shape of q";
    if (k.data())
      core::detail::check_shape<const T, 3>(name, fn, "k", k, {"T", "H", "D"}, q.shape(), why);
    core::detail::check_shape<const T, 3>(name, fn, "v", v, {"T", "H", "D"}, q.shape(), why);
    core::detail::check_shape<T, 3>(name, fn, "out", out, {"T", "H", "D"}, q.shape(), why);
    check_decode_alias<3>(fn, {"q", "k", "v", "out"}, q, k, v, out, extras, state);
    // [T, H, D] as [1, T, H, D]
    const auto as4 = [](auto x) {
      return View<typename decltype(x)::element_type, 4>(
          x.data(), {1, x.extent(0), x.extent(1), x.extent(2)},
          {0, x.stride(0), x.stride(1), x.stride(2)});
    };
    decode(fn, {"q", "k", "v", "out"}, b, as4(q), as4(k), as4(v), centroids, state, as4(out),
           extras);
  }

 private:
  // Decoding with shared QK takes no k; separate QK needs one.
  void check_decode_k(bool given, std::string_view arg, std::string_view fn) const {
    if (cfg_.shared_qk && given) {
      switchyard::detail::fail_config(name, fn, arg, "given",
                                      "an empty view when shared_qk is true (keys = normalize(q))");
    }
    if (!cfg_.shared_qk && !given) {
      switchyard::detail::fail_config(name, fn, arg, "missing", "keys when shared_qk is false");
    }
  }

  // Centroids for decoding: initialised, means [H, C, D] (-1: any), C = config num_clusters
  // when set, no NaN.
  void check_decode_centroids(const KMeansState<T>& centroids, std::int64_t H, std::int64_t C,
                              std::int64_t D, std::string_view fn) const {
    if (!centroids.initialised) {
      switchyard::detail::fail_config(
          name, fn, "centroids", "uninitialised",
          "initialised centroids (init_state, or set means and initialised = true)");
    }
    const auto& m = centroids.means;
    const std::int64_t want[3] = {H, cfg_.num_clusters > 0 ? cfg_.num_clusters : C, D};
    bool ok = m.rank() == 3;
    for (int d = 0; ok && d < 3; ++d)
      ok = m.extent(d) >= 1 && (want[d] < 0 || m.extent(d) == want[d]);
    if (!ok) {
      std::string exp = "[";
      const char* letters[3] = {"H", "C", "D"};
      for (int d = 0; d < 3; ++d)
        exp += std::string(d ? ", " : "") + letters[d] +
               (want[d] >= 0 ? "=" + std::to_string(want[d]) : std::string());
      switchyard::detail::fail_shape(
          name, fn, "centroids.means",
          m.rank() == 3 ? switchyard::detail::format_shape({"H", "C", "D"},
                                                           std::span<const std::int64_t>(m.shape()))
                        : "rank " + std::to_string(m.rank()),
          exp + "]",
          "one centroid per head and cluster of the decode state (C = config num_clusters when "
          "set)");
    }
    for (const T x : m)
      if (std::isnan(x)) nan_error(fn, "centroids.means");
  }

  // Outputs must not overlap inputs; nothing the call reads or writes may live in the state.
  template <int R>
  void check_decode_alias(std::string_view fn, const std::array<std::string_view, 4>& names,
                          ConstView<T, R> q, ConstView<T, R> k, ConstView<T, R> v, View<T, R> out,
                          const RoutingExtras<T>& ex, const RoutingDecodeState<T>& st) const {
    core::detail::check_no_alias(name, fn, names[3], out, names[0], q);
    core::detail::check_no_alias(name, fn, names[3], out, names[1], k);
    core::detail::check_no_alias(name, fn, names[3], out, names[2], v);
    core::detail::check_no_alias(name, fn, names[3], out, "mem_key", ex.mem_key);
    core::detail::check_no_alias(name, fn, names[3], out, "mem_value", ex.mem_value);
    const auto outside = [&](std::string_view arg, const auto& x) {
      constexpr std::string_view why = "the decode state is written while inputs are read";
      core::detail::check_no_alias(name, fn, arg, x, "state keys", st.key_storage(), why);
      core::detail::check_no_alias(name, fn, arg, x, "state values", st.value_storage(), why);
    };
    outside(names[0], q);
    outside(names[1], k);
    outside(names[2], v);
    outside(names[3], out);
    outside("mem_key", ex.mem_key);
    outside("mem_value", ex.mem_value);
  }

  // Decodes q, k, v [nb, T, H, D] (k: empty with shared QK) into out, for sequences
  // b0 .. b0 + nb of the state (shapes and aliasing checked by the caller). Checks the rest,
  // then runs each (sequence, head) through its T tokens in order.
  void decode(std::string_view fn, const std::array<std::string_view, 4>& names, std::int64_t b0,
              ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
              const KMeansState<T>& centroids, RoutingDecodeState<T>& st, View<T, 4> out,
              const RoutingExtras<T>& ex) const {
    const std::int64_t nb = q.extent(0), n = q.extent(1), H = st.heads(), D = st.head_dim();
    const std::int64_t C = st.num_clusters();
    if (!ex.query_mask.empty() || !ex.key_mask.empty()) {
      switchyard::detail::fail_config(
          name, fn, ex.query_mask.empty() ? "key_mask" : "query_mask", "given",
          "no masks when decoding (feed each sequence only its real tokens)");
    }
    check_decode_centroids(centroids, H, C, D, fn);
    check_memory(ex, H, C, D, fn);
    for (std::int64_t b = b0; b < b0 + nb; ++b) {
      const std::int64_t len = st.len_[std::size_t(b)];
      if (n > st.capacity() - len) {
        throw config_error(
            std::string(name) + "::" + std::string(fn) + ": sequence " + std::to_string(b) +
            " holds " + std::to_string(len) + " positions; appending " + std::to_string(n) +
            " would pass the decode state's capacity " + std::to_string(st.capacity()));
      }
    }
    if (detail::has_nan(q)) nan_error(fn, names[0]);
    if (k.data() && detail::has_nan(k)) nan_error(fn, names[1]);
    const typename RoutingDecodeState<T>::TokenArgs base{
        nullptr, ex.mem_key, ex.mem_value, cfg_.scale ? *cfg_.scale : 1.0 / std::sqrt(double(D)),
        cfg_.shared_qk ? std::optional<double>(cfg_.self_value) : std::nullopt};
    parallel_for(nb * H, [&](std::int64_t task) {
      const std::int64_t i = task / H, h = task % H, b = b0 + i;
      auto a = base;
      a.means = centroids.means.data() + h * C * D;
      const std::int64_t len = st.len_[std::size_t(b)];
      for (std::int64_t t = 0; t < n; ++t)
        st.decode_token(b, h, len + t, &q(i, t, h, 0), q.stride(3),
                        k.data() ? &k(i, t, h, 0) : nullptr, k.data() ? k.stride(3) : 0,
                        &v(i, t, h, 0), v.stride(3), a, &out(i, t, h, 0), out.stride(3));
    });
    for (std::int64_t b = b0; b < b0 + nb; ++b) st.len_[std::size_t(b)] += n;
  }

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

  // Checks extras against q [B, T, H, D], S keys and C clusters (C < 0: any), and
  // runs the plan; memory tables are copied only when [H, C] is not one stride.
  void run(const AttentionPlan& plan, ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
           View<T, 4> out, const RoutingExtras<T>& ex, std::int64_t C, std::string_view fn) const {
    const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
    const std::int64_t S = k.extent(1), M = memory_kv();
    core::detail::check_no_alias(name, fn, "out", out, "q", q);
    core::detail::check_no_alias(name, fn, "out", out, "k", k);
    core::detail::check_no_alias(name, fn, "out", out, "v", v);
    PlanExtras<T> pe;
    core::Tensor<T> mk_copy, mv_copy;
    check_memory(ex, H, C, D, fn);
    if (M > 0) {
      const auto table = [&](ConstView<T, 4> m, core::Tensor<T>& copy) {
        const std::int64_t Cm = m.extent(1);
        if (m.stride(0) == Cm * m.stride(1) || H <= 1)
          return ConstView<T, 3>(m.data(), {H * Cm, M, D}, {m.stride(1), m.stride(2), m.stride(3)});
        copy = core::Tensor<T>({H * Cm, M, D});
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t c = 0; c < Cm; ++c)
            for (std::int64_t j = 0; j < M; ++j)
              for (std::int64_t d = 0; d < D; ++d) copy(h * Cm + c, j, d) = m(h, c, j, d);
        return std::as_const(copy).template view<3>();
      };
      pe.memory_k = table(ex.mem_key, mk_copy);
      pe.memory_v = table(ex.mem_value, mv_copy);
    }
    const auto check_mask = [&](std::string_view arg, std::span<const std::uint8_t> m,
                                std::int64_t n, std::string_view want, std::string_view why) {
      const std::int64_t expected = core::bounded_product({B, n});
      if (!m.empty() && std::int64_t(m.size()) != expected) {
        switchyard::detail::fail_shape(
            name, fn, arg, "[" + std::to_string(m.size()) + " entries]",
            std::string(want) + " = " + std::to_string(expected) + " entries", why);
      }
    };
    check_mask("query_mask", ex.query_mask, Tq, "[B, T]", "one keep flag per query token");
    // key_mask = default(key_mask, query_mask) (reference line 390)
    const auto key_mask = ex.key_mask.empty() ? ex.query_mask : ex.key_mask;
    check_mask("key_mask", key_mask, S, "[B, S]",
               ex.key_mask.empty() ? "key_mask defaults to query_mask, which needs S == T"
                                   : "one keep flag per key token");
    pe.query_keep = ex.query_mask;
    pe.key_keep = key_mask;
    const bool accum = plan.output == PlanOutput::accumulate;
    core::Tensor<T> counts(accum ? Shape<3>{B, H, Tq} : Shape<3>{0, 0, 0});
    PlanExecutor<T, Arch>({.scale = cfg_.scale})
        .execute(plan, q, k, v, out, accum ? counts.template view<3>() : View<T, 3>{}, pe);
    if (!accum) return;
    const T eps = T(cfg_.scatter_eps);
    parallel_for(B * H, [&](std::int64_t task) {
      const std::int64_t b = task / H, h = task % H;
      for (std::int64_t t = 0; t < Tq; ++t) {
        const T den = counts(b, h, t) + eps;
        for (std::int64_t d = 0; d < D; ++d) out(b, t, h, d) = out(b, t, h, d) / den;
      }
    });
  }

  // Memory keys/values: given iff memory_kv() > 0, then [H, C, M, D] each (C < 0: any).
  void check_memory(const RoutingExtras<T>& ex, std::int64_t H, std::int64_t C, std::int64_t D,
                    std::string_view fn) const {
    const std::int64_t M = memory_kv();
    if (M == 0 && (ex.mem_key.data() || ex.mem_value.data())) {
      switchyard::detail::fail_config(name, fn, ex.mem_key.data() ? "mem_key" : "mem_value",
                                      "given", "no memory when memory_kv() = 0 (num_mem_kv = 0)");
    }
    if (M == 0) return;
    if (!ex.mem_key.data() || !ex.mem_value.data()) {
      switchyard::detail::fail_config(
          name, fn, ex.mem_key.data() ? "mem_value" : "mem_key", "missing",
          "[H, C, M=" + std::to_string(M) +
              ", D] memory keys and values (num_mem_kv; at least 1 when causal and "
              "shared_qk is false, as in the reference)");
    }
    core::detail::check_shape<const T, 4>(name, fn, "mem_key", ex.mem_key, {"H", "C", "M", "D"},
                                          Shape<4>{H, C, M, D},
                                          "one memory block per head and cluster");
    core::detail::check_shape<const T, 4>(name, fn, "mem_value", ex.mem_value, {"H", "C", "M", "D"},
                                          ex.mem_key.shape(), "mem_value has the shape of mem_key");
  }

  [[noreturn]] static void nan_error(std::string_view fn, std::string_view arg) {
    switchyard::detail::fail_config(name, fn, arg, "NaN", "finite values (NaN would reroute)");
  }

  config_type cfg_;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
