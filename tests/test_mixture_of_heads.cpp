// Mixture-of-Head attention: the SkyworkAI MoH-DiT golden fixture, a naive double-precision
// reference written from MoHAttention.forward (every head computed densely, then gated), a
// hand-computed case, properties of the routing plan, the softmax kernel on every arch, errors.
#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "support/compare.hpp"
#include "support/fixtures.hpp"
#include "switchyard/attention/mixture_of_heads.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"

using switchyard::Tensor;
using namespace switchyard::attention;
using Catch::Contains;

namespace {

using namespace test_support;

// ---- naive reference, double ------------------------------------------------------------------
struct RefWeights {
  std::vector<double> qkv_w, qkv_b, proj_w, proj_b, wg, wg0, wg1;
};

std::vector<double> softmax(std::vector<double> v) {
  const double m = *std::max_element(v.begin(), v.end());
  double s = 0;
  for (double& e : v) s += (e = std::exp(e - m));
  for (double& e : v) e /= s;
  return v;
}

// Gates [B*N, H] of MoHAttention.forward (eval); ties in top-k toward the lower index.
std::vector<double> ref_gates(const std::vector<double>& x, const RefWeights& w, std::int64_t BN,
                              std::int64_t C, std::int64_t H, std::int64_t S, std::int64_t K) {
  const std::int64_t R = H - S;
  auto linear = [&](const std::vector<double>& W, std::int64_t rows, std::int64_t t) {
    std::vector<double> y(rows, 0);
    for (std::int64_t o = 0; o < rows; ++o)
      for (std::int64_t c = 0; c < C; ++c) y[o] += W[o * C + c] * x[t * C + c];
    return y;
  };
  std::vector<double> g(BN * H, 0);
  for (std::int64_t t = 0; t < BN; ++t) {
    std::vector<double> shared(S, 1.0), routed(R, 0.0);
    if (S > 1) {
      shared = softmax(linear(w.wg1, S, t));
      for (double& e : shared) e *= double(S);
    }
    if (K > 0) {
      const auto p = softmax(linear(w.wg, R, t));
      std::vector<std::int64_t> idx(R);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](auto a, auto b) { return p[a] > p[b]; });
      double denom = 0;
      for (std::int64_t e = 0; e < K; ++e) denom += p[idx[e]];
      for (std::int64_t e = 0; e < K; ++e) routed[idx[e]] = p[idx[e]] / denom * double(K);
      if (S > 0) {
        const auto w0 = softmax(linear(w.wg0, 2, t));
        for (double& e : shared) e *= 2 * w0[0];
        for (double& e : routed) e *= 2 * w0[1];
      }
    }
    for (std::int64_t h = 0; h < S; ++h) g[t * H + h] = shared[h];
    for (std::int64_t h = 0; h < R; ++h) g[t * H + S + h] = routed[h];
  }
  return g;
}

// Dense multi-head attention over all heads, each head's output times gates[t, h], then proj.
// Also returns, per element, the sum of the absolute values of the terms that make it up
// (|g| sum_j p_j |v_j| for a gated head, |b| + sum_c |W||gated| for an output): float rounding
// error is bounded relative to that, not to the (possibly cancelled) value itself.
struct RefOut {
  std::vector<double> out, out_mag, gated, gated_mag;
};
// causal: token i attends to tokens j <= i only.
RefOut ref_gated_mha(const std::vector<double>& x, const RefWeights& w,
                     const std::vector<double>& gates, std::int64_t B, std::int64_t N,
                     std::int64_t C, std::int64_t H, bool causal = false) {
  const std::int64_t D = C / H;
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> qkv(B * N * 3 * C, 0);
  for (std::int64_t t = 0; t < B * N; ++t)
    for (std::int64_t o = 0; o < 3 * C; ++o) {
      double s = w.qkv_b.empty() ? 0 : w.qkv_b[o];
      for (std::int64_t c = 0; c < C; ++c) s += w.qkv_w[o * C + c] * x[t * C + c];
      qkv[t * 3 * C + o] = s;
    }
  std::vector<double> heads(B * N * C, 0), heads_mag(B * N * C, 0);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < N; ++i) {
        std::vector<double> logit(N);
        for (std::int64_t j = 0; j < N; ++j) {
          double s = 0;
          for (std::int64_t d = 0; d < D; ++d)
            s += qkv[(b * N + i) * 3 * C + h * D + d] * scale *
                 qkv[(b * N + j) * 3 * C + C + h * D + d];
          logit[j] = causal && j > i ? -std::numeric_limits<double>::infinity() : s;
        }
        const auto p = softmax(logit);
        for (std::int64_t d = 0; d < D; ++d) {
          double s = 0, mag = 0;
          for (std::int64_t j = 0; j < N; ++j) {
            s += p[j] * qkv[(b * N + j) * 3 * C + 2 * C + h * D + d];
            mag += p[j] * std::abs(qkv[(b * N + j) * 3 * C + 2 * C + h * D + d]);
          }
          heads[(b * N + i) * C + h * D + d] = gates[(b * N + i) * H + h] * s;
          heads_mag[(b * N + i) * C + h * D + d] = std::abs(gates[(b * N + i) * H + h]) * mag;
        }
      }
  RefOut r{std::vector<double>(B * N * C), std::vector<double>(B * N * C), heads, heads_mag};
  for (std::int64_t t = 0; t < B * N; ++t)
    for (std::int64_t o = 0; o < C; ++o) {
      double s = w.proj_b.empty() ? 0 : w.proj_b[o];
      double mag = std::abs(s);
      for (std::int64_t c = 0; c < C; ++c) {
        s += w.proj_w[o * C + c] * heads[t * C + c];
        mag += std::abs(w.proj_w[o * C + c]) * heads_mag[t * C + c];
      }
      r.out[t * C + o] = s;
      r.out_mag[t * C + o] = mag;
    }
  return r;
}

