// Router comparison, the headline microbenchmark: every MoE router turns the same
// logits [T, E] into a finished DispatchPlan (CSR runs, [T, K] views, statistics
// and losses), 1 thread, in tokens/s. T in {512, 4096, 16384}, E in {8, 64, 256},
// k in {1, 2, 8} where meaningful (k < E; GShard is top-2 only).
//
// null_experts (AdaMoE) routes over E real plus E/4 null experts (logits [T, 5E/4]);
// deepseek_v3 (E >= 64) is DeepSeek-V3's gate: sigmoid scores, a selection bias, 8 expert
// groups of which the best 4 are kept, renormalised weights times 2.5.
// Also in the same run, "naive_sort": what a straightforward implementation does
// (softmax, a full argsort of each row, then a stable sort of all (expert, token)
// pairs to group by expert), as the yardstick for "faster than an afternoon's code".
//
// Inputs: logits ~ N(0, 1), fixed seed. The ReLU router gets the same logits shifted
// down so that about k/E of them are positive (the sparsity its L1 controller aims
// for); expert choice gets capacity_factor = k, so it routes as many pairs as top-k.
// Names: route/<router>/T:<T>/E:<E>/k:<k> (scripts/bench_chart.py reads them).
// Smoke filter: --benchmark_filter='T:512/E:8/'
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "support/peak.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/rng.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/router.hpp"
#include "switchyard/moe/router_capacity.hpp"
#include "switchyard/moe/router_expert_choice.hpp"
#include "switchyard/moe/router_grouped_topk.hpp"
#include "switchyard/moe/router_gshard.hpp"
#include "switchyard/moe/router_hash.hpp"
#include "switchyard/moe/router_noisy_topk.hpp"
#include "switchyard/moe/router_null_experts.hpp"
#include "switchyard/moe/router_relu.hpp"
#include "switchyard/moe/router_top_p.hpp"
#include "switchyard/moe/router_topk.hpp"

#if SWITCHYARD_BENCH_HAVE_BLAS
#include <cblas.h>
extern "C" void openblas_set_num_threads(int);  // not in every cblas.h
#endif

namespace {
using switchyard::ConstView;
using switchyard::Tensor;
namespace moe = switchyard::moe;

/// Logits ~ N(0, 1) per (T, E), made once and shared by every router. Fetch them before
/// the timed loop: the first call for a shape generates them.
const Tensor<float>& logits_for(std::int64_t tokens, std::int64_t experts) {
  static std::map<std::pair<std::int64_t, std::int64_t>, Tensor<float>> cache;
  auto it = cache.find({tokens, experts});
  if (it == cache.end()) {
    Tensor<float> t({tokens, experts});
    switchyard::core::fill_normal<float>(t.view<2>(), /*seed=*/2026, /*stream=*/7);
    it = cache.emplace(std::make_pair(tokens, experts), std::move(t)).first;
  }
  return it->second;
}

/// The logits shifted so that about k/E of them are positive (ReLU routing's target).
Tensor<float> shifted_for_relu(const Tensor<float>& logits, std::int64_t experts, std::int64_t k) {
  std::vector<float> sorted(logits.begin(), logits.end());
  const auto q = static_cast<std::size_t>(static_cast<double>(sorted.size()) *
                                          (1.0 - static_cast<double>(k) / experts));
  std::nth_element(sorted.begin(), sorted.begin() + q, sorted.end());
  Tensor<float> out = logits;
  for (auto& v : out) v -= sorted[q];
  return out;
}

template <class Route>
void run(benchmark::State& state, std::int64_t tokens, Route&& route) {
  switchyard::ScopedNumThreads one(1);
  moe::DispatchPlan<float> plan;
  for (auto _ : state) {
    route(plan);
    benchmark::DoNotOptimize(plan.gate.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * tokens);
  state.counters["pairs/token"] =
      tokens ? static_cast<double>(plan.nnz()) / static_cast<double>(tokens) : 0.0;
}

/// The yardstick: full argsort per row, then a stable sort of (expert, token) pairs.
void naive_sort_route(ConstView<float, 2> logits, std::int64_t k, std::vector<float>& probs,
                      std::vector<std::int32_t>& order,
                      std::vector<std::pair<std::int32_t, std::int32_t>>& pairs,
                      moe::DispatchPlan<float>& plan) {
  const std::int64_t tokens = logits.extent(0), experts = logits.extent(1);
  plan.reset(tokens, experts, k);
  probs.resize(static_cast<std::size_t>(experts));
  order.resize(static_cast<std::size_t>(experts));
  pairs.clear();
  for (std::int64_t t = 0; t < tokens; ++t) {
    const float* x = logits.data() + t * experts;
    const float m = *std::max_element(x, x + experts);
    float sum = 0;
    for (std::int64_t e = 0; e < experts; ++e) sum += probs[e] = std::exp(x[e] - m);
    for (auto& p : probs) p /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](std::int32_t a, std::int32_t b) { return probs[a] > probs[b]; });
    for (std::int64_t s = 0; s < k; ++s) {
      plan.choice_expert[t * k + s] = order[s];
      plan.choice_weight[t * k + s] = probs[order[s]];
      pairs.emplace_back(order[s], static_cast<std::int32_t>(t * k + s));
    }
  }
  std::stable_sort(pairs.begin(), pairs.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  plan.token_index.resize(pairs.size());
  plan.slot.resize(pairs.size());
  plan.gate.resize(pairs.size());
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    const auto [e, ts] = pairs[i];
    ++plan.expert_offsets[e + 1];
    plan.token_index[i] = static_cast<std::int32_t>(ts / k);
    plan.slot[i] = static_cast<std::int32_t>(ts % k);
    plan.gate[i] = plan.choice_weight[ts];
  }
  for (std::int64_t e = 0; e < experts; ++e) plan.expert_offsets[e + 1] += plan.expert_offsets[e];
}

