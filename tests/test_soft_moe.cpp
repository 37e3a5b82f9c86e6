// SoftMoELayer (moe/soft_moe.hpp): against a naive double-precision reference of the paper's
// formulas on random inputs (every activation, biases, normalize on and off, S = 1, E = 1,
// m = 1, odd sizes, several token and slot tiles, float, double and the scalar path), two
// hand-worked cases, properties (permutation equivariance, items independent, dispatch and
// combine weights normalised), bit-identical for 1 and 2 threads, scratch reuse without
// allocation, strided and in-place views, m = 0, flops() and every documented error.
#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "support/compare.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/experts.hpp"
#include "switchyard/moe/soft_moe.hpp"

// Counting operator new: the no-allocation tests read g_allocs while g_counting is set.
#include "support/alloc_counter.hpp"
#include "support/moe_experts.hpp"

namespace {

using namespace switchyard;
using Catch::Matchers::Contains;
using moe::Activation;
using test_support::max_abs;
using test_support::OwnedExperts;
using test_support::random_experts;
using test_support::random_tensor;
using test_support::ref_expert;
using test_support::to_double;

/// The paper's formulas with plain loops in double: y [B, m, d], D and C [B, m, n].
struct RefSoft {
  std::vector<double> y, D, C;
};

template <class T>
RefSoft ref_soft_moe(const Tensor<T>& x, const Tensor<T>& phi, const OwnedExperts<T>& ex,
                     Activation act, std::int64_t S, bool normalize, double scale) {
  const std::int64_t B = x.extent(0), m = x.extent(1), d = x.extent(2), n = phi.extent(1);
  RefSoft r;
  r.y.assign(std::size_t(B * m * d), 0.0);
  r.D.assign(std::size_t(B * m * n), 0.0);
  r.C.assign(std::size_t(B * m * n), 0.0);
  // phi columns, normalised and scaled when asked: v / sqrt(|v|^2 + 1e-6).
  std::vector<double> ph(std::size_t(d * n));
  for (std::int64_t j = 0; j < n; ++j) {
    double ss = 0;
    for (std::int64_t p = 0; p < d; ++p) ss += double(phi(p, j)) * double(phi(p, j));
    const double f = normalize ? scale / std::sqrt(ss + 1e-6) : 1.0;
    for (std::int64_t p = 0; p < d; ++p) ph[p * n + j] = double(phi(p, j)) * f;
  }
  for (std::int64_t b = 0; b < B; ++b) {
    std::vector<double> L(std::size_t(m * n));
    for (std::int64_t t = 0; t < m; ++t) {
      double ss = 0;
      for (std::int64_t p = 0; p < d; ++p) ss += double(x(b, t, p)) * double(x(b, t, p));
      const double f = normalize ? 1.0 / std::sqrt(ss + 1e-6) : 1.0;
      for (std::int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (std::int64_t p = 0; p < d; ++p) s += double(x(b, t, p)) * f * ph[p * n + j];
        L[t * n + j] = s;
      }
    }
    double* D = r.D.data() + b * m * n;
    double* C = r.C.data() + b * m * n;
    for (std::int64_t j = 0; j < n; ++j) {  // softmax over tokens
      double mx = -1e300, z = 0;
      for (std::int64_t t = 0; t < m; ++t) mx = std::max(mx, L[t * n + j]);
      for (std::int64_t t = 0; t < m; ++t) z += std::exp(L[t * n + j] - mx);
      for (std::int64_t t = 0; t < m; ++t) D[t * n + j] = std::exp(L[t * n + j] - mx) / z;
    }
    for (std::int64_t t = 0; t < m; ++t) {  // softmax over slots
      double mx = -1e300, z = 0;
      for (std::int64_t j = 0; j < n; ++j) mx = std::max(mx, L[t * n + j]);
      for (std::int64_t j = 0; j < n; ++j) z += std::exp(L[t * n + j] - mx);
      for (std::int64_t j = 0; j < n; ++j) C[t * n + j] = std::exp(L[t * n + j] - mx) / z;
    }
    std::vector<std::vector<double>> Y(static_cast<std::size_t>(n));
    for (std::int64_t j = 0; j < n; ++j) {
      std::vector<double> xs(std::size_t(d), 0.0);
      for (std::int64_t t = 0; t < m; ++t)
        for (std::int64_t p = 0; p < d; ++p) xs[p] += D[t * n + j] * double(x(b, t, p));
      Y[j] = ref_expert(ex, j / S, act, /*out_softmax=*/false, xs);
    }
    for (std::int64_t t = 0; t < m; ++t)
      for (std::int64_t j = 0; j < n; ++j)
        for (std::int64_t p = 0; p < d; ++p) r.y[(b * m + t) * d + p] += C[t * n + j] * Y[j][p];
  }
  return r;
}

/// max |got - want| / max |want|: the error relative to the output's scale (entries near 0
/// are cancellations of terms of that scale, so an entry-wise relative error would mislead).
double scaled_err(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  double e = 0;
  for (std::size_t i = 0; i < got.size(); ++i) e = std::max(e, std::abs(got[i] - want[i]));
  return e / std::max(max_abs(want), 1e-300);
}

struct Shape6 {
  std::int64_t B, m, d, F, E, S;
};

// Float accumulates each output in float over sums of up to max(d, m, n, F) <= 200 products
// through four stages (logits, dispatch, expert FFN, combine) and two exps: with unit roundoff
// 6e-8 and random-walk growth sqrt(200) ~ 14 per stage that is ~4 * 14 * 6e-8 ~ 3e-6 of the
// output scale at worst; the largest seen over these cases is 3.6e-7. Double: 1.1e-15 seen.
template <class T>
constexpr double tolerance = sizeof(T) == 4 ? 1e-5 : 1e-12;

template <class T, class Arch = simd::default_arch>
void check_against_reference(const Shape6& s, Activation act, bool biases, bool normalize,
                             std::uint32_t seed) {
  CAPTURE(s.B, s.m, s.d, s.F, s.E, s.S, moe::activation_name(act), biases, normalize);
  const std::int64_t n = s.E * s.S;
  const Tensor<T> x = random_tensor<T>({s.B, s.m, s.d}, seed);
  const Tensor<T> phi = random_tensor<T>({s.d, n}, seed + 10, 1.0 / std::sqrt(double(s.d)));
  const auto ex = random_experts<T>(s.E, s.d, s.F, act, biases, seed + 20);
  const double scale = normalize ? 2.5 : 1.0;
  moe::SoftMoELayer<T, Arch> layer({.d_model = s.d,
                                    .d_ff = s.F,
                                    .num_experts = s.E,
                                    .slots_per_expert = s.S,
                                    .activation = act,
                                    .normalize = normalize});
  const moe::SoftMoEWeights<T> w{phi, ex.view(), T(scale)};
  moe::SoftMoERouting<T> routing;
  const Tensor<T> y = layer.forward(x, w, &routing);
  const RefSoft ref = ref_soft_moe(x, phi, ex, act, s.S, normalize, scale);
  REQUIRE(y.extent(0) == s.B);
  REQUIRE(y.extent(1) == s.m);
  REQUIRE(y.extent(2) == s.d);
  REQUIRE(max_abs(ref.y) > 0);
  const double err = scaled_err(to_double(y), ref.y);
  CAPTURE(err);
  REQUIRE(err < tolerance<T>);
  // The weights are probabilities: compare absolutely.
  REQUIRE(scaled_err(to_double(routing.dispatch), ref.D) * max_abs(ref.D) < tolerance<T>);
  REQUIRE(scaled_err(to_double(routing.combine), ref.C) * max_abs(ref.C) < tolerance<T>);
}

const std::vector<Shape6> kShapes = {
    {1, 1, 5, 7, 3, 2},      // m = 1: every slot is the one token
    {1, 7, 13, 9, 1, 1},     // E = 1, S = 1: one slot, combine weights all 1
    {2, 5, 8, 12, 3, 2},     // two items
    {3, 33, 17, 20, 4, 1},   // S = 1, odd sizes
    {2, 100, 24, 40, 2, 3},  // m > row_tile: two token tiles per item
    {1, 11, 16, 8, 40, 3},   // n = 120 > row_tile: two slot tiles; more slots than tokens
    {1, 130, 9, 5, 1, 7},    // E = 1 with several slots, two token tiles
};

TEMPLATE_TEST_CASE("SoftMoELayer matches a naive double reference", "[moe][soft_moe]", float,
                   double) {
  std::uint32_t seed = 100;
  for (const Shape6& s : kShapes) {
    for (Activation act : {Activation::swiglu, Activation::gelu, Activation::relu}) {
      for (bool normalize : {false, true}) {
        check_against_reference<TestType>(s, act, /*biases=*/act != Activation::relu, normalize,
                                          seed);
        seed += 37;
      }
    }
  }
}

TEST_CASE("SoftMoELayer: the scalar path matches the reference too", "[moe][soft_moe]") {
  std::uint32_t seed = 900;
  for (const Shape6& s : {Shape6{2, 19, 10, 6, 3, 2}, Shape6{1, 100, 7, 9, 2, 1}}) {
    for (bool normalize : {false, true}) {
      check_against_reference<float, simd::scalar>(s, Activation::swiglu, true, normalize, seed);
      check_against_reference<double, simd::scalar>(s, Activation::gelu, false, normalize, seed);
      seed += 11;
    }
  }
}

TEST_CASE("SoftMoELayer: hand-worked tiny cases", "[moe][soft_moe]") {
  // d = 2, F = 2, ReLU expert with w1 = w2 = identity: expert(v) = relu(v).
  const float eye[] = {1, 0, 0, 1};
  moe::ExpertWeights<float> ex;
  ex.w1 = ConstView<float, 3>(eye, {1, 2, 2});
  ex.w2 = ConstView<float, 3>(eye, {1, 2, 2});
  const float ln3 = std::log(3.0f);
  // Tokens x0 = (ln 3, 4), x1 = (0, -8).
  const float xv[] = {ln3, 4, 0, -8};
  const ConstView<float, 3> x(xv, {1, 2, 2});

  SECTION("m = 2, E = 1, S = 1") {
    // phi = (1, 0): logits = x[t][0] = (ln 3, 0). Dispatch over tokens: softmax(ln 3, 0) =
    // (3/4, 1/4), so X~ = 3/4 x0 + 1/4 x1 = (3/4 ln 3, 3 - 2) = (0.75 ln 3, 1); relu keeps it.
    // One slot: combine weights are 1, so both tokens output (0.75 ln 3, 1).
    const float phiv[] = {1, 0};
    moe::SoftMoELayer<float> layer(
        {.d_model = 2, .d_ff = 2, .num_experts = 1, .activation = Activation::relu});
    moe::SoftMoERouting<float> r;
    const Tensor<float> y = layer.forward(x, {ConstView<float, 2>(phiv, {2, 1}), ex}, &r);
    for (int t = 0; t < 2; ++t) {
      CHECK(y(0, t, 0) == Approx(0.75 * std::log(3.0)).epsilon(1e-6));
      CHECK(y(0, t, 1) == Approx(1.0).epsilon(1e-6));
      CHECK(r.combine(0, t, 0) == 1.0f);
    }
    CHECK(r.dispatch(0, 0, 0) == Approx(0.75).epsilon(1e-6));
    CHECK(r.dispatch(0, 1, 0) == Approx(0.25).epsilon(1e-6));
  }

  SECTION("m = 2, E = 1, S = 2: combine mixes two slots") {
    // phi columns (1, 0) and (-1, 0): logits t0 = (ln 3, -ln 3), t1 = (0, 0).
    // Dispatch: slot 0 softmax(ln 3, 0) = (3/4, 1/4), slot 1 softmax(-ln 3, 0) = (1/4, 3/4).
    // X~0 = (0.75 ln 3, 3 - 2) = (0.75 ln 3, 1);  X~1 = (0.25 ln 3, 1 - 6) = (0.25 ln 3, -5).
    // relu: Y~0 = (0.75 ln 3, 1), Y~1 = (0.25 ln 3, 0).
    // Combine: t0 softmax(ln 3, -ln 3) = (3, 1/3) / (10/3) = (0.9, 0.1); t1 (0.5, 0.5).
    // y0 = 0.9 Y~0 + 0.1 Y~1 = (0.7 ln 3, 0.9);  y1 = 0.5 (Y~0 + Y~1) = (0.5 ln 3, 0.5).
    const float phiv[] = {1, -1, 0, 0};  // [d = 2, n = 2]
    moe::SoftMoELayer<float> layer({.d_model = 2,
                                    .d_ff = 2,
                                    .num_experts = 1,
                                    .slots_per_expert = 2,
                                    .activation = Activation::relu});
    moe::SoftMoERouting<float> r;
    const Tensor<float> y = layer.forward(x, {ConstView<float, 2>(phiv, {2, 2}), ex}, &r);
    const double l3 = std::log(3.0);
    CHECK(y(0, 0, 0) == Approx(0.7 * l3).epsilon(1e-6));
    CHECK(y(0, 0, 1) == Approx(0.9).epsilon(1e-6));
    CHECK(y(0, 1, 0) == Approx(0.5 * l3).epsilon(1e-6));
    CHECK(y(0, 1, 1) == Approx(0.5).epsilon(1e-6));
    CHECK(r.combine(0, 0, 0) == Approx(0.9).epsilon(1e-6));
    CHECK(r.combine(0, 0, 1) == Approx(0.1).epsilon(1e-6));
    CHECK(r.dispatch(0, 0, 1) == Approx(0.25).epsilon(1e-6));
    CHECK(r.dispatch(0, 1, 1) == Approx(0.75).epsilon(1e-6));
  }
}

/// A layer, weights and input for the property tests.
struct Setup {
  std::int64_t B = 2, m = 37, d = 12, F = 20, E = 3, S = 2;
  Tensor<float> x, phi;
  OwnedExperts<float> ex;
  explicit Setup(std::uint32_t seed, std::int64_t B_ = 2, std::int64_t m_ = 37) : B(B_), m(m_) {
    x = random_tensor<float>({B, m, d}, seed);
    phi = random_tensor<float>({d, E * S}, seed + 1, 0.6);
    ex = random_experts<float>(E, d, F, Activation::swiglu, true, seed + 2);
  }
  moe::SoftMoELayer<float> layer(bool normalize = false) const {
    return moe::SoftMoELayer<float>(
        {.d_model = d, .d_ff = F, .num_experts = E, .slots_per_expert = S, .normalize = normalize});
  }
  moe::SoftMoEWeights<float> weights() const { return {phi, ex.view(), 1.5f}; }
};

TEST_CASE("SoftMoELayer: permuting an item's tokens permutes its output", "[moe][soft_moe]") {
  for (bool normalize : {false, true}) {
    CAPTURE(normalize);
    const Setup s(7);
    const auto layer = s.layer(normalize);
    const Tensor<float> y = layer.forward(s.x, s.weights());
    // A fixed random permutation of each item's tokens.
    std::vector<std::int64_t> perm(static_cast<std::size_t>(s.m));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), std::mt19937(3));
    REQUIRE(perm[0] != 0);
    Tensor<float> xp({s.B, s.m, s.d});
    for (std::int64_t b = 0; b < s.B; ++b)
      for (std::int64_t t = 0; t < s.m; ++t)
        for (std::int64_t p = 0; p < s.d; ++p) xp(b, t, p) = s.x(b, perm[t], p);
    const Tensor<float> yp = layer.forward(xp, s.weights());
    // Equal up to the order of the sums over tokens (float rounding).
    double err = 0, scale = max_abs(to_double(y));
    for (std::int64_t b = 0; b < s.B; ++b)
      for (std::int64_t t = 0; t < s.m; ++t)
        for (std::int64_t p = 0; p < s.d; ++p)
          err = std::max(err, std::abs(double(yp(b, t, p)) - double(y(b, perm[t], p))));
    CHECK(err < 1e-5 * scale);
    // Permuting within one item is not permuting across items: the other item's output does
    // not move. Swapping two tokens across items does change outputs.
    Tensor<float> xs = s.x;
    for (std::int64_t p = 0; p < s.d; ++p) std::swap(xs(0, 0, p), xs(1, 0, p));
    const Tensor<float> ys = layer.forward(xs, s.weights());
    double moved = 0;
    for (std::int64_t t = 1; t < s.m; ++t)
      for (std::int64_t p = 0; p < s.d; ++p)
        moved = std::max(moved, std::abs(double(ys(0, t, p)) - double(y(0, t, p))));
    CHECK(moved > 1e-4 * scale);
  }
}

