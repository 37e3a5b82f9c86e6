// SpAtten cascade token and head pruning (tokens/prune_cascade.hpp): keep counts, routing
// against a naive sort-based reference and hand-worked cases (ties, NaN, class token), score
// accumulation against naive sums (and, end to end, against attention probabilities in long
// double), composition over three layers, head pruning driving DenseAttention's active heads,
// and every documented error.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <switchyard/attention/dense.hpp>
#include <switchyard/tokens/merge_plan.hpp>
#include <switchyard/tokens/prune_cascade.hpp>
#include <vector>

#include "support/compare.hpp"

using namespace switchyard;
using namespace switchyard::tokens;
using Catch::Contains;

namespace {

using test_support::uniform_tensor;

// Naive top-k: stable sort by score descending (NaN last), first k, ascending.
template <class T>
std::vector<std::int64_t> naive_keep(const std::vector<T>& s, std::int64_t k, bool cls) {
  std::vector<std::int64_t> idx(s.size());
  std::iota(idx.begin(), idx.end(), 0);
  const auto key = [&](std::int64_t i) {
    return std::isnan(double(s[std::size_t(i)])) ? -std::numeric_limits<double>::infinity()
                                                 : double(s[std::size_t(i)]);
  };
  std::stable_sort(idx.begin(), idx.end(), [&](std::int64_t a, std::int64_t b) {
    if (cls && (a == 0 || b == 0)) return a == 0 && b != 0;
    const bool na = std::isnan(double(s[std::size_t(a)])),
               nb = std::isnan(double(s[std::size_t(b)]));
    if (na != nb) return nb;  // numbers (even -inf) before NaN
    return key(a) > key(b);
  });
  idx.resize(std::size_t(k));
  std::sort(idx.begin(), idx.end());
  return idx;
}

}  // namespace

TEST_CASE("prune cascade: keep count is ceil(keep_ratio * n), exact for decimal ratios",
          "[prune_cascade]") {
  REQUIRE(pruning_keep_count(10, 0.7) == 7);
  REQUIRE(pruning_keep_count(197, 0.5) == 99);
  REQUIRE(pruning_keep_count(197, 0.7) == 138);  // 137.9
  REQUIRE(pruning_keep_count(3, 2.0 / 3.0) == 2);
  REQUIRE(pruning_keep_count(1, 0.01) == 1);
  REQUIRE(pruning_keep_count(10, 0.01) == 1);
  REQUIRE(pruning_keep_count(10, 1.0) == 10);
  REQUIRE(pruning_keep_count(0, 0.5) == 0);
  REQUIRE(pruning_keep_count(100, 0.29) == 29);
  REQUIRE(pruning_keep_count(100, 0.57) == 57);
  // Every ratio i / 100 (the double nearest the decimal, as a literal gives) and n <= 300 against
  // integer arithmetic: ceil(i * n / 100).
  for (std::int64_t i = 1; i <= 100; ++i)
    for (std::int64_t n = 1; n <= 300; ++n) {
      const double ratio = double(i) / 100.0;
      const std::int64_t want = std::max<std::int64_t>(1, (i * n + 99) / 100);
      CAPTURE(i, n);
      REQUIRE(pruning_keep_count(n, ratio) == want);
    }
}

