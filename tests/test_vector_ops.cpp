// kernels::dot, axpy, scale, row_max, row_sum on every arch (plus the scalar
// path), float and double, for lengths around the register width (tails),
// against naive loops in double. Inputs start one element past an aligned
// address so unaligned loads are exercised; writes are checked not to spill
// past n.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "switchyard/core/simd/vector_ops.hpp"

using namespace switchyard;

namespace {

template <class T, class Arch>
std::vector<std::int64_t> lengths() {
  const std::int64_t L = static_cast<std::int64_t>(simd::lanes_v<T, Arch>);
  std::vector<std::int64_t> ns{1, L - 1, L, L + 1, 3 * L, 3 * L + 1, 4 * L + 3, 100};
  std::erase(ns, 0);
  return ns;
}

// n values in [-1, 1] preceded by one pad element (so data() + 1 is unaligned)
// and followed by sentinels.
template <class T>
std::vector<T> random_buffer(std::int64_t n, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<T> v(static_cast<std::size_t>(n) + 9, T(7.5));
  for (std::int64_t i = 0; i < n; ++i) v[i + 1] = static_cast<T>(u(gen));
  return v;
}

template <class T>
constexpr double eps = std::numeric_limits<T>::epsilon();

}  // namespace

TEMPLATE_TEST_CASE("kernels::dot matches a double loop", "[simd][vector_ops]", float, double) {
  using T = TestType;
  simd::for_each_arch([&](auto arch) {
    for (std::int64_t n : lengths<T, decltype(arch)>()) {
      CAPTURE(decltype(arch)::name(), n);
      const auto a = random_buffer<T>(n, 1 + n), b = random_buffer<T>(n, 100 + n);
      double ref = 0, mag = 0;
      for (std::int64_t i = 1; i <= n; ++i) {
        ref += double(a[i]) * double(b[i]);
        mag += std::fabs(double(a[i]) * double(b[i]));
      }
      const T got = kernels::dot(arch, a.data() + 1, b.data() + 1, n);
      REQUIRE(std::fabs(double(got) - ref) <= (n + 2) * eps<T> * mag);
    }
    REQUIRE(kernels::dot(arch, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), 0) ==
            T(0));
  });
}

TEMPLATE_TEST_CASE("kernels::axpy adds alpha * x and writes nothing past n", "[simd][vector_ops]",
                   float, double) {
  using T = TestType;
  const T alpha = T(-1.75);
  simd::for_each_arch([&](auto arch) {
    for (std::int64_t n : lengths<T, decltype(arch)>()) {
      CAPTURE(decltype(arch)::name(), n);
      const auto x = random_buffer<T>(n, 3 + n);
      auto y = random_buffer<T>(n, 300 + n);
      const auto y0 = y;
      kernels::axpy(arch, alpha, x.data() + 1, y.data() + 1, n);
      for (std::int64_t i = 1; i <= n; ++i) {
        const double ref = double(y0[i]) + double(alpha) * double(x[i]);
        const double tol = 2 * eps<T> * (std::fabs(double(y0[i])) + std::fabs(alpha * x[i]));
        REQUIRE(std::fabs(double(y[i]) - ref) <= tol);
      }
      REQUIRE(y[0] == y0[0]);
      for (std::size_t i = static_cast<std::size_t>(n) + 1; i < y.size(); ++i)
        REQUIRE(y[i] == T(7.5));
    }
  });
}

TEMPLATE_TEST_CASE("kernels::scale multiplies in place and writes nothing past n",
                   "[simd][vector_ops]", float, double) {
  using T = TestType;
  const T alpha = T(0.3);
  simd::for_each_arch([&](auto arch) {
    for (std::int64_t n : lengths<T, decltype(arch)>()) {
      CAPTURE(decltype(arch)::name(), n);
      auto x = random_buffer<T>(n, 5 + n);
      const auto x0 = x;
      kernels::scale(arch, alpha, x.data() + 1, n);
      for (std::int64_t i = 1; i <= n; ++i) {
        const double ref = double(x0[i]) * double(alpha);
        REQUIRE(std::fabs(double(x[i]) - ref) <= eps<T> * std::fabs(ref));
      }
      REQUIRE(x[0] == x0[0]);
      for (std::size_t i = static_cast<std::size_t>(n) + 1; i < x.size(); ++i)
        REQUIRE(x[i] == T(7.5));
    }
  });
}

TEMPLATE_TEST_CASE("kernels::row_max finds the max wherever it sits", "[simd][vector_ops]", float,
                   double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();
  simd::for_each_arch([&](auto arch) {
    for (std::int64_t n : lengths<T, decltype(arch)>()) {
      CAPTURE(decltype(arch)::name(), n);
      for (std::int64_t p = 0; p < n; ++p) {
        auto x = random_buffer<T>(n, 7 + n);
        x[p + 1] = T(3);  // the pad and sentinels (7.5) lie outside [1, n]
        REQUIRE(kernels::row_max(arch, x.data() + 1, n) == T(3));
        // All entries negative, including -inf ones.
        for (std::int64_t i = 1; i <= n; ++i) x[i] = i % 3 ? -inf : T(-5) - T(i);
        x[p + 1] = T(-2);
        REQUIRE(kernels::row_max(arch, x.data() + 1, n) == T(-2));
      }
      std::vector<T> all_ninf(static_cast<std::size_t>(n), -inf);
      REQUIRE(kernels::row_max(arch, all_ninf.data(), n) == -inf);
    }
    REQUIRE(kernels::row_max(arch, static_cast<const T*>(nullptr), 0) == -inf);
  });
}

