// PlanExecutor (every arch) against a naive double reference of the same pairs on
// random plans (per-head and all-heads groups, write and accumulate, causal and
// self rules, GQA, strided views); memory keys, keep masks and finite masking
// against the same reference; a full plan against ref::dense_attention; empty
// groups, fully masked rows, 1 vs 2 threads, errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <switchyard/attention/dense_ref.hpp>
#include <switchyard/attention/plan_executor.hpp>
#include <vector>

#include "support/compare.hpp"

using namespace switchyard;
using namespace switchyard::attention;
using Catch::Contains;

namespace {

using test_support::uniform_tensor;

// Naive reference of a plan in double: out [B, T, H, D], counts [B, H, T]. Memory
// keys (mk, mv [R, M, D]) come first in each group with memory and are never
// masked; keep masks (qk [B, T], kk [B, S]) mask pairs before the self value;
// finite_mask uses the lowest finite logit instead of -inf.
template <class T>
void reference(const AttentionPlan& p, const core::Tensor<T>& q, const core::Tensor<T>& k,
               const core::Tensor<T>& v, double scale, std::vector<double>& out,
               std::vector<double>& counts, const core::Tensor<T>* mk = nullptr,
               const core::Tensor<T>* mv = nullptr, const std::vector<std::uint8_t>* qk = nullptr,
               const std::vector<std::uint8_t>* kk = nullptr) {
  const double masked = p.rule.finite_mask ? std::numeric_limits<double>::lowest()
                                           : -std::numeric_limits<double>::infinity();
  const std::int64_t S = k.extent(1);
  const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
  const std::int64_t Hkv = k.extent(2);
  out.assign(std::size_t(B * Tq * H * D), 0.0);
  counts.assign(std::size_t(B * H * Tq), 0.0);
  for (std::int64_t g = 0; g < p.num_groups(); ++g) {
    const std::int64_t b = p.group_batch[g];
    for (std::int64_t h = 0; h < H; ++h) {
      if (p.group_head[g] != AttentionPlan::all_heads && p.group_head[g] != h) continue;
      const std::int64_t hk = h / (H / Hkv);
      const std::int64_t row = p.memory_row(g), M = row >= 0 ? p.memory_keys : 0;
      for (const auto i : p.queries(g)) {
        std::vector<double> s;
        double m = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < M; ++j) {
          double x = 0;
          for (std::int64_t d = 0; d < D; ++d)
            x += double(q(b, i, h, d)) * double((*mk)(row, j, d));
          s.push_back(x * scale);
          m = std::max(m, x * scale);
        }
        for (const auto j : p.keys(g)) {
          double x = 0;
          for (std::int64_t d = 0; d < D; ++d) x += double(q(b, i, h, d)) * double(k(b, j, hk, d));
          x *= scale;
          if (qk && !(*qk)[std::size_t(b * Tq + i)]) x = masked;
          if (kk && !(*kk)[std::size_t(b * S + j)]) x = masked;
          if (p.rule.causal && j > i) x = masked;
          if (p.rule.self_value && j == i) x = *p.rule.self_value;
          s.push_back(x);
          m = std::max(m, x);
        }
        std::vector<double> o(std::size_t(D), 0.0);
        if (m > -std::numeric_limits<double>::infinity()) {
          double l = 0;
          for (auto& x : s) l += (x = std::exp(x - m));
          std::size_t jj = 0;
          for (std::int64_t j = 0; j < M; ++j, ++jj)
            for (std::int64_t d = 0; d < D; ++d)
              o[std::size_t(d)] += s[jj] / l * double((*mv)(row, j, d));
          for (const auto j : p.keys(g)) {
            for (std::int64_t d = 0; d < D; ++d)
              o[std::size_t(d)] += s[jj] / l * double(v(b, j, hk, d));
            ++jj;
          }
        }
        for (std::int64_t d = 0; d < D; ++d)
          out[std::size_t(((b * Tq + i) * H + h) * D + d)] += o[std::size_t(d)];
        counts[std::size_t((b * H + h) * Tq + i)] += 1;
      }
    }
  }
}

