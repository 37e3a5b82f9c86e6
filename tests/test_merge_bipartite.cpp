// ToMe bipartite soft matching, PiToMe energy matching and MergePlan: golden fixtures from
// facebookresearch/ToMe and hchautran/PiToMe, naive double-precision references written straight
// from tome/merge.py and algo/pitome/merge.py (gather/scatter on the token sets, independent of
// the plan's dest/group tables), hand-computed cases, properties and errors.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "support/compare.hpp"
#include "support/fixtures.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/tokens/merge_bipartite.hpp"
#include "switchyard/tokens/merge_energy.hpp"
#include "switchyard/tokens/merge_plan.hpp"

using switchyard::Tensor;
using namespace switchyard::tokens;
using Catch::Contains;

namespace {

using namespace test_support;

// ---- naive reference, double, literal translation of tome/merge.py ---------------------------
struct RefMerge {
  std::int64_t r = 0, num_out = 0;
  std::vector<std::int64_t> unm, src, dst;  // per batch element, concatenated
  std::vector<double> merged, size_out, merged_mean, unmerged, source;
};

RefMerge ref_tome(const std::vector<double>& metric, const std::vector<double>& x,
                  const std::vector<double>& size, std::int64_t B, std::int64_t N, std::int64_t Cm,
                  std::int64_t C, std::int64_t r, bool cls, bool distill) {
  RefMerge out;
  const std::int64_t prot = std::int64_t(cls) + distill;
  r = std::min(r, (N - prot) / 2);
  if (r < 0) r = 0;
  out.r = r;
  out.num_out = N - r;
  const std::int64_t na = (N + 1) / 2, nb = N / 2, nu = na - r, M = N - r;
  out.merged.assign(B * M * C, 0);
  out.merged_mean.assign(B * M * C, 0);
  out.size_out.assign(B * M, 0);
  out.unmerged.assign(B * N * C, 0);
  out.source.assign(B * M * N, 0);
  for (std::int64_t b = 0; b < B; ++b) {
    auto row = [&](std::int64_t t) { return &metric[(b * N + t) * Cm]; };
    auto norm = [&](std::int64_t t) {
      double s = 0;
      for (std::int64_t c = 0; c < Cm; ++c) s += row(t)[c] * row(t)[c];
      return std::sqrt(s);
    };
    std::vector<double> node_max(na);
    std::vector<std::int64_t> node_idx(na);
    for (std::int64_t i = 0; i < na; ++i) {
      double best = -INFINITY;
      std::int64_t arg = 0;
      for (std::int64_t j = 0; j < nb; ++j) {
        double s = 0;
        for (std::int64_t c = 0; c < Cm; ++c) s += row(2 * i)[c] * row(2 * j + 1)[c];
        s /= norm(2 * i) * norm(2 * j + 1);
        if ((cls && i == 0) || (distill && j == 0)) s = -INFINITY;
        if (s > best) best = s, arg = j;
      }
      node_max[i] = best;
      node_idx[i] = arg;
    }
    std::vector<std::int64_t> edge(na);
    std::iota(edge.begin(), edge.end(), 0);
    std::stable_sort(edge.begin(), edge.end(),
                     [&](auto p, auto q) { return node_max[p] > node_max[q]; });
    std::vector<std::int64_t> unm(edge.begin() + r, edge.end()),
        src(edge.begin(), edge.begin() + r);
    std::vector<std::int64_t> dst(r);
    for (std::int64_t i = 0; i < r; ++i) dst[i] = node_idx[src[i]];
    if (cls) std::sort(unm.begin(), unm.end());
    if (r > 0) out.unm.insert(out.unm.end(), unm.begin(), unm.end());  // r = 0: no indices
    out.src.insert(out.src.end(), src.begin(), src.end());
    out.dst.insert(out.dst.end(), dst.begin(), dst.end());

    // merge(v, mode) on [N, W] rows of one batch element: gather unm, scatter src into dst.
    auto merge = [&](const std::vector<double>& v, std::int64_t W, int mode) {
      std::vector<double> a_unm(nu * W), bset(nb * W);
      std::vector<double> cnt(nb, 1);
      for (std::int64_t p = 0; p < nu; ++p)
        for (std::int64_t w = 0; w < W; ++w) a_unm[p * W + w] = v[(2 * unm[p]) * W + w];
      for (std::int64_t j = 0; j < nb; ++j)
        for (std::int64_t w = 0; w < W; ++w) bset[j * W + w] = v[(2 * j + 1) * W + w];
      for (std::int64_t i = 0; i < r; ++i) {
        cnt[dst[i]] += 1;
        for (std::int64_t w = 0; w < W; ++w) {
          const double s = v[(2 * src[i]) * W + w];
          double& d = bset[dst[i] * W + w];
          d = mode == 2 ? std::max(d, s) : d + s;
        }
      }
      if (mode == 1)
        for (std::int64_t j = 0; j < nb; ++j)
          for (std::int64_t w = 0; w < W; ++w) bset[j * W + w] /= cnt[j];
      std::vector<double> res;
      auto put = [&](const std::vector<double>& m, std::int64_t from, std::int64_t to) {
        res.insert(res.end(), m.begin() + from * W, m.begin() + to * W);
      };
      if (distill) {
        put(a_unm, 0, 1), put(bset, 0, 1), put(a_unm, 1, nu), put(bset, 1, nb);
      } else {
        put(a_unm, 0, nu), put(bset, 0, nb);
      }
      return res;
    };
    std::vector<double> xb(N * C), xs(N * C), sb(N), eye(N * N, 0);
    for (std::int64_t t = 0; t < N; ++t) {
      sb[t] = size[b * N + t];
      eye[t * N + t] = 1;
      for (std::int64_t c = 0; c < C; ++c) {
        xb[t * C + c] = x[(b * N + t) * C + c];
        xs[t * C + c] = xb[t * C + c] * sb[t];
      }
    }
    std::vector<double> num = r ? merge(xs, C, 0) : xs, den = r ? merge(sb, 1, 0) : sb;
    std::vector<double> mean = r ? merge(xb, C, 1) : xb, srcmap = r ? merge(eye, N, 2) : eye;
    for (std::int64_t o = 0; o < M; ++o) {
      out.size_out[b * M + o] = den[o];
      for (std::int64_t c = 0; c < C; ++c) {
        out.merged[(b * M + o) * C + c] = num[o * C + c] / den[o];
        out.merged_mean[(b * M + o) * C + c] = mean[o * C + c];
      }
      for (std::int64_t t = 0; t < N; ++t) out.source[(b * M + o) * N + t] = srcmap[o * N + t];
    }
    // unmerge(merged), literally: rows [0, nu) are unm, the rest B in order.
    for (std::int64_t c = 0; c < C; ++c) {
      auto m = [&](std::int64_t o) { return out.merged[(b * M + o) * C + c]; };
      auto& u = out.unmerged;
      if (r == 0) {
        for (std::int64_t t = 0; t < N; ++t) u[(b * N + t) * C + c] = m(t);
        continue;
      }
      for (std::int64_t j = 0; j < nb; ++j) u[(b * N + 2 * j + 1) * C + c] = m(nu + j);
      for (std::int64_t p = 0; p < nu; ++p) u[(b * N + 2 * unm[p]) * C + c] = m(p);
      for (std::int64_t i = 0; i < r; ++i) u[(b * N + 2 * src[i]) * C + c] = m(nu + dst[i]);
    }
  }
  return out;
}

}  // namespace

