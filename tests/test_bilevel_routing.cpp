// Bi-level routing attention (BiFormer): the two bra_legacy golden fixtures, the naive
// long-double reference (bilevel_routing_ref.hpp) on random inputs (N > 1, auto_pad, LePE, a
// custom scale), topk = all regions without LePE against dense attention, route + execute against
// forward, 1 vs 2 threads, and every documented error.
// Tolerance form of the fixture README: max|ours - ref| <= tol * max(1, max|ref|), tol = 1e-5.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "support/fixtures.hpp"
#include "switchyard/attention/bilevel_routing.hpp"
#include "switchyard/attention/bilevel_routing_ref.hpp"
#include "switchyard/attention/dense.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"

using switchyard::ConstView;
using switchyard::Tensor;
using namespace switchyard::attention;
using Catch::Contains;

namespace {

constexpr double tol = 1e-5;

template <class A, class B>
double max_abs_diff(const A& a, const B& b, std::size_t n) {
  double m = 0;
  for (std::size_t i = 0; i < n; ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  return m;
}
template <class B>
double max_abs(const B& b, std::size_t n) {
  double m = 0;
  for (std::size_t i = 0; i < n; ++i) m = std::max(m, std::abs(double(b[i])));
  return m;
}

// Routed regions of each query region, as sets.
std::vector<std::set<std::int64_t>> as_sets(const std::vector<std::int64_t>& r_idx,
                                            std::int64_t k) {
  std::vector<std::set<std::int64_t>> s(r_idx.size() / std::size_t(k));
  for (std::size_t i = 0; i < r_idx.size(); ++i) s[i / std::size_t(k)].insert(r_idx[i]);
  return s;
}

template <class T>
struct Model {
  Tensor<T> qkv_w, qkv_b, wo_w, wo_b, lepe_w, lepe_b;
  Model(std::int64_t C, std::int64_t k, std::uint32_t seed)
      : qkv_w({3 * C, C}),
        qkv_b({3 * C}),
        wo_w({C, C}),
        wo_b({C}),
        lepe_w({C, 1, std::max<std::int64_t>(k, 1), std::max<std::int64_t>(k, 1)}),
        lepe_b({C}) {
    std::mt19937 gen(seed);
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(double(C)));
    for (auto* t : {&qkv_w, &qkv_b, &wo_w, &wo_b, &lepe_b})
      for (auto& v : *t) v = T(nd(gen));
    std::normal_distribution<double> nk(0.0, 1.0 / double(std::max<std::int64_t>(k, 1)));
    for (auto& v : lepe_w) v = T(nk(gen));
  }
  BiLevelRoutingWeights<T> views() const {
    return {qkv_w, qkv_b, wo_w, wo_b, lepe_w.template view<4>(), lepe_b};
  }
};

template <class T>
Tensor<T> random_image(std::int64_t N, std::int64_t H, std::int64_t W, std::int64_t C,
                       std::uint32_t seed) {
  Tensor<T> x({N, H, W, C});
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (auto& v : x) v = T(nd(gen));
  return x;
}

void check_fixture(const char* file, std::int64_t side_dwconv) {
  const auto f = open_fixture(file);
  const auto x = f.tensor<float>("x"), out = f.tensor<float>("out");
  const auto r_idx = f.tensor<std::int64_t>("r_idx");
  const auto qkv_w = f.tensor<float>("qkv_weight"), qkv_b = f.tensor<float>("qkv_bias");
  const auto wo_w = f.tensor<float>("wo_weight"), wo_b = f.tensor<float>("wo_bias");
  Tensor<float> lepe_w({16, 1, 1, 1}), lepe_b({16});
  if (side_dwconv > 0) {
    lepe_w = f.tensor<float>("lepe_weight");
    lepe_b = f.tensor<float>("lepe_bias");
  }
  const BiLevelRoutingConfig cfg{.dim = 16,
                                 .num_heads = 2,
                                 .n_win = 2,
                                 .topk = 2,
                                 .side_dwconv = side_dwconv,
                                 .qk_scale = std::nullopt,
                                 .auto_pad = false};
  const BiLevelRoutingWeights<float> w{qkv_w, qkv_b, wo_w, wo_b, lepe_w.view<4>(), lepe_b};
  const BiLevelRoutingAttention<float> bra(cfg);
  CHECK(bra.scale() == 0.25f);

  const auto plan = bra.route(x, w);
  const std::vector<std::int64_t> want_idx(r_idx.begin(), r_idx.end());
  CHECK(as_sets(plan.r_idx, 2) == as_sets(want_idx, 2));
  CHECK(plan.r_idx == want_idx);  // also the torch.topk order (descending logit)

  const auto y = bra.forward(x, w);
  const std::size_t n = out.numel();
  const double scale = std::max(1.0, max_abs(out.data(), n));
  const double err = max_abs_diff(y.data(), out.data(), n);
  const auto rr = ref::bilevel_routing_attention<float>(cfg, x, w);
  const double ref_err = max_abs_diff(rr.out.data(), out.data(), n);
  std::printf("%s: max|ours - golden| = %.3g, max|ref - golden| = %.3g (max|golden| = %.3g)\n",
              file, err, ref_err, max_abs(out.data(), n));
  CHECK(err <= tol * scale);
  CHECK(ref_err <= tol * scale);
  CHECK(as_sets(rr.r_idx, 2) == as_sets(want_idx, 2));
}

}  // namespace

