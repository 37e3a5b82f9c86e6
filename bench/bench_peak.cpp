// The machine's single-thread fp32 FMA peak (support/peak.hpp), as a benchmark so
// it is recorded next to the kernels that report "% of peak".
#include <benchmark/benchmark.h>

#include "support/peak.hpp"

namespace {

void BM_Fp32FmaPeak(benchmark::State& state) {
  double sum = 0.0;  // each probe times itself on this thread's CPU clock
  for (auto _ : state) {
    const double gflops = switchyard_bench::detail::fma_probe_gflops(1'000'000);
    benchmark::DoNotOptimize(gflops);
    sum += gflops;
  }
  state.counters["GFLOP/s"] = sum / double(state.iterations());
  state.counters["cached_peak_GFLOP/s"] = switchyard_bench::fp32_fma_peak_gflops();
  state.SetLabel(xsimd::default_arch::name());
}
BENCHMARK(BM_Fp32FmaPeak)->Unit(benchmark::kMillisecond);

}  // namespace