// ---- golden fixtures ----------------------------------------------------------------------------

TEST_CASE("ToMe fixtures match facebookresearch/ToMe", "[tome][fixture]") {
  struct Case {
    const char* file;
    std::int64_t r;
    bool cls, distill, sizes;
  };
  const Case c =
      GENERATE(Case{"tome_small_B1_N50_C64_r8_nocls.safetensors", 8, false, false, true},
               Case{"tome_small_B1_N50_C64_r0_cls.safetensors", 0, true, false, false},
               Case{"tome_small_B2_N51_C64_r8_cls_distill.safetensors", 8, true, true, true});
  CAPTURE(c.file);
  auto f = open_fixture(c.file);
  const Tensor<float> x = f.tensor<float>("x");
  const Tensor<float> metric = f.tensor<float>("metric");
  const std::int64_t B = x.extent(0), N = x.extent(1), C = x.extent(2);
  Tensor<float> size_in({B, N});
  if (c.sizes) {
    const Tensor<float> s = f.tensor<float>("size_in");
    std::copy(s.begin(), s.end(), size_in.begin());
  } else {
    size_in.fill(1.0f);
  }
  const auto plan =
      c.sizes ? bipartite_soft_matching<float>(metric, c.r, c.cls, c.distill, size_in.view<2>())
              : bipartite_soft_matching<float>(metric, c.r, c.cls, c.distill);
  REQUIRE(plan.r == c.r);
  REQUIRE(plan.num_out == N - c.r);

  if (c.r > 0) {  // integer routing outputs: exact
    for (const char* name : {"unm_idx", "src_idx", "dst_idx"}) {
      CAPTURE(name);
      const Tensor<std::int64_t> want = f.tensor<std::int64_t>(name);
      const auto& got = std::string(name) == "unm_idx"   ? plan.unm_idx
                        : std::string(name) == "src_idx" ? plan.src_idx
                                                         : plan.dst_idx;
      REQUIRE(std::vector<std::int64_t>(want.begin(), want.end()) == got);
    }
  }

  const Tensor<float> merged = plan.merge_wavg(x);
  Tensor<float> mean({B, plan.num_out, C});
  plan.merge(x, mean.view<3>(), MergeMode::mean);
  const Tensor<float> unmerged = plan.unmerge(f.tensor<float>("x_merged"), UnmergeOrder::reference);
  const Tensor<float> source = plan.source();

  // Size sums are sums of small integers: exact. The source map is 0/1: exact.
  REQUIRE(to_double(plan.size_out) == to_double(f.tensor<float>("size_out")));
  REQUIRE(to_double(source) == to_double(f.tensor<float>("source")));
  // Merged rows are (sum of at most 3 rounded products) / (exact size): a few float ulps, so
  // 1e-5 relative is loose by ~two orders; entries near zero are judged against 1e-3 of the
  // tensor's scale because their relative error is ulps of the summands, not of the result.
  const auto want_merged = to_double(f.tensor<float>("x_merged"));
  const auto want_mean = to_double(f.tensor<float>("x_merged_mean"));
  const double e_merged = max_rel_err(to_double(merged), want_merged, 1e-3 * max_abs(want_merged));
  const double e_mean = max_rel_err(to_double(mean), want_mean, 1e-3 * max_abs(want_mean));
  WARN("max relative error x_merged " << e_merged << ", x_merged_mean " << e_mean);
  CHECK(e_merged <= 1e-5);
  CHECK(e_mean <= 1e-5);
  // unmerge is a pure gather of the stored x_merged: bit for bit.
  REQUIRE(to_double(unmerged) == to_double(f.tensor<float>("x_unmerged")));
  if (c.r == 0) {  // the identity file: merge is exact
    REQUIRE(to_double(merged) == to_double(x));
    REQUIRE(to_double(mean) == to_double(x));
  }
}

// ---- against the naive double reference ---------------------------------------------------------

TEST_CASE("ToMe matches the naive double reference on random data", "[tome][reference]") {
  struct Case {
    std::int64_t B, N, C, r;
    bool cls, distill;
  };
  const Case c = GENERATE(Case{2, 20, 8, 4, false, false}, Case{3, 21, 5, 7, true, false},
                          Case{1, 17, 16, 100, true, true}, Case{2, 9, 3, 2, false, true},
                          Case{1, 2, 4, 1, false, false}, Case{1, 1, 4, 3, false, false},
                          Case{2, 33, 12, 0, true, false});
  CAPTURE(c.B, c.N, c.C, c.r, c.cls, c.distill);
  const auto metric = random_tensor<double>({c.B, c.N, 6}, 11 + std::uint32_t(c.N));
  const auto x = random_tensor<double>({c.B, c.N, c.C}, 12 + std::uint32_t(c.N));
  Tensor<double> size({c.B, c.N});
  std::mt19937 gen(5);
  for (auto& s : size) s = double(1 + gen() % 5);
  const RefMerge ref = ref_tome(to_double(metric), to_double(x), to_double(size), c.B, c.N, 6, c.C,
                                c.r, c.cls, c.distill);

  const auto plan = bipartite_soft_matching<double>(metric, c.r, c.cls, c.distill, size.view<2>());
  REQUIRE(plan.r == ref.r);
  REQUIRE(plan.unm_idx == ref.unm);
  REQUIRE(plan.src_idx == ref.src);
  REQUIRE(plan.dst_idx == ref.dst);
  // Same operations in the same order in double: agreement to a few ulps.
  CHECK(max_rel_err(to_double(plan.merge_wavg(x)), ref.merged, 1e-12) <= 1e-13);
  CHECK(to_double(plan.size_out) == ref.size_out);
  Tensor<double> mean({c.B, plan.num_out, c.C});
  plan.merge(x, mean.view<3>(), MergeMode::mean);
  CHECK(max_rel_err(to_double(mean), ref.merged_mean, 1e-12) <= 1e-13);
  CHECK(to_double(plan.source()) == ref.source);
  Tensor<double> ref_merged({c.B, plan.num_out, c.C});
  std::copy(ref.merged.begin(), ref.merged.end(), ref_merged.begin());
  CHECK(to_double(plan.unmerge(ref_merged, UnmergeOrder::reference)) == ref.unmerged);

  // float against the double reference: routing identical (score gaps here are far above float
  // rounding), values to float accuracy of a 2-3 term weighted mean.
  Tensor<float> metric_f({c.B, c.N, 6}), x_f({c.B, c.N, c.C}), size_f({c.B, c.N});
  std::copy(metric.begin(), metric.end(), metric_f.begin());
  std::copy(x.begin(), x.end(), x_f.begin());
  std::copy(size.begin(), size.end(), size_f.begin());
  const auto plan_f =
      bipartite_soft_matching<float>(metric_f, c.r, c.cls, c.distill, size_f.view<2>());
  REQUIRE(plan_f.src_idx == ref.src);
  REQUIRE(plan_f.dst_idx == ref.dst);
  CHECK(max_rel_err(to_double(plan_f.merge_wavg(x_f)), ref.merged, 1e-3 * max_abs(ref.merged)) <=
        1e-5);
}

