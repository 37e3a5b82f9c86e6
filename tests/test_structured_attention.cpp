// Structured sparse attention (block_sparse.hpp, sliding_window.hpp, neighborhood.hpp,
// moba.hpp) against double-precision naive references (support/structured_ref.hpp), the NATTEN
// and MoBA fixtures, thread-count determinism and every documented error.
//
// Tolerance: outputs are compared with max|got - ref| <= 2e-5 * max(1, max|ref|) in float
// (the fused kernel sums D = 16..64 products and a few hundred exponentials in float with a
// ~2 ulp exp2: observed errors are a few 1e-7..1e-6) and 1e-12 in double.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <switchyard/attention/block_sparse.hpp>
#include <switchyard/attention/moba.hpp>
#include <switchyard/attention/neighborhood.hpp>
#include <switchyard/attention/sliding_window.hpp>
#include <thread>
#include <tuple>
#include <vector>

#include "support/compare.hpp"
#include "support/fixtures.hpp"
#include "support/structured_ref.hpp"

using namespace switchyard;
using namespace switchyard::attention;
using Catch::Contains;
using test_support::uniform_tensor;

namespace {

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-12;
}

// max|got - want| relative to max(1, max|want|).
template <class T>
double max_err(const core::Tensor<T>& got, const std::vector<double>& want) {
  REQUIRE(std::size_t(got.numel()) == want.size());
  double e = 0, m = 1;
  std::size_t i = 0;
  for (const T& g : got) {
    e = std::max(e, std::abs(double(g) - want[i]));
    m = std::max(m, std::abs(want[i]));
    ++i;
  }
  return e / m;
}

// U(-1, 1) inputs rounded to float, so the float reference sees a double test's exact inputs.
template <class T>
core::Tensor<T> inputs(Shape<4> shape, std::uint32_t seed) {
  const auto f = uniform_tensor<float>(shape, seed);
  core::Tensor<T> t(shape);
  auto src = f.begin();
  for (auto& x : t) x = T(*src++);
  return t;
}

// The reference takes float views: convert a double tensor's values (the test inputs are
// random floats, so nothing is lost).
template <class T>
core::Tensor<float> as_float(const core::Tensor<T>& t) {
  core::Tensor<float> f(t.shape());
  auto src = t.begin();
  for (auto& x : f) x = float(*src++);
  return f;
}

template <class T, class Visible>
std::vector<double> reference(const core::Tensor<T>& q, const core::Tensor<T>& k,
                              const core::Tensor<T>& v, double scale, Visible&& vis) {
  const auto qf = as_float(q), kf = as_float(k), vf = as_float(v);
  return test_support::ref_masked_attention(qf.template view<4>(), kf.template view<4>(),
                                            vf.template view<4>(), scale, vis);
}

bool same_bits(const core::Tensor<float>& a, const core::Tensor<float>& b) {
  return std::equal(a.begin(), a.end(), b.begin(),
                    [](float x, float y) { return std::memcmp(&x, &y, sizeof(float)) == 0; });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Sliding window, chunked, sinks

TEMPLATE_TEST_CASE("sliding window attention matches the naive reference", "[sliding]", float,
                   double) {
  using T = TestType;
  const auto row0 = GENERATE(
      table<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t>(
          {{1, 37, 37, 1, 1, 16},
           {2, 50, 64, 4, 2, 24},
           {1, 130, 130, 2, 1, 64},
           {2, 7, 40, 3, 3, 5}}));
  const auto B = std::get<0>(row0);
  const auto Tq = std::get<1>(row0);
  const auto S = std::get<2>(row0);
  const auto H = std::get<3>(row0);
  const auto Hkv = std::get<4>(row0);
  const auto D = std::get<5>(row0);
  const auto row1 =
      GENERATE(table<std::int64_t, std::int64_t, std::int64_t, bool>({{8, 0, 0, true},
                                                                      {8, 0, 4, true},
                                                                      {1, 0, 0, true},
                                                                      {20, 0, 3, false},
                                                                      {0, 16, 0, true},
                                                                      {0, 16, 2, true},
                                                                      {0, 10, 0, false},
                                                                      {12, 16, 1, true},
                                                                      {500, 0, 0, true}}));
  const auto window = std::get<0>(row1);
  const auto chunk = std::get<1>(row1);
  const auto sinks = std::get<2>(row1);
  const auto causal = std::get<3>(row1);
  const bool lengths = GENERATE(false, true);
  CAPTURE(B, Tq, S, H, Hkv, D, window, chunk, sinks, causal, lengths);
  const auto q = inputs<T>({B, Tq, H, D}, 1);
  const auto k = inputs<T>({B, S, Hkv, D}, 2);
  const auto v = inputs<T>({B, S, Hkv, D}, 3);
  std::vector<std::int64_t> len(std::size_t(B), S);
  if (lengths)
    for (std::int64_t b = 0; b < B; ++b)
      len[std::size_t(b)] = std::max<std::int64_t>(0, S - 5 - 9 * b);
  const SlidingWindowAttention<T> attn(
      {.window = window, .chunk = chunk, .sinks = sinks, .causal = causal});
  const auto got =
      lengths ? attn.forward(q.template view<4>(), k.template view<4>(), v.template view<4>(), len)
              : attn.forward(q.template view<4>(), k.template view<4>(), v.template view<4>());
  // Written from the rule in the header comment, not from its code.
  std::int64_t pairs = 0;
  const auto visible = [&](std::int64_t b, std::int64_t, std::int64_t i, std::int64_t j) {
    const std::int64_t P = i + S - Tq;
    if (j >= len[std::size_t(b)]) return false;
    if (causal && j > P) return false;
    if (j < sinks) return true;
    if (window > 0 && (causal ? j <= P - window : std::abs(j - P) >= window)) return false;
    if (chunk > 0 && j / chunk != P / chunk) return false;
    return true;
  };
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < Tq; ++i)
      for (std::int64_t j = 0; j < S; ++j) pairs += visible(b, 0, i, j) ? 1 : 0;
  const auto want = reference(q, k, v, 1.0 / std::sqrt(double(D)), visible);
  CHECK(max_err(got, want) <= tolerance<T>());
  CHECK(attn.pairs(B, Tq, S,
                   lengths ? std::span<const std::int64_t>(len)
                           : std::span<const std::int64_t>()) == pairs);
}

TEST_CASE("sliding window decode over a KV cache matches the naive reference", "[sliding]") {
  const std::int64_t B = 2, Hkv = 2, H = 4, D = 24, cap = 80;
  const auto row2 = GENERATE(table<std::int64_t, std::int64_t, std::int64_t, std::int64_t>(
      {{8, 0, 0, 1}, {8, 0, 4, 1}, {8, 0, 4, 3}, {0, 16, 2, 1}, {10, 16, 1, 7}, {200, 0, 0, 2}}));
  const auto window = std::get<0>(row2);
  const auto chunk = std::get<1>(row2);
  const auto sinks = std::get<2>(row2);
  const auto Tn = std::get<3>(row2);
  CAPTURE(window, chunk, sinks, Tn);
  KVCache<float> cache(B, Hkv, D, cap);
  const std::int64_t S = 61;
  const auto k = uniform_tensor<float>({B, S, Hkv, D}, 11);
  const auto v = uniform_tensor<float>({B, S, Hkv, D}, 12);
  cache.append(k.view<4>(), v.view<4>());
  const auto q = uniform_tensor<float>({B, Tn, H, D}, 13);
  const SlidingWindowAttention<float> attn({.window = window, .chunk = chunk, .sinks = sinks});
  core::Tensor<float> got({B, Tn, H, D});
  attn.decode(q.view<4>(), cache, got.view<4>());
  const auto want = test_support::ref_masked_attention(
      q.view<4>(), k.view<4>(), v.view<4>(), 1.0 / std::sqrt(double(D)),
      [&](std::int64_t, std::int64_t, std::int64_t t, std::int64_t j) {
        const std::int64_t P = S - Tn + t;
        if (j > P) return false;
        if (j < sinks) return true;
        if (window > 0 && j <= P - window) return false;
        return !(chunk > 0 && j / chunk != P / chunk);
      });
  CHECK(max_err(got, want) <= 2e-5);
  // Decode agrees with prefill over the cached sequence (same rule, same keys).
  const auto prefill = attn.forward(q.view<4>(), k.view<4>(), v.view<4>());
  CHECK(max_err(prefill, std::vector<double>(got.begin(), got.end())) <= 2e-5);
}