TEST_CASE("prune cascade: tokens worked out by hand (ties, NaN, class token)", "[prune_cascade]") {
  // B = 2, N = 6, keep 0.5 -> 3 tokens.
  auto st = TokenImportance<float>::start(2, 6);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> s{0.5f, 2.0f, 1.0f,  2.0f,  1.0f, 0.1f,  // ties 2, 2 and 1, 1
                             nan,  3.0f, -1.0f, -1.0f, 0.0f, nan};
  std::copy(s.begin(), s.end(), st.score.begin());
  {
    const CascadeTokenPruner<float> pr({.keep_ratio = 0.5});
    const auto plan = pr.route(st);
    REQUIRE(plan.num_kept == 3);
    // b0: 2 (1), 2 (3), then 1 at 2 before 1 at 4.  b1: 3 (7), 0 (10), -1 at 8 before 9; NaN last.
    REQUIRE(plan.kept == std::vector<std::int64_t>{1, 2, 3, 1, 2, 4});
    REQUIRE(plan.original == plan.kept);
  }
  {
    const CascadeTokenPruner<float> pr({.keep_ratio = 0.5, .class_token = true});
    const auto plan = pr.route(st);
    // Class token 0 first, then the two best of tokens 1..5; b1's class token has a NaN score.
    REQUIRE(plan.kept == std::vector<std::int64_t>{0, 1, 3, 0, 1, 4});
  }
  {
    // keep_ratio 0.1 of 6 tokens keeps 1: with the class token, only the class token.
    const CascadeTokenPruner<float> pr({.keep_ratio = 0.1, .class_token = true});
    REQUIRE(pr.route(st).kept == std::vector<std::int64_t>{0, 0});
  }
}

TEMPLATE_TEST_CASE("prune cascade: route matches a naive stable sort", "[prune_cascade]", float,
                   double) {
  using T = TestType;
  std::mt19937 gen(7);
  for (const bool cls : {false, true})
    for (const double ratio : {0.05, 0.3, 0.5, 0.77, 1.0})
      for (const std::int64_t N : {1, 2, 9, 64, 197}) {
        CAPTURE(cls, ratio, N);
        const std::int64_t B = 3;
        auto st = TokenImportance<T>::start(B, N);
        // Small integers: many ties. A few NaN.
        for (auto& x : st.score) x = T(std::int64_t(gen() % 5));
        st.score[N / 2] = std::numeric_limits<T>::quiet_NaN();
        const CascadeTokenPruner<T> pr({.keep_ratio = ratio, .class_token = cls});
        const auto plan = pr.route(st);
        REQUIRE_NOTHROW(plan.check());
        const std::int64_t k = pruning_keep_count(N, ratio);
        REQUIRE(plan.num_kept == k);
        for (std::int64_t b = 0; b < B; ++b) {
          const std::vector<T> row(st.score.begin() + b * N, st.score.begin() + (b + 1) * N);
          const auto want = naive_keep(row, k, cls);
          const std::vector<std::int64_t> got(plan.kept.begin() + b * k,
                                              plan.kept.begin() + (b + 1) * k);
          REQUIRE(got == want);
        }
      }
}

TEST_CASE("prune cascade: accumulate adds the mass summed over KV heads", "[prune_cascade]") {
  const std::int64_t B = 2, Hkv = 3, N = 11;
  auto st = TokenImportance<double>::start(B, N);
  for (std::int64_t i = 0; i < st.score.numel(); ++i) st.score[i] = double(i);
  core::Tensor<double> mass({B, Hkv, N});
  std::mt19937 gen(3);
  std::uniform_real_distribution<double> u(0, 2);
  for (auto& x : mass) x = u(gen);
  const CascadeTokenPruner<double> pr;
  pr.accumulate(st, mass);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t j = 0; j < N; ++j) {
      double want = 0;
      for (std::int64_t h = 0; h < Hkv; ++h) want += mass(b, h, j);
      REQUIRE(st.score(b, j) == Approx(double(b * N + j) + want).epsilon(1e-15));
    }
  // A strided mass view (every other KV head) works too.
  const ConstView<double, 3> every_other(mass.data(), {B, 2, N}, {Hkv * N, 2 * N, 1});
  const auto before = st.score;
  pr.accumulate(st, every_other);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t j = 0; j < N; ++j)
      REQUIRE(st.score(b, j) == before(b, j) + (mass(b, 0, j) + mass(b, 2, j)));
}

