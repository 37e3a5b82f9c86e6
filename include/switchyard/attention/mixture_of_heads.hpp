#pragma once
// Mixture-of-Head attention (MoH, SkyworkAI/MoH, DiT variant `MoHAttention`): attention heads as
// experts. Heads [0, S) are shared and always on; a router picks the top-k of the H - S routed
// heads per token; each head's output is scaled by its gate before the output projection.
//
// Gates, as the reference computes them (eval mode):
//   routed  = topk_mask(softmax(x wg^T)) renormalised to sum 1 (denominator clamped at eps) * k
//   shared  = softmax(x wg1^T) * S                      (S = 1: the single shared gate is 1)
//   balance = softmax(x wg0^T) * 2; shared *= balance[0], routed *= balance[1]  (when S > 0)
// With k = 0 all heads must be shared (gated multi-head attention).
//
// Route, then execute: route() returns a HeadRoutingPlan (per token gates, per head the list of
// tokens that use it). execute() computes attention only for active (token, head) pairs: per
// (batch, head) it projects the queries of that head's tokens, attends over all keys of the batch
// element, and writes gate * output into the head's channels; inactive pairs stay zero. Keys and
// values are projected for every token (any token may be attended to).
// Ties in the top-k break toward the lower head index (torch.topk leaves them unspecified).
//
// Decoding (causal layers): decode() takes the new tokens of every sequence, appends their keys
// and values to the layer's KVCache (H_kv = H) and runs split-KV decode attention
// (DenseAttention::decode) for the active heads only: inactive heads' queries are never
// projected and their attention never computed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/attention/dense.hpp"
#include "switchyard/attention/kv_cache.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/softmax.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

struct MixtureOfHeadsConfig {
  std::int64_t dim = 0;           // C, model width; head_dim = C / num_heads
  std::int64_t num_heads = 8;     // H
  std::int64_t shared_heads = 0;  // S, heads [0, S) always on (MoH: shared_head)
  std::int64_t routed_top_k = 1;  // k routed heads per token out of H - S (MoH: routed_head)
  std::optional<double> scale = std::nullopt;  // logit scale; default head_dim^-0.5
  bool causal = false;  // token n attends to tokens <= n only (autoregressive; needed by decode)
};

/// Weights in PyTorch layout ([out, in]). Biases may be empty views (no bias).
template <class T>
struct MixtureOfHeadsWeights {
  ConstView<T, 2> qkv_weight;   // [3C, C], output channel s*C + h*D + j, s = 0 q, 1 k, 2 v
  ConstView<T, 1> qkv_bias;     // [3C] or empty
  ConstView<T, 2> proj_weight;  // [C, C]
  ConstView<T, 1> proj_bias;    // [C] or empty
  ConstView<T, 2> wg;           // [H - S, C] router over the routed heads (when k > 0)
  ConstView<T, 2> wg0;          // [2, C] shared-versus-routed balance (when k > 0 and S > 0)
  ConstView<T, 2> wg1;          // [S, C] gate over the shared heads (when S > 1)
};

/// Which heads each token uses, with what weight, and per head which tokens use it.
template <class T>
struct HeadRoutingPlan {
  std::int64_t num_tokens = 0;        // B * N, token t = b * N + n
  std::int64_t num_heads = 0;         // H
  std::vector<T> gates;               // [B*N, H], the weight of each head's output; 0 if inactive
  std::vector<unsigned char> active;  // [B*N, H], 1 where the pair is computed
  std::vector<std::int64_t> head_offsets;  // [H + 1]
  std::vector<std::int64_t> token_index;   // [pairs], ascending tokens of each head
  std::int64_t pairs() const noexcept { return std::int64_t(token_index.size()); }
  /// Fraction of (token, head) pairs computed, in [0, 1].
  double fraction() const noexcept {
    return num_tokens ? double(pairs()) / double(num_tokens * num_heads) : 0.0;
  }
};

template <class T = float, class Arch = simd::default_arch>
class MixtureOfHeads {
 public:
  using config_type = MixtureOfHeadsConfig;
  using weights_type = MixtureOfHeadsWeights<T>;
  using plan_type = HeadRoutingPlan<T>;
  static constexpr std::string_view name = "MixtureOfHeads";

