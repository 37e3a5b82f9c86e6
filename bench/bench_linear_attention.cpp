// Linear attention against fused dense softmax attention, in one run: causal and
// non-causal, T in {32, 64, ..., 4096, 16384, 65536}, B 1, H 8, D = Dv = 64, 1 thread.
// The short T (milliseconds each) hold the crossover with dense, which
// scripts/make_charts.sh plots as the speed-up against T.
// Rate: tokens/s (items_per_second) from the benchmark thread's CPU time, which is
// the whole computation at 1 thread and is not inflated by other load on a shared
// machine. Names end in /T, so `--benchmark_filter='/4096$'` selects one case.
// Dense attention at T = 65536 is left out: one iteration of the quadratic kernel
// would take about a minute (16x the T = 16384 time).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>

#include "switchyard/attention/dense.hpp"
#include "switchyard/attention/linear.hpp"
#include "switchyard/core/parallel_for.hpp"

namespace {

using namespace switchyard;
constexpr std::int64_t kHeads = 8, kDim = 64;

struct Inputs {
  Tensor<float> q, k, v, out;
  explicit Inputs(std::int64_t t)
      : q({1, t, kHeads, kDim}),
        k({1, t, kHeads, kDim}),
        v({1, t, kHeads, kDim}),
        out({1, t, kHeads, kDim}) {
    std::mt19937 gen(42);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto* x : {&q, &k, &v})
      for (auto& e : *x) e = nd(gen);
  }
};

void BM_Linear(benchmark::State& state, bool causal) {
  const std::int64_t t = state.range(0);
  ScopedNumThreads one(1);
  Inputs in(t);
  const attention::LinearAttention<float> layer;
  for (auto _ : state) {
    if (causal)
      layer.forward_causal(in.q, in.k, in.v, in.out);
    else
      layer.forward(in.q, in.k, in.v, in.out);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * t);
}

void BM_Dense(benchmark::State& state, bool causal) {
  const std::int64_t t = state.range(0);
  ScopedNumThreads one(1);
  Inputs in(t);
  const attention::DenseAttention<float> layer;
  for (auto _ : state) {
    if (causal)
      layer.forward(in.q, in.k, in.v, in.out, attention::CausalMask{});
    else
      layer.forward(in.q, in.k, in.v, in.out, attention::NoMask{});
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * t);
}

}  // namespace

BENCHMARK_CAPTURE(BM_Linear, causal, true)
    ->RangeMultiplier(2)
    ->Range(32, 4096)
    ->Arg(16384)
    ->Arg(65536)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Dense, causal, true)
    ->RangeMultiplier(2)
    ->Range(32, 4096)
    ->Arg(16384)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Linear, noncausal, false)
    ->RangeMultiplier(2)
    ->Range(32, 4096)
    ->Arg(16384)
    ->Arg(65536)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Dense, noncausal, false)
    ->RangeMultiplier(2)
    ->Range(32, 4096)
    ->Arg(16384)
    ->Unit(benchmark::kMillisecond);
