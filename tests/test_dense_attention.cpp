// DenseAttention (fused kernel, every arch) against ref::dense_attention (naive
// loops in long double): many shapes, every mask type and combination, GQA,
// strided views, float and double; plus hand-computed values, thread-count
// determinism and every documented error.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <switchyard/attention/dense.hpp>
#include <switchyard/attention/dense_ref.hpp>
#include <type_traits>
#include <vector>

#include "support/compare.hpp"

using namespace switchyard;
using namespace switchyard::attention;
using Catch::Contains;

namespace {

using test_support::uniform_tensor;

struct Problem {
  std::int64_t B, T, S, H, Hkv, D;
};

enum class MaskKind {
  none,
  causal,
  causal_decode,
  causal_negative,
  lengths,
  bias,
  causal_lengths,
  all
};

const char* mask_name(MaskKind m) {
  switch (m) {
    case MaskKind::none:
      return "none";
    case MaskKind::causal:
      return "causal";
    case MaskKind::causal_decode:
      return "causal offset S-T";
    case MaskKind::causal_negative:
      return "causal offset -3";
    case MaskKind::lengths:
      return "key lengths";
    case MaskKind::bias:
      return "bias";
    case MaskKind::causal_lengths:
      return "causal + key lengths";
    case MaskKind::all:
      return "causal + key lengths + bias";
  }
  return "?";
}

// Owns the mask data; mask() builds the Mask<T> for one kind.
template <class T>
struct MaskData {
  std::vector<std::int64_t> lengths;
  core::Tensor<T> bias;

  MaskData(const Problem& p, std::uint32_t seed) : bias({p.T, p.S}) {
    // Lengths cover 0 (all masked), S (none masked) and in between.
    for (std::int64_t b = 0; b < p.B; ++b) {
      lengths.push_back(b == 0 ? std::max<std::int64_t>(1, p.S / 2 + 1) : (b == 1 ? 0 : p.S));
    }
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> u(-2.0, 2.0);
    for (auto& x : bias) x = T(u(rng));
    // Some -inf entries, and one query row (the last) with every key masked.
    for (std::int64_t i = 0; i < p.T; ++i)
      for (std::int64_t j = 0; j < p.S; ++j)
        if ((i + 2 * j) % 5 == 0 || i == p.T - 1) bias(i, j) = -std::numeric_limits<T>::infinity();
  }

