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
  // score group (up to 64) and key block (512); S past a key chunk (1024 keys at D 64 in
  // float, 512 in double or at D 128 and up), so several tiles take turns over each chunk;
  // D in {16, 32, 64, 80, 128, 200} and odd; GQA 8/2; T != S; a query block boundary
  // (256+ rows).
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
      {1, 14, 513, 1, 1, 64},
      {1, 40, 1100, 2, 1, 64},
      {1, 9, 700, 1, 1, 200},
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

// ---- ForwardOptions: per-key attention mass and active heads ----

namespace {

// Key mass in long double, the probabilities computed as ref::dense_attention does:
// mass[b][hk][j] = sum over active heads h of group hk, queries i: softmax_j(...) of row (b, i, h).
// active: empty or [B * H].
template <class T>
std::vector<long double> ref_key_mass(ConstView<T, 4> q, ConstView<T, 4> k, const Mask<T>& mask,
                                      const std::vector<std::uint8_t>& active) {
  using R = long double;
  const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
  const std::int64_t S = k.extent(1), Hkv = k.extent(2), group = H / Hkv;
  const R sc = R(1) / std::sqrt(R(D));
  std::vector<R> mass(static_cast<std::size_t>(B * Hkv * S), R(0));
  std::vector<R> w(static_cast<std::size_t>(S));
  std::vector<bool> vis(static_cast<std::size_t>(S));
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t len = mask.key_lengths ? mask.key_lengths->lengths[b] : S;
    for (std::int64_t h = 0; h < H; ++h) {
      if (!active.empty() && !active[std::size_t(b * H + h)]) continue;
      const std::int64_t hk = h / group;
      for (std::int64_t i = 0; i < Tq; ++i) {
        R mx = -std::numeric_limits<R>::infinity(), sum = 0;
        for (std::int64_t j = 0; j < S; ++j) {
          bool v = j < len && (!mask.causal || j <= i + mask.causal->offset);
          R s = 0;
          for (std::int64_t d = 0; d < D; ++d) s += R(q(b, i, h, d)) * R(k(b, j, hk, d));
          s *= sc;
          if (mask.bias) s += R(mask.bias->bias(i, j));
          if (std::isinf(s) && s < 0) v = false;
          vis[j] = v;
          w[j] = s;
          if (v) mx = std::max(mx, s);
        }
        for (std::int64_t j = 0; j < S; ++j) sum += vis[j] ? std::exp(w[j] - mx) : R(0);
        if (!(sum > 0)) continue;
        for (std::int64_t j = 0; j < S; ++j)
          if (vis[j]) mass[std::size_t((b * Hkv + hk) * S + j)] += std::exp(w[j] - mx) / sum;
      }
    }
  }
  return mass;
}

template <class T>
bool same_bits(const core::Tensor<T>& a, const core::Tensor<T>& b) {
  return a.numel() == b.numel() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * std::size_t(a.numel())) == 0;
}

