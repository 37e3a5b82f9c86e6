// The machine's single-thread peaks (support/peak.hpp), as benchmarks so they are recorded next
// to the kernels that report "% of peak": the fp32 FMA peak, and where the build and CPU have
// them, VDPBF16PS (AVX512-BF16) and AMX TDPBF16PS (bf16 pairs into float). Each probe runs
// independent accumulators on register / tile data, so it measures the instruction's
// throughput, not memory.
#include <benchmark/benchmark.h>

#include <cstdint>

#include "support/peak.hpp"
#include "switchyard/core/simd/amx.hpp"

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

#if defined(__AVX512BF16__)
// 12 chains of VDPBF16PS: 16 lanes x 2 products x 2 flops = 64 flops each.
void BM_Avx512Bf16Peak(benchmark::State& state) {
  __m512 acc[12];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3F803F80);  // (1, 1)
  const __m512bh y = (__m512bh)_mm512_set1_epi32(0x33803380);  // tiny: no overflow
  constexpr long iters = 1'000'000;
  double seconds = 0.0;
  for (auto _ : state) {
    const double t0 = switchyard_bench::detail::thread_seconds();
    for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 12
      for (auto& a : acc) a = _mm512_dpbf16_ps(a, x, y);
    }
    seconds += switchyard_bench::detail::thread_seconds() - t0;
    benchmark::DoNotOptimize(acc);
  }
  const double flops = 64.0 * 12 * double(iters) * double(state.iterations());
  state.counters["GFLOP/s"] = flops / seconds * 1e-9;
  state.counters["x_fp32_peak"] = flops / seconds * 1e-9 / switchyard_bench::fp32_fma_peak_gflops();
}
BENCHMARK(BM_Avx512Bf16Peak)->Unit(benchmark::kMillisecond);
#endif

#if SWITCHYARD_HAS_AMX
// Four independent TDPBF16PS on 16 x 32 bf16 tiles: 16 x 16 x 32 x 2 flops each.
void BM_AmxBf16Peak(benchmark::State& state) {
  if (!switchyard::simd::amx_usable()) {
    state.SkipWithError("the OS did not grant the AMX tile state");
    return;
  }
  switchyard::simd::AmxTileScope tiles;
  alignas(64) std::uint16_t ones[16 * 32];
  for (auto& v : ones) v = 0x3380;  // tiny bf16: sums stay finite
  _tile_loadd(4, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  constexpr long iters = 200'000;
  double seconds = 0.0;
  for (auto _ : state) {
    const double t0 = switchyard_bench::detail::thread_seconds();
    for (long i = 0; i < iters; ++i) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 4, 6);
      _tile_dpbf16ps(3, 4, 6);
    }
    seconds += switchyard_bench::detail::thread_seconds() - t0;
  }
  const double flops = 4.0 * 16 * 16 * 32 * 2 * double(iters) * double(state.iterations());
  state.counters["GFLOP/s"] = flops / seconds * 1e-9;
  state.counters["x_fp32_peak"] = flops / seconds * 1e-9 / switchyard_bench::fp32_fma_peak_gflops();
}
BENCHMARK(BM_AmxBf16Peak)->Unit(benchmark::kMillisecond);
#endif

}  // namespace