TEST_CASE("ToMe hand-computed 4-token case", "[tome][hand]") {
  // Tokens 0..3, A = {0, 2}, B = {1, 3}. Token 0 is nearly parallel to token 1 (cos 0.995), token
  // 2 to token 3 (cos 0.894): r = 1 merges 0 into 1. Output [2, 1+0, 3].
  Tensor<float> metric({1, 4, 2});
  const float m[] = {1, 0, 1, 0.1f, 0, 1, 0.5f, 1};
  std::copy(m, m + 8, metric.begin());
  Tensor<float> x({1, 4, 1});
  const float xv[] = {1, 3, 5, 7};
  std::copy(xv, xv + 4, x.begin());
  Tensor<float> size({1, 4});
  const float sv[] = {1, 3, 1, 1};
  std::copy(sv, sv + 4, size.begin());
  const auto plan = bipartite_soft_matching<float>(metric, 1, false, false, size.view<2>());
  REQUIRE(plan.src_idx == std::vector<std::int64_t>{0});
  REQUIRE(plan.dst_idx == std::vector<std::int64_t>{0});
  REQUIRE(plan.unm_idx == std::vector<std::int64_t>{1});
  REQUIRE(plan.dest == std::vector<std::int64_t>{1, 1, 0, 2});
  const auto merged = plan.merge_wavg(x);
  CHECK(merged(0, 0, 0) == 5.0f);
  CHECK(merged(0, 1, 0) == 2.5f);  // (1*1 + 3*3) / 4
  CHECK(merged(0, 2, 0) == 7.0f);
  CHECK(to_double(plan.size_out) == std::vector<double>{1, 4, 1});
  const auto back = plan.unmerge(merged);
  CHECK(to_double(back) == std::vector<double>{2.5, 2.5, 5, 7});
}

// ---- properties ---------------------------------------------------------------------------------

TEST_CASE("ToMe properties", "[tome][property]") {
  const std::int64_t B = 2, N = 37, C = 8;
  const auto metric = random_tensor<float>({B, N, 16}, 3);
  const auto x = random_tensor<float>({B, N, C}, 4);
  Tensor<float> size({B, N});
  std::mt19937 gen(9);
  for (auto& s : size) s = float(1 + gen() % 4);

  SECTION("merging preserves the size-weighted mean and the total size") {
    const bool cls = GENERATE(false, true);
    const std::int64_t r = GENERATE(1, 5, 18);
    const auto plan = bipartite_soft_matching<float>(metric, r, cls, false, size.view<2>());
    const auto merged = plan.merge_wavg(x);
    for (std::int64_t b = 0; b < B; ++b) {
      double total_in = 0, total_out = 0;
      for (std::int64_t i = 0; i < N; ++i) total_in += size(b, i);
      for (std::int64_t o = 0; o < plan.num_out; ++o) total_out += plan.size_out(b, o);
      REQUIRE(total_out == total_in);  // integers: exact
      for (std::int64_t c = 0; c < C; ++c) {
        double in = 0, out = 0, scale = 0;
        for (std::int64_t i = 0; i < N; ++i) in += double(size(b, i)) * x(b, i, c);
        for (std::int64_t o = 0; o < plan.num_out; ++o)
          out += double(plan.size_out(b, o)) * merged(b, o, c);
        for (std::int64_t i = 0; i < N; ++i) scale += std::abs(double(size(b, i)) * x(b, i, c));
        // Each merged row carries a few float roundings relative to its own magnitude.
        CHECK(std::abs(in - out) <= 1e-6 * scale);
      }
    }
  }
  SECTION("without sizes the sizes sum to N and count the merged tokens") {
    const auto plan = bipartite_soft_matching<float>(metric, 10, true, false);
    for (std::int64_t b = 0; b < B; ++b) {
      double total = 0;
      for (std::int64_t o = 0; o < plan.num_out; ++o) {
        auto [m, end] = plan.group(b, o);
        REQUIRE(plan.size_out(b, o) == float(end - m));
        total += plan.size_out(b, o);
      }
      REQUIRE(total == double(N));
    }
  }
  SECTION("unmerge(merge(x)) == x for r = 0, bit for bit") {
    const auto plan = bipartite_soft_matching<float>(metric, 0, true, true);
    REQUIRE(plan.is_identity());
    REQUIRE(to_double(plan.unmerge(plan.merge_wavg(x))) == to_double(x));
  }
  SECTION("unmerge(merge(x)) gives each token the row it merged into") {
    const auto plan = bipartite_soft_matching<float>(metric, 12, false, true, size.view<2>());
    const auto merged = plan.merge_wavg(x);
    const auto back = plan.unmerge(merged);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < N; ++i)
        for (std::int64_t c = 0; c < C; ++c)
          REQUIRE(back(b, i, c) == merged(b, plan.dest[b * N + i], c));
  }
  SECTION("the class and distill tokens are never merged, and stay first") {
    const std::int64_t r = GENERATE(1, 8, 17, 100);
    const auto plan = bipartite_soft_matching<float>(metric, r, true, true);
    REQUIRE(plan.r == std::min<std::int64_t>(r, (N - 2) / 2));
    for (std::int64_t b = 0; b < B; ++b) {
      REQUIRE(plan.dest[b * N + 0] == 0);
      REQUIRE(plan.dest[b * N + 1] == 1);
      auto [m0, e0] = plan.group(b, 0);
      auto [m1, e1] = plan.group(b, 1);
      REQUIRE(e0 - m0 == 1);
      REQUIRE(e1 - m1 == 1);
    }
  }
  SECTION("r is clamped to the reference's limit") {
    REQUIRE(bipartite_soft_matching<float>(metric, 1000).r == N / 2);
    REQUIRE(bipartite_soft_matching<float>(metric, 1000, true).r == (N - 1) / 2);
    REQUIRE(effective_merges(3, {.r = 5, .class_token = true, .distill_token = true}) == 0);
  }
  SECTION("ties break toward the lower index") {
    Tensor<float> same({1, 10, 3});
    same.fill(1.0f);  // every score is 1
    const auto plan = bipartite_soft_matching<float>(same, 3);
    REQUIRE(plan.src_idx == std::vector<std::int64_t>{0, 1, 2});
    REQUIRE(plan.dst_idx == std::vector<std::int64_t>{0, 0, 0});
    REQUIRE(plan.unm_idx == std::vector<std::int64_t>{3, 4});
  }
  SECTION("the source map composes over two merges") {
    const auto p1 = bipartite_soft_matching<float>(metric, 6);
    const auto m1 = p1.merge_wavg(metric);
    const auto p2 = bipartite_soft_matching<float>(m1, 6);
    const auto s2 = p2.source(p1.source());
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < N; ++i) {
        const std::int64_t final_row = p2.dest[b * p1.num_out + p1.dest[b * N + i]];
        for (std::int64_t o = 0; o < p2.num_out; ++o)
          REQUIRE(s2(b, o, i) == (o == final_row ? 1.0f : 0.0f));
      }
  }
  SECTION("the same bits for any thread count") {
    const auto run = [&](int threads) {
      switchyard::ScopedNumThreads t(threads);
      const auto plan = bipartite_soft_matching<float>(metric, 9, true, false, size.view<2>());
      return to_double(plan.merge_wavg(x));
    };
    REQUIRE(run(1) == run(2));
  }
}

