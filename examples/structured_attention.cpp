// structured_attention: every structured sparse attention pattern on a small input, and which
// keys one chosen query attended to. The pictures come from the layers themselves: with V the
// identity (value row j = unit vector j), output row t is query t's attention weights over the
// keys, so a key is drawn '#' exactly when the layer gave it weight. Patterns: 2D neighbourhood
// attention (NATTEN rules: the window shifts at the border, dilation takes every other key),
// a causal sliding window with sinks, chunked attention, MoBA (block routing), and a
// block-sparse mask. The check: every layer's output on random q, k, v equals naive attention
// written out here in double over the keys the pattern's rule allows; exits 1 otherwise.
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <switchyard/attention/block_sparse.hpp>
#include <switchyard/attention/moba.hpp>
#include <switchyard/attention/neighborhood.hpp>
#include <switchyard/attention/sliding_window.hpp>
#include <vector>

using namespace switchyard;
using namespace switchyard::attention;

namespace {

using Visible = std::function<bool(std::int64_t query, std::int64_t key)>;

Tensor<float> random_tensor(std::int64_t T, std::int64_t D, std::uint32_t seed) {
  Tensor<float> t({1, T, 1, D});
  std::mt19937 gen(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  for (auto& x : t) x = n(gen);
  return t;
}

// V = identity: row j is the unit vector j (D = T).
Tensor<float> identity_values(std::int64_t T) {
  Tensor<float> v({1, T, 1, T});
  for (std::int64_t j = 0; j < T; ++j) v(0, j, 0, j) = 1.f;
  return v;
}

// Naive attention in double over the keys visible(t, s) allows; max |out - naive|.
double max_error_vs_naive(const Tensor<float>& q, const Tensor<float>& k, const Tensor<float>& v,
                          const Tensor<float>& out, const Visible& visible) {
  const std::int64_t T = q.extent(1), S = k.extent(1), D = q.extent(3);
  const double scale = 1.0 / std::sqrt(double(D));
  double err = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<double> w(static_cast<std::size_t>(S), 0.0);
    double m = -1e300, sum = 0;
    for (std::int64_t s = 0; s < S; ++s) {
      if (!visible(t, s)) continue;
      double dot = 0;
      for (std::int64_t d = 0; d < D; ++d) dot += double(q(0, t, 0, d)) * double(k(0, s, 0, d));
      w[s] = dot * scale;
      m = std::max(m, w[s]);
    }
    for (std::int64_t s = 0; s < S; ++s) sum += visible(t, s) ? std::exp(w[s] - m) : 0.0;
    for (std::int64_t d = 0; d < D; ++d) {
      double o = 0;
      for (std::int64_t s = 0; s < S; ++s)
        if (visible(t, s)) o += std::exp(w[s] - m) / sum * double(v(0, s, 0, d));
      err = std::max(err, std::abs(o - double(out(0, t, 0, d))));
    }
  }
  return err;
}

// Runs `layer(q, k, v)` twice: with V = identity for the picture of `query`'s keys (drawn by
// `draw`), and on random q, k, v against the naive reference. Returns the error.
double show(const char* title, std::int64_t T,
            const std::function<Tensor<float>(const Tensor<float>&, const Tensor<float>&,
                                              const Tensor<float>&)>& layer,
            const Visible& visible, std::int64_t query,
            const std::function<void(const std::vector<bool>&, std::int64_t)>& draw) {
  const Tensor<float> q = random_tensor(T, T, 1), k = random_tensor(T, T, 2);
  const Tensor<float> weights = layer(q, k, identity_values(T));
  std::vector<bool> seen(static_cast<std::size_t>(T));
  std::int64_t n = 0;
  for (std::int64_t j = 0; j < T; ++j) n += (seen[j] = weights(0, query, 0, j) > 0.f);
  std::printf("\n%s\nquery %lld attends to %lld keys:\n", title, (long long)query, (long long)n);
  draw(seen, query);
  const Tensor<float> q2 = random_tensor(T, 32, 3), k2 = random_tensor(T, 32, 4);
  const Tensor<float> v2 = random_tensor(T, 32, 5);
  const double err = max_error_vs_naive(q2, k2, v2, layer(q2, k2, v2), visible);
  std::printf("max |layer - naive double attention| = %.2g\n", err);
  return err;
}

// A 1D row of keys: 'Q' the query, '#' attended, '.' not.
void draw_row(const std::vector<bool>& seen, std::int64_t query) {
  std::string row;
  for (std::size_t j = 0; j < seen.size(); ++j)
    row += std::int64_t(j) == query ? 'Q' : (seen[j] ? '#' : '.');
  std::printf("  %s\n", row.c_str());
}

// NATTEN's window along one axis of length L (group coordinates under dilation d, shifted at
// the borders), written out independently of the library for the check.
bool in_window(std::int64_t L, std::int64_t kernel, std::int64_t dil, std::int64_t qi,
               std::int64_t kj) {
  if (qi % dil != kj % dil) return false;
  const std::int64_t g = qi % dil, lg = (L - g + dil - 1) / dil, i = qi / dil, j = kj / dil;
  const std::int64_t start = std::min(std::max(i - kernel / 2, std::int64_t(0)), lg - kernel);
  return start <= j && j < start + kernel;
}

}  // namespace

