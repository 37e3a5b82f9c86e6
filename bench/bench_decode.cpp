// Decoding at memory bandwidth: split-KV DenseAttention::decode against today's
// DenseAttention::forward (T = 1, CausalMask{S - 1}) on the same caches, and the MoE layer's
// decode path against its prefill path on the same plans, with this machine's bandwidth
// measured in the same run (STREAM triad, all threads).
//
// DRAM, not cache: every timed step reads data that is not in the last-level cache. Attention
// rotates through independent KV caches (one per "layer") totalling more than 4x the L3 size the
// system reports; the MoE benchmarks rotate the routing over all experts of one weight set
// (1.4 GB Mixtral-like, 1.6 GB OLMoE-like, both > 4x a 300 MiB L3), so consecutive steps read
// different experts' weights (T = 1: disjoint expert groups, cycling through every expert).
//
// Counters: GB/s = bytes the step must read (K and V of every cached position; the active
// experts' w1, w3, w2) / wall time; bw_fraction = GB/s / triad_GB/s; tokens/s = new tokens per
// second. Threads: the switchyard default (all hardware threads). Wall time (UseRealTime).
// Names: BM_DecodeAttention/B/S/T_new (BM_DecodeAttentionBf16Cache: a KVCache<float, bf16>,
// whose steps read half the bytes), BM_MoEDecode/shape/T (shape 0 Mixtral-like: d 2048,
// F 7168, E 8, k 2; shape 1 OLMoE-like: d 2048, F 1024, E 64, k 8),
// BM_MoEDecodeWeightForm/shape/T/form (form 0 stacked float, 1 one float tensor per expert,
// 2 one bf16 tensor per expert: the layouts of Hugging Face checkpoints).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "switchyard/attention/dense.hpp"
#include "switchyard/attention/kv_cache.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/layer.hpp"
#include "switchyard/moe/plan.hpp"

namespace {

using namespace switchyard;

// L3 size from sysfs (the largest cache level of cpu0), 32 MiB if unknown.
std::int64_t l3_bytes() {
  std::int64_t best = 0;
  for (int i = 0; i < 8; ++i) {
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
    std::string s;
    if (!(f >> s) || s.empty()) continue;
    std::int64_t v = std::stoll(s);
    if (s.back() == 'K') v <<= 10;
    if (s.back() == 'M') v <<= 20;
    best = std::max(best, v);
  }
  return best > 0 ? best : std::int64_t(32) << 20;
}

// STREAM triad a = b + s * c over three arrays of 4x L3 bytes together (at least 256 MiB),
// split across all threads in fixed chunks; best of 5 passes, counting 3 arrays of traffic.
double triad_gbps() {
  static const double gbps = [] {
    const std::int64_t n = std::max<std::int64_t>(l3_bytes() * 4 / 3, 256ll << 20) / 4;
    std::vector<float> a(std::size_t(n), 0.0f), b(std::size_t(n), 1.0f), c(std::size_t(n), 2.0f);
    const std::int64_t chunk = 1 << 16;
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      parallel_for(num_chunks(n, chunk), [&](std::int64_t i) {
        const std::int64_t e = std::min(n, (i + 1) * chunk);
        for (std::int64_t j = i * chunk; j < e; ++j)
          a[std::size_t(j)] = b[std::size_t(j)] + 3.0f * c[std::size_t(j)];
      });
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, 3.0 * 4.0 * double(n) / s * 1e-9);
    }
    benchmark::DoNotOptimize(a.data());
    return best;
  }();
  return gbps;
}

void BM_Triad(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(triad_gbps());
  state.counters["triad_GB/s"] = triad_gbps();
  state.counters["L3_MiB"] = double(l3_bytes() >> 20);
  state.counters["threads"] = num_threads();
}

constexpr std::int64_t H = 32, Hkv = 8, D = 128;