// Max of |got - want| / mag: error relative to the magnitude of the summands of each element.
double max_err_vs_mag(const std::vector<double>& got, const std::vector<double>& want,
                      const std::vector<double>& mag) {
  REQUIRE(got.size() == want.size());
  double e = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    e = std::max(e, std::abs(got[i] - want[i]) / std::max(mag[i], 1e-300));
  return e;
}

// Random weights of a config; owning tensors plus the views the layer takes.
template <class T>
struct RandomModel {
  Tensor<T> qkv_w, qkv_b, proj_w, proj_b, wg, wg0, wg1;
  MixtureOfHeadsWeights<T> views;
  RefWeights ref;
  RandomModel(std::int64_t C, std::int64_t H, std::int64_t S, std::uint32_t seed) {
    const double sd = 1.0 / std::sqrt(double(C));
    qkv_w = random_tensor<T>({3 * C, C}, seed, sd);
    qkv_b = random_tensor<T>({3 * C}, seed + 1, 0.1);
    proj_w = random_tensor<T>({C, C}, seed + 2, sd);
    proj_b = random_tensor<T>({C}, seed + 3, 0.1);
    wg = random_tensor<T>({std::max<std::int64_t>(H - S, 1), C}, seed + 4, 3 * sd);
    wg0 = random_tensor<T>({2, C}, seed + 5, sd);
    wg1 = random_tensor<T>({std::max<std::int64_t>(S, 1), C}, seed + 6, sd);
    views = {qkv_w,
             qkv_b,
             proj_w,
             proj_b,
             wg.template view<2>().slice(0, 0, H - S),
             wg0,
             wg1.template view<2>().slice(0, 0, S)};
    ref = {to_double(qkv_w), to_double(qkv_b), to_double(proj_w), to_double(proj_b),
           to_double(wg),    to_double(wg0),   to_double(wg1)};
  }
};

}  // namespace

// ---- golden fixture ---------------------------------------------------------------------------