TEST_CASE("SoftMoELayer: items are independent groups, bit for bit", "[moe][soft_moe]") {
  // Item 1 changes; item 0's output keeps its bits (its routing, slots and expert rows depend
  // on its own tokens only), and equals item 0 run alone.
  const Setup s(21, 3, 50);
  const auto layer = s.layer(true);
  const Tensor<float> y = layer.forward(s.x, s.weights());
  Tensor<float> x2 = s.x;
  for (std::int64_t t = 0; t < s.m; ++t)
    for (std::int64_t p = 0; p < s.d; ++p) x2(1, t, p) = -2.0f * x2(1, t, p) + 0.25f;
  const Tensor<float> y2 = layer.forward(x2, s.weights());
  const std::size_t item = sizeof(float) * std::size_t(s.m * s.d);
  REQUIRE(std::memcmp(y.data(), y2.data(), item) == 0);
  REQUIRE(std::memcmp(y.data() + 2 * s.m * s.d, y2.data() + 2 * s.m * s.d, item) == 0);
  REQUIRE(std::memcmp(y.data() + s.m * s.d, y2.data() + s.m * s.d, item) != 0);
  const Tensor<float> y0 = layer.forward(s.x.view<3>().slice(0, 0, 1), s.weights());
  REQUIRE(std::memcmp(y.data(), y0.data(), item) == 0);
}