// Random plan: per (b, h) or all-heads groups of random queries and keys.
AttentionPlan random_plan(std::int64_t B, std::int64_t H, std::int64_t Tq, std::int64_t S,
                          bool per_head, PlanOutput mode, std::uint32_t seed) {
  std::mt19937 rng(seed);
  AttentionPlan p(B, H, Tq, S);
  p.output = mode;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t hs = per_head ? H : 1;
    for (std::int64_t h = 0; h < hs; ++h) {
      // Write mode: a random partition of the queries; accumulate: random subsets.
      std::vector<std::int64_t> perm(static_cast<std::size_t>(Tq));
      for (std::int64_t i = 0; i < Tq; ++i) perm[std::size_t(i)] = i;
      std::shuffle(perm.begin(), perm.end(), rng);
      const int groups = 1 + int(rng() % 4);
      std::size_t at = 0;
      for (int g = 0; g < groups; ++g) {
        std::vector<std::int64_t> qs, ks;
        if (mode == PlanOutput::write) {
          const std::size_t n = g + 1 == groups ? perm.size() - at : rng() % (perm.size() - at + 1);
          qs.assign(perm.begin() + std::ptrdiff_t(at), perm.begin() + std::ptrdiff_t(at + n));
          at += n;
        } else {
          for (std::int64_t i = 0; i < Tq; ++i)
            if (rng() % 2) qs.push_back(i);
          std::shuffle(qs.begin(), qs.end(), rng);
        }
        for (std::int64_t j = 0; j < S; ++j)
          if (rng() % 3) ks.push_back(j);
        std::shuffle(ks.begin(), ks.end(), rng);
        p.add_group(b, per_head ? h : AttentionPlan::all_heads, qs, ks);
      }
    }
  }
  return p;
}

template <class T>
double tol() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-12;
}

template <class T, class Arch>
void check_random(std::int64_t B, std::int64_t H, std::int64_t Hkv, std::int64_t Tq, std::int64_t S,
                  std::int64_t D, bool per_head, PlanOutput mode, bool causal, bool self,
                  std::uint32_t seed) {
  CAPTURE(B, H, Hkv, Tq, S, D, per_head, int(mode), causal, self, seed);
  const auto q = uniform_tensor<T>({B, Tq, H, D}, seed);
  const auto k = uniform_tensor<T>({B, S, Hkv, D}, seed + 1);
  const auto v = uniform_tensor<T>({B, S, Hkv, D}, seed + 2);
  auto p = random_plan(B, H, Tq, S, per_head, mode, seed + 3);
  p.rule.causal = causal;
  if (self) p.rule.self_value = -3.0;
  const double scale = 0.37;
  core::Tensor<T> out({B, Tq, H, D}), counts({B, H, Tq});
  for (auto& x : out) x = T(123);  // overwritten everywhere
  PlanExecutor<T, Arch>({.scale = scale}).execute(p, q, k, v, out, counts);
  std::vector<double> want, want_counts;
  reference(p, q, k, v, double(T(scale)), want, want_counts);
  double err = 0, mx = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(double(out.data()[i]) - want[i]));
    mx = std::max(mx, std::abs(want[i]));
  }
  CHECK(err <= tol<T>() * std::max(1.0, mx));
  if (mode == PlanOutput::accumulate) {
    for (std::size_t i = 0; i < want_counts.size(); ++i)
      REQUIRE(double(counts.data()[i]) == want_counts[i]);
  }
}

