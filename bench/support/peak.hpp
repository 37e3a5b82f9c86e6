#pragma once
// Single-thread fp32 FMA peak of this machine, measured (not looked up), so
// benchmarks can report "% of peak" next to their GFLOP/s.
#include <algorithm>
#include <cstddef>
#include <ctime>
#include <xsimd/xsimd.hpp>

namespace switchyard_bench {

namespace detail {
// CPU time of this thread, like Google Benchmark's default timer: on a shared
// machine, wall time would count the time other processes held the core.
inline double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Templated on Arch (NOTES §2.8): each TU gets the probe for its own flags.
template <class Arch = xsimd::default_arch>
double fma_probe_gflops(long iters) {
  using B = xsimd::batch<float, Arch>;
  constexpr int kChains = 12;  // > latency(4) x ports(2) so the FMA pipes stay full
  B acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = B(float(i) * 1e-3f);
  // a = a*x + y converges to y/(1-x): no overflow, no denormals. Without
  // -ffast-math the compiler must keep every FMA of the dependent chains.
  B x(0.9999f), y(1e-4f);
  const double t0 = thread_seconds();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = xsimd::fma(acc[i], x, y);
  }
  const double t1 = thread_seconds();
  B s = acc[0];
  for (int i = 1; i < kChains; ++i) s += acc[i];
  volatile float sink = s.get(0);
  (void)sink;
  const double sec = t1 - t0;
  const double flops = 2.0 * double(B::size) * kChains * double(iters);
  return flops / sec * 1e-9;
}
}  // namespace detail

/// Measured single-thread fp32 FMA throughput in GFLOP/s (2 flops per lane per
/// FMA) on xsimd::default_arch. Measured once (~0.1 s), then cached; the best
/// of several trials is kept because the machine is shared.
inline double fp32_fma_peak_gflops() {
  static const double peak = [] {
    double best = 0.0;
    for (int trial = 0; trial < 5; ++trial)
      best = std::max(best, detail::fma_probe_gflops(8'000'000));
    return best;
  }();
  return peak;
}

}  // namespace switchyard_bench