  Mask<T> mask(MaskKind m, const Problem& p) const {
    const KeyLengths kl{lengths};
    const AdditiveBias<T> ab{bias.template view<2>()};
    switch (m) {
      case MaskKind::none:
        return NoMask{};
      case MaskKind::causal:
        return CausalMask{};
      case MaskKind::causal_decode:
        return CausalMask{p.S - p.T};
      case MaskKind::causal_negative:
        return CausalMask{-3};
      case MaskKind::lengths:
        return kl;
      case MaskKind::bias:
        return ab;
      case MaskKind::causal_lengths:
        return {CausalMask{}, kl};
      case MaskKind::all:
        return {CausalMask{p.S - p.T}, kl, ab};
    }
    return {};
  }
};

// Error bound for |q|, |k|, |v| <= 1 and |bias| <= 2. Rounding errors of
// independent operations grow like sqrt(n), not n (Higham & Mary's
// probabilistic bound), so: the score q.k * scale errs by ~ sqrt(D) * scale eps;
// folding log2(e) and the bias and exp2 add a few eps (double: exp2 goes through
// exp(x ln 2), |x| eps with |x| <= ~10 here); out = sum_j p_j v_j / l is a convex
// combination of |v| <= 1, so a relative error e of the p_j moves it by <= 2e,
// and the running sums over S keys add ~sqrt(log2 S) eps. Factor 8 on the lot:
// the worst seen is ~2 eps (float and double), the bound is ~40 eps; a kernel
// with a 1e-5 error anywhere (e.g. a cruder exp) fails it.
template <class T>
double tolerance(const Problem& p, double scale) {
  const double eps = std::numeric_limits<T>::epsilon();
  return 8 * eps * (2 + scale * std::sqrt(double(p.D)) + std::sqrt(std::log2(double(p.S) + 1)));
}

template <class T>
void check_problem(const Problem& p, std::uint32_t seed) {
  CAPTURE(p.B, p.T, p.S, p.H, p.Hkv, p.D);
  const auto q = uniform_tensor<T>({p.B, p.T, p.H, p.D}, seed);
  const auto k = uniform_tensor<T>({p.B, p.S, p.Hkv, p.D}, seed + 1);
  const auto v = uniform_tensor<T>({p.B, p.S, p.Hkv, p.D}, seed + 2);
  const MaskData<T> md(p, seed + 3);
  const double scale = 1.0 / std::sqrt(double(p.D));
  const double tol = tolerance<T>(p, scale);
  // One thread keeps this fast on a loaded machine; thread counts are covered
  // by the bit-identical test below.
  const ScopedNumThreads one_thread(1);
  for (MaskKind mk :
       {MaskKind::none, MaskKind::causal, MaskKind::causal_decode, MaskKind::causal_negative,
        MaskKind::lengths, MaskKind::bias, MaskKind::causal_lengths, MaskKind::all}) {
    CAPTURE(mask_name(mk));
    const Mask<T> mask = md.mask(mk, p);
    core::Tensor<T> want({p.B, p.T, p.H, p.D});
    ref::dense_attention<T>(q, k, v, want.template view<4>(), mask);
    simd::for_each_arch([&](auto arch) {
      using Arch = decltype(arch);
      CAPTURE(Arch::name());
      // Every mask on the scalar path and the build's arch; the others (same
      // kernels at other lane widths) with no mask and with every mask at once.
      const bool all_masks = simd::is_scalar_v<Arch> || std::is_same_v<Arch, simd::default_arch>;
      if (!all_masks && mk != MaskKind::none && mk != MaskKind::all) return;
      core::Tensor<T> got({p.B, p.T, p.H, p.D});
      got.fill(std::numeric_limits<T>::quiet_NaN());  // every element must be written
      DenseAttention<T, Arch>().forward(q, k, v, got.template view<4>(), mask);
      double max_err = 0;
      std::int64_t non_finite = 0, nonzero_masked = 0;
      for (std::int64_t i = 0; i < got.numel(); ++i) {
        non_finite += !std::isfinite(double(got[i]));
        nonzero_masked += want[i] == T(0) && got[i] != T(0);  // masked rows: exact zeros
        max_err = std::max(max_err, std::abs(double(got[i]) - double(want[i])));
      }
      CAPTURE(max_err, tol);
      REQUIRE(non_finite == 0);
      REQUIRE(nonzero_masked == 0);
      REQUIRE(max_err <= tol);
    });
  }
}

}  // namespace

TEMPLATE_TEST_CASE("dense attention: fused matches the reference for many shapes and masks",
                   "[dense]", float, double) {
  // {B, T, S, H, H_kv, D}: T or S = 1; odd sizes; S around every lane count,
  // score group (up to 64) and key block (128); D in {16, 32, 64, 80, 128} and odd;
  // GQA 8/2; T != S; a query block boundary (256+ rows).
  const auto p = GENERATE(values<Problem>({
      {1, 1, 1, 1, 1, 16},
      {1, 1, 37, 2, 2, 32},
      {1, 37, 1, 2, 1, 64},
      {2, 5, 15, 2, 1, 16},
      {2, 17, 17, 4, 2, 80},
      {1, 9, 63, 1, 1, 64},
      {1, 9, 65, 1, 1, 64},
      {1, 5, 129, 2, 1, 128},
      {1, 3, 70, 8, 2, 64},
      {1, 4, 257, 1, 1, 64},
      {2, 13, 11, 3, 3, 5},
      {1, 11, 33, 2, 1, 17},
      {1, 263, 40, 1, 1, 8},
  }));
  check_problem<TestType>(p, 11);
}