TEST_CASE("SoftMoELayer: dispatch weights sum to 1 over tokens, combine weights over slots",
          "[moe][soft_moe]") {
  for (bool normalize : {false, true}) {
    const Setup s(33, 2, 120);
    const auto layer = s.layer(normalize);
    moe::SoftMoERouting<float> r;
    layer.forward(s.x, s.weights(), &r);
    const std::int64_t n = s.E * s.S;
    REQUIRE(r.dispatch.extent(0) == s.B);
    REQUIRE(r.dispatch.extent(1) == s.m);
    REQUIRE(r.dispatch.extent(2) == n);
    for (std::int64_t b = 0; b < s.B; ++b) {
      for (std::int64_t j = 0; j < n; ++j) {
        double sum = 0;
        for (std::int64_t t = 0; t < s.m; ++t) {
          REQUIRE(r.dispatch(b, t, j) >= 0.0f);
          sum += r.dispatch(b, t, j);
        }
        CHECK(sum == Approx(1.0).epsilon(1e-5));
      }
      for (std::int64_t t = 0; t < s.m; ++t) {
        double sum = 0;
        for (std::int64_t j = 0; j < n; ++j) {
          REQUIRE(r.combine(b, t, j) >= 0.0f);
          sum += r.combine(b, t, j);
        }
        CHECK(sum == Approx(1.0).epsilon(1e-5));
      }
    }
  }
}