TEST_CASE("bra: golden fixture without LePE", "[bra][fixture]") {
  check_fixture("bra_legacy_tiny_N1_H8_C16_h2_nwin2_topk2_lepe0.safetensors", 0);
}

TEST_CASE("bra: golden fixture with 5x5 LePE", "[bra][fixture]") {
  check_fixture("bra_legacy_tiny_N1_H8_C16_h2_nwin2_topk2_lepe5.safetensors", 5);
}

TEST_CASE("bra: matches the naive reference on random inputs", "[bra][ref]") {
  struct Case {
    std::int64_t N, H, W, C, heads, n_win, topk, k;
    bool auto_pad;
    std::optional<double> scale;
  };
  const Case cases[] = {
      {2, 8, 8, 16, 2, 2, 2, 3, false, std::nullopt},
      {3, 6, 9, 24, 3, 3, 4, 5, false, std::nullopt},
      {2, 7, 10, 16, 4, 3, 3, 3, true, std::nullopt},    // pads to 9 x 12
      {1, 5, 5, 8, 1, 2, 1, 0, true, 0.3},               // pads to 6 x 6
      {2, 12, 12, 32, 4, 3, 9, 0, false, std::nullopt},  // topk = all regions
      {1, 4, 6, 8, 2, 1, 1, 3, false, std::nullopt},     // one region
  };
  std::uint32_t seed = 10;
  for (const Case& c : cases) {
    CAPTURE(c.N, c.H, c.W, c.C, c.heads, c.n_win, c.topk, c.k, c.auto_pad);
    const BiLevelRoutingConfig cfg{.dim = c.C,
                                   .num_heads = c.heads,
                                   .n_win = c.n_win,
                                   .topk = c.topk,
                                   .side_dwconv = c.k,
                                   .qk_scale = c.scale,
                                   .auto_pad = c.auto_pad};
    const Model<float> mf(c.C, c.k, seed);
    const auto x = random_image<float>(c.N, c.H, c.W, c.C, seed + 1);
    const auto rr = ref::bilevel_routing_attention<float>(cfg, x, mf.views());
    const BiLevelRoutingAttention<float> bra(cfg);
    const auto plan = bra.route(x, mf.views());
    CHECK(as_sets(plan.r_idx, c.topk) == as_sets(rr.r_idx, c.topk));
    const auto y = bra.forward(x, mf.views());
    const std::size_t n = y.numel();
    const double err = max_abs_diff(y.data(), rr.out.data(), n);
    CHECK(err <= tol * std::max(1.0, max_abs(rr.out.data(), n)));

    // double: the same layer at double precision is far tighter
    const Model<double> md(c.C, c.k, seed);
    const auto xd = random_image<double>(c.N, c.H, c.W, c.C, seed + 1);
    const auto rd = ref::bilevel_routing_attention<double>(cfg, xd, md.views());
    const auto yd = BiLevelRoutingAttention<double>(cfg).forward(xd, md.views());
    CHECK(max_abs_diff(yd.data(), rd.out.data(), n) <=
          1e-12 * std::max(1.0, max_abs(rd.out.data(), n)));
    seed += 7;
  }
}

