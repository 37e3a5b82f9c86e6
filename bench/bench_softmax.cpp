// exp and row-softmax throughput, side by side on the same inputs:
//   exp:     simd::exp (ours) vs xsimd::exp vs a std::exp loop, float and double;
//   softmax: kernels::softmax_rows on simd::default_arch vs our scalar path vs a
//            naive std::exp softmax, rows of n in {64, 1024, 4096}.
// Rates are elements/s (items_per_second); compare them as ratios within one run.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "switchyard/core/rng.hpp"
#include "switchyard/core/simd/exp.hpp"
#include "switchyard/core/simd/softmax.hpp"
#include "switchyard/core/tensor.hpp"

using namespace switchyard;

namespace {

// n logits in [-12, 4): the range softmax arguments live in.
template <class T>
std::vector<T> logits(std::int64_t n) {
  std::vector<T> v(static_cast<std::size_t>(n));
  core::fill_uniform(View<T, 1>(v.data(), {n}), 1234);
  for (auto& x : v) x = x * T(16) - T(12);
  return v;
}

enum class ExpImpl { ours, xsimd, std_loop };

template <class T, ExpImpl impl>
void BM_exp(benchmark::State& state) {
  using B = xsimd::batch<T, simd::default_arch>;
  const std::int64_t n = state.range(0);  // a multiple of every register width
  const auto x = logits<T>(n);
  std::vector<T> y(x.size());
  for (auto _ : state) {
    if constexpr (impl == ExpImpl::std_loop) {
      for (std::int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i]);
    } else {
      for (std::int64_t i = 0; i < n; i += B::size) {
        const B v = B::load_unaligned(x.data() + i);
        if constexpr (impl == ExpImpl::ours) {
          simd::exp(v).store_unaligned(y.data() + i);
        } else {
          xsimd::exp(v).store_unaligned(y.data() + i);
        }
      }
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * n);
}

enum class SoftmaxImpl { ours, ours_scalar, naive };

template <class T>
void naive_softmax_rows(const T* src, T* dst, std::int64_t rows, std::int64_t n) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* x = src + r * n;
    T* y = dst + r * n;
    T m = -std::numeric_limits<T>::infinity();
    for (std::int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
    T s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += y[i] = std::exp(x[i] - m);
    for (std::int64_t i = 0; i < n; ++i) y[i] /= s;
  }
}

template <class T, SoftmaxImpl impl>
void BM_softmax(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  const std::int64_t rows = std::max<std::int64_t>(1, 65536 / n);  // ~64k elements per call
  const auto x = logits<T>(rows * n);
  std::vector<T> y(x.size());
  for (auto _ : state) {
    if constexpr (impl == SoftmaxImpl::ours) {
      kernels::softmax_rows(simd::default_arch{}, x.data(), n, y.data(), n, rows, n);
    } else if constexpr (impl == SoftmaxImpl::ours_scalar) {
      kernels::softmax_rows(simd::scalar{}, x.data(), n, y.data(), n, rows, n);
    } else {
      naive_softmax_rows(x.data(), y.data(), rows, n);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * rows * n);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_exp, float, ExpImpl::ours)->Arg(64)->Arg(1024)->Arg(4096);
BENCHMARK_TEMPLATE(BM_exp, float, ExpImpl::xsimd)->Arg(64)->Arg(1024)->Arg(4096);
BENCHMARK_TEMPLATE(BM_exp, float, ExpImpl::std_loop)->Arg(64)->Arg(1024)->Arg(4096);
BENCHMARK_TEMPLATE(BM_exp, double, ExpImpl::ours)->Arg(64)->Arg(1024)->Arg(4096);
BENCHMARK_TEMPLATE(BM_exp, double, ExpImpl::xsimd)->Arg(64)->Arg(1024)->Arg(4096);
BENCHMARK_TEMPLATE(BM_exp, double, ExpImpl::std_loop)->Arg(64)->Arg(1024)->Arg(4096);

BENCHMARK_TEMPLATE(BM_softmax, float, SoftmaxImpl::ours)->Arg(64)->Arg(1024)->Arg(4096);
BENCHMARK_TEMPLATE(BM_softmax, float, SoftmaxImpl::ours_scalar)->Arg(64)->Arg(1024)->Arg(4096);
BENCHMARK_TEMPLATE(BM_softmax, float, SoftmaxImpl::naive)->Arg(64)->Arg(1024)->Arg(4096);
BENCHMARK_TEMPLATE(BM_softmax, double, SoftmaxImpl::ours)->Arg(64)->Arg(1024)->Arg(4096);
BENCHMARK_TEMPLATE(BM_softmax, double, SoftmaxImpl::naive)->Arg(64)->Arg(1024)->Arg(4096);