TEST_CASE("sliding window decode over a bf16 cache: the float cache's bits on rounded K and V",
          "[sliding][bf16]") {
  // KVCache<float, bf16> rounds K and V once; the decode widens them exactly while packing, so
  // it must give the very bits of a float cache holding the rounded values.
  const std::int64_t B = 2, Hkv = 2, H = 4, D = 24, cap = 80, S = 61;
  const auto row = GENERATE(table<std::int64_t, std::int64_t, std::int64_t, std::int64_t>(
      {{8, 0, 4, 3}, {10, 16, 1, 7}, {200, 0, 0, 2}}));
  const auto [window, chunk, sinks, Tn] = row;
  CAPTURE(window, chunk, sinks, Tn);
  const auto k = uniform_tensor<float>({B, S, Hkv, D}, 31);
  const auto v = uniform_tensor<float>({B, S, Hkv, D}, 32);
  core::Tensor<float> kr = k, vr = v;
  for (auto& x : kr) x = to_float(bf16::from_float(x));
  for (auto& x : vr) x = to_float(bf16::from_float(x));
  KVCache<float, bf16> cache(B, Hkv, D, cap);
  KVCache<float> rounded(B, Hkv, D, cap);
  cache.append(k.view<4>(), v.view<4>());
  rounded.append(kr.view<4>(), vr.view<4>());
  const auto q = uniform_tensor<float>({B, Tn, H, D}, 33);
  const SlidingWindowAttention<float> attn({.window = window, .chunk = chunk, .sinks = sinks});
  core::Tensor<float> got({B, Tn, H, D}), want({B, Tn, H, D});
  attn.decode(q.view<4>(), cache, got.view<4>());
  attn.decode(q.view<4>(), rounded, want.view<4>());
  CHECK(std::equal(got.begin(), got.end(), want.begin()));
  // and the rounding is all that differs from the float cache
  KVCache<float> exact(B, Hkv, D, cap);
  exact.append(k.view<4>(), v.view<4>());
  core::Tensor<float> full({B, Tn, H, D});
  attn.decode(q.view<4>(), exact, full.view<4>());
  double e = 0;
  for (std::int64_t i = 0; i < got.numel(); ++i)
    e = std::max(e, double(std::abs(got.data()[i] - full.data()[i])));
  // Worst case: |q|, |k|, |v| <= 1, bf16 rounding <= 2^-9 relative, so each score moves by at
  // most 24 * 2^-9 / sqrt(24) < 0.0096, each weight by a factor within e^(+-0.0192), and the
  // output (a convex combination of v) by < 0.0194 + 2^-9 < 0.022.
  CHECK(e > 0);
  CHECK(e < 0.022);
}

TEST_CASE("sliding window is bit-identical for 1 and 2 threads", "[sliding][threads]") {
  const auto q = uniform_tensor<float>({2, 700, 4, 32}, 21);
  const auto k = uniform_tensor<float>({2, 700, 2, 32}, 22);
  const auto v = uniform_tensor<float>({2, 700, 2, 32}, 23);
  const SlidingWindowAttention<float> attn({.window = 100, .sinks = 4});
  core::Tensor<float> one, two;
  {
    ScopedNumThreads t(1);
    one = attn.forward(q.view<4>(), k.view<4>(), v.view<4>());
  }
  {
    ScopedNumThreads t(2);
    two = attn.forward(q.view<4>(), k.view<4>(), v.view<4>());
  }
  CHECK(same_bits(one, two));
}

TEST_CASE("structured layers reuse key-pack storage without reading what an earlier call left",
          "[sliding][neighborhood][moba]") {
  // Key packs keep their storage per thread between calls and are not cleared: a first call
  // with NaN keys and values leaves NaN in every element a later, smaller call could read.
  const std::int64_t B = 2, S = 150, H = 4, Hkv = 2, D = 24;
  core::Tensor<float> poison({B, 2 * S, Hkv, 2 * D});
  for (auto& x : poison) x = std::numeric_limits<float>::quiet_NaN();
  const auto poison_q = uniform_tensor<float>({B, 2 * S, H, 2 * D}, 31);
  const auto q = inputs<float>({B, S, H, D}, 32);
  const auto k = inputs<float>({B, S, Hkv, D}, 33);
  const auto v = inputs<float>({B, S, Hkv, D}, 34);
  const std::vector<std::int64_t> len{S, S - 37};
  const auto fill_packs = [&](const auto& layer_forward) {
    (void)layer_forward(poison_q.view<4>(), poison.view<4>(), poison.view<4>());
  };
  SECTION("sliding window with key lengths") {
    const SlidingWindowAttention<float> attn({.window = 40, .sinks = 3});
    fill_packs([&](auto qq, auto kk, auto vv) { return attn.forward(qq, kk, vv); });
    const auto got = attn.forward(q.view<4>(), k.view<4>(), v.view<4>(), len);
    const auto want = reference(q, k, v, 1.0 / std::sqrt(double(D)),
                                [&](std::int64_t b, std::int64_t, std::int64_t i, std::int64_t j) {
                                  return j < len[std::size_t(b)] && j <= i && (j < 3 || j > i - 40);
                                });
    CHECK(max_err(got, want) <= tolerance<float>());
  }
  SECTION("1D neighbourhood with dilation (padding keys)") {
    NeighborhoodConfig<1> cfg;
    cfg.axes[0] = {.kernel_size = 9, .dilation = 4};
    const NeighborhoodAttention<1, float> attn(cfg);
    fill_packs([&](auto qq, auto kk, auto vv) {
      return attn.forward(std::array<std::int64_t, 1>{2 * S}, qq, kk, vv);
    });
    const auto got =
        attn.forward(std::array<std::int64_t, 1>{S}, q.view<4>(), k.view<4>(), v.view<4>());
    const std::array<std::int64_t, 1> ext{S};
    std::vector<std::vector<std::int64_t>> keys;
    for (std::int64_t t = 0; t < S; ++t)
      keys.push_back(test_support::neighborhood_reference_keys(ext, cfg.axes, t));
    const auto want = reference(q, k, v, 1.0 / std::sqrt(double(D)),
                                [&](std::int64_t, std::int64_t, std::int64_t i, std::int64_t j) {
                                  return std::binary_search(keys[std::size_t(i)].begin(),
                                                            keys[std::size_t(i)].end(), j);
                                });
    CHECK(max_err(got, want) <= tolerance<float>());
  }
  SECTION("MoBA: the bits of a thread that kept nothing") {
    const MobaAttention<float> moba({.block_size = 32, .top_k = 3});
    fill_packs([&](auto qq, auto kk, auto vv) { return moba.forward(qq, kk, vv); });
    const auto got = moba.forward(q.view<4>(), k.view<4>(), v.view<4>());
    core::Tensor<float> fresh;
    std::thread([&] { fresh = moba.forward(q.view<4>(), k.view<4>(), v.view<4>()); }).join();
    CHECK(same_bits(got, fresh));
  }
}