  /// Throws config_error: dim <= 0, num_heads <= 0 or not dividing dim, shared_heads outside
  /// [0, H], routed_top_k outside [0, H - S], routed_top_k = 0 with routed heads left unused,
  /// or a scale that is not finite and positive.
  explicit MixtureOfHeads(config_type cfg) : cfg_(cfg) {
    const std::string_view fn = "MixtureOfHeads";
    if (cfg.dim <= 0) switchyard::detail::fail_config(name, fn, "dim", cfg.dim, "dim > 0");
    if (core::bounded_product({cfg.dim, 4}, sizeof(T)) < 0)  // qkv rows are 3 * dim wide
      switchyard::detail::fail_config(name, fn, "dim", cfg.dim, "4 * dim within max_buffer_bytes");
    if (cfg.num_heads <= 0 || cfg.dim % cfg.num_heads != 0)
      switchyard::detail::fail_config(name, fn, "num_heads", cfg.num_heads,
                                      "a positive divisor of dim = " + std::to_string(cfg.dim));
    if (cfg.shared_heads < 0 || cfg.shared_heads > cfg.num_heads)
      switchyard::detail::fail_config(
          name, fn, "shared_heads", cfg.shared_heads,
          "0 <= shared_heads <= num_heads = " + std::to_string(cfg.num_heads));
    const std::int64_t routed = cfg.num_heads - cfg.shared_heads;
    if (cfg.routed_top_k < 0 || cfg.routed_top_k > routed)
      switchyard::detail::fail_config(name, fn, "routed_top_k", cfg.routed_top_k,
                                      "0 <= routed_top_k <= routed heads = num_heads - "
                                      "shared_heads = " +
                                          std::to_string(routed));
    if (cfg.routed_top_k == 0 && routed > 0)
      switchyard::detail::fail_config(
          name, fn, "routed_top_k", cfg.routed_top_k,
          "routed_top_k >= 1 while there are " + std::to_string(routed) + " routed heads");
    head_dim_ = cfg.dim / cfg.num_heads;
    const double scale = cfg.scale.value_or(1.0 / std::sqrt(double(head_dim_)));
    if (!(std::isfinite(scale) && scale > 0))
      switchyard::detail::fail_config(name, fn, "scale", scale, "a finite scale > 0");
    scale_ = static_cast<T>(scale);
  }

  const config_type& config() const noexcept { return cfg_; }
  std::int64_t head_dim() const noexcept { return head_dim_; }

