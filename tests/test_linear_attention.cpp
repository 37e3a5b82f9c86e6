// Linear attention: fixtures from fast-transformers, properties against the
// naive double reference (attention::ref::linear_attention), agreement of the
// chunked, recurrent and quadratic causal forms, causality, key lengths,
// thread-count determinism, FAVOR+ seeding, and every documented error.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "support/fixtures.hpp"
#include "switchyard/attention/linear.hpp"
#include "switchyard/attention/linear_ref.hpp"

using namespace switchyard;
using attention::FeatureMap;
using attention::LinearAttention;
using attention::LinearAttentionConfig;
using Catch::Contains;

namespace {

template <class T>
Tensor<T> random_tensor(std::initializer_list<std::int64_t> shape, std::uint64_t seed,
                        double scale = 1.0) {
  Tensor<T> t(shape);
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> nd(0.0, scale);
  for (auto& x : t) x = static_cast<T>(nd(gen));
  return t;
}

template <class T>
Tensor<double> to_double(const Tensor<T>& t) {
  Tensor<double> d(t.shape());
  std::copy(t.begin(), t.end(), d.begin());
  return d;
}

template <class T>
double max_abs(const Tensor<T>& t) {
  double m = 0;
  for (auto x : t) m = std::max(m, std::abs(double(x)));
  return m;
}

template <class T>
double max_abs_diff(const Tensor<T>& a, const Tensor<double>& b) {
  double m = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(double(a[i]) - b[i]));
  return m;
}

template <class T>
bool bitwise_equal(const Tensor<T>& a, const Tensor<T>& b) {
  return a.numel() == b.numel() && std::memcmp(a.data(), b.data(), a.numel() * sizeof(T)) == 0;
}

// Double reference for a layer's configuration (its own FAVOR+ projection, widened).
template <class T>
Tensor<double> reference(const LinearAttention<T>& layer, const Tensor<T>& q, const Tensor<T>& k,
                         const Tensor<T>& v, bool causal,
                         std::span<const std::int64_t> key_lengths = {}) {
  const auto qd = to_double(q), kd = to_double(k), vd = to_double(v);
  Tensor<double> out({q.extent(0), q.extent(1), q.extent(2), v.extent(3)});
  Tensor<double> omega;
  ConstView<double, 2> om;
  if (const auto* p = layer.projection()) {
    omega = to_double(p->omega);
    om = omega.template view<2>();
  }
  attention::ref::linear_attention<double>(qd, kd, vd, out, layer.config().feature_map,
                                           layer.config().eps, causal, key_lengths, om);
  return out;
}

// Forward error bound, from the weights w_ij = phi(q_i).phi(k_j) >= 0 (every map is
// non-negative): a feature carries relative error delta_phi, a weight 2 delta_phi +
// gamma_{D'}, the sums over n keys (however the chunked or recurrent form associates
// them) gamma_{D'+n} more, so |out - ref| <= 2 (2 delta_phi + (D' + n + 2) u) max|v|
// with u the unit roundoff of T. delta_phi: elu+1 4u (exp is within 2 ulp), relu 0,
// FAVOR+ the rounding of its exponent, (D + 3) u max_i (sum_c |w_ic x'_c| + |x'|^2 / 2)
// (the projection is also rounded to T), plus 6u for the exp and scalings.
template <class T>
double error_bound(const LinearAttention<T>& layer, const Tensor<T>& q, const Tensor<T>& k,
                   const Tensor<T>& v) {
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const std::int64_t d = q.extent(3), n = k.extent(1);
  const std::int64_t f = layer.feature_dim(d);
  double delta_phi = 0;
  switch (layer.config().feature_map) {
    case FeatureMap::elu_plus_one:
      delta_phi = 4 * u;
      break;
    case FeatureMap::relu:
      delta_phi = 0;
      break;
    case FeatureMap::favor_plus: {
      const auto& om = layer.projection()->omega;
      const double scale = std::pow(double(d), -0.25);
      double a_max = 0;
      for (const Tensor<T>* x : {&q, &k}) {
        for (std::int64_t r = 0; r < x->numel() / d; ++r) {
          const T* row = x->data() + r * d;
          double sq = 0;
          for (std::int64_t c = 0; c < d; ++c) sq += double(row[c]) * row[c] * scale * scale;
          for (std::int64_t i = 0; i < f; ++i) {
            double s = 0;
            for (std::int64_t c = 0; c < d; ++c) s += std::abs(double(om(i, c)) * row[c] * scale);
            a_max = std::max(a_max, s + sq / 2);
          }
        }
      }
      delta_phi = double(d + 3) * u * a_max + 6 * u;
      break;
    }
  }
  return 2 * (2 * delta_phi + double(f + n + 2) * u) * max_abs(v);
}