// Random plan with memory (random rows of R, some groups without), random keep
// masks, finite or -inf masking.
template <class T, class Arch>
void check_extras(PlanOutput mode, bool causal, bool self, bool finite, std::int64_t M,
                  std::uint32_t seed) {
  const std::int64_t B = 2, H = 2, Hkv = 1, Tq = 37, S = 37, D = 19, R = 5;
  CAPTURE(int(mode), causal, self, finite, M, seed);
  const auto q = uniform_tensor<T>({B, Tq, H, D}, seed);
  const auto k = uniform_tensor<T>({B, S, Hkv, D}, seed + 1);
  const auto v = uniform_tensor<T>({B, S, Hkv, D}, seed + 2);
  core::Tensor<T> mk({R, M, D}), mv({R, M, D});
  {
    const auto a = uniform_tensor<T>({1, R, M, D}, seed + 3);
    const auto c = uniform_tensor<T>({1, R, M, D}, seed + 4);
    std::copy(a.begin(), a.end(), mk.begin());
    std::copy(c.begin(), c.end(), mv.begin());
  }
  auto p = random_plan(B, H, Tq, S, true, mode, seed + 5);
  p.rule.causal = causal;
  p.rule.finite_mask = finite;
  if (self) p.rule.self_value = -3.0;
  p.memory_keys = M;
  std::mt19937 rng(seed + 6);
  p.group_memory.resize(std::size_t(p.num_groups()));
  for (auto& r : p.group_memory) r = std::int64_t(rng() % (R + 1)) - 1;  // -1: none
  std::vector<std::uint8_t> qk(std::size_t(B * Tq)), kk(std::size_t(B * S));
  for (auto& x : qk) x = rng() % 4 != 0;
  for (auto& x : kk) x = rng() % 2 != 0;
  core::Tensor<T> out({B, Tq, H, D}), counts({B, H, Tq});
  PlanExecutor<T, Arch>({.scale = 0.37})
      .execute(p, q, k, v, out, counts,
               {.memory_k = mk, .memory_v = mv, .query_keep = qk, .key_keep = kk});
  std::vector<double> want, want_counts;
  reference(p, q, k, v, double(T(0.37)), want, want_counts, &mk, &mv, &qk, &kk);
  double err = 0, mx = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(double(out.data()[i]) - want[i]));
    mx = std::max(mx, std::abs(want[i]));
  }
  CHECK(err <= tol<T>() * std::max(1.0, mx));
}

}  // namespace

TEST_CASE("plan executor: memory keys, keep masks, finite masking", "[plan][memory]") {
  simd::for_each_arch([](auto arch) {
    using A = decltype(arch);
    CAPTURE(A::name());
    constexpr bool main_arch = simd::is_scalar_v<A> || std::is_same_v<A, simd::default_arch>;
    std::uint32_t seed = 500;
    for (const auto mode : {PlanOutput::write, PlanOutput::accumulate})
      for (const bool causal : {false, true})
        for (const bool finite : {false, true}) {
          if (main_arch || causal == finite)
            check_extras<float, A>(mode, causal, causal != finite, finite, 1 + seed % 3, seed);
          seed += 7;
        }
    check_extras<double, A>(PlanOutput::accumulate, true, true, true, 2, 77);
  });
  // Errors: memory missing or of the wrong shape, a row past the table, mask sizes.
  const auto q = uniform_tensor<float>({1, 4, 2, 8}, 1);
  core::Tensor<float> out({1, 4, 2, 8}), mk({2, 3, 8}), bad({2, 3, 7});
  auto p = full_plan(1, 2, 4, 4);
  p.memory_keys = 3;
  p.group_memory = {1};
  const PlanExecutor<float> ex;
  REQUIRE_THROWS_WITH(ex.execute(p, q, q, q, out), Contains("PlanExecutor::execute") &&
                                                       Contains("'memory_k'") && Contains("M=3"));
  REQUIRE_THROWS_AS(ex.execute(p, q, q, q, out), shape_error);
  REQUIRE_THROWS_WITH(ex.execute(p, q, q, q, out, {}, {.memory_k = bad, .memory_v = bad}),
                      Contains("'memory_k'") && Contains("D=7"));
  REQUIRE_THROWS_WITH(ex.execute(p, q, q, q, out, {}, {.memory_k = mk, .memory_v = bad}),
                      Contains("'memory_v'") && Contains("D=7"));
  p.group_memory = {2};
  REQUIRE_THROWS_WITH(ex.execute(p, q, q, q, out, {}, {.memory_k = mk, .memory_v = mk}),
                      Contains("'memory_k'") && Contains("R >= 3"));
  p.group_memory = {-2};
  REQUIRE_THROWS_WITH(ex.execute(p, q, q, q, out, {}, {.memory_k = mk, .memory_v = mk}),
                      Contains("memory row -2"));
  REQUIRE_THROWS_AS(ex.execute(p, q, q, q, out, {}, {.memory_k = mk, .memory_v = mk}),
                    config_error);
  const std::vector<std::uint8_t> keep3(3, 1);
  REQUIRE_THROWS_WITH(
      ex.execute(full_plan(1, 2, 4, 4), q, q, q, out, {}, {.query_keep = keep3}),
      Contains("'query_keep'") && Contains("[3 entries]") && Contains("[B, T] = 4 entries"));
  REQUIRE_THROWS_AS(ex.execute(full_plan(1, 2, 4, 4), q, q, q, out, {}, {.key_keep = keep3}),
                    shape_error);
}

