// Decoding: KVCache (append, views, keep, errors), split-KV DenseAttention::decode against a
// naive long-double reference (GQA, ragged lengths, several chunks, T_new > 1, bias, key mass,
// inactive heads), thread-count determinism, prefill-in-chunks-then-decode equal to one
// forward; the MoE layer's decode path against the prefill path and batch invariance; linear
// attention's chunked prefill followed by steps against one causal forward.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <switchyard/attention/dense.hpp>
#include <switchyard/attention/kv_cache.hpp>
#include <switchyard/attention/kv_eviction.hpp>
#include <switchyard/attention/linear.hpp>
#include <switchyard/core/parallel_for.hpp>
#include <switchyard/moe/layer.hpp>
#include <vector>

#include "support/compare.hpp"
#include "support/fixtures.hpp"

using namespace switchyard;
using namespace switchyard::attention;
using Catch::Contains;
using test_support::random_tensor;

namespace {

// Fills a cache with per-sequence lengths lens[b] (every head), from k, v: [B, S, H_kv, D].
template <class T, class S>
void fill_cache(KVCache<T, S>& cache, const Tensor<T>& k, const Tensor<T>& v,
                const std::vector<std::int64_t>& lens) {
  const auto kv = k.template view<4>();
  const auto vv = v.template view<4>();
  for (std::int64_t b = 0; b < cache.batch(); ++b) {
    ConstView<T, 3> kb = kv[b], vb = vv[b];
    cache.append(b, kb.slice(0, 0, lens[std::size_t(b)]), vb.slice(0, 0, lens[std::size_t(b)]));
  }
}

struct DecodeRef {
  std::vector<long double> out;   // [B, Tn, H, D]
  std::vector<long double> mass;  // [B, Hkv, S]
};

// Naive decode: query t of sequence b sees keys j < len_b - Tn + t + 1 of k, v [B, S, Hkv, D];
// bias [H, Tn, S] or null; active [B*Tn*H] or empty.
template <class T>
DecodeRef decode_reference(const Tensor<T>& q, const Tensor<T>& k, const Tensor<T>& v,
                           const std::vector<std::int64_t>& lens, double scale,
                           const Tensor<T>* bias, const std::vector<std::uint8_t>& active) {
  const auto qv = q.template view<4>();
  const auto kv = k.template view<4>();
  const auto vv = v.template view<4>();
  const std::int64_t B = qv.extent(0), Tn = qv.extent(1), H = qv.extent(2), D = qv.extent(3);
  const std::int64_t S = kv.extent(1), Hkv = kv.extent(2), group = H / Hkv;
  DecodeRef r;
  r.out.assign(std::size_t(B * Tn * H * D), 0.0L);
  r.mass.assign(std::size_t(B * Hkv * S), 0.0L);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < Tn; ++t)
      for (std::int64_t h = 0; h < H; ++h) {
        if (!active.empty() && !active[std::size_t((b * Tn + t) * H + h)]) continue;
        const std::int64_t hk = h / group, n = lens[std::size_t(b)] - Tn + t + 1;
        std::vector<long double> s(static_cast<std::size_t>(n));
        long double mx = -std::numeric_limits<long double>::infinity();
        for (std::int64_t j = 0; j < n; ++j) {
          long double dot = 0;
          for (std::int64_t d = 0; d < D; ++d) dot += (long double)qv(b, t, h, d) * kv(b, j, hk, d);
          s[std::size_t(j)] = dot * scale;
          if (bias) s[std::size_t(j)] += (long double)bias->template view<3>()(h, t, j);
          mx = std::max(mx, s[std::size_t(j)]);
        }
        if (mx == -std::numeric_limits<long double>::infinity()) continue;
        long double sum = 0;
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (std::int64_t j = 0; j < n; ++j) {
          const long double p = s[std::size_t(j)] / sum;
          r.mass[std::size_t((b * Hkv + hk) * S + j)] += p;
          for (std::int64_t d = 0; d < D; ++d)
            r.out[std::size_t(((b * Tn + t) * H + h) * D + d)] += p * vv(b, j, hk, d);
        }
      }
  return r;
}

template <class T>
double max_err(const Tensor<T>& got, const std::vector<long double>& want) {
  double e = 0;
  std::size_t i = 0;
  for (auto x : got) e = std::max(e, double(std::abs((long double)x - want[i++])));
  return e;
}

struct DecodeCase {
  std::int64_t B, H, Hkv, D, Tn;
  std::vector<std::int64_t> lens;
  bool bias, mass, active;
  std::int64_t S() const { return *std::max_element(lens.begin(), lens.end()); }
  std::int64_t capacity() const { return S() + 3; }
};

// Random q [B, Tn, H, D], k, v [B, S, H_kv, D], a bias [H, Tn, capacity] in [-2, 2] (every
// 7th draw -inf when masked_bias) and every third head inactive when c.active.
struct DecodeInputs {
  Tensor<float> q, k, v, bias;
  std::vector<std::uint8_t> active;
  DecodeInputs(const DecodeCase& c, std::uint32_t seed, bool masked_bias)
      : q(random_tensor<float>({c.B, c.Tn, c.H, c.D}, seed)),
        k(random_tensor<float>({c.B, c.S(), c.Hkv, c.D}, seed + 1)),
        v(random_tensor<float>({c.B, c.S(), c.Hkv, c.D}, seed + 2)),
        bias({c.H, c.Tn, c.capacity()}) {
    std::mt19937 gen(seed + 3);
    std::uniform_real_distribution<double> u(-2.0, 2.0);
    for (auto& x : bias)
      x = masked_bias && gen() % 7 == 0 ? -std::numeric_limits<float>::infinity() : float(u(gen));
    if (c.active)
      for (std::int64_t i = 0; i < c.B * c.Tn * c.H; ++i) active.push_back(i % 3 != 1);
  }
};