void register_shape(std::int64_t T, std::int64_t E, std::int64_t k) {
  const std::string shape =
      "/T:" + std::to_string(T) + "/E:" + std::to_string(E) + "/k:" + std::to_string(k);
  const auto add = [&](const std::string& router, auto fn) {
    benchmark::RegisterBenchmark(("route/" + router + shape).c_str(), fn)
        ->Unit(benchmark::kMicrosecond);
  };
  add("topk_mixtral", [=](benchmark::State& s) {
    const moe::TopKRouter<float> r({.num_experts = E, .top_k = k, .renormalize = true});
    const auto logits = logits_for(T, E).view<2>();
    run(s, T, [&](auto& plan) { r.route(logits, plan); });
  });
  add("topk_olmoe", [=](benchmark::State& s) {
    const moe::TopKRouter<float> r({.num_experts = E, .top_k = k, .renormalize = false});
    const auto logits = logits_for(T, E).view<2>();
    run(s, T, [&](auto& plan) { r.route(logits, plan); });
  });
  add(k == 1 ? "switch_capacity" : "megatron_capacity", [=](benchmark::State& s) {
    const moe::CapacityRouter<float> r({.num_experts = E, .top_k = k, .capacity_factor = 1.0});
    const auto logits = logits_for(T, E).view<2>();
    run(s, T, [&](auto& plan) { r.route(logits, plan); });
  });
  if (k == 2) {
    add("gshard_top2", [=](benchmark::State& s) {
      const moe::GShardTop2Router<float> r({.num_experts = E});
      const auto logits = logits_for(T, E).view<2>();
      run(s, T, [&](auto& plan) { r.route(logits, plan); });
    });
  }
  add("expert_choice", [=](benchmark::State& s) {
    const moe::ExpertChoiceRouter<float> r(
        {.num_experts = E, .capacity_factor = static_cast<double>(k)});
    const auto logits = logits_for(T, E).view<2>();
    run(s, T, [&](auto& plan) { r.route(logits, plan); });
  });
  add("relu", [=](benchmark::State& s) {
    const moe::ReluRouter<float> r({.num_experts = E, .topk_for_target = k});
    const Tensor<float> shifted = shifted_for_relu(logits_for(T, E), E, k);
    run(s, T, [&](auto& plan) { r.route(shifted.view<2>(), plan); });
  });
  add("noisy_topk_eval", [=](benchmark::State& s) {
    const moe::NoisyTopKRouter<float> r({.num_experts = E, .top_k = k});
    const auto logits = logits_for(T, E).view<2>();
    run(s, T, [&](auto& plan) { r.route(logits, plan); });
  });
  add("top_p", [=](benchmark::State& s) {
    const moe::TopPRouter<float> r({.num_experts = E, .threshold = 0.5, .max_experts = k});
    const auto logits = logits_for(T, E).view<2>();
    run(s, T, [&](auto& plan) { r.route(logits, plan); });
  });
  add("hash", [=](benchmark::State& s) {
    const moe::HashRouter<float> r({.num_experts = E, .top_k = k});
    std::vector<std::int64_t> ids(static_cast<std::size_t>(T));
    const switchyard::core::Rng rng(2026, 9);
    for (std::int64_t t = 0; t < T; ++t) ids[t] = static_cast<std::int64_t>(rng.uint64(t) % 50257);
    run(s, T, [&](auto& plan) { r.route(ids, plan); });
  });
  if (E >= 64) {  // DeepSeek-V3's gate: sigmoid, selection bias, 8 groups, top 4 groups
    add("deepseek_v3", [=](benchmark::State& s) {
      const moe::GroupedTopKRouter<float> r({.num_experts = E,
                                             .top_k = k,
                                             .n_group = 8,
                                             .topk_group = 4,
                                             .score_func = moe::ScoreFunc::sigmoid,
                                             .norm_topk_prob = true,
                                             .routed_scaling_factor = 2.5});
      std::vector<float> bias(static_cast<std::size_t>(E));
      const switchyard::core::Rng rng(2026, 11);
      for (std::int64_t e = 0; e < E; ++e) bias[e] = 0.01f * rng.normal<float>(e);
      const auto logits = logits_for(T, E).view<2>();
      run(s, T, [&](auto& plan) { r.route(logits, bias, plan); });
    });
  }
  add("null_experts", [=](benchmark::State& s) {  // AdaMoE: E real + E/4 null experts
    const std::int64_t N = std::max<std::int64_t>(1, E / 4);
    const moe::NullExpertRouter<float> r({.num_experts = E, .null_experts = N, .top_k = k});
    const auto logits = logits_for(T, E + N).view<2>();
    run(s, T, [&](auto& plan) { r.route(logits, plan); });
  });
  add("naive_sort", [=](benchmark::State& s) {
    std::vector<float> probs;
    std::vector<std::int32_t> order;
    std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
    const auto logits = logits_for(T, E).view<2>();
    run(s, T, [&](auto& plan) { naive_sort_route(logits, k, probs, order, pairs, plan); });
  });
}