TEST_CASE("MoH-DiT fixture matches SkyworkAI/MoH", "[moh][fixture]") {
  auto f = open_fixture("moh_dit_B2_N50_C64_h4_shared2_routed1.safetensors");
  const Tensor<float> x = f.tensor<float>("x");
  const Tensor<float> qkv_w = f.tensor<float>("qkv_weight"), qkv_b = f.tensor<float>("qkv_bias");
  const Tensor<float> proj_w = f.tensor<float>("proj_weight");
  const Tensor<float> proj_b = f.tensor<float>("proj_bias");
  const Tensor<float> wg = f.tensor<float>("wg_weight"), wg0 = f.tensor<float>("wg0_weight");
  const Tensor<float> wg1 = f.tensor<float>("wg1_weight");
  const MixtureOfHeadsWeights<float> w{qkv_w, qkv_b, proj_w, proj_b, wg, wg0, wg1};
  const MixtureOfHeads<float> moh(
      {.dim = 64, .num_heads = 4, .shared_heads = 2, .routed_top_k = 1});
  const std::int64_t B = 2, N = 50, C = 64, H = 4;

  const auto plan = moh.route(x, w);
  // Gates from the stored raw logits, in double: the reference's formulas on its own logits.
  const Tensor<float> l = f.tensor<float>("wg_logits"), l0 = f.tensor<float>("wg0_logits");
  const Tensor<float> l1 = f.tensor<float>("wg1_logits");
  std::vector<double> want_gates(B * N * H);
  for (std::int64_t t = 0; t < B * N; ++t) {
    const auto p = softmax({l(t, 0), l(t, 1)});
    const auto p0 = softmax({l0(t, 0), l0(t, 1)});
    const auto p1 = softmax({l1(t, 0), l1(t, 1)});
    const std::int64_t pick = p[1] > p[0] ? 1 : 0;  // top-1; the fixture has no ties
    want_gates[t * H + 0] = 2 * p0[0] * 2 * p1[0];
    want_gates[t * H + 1] = 2 * p0[0] * 2 * p1[1];
    want_gates[t * H + 2] = pick == 0 ? 2 * p0[1] : 0.0;
    want_gates[t * H + 3] = pick == 1 ? 2 * p0[1] : 0.0;
    // routing decisions are exact
    REQUIRE(plan.active[t * H + 2 + pick] == 1);
    REQUIRE(plan.active[t * H + 3 - pick] == 0);
  }
  const double e_gates = max_rel_err(to_double(plan.gates), want_gates, 1e-30);
  REQUIRE(plan.pairs() == B * N * 3);

  const Tensor<float> out = moh.forward(x, w);
  const Tensor<float> gated = moh.gated_heads(plan, x, w);
  const auto want = to_double(f.tensor<float>("out"));
  const auto want_gated = to_double(f.tensor<float>("gated_heads"));
  // Magnitudes of the summands of each element, from the double reference on the same inputs.
  const RefWeights rw{to_double(qkv_w), to_double(qkv_b), to_double(proj_w), to_double(proj_b),
                      to_double(wg),    to_double(wg0),   to_double(wg1)};
  const auto xd = to_double(x);
  const RefOut ref = ref_gated_mha(xd, rw, ref_gates(xd, rw, B * N, C, H, 2, 1), B, N, C, H);
  // Float rounding bounds each element's error by ~(terms summed) * 2^-24 times the magnitude
  // of its summands (64-term projections, 50-key averages): ~1e-6 worst case, far below 1e-5.
  // Plain |a - b| / |b| is also reported; it is unbounded where the sum cancels to ~0.
  const double e_out = max_err_vs_mag(to_double(out), want, ref.out_mag);
  const double e_gated = max_err_vs_mag(to_double(gated), want_gated, ref.gated_mag);
  double e_abs = 0;
  for (std::size_t i = 0; i < want.size(); ++i) e_abs = std::max(e_abs, std::abs(out[i] - want[i]));
  WARN("MoH fixture: max relative error gates "
       << e_gates << "; out " << e_out << " and gated_heads " << e_gated
       << " relative to their summands; out max abs " << e_abs << " at scale " << max_abs(want)
       << ", elementwise |a-b|/|b| over |b| > 1e-2 scale "
       << max_rel_err(to_double(out), want, 1e-2 * max_abs(want))
       << " (double reference vs fixture, same measure: "
       << max_rel_err(ref.out, want, 1e-2 * max_abs(want)) << ")");
  CHECK(e_gates <= 1e-5);
  CHECK(e_out <= 1e-5);
  CHECK(e_gated <= 1e-5);
  // The double reference agrees with the fixture as well (checks the reference itself).
  CHECK(max_err_vs_mag(ref.out, want, ref.out_mag) <= 1e-5);
}

// ---- against the naive double reference -----------------------------------------------------