// Appends k, v [B, T, H_kv, D] to the empty cache in chunks of 70 and 60 attended through
// forward over the cache (check(t0, n, that chunk of out) after each), then steps of 1
// through decode, writing out [B, T, H, D].
template <class S, class Check>
void prefill_then_decode(const DenseAttention<float>& attn, const Tensor<float>& q,
                         const Tensor<float>& k, const Tensor<float>& v, KVCache<float, S>& cache,
                         Tensor<float>& out, Check&& check) {
  std::int64_t t0 = 0;
  for (std::int64_t n : {70, 60, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}) {
    cache.append(k.view<4>().slice(1, t0, t0 + n), v.view<4>().slice(1, t0, t0 + n));
    const auto qc = q.view<4>().slice(1, t0, t0 + n);
    const auto oc = out.view<4>().slice(1, t0, t0 + n);
    if (n > 1) {
      attn.forward(qc, cache.keys_as_sequence(t0 + n), cache.values_as_sequence(t0 + n), oc,
                   CausalMask{t0});
      check(t0, n, oc);
    } else {
      attn.decode(qc, cache, oc);
    }
    t0 += n;
  }
  REQUIRE(t0 == q.view<4>().extent(1));
}

}  // namespace

TEST_CASE("KVCache: append, lengths, views, reset", "[kv_cache]") {
  KVCache<float> cache(2, 3, 5, 8);
  CHECK(cache.row_stride() == 16);
  const auto k = random_tensor<float>({2, 4, 3, 5}, 1), v = random_tensor<float>({2, 4, 3, 5}, 2);
  cache.append(k.view<4>().slice(1, 0, 3), v.view<4>().slice(1, 0, 3));
  CHECK(cache.length(0) == 3);
  CHECK(cache.length(1, 2) == 3);
  cache.append(1, k.view<4>()[1].slice(0, 3, 4), v.view<4>()[1].slice(0, 3, 4));
  CHECK(cache.length(0) == 3);
  CHECK(cache.length(1) == 4);
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 3; ++h) {
      const auto ks = cache.keys(b, h), vs = cache.values(b, h);
      REQUIRE(ks.extent(0) == cache.length(b, h));
      for (std::int64_t j = 0; j < ks.extent(0); ++j)
        for (std::int64_t d = 0; d < 5; ++d) {
          CHECK(ks(j, d) == k.view<4>()(b, j, h, d));
          CHECK(vs(j, d) == v.view<4>()(b, j, h, d));
          CHECK(cache.keys_as_sequence(4)(b, j, h, d) == k.view<4>()(b, j, h, d));
        }
    }
  cache.reset(0);
  CHECK(cache.length(0) == 0);
  CHECK(cache.length(1) == 4);
  cache.reset();
  CHECK(cache.length(1) == 0);
}

TEST_CASE("KVCache: errors leave the cache unchanged", "[kv_cache][errors]") {
  CHECK_THROWS_AS(KVCache<float>(0, 1, 1, 1), config_error);
  CHECK_THROWS_AS(KVCache<float>(1, 1, 1, 0), config_error);
  CHECK_THROWS_AS(KVCache<float>(1 << 20, 1 << 20, 128, 1 << 20), shape_error);
  KVCache<float> cache(2, 2, 4, 5);
  const auto k = random_tensor<float>({2, 3, 2, 4}, 3);
  cache.append(k.view<4>(), k.view<4>());
  cache.append(1, k.view<4>()[0].slice(0, 0, 2), k.view<4>()[0].slice(0, 0, 2));
  // Sequence 1 holds 5; appending 1 more to every sequence passes its capacity.
  try {
    cache.append(k.view<4>().slice(1, 0, 1), k.view<4>().slice(1, 0, 1));
    FAIL("no throw");
  } catch (const config_error& e) {
    CHECK_THAT(e.what(), Contains("sequence 1") && Contains("holds 5") && Contains("capacity 5"));
  }
  CHECK(cache.length(0) == 3);  // nothing written to sequence 0 either
  CHECK(cache.length(1) == 5);
  const auto bad = random_tensor<float>({2, 1, 3, 4}, 4);
  CHECK_THROWS_AS(cache.append(bad.view<4>(), bad.view<4>()), shape_error);
  CHECK_THROWS_AS(cache.append(k.view<4>(), bad.view<4>()), shape_error);
  CHECK_THROWS_AS(cache.append(2, k.view<4>()[0], k.view<4>()[0]), config_error);
  CHECK_THROWS_AS(cache.length(0, 2), config_error);
  CHECK_THROWS_AS(cache.keys_as_sequence(6), config_error);
  // Appending a view of the cache itself.
  const auto own = cache.keys_as_sequence(1);
  CHECK_THROWS_AS(cache.append(0, own[0], own[0]), shape_error);
  CHECK(cache.length(0) == 3);
}

TEST_CASE("KVCache::keep compacts each head in place", "[kv_cache]") {
  KVCache<float> cache(2, 2, 3, 6);
  const auto k = random_tensor<float>({2, 6, 2, 3}, 5), v = random_tensor<float>({2, 6, 2, 3}, 6);
  cache.append(k.view<4>(), v.view<4>());
  KVKeepPlan plan;
  plan.offsets = {0, 3, 3, 5, 11};
  plan.positions = {0, 2, 5, /* (0,1) keeps none */ 4, 5, 0, 1, 2, 3, 4, 5};
  cache.keep(plan);
  CHECK(cache.length(0, 0) == 3);
  CHECK(cache.length(0, 1) == 0);
  CHECK(cache.length(1, 0) == 2);
  CHECK(cache.length(1, 1) == 6);
  CHECK_THROWS_AS(cache.length(0), config_error);  // heads differ now
  const std::int64_t kept00[] = {0, 2, 5}, kept10[] = {4, 5};
  for (int j = 0; j < 3; ++j)
    for (int d = 0; d < 3; ++d) {
      CHECK(cache.keys(0, 0)(j, d) == k.view<4>()(0, kept00[j], 0, d));
      CHECK(cache.values(0, 0)(j, d) == v.view<4>()(0, kept00[j], 0, d));
    }
  for (int j = 0; j < 2; ++j)
    for (int d = 0; d < 3; ++d) CHECK(cache.values(1, 0)(j, d) == v.view<4>()(1, kept10[j], 0, d));
  for (int j = 0; j < 6; ++j)
    for (int d = 0; d < 3; ++d) CHECK(cache.keys(1, 1)(j, d) == k.view<4>()(1, j, 1, d));

  // Malformed plans: nothing changes.
  KVKeepPlan bad = plan;
  bad.offsets = {0, 1, 1, 1};
  CHECK_THROWS_WITH(cache.keep(bad), Contains("offsets"));
  bad = {{0, 2, 2, 2, 2}, {1, 1}, {}};
  CHECK_THROWS_WITH(cache.keep(bad), Contains("strictly ascending"));
  bad = {{0, 1, 1, 1, 1}, {3}, {}};  // (0, 0) holds 3
  CHECK_THROWS_WITH(cache.keep(bad), Contains("out of range [0, 3)"));
  bad = {{0, 1, 1, 1, 1}, {-1}, {}};
  CHECK_THROWS_WITH(cache.keep(bad), Contains("out of range"));
  bad = {{0, 5, 0, 0, 0}, {}, {}};  // a middle offset past the positions (found by fuzzing)
  CHECK_THROWS_WITH(cache.keep(bad), Contains("pass positions.size()"));
  CHECK(cache.length(0, 0) == 3);
  CHECK(cache.length(1, 1) == 6);
}