#if SWITCHYARD_BENCH_HAVE_BLAS
/// What a PyTorch user's router runs (Hugging Face's Mixtral / OLMoE blocks), in C++: logits =
/// F.linear(x, W) (sgemm through OpenBLAS), softmax over experts, torch.topk (a partial sort
/// per row), renormalise, then per expert torch.where over the one-hot mask (a scan of every
/// token's choices) to list its tokens. Output: the same plan fields ours fills.
void pytorch_like_route(ConstView<float, 2> x, ConstView<float, 2> w, std::int64_t k,
                        std::vector<float>& logits, std::vector<std::int32_t>& order,
                        moe::DispatchPlan<float>& plan) {
  const std::int64_t tokens = x.extent(0), d = x.extent(1), experts = w.extent(0);
  logits.resize(std::size_t(tokens * experts));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(tokens), int(experts), int(d), 1.0f,
              x.data(), int(d), w.data(), int(d), 0.0f, logits.data(), int(experts));
  plan.reset(tokens, experts, k);
  order.resize(std::size_t(experts));
  for (std::int64_t t = 0; t < tokens; ++t) {
    float* p = logits.data() + t * experts;
    const float m = *std::max_element(p, p + experts);
    float sum = 0;
    for (std::int64_t e = 0; e < experts; ++e) sum += p[e] = std::exp(p[e] - m);
    for (std::int64_t e = 0; e < experts; ++e) p[e] /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](std::int32_t a, std::int32_t b) { return p[a] > p[b]; });
    float top = 0;
    for (std::int64_t s = 0; s < k; ++s) top += p[order[s]];
    for (std::int64_t s = 0; s < k; ++s) {
      plan.choice_expert[t * k + s] = order[s];
      plan.choice_weight[t * k + s] = p[order[s]] / top;
    }
  }
  plan.token_index.clear();
  plan.slot.clear();
  plan.gate.clear();
  for (std::int64_t e = 0; e < experts; ++e) {
    for (std::int64_t t = 0; t < tokens; ++t)
      for (std::int64_t s = 0; s < k; ++s)
        if (plan.choice_expert[t * k + s] == e) {
          plan.token_index.push_back(std::int32_t(t));
          plan.slot.push_back(std::int32_t(s));
          plan.gate.push_back(plan.choice_weight[t * k + s]);
        }
    plan.expert_offsets[e + 1] = std::int64_t(plan.token_index.size());
  }
}

