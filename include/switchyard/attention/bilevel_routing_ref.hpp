#pragma once
// Naive reference of bi-level routing attention, following BiFormer's `bra_legacy.py`
// BiLevelRoutingAttention.forward step by step (pad, per-pixel qkv linear, region means, routing
// logits, top-k, gather, per-head softmax attention, LePE, output linear, crop), in plain loops
// with long double accumulation. For tests; shapes are assumed valid.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "switchyard/attention/bilevel_routing.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {
namespace ref {

struct BiLevelRoutingResult {
  std::vector<double> out;          // [N, H, W, C]
  std::vector<std::int64_t> r_idx;  // [N, n_win^2, topk]
};

/// x: [N, H, W, C] row-major (any T); weights as BiLevelRoutingWeights.
template <class T>
BiLevelRoutingResult bilevel_routing_attention(const BiLevelRoutingConfig& cfg, ConstView<T, 4> x,
                                               const BiLevelRoutingWeights<T>& w) {
  using R = long double;
  const std::int64_t N = x.extent(0), H = x.extent(1), W = x.extent(2), C = cfg.dim;
  const std::int64_t nw = cfg.n_win, nh = cfg.num_heads, D = C / nh, K = cfg.topk;
  // auto_pad: F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) — zeros at the bottom and right.
  const std::int64_t pad_r = cfg.auto_pad ? (nw - W % nw) % nw : 0;
  const std::int64_t pad_b = cfg.auto_pad ? (nw - H % nw) % nw : 0;
  const std::int64_t Hp = H + pad_b, Wp = W + pad_r, wh = Hp / nw, ww = Wp / nw, w2 = wh * ww;
  const std::int64_t Rg = nw * nw;
  const R scale = cfg.qk_scale ? R(*cfg.qk_scale) : R(1) / std::sqrt(R(C));
  auto xin = [&](std::int64_t n, std::int64_t y, std::int64_t xx, std::int64_t c) -> R {
    return (y < H && xx < W) ? R(x(n, y, xx, c)) : R(0);
  };
  BiLevelRoutingResult res;
  res.out.assign(std::size_t(N * H * W * C), 0.0);
  res.r_idx.assign(std::size_t(N * Rg * K), 0);
  for (std::int64_t n = 0; n < N; ++n) {
    // qkv = x W^T + b per pixel: [Hp, Wp, 3C]
    std::vector<R> qkv(std::size_t(Hp * Wp * 3 * C));
    for (std::int64_t y = 0; y < Hp; ++y)
      for (std::int64_t xx = 0; xx < Wp; ++xx)
        for (std::int64_t o = 0; o < 3 * C; ++o) {
          R s = w.qkv_bias.empty() ? R(0) : R(w.qkv_bias(o));
          for (std::int64_t c = 0; c < C; ++c) s += R(w.qkv_weight(o, c)) * xin(n, y, xx, c);
          qkv[std::size_t((y * Wp + xx) * 3 * C + o)] = s;
        }
    auto at = [&](std::int64_t reg, std::int64_t t, std::int64_t o) -> R {
      const std::int64_t j = reg / nw, i = reg % nw;
      const std::int64_t y = j * wh + t / ww, xx = i * ww + t % ww;
      return qkv[std::size_t((y * Wp + xx) * 3 * C + o)];
    };
    // q_win, k_win: means over each region
    std::vector<R> qwin(std::size_t(Rg * C), 0), kwin(std::size_t(Rg * C), 0);
    for (std::int64_t r = 0; r < Rg; ++r)
      for (std::int64_t c = 0; c < C; ++c) {
        for (std::int64_t t = 0; t < w2; ++t) {
          qwin[std::size_t(r * C + c)] += at(r, t, c);
          kwin[std::size_t(r * C + c)] += at(r, t, C + c);
        }
        qwin[std::size_t(r * C + c)] /= R(w2);
        kwin[std::size_t(r * C + c)] /= R(w2);
      }
    // routing: logits = (q_win * scale) k_win^T, top-k descending, ties to the lower index
    for (std::int64_t r = 0; r < Rg; ++r) {
      std::vector<R> logit(std::size_t(Rg), 0);
      for (std::int64_t s = 0; s < Rg; ++s)
        for (std::int64_t c = 0; c < C; ++c)
          logit[s] += qwin[std::size_t(r * C + c)] * scale * kwin[std::size_t(s * C + c)];
      std::vector<std::int64_t> order(static_cast<std::size_t>(Rg));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](std::int64_t a, std::int64_t b) { return logit[a] > logit[b]; });
      for (std::int64_t i = 0; i < K; ++i) res.r_idx[std::size_t((n * Rg + r) * K + i)] = order[i];
    }
    // token attention per (region, head) over the routed regions' pixels in r_idx order
    std::vector<R> att(std::size_t(Hp * Wp * C), 0);
    const std::int64_t S = K * w2;
    std::vector<R> p(static_cast<std::size_t>(S));
    for (std::int64_t r = 0; r < Rg; ++r) {
      const std::int64_t* sel = res.r_idx.data() + (n * Rg + r) * K;
      for (std::int64_t h = 0; h < nh; ++h)
        for (std::int64_t t = 0; t < w2; ++t) {
          R mx = -INFINITY;
          for (std::int64_t s = 0; s < S; ++s) {
            R dot = 0;
            for (std::int64_t d = 0; d < D; ++d)
              dot += at(r, t, h * D + d) * scale * at(sel[s / w2], s % w2, C + h * D + d);
            p[s] = dot;
            mx = std::max(mx, dot);
          }
          R sum = 0;
          for (std::int64_t s = 0; s < S; ++s) sum += (p[s] = std::exp(p[s] - mx));
          const std::int64_t j = r / nw, i = r % nw;
          const std::int64_t y = j * wh + t / ww, xx = i * ww + t % ww;
          for (std::int64_t d = 0; d < D; ++d) {
            R acc = 0;
            for (std::int64_t s = 0; s < S; ++s)
              acc += p[s] * at(sel[s / w2], s % w2, 2 * C + h * D + d);
            att[std::size_t((y * Wp + xx) * C + h * D + d)] = acc / sum;
          }
        }
    }
    // LePE: depthwise conv over the whole (padded) v image, zero padding k/2, with bias
    const std::int64_t k = cfg.side_dwconv, pad = k / 2;
    if (k > 0)
      for (std::int64_t y = 0; y < Hp; ++y)
        for (std::int64_t xx = 0; xx < Wp; ++xx)
          for (std::int64_t c = 0; c < C; ++c) {
            R s = w.lepe_bias.empty() ? R(0) : R(w.lepe_bias(c));
            for (std::int64_t dy = 0; dy < k; ++dy)
              for (std::int64_t dx = 0; dx < k; ++dx) {
                const std::int64_t sy = y + dy - pad, sx = xx + dx - pad;
                if (sy < 0 || sy >= Hp || sx < 0 || sx >= Wp) continue;
                s += R(w.lepe_weight(c, 0, dy, dx)) *
                     qkv[std::size_t((sy * Wp + sx) * 3 * C + 2 * C + c)];
              }
            att[std::size_t((y * Wp + xx) * C + c)] += s;
          }
    // wo, then crop to [H, W]
    for (std::int64_t y = 0; y < H; ++y)
      for (std::int64_t xx = 0; xx < W; ++xx)
        for (std::int64_t o = 0; o < C; ++o) {
          R s = w.wo_bias.empty() ? R(0) : R(w.wo_bias(o));
          for (std::int64_t c = 0; c < C; ++c)
            s += R(w.wo_weight(o, c)) * att[std::size_t((y * Wp + xx) * C + c)];
          res.out[std::size_t(((n * H + y) * W + xx) * C + o)] = double(s);
        }
  }
  return res;
}

}  // namespace ref
}  // namespace attention
}  // namespace v0
}  // namespace switchyard