TEST_CASE("bra: topk = all regions and no LePE equals dense attention", "[bra][dense]") {
  const std::int64_t N = 2, H = 8, W = 12, C = 32, heads = 4, D = C / heads, n_win = 2;
  const std::int64_t T = H * W;
  const BiLevelRoutingConfig cfg{
      .dim = C, .num_heads = heads, .n_win = n_win, .topk = 4, .side_dwconv = 0};
  const Model<float> m(C, 0, 3);
  const auto x = random_image<float>(N, H, W, C, 4);
  const auto y = BiLevelRoutingAttention<float>(cfg).forward(x, m.views());

  // qkv, dense attention over all H*W tokens with the full-dim scale, output projection
  using switchyard::core::Trans;
  Tensor<float> qkv({N * T, 3 * C});
  for (std::int64_t p = 0; p < N * T; ++p)
    for (std::int64_t o = 0; o < 3 * C; ++o) qkv(p, o) = m.qkv_b(o);
  switchyard::core::gemm<float>(ConstView<float, 2>(x.data(), {N * T, C}), Trans::no, m.qkv_w,
                                Trans::yes, qkv.view<2>(), 1.0f, 1.0f);
  const std::int64_t st[4] = {T * 3 * C, 3 * C, D, 1};
  const ConstView<float, 4> q(qkv.data(), {N, T, heads, D}, {st[0], st[1], st[2], st[3]});
  const ConstView<float, 4> k(qkv.data() + C, {N, T, heads, D}, {st[0], st[1], st[2], st[3]});
  const ConstView<float, 4> v(qkv.data() + 2 * C, {N, T, heads, D}, {st[0], st[1], st[2], st[3]});
  const DenseAttention<float> dense({.scale = 1.0 / std::sqrt(double(C))});
  const auto att = dense.forward(q, k, v);
  Tensor<float> want({N * T, C});
  for (std::int64_t p = 0; p < N * T; ++p)
    for (std::int64_t o = 0; o < C; ++o) want(p, o) = m.wo_b(o);
  switchyard::core::gemm<float>(ConstView<float, 2>(att.data(), {N * T, C}), Trans::no, m.wo_w,
                                Trans::yes, want.view<2>(), 1.0f, 1.0f);
  const std::size_t n = want.numel();
  const double err = max_abs_diff(y.data(), want.data(), n);
  std::printf("bra topk=all vs dense: max|diff| = %.3g\n", err);
  CHECK(err <= tol * std::max(1.0, max_abs(want.data(), n)));
}

TEST_CASE("bra: route then execute equals forward; 1 vs 2 threads bit-identical",
          "[bra][threads]") {
  const BiLevelRoutingConfig cfg{.dim = 32,
                                 .num_heads = 2,
                                 .n_win = 3,
                                 .topk = 3,
                                 .side_dwconv = 3,
                                 .qk_scale = std::nullopt,
                                 .auto_pad = true};
  const Model<float> m(32, 3, 5);
  const auto x = random_image<float>(3, 13, 14, 32, 6);
  const BiLevelRoutingAttention<float> bra(cfg);
  Tensor<float> y1, y2, y3({3, 13, 14, 32});
  BiLevelRoutingPlan p1, p2;
  {
    switchyard::ScopedNumThreads one(1);
    p1 = bra.route(x, m.views());
    y1 = bra.forward(x, m.views());
  }
  {
    switchyard::ScopedNumThreads two(2);
    p2 = bra.route(x, m.views());
    y2 = bra.forward(x, m.views());
  }
  CHECK(p1.r_idx == p2.r_idx);
  CHECK(std::equal(y1.begin(), y1.end(), y2.begin()));
  bra.execute(p1, x, m.views(), y3.view<4>());
  CHECK(std::equal(y1.begin(), y1.end(), y3.begin()));

  // region hits: every image routes topk regions from each of its n_win^2 regions
  const auto hits = p1.region_hits();
  REQUIRE(hits.size() == std::size_t(3 * 9));
  for (std::int64_t n = 0; n < 3; ++n) {
    std::int64_t s = 0;
    for (std::int64_t r = 0; r < 9; ++r) s += hits[std::size_t(n * 9 + r)];
    CHECK(s == 9 * 3);
  }
  CHECK(p1.padded_height == 15);
  CHECK(p1.padded_width == 15);

  // empty batch is valid
  Tensor<float> x0({0, 13, 14, 32});
  CHECK(bra.forward(x0, m.views()).numel() == 0);
}