// Independent caches of B sequences holding S positions each, more than 4x L3 in total; stored
// as Stored (float, or bf16: KVCache<float, bf16>).
template <class Stored = float>
std::vector<std::unique_ptr<attention::KVCache<float, Stored>>> make_caches(std::int64_t B,
                                                                            std::int64_t S) {
  const std::int64_t bytes = B * S * Hkv * D * std::int64_t(sizeof(Stored)) * 2;
  const std::int64_t n = std::max<std::int64_t>(1, (4 * l3_bytes() + bytes - 1) / bytes);
  std::vector<std::unique_ptr<attention::KVCache<float, Stored>>> caches;
  const std::int64_t block = std::min<std::int64_t>(S, 1024);
  Tensor<float> kv({B, block, Hkv, D});
  std::mt19937 gen(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& x : kv) x = nd(gen);
  for (std::int64_t i = 0; i < n; ++i) {
    caches.push_back(std::make_unique<attention::KVCache<float, Stored>>(B, Hkv, D, S));
    for (std::int64_t s = 0; s < S; s += block) {
      const std::int64_t m = std::min(block, S - s);
      caches.back()->append(kv.view<4>().slice(1, 0, m), kv.view<4>().slice(1, 0, m));
    }
  }
  return caches;
}

// Rates from the time of the timed calls themselves (wall clock, all threads).
void report(benchmark::State& state, double bytes_per_step, double tokens_per_step,
            double seconds) {
  const auto steps = double(state.iterations());
  const double gbps = bytes_per_step * steps / seconds * 1e-9;
  state.counters["GB/s"] = gbps;
  state.counters["bw_fraction"] = gbps / triad_gbps();
  state.counters["tokens/s"] = tokens_per_step * steps / seconds;
  state.counters["triad_GB/s"] = triad_gbps();
  state.counters["threads"] = num_threads();
}

template <class Stored>
void decode_attention(benchmark::State& state) {
  const std::int64_t B = state.range(0), S = state.range(1), Tn = state.range(2);
  triad_gbps();
  auto caches = make_caches<Stored>(B, S);
  Tensor<float> q({B, Tn, H, D}), out({B, Tn, H, D});
  std::mt19937 gen(2);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& x : q) x = nd(gen);
  const attention::DenseAttention<float> attn;
  std::size_t i = 0;
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    attn.decode(q.view<4>(), *caches[i++ % caches.size()], out.view<4>());
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const double bytes = double(B * S * Hkv * D) * double(sizeof(Stored)) * 2;
  report(state, bytes, double(B * Tn), seconds);
  state.counters["caches"] = double(caches.size());
}
void BM_DecodeAttention(benchmark::State& state) { decode_attention<float>(state); }
// The same steps on a bf16 cache: half the bytes per step, widened in the kernels.
void BM_DecodeAttentionBf16Cache(benchmark::State& state) { decode_attention<bf16>(state); }

// Today's prefill kernel as a decode step: forward over the cache's positions with T = 1 and
// CausalMask{S - 1} (it packs K and V on every call).
void BM_DenseForwardAsDecode(benchmark::State& state) {
  const std::int64_t B = state.range(0), S = state.range(1);
  triad_gbps();
  auto caches = make_caches(B, S);
  Tensor<float> q({B, 1, H, D}), out({B, 1, H, D});
  std::mt19937 gen(2);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& x : q) x = nd(gen);
  const attention::DenseAttention<float> attn;
  std::size_t i = 0;
  double seconds = 0;
  for (auto _ : state) {
    const auto& c = *caches[i++ % caches.size()];
    const auto t0 = std::chrono::steady_clock::now();
    attn.forward(q.view<4>(), c.keys_as_sequence(S), c.values_as_sequence(S), out.view<4>(),
                 attention::CausalMask{S - 1});
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const double bytes = double(B * S * Hkv * D) * 4 * 2;
  report(state, bytes, double(B), seconds);
}

struct MoEShape {
  std::int64_t d, F, E, k;
};
constexpr MoEShape moe_shapes[] = {{2048, 7168, 8, 2}, {2048, 1024, 64, 8}};