// Token t of a [B, T, H, D] view as a [B, H, D] view (for step).
template <class U>
View<U, 3> token(View<U, 4> x, std::int64_t t) {
  return View<U, 3>(x.data() + t * x.stride(1), {x.extent(0), x.extent(2), x.extent(3)},
                    {x.stride(0), x.stride(2), x.stride(3)});
}
template <class T>
ConstView<T, 3> token(const Tensor<T>& x, std::int64_t t) {
  return token(x.template view<4>(), t);
}
template <class T>
View<T, 3> token(Tensor<T>& x, std::int64_t t) {
  return token(x.template view<4>(), t);
}

// Runs f(arch) for every architecture this build and CPU allow when `all`, else for
// the scalar path and the default arch only (keeps Debug and sanitizer runs short).
template <class F>
void each_arch(bool all, F&& f) {
  if (all) {
    simd::for_each_arch(f);
    return;
  }
  f(simd::scalar{});
  if constexpr (!simd::is_scalar_v<simd::default_arch>) f(simd::default_arch{});
}

LinearAttentionConfig config_for(FeatureMap fm, std::int64_t head_dim, std::int64_t chunk = 64) {
  LinearAttentionConfig c;
  c.feature_map = fm;
  c.chunk_size = chunk;
  if (fm == FeatureMap::favor_plus) {
    c.head_dim = head_dim;
    c.num_features = 48;
    c.seed = 7;
  }
  return c;
}

}  // namespace

// fast-transformers (idiap/fast-transformers @ 2ad36b97), float32, elu(x) + 1, eps 1e-6.
// Acceptance: max |ours - ref| <= 1e-5 max(1, max |ref|) (the fixture README suggests
// 1e-4; the issue asks for 1e-5). The measured error is printed with -s.
TEST_CASE("linear attention matches fast-transformers' causal fixture", "[linear][fixture]") {
  const auto fx = open_fixture("linear_N2_H2_L100_d32_causal.safetensors");
  const auto q = fx.tensor<float>("q"), k = fx.tensor<float>("k"), v = fx.tensor<float>("v");
  const auto expected = fx.tensor<float>("out");
  REQUIRE(q.extent(0) == 2);
  REQUIRE(q.extent(1) == 100);
  const double tol = 1e-5 * std::max(1.0, max_abs(expected));
  for (const std::int64_t chunk : {1, 16, 64, 100}) {
    CAPTURE(chunk);
    each_arch(chunk == 64, [&](auto arch) {
      using A = decltype(arch);
      CAPTURE(A::name());
      const LinearAttention<float> layer({.chunk_size = chunk});
      Tensor<float> out(q.shape());
      layer.template forward_causal<A>(q, k, v, out);
      const double err = max_abs_diff(out, to_double(expected));
      INFO("causal fixture max |ours - ref| = " << err);
      CHECK(err <= tol);
    });
  }
  simd::for_each_arch([&](auto arch) {
    using A = decltype(arch);
    CAPTURE(A::name());
    // Recurrent decoding of the same sequence.
    const LinearAttention<float> layer;
    Tensor<float> out(q.shape());
    auto state = layer.make_state(2, 2, 32, 32);
    for (std::int64_t t = 0; t < q.extent(1); ++t)
      layer.template step<A>(token(q, t), token(k, t), token(v, t), state, token(out, t));
    const double err = max_abs_diff(out, to_double(expected));
    INFO("causal fixture, recurrent: max |ours - ref| = " << err);
    CHECK(err <= tol);
  });
}

TEST_CASE("linear attention matches fast-transformers' key-length fixture", "[linear][fixture]") {
  const auto fx = open_fixture("linear_N2_H2_L100_d32_noncausal_keylengths.safetensors");
  const auto q = fx.tensor<float>("q"), k = fx.tensor<float>("k"), v = fx.tensor<float>("v");
  const auto expected = fx.tensor<float>("out");
  const auto lengths = fx.tensor<std::int64_t>("key_lengths");
  REQUIRE(lengths.numel() == 2);
  CHECK(lengths[0] == 100);
  CHECK(lengths[1] == 60);
  const std::span<const std::int64_t> lens(lengths.data(), 2);
  const double tol = 1e-5 * std::max(1.0, max_abs(expected));
  const LinearAttention<float> layer;
  simd::for_each_arch([&](auto arch) {
    using A = decltype(arch);
    CAPTURE(A::name());
    Tensor<float> out(q.shape());
    layer.template forward<A>(q, k, v, out, lens);
    const double err = max_abs_diff(out, to_double(expected));
    INFO("key-length fixture max |ours - ref| = " << err);
    CHECK(err <= tol);
    // Without the mask the answer differs: the fixture really exercises key lengths.
    layer.template forward<A>(q, k, v, out);
    CHECK(max_abs_diff(out, to_double(expected)) > 100 * tol);
  });
}

