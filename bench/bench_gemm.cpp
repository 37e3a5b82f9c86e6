// Single-thread sgemm in one run: switchyard's packed kernel vs raw Eigen
// (noalias product of row-major Maps) vs OpenBLAS cblas_sgemm, on square sizes
// and MoE-like rectangles. Counters: GFLOP/s and %peak (of the measured fp32 FMA
// peak, support/peak.hpp). OpenBLAS's label names the kernel it ran (core=...). Names end in
// /M/N/K, so `--benchmark_filter=1024/1024/1024` selects the acceptance case.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cstdint>
#include <random>
#include <vector>

#include "support/peak.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/gemm_bf16.hpp"
#include "switchyard/core/linear.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"

#if SWITCHYARD_BENCH_HAVE_BLAS
#include <cblas.h>
extern "C" void openblas_set_num_threads(int);  // not in every cblas.h
extern "C" char* openblas_get_corename(void);
extern "C" char* openblas_get_config(void);
#endif

namespace {

using namespace switchyard;
using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct Inputs {
  Tensor<float> a, b, c;
  Inputs(std::int64_t m, std::int64_t n, std::int64_t k) : a({m, k}), b({k, n}), c({m, n}) {
    std::mt19937 gen(7);
    std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
    for (auto* x : {&a, &b})
      for (auto& e : *x) e = ud(gen);
  }
};

/// GFLOP/s from Google Benchmark's CPU time, and %peak from this thread's CPU time
/// over the timed loop (a plain number: a rate counter would print "/s").
void set_counters(benchmark::State& state, std::int64_t m, std::int64_t n, std::int64_t k,
                  double loop_cpu_seconds) {
  const double flops = 2.0 * double(m) * double(n) * double(k);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  const double gflops = flops * 1e-9 * double(state.iterations()) / loop_cpu_seconds;
  state.counters["%peak"] = 100.0 * gflops / switchyard_bench::fp32_fma_peak_gflops();
}

void BM_Ours(benchmark::State& state) {
  const std::int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  Inputs in(m, n, k);
  std::vector<std::byte> ws(core::gemm_workspace_bytes<float>(m, n, k));
  const double t0 = switchyard_bench::detail::thread_seconds();
  for (auto _ : state) {
    core::gemm<float>(in.a.view<2>(), core::Trans::no, in.b.view<2>(), core::Trans::no,
                      in.c.view<2>(), 1.0f, 0.0f, ws);
    benchmark::ClobberMemory();
  }
  set_counters(state, m, n, k, switchyard_bench::detail::thread_seconds() - t0);
}

void BM_Eigen(benchmark::State& state) {
  const std::int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  Inputs in(m, n, k);
  Eigen::Map<const RowMat> a(in.a.data(), m, k), b(in.b.data(), k, n);
  Eigen::Map<RowMat> c(in.c.data(), m, n);
  const double t0 = switchyard_bench::detail::thread_seconds();
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::ClobberMemory();
  }
  set_counters(state, m, n, k, switchyard_bench::detail::thread_seconds() - t0);
}

#if SWITCHYARD_BENCH_HAVE_BLAS
/// cblas_sgemm on one thread; w_layout: B is an nn.Linear weight [N, K] (CblasTrans), else
/// [K, N].
void run_openblas(benchmark::State& state, bool w_layout) {
  const std::int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  openblas_set_num_threads(1);
  Inputs in(m, n, k);
  const double t0 = switchyard_bench::detail::thread_seconds();
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, w_layout ? CblasTrans : CblasNoTrans, int(m), int(n),
                int(k), 1.0f, in.a.data(), int(k), in.b.data(), w_layout ? int(k) : int(n), 0.0f,
                in.c.data(), int(n));
    benchmark::ClobberMemory();
  }
  set_counters(state, m, n, k, switchyard_bench::detail::thread_seconds() - t0);
  state.SetLabel(std::string("core=") + openblas_get_corename());
}

void BM_OpenBLAS(benchmark::State& state) { run_openblas(state, false); }
#endif