TEST_CASE("DenseAttention::decode matches a naive reference", "[decode]") {
  const std::vector<DecodeCase> cases = {
      {1, 4, 4, 16, 1, {7}, false, false, false},
      {2, 8, 2, 40, 1, {300, 1}, false, true, false},
      {2, 6, 3, 33, 3, {5, 700}, true, true, false},
      {1, 32, 8, 128, 1, {1100}, false, true, false},
      {3, 4, 1, 24, 4, {4, 9, 260}, true, true, true},
      {1, 2, 2, 8, 64, {600}, false, true, false},
  };
  for (const auto& c : cases) {
    const std::int64_t S = c.S(), cap = c.capacity();
    DYNAMIC_SECTION("B=" << c.B << " H=" << c.H << " Hkv=" << c.Hkv << " D=" << c.D
                         << " Tn=" << c.Tn << " S=" << S) {
      const DecodeInputs in(c, 11, true);
      const auto &q = in.q, &k = in.k, &v = in.v, &bias = in.bias;
      const auto& active = in.active;
      KVCache<float> cache(c.B, c.Hkv, c.D, cap);
      fill_cache(cache, k, v, c.lens);
      Tensor<float> mass({c.B, c.Hkv, cap});
      for (auto& x : mass) x = -7.0f;  // untouched past the lengths
      DecodeOptions<float> opts;
      if (c.bias) opts.bias = bias.view<3>();
      if (c.mass) opts.key_mass = mass.view<3>();
      opts.active_heads = active;
      const double scale = 1.0 / std::sqrt(double(c.D));
      const auto want = decode_reference(q, k, v, c.lens, scale, c.bias ? &bias : nullptr, active);
      Tensor<float> out({c.B, c.Tn, c.H, c.D});
      DenseAttention<float> attn;
      attn.decode(q.view<4>(), cache, out.view<4>(), opts);
      CHECK(max_err(out, want.out) < 2e-5);
      if (c.mass) {
        double e = 0;
        for (std::int64_t b = 0; b < c.B; ++b)
          for (std::int64_t h = 0; h < c.Hkv; ++h)
            for (std::int64_t j = 0; j < cap; ++j) {
              const float got = mass.view<3>()(b, h, j);
              if (j >= c.lens[std::size_t(b)]) {
                CHECK(got == -7.0f);
              } else {
                e = std::max(
                    e, double(std::abs(got - want.mass[std::size_t((b * c.Hkv + h) * S + j)])));
              }
            }
        CHECK(e < 1e-5);
        // accumulate adds a second, equal contribution.
        Tensor<float> mass2 = mass;
        opts.key_mass = mass2.view<3>();
        opts.accumulate_key_mass = true;
        attn.decode(q.view<4>(), cache, out.view<4>(), opts);
        for (std::int64_t b = 0; b < c.B; ++b)
          for (std::int64_t j = 0; j < c.lens[std::size_t(b)]; ++j)
            CHECK(mass2.view<3>()(b, 0, j) == Approx(2 * mass.view<3>()(b, 0, j)).margin(1e-6));
      }
    }
  }
}

TEST_CASE("DenseAttention::decode: hand-computed values", "[decode]") {
  // One head, D = 1, keys 0 and ln 3, values 1 and 5, q = 1, scale 1: the weights are 1/4 and
  // 3/4, so the output is 1/4 + 15/4 = 4 and the key mass (1/4, 3/4).
  KVCache<double> cache(1, 1, 1, 4);
  const double kd[] = {0.0, std::log(3.0)}, vd[] = {1.0, 5.0}, qd[] = {1.0};
  cache.append(ConstView<double, 4>(kd, {1, 2, 1, 1}), ConstView<double, 4>(vd, {1, 2, 1, 1}));
  DenseAttention<double> attn({.scale = 1.0});
  double out[1], mass[4] = {9, 9, 9, 9};
  DecodeOptions<double> opts;
  opts.key_mass = View<double, 3>(mass, {1, 1, 4});
  attn.decode(ConstView<double, 4>(qd, {1, 1, 1, 1}), cache, View<double, 4>(out, {1, 1, 1, 1}),
              opts);
  CHECK(out[0] == Approx(4.0).epsilon(1e-12));
  CHECK(mass[0] == Approx(0.25).epsilon(1e-12));
  CHECK(mass[1] == Approx(0.75).epsilon(1e-12));
  CHECK(mass[2] == 9);
  // A bias of -inf on every key: the row sees nothing and gives zeros.
  const double ninf = -std::numeric_limits<double>::infinity();
  const double bias[4] = {ninf, ninf, ninf, ninf};
  opts.bias = ConstView<double, 3>(bias, {1, 1, 4});
  opts.key_mass = {};
  attn.decode(ConstView<double, 4>(qd, {1, 1, 1, 1}), cache, View<double, 4>(out, {1, 1, 1, 1}),
              opts);
  CHECK(out[0] == 0.0);
}