// Key mass against the reference for every mask kind, with and without active heads; the output
// bit-identical to a plain forward; accumulate adds to what is there.
template <class T>
void check_key_mass(const Problem& p, std::uint32_t seed) {
  CAPTURE(p.B, p.T, p.S, p.H, p.Hkv, p.D);
  const auto q = uniform_tensor<T>({p.B, p.T, p.H, p.D}, seed);
  const auto k = uniform_tensor<T>({p.B, p.S, p.Hkv, p.D}, seed + 1);
  const auto v = uniform_tensor<T>({p.B, p.S, p.Hkv, p.D}, seed + 2);
  const MaskData<T> md(p, seed + 3);
  const double eps = std::numeric_limits<T>::epsilon();
  const double tol = tolerance<T>(p, 1.0 / std::sqrt(double(p.D)));
  // Rows summed into one key's mass: each probability has relative error <= tol (the bound of
  // the outputs above), and summing up to `rows` positive terms adds ~sqrt(rows) eps relative
  // (probabilistic bound, factor 2). The worst seen is ~5 eps (float, 526 rows); the bound ~100.
  const double rows = double(p.T * (p.H / p.Hkv));
  const double mass_tol = tol + 2 * std::sqrt(rows) * eps;
  // Every other (b, h) active: some groups keep one head, GQA groups of 2 may lose both.
  std::vector<std::uint8_t> flags(std::size_t(p.B * p.H));
  for (std::size_t i = 0; i < flags.size(); ++i) flags[i] = std::uint8_t((i * 7 + 3) % 3 != 0);
  const ScopedNumThreads one_thread(1);
  for (MaskKind mk :
       {MaskKind::none, MaskKind::causal, MaskKind::causal_decode, MaskKind::causal_negative,
        MaskKind::lengths, MaskKind::bias, MaskKind::causal_lengths, MaskKind::all}) {
    CAPTURE(mask_name(mk));
    const Mask<T> mask = md.mask(mk, p);
    for (const bool use_flags : {false, true}) {
      CAPTURE(use_flags);
      const std::vector<std::uint8_t> act = use_flags ? flags : std::vector<std::uint8_t>{};
      const auto want = ref_key_mass<T>(q, k, mask, act);
      simd::for_each_arch([&](auto arch) {
        using Arch = decltype(arch);
        CAPTURE(Arch::name());
        const bool all_masks = simd::is_scalar_v<Arch> || std::is_same_v<Arch, simd::default_arch>;
        if (!all_masks && mk != MaskKind::none && mk != MaskKind::all) return;
        const DenseAttention<T, Arch> attn;
        const auto plain = attn.forward(q, k, v, mask);
        core::Tensor<T> mass({p.B, p.Hkv, p.S});
        mass.fill(std::numeric_limits<T>::quiet_NaN());  // every entry must be written
        ForwardOptions<T> opts;
        opts.key_mass = mass.template view<3>();
        opts.active_heads = act;
        const auto got = attn.forward(q, k, v, mask, opts);
        // Active heads: bit for bit the plain output; inactive heads: exact zeros.
        bool heads_ok = true;
        for (std::int64_t b = 0; b < p.B; ++b)
          for (std::int64_t i = 0; i < p.T; ++i)
            for (std::int64_t h = 0; h < p.H; ++h)
              for (std::int64_t d = 0; d < p.D; ++d) {
                const bool on = act.empty() || act[std::size_t(b * p.H + h)];
                const T g = got(b, i, h, d), w = on ? plain(b, i, h, d) : T(0);
                heads_ok = heads_ok && std::memcmp(&g, &w, sizeof(T)) == 0;
              }
        REQUIRE(heads_ok);
        double max_err = 0;
        for (std::int64_t i = 0; i < mass.numel(); ++i) {
          const double w = double(want[std::size_t(i)]);
          REQUIRE(std::isfinite(double(mass[i])));
          const double err = std::abs(double(mass[i]) - w);
          max_err = std::max(max_err, err / mass_tol / std::max(1.0, w));
          if (w == 0) REQUIRE(mass[i] == T(0));  // unseen keys: exact zeros
        }
        CAPTURE(max_err);
        REQUIRE(max_err <= 1.0);
        // accumulate: mass + mass, bit for bit what adding the second result gives.
        core::Tensor<T> twice = mass;
        opts.key_mass = twice.template view<3>();
        opts.accumulate_key_mass = true;
        const auto again = attn.forward(q, k, v, mask, opts);
        REQUIRE(same_bits(again, got));
        for (std::int64_t i = 0; i < mass.numel(); ++i) REQUIRE(twice[i] == mass[i] + mass[i]);
      });
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("dense attention: key mass matches the reference, output unchanged",
                   "[dense][key_mass]", float, double) {
  // GQA groups of 1, 2 and 4; S across key blocks (512) and key chunks (1024 / 512);
  // T across query blocks (~256 rows); odd D; T = 1.
  const auto p = GENERATE(values<Problem>({
      {1, 1, 37, 2, 2, 32},
      {2, 5, 15, 2, 1, 16},
      {2, 17, 17, 4, 2, 80},
      {1, 9, 130, 4, 1, 17},
      {2, 13, 11, 3, 3, 5},
      {1, 263, 40, 2, 1, 8},
      {1, 20, 1100, 2, 1, 64},
  }));
  check_key_mass<TestType>(p, 31);
}

TEST_CASE("dense attention: key mass worked out by hand", "[dense][key_mass]") {
  // As the hand case above: one query, keys {0, ln 3}: probabilities {1/4, 3/4}. Two query heads
  // on one KV head (GQA) with the same query: mass {1/2, 3/2}. Causal: key 0 gets 1 per head.
  core::Tensor<float> q({1, 1, 2, 1}), k({1, 2, 1, 1}), v({1, 2, 1, 1});
  q[0] = q[1] = 1.0f;
  k[0] = 0.0f;
  k[1] = float(std::log(3.0));
  v[0] = 1.0f;
  v[1] = 5.0f;
  simd::for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    CAPTURE(Arch::name());
    const DenseAttention<float, Arch> attn;
    core::Tensor<float> mass({1, 1, 2});
    ForwardOptions<float> opts;
    opts.key_mass = mass.view<3>();
    attn.forward(q, k, v, {}, opts);
    REQUIRE(mass[0] == Approx(0.5f).epsilon(1e-6));
    REQUIRE(mass[1] == Approx(1.5f).epsilon(1e-6));
    attn.forward(q, k, v, CausalMask{}, opts);
    REQUIRE(mass[0] == 2.0f);
    REQUIRE(mass[1] == 0.0f);
    // Head 1 inactive: its output is zeros and it adds nothing.
    const std::vector<std::uint8_t> only0{1, 0};
    opts.active_heads = only0;
    const auto out = attn.forward(q, k, v, {}, opts);
    REQUIRE(out[0] == Approx(4.0f).epsilon(1e-6));
    REQUIRE(out[1] == 0.0f);
    REQUIRE(mass[0] == Approx(0.25f).epsilon(1e-6));
    REQUIRE(mass[1] == Approx(0.75f).epsilon(1e-6));
  });
}

TEMPLATE_TEST_CASE("dense attention: key mass rows sum to the number of rows that see a key",
                   "[dense][key_mass]", float, double) {
  using T = TestType;
  const Problem p{2, 30, 50, 4, 2, 16};
  const auto q = uniform_tensor<T>({p.B, p.T, p.H, p.D}, 41);
  const auto k = uniform_tensor<T>({p.B, p.S, p.Hkv, p.D}, 42);
  const auto v = uniform_tensor<T>({p.B, p.S, p.Hkv, p.D}, 43);
  const std::vector<std::int64_t> lengths{20, 50};
  // Causal offset -5: rows 0..4 see no key.
  const Mask<T> mask{CausalMask{-5}, KeyLengths{lengths}};
  core::Tensor<T> mass({p.B, p.Hkv, p.S});
  ForwardOptions<T> opts;
  opts.key_mass = mass.template view<3>();
  DenseAttention<T>().forward(q, k, v, mask, opts);
  for (std::int64_t b = 0; b < p.B; ++b)
    for (std::int64_t hk = 0; hk < p.Hkv; ++hk) {
      double total = 0;
      for (std::int64_t j = 0; j < p.S; ++j) {
        total += double(mass(b, hk, j));
        if (j >= lengths[std::size_t(b)] || j > p.T - 1 - 5) REQUIRE(mass(b, hk, j) == T(0));
      }
      REQUIRE(total == Approx(double((p.T - 5) * (p.H / p.Hkv))).epsilon(1e-5));
    }
}

TEMPLATE_TEST_CASE(
    "dense attention: key mass and active heads are bit-identical for 1 and 2 threads",
    "[dense][key_mass]", float, double) {
  using T = TestType;
  const std::int64_t B = 2, Tq = 300, S = 140, H = 4, Hkv = 2, D = 32;  // 16 tasks
  const auto q = uniform_tensor<T>({B, Tq, H, D}, 51);
  const auto k = uniform_tensor<T>({B, S, Hkv, D}, 52);
  const auto v = uniform_tensor<T>({B, S, Hkv, D}, 53);
  const std::vector<std::int64_t> lengths{S, 100};
  const Mask<T> mask{CausalMask{S - Tq}, KeyLengths{lengths}};
  const std::vector<std::uint8_t> act{1, 1, 0, 1, 1, 0, 1, 1};
  const DenseAttention<T> attn;
  core::Tensor<T> out1, out2, m1({B, Hkv, S}), m2({B, Hkv, S});
  ForwardOptions<T> opts;
  opts.active_heads = act;
  {
    ScopedNumThreads threads(1);
    opts.key_mass = m1.template view<3>();
    out1 = attn.forward(q, k, v, mask, opts);
  }
  {
    ScopedNumThreads threads(2);
    opts.key_mass = m2.template view<3>();
    out2 = attn.forward(q, k, v, mask, opts);
  }
  REQUIRE(same_bits(out1, out2));
  REQUIRE(same_bits(m1, m2));
}

TEST_CASE("dense attention: active heads per head ([H]) apply to every sequence", "[dense]") {
  const std::int64_t B = 2, Tq = 7, S = 9, H = 4, Hkv = 2, D = 8;
  const auto q = uniform_tensor<float>({B, Tq, H, D}, 61);
  const auto k = uniform_tensor<float>({B, S, Hkv, D}, 62);
  const auto v = uniform_tensor<float>({B, S, Hkv, D}, 63);
  const DenseAttention<float> attn;
  const auto full = attn.forward(q, k, v);
  const std::vector<std::uint8_t> per_head{0, 1, 0, 0};  // KV head 1 has no active head
  const std::vector<std::uint8_t> per_bh{0, 1, 0, 0, 0, 1, 0, 0};
  ForwardOptions<float> a, b;
  a.active_heads = per_head;
  b.active_heads = per_bh;
  core::Tensor<float> ma({B, Hkv, S}), mb({B, Hkv, S});
  a.key_mass = ma.view<3>();
  b.key_mass = mb.view<3>();
  const auto out_a = attn.forward(q, k, v, {}, a);
  const auto out_b = attn.forward(q, k, v, {}, b);
  REQUIRE(same_bits(out_a, out_b));
  REQUIRE(same_bits(ma, mb));
  for (std::int64_t bb = 0; bb < B; ++bb)
    for (std::int64_t i = 0; i < Tq; ++i)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < D; ++d)
          REQUIRE(out_a(bb, i, h, d) == (h == 1 ? full(bb, i, h, d) : 0.0f));
  for (std::int64_t bb = 0; bb < B; ++bb)
    for (std::int64_t j = 0; j < S; ++j) REQUIRE(ma(bb, 1, j) == 0.0f);
}

