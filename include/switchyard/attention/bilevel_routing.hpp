#pragma once
// Bi-level routing attention (BiFormer, rayleizhu/BiFormer `ops/bra_legacy.py`,
// BiLevelRoutingAttention, NHWC), with the reference's semantics so a trained model gives the
// same outputs:
//   x [N, H, W, C] --(auto_pad: zeros at the bottom/right up to multiples of n_win)--> x'
//   q | k | v = x' Wqkv^T + b                      one per-pixel linear, heads = channel chunks
//   regions: an n_win x n_win grid, region id j*n_win + i (row-major), pixels row-major inside
//   q_win, k_win = mean of q, k over each region's pixels (bias included)
//   r_idx = topk_k((q_win * scale) k_win^T) per region: descending logit, ties to the lower index
//   per (image, region, head): softmax((q * scale) K_sel^T) V_sel, where K_sel / V_sel are the
//     pixels of the routed regions concatenated in r_idx order (topk * w^2 keys)
//   + LePE(v): depthwise side_dwconv x side_dwconv conv over the WHOLE v image (zero padding
//     side_dwconv / 2, with bias); side_dwconv = 0 turns it off
//   out = (attention + LePE) Wo^T + bo, cropped back to [N, H, W, C]
// scale = qk_scale, default dim^-0.5: the FULL qk dimension (the reference's qk_dim), not the
// head dimension, for both the routing logits and the token attention.
//
// Route, then execute: route() returns a BiLevelRoutingPlan (r_idx); execute() turns it into an
// AttentionPlan (token_plan(): one group per image and query region, all heads; queries = the
// region's pixels, keys = the pixels of its routed regions in r_idx order) and runs it with the
// fused PlanExecutor (plan_executor.hpp). The routed K/V are never replicated topk times (the
// reference's memory problem): the executor gathers one group's keys and values (topk * w^2 rows
// of one head) into a per-thread workspace. The projections use the packed GEMM over fixed tiles
// and every loop has a fixed partition, so results are bit-identical for any thread count.
// Cost: O(P C^2) for the projections plus O(P * topk * w^2 * C) for the token attention
// (P = padded pixels, w^2 = pixels per region), against O(P^2 C) for dense attention.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "switchyard/attention/plan.hpp"
#include "switchyard/attention/plan_executor.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/softmax.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/topk.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// Field order is stable (designated initialisers).
struct BiLevelRoutingConfig {
  std::int64_t dim = 0;          // C (BiFormer: dim; qk_dim = dim)
  std::int64_t num_heads = 8;    // heads, dividing C (BiFormer: num_heads)
  std::int64_t n_win = 7;        // regions per side (BiFormer: n_win)
  std::int64_t topk = 4;         // routed regions per query region (BiFormer: topk)
  std::int64_t side_dwconv = 3;  // LePE kernel side, odd; 0 = off (BiFormer: side_dwconv)
  std::optional<double> qk_scale = std::nullopt;  // default dim^-0.5 (full qk dim)
  bool auto_pad = false;  // pad H, W at the bottom/right with zeros up to multiples of n_win
};

/// Weights in PyTorch layout ([out, in]); names and shapes as the reference's state dict.
/// Biases may be empty views (no bias). lepe_* are read only when side_dwconv > 0; a [C, k, k]
/// weight can be passed as a [C, 1, k, k] view of the same memory.
template <class T>
struct BiLevelRoutingWeights {
  ConstView<T, 2> qkv_weight;   // [3C, C]: rows [0, C) q, [C, 2C) k, [2C, 3C) v
  ConstView<T, 1> qkv_bias;     // [3C] or empty
  ConstView<T, 2> wo_weight;    // [C, C]
  ConstView<T, 1> wo_bias;      // [C] or empty
  ConstView<T, 4> lepe_weight;  // [C, 1, k, k] depthwise conv (groups = C)
  ConstView<T, 1> lepe_bias;    // [C] or empty
};

