// MoELayer on one thread against dense GEMMs doing the same active work, in one run.
// Shapes: Mixtral-like (d 1024, d_ff 2816, E 8, k 2; T 512 and 4096) and OLMoE-like
// (d 1024, d_ff 512, E 64, k 8; T 4096), SwiGLU experts, plans from a top-k over random
// logits (fixed seed; softmax over the k chosen logits).
// Each iteration runs the layer (gather, three expert GEMMs, activation, slot-order combine),
// then the dense reference: core::gemm on contiguous [nnz, d] x [d, F] twice and
// [nnz, F] x [F, d], then the layer on weights packed once (MoELayer::pack_weights). All are
// timed by this thread's CPU time, interleaved, so the ratios are taken under the same machine
// load. Counters: GFLOP/s of the layer (active flops 2 * nnz * d * F * 3), dense_GFLOP/s,
// ratio = layer / dense, packed_GFLOP/s and packed_ratio = packed layer / dense. The iteration
// time is the layer's. Names end in /T/E/K/F.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "support/peak.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/gemm_bf16.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/layer.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router.hpp"
#include "switchyard/moe/router_topk.hpp"
#include "switchyard/moe/soft_moe.hpp"

#if SWITCHYARD_BENCH_HAVE_BLAS
#include <cblas.h>
extern "C" void openblas_set_num_threads(int);  // not in every cblas.h
extern "C" char* openblas_get_corename(void);
#endif

namespace {

using namespace switchyard;

Tensor<float> uniform(std::initializer_list<std::int64_t> shape, std::uint32_t seed, float a) {
  Tensor<float> t(shape);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-a, a);
  for (auto& v : t) v = u(gen);
  return t;
}

/// Top-k of random N(0, 1) logits per token (ties toward the lower expert), weights = softmax
/// over the k chosen logits.
moe::DispatchPlan<float> random_topk_plan(std::int64_t tokens, std::int64_t experts, std::int64_t k,
                                          std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Tensor<std::int32_t> idx({tokens, k});
  Tensor<float> wts({tokens, k});
  std::vector<float> logits(static_cast<std::size_t>(experts));
  std::vector<std::int32_t> order(static_cast<std::size_t>(experts));
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (auto& l : logits) l = nd(gen);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    float z = 0;
    for (std::int64_t s = 0; s < k; ++s) z += std::exp(logits[order[s]] - logits[order[0]]);
    for (std::int64_t s = 0; s < k; ++s) {
      idx(t, s) = order[s];
      wts(t, s) = std::exp(logits[order[s]] - logits[order[0]]) / z;
    }
  }
  return moe::make_token_choice_plan<float, std::int32_t>(experts, idx, wts);
}

/// One benchmark shape: a top-k plan over random logits, x [T, d] and SwiGLU expert weights
/// (uniform, scaled by 1/sqrt(fan-in)), fixed seeds, and the layer's float weight views.
struct MoECase {
  std::int64_t tokens, experts, f, d;
  moe::DispatchPlan<float> plan;
  Tensor<float> x, w1, w3, w2;
  moe::MoELayerWeights<float> weights;
  MoECase(std::int64_t tokens_, std::int64_t experts_, std::int64_t k, std::int64_t f_,
          std::int64_t d_)
      : tokens(tokens_),
        experts(experts_),
        f(f_),
        d(d_),
        plan(random_topk_plan(tokens_, experts_, k, 42)),
        x(uniform({tokens_, d_}, 1, 1.0f)),
        w1(uniform({experts_, f_, d_}, 2, 1.0f / std::sqrt(float(d_)))),
        w3(uniform({experts_, f_, d_}, 3, 1.0f / std::sqrt(float(d_)))),
        w2(uniform({experts_, d_, f_}, 4, 1.0f / std::sqrt(float(f_)))) {
    weights.experts.w1 = w1;
    weights.experts.w3 = w3;
    weights.experts.w2 = w2;
  }
};

/// The MoE shapes, /T/E/K/F: Mixtral-like (short batch and long), OLMoE-like.
void moe_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "K", "F"})
      ->Args({512, 8, 2, 2816})
      ->Args({4096, 8, 2, 2816})
      ->Args({4096, 64, 8, 512})
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