TEST_CASE("prune cascade: three layers compose; pruned tokens stay pruned", "[prune_cascade]") {
  const std::int64_t B = 2, N0 = 40, C = 5, Hkv = 2;
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> u(0, 1);
  core::Tensor<float> x({B, N0, C});
  for (auto& v : x) v = u(gen);
  auto st = TokenImportance<float>::start(B, N0);
  const CascadeTokenPruner<float> pr({.keep_ratio = 0.6, .class_token = true});
  // Naive bookkeeping by original index: accumulated score and alive flag.
  std::vector<double> naive(std::size_t(B * N0), 0.0);
  std::vector<bool> alive(std::size_t(B * N0), true);
  TokenKeepPlan composed = TokenKeepPlan::identity(B, N0);
  core::Tensor<float> tokens = x;
  core::Tensor<float> src;  // [B, N, N0] source map, built layer by layer
  const std::int64_t expect_n[] = {24, 15, 9};
  for (int layer = 0; layer < 3; ++layer) {
    CAPTURE(layer);
    const std::int64_t N = st.num_tokens;
    core::Tensor<float> mass({B, Hkv, N});
    for (auto& v : mass) v = u(gen);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t j = 0; j < N; ++j)
        for (std::int64_t h = 0; h < Hkv; ++h)
          naive[std::size_t(b * N0 + st.original[std::size_t(b * N + j)])] += mass(b, h, j);
    const TokenKeepPlan plan = pr.prune(st, mass);
    REQUIRE(plan.num_tokens == N);
    REQUIRE(plan.num_kept == expect_n[layer]);
    REQUIRE(st.num_tokens == plan.num_kept);
    REQUIRE(st.original == plan.original);
    // The survivors are the top tokens by naive accumulated score among the alive ones.
    for (std::int64_t b = 0; b < B; ++b) {
      std::vector<double> row;
      std::vector<std::int64_t> ids;
      for (std::int64_t o = 0; o < N0; ++o)
        if (alive[std::size_t(b * N0 + o)]) {
          row.push_back(naive[std::size_t(b * N0 + o)]);
          ids.push_back(o);
        }
      const auto pick = naive_keep(row, plan.num_kept, true);
      std::vector<bool> next(std::size_t(N0), false);
      for (std::int64_t i = 0; i < plan.num_kept; ++i) {
        REQUIRE(plan.original[std::size_t(b * plan.num_kept + i)] == ids[std::size_t(pick[i])]);
        next[std::size_t(ids[std::size_t(pick[i])])] = true;
        // The state's score is the accumulated one (float sums: a few ulp).
        REQUIRE(double(st.score(b, i)) ==
                Approx(naive[std::size_t(b * N0 + ids[std::size_t(pick[i])])]).epsilon(1e-5));
      }
      for (std::int64_t o = 0; o < N0; ++o) alive[std::size_t(b * N0 + o)] = next[std::size_t(o)];
    }
    // Gathers compose: layer by layer equals one gather by the composed plan.
    tokens = plan.gather(tokens);
    src = layer == 0 ? plan.source<float>() : plan.gather(src);
    composed = composed.then(plan);
    REQUIRE(composed.num_kept == plan.num_kept);
    REQUIRE(composed.original == st.original);
    REQUIRE(composed.kept == composed.original);  // the first plan's input is the original
    const auto direct = composed.gather(x);
    REQUIRE(std::memcmp(direct.data(), tokens.data(), sizeof(float) * direct.numel()) == 0);
    // The source map marks each kept token's original position.
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < plan.num_kept; ++i)
        for (std::int64_t o = 0; o < N0; ++o)
          REQUIRE(src(b, i, o) ==
                  (composed.original[std::size_t(b * plan.num_kept + i)] == o ? 1.0f : 0.0f));
    // The class token survives every layer, first.
    for (std::int64_t b = 0; b < B; ++b) REQUIRE(st.original[std::size_t(b * st.num_tokens)] == 0);
  }
}