  /// x: [B, N, C]; returns the plan: gates [B*N, H] and per head its tokens (t = b*N + n).
  plan_type route(ConstView<T, 3> x, const weights_type& w) const {
    check_input("route", x);
    check_weights("route", w);
    const std::int64_t C = cfg_.dim, H = cfg_.num_heads, S = cfg_.shared_heads;
    const std::int64_t R = H - S, K = cfg_.routed_top_k;
    const std::int64_t BN = x.extent(0) * x.extent(1);
    const Rows xc = contiguous(x);
    plan_type plan;
    plan.num_tokens = BN;
    plan.num_heads = H;
    plan.gates.assign(std::size_t(BN * H), T(0));
    plan.active.assign(std::size_t(BN * H), 0);
    constexpr std::int64_t chunk = 64;
    parallel_for(num_chunks(BN, chunk), [&](std::int64_t ch) {
      const std::int64_t t0 = ch * chunk, t1 = std::min(BN, t0 + chunk), n = t1 - t0;
      const ConstView<T, 2> xs(xc.data() + t0 * C, {n, C});
      // router, balance and shared logits of this chunk: [n, R], [n, 2], [n, S]
      core::Tensor<T> lr({n, std::max<std::int64_t>(R, 1)}), l0({n, 2}),
          l1({n, std::max<std::int64_t>(S, 1)});
      if (K > 0) core::gemm<T, Arch>(xs, core::Trans::no, w.wg, core::Trans::yes, lr);
      if (K > 0 && S > 0) core::gemm<T, Arch>(xs, core::Trans::no, w.wg0, core::Trans::yes, l0);
      if (S > 1) core::gemm<T, Arch>(xs, core::Trans::no, w.wg1, core::Trans::yes, l1);
      std::vector<T> p(static_cast<std::size_t>(std::max<std::int64_t>(R, 2)));
      std::vector<std::int64_t> order(static_cast<std::size_t>(R));
      for (std::int64_t i = 0; i < n; ++i) {
        T* g = plan.gates.data() + (t0 + i) * H;
        unsigned char* a = plan.active.data() + (t0 + i) * H;
        T w_shared = 1, w_routed = 1;
        if (K > 0 && S > 0) {
          softmax_small(&l0(i, 0), 2, p.data());
          w_shared = p[0] * T(2), w_routed = p[1] * T(2);
        }
        if (S > 1) {
          softmax_small(&l1(i, 0), S, g);
          for (std::int64_t h = 0; h < S; ++h) g[h] = w_shared * (g[h] * T(S));
        } else if (S == 1) {
          g[0] = w_shared;  // softmax over one shared head is 1, times S = 1
        }
        for (std::int64_t h = 0; h < S; ++h) a[h] = 1;
        if (K > 0) {
          softmax_small(&lr(i, 0), R, p.data());
          // top-k of the probabilities: descending, ties toward the lower head index
          for (std::int64_t e = 0; e < R; ++e) order[e] = e;
          std::partial_sort(order.begin(), order.begin() + K, order.end(),
                            [&](std::int64_t u, std::int64_t v) {
                              return p[u] > p[v] || (p[u] == p[v] && u < v);
                            });
          T denom = 0;
          for (std::int64_t e = 0; e < K; ++e) denom += p[order[e]];
          denom = std::max(denom, std::numeric_limits<T>::epsilon());
          for (std::int64_t e = 0; e < K; ++e) {
            const std::int64_t h = S + order[e];
            g[h] = w_routed * (p[order[e]] / denom * T(K));
            a[h] = 1;
          }
        }
      }
    });
    // Per head token lists, ascending: the gather order of execute().
    plan.head_offsets.assign(std::size_t(H + 1), 0);
    for (std::int64_t t = 0; t < BN; ++t)
      for (std::int64_t h = 0; h < H; ++h) plan.head_offsets[h + 1] += plan.active[t * H + h];
    for (std::int64_t h = 0; h < H; ++h) plan.head_offsets[h + 1] += plan.head_offsets[h];
    plan.token_index.resize(std::size_t(plan.head_offsets[H]));
    std::vector<std::int64_t> fill(plan.head_offsets.begin(), plan.head_offsets.end() - 1);
    for (std::int64_t t = 0; t < BN; ++t)
      for (std::int64_t h = 0; h < H; ++h)
        if (plan.active[t * H + h]) plan.token_index[fill[h]++] = t;
    return plan;
  }