TEST_CASE("linear attention: hand-computed tiny case", "[linear]") {
  // D = Dv = 1, elu+1: phi(0) = 1, phi(1) = 2, phi(-1) = e^-1. q = [0, 1], k = [0, -1], v = [1, 3].
  Tensor<double> q({1, 2, 1, 1}), k({1, 2, 1, 1}), v({1, 2, 1, 1}), out({1, 2, 1, 1});
  q[0] = 0, q[1] = 1, k[0] = 0, k[1] = -1, v[0] = 1, v[1] = 3;
  const double e1 = std::exp(-1.0);
  LinearAttention<double> layer;
  simd::for_each_arch([&](auto arch) {
    using A = decltype(arch);
    CAPTURE(A::name());
    // Non-causal: both queries weight the keys 1 : e^-1 (phi(q) only scales them).
    layer.forward<A>(q, k, v, out);
    CHECK(out[0] == Approx((1 + 3 * e1) / (1 + e1 + 1e-6)).epsilon(1e-14));
    CHECK(out[1] == Approx((2 + 6 * e1) / (2 + 2 * e1 + 1e-6)).epsilon(1e-14));
    // Causal: query 0 sees only key 0 -> 1 / (1 + 1e-6); query 1 sees both.
    layer.forward_causal<A>(q, k, v, out);
    CHECK(out[0] == Approx(1 / (1 + 1e-6)).epsilon(1e-14));
    CHECK(out[1] == Approx((2 + 6 * e1) / (2 + 2 * e1 + 1e-6)).epsilon(1e-14));
  });
  // The reference agrees with the same hand values.
  attention::ref::linear_attention<double>(q, k, v, out, FeatureMap::elu_plus_one, 1e-6, true);
  CHECK(out[0] == Approx(1 / (1 + 1e-6)).epsilon(1e-15));
  CHECK(out[1] == Approx((2 + 6 * e1) / (2 + 2 * e1 + 1e-6)).epsilon(1e-15));
  // relu with k = [2, 1]: phi(q = 0) = 0, so numerator and denominator vanish and
  // 0 / eps = 0, not NaN; query 1 weights the keys 2 : 1.
  k[0] = 2, k[1] = 1;
  LinearAttention<double> relu({.feature_map = FeatureMap::relu});
  relu.forward(q, k, v, out);
  CHECK(out[0] == 0.0);
  CHECK(out[1] == Approx(5 / (3 + 1e-6)).epsilon(1e-14));
}

TEMPLATE_TEST_CASE("linear attention matches the double reference", "[linear]", float, double) {
  using T = TestType;
  const auto fm = GENERATE(FeatureMap::elu_plus_one, FeatureMap::relu, FeatureMap::favor_plus);
  // B, T, S, H, D, Dv: single token, D != Dv, T != S, odd sizes that leave SIMD tails.
  const auto shape = GENERATE(table<int, int, int, int, int, int>({{1, 1, 1, 1, 1, 1},
                                                                   {2, 13, 29, 3, 8, 5},
                                                                   {1, 40, 17, 2, 16, 24},
                                                                   {2, 70, 70, 2, 32, 33},
                                                                   {1, 9, 3, 1, 7, 64}}));
  // Plain variables: clang 14 cannot capture structured bindings in lambdas.
  const std::int64_t nb = std::get<0>(shape), nt = std::get<1>(shape), ns = std::get<2>(shape);
  const std::int64_t nh = std::get<3>(shape), d = std::get<4>(shape), dv = std::get<5>(shape);
  CAPTURE(attention::to_string(fm), nb, nt, ns, nh, d, dv);
  const auto q = random_tensor<T>({nb, nt, nh, d}, 1);
  const auto k = random_tensor<T>({nb, ns, nh, d}, 2);
  const auto v = random_tensor<T>({nb, ns, nh, dv}, 3);
  Tensor<T> out({nb, nt, nh, dv});
  const LinearAttention<T> layer(config_for(fm, d, 7));
  const double bound = error_bound(layer, q, k, v);
  // Key lengths: the last batch item keeps part of its keys (non-causal), the first
  // one part of them (causal).
  std::vector<std::int64_t> lens_nc(nb, ns), lens_c(nb, ns);
  lens_nc.back() = ns / 2;
  lens_c.front() = ns - ns / 3;
  const auto ref = reference(layer, q, k, v, false);
  const auto ref_len = reference(layer, q, k, v, false, lens_nc);
  const bool square = nt == ns;
  const auto ref_c = square ? reference(layer, q, k, v, true) : Tensor<double>();
  const auto ref_c_len = square ? reference(layer, q, k, v, true, lens_c) : Tensor<double>();

  each_arch(nt * ns <= 1000, [&](auto arch) {
    using A = decltype(arch);
    CAPTURE(A::name());
    layer.template forward<A>(q, k, v, out);
    CHECK(max_abs_diff(out, ref) <= bound);
    layer.template forward<A>(q, k, v, out, lens_nc);
    CHECK(max_abs_diff(out, ref_len) <= bound);
    if (square) {
      layer.template forward_causal<A>(q, k, v, out);
      CHECK(max_abs_diff(out, ref_c) <= bound);
      layer.template forward_causal<A>(q, k, v, out, lens_c);
      CHECK(max_abs_diff(out, ref_c_len) <= bound);
    }
  });
}