TEST_CASE("bra: errors", "[bra][errors]") {
  using switchyard::config_error;
  using switchyard::shape_error;
  auto make = [](BiLevelRoutingConfig c) { return BiLevelRoutingAttention<float>(c); };
  const BiLevelRoutingConfig ok{.dim = 16, .num_heads = 2, .n_win = 2, .topk = 2, .side_dwconv = 3};
  const auto with = [&](auto f) {
    BiLevelRoutingConfig c = ok;
    f(c);
    return c;
  };
  REQUIRE_THROWS_AS(make(with([](auto& c) { c.n_win = 0; })), config_error);
  REQUIRE_THROWS_WITH(make(with([](auto& c) { c.n_win = 0; })),
                      Contains("BiLevelRoutingAttention") && Contains("'n_win' = 0"));
  REQUIRE_THROWS_WITH(make(with([](auto& c) { c.topk = 5; })),
                      Contains("BiLevelRoutingAttention") && Contains("'topk' = 5") &&
                          Contains("regions = n_win^2 = 4"));
  REQUIRE_THROWS_WITH(make(with([](auto& c) { c.topk = 0; })),
                      Contains("BiLevelRoutingAttention") && Contains("'topk' = 0"));
  REQUIRE_THROWS_WITH(
      make(with([](auto& c) { c.num_heads = 3; })),
      Contains("BiLevelRoutingAttention") && Contains("'num_heads' = 3") && Contains("dim = 16"));
  REQUIRE_THROWS_WITH(make(with([](auto& c) { c.dim = 0; })),
                      Contains("BiLevelRoutingAttention") && Contains("'dim' = 0"));
  REQUIRE_THROWS_WITH(
      make(with([](auto& c) { c.qk_scale = std::numeric_limits<double>::quiet_NaN(); })),
      Contains("BiLevelRoutingAttention") && Contains("'qk_scale' = nan"));
  REQUIRE_THROWS_WITH(
      make(with([](auto& c) { c.side_dwconv = 4; })),
      Contains("BiLevelRoutingAttention") && Contains("'side_dwconv' = 4") && Contains("odd"));

  const BiLevelRoutingAttention<float> bra(ok);
  const Model<float> m(16, 3, 1);
  const auto w = m.views();
  // n_win not dividing H or W without auto_pad
  const auto x_bad = random_image<float>(1, 6, 7, 16, 2);
  REQUIRE_THROWS_AS(bra.forward(x_bad, w), shape_error);
  REQUIRE_THROWS_WITH(bra.forward(x_bad, w),
                      Contains("BiLevelRoutingAttention::forward") && Contains("'x'") &&
                          Contains("[N=1, H=6, W=7, C=16]") && Contains("multiples of n_win=2"));
  // wrong channel count
  const auto x_c = random_image<float>(1, 4, 4, 8, 2);
  REQUIRE_THROWS_WITH(bra.route(x_c, w), Contains("BiLevelRoutingAttention::route") &&
                                             Contains("[N=1, H=4, W=4, C=8]") && Contains("C=16"));
  const auto x = random_image<float>(1, 4, 4, 16, 2);
  // weights of the wrong shape
  Tensor<float> qkv_small({32, 16}), wo_bad({16, 8}), lepe_bad({16, 1, 5, 5}), bias_bad({47});
  auto w1 = w;
  w1.qkv_weight = qkv_small;
  REQUIRE_THROWS_WITH(bra.forward(x, w1), Contains("BiLevelRoutingAttention") &&
                                              Contains("'qkv_weight'") &&
                                              Contains("[3C=32, C=16]") && Contains("3C=48"));
  auto w2 = w;
  w2.wo_weight = wo_bad;
  REQUIRE_THROWS_WITH(bra.forward(x, w2), Contains("'wo_weight'") && Contains("[C=16, C=8]"));
  auto w3 = w;
  w3.lepe_weight = lepe_bad.view<4>();
  REQUIRE_THROWS_WITH(bra.forward(x, w3),
                      Contains("'lepe_weight'") && Contains("k=5") && Contains("k=3"));
  auto w4 = w;
  w4.qkv_bias = bias_bad;
  REQUIRE_THROWS_WITH(bra.forward(x, w4), Contains("'qkv_bias'") && Contains("[3C=47]"));
  // out of the wrong shape
  Tensor<float> out_bad({1, 4, 4, 8});
  REQUIRE_THROWS_WITH(bra.forward(x, w, out_bad.view<4>()),
                      Contains("'out'") && Contains("[N=1, H=4, W=4, C=8]"));
  // a plan from another shape, or with a region out of range
  auto plan = bra.route(x, w);
  Tensor<float> y({1, 4, 4, 16});
  const auto x8 = random_image<float>(1, 8, 8, 16, 3);
  Tensor<float> y8({1, 8, 8, 16});
  REQUIRE_THROWS_WITH(bra.execute(plan, x8, w, y8.view<4>()),
                      Contains("BiLevelRoutingAttention::execute") && Contains("'plan'"));
  plan.r_idx[0] = 4;
  REQUIRE_THROWS_WITH(bra.execute(plan, x, w, y.view<4>()), Contains("'plan'"));
}

