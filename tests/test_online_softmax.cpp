// Online softmax update (core/simd/online_softmax.hpp) against a two-pass
// softmax in long double, on every arch, for rows split into blocks of various
// sizes, with fully masked (-inf) blocks first.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <random>
#include <switchyard/core/simd/online_softmax.hpp>
#include <vector>

using namespace switchyard;

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();

// Two-pass reference: out[d] = sum_j softmax(s)_j * v[j][d] (s in base-2 units).
std::vector<long double> reference(const std::vector<double>& s, const std::vector<double>& v,
                                   int n, int dim) {
  long double m = -inf;
  for (int j = 0; j < n; ++j) m = std::max<long double>(m, s[j]);
  std::vector<long double> out(dim, 0.0L);
  if (m == -inf) return out;
  long double sum = 0;
  for (int j = 0; j < n; ++j) sum += std::exp2((long double)s[j] - m);
  for (int j = 0; j < n; ++j) {
    const long double p = std::exp2((long double)s[j] - m) / sum;
    for (int d = 0; d < dim; ++d) out[d] += p * v[j * dim + d];
  }
  return out;
}

// Streams the row through online_softmax_update in blocks of `block` and
// returns acc / l via online_softmax_finish.
template <class Arch, class T>
std::vector<T> streamed(const std::vector<double>& s, const std::vector<double>& v, int n, int dim,
                        int block) {
  T m = -std::numeric_limits<T>::infinity(), l = 0;
  std::vector<T> acc(dim, T(0)), p(block), out(dim);
  for (int j0 = 0; j0 < n; j0 += block) {
    const int nb = std::min(block, n - j0);
    for (int j = 0; j < nb; ++j) p[j] = T(s[j0 + j]);
    const T alpha = kernels::online_softmax_update(Arch{}, p.data(), nb, m, l);
    for (int d = 0; d < dim; ++d) {
      T a = acc[d] * alpha;
      for (int j = 0; j < nb; ++j) a += p[j] * T(v[(j0 + j) * dim + d]);
      acc[d] = a;
    }
  }
  kernels::online_softmax_finish(Arch{}, acc.data(), dim, l, out.data());
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("online softmax matches a two-pass softmax on every arch", "[online_softmax]",
                   float, double) {
  using T = TestType;
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> score(-20.0, 20.0), value(-1.0, 1.0);
  const int dim = 3;
  // n and block sizes straddle every lane count (1, 2, 4, 8, 16).
  for (int n : {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100}) {
    for (int block : {1, 3, 4, 8, 16, 17, 64}) {
      for (int masked_blocks : {0, 1, 2}) {
        std::vector<double> s(n), v(n * dim);
        for (auto& x : s) x = score(rng);
        for (auto& x : v) x = value(rng);
        // The first masked_blocks blocks are fully masked; a few scattered -inf too.
        for (int j = 0; j < std::min(n, masked_blocks * block); ++j) s[j] = -inf;
        if (n > 5) s[n - 2] = -inf;
        // An increasing ramp forces the max to grow in later blocks (alpha < 1).
        if (n > 10) s[n - 1] = 25.0;
        const auto ref = reference(s, v, n, dim);
        simd::for_each_arch([&](auto arch) {
          using Arch = decltype(arch);
          CAPTURE(Arch::name(), n, block, masked_blocks);
          const auto got = streamed<Arch, T>(s, v, n, dim, block);
          // Error sources, relative to max|v| = 1: rounding of the scores to T (|s| <= 25:
          // 25 eps in the exponent), exp2 (<= 2 ulp), the running sums (<= n eps), the
          // rescale and the final division (a few eps). 4x margin.
          const double eps = std::numeric_limits<T>::epsilon();
          const double tol = 4 * eps * (25 * std::log(2.0) + 2 + n + 4);
          for (int d = 0; d < dim; ++d) {
            REQUIRE(std::isfinite(double(got[d])));
            REQUIRE(std::abs(double(got[d]) - double(ref[d])) <= tol);
          }
        });
      }
    }
  }
}

TEMPLATE_TEST_CASE("online softmax: a fully masked row stays at m=-inf, l=0 and gives zeros",
                   "[online_softmax]", float, double) {
  using T = TestType;
  simd::for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    CAPTURE(Arch::name());
    T m = -std::numeric_limits<T>::infinity(), l = 0;
    std::vector<T> s(37, -std::numeric_limits<T>::infinity());
    for (int rep = 0; rep < 3; ++rep) {
      const T alpha = kernels::online_softmax_update(Arch{}, s.data(), 37, m, l);
      REQUIRE(alpha == T(1));
      REQUIRE(m == -std::numeric_limits<T>::infinity());
      REQUIRE(l == T(0));
      for (T p : s) REQUIRE(p == T(0));
      std::fill(s.begin(), s.end(), -std::numeric_limits<T>::infinity());
    }
    std::vector<T> acc(5, T(0)), out(5, T(7));
    kernels::online_softmax_finish(Arch{}, acc.data(), 5, l, out.data());
    for (T o : out) REQUIRE(o == T(0));
  });
}

