// ToMe proportional attention: a naive double reference, the identity "a key of size s weighs
// like s copies of it", a hand-computed case, the softmax kernel on every arch, and errors.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "support/compare.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/tokens/proportional_attention.hpp"

using switchyard::Tensor;
using switchyard::View;
using namespace switchyard::tokens;
using Catch::Contains;

namespace {

using namespace test_support;

// softmax(q k^T * scale + log(size)) v, naive, double. q: [B,T,H,D], k/v: [B,S,H,D], size: [B,S].
template <class Q, class K, class V, class Z>
std::vector<double> ref_attention(const Q& q, const K& k, const V& v, const Z& size, std::int64_t B,
                                  std::int64_t T, std::int64_t S, std::int64_t H, std::int64_t D) {
  std::vector<double> out(B * T * H * D, 0);
  const double scale = 1.0 / std::sqrt(double(D));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t t = 0; t < T; ++t) {
        std::vector<double> l(S);
        for (std::int64_t s = 0; s < S; ++s) {
          double d = 0;
          for (std::int64_t j = 0; j < D; ++j) d += double(q(b, t, h, j)) * double(k(b, s, h, j));
          l[s] = d * scale + std::log(double(size(b, s)));
        }
        const double m = *std::max_element(l.begin(), l.end());
        double sum = 0;
        for (double& e : l) sum += (e = std::exp(e - m));
        for (std::int64_t j = 0; j < D; ++j) {
          double acc = 0;
          for (std::int64_t s = 0; s < S; ++s) acc += l[s] / sum * double(v(b, s, h, j));
          out[((b * T + t) * H + h) * D + j] = acc;
        }
      }
  return out;
}

}  // namespace

TEST_CASE("proportional attention matches the naive double reference", "[tome][attention]") {
  const std::int64_t B = 2, T = 13, H = 3, D = 8, S = 13;
  // q, k, v as head slices of one fused [B, T, 3, H, D] buffer: strided views.
  const auto qkv = random_tensor<float>({B, T, 3 * H * D}, 1);
  auto slice = [&](std::int64_t which) {
    return switchyard::ConstView<float, 4>(qkv.data() + which * H * D, {B, T, H, D},
                                           {T * 3 * H * D, 3 * H * D, D, 1});
  };
  const auto q = slice(0), k = slice(1), v = slice(2);
  Tensor<float> size({B, S});
  std::mt19937 gen(2);
  for (auto& z : size) z = float(1 + gen() % 6);
  const auto out = proportional_attention<float>(q, k, v, size);
  const auto want = ref_attention(q, k, v, size, B, T, S, H, D);
  // float logits of an 8-term dot product and a 13-term weighted average: ~1e-6 of the values'
  // scale (normal values, |v| < 5): 1e-5 absolute is the bound with margin.
  for (std::int64_t i = 0; i < out.numel(); ++i) REQUIRE(out[i] == Approx(want[i]).margin(1e-5));
}

TEST_CASE("a key of size s weighs like s copies of it", "[tome][attention][property]") {
  // Merged keys with integer sizes vs plain attention over the keys repeated size times.
  const std::int64_t B = 2, T = 5, H = 2, D = 4, S = 6;
  const auto q = random_tensor<double>({B, T, H, D}, 3);
  const auto k = random_tensor<double>({B, S, H, D}, 4);
  const auto v = random_tensor<double>({B, S, H, D}, 5);
  const std::int64_t sz[B][S] = {{1, 2, 3, 1, 1, 4}, {2, 2, 1, 5, 1, 1}};
  Tensor<double> size({B, S});
  const std::int64_t S_big = 12;  // both rows sum to 12
  Tensor<double> kb({B, S_big, H, D}), vb({B, S_big, H, D}), ones({B, S_big});
  ones.fill(1.0);
  for (std::int64_t b = 0; b < B; ++b) {
    std::int64_t row = 0;
    for (std::int64_t s = 0; s < S; ++s) {
      size(b, s) = double(sz[b][s]);
      for (std::int64_t rep = 0; rep < sz[b][s]; ++rep, ++row)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t j = 0; j < D; ++j) {
            kb(b, row, h, j) = k(b, s, h, j);
            vb(b, row, h, j) = v(b, s, h, j);
          }
    }
    REQUIRE(row == S_big);
  }
  const auto merged = proportional_attention<double>(q, k, v, size);
  const auto expanded = proportional_attention<double>(q, kb, vb, ones);
  for (std::int64_t i = 0; i < merged.numel(); ++i)
    REQUIRE(merged[i] == Approx(expanded[i]).epsilon(1e-12).margin(1e-13));
}

