// mixture_of_heads: MoH attention (DiT-S width, 6 heads: 2 shared, top-1 of 4 routed) on random
// weights. Prints the routing plan (heads per token, how often each routed head is picked, the
// fraction of (token, head) pairs computed) and checks the output against computing every head
// with the same gates (heads with gate 0 contribute nothing, so skipping them must not change
// the output); exits 1 otherwise.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <switchyard/attention/mixture_of_heads.hpp>

int main() {
  using namespace switchyard;
  const std::int64_t B = 2, N = 64, C = 384, H = 6, S = 2;
  std::mt19937 gen(0);
  std::normal_distribution<float> nd(0.0f, 1.0f / std::sqrt(float(C)));
  auto random = [&](std::initializer_list<std::int64_t> shape) {
    Tensor<float> t(shape);
    for (auto& v : t) v = nd(gen);
    return t;
  };
  const auto qkv = random({3 * C, C}), qkv_b = random({3 * C}), proj = random({C, C}),
             proj_b = random({C}), wg = random({H - S, C}), wg0 = random({2, C}),
             wg1 = random({S, C});
  Tensor<float> x({B, N, C});
  for (auto& v : x) v = nd(gen) * std::sqrt(float(C));

  const attention::MixtureOfHeadsWeights<float> w{qkv, qkv_b, proj, proj_b, wg, wg0, wg1};
  const attention::MixtureOfHeads<float> moh(
      {.dim = C, .num_heads = H, .shared_heads = S, .routed_top_k = 1});
  const auto plan = moh.route(x, w);
  std::printf(
      "mixture_of_heads: MoH attention, %lld heads (%lld shared, top-%lld of %lld routed), "
      "%lld tokens\n",
      (long long)H, (long long)S, (long long)moh.config().routed_top_k, (long long)(H - S),
      (long long)(B * N));
  std::printf("tokens per head:");
  for (std::int64_t h = 0; h < H; ++h)
    std::printf(" h%lld=%lld", (long long)h,
                (long long)(plan.head_offsets[h + 1] - plan.head_offsets[h]));
  std::printf("\nheads used per token: %lld of %lld; pairs computed: %lld of %lld (%.0f%%)\n",
              (long long)(plan.pairs() / (B * N)), (long long)H, (long long)plan.pairs(),
              (long long)(B * N * H), 100.0 * plan.fraction());
  std::printf("token 0 gates:");
  for (std::int64_t h = 0; h < H; ++h) std::printf(" %.3f", double(plan.gates[h]));
  std::printf("\n");

  Tensor<float> y({B, N, C});
  moh.execute(plan, x, w, y.view<3>());

  // The same gates with every (token, head) pair computed: unused heads have gate 0, so the
  // output must agree; skipping them is what saves the work.
  auto all = plan;
  std::fill(all.active.begin(), all.active.end(), 1);
  all.token_index.clear();
  for (std::int64_t h = 0; h < H; ++h) {
    all.head_offsets[h] = h * B * N;
    for (std::int64_t t = 0; t < B * N; ++t) all.token_index.push_back(t);
  }
  all.head_offsets[H] = H * B * N;
  Tensor<float> y_all({B, N, C});
  moh.execute(all, x, w, y_all.view<3>());
  double diff = 0, scale = 0;
  for (std::int64_t i = 0; i < y.numel(); ++i) {
    diff = std::max(diff, double(std::abs(y[i] - y_all[i])));
    scale = std::max(scale, double(std::abs(y_all[i])));
  }
  const double tolerance = 1e-5 * scale;
  const bool ok = diff <= tolerance;
  std::printf("output [%lld, %lld, %lld], largest |y| %.2g\n", (long long)B, (long long)N,
              (long long)C, scale);
  std::printf("max error of routed heads vs every head computed %.2g (tolerance %.1e): %s\n", diff,
              tolerance, ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