/// The region routing: for every image and query region, the topk regions it attends to.
struct BiLevelRoutingPlan {
  std::int64_t batch = 0;                            // N
  std::int64_t height = 0, width = 0;                // input H, W
  std::int64_t padded_height = 0, padded_width = 0;  // multiples of n_win
  std::int64_t n_win = 0, topk = 0;
  std::vector<std::int64_t> r_idx;  // [N, n_win^2, topk], descending routing logit

  std::int64_t regions() const noexcept { return n_win * n_win; }
  std::int64_t window_height() const noexcept { return n_win ? padded_height / n_win : 0; }
  std::int64_t window_width() const noexcept { return n_win ? padded_width / n_win : 0; }
  /// The i-th routed region of query region r of image n.
  std::int64_t routed(std::int64_t n, std::int64_t r, std::int64_t i) const noexcept {
    return r_idx[std::size_t((n * regions() + r) * topk + i)];
  }
  /// [N, n_win^2]: how many query regions of each image route to each region.
  std::vector<std::int64_t> region_hits() const {
    std::vector<std::int64_t> hits(std::size_t(batch * regions()), 0);
    for (std::int64_t n = 0; n < batch; ++n)
      for (std::int64_t p = 0; p < regions() * topk; ++p)
        ++hits[std::size_t(n * regions() + r_idx[std::size_t(n * regions() * topk + p)])];
    return hits;
  }
};

template <class T = float, class Arch = simd::default_arch>
class BiLevelRoutingAttention {
 public:
  using config_type = BiLevelRoutingConfig;
  using weights_type = BiLevelRoutingWeights<T>;
  using plan_type = BiLevelRoutingPlan;
  static constexpr std::string_view name = "BiLevelRoutingAttention";

  /// Throws config_error: dim <= 0; num_heads <= 0 or not dividing dim; n_win < 1; topk < 1 or
  /// > n_win^2; side_dwconv < 0 or even (an even kernel with padding k/2 changes the image size
  /// in the reference); qk_scale NaN, infinite or <= 0.
  explicit BiLevelRoutingAttention(config_type cfg) : cfg_(cfg) {
    const std::string_view fn = "BiLevelRoutingAttention";
    if (cfg.dim <= 0) switchyard::detail::fail_config(name, fn, "dim", cfg.dim, "dim > 0");
    if (cfg.num_heads <= 0 || cfg.dim % cfg.num_heads != 0)
      switchyard::detail::fail_config(name, fn, "num_heads", cfg.num_heads,
                                      "a positive divisor of dim = " + std::to_string(cfg.dim));
    if (cfg.n_win < 1) switchyard::detail::fail_config(name, fn, "n_win", cfg.n_win, "n_win >= 1");
    // Region logits are [n_win^2, n_win^2] per image, the qkv rows 3C wide, the LePE kernel
    // k x k: sizes that overflow or exceed core::max_buffer_bytes are config errors.
    if (core::bounded_product({cfg.n_win, cfg.n_win, cfg.n_win, cfg.n_win}, sizeof(T)) < 0)
      switchyard::detail::fail_config(name, fn, "n_win", cfg.n_win,
                                      "n_win^4 logits per image within core::max_buffer_bytes");
    if (core::bounded_product({cfg.dim, 3}, sizeof(T)) < 0)
      switchyard::detail::fail_config(name, fn, "dim", cfg.dim, "3 * dim within int64");
    if (core::bounded_product({cfg.side_dwconv, cfg.side_dwconv}, sizeof(T)) < 0)
      switchyard::detail::fail_config(name, fn, "side_dwconv", cfg.side_dwconv,
                                      "a kernel side whose square fits in memory");
    if (cfg.topk < 1 || cfg.topk > cfg.n_win * cfg.n_win)
      switchyard::detail::fail_config(
          name, fn, "topk", cfg.topk,
          "1 <= topk <= regions = n_win^2 = " + std::to_string(cfg.n_win * cfg.n_win));
    if (cfg.side_dwconv < 0 || (cfg.side_dwconv > 0 && cfg.side_dwconv % 2 == 0))
      switchyard::detail::fail_config(name, fn, "side_dwconv", cfg.side_dwconv,
                                      "0 (no LePE) or an odd kernel side");
    const double scale = cfg.qk_scale.value_or(1.0 / std::sqrt(double(cfg.dim)));
    if (!(std::isfinite(scale) && scale > 0))
      switchyard::detail::fail_config(name, fn, "qk_scale", scale, "a finite scale > 0");
    scale_ = static_cast<T>(scale);
    head_dim_ = cfg.dim / cfg.num_heads;
  }

