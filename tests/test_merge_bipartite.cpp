// ToMe bipartite soft matching and MergePlan: golden fixtures from facebookresearch/ToMe, a naive
// double-precision reference written straight from tome/merge.py (gather/scatter on sets A and B,
// independent of the plan's dest/group tables), a hand-computed case, properties and errors.
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