TEST_CASE("proportional attention hand-computed case", "[tome][attention][hand]") {
  // q = 0: all logits 0, so the weights are the sizes normalised: (1, 3) / 4. v = (4, 8): 7.
  Tensor<float> q({1, 1, 1, 1}), k({1, 2, 1, 1}), v({1, 2, 1, 1}), size({1, 2});
  k[0] = 1.0f, k[1] = -2.0f, v[0] = 4.0f, v[1] = 8.0f, size[0] = 1.0f, size[1] = 3.0f;
  const auto out = proportional_attention<float>(q, k, v, size);
  CHECK(out[0] == Approx(7.0));
}

TEST_CASE("proportional attention on every arch", "[tome][simd]") {
  // N = 37 keys: not a multiple of any lane count, so every arch runs its tail.
  const std::int64_t B = 1, T = 7, H = 2, D = 16, S = 37;
  const auto q = random_tensor<float>({B, T, H, D}, 11);
  const auto k = random_tensor<float>({B, S, H, D}, 12);
  const auto v = random_tensor<float>({B, S, H, D}, 13);
  Tensor<float> size({B, S});
  std::mt19937 gen(4);
  for (auto& z : size) z = float(1 + gen() % 9);
  const auto want = ref_attention(q, k, v, size, B, T, S, H, D);
  switchyard::simd::for_each_arch([&](auto arch) {
    using A = decltype(arch);
    CAPTURE(A::name());
    const auto out = proportional_attention<float, A>(q, k, v, size);
    for (std::int64_t i = 0; i < out.numel(); ++i) REQUIRE(out[i] == Approx(want[i]).margin(1e-5));
  });
}

TEST_CASE("proportional attention rejects bad input", "[tome][attention][error]") {
  const auto q = random_tensor<float>({2, 4, 2, 8}, 1);
  const auto k = random_tensor<float>({2, 5, 2, 8}, 2);
  const auto v = random_tensor<float>({2, 5, 2, 8}, 3);
  Tensor<float> size({2, 5});
  size.fill(1.0f);
  size(0, 3) = 0.0f;
  REQUIRE_THROWS_AS(proportional_attention<float>(q, k, v, size), switchyard::config_error);
  REQUIRE_THROWS_WITH(proportional_attention<float>(q, k, v, size),
                      Contains("ToMe::proportional_attention") && Contains("'sizes'") &&
                          Contains("[b=0, s=3]") && Contains("[B=2, S=5]"));
  size.fill(1.0f);
  Tensor<float> short_size({2, 4});
  short_size.fill(1.0f);
  REQUIRE_THROWS_WITH(proportional_attention<float>(q, k, v, short_size),
                      Contains("'sizes'") && Contains("[B=2, S=4]") && Contains("[B=2, S=5]"));
  const auto k3 = random_tensor<float>({2, 5, 3, 8}, 2);
  REQUIRE_THROWS_AS(proportional_attention<float>(q, k3, v, size), switchyard::shape_error);
  REQUIRE_THROWS_WITH(
      proportional_attention<float>(q, k3, v, size),
      Contains("'k'") && Contains("[B=2, S=5, H=3, D=8]") && Contains("[B=2, S, H=2, D=8]"));
}