TEST_CASE("sliding window errors name the layer, argument and shapes", "[sliding][errors]") {
  using SW = SlidingWindowAttention<float>;
  REQUIRE_THROWS_WITH(SW({.window = 0}),
                      Contains("SlidingWindowAttention") && Contains("'window'"));
  REQUIRE_THROWS_WITH(SW({.window = -1}), Contains("'window' = -1"));
  REQUIRE_THROWS_WITH(SW({.window = 4, .chunk = -2}), Contains("'chunk' = -2"));
  REQUIRE_THROWS_WITH(SW({.window = 4, .sinks = -1}), Contains("'sinks' = -1"));
  REQUIRE_THROWS_WITH(SW({.window = 4, .scale = -1.0}), Contains("'scale'"));
  const SW attn({.window = 4});
  const auto q = uniform_tensor<float>({1, 9, 2, 8}, 1);
  const auto k = uniform_tensor<float>({1, 8, 2, 8}, 2);
  REQUIRE_THROWS_WITH(attn.forward(q.view<4>(), k.view<4>(), k.view<4>()),
                      Contains("SlidingWindowAttention::forward") && Contains("[T=9, S=8]"));
  const auto k3 = uniform_tensor<float>({1, 9, 3, 8}, 2);
  REQUIRE_THROWS_WITH(attn.forward(q.view<4>(), k3.view<4>(), k3.view<4>()),
                      Contains("'k'") && Contains("[B=1, S=9, H_kv=3, D=8]"));
  const auto k9 = uniform_tensor<float>({1, 9, 2, 8}, 2);
  const std::vector<std::int64_t> bad = {10};
  REQUIRE_THROWS_WITH(attn.forward(q.view<4>(), k9.view<4>(), k9.view<4>(), bad),
                      Contains("'key_lengths[0]' = 10"));
  KVCache<float> cache(1, 2, 8, 16);
  const auto q3 = uniform_tensor<float>({1, 3, 2, 8}, 1);
  core::Tensor<float> out({1, 3, 2, 8});
  REQUIRE_THROWS_WITH(attn.decode(q3.view<4>(), cache, out.view<4>()),
                      Contains("SlidingWindowAttention::decode") && Contains("fewer than the 3"));
}

// ---------------------------------------------------------------------------------------------
// Block-sparse executor

namespace {

// A random block mask: each (b, h, query block) keeps key block kb with probability 1/2.
BlockMask random_mask(std::int64_t B, std::int64_t heads, std::int64_t T_q, std::int64_t S,
                      std::int64_t qb, std::int64_t kb, std::uint32_t seed) {
  BlockMask m{.batch = B,
              .heads = heads,
              .num_queries = T_q,
              .num_keys = S,
              .query_block = qb,
              .key_block = kb};
  std::mt19937 rng(seed);
  m.offsets.push_back(0);
  for (std::int64_t i = 0; i < B * heads * m.query_blocks(); ++i) {
    for (std::int64_t j = 0; j < m.key_blocks(); ++j)
      if (rng() % 2) m.indices.push_back(std::int32_t(j));
    m.offsets.push_back(std::int64_t(m.indices.size()));
  }
  return m;
}

}  // namespace

TEMPLATE_TEST_CASE("block-sparse attention matches the naive reference", "[block_sparse]", float,
                   double) {
  using T = TestType;
  const auto row3 = GENERATE(
      table<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
            std::int64_t, std::int64_t, std::int64_t>({{1, 64, 64, 2, 1, 16, 16, 16, 1},
                                                       {2, 50, 77, 4, 2, 24, 7, 13, 4},
                                                       {1, 100, 100, 2, 2, 64, 32, 64, 2},
                                                       {1, 9, 300, 1, 1, 8, 3, 50, 1}}));
  const auto B = std::get<0>(row3);
  const auto Tq = std::get<1>(row3);
  const auto S = std::get<2>(row3);
  const auto H = std::get<3>(row3);
  const auto Hkv = std::get<4>(row3);
  const auto D = std::get<5>(row3);
  const auto qb = std::get<6>(row3);
  const auto kb = std::get<7>(row3);
  const auto heads = std::get<8>(row3);
  const bool causal = GENERATE(false, true);
  CAPTURE(B, Tq, S, H, Hkv, D, qb, kb, heads, causal);
  const auto q = inputs<T>({B, Tq, H, D}, 31);
  const auto k = inputs<T>({B, S, Hkv, D}, 32);
  const auto v = inputs<T>({B, S, Hkv, D}, 33);
  const BlockMask mask = random_mask(B, heads, Tq, S, qb, kb, 34);
  const BlockSparseAttention<T> attn({.causal = causal});
  const auto got =
      attn.forward(q.template view<4>(), k.template view<4>(), v.template view<4>(), mask);
  std::int64_t pairs = 0;
  const auto visible = [&](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
    if (causal && j > i + S - Tq) return false;
    const std::int64_t row = (b * heads + (heads == 1 ? 0 : h)) * mask.query_blocks() + i / qb;
    for (std::int64_t e = mask.offsets[std::size_t(row)]; e < mask.offsets[std::size_t(row + 1)];
         ++e)
      if (mask.indices[std::size_t(e)] == j / kb) return true;
    return false;
  };
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < Tq; ++i)
        for (std::int64_t j = 0; j < S; ++j) pairs += visible(b, h, i, j) ? 1 : 0;
  const auto want = reference(q, k, v, 1.0 / std::sqrt(double(D)), visible);
  CHECK(max_err(got, want) <= tolerance<T>());
  CHECK(attn.pairs(mask, H) == pairs);
}

TEST_CASE("block-sparse attention is bit-identical for 1 and 2 threads",
          "[block_sparse][threads]") {
  const auto q = uniform_tensor<float>({2, 300, 4, 32}, 41);
  const auto k = uniform_tensor<float>({2, 300, 2, 32}, 42);
  const BlockMask mask = random_mask(2, 4, 300, 300, 64, 64, 43);
  const BlockSparseAttention<float> attn;
  core::Tensor<float> one, two;
  {
    ScopedNumThreads t(1);
    one = attn.forward(q.view<4>(), k.view<4>(), k.view<4>(), mask);
  }
  {
    ScopedNumThreads t(2);
    two = attn.forward(q.view<4>(), k.view<4>(), k.view<4>(), mask);
  }
  CHECK(same_bits(one, two));
}

TEST_CASE("block-sparse mask errors name the layer, argument and shapes",
          "[block_sparse][errors]") {
  const auto q = uniform_tensor<float>({1, 8, 2, 8}, 1);
  const auto k = uniform_tensor<float>({1, 8, 2, 8}, 2);
  const BlockSparseAttention<float> attn;
  BlockMask m{
      .batch = 1, .heads = 1, .num_queries = 8, .num_keys = 8, .query_block = 4, .key_block = 4};
  m.offsets = {0, 2, 3};
  m.indices = {0, 1, 2};  // 2 is out of range (KB = 2)
  REQUIRE_THROWS_WITH(attn.forward(q.view<4>(), k.view<4>(), k.view<4>(), m),
                      Contains("BlockSparseAttention::forward") &&
                          Contains("'mask.indices[2]' = 2") && Contains("KB=2"));
  m.indices = {1, 0, 1};  // unsorted
  REQUIRE_THROWS_WITH(attn.forward(q.view<4>(), k.view<4>(), k.view<4>(), m),
                      Contains("'mask.indices[1]' = 0") && Contains("strictly ascending"));
  m.indices = {0, 1, 1};
  m.offsets = {0, 2};
  REQUIRE_THROWS_WITH(attn.forward(q.view<4>(), k.view<4>(), k.view<4>(), m),
                      Contains("'mask.offsets'") && Contains("[B * H * QB + 1 = 3]"));
  m.offsets = {0, 2, 3};
  m.key_block = 0;
  REQUIRE_THROWS_WITH(attn.forward(q.view<4>(), k.view<4>(), k.view<4>(), m),
                      Contains("'mask.key_block' = 0"));
  m.key_block = 4;
  m.query_block = 0;
  REQUIRE_THROWS_WITH(attn.forward(q.view<4>(), k.view<4>(), k.view<4>(), m),
                      Contains("'mask.query_block' = 0"));
  m.query_block = 4;
  m.heads = 3;
  m.offsets = {0, 1, 2, 3, 3, 3, 3};
  m.indices = {0, 1, 1};
  REQUIRE_THROWS_WITH(attn.forward(q.view<4>(), k.view<4>(), k.view<4>(), m),
                      Contains("'mask.heads' = 3"));
  m.heads = 1;
  m.offsets = {0, 2, 3};
  m.num_keys = 9;
  REQUIRE_THROWS_WITH(attn.forward(q.view<4>(), k.view<4>(), k.view<4>(), m),
                      Contains("'mask'") && Contains("[B=1, T=8, S=9]"));
}