TEST_CASE("MoH matches the naive double reference", "[moh][reference]") {
  struct Case {
    std::int64_t B, N, C, H, S, K;
  };
  const Case c =
      GENERATE(Case{2, 9, 16, 4, 2, 1}, Case{1, 13, 24, 6, 0, 2}, Case{2, 7, 12, 3, 1, 1},
               Case{1, 11, 32, 4, 4, 0}, Case{3, 5, 24, 6, 2, 4}, Case{1, 1, 8, 2, 0, 1});
  CAPTURE(c.B, c.N, c.C, c.H, c.S, c.K);
  const RandomModel<double> m(c.C, c.H, c.S, 100 + std::uint32_t(c.C));
  const auto x = random_tensor<double>({c.B, c.N, c.C}, 7 + std::uint32_t(c.N));
  const MixtureOfHeads<double> moh(
      {.dim = c.C, .num_heads = c.H, .shared_heads = c.S, .routed_top_k = c.K});
  const auto xd = to_double(x);
  const auto gates = ref_gates(xd, m.ref, c.B * c.N, c.C, c.H, c.S, c.K);
  const auto want = ref_gated_mha(xd, m.ref, gates, c.B, c.N, c.C, c.H);
  const auto plan = moh.route(x, m.views);
  // double vs double: only summation order differs (~1e-16 of the summands).
  CHECK(max_rel_err(to_double(plan.gates), gates, 1e-300) <= 1e-12);
  CHECK(max_err_vs_mag(to_double(moh.forward(x, m.views)), want.out, want.out_mag) <= 1e-12);

  // float vs the double reference: float rounding of the same sums.
  const RandomModel<float> mf(c.C, c.H, c.S, 100 + std::uint32_t(c.C));
  Tensor<float> xf({c.B, c.N, c.C});
  std::copy(x.begin(), x.end(), xf.begin());
  const MixtureOfHeads<float> mohf(
      {.dim = c.C, .num_heads = c.H, .shared_heads = c.S, .routed_top_k = c.K});
  const auto wantf = ref_gated_mha(xd, mf.ref, ref_gates(xd, mf.ref, c.B * c.N, c.C, c.H, c.S, c.K),
                                   c.B, c.N, c.C, c.H);
  CHECK(max_err_vs_mag(to_double(mohf.forward(xf, mf.views)), wantf.out, wantf.out_mag) <= 1e-5);
}

TEST_CASE("MoH causal forward, and decode in chunks then steps, match the causal reference",
          "[moh][reference][decode]") {
  struct Case {
    std::int64_t B, N, C, H, S, K;
  };
  const Case c =
      GENERATE(Case{2, 21, 16, 4, 1, 2}, Case{1, 90, 24, 6, 0, 2}, Case{2, 9, 12, 3, 3, 0});
  CAPTURE(c.B, c.N, c.C, c.H, c.S, c.K);
  const RandomModel<float> m(c.C, c.H, c.S, 300 + std::uint32_t(c.C));
  const auto x = random_tensor<float>({c.B, c.N, c.C}, 31 + std::uint32_t(c.N));
  const MixtureOfHeads<float> moh(
      {.dim = c.C, .num_heads = c.H, .shared_heads = c.S, .routed_top_k = c.K, .causal = true});
  const auto xd = to_double(x);
  const auto want = ref_gated_mha(xd, m.ref, ref_gates(xd, m.ref, c.B * c.N, c.C, c.H, c.S, c.K),
                                  c.B, c.N, c.C, c.H, /*causal=*/true);
  CHECK(max_err_vs_mag(to_double(moh.forward(x, m.views)), want.out, want.out_mag) <= 1e-5);

  // A prompt in two chunks (the second over max_decode_queries when N = 90), then one token
  // at a time, through the KV cache.
  KVCache<float> cache(c.B, c.H, c.C / c.H, c.N);
  Tensor<float> out({c.B, c.N, c.C});
  const std::int64_t p1 = c.N / 4, p2 = c.N - 3 - p1;
  std::int64_t t0 = 0;
  for (std::int64_t n : {p1, p2, std::int64_t(1), std::int64_t(1), std::int64_t(1)}) {
    moh.decode(x.view<3>().slice(1, t0, t0 + n), m.views, cache,
               out.view<3>().slice(1, t0, t0 + n));
    t0 += n;
  }
  REQUIRE(t0 == c.N);
  CHECK(cache.length(0) == c.N);
  CHECK(max_err_vs_mag(to_double(out), want.out, want.out_mag) <= 1e-5);
}