TEST_CASE("SoftMoELayer gives the same bits for 1 and 2 threads", "[moe][soft_moe][threads]") {
  // Two items of 200 tokens (three token tiles each), n = 2 * 60 = 120 slots (two slot tiles),
  // 240 slot rows through the experts (their prefill path).
  for (bool normalize : {false, true}) {
    CAPTURE(normalize);
    const std::int64_t B = 2, m = 200, d = 24, F = 32, E = 2, S = 60, n = E * S;
    const Tensor<float> x = random_tensor<float>({B, m, d}, 41);
    const Tensor<float> phi = random_tensor<float>({d, n}, 42, 0.3);
    const auto ex = random_experts<float>(E, d, F, Activation::gelu, true, 43);
    moe::SoftMoELayer<float> layer({.d_model = d,
                                    .d_ff = F,
                                    .num_experts = E,
                                    .slots_per_expert = S,
                                    .activation = Activation::gelu,
                                    .normalize = normalize});
    const moe::SoftMoEWeights<float> w{phi, ex.view(), 0.75f};
    Tensor<float> y1, y2;
    moe::SoftMoERouting<float> r1, r2;
    {
      ScopedNumThreads one(1);
      y1 = layer.forward(x, w, &r1);
    }
    {
      ScopedNumThreads two(2);
      y2 = layer.forward(x, w, &r2);
    }
    const std::size_t bytes = sizeof(float) * std::size_t(B * m * d);
    const std::size_t rbytes = sizeof(float) * std::size_t(B * m * n);
    REQUIRE(std::memcmp(y1.data(), y2.data(), bytes) == 0);
    REQUIRE(std::memcmp(r1.dispatch.data(), r2.dispatch.data(), rbytes) == 0);
    REQUIRE(std::memcmp(r1.combine.data(), r2.combine.data(), rbytes) == 0);
    REQUIRE(max_abs(to_double(y1)) > 0);
  }
}