// ---------------------------------------------------------------------------------------------
// Neighborhood attention

namespace {

// Runs NeighborhoodAttention<Rank> on [B, extents..., H, D] and compares it with the brute-force
// reference (neighborhood_reference_keys + ref_masked_attention over the flattened tokens).
template <int Rank, class T, class Arch = simd::default_arch>
void check_neighborhood(std::array<std::int64_t, Rank> ext, std::array<NeighborhoodAxis, Rank> axes,
                        std::int64_t B, std::int64_t H, std::int64_t Hkv, std::int64_t D,
                        bool lengths, std::uint32_t seed) {
  std::int64_t tokens = 1;
  for (auto e : ext) tokens *= e;
  const auto q = inputs<T>({B, tokens, H, D}, seed);
  const auto k = inputs<T>({B, tokens, Hkv, D}, seed + 1);
  const auto v = inputs<T>({B, tokens, Hkv, D}, seed + 2);
  std::vector<std::int64_t> len(std::size_t(B), tokens);
  if (lengths)
    for (std::int64_t b = 0; b < B; ++b) len[std::size_t(b)] = tokens - 3 - 7 * b;
  const NeighborhoodAttention<Rank, T, Arch> na({.axes = axes});
  const auto got =
      na.forward(ext, q.template view<4>(), k.template view<4>(), v.template view<4>(),
                 lengths ? std::span<const std::int64_t>(len) : std::span<const std::int64_t>());
  std::vector<std::vector<std::int64_t>> keys(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t)
    keys[std::size_t(t)] = test_support::neighborhood_reference_keys(ext, axes, t);
  std::int64_t pairs = 0;
  const auto visible = [&](std::int64_t b, std::int64_t, std::int64_t t, std::int64_t s) {
    if (s >= len[std::size_t(b)]) return false;
    const auto& ks = keys[std::size_t(t)];
    return std::binary_search(ks.begin(), ks.end(), s);
  };
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < tokens; ++t)
      for (std::int64_t s : keys[std::size_t(t)]) pairs += s < len[std::size_t(b)] ? 1 : 0;
  const auto want = reference(q, k, v, 1.0 / std::sqrt(double(D)), visible);
  CHECK(max_err(got, want) <= tolerance<T>());
  if (lengths) {
    CHECK(na.pairs(ext, len) == pairs);
  } else {
    CHECK(na.pairs(ext) * B == pairs);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("1D neighborhood attention matches the brute-force reference", "[neighborhood]",
                   float, double) {
  const auto row4 = GENERATE(table<std::int64_t, std::int64_t, std::int64_t, std::int64_t, bool>(
      {{32, 7, 1, 1, false},
       {33, 7, 1, 1, true},
       {40, 5, 3, 1, false},
       {41, 5, 2, 1, false},
       {45, 7, 2, 3, false},
       {45, 7, 2, 4, true},
       {17, 1, 1, 1, false},
       {100, 33, 1, 1, false},
       {64, 9, 7, 2, true},
       {300, 61, 2, 1, false}}));
  const auto L = std::get<0>(row4);
  const auto kernel = std::get<1>(row4);
  const auto dil = std::get<2>(row4);
  const auto stride = std::get<3>(row4);
  const auto causal = std::get<4>(row4);
  const bool gqa = GENERATE(false, true);
  const bool lengths = GENERATE(false, true);
  CAPTURE(L, kernel, dil, stride, causal, gqa, lengths);
  check_neighborhood<1, TestType>({L}, {NeighborhoodAxis{kernel, dil, stride, causal}}, 2,
                                  gqa ? 4 : 2, 2, 16, lengths, 51);
}

TEMPLATE_TEST_CASE("2D neighborhood attention matches the brute-force reference", "[neighborhood]",
                   float, double) {
  const auto row5 = GENERATE(
      table<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
            std::int64_t, std::int64_t, bool, bool>({{8, 8, 3, 3, 1, 1, 1, 1, false, false},
                                                     {13, 17, 5, 7, 1, 2, 1, 1, false, false},
                                                     {12, 20, 3, 5, 2, 3, 2, 3, false, false},
                                                     {9, 14, 5, 7, 1, 1, 1, 2, true, false},
                                                     {10, 11, 3, 3, 3, 1, 1, 1, false, true},
                                                     {16, 16, 13, 5, 1, 3, 4, 5, true, true}}));
  const auto X = std::get<0>(row5);
  const auto Y = std::get<1>(row5);
  const auto kx = std::get<2>(row5);
  const auto ky = std::get<3>(row5);
  const auto dx = std::get<4>(row5);
  const auto dy = std::get<5>(row5);
  const auto sx = std::get<6>(row5);
  const auto sy = std::get<7>(row5);
  const auto cx = std::get<8>(row5);
  const auto cy = std::get<9>(row5);
  const bool lengths = GENERATE(false, true);
  CAPTURE(X, Y, kx, ky, dx, dy, sx, sy, cx, cy, lengths);
  check_neighborhood<2, TestType>(
      {X, Y}, {NeighborhoodAxis{kx, dx, sx, cx}, NeighborhoodAxis{ky, dy, sy, cy}}, 1, 4, 2, 24,
      lengths, 61);
}

TEMPLATE_TEST_CASE("3D neighborhood attention matches the brute-force reference", "[neighborhood]",
                   float, double) {
  const auto row6 = GENERATE(
      table<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
            std::int64_t, std::int64_t, bool>({{4, 6, 7, 3, 3, 3, 1, 1, false},
                                               {5, 6, 9, 3, 5, 3, 2, 2, true},
                                               {6, 5, 8, 3, 3, 7, 1, 3, false}}));
  const auto X = std::get<0>(row6);
  const auto Y = std::get<1>(row6);
  const auto Z = std::get<2>(row6);
  const auto kx = std::get<3>(row6);
  const auto ky = std::get<4>(row6);
  const auto kz = std::get<5>(row6);
  const auto dz = std::get<6>(row6);
  const auto sz = std::get<7>(row6);
  const auto cx = std::get<8>(row6);
  const bool lengths = GENERATE(false, true);
  CAPTURE(X, Y, Z, kx, ky, kz, dz, sz, cx, lengths);
  check_neighborhood<3, TestType>(
      {X, Y, Z},
      {NeighborhoodAxis{kx, 1, 1, cx}, NeighborhoodAxis{ky, 1, 1, false},
       NeighborhoodAxis{kz, dz, sz, false}},
      2, 2, 1, 16, lengths, 71);
}

TEST_CASE("neighborhood attention matches the NATTEN fixtures", "[neighborhood][fixture]") {
  struct Case {
    const char* file;
    std::vector<std::int64_t> extents;
    NeighborhoodAxis axis;
  };
  const Case cases[] = {{"natten_1d_tiny.safetensors", {32}, {7, 1, 1, false}},
                        {"natten_1d_tiny_causal.safetensors", {32}, {7, 1, 1, true}},
                        {"natten_2d_tiny.safetensors", {8, 8}, {3, 1, 1, false}}};
  for (const Case& c : cases) {
    CAPTURE(c.file);
    const auto st = open_fixture(c.file);
    std::int64_t tokens = 1;
    for (auto e : c.extents) tokens *= e;
    // [B, spatial..., H=1, D=16] row-major is [1, tokens, 1, 16].
    const auto as4 = [&](const char* name) {
      const auto bytes = st.bytes(name);
      REQUIRE(std::int64_t(bytes.size()) == tokens * 16 * 4);
      return ConstView<float, 4>(reinterpret_cast<const float*>(bytes.data()), {1, tokens, 1, 16},
                                 {tokens * 16, 16, 16, 1});
    };
    const auto q = as4("q"), k = as4("k"), v = as4("v"), want = as4("out");
    core::Tensor<float> got({1, tokens, 1, 16});
    if (c.extents.size() == 1) {
      NeighborhoodAttention<1, float>({.axes = {c.axis}}).forward({tokens}, q, k, v, got.view<4>());
    } else {
      NeighborhoodAttention<2, float>({.axes = {c.axis, c.axis}})
          .forward({c.extents[0], c.extents[1]}, q, k, v, got.view<4>());
    }
    double err = 0;
    for (std::int64_t t = 0; t < tokens; ++t)
      for (std::int64_t d = 0; d < 16; ++d)
        err = std::max(err, double(std::abs(got(0, t, 0, d) - want(0, t, 0, d))));
    // The fixture is float32 torch output: both sides carry float rounding.
    CHECK(err <= 2e-5);
  }
}

TEST_CASE("neighborhood attention is bit-identical for 1 and 2 threads",
          "[neighborhood][threads]") {
  const auto q = inputs<float>({2, 20 * 24, 4, 32}, 81);
  const auto k = inputs<float>({2, 20 * 24, 2, 32}, 82);
  const NeighborhoodAttention<2, float> na(
      {.axes = {NeighborhoodAxis{5, 2, 1, false}, NeighborhoodAxis{7, 1, 2, true}}});
  core::Tensor<float> one, two;
  {
    ScopedNumThreads t(1);
    one = na.forward({20, 24}, q.view<4>(), k.view<4>(), k.view<4>());
  }
  {
    ScopedNumThreads t(2);
    two = na.forward({20, 24}, q.view<4>(), k.view<4>(), k.view<4>());
  }
  CHECK(same_bits(one, two));
}

// Non-causal, stride 1, no key lengths: the row kernel (neighborhood_kernels.hpp) on SIMD archs,
// the tile executor on scalar. Shapes with interior tiles and border tiles along the last axis
// (lane windows shifted differently), partial tiles (extent not a multiple of the lanes),
// dilation groups of unequal size, odd extents before the last axis (a query row without a
// pair), GQA, D not a multiple of the P . V register block, and packed rows evicted from the
// per-thread cache (2D and 3D).
TEMPLATE_TEST_CASE("neighborhood row kernel matches the reference on every arch",
                   "[neighborhood][arch]", float, double) {
  simd::for_each_arch([](auto arch) {
    using A = decltype(arch);
    CAPTURE(A::name());
    check_neighborhood<2, TestType, A>({7, 70}, {NeighborhoodAxis{3}, NeighborhoodAxis{5}}, 1, 4, 2,
                                       24, false, 91);
    check_neighborhood<2, TestType, A>({9, 43}, {NeighborhoodAxis{5, 1}, NeighborhoodAxis{7, 2}}, 2,
                                       2, 2, 80, false, 92);
    check_neighborhood<2, TestType, A>({12, 35}, {NeighborhoodAxis{3, 2}, NeighborhoodAxis{13}}, 1,
                                       2, 1, 16, false, 93);
    check_neighborhood<3, TestType, A>(
        {5, 6, 37}, {NeighborhoodAxis{3}, NeighborhoodAxis{3, 2}, NeighborhoodAxis{9, 2}}, 1, 2, 2,
        32, false, 94);
    check_neighborhood<3, TestType, A>(
        {3, 7, 20}, {NeighborhoodAxis{3}, NeighborhoodAxis{5}, NeighborhoodAxis{1}}, 1, 2, 1, 8,
        false, 95);
    // More key rows than the per-thread cache of packed rows holds (ring_rows: a band's rows
    // and the next band's new ones), so later rows are packed into slots that held others;
    // GQA runs two query heads per band.
    check_neighborhood<2, TestType, A>({30, 21}, {NeighborhoodAxis{5}, NeighborhoodAxis{3}}, 1, 4,
                                       2, 16, false, 100);
  });
}

TEST_CASE("neighborhood row kernel is bit-identical for any thread count and schedule",
          "[neighborhood][threads]") {
  const NeighborhoodAttention<2, float> na(
      {.axes = {NeighborhoodAxis{5, 2, 1, false}, NeighborhoodAxis{9, 1, 1, false}}});
  const auto forward = [&](int threads, const core::Tensor<float>& q,
                           const core::Tensor<float>& k) {
    ScopedNumThreads t(threads);
    return na.forward({11, 40}, q.view<4>(), k.view<4>(), k.view<4>());
  };
  const auto q = inputs<float>({2, 11 * 40, 4, 32}, 96);
  const auto k = inputs<float>({2, 11 * 40, 2, 32}, 97);
  CHECK(same_bits(forward(1, q, k), forward(2, q, k)));
  // More threads than (b, kv head) pairs (here 2): every head is packed first and the tiles
  // are split across threads, the other schedule; 1 thread packs and runs one kv head per task.
  const auto q1 = inputs<float>({1, 11 * 40, 4, 32}, 98);
  const auto k1 = inputs<float>({1, 11 * 40, 2, 32}, 99);
  CHECK(same_bits(forward(1, q1, k1), forward(3, q1, k1)));
}

TEST_CASE("neighborhood errors name the layer, argument and shapes", "[neighborhood][errors]") {
  using NA2 = NeighborhoodAttention<2, float>;
  REQUIRE_THROWS_WITH(NA2({.axes = {NeighborhoodAxis{0}, NeighborhoodAxis{3}}}),
                      Contains("NeighborhoodAttention") && Contains("'axes[0].kernel_size' = 0"));
  REQUIRE_THROWS_WITH(NA2({.axes = {NeighborhoodAxis{3}, NeighborhoodAxis{3, 0}}}),
                      Contains("'axes[1].dilation' = 0"));
  REQUIRE_THROWS_WITH(NA2({.axes = {NeighborhoodAxis{3, 1, 0}, NeighborhoodAxis{3}}}),
                      Contains("'axes[0].stride' = 0"));
  REQUIRE_THROWS_WITH(NA2({.axes = {NeighborhoodAxis{3, 1, 4}, NeighborhoodAxis{3}}}),
                      Contains("'axes[0].stride' = 4") && Contains("kernel_size = 3"));
  const auto q = inputs<float>({1, 8 * 6, 2, 8}, 1);
  const auto q2 = inputs<float>({1, 40, 2, 8}, 1);
  // even kernel size
  REQUIRE_THROWS_WITH(NA2({.axes = {NeighborhoodAxis{4}, NeighborhoodAxis{3}}})
                          .forward({8, 6}, q.view<4>(), q.view<4>(), q.view<4>()),
                      Contains("NeighborhoodAttention::forward") &&
                          Contains("'axes[0].kernel_size' = 4") && Contains("odd"));
  // kernel larger than the axis
  REQUIRE_THROWS_WITH(NA2({.axes = {NeighborhoodAxis{3}, NeighborhoodAxis{7}}})
                          .forward({8, 6}, q.view<4>(), q.view<4>(), q.view<4>()),
                      Contains("NeighborhoodAttention::forward") &&
                          Contains("'axes[1].kernel_size' = 7") && Contains("[8, 6]"));
  // dilation * kernel > axis
  REQUIRE_THROWS_WITH(NA2({.axes = {NeighborhoodAxis{3, 3}, NeighborhoodAxis{3}}})
                          .forward({8, 6}, q.view<4>(), q.view<4>(), q.view<4>()),
                      Contains("'axes[0].dilation' = 3") && Contains("length 8"));
  // tokens != product of the extents
  REQUIRE_THROWS_WITH(
      NA2({.axes = {NeighborhoodAxis{3}, NeighborhoodAxis{3}}})
          .forward({8, 6}, q2.view<4>(), q2.view<4>(), q2.view<4>()),
      Contains("'q'") && Contains("[B=1, tokens=40, H=2, D=8]") && Contains("tokens=48"));
  const std::vector<std::int64_t> bad = {49};
  REQUIRE_THROWS_WITH(NA2({.axes = {NeighborhoodAxis{3}, NeighborhoodAxis{3}}})
                          .forward({8, 6}, q.view<4>(), q.view<4>(), q.view<4>(), bad),
                      Contains("'key_lengths[0]' = 49"));
}

// ---------------------------------------------------------------------------------------------
// MoBA

namespace {

// [S, H, D] fixture tensor rows [s0, s0 + n) as [1, n, H, D].
ConstView<float, 4> seq_view(const io::SafeTensors& st, const char* name, std::int64_t s0,
                             std::int64_t n) {
  const auto t = st.view<float, 3>(name);
  return {t.data() + s0 * t.stride(0),
          {1, n, t.extent(1), t.extent(2)},
          {n * t.stride(0), t.stride(0), t.stride(1), t.stride(2)}};
}

}  // namespace

TEST_CASE("MoBA matches the moba_naive fixtures", "[moba][fixture]") {
  for (const char* file : {"moba_tiny.safetensors", "moba_tiny_varlen.safetensors"}) {
    CAPTURE(file);
    const auto st = open_fixture(file);
    const auto cu = st.view<std::int64_t, 1>("cu_seqlens");
    const auto sel_want = st.view<std::int64_t, 4>("selected_blocks");
    const MobaAttention<float> moba({.block_size = 16, .top_k = 2});  // scale 1/sqrt(16) = 0.25
    for (std::int64_t b = 0; b + 1 < cu.extent(0); ++b) {
      const std::int64_t s0 = cu(b), n = cu(b + 1) - cu(b);
      const auto q = seq_view(st, "q", s0, n), k = seq_view(st, "k", s0, n),
                 v = seq_view(st, "v", s0, n), want = seq_view(st, "out", s0, n);
      MobaSelection sel;
      moba.route(q, k, sel);
      const std::int64_t H = q.extent(2);
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t t = 0; t < n; ++t) {
          std::vector<std::int32_t> exp;
          for (std::int64_t j = 0; j < sel_want.extent(3); ++j)
            if (sel_want(b, h, t, j)) exp.push_back(std::int32_t(j));
          const auto got_sel = sel.of(h * n + t);
          CHECK(std::vector<std::int32_t>(got_sel.begin(), got_sel.end()) == exp);
        }
      core::Tensor<float> got({1, n, H, q.extent(3)});
      moba.execute(sel, q, k, v, got.view<4>());
      double err = 0;
      for (std::int64_t t = 0; t < n; ++t)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t d = 0; d < q.extent(3); ++d)
            err = std::max(err, double(std::abs(got(0, t, h, d) - want(0, t, h, d))));
      CHECK(err <= 2e-5);
    }
  }
}