TEST_CASE("ToMe on empty input", "[tome][property]") {
  const std::int64_t n = GENERATE(0, 1);
  Tensor<float> metric({2, n, 4}), x({2, n, 3});
  metric.fill(1.0f);
  const auto plan = bipartite_soft_matching<float>(metric, 5, true, true);
  REQUIRE(plan.r == 0);
  REQUIRE(plan.num_out == n);
  REQUIRE(plan.merge_wavg(x).numel() == 2 * n * 3);
  Tensor<float> none({0, 7, 4});
  REQUIRE(bipartite_soft_matching<float>(none, 2).batch == 0);
}

// ---- errors -------------------------------------------------------------------------------------

TEST_CASE("ToMe rejects bad input", "[tome][error]") {
  const auto metric = random_tensor<float>({2, 10, 4}, 1);
  const auto x = random_tensor<float>({2, 10, 3}, 2);
  REQUIRE_THROWS_AS(bipartite_soft_matching<float>(metric, -1), switchyard::config_error);
  REQUIRE_THROWS_WITH(bipartite_soft_matching<float>(metric, -1),
                      Contains("ToMe::bipartite_soft_matching") && Contains("'r' = -1"));

  const auto plan = bipartite_soft_matching<float>(metric, 2);
  const auto short_x = random_tensor<float>({2, 9, 3}, 2);
  REQUIRE_THROWS_AS(plan.merge_wavg(short_x), switchyard::shape_error);
  REQUIRE_THROWS_WITH(plan.merge_wavg(short_x),
                      Contains("MergePlan::merge_wavg") && Contains("'x'") &&
                          Contains("[B=2, N=9, C=3]") && Contains("[B=2, N=10, C]"));
  const auto merged = plan.merge_wavg(x);
  REQUIRE_THROWS_WITH(plan.unmerge(x), Contains("MergePlan::unmerge") && Contains("'x'") &&
                                           Contains("[B=2, N_out=10, C=3]") &&
                                           Contains("[B=2, N_out=8, C]"));

  Tensor<float> size({2, 10});
  size.fill(1.0f);
  size(1, 4) = 0.0f;
  REQUIRE_THROWS_AS(bipartite_soft_matching<float>(metric, 2, false, false, size.view<2>()),
                    switchyard::config_error);
  REQUIRE_THROWS_WITH(bipartite_soft_matching<float>(metric, 2, false, false, size.view<2>()),
                      Contains("ToMe::bipartite_soft_matching") && Contains("'sizes'") &&
                          Contains("[b=1, n=4]") && Contains("[B=2, N=10]") &&
                          Contains("every size finite and > 0"));
  size(1, 4) = -2.0f;
  REQUIRE_THROWS_AS(bipartite_soft_matching<float>(metric, 2, false, false, size.view<2>()),
                    switchyard::config_error);
  Tensor<float> size_short({2, 9});
  size_short.fill(1.0f);
  REQUIRE_THROWS_WITH(
      bipartite_soft_matching<float>(metric, 2, false, false, size_short.view<2>()),
      Contains("ToMe") && Contains("'sizes'") && Contains("[B=2, N=9]") && Contains("[B=2, N=10]"));
}

// ---- MergeMode::prune and plans without ToMe index sets (MergePlan extensions)
// -------------------

TEST_CASE("MergeMode::prune keeps each output row's own token", "[tome][prune]") {
  const auto metric = random_tensor<float>({2, 15, 4}, 21);
  const auto x = random_tensor<float>({2, 15, 3}, 22);
  const auto plan = bipartite_soft_matching<float>(metric, 5, true);
  Tensor<float> pruned({2, plan.num_out, 3});
  plan.merge(x, pruned.view<3>(), MergeMode::prune);
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t o = 0; o < plan.num_out; ++o) {
      const std::int64_t kept = *plan.group(b, o).first;
      for (std::int64_t c = 0; c < 3; ++c) REQUIRE(pruned(b, o, c) == x(b, kept, c));
    }
}

TEST_CASE("MergePlan with tome_indices = false", "[tome][property]") {
  const auto metric = random_tensor<float>({1, 12, 4}, 23);
  auto plan = bipartite_soft_matching<float>(metric, 3, false, true);
  plan.check();
  auto other = plan;  // the same groups, as a router without ToMe's index sets would give them
  other.tome_indices = false;
  REQUIRE_THROWS_AS(other.check(), switchyard::config_error);
  REQUIRE_THROWS_WITH(other.check(), Contains("MergePlan::check") && Contains("'unm_idx'") &&
                                         Contains("expected 0"));
  other.unm_idx.clear(), other.src_idx.clear(), other.dst_idx.clear();
  other.check();
  const auto merged = other.merge_wavg(metric);
  // No index sets to read: the reference unmerge order is the inverse.
  REQUIRE(to_double(other.unmerge(merged, UnmergeOrder::reference)) ==
          to_double(other.unmerge(merged, UnmergeOrder::inverse)));
}

// ---- PiToMe energy matching ---------------------------------------------------------------------

namespace {

// Naive double reference, written straight from PiToMe's algo/pitome/merge.py (pitome_vision with
// pitome / pitome_bsm, pitome_text's kernel and split): gathers and scatters on the candidate
// sets, independent of the plan's dest/group tables.
struct RefPitome {
  std::vector<double> energy;
  std::vector<std::int64_t> order, a, b, prot, unm, src, dst;
  std::vector<double> merged, size_out, merged_mean, pruned, source;
};

RefPitome ref_pitome(const std::vector<double>& metric, const std::vector<double>& x,
                     const std::vector<double>& size, std::int64_t B, std::int64_t N,
                     std::int64_t Cm, std::int64_t C, const EnergyMatchingConfig& cfg) {
  RefPitome out;
  const std::int64_t off = cfg.class_token, T = N - off, r = cfg.r, M = N - r;
  for (std::int64_t bb = 0; bb < B; ++bb) {
    std::vector<double> m(T * Cm), sim(T * T), e(T);
    for (std::int64_t t = 0; t < T; ++t) {
      double ss = 0;
      for (std::int64_t c = 0; c < Cm; ++c) ss += std::pow(metric[(bb * N + off + t) * Cm + c], 2);
      for (std::int64_t c = 0; c < Cm; ++c)
        m[t * Cm + c] = metric[(bb * N + off + t) * Cm + c] / std::max(std::sqrt(ss), 1e-12);
    }
    for (std::int64_t i = 0; i < T; ++i)
      for (std::int64_t j = 0; j < T; ++j) {
        double s = 0;
        for (std::int64_t c = 0; c < Cm; ++c) s += m[i * Cm + c] * m[j * Cm + c];
        sim[i * T + j] = s;
      }
    const double sigma = 1 - cfg.margin;
    for (std::int64_t i = 0; i < T; ++i) {
      double acc = 0;
      for (std::int64_t j = 0; j < T; ++j) {
        const double v = sim[i * T + j] - cfg.margin;
        const double g = std::exp(-0.5 * std::pow((1 - sim[i * T + j]) / sigma, 2));
        acc += cfg.kernel == EnergyKernel::gaussian ? g : v > 0 ? v : cfg.alpha * (std::exp(v) - 1);
      }
      e[i] = acc / double(T);
      if (cfg.kernel == EnergyKernel::gaussian) e[i] /= sigma * std::sqrt(2 * M_PI);
    }
    std::vector<std::int64_t> order(T);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](auto p, auto q) { return e[p] > e[q]; });
    out.energy.insert(out.energy.end(), e.begin(), e.end());
    out.order.insert(out.order.end(), order.begin(), order.end());

