// quickstart: causal multi-head attention with switchyard's fused kernel,
// checked against the naive reference.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <switchyard/attention/dense.hpp>
#include <switchyard/attention/dense_ref.hpp>

int main() {
  using namespace switchyard;
  using namespace switchyard::attention;

  // Layout [B, T, H, D]: batch, tokens, heads, head dim. K and V may have fewer
  // heads than Q (grouped-query attention): here 8 query heads share 2 K/V heads.
  const std::int64_t B = 2, T = 256, H = 8, H_kv = 2, D = 64;
  Tensor<float> q({B, T, H, D}), k({B, T, H_kv, D}), v({B, T, H_kv, D});
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(rng);

  const DenseAttention<float> attn;  // scale = 1/sqrt(D)
  const Tensor<float> out = attn.forward(q, k, v, CausalMask{});

  Tensor<float> want({B, T, H, D});
  ref::dense_attention<float>(q, k, v, want.view<4>(), CausalMask{});

  double checksum = 0, max_err = 0;
  for (std::int64_t i = 0; i < out.numel(); ++i) {
    checksum += out[i];
    max_err = std::max(max_err, double(std::abs(out[i] - want[i])));
  }
  std::printf("q [%lld, %lld, %lld, %lld], k/v [%lld, %lld, %lld, %lld], causal\n", (long long)B,
              (long long)T, (long long)H, (long long)D, (long long)B, (long long)T, (long long)H_kv,
              (long long)D);
  std::printf("SIMD architecture: %s, threads: %d\n", simd::default_arch::name(), num_threads());
  std::printf("checksum: %.6f\n", checksum);
  std::printf("max |fused - reference|: %.3g\n", max_err);
  return max_err < 1e-5 ? 0 : 1;
}