TEMPLATE_TEST_CASE("MoBA and VMoBA match the naive reference", "[moba]", float, double) {
  using T = TestType;
  const auto row7 = GENERATE(
      table<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
            std::int64_t, double, bool>({{1, 100, 2, 1, 16, 16, 3, 0.0, true},
                                         {2, 77, 4, 2, 24, 10, 2, 0.0, true},
                                         {1, 130, 2, 2, 64, 32, 5, 0.0, true},
                                         {1, 60, 2, 1, 16, 8, 3, 0.0, false},
                                         {2, 64, 2, 2, 8, 8, 0, 0.5, false},
                                         {1, 90, 3, 1, 16, 12, 0, 0.3, true}}));
  const auto B = std::get<0>(row7);
  const auto S = std::get<1>(row7);
  const auto H = std::get<2>(row7);
  const auto Hkv = std::get<3>(row7);
  const auto D = std::get<4>(row7);
  const auto bs = std::get<5>(row7);
  const auto top_k = std::get<6>(row7);
  const auto thr = std::get<7>(row7);
  const auto causal = std::get<8>(row7);
  CAPTURE(B, S, H, Hkv, D, bs, top_k, thr, causal);
  const auto q = inputs<T>({B, S, H, D}, 91);
  const auto k = inputs<T>({B, S, Hkv, D}, 92);
  const auto v = inputs<T>({B, S, Hkv, D}, 93);
  const MobaAttention<T> moba(
      {.block_size = bs, .top_k = top_k, .threshold = thr, .causal = causal});
  MobaSelection sel;
  moba.route(q.template view<4>(), k.template view<4>(), sel);
  core::Tensor<T> got({B, S, H, D});
  moba.execute(sel, q.template view<4>(), k.template view<4>(), v.template view<4>(),
               got.template view<4>());
  // Selection by brute force; the executor is then checked on the selection it was given.
  const auto qf = as_float(q), kf = as_float(k);
  const std::int64_t ext[1] = {S}, blk[1] = {bs};
  const auto ref_sel = test_support::moba_reference_select(
      qf.template view<4>(), kf.template view<4>(), ext, blk, top_k, thr, causal);
  std::int64_t pairs = 0;
  for (std::int64_t i = 0; i < B * H * S; ++i) {
    const auto s = sel.of(i);
    if (ref_sel[std::size_t(i)].margin > 1e-4)
      CHECK(std::vector<std::int32_t>(s.begin(), s.end()) == ref_sel[std::size_t(i)].blocks);
  }
  const auto visible = [&](std::int64_t b, std::int64_t h, std::int64_t t, std::int64_t j) {
    if (causal && j > t) return false;
    for (std::int32_t n : sel.of((b * H + h) * S + t))
      if (n == j / bs) return true;
    return false;
  };
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t t = 0; t < S; ++t)
        for (std::int64_t j = 0; j < S; ++j) pairs += visible(b, h, t, j) ? 1 : 0;
  const auto want = reference(q, k, v, 1.0 / std::sqrt(double(D)), visible);
  CHECK(max_err(got, want) <= tolerance<T>());
  CHECK(moba.pairs(sel, S) == pairs);
}