    // Candidate sets, and for each source (in scatter order) its destination.
    std::vector<std::int64_t> a, b, kept, unm, src, dst;
    auto argmax_b = [&](std::int64_t t, double* best_out) {
      double best = -INFINITY;
      std::int64_t arg = 0;
      for (std::size_t j = 0; j < b.size(); ++j)
        if (sim[t * T + b[j]] > best) best = sim[t * T + b[j]], arg = std::int64_t(j);
      if (best_out) *best_out = best;
      return arg;
    };
    if (!cfg.bsm) {
      for (std::int64_t i = 0; i < r; ++i) {
        const bool halves = cfg.split == EnergySplit::halves;
        a.push_back(halves ? order[i] : order[2 * i]);
        b.push_back(halves ? order[r + i] : order[2 * i + 1]);
      }
      kept.assign(order.begin() + 2 * r, order.end());
      for (std::int64_t i = 0; i < r; ++i) src.push_back(i), dst.push_back(argmax_b(a[i], nullptr));
      out.prot.insert(out.prot.end(), kept.begin(), kept.end());
    } else {
      for (std::int64_t t = 0; t < T; ++t) (t % 2 ? b : a).push_back(order[t]);
      std::vector<double> node_max(a.size());
      std::vector<std::int64_t> node_idx(a.size()), edge(a.size());
      for (std::size_t p = 0; p < a.size(); ++p) node_idx[p] = argmax_b(a[p], &node_max[p]);
      std::iota(edge.begin(), edge.end(), 0);
      std::stable_sort(edge.begin(), edge.end(),
                       [&](auto p, auto q) { return node_max[p] > node_max[q]; });
      unm.assign(edge.begin() + r, edge.end());
      for (std::int64_t i = 0; i < r; ++i) src.push_back(edge[i]), dst.push_back(node_idx[edge[i]]);
      for (std::int64_t p : unm) kept.push_back(a[p]);
      out.unm.insert(out.unm.end(), unm.begin(), unm.end());
    }
    out.a.insert(out.a.end(), a.begin(), a.end());
    out.b.insert(out.b.end(), b.begin(), b.end());
    out.src.insert(out.src.end(), src.begin(), src.end());
    out.dst.insert(out.dst.end(), dst.begin(), dst.end());

    // merge(v, mode) on the [N, W] rows of one batch element. mode: 0 sum, 1 mean, 2 amax, 3 prune.
    auto merge = [&](const std::vector<double>& v, std::int64_t W, int mode) {
      std::vector<double> res;
      if (off) res.insert(res.end(), v.begin(), v.begin() + W);
      auto row = [&](std::int64_t t) { return v.begin() + (off + t) * W; };
      for (std::int64_t t : kept) res.insert(res.end(), row(t), row(t) + W);
      std::vector<double> d;
      for (std::int64_t t : b) d.insert(d.end(), row(t), row(t) + W);
      std::vector<double> cnt(b.size(), 1);
      for (std::size_t i = 0; mode != 3 && i < src.size(); ++i) {
        cnt[dst[i]] += 1;
        for (std::int64_t w = 0; w < W; ++w) {
          const double s = row(a[src[i]])[w];
          double& t = d[dst[i] * W + w];
          t = mode == 2 ? std::max(t, s) : t + s;
        }
      }
      if (mode == 1)
        for (std::size_t j = 0; j < b.size(); ++j)
          for (std::int64_t w = 0; w < W; ++w) d[j * W + w] /= cnt[j];
      res.insert(res.end(), d.begin(), d.end());
      return res;
    };
    std::vector<double> xb(N * C), xs(N * C), sb(N), eye(N * N, 0);
    for (std::int64_t t = 0; t < N; ++t) {
      sb[t] = size[bb * N + t];
      eye[t * N + t] = 1;
      for (std::int64_t c = 0; c < C; ++c) {
        xb[t * C + c] = x[(bb * N + t) * C + c];
        xs[t * C + c] = xb[t * C + c] * sb[t];
      }
    }
    const auto num = merge(xs, C, 0), den = merge(sb, 1, 0), mean = merge(xb, C, 1);
    const auto pruned = merge(xb, C, 3), srcmap = merge(eye, N, 2);
    for (std::int64_t o = 0; o < M; ++o) {
      out.size_out.push_back(den[o]);
      for (std::int64_t c = 0; c < C; ++c) out.merged.push_back(num[o * C + c] / den[o]);
    }
    out.merged_mean.insert(out.merged_mean.end(), mean.begin(), mean.end());
    out.pruned.insert(out.pruned.end(), pruned.begin(), pruned.end());
    out.source.insert(out.source.end(), srcmap.begin(), srcmap.end());
  }
  return out;
}

std::vector<std::int64_t> as_indices(const Tensor<std::int64_t>& t) {
  return std::vector<std::int64_t>(t.begin(), t.end());
}

double max_abs_err(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  double e = 0;
  for (std::size_t i = 0; i < got.size(); ++i) e = std::max(e, std::abs(got[i] - want[i]));
  return e;
}

}  // namespace