TEST_CASE("MoH decode errors", "[moh][decode][error]") {
  const RandomModel<float> m(16, 4, 1, 5);
  const auto x = random_tensor<float>({2, 3, 16}, 6);
  Tensor<float> out({2, 3, 16});
  KVCache<float> cache(2, 4, 4, 4);
  const MixtureOfHeads<float> plain({.dim = 16, .num_heads = 4, .shared_heads = 1});
  CHECK_THROWS_WITH(plain.decode(x, m.views, cache, out.view<3>()), Contains("causal"));
  const MixtureOfHeads<float> moh(
      {.dim = 16, .num_heads = 4, .shared_heads = 1, .routed_top_k = 1, .causal = true});
  KVCache<float> wrong(2, 2, 8, 4);
  CHECK_THROWS_WITH(moh.decode(x, m.views, wrong, out.view<3>()), Contains("'cache'"));
  Tensor<float> bad_out({2, 3, 15});
  CHECK_THROWS_AS(moh.decode(x, m.views, cache, bad_out.view<3>()), switchyard::shape_error);
  moh.decode(x, m.views, cache, out.view<3>());
  // 3 stored, capacity 4: two more pass it, and nothing is appended.
  const auto x2 = random_tensor<float>({2, 2, 16}, 7);
  Tensor<float> out2({2, 2, 16});
  CHECK_THROWS_WITH(moh.decode(x2, m.views, cache, out2.view<3>()), Contains("capacity 4"));
  CHECK(cache.length(0) == 3);
  // In place (out is x) is allowed; out overlapping x otherwise is not.
  Tensor<float> xi = random_tensor<float>({2, 1, 16}, 8);
  CHECK_NOTHROW(moh.decode(xi, m.views, cache, xi.view<3>()));
  CHECK(cache.length(1) == 4);
}

TEST_CASE("MoH hand-computed single-token case", "[moh][hand]") {
  // C = 2, H = 2 (D = 1), one shared head and one routed head with k = 1. One token, so each
  // head's attention output is its value. v = (2, 3); shared gate 1, routed gate 1 (softmax over
  // one head, renormalised, times k = 1); balance softmax(ln 3, 0) * 2 = (1.5, 0.5).
  // gated = (1.5 * 2, 0.5 * 3) = (3, 1.5); proj = identity + (0.5, -1) gives (3.5, 0.5).
  Tensor<float> x({1, 1, 2});
  x(0, 0, 0) = 1.0f;
  Tensor<float> qkv({6, 2}), proj({2, 2}), proj_b({2}), wg({1, 2}), wg0({2, 2});
  qkv(4, 0) = 2.0f;  // v of head 0
  qkv(5, 0) = 3.0f;  // v of head 1
  proj(0, 0) = proj(1, 1) = 1.0f;
  proj_b(0) = 0.5f;
  proj_b(1) = -1.0f;
  wg0(0, 0) = std::log(3.0f);
  const MixtureOfHeadsWeights<float> w{qkv, {}, proj, proj_b, wg, wg0, {}};
  const MixtureOfHeads<float> moh({.dim = 2, .num_heads = 2, .shared_heads = 1, .routed_top_k = 1});
  const auto plan = moh.route(x, w);
  CHECK(plan.gates[0] == Approx(1.5));
  CHECK(plan.gates[1] == Approx(0.5));
  const auto out = moh.forward(x, w);
  CHECK(out(0, 0, 0) == Approx(3.5));
  CHECK(out(0, 0, 1) == Approx(0.5));
}

// ---- properties -----------------------------------------------------------------------------

