// Bi-level routing attention (BiFormer) at two BiFormer stage shapes, batch 1 and 8:
//   stage 1: 56x56, C 64, 2 heads, n_win 7, topk 4   (8x8-pixel regions, 256 keys per query)
//   stage 3: 14x14, C 256, 8 heads, n_win 7, topk 16 (2x2-pixel regions, 64 keys per query)
// against dense attention over the same image tokens (the same qkv and output projections through
// core::gemm, DenseAttention in between, scale C^-0.5): a full layer each, LePE (3x3) on for BRA.
// Rates are image tokens (pixels) per second of wall time, on 1 thread and on all threads
// (threads:all = switchyard's default thread count).
// Smoke filter: --benchmark_filter=14x14/batch:1
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>

#include "switchyard/attention/bilevel_routing.hpp"
#include "switchyard/attention/dense.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"

namespace {
using switchyard::ConstView;
using switchyard::Tensor;
namespace at = switchyard::attention;

struct Stage {
  std::int64_t side, C, heads, n_win, topk;
};

struct Setup {
  Tensor<float> x, qkv_w, qkv_b, wo_w, wo_b, lepe_w, lepe_b;
  Setup(std::int64_t N, const Stage& s)
      : x({N, s.side, s.side, s.C}),
        qkv_w({3 * s.C, s.C}),
        qkv_b({3 * s.C}),
        wo_w({s.C, s.C}),
        wo_b({s.C}),
        lepe_w({s.C, 1, 3, 3}),
        lepe_b({s.C}) {
    std::mt19937 gen(1);
    std::normal_distribution<float> nd(0.0f, 1.0f / std::sqrt(float(s.C)));
    for (auto* t : {&qkv_w, &qkv_b, &wo_w, &wo_b, &lepe_w, &lepe_b})
      for (auto& v : *t) v = nd(gen);
    std::normal_distribution<float> nx(0.0f, 1.0f);
    for (auto& v : x) v = nx(gen);
  }
  at::BiLevelRoutingWeights<float> weights() const {
    return {qkv_w, qkv_b, wo_w, wo_b, lepe_w.view<4>(), lepe_b};
  }
};

void BM_bra(benchmark::State& state, int threads, std::int64_t N, Stage s) {
  const switchyard::ScopedNumThreads scope(threads);
  const Setup m(N, s);
  const at::BiLevelRoutingAttention<float> bra(
      {.dim = s.C, .num_heads = s.heads, .n_win = s.n_win, .topk = s.topk, .side_dwconv = 3});
  Tensor<float> out({N, s.side, s.side, s.C});
  const auto w = m.weights();
  for (auto _ : state) {
    bra.forward(m.x, w, out.view<4>());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * N * s.side * s.side);
  state.counters["keys_per_query"] = double(s.topk * (s.side / s.n_win) * (s.side / s.n_win));
}

void BM_dense(benchmark::State& state, int threads, std::int64_t N, Stage s) {
  const switchyard::ScopedNumThreads scope(threads);
  const Setup m(N, s);
  using switchyard::core::Trans;
  const std::int64_t T = s.side * s.side, C = s.C, D = C / s.heads;
  const at::DenseAttention<float> dense({.scale = 1.0 / std::sqrt(double(C))});
  Tensor<float> qkv({N * T, 3 * C}), att({N, T, s.heads, D}), out({N * T, C});
  const ConstView<float, 4> q(qkv.data(), {N, T, s.heads, D}, {T * 3 * C, 3 * C, D, 1});
  const ConstView<float, 4> k(qkv.data() + C, {N, T, s.heads, D}, {T * 3 * C, 3 * C, D, 1});
  const ConstView<float, 4> v(qkv.data() + 2 * C, {N, T, s.heads, D}, {T * 3 * C, 3 * C, D, 1});
  for (auto _ : state) {
    switchyard::core::gemm_parallel<float>(ConstView<float, 2>(m.x.data(), {N * T, C}), Trans::no,
                                           m.qkv_w, Trans::yes, qkv.view<2>());
    dense.forward(q, k, v, att.view<4>());
    switchyard::core::gemm_parallel<float>(ConstView<float, 2>(att.data(), {N * T, C}), Trans::no,
                                           m.wo_w, Trans::yes, out.view<2>());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * N * T);
  state.counters["keys_per_query"] = double(T);
}

const bool registered = [] {
  const Stage stages[] = {{56, 64, 2, 7, 4}, {14, 256, 8, 7, 16}};
  for (const Stage& s : stages)
    for (const std::int64_t N : {1, 8})
      for (const int threads : {1, 0}) {
        const std::string shape =
            std::to_string(s.side) + "x" + std::to_string(s.side) + "/batch:" + std::to_string(N) +
            "/threads:" + (threads ? std::to_string(threads) : std::string("all")) +
            "/C:" + std::to_string(s.C) + "/heads:" + std::to_string(s.heads);
        benchmark::RegisterBenchmark(("bra/" + shape + "/n_win:" + std::to_string(s.n_win) +
                                      "/topk:" + std::to_string(s.topk))
                                         .c_str(),
                                     BM_bra, threads, N, s)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark(("dense/" + shape).c_str(), BM_dense, threads, N, s)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
      }
  return true;
}();

}  // namespace