TEST_CASE("DenseAttention::decode is bit-identical for 1 and 2 threads", "[decode]") {
  const std::int64_t B = 2, H = 8, Hkv = 2, D = 64, S = 3000, Tn = 2;
  const auto q = random_tensor<float>({B, Tn, H, D}, 21);
  const auto k = random_tensor<float>({B, S, Hkv, D}, 22);
  const auto v = random_tensor<float>({B, S, Hkv, D}, 23);
  KVCache<float> cache(B, Hkv, D, S);
  fill_cache(cache, k, v, {S, 2001});
  DenseAttention<float> attn;
  Tensor<float> o1({B, Tn, H, D}), o2({B, Tn, H, D}), m1({B, Hkv, S}), m2({B, Hkv, S});
  DecodeOptions<float> opts;
  {
    ScopedNumThreads one(1);
    opts.key_mass = m1.view<3>();
    attn.decode(q.view<4>(), cache, o1.view<4>(), opts);
  }
  {
    ScopedNumThreads two(2);
    opts.key_mass = m2.view<3>();
    attn.decode(q.view<4>(), cache, o2.view<4>(), opts);
  }
  CHECK(std::equal(o1.begin(), o1.end(), o2.begin()));
  CHECK(std::equal(m1.begin(), m1.end(), m2.begin()));
}

TEST_CASE("Prefill in chunks, then decode, equals one causal forward", "[decode]") {
  const std::int64_t B = 2, H = 4, Hkv = 2, D = 32, T = 150;
  const auto q = random_tensor<float>({B, T, H, D}, 31);
  const auto k = random_tensor<float>({B, T, Hkv, D}, 32);
  const auto v = random_tensor<float>({B, T, Hkv, D}, 33);
  DenseAttention<float> attn;
  Tensor<float> full({B, T, H, D}), inc({B, T, H, D});
  attn.forward(q.view<4>(), k.view<4>(), v.view<4>(), full.view<4>(), CausalMask{});
  KVCache<float> cache(B, Hkv, D, T);
  prefill_then_decode(attn, q, k, v, cache, inc, [](auto...) {});
  double e = 0;
  for (std::int64_t i = 0; i < full.numel(); ++i)
    e = std::max(e, double(std::abs(full.data()[i] - inc.data()[i])));
  CHECK(e < 1e-5);
}

// x rounded to the nearest bf16 (ties to even), as a float tensor.
Tensor<float> bf16_rounded(const Tensor<float>& x) {
  Tensor<float> r = x;
  for (auto& e : r) e = to_float(bf16::from_float(e));
  return r;
}

TEST_CASE("KVCache<float, bf16>: append rounds to bf16, keep moves the stored rows", "[kv_cache]") {
  KVCache<float, bf16> cache(2, 3, 5, 8);
  CHECK(cache.row_stride() == 32);  // 64 bytes of bf16
  // Values that round differently: ties go to the even upper half, others to the nearest.
  Tensor<float> k({2, 4, 3, 5}), v({2, 4, 3, 5});
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  for (auto& x : k) x = u(gen);
  for (auto& x : v) x = u(gen);
  k.data()[0] = 1.0f + 0x1p-8f;             // a tie between 1 and 1 + 2^-7: rounds to even, 1
  k.data()[1] = 1.0f + 0x1p-8f + 0x1p-20f;  // just past the tie: 1 + 2^-7
  cache.append(k.view<4>(), v.view<4>());
  CHECK(cache.keys(0, 0)(0, 0).bits == 0x3F80);
  CHECK(cache.keys(0, 0)(0, 1).bits == 0x3F81);
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 3; ++h)
      for (std::int64_t j = 0; j < 4; ++j)
        for (std::int64_t d = 0; d < 5; ++d) {
          CHECK(cache.keys(b, h)(j, d) == bf16::from_float(k.view<4>()(b, j, h, d)));
          CHECK(cache.values_as_sequence(4)(b, j, h, d) ==
                bf16::from_float(v.view<4>()(b, j, h, d)));
        }
  KVKeepPlan plan;
  plan.offsets = {0, 1, 2, 3, 5, 5, 6};
  plan.positions = {3, 0, 2, 1, 3, 0};
  cache.keep(plan);
  CHECK(cache.length(0, 0) == 1);
  CHECK(cache.length(1, 0) == 2);
  CHECK(cache.length(1, 1) == 0);
  for (std::int64_t d = 0; d < 5; ++d) {
    CHECK(cache.keys(0, 0)(0, d) == bf16::from_float(k.view<4>()(0, 3, 0, d)));
    CHECK(cache.values(1, 0)(1, d) == bf16::from_float(v.view<4>()(1, 3, 0, d)));
  }
  // Storage errors are those of the float cache.
  const auto bad = random_tensor<float>({2, 1, 3, 4}, 4);
  CHECK_THROWS_AS(cache.append(bad.view<4>(), bad.view<4>()), shape_error);
  CHECK_THROWS_AS((KVCache<float, bf16>(1, 1, 1, 0)), config_error);
}

TEST_CASE("DenseAttention::decode on a bf16 cache: every arch, reference and float-cache bits",
          "[decode][bf16]") {
  // The cache stores bf16(k), bf16(v); decoding widens them exactly, so the result is the
  // float decode of the rounded values: the same bits as a float cache holding them (the
  // summation order does not depend on the stored type), and the long-double reference on
  // them within the float tolerance.
  const std::vector<DecodeCase> cases = {
      {1, 4, 4, 16, 1, {7}, false, false, false},
      {2, 8, 2, 40, 1, {300, 1}, false, true, false},
      {2, 6, 3, 33, 3, {5, 700}, true, true, false},
      {1, 8, 2, 128, 2, {1100}, false, true, true},
  };
  for (const auto& c : cases) {
    const std::int64_t S = c.S(), cap = c.capacity();
    DYNAMIC_SECTION("B=" << c.B << " H=" << c.H << " Hkv=" << c.Hkv << " D=" << c.D
                         << " Tn=" << c.Tn << " S=" << S) {
      const DecodeInputs in(c, 51, false);
      const auto& q = in.q;
      const auto& bias = in.bias;
      const auto& active = in.active;
      const auto kr = bf16_rounded(in.k), vr = bf16_rounded(in.v);
      KVCache<float, bf16> cache(c.B, c.Hkv, c.D, cap);
      KVCache<float> rounded(c.B, c.Hkv, c.D, cap);
      fill_cache(cache, in.k, in.v, c.lens);
      fill_cache(rounded, kr, vr, c.lens);
      const double scale = 1.0 / std::sqrt(double(c.D));
      const auto want =
          decode_reference(q, kr, vr, c.lens, scale, c.bias ? &bias : nullptr, active);
      simd::for_each_arch([&](auto arch) {
        using Arch = decltype(arch);
        CAPTURE(Arch::name());
        Tensor<float> mass({c.B, c.Hkv, cap}), mass_f({c.B, c.Hkv, cap});
        DecodeOptions<float> opts;
        if (c.bias) opts.bias = bias.view<3>();
        if (c.mass) opts.key_mass = mass.view<3>();
        opts.active_heads = active;
        Tensor<float> out({c.B, c.Tn, c.H, c.D}), out_f({c.B, c.Tn, c.H, c.D});
        const DenseAttention<float, Arch> attn;
        attn.decode(q.view<4>(), cache, out.view<4>(), opts);
        CHECK(max_err(out, want.out) < 2e-5);
        if (c.mass) opts.key_mass = mass_f.view<3>();
        attn.decode(q.view<4>(), rounded, out_f.view<4>(), opts);
        CHECK(std::equal(out.begin(), out.end(), out_f.begin()));
        if (c.mass) {
          for (std::int64_t b = 0; b < c.B; ++b)
            for (std::int64_t h = 0; h < c.Hkv; ++h)
              for (std::int64_t j = 0; j < c.lens[std::size_t(b)]; ++j) {
                CHECK(mass.view<3>()(b, h, j) == mass_f.view<3>()(b, h, j));
                CHECK(std::abs(mass.view<3>()(b, h, j) -
                               want.mass[std::size_t((b * c.Hkv + h) * S + j)]) < 1e-5);
              }
        }
      });
    }
  }
}

