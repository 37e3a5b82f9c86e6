// Routing Transformer k-means attention vs the fused dense kernel, and the plan
// executor on a plan covering every key vs the same dense kernel. B = 1, H = 8,
// D = 64, float, one thread (CPU time), shared QK, non-causal.
//
// routing/T:   RoutingAttention::forward (normalise, route with C = round(sqrt(T))
//              clusters of window w = T / C, gathered attention, scatter-mean).
// routing_nearest/T: the same with RoutingSelection::nearest_centroid (each token in
//              its nearest cluster, variable cluster sizes; cost grows with the
//              largest clusters, max_cluster counter = largest cluster / (T / C)).
// dense/T:     DenseAttention::forward on the same q (as keys) and v.
// plan_full/T: PlanExecutor on full_plan (every query sees every key).
// Counters: tokens/s (items_per_second) and x_dense = dense time / this time for the
// same T, dense being timed once per T inside this binary (CPU time, one run).
// x_dense is a rate counter, so Google Benchmark prints it with a "/s" suffix: read
// "x_dense=20.1/s" as "20.1 times faster than dense" (< 1: slower).
// T 32-16384 for dense, routing and routing_nearest (the short T hold the crossover with
// dense, plotted by scripts/make_charts.sh), 1024 and 4096 for plan_full.
// Filter '/1024$' selects one case.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <map>
#include <random>
#include <switchyard/attention/dense.hpp>
#include <switchyard/attention/plan_executor.hpp>
#include <switchyard/attention/routing_kmeans.hpp>

namespace {

using namespace switchyard;
using namespace switchyard::attention;

constexpr std::int64_t H = 8, D = 64;

struct Inputs {
  core::Tensor<float> q, v, out;
  explicit Inputs(std::int64_t T) : q({1, T, H, D}), v({1, T, H, D}), out({1, T, H, D}) {
    std::mt19937 rng(1);
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (auto* t : {&q, &v})
      for (auto& x : *t) x = n(rng);
  }
};

double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// One dense forward per T, timed once and cached (the x_dense reference).
double dense_seconds(std::int64_t T) {
  static std::map<std::int64_t, double> cache;
  if (auto it = cache.find(T); it != cache.end()) return it->second;
  ScopedNumThreads threads(1);
  Inputs in(T);
  const DenseAttention<float> attn;
  attn.forward(in.q, in.q, in.v, in.out.view<4>());  // warm-up
  const double t0 = cpu_seconds();
  attn.forward(in.q, in.q, in.v, in.out.view<4>());
  return cache[T] = cpu_seconds() - t0;
}

void set_counters(benchmark::State& state, std::int64_t T, bool ratio) {
  state.SetItemsProcessed(state.iterations() * T);  // tokens/s
  if (ratio) {
    state.counters["x_dense"] =
        benchmark::Counter(dense_seconds(T) * double(state.iterations()),
                           benchmark::Counter::kIsRate);  // dense s / this s
  }
}

void BM_dense(benchmark::State& state) {
  const std::int64_t T = state.range(0);
  ScopedNumThreads threads(1);
  Inputs in(T);
  const DenseAttention<float> attn;
  for (auto _ : state) {
    attn.forward(in.q, in.q, in.v, in.out.view<4>());
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, false);
}

void run_routing(benchmark::State& state, RoutingSelection selection) {
  const std::int64_t T = state.range(0);
  ScopedNumThreads threads(1);
  Inputs in(T);
  const std::int64_t C = default_num_clusters(T);
  const RoutingAttention<float> attn(
      {.num_clusters = C, .window_size = T / C, .selection = selection});
  const auto st = attn.init_state(in.q, {}, 1, 2);
  state.counters["clusters"] = double(C);
  if (selection == RoutingSelection::nearest_centroid) {
    const auto r = attn.route(in.q, {}, st);
    std::int64_t largest = 0;
    for (std::int64_t g = 0; g < r.plan.num_groups(); ++g)
      largest = std::max<std::int64_t>(largest, std::int64_t(r.plan.queries(g).size()));
    state.counters["max_cluster"] = double(largest) / double(T / C);
  }
  for (auto _ : state) {
    attn.forward(in.q, in.v, st, in.out.view<4>());
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, true);
}

void BM_routing(benchmark::State& state) { run_routing(state, RoutingSelection::top_window); }
void BM_routing_nearest(benchmark::State& state) {
  run_routing(state, RoutingSelection::nearest_centroid);
}

void BM_plan_full(benchmark::State& state) {
  const std::int64_t T = state.range(0);
  ScopedNumThreads threads(1);
  Inputs in(T);
  const auto plan = full_plan(1, H, T, T);
  const PlanExecutor<float> ex;
  for (auto _ : state) {
    ex.execute(plan, in.q, in.q, in.v, in.out.view<4>());
    benchmark::DoNotOptimize(in.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, true);
}

}  // namespace

BENCHMARK(BM_dense)->Name("dense")->RangeMultiplier(2)->Range(32, 4096)->Arg(16384)->Unit(
    benchmark::kMillisecond);
BENCHMARK(BM_routing)
    ->Name("routing")
    ->RangeMultiplier(2)
    ->Range(32, 4096)
    ->Arg(16384)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_routing_nearest)
    ->Name("routing_nearest")
    ->RangeMultiplier(2)
    ->Range(32, 4096)
    ->Arg(16384)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_plan_full)->Name("plan_full")->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);