/// Router including its logits GEMM: ours (moe::router_logits, then TopKRouter with Mixtral's
/// renormalisation) against pytorch_like_route, interleaved in one run on one thread, x [T, d
/// 2048] and an nn.Linear router weight [E, d]. Counters: tokens/s of each and speedup =
/// PyTorch-like time / ours. Names: route_with_logits/T/E/k (not route/..., which the chart
/// reads).
void register_route_with_logits(std::int64_t T, std::int64_t E, std::int64_t k) {
  const std::string name = "route_with_logits/T:" + std::to_string(T) + "/E:" + std::to_string(E) +
                           "/k:" + std::to_string(k);
  benchmark::RegisterBenchmark(
      name.c_str(),
      [=](benchmark::State& state) {
        switchyard::ScopedNumThreads one(1);
        openblas_set_num_threads(1);
        constexpr std::int64_t d = 2048;
        Tensor<float> x({T, d}), w({E, d});
        switchyard::core::fill_normal<float>(x.view<2>(), 2026, 21);
        switchyard::core::fill_normal<float>(w.view<2>(), {.mean = 0, .stddev = 0.02}, 2026, 22);
        const moe::TopKRouter<float> router({.num_experts = E, .top_k = k, .renormalize = true});
        Tensor<float> logits({T, E});
        moe::DispatchPlan<float> ours, ref;
        std::vector<float> ref_logits;
        std::vector<std::int32_t> order;
        double ours_s = 0, ref_s = 0;
        for (auto _ : state) {
          const double t0 = switchyard_bench::detail::thread_seconds();
          moe::router_logits<float>(x.view<2>(), w.view<2>(), logits.view<2>());
          router.route(logits.view<2>(), ours);
          benchmark::ClobberMemory();
          const double t1 = switchyard_bench::detail::thread_seconds();
          pytorch_like_route(x.view<2>(), w.view<2>(), k, ref_logits, order, ref);
          benchmark::ClobberMemory();
          const double t2 = switchyard_bench::detail::thread_seconds();
          state.SetIterationTime(t1 - t0);
          ours_s += t1 - t0;
          ref_s += t2 - t1;
        }
        // Both must route alike (ties aside, which random normal logits do not have).
        if (ours.expert_offsets != ref.expert_offsets || ours.token_index != ref.token_index)
          state.SkipWithError("ours and the PyTorch-like router disagree");
        const double n = double(state.iterations()) * double(T);
        state.counters["tokens/s"] = n / ours_s;
        state.counters["pytorch_like_tokens/s"] = n / ref_s;
        state.counters["speedup"] = ref_s / ours_s;
      })
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
}
#endif

const bool registered = [] {
#if SWITCHYARD_BENCH_HAVE_BLAS
  for (std::int64_t E : {8, 64, 256})
    for (std::int64_t k : {2, 8})
      if (k < E) register_route_with_logits(4096, E, k);
#endif
  for (std::int64_t T : {512, 4096, 16384}) {
    for (std::int64_t E : {8, 64, 256}) {
      for (std::int64_t k : {1, 2, 8}) {
        if (k < E) register_shape(T, E, k);
      }
    }
  }
  return true;
}();

}  // namespace