int main() {
  std::printf("structured_attention: which keys one query attends to, per pattern\n");
  double worst = 0;

  // 2D neighbourhood attention on a 9 x 16 grid: kernel 5 x 5 at a border query (the window
  // shifts to stay inside), then kernel 3 x 3 with dilation 2 (every other row and column).
  const std::int64_t X = 9, Y = 16, N = X * Y;
  const auto grid = [&](const std::vector<bool>& seen, std::int64_t query) {
    for (std::int64_t x = 0; x < X; ++x) {
      std::string row;
      for (std::int64_t y = 0; y < Y; ++y) {
        const std::int64_t t = x * Y + y;
        row += t == query ? 'Q' : (seen[t] ? '#' : '.');
      }
      std::printf("  %s\n", row.c_str());
    }
  };
  for (const auto [kernel, dil, qx, qy] :
       {std::array<std::int64_t, 4>{5, 1, 1, 14}, std::array<std::int64_t, 4>{3, 2, 4, 7}}) {
    NeighborhoodConfig<2> cfg;
    cfg.axes = {NeighborhoodAxis{.kernel_size = kernel, .dilation = dil},
                NeighborhoodAxis{.kernel_size = kernel, .dilation = dil}};
    const NeighborhoodAttention<2, float> na(cfg);
    const std::string title = "neighbourhood 2D, " + std::to_string(X) + " x " + std::to_string(Y) +
                              " tokens, kernel " + std::to_string(kernel) + " x " +
                              std::to_string(kernel) + ", dilation " + std::to_string(dil);
    worst = std::max(worst, show(
                                title.c_str(), N,
                                [&](const auto& q, const auto& k, const auto& v) {
                                  return na.forward({X, Y}, q, k, v);
                                },
                                [&](std::int64_t t, std::int64_t s) {
                                  return in_window(X, kernel, dil, t / Y, s / Y) &&
                                         in_window(Y, kernel, dil, t % Y, s % Y);
                                },
                                qx * Y + qy, grid));
  }

  // Causal sliding window of 8 keys with 2 sinks, and chunks of 8, over 40 tokens.
  const std::int64_t T = 40;
  const SlidingWindowAttention<float> sw({.window = 8, .sinks = 2, .causal = true});
  worst = std::max(
      worst,
      show(
          "causal sliding window of 8 keys (the query included) with 2 sink tokens, 40 "
          "tokens",
          T, [&](const auto& q, const auto& k, const auto& v) { return sw.forward(q, k, v); },
          [](std::int64_t t, std::int64_t s) { return s <= t && (s > t - 8 || s < 2); }, 30,
          draw_row));
  const SlidingWindowAttention<float> chunked({.chunk = 8, .causal = true});
  worst = std::max(
      worst,
      show(
          "causal chunked attention, chunks of 8 tokens", T,
          [&](const auto& q, const auto& k, const auto& v) { return chunked.forward(q, k, v); },
          [](std::int64_t t, std::int64_t s) { return s <= t && s / 8 == t / 8; }, 29, draw_row));

  // MoBA: 64 tokens in blocks of 8; each query keeps its own block (causal inside) and the
  // 2 past blocks whose mean key scores highest against it.
  const std::int64_t TM = 64;
  const MobaAttention<float> moba({.block_size = 8, .top_k = 3, .causal = true});
  // The check's selection (show() draws q, k for the check from seeds 3, 4 with D = 32) and
  // the picture's (seeds 1, 2 with D = T).
  MobaSelection sel, pic;
  moba.route(random_tensor(TM, 32, 3), random_tensor(TM, 32, 4), sel);
  moba.route(random_tensor(TM, TM, 1), random_tensor(TM, TM, 2), pic);
  const auto moba_visible = [&](std::int64_t t, std::int64_t s) {
    if (s > t) return false;
    for (const std::int32_t b : sel.of(t))
      if (s / 8 == b) return true;
    return false;
  };
  std::string chosen;
  for (const std::int32_t b : pic.of(50)) chosen += " " + std::to_string(b);
  const std::string moba_title =
      "MoBA, 64 tokens in blocks of 8, top-3 blocks (the own block always, causal inside it);"
      " query 50 chose blocks" +
      chosen;
  worst = std::max(
      worst, show(
                 moba_title.c_str(), TM,
                 [&](const auto& q, const auto& k, const auto& v) { return moba.forward(q, k, v); },
                 moba_visible, 50, draw_row));

  // Block-sparse: blocks of 8 queries and 8 keys; each query block sees key block 0 (global)
  // and its own and previous block (local), non-causal.
  BlockMask mask{
      .batch = 1, .heads = 1, .num_queries = T, .num_keys = T, .query_block = 8, .key_block = 8};
  mask.offsets.push_back(0);
  for (std::int32_t qb = 0; qb < 5; ++qb) {
    for (std::int32_t kb = 0; kb < 5; ++kb)
      if (kb == 0 || kb == qb || kb == qb - 1) mask.indices.push_back(kb);
    mask.offsets.push_back(std::int64_t(mask.indices.size()));
  }
  const BlockSparseAttention<float> bs;
  worst = std::max(
      worst, show(
                 "block-sparse mask: blocks of 8; key block 0, the own and the previous block", T,
                 [&](const auto& q, const auto& k, const auto& v) {
                   Tensor<float> out({1, T, 1, v.extent(3)});
                   bs.forward(q, k, v, mask, out.view<4>());
                   return out;
                 },
                 [](std::int64_t t, std::int64_t s) {
                   const std::int64_t qb = t / 8, kb = s / 8;
                   return kb == 0 || kb == qb || kb == qb - 1;
                 },
                 35, draw_row));

  const bool ok = worst <= 1e-5;
  std::printf("\nevery pattern vs naive double attention, max error %.2g (tolerance 1e-5): %s\n",
              worst, ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
