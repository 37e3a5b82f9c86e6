// core::topk against a naive reference: a stable sort of each row, in double,
// by descending value with NaN last. Covers every path (k = 1, insertion for
// k <= 8, selection above), deliberate ties, -inf, NaN, k = n, n = 1, and errors.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/topk.hpp"

using namespace switchyard;

namespace {

// Row-major [rows, n] -> for each row the first k indices of a stable sort by
// descending value (NaN after everything), computed in double.
template <class T>
std::vector<std::int64_t> ref_topk(const std::vector<T>& x, std::int64_t rows, std::int64_t n,
                                   std::int64_t k) {
  std::vector<std::int64_t> out;
  for (std::int64_t r = 0; r < rows; ++r) {
    std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
    std::iota(idx.begin(), idx.end(), 0);
    auto key = [&](std::int64_t i) { return static_cast<double>(x[r * n + i]); };
    std::stable_sort(idx.begin(), idx.end(), [&](std::int64_t a, std::int64_t b) {
      if (std::isnan(key(a))) return false;
      if (std::isnan(key(b))) return true;
      return key(a) > key(b);
    });
    out.insert(out.end(), idx.begin(), idx.begin() + k);
  }
  return out;
}

template <class T>
void check_against_ref(const std::vector<T>& data, std::int64_t rows, std::int64_t n,
                       std::int64_t k) {
  CAPTURE(rows, n, k);
  Tensor<T> x({rows, n});
  std::copy(data.begin(), data.end(), x.begin());
  const auto got = core::topk<T>(x, k);
  REQUIRE(got.indices.extent(0) == rows);
  REQUIRE(got.indices.extent(1) == k);
  const auto want = ref_topk(data, rows, n, k);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t j = 0; j < k; ++j) {
      CAPTURE(r, j);
      const std::int64_t i = want[r * k + j];
      REQUIRE(got.indices(r, j) == i);
      const T v = got.values(r, j), ref = data[r * n + i];
      REQUIRE((std::isnan(ref) ? std::isnan(v) : v == ref));
    }
  }
}

// Values drawn from a small set so ties are everywhere.
template <class T>
std::vector<T> tied(std::int64_t count, int distinct, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int> u(0, distinct - 1);
  std::vector<T> v(static_cast<std::size_t>(count));
  for (auto& e : v) e = static_cast<T>(u(gen)) / T(4) - T(1);
  return v;
}

}  // namespace

TEMPLATE_TEST_CASE("topk matches a stable sort for every k, with many ties", "[topk]", float,
                   double) {
  using T = TestType;
  for (std::int64_t n : {1, 2, 7, 8, 9, 33, 100}) {
    const std::int64_t rows = 5;
    const auto data = tied<T>(rows * n, 6, 31 + n);
    for (std::int64_t k = 1; k <= n; ++k) check_against_ref(data, rows, n, k);
  }
}

TEMPLATE_TEST_CASE("topk with distinct random values, long rows", "[topk]", float, double) {
  using T = TestType;
  std::mt19937_64 gen(99);
  std::normal_distribution<double> g;
  const std::int64_t rows = 7, n = 1000;
  std::vector<T> data(rows * n);
  for (auto& e : data) e = static_cast<T>(g(gen));
  for (std::int64_t k : {1, 2, 5, 8, 9, 64, 999, 1000}) check_against_ref(data, rows, n, k);
}