TEST_CASE("prune cascade: a keep plan composes with a ToMe source map", "[prune_cascade]") {
  // A MergePlan-style [B, N, N0] map (token 1 holds originals 1 and 2) gathered by a keep plan.
  core::Tensor<float> prev({1, 3, 4});
  prev(0, 0, 0) = 1;
  prev(0, 1, 1) = prev(0, 1, 2) = 1;
  prev(0, 2, 3) = 1;
  TokenKeepPlan p{1, 3, 2, 3, {0, 1}, {0, 1}};
  const auto src = p.gather(prev);
  REQUIRE(src.extent(1) == 2);
  REQUIRE(src(0, 1, 1) == 1.0f);
  REQUIRE(src(0, 1, 2) == 1.0f);
  REQUIRE(src(0, 1, 3) == 0.0f);
}

TEST_CASE(
    "prune cascade: token importance from DenseAttention's key mass is SpAtten's sum of "
    "attention probabilities over heads and queries",
    "[prune_cascade]") {
  const std::int64_t B = 2, N = 13, H = 4, Hkv = 2, D = 8;
  const auto q = uniform_tensor<double>({B, N, H, D}, 5);
  const auto k = uniform_tensor<double>({B, N, Hkv, D}, 6);
  const auto v = uniform_tensor<double>({B, N, Hkv, D}, 7);
  core::Tensor<double> mass({B, Hkv, N});
  attention::ForwardOptions<double> opts;
  opts.key_mass = mass.view<3>();
  attention::DenseAttention<double>().forward(q, k, v, {}, opts);
  auto st = TokenImportance<double>::start(B, N);
  CascadeTokenPruner<double>().accumulate(st, mass);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < N; ++t) {
      long double want = 0;
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t i = 0; i < N; ++i) {
          std::vector<long double> s(static_cast<std::size_t>(N));
          long double mx = -1e300L, sum = 0;
          for (std::int64_t j = 0; j < N; ++j) {
            long double d = 0;
            for (std::int64_t c = 0; c < D; ++c)
              d += (long double)q(b, i, h, c) * (long double)k(b, j, h / 2, c);
            s[std::size_t(j)] = d / std::sqrt((long double)D);
            mx = std::max(mx, s[std::size_t(j)]);
          }
          for (auto x : s) sum += std::exp(x - mx);
          want += std::exp(s[std::size_t(t)] - mx) / sum;
        }
      REQUIRE(st.score(b, t) == Approx(double(want)).epsilon(1e-12));
    }
}

TEST_CASE("prune cascade: heads worked out by hand, cascade keeps pruned heads pruned",
          "[prune_cascade]") {
  // B = 1, T = 2, H = 4, D = 2. L1 per head: h0 = 4, h1 = 10, h2 = 10, h3 = 1.
  core::Tensor<float> out({1, 2, 4, 2});
  const float vals[2][4][2] = {{{1, -1}, {2, 3}, {-5, 0}, {0.5f, 0}},
                               {{1, 1}, {-2, 3}, {4, 1}, {0, -0.5f}}};
  for (int t = 0; t < 2; ++t)
    for (int h = 0; h < 4; ++h)
      for (int d = 0; d < 2; ++d) out(0, t, h, d) = vals[t][h][d];
  auto st = HeadImportance<float>::start(1, 4);
  const CascadeHeadPruner<float> pr({.keep_ratio = 0.5});
  pr.accumulate(st, out);
  REQUIRE(st.score(0, 0) == 4.0f);
  REQUIRE(st.score(0, 1) == 10.0f);
  REQUIRE(st.score(0, 2) == 10.0f);
  REQUIRE(st.score(0, 3) == 1.0f);
  auto plan = pr.route(st);
  REQUIRE(plan.num_kept == 2);
  REQUIRE(plan.kept == std::vector<std::int64_t>{1, 2});
  REQUIRE(plan.active == std::vector<std::uint8_t>{0, 1, 1, 0});
  pr.advance(st, plan);
  // Next layer: heads 0 and 3 are inactive (their outputs are not read even if nonzero); head 2
  // gains more. Keep 0.5 of 2 active -> 1: head 2 (10 + 3 > 10 + 1).
  for (int t = 0; t < 2; ++t)
    for (int d = 0; d < 2; ++d) {
      out(0, t, 0, d) = 100.0f;
      out(0, t, 1, d) = 0.25f;
      out(0, t, 2, d) = 0.75f;
    }
  plan = pr.prune(st, out);
  REQUIRE(st.score(0, 0) == 4.0f);  // inactive: unchanged
  REQUIRE(st.score(0, 1) == 11.0f);
  REQUIRE(st.score(0, 2) == 13.0f);
  REQUIRE(plan.kept == std::vector<std::int64_t>{2});
  REQUIRE(st.active == std::vector<std::uint8_t>{0, 0, 1, 0});
  // Ratio 1 of 1 active head keeps it; nothing comes back.
  plan = CascadeHeadPruner<float>().prune(st, out);
  REQUIRE(plan.active == std::vector<std::uint8_t>{0, 0, 1, 0});
}

