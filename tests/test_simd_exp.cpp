// simd::exp against std::exp in long double: the error bound documented in
// exp.hpp, for every architecture this build and CPU allow plus the scalar
// path, in float and double, and the edge cases (-inf, +inf, NaN, 0, extremes).
#include <catch2/catch.hpp>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "switchyard/core/simd/exp.hpp"

using namespace switchyard;

namespace {

// y[i] = simd::exp(x[i]) on Arch; n must be a multiple of 64 so every lane of
// every register is exercised (no scalar tail on SIMD archs).
template <class Arch, class T>
void exp_array(Arch, const T* x, T* y, std::size_t n) {
  if constexpr (simd::is_scalar_v<Arch>) {
    for (std::size_t i = 0; i < n; ++i) y[i] = simd::exp(x[i]);
  } else {
    using B = xsimd::batch<T, Arch>;
    for (std::size_t i = 0; i < n; i += B::size) {
      simd::exp(B::load_unaligned(x + i)).store_unaligned(y + i);
    }
  }
}

// Error in units of the last place of the correctly rounded result.
template <class T>
long double ulp_error(T y, long double ref) {
  const int e = std::ilogb(ref);
  const long double ulp = std::ldexp(1.0L, e - (std::numeric_limits<T>::digits - 1));
  return std::fabs(static_cast<long double>(y) - ref) / ulp;
}

// Inputs covering the whole range whose exp is a normal finite number:
// an even grid, random points, and small |x| (where exp(x) ~ 1 + x).
template <class T>
std::vector<T> normal_range_inputs() {
  const long double lo = std::log(static_cast<long double>(std::numeric_limits<T>::min()));
  const long double hi = std::log(static_cast<long double>(std::numeric_limits<T>::max()));
  std::vector<T> x;
  constexpr int grid = 1 << 18;
  for (int i = 0; i < grid; ++i) {
    x.push_back(static_cast<T>(lo + (hi - lo) * (i + 0.5L) / grid));
  }
  std::mt19937_64 gen(12345);
  std::uniform_real_distribution<double> u(static_cast<double>(lo), static_cast<double>(hi));
  for (int i = 0; i < (1 << 17); ++i) x.push_back(static_cast<T>(u(gen)));
  for (int e = -40; e <= 0; ++e) {
    for (int j = 1; j <= 32; ++j) {
      const T v = static_cast<T>(std::ldexp(1.0 + j / 32.0, e));
      x.push_back(v);
      x.push_back(-v);
    }
  }
  // Half-way points of the range reduction, where |r| is largest.
  for (int k = -120; k <= 120; ++k) {
    const T v = static_cast<T>((k + 0.5L) * 0.69314718055994530942L);
    x.push_back(v);
    x.push_back(std::nextafter(v, T(0)));
  }
  // Keep only points whose exact result is a normal float, then pad to a multiple of 64.
  std::vector<T> kept;
  for (T v : x) {
    const long double r = std::exp(static_cast<long double>(v));
    if (r >= std::numeric_limits<T>::min() && r <= std::numeric_limits<T>::max()) {
      kept.push_back(v);
    }
  }
  while (kept.size() % 64) kept.push_back(T(0));
  return kept;
}

}  // namespace

// Prints the measured worst error per arch: run `test_simd_exp "[.measure]"`.
template <class T>
void check_exp_bound(bool report) {
  const std::vector<T> x = normal_range_inputs<T>();
  std::vector<long double> ref(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) ref[i] = std::exp(static_cast<long double>(x[i]));
  std::vector<T> y(x.size());
  simd::for_each_arch([&](auto arch) {
    exp_array(arch, x.data(), y.data(), x.size());
    long double worst = 0;
    T worst_x = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const long double e = ulp_error(y[i], ref[i]);
      if (!(e <= worst)) {  // also catches NaN
        worst = e;
        worst_x = x[i];
      }
    }
    CAPTURE(decltype(arch)::name(), x.size(), worst_x, static_cast<double>(worst));
    if (report) WARN(decltype(arch)::name() << ": worst " << static_cast<double>(worst) << " ulp");
    REQUIRE(worst <= 2.0L);
  });
}

TEMPLATE_TEST_CASE("simd::exp is within 2 ulp of std::exp over the normal range", "[simd][exp]",
                   float, double) {
  check_exp_bound<TestType>(false);
}