TEST_CASE("bf16 cache: prefill in chunks through forward, then decode, equals one forward",
          "[decode][bf16]") {
  const std::int64_t B = 2, H = 4, Hkv = 2, D = 32, T = 150;
  const auto q = random_tensor<float>({B, T, H, D}, 61);
  const auto k = random_tensor<float>({B, T, Hkv, D}, 62);
  const auto v = random_tensor<float>({B, T, Hkv, D}, 63);
  const auto kr = bf16_rounded(k), vr = bf16_rounded(v);
  DenseAttention<float> attn;
  Tensor<float> full({B, T, H, D}), inc({B, T, H, D});
  attn.forward(q.view<4>(), kr.view<4>(), vr.view<4>(), full.view<4>(), CausalMask{});
  KVCache<float, bf16> cache(B, Hkv, D, T);
  // The bf16 forward packs the very floats a forward on the rounded values packs.
  prefill_then_decode(
      attn, q, k, v, cache, inc, [&](std::int64_t t0, std::int64_t n, const View<float, 4>& oc) {
        Tensor<float> oc_f({B, n, H, D});
        attn.forward(q.view<4>().slice(1, t0, t0 + n), kr.view<4>().slice(1, 0, t0 + n),
                     vr.view<4>().slice(1, 0, t0 + n), oc_f.view<4>(), CausalMask{t0});
        for (std::int64_t b = 0; b < B; ++b)
          for (std::int64_t t = 0; t < n; ++t)
            for (std::int64_t h = 0; h < H; ++h)
              for (std::int64_t d = 0; d < D; ++d)
                REQUIRE(oc(b, t, h, d) == oc_f.view<4>()(b, t, h, d));
      });
  double e = 0;
  for (std::int64_t i = 0; i < full.numel(); ++i)
    e = std::max(e, double(std::abs(full.data()[i] - inc.data()[i])));
  CHECK(e < 1e-5);
}

TEST_CASE("bf16 K and V: errors name the layer and the argument", "[decode][bf16][errors]") {
  DenseAttention<float> attn;
  KVCache<float, bf16> cache(2, 2, 8, 16);
  const auto kv = random_tensor<float>({2, 3, 2, 8}, 71);
  cache.append(kv.view<4>(), kv.view<4>());
  const auto q = random_tensor<float>({2, 1, 4, 8}, 72);
  Tensor<float> out({2, 1, 4, 8});
  const auto q_d = random_tensor<float>({2, 1, 4, 9}, 73);
  CHECK_THROWS_AS(attn.decode(q_d.view<4>(), cache, out.view<4>()), shape_error);
  const auto q_four = random_tensor<float>({2, 4, 4, 8}, 74);
  Tensor<float> out_four({2, 4, 4, 8});
  CHECK_THROWS_WITH(attn.decode(q_four.view<4>(), cache, out_four.view<4>()),
                    Contains("holds 3 positions"));
  // forward over bf16 views: k and v must agree with q and with each other.
  const auto q3 = random_tensor<float>({2, 3, 4, 16}, 75);
  Tensor<float> out3({2, 3, 4, 16});
  CHECK_THROWS_WITH(attn.forward(q3.view<4>(), cache.keys_as_sequence(3),
                                 cache.values_as_sequence(3), out3.view<4>()),
                    Contains("DenseAttention::forward") && Contains("'k'"));
  const auto q8 = random_tensor<float>({2, 3, 4, 8}, 76);
  Tensor<float> out8({2, 3, 4, 8});
  CHECK_THROWS_WITH(attn.forward(q8.view<4>(), cache.keys_as_sequence(3),
                                 cache.values_as_sequence(2), out8.view<4>()),
                    Contains("'v'"));
  // Eviction policies take a bf16 cache like a float one.
  StreamingLLMPolicy({.sinks = 1, .recent = 1}).evict(cache);
  CHECK(cache.length(0) == 2);
  CHECK(cache.keys(1, 1)(1, 0) == bf16::from_float(kv.view<4>()(1, 2, 1, 0)));
}