/// How the benchmark stores the expert weights: one stacked float tensor per projection, one
/// float tensor per expert and projection (as a Hugging Face checkpoint holds them), or the
/// same per expert in bf16 (widened while the layer packs them).
enum class WeightForm { stacked = 0, each = 1, each_bf16 = 2 };

struct MoESetup {
  std::vector<Tensor<float>> store;  // stacked [E, ...] tensors, or one tensor per expert
  std::vector<std::vector<bf16>> store16;
  Tensor<float> x, y;
  moe::MoELayerWeights<float> w;
  moe::MoELayerWeights<bf16> w16;
  std::vector<moe::DispatchPlan<float>> plans;  // cycled, step after step
  std::vector<double> bytes;                    // weight bytes each plan reads
};

// Cheap deterministic values (they do not matter for speed, only that pages are real).
float fill_value(std::int64_t i, float a) {
  return a * float((std::uint64_t(i) * 2654435761u) % 2001u) / 1000.0f - a;
}

// Plans for T tokens: at T = 1 the expert groups {g k, ..., g k + k - 1} in turn (every expert
// once per E / k steps); otherwise top-k of random logits, 16 different plans.
MoESetup make_moe(const MoEShape& sh, std::int64_t T, WeightForm form = WeightForm::stacked) {
  MoESetup m;
  const auto fill = [](float* p, std::int64_t n, float a) {
    for (std::int64_t i = 0; i < n; ++i) p[i] = fill_value(i, a);
  };
  if (form == WeightForm::stacked) {
    m.store.emplace_back(Tensor<float>({sh.E, sh.F, sh.d}));
    m.store.emplace_back(Tensor<float>({sh.E, sh.F, sh.d}));
    m.store.emplace_back(Tensor<float>({sh.E, sh.d, sh.F}));
    for (auto& t : m.store) fill(t.data(), t.numel(), 0.02f);
    m.w.experts.w1 = m.store[0];
    m.w.experts.w3 = m.store[1];
    m.w.experts.w2 = m.store[2];
  } else {
    m.store.reserve(std::size_t(3 * sh.E));
    m.store16.reserve(std::size_t(3 * sh.E));
    for (std::int64_t e = 0; e < sh.E; ++e)
      for (int j = 0; j < 3; ++j) {
        const std::int64_t rows = j < 2 ? sh.F : sh.d, cols = j < 2 ? sh.d : sh.F;
        auto& ew =
            j == 0 ? m.w.experts.w1_each : (j == 1 ? m.w.experts.w3_each : m.w.experts.w2_each);
        auto& ew16 = j == 0 ? m.w16.experts.w1_each
                            : (j == 1 ? m.w16.experts.w3_each : m.w16.experts.w2_each);
        if (form == WeightForm::each) {
          auto& t = m.store.emplace_back(Tensor<float>({rows, cols}));
          fill(t.data(), t.numel(), 0.02f);
          ew.push_back(t);
        } else {
          auto& v = m.store16.emplace_back(std::size_t(rows * cols));
          for (std::int64_t i = 0; i < rows * cols; ++i)
            v[std::size_t(i)] = bf16::from_float(fill_value(i, 0.02f));
          ew16.push_back(ConstView<bf16, 2>(v.data(), {rows, cols}));
        }
      }
  }
  const double elem_bytes = form == WeightForm::each_bf16 ? 2.0 : 4.0;
  m.x = Tensor<float>({T, sh.d});
  fill(m.x.data(), m.x.numel(), 1.0f);
  m.y = Tensor<float>({T, sh.d});
  std::mt19937 gen(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const std::int64_t n_plans = T == 1 ? sh.E / sh.k : 16;
  for (std::int64_t p = 0; p < n_plans; ++p) {
    Tensor<float> combine({T, sh.E});
    for (std::int64_t t = 0; t < T; ++t) {
      if (T == 1) {
        for (std::int64_t j = 0; j < sh.k; ++j) combine(t, p * sh.k + j) = 1.0f / float(sh.k);
        continue;
      }
      std::vector<std::pair<float, std::int64_t>> l;
      for (std::int64_t e = 0; e < sh.E; ++e) l.push_back({nd(gen), e});
      std::partial_sort(l.begin(), l.begin() + sh.k, l.end(), std::greater<>());
      for (std::int64_t j = 0; j < sh.k; ++j)
        combine(t, l[std::size_t(j)].second) = 1.0f / float(sh.k);
    }
    m.plans.push_back(moe::make_plan_from_combine_weights<float>(combine.view<2>()));
    std::int64_t active = 0;
    for (std::int64_t e = 0; e < sh.E; ++e) active += m.plans.back().expert_size(e) > 0;
    m.bytes.push_back(double(active) * 3.0 * double(sh.d * sh.F) * elem_bytes);
  }
  return m;
}

void run_moe(benchmark::State& state, std::int64_t decode_max_tokens,
             WeightForm form = WeightForm::stacked) {
  const MoEShape sh = moe_shapes[state.range(0)];
  const std::int64_t T = state.range(1);
  triad_gbps();
  MoESetup m = make_moe(sh, T, form);
  moe::MoELayer<float> layer(
      {.d_model = sh.d, .d_ff = sh.F, .num_experts = sh.E, .decode_max_tokens = decode_max_tokens});
  std::size_t max_ws = 0;
  for (const auto& p : m.plans) max_ws = std::max(max_ws, layer.workspace_bytes(p));
  std::vector<std::byte> ws(max_ws);
  std::size_t i = 0;
  double seconds = 0, bytes = 0;
  for (auto _ : state) {
    const std::size_t p = i++ % m.plans.size();
    const auto t0 = std::chrono::steady_clock::now();
    if (form == WeightForm::each_bf16)
      layer.execute(m.plans[p], m.x.view<2>(), m.w16, m.y.view<2>(), ws);
    else
      layer.execute(m.plans[p], m.x.view<2>(), m.w, m.y.view<2>(), ws);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    bytes += m.bytes[p];
  }
  const double per_step = bytes / double(std::max<std::int64_t>(1, state.iterations()));
  report(state, per_step, double(T), seconds);
}

void BM_MoEDecode(benchmark::State& state) { run_moe(state, 64); }
void BM_MoEPrefillPath(benchmark::State& state) { run_moe(state, 0); }
// The weight forms side by side: stacked float, one float view per expert, one bf16 view per
// expert (GB/s counts the bytes stored, so bf16 reads half as many per token).
void BM_MoEDecodeWeightForm(benchmark::State& state) {
  run_moe(state, 64, static_cast<WeightForm>(state.range(2)));
}

void attention_args(benchmark::internal::Benchmark* b) {
  for (std::int64_t Tn : {1, 4}) {
    b->Args({1, 4096, Tn})->Args({8, 4096, Tn})->Args({1, 32768, Tn})->Args({8, 32768, Tn});
    b->Args({1, 131072, Tn});
  }
}

}  // namespace

BENCHMARK(BM_Triad)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecodeAttention)
    ->Apply(attention_args)
    ->UseRealTime()
    ->MinTime(1.0)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecodeAttentionBf16Cache)
    ->Apply(attention_args)
    ->UseRealTime()
    ->MinTime(1.0)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DenseForwardAsDecode)
    ->Args({1, 4096})
    ->Args({1, 32768})
    ->Args({1, 131072})
    ->UseRealTime()
    ->MinTime(1.0)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MoEDecode)
    ->ArgsProduct({{0, 1}, {1, 4, 16}})
    ->UseRealTime()
    ->MinTime(1.0)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MoEDecodeWeightForm)
    ->ArgsProduct({{0, 1}, {1, 16}, {0, 1, 2}})
    ->UseRealTime()
    ->MinTime(1.0)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MoEPrefillPath)
    ->ArgsProduct({{0, 1}, {1, 4, 16}})
    ->UseRealTime()
    ->MinTime(1.0)
    ->Unit(benchmark::kMillisecond);