TEMPLATE_TEST_CASE("causal linear attention: chunked, recurrent and quadratic forms agree",
                   "[linear][causal]", float, double) {
  using T = TestType;
  const auto fm = GENERATE(FeatureMap::elu_plus_one, FeatureMap::relu, FeatureMap::favor_plus);
  const std::int64_t nb = 2, nt = 45, nh = 2, d = 12, dv = 20;
  CAPTURE(attention::to_string(fm));
  const auto q = random_tensor<T>({nb, nt, nh, d}, 11);
  const auto k = random_tensor<T>({nb, nt, nh, d}, 12);
  const auto v = random_tensor<T>({nb, nt, nh, dv}, 13);
  const LinearAttention<T> base(config_for(fm, d));
  const auto ref = reference(base, q, k, v, true);  // the masked quadratic form
  const double bound = error_bound(base, q, k, v);

  // Recurrent: one step per token on an explicit state.
  auto recurrent = [&](auto arch, Tensor<T>& rec) {
    auto state = base.make_state(nb, nh, d, dv);
    for (std::int64_t t = 0; t < nt; ++t)
      base.template step<decltype(arch)>(token(q, t), token(k, t), token(v, t), state,
                                         token(rec, t));
    return state;
  };
  simd::for_each_arch([&](auto arch) {
    CAPTURE(decltype(arch)::name());
    Tensor<T> rec({nb, nt, nh, dv});
    const auto state = recurrent(arch, rec);
    REQUIRE(state.s.extent(2) == base.feature_dim(d));
    CHECK(max_abs_diff(rec, ref) <= bound);
  });
  Tensor<T> rec({nb, nt, nh, dv});
  const auto state = recurrent(simd::default_arch{}, rec);
  // Both forms sum the same n <= T positive (z) or |phi(k)| |v|-weighted (s) terms in
  // different orders: |difference| <= 2 gamma_T max z (max |v| for s).
  const double eps = std::numeric_limits<T>::epsilon();
  const double tol_z = double(nt) * eps * max_abs(state.z);
  const double tol_s = tol_z * max_abs(v);

  // Chunked, for chunk sizes 1, 7 (does not divide T), 64 and > T (one chunk).
  for (const std::int64_t chunk : {1, 7, 64, 100}) {
    CAPTURE(chunk);
    const LinearAttention<T> layer(config_for(fm, d, chunk));
    each_arch(chunk == 7, [&](auto arch) {
      using A = decltype(arch);
      CAPTURE(A::name());
      Tensor<T> out({nb, nt, nh, dv});
      auto end_state = layer.make_state(nb, nh, d, dv);
      layer.template forward_causal<A>(q, k, v, out, {}, &end_state);
      CHECK(max_abs_diff(out, ref) <= bound);
      CHECK(max_abs_diff(out, to_double(rec)) <= 2 * bound);
      // The state left behind is the recurrent state after all T tokens.
      CHECK(max_abs_diff(end_state.s, to_double(state.s)) <= tol_s);
      CHECK(max_abs_diff(end_state.z, to_double(state.z)) <= tol_z);
    });
  }
}

TEST_CASE("causal linear attention: prefill in chunks, then decode step by step", "[linear]") {
  const std::int64_t nb = 1, nt = 30, nh = 3, d = 16, dv = 8, prefix = 19;
  const auto q = random_tensor<float>({nb, nt, nh, d}, 21);
  const auto k = random_tensor<float>({nb, nt, nh, d}, 22);
  const auto v = random_tensor<float>({nb, nt, nh, dv}, 23);
  const LinearAttention<float> layer({.chunk_size = 8});
  const auto ref = reference(layer, q, k, v, true);
  Tensor<float> out({nb, nt, nh, dv});
  auto state = layer.make_state(nb, nh, d, dv);
  const ConstView<float, 4> qv = q, kv = k, vv = v;
  layer.forward_causal(qv.slice(1, 0, prefix), kv.slice(1, 0, prefix), vv.slice(1, 0, prefix),
                       out.view<4>().slice(1, 0, prefix), {}, &state);
  for (std::int64_t t = prefix; t < nt; ++t)
    layer.step(token(q, t), token(k, t), token(v, t), state, token(out, t));
  CHECK(max_abs_diff(out, ref) <= error_bound(layer, q, k, v));
}