void BM_MoELayerVsDense(benchmark::State& state) {
  const std::int64_t tokens = state.range(0), experts = state.range(1), k = state.range(2);
  const std::int64_t f = state.range(3), d = 1024;
  ScopedNumThreads one(1);

  const MoECase mc(tokens, experts, k, f, d);
  const auto& plan = mc.plan;
  const auto& x = mc.x;
  const auto& w = mc.weights;
  const std::int64_t nnz = plan.nnz();
  const float s1 = 1.0f / std::sqrt(float(d)), s2 = 1.0f / std::sqrt(float(f));
  moe::MoELayer<float> layer({.d_model = d, .d_ff = f, .num_experts = experts});
  Tensor<float> y({tokens, d});
  std::vector<std::byte> ws(layer.workspace_bytes(plan));

  // Dense GEMMs with the same active work: [nnz, d] x [d, F] (twice), [nnz, F] x [F, d].
  const Tensor<float> a = uniform({nnz, d}, 5, 1.0f);
  const Tensor<float> bu = uniform({d, f}, 6, s1), bg = uniform({d, f}, 7, s1);
  const Tensor<float> bd = uniform({f, d}, 8, s2);
  Tensor<float> hg({nnz, f}), hu({nnz, f}), out({nnz, d});
  std::vector<std::byte> gws(std::max(core::gemm_workspace_bytes<float>(nnz, f, d),
                                      core::gemm_workspace_bytes<float>(nnz, d, f)));

  // The layer again on weights packed once (pack_weights, outside the timing).
  const moe::MoEPackedWeights<float> packed = layer.pack_weights(w);

  double moe_s = 0, dense_s = 0, packed_s = 0;
  for (auto _ : state) {
    const double t0 = switchyard_bench::detail::thread_seconds();
    layer.execute(plan, x, w, y.view<2>(), ws);
    benchmark::ClobberMemory();
    const double t1 = switchyard_bench::detail::thread_seconds();
    core::gemm<float>(a, core::Trans::no, bg, core::Trans::no, hg, 1.0f, 0.0f, gws);
    core::gemm<float>(a, core::Trans::no, bu, core::Trans::no, hu, 1.0f, 0.0f, gws);
    core::gemm<float>(hg, core::Trans::no, bd, core::Trans::no, out, 1.0f, 0.0f, gws);
    benchmark::ClobberMemory();
    const double t2 = switchyard_bench::detail::thread_seconds();
    layer.execute(plan, x, w, packed, y.view<2>(), ws);
    benchmark::ClobberMemory();
    const double t3 = switchyard_bench::detail::thread_seconds();
    state.SetIterationTime(t1 - t0);
    moe_s += t1 - t0;
    dense_s += t2 - t1;
    packed_s += t3 - t2;
  }
  const double gflop = 2.0 * double(nnz) * double(d) * double(f) * 3.0 * 1e-9;
  const double n = double(state.iterations());
  state.counters["GFLOP/s"] = gflop * n / moe_s;
  state.counters["dense_GFLOP/s"] = gflop * n / dense_s;
  state.counters["ratio"] = dense_s / moe_s;
  state.counters["%peak"] = 100.0 * gflop * n / moe_s / switchyard_bench::fp32_fma_peak_gflops();
  state.counters["packed_GFLOP/s"] = gflop * n / packed_s;
  state.counters["packed_ratio"] = dense_s / packed_s;
}

BENCHMARK(BM_MoELayerVsDense)->Apply(moe_shapes);