TEST_CASE("MoH properties", "[moh][property]") {
  const std::int64_t B = 2, N = 17, C = 48, H = 6, S = 2;
  const RandomModel<double> m(C, H, S, 5);
  const auto x = random_tensor<double>({B, N, C}, 6);
  const auto xd = to_double(x);

  SECTION("k = all routed heads equals dense MHA weighted by the reference gates") {
    const MixtureOfHeads<double> moh(
        {.dim = C, .num_heads = H, .shared_heads = S, .routed_top_k = H - S});
    const auto plan = moh.route(x, m.views);
    REQUIRE(plan.fraction() == 1.0);
    const auto gates = ref_gates(xd, m.ref, B * N, C, H, S, H - S);
    const auto want = ref_gated_mha(xd, m.ref, gates, B, N, C, H);
    CHECK(max_err_vs_mag(to_double(moh.forward(x, m.views)), want.out, want.out_mag) <= 1e-12);
  }
  SECTION("smaller k computes fewer pairs: exactly S + k heads per token") {
    std::int64_t last = -1;
    for (std::int64_t k = 1; k <= H - S; ++k) {
      const MixtureOfHeads<double> moh(
          {.dim = C, .num_heads = H, .shared_heads = S, .routed_top_k = k});
      const auto plan = moh.route(x, m.views);
      REQUIRE(plan.pairs() == B * N * (S + k));
      REQUIRE(plan.fraction() == Approx(double(S + k) / double(H)));
      REQUIRE(plan.pairs() > last);
      last = plan.pairs();
      for (std::int64_t t = 0; t < B * N; ++t) {
        std::int64_t used = 0;
        for (std::int64_t h = 0; h < H; ++h) {
          used += plan.active[t * H + h];
          if (!plan.active[t * H + h]) REQUIRE(plan.gates[t * H + h] == 0.0);
        }
        REQUIRE(used == S + k);
        for (std::int64_t h = 0; h < S; ++h) REQUIRE(plan.active[t * H + h] == 1);
      }
      // per-head token lists agree with the active mask and are ascending
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t p = plan.head_offsets[h]; p < plan.head_offsets[h + 1]; ++p) {
          REQUIRE(plan.active[plan.token_index[p] * H + h] == 1);
          if (p > plan.head_offsets[h]) REQUIRE(plan.token_index[p] > plan.token_index[p - 1]);
        }
    }
  }
  SECTION("shared gates sum to 2 w0[0] S and routed gates to 2 w0[1] k, w0[0] + w0[1] = 1") {
    const std::int64_t k = 2;
    const MixtureOfHeads<double> moh(
        {.dim = C, .num_heads = H, .shared_heads = S, .routed_top_k = k});
    const auto plan = moh.route(x, m.views);
    const auto gates = ref_gates(xd, m.ref, B * N, C, H, S, k);
    for (std::int64_t t = 0; t < B * N; ++t) {
      double shared = 0, routed = 0, ref_shared = 0;
      for (std::int64_t h = 0; h < S; ++h) shared += plan.gates[t * H + h];
      for (std::int64_t h = S; h < H; ++h) routed += plan.gates[t * H + h];
      for (std::int64_t h = 0; h < S; ++h) ref_shared += gates[t * H + h];
      CHECK(shared == Approx(ref_shared).epsilon(1e-12));
      const double w00 = shared / (2.0 * S);
      CHECK(routed == Approx(2.0 * (1.0 - w00) * k).epsilon(1e-12));
    }
  }
  SECTION("strided input and output views give the same result") {
    const MixtureOfHeads<double> moh(
        {.dim = C, .num_heads = H, .shared_heads = S, .routed_top_k = 1});
    Tensor<double> wide({B, N, 2 * C});
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t c = 0; c < C; ++c) wide(b, n, C + c) = x(b, n, c);
    Tensor<double> out_wide({B, N, 2 * C});
    const auto xs = wide.view<3>().slice(2, C, 2 * C);
    moh.forward(xs, m.views, out_wide.view<3>().slice(2, 0, C));
    const auto dense = moh.forward(x, m.views);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t c = 0; c < C; ++c) REQUIRE(out_wide(b, n, c) == dense(b, n, c));
  }
  SECTION("the same bits for any thread count") {
    const RandomModel<float> mf(C, H, S, 5);
    const auto xf = random_tensor<float>({B, N, C}, 6);
    const MixtureOfHeads<float> moh(
        {.dim = C, .num_heads = H, .shared_heads = S, .routed_top_k = 2});
    const auto run = [&](int threads) {
      switchyard::ScopedNumThreads t(threads);
      return to_double(moh.forward(xf, mf.views));
    };
    REQUIRE(run(1) == run(2));
  }
}

TEST_CASE("MoH on every arch matches the double reference", "[moh][simd]") {
  const std::int64_t B = 2, N = 19, C = 24, H = 4, S = 1, K = 2;
  const RandomModel<float> m(C, H, S, 8);
  const auto x = random_tensor<float>({B, N, C}, 9);
  const auto xd = to_double(x);
  const auto want = ref_gated_mha(xd, m.ref, ref_gates(xd, m.ref, B * N, C, H, S, K), B, N, C, H);
  switchyard::simd::for_each_arch([&](auto arch) {
    using A = decltype(arch);
    CAPTURE(A::name());
    const MixtureOfHeads<float, A> moh(
        {.dim = C, .num_heads = H, .shared_heads = S, .routed_top_k = K});
    CHECK(max_err_vs_mag(to_double(moh.forward(x, m.views)), want.out, want.out_mag) <= 1e-5);
  });
}