  const config_type& config() const noexcept { return cfg_; }
  std::int64_t head_dim() const noexcept { return head_dim_; }
  /// The scale used for routing logits and token attention.
  T scale() const noexcept { return scale_; }

  /// The token-level AttentionPlan of a region routing: one group per (image, query region),
  /// for all heads; queries = the region's pixels, keys = the pixels of its routed regions in
  /// r_idx order (row-major inside each), as indices into the padded image (y * Wp + x).
  AttentionPlan token_plan(const plan_type& plan) const {
    const std::int64_t nw = plan.n_win, R = plan.regions(), K = plan.topk;
    const std::int64_t Wp = plan.padded_width, wh = plan.window_height(), ww = plan.window_width(),
                       w2 = wh * ww;
    AttentionPlan ap(plan.batch, cfg_.num_heads, plan.padded_height * Wp, plan.padded_height * Wp);
    std::vector<std::int64_t> qs(static_cast<std::size_t>(w2)),
        ks(static_cast<std::size_t>(K * w2));
    auto region_pixels = [&](std::int64_t reg, std::int64_t* dst) {
      const std::int64_t j = reg / nw, i = reg % nw;
      for (std::int64_t t = 0; t < w2; ++t) dst[t] = (j * wh + t / ww) * Wp + i * ww + t % ww;
    };
    for (std::int64_t n = 0; n < plan.batch; ++n)
      for (std::int64_t r = 0; r < R; ++r) {
        region_pixels(r, qs.data());
        for (std::int64_t s = 0; s < K; ++s)
          region_pixels(plan.routed(n, r, s), ks.data() + s * w2);
        ap.add_group(n, AttentionPlan::all_heads, qs, ks);
      }
    return ap;
  }

  /// x: [N, H, W, C]; returns the region routing (r_idx [N, n_win^2, topk]).
  plan_type route(ConstView<T, 4> x, const weights_type& w) const {
    check_input("route", x);
    check_weights("route", w);
    plan_type plan = empty_plan(x);
    if (plan.batch == 0) return plan;
    const core::Tensor<T> qkv = project(x, w);
    route_into(qkv, plan);
    return plan;
  }

  /// plan from route(x, w); x: [N, H, W, C]; out: [N, H, W, C], may alias x (x is read
  /// into the qkv image before out is written). Any
  /// strides. N = 0 is valid (nothing to do). NaN or inf in x or the weights give unspecified
  /// outputs (a NaN routing logit ranks below every number in the top-k). Allocates the qkv
  /// image [N*Hp*Wp, 3C] and the attention image [N*Hp*Wp, C] per call.
  void execute(const plan_type& plan, ConstView<T, 4> x, const weights_type& w,
               View<T, 4> out) const {
    check_input("execute", x);
    check_weights("execute", w);
    check_out("execute", x, out);
    check_plan("execute", plan, x);
    if (plan.batch == 0) return;
    const core::Tensor<T> qkv = project(x, w);
    execute_from(plan, qkv, w, out);
  }