TEST_CASE("plan executor matches the naive reference on random plans", "[plan]") {
  simd::for_each_arch([](auto arch) {
    using A = decltype(arch);
    CAPTURE(A::name());
    std::uint32_t seed = 1;
    for (const bool per_head : {true, false})
      for (const auto mode : {PlanOutput::write, PlanOutput::accumulate})
        for (const bool causal : {false, true})
          for (const bool self : {false, true}) {
            // Every combination on the scalar path and the build's arch; the other
            // archs (same code, other lane widths) run a quarter of them.
            constexpr bool main_arch =
                simd::is_scalar_v<A> || std::is_same_v<A, simd::default_arch>;
            if (main_arch || (causal == self && per_head == (mode == PlanOutput::write)))
              check_random<float, A>(2, 4, 2, 37, 41, 19, per_head, mode, causal, self, seed);
            // Larger groups (several tiles, key blocks and query chunks): the build's arch.
            if (std::is_same_v<A, simd::default_arch> && causal == self)
              check_random<float, A>(1, 2, 2, 300, 150, 16, per_head, mode, causal, self, seed + 1);
            seed += 2;
          }
    check_random<double, A>(2, 2, 1, 23, 29, 8, true, PlanOutput::accumulate, true, true, 99);
    check_random<double, A>(1, 3, 3, 13, 200, 33, false, PlanOutput::write, false, false, 98);
  });
}

TEST_CASE("a full plan equals dense attention", "[plan]") {
  for (const bool causal : {false, true}) {
    for (const std::int64_t Tq : {1, 7, 130, 300}) {
      CAPTURE(causal, Tq);
      const std::int64_t B = 1, H = 2, Hkv = 1, D = 24;
      const auto q = uniform_tensor<float>({B, Tq, H, D}, 5);
      const auto k = uniform_tensor<float>({B, Tq, Hkv, D}, 6);
      const auto v = uniform_tensor<float>({B, Tq, Hkv, D}, 7);
      const auto got = PlanExecutor<float>().execute(full_plan(B, H, Tq, Tq, causal), q, k, v);
      core::Tensor<double> qd({B, Tq, H, D}), kd({B, Tq, Hkv, D}), vd({B, Tq, Hkv, D}),
          want({B, Tq, H, D});
      std::copy(q.begin(), q.end(), qd.begin());
      std::copy(k.begin(), k.end(), kd.begin());
      std::copy(v.begin(), v.end(), vd.begin());
      Mask<double> mask;
      if (causal) mask = Mask<double>(CausalMask{});
      ref::dense_attention<double>(qd, kd, vd, want, mask);
      double err = 0;
      for (std::int64_t i = 0; i < got.numel(); ++i)
        err = std::max(err, std::abs(double(got.data()[i]) - want.data()[i]));
      CHECK(err <= 2e-6);
    }
  }
}

