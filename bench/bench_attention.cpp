// Dense attention: naive reference vs fused kernel, B = 1, H = 8, D = 64, float.
//
// FLOP convention: 4 * T * S * D * H per forward (2 for Q.K^T, 2 for P.V) for
// non-causal; causal counts half of that, 2 * T * S * D * H (the visible
// triangle, ignoring the diagonal), so GFLOP/s compare the useful work.
// %peak divides by the measured single-thread fp32 FMA peak (bench/support/peak.hpp);
// for 2-thread rows it is still relative to ONE thread's peak. Single-thread rows
// are timed in CPU time (robust on a shared machine), multi-thread rows in wall time.
#include <benchmark/benchmark.h>

#include <random>
#include <switchyard/attention/dense.hpp>
#include <switchyard/attention/dense_ref.hpp>

#include "support/peak.hpp"

namespace {

using namespace switchyard;
using namespace switchyard::attention;

struct Inputs {
  core::Tensor<float> q, k, v, out;
  explicit Inputs(std::int64_t T)
      : q({1, T, 8, 64}), k({1, T, 8, 64}), v({1, T, 8, 64}), out({1, T, 8, 64}) {
    std::mt19937 rng(1);
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (auto* t : {&q, &k, &v})
      for (auto& x : *t) x = n(rng);
  }
};

void set_counters(benchmark::State& state, std::int64_t T, bool causal) {
  const double flops = 4.0 * double(T) * double(T) * 64 * 8 * (causal ? 0.5 : 1.0);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  const double per_second_peak = switchyard_bench::fp32_fma_peak_gflops();
  state.counters["%peak"] = benchmark::Counter(100.0 * flops * 1e-9 / per_second_peak,
                                               benchmark::Counter::kIsIterationInvariantRate);
  state.SetItemsProcessed(state.iterations() * T);  // tokens/s
}

// Args: T, causal, threads.
void BM_fused(benchmark::State& state) {
  const std::int64_t T = state.range(0);
  const bool causal = state.range(1) != 0;
  ScopedNumThreads threads(int(state.range(2)));
  Inputs in(T);
  const DenseAttention<float> attn;
  const Mask<float> mask = causal ? Mask<float>(CausalMask{}) : Mask<float>();
  for (auto _ : state) {
    attn.forward(in.q, in.k, in.v, in.out.view<4>(), mask);
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, causal);
}

void BM_reference(benchmark::State& state) {
  const std::int64_t T = state.range(0);
  const bool causal = state.range(1) != 0;
  Inputs in(T);
  const Mask<float> mask = causal ? Mask<float>(CausalMask{}) : Mask<float>();
  for (auto _ : state) {
    ref::dense_attention<float>(in.q, in.k, in.v, in.out.view<4>(), mask);
    benchmark::DoNotOptimize(in.out.data());
  }
  set_counters(state, T, causal);
}

}  // namespace

BENCHMARK(BM_reference)
    ->Name("reference")
    ->ArgNames({"T", "causal"})
    ->ArgsProduct({{512}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->Iterations(1);
BENCHMARK(BM_fused)
    ->Name("fused")
    ->ArgNames({"T", "causal", "threads"})
    ->ArgsProduct({{512, 1024, 4096}, {0, 1}, {1}})
    ->Unit(benchmark::kMillisecond);
// Several threads: wall-clock time (the benchmark thread's CPU time would miss the others).
BENCHMARK(BM_fused)
    ->Name("fused")
    ->ArgNames({"T", "causal", "threads"})
    ->ArgsProduct({{4096}, {0, 1}, {2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