TEST_CASE("VMoBA 2D partition execution matches the naive reference", "[moba]") {
  const std::int64_t X = 12, Y = 10, S = X * Y, H = 2, D = 16;
  const auto q = inputs<float>({1, S, H, D}, 101);
  const auto k = inputs<float>({1, S, H, D}, 102);
  const MobaPartition part{{X, Y}, {4, 3}};
  const MobaAttention<float> moba({.top_k = 3, .causal = false});
  MobaSelection sel;
  moba.route(q.view<4>(), k.view<4>(), part, sel);
  core::Tensor<float> got({1, S, H, D});
  moba.execute(sel, part, q.view<4>(), k.view<4>(), k.view<4>(), got.view<4>());
  const std::int64_t ext[2] = {X, Y}, blk[2] = {4, 3};
  const auto visible = [&](std::int64_t, std::int64_t h, std::int64_t t, std::int64_t j) {
    for (std::int32_t n : sel.of(h * S + t))
      if (n == test_support::ref_block_id(ext, blk, j)) return true;
    return false;
  };
  const auto want =
      test_support::ref_masked_attention(q.view<4>(), k.view<4>(), k.view<4>(), 0.25, visible);
  CHECK(max_err(got, want) <= 2e-5);
  std::int64_t pairs = 0;
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t t = 0; t < S; ++t)
      for (std::int64_t j = 0; j < S; ++j) pairs += visible(0, h, t, j) ? 1 : 0;
  CHECK(moba.pairs(sel, part) == pairs);
}

TEST_CASE("MoBA is bit-identical for 1 and 2 threads", "[moba][threads]") {
  const auto q = inputs<float>({2, 1500, 4, 32}, 111);
  const auto k = inputs<float>({2, 1500, 2, 32}, 112);
  const MobaAttention<float> moba({.block_size = 64, .top_k = 4});
  core::Tensor<float> one, two;
  {
    ScopedNumThreads t(1);
    one = moba.forward(q.view<4>(), k.view<4>(), k.view<4>());
  }
  {
    ScopedNumThreads t(2);
    two = moba.forward(q.view<4>(), k.view<4>(), k.view<4>());
  }
  CHECK(same_bits(one, two));
}