TEST_CASE("empty groups and fully masked rows give zeros", "[plan]") {
  const std::int64_t B = 1, H = 2, Tq = 8, D = 8;
  const auto q = uniform_tensor<float>({B, Tq, H, D}, 1);
  const auto k = uniform_tensor<float>({B, Tq, H, D}, 2);
  const auto v = uniform_tensor<float>({B, Tq, H, D}, 3);
  AttentionPlan p(B, H, Tq, Tq);
  p.rule.causal = true;
  const std::vector<std::int64_t> q0{0, 1}, k0{5, 6}, q1{2, 3}, none{}, q2{4}, k2{4, 7};
  p.add_group(0, 0, q0, k0);    // every pair causally masked
  p.add_group(0, 0, q1, none);  // no keys
  p.add_group(0, 1, none, k0);  // no queries
  p.add_group(0, 1, q2, k2);    // sees key 4 only
  core::Tensor<float> out({B, Tq, H, D});
  for (auto& x : out) x = std::numeric_limits<float>::quiet_NaN();
  PlanExecutor<float>().execute(p, q, k, v, out);
  for (std::int64_t i = 0; i < Tq; ++i)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t d = 0; d < D; ++d) {
        CAPTURE(i, h, d);
        if (i == 4 && h == 1) {
          CHECK(out(0, i, h, d) == Approx(v(0, 4, 1, d)).epsilon(1e-6));
        } else {
          CHECK(out(0, i, h, d) == 0.0f);
        }
      }
}

TEST_CASE("plan executor: 1 and 2 threads are bit-identical", "[plan][threads]") {
  const std::int64_t B = 2, H = 4, Tq = 200, D = 32;
  const auto q = uniform_tensor<float>({B, Tq, H, D}, 11);
  const auto k = uniform_tensor<float>({B, Tq, H, D}, 12);
  const auto v = uniform_tensor<float>({B, Tq, H, D}, 13);
  for (const auto mode : {PlanOutput::write, PlanOutput::accumulate}) {
    auto p = random_plan(B, H, Tq, Tq, true, mode, 14);
    p.rule.causal = true;
    p.rule.self_value = -5e4;
    core::Tensor<float> o1({B, Tq, H, D}), o2({B, Tq, H, D}), c1({B, H, Tq}), c2({B, H, Tq});
    {
      ScopedNumThreads t(1);
      PlanExecutor<float>().execute(p, q, k, v, o1, c1);
    }
    {
      ScopedNumThreads t(2);
      PlanExecutor<float>().execute(p, q, k, v, o2, c2);
    }
    CHECK(std::memcmp(o1.data(), o2.data(), sizeof(float) * std::size_t(o1.numel())) == 0);
    CHECK(std::memcmp(c1.data(), c2.data(), sizeof(float) * std::size_t(c1.numel())) == 0);
  }
}

TEST_CASE("plan executor errors name the argument and shapes", "[plan][errors]") {
  const auto q = uniform_tensor<float>({1, 4, 2, 8}, 1);
  const auto k = uniform_tensor<float>({1, 5, 2, 8}, 2);
  core::Tensor<float> out({1, 4, 2, 8});
  const PlanExecutor<float> ex;
  REQUIRE_THROWS_WITH(ex.execute(full_plan(1, 2, 4, 6), q, k, k, out),
                      Contains("PlanExecutor::execute") && Contains("'plan'") &&
                          Contains("[B=1, H=2, T=4, S=6]") && Contains("S=5"));
  REQUIRE_THROWS_AS(ex.execute(full_plan(1, 2, 4, 6), q, k, k, out), shape_error);
  auto p = full_plan(1, 2, 4, 5);
  p.key_index[2] = 9;
  REQUIRE_THROWS_WITH(ex.execute(p, q, k, k, out),
                      Contains("PlanExecutor::execute") && Contains("key index 9"));
  auto dup = full_plan(1, 2, 4, 5);
  dup.add_group(0, 1, std::vector<std::int64_t>{2}, std::vector<std::int64_t>{0});
  REQUIRE_THROWS_WITH(ex.execute(dup, q, k, k, out), Contains("two groups in write mode"));
  core::Tensor<float> bad({1, 4, 2, 7});
  REQUIRE_THROWS_WITH(ex.execute(full_plan(1, 2, 4, 5), q, k, k, bad),
                      Contains("'out'") && Contains("D=7"));
  core::Tensor<float> counts({1, 2, 3});
  REQUIRE_THROWS_WITH(ex.execute(full_plan(1, 2, 4, 5), q, k, k, out, counts),
                      Contains("'counts'") && Contains("T=3"));
}