TEMPLATE_TEST_CASE(
    "prune cascade: head importance and routing match naive references, and "
    "the plan drives DenseAttention's active heads",
    "[prune_cascade]", float, double) {
  using T = TestType;
  const std::int64_t B = 3, N = 17, H = 6, Hkv = 3, D = 8;
  const auto q = uniform_tensor<T>({B, N, H, D}, 21);
  const auto k = uniform_tensor<T>({B, N, Hkv, D}, 22);
  const auto v = uniform_tensor<T>({B, N, Hkv, D}, 23);
  const attention::DenseAttention<T> attn;
  auto st = HeadImportance<T>::start(B, H);
  const CascadeHeadPruner<T> pr({.keep_ratio = 0.6});
  std::vector<double> naive(std::size_t(B * H), 0.0);
  const std::int64_t expect_active[] = {4, 3, 2};
  for (int layer = 0; layer < 3; ++layer) {
    CAPTURE(layer);
    attention::ForwardOptions<T> opts;
    opts.active_heads = st.active;
    const auto out = attn.forward(q, k, v, {}, opts);
    const auto full = attn.forward(q, k, v);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h) {
        const bool on = st.active[std::size_t(b * H + h)] != 0;
        double l1 = 0;
        for (std::int64_t t = 0; t < N; ++t)
          for (std::int64_t d = 0; d < D; ++d) {
            REQUIRE(out(b, t, h, d) == (on ? full(b, t, h, d) : T(0)));
            l1 += std::abs(double(out(b, t, h, d)));
          }
        naive[std::size_t(b * H + h)] += l1;
      }
    const auto before = st.active;
    const auto plan = pr.prune(st, out);
    REQUIRE(plan.num_kept == expect_active[layer]);
    for (std::int64_t b = 0; b < B; ++b) {
      REQUIRE(st.num_active(b) == plan.num_kept);
      // Naive: rank the previously active heads by naive score (a float sum may differ from the
      // double one in the last bits, so compare the ranking only where scores are well apart).
      std::vector<double> cand;
      std::vector<std::int64_t> ids;
      for (std::int64_t h = 0; h < H; ++h)
        if (before[std::size_t(b * H + h)]) {
          cand.push_back(naive[std::size_t(b * H + h)]);
          ids.push_back(h);
          REQUIRE(double(st.score(b, h)) == Approx(naive[std::size_t(b * H + h)]).epsilon(1e-6));
        }
      const auto pick = naive_keep(cand, plan.num_kept, false);
      for (std::int64_t i = 0; i < plan.num_kept; ++i)
        REQUIRE(plan.kept[std::size_t(b * plan.num_kept + i)] == ids[std::size_t(pick[i])]);
      for (std::int64_t h = 0; h < H; ++h)
        if (!before[std::size_t(b * H + h)]) REQUIRE(st.active[std::size_t(b * H + h)] == 0);
    }
  }
}