TEST_CASE("causal linear attention leaks nothing from the future", "[linear][causal]") {
  const auto fm = GENERATE(FeatureMap::elu_plus_one, FeatureMap::favor_plus);
  const std::int64_t chunk = GENERATE(1, 7, 64);
  CAPTURE(attention::to_string(fm), chunk);
  const std::int64_t nb = 1, nt = 50, nh = 2, d = 8, dv = 8;
  const auto q = random_tensor<float>({nb, nt, nh, d}, 31);
  const auto k = random_tensor<float>({nb, nt, nh, d}, 32);
  const auto v = random_tensor<float>({nb, nt, nh, dv}, 33);
  const LinearAttention<float> layer(config_for(fm, d, chunk));
  simd::for_each_arch([&](auto arch) {
    using A = decltype(arch);
    CAPTURE(A::name());
    Tensor<float> out({nb, nt, nh, dv}), out2({nb, nt, nh, dv});
    layer.template forward_causal<A>(q, k, v, out);
    // Token t* at a chunk start, inside a chunk, and last; changed to other finite
    // values, or to inf / NaN (which would poison any product they entered, even 0 * x).
    for (const bool finite : {true, false}) {
      for (const std::int64_t ts : {0, 7, 20, 49}) {
        CAPTURE(finite, ts);
        auto q2 = q, k2 = k, v2 = v;
        const float big = finite ? 1e4f : std::numeric_limits<float>::infinity();
        const float odd = finite ? -7.0f : std::numeric_limits<float>::quiet_NaN();
        for (std::int64_t h = 0; h < nh; ++h) {
          for (std::int64_t c = 0; c < d; ++c) q2(0, ts, h, c) += 3, k2(0, ts, h, c) = odd;
          for (std::int64_t c = 0; c < dv; ++c) v2(0, ts, h, c) = big;
        }
        layer.template forward_causal<A>(q2, k2, v2, out2);
        const std::int64_t before = ts * nh * dv;  // elements of tokens < t*
        CHECK(std::memcmp(out.data(), out2.data(), before * sizeof(float)) == 0);
        // ... while token t* itself does change (the test can fail).
        CHECK(std::memcmp(out.data() + before, out2.data() + before, nh * dv * sizeof(float)) != 0);
      }
    }
  });
}

TEST_CASE("linear attention: key lengths drop the padded keys exactly", "[linear]") {
  const std::int64_t nb = 3, nt = 20, ns = 37, nh = 2, d = 16, dv = 16;
  const auto q = random_tensor<float>({nb, nt, nh, d}, 41);
  const auto k = random_tensor<float>({nb, ns, nh, d}, 42);
  const auto v = random_tensor<float>({nb, ns, nh, dv}, 43);
  const std::vector<std::int64_t> lens{37, 0, 23};
  const LinearAttention<float> layer;
  Tensor<float> out({nb, nt, nh, dv});
  layer.forward(q, k, v, out, lens);
  for (std::int64_t b = 0; b < nb; ++b) {
    CAPTURE(b);
    // Same as attending to the first lens[b] keys only, bit for bit.
    const ConstView<float, 4> qb = q.view<4>().slice(0, b, b + 1);
    const ConstView<float, 4> kb = k.view<4>().slice(0, b, b + 1).slice(1, 0, lens[b]);
    const ConstView<float, 4> vb = v.view<4>().slice(0, b, b + 1).slice(1, 0, lens[b]);
    Tensor<float> ob({1, nt, nh, dv});
    layer.forward(qb, kb, vb, ob);
    CHECK(std::memcmp(ob.data(), out.data() + b * nt * nh * dv, ob.numel() * sizeof(float)) == 0);
  }
  // No valid key: numerator and denominator are 0, so out = 0 / eps = 0.
  for (std::int64_t i = 0; i < nt * nh * dv; ++i) REQUIRE(out[nt * nh * dv + i] == 0.0f);
}