#if SWITCHYARD_BENCH_HAVE_BLAS
// MoELayer against the loop a PyTorch user writes (Hugging Face's Mixtral / OLMoE blocks): per
// expert, gather its tokens' rows of x, three GEMMs through OpenBLAS (cblas_sgemm, 1 thread,
// nn.Linear weights transposed), SiLU(g) * u, and scatter-add gate * out into y. Same plan,
// weights and x, one thread, interleaved in one run, with the layer on packed weights
// (pack_weights) third. Counters: GFLOP/s of each, speedup = reference time / layer time,
// packed_speedup = reference time / packed layer time. OpenBLAS 0.3.21 needs OPENBLAS_CORETYPE on
// CPUs it does not know (the label names the kernels it ran). Names end in /T/E/K/F.
void BM_MoELayerVsReferenceLoop(benchmark::State& state) {
  const std::int64_t tokens = state.range(0), experts = state.range(1), k = state.range(2);
  const std::int64_t f = state.range(3), d = 1024;
  ScopedNumThreads one(1);
  openblas_set_num_threads(1);
  const MoECase mc(tokens, experts, k, f, d);
  const auto& plan = mc.plan;
  const auto& x = mc.x;
  const auto& w = mc.weights;
  const auto &w1 = mc.w1, &w3 = mc.w3, &w2 = mc.w2;
  moe::MoELayer<float> layer({.d_model = d, .d_ff = f, .num_experts = experts});
  Tensor<float> y({tokens, d}), y_ref({tokens, d});
  std::vector<std::byte> ws(layer.workspace_bytes(plan));
  // The reference loop's buffers, sized for the largest expert.
  std::int64_t most = 1;
  for (std::int64_t e = 0; e < experts; ++e) most = std::max(most, plan.expert_size(e));
  std::vector<float> xe(std::size_t(most * d)), g(std::size_t(most * f)), u(std::size_t(most * f));
  std::vector<float> oe(std::size_t(most * d));
  const auto reference_loop = [&] {
    std::fill(y_ref.begin(), y_ref.end(), 0.0f);
    for (std::int64_t e = 0; e < experts; ++e) {
      const std::int64_t n = plan.expert_size(e), off = plan.expert_offsets[std::size_t(e)];
      if (n == 0) continue;
      for (std::int64_t i = 0; i < n; ++i)  // x[idx]
        std::copy_n(x.data() + plan.token_index[std::size_t(off + i)] * d, d, xe.data() + i * d);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(f), int(d), 1.0f, xe.data(),
                  int(d), w1.data() + e * f * d, int(d), 0.0f, g.data(), int(f));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(f), int(d), 1.0f, xe.data(),
                  int(d), w3.data() + e * f * d, int(d), 0.0f, u.data(), int(f));
      for (std::int64_t i = 0; i < n * f; ++i) {
        const float a = g[std::size_t(i)];
        g[std::size_t(i)] = a / (1.0f + std::exp(-a)) * u[std::size_t(i)];
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), int(d), int(f), 1.0f, g.data(),
                  int(f), w2.data() + e * d * f, int(f), 0.0f, oe.data(), int(d));
      for (std::int64_t i = 0; i < n; ++i) {  // y.index_add_(0, idx, gate * out)
        float* yr = y_ref.data() + plan.token_index[std::size_t(off + i)] * d;
        const float gate = plan.gate[std::size_t(off + i)];
        for (std::int64_t j = 0; j < d; ++j) yr[j] += gate * oe[std::size_t(i * d + j)];
      }
    }
  };
  const moe::MoEPackedWeights<float> packed = layer.pack_weights(w);
  Tensor<float> y_packed({tokens, d});
  double layer_s = 0, ref_s = 0, packed_s = 0;
  for (auto _ : state) {
    const double t0 = switchyard_bench::detail::thread_seconds();
    layer.execute(plan, x, w, y.view<2>(), ws);
    benchmark::ClobberMemory();
    const double t1 = switchyard_bench::detail::thread_seconds();
    reference_loop();
    benchmark::ClobberMemory();
    const double t2 = switchyard_bench::detail::thread_seconds();
    layer.execute(plan, x, w, packed, y_packed.view<2>(), ws);
    benchmark::ClobberMemory();
    const double t3 = switchyard_bench::detail::thread_seconds();
    state.SetIterationTime(t1 - t0);
    layer_s += t1 - t0;
    ref_s += t2 - t1;
    packed_s += t3 - t2;
  }
  // The two must agree (a benchmark of a wrong loop would prove nothing).
  double err = 0, scale = 0;
  for (std::int64_t i = 0; i < y.numel(); ++i) {
    err = std::max(err, double(std::abs(y.data()[i] - y_ref.data()[i])));
    scale = std::max(scale, double(std::abs(y_ref.data()[i])));
  }
  if (!(err <= 1e-4 * scale)) state.SkipWithError("the layer and the reference loop disagree");
  if (!std::equal(y.begin(), y.end(), y_packed.begin()))
    state.SkipWithError("the layer with and without packed weights disagree");
  const double gflop = 2.0 * double(plan.nnz()) * double(d) * double(f) * 3.0 * 1e-9;
  const double n = double(state.iterations());
  state.counters["GFLOP/s"] = gflop * n / layer_s;
  state.counters["reference_GFLOP/s"] = gflop * n / ref_s;
  state.counters["speedup"] = ref_s / layer_s;
  state.counters["packed_speedup"] = ref_s / packed_s;
  state.SetLabel(std::string("core=") + openblas_get_corename());
}

BENCHMARK(BM_MoELayerVsReferenceLoop)->Apply(moe_shapes);
#endif