TEST_CASE("dense attention: tiny case worked out by hand", "[dense]") {
  // T = 1, S = 2, D = 1, scale = 1/sqrt(1) = 1. q = 1, k = {0, ln 3}: scores
  // {0, ln 3}, softmax = {1, 3} / 4. v = {1, 5}: out = 1/4 + 15/4 = 4.
  // Causal (offset 0): query 0 sees key 0 only, out = v_0 = 1 exactly.
  // Key lengths {0}: no key visible, out = 0.
  core::Tensor<float> q({1, 1, 1, 1}), k({1, 2, 1, 1}), v({1, 2, 1, 1});
  q[0] = 1.0f;
  k[0] = 0.0f;
  k[1] = float(std::log(3.0));
  v[0] = 1.0f;
  v[1] = 5.0f;
  const std::vector<std::int64_t> zero{0};
  simd::for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    CAPTURE(Arch::name());
    const DenseAttention<float, Arch> attn;
    REQUIRE(attn.forward(q, k, v)[0] == Approx(4.0f).epsilon(1e-6));
    REQUIRE(attn.forward(q, k, v, CausalMask{})[0] == 1.0f);
    REQUIRE(attn.forward(q, k, v, KeyLengths{zero})[0] == 0.0f);
  });
}

TEST_CASE("dense attention: strided views ([B, H, T, D] storage) give the same result", "[dense]") {
  const std::int64_t B = 2, T = 19, S = 23, H = 4, D = 32;
  // Storage [B, H, T, D], viewed as [B, T, H, D] by permuting strides.
  const auto qs = uniform_tensor<float>({B, H, T, D}, 5);
  const auto ks = uniform_tensor<float>({B, H, S, D}, 6);
  const auto vs = uniform_tensor<float>({B, H, S, D}, 7);
  const auto permuted = [](const core::Tensor<float>& t) {
    const std::int64_t b = t.extent(0), h = t.extent(1), n = t.extent(2), d = t.extent(3);
    return ConstView<float, 4>(t.data(), {b, n, h, d}, {h * n * d, d, n * d, 1});
  };
  core::Tensor<float> q({B, T, H, D}), k({B, S, H, D}), v({B, S, H, D});
  const auto copy = [](ConstView<float, 4> src, core::Tensor<float>& dst) {
    for (std::int64_t a = 0; a < src.extent(0); ++a)
      for (std::int64_t b = 0; b < src.extent(1); ++b)
        for (std::int64_t c = 0; c < src.extent(2); ++c)
          for (std::int64_t d = 0; d < src.extent(3); ++d) dst(a, b, c, d) = src(a, b, c, d);
  };
  copy(permuted(qs), q);
  copy(permuted(ks), k);
  copy(permuted(vs), v);
  const DenseAttention<float> attn;
  const auto dense = attn.forward(q, k, v, CausalMask{});
  core::Tensor<float> out_s({B, H, T, D});
  const View<float, 4> out_view(out_s.data(), {B, T, H, D}, {H * T * D, D, T * D, 1});
  attn.forward(permuted(qs), permuted(ks), permuted(vs), out_view, CausalMask{});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < T; ++i)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < D; ++d) REQUIRE(out_view(b, i, h, d) == dense(b, i, h, d));
}

TEMPLATE_TEST_CASE("dense attention: 1 and 2 threads give bit-identical results", "[dense]", float,
                   double) {
  using T = TestType;
  const std::int64_t B = 2, Tq = 300, S = 140, H = 4, Hkv = 2, D = 32;  // 16 tasks
  const auto q = uniform_tensor<T>({B, Tq, H, D}, 21);
  const auto k = uniform_tensor<T>({B, S, Hkv, D}, 22);
  const auto v = uniform_tensor<T>({B, S, Hkv, D}, 23);
  const std::vector<std::int64_t> lengths{S, 100};
  const Mask<T> mask{CausalMask{S - Tq}, KeyLengths{lengths}};
  const DenseAttention<T> attn;
  core::Tensor<T> one, two;
  {
    ScopedNumThreads threads(1);
    one = attn.forward(q, k, v, mask);
  }
  {
    ScopedNumThreads threads(2);
    two = attn.forward(q, k, v, mask);
  }
  REQUIRE(std::memcmp(one.data(), two.data(), sizeof(T) * std::size_t(one.numel())) == 0);
}