TEST_CASE("linear attention: strided views give the same result as contiguous ones", "[linear]") {
  // q, k, v stored head-major [B, H, T, D] and seen as [B, T, H, D] through strides,
  // out written into the first half of a wider buffer.
  const std::int64_t nb = 2, nt = 33, nh = 3, d = 8, dv = 12;
  const auto qh = random_tensor<float>({nb, nh, nt, d}, 51);
  const auto kh = random_tensor<float>({nb, nh, nt, d}, 52);
  const auto vh = random_tensor<float>({nb, nh, nt, dv}, 53);
  auto as_bthd = [&](const Tensor<float>& x) {
    const std::int64_t e = x.extent(3);
    return ConstView<float, 4>(x.data(), {nb, nt, nh, e}, {nh * nt * e, e, nt * e, 1});
  };
  Tensor<float> q({nb, nt, nh, d}), k({nb, nt, nh, d}), v({nb, nt, nh, dv});
  for (std::int64_t b = 0; b < nb; ++b)
    for (std::int64_t t = 0; t < nt; ++t)
      for (std::int64_t h = 0; h < nh; ++h) {
        for (std::int64_t c = 0; c < d; ++c) q(b, t, h, c) = qh(b, h, t, c);
        for (std::int64_t c = 0; c < d; ++c) k(b, t, h, c) = kh(b, h, t, c);
        for (std::int64_t c = 0; c < dv; ++c) v(b, t, h, c) = vh(b, h, t, c);
      }
  const LinearAttention<float> layer({.chunk_size = 16});
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    Tensor<float> wide({nb, nt, nh, 2 * dv}), out({nb, nt, nh, dv});
    const View<float, 4> strided_out = wide.view<4>().slice(3, 0, dv);
    if (causal) {
      layer.forward_causal(as_bthd(qh), as_bthd(kh), as_bthd(vh), strided_out);
      layer.forward_causal(q, k, v, out);
    } else {
      layer.forward(as_bthd(qh), as_bthd(kh), as_bthd(vh), strided_out);
      layer.forward(q, k, v, out);
    }
    for (std::int64_t i = 0; i < out.numel(); ++i)
      REQUIRE(out[i] == wide[(i / dv) * 2 * dv + i % dv]);
  }
}

TEST_CASE("linear attention: 1 and 2 threads give bit-identical results", "[linear][threads]") {
  const auto fm = GENERATE(FeatureMap::elu_plus_one, FeatureMap::favor_plus);
  const std::int64_t nb = 2, nt = 150, nh = 3, d = 32, dv = 32;
  const auto q = random_tensor<float>({nb, nt, nh, d}, 61);
  const auto k = random_tensor<float>({nb, nt, nh, d}, 62);
  const auto v = random_tensor<float>({nb, nt, nh, dv}, 63);
  const LinearAttention<float> layer(config_for(fm, d, 32));
  auto run = [&](int threads) {
    ScopedNumThreads scoped(threads);
    Tensor<float> a({nb, nt, nh, dv}), c({nb, nt, nh, dv}), s({nb, 1, nh, dv});
    layer.forward(q, k, v, a);
    layer.forward_causal(q, k, v, c);
    auto state = layer.make_state(nb, nh, d, dv);
    layer.step(token(q, 0), token(k, 0), token(v, 0), state, token(s, 0));
    return std::make_tuple(a, c, s);
  };
  const auto [a1, c1, s1] = run(1);
  const auto [a2, c2, s2] = run(2);
  CHECK(bitwise_equal(a1, a2));
  CHECK(bitwise_equal(c1, c2));
  CHECK(bitwise_equal(s1, s2));
}

TEST_CASE("FAVOR+: the projection is determined by the seed", "[linear][favor]") {
  const std::int64_t d = 16, m = 40;
  auto make = [&](std::uint64_t seed, bool orthogonal) {
    return LinearAttention<float>({.feature_map = FeatureMap::favor_plus,
                                   .num_features = m,
                                   .seed = seed,
                                   .orthogonal = orthogonal,
                                   .head_dim = d});
  };
  const auto a = make(5, true), b = make(5, true), c = make(6, true);
  REQUIRE(a.projection() != nullptr);
  CHECK(a.projection()->omega.extent(0) == m);
  CHECK(a.projection()->omega.extent(1) == d);
  CHECK(a.feature_dim(d) == m);
  CHECK(bitwise_equal(a.projection()->omega, b.projection()->omega));
  CHECK_FALSE(bitwise_equal(a.projection()->omega, c.projection()->omega));
  // float and double layers with the same seed use the same directions (rounded).
  const LinearAttention<double> ad(
      {.feature_map = FeatureMap::favor_plus, .num_features = m, .seed = 5, .head_dim = d});
  for (std::int64_t i = 0; i < m * d; ++i)
    REQUIRE(a.projection()->omega[i] == static_cast<float>(ad.projection()->omega[i]));
  // Orthogonal blocks: rows inside a block of D are orthogonal (the double projection,
  // so up to double rounding), rows of different blocks are not.
  const auto& w = ad.projection()->omega;
  auto dot = [&](std::int64_t i, std::int64_t j) {
    double s = 0;
    for (std::int64_t c = 0; c < d; ++c) s += w(i, c) * w(j, c);
    return s;
  };
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < i; ++j)
      REQUIRE(std::abs(dot(i, j)) <= 1e-12 * std::sqrt(dot(i, i) * dot(j, j)));
  CHECK(std::abs(dot(0, d)) > 1e-6 * std::sqrt(dot(0, 0) * dot(d, d)));
  // Same seed, same outputs, bit for bit.
  const auto q = random_tensor<float>({1, 10, 2, d}, 71);
  const auto k = random_tensor<float>({1, 10, 2, d}, 72);
  Tensor<float> oa({1, 10, 2, d}), ob({1, 10, 2, d});
  a.forward_causal(q, k, k, oa);
  b.forward_causal(q, k, k, ob);
  CHECK(bitwise_equal(oa, ob));
}