TEST_CASE("bra: token plan = region pixels attending to routed regions' pixels in r_idx order",
          "[bra][plan]") {
  const BiLevelRoutingConfig cfg{
      .dim = 8, .num_heads = 2, .n_win = 2, .topk = 2, .side_dwconv = 0, .auto_pad = true};
  const Model<float> m(8, 0, 9);
  const auto x = random_image<float>(2, 3, 4, 8, 10);  // pads to 4 x 4: 2x2-pixel regions
  const BiLevelRoutingAttention<float> bra(cfg);
  const auto plan = bra.route(x, m.views());
  const AttentionPlan ap = bra.token_plan(plan);
  REQUIRE(ap.num_groups() == 2 * 4);
  CHECK(ap.batch == 2);
  CHECK(ap.heads == 2);
  CHECK(ap.num_queries == 16);
  CHECK(ap.num_keys == 16);
  ap.check();
  // region r = j*2 + i covers padded pixels (2j + a) * 4 + 2i + b, row-major
  const auto pixels = [](std::int64_t r) {
    const std::int64_t j = r / 2, i = r % 2;
    return std::vector<std::int64_t>{(2 * j) * 4 + 2 * i, (2 * j) * 4 + 2 * i + 1,
                                     (2 * j + 1) * 4 + 2 * i, (2 * j + 1) * 4 + 2 * i + 1};
  };
  for (std::int64_t g = 0; g < ap.num_groups(); ++g) {
    const std::int64_t n = g / 4, r = g % 4;
    CHECK(ap.group_batch[std::size_t(g)] == n);
    CHECK(ap.group_head[std::size_t(g)] == AttentionPlan::all_heads);
    const auto q = ap.queries(g);
    CHECK(std::vector<std::int64_t>(q.begin(), q.end()) == pixels(r));
    std::vector<std::int64_t> want = pixels(plan.routed(n, r, 0));
    const auto second = pixels(plan.routed(n, r, 1));
    want.insert(want.end(), second.begin(), second.end());
    const auto k = ap.keys(g);
    CHECK(std::vector<std::int64_t>(k.begin(), k.end()) == want);
  }
}

TEST_CASE("bra: strided x and out views give the contiguous result", "[bra][views]") {
  const BiLevelRoutingConfig cfg{.dim = 16,
                                 .num_heads = 2,
                                 .n_win = 2,
                                 .topk = 2,
                                 .side_dwconv = 3,
                                 .qk_scale = std::nullopt,
                                 .auto_pad = false};
  const Model<float> m(16, 3, 11);
  const auto wide = random_image<float>(2, 6, 8, 24, 12);  // x = channels [4, 20) of wide
  const ConstView<float, 4> x = wide.view<4>().slice(3, 4, 20);
  Tensor<float> xc({2, 6, 8, 16});
  for (std::int64_t n = 0; n < 2; ++n)
    for (std::int64_t y = 0; y < 6; ++y)
      for (std::int64_t xx = 0; xx < 8; ++xx)
        for (std::int64_t c = 0; c < 16; ++c) xc(n, y, xx, c) = x(n, y, xx, c);
  const BiLevelRoutingAttention<float> bra(cfg);
  const auto want = bra.forward(xc, m.views());
  Tensor<float> out_wide({2, 6, 8, 20});
  const auto out = out_wide.view<4>().slice(3, 2, 18);
  bra.forward(x, m.views(), out);
  bool same = true;
  for (std::int64_t n = 0; n < 2; ++n)
    for (std::int64_t y = 0; y < 6; ++y)
      for (std::int64_t xx = 0; xx < 8; ++xx)
        for (std::int64_t c = 0; c < 16; ++c) same = same && out(n, y, xx, c) == want(n, y, xx, c);
  CHECK(same);
}