TEST_CASE("PiToMe fixtures match hchautran/PiToMe", "[pitome][fixture]") {
  const bool bsm = GENERATE(false, true);
  const char* file = bsm ? "pitome_tiny_bsm.safetensors" : "pitome_tiny.safetensors";
  CAPTURE(file);
  auto f = open_fixture(file);
  const Tensor<float> x = f.tensor<float>("x");
  const Tensor<float> metric = f.tensor<float>("metric");
  const std::int64_t B = x.extent(0), N = x.extent(1), C = x.extent(2);
  const Tensor<float> s = f.tensor<float>("size_in");
  Tensor<float> size_in({B, N});
  std::copy(s.begin(), s.end(), size_in.begin());

  const std::int64_t r = energy_merges(N, 0.826530612244898, true);  // pitome_vision's ratio
  REQUIRE(r == 8);
  const EnergyMatchingConfig cfg{
      .r = r, .margin = bsm ? 0.75 : 0.375, .alpha = 1.0, .class_token = true, .bsm = bsm};
  const auto res = energy_matching_detail<float>(metric, cfg, size_in.view<2>());
  const auto& plan = res.plan;
  REQUIRE(plan.r == r);
  REQUIRE(plan.num_out == N - r);
  REQUIRE(res.num_mergeable == N - 1);

  const double e_energy =
      max_abs_err(to_double(res.energy), to_double(f.tensor<float>("energy_score")));
  // Integer routing outputs: exact.
  REQUIRE(res.order == as_indices(f.tensor<std::int64_t>("energy_order")));
  REQUIRE(res.a_idx == as_indices(f.tensor<std::int64_t>("a_idx")));
  REQUIRE(res.b_idx == as_indices(f.tensor<std::int64_t>("b_idx")));
  REQUIRE(res.dst_idx == as_indices(f.tensor<std::int64_t>("dst_idx")));
  if (bsm) {
    REQUIRE(res.unm_idx == as_indices(f.tensor<std::int64_t>("unm_idx")));
    REQUIRE(res.src_idx == as_indices(f.tensor<std::int64_t>("src_idx")));
    REQUIRE(res.protected_idx.empty());
  } else {
    REQUIRE(res.protected_idx == as_indices(f.tensor<std::int64_t>("protected_idx")));
    REQUIRE(res.src_idx == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7});
    REQUIRE(res.unm_idx.empty());
  }

  const Tensor<float> merged = plan.merge_wavg(x);
  Tensor<float> mean({B, plan.num_out, C}), pruned({B, plan.num_out, C});
  plan.merge(x, mean.view<3>(), MergeMode::mean);
  plan.merge(x, pruned.view<3>(), MergeMode::prune);
  // Sizes are sums of small integers and the source map is 0/1: exact. Pruning copies: exact.
  REQUIRE(to_double(plan.size_out) == to_double(f.tensor<float>("size_out")));
  REQUIRE(to_double(plan.source()) == to_double(f.tensor<float>("source")));
  REQUIRE(to_double(pruned) == to_double(f.tensor<float>("x_pruned")));
  const auto want_merged = to_double(f.tensor<float>("x_merged"));
  const auto want_mean = to_double(f.tensor<float>("x_merged_mean"));
  const double e_merged = max_abs_err(to_double(merged), want_merged);
  const double e_mean = max_abs_err(to_double(mean), want_mean);
  WARN("max abs error energy_score " << e_energy << ", x_merged " << e_merged << ", x_merged_mean "
                                     << e_mean << " (max |x_merged| " << max_abs(want_merged)
                                     << ")");
  CHECK(e_energy <= 1e-6);
  CHECK(e_merged <= 1e-6);
  CHECK(e_mean <= 1e-6);
  // The plan alone gives the same plan.
  const auto plan_only = energy_matching<float>(metric, cfg, size_in.view<2>());
  REQUIRE(plan_only.dest == plan.dest);
  REQUIRE(plan_only.group_members == plan.group_members);
}

TEST_CASE("PiToMe matches the naive double reference on random data", "[pitome][reference]") {
  struct Case {
    std::int64_t B, N, C, r;
    bool cls, bsm;
    EnergyKernel kernel;
    EnergySplit split;
    double margin;
  };
  const auto elu = EnergyKernel::elu, gauss = EnergyKernel::gaussian;
  const auto alt = EnergySplit::alternate, halves = EnergySplit::halves;
  const Case c = GENERATE_COPY(
      Case{2, 20, 8, 4, false, false, elu, alt, 0.5}, Case{3, 21, 5, 7, true, false, elu, alt, 0.3},
      Case{2, 17, 6, 8, true, false, elu, alt, -0.2},
      Case{2, 21, 6, 10, true, true, elu, alt, 0.75}, Case{1, 16, 4, 8, false, true, elu, alt, 0.0},
      Case{2, 19, 5, 5, true, false, gauss, halves, 0.5},
      Case{1, 12, 4, 3, false, false, gauss, alt, 0.4},
      Case{2, 13, 4, 2, false, false, elu, halves, 0.6},
      Case{1, 4, 4, 2, true, true, elu, alt, 0.5}, Case{2, 9, 3, 0, true, false, elu, alt, 0.5});
  CAPTURE(c.B, c.N, c.C, c.r, c.cls, c.bsm, int(c.kernel), int(c.split), c.margin);
  const EnergyMatchingConfig cfg{.r = c.r,
                                 .margin = c.margin,
                                 .alpha = 0.7,
                                 .class_token = c.cls,
                                 .bsm = c.bsm,
                                 .kernel = c.kernel,
                                 .split = c.split};
  const auto metric = random_tensor<double>({c.B, c.N, 6}, 31 + std::uint32_t(c.N));
  const auto x = random_tensor<double>({c.B, c.N, c.C}, 32 + std::uint32_t(c.N));
  Tensor<double> size({c.B, c.N});
  std::mt19937 gen(7);
  for (auto& s : size) s = double(1 + gen() % 5);
  const RefPitome ref =
      ref_pitome(to_double(metric), to_double(x), to_double(size), c.B, c.N, 6, c.C, cfg);

  const auto res = energy_matching_detail<double>(metric, cfg, size.view<2>());
  const auto& plan = res.plan;
  CHECK(max_abs_err(to_double(res.energy), ref.energy) <= 1e-14);
  REQUIRE(res.order == ref.order);
  if (c.r > 0) {
    REQUIRE(res.a_idx == ref.a);
    REQUIRE(res.b_idx == ref.b);
    REQUIRE(res.protected_idx == ref.prot);
    REQUIRE(res.unm_idx == ref.unm);
    REQUIRE(res.src_idx == ref.src);
    REQUIRE(res.dst_idx == ref.dst);
    CHECK(max_rel_err(to_double(plan.merge_wavg(x)), ref.merged, 1e-12) <= 1e-13);
    CHECK(to_double(plan.size_out) == ref.size_out);
    Tensor<double> mean({c.B, plan.num_out, c.C}), pruned({c.B, plan.num_out, c.C});
    plan.merge(x, mean.view<3>(), MergeMode::mean);
    plan.merge(x, pruned.view<3>(), MergeMode::prune);
    CHECK(max_rel_err(to_double(mean), ref.merged_mean, 1e-12) <= 1e-13);
    CHECK(to_double(pruned) == ref.pruned);
    CHECK(to_double(plan.source()) == ref.source);
  } else {
    REQUIRE(plan.is_identity());
    Tensor<double> same({c.B, c.N, c.C});
    plan.merge(x, same.view<3>(), MergeMode::sum);
    REQUIRE(to_double(same) == to_double(x));
  }
  // unmerge gives every token the row it went into.
  const auto merged = plan.merge_wavg(x);
  const auto back = plan.unmerge(merged, UnmergeOrder::reference);
  for (std::int64_t b = 0; b < c.B; ++b)
    for (std::int64_t i = 0; i < c.N; ++i)
      for (std::int64_t k = 0; k < c.C; ++k)
        REQUIRE(back(b, i, k) == merged(b, plan.dest[b * c.N + i], k));

  // float: energies to float accuracy, the same routing (gaps here are far above float rounding).
  Tensor<float> metric_f({c.B, c.N, 6});
  std::copy(metric.begin(), metric.end(), metric_f.begin());
  const auto res_f = energy_matching_detail<float>(metric_f, cfg);
  CHECK(max_abs_err(to_double(res_f.energy), ref.energy) <= 1e-6);
  REQUIRE(res_f.order == ref.order);
  REQUIRE(res_f.dst_idx == ref.dst);
}

