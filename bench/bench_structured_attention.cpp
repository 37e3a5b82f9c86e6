// Structured sparse attention beside fused dense attention on the same tokens, 1 thread,
// B = 1, H = 8, D = 64, float (issue 13's shapes, plus tiny ones for CI's smoke run):
//   1D   T 16384: neighbourhood kernel 1023 (odd: NATTEN's rule), causal sliding window 1024 with
//        4 sinks, MoBA block 512 top-k 4 (causal);
//   2D   128 x 128 tokens kernel 13 x 13; 64 x 64 kernel 7 x 7 dilation 2;
//   3D   16 x 32 x 32 tokens kernel 3 x 7 x 7.
// GNA's yardstick: measured speedup over dense (t_dense / t_pattern) divided by the ideal
// speedup (dense pairs / computed pairs, from each layer's pairs()): fraction_of_ideal = 1 means
// the pattern computes its pairs exactly as fast as dense attention computes its own. Dense
// runs in this same process on the same q, k, v (causal dense beside the causal patterns),
// alternately with the pattern after its benchmark loop; each side's best run is compared.
// Counters: tokens/s (items), GFLOP/s of the computed pairs (4 D flops per pair per head),
// dense_tokens_per_s, speedup, ideal, fraction_of_ideal, and for MoBA routing_share (the
// share of its time spent selecting blocks, measured apart).
#include <benchmark/benchmark.h>

#include <array>
#include <chrono>
#include <random>
#include <switchyard/attention/dense.hpp>
#include <switchyard/attention/moba.hpp>
#include <switchyard/attention/neighborhood.hpp>
#include <switchyard/attention/sliding_window.hpp>

#include "support/peak.hpp"

