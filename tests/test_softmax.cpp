// kernels::softmax_rows and core::softmax_rows against a naive double softmax,
// on every arch (plus the scalar path), float and double, for lengths around
// the register width; properties (rows sum to one, all -inf rows give zeros,
// no overflow for huge logits) and the wrapper's shape errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/softmax.hpp"
#include "switchyard/core/tensor.hpp"

using namespace switchyard;

namespace {

template <class T, class Arch>
std::vector<std::int64_t> lengths() {
  const std::int64_t L = static_cast<std::int64_t>(simd::lanes_v<T, Arch>);
  std::vector<std::int64_t> ns{1, L - 1, L, L + 1, 3 * L, 3 * L + 1, 100};
  std::erase(ns, 0);
  return ns;
}

// Naive softmax in double; all -inf rows give zeros.
template <class T>
std::vector<double> ref_softmax(const T* x, std::int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (std::int64_t i = 0; i < n; ++i) m = std::max(m, double(x[i]));
  std::vector<double> y(static_cast<std::size_t>(n), 0.0);
  if (m == -std::numeric_limits<double>::infinity()) return y;
  double s = 0;
  for (std::int64_t i = 0; i < n; ++i) s += y[i] = std::exp(double(x[i]) - m);
  for (auto& v : y) v /= s;
  return y;
}

template <class T>
constexpr double eps = std::numeric_limits<T>::epsilon();

// Relative error per element: exp's 2 ulp, the rounding of x - max (relative
// error eps * |x - max| after exp), and the row sum (n eps).
template <class T>
void require_close(const T* got, const T* x, std::int64_t n) {
  const auto ref = ref_softmax(x, n);
  double m = -std::numeric_limits<double>::infinity();
  for (std::int64_t i = 0; i < n; ++i) m = std::max(m, double(x[i]));
  for (std::int64_t i = 0; i < n; ++i) {
    CAPTURE(i, got[i], ref[i]);
    if (ref[i] == 0.0) {
      REQUIRE(got[i] == T(0));
      continue;
    }
    const double tol = (4 + n + std::fabs(double(x[i]) - m)) * eps<T> * ref[i];
    REQUIRE(std::fabs(double(got[i]) - ref[i]) <= tol + std::numeric_limits<T>::denorm_min());
  }
}

template <class T>
std::vector<T> random_rows(std::int64_t rows, std::int64_t stride, double scale,
                           std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  std::vector<T> v(static_cast<std::size_t>(rows * stride), T(99));
  for (auto& e : v) e = static_cast<T>(u(gen));
  return v;
}

}  // namespace

TEMPLATE_TEST_CASE("softmax_rows matches a double softmax and rows sum to one", "[simd][softmax]",
                   float, double) {
  using T = TestType;
  simd::for_each_arch([&](auto arch) {
    for (std::int64_t n : lengths<T, decltype(arch)>()) {
      CAPTURE(decltype(arch)::name(), n);
      const std::int64_t rows = 3, ss = n + 3, ds = n + 1;  // padded strides
      const auto x = random_rows<T>(rows, ss, 6.0, 17 + n);
      std::vector<T> y(static_cast<std::size_t>(rows * ds), T(-1));
      // Start one element in: unaligned rows.
      kernels::softmax_rows(arch, x.data() + 1, ss, y.data() + 1, ds, rows - 1, n);
      for (std::int64_t r = 0; r < rows - 1; ++r) {
        CAPTURE(r);
        const T* yr = y.data() + 1 + r * ds;
        require_close(yr, x.data() + 1 + r * ss, n);
        double s = 0;
        for (std::int64_t i = 0; i < n; ++i) s += yr[i];
        REQUIRE(std::fabs(s - 1.0) <= (n + 4) * eps<T>);
      }
      REQUIRE(y[0] == T(-1));  // nothing written before the first row
      // Padding between rows untouched.
      for (std::int64_t r = 0; r + 1 < rows - 1; ++r) REQUIRE(y[1 + r * ds + n] == T(-1));
    }
  });
}

TEMPLATE_TEST_CASE("softmax_rows in place equals out of place", "[simd][softmax]", float, double) {
  using T = TestType;
  simd::for_each_arch([&](auto arch) {
    for (std::int64_t n : lengths<T, decltype(arch)>()) {
      CAPTURE(decltype(arch)::name(), n);
      auto x = random_rows<T>(4, n, 3.0, 5 + n);
      std::vector<T> y(x.size());
      kernels::softmax_rows(arch, x.data(), n, y.data(), n, 4, n);
      kernels::softmax_rows(arch, x.data(), n, x.data(), n, 4, n);
      REQUIRE(x == y);
    }
  });
}

TEMPLATE_TEST_CASE("softmax_rows: all -inf rows give zeros, -inf entries give exact zeros",
                   "[simd][softmax]", float, double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();
  simd::for_each_arch([&](auto arch) {
    for (std::int64_t n : lengths<T, decltype(arch)>()) {
      CAPTURE(decltype(arch)::name(), n);
      std::vector<T> x(static_cast<std::size_t>(2 * n), -inf), y(x.size(), T(5));
      // Row 1: every third entry finite, the rest masked (the last entry too when n > 1).
      for (std::int64_t i = 0; i < n; i += 3) x[n + i] = static_cast<T>(0.25 * i - 2);
      if (n > 1) x[2 * n - 1] = -inf;
      kernels::softmax_rows(arch, x.data(), n, y.data(), n, 2, n);
      for (std::int64_t i = 0; i < n; ++i) {
        REQUIRE(y[i] == T(0));
        REQUIRE(!std::signbit(y[i]));
      }
      require_close(y.data() + n, x.data() + n, n);
      for (std::int64_t i = 0; i < n; ++i) {
        if (x[n + i] == -inf) REQUIRE(y[n + i] == T(0));
      }
    }
  });
}