TEST_CASE("dense attention: every documented error names the layer, argument and shapes",
          "[dense]") {
  const core::Tensor<float> q({2, 5, 4, 8}), k({2, 7, 2, 8}), v({2, 7, 2, 8});
  const DenseAttention<float> attn;
  core::Tensor<float> out({2, 5, 4, 8});

  const core::Tensor<float> k_bad_d({2, 7, 2, 6});
  REQUIRE_THROWS_AS(attn.forward(q, k_bad_d, v), shape_error);
  REQUIRE_THROWS_WITH(attn.forward(q, k_bad_d, v),
                      Contains("DenseAttention::forward") && Contains("'k'") &&
                          Contains("[B=2, S=7, H_kv=2, D=6]") && Contains("D=8"));
  const core::Tensor<float> v_bad({2, 6, 2, 8});
  REQUIRE_THROWS_WITH(attn.forward(q, k, v_bad), Contains("'v'") &&
                                                     Contains("[B=2, S=6, H_kv=2, D=8]") &&
                                                     Contains("[B=2, S=7, H_kv=2, D=8]"));
  const core::Tensor<float> k3({2, 7, 3, 8}), v3({2, 7, 3, 8});
  REQUIRE_THROWS_AS(attn.forward(q, k3, v3), shape_error);
  REQUIRE_THROWS_WITH(attn.forward(q, k3, v3),
                      Contains("'k'") && Contains("H_kv=3") && Contains("H=4"));
  core::Tensor<float> out_bad({2, 5, 4, 9});
  REQUIRE_THROWS_WITH(
      attn.forward(q, k, v, out_bad.view<4>()),
      Contains("'out'") && Contains("[B=2, T=5, H=4, D=9]") && Contains("[B=2, T=5, H=4, D=8]"));

  const std::vector<std::int64_t> three{1, 2, 3};
  REQUIRE_THROWS_AS(attn.forward(q, k, v, KeyLengths{three}), shape_error);
  REQUIRE_THROWS_WITH(attn.forward(q, k, v, KeyLengths{three}),
                      Contains("DenseAttention::forward") && Contains("'key_lengths'") &&
                          Contains("[B=3]") && Contains("[B=2]"));
  const std::vector<std::int64_t> too_long{7, 8};
  REQUIRE_THROWS_AS(attn.forward(q, k, v, KeyLengths{too_long}), config_error);
  REQUIRE_THROWS_WITH(attn.forward(q, k, v, KeyLengths{too_long}),
                      Contains("'key_lengths[1]' = 8") && Contains("[0, S=7]"));
  const core::Tensor<float> bias_bad({5, 6});
  REQUIRE_THROWS_WITH(attn.forward(q, k, v, AdditiveBias<float>{bias_bad.view<2>()}),
                      Contains("'bias'") && Contains("[T=5, S=6]") && Contains("[T=5, S=7]"));

  REQUIRE_THROWS_AS(DenseAttention<float>({.scale = std::nan("")}), config_error);
  REQUIRE_THROWS_WITH(DenseAttention<float>({.scale = -1.0}),
                      Contains("DenseAttention") && Contains("'scale' = -1"));
  REQUIRE_THROWS_AS((Mask<float>{CausalMask{}, CausalMask{1}}), config_error);

  // Empty problems are valid: T = 0 gives an empty output, S = 0 gives zeros.
  const core::Tensor<float> q0({2, 0, 4, 8});
  REQUIRE(attn.forward(q0, k, v).numel() == 0);
  const core::Tensor<float> k0({2, 0, 2, 8});
  const auto zeros = attn.forward(q, k0, k0);
  for (float x : zeros) REQUIRE(x == 0.0f);
}