TEMPLATE_TEST_CASE("simd::exp worst error per arch (report)", "[.measure]", float, double) {
  check_exp_bound<TestType>(true);
}

TEMPLATE_TEST_CASE("simd::exp is exactly 1 at 0 and monotone on a fine grid", "[simd][exp]", float,
                   double) {
  using T = TestType;
  std::vector<T> x(64 * 64);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<T>(-2.0 + 4.0 * i / x.size());
  std::vector<T> y(x.size());
  simd::for_each_arch([&](auto arch) {
    CAPTURE(decltype(arch)::name());
    exp_array(arch, x.data(), y.data(), x.size());
    for (std::size_t i = 1; i < x.size(); ++i) REQUIRE(y[i] >= y[i - 1]);
    std::vector<T> z(64, T(0)), w(64);
    exp_array(arch, z.data(), w.data(), z.size());
    for (T v : w) REQUIRE(v == T(1));
  });
}

TEMPLATE_TEST_CASE("simd::exp edge cases: infinities, NaN, overflow, underflow", "[simd][exp]",
                   float, double) {
  using T = TestType;
  using lim = std::numeric_limits<T>;
  const T inf = lim::infinity();
  simd::for_each_arch([&](auto arch) {
    CAPTURE(decltype(arch)::name());
    auto one = [&](T v) {
      std::vector<T> x(64, v), y(64);
      exp_array(arch, x.data(), y.data(), x.size());
      for (T r : y) REQUIRE((std::isnan(r) ? std::isnan(y[0]) : r == y[0]));  // lanes agree
      return y[0];
    };
    REQUIRE(one(-inf) == T(0));
    REQUIRE(!std::signbit(one(-inf)));
    REQUIRE(one(inf) == inf);
    REQUIRE(std::isnan(one(lim::quiet_NaN())));
    REQUIRE(std::isnan(one(-lim::quiet_NaN())));
    REQUIRE(one(T(0)) == T(1));
    REQUIRE(one(-T(0)) == T(1));
    REQUIRE(one(lim::lowest()) == T(0));
    REQUIRE(one(T(-1000)) == T(0));
    REQUIRE(one(T(-1e30)) == T(0));
    REQUIRE(one(lim::max()) == inf);
    REQUIRE(one(T(1000)) == inf);
    // Just past log(max): the true result overflows.
    REQUIRE(one(std::nextafter(static_cast<T>(std::log(static_cast<long double>(lim::max()))),
                               inf)) == inf);
    // Just below log(max): the largest finite results stay finite and accurate.
    const T below =
        std::nextafter(static_cast<T>(std::log(static_cast<long double>(lim::max()))), T(0));
    REQUIRE(std::isfinite(one(below)));
    REQUIRE(ulp_error(one(below), std::exp(static_cast<long double>(below))) <= 2.0L);
  });
}

TEMPLATE_TEST_CASE("simd::exp below the smallest normal result: 0 or within two subnormal steps",
                   "[simd][exp]", float, double) {
  using T = TestType;
  using lim = std::numeric_limits<T>;
  const long double lo = std::log(static_cast<long double>(lim::min()));
  std::vector<T> x;
  for (int i = 0; i < 64 * 64; ++i) x.push_back(static_cast<T>(lo - 2.0L * (i + 1) / (64 * 64)));
  std::vector<T> y(x.size());
  simd::for_each_arch([&](auto arch) {
    CAPTURE(decltype(arch)::name());
    exp_array(arch, x.data(), y.data(), x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      const long double ref = std::exp(static_cast<long double>(x[i]));
      CAPTURE(x[i], y[i], static_cast<double>(ref));
      REQUIRE(y[i] >= T(0));
      REQUIRE(y[i] < lim::min());
      // Either flushed to zero (only below 2^-0.5 of the smallest normal) or a
      // subnormal within two subnormal steps: the polynomial's ~1 ulp of error
      // is about half a step at this scale, plus half a step of rounding.
      if (y[i] == T(0)) {
        REQUIRE(ref < 0.75L * lim::min());
      } else {
        REQUIRE(std::fabs(static_cast<long double>(y[i]) - ref) <= 2.0L * lim::denorm_min());
      }
    }
  });
}