TEST_CASE("MoH on an empty batch", "[moh][property]") {
  const RandomModel<float> m(16, 4, 2, 1);
  const MixtureOfHeads<float> moh(
      {.dim = 16, .num_heads = 4, .shared_heads = 2, .routed_top_k = 1});
  for (auto shape : {std::array<std::int64_t, 2>{0, 5}, std::array<std::int64_t, 2>{3, 0}}) {
    Tensor<float> x({shape[0], shape[1], 16});
    const auto plan = moh.route(x, m.views);
    REQUIRE(plan.pairs() == 0);
    REQUIRE(plan.fraction() == 0.0);
    REQUIRE(moh.forward(x, m.views).numel() == 0);
  }
}

// ---- errors -----------------------------------------------------------------------------------

TEST_CASE("MoH rejects bad configs and shapes", "[moh][error]") {
  using E = switchyard::config_error;
  REQUIRE_THROWS_AS(MixtureOfHeads<float>({.dim = 64, .num_heads = 5}), E);
  REQUIRE_THROWS_WITH(
      MixtureOfHeads<float>({.dim = 64, .num_heads = 5}),
      Contains("MixtureOfHeads") && Contains("'num_heads' = 5") && Contains("divisor of dim = 64"));
  REQUIRE_THROWS_AS(
      MixtureOfHeads<float>({.dim = 64, .num_heads = 4, .shared_heads = 2, .routed_top_k = 3}), E);
  REQUIRE_THROWS_WITH(
      MixtureOfHeads<float>({.dim = 64, .num_heads = 4, .shared_heads = 2, .routed_top_k = 3}),
      Contains("MixtureOfHeads") && Contains("'routed_top_k' = 3") && Contains("= 2"));
  REQUIRE_THROWS_WITH(MixtureOfHeads<float>({.dim = 64, .num_heads = 4, .shared_heads = 5}),
                      Contains("'shared_heads' = 5"));
  REQUIRE_THROWS_WITH(
      MixtureOfHeads<float>({.dim = 64, .num_heads = 4, .shared_heads = 2, .routed_top_k = 0}),
      Contains("'routed_top_k' = 0") && Contains("2 routed heads"));
  REQUIRE_THROWS_WITH(MixtureOfHeads<float>({.dim = 0}), Contains("'dim' = 0"));

  const std::int64_t C = 16, H = 4, S = 2;
  const RandomModel<float> m(C, H, S, 1);
  const MixtureOfHeads<float> moh({.dim = C, .num_heads = H, .shared_heads = S, .routed_top_k = 1});
  const auto bad_x = random_tensor<float>({2, 5, 12}, 1);
  REQUIRE_THROWS_AS(moh.forward(bad_x, m.views), switchyard::shape_error);
  REQUIRE_THROWS_WITH(moh.forward(bad_x, m.views),
                      Contains("MixtureOfHeads::route") && Contains("'x'") &&
                          Contains("[B=2, N=5, C=12]") && Contains("[B, N, C=16]"));
  auto w = m.views;
  w.wg = m.wg.view<2>().slice(0, 0, 1);  // [1, C] router, but 2 routed heads
  const auto x = random_tensor<float>({2, 5, C}, 1);
  REQUIRE_THROWS_WITH(moh.forward(x, w), Contains("MixtureOfHeads") && Contains("'wg'") &&
                                             Contains("[H-S=1, C=16]") &&
                                             Contains("[H-S=2, C=16]"));
  w = m.views;
  w.qkv_bias = m.proj_b;  // [C], not [3C]
  REQUIRE_THROWS_WITH(moh.forward(x, w),
                      Contains("'qkv_bias'") && Contains("[3C=16]") && Contains("[3C=48]"));
  const auto plan = moh.route(x, m.views);
  Tensor<float> out({2, 5, C});
  const auto other_x = random_tensor<float>({1, 5, C}, 1);
  Tensor<float> other_out({1, 5, C});
  REQUIRE_THROWS_WITH(moh.execute(plan, other_x, m.views, other_out.view<3>()),
                      Contains("MixtureOfHeads::execute") && Contains("'plan'") &&
                          Contains("[B*N=10, H=4]") && Contains("[B*N=5, H=4]"));
  auto broken = plan;
  broken.token_index[0] = 1000;  // outside the 10 tokens
  REQUIRE_THROWS_WITH(
      moh.execute(broken, x, m.views, out.view<3>()),
      Contains("MixtureOfHeads::execute") && Contains("'plan'") && Contains("in range"));
}