TEST_CASE("PiToMe hand-computed 4-token case", "[pitome][hand]") {
  // Unit vectors t0 = t1 = (1, 0), t2 = (0, 1), t3 = (-1, 0); margin 0, alpha 1:
  // E0 = E1 = (1 + 1 + 0 + (e^-1 - 1)) / 4, E2 = 1/4, E3 = (2 (e^-1 - 1) + 0 + 1) / 4.
  // E0 == E1 is a tie: order [0, 1, 2, 3] (lower index first).
  Tensor<float> metric({1, 4, 2});
  const float m[] = {2, 0, 1, 0, 0, 3, -1, 0};
  std::copy(m, m + 8, metric.begin());
  Tensor<float> x({1, 4, 1});
  const float xv[] = {1, 3, 5, 7};
  std::copy(xv, xv + 4, x.begin());
  Tensor<float> size({1, 4});
  const float sv[] = {1, 3, 1, 1};
  std::copy(sv, sv + 4, size.begin());
  const double e1 = std::exp(-1.0);
  EnergyMatchingConfig cfg{.r = 1, .margin = 0.0, .alpha = 1.0};

  SECTION("vision, r = 1: a = [0], b = [1], protected [2, 3]") {
    const auto res = energy_matching_detail<float>(metric, cfg, size.view<2>());
    CHECK(res.energy[0] == Approx((1 + e1) / 4).epsilon(1e-6));
    CHECK(res.energy[1] == res.energy[0]);
    CHECK(res.energy[2] == Approx(0.25).epsilon(1e-6));
    CHECK(res.energy[3] == Approx((2 * e1 - 1) / 4).epsilon(1e-6));
    REQUIRE(res.order == std::vector<std::int64_t>{0, 1, 2, 3});
    REQUIRE(res.a_idx == std::vector<std::int64_t>{0});
    REQUIRE(res.b_idx == std::vector<std::int64_t>{1});
    REQUIRE(res.protected_idx == std::vector<std::int64_t>{2, 3});
    REQUIRE(res.dst_idx == std::vector<std::int64_t>{0});
    REQUIRE(res.plan.dest == std::vector<std::int64_t>{2, 2, 0, 1});
    const auto merged = res.plan.merge_wavg(x);
    CHECK(to_double(merged) == std::vector<double>{5, 7, 2.5});  // (3*3 + 1*1) / 4
    CHECK(to_double(res.plan.size_out) == std::vector<double>{1, 1, 4});
    CHECK(to_double(res.plan.unmerge(merged)) == std::vector<double>{2.5, 2.5, 5, 7});
  }
  SECTION("r = 2: alternate a = [0, 2], b = [1, 3]; halves a = [0, 1], b = [2, 3]") {
    cfg.r = 2;
    const auto alt = energy_matching<float>(metric, cfg);
    // t2 is as close to t1 as to t3 (cos 0 both): the tie goes to b[0] = t1.
    REQUIRE(alt.dest == std::vector<std::int64_t>{0, 0, 0, 1});
    REQUIRE(alt.group_members == std::vector<std::int64_t>{1, 0, 2, 3});
    cfg.split = EnergySplit::halves;
    const auto hv = energy_matching<float>(metric, cfg);
    REQUIRE(hv.dest == std::vector<std::int64_t>{0, 0, 0, 1});
    REQUIRE(hv.group_members == std::vector<std::int64_t>{2, 0, 1, 3});
  }
  SECTION("bsm, r = 1: A = [0, 2], B = [1, 3]; t0 merges into t1") {
    cfg.bsm = true;
    const auto res = energy_matching_detail<float>(metric, cfg);
    REQUIRE(res.a_idx == std::vector<std::int64_t>{0, 2});
    REQUIRE(res.b_idx == std::vector<std::int64_t>{1, 3});
    REQUIRE(res.src_idx == std::vector<std::int64_t>{0});
    REQUIRE(res.dst_idx == std::vector<std::int64_t>{0});
    REQUIRE(res.unm_idx == std::vector<std::int64_t>{1});
    REQUIRE(res.plan.dest == std::vector<std::int64_t>{1, 1, 0, 2});
  }
  SECTION("gaussian kernel, margin 0 (sigma 1)") {
    cfg.kernel = EnergyKernel::gaussian;
    const auto res = energy_matching_detail<float>(metric, cfg);
    const double k = 1 / std::sqrt(2 * M_PI);
    CHECK(res.energy[0] == Approx((2 + std::exp(-0.5) + std::exp(-2.0)) / 4 * k).epsilon(1e-6));
    CHECK(res.energy[2] == Approx((1 + 3 * std::exp(-0.5)) / 4 * k).epsilon(1e-6));
    CHECK(res.energy[3] == Approx((1 + std::exp(-0.5) + 2 * std::exp(-2.0)) / 4 * k).epsilon(1e-6));
  }
  SECTION("class token: not scored, kept first") {
    Tensor<float> with_cls({1, 5, 2});
    with_cls(0, 0, 0) = 5, with_cls(0, 0, 1) = 5;
    std::copy(m, m + 8, with_cls.begin() + 2);
    cfg.class_token = true;
    const auto res = energy_matching_detail<float>(with_cls, cfg);
    REQUIRE(res.num_mergeable == 4);
    REQUIRE(res.order == std::vector<std::int64_t>{0, 1, 2, 3});
    REQUIRE(res.plan.dest == std::vector<std::int64_t>{0, 3, 3, 1, 2});
  }
}