TEST_CASE("MoBA errors name the layer, argument and shapes", "[moba][errors]") {
  const auto q = inputs<float>({1, 32, 2, 8}, 1);
  const auto k = inputs<float>({1, 32, 2, 8}, 2);
  const auto k24 = inputs<float>({1, 24, 2, 8}, 2);
  MobaSelection sel;
  REQUIRE_THROWS_WITH(
      MobaAttention<float>({.block_size = 0, .top_k = 1}).route(q.view<4>(), k.view<4>(), sel),
      Contains("'block_size' = 0") && Contains("S=32"));
  REQUIRE_THROWS_WITH(
      MobaAttention<float>({.block_size = 8, .top_k = 5}).route(q.view<4>(), k.view<4>(), sel),
      Contains("'top_k' = 5") && Contains("number of blocks = 4"));
  // causal MoBA on a non-causal layout (queries are not the key positions)
  REQUIRE_THROWS_WITH(
      MobaAttention<float>({.block_size = 8, .top_k = 2}).route(q.view<4>(), k24.view<4>(), sel),
      Contains("'q'") && Contains("T = S = 24"));
  REQUIRE_THROWS_WITH(MobaAttention<float>({.block_size = 8, .top_k = 2, .scale = 0.0}),
                      Contains("MobaAttention") && Contains("'scale'"));
  const MobaAttention<float> moba({.block_size = 8, .top_k = 2});
  moba.route(q.view<4>(), k.view<4>(), sel);
  core::Tensor<float> out({1, 32, 2, 8});
  MobaSelection bad = sel;
  bad.blocks[1] = 9;
  REQUIRE_THROWS_WITH(moba.execute(bad, q.view<4>(), k.view<4>(), k.view<4>(), out.view<4>()),
                      Contains("MobaAttention::execute") && Contains("'sel.blocks[1]' = 9"));
  // Corrupted CSR offsets (a row reaching past blocks, a decreasing offset) and a repeated
  // block: named errors, not reads outside sel.blocks or keys counted twice.
  bad = sel;
  bad.offsets[5] = std::int64_t(bad.blocks.size()) + 40;
  REQUIRE_THROWS_WITH(moba.execute(bad, q.view<4>(), k.view<4>(), k.view<4>(), out.view<4>()),
                      Contains("MobaAttention::execute") && Contains("'sel.offsets[6]'") &&
                          Contains("non-decreasing"));
  bad = sel;
  bad.offsets[3] = -5;
  REQUIRE_THROWS_WITH(moba.execute(bad, q.view<4>(), k.view<4>(), k.view<4>(), out.view<4>()),
                      Contains("'sel.offsets[3]' = -5"));
  bad = sel;
  REQUIRE(bad.offsets[21] - bad.offsets[20] == 2);  // query 20 of head 0 keeps two blocks
  bad.blocks[std::size_t(bad.offsets[20]) + 1] = bad.blocks[std::size_t(bad.offsets[20])];
  REQUIRE_THROWS_WITH(moba.execute(bad, q.view<4>(), k.view<4>(), k.view<4>(), out.view<4>()),
                      Contains("strictly ascending") && Contains("query row 20"));
  const auto q16 = inputs<float>({1, 16, 2, 8}, 1);
  core::Tensor<float> out16({1, 16, 2, 8});
  REQUIRE_THROWS_WITH(moba.execute(sel, q16.view<4>(), k.view<4>(), k.view<4>(), out16.view<4>()),
                      Contains("'sel'") && Contains("[B=1, H=2, T=32, N=4]"));
}

TEST_CASE("sliding window pairs: closed form against the brute-force rule, and huge sizes",
          "[sliding][pairs]") {
  // Counted pair by pair from the rule in the header comment (as the forward test's reference
  // does), for one sequence of key length len, so every count is compared on its own.
  const auto check = [](bool causal, std::int64_t window, std::int64_t chunk, std::int64_t sinks,
                        std::int64_t S, std::int64_t Tq, std::int64_t len) {
    std::int64_t want = 0;
    for (std::int64_t i = 0; i < Tq; ++i) {
      const std::int64_t P = i + S - Tq;
      for (std::int64_t j = 0; j < len; ++j) {
        bool vis = !(causal && j > P);
        if (vis && j >= sinks) {
          if (window > 0 && (causal ? j <= P - window : std::abs(j - P) >= window)) vis = false;
          if (chunk > 0 && j / chunk != P / chunk) vis = false;
        }
        want += vis ? 1 : 0;
      }
    }
    const SlidingWindowAttention<float> attn(
        {.window = window, .chunk = chunk, .sinks = sinks, .causal = causal});
    const std::int64_t one[1] = {len};
    if (attn.pairs(1, Tq, S, one) == want) return true;
    CAPTURE(causal, window, chunk, sinks, S, Tq, len, want);
    REQUIRE(attn.pairs(1, Tq, S, one) == want);
    return false;
  };
  // Every configuration of small sizes.
  std::int64_t cases = 0;
  for (const bool causal : {true, false})
    for (std::int64_t window = 0; window <= 6; ++window)
      for (std::int64_t chunk = 0; chunk <= 5; ++chunk)
        for (const std::int64_t sinks : {0, 1, 2, 4, 30})
          for (std::int64_t S = 0; S <= 13 && (window > 0 || chunk > 0); ++S)
            for (std::int64_t Tq = 0; Tq <= S; ++Tq)
              for (std::int64_t len = 0; len <= S; ++len)
                cases += check(causal, window, chunk, sinks, S, Tq, len) ? 1 : 0;
  REQUIRE(cases == 410 * 1015);
  // Random larger ones: at the small sizes above many of the points where the count changes
  // slope coincide, so a missing one can go unnoticed there (it did, in a mutation check).
  std::mt19937 gen(5);
  const auto pick = [&](std::int64_t hi) { return std::int64_t(gen() % std::uint64_t(hi + 1)); };
  for (int it = 0; it < 600; ++it) {
    const bool causal = gen() % 2 == 0;
    const std::int64_t S = pick(200), Tq = pick(S), len = gen() % 3 ? pick(S) : S;
    std::int64_t window = pick(3) ? pick(60) : 0;
    const std::int64_t chunk = pick(2) ? pick(50) : 0, sinks = pick(2) ? pick(40) : 0;
    if (window == 0 && chunk == 0) window = 1 + pick(60);
    check(causal, window, chunk, sinks, S, Tq, len);
  }
  // 2^31 - 1 positions, worked by hand: a causal window w sees min(P + 1, w) keys; chunks of c
  // (S = m * c) see 1 + 2 + ... + c per chunk; four sinks add 4 to each query past them,
  // 1, 2, 3 to the first three (window 1: a query's own key, or a sink).
  const std::int64_t S = (std::int64_t(1) << 31) - 1, w = 1000;
  const SlidingWindowAttention<float> band({.window = w});
  REQUIRE(band.pairs(1, S, S) == w * (w + 1) / 2 + (S - w) * w);
  const std::int64_t c = 7, m = S / c;  // 2^31 - 1 = 7 * 306783378 + 1
  const SlidingWindowAttention<float> chunked({.chunk = c});
  REQUIRE(chunked.pairs(1, m * c, m * c) == m * (c * (c + 1) / 2));
  const SlidingWindowAttention<float> sinks({.window = 1, .sinks = 4});
  REQUIRE(sinks.pairs(1, S, S) == (1 + 2 + 3 + 4) + (S - 4) * 5);
  // Many distinct key lengths of such a sequence: O(1) each (it looped over the queries); the
  // batch's count is the sum of its sequences'.
  std::vector<std::int64_t> lengths(4096);
  for (std::size_t b = 0; b < lengths.size(); ++b) lengths[b] = S - std::int64_t(b);
  std::int64_t want = 0;
  for (const std::int64_t len : lengths) {
    const std::int64_t one[1] = {len};
    want += band.pairs(1, S, S, one);
  }
  REQUIRE(band.pairs(std::int64_t(lengths.size()), S, S, lengths) == want);
  const std::int64_t shorter[1] = {S - 10};  // the last 10 queries lose their newest keys
  std::int64_t lost = 0;
  for (std::int64_t k = 1; k <= 10; ++k) lost += std::min<std::int64_t>(k, w);
  REQUIRE(band.pairs(1, S, S, shorter) == band.pairs(1, S, S) - lost);
}