TEST_CASE("SoftMoELayer: a warm scratch is reused without allocating", "[moe][soft_moe]") {
  const Setup s(55, 2, 100);
  const auto layer = s.layer(true);
  const auto w = s.weights();
  const Tensor<float> want = layer.forward(s.x, w);
  moe::SoftMoEScratch<float> scratch;
  Tensor<float> y({s.B, s.m, s.d});
  layer.forward(s.x, w, y, scratch);  // grows the scratch
  REQUIRE(scratch.capacity_bytes() >= layer.workspace_bytes(s.B, s.m));
  std::fill(y.begin(), y.end(), 0.0f);
  g_allocs = 0;
  g_counting = true;
  layer.forward(s.x, w, y.view<3>(), scratch);
  g_counting = false;
  CHECK(g_allocs.load() == 0);
  REQUIRE(std::memcmp(y.data(), want.data(), sizeof(float) * std::size_t(y.numel())) == 0);
  // A different batch size with the same scratch (the experts' plan is rebuilt), then back.
  const ConstView<float, 3> one = s.x.view<3>().slice(0, 1, 2);
  Tensor<float> y1({1, s.m, s.d});
  layer.forward(one, w, y1, scratch);
  REQUIRE(std::memcmp(y1.data(), want.data() + s.m * s.d, sizeof(float) * std::size_t(s.m * s.d)) ==
          0);
  layer.forward(s.x, w, y, scratch);
  REQUIRE(std::memcmp(y.data(), want.data(), sizeof(float) * std::size_t(y.numel())) == 0);
  // A scratch shared with a layer of another slot layout (same E * S rows) is rebuilt too.
  moe::SoftMoELayer<float> other({.d_model = s.d,
                                  .d_ff = s.F,
                                  .num_experts = s.E * s.S,
                                  .slots_per_expert = 1,
                                  .normalize = true});
  const auto ex6 = random_experts<float>(s.E * s.S, s.d, s.F, Activation::swiglu, true, 9);
  const moe::SoftMoEWeights<float> w6{s.phi, ex6.view(), 1.5f};
  Tensor<float> yo({s.B, s.m, s.d});
  other.forward(s.x, w6, yo, scratch);
  const Tensor<float> yo_want = other.forward(s.x, w6);
  REQUIRE(std::memcmp(yo.data(), yo_want.data(), sizeof(float) * std::size_t(yo.numel())) == 0);
}