TEST_CASE("dense attention: forward options errors and empty problems", "[dense][key_mass]") {
  const core::Tensor<float> q({2, 5, 4, 8}), k({2, 7, 2, 8}), v({2, 7, 2, 8});
  const DenseAttention<float> attn;
  core::Tensor<float> out({2, 5, 4, 8});
  ForwardOptions<float> opts;

  core::Tensor<float> bad({2, 4, 7});  // H instead of H_kv
  opts.key_mass = bad.view<3>();
  REQUIRE_THROWS_AS(attn.forward(q, k, v, {}, opts), shape_error);
  REQUIRE_THROWS_WITH(attn.forward(q, k, v, out.view<4>(), {}, opts),
                      Contains("DenseAttention::forward") && Contains("'key_mass'") &&
                          Contains("[B=2, H_kv=4, S=7]") && Contains("[B=2, H_kv=2, S=7]"));
  core::Tensor<float> short_s({2, 2, 6});
  opts.key_mass = short_s.view<3>();
  REQUIRE_THROWS_WITH(attn.forward(q, k, v, {}, opts), Contains("'key_mass'") && Contains("S=6"));

  // key_mass sharing memory with out or an input.
  const View<float, 3> in_out(out.data(), {2, 2, 7}, {14, 7, 1});
  opts.key_mass = in_out;
  REQUIRE_THROWS_AS(attn.forward(q, k, v, out.view<4>(), {}, opts), shape_error);
  REQUIRE_THROWS_WITH(attn.forward(q, k, v, out.view<4>(), {}, opts),
                      Contains("'key_mass'") && Contains("'out'"));
  core::Tensor<float> k2 = k;
  opts.key_mass = View<float, 3>(k2.data(), {2, 2, 7}, {14, 7, 1});
  REQUIRE_THROWS_WITH(attn.forward(q, k2, v, {}, opts), Contains("'key_mass'") && Contains("'k'"));
  core::Tensor<float> bias({5, 7});
  opts.key_mass = View<float, 3>(bias.data(), {1, 1, 7}, {7, 7, 1});
  const core::Tensor<float> q1({1, 5, 2, 8}), k1({1, 7, 1, 8});
  REQUIRE_THROWS_WITH(attn.forward(q1, k1, k1, AdditiveBias<float>{bias.view<2>()}, opts),
                      Contains("'key_mass'") && Contains("'bias'"));

  // active_heads of neither H nor B * H flags.
  opts.key_mass = {};
  const std::vector<std::uint8_t> three(3, 1), eight(8, 1), four(4, 1);
  opts.active_heads = three;
  REQUIRE_THROWS_AS(attn.forward(q, k, v, {}, opts), shape_error);
  REQUIRE_THROWS_WITH(attn.forward(q, k, v, {}, opts), Contains("'active_heads'") &&
                                                           Contains("[n=3]") && Contains("H=4") &&
                                                           Contains("B * H=8"));
  opts.active_heads = eight;
  REQUIRE_NOTHROW(attn.forward(q, k, v, {}, opts));
  opts.active_heads = four;
  REQUIRE_NOTHROW(attn.forward(q, k, v, {}, opts));

  // T = 0: every key's mass is 0 (accumulate: unchanged); S = 0: nothing to write.
  const core::Tensor<float> q0({2, 0, 4, 8});
  core::Tensor<float> mass({2, 2, 7});
  mass.fill(5.0f);
  opts = {};
  opts.key_mass = mass.view<3>();
  opts.accumulate_key_mass = true;
  attn.forward(q0, k, v, {}, opts);
  for (float x : mass) REQUIRE(x == 5.0f);
  opts.accumulate_key_mass = false;
  attn.forward(q0, k, v, {}, opts);
  for (float x : mass) REQUIRE(x == 0.0f);
  const core::Tensor<float> k0({2, 0, 2, 8});
  core::Tensor<float> mass0({2, 2, 0});
  opts.key_mass = mass0.view<3>();
  const auto zeros = attn.forward(q, k0, k0, {}, opts);
  for (float x : zeros) REQUIRE(x == 0.0f);
}