// bf16 experts (the same random weights rounded) on one thread, interleaved in one run: the
// float layer on float weights, the float layer on bf16 weights (widened while packing), and
// the layer with bf16_compute (bf16 operands through gemm_bf16_packed: AMX or AVX512-BF16).
// Counters: GFLOP/s of each (active flops 2 * nnz * d * F * 3), speedup = float weights' time /
// bf16_compute's time, %peak_fp32 of bf16_compute. Skipped where no bf16 tile path exists.
// Names end in /T/E/K/F.
void BM_MoELayerBf16(benchmark::State& state) {
  const std::int64_t tokens = state.range(0), experts = state.range(1), k = state.range(2);
  const std::int64_t f = state.range(3), d = 1024;
  if (core::bf16_best_path() == core::Bf16Path::widen) {
    state.SkipWithError("no bf16 tile path (AMX or AVX512-BF16) in this build and CPU");
    return;
  }
  ScopedNumThreads one(1);
  const MoECase mc(tokens, experts, k, f, d);
  const auto& plan = mc.plan;
  const auto& x = mc.x;
  const auto& wf = mc.weights;
  const auto &w1 = mc.w1, &w3 = mc.w3, &w2 = mc.w2;
  const auto to_bf16 = [](const Tensor<float>& t) {
    std::vector<bf16> v(std::size_t(t.numel()));
    for (std::int64_t i = 0; i < t.numel(); ++i) v[std::size_t(i)] = bf16::from_float(t.data()[i]);
    return v;
  };
  const std::vector<bf16> w1b = to_bf16(w1), w3b = to_bf16(w3), w2b = to_bf16(w2);
  moe::MoELayerWeights<bf16> wb;
  wb.experts.w1 = ConstView<bf16, 3>(w1b.data(), {experts, f, d});
  wb.experts.w3 = ConstView<bf16, 3>(w3b.data(), {experts, f, d});
  wb.experts.w2 = ConstView<bf16, 3>(w2b.data(), {experts, d, f});
  const moe::MoELayer<float> layer({.d_model = d, .d_ff = f, .num_experts = experts});
  const moe::MoELayer<float> layer16(
      {.d_model = d, .d_ff = f, .num_experts = experts, .bf16_compute = true});
  Tensor<float> y({tokens, d});
  std::vector<std::byte> ws(layer.workspace_bytes(plan));
  double float_s = 0, widen_s = 0, bf16_s = 0;
  for (auto _ : state) {
    const double t0 = switchyard_bench::detail::thread_seconds();
    layer.execute(plan, x, wf, y.view<2>(), ws);
    benchmark::ClobberMemory();
    const double t1 = switchyard_bench::detail::thread_seconds();
    layer.execute(plan, x, wb, y.view<2>(), ws);
    benchmark::ClobberMemory();
    const double t2 = switchyard_bench::detail::thread_seconds();
    layer16.execute(plan, x, wb, y.view<2>(), ws);
    benchmark::ClobberMemory();
    const double t3 = switchyard_bench::detail::thread_seconds();
    state.SetIterationTime(t3 - t2);
    float_s += t1 - t0;
    widen_s += t2 - t1;
    bf16_s += t3 - t2;
  }
  const double gflop = 2.0 * double(plan.nnz()) * double(d) * double(f) * 3.0 * 1e-9;
  const double n = double(state.iterations());
  state.counters["float_GFLOP/s"] = gflop * n / float_s;
  state.counters["bf16_weights_float_GFLOP/s"] = gflop * n / widen_s;
  state.counters["bf16_compute_GFLOP/s"] = gflop * n / bf16_s;
  state.counters["speedup"] = float_s / bf16_s;
  state.counters["%peak_fp32"] =
      100.0 * gflop * n / bf16_s / switchyard_bench::fp32_fma_peak_gflops();
  state.SetLabel(core::bf16_path_name(core::bf16_best_path()));
}

BENCHMARK(BM_MoELayerBf16)->Apply(moe_shapes);