TEST_CASE("FAVOR+ estimates softmax attention", "[linear][favor]") {
  // phi(q).phi(k) is an unbiased estimate of exp(q.k / sqrt(D)) (times a per-query
  // constant); with m = 4096 orthogonal features the Monte-Carlo error of each
  // weight is a few percent for these small inputs, so outputs, convex combinations
  // of v, sit within 0.1 max|v| of softmax attention (and a wrong sign or scale in
  // the exponent misses by far more).
  const std::int64_t nt = 12, ns = 16, d = 8, dv = 4;
  const auto q = random_tensor<double>({1, nt, 1, d}, 81, 0.7);
  const auto k = random_tensor<double>({1, ns, 1, d}, 82, 0.7);
  const auto v = random_tensor<double>({1, ns, 1, dv}, 83);
  const LinearAttention<double> layer(
      {.feature_map = FeatureMap::favor_plus, .num_features = 4096, .seed = 3, .head_dim = d});
  Tensor<double> out({1, nt, 1, dv});
  layer.forward(q, k, v, out);
  double worst = 0;
  for (std::int64_t i = 0; i < nt; ++i) {
    std::vector<double> w(ns);
    double sum = 0;
    for (std::int64_t j = 0; j < ns; ++j) {
      double s = 0;
      for (std::int64_t c = 0; c < d; ++c) s += q(0, i, 0, c) * k(0, j, 0, c);
      w[j] = std::exp(s / std::sqrt(double(d)));
      sum += w[j];
    }
    for (std::int64_t c = 0; c < dv; ++c) {
      double o = 0;
      for (std::int64_t j = 0; j < ns; ++j) o += w[j] / sum * v(0, j, 0, c);
      worst = std::max(worst, std::abs(o - out(0, i, 0, c)));
    }
  }
  CAPTURE(worst);
  CHECK(worst <= 0.1 * max_abs(v));
}