TEMPLATE_TEST_CASE("softmax_rows does not overflow for huge logits", "[simd][softmax]", float,
                   double) {
  using T = TestType;
  const T big = std::numeric_limits<T>::max() / T(4);
  simd::for_each_arch([&](auto arch) {
    for (std::int64_t n : lengths<T, decltype(arch)>()) {
      CAPTURE(decltype(arch)::name(), n);
      // A shift of 1000 changes nothing mathematically but overflows a naive exp.
      auto x = random_rows<T>(1, n, 4.0, 9 + n);
      std::vector<T> shifted(x), y0(x.size()), y1(x.size());
      for (auto& v : shifted) v += T(1000);
      kernels::softmax_rows(arch, x.data(), n, y0.data(), n, 1, n);
      kernels::softmax_rows(arch, shifted.data(), n, y1.data(), n, 1, n);
      for (std::int64_t i = 0; i < n; ++i) {
        REQUIRE(std::isfinite(y1[i]));
        // The shift rounds the inputs by up to half an ulp of 1000.
        REQUIRE(std::fabs(double(y1[i]) - double(y0[i])) <= 2048 * eps<T> * double(y0[i]) + 1e-30);
      }
      // Near the largest finite values: max entries share the mass, the others get 0.
      std::vector<T> h(static_cast<std::size_t>(n));
      for (std::int64_t i = 0; i < n; ++i) h[i] = i % 2 ? -big : big;
      kernels::softmax_rows(arch, h.data(), n, y0.data(), n, 1, n);
      const double share = 1.0 / double((n + 1) / 2);
      for (std::int64_t i = 0; i < n; ++i) {
        if (i % 2) {
          REQUIRE(y0[i] == T(0));
        } else {
          REQUIRE(std::fabs(double(y0[i]) - share) <= (n + 4) * eps<T> * share);
        }
      }
    }
  });
}

TEMPLATE_TEST_CASE("softmax_rows: a NaN or +inf entry makes its row NaN (documented)",
                   "[simd][softmax]", float, double) {
  using T = TestType;
  simd::for_each_arch([&](auto arch) {
    for (std::int64_t n : lengths<T, decltype(arch)>()) {
      CAPTURE(decltype(arch)::name(), n);
      for (T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()}) {
        auto x = random_rows<T>(1, n, 1.0, 21 + n);
        x[static_cast<std::size_t>(n / 2)] = bad;
        std::vector<T> y(x.size());
        kernels::softmax_rows(arch, x.data(), n, y.data(), n, 1, n);
        for (T v : y) REQUIRE(std::isnan(v));
      }
    }
  });
}

TEMPLATE_TEST_CASE("core::softmax_rows: views, in place, same bits for 1 and 2 threads",
                   "[softmax]", float, double) {
  using T = TestType;
  const std::int64_t rows = 200, n = 257;
  const auto data = random_rows<T>(rows, n, 5.0, 77);
  Tensor<T> x({rows, n});
  std::copy(data.begin(), data.end(), x.begin());
  Tensor<T> y1({rows, n}), y2({rows, n});
  {
    ScopedNumThreads one(1);
    core::softmax_rows<T>(x, y1);
  }
  {
    ScopedNumThreads two(2);
    core::softmax_rows<T>(x, y2);
  }
  REQUIRE(std::equal(y1.begin(), y1.end(), y2.begin()));
  for (std::int64_t r = 0; r < rows; r += 37)
    require_close(y1.data() + r * n, data.data() + r * n, n);
  // In place through the one-argument overload, on a strided sub-view of columns.
  Tensor<T> z(x);
  View<T, 2> zv = z;
  core::softmax_rows(zv.slice(1, 0, 100));
  for (std::int64_t r = 0; r < rows; r += 41) {
    require_close(z.data() + r * n, data.data() + r * n, 100);
    REQUIRE(z(r, 100) == data[r * n + 100]);  // columns past the slice untouched
  }
}

TEST_CASE("core::softmax_rows rejects mismatched shapes and non-unit inner strides", "[softmax]") {
  Tensor<float> x({3, 4}), wrong({3, 5}), tall({4, 4});
  REQUIRE_THROWS_AS(core::softmax_rows<float>(x, wrong), shape_error);
  REQUIRE_THROWS_WITH(core::softmax_rows<float>(x, wrong),
                      Catch::Contains("core::softmax_rows") && Catch::Contains("'dst'") &&
                          Catch::Contains("[R=3, N=5]") && Catch::Contains("[R=3, N=4]"));
  REQUIRE_THROWS_WITH(core::softmax_rows<float>(x, tall), Catch::Contains("[R=4, N=4]"));
  View<float, 2> xv = x;
  const View<float, 2> every_other(xv.data(), {3, 2}, {4, 2});
  Tensor<float> out({3, 2});
  REQUIRE_THROWS_AS(core::softmax_rows<float>(every_other, out), shape_error);
  REQUIRE_THROWS_WITH(core::softmax_rows<float>(every_other, out),
                      Catch::Contains("core::softmax_rows") && Catch::Contains("'src'") &&
                          Catch::Contains("inner stride 2"));
  REQUIRE_THROWS_WITH(core::softmax_rows<float>(out, every_other), Catch::Contains("'dst'"));
}