namespace {

using namespace switchyard;
using namespace switchyard::attention;

constexpr std::int64_t H = 8, D = 64;

struct Inputs {
  core::Tensor<float> q, k, v, out;
  explicit Inputs(std::int64_t T)
      : q({1, T, H, D}), k({1, T, H, D}), v({1, T, H, D}), out({1, T, H, D}) {
    std::mt19937 rng(7);
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (auto* t : {&q, &k, &v})
      for (auto& x : *t) x = n(rng);
  }
};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Seconds of one fused dense forward over the inputs' tokens.
double dense_once(Inputs& in, bool causal) {
  static const DenseAttention<float> dense;
  const Mask<float> mask = causal ? Mask<float>(CausalMask{}) : Mask<float>();
  const double t0 = now();
  dense.forward(in.q, in.k, in.v, in.out.view<4>(), mask);
  benchmark::DoNotOptimize(in.out.data());
  return now() - t0;
}

// Runs `body` in the benchmark loop (1 thread, wall time), then dense attention and `body`
// alternately (at least twice each and for at least 1 s): this host's clock drifts over
// seconds, so each side's best run, taken over the same stretch of time, is compared. Reports
// the counters and returns the mean seconds per iteration of the benchmark loop.
template <class Body>
double run(benchmark::State& state, Inputs& in, bool causal, std::int64_t pairs_per_head,
           Body&& body) {
  ScopedNumThreads one(1);
  const std::int64_t T = in.q.shape()[1];
  double total = 0, t = 1e30;
  std::int64_t n = 0;
  const auto timed = [&] {
    const double t0 = now();
    body();
    return now() - t0;
  };
  for (auto _ : state) {
    const double dt = timed();
    total += dt;
    t = std::min(t, dt);
    ++n;
  }
  double dense = 1e30;
  const double start = now();
  for (int r = 0; r < 2 || now() - start < 1.0; ++r) {
    dense = std::min(dense, dense_once(in, causal));
    t = std::min(t, timed());
  }
  // Dense pairs: all T x T, or the causal triangle with its diagonal.
  const double dense_pairs = causal ? double(T) * double(T + 1) / 2 : double(T) * double(T);
  const double ideal = dense_pairs / double(pairs_per_head);
  const double speedup = dense / t;
  state.counters["GFLOP/s"] = 4.0 * double(pairs_per_head) * D * H / t * 1e-9;
  state.counters["dense_tokens_per_s"] = double(T) / dense;
  state.counters["speedup"] = speedup;
  state.counters["ideal"] = ideal;
  state.counters["fraction_of_ideal"] = speedup / ideal;
  state.counters["%peak"] = 100.0 * 4.0 * double(pairs_per_head) * D * H / t * 1e-9 /
                            switchyard_bench::fp32_fma_peak_gflops();
  state.SetItemsProcessed(state.iterations() * T);
  return total / double(std::max<std::int64_t>(n, 1));
}

// Args: extents..., kernel sizes..., dilation (all axes).
template <int Rank>
void BM_neighborhood(benchmark::State& state) {
  std::array<std::int64_t, Rank> ext{};
  NeighborhoodConfig<Rank> cfg;
  std::int64_t T = 1;
  for (int a = 0; a < Rank; ++a) {
    ext[a] = state.range(a);
    cfg.axes[a] = {.kernel_size = state.range(Rank + a), .dilation = state.range(2 * Rank)};
    T *= ext[a];
  }
  Inputs in(T);
  const NeighborhoodAttention<Rank, float> na(cfg);
  run(state, in, false, na.pairs(ext), [&] {
    na.forward(ext, in.q, in.k, in.v, in.out.view<4>());
    benchmark::DoNotOptimize(in.out.data());
  });
}

// Args: T, window, sinks.
void BM_sliding_window(benchmark::State& state) {
  const std::int64_t T = state.range(0);
  Inputs in(T);
  const SlidingWindowAttention<float> sw(
      {.window = state.range(1), .sinks = state.range(2), .causal = true});
  run(state, in, true, sw.pairs(1, T, T), [&] {
    sw.forward(in.q, in.k, in.v, in.out.view<4>());
    benchmark::DoNotOptimize(in.out.data());
  });
}

// Args: T, block size, top-k. Causal; routing included in the timed time.
void BM_moba(benchmark::State& state) {
  const std::int64_t T = state.range(0);
  Inputs in(T);
  const MobaAttention<float> moba(
      {.block_size = state.range(1), .top_k = state.range(2), .causal = true});
  MobaSelection sel;
  moba.route(in.q, in.k, sel);
  const std::int64_t pairs = moba.pairs(sel, T) / H;  // pairs() counts every head
  double route_time = 0;
  std::int64_t routes = 0;
  const double t = run(state, in, true, pairs, [&] {
    const double t0 = now();
    moba.route(in.q, in.k, sel);
    route_time += now() - t0;
    ++routes;
    moba.execute(sel, in.q, in.k, in.v, in.out.view<4>());
    benchmark::DoNotOptimize(in.out.data());
  });
  state.counters["routing_share"] = route_time / double(std::max<std::int64_t>(routes, 1)) / t;
}

}  // namespace

// The shapes.
BENCHMARK(BM_neighborhood<1>)
    ->Name("neighborhood_1d")
    ->ArgNames({"L", "kernel", "dilation"})
    ->Args({16384, 1023, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_sliding_window)
    ->Name("sliding_window_causal_sinks")
    ->ArgNames({"T", "window", "sinks"})
    ->Args({16384, 1024, 4})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_moba)
    ->Name("moba_causal")
    ->ArgNames({"T", "block", "top_k"})
    ->Args({16384, 512, 4})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_neighborhood<2>)
    ->Name("neighborhood_2d")
    ->ArgNames({"X", "Y", "kx", "ky", "dilation"})
    ->Args({128, 128, 13, 13, 1})
    ->Args({64, 64, 7, 7, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_neighborhood<3>)
    ->Name("neighborhood_3d")
    ->ArgNames({"X", "Y", "Z", "kx", "ky", "kz", "dilation"})
    ->Args({16, 32, 32, 3, 7, 7, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Tiny shapes for the CI smoke run (filter 'tiny').
BENCHMARK(BM_neighborhood<2>)
    ->Name("tiny_neighborhood_2d")
    ->ArgNames({"X", "Y", "kx", "ky", "dilation"})
    ->Args({24, 24, 7, 7, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_sliding_window)
    ->Name("tiny_sliding_window")
    ->ArgNames({"T", "window", "sinks"})
    ->Args({512, 64, 4})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_moba)
    ->Name("tiny_moba")
    ->ArgNames({"T", "block", "top_k"})
    ->Args({512, 64, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