TEST_CASE("prune cascade: every documented error", "[prune_cascade]") {
  // keep_ratio outside (0, 1].
  for (const double bad : {0.0, -0.5, 1.5, std::nan("")}) {
    CAPTURE(bad);
    REQUIRE_THROWS_AS(CascadeTokenPruner<float>({.keep_ratio = bad}), config_error);
    REQUIRE_THROWS_AS(CascadeHeadPruner<float>({.keep_ratio = bad}), config_error);
  }
  REQUIRE_THROWS_WITH(
      CascadeTokenPruner<float>({.keep_ratio = 0.0}),
      Contains("CascadeTokenPruner") && Contains("'keep_ratio' = 0") && Contains("(0, 1]"));
  REQUIRE_THROWS_WITH(CascadeHeadPruner<float>({.keep_ratio = 2.0}),
                      Contains("CascadeHeadPruner") && Contains("'keep_ratio' = 2"));

  // Attention mass of the wrong shape.
  const CascadeTokenPruner<float> pr({.keep_ratio = 0.5});
  auto st = TokenImportance<float>::start(2, 5);
  const core::Tensor<float> wrong_n({2, 1, 6}), wrong_b({3, 1, 5});
  REQUIRE_THROWS_AS(pr.accumulate(st, wrong_n), shape_error);
  REQUIRE_THROWS_WITH(pr.accumulate(st, wrong_n),
                      Contains("CascadeTokenPruner::accumulate") && Contains("'key_mass'") &&
                          Contains("[B=2, H_kv=1, N=6]") && Contains("[B=2, H_kv, N=5]"));
  REQUIRE_THROWS_WITH(pr.prune(st, wrong_b), Contains("'key_mass'") && Contains("B=3"));
  REQUIRE(st.num_tokens == 5);  // a failed prune leaves the state as it was

  // Gather: x of other tokens, out of the wrong shape, out sharing memory with x.
  const TokenKeepPlan plan = pr.route(st);
  const core::Tensor<float> x_bad({2, 6, 3});
  REQUIRE_THROWS_AS(plan.gather(x_bad), shape_error);
  REQUIRE_THROWS_WITH(plan.gather(x_bad), Contains("TokenKeepPlan::gather") && Contains("'x'") &&
                                              Contains("[B=2, N=6, C=3]") &&
                                              Contains("[B=2, N=5, C]"));
  core::Tensor<float> x({2, 5, 3}), out_bad({2, 4, 3});
  REQUIRE_THROWS_WITH(plan.gather<float>(x, out_bad), Contains("'out'") &&
                                                          Contains("[B=2, N_keep=4, C=3]") &&
                                                          Contains("[B=2, N_keep=3, C=3]"));
  const View<float, 3> overlap(x.data(), {2, 3, 3}, {15, 3, 1});
  REQUIRE_THROWS_WITH(plan.gather<float>(x, overlap), Contains("'out'") && Contains("'x'"));

  // Plans: broken invariants, chaining plans that do not chain, a plan of another state.
  TokenKeepPlan broken = plan;
  broken.kept[1] = broken.kept[0];
  REQUIRE_THROWS_AS(broken.check(), config_error);
  REQUIRE_THROWS_WITH(broken.check(), Contains("TokenKeepPlan::check") && Contains("'kept[1]'"));
  broken = plan;
  broken.original.pop_back();
  REQUIRE_THROWS_WITH(broken.check(), Contains("'original'") && Contains("entries"));
  broken = plan;
  broken.num_kept = 7;
  REQUIRE_THROWS_WITH(broken.check(), Contains("N_keep=7"));
  REQUIRE_THROWS_AS(plan.then(plan), config_error);  // next is for N = 5, this keeps 3
  REQUIRE_THROWS_WITH(plan.then(plan), Contains("TokenKeepPlan::then") && Contains("N=3"));
  auto st2 = TokenImportance<float>::start(2, 5);
  pr.advance(st2, plan);
  const TokenKeepPlan next = pr.route(st2);
  TokenKeepPlan other = next;
  other.original[0] = 4;  // not what token kept[0] is
  std::sort(other.original.begin(), other.original.begin() + other.num_kept);
  REQUIRE_THROWS_WITH(plan.then(other), Contains("different cascades"));
  REQUIRE_NOTHROW(plan.then(next));
  REQUIRE_THROWS_AS(pr.advance(st, next), config_error);  // made for 3 tokens, st has 5
  REQUIRE_THROWS_WITH(pr.advance(st, next), Contains("CascadeTokenPruner::advance") &&
                                                Contains("N=3") && Contains("N=5"));
  REQUIRE_THROWS_WITH(pr.advance(st2, other), Contains("another cascade"));
  REQUIRE_THROWS_AS(TokenKeepPlan::identity(-1, 3), config_error);
  // Sizes whose arrays would pass core::max_buffer_bytes: an error, not an allocation.
  REQUIRE_THROWS_AS(TokenKeepPlan::identity(std::int64_t(1) << 40, std::int64_t(1) << 20),
                    shape_error);
  REQUIRE_THROWS_AS(HeadImportance<float>::start(std::int64_t(1) << 40, std::int64_t(1) << 20),
                    shape_error);

  // A state edited into inconsistency.
  auto bad_state = TokenImportance<float>::start(1, 4);
  bad_state.original[2] = 1;
  REQUIRE_THROWS_WITH(pr.route(bad_state),
                      Contains("TokenImportance::check") && Contains("'original[2]'"));
  bad_state = TokenImportance<float>::start(1, 4);
  bad_state.num_tokens = 3;
  REQUIRE_THROWS_WITH(pr.route(bad_state), Contains("'score'"));

  // Heads: output of the wrong shape, a plan re-activating a pruned head, uneven states.
  const CascadeHeadPruner<float> hp({.keep_ratio = 0.5});
  auto hs = HeadImportance<float>::start(2, 4);
  const core::Tensor<float> out_h({2, 3, 5, 8});
  REQUIRE_THROWS_AS(hp.accumulate(hs, out_h), shape_error);
  REQUIRE_THROWS_WITH(hp.accumulate(hs, out_h), Contains("CascadeHeadPruner::accumulate") &&
                                                    Contains("'head_out'") && Contains("H=5") &&
                                                    Contains("H=4"));
  const HeadKeepPlan hplan = hp.route(hs);
  hp.advance(hs, hplan);
  HeadKeepPlan revive = hplan;
  revive.active.assign(revive.active.size(), 1);
  REQUIRE_THROWS_AS(hp.advance(hs, revive), config_error);
  REQUIRE_THROWS_WITH(hp.advance(hs, revive), Contains("pruned heads stay pruned"));
  HeadKeepPlan small = hplan;
  small.num_heads = 3;
  REQUIRE_THROWS_WITH(hp.advance(hs, small), Contains("H=3") && Contains("H=4"));
  hs.active[0] = hs.active[1] = hs.active[2] = hs.active[3] = 1;
  REQUIRE_THROWS_WITH(hp.route(hs),
                      Contains("CascadeHeadPruner::route") && Contains("same number"));
  hs.active.pop_back();
  REQUIRE_THROWS_WITH(hp.route(hs), Contains("HeadImportance::check"));
  REQUIRE_THROWS_AS(HeadImportance<float>::start(1, -2), config_error);
}

TEST_CASE("prune cascade: empty batches and zero tokens are valid", "[prune_cascade]") {
  auto st = TokenImportance<float>::start(0, 5);
  const CascadeTokenPruner<float> pr({.keep_ratio = 0.5});
  const core::Tensor<float> m({0, 2, 5});
  const auto plan = pr.prune(st, m);
  REQUIRE(plan.num_kept == 3);
  REQUIRE(st.num_tokens == 3);
  auto none = TokenImportance<float>::start(2, 0);
  const core::Tensor<float> m0({2, 1, 0});
  REQUIRE(pr.prune(none, m0).num_kept == 0);
  auto hs = HeadImportance<float>::start(0, 4);
  const core::Tensor<float> o({0, 3, 4, 2});
  REQUIRE(CascadeHeadPruner<float>({.keep_ratio = 0.5}).prune(hs, o).num_kept == 2);
}