TEMPLATE_TEST_CASE("online softmax: exp2_nonpositive is within 2 ulp of exp2", "[online_softmax]",
                   float, double) {
  using T = TestType;
  std::vector<T> xs;
  for (int i = 0; i <= 20000; ++i) xs.push_back(T(-120.0 * i / 20000.0));
  xs.push_back(-std::numeric_limits<T>::infinity());
  simd::for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    CAPTURE(Arch::name());
    for (T x : xs) {
      T got;
      if constexpr (simd::is_scalar_v<Arch>) {
        got = simd::exp2_nonpositive(x);
      } else {
        got = simd::exp2_nonpositive(xsimd::batch<T, Arch>(x)).get(0);
      }
      const long double want = std::exp2((long double)x);
      CAPTURE(x, got, (double)want);
      if (std::isinf(x)) {
        REQUIRE(got == T(0));
        continue;
      }
      // Double goes through exp(x ln 2): the product rounds with relative error eps,
      // i.e. |x ln 2| eps absolute in the exponent, on top of exp's 2 ulp.
      const double eps = std::numeric_limits<T>::epsilon();
      const double ulps = std::is_same_v<T, float> ? 2.0 : 2.0 + std::abs(double(x));
      REQUIRE(std::abs((long double)got - want) <= ulps * eps * want);
    }
  });
}

TEMPLATE_TEST_CASE("online_softmax_finish_stream writes acc / l like online_softmax_finish",
                   "[online_softmax]", float, double) {
  using T = TestType;
  simd::for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    const bool non_temporal = simd::has_stream_store<Arch, T>();
    CAPTURE(Arch::name(), non_temporal);
    std::mt19937 rng(5);
    std::uniform_real_distribution<double> u(-3.0, 3.0);
    // Aligned rows (the non-temporal path where the arch has one), a row one element off
    // alignment, a strided row and lengths that are not a multiple of the register width.
    for (const std::int64_t d : {0, 1, 16, 64, 70})
      for (const std::int64_t offset : {0, 1})
        for (const std::int64_t stride : {1, 3})
          for (const double l : {0.0, 0.75, 37.5}) {
            CAPTURE(d, offset, stride, l);
            std::vector<T> acc(std::size_t(d) + 1);
            for (auto& a : acc) a = T(u(rng));
            std::vector<T, xsimd::aligned_allocator<T, 64>> got(std::size_t(d * stride + 80),
                                                                T(-9)),
                plain(got.size(), T(-9));
            kernels::online_softmax_finish_stream(Arch{}, acc.data(), d, T(l), got.data() + offset,
                                                  stride);
            simd::stream_fence();
            kernels::online_softmax_finish(Arch{}, acc.data(), d, T(l), plain.data() + offset,
                                           stride);
            const double eps = std::numeric_limits<T>::epsilon();
            for (std::int64_t i = 0; i < std::int64_t(got.size()); ++i) {
              const std::int64_t j = (i - offset) / stride;
              const bool written = i >= offset && (i - offset) % stride == 0 && j < d;
              if (!written) {
                REQUIRE(got[std::size_t(i)] == T(-9));
                continue;
              }
              const double want = l > 0 ? double(acc[std::size_t(j)]) / l : 0.0;
              REQUIRE(std::abs(double(got[std::size_t(i)]) - want) <= 2 * eps * std::abs(want));
              REQUIRE(got[std::size_t(i)] == plain[std::size_t(i)]);
            }
          }
  });
}