  /// x: [N, H, W, C] -> out: [N, H, W, C]; route() then execute(), projecting once.
  void forward(ConstView<T, 4> x, const weights_type& w, View<T, 4> out) const {
    check_input("forward", x);
    check_weights("forward", w);
    check_out("forward", x, out);
    plan_type plan = empty_plan(x);
    if (plan.batch == 0) return;
    const core::Tensor<T> qkv = project(x, w);
    route_into(qkv, plan);
    execute_from(plan, qkv, w, out);
  }
  /// x: [N, H, W, C]; returns [N, H, W, C].
  core::Tensor<T> forward(ConstView<T, 4> x, const weights_type& w) const {
    core::Tensor<T> out({x.extent(0), x.extent(1), x.extent(2), cfg_.dim});
    forward(x, w, out.template view<4>());
    return out;
  }

 private:
  plan_type empty_plan(ConstView<T, 4> x) const {
    plan_type p;
    p.batch = x.extent(0);
    p.height = x.extent(1);
    p.width = x.extent(2);
    p.n_win = cfg_.n_win;
    p.topk = cfg_.topk;
    p.padded_height = round_up_to(p.height, cfg_.n_win);
    p.padded_width = round_up_to(p.width, cfg_.n_win);
    return p;
  }
  static std::int64_t round_up_to(std::int64_t v, std::int64_t m) noexcept {
    return (v + m - 1) / m * m;
  }