TEST_CASE("hostile sizes: errors or bounded work, never a hang, an overflow or a huge allocation",
          "[errors][hostile]") {
  const std::int64_t big = std::numeric_limits<std::int64_t>::max();
  const auto q = uniform_tensor<float>({1, 16, 2, 8}, 1);
  const auto k = uniform_tensor<float>({1, 16, 2, 8}, 2);
  core::Tensor<float> out({1, 16, 2, 8});
  using NA2 = NeighborhoodAttention<2, float>;
  const NA2 na({.axes = {NeighborhoodAxis{3}, NeighborhoodAxis{3}}});
  // Grids no tensor could hold: refused before pairs() or forward loop over them.
  REQUIRE_THROWS_WITH(na.pairs({big / 2, 4}), Contains("NeighborhoodAttention::pairs") &&
                                                  Contains("'extents'") &&
                                                  Contains("[4611686018427387903, 4]"));
  REQUIRE_THROWS_WITH(na.forward({big, 3}, q.view<4>(), k.view<4>(), k.view<4>(), out.view<4>()),
                      Contains("'extents'"));
  REQUIRE_THROWS_WITH(na.forward({-4, -4}, q.view<4>(), k.view<4>(), k.view<4>(), out.view<4>()),
                      Contains("'extents'") && Contains("[-4, -4]"));
  // Key lengths outside [0, tokens] (INT64_MAX would overflow the count).
  const std::int64_t lengths[2] = {16, big};
  REQUIRE(na.pairs({4, 4}, std::span(lengths, 1)) == na.pairs({4, 4}));
  {
    // Key lengths on a 2^20 x 2^20 grid are counted axis by axis, not token by token (2^40
    // tokens). Keys below 5 lie in row 0, seen by query rows 0 and 1, each of whose rows
    // sees 3 + 3 + 3 + 3 + 2 + 1 of them.
    const std::int64_t n = std::int64_t(1) << 20, few[] = {5, 0};
    REQUIRE(na.pairs({n, n}, few) == 2 * 15 + 0);
  }
  REQUIRE_THROWS_WITH(na.pairs({4, 4}, lengths),
                      Contains("NeighborhoodAttention::pairs") && Contains("'key_lengths[1]'"));
  // Sliding window: a huge batch is counted once per sequence and checked, not looped over.
  const SlidingWindowAttention<float> sw({.window = 4});
  REQUIRE(sw.pairs(3, 16, 16) == 3 * sw.pairs(1, 16, 16));
  REQUIRE_THROWS_WITH(sw.pairs(big, 16, 16),
                      Contains("SlidingWindowAttention::pairs") && Contains("'B'"));
  REQUIRE_THROWS_WITH(sw.pairs(1, 16, big), Contains("'S'") || Contains("S=9223372036854775807"));
  // Windows, chunks and blocks larger than the sequence behave as "everything".
  const SlidingWindowAttention<float> all_window({.window = big, .sinks = big});
  const SlidingWindowAttention<float> all_chunk({.chunk = big});
  const SlidingWindowAttention<float> causal_dense({.window = 16});
  const auto dense = causal_dense.forward(q.view<4>(), k.view<4>(), k.view<4>());
  for (const auto* layer : {&all_window, &all_chunk}) {
    const auto got = layer->forward(q.view<4>(), k.view<4>(), k.view<4>());
    REQUIRE(std::equal(got.begin(), got.end(), dense.begin()));
  }
  // Non-causal: a window of INT64_MAX (its end, P + window, would overflow) is every key.
  const SlidingWindowAttention<float> all_keys({.window = big, .causal = false});
  const SlidingWindowAttention<float> window_16({.window = 16, .causal = false});
  const auto full = window_16.forward(q.view<4>(), k.view<4>(), k.view<4>());
  const auto got_all = all_keys.forward(q.view<4>(), k.view<4>(), k.view<4>());
  REQUIRE(std::equal(got_all.begin(), got_all.end(), full.begin()));
  REQUIRE(all_keys.pairs(1, 16, 16) == 16 * 16);
  // Block-sparse: blocks far larger than T and S; pairs over a shared mask times a huge H.
  BlockMask mask{.num_queries = 16, .num_keys = 16, .query_block = big, .key_block = big};
  mask.offsets = {0, 1};
  mask.indices = {0};
  const BlockSparseAttention<float> bs;
  REQUIRE(bs.pairs(mask, 2) == 2 * 16 * 16);
  REQUIRE_NOTHROW(bs.forward(q.view<4>(), k.view<4>(), k.view<4>(), mask, out.view<4>()));
  REQUIRE_THROWS_WITH(bs.pairs(mask, big),
                      Contains("BlockSparseAttention::pairs") && Contains("'H'"));
  // A mask may claim T and S no tensor holds: pairs counts blocks in closed form (2^31 rows,
  // not a loop over them) and refuses a count past int64.
  const std::int64_t n31 = std::int64_t(1) << 31;
  BlockMask huge_mask{.num_queries = n31, .num_keys = n31, .query_block = big, .key_block = big};
  huge_mask.offsets = {0, 1};
  huge_mask.indices = {0};
  REQUIRE(bs.pairs(huge_mask, 1) == n31 * n31);
  const BlockSparseAttention<float> causal_bs({.causal = true});
  REQUIRE(causal_bs.pairs(huge_mask, 1) == n31 * (n31 + 1) / 2);  // row i sees i + 1 keys
  huge_mask.num_keys = n31 + 5;  // five more keys before the queries: row i sees i + 6
  REQUIRE(causal_bs.pairs(huge_mask, 1) == n31 * (n31 + 1) / 2 + 5 * n31);
  huge_mask.num_queries = huge_mask.num_keys = std::int64_t(1) << 40;
  REQUIRE_THROWS_WITH(causal_bs.pairs(huge_mask, 1),
                      Contains("BlockSparseAttention::pairs") && Contains("'mask'"));
  // Stride-0 views may claim 2^40 queries over one element: refused by size, not run.
  float one = 1.0f;
  const core::View<float, 4> many(&one, {1, std::int64_t(1) << 40, 1, 8}, {0, 0, 0, 0});
  std::vector<float> small_out(8);
  const core::View<float, 4> out_many(small_out.data(), {1, std::int64_t(1) << 40, 1, 8},
                                      {0, 0, 0, 1});
  huge_mask.num_keys = 16;
  REQUIRE_THROWS_WITH(
      bs.forward(many, k.view<4>().slice(2, 0, 1), k.view<4>().slice(2, 0, 1), huge_mask, out_many),
      Contains("BlockSparseAttention::forward") && Contains("'q'") && Contains("1099511627776"));
  // MoBA: huge blocks (one block), a partition too large, a selection that does not match.
  const MobaAttention<float> one_block({.block_size = big, .top_k = 1});
  REQUIRE_NOTHROW(one_block.forward(q.view<4>(), k.view<4>(), k.view<4>(), out.view<4>()));
  const MobaAttention<float> moba({.block_size = 4, .top_k = 2});
  MobaSelection sel;
  moba.route(q.view<4>(), k.view<4>(), sel);
  REQUIRE_THROWS_WITH(moba.pairs(sel, big), Contains("MoBA::moba_pairs") && Contains("partition"));
  REQUIRE_THROWS_WITH(moba.pairs(sel, 20), Contains("MoBA::moba_pairs") && Contains("'sel'"));
  MobaSelection bad = sel;
  bad.blocks[0] = 7;
  REQUIRE_THROWS_WITH(moba.pairs(bad, 16), Contains("'sel.blocks[0]' = 7"));
  // The threshold rule ignores top_k: a huge one is no allocation size.
  const MobaAttention<float> by_threshold(
      {.block_size = 4, .top_k = big, .threshold = 0.5, .causal = false});
  REQUIRE_NOTHROW(by_threshold.forward(q.view<4>(), k.view<4>(), k.view<4>(), out.view<4>()));
  MobaPartition huge;
  huge.extents = {big, big};
  huge.block = {1, 1};
  REQUIRE_THROWS_WITH(moba.route(q.view<4>(), k.view<4>(), huge, sel), Contains("'partition'"));
}
