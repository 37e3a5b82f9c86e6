// Token selection: what KV-cache eviction costs and saves during decoding.
//
// BM_DecodeEviction/policy/budget/every: one sequence decodes 4096 tokens (H 32, H_kv 8,
// D 128), each step appending its key and value, attending with DenseAttention::decode (with
// the key mass the policy needs) and, with a policy, evicting back to the budget every step
// (every = 1: the budget holds exactly, as the references do; each eviction moves the kept rows
// behind the evicted one) or once the cache holds budget + 64 (every = 64: the moves amortised
// over 64 steps, attention over up to 64 more positions). Counters: the mean
// step time over steps 1536-2047 and over the last 512 (step_us_mid, step_us_last; every budget
// is reached by then) and their ratio (flat: about 1 with eviction; full attention grows with
// the cache, about 2x between the two windows), the policy's own cost per
// step (plan + keep + side arrays, evict_us), and tokens/s over the whole run. policy 0 = none
// (full attention, the cache grows to 4096), 1 = StreamingLLM (4 sinks), 2 = H2O (half heavy,
// half recent), 3 = TOVA. Wall time, all threads; the caches fit in L2/L3, so this measures
// compute and policy overhead, not DRAM (bench_decode does that).
//
// BM_Matching/method: routing (the plan) plus the size-weighted merge at the ViT-B shape
// (B 32, N 197, metric 64 channels, x 768, r 16, class token), tokens/s: 0 = ToMe bipartite
// soft matching, 1 = PiToMe (energy over the full T x T similarities, 2r candidates),
// 2 = PiToMe bsm (all tokens split by energy).
//
// BM_SpAttenLayer/part: one ViT-B attention layer (B 8, N 197, 12 heads of 64, non-causal) and
// SpAtten's pruning around it, keep_ratio 0.7: 0 = attention alone; 1 = attention with the
// per-key mass plus accumulate + route + advance + gathering the next layer's input
// [B, N, 768] (the pruning overhead is 1 minus 0); 2 = the next layer's attention over the 138
// kept tokens (what pruning saves is 0 minus 2).
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <vector>

#include "switchyard/attention/dense.hpp"
#include "switchyard/attention/kv_cache.hpp"
#include "switchyard/attention/kv_eviction.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/rng.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/tokens/merge_bipartite.hpp"
#include "switchyard/tokens/merge_energy.hpp"
#include "switchyard/tokens/merge_plan.hpp"
#include "switchyard/tokens/prune_cascade.hpp"