TEST_CASE("DenseAttention::decode errors", "[decode][errors]") {
  DenseAttention<float> attn;
  KVCache<float> cache(2, 2, 8, 16);
  const auto kv = random_tensor<float>({2, 3, 2, 8}, 41);
  cache.append(kv.view<4>(), kv.view<4>());
  const auto q = random_tensor<float>({2, 1, 4, 8}, 42);
  Tensor<float> out({2, 1, 4, 8});
  const auto bad_q = random_tensor<float>({2, 1, 3, 8}, 43);  // H not a multiple of H_kv
  CHECK_THROWS_WITH(attn.decode(bad_q.view<4>(), cache, out.view<4>()),
                    Contains("DenseAttention::decode") && Contains("'q'"));
  const auto q_d = random_tensor<float>({2, 1, 4, 9}, 44);
  CHECK_THROWS_AS(attn.decode(q_d.view<4>(), cache, out.view<4>()), shape_error);
  const auto q_many = random_tensor<float>({2, 65, 4, 8}, 45);
  Tensor<float> out_many({2, 65, 4, 8});
  CHECK_THROWS_WITH(attn.decode(q_many.view<4>(), cache, out_many.view<4>()),
                    Contains("T_new <= 64"));
  const auto q_four = random_tensor<float>({2, 4, 4, 8}, 46);  // the cache holds 3
  Tensor<float> out_four({2, 4, 4, 8});
  CHECK_THROWS_WITH(attn.decode(q_four.view<4>(), cache, out_four.view<4>()),
                    Contains("holds 3 positions"));
  Tensor<float> out_bad({2, 1, 4, 7});
  CHECK_THROWS_AS(attn.decode(q.view<4>(), cache, out_bad.view<4>()), shape_error);
  // Output sharing memory with q.
  Tensor<float> qq = q;
  CHECK_THROWS_WITH(attn.decode(qq.view<4>(), cache, qq.view<4>()), Contains("'out'"));
  // Bias and key mass of the wrong shape; active_heads of the wrong length.
  Tensor<float> bias({4, 1, 15}), mass({2, 2, 17});
  DecodeOptions<float> opts;
  opts.bias = bias.view<3>();
  CHECK_THROWS_WITH(attn.decode(q.view<4>(), cache, out.view<4>(), opts), Contains("'bias'"));
  opts = {};
  opts.key_mass = mass.view<3>();
  CHECK_THROWS_WITH(attn.decode(q.view<4>(), cache, out.view<4>(), opts), Contains("'key_mass'"));
  opts = {};
  const std::vector<std::uint8_t> flags(7, 1);
  opts.active_heads = flags;
  CHECK_THROWS_WITH(attn.decode(q.view<4>(), cache, out.view<4>(), opts),
                    Contains("'active_heads'"));
  // Key mass sharing memory with out.
  Tensor<float> both({2 * 2 * 16 + 64});
  opts = {};
  opts.key_mass = View<float, 3>(both.data(), {2, 2, 16});
  CHECK_THROWS_WITH(
      attn.decode(q.view<4>(), cache, View<float, 4>(both.data() + 10, {2, 1, 4, 8}), opts),
      Contains("'key_mass'"));
}

// [B, T, H, D] at time t: [B, H, D].
template <class T>
View<T, 3> at_time(View<T, 4> x, std::int64_t t) {
  return {x.data() + t * x.stride(1),
          {x.extent(0), x.extent(2), x.extent(3)},
          {x.stride(0), x.stride(2), x.stride(3)}};
}

TEST_CASE("LinearAttention: prefill in chunks, then steps, equals one causal forward", "[decode]") {
  const std::int64_t B = 2, T = 90, H = 3, D = 16, Dv = 12;
  for (FeatureMap fm : {FeatureMap::elu_plus_one, FeatureMap::favor_plus}) {
    const LinearAttention<float> layer(
        {.feature_map = fm, .chunk_size = 16, .num_features = 32, .seed = 5, .head_dim = D});
    const auto q = random_tensor<float>({B, T, H, D}, 51, 0.5);
    const auto k = random_tensor<float>({B, T, H, D}, 52, 0.5);
    const auto v = random_tensor<float>({B, T, H, Dv}, 53);
    Tensor<float> full({B, T, H, Dv}), inc({B, T, H, Dv});
    layer.forward_causal(q.view<4>(), k.view<4>(), v.view<4>(), full.view<4>());
    auto state = layer.make_state(B, H, D, Dv);
    // A prompt of 70 in chunks of 30, 25 and 15 (not multiples of chunk_size), then 20 steps.
    std::int64_t t0 = 0;
    for (std::int64_t n : {30, 25, 15}) {
      layer.forward_causal(q.view<4>().slice(1, t0, t0 + n), k.view<4>().slice(1, t0, t0 + n),
                           v.view<4>().slice(1, t0, t0 + n), inc.view<4>().slice(1, t0, t0 + n), {},
                           &state);
      t0 += n;
    }
    for (; t0 < T; ++t0) {
      layer.step(ConstView<float, 3>(at_time(q.view<4>(), t0)),
                 ConstView<float, 3>(at_time(k.view<4>(), t0)),
                 ConstView<float, 3>(at_time(v.view<4>(), t0)), state, at_time(inc.view<4>(), t0));
    }
    double e = 0, scale = 0;
    for (std::int64_t i = 0; i < full.numel(); ++i) {
      e = std::max(e, double(std::abs(full.data()[i] - inc.data()[i])));
      scale = std::max(scale, double(std::abs(full.data()[i])));
    }
    CAPTURE(int(fm));
    REQUIRE(scale > 0);
    CHECK(e <= 1e-5 * scale);
  }
}

// ---- KV-cache eviction against the reference fixtures ------------------------------------------