  // qkv of the padded image: [N * Hp * Wp, 3C], pixel p = (n * Hp + y) * Wp + x.
  core::Tensor<T> project(ConstView<T, 4> x, const weights_type& w) const {
    const std::int64_t N = x.extent(0), H = x.extent(1), W = x.extent(2), C = cfg_.dim;
    const std::int64_t Hp = round_up_to(H, cfg_.n_win), Wp = round_up_to(W, cfg_.n_win);
    const std::int64_t P = N * Hp * Wp;
    core::Tensor<T> xp;
    const T* src = x.data();
    if (Hp != H || Wp != W || !x.is_contiguous()) {
      xp = core::Tensor<T>({P, C});
      xp.fill(T(0));
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t yy = 0; yy < H; ++yy)
          for (std::int64_t xx = 0; xx < W; ++xx) {
            T* d = xp.data() + ((n * Hp + yy) * Wp + xx) * C;
            for (std::int64_t c = 0; c < C; ++c) d[c] = x(n, yy, xx, c);
          }
      src = xp.data();
    }
    core::Tensor<T> qkv({P, 3 * C});
    init_bias(qkv, w.qkv_bias, 3 * C);
    core::gemm_parallel<T, Arch>(ConstView<T, 2>(src, {P, C}), core::Trans::no, w.qkv_weight,
                                 core::Trans::yes, qkv.template view<2>(), T(1), T(1));
    return qkv;
  }

  static void init_bias(core::Tensor<T>& t, ConstView<T, 1> bias, std::int64_t cols) {
    const std::int64_t rows = t.numel() / std::max<std::int64_t>(cols, 1);
    constexpr std::int64_t chunk = 256;
    parallel_for((rows + chunk - 1) / chunk, [&](std::int64_t ch) {
      for (std::int64_t r = ch * chunk; r < std::min(rows, (ch + 1) * chunk); ++r) {
        T* d = t.data() + r * cols;
        if (bias.empty())
          std::fill_n(d, cols, T(0));
        else
          for (std::int64_t c = 0; c < cols; ++c) d[c] = bias(c);
      }
    });
  }

  // Region means, routing logits and top-k, per image.
  void route_into(const core::Tensor<T>& qkv, plan_type& plan) const {
    const std::int64_t N = plan.batch, C = cfg_.dim, nw = cfg_.n_win, R = nw * nw;
    const std::int64_t Hp = plan.padded_height, Wp = plan.padded_width;
    const std::int64_t wh = Hp / nw, ww = Wp / nw, K = cfg_.topk;
    plan.r_idx.assign(std::size_t(N * R * K), 0);
    parallel_for(N, [&](std::int64_t n) {
      core::Tensor<T> qw({R, C}), kw({R, C}), logits({R, R});
      qw.fill(T(0));
      kw.fill(T(0));
      for (std::int64_t r = 0; r < R; ++r) {
        const std::int64_t j = r / nw, i = r % nw;
        T* qd = qw.data() + r * C;
        T* kd = kw.data() + r * C;
        for (std::int64_t a = 0; a < wh; ++a)
          for (std::int64_t b = 0; b < ww; ++b) {
            const T* s = qkv.data() + ((n * Hp + j * wh + a) * Wp + i * ww + b) * 3 * C;
            for (std::int64_t c = 0; c < C; ++c) qd[c] += s[c];
            for (std::int64_t c = 0; c < C; ++c) kd[c] += s[C + c];
          }
        const T inv = T(1) / T(wh * ww);
        for (std::int64_t c = 0; c < C; ++c) {
          qd[c] = qd[c] * inv * scale_;  // the reference's query_hat = q_win * scale
          kd[c] *= inv;
        }
      }
      core::gemm<T, Arch>(qw, core::Trans::no, kw, core::Trans::yes, logits.template view<2>());
      core::Tensor<std::int64_t> idx({R, K});
      core::Tensor<T> val({R, K});
      core::topk<T>(logits, K, idx.template view<2>(), val.template view<2>());
      std::copy_n(idx.data(), R * K, plan.r_idx.data() + n * R * K);
    });
  }

  // Token attention + LePE into a [P, C] buffer, then the output projection and crop.
  void execute_from(const plan_type& plan, const core::Tensor<T>& qkv, const weights_type& w,
                    View<T, 4> out) const {
    const std::int64_t N = plan.batch, C = cfg_.dim;
    const std::int64_t Hp = plan.padded_height, Wp = plan.padded_width;
    const std::int64_t H = plan.height, W = plan.width;
    const std::int64_t D = head_dim_, heads = cfg_.num_heads, P = N * Hp * Wp;
    core::Tensor<T> att({P, C});

    // Token attention: the routing as an AttentionPlan run by the fused plan executor, which
    // gathers each group's (one query region's) routed K/V per head into a per-thread workspace.
    const AttentionPlan ap = token_plan(plan);
    const std::int64_t Pi = Hp * Wp;
    const ConstView<T, 4> q(qkv.data(), {N, Pi, heads, D}, {Pi * 3 * C, 3 * C, D, 1});
    const ConstView<T, 4> k(qkv.data() + C, {N, Pi, heads, D}, {Pi * 3 * C, 3 * C, D, 1});
    const ConstView<T, 4> v(qkv.data() + 2 * C, {N, Pi, heads, D}, {Pi * 3 * C, 3 * C, D, 1});
    PlanExecutor<T, Arch>({.scale = double(scale_)})
        .execute(ap, q, k, v, View<T, 4>(att.data(), {N, Pi, heads, D}, {Pi * C, C, D, 1}));

    if (cfg_.side_dwconv > 0) add_lepe(qkv, w, N, Hp, Wp, att);

    // out = att Wo^T + bo, straight into out when it is the unpadded contiguous image.
    const bool direct = Hp == H && Wp == W && out.is_contiguous();
    core::Tensor<T> tmp;
    View<T, 2> y;
    if (direct) {
      y = View<T, 2>(out.data(), {P, C});
      for (std::int64_t p = 0; p < P; ++p)
        for (std::int64_t c = 0; c < C; ++c) y(p, c) = w.wo_bias.empty() ? T(0) : w.wo_bias(c);
    } else {
      tmp = core::Tensor<T>({P, C});
      init_bias(tmp, w.wo_bias, C);
      y = tmp.template view<2>();
    }
    core::gemm_parallel<T, Arch>(att, core::Trans::no, w.wo_weight, core::Trans::yes, y, T(1),
                                 T(1));
    if (!direct)
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t yy = 0; yy < H; ++yy)
          for (std::int64_t xx = 0; xx < W; ++xx)
            for (std::int64_t c = 0; c < C; ++c) out(n, yy, xx, c) = y((n * Hp + yy) * Wp + xx, c);
  }

  // att += depthwise conv (k x k, zero padding k/2, bias) of the v image; one task per image row.
  void add_lepe(const core::Tensor<T>& qkv, const weights_type& w, std::int64_t N, std::int64_t Hp,
                std::int64_t Wp, core::Tensor<T>& att) const {
    const std::int64_t C = cfg_.dim, k = cfg_.side_dwconv, pad = k / 2;
    std::vector<T> wt(std::size_t(k * k * C));  // [dy, dx, c]: channels innermost
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t dy = 0; dy < k; ++dy)
        for (std::int64_t dx = 0; dx < k; ++dx)
          wt[std::size_t((dy * k + dx) * C + c)] = w.lepe_weight(c, 0, dy, dx);
    std::vector<T> bias(static_cast<std::size_t>(C), T(0));
    if (!w.lepe_bias.empty())
      for (std::int64_t c = 0; c < C; ++c) bias[std::size_t(c)] = w.lepe_bias(c);
    // Channels in blocks of CB with a compile-time length, so the accumulators stay in registers.
    constexpr std::int64_t CB = 64;
    const auto block = [&](std::int64_t n, std::int64_t yy, std::int64_t xx, std::int64_t c0,
                           auto len_c) {
      constexpr std::int64_t Lc = decltype(len_c)::value;
      const std::int64_t len = Lc > 0 ? Lc : std::min(CB, C - c0);
      T acc[CB];
      for (std::int64_t c = 0; c < (Lc > 0 ? Lc : len); ++c) acc[c] = bias[std::size_t(c0 + c)];
      for (std::int64_t dy = 0; dy < k; ++dy) {
        const std::int64_t sy = yy + dy - pad;
        if (sy < 0 || sy >= Hp) continue;
        for (std::int64_t dx = 0; dx < k; ++dx) {
          const std::int64_t sx = xx + dx - pad;
          if (sx < 0 || sx >= Wp) continue;
          const T* v = qkv.data() + ((n * Hp + sy) * Wp + sx) * 3 * C + 2 * C + c0;
          const T* wk = wt.data() + (dy * k + dx) * C + c0;
          for (std::int64_t c = 0; c < (Lc > 0 ? Lc : len); ++c) acc[c] += wk[c] * v[c];
        }
      }
      T* d = att.data() + ((n * Hp + yy) * Wp + xx) * C + c0;
      for (std::int64_t c = 0; c < (Lc > 0 ? Lc : len); ++c) d[c] += acc[c];
    };
    parallel_for(N * Hp, [&](std::int64_t row) {
      const std::int64_t n = row / Hp, yy = row % Hp;
      for (std::int64_t xx = 0; xx < Wp; ++xx) {
        std::int64_t c0 = 0;
        for (; c0 + CB <= C; c0 += CB)
          block(n, yy, xx, c0, std::integral_constant<std::int64_t, CB>{});
        if (c0 < C) block(n, yy, xx, c0, std::integral_constant<std::int64_t, 0>{});
      }
    });
  }

  void check_input(std::string_view fn, ConstView<T, 4> x) const {
    core::detail::check_shape(name, fn, "x", x, {"N", "H", "W", "C"}, {-1, -1, -1, cfg_.dim},
                              "C must equal config dim");
    const std::int64_t H = x.extent(1), W = x.extent(2), nw = cfg_.n_win;
    if (x.extent(0) > 0 && (H < 1 || W < 1))
      switchyard::detail::fail_shape(
          name, fn, "x", switchyard::detail::format_shape({"N", "H", "W", "C"}, x.shape()),
          "[N, H >= 1, W >= 1, C]", "an image needs pixels");
    if (!cfg_.auto_pad && (H % nw != 0 || W % nw != 0))
      switchyard::detail::fail_shape(
          name, fn, "x", switchyard::detail::format_shape({"N", "H", "W", "C"}, x.shape()),
          "[N, H, W, C] with H and W multiples of n_win=" + std::to_string(nw), "or set auto_pad");
    // The padded qkv image [N * Hp * Wp, 3C], the attention image and the routing indices
    // [N, n_win^2, topk]; a stride-0 x may claim any extents.
    const std::int64_t Hp = core::pad_extent(H, nw), Wp = core::pad_extent(W, nw);
    switchyard::detail::checked_size(name, fn, "x", {x.extent(0), Hp, Wp, 5 * cfg_.dim}, sizeof(T));
    switchyard::detail::checked_size(name, fn, "x", {x.extent(0), nw * nw, cfg_.topk},
                                     sizeof(std::int64_t));
  }

  void check_out(std::string_view fn, ConstView<T, 4> x, View<T, 4> out) const {
    core::detail::check_shape<T, 4>(name, fn, "out", out, {"N", "H", "W", "C"}, x.shape(),
                                    "out has the shape of x");
  }

  void check_plan(std::string_view fn, const plan_type& plan, ConstView<T, 4> x) const {
    const plan_type want = empty_plan(x);
    bool ok = plan.batch == want.batch && plan.height == want.height && plan.width == want.width &&
              plan.padded_height == want.padded_height && plan.padded_width == want.padded_width &&
              plan.n_win == want.n_win && plan.topk == want.topk &&
              std::int64_t(plan.r_idx.size()) ==
                  core::bounded_product({want.batch, want.regions(), want.topk});
    for (std::size_t i = 0; ok && i < plan.r_idx.size(); ++i)
      ok = plan.r_idx[i] >= 0 && plan.r_idx[i] < want.regions();
    if (ok) return;
    const std::int64_t got[] = {plan.batch, plan.height, plan.width,
                                plan.n_win, plan.topk,   std::int64_t(plan.r_idx.size())};
    const std::int64_t exp[] = {want.batch, want.height, want.width,
                                want.n_win, want.topk,   want.batch * want.regions() * want.topk};
    switchyard::detail::fail_shape(
        name, fn, "plan",
        switchyard::detail::format_shape({"N", "H", "W", "n_win", "topk", "r_idx"}, got),
        switchyard::detail::format_shape({"N", "H", "W", "n_win", "topk", "r_idx"}, exp),
        "the plan must come from route() on an x of the same shape, "
        "with region indices in [0, n_win^2)");
  }

  void check_weights(std::string_view fn, const weights_type& w) const {
    const std::int64_t C = cfg_.dim;
    auto mat = [&](std::string_view arg, ConstView<T, 2> v, std::int64_t rows, std::string_view r) {
      core::detail::check_shape(name, fn, arg, v, {r, "C"}, {rows, C}, "PyTorch layout [out, in]");
    };
    auto vec = [&](std::string_view arg, ConstView<T, 1> v, std::int64_t n, std::string_view r) {
      if (!v.empty()) core::detail::check_shape(name, fn, arg, v, {r}, {n}, "or empty for none");
    };
    mat("qkv_weight", w.qkv_weight, 3 * C, "3C");
    vec("qkv_bias", w.qkv_bias, 3 * C, "3C");
    mat("wo_weight", w.wo_weight, C, "C");
    vec("wo_bias", w.wo_bias, C, "C");
    if (cfg_.side_dwconv > 0) {
      const std::int64_t k = cfg_.side_dwconv;
      core::detail::check_shape(name, fn, "lepe_weight", w.lepe_weight, {"C", "1", "k", "k"},
                                {C, 1, k, k}, "depthwise conv, k = side_dwconv");
      vec("lepe_bias", w.lepe_bias, C, "C");
    }
  }

  config_type cfg_;
  std::int64_t head_dim_ = 0;
  T scale_ = 1;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