TEST_CASE("SoftMoELayer accepts strided views and out = x in place", "[moe][soft_moe]") {
  const Setup s(61, 2, 30);
  const auto layer = s.layer(true);
  const Tensor<float> want = layer.forward(s.x, s.weights());
  // x as every other element of a wider buffer, phi transposed ([n, d] storage), out strided.
  const std::int64_t B = s.B, m = s.m, d = s.d, n = s.E * s.S;
  Tensor<float> wide({B, m, 2 * d});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < m; ++t)
      for (std::int64_t p = 0; p < d; ++p) wide(b, t, 2 * p + 1) = s.x(b, t, p);
  const ConstView<float, 3> xv(wide.data() + 1, {B, m, d}, {m * 2 * d, 2 * d, 2});
  Tensor<float> phit({n, d});
  for (std::int64_t p = 0; p < d; ++p)
    for (std::int64_t j = 0; j < n; ++j) phit(j, p) = s.phi(p, j);
  moe::SoftMoEWeights<float> w = s.weights();
  w.phi = ConstView<float, 2>(phit.data(), {d, n}, {1, d});
  Tensor<float> outbuf({m, B, d});  // out[b, t] at outbuf[t, b]
  const View<float, 3> out(outbuf.data(), {B, m, d}, {d, B * d, 1});
  layer.forward(xv, w, out);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < m; ++t)
      for (std::int64_t p = 0; p < d; ++p) REQUIRE(out(b, t, p) == want(b, t, p));
  // In place: out is x itself.
  Tensor<float> xin = s.x;
  layer.forward(xin, s.weights(), xin.view<3>());
  REQUIRE(std::memcmp(xin.data(), want.data(), sizeof(float) * std::size_t(want.numel())) == 0);
}

TEST_CASE("SoftMoELayer with m = 0 or B = 0 returns an empty output", "[moe][soft_moe]") {
  const Setup s(71);
  const auto layer = s.layer();
  for (auto shape : {Shape<3>{2, 0, 12}, Shape<3>{0, 5, 12}}) {
    const Tensor<float> x(shape);
    moe::SoftMoERouting<float> r;
    const Tensor<float> y = layer.forward(x, s.weights(), &r);
    REQUIRE(y.extent(0) == shape[0]);
    REQUIRE(y.extent(1) == shape[1]);
    REQUIRE(y.extent(2) == 12);
    REQUIRE(r.dispatch.numel() == 0);
    REQUIRE(r.combine.extent(2) == s.E * s.S);
    REQUIRE(layer.workspace_bytes(shape[0], shape[1]) == 0);
  }
}