namespace {

enum class Policy { streaming, h2o, tova };

// Replays a fixture's 40 decode steps: append token t, decode (recording the key mass the
// policy needs), compare the output, evict, compare the positions left (and H2O's scores).
void replay_eviction_fixture(const char* file, Policy policy) {
  const auto f = open_fixture(file);
  const auto q = f.template tensor<float>("q"), k = f.template tensor<float>("k"),
             v = f.template tensor<float>("v");
  const auto want_out = f.tensor<float>("out");
  const auto kept = f.tensor<std::int64_t>("kept_pos");
  const std::int64_t steps = q.shape()[0], H = q.shape()[1], D = q.shape()[2];
  const std::int64_t budget = kept.shape()[2];
  KVCache<float> cache(1, H, D, budget + 1);
  std::vector<std::int64_t> pos_store(std::size_t(H * (budget + 1)), -1);
  const View<std::int64_t, 3> pos(pos_store.data(), {1, H, budget + 1});
  const StreamingLLMPolicy streaming({.sinks = 4, .recent = 12});
  const H2OPolicy h2o({.heavy = 8, .recent = 8});
  const TOVAPolicy tova({.budget = budget});
  H2OState<float> h2o_state(cache);
  Tensor<float> mass({1, H, budget + 1}), out({1, 1, H, D});
  const DenseAttention<float> attn;
  double out_err = 0, score_err = 0;
  for (std::int64_t t = 0; t < steps; ++t) {
    const auto at = [&](const Tensor<float>& x) {
      return ConstView<float, 4>(x.data() + t * H * D, {1, 1, H, D});
    };
    cache.append(at(k), at(v));
    for (std::int64_t h = 0; h < H; ++h) pos(0, h, cache.length(0, h) - 1) = t;
    DecodeOptions<float> opts;
    if (policy == Policy::h2o) {
      opts.key_mass = h2o_state.scores();
      opts.accumulate_key_mass = true;
    } else if (policy == Policy::tova) {
      opts.key_mass = mass.view<3>();
    }
    attn.decode(at(q), cache, out.view<4>(), opts);
    for (std::int64_t i = 0; i < H * D; ++i)
      out_err = std::max(out_err, double(std::abs(out.data()[i] - want_out.data()[t * H * D + i])));
    KVKeepPlan plan;
    if (policy == Policy::streaming) plan = streaming.plan(cache);
    if (policy == Policy::h2o) plan = h2o.plan(cache, h2o_state);
    if (policy == Policy::tova) plan = tova.plan(cache, mass.view<3>());
    cache.keep(plan);
    plan.apply(pos, std::int64_t(-1));
    if (policy == Policy::h2o) plan.apply(h2o_state.scores());
    for (std::int64_t h = 0; h < H; ++h) {
      CAPTURE(file, t, h);
      std::vector<std::int64_t> got, want;
      for (std::int64_t j = 0; j < cache.length(0, h); ++j) got.push_back(pos(0, h, j));
      for (std::int64_t j = 0; j < budget; ++j) {
        const std::int64_t p = kept.data()[(t * H + h) * budget + j];
        if (p >= 0) want.push_back(p);
      }
      REQUIRE(got == want);
    }
    if (policy == Policy::h2o) {
      const auto hh = f.tensor<float>("hh_score");
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t j = 0; j < cache.length(0, h); ++j)
          score_err = std::max(score_err, double(std::abs(h2o_state.scores()(0, h, j) -
                                                          hh.data()[(t * H + h) * budget + j])));
    }
  }
  CHECK(out_err < 1e-5);
  CHECK(score_err < 1e-5);
}

}  // namespace

TEST_CASE("KV eviction reproduces the StreamingLLM, H2O and TOVA fixtures", "[kv_eviction]") {
  replay_eviction_fixture("kv_eviction_streamingllm_tiny.safetensors", Policy::streaming);
  replay_eviction_fixture("kv_eviction_h2o_tiny.safetensors", Policy::h2o);
  replay_eviction_fixture("kv_eviction_tova_tiny.safetensors", Policy::tova);
}

TEST_CASE("SnapKV keeps the window and the best pooled earlier positions per KV head",
          "[kv_eviction]") {
  const std::int64_t B = 2, H = 4, Hkv = 2, D = 16, S = 150, W = 8, budget = 40;
  const auto q = random_tensor<float>({B, W, H, D}, 61);
  const auto k = random_tensor<float>({B, S, Hkv, D}, 62);
  const auto v = random_tensor<float>({B, S, Hkv, D}, 63);
  for (SnapKVPooling pooling : {SnapKVPooling::avg, SnapKVPooling::max}) {
    for (std::int64_t kernel : {1, 5, 7}) {
      CAPTURE(int(pooling), kernel);
      KVCache<float> cache(B, Hkv, D, S);
      fill_cache(cache, k, v, {S, S - 31});
      Tensor<float> mass({B, Hkv, S}), out({B, W, H, D});
      DecodeOptions<float> opts;
      opts.key_mass = mass.view<3>();
      DenseAttention<float>().decode(q.view<4>(), cache, out.view<4>(), opts);
      const SnapKVPolicy snap(
          {.budget = budget, .window = W, .kernel = kernel, .pooling = pooling});
      const KVKeepPlan plan = snap.plan(cache, mass.view<3>());
      // Reference: the window's attention from decode_reference, pooled in double.
      const std::vector<std::int64_t> lens = {S, S - 31};
      const auto ref =
          decode_reference(q, k, v, lens, 1.0 / std::sqrt(double(D)),
                           static_cast<const Tensor<float>*>(nullptr), std::vector<std::uint8_t>{});
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t h = 0; h < Hkv; ++h) {
          const std::int64_t len = cache.length(b, h), n = len - W;
          std::vector<double> pooled(static_cast<std::size_t>(n));
          for (std::int64_t p = 0; p < n; ++p) {
            double acc = pooling == SnapKVPooling::avg ? 0.0 : -1.0;
            for (std::int64_t d = -kernel / 2; d <= kernel / 2; ++d) {
              const std::int64_t j = p + d;
              if (j < 0 || j >= n) continue;
              const double m = double(ref.mass[std::size_t((b * Hkv + h) * S + j)]);
              acc = pooling == SnapKVPooling::avg ? acc + m : std::max(acc, m);
            }
            pooled[std::size_t(p)] = pooling == SnapKVPooling::avg ? acc / double(kernel) : acc;
          }
          std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
          std::iota(idx.begin(), idx.end(), 0);
          std::stable_sort(idx.begin(), idx.end(), [&](auto a, auto c) {
            return pooled[std::size_t(a)] > pooled[std::size_t(c)];
          });
          std::vector<std::int64_t> want(idx.begin(), idx.begin() + (budget - W));
          std::sort(want.begin(), want.end());
          for (std::int64_t p = n; p < len; ++p) want.push_back(p);
          const std::int64_t i = b * Hkv + h;
          const std::vector<std::int64_t> got(
              plan.positions.begin() + plan.offsets[std::size_t(i)],
              plan.positions.begin() + plan.offsets[std::size_t(i + 1)]);
          CHECK(got == want);
        }
      cache.keep(plan);
      CHECK(cache.length(0, 0) == budget);
      CHECK(cache.length(1, 1) == budget);
    }
  }
}

