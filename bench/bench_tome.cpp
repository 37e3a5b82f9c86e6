// ToMe bipartite soft matching at the ViT-B shape (B 32, N 197, C 768, r 16; the metric is the
// keys averaged over heads, 64 channels, as in ToMe's ViT blocks): routing (match), the
// size-weighted merge, and both, in tokens/s (input tokens per second).
// Filter for a smoke run: --benchmark_filter=tiny
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>

#include "switchyard/attention/dense.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/tokens/merge_bipartite.hpp"
#include "switchyard/tokens/merge_plan.hpp"
#include "switchyard/tokens/proportional_attention.hpp"

namespace {
using switchyard::Tensor;
namespace tk = switchyard::tokens;

struct Inputs {
  Tensor<float> metric, x, size;
  Inputs(std::int64_t B, std::int64_t N, std::int64_t Cm, std::int64_t C)
      : metric({B, N, Cm}), x({B, N, C}), size({B, N}) {
    std::mt19937 gen(1);
    std::normal_distribution<float> nd;
    for (auto& v : metric) v = nd(gen);
    for (auto& v : x) v = nd(gen);
    for (auto& v : size) v = float(1 + gen() % 3);
  }
};

// what: 0 = match + merge, 1 = match only, 2 = merge only (plan built outside the loop).
// threads: 0 = switchyard's default (all hardware threads), else that many.
void BM_tome(benchmark::State& state, int what, int threads, std::int64_t B, std::int64_t N,
             std::int64_t Cm, std::int64_t C, std::int64_t r) {
  const Inputs in(B, N, Cm, C);
  const auto sizes = in.size.view<2>();
  auto plan = tk::bipartite_soft_matching<float>(in.metric, r, true, false, sizes);
  Tensor<float> out({B, plan.num_out, C});
  switchyard::ScopedNumThreads scoped(threads);
  for (auto _ : state) {
    if (what != 2) plan = tk::bipartite_soft_matching<float>(in.metric, r, true, false, sizes);
    if (what != 1) plan.merge_wavg(in.x, out.view<3>());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * B * N);
  state.counters["tokens_out"] = double(plan.num_out);
}

// Proportional attention after one merge (ViT-B: 181 tokens, 12 heads of 64), against plain
// DenseAttention of the same shape: the cost of the per-batch log-size bias.
// which: 0 = tokens::proportional_attention, 1 = DenseAttention without a mask.
void BM_proportional(benchmark::State& state, int which, int threads, std::int64_t B,
                     std::int64_t N, std::int64_t H, std::int64_t D) {
  Tensor<float> q({B, N, H, D}), k({B, N, H, D}), v({B, N, H, D}), out({B, N, H, D});
  Tensor<float> size({B, N});
  std::mt19937 gen(4);
  std::normal_distribution<float> nd;
  for (auto* t : {&q, &k, &v})
    for (auto& x : *t) x = nd(gen);
  for (auto& z : size) z = float(1 + gen() % 3);
  const switchyard::attention::DenseAttention<float> attn;
  switchyard::ScopedNumThreads scoped(threads);
  for (auto _ : state) {
    if (which == 1) {
      attn.forward(q, k, v, out.view<4>());
    } else {
      tk::proportional_attention<float>(q, k, v, size, out);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * B * N);
}

}  // namespace

BENCHMARK_CAPTURE(BM_tome, match_merge_vit_b, 0, 0, 32, 197, 64, 768, 16)->UseRealTime();
BENCHMARK_CAPTURE(BM_tome, match_vit_b, 1, 0, 32, 197, 64, 768, 16)->UseRealTime();
BENCHMARK_CAPTURE(BM_tome, merge_vit_b, 2, 0, 32, 197, 64, 768, 16)->UseRealTime();
// Metric as wide as the features (C 768), for callers that match on x itself.
BENCHMARK_CAPTURE(BM_tome, match_merge_vit_b_metric768, 0, 0, 32, 197, 768, 768, 16)->UseRealTime();
BENCHMARK_CAPTURE(BM_tome, 1thread_match_merge_vit_b, 0, 1, 32, 197, 64, 768, 16);
BENCHMARK_CAPTURE(BM_tome, match_merge_tiny, 0, 0, 2, 17, 8, 16, 4)->UseRealTime();
BENCHMARK_CAPTURE(BM_proportional, proportional_vit_b, 0, 0, 32, 181, 12, 64)->UseRealTime();
BENCHMARK_CAPTURE(BM_proportional, plain_dense_attention_vit_b, 1, 0, 32, 181, 12, 64)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_proportional, 1thread_proportional_vit_b, 0, 1, 32, 181, 12, 64);
BENCHMARK_CAPTURE(BM_proportional, 1thread_plain_dense_attention_vit_b, 1, 1, 32, 181, 12, 64);
BENCHMARK_CAPTURE(BM_proportional, proportional_tiny, 0, 0, 2, 9, 2, 8)->UseRealTime();