TEMPLATE_TEST_CASE("kernels::row_sum matches a double loop", "[simd][vector_ops]", float, double) {
  using T = TestType;
  simd::for_each_arch([&](auto arch) {
    for (std::int64_t n : lengths<T, decltype(arch)>()) {
      CAPTURE(decltype(arch)::name(), n);
      const auto x = random_buffer<T>(n, 11 + n);
      double ref = 0, mag = 0;
      for (std::int64_t i = 1; i <= n; ++i) {
        ref += double(x[i]);
        mag += std::fabs(double(x[i]));
      }
      const T got = kernels::row_sum(arch, x.data() + 1, n);
      REQUIRE(std::fabs(double(got) - ref) <= (n + 2) * eps<T> * mag);
      // Integers sum exactly: catches a dropped or doubled element outright.
      std::vector<T> ints(static_cast<std::size_t>(n));
      for (std::int64_t i = 0; i < n; ++i) ints[i] = T(i + 1);
      REQUIRE(kernels::row_sum(arch, ints.data(), n) == T(n * (n + 1) / 2));
    }
    REQUIRE(kernels::row_sum(arch, static_cast<const T*>(nullptr), 0) == T(0));
  });
}

TEMPLATE_TEST_CASE("simd::hsum_rows puts the sum of row i in lane i", "[simd][vector_ops]", float,
                   double) {
  using T = TestType;
  simd::for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    if constexpr (!simd::is_scalar_v<Arch>) {
      using V = xsimd::batch<T, Arch>;
      constexpr std::size_t L = V::size;
      INFO(Arch::name());
      // Distinct sums per row, from values small enough to add exactly.
      alignas(64) T in[L][L];
      V rows[L];
      for (std::size_t u = 0; u < L; ++u) {
        for (std::size_t i = 0; i < L; ++i) in[u][i] = T(double(u * 3 + 1) + 0.25 * double(i % 5));
        rows[u] = V::load_aligned(in[u]);
      }
      alignas(64) T out[L];
      simd::hsum_rows(rows).store_aligned(out);
      for (std::size_t u = 0; u < L; ++u) {
        double want = 0;
        for (std::size_t i = 0; i < L; ++i) want += double(in[u][i]);
        CHECK(double(out[u]) == want);
      }
    }
  });
}

TEMPLATE_TEST_CASE("kernels::argmax_first: the first maximum, optionally skipping one index",
                   "[simd][vector_ops]", float, double) {
  using T = TestType;
  const T ninf = -std::numeric_limits<T>::infinity();
  simd::for_each_arch([&](auto arch) {
    for (std::int64_t n : lengths<T, decltype(arch)>()) {
      if (n < 2) continue;
      CAPTURE(decltype(arch)::name(), n);
      // values from a small set, so ties are common; the naive first maximum is the reference
      std::mt19937_64 gen(static_cast<std::uint64_t>(n));
      std::uniform_int_distribution<int> u(0, 3);
      for (int trial = 0; trial < 20; ++trial) {
        std::vector<T> x(static_cast<std::size_t>(n));
        for (auto& v : x) v = trial % 5 == 4 ? ninf : T(u(gen));
        for (std::int64_t skip = -1; skip < n; ++skip) {
          std::int64_t want = -1;
          for (std::int64_t i = 0; i < n; ++i)
            if (i != skip && (want < 0 || x[i] > x[want])) want = i;
          REQUIRE(kernels::argmax_first(arch, x.data(), n, skip) == want);
        }
      }
    }
  });
}

TEST_CASE("simd::for_each_arch runs scalar, the build's default arch and each level once",
          "[simd]") {
  std::vector<std::string> names;
  simd::for_each_arch([&](auto arch) { names.emplace_back(decltype(arch)::name()); });
  REQUIRE(!names.empty());
  CHECK(names.front() == "scalar");
  for (std::size_t i = 0; i < names.size(); ++i)
    for (std::size_t j = i + 1; j < names.size(); ++j) CHECK(names[i] != names[j]);
  if constexpr (!simd::is_scalar_v<simd::default_arch>) {
    // The build's own path always runs (its CPU runs this test, so it has the instructions).
    CHECK(std::find(names.begin(), names.end(), simd::default_arch::name()) != names.end());
  }
#if defined(__SSE2__)
  CHECK(std::find(names.begin(), names.end(), "sse2") != names.end());
#endif
  // No intermediate level (the same code as one that runs).
  for (const char* skipped : {"sse3", "ssse3", "sse4.1", "avx512f", "avx512cd"}) {
    CAPTURE(skipped);
    CHECK((std::find(names.begin(), names.end(), skipped) == names.end() ||
           std::string(simd::default_arch::name()) == skipped));
  }
}