TEST_CASE("Eviction policies keep their budgets over a ragged decode", "[kv_eviction]") {
  const std::int64_t B = 2, H = 4, Hkv = 2, D = 8, steps = 90;
  const auto q = random_tensor<float>({steps, B, H, D}, 71);
  const auto kv = random_tensor<float>({steps, B, Hkv, D}, 72);
  const StreamingLLMPolicy streaming({.sinks = 3, .recent = 10});
  const H2OPolicy h2o({.heavy = 6, .recent = 7});
  const TOVAPolicy tova({.budget = 13});
  for (Policy policy : {Policy::streaming, Policy::h2o, Policy::tova}) {
    KVCache<float> cache(B, Hkv, D, 14);
    H2OState<float> state(cache);
    Tensor<float> mass({B, Hkv, 14}), out({B, 1, H, D});
    std::vector<std::int64_t> pos_store(std::size_t(B * Hkv * 14), -1);
    const View<std::int64_t, 3> pos(pos_store.data(), {B, Hkv, 14});
    for (std::int64_t t = 0; t < steps; ++t) {
      cache.append(ConstView<float, 4>(kv.data() + t * B * Hkv * D, {B, 1, Hkv, D}),
                   ConstView<float, 4>(kv.data() + t * B * Hkv * D, {B, 1, Hkv, D}));
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t h = 0; h < Hkv; ++h) pos(b, h, cache.length(b, h) - 1) = t;
      DecodeOptions<float> opts;
      opts.key_mass = policy == Policy::h2o ? state.scores() : mass.view<3>();
      opts.accumulate_key_mass = policy == Policy::h2o;
      DenseAttention<float>().decode(ConstView<float, 4>(q.data() + t * B * H * D, {B, 1, H, D}),
                                     cache, out.view<4>(), opts);
      KVKeepPlan plan = policy == Policy::streaming ? streaming.plan(cache)
                        : policy == Policy::h2o     ? h2o.plan(cache, state)
                                                    : tova.plan(cache, mass.view<3>());
      cache.keep(plan);
      plan.apply(pos, std::int64_t(-1));
      if (policy == Policy::h2o) plan.apply(state.scores());
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t h = 0; h < Hkv; ++h) {
          const std::int64_t len = cache.length(b, h);
          REQUIRE(len == std::min<std::int64_t>(t + 1, 13));
          for (std::int64_t j = 1; j < len; ++j) REQUIRE(pos(b, h, j - 1) < pos(b, h, j));
          if (policy != Policy::tova) REQUIRE(pos(b, h, len - 1) == t);  // TOVA may evict it
          if (policy == Policy::streaming && t >= 13) {
            for (std::int64_t j = 0; j < 3; ++j) REQUIRE(pos(b, h, j) == j);
            REQUIRE(pos(b, h, 3) == t - 9);
          }
          if (policy == Policy::h2o && t >= 13)
            for (std::int64_t j = 0; j < 7; ++j) REQUIRE(pos(b, h, 6 + j) == t - 6 + j);
        }
    }
  }
}

TEST_CASE("Eviction policies: ties, errors, stale plans", "[kv_eviction][errors]") {
  KVCache<float> cache(1, 2, 4, 8);
  const auto kv = random_tensor<float>({1, 6, 2, 4}, 81);
  cache.append(kv.view<4>(), kv.view<4>());
  // TOVA on equal masses keeps the lowest positions.
  Tensor<float> mass({1, 2, 8});
  for (auto& x : mass) x = 0.25f;
  const KVKeepPlan p = TOVAPolicy({.budget = 3}).plan(cache, mass.view<3>());
  CHECK(p.positions == std::vector<std::int64_t>{0, 1, 2, 0, 1, 2});
  // H2O's heavy hitters on equal scores: the lowest positions before the recent window.
  H2OState<float> state(cache);
  const KVKeepPlan hp = H2OPolicy({.heavy = 2, .recent = 2}).plan(cache, state);
  CHECK(hp.positions == std::vector<std::int64_t>{0, 1, 4, 5, 0, 1, 4, 5});

  CHECK_THROWS_AS(StreamingLLMPolicy({.sinks = -1, .recent = 4}), config_error);
  CHECK_THROWS_AS(StreamingLLMPolicy({.sinks = 1, .recent = 0}), config_error);
  CHECK_THROWS_AS(H2OPolicy({.heavy = -2, .recent = 4}), config_error);
  CHECK_THROWS_AS(TOVAPolicy({.budget = 0}), config_error);
  CHECK_THROWS_WITH(SnapKVPolicy({.budget = 4, .window = 8}), Contains("budget"));
  CHECK_THROWS_WITH(SnapKVPolicy({.budget = 64, .window = 8, .kernel = 4}), Contains("kernel"));
  CHECK_THROWS_AS(SnapKVPolicy({.budget = 64, .window = 0}), config_error);
  // Mass of the wrong shape, or NaN at a stored position.
  Tensor<float> small({1, 2, 7});
  CHECK_THROWS_WITH(TOVAPolicy({.budget = 3}).plan(cache, small.view<3>()), Contains("'key_mass'"));
  mass(0, 1, 5) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(TOVAPolicy({.budget = 3}).plan(cache, mass.view<3>()), config_error);
  // A plan made before an append, or for another cache, is rejected; nothing changes.
  const KVKeepPlan stale = StreamingLLMPolicy({.sinks = 1, .recent = 2}).plan(cache);
  cache.append(kv.view<4>().slice(1, 0, 1), kv.view<4>().slice(1, 0, 1));
  CHECK_THROWS_WITH(cache.keep(stale), Contains("other lengths"));
  KVCache<float> other(2, 2, 4, 8);
  CHECK_THROWS_WITH(other.keep(stale), Contains("offsets"));
  CHECK(cache.length(0) == 7);
  // Side arrays that do not fit the plan.
  std::vector<float> side(3 * 8);
  CHECK_THROWS_AS(stale.apply(View<float, 3>(side.data(), {1, 3, 8})), shape_error);
  CHECK_THROWS_AS(stale.apply(View<float, 3>(side.data(), {1, 2, 2})), shape_error);
  // TOVA keeps one set of positions per sequence: heads of different lengths are an error.
  KVKeepPlan uneven{{0, 1, 7}, {0, 0, 1, 2, 3, 4, 5}, {}};
  cache.keep(uneven);
  CHECK_THROWS_AS(TOVAPolicy({.budget = 3}).plan(cache, mass.view<3>()), config_error);
}