TEST_CASE("SoftMoELayer::flops counts the routing GEMMs and the experts", "[moe][soft_moe]") {
  // d = 4, F = 8, E = 2, S = 3 (n = 6), swiglu: experts 6 * 2 * 4 * 8 * 3 = 1152 per item;
  // routing 6 * m * n * d = 6 * 5 * 6 * 4 = 720 for m = 5.
  moe::SoftMoELayer<float> l({.d_model = 4, .d_ff = 8, .num_experts = 2, .slots_per_expert = 3});
  CHECK(l.num_slots() == 6);
  CHECK(l.expert_flops() == 1152);
  CHECK(l.flops(5) == 1872);
  CHECK(l.flops(5, 3) == 3 * 1872);
  moe::SoftMoELayer<float> g({.d_model = 4,
                              .d_ff = 8,
                              .num_experts = 2,
                              .slots_per_expert = 3,
                              .activation = Activation::gelu});
  CHECK(g.expert_flops(2) == 2 * 768);
}

TEST_CASE("SoftMoELayer errors name the layer, the argument and the shapes",
          "[moe][soft_moe][errors]") {
  const Setup s(81);
  const auto layer = s.layer(true);
  const auto w = s.weights();
  using L = moe::SoftMoELayer<float>;

  SECTION("config") {
    REQUIRE_THROWS_AS(L({.d_model = 0, .d_ff = 4, .num_experts = 2}), config_error);
    REQUIRE_THROWS_WITH(L({.d_model = 0, .d_ff = 4, .num_experts = 2}),
                        Contains("SoftMoELayer") && Contains("d_model"));
    REQUIRE_THROWS_AS(L({.d_model = 4, .d_ff = 0, .num_experts = 2}), config_error);
    REQUIRE_THROWS_WITH(L({.d_model = 4, .d_ff = 0, .num_experts = 2}), Contains("d_ff"));
    REQUIRE_THROWS_AS(L({.d_model = 4, .d_ff = 4, .num_experts = 0}), config_error);
    REQUIRE_THROWS_WITH(L({.d_model = 4, .d_ff = 4, .num_experts = 0}), Contains("num_experts"));
    REQUIRE_THROWS_AS(L({.d_model = 4, .d_ff = 4, .num_experts = 2, .slots_per_expert = 0}),
                      config_error);
    REQUIRE_THROWS_WITH(L({.d_model = 4, .d_ff = 4, .num_experts = 2, .slots_per_expert = 0}),
                        Contains("SoftMoELayer") && Contains("slots_per_expert"));
    REQUIRE_THROWS_WITH(
        L({.d_model = 4, .d_ff = 4, .num_experts = 2, .activation = static_cast<Activation>(9)}),
        Contains("activation"));
    // E * S overflows int64; E * S past the int32 plan tokens; d * E * S past max_buffer_bytes.
    REQUIRE_THROWS_AS(L({.d_model = 4,
                         .d_ff = 4,
                         .num_experts = std::int64_t(1) << 40,
                         .slots_per_expert = std::int64_t(1) << 40}),
                      config_error);
    REQUIRE_THROWS_WITH(
        L({.d_model = 4,
           .d_ff = 4,
           .num_experts = std::int64_t(1) << 20,
           .slots_per_expert = std::int64_t(1) << 12}),
        Contains("SoftMoELayer") && Contains("slots_per_expert") && Contains("2^31 - 1"));
    REQUIRE_THROWS_AS(L({.d_model = std::int64_t(1) << 30, .d_ff = 4, .num_experts = 1 << 12}),
                      config_error);
    REQUIRE_THROWS_WITH(
        L({.d_model = std::int64_t(1) << 30, .d_ff = std::int64_t(1) << 30, .num_experts = 1}),
        Contains("d_ff"));
  }

  SECTION("x and out shapes, aliasing") {
    const Tensor<float> xbad({2, 5, 11});
    REQUIRE_THROWS_AS(layer.forward(xbad, w), shape_error);
    REQUIRE_THROWS_WITH(layer.forward(xbad, w),
                        Contains("SoftMoELayer::forward") && Contains("'x'") &&
                            Contains("[B=2, m=5, D=11]") && Contains("D=12"));
    Tensor<float> out({2, 36, 12});
    REQUIRE_THROWS_AS(layer.forward(s.x, w, out.view<3>()), shape_error);
    REQUIRE_THROWS_WITH(layer.forward(s.x, w, out.view<3>()),
                        Contains("'out'") && Contains("m=36") && Contains("m=37"));
    // out overlapping x without being x: shifted by one token.
    Tensor<float> buf({2 * 37 * 12 + 12});
    const View<float, 3> xa(buf.data(), {2, 37, 12});
    const View<float, 3> oa(buf.data() + 12, {2, 37, 12});
    REQUIRE_THROWS_AS(layer.forward(xa, w, oa), shape_error);
    REQUIRE_THROWS_WITH(layer.forward(xa, w, oa),
                        Contains("SoftMoELayer") && Contains("'out'") && Contains("'x'"));
  }

  SECTION("weights") {
    moe::SoftMoEWeights<float> bad = w;
    const Tensor<float> phi5({12, 5});
    bad.phi = phi5;
    REQUIRE_THROWS_AS(layer.forward(s.x, bad), shape_error);
    REQUIRE_THROWS_WITH(layer.forward(s.x, bad), Contains("SoftMoELayer") && Contains("'phi'") &&
                                                     Contains("n=5") && Contains("n=6"));
    bad = w;
    const Tensor<float> w1({3, 20, 11});
    bad.experts.w1 = w1;
    REQUIRE_THROWS_AS(layer.forward(s.x, bad), shape_error);
    REQUIRE_THROWS_WITH(layer.forward(s.x, bad), Contains("'experts.w1'") && Contains("D=11"));
    bad = w;
    bad.experts.w3 = {};
    REQUIRE_THROWS_WITH(layer.forward(s.x, bad), Contains("'experts.w3'"));
    bad = w;
    const Tensor<float> b2({3, 13});
    bad.experts.b2 = b2;
    REQUIRE_THROWS_WITH(layer.forward(s.x, bad), Contains("'experts.b2'"));
  }

  SECTION("scale") {
    moe::SoftMoEWeights<float> bad = w;
    bad.scale = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_THROWS_AS(layer.forward(s.x, bad), config_error);
    REQUIRE_THROWS_WITH(layer.forward(s.x, bad),
                        Contains("SoftMoELayer::forward") && Contains("'scale'"));
    bad.scale = std::numeric_limits<float>::infinity();
    REQUIRE_THROWS_AS(layer.forward(s.x, bad), config_error);
    // Without normalize the scale is not used, so it is not checked.
    bad.scale = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_NOTHROW(s.layer(false).forward(s.x, bad));
  }

  SECTION("sizes that overflow") {
    // Stride-0 views claim many tokens cheaply. d = 1 and n = 64 slots: x [1, 2^36, 1] is
    // 2^38 bytes (accepted), its logits [1, 2^36, 64] 2^44 bytes (past max_buffer_bytes).
    const float zero[12] = {};
    const auto ex64 = random_experts<float>(64, 1, 2, Activation::relu, false, 5);
    const Tensor<float> phi64({1, 64});
    const moe::SoftMoEWeights<float> w64{phi64, ex64.view()};
    const L wide({.d_model = 1, .d_ff = 2, .num_experts = 64, .activation = Activation::relu});
    const ConstView<float, 3> huge(zero, {1, std::int64_t(1) << 36, 1}, {0, 0, 1});
    moe::SoftMoEScratch<float> scratch;
    const View<float, 3> out(nullptr, {1, std::int64_t(1) << 36, 1}, {0, 0, 1});
    REQUIRE_THROWS_AS(wide.forward(huge, w64, out, scratch), shape_error);
    REQUIRE_THROWS_WITH(wide.forward(huge, w64), Contains("SoftMoELayer::forward") &&
                                                     Contains("'logits'") && Contains("overflows"));
    // B * n past the int32 plan tokens: 2^30 items of one token, n = 6.
    const ConstView<float, 3> many(zero, {std::int64_t(1) << 30, 1, 12}, {0, 0, 1});
    REQUIRE_THROWS_WITH(layer.forward(many, w),
                        Contains("SoftMoELayer::forward") && Contains("B * n <= 2147483647"));
    REQUIRE(scratch.capacity_bytes() == 0);
  }
}

}  // namespace
