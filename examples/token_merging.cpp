// token_merging: ToMe on a ViT-like token sequence. Three rounds of bipartite soft matching
// (r = 16 each) shrink 197 tokens (class token + 14x14 patches), tracking sizes and the source
// map; proportional attention then weights each merged key by its size; unmerge gathers the
// merged features back to 197 tokens for a dense prediction head. The check: merging keeps the
// size-weighted mean of the tokens and the total size (197), and every original token unmerges
// to the merged token the source map names; exits 1 otherwise.
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <switchyard/tokens/merge_bipartite.hpp>
#include <switchyard/tokens/merge_plan.hpp>
#include <switchyard/tokens/proportional_attention.hpp>
#include <vector>

int main() {
  using namespace switchyard;
  const std::int64_t B = 1, N = 197, C = 64, r = 16;
  // Patches drawn around 12 prototypes, so similar tokens exist to be merged.
  std::mt19937 gen(0);
  std::normal_distribution<float> nd;
  Tensor<float> protos({12, C});
  for (auto& v : protos) v = nd(gen);
  Tensor<float> x({B, N, C});
  for (std::int64_t i = 0; i < N; ++i) {
    const std::int64_t p = std::int64_t(gen() % 12);
    for (std::int64_t c = 0; c < C; ++c) x(0, i, c) = protos(p, c) + 0.3f * nd(gen);
  }

  std::printf(
      "token_merging: ToMe bipartite soft matching on %lld tokens of width %lld\n(class "
      "token + 14x14 patches), 3 rounds of r = %lld\n",
      (long long)N, (long long)C, (long long)r);
  Tensor<float> tokens = x, sizes({B, N});
  sizes.fill(1.0f);
  Tensor<float> source;  // original token -> current token map
  std::vector<tokens::MergePlan<float>> plans;
  for (int round = 0; round < 3; ++round) {
    // ToMe matches on the attention keys; here the features themselves serve as the metric.
    const auto plan =
        tokens::bipartite_soft_matching<float>(tokens, r, /*class_token=*/true,
                                               /*distill_token=*/false, sizes.view<2>());
    source = round == 0 ? plan.source() : plan.source(source);
    tokens = plan.merge_wavg(tokens);
    sizes = Tensor<float>({B, plan.num_out});
    std::copy(plan.size_out.begin(), plan.size_out.end(), sizes.begin());
    std::printf("round %d: %lld -> %lld tokens (r = %lld)\n", round + 1, (long long)plan.num_tokens,
                (long long)plan.num_out, (long long)plan.r);
    plans.push_back(plan);
  }
  std::map<int, int> histogram;
  for (float s : sizes) ++histogram[int(s)];
  std::printf("token sizes after merging (size: count):");
  for (auto [s, n] : histogram) std::printf(" %d:%d", s, n);
  std::printf("\nclass token size %.0f (never merged)\n", double(sizes(0, 0)));

  // Proportional attention over the merged tokens, one head of 64 channels.
  const std::int64_t M = tokens.extent(1);
  const ConstView<float, 4> t4(tokens.data(), {B, M, 1, C});
  const auto attended = tokens::proportional_attention<float>(t4, t4, t4, sizes.view<2>());
  std::printf("proportional attention output: [%lld, %lld, 1, %lld]\n", (long long)B, (long long)M,
              (long long)C);

  // Back to 197 tokens: unmerge through the plans in reverse, each a gather.
  Tensor<float> dense({B, M, C});
  for (std::int64_t i = 0; i < M; ++i)
    for (std::int64_t c = 0; c < C; ++c) dense(0, i, c) = attended(0, i, 0, c);
  for (auto it = plans.rbegin(); it != plans.rend(); ++it) dense = it->unmerge(dense);
  // The source map says the same: original token i sits in the merged token o with source 1.
  std::int64_t agree = 0;
  for (std::int64_t i = 0; i < N; ++i)
    for (std::int64_t o = 0; o < M; ++o)
      if (source(0, o, i) == 1.0f && dense(0, i, 0) == attended(0, o, 0, 0)) ++agree;
  std::printf("unmerged for dense prediction: [%lld, %lld, %lld]\n", (long long)B, (long long)N,
              (long long)C);

  // Merging averages tokens weighted by their sizes, so the size-weighted mean of the merged
  // tokens equals the plain mean of the 197 originals, and the sizes add up to 197.
  double mean_err = 0, total_size = 0;
  for (const float s : sizes) total_size += s;
  for (std::int64_t c = 0; c < C; ++c) {
    double before = 0, after = 0;
    for (std::int64_t i = 0; i < N; ++i) before += x(0, i, c);
    for (std::int64_t o = 0; o < M; ++o) after += double(sizes(0, o)) * tokens(0, o, c);
    mean_err = std::max(mean_err, std::abs(before - after) / double(N));
  }
  const double tolerance = 1e-5;
  const bool ok = mean_err <= tolerance && total_size == double(N) && agree == N;
  std::printf(
      "size-weighted mean kept (max error %.2g, tolerance %.0e), sizes sum to %.0f, %lld "
      "of %lld tokens unmerge to their source: %s\n",
      mean_err, tolerance, total_size, (long long)agree, (long long)N, ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
