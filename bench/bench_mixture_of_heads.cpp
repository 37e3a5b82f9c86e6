// Mixture-of-Head attention at B 8, N 197, C 384, 6 heads (DiT-S width): MoH with 2 shared heads
// and the top-k of 4 routed heads (k = 1, 2, 3, 4: 50%, 67%, 83%, 100% of heads per token) against
// plain multi-head attention of the same shape (all 6 heads for every token, the same kernels,
// gates fixed to 1). 75% of 6 heads is 4.5 heads, not a whole number per token: the k = 2 (67%)
// and k = 3 (83%) rows bracket it. Rates are tokens/s; pairs_fraction is the share of
// (token, head) pairs computed.
// Filter for a smoke run: --benchmark_filter=tiny
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>

#include "switchyard/attention/mixture_of_heads.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"

namespace {
using switchyard::Tensor;
namespace at = switchyard::attention;

struct Model {
  Tensor<float> qkv_w, qkv_b, proj_w, proj_b, wg, wg0, wg1;
  Model(std::int64_t C, std::int64_t H, std::int64_t S, bool zero_gates)
      : qkv_w({3 * C, C}),
        qkv_b({3 * C}),
        proj_w({C, C}),
        proj_b({C}),
        wg({std::max<std::int64_t>(H - S, 1), C}),
        wg0({2, C}),
        wg1({std::max<std::int64_t>(S, 1), C}) {
    std::mt19937 gen(2);
    std::normal_distribution<float> nd(0.0f, 1.0f / std::sqrt(float(C)));
    for (auto* t : {&qkv_w, &qkv_b, &proj_w, &proj_b, &wg, &wg0, &wg1})
      for (auto& v : *t) v = nd(gen);
    if (zero_gates) wg1.fill(0.0f);  // softmax(0) * S = 1: every head weighted 1
  }
  at::MixtureOfHeadsWeights<float> views(std::int64_t H, std::int64_t S) const {
    return {qkv_w,
            qkv_b,
            proj_w,
            proj_b,
            wg.view<2>().slice(0, 0, H - S),
            wg0,
            wg1.view<2>().slice(0, 0, S)};
  }
};

// threads: 0 = switchyard's default (all hardware threads), else that many.
void BM_moh(benchmark::State& state, int threads, std::int64_t B, std::int64_t N, std::int64_t C,
            std::int64_t H, std::int64_t S, std::int64_t K) {
  const bool plain = K == 0;  // all heads shared, gates 1: plain multi-head attention
  const Model m(C, H, S, plain);
  const auto w = m.views(H, S);
  Tensor<float> x({B, N, C}), out({B, N, C});
  std::mt19937 gen(3);
  std::normal_distribution<float> nd;
  for (auto& v : x) v = nd(gen);
  const at::MixtureOfHeads<float> moh(
      {.dim = C, .num_heads = H, .shared_heads = S, .routed_top_k = K});
  double fraction = 0;
  switchyard::ScopedNumThreads scoped(threads);
  for (auto _ : state) {
    const auto plan = moh.route(x, w);
    moh.execute(plan, x, w, out.view<3>());
    fraction = plan.fraction();
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * B * N);
  state.counters["pairs_fraction"] = fraction;
}

}  // namespace

BENCHMARK_CAPTURE(BM_moh, plain_mha_h6, 0, 8, 197, 384, 6, 6, 0)->UseRealTime();
BENCHMARK_CAPTURE(BM_moh, moh_50pct_s2_k1of4, 0, 8, 197, 384, 6, 2, 1)->UseRealTime();
BENCHMARK_CAPTURE(BM_moh, moh_67pct_s2_k2of4, 0, 8, 197, 384, 6, 2, 2)->UseRealTime();
BENCHMARK_CAPTURE(BM_moh, moh_83pct_s2_k3of4, 0, 8, 197, 384, 6, 2, 3)->UseRealTime();
BENCHMARK_CAPTURE(BM_moh, moh_100pct_s2_k4of4, 0, 8, 197, 384, 6, 2, 4)->UseRealTime();
// One thread, timed in CPU time: the ratios stay meaningful when other work loads the machine.
BENCHMARK_CAPTURE(BM_moh, 1thread_plain_mha_h6, 1, 8, 197, 384, 6, 6, 0);
BENCHMARK_CAPTURE(BM_moh, 1thread_moh_50pct_s2_k1of4, 1, 8, 197, 384, 6, 2, 1);
BENCHMARK_CAPTURE(BM_moh, 1thread_moh_67pct_s2_k2of4, 1, 8, 197, 384, 6, 2, 2);
BENCHMARK_CAPTURE(BM_moh, 1thread_moh_83pct_s2_k3of4, 1, 8, 197, 384, 6, 2, 3);
BENCHMARK_CAPTURE(BM_moh, 1thread_moh_100pct_s2_k4of4, 1, 8, 197, 384, 6, 2, 4);
BENCHMARK_CAPTURE(BM_moh, tiny_moh_50pct, 0, 1, 9, 16, 4, 1, 1)->UseRealTime();
BENCHMARK_CAPTURE(BM_moh, tiny_plain_mha, 0, 1, 9, 16, 4, 4, 0)->UseRealTime();