// bf16 operands (the same random values rounded), float C, through one gemm_bf16 path; B is
// nn.Linear's [N, K] layout. %peak is of the fp32 FMA peak, so it reads as "times fp32".
void BM_OursBf16(benchmark::State& state, core::Bf16Path path) {
  const std::int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  if (!core::bf16_path_available(path)) {
    state.SkipWithError("path not in this build or CPU");
    return;
  }
  std::vector<bf16> a(std::size_t(m * k)), b(std::size_t(n * k));
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  for (auto* x : {&a, &b})
    for (auto& e : *x) e = bf16::from_float(ud(gen));
  Tensor<float> c({m, n});
  ScopedNumThreads one(1);  // single-thread, like the other rows
  const double t0 = switchyard_bench::detail::thread_seconds();
  for (auto _ : state) {
    core::gemm_bf16(ConstView<bf16, 2>(a.data(), {m, k}), core::Trans::no,
                    ConstView<bf16, 2>(b.data(), {n, k}), core::Trans::yes, c.view<2>(), 0.0f,
                    path);
    benchmark::ClobberMemory();
  }
  set_counters(state, m, n, k, switchyard_bench::detail::thread_seconds() - t0);
  state.SetLabel(core::bf16_path_name(path));
}

// Two threads (wall time): gemm_parallel against OpenBLAS with two threads, square sizes.
// %peak is of two cores' fp32 FMA peak. Names end in /M/N/K.
void BM_OursTwoThreads(benchmark::State& state) {
  const std::int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  Inputs in(m, n, k);
  ScopedNumThreads two(2);
  for (auto _ : state) {
    core::gemm_parallel<float>(in.a.view<2>(), core::Trans::no, in.b.view<2>(), core::Trans::no,
                               in.c.view<2>());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * double(m) * double(n) * double(k);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

#if SWITCHYARD_BENCH_HAVE_BLAS
void BM_OpenBLASTwoThreads(benchmark::State& state) {
  const std::int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  openblas_set_num_threads(2);
  Inputs in(m, n, k);
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(m), int(n), int(k), 1.0f,
                in.a.data(), int(k), in.b.data(), int(n), 0.0f, in.c.data(), int(n));
    benchmark::ClobberMemory();
  }
  openblas_set_num_threads(1);
  const double flops = 2.0 * double(m) * double(n) * double(k);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(std::string("core=") + openblas_get_corename());
}
#endif

// Router logits: x [M, K] times an nn.Linear weight [N, K] with few outputs, 1 thread:
// core::linear (y^T = w x^T for N <= 256) against cblas_sgemm (NoTrans, Trans). Names end in
// /M/N/K.
void BM_LinearFewOutputs(benchmark::State& state) {
  const std::int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  Inputs in(m, n, k);  // b [k, n] holds the weight's values, read as w [n, k]
  ScopedNumThreads one(1);
  const double t0 = switchyard_bench::detail::thread_seconds();
  for (auto _ : state) {
    core::linear(in.a.view<2>(), ConstView<float, 2>(in.b.data(), {n, k}), in.c.view<2>());
    benchmark::ClobberMemory();
  }
  set_counters(state, m, n, k, switchyard_bench::detail::thread_seconds() - t0);
}

#if SWITCHYARD_BENCH_HAVE_BLAS
void BM_OpenBLASFewOutputs(benchmark::State& state) { run_openblas(state, true); }
#endif

void few_output_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"M", "N", "K"});
  for (std::int64_t e : {8, 64, 256}) b->Args({4096, e, 2048});
  b->Unit(benchmark::kMillisecond);
}

void square_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"M", "N", "K"});
  for (std::int64_t s : {1024, 4096}) b->Args({s, s, s});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"M", "N", "K"});
  for (std::int64_t s : {256, 512, 1024}) b->Args({s, s, s});
  b->Args({512, 2816, 1024});  // MoE expert up-projection (tokens x d_ff x d_model)
  b->Args({512, 1024, 2816});  // and its down-projection
  b->Args({4096, 4096, 4096});
  b->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Ours)->Apply(shapes);
BENCHMARK_CAPTURE(BM_OursBf16, amx, core::Bf16Path::amx)->Apply(shapes);
BENCHMARK_CAPTURE(BM_OursBf16, avx512_bf16, core::Bf16Path::avx512_bf16)->Apply(shapes);
BENCHMARK_CAPTURE(BM_OursBf16, widen, core::Bf16Path::widen)->Apply(shapes);
BENCHMARK(BM_OursTwoThreads)->Apply(square_shapes);
BENCHMARK(BM_LinearFewOutputs)->Apply(few_output_shapes);
BENCHMARK(BM_Eigen)->Apply(shapes);
#if SWITCHYARD_BENCH_HAVE_BLAS
BENCHMARK(BM_OpenBLAS)->Apply(shapes);
BENCHMARK(BM_OpenBLASTwoThreads)->Apply(square_shapes);
BENCHMARK(BM_OpenBLASFewOutputs)->Apply(few_output_shapes);
#endif

}  // namespace