TEMPLATE_TEST_CASE("topk: ties go to the lower index, -inf and NaN rank last", "[topk]", float,
                   double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  // Hand-checked example: row 0 has ties and signed zeros; row 1 has NaN and -inf.
  const std::vector<T> data{T(1), T(3), T(-0.0), T(3), T(0.0), T(1),  T(3), T(-1),  //
                            -inf, nan,  T(2),    -inf, nan,    T(-5), T(2), -inf};
  for (std::int64_t k : {1, 2, 3, 5, 8}) check_against_ref(data, 2, 8, k);
  Tensor<T> x({2, 8});
  std::copy(data.begin(), data.end(), x.begin());
  for (std::int64_t k : {3, 8}) {  // insertion path and the select path share the order
    const auto got = core::topk<T>(x, k);
    const std::vector<std::int64_t> row0{1, 3, 6, 0, 5, 2, 4, 7};
    const std::vector<std::int64_t> row1{2, 6, 5, 0, 3, 7, 1, 4};
    for (std::int64_t j = 0; j < k; ++j) {
      REQUIRE(got.indices(0, j) == row0[j]);
      REQUIRE(got.indices(1, j) == row1[j]);
    }
  }
  // A 9-wide row forces the select path (k > 8) on the same kind of data.
  const std::vector<T> wide{nan, T(0), -inf, T(0), T(7), nan, -inf, T(7), T(0)};
  check_against_ref(wide, 1, 9, 9);
  check_against_ref(wide, 1, 9, 4);
  // All -inf and all NaN rows.
  check_against_ref(std::vector<T>(12, -inf), 1, 12, 10);
  check_against_ref(std::vector<T>(12, nan), 1, 12, 10);
  check_against_ref(std::vector<T>(12, nan), 1, 12, 3);
  check_against_ref(std::vector<T>(12, nan), 1, 12, 1);
}

TEST_CASE("topk: n = 1, strided outputs rejected, same result for 1 and 2 threads", "[topk]") {
  Tensor<float> one({3, 1});
  one(1, 0) = -2.0f;
  const auto r = core::topk<float>(one, 1);
  for (int i = 0; i < 3; ++i) REQUIRE(r.indices(i, 0) == 0);
  REQUIRE(r.values(1, 0) == -2.0f);

  const std::int64_t rows = 300, n = 200;
  const auto data = tied<float>(rows * n, 50, 5);
  Tensor<float> x({rows, n});
  std::copy(data.begin(), data.end(), x.begin());
  for (std::int64_t k : {1, 4, 20}) {
    ScopedNumThreads t1(1);
    const auto a = core::topk<float>(x, k);
    ScopedNumThreads t2(2);
    const auto b = core::topk<float>(x, k);
    REQUIRE(std::equal(a.indices.begin(), a.indices.end(), b.indices.begin()));
    REQUIRE(std::equal(a.values.begin(), a.values.end(), b.values.begin()));
  }
}

TEST_CASE("topk errors name the function, the argument and the values", "[topk]") {
  Tensor<float> x({2, 5});
  REQUIRE_THROWS_AS(core::topk<float>(x, 0), config_error);
  REQUIRE_THROWS_WITH(core::topk<float>(x, 0), Catch::Contains("core::topk") &&
                                                   Catch::Contains("'k' = 0") &&
                                                   Catch::Contains("n = 5"));
  REQUIRE_THROWS_WITH(core::topk<float>(x, 6),
                      Catch::Contains("'k' = 6") && Catch::Contains("n = 5"));
  REQUIRE_THROWS_WITH(core::topk<float>(x, -1), Catch::Contains("'k' = -1"));

  Tensor<std::int64_t> idx({2, 3}), idx_bad({3, 3});
  Tensor<float> val({2, 3}), val_bad({2, 2});
  REQUIRE_THROWS_AS(core::topk<float>(x, 7, idx, val), config_error);
  REQUIRE_THROWS_AS(core::topk<float>(x, 3, idx_bad, val), shape_error);
  REQUIRE_THROWS_WITH(core::topk<float>(x, 3, idx_bad, val),
                      Catch::Contains("core::topk") && Catch::Contains("'indices'") &&
                          Catch::Contains("[R=3, K=3]") && Catch::Contains("[R=2, K=3]"));
  REQUIRE_THROWS_WITH(core::topk<float>(x, 3, idx, val_bad),
                      Catch::Contains("'values'") && Catch::Contains("[R=2, K=2]"));
  View<float, 2> xv = x;
  const View<float, 2> strided(xv.data(), {2, 2}, {5, 2});
  REQUIRE_THROWS_WITH(core::topk<float>(strided, 1),
                      Catch::Contains("'x'") && Catch::Contains("inner stride 2"));
}