  /// plan from route(x, w); x: [B, N, C]; returns the gated head outputs [B, N, C] (channel
  /// h*D + j of head h): gate * attention output for the plan's active (token, head) pairs, 0 for
  /// the others. This is the input of the output projection (the reference's `x` before `proj`).
  core::Tensor<T> gated_heads(const plan_type& plan, ConstView<T, 3> x,
                              const weights_type& w) const {
    check_input("gated_heads", x);
    check_weights("gated_heads", w);
    check_plan("gated_heads", plan, x);
    const std::int64_t B = x.extent(0), N = x.extent(1), BN = B * N;
    const std::int64_t C = cfg_.dim, H = cfg_.num_heads, D = head_dim_;
    core::Tensor<T> gated({B, N, C});
    if (BN == 0) return gated;
    const Rows xc = contiguous(x);
    const ConstView<T, 2> wqkv = w.qkv_weight;

    // Keys and values of every token: [B*N, 2C] = x Wkv^T + bkv.
    core::Tensor<T> kv({BN, 2 * C});
    core::gemm_parallel<T, Arch>(ConstView<T, 2>(xc.data(), {BN, C}), core::Trans::no,
                                 wqkv.slice(0, C, 3 * C), core::Trans::yes, kv);
    if (!w.qkv_bias.empty()) {
      constexpr std::int64_t chunk = 64;
      parallel_for(num_chunks(BN, chunk), [&](std::int64_t ch) {
        for (std::int64_t t = ch * chunk; t < std::min(BN, (ch + 1) * chunk); ++t)
          for (std::int64_t o = 0; o < 2 * C; ++o) kv(t, o) += w.qkv_bias(C + o);
      });
    }

    // One task per (batch element, head): its active tokens' queries against all keys.
    parallel_for(B * H, [&](std::int64_t task) {
      const std::int64_t b = task / H, h = task % H;
      const std::int64_t* first = plan.token_index.data() + plan.head_offsets[h];
      const std::int64_t* last = plan.token_index.data() + plan.head_offsets[h + 1];
      const std::int64_t* lo = std::lower_bound(first, last, b * N);
      const std::int64_t* hi = std::lower_bound(lo, last, (b + 1) * N);
      const std::int64_t n = hi - lo;
      if (n == 0) return;
      core::Tensor<T> q({n, D}), s({n, N}), o({n, D});
      const auto wq = wqkv.slice(0, h * D, (h + 1) * D);
      if (n == N) {  // every token of this batch element uses the head: no gather needed
        const ConstView<T, 2> xb(xc.data() + b * N * C, {N, C});
        core::gemm<T, Arch>(xb, core::Trans::no, wq, core::Trans::yes, q);
      } else {
        core::Tensor<T> xg({n, C});  // the queries' tokens, gathered
        for (std::int64_t i = 0; i < n; ++i)
          std::copy_n(xc.data() + lo[i] * C, C, xg.data() + i * C);
        core::gemm<T, Arch>(xg, core::Trans::no, wq, core::Trans::yes, q);
      }
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t j = 0; j < D; ++j) {
          const T bias = w.qkv_bias.empty() ? T(0) : w.qkv_bias(h * D + j);
          q(i, j) = (q(i, j) + bias) * scale_;  // the reference scales q before q k^T
        }
      const ConstView<T, 2> k(kv.data() + b * N * 2 * C + h * D, {N, D}, {2 * C, 1});
      const ConstView<T, 2> v(kv.data() + b * N * 2 * C + C + h * D, {N, D}, {2 * C, 1});
      core::gemm<T, Arch>(q, core::Trans::no, k, core::Trans::yes, s);
      if (cfg_.causal)  // token lo[i] - b * N sees keys up to itself
        for (std::int64_t i = 0; i < n; ++i)
          std::fill(s.data() + i * N + (lo[i] - b * N) + 1, s.data() + (i + 1) * N,
                    -std::numeric_limits<T>::infinity());
      for (std::int64_t i = 0; i < n; ++i)
        switchyard::kernels::softmax_row(Arch{}, s.data() + i * N, s.data() + i * N, N);
      core::gemm<T, Arch>(s, core::Trans::no, v, core::Trans::no, o);
      for (std::int64_t i = 0; i < n; ++i) {
        const T g = plan.gates[lo[i] * H + h];
        T* dst = gated.data() + lo[i] * C + h * D;
        for (std::int64_t j = 0; j < D; ++j) dst[j] = g * o(i, j);
      }
    });
    return gated;
  }

  /// plan from route(x, w); x: [B, N, C]; out: [B, N, C]. Computes attention for the plan's
  /// active (token, head) pairs only, weights each head output by its gate, then projects.
  /// out may alias x: x is read completely (into the gated head outputs) before out is written.
  void execute(const plan_type& plan, ConstView<T, 3> x, const weights_type& w,
               View<T, 3> out) const {
    check_input("execute", x);
    check_weights("execute", w);
    check_plan("execute", plan, x);
    core::detail::check_shape(name, "execute", "out", out, {"B", "N", "C"},
                              {x.extent(0), x.extent(1), cfg_.dim});
    const core::Tensor<T> gated = gated_heads(plan, x, w);
    const std::int64_t N = x.extent(1), BN = x.extent(0) * N, C = cfg_.dim;
    if (BN == 0) return;
    // Output projection out = proj_bias + gated proj^T, straight into out when its rows are
    // evenly spaced over (b, n), else through a temporary.
    const bool flat = out.stride(0) == N * out.stride(1);
    core::Tensor<T> tmp = flat ? core::Tensor<T>({1}) : core::Tensor<T>({BN, C});
    const View<T, 2> y = flat ? View<T, 2>(out.data(), {BN, C}, {out.stride(1), out.stride(2)})
                              : tmp.template view<2>();
    for (std::int64_t t = 0; t < BN; ++t)
      for (std::int64_t c = 0; c < C; ++c) y(t, c) = w.proj_bias.empty() ? T(0) : w.proj_bias(c);
    core::gemm_parallel<T, Arch>(ConstView<T, 2>(gated.data(), {BN, C}), core::Trans::no,
                                 w.proj_weight, core::Trans::yes, y, T(1), T(1));
    if (!flat)
      for (std::int64_t t = 0; t < BN; ++t)
        for (std::int64_t c = 0; c < C; ++c) out(t / N, t % N, c) = y(t, c);
  }

  /// x: [B, N, C] -> out: [B, N, C]; route() then execute().
  void forward(ConstView<T, 3> x, const weights_type& w, View<T, 3> out) const {
    execute(route(x, w), x, w, out);
  }
  /// x: [B, N, C]; returns [B, N, C].
  core::Tensor<T> forward(ConstView<T, 3> x, const weights_type& w) const {
    core::Tensor<T> out({x.extent(0), x.extent(1), cfg_.dim});
    forward(x, w, out.template view<3>());
    return out;
  }

  /// Decoding (config causal = true): x [B, T, C] are the next T tokens of every sequence
  /// (T >= 1: a prompt chunk or one step), cache the layer's KVCache(B, H, head_dim, capacity)
  /// holding the earlier tokens; out [B, T, C] (may be x itself). Appends the tokens' keys and
  /// values, then per block of up to max_decode_queries tokens: route, project the queries of
  /// the active heads only, attend to the cache (causal), gate and project. Prefill in chunks
  /// then steps equals one causal forward, to rounding. Throws (writing nothing to the cache)
  /// for a non-causal layer, shapes that do not match, or a sequence that would pass the
  /// capacity.
  void decode(ConstView<T, 3> x, const weights_type& w, KVCache<T>& cache, View<T, 3> out) const {
    const std::string_view fn = "decode";
    if (!cfg_.causal)
      switchyard::detail::fail_config(name, fn, "causal", "false",
                                      "a causal layer (config causal = true): decoding is causal");
    check_input(fn, x);
    check_weights(fn, w);
    const std::int64_t B = x.extent(0), T_new = x.extent(1), C = cfg_.dim;
    const std::int64_t H = cfg_.num_heads, D = head_dim_;
    if (cache.batch() != B || cache.kv_heads() != H || cache.head_dim() != D) {
      const std::int64_t got[] = {cache.batch(), cache.kv_heads(), cache.head_dim()};
      const std::int64_t want[] = {B, H, D};
      switchyard::detail::fail_shape(name, fn, "cache",
                                     switchyard::detail::format_shape({"B", "H_kv", "D"}, got),
                                     switchyard::detail::format_shape({"B", "H_kv", "D"}, want),
                                     "one KV head per attention head, of head_dim");
    }
    core::detail::check_shape(name, fn, "out", out, {"B", "T", "C"}, {B, T_new, C},
                              "out has the shape of x");
    const bool in_place = out.data() == x.data() && out.strides() == x.strides();
    if (!in_place) core::detail::check_no_alias(name, fn, "out", out, "x", x, "or out is x itself");
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        if (T_new > cache.capacity() - cache.length(b, h))
          throw config_error(std::string(name) + "::decode: sequence " + std::to_string(b) +
                             " (head " + std::to_string(h) + ") holds " +
                             std::to_string(cache.length(b, h)) + " positions; appending " +
                             std::to_string(T_new) + " would pass the capacity " +
                             std::to_string(cache.capacity()));
    if (B == 0 || T_new == 0) return;
    const DenseAttention<T, Arch> attn({.scale = double(scale_)});
    for (std::int64_t t0 = 0; t0 < T_new; t0 += max_decode_queries) {
      const std::int64_t n = std::min(max_decode_queries, T_new - t0);
      decode_block(x.slice(1, t0, t0 + n), w, cache, out.slice(1, t0, t0 + n), attn);
    }
  }

 private:
  // Softmax of a few router logits, the reference's order (max-subtracted, divide by the sum).
  static void softmax_small(const T* logits, std::int64_t n, T* p) noexcept {
    T m = logits[0], s = 0;
    for (std::int64_t e = 1; e < n; ++e) m = std::max(m, logits[e]);
    for (std::int64_t e = 0; e < n; ++e) s += (p[e] = std::exp(logits[e] - m));
    for (std::int64_t e = 0; e < n; ++e) p[e] /= s;
  }

  // One block of n <= max_decode_queries new tokens (checked by decode).
  void decode_block(ConstView<T, 3> x, const weights_type& w, KVCache<T>& cache, View<T, 3> out,
                    const DenseAttention<T, Arch>& attn) const {
    const std::int64_t B = x.extent(0), n = x.extent(1), Bn = B * n, C = cfg_.dim;
    const std::int64_t H = cfg_.num_heads, D = head_dim_;
    const plan_type plan = route(x, w);
    const Rows xc = contiguous(x);
    const ConstView<T, 2> xr(xc.data(), {Bn, C});
    const ConstView<T, 2> wqkv = w.qkv_weight;
    // Keys and values of the new tokens, [Bn, 2C], appended as [B, n, H, D].
    core::Tensor<T> kv({Bn, 2 * C});
    core::gemm_parallel<T, Arch>(xr, core::Trans::no, wqkv.slice(0, C, 3 * C), core::Trans::yes,
                                 kv);
    if (!w.qkv_bias.empty())
      for (std::int64_t t = 0; t < Bn; ++t)
        for (std::int64_t o = 0; o < 2 * C; ++o) kv(t, o) += w.qkv_bias(C + o);
    cache.append(ConstView<T, 4>(kv.data(), {B, n, H, D}, {n * 2 * C, 2 * C, D, 1}),
                 ConstView<T, 4>(kv.data() + C, {B, n, H, D}, {n * 2 * C, 2 * C, D, 1}));
    // Queries of the active (token, head) pairs only: per head, its tokens gathered.
    core::Tensor<T> q({B, n, H, D});
    parallel_for(H, [&](std::int64_t h) {
      const std::int64_t lo = plan.head_offsets[h], cnt = plan.head_offsets[h + 1] - lo;
      if (cnt == 0) return;
      core::Tensor<T> xg({cnt, C}), qh({cnt, D});
      for (std::int64_t i = 0; i < cnt; ++i)
        std::copy_n(xc.data() + plan.token_index[lo + i] * C, C, xg.data() + i * C);
      core::gemm<T, Arch>(xg, core::Trans::no, wqkv.slice(0, h * D, (h + 1) * D), core::Trans::yes,
                          qh);
      for (std::int64_t i = 0; i < cnt; ++i) {
        T* dst = q.data() + (plan.token_index[lo + i] * H + h) * D;
        for (std::int64_t j = 0; j < D; ++j)
          dst[j] = qh(i, j) + (w.qkv_bias.empty() ? T(0) : w.qkv_bias(h * D + j));
      }
    });
    core::Tensor<T> o({B, n, H, D});
    DecodeOptions<T> opts;
    opts.active_heads = plan.active;
    attn.decode(q.template view<4>(), cache, o.template view<4>(), opts);
    // Gate each head's output, then out = proj_bias + gated proj^T.
    for (std::int64_t t = 0; t < Bn; ++t)
      for (std::int64_t h = 0; h < H; ++h) {
        const T g = plan.gates[t * H + h];
        T* oh = o.data() + (t * H + h) * D;
        for (std::int64_t j = 0; j < D; ++j) oh[j] *= g;
      }
    core::Tensor<T> y({Bn, C});
    for (std::int64_t t = 0; t < Bn; ++t)
      for (std::int64_t c = 0; c < C; ++c) y(t, c) = w.proj_bias.empty() ? T(0) : w.proj_bias(c);
    core::gemm_parallel<T, Arch>(ConstView<T, 2>(o.data(), {Bn, C}), core::Trans::no, w.proj_weight,
                                 core::Trans::yes, y.template view<2>(), T(1), T(1));
    for (std::int64_t t = 0; t < Bn; ++t)
      for (std::int64_t c = 0; c < C; ++c) out(t / n, t % n, c) = y(t, c);
  }

  // x as dense [B*N, C] rows: the view's own memory when contiguous, else a copy.
  struct Rows {
    core::Tensor<T> copy;
    const T* ptr = nullptr;
    const T* data() const noexcept { return ptr; }
  };
  static Rows contiguous(ConstView<T, 3> x) {
    Rows r;
    if (x.is_contiguous()) {
      r.ptr = x.data();
      return r;
    }
    r.copy = core::Tensor<T>({x.extent(0), x.extent(1), x.extent(2)});
    T* dst = r.copy.data();
    for (std::int64_t b = 0; b < x.extent(0); ++b)
      for (std::int64_t n = 0; n < x.extent(1); ++n)
        for (std::int64_t k = 0; k < x.extent(2); ++k) *dst++ = x(b, n, k);
    r.ptr = r.copy.data();
    return r;
  }

  void check_plan(std::string_view fn, const plan_type& plan, ConstView<T, 3> x) const {
    const std::int64_t BN = x.extent(0) * x.extent(1);  // checked by check_input
    bool ok = plan.num_tokens == BN && plan.num_heads == cfg_.num_heads &&
              std::int64_t(plan.gates.size()) == BN * cfg_.num_heads &&
              std::int64_t(plan.head_offsets.size()) == cfg_.num_heads + 1;
    // Token lists in range and ascending per head, so a hand-edited plan cannot index out of x.
    for (std::int64_t h = 0; ok && h < cfg_.num_heads; ++h) {
      const std::int64_t lo = plan.head_offsets[h], hi = plan.head_offsets[h + 1];
      ok = 0 <= lo && lo <= hi && hi <= std::int64_t(plan.token_index.size());
      for (std::int64_t p = lo; ok && p < hi; ++p)
        ok = plan.token_index[p] >= 0 && plan.token_index[p] < BN &&
             (p == lo || plan.token_index[p] > plan.token_index[p - 1]);
    }
    if (ok) return;
    const std::int64_t got[] = {plan.num_tokens, plan.num_heads};
    const std::int64_t want[] = {BN, cfg_.num_heads};
    switchyard::detail::fail_shape(name, fn, "plan",
                                   switchyard::detail::format_shape({"B*N", "H"}, got),
                                   switchyard::detail::format_shape({"B*N", "H"}, want),
                                   "the plan must come from route() on the same x, with token "
                                   "lists ascending and in range");
  }

  void check_input(std::string_view fn, ConstView<T, 3> x) const {
    core::detail::check_shape(name, fn, "x", x, {"B", "N", "C"}, {-1, -1, cfg_.dim},
                              "C must equal config dim");
    // Buffers: qkv [B*N, 3C], gates [B*N, H], per-task scores [N, N]. A stride-0 x may
    // claim any extents, so the sizes are checked before they are computed.
    switchyard::detail::checked_size(name, fn, "x", {x.extent(0), x.extent(1), 4 * cfg_.dim},
                                     sizeof(T));
    switchyard::detail::checked_size(name, fn, "x", {x.extent(0), x.extent(1), cfg_.num_heads},
                                     sizeof(T));
    switchyard::detail::checked_size(name, fn, "x", {x.extent(1), x.extent(1)}, sizeof(T));
  }

  void check_weights(std::string_view fn, const weights_type& w) const {
    const std::int64_t C = cfg_.dim, S = cfg_.shared_heads, R = cfg_.num_heads - S;
    const std::int64_t K = cfg_.routed_top_k;
    auto mat = [&](std::string_view arg, ConstView<T, 2> v, std::int64_t rows, std::string_view r,
                   std::string_view why) {
      core::detail::check_shape(name, fn, arg, v, {r, "C"}, {rows, C}, why);
      core::detail::check_unit_inner_stride(name, fn, arg, v);
    };
    auto vec = [&](std::string_view arg, ConstView<T, 1> v, std::int64_t n, std::string_view r) {
      if (!v.empty()) core::detail::check_shape(name, fn, arg, v, {r}, {n}, "or empty for none");
    };
    mat("qkv_weight", w.qkv_weight, 3 * C, "3C", "PyTorch layout [out, in]");
    vec("qkv_bias", w.qkv_bias, 3 * C, "3C");
    mat("proj_weight", w.proj_weight, C, "C", "PyTorch layout [out, in]");
    vec("proj_bias", w.proj_bias, C, "C");
    if (K > 0) mat("wg", w.wg, R, "H-S", "one row per routed head");
    if (K > 0 && S > 0) mat("wg0", w.wg0, 2, "2", "shared and routed balance");
    if (S > 1) mat("wg1", w.wg1, S, "S", "one row per shared head");
  }

  config_type cfg_;
  std::int64_t head_dim_ = 0;
  T scale_ = 1;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