// Soft MoE (moe/soft_moe.hpp) beside the sparse top-2 MoE layer at equal expert FLOPs, one
// thread, in one run. Sparse: router logits GEMM [T, d] x [d, E], TopKRouter top-2, then
// MoELayer::execute on its 2T (token, expert) rows. Soft: one item of m = T tokens with
// E * S = 2T slots, so its experts also run 2T rows; on top it runs three routing GEMMs of
// 2 T (2T) d flops each (SoftMoELayer::flops). Same experts (SwiGLU, d 1024), interleaved and
// timed by this thread's CPU time; the iteration time is Soft MoE's. Counters: tokens/s and
// GFLOP/s of each (every multiply-add each runs: routing + experts), expert_GFLOP (equal for
// both), and ratio = soft tokens/s / sparse tokens/s. Names end in /T/E/F.
void BM_SoftMoEVsSparse(benchmark::State& state) {
  const std::int64_t tokens = state.range(0), experts = state.range(1), f = state.range(2);
  const std::int64_t d = 1024, k = 2;
  ScopedNumThreads one(1);

  const Tensor<float> x = uniform({tokens, d}, 11, 1.0f);
  const float s1 = 1.0f / std::sqrt(float(d)), s2 = 1.0f / std::sqrt(float(f));
  const Tensor<float> w1 = uniform({experts, f, d}, 12, s1), w3 = uniform({experts, f, d}, 13, s1);
  const Tensor<float> w2 = uniform({experts, d, f}, 14, s2);
  moe::ExpertWeights<float> ew;
  ew.w1 = w1;
  ew.w3 = w3;
  ew.w2 = w2;

  // Sparse: route then execute, reusing the plan and the workspace.
  const Tensor<float> wg = uniform({experts, d}, 15, s1);
  const moe::TopKRouter<float> router({.num_experts = experts, .top_k = k});
  const moe::MoELayer<float> sparse({.d_model = d, .d_ff = f, .num_experts = experts});
  const moe::MoELayerWeights<float> sw{ew, {}};
  Tensor<float> logits({tokens, experts}), y({tokens, d});
  moe::DispatchPlan<float> plan;
  moe::router_logits<float>(x, wg, logits.view<2>());
  router.route(logits, plan);
  std::vector<std::byte> ws(sparse.workspace_bytes(plan));
  sparse.execute(plan, x, sw, y.view<2>(), ws);

  // Soft: E * S = k * T slots; a warm scratch.
  const std::int64_t slots = k * tokens / experts;
  const moe::SoftMoELayer<float> soft(
      {.d_model = d, .d_ff = f, .num_experts = experts, .slots_per_expert = slots});
  const Tensor<float> phi = uniform({d, experts * slots}, 16, s1);
  const moe::SoftMoEWeights<float> softw{phi, ew};
  moe::SoftMoEScratch<float> scratch;
  const ConstView<float, 3> x3(x.data(), {1, tokens, d});
  Tensor<float> ys({1, tokens, d});
  soft.forward(x3, softw, ys.view<3>(), scratch);

  double sparse_s = 0, soft_s = 0;
  for (auto _ : state) {
    const double t0 = switchyard_bench::detail::thread_seconds();
    moe::router_logits<float>(x, wg, logits.view<2>());
    router.route(logits, plan);
    sparse.execute(plan, x, sw, y.view<2>(), ws);
    benchmark::ClobberMemory();
    const double t1 = switchyard_bench::detail::thread_seconds();
    soft.forward(x3, softw, ys.view<3>(), scratch);
    benchmark::ClobberMemory();
    const double t2 = switchyard_bench::detail::thread_seconds();
    state.SetIterationTime(t2 - t1);
    sparse_s += t1 - t0;
    soft_s += t2 - t1;
  }
  const double n = double(state.iterations());
  const double expert_gflop = double(soft.expert_flops()) * 1e-9;
  const double sparse_gflop = (2.0 * double(tokens) * double(d) * double(experts) +
                               2.0 * double(plan.nnz()) * double(d) * double(f) * 3.0) *
                              1e-9;
  const double soft_gflop = double(soft.flops(tokens)) * 1e-9;
  state.SetItemsProcessed(state.iterations() * tokens);
  state.counters["soft_tok/s"] = double(tokens) * n / soft_s;
  state.counters["sparse_tok/s"] = double(tokens) * n / sparse_s;
  state.counters["GFLOP/s"] = soft_gflop * n / soft_s;
  state.counters["sparse_GFLOP/s"] = sparse_gflop * n / sparse_s;
  state.counters["expert_GFLOP"] = expert_gflop;
  state.counters["ratio"] = sparse_s / soft_s;
}

BENCHMARK(BM_SoftMoEVsSparse)
    ->ArgNames({"T", "E", "F"})
    ->Args({512, 8, 2816})  // Mixtral-like experts; 1024 slots of 128 per expert
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