TEST_CASE("linear attention: every documented error is raised", "[linear][errors]") {
  using switchyard::config_error;
  using switchyard::shape_error;
  SECTION("config") {
    auto make = [](LinearAttentionConfig c) { return LinearAttention<float>(c); };
    CHECK_THROWS_AS(make({.chunk_size = 0}), config_error);
    CHECK_THROWS_WITH(make({.chunk_size = 0}), Contains("LinearAttention") &&
                                                   Contains("'chunk_size' = 0") &&
                                                   Contains(">= 1"));
    CHECK_THROWS_WITH(make({.eps = std::nan("")}),
                      Contains("LinearAttention") && Contains("'eps' = nan"));
    CHECK_THROWS_WITH(make({.eps = -1e-6}),
                      Contains("LinearAttention") && Contains("'eps' = -1e-06"));
    CHECK_THROWS_WITH(
        make({.feature_map = FeatureMap::favor_plus, .num_features = 0, .head_dim = 8}),
        Contains("LinearAttention") && Contains("'num_features' = 0"));
    CHECK_THROWS_WITH(
        make({.feature_map = FeatureMap::favor_plus}),
        Contains("LinearAttention") && Contains("'head_dim' = 0") && Contains("favor_plus"));
    CHECK_THROWS_WITH(make({.head_dim = -2}), Contains("'head_dim' = -2"));
    CHECK_NOTHROW(make({.eps = 0.0}));
  }
  const LinearAttention<float> layer;
  Tensor<float> q({2, 5, 3, 8}), k({2, 6, 3, 8}), v({2, 6, 3, 4}), out({2, 5, 3, 4});
  SECTION("shapes") {
    Tensor<float> k_bad_d({2, 6, 3, 7}), v_bad_s({2, 7, 3, 4}), out_bad({2, 5, 3, 5});
    Tensor<float> k_bad_h({2, 6, 2, 8});
    CHECK_THROWS_AS(layer.forward(q, k_bad_d, v, out), shape_error);
    CHECK_THROWS_WITH(layer.forward(q, k_bad_d, v, out),
                      Contains("LinearAttention::forward") && Contains("'k'") &&
                          Contains("[B=2, S=6, H=3, D=7]") && Contains("[B=2, S, H=3, D=8]"));
    CHECK_THROWS_WITH(layer.forward(q, k_bad_h, v, out),
                      Contains("'k'") && Contains("[B=2, S=6, H=2, D=8]"));
    CHECK_THROWS_WITH(layer.forward(q, k, v_bad_s, out), Contains("'v'") &&
                                                             Contains("[B=2, S=7, H=3, Dv=4]") &&
                                                             Contains("[B=2, S=6, H=3, Dv]"));
    CHECK_THROWS_WITH(layer.forward(q, k, v, out_bad), Contains("'out'") &&
                                                           Contains("[B=2, T=5, H=3, Dv=5]") &&
                                                           Contains("[B=2, T=5, H=3, Dv=4]"));
    // Causal attention needs as many keys as queries.
    CHECK_THROWS_WITH(layer.forward_causal(q, k, v, out),
                      Contains("LinearAttention::forward_causal") && Contains("'k'") &&
                          Contains("[B=2, T=6, H=3, D=8]") && Contains("[B=2, T=5, H=3, D=8]"));
    // FAVOR+ fixes D through its projection.
    const LinearAttention<float> favor(
        {.feature_map = FeatureMap::favor_plus, .num_features = 4, .head_dim = 16});
    CHECK_THROWS_WITH(favor.forward(q, k, v, out), Contains("'q'") &&
                                                       Contains("[B=2, T=5, H=3, D=8]") &&
                                                       Contains("D=16") && Contains("head_dim"));
  }
  SECTION("key lengths") {
    const std::vector<std::int64_t> three{1, 2, 3}, too_long{6, 7}, negative{-1, 2};
    CHECK_THROWS_AS(layer.forward(q, k, v, out, three), shape_error);
    CHECK_THROWS_WITH(layer.forward(q, k, v, out, three),
                      Contains("'key_lengths'") && Contains("[B=3]") && Contains("[B=2]"));
    CHECK_THROWS_AS(layer.forward(q, k, v, out, too_long), config_error);
    CHECK_THROWS_WITH(layer.forward(q, k, v, out, too_long), Contains("LinearAttention::forward") &&
                                                                 Contains("'key_lengths[1]' = 7") &&
                                                                 Contains("S=6"));
    CHECK_THROWS_WITH(layer.forward(q, k, v, out, negative), Contains("'key_lengths[0]' = -1"));
    const std::vector<std::int64_t> ok{6, 0};
    CHECK_NOTHROW(layer.forward(q, k, v, out, ok));
  }
  SECTION("decoding state and step") {
    Tensor<float> qt({2, 3, 8}), vt({2, 3, 4}), ot({2, 3, 4}), ot_bad({2, 3, 5});
    Tensor<float> kt_bad({2, 4, 8});
    auto state = layer.make_state(2, 3, 8, 4);
    CHECK(state.s.extent(0) == 2);
    CHECK(state.s.extent(3) == 4);
    CHECK_NOTHROW(layer.step(qt, qt, vt, state, ot));
    CHECK_THROWS_WITH(layer.step(qt, kt_bad, vt, state, ot),
                      Contains("LinearAttention::step") && Contains("'k_t'") &&
                          Contains("[B=2, H=4, D=8]") && Contains("[B=2, H=3, D=8]"));
    CHECK_THROWS_WITH(layer.step(qt, qt, vt, state, ot_bad),
                      Contains("'out_t'") && Contains("[B=2, H=3, Dv=5]"));
    auto wrong = layer.make_state(2, 3, 8, 5);
    CHECK_THROWS_AS(layer.step(qt, qt, vt, wrong, ot), shape_error);
    CHECK_THROWS_WITH(layer.step(qt, qt, vt, wrong, ot), Contains("'state.s'") &&
                                                             Contains("[2, 3, 8, 5]") &&
                                                             Contains("[B=2, H=3, D'=8, Dv=4]"));
    Tensor<float> q6({2, 6, 3, 8}), o6({2, 6, 3, 4});
    auto small = layer.make_state(1, 3, 8, 4);
    CHECK_THROWS_WITH(layer.forward_causal(q6, k, v, o6, {}, &small),
                      Contains("LinearAttention::forward_causal") && Contains("'state.s'") &&
                          Contains("[1, 3, 8, 4]"));
  }
}