namespace {

using namespace switchyard;
using Clock = std::chrono::steady_clock;

void BM_DecodeEviction(benchmark::State& state) {
  const int policy = int(state.range(0));
  const std::int64_t budget = state.range(1), every = state.range(2);
  const std::int64_t steps = 4096, H = 32, Hkv = 8, D = 128;
  // Inputs of every step, drawn once.
  Tensor<float> q({steps, 1, 1, H * D}), kv({steps, 1, 1, Hkv * D});
  core::fill_normal(q, 1);
  core::fill_normal(kv, 2);
  const attention::DenseAttention<float> attn;
  const attention::StreamingLLMPolicy streaming({.sinks = 4, .recent = budget - 4});
  const attention::H2OPolicy h2o({.heavy = budget / 2, .recent = budget - budget / 2});
  const attention::TOVAPolicy tova({.budget = budget});
  double mid = 0, last = 0, evict = 0, total = 0;
  for (auto _ : state) {
    attention::KVCache<float> cache(1, Hkv, D, policy == 0 ? steps : budget + every);
    attention::H2OState<float> h2o_state(cache);
    Tensor<float> mass({1, Hkv, cache.capacity()}), out({1, 1, H, D});
    mid = last = evict = 0;
    const auto run_start = Clock::now();
    for (std::int64_t t = 0; t < steps; ++t) {
      const auto t0 = Clock::now();
      const ConstView<float, 4> k_t(kv.data() + t * Hkv * D, {1, 1, Hkv, D});
      cache.append(k_t, k_t);
      attention::DecodeOptions<float> opts;
      if (policy == 2) {
        opts.key_mass = h2o_state.scores();
        opts.accumulate_key_mass = true;
      } else if (policy == 3) {
        opts.key_mass = mass.view<3>();
      }
      attn.decode(ConstView<float, 4>(q.data() + t * H * D, {1, 1, H, D}), cache, out.view<4>(),
                  opts);
      const auto t1 = Clock::now();
      if (cache.length(0) >= budget + every) {
        if (policy == 1) streaming.evict(cache);
        if (policy == 2) h2o.evict(cache, h2o_state);
        if (policy == 3) tova.evict(cache, mass.view<3>());
      }
      const auto t2 = Clock::now();
      const double step = std::chrono::duration<double>(t2 - t0).count();
      evict += std::chrono::duration<double>(t2 - t1).count();
      if (t >= 1536 && t < 2048) mid += step;
      if (t >= steps - 512) last += step;
    }
    total = std::chrono::duration<double>(Clock::now() - run_start).count();
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["step_us_mid"] = mid / 512 * 1e6;
  state.counters["step_us_last"] = last / 512 * 1e6;
  state.counters["last/mid"] = last / mid;
  state.counters["evict_us"] = evict / double(steps) * 1e6;
  state.counters["tokens/s"] = double(steps) / total;
  state.counters["threads"] = num_threads();
}

void BM_Matching(benchmark::State& state) {
  const int method = int(state.range(0));
  const std::int64_t B = 32, N = 197, Cm = 64, C = 768, r = 16;
  Tensor<float> metric({B, N, Cm}), x({B, N, C}), size({B, N});
  core::fill_normal(metric, 3);
  core::fill_normal(x, 4);
  for (auto& v : size) v = 1.0f;
  const tokens::EnergyMatchingConfig cfg{
      .r = r, .margin = 0.5, .class_token = true, .bsm = method == 2};
  const auto match = [&] {
    return method == 0
               ? tokens::bipartite_soft_matching<float>(metric, r, true, false, size.view<2>())
               : tokens::energy_matching<float>(metric, cfg, size.view<2>());
  };
  auto plan = match();
  Tensor<float> out({B, plan.num_out, C});
  for (auto _ : state) {
    plan = match();
    plan.merge_wavg(x, out.view<3>());
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(double(state.iterations() * B * N), benchmark::Counter::kIsRate);
  state.counters["threads"] = num_threads();
}

void BM_SpAttenLayer(benchmark::State& state) {
  const int part = int(state.range(0));
  const std::int64_t B = 8, N = 197, H = 12, D = 64, C = H * D;
  const tokens::CascadeTokenPruner<float> pruner({.keep_ratio = 0.7, .class_token = true});
  const std::int64_t n = part == 2 ? pruner.keep_count(N) : N;
  Tensor<float> q({B, n, H, D}), k({B, n, H, D}), v({B, n, H, D}), out({B, n, H, D});
  Tensor<float> x({B, N, C}), mass({B, H, N});
  core::fill_normal(q, 5);
  core::fill_normal(k, 6);
  core::fill_normal(v, 7);
  core::fill_normal(x, 8);
  const attention::DenseAttention<float> attn;
  for (auto _ : state) {
    if (part != 1) {
      attn.forward(q, k, v, out.view<4>());
      continue;
    }
    attention::ForwardOptions<float> opts;
    opts.key_mass = mass.view<3>();
    attn.forward(q, k, v, out.view<4>(), {}, opts);
    auto importance = tokens::TokenImportance<float>::start(B, N);
    const auto plan = pruner.prune(importance, mass.view<3>());
    const Tensor<float> next = plan.gather(x);
    benchmark::DoNotOptimize(next.data());
  }
  state.counters["tokens"] = double(n);
  state.counters["threads"] = num_threads();
}

}  // namespace

BENCHMARK(BM_SpAttenLayer)->DenseRange(0, 2)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Matching)->DenseRange(0, 2)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecodeEviction)
    ->Args({0, 4096, 1})
    ->ArgsProduct({{1, 2, 3}, {256, 512, 1024}, {1, 64}})
    ->Iterations(1)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