TEST_CASE("PiToMe properties", "[pitome][property]") {
  const std::int64_t B = 3, N = 37, C = 8;
  const auto metric = random_tensor<float>({B, N, 16}, 41);
  const auto x = random_tensor<float>({B, N, C}, 42);
  Tensor<float> size({B, N});
  std::mt19937 gen(43);
  for (auto& s : size) s = float(1 + gen() % 4);

  SECTION("merging preserves the total size and the size-weighted sum") {
    const bool bsm = GENERATE(false, true);
    const std::int64_t r = GENERATE(1, 6, 18);
    const auto plan =
        energy_matching<float>(metric, {.r = r, .class_token = true, .bsm = bsm}, size.view<2>());
    const auto merged = plan.merge_wavg(x);
    for (std::int64_t b = 0; b < B; ++b) {
      REQUIRE(plan.dest[b * N] == 0);  // the class token stays first, alone
      REQUIRE(plan.group(b, 0).second - plan.group(b, 0).first == 1);
      double total_in = 0, total_out = 0;
      for (std::int64_t i = 0; i < N; ++i) total_in += size(b, i);
      for (std::int64_t o = 0; o < plan.num_out; ++o) total_out += plan.size_out(b, o);
      REQUIRE(total_out == total_in);
      for (std::int64_t c = 0; c < C; ++c) {
        double in = 0, out = 0, scale = 0;
        for (std::int64_t i = 0; i < N; ++i) in += double(size(b, i)) * x(b, i, c);
        for (std::int64_t o = 0; o < plan.num_out; ++o)
          out += double(plan.size_out(b, o)) * merged(b, o, c);
        for (std::int64_t i = 0; i < N; ++i) scale += std::abs(double(size(b, i)) * x(b, i, c));
        CHECK(std::abs(in - out) <= 1e-6 * scale);
      }
    }
  }
  SECTION("the largest r is accepted on both paths") {
    const auto p = energy_matching<float>(metric, {.r = 18, .class_token = true});
    REQUIRE(p.num_out == N - 18);
    REQUIRE(max_energy_merges(N, {.class_token = true}) == 18);
    REQUIRE(max_energy_merges(N, {.class_token = true, .bsm = true}) == 18);
    REQUIRE(max_energy_merges(N, {.bsm = true}) == 19);
    const auto q = energy_matching<float>(metric, {.r = 19, .bsm = true});  // every A token merges
    REQUIRE(q.num_out == N - 19);
    REQUIRE(max_energy_merges(1, {.bsm = true}) == 0);
    REQUIRE(max_energy_merges(0, {.class_token = true}) == 0);
  }
  SECTION("ratio gives the reference's r") {
    REQUIRE(energy_merges(197, 0.9, true) == 19);  // floor(196 - 176.4)
    REQUIRE(energy_merges(50, 1.0, true) == 0);
    REQUIRE(energy_merges(50, 1.5) == 0);
    REQUIRE(energy_merges(0, 0.5, true) == 0);
  }
  SECTION("ties break toward the lower index") {
    Tensor<float> same({1, 10, 3});
    same.fill(1.0f);  // every similarity and every energy equal
    const auto res = energy_matching_detail<float>(same, {.r = 3});
    REQUIRE(res.order == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
    REQUIRE(res.a_idx == std::vector<std::int64_t>{0, 2, 4});
    REQUIRE(res.b_idx == std::vector<std::int64_t>{1, 3, 5});
    REQUIRE(res.dst_idx == std::vector<std::int64_t>{0, 0, 0});
    const auto bsm = energy_matching_detail<float>(same, {.r = 3, .bsm = true});
    REQUIRE(bsm.src_idx == std::vector<std::int64_t>{0, 1, 2});
    REQUIRE(bsm.dst_idx == std::vector<std::int64_t>{0, 0, 0});
    REQUIRE(bsm.unm_idx == std::vector<std::int64_t>{3, 4});
  }
  SECTION("zero and NaN metric rows: no NaN ranking chaos") {
    Tensor<float> odd = metric;
    for (std::int64_t c = 0; c < 16; ++c)
      odd(0, 3, c) = 0.0f;                                   // normalised with eps: energy finite
    odd(1, 5, 0) = std::numeric_limits<float>::quiet_NaN();  // every energy of batch 1 is NaN
    const auto res = energy_matching_detail<float>(odd, {.r = 6});
    REQUIRE(std::isfinite(res.energy(0, 3)));
    for (std::int64_t t = 0; t < N; ++t) {  // all NaN: all tie (like -inf), lower index first
      REQUIRE(std::isnan(res.energy(1, t)));
      REQUIRE(res.order[1 * N + t] == t);
    }
    res.plan.check();
  }
  SECTION("the same bits for any thread count") {
    const auto run = [&](int threads, bool bsm) {
      switchyard::ScopedNumThreads t(threads);
      const auto res = energy_matching_detail<float>(
          metric, {.r = 9, .class_token = true, .bsm = bsm}, size.view<2>());
      auto out = to_double(res.plan.merge_wavg(x));
      const auto e = to_double(res.energy);
      out.insert(out.end(), e.begin(), e.end());
      out.insert(out.end(), res.plan.dest.begin(), res.plan.dest.end());
      return out;
    };
    REQUIRE(run(1, false) == run(2, false));
    REQUIRE(run(1, true) == run(2, true));
  }
  SECTION("empty input") {
    Tensor<float> none({0, 7, 4}), one({2, 1, 4});
    REQUIRE(energy_matching<float>(none, {.r = 2}).batch == 0);
    one.fill(1.0f);
    const auto p = energy_matching<float>(one, {.class_token = true});
    REQUIRE(p.is_identity());
    REQUIRE(p.num_out == 1);
  }
}

TEST_CASE("PiToMe rejects bad input", "[pitome][error]") {
  const auto metric = random_tensor<float>({2, 10, 4}, 51);
  using switchyard::config_error;
  using switchyard::shape_error;
  const auto run = [&](EnergyMatchingConfig cfg) { return energy_matching<float>(metric, cfg); };
  REQUIRE_THROWS_AS(run({.r = -1}), config_error);
  REQUIRE_THROWS_WITH(run({.r = -1}), Contains("PiToMe::energy_matching") && Contains("'r' = -1"));
  REQUIRE_THROWS_AS(run({.r = 5, .class_token = true}), config_error);
  REQUIRE_THROWS_WITH(run({.r = 5, .class_token = true}),
                      Contains("'r' = 5") && Contains("r <= 4 = T/2") && Contains("T = 9") &&
                          Contains("[B=2, N=10, C=4]"));
  REQUIRE_THROWS_WITH(run({.r = 6, .bsm = true}), Contains("'r' = 6") && Contains("r <= 5 = |A|"));
  REQUIRE_THROWS_WITH(energy_matching_detail<float>(metric, {.r = 6}),
                      Contains("PiToMe::energy_matching_detail") && Contains("'r' = 6"));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_AS(run({.r = 1, .margin = nan}), config_error);
  REQUIRE_THROWS_WITH(run({.r = 1, .margin = nan}), Contains("'margin'"));
  REQUIRE_THROWS_WITH(run({.r = 1, .alpha = INFINITY}), Contains("'alpha' = inf"));
  REQUIRE_THROWS_WITH(run({.r = 1, .margin = 1.0, .kernel = EnergyKernel::gaussian}),
                      Contains("'margin' = 1") && Contains("gaussian"));
  REQUIRE_THROWS_WITH(run({.r = 1, .bsm = true, .split = EnergySplit::halves}),
                      Contains("'split' = halves"));
  REQUIRE_THROWS_AS(energy_merges(10, nan), config_error);
  REQUIRE_THROWS_WITH(energy_merges(10, 0.0),
                      Contains("PiToMe::energy_merges") && Contains("'ratio' = 0"));

  Tensor<float> no_channels({2, 10, 0});
  REQUIRE_THROWS_AS(energy_matching<float>(no_channels, {.r = 1}), shape_error);
  REQUIRE_THROWS_WITH(energy_matching<float>(no_channels, {.r = 1}),
                      Contains("'metric'") && Contains("[B=2, N=10, C=0]"));
  Tensor<float> size({2, 10});
  size.fill(1.0f);
  size(1, 4) = 0.0f;
  REQUIRE_THROWS_AS(energy_matching<float>(metric, {.r = 2}, size.view<2>()), config_error);
  REQUIRE_THROWS_WITH(
      energy_matching<float>(metric, {.r = 2}, size.view<2>()),
      Contains("'sizes'") && Contains("[b=1, n=4]") && Contains("every size finite and > 0"));
  size.fill(3e38f);
  REQUIRE_THROWS_WITH(energy_matching<float>(metric, {.r = 2}, size.view<2>()),
                      Contains("a merged size of inf"));
  Tensor<float> size_short({2, 9});
  size_short.fill(1.0f);
  REQUIRE_THROWS_AS(energy_matching<float>(metric, {.r = 2}, size_short.view<2>()), shape_error);
  REQUIRE_THROWS_WITH(energy_matching<float>(metric, {.r = 2}, size_short.view<2>()),
                      Contains("PiToMe") && Contains("'sizes'") && Contains("[B=2, N=9]") &&
                          Contains("[B=2, N=10]"));
}
