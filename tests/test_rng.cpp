// Rng (Philox4x32-10): Random123's known-answer vectors, the documented
// counter/key layout, determinism, fills that do not depend on chunking or the
// thread count, and distribution sanity with generous (6 sigma) bounds.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <set>
#include <vector>

#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/rng.hpp"
#include "switchyard/core/tensor.hpp"

using namespace switchyard;

TEST_CASE("philox4x32_10 reproduces Random123's known-answer vectors", "[rng]") {
  // Random123 tests/kat_vectors, the three "philox4x32 10" lines: CTR (4 words), KEY (2), EXPECTED
  // (4).
  using W4 = std::array<std::uint32_t, 4>;
  using W2 = std::array<std::uint32_t, 2>;
  REQUIRE(core::philox4x32_10(W4{0, 0, 0, 0}, W2{0, 0}) ==
          W4{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  REQUIRE(core::philox4x32_10(W4{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
                              W2{0xffffffffu, 0xffffffffu}) ==
          W4{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  REQUIRE(core::philox4x32_10(W4{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
                              W2{0xa4093822u, 0x299f31d0u}) ==
          W4{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});
  // Usable at compile time.
  static_assert(core::philox4x32_10({0, 0, 0, 0}, {0, 0})[0] == 0x6627e8d5u);
}

TEST_CASE("Rng maps (seed, stream, position) to Philox blocks as documented", "[rng]") {
  const Rng rng(0x299f31d0a4093822ull, 0x0370734413198a2eull);
  // Block 0x85a308d3243f6a88 with this seed and stream is the third known-answer vector.
  const std::uint64_t b = 0x85a308d3243f6a88ull;
  REQUIRE(rng.block(b) ==
          std::array<std::uint32_t, 4>{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});
  // Seed 0, stream 0: block 0 is the first known-answer vector.
  const Rng zero(0);
  REQUIRE(zero.uint32(0) == 0x6627e8d5u);
  REQUIRE(zero.uint32(3) == 0x9b00dbd8u);
  REQUIRE(zero.uint64(0) == 0xe169c58d6627e8d5ull);
  REQUIRE(zero.uint64(1) == 0x9b00dbd8bc57ac4cull);
  REQUIRE(zero.uint32(4) == zero.block(1)[0]);
  REQUIRE(zero.uint64(3) == (std::uint64_t{zero.block(1)[3]} << 32 | zero.block(1)[2]));
  // Top bits, scaled: hand-computed from the words above.
  REQUIRE(Rng(0).uniform<float>(0) == static_cast<float>(0x6627e8d5u >> 8) / 16777216.0f);
  REQUIRE(Rng(0).uniform<double>(1) ==
          static_cast<double>(0x9b00dbd8bc57ac4cull >> 11) / 9007199254740992.0);
  // Box-Muller from the two 64-bit halves of block 0, written out independently.
  const double u1 = static_cast<double>((0xe169c58d6627e8d5ull >> 11) + 1) / 9007199254740992.0;
  const double u2 = static_cast<double>(0x9b00dbd8bc57ac4cull >> 11) / 9007199254740992.0;
  const double rad = std::sqrt(-2.0 * std::log(u1));
  REQUIRE(Rng(0).normal<double>(0) == rad * std::cos(6.283185307179586 * u2));
  REQUIRE(Rng(0).normal<double>(1) == rad * std::sin(6.283185307179586 * u2));
  REQUIRE(Rng(0).normal<float>(1) == static_cast<float>(Rng(0).normal<double>(1)));
}

TEST_CASE("Rng is deterministic; seeds, streams and positions differ", "[rng]") {
  const Rng a(42, 7), b(42, 7);
  std::set<std::uint64_t> seen;
  for (std::uint64_t i = 0; i < 1000; ++i) {
    REQUIRE(a.uint64(i) == b.uint64(i));
    REQUIRE(a.normal<float>(i) == b.normal<float>(i));
    seen.insert(a.uint64(i));
    seen.insert(Rng(43, 7).uint64(i));
    seen.insert(Rng(42, 8).uint64(i));
  }
  REQUIRE(seen.size() == 3000);  // 64-bit collisions among 3000 draws: ~2e-13 chance
}

TEMPLATE_TEST_CASE("uniform and normal: range and moments", "[rng]", float, double) {
  using T = TestType;
  const std::int64_t n = 200000;
  Tensor<T> u({n}), z({n});
  fill_uniform(u, 2024, 1);
  fill_normal(z, 2024, 2);
  double su = 0, su2 = 0, sz = 0, sz2 = 0, sz4 = 0;
  std::int64_t within1 = 0;
  T umin = 1, umax = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double x = u[i], y = z[i];
    umin = std::min(umin, u[i]);
    umax = std::max(umax, u[i]);
    su += x;
    su2 += x * x;
    sz += y;
    sz2 += y * y;
    sz4 += y * y * y * y;
    within1 += std::fabs(y) < 1.0;
    REQUIRE(std::isfinite(y));
  }
  REQUIRE(umin >= T(0));
  REQUIRE(umax < T(1));
  REQUIRE(umin < T(0.001));
  REQUIRE(umax > T(0.999));
  const double mean_u = su / n, var_u = su2 / n - mean_u * mean_u;
  REQUIRE(std::fabs(mean_u - 0.5) < 6 * std::sqrt(1.0 / 12 / n));
  REQUIRE(std::fabs(var_u - 1.0 / 12) < 6 * std::sqrt(1.0 / 180 / n));  // Var of u^2-ish term
  const double mean_z = sz / n, var_z = sz2 / n - mean_z * mean_z;
  REQUIRE(std::fabs(mean_z) < 6 / std::sqrt(double(n)));
  REQUIRE(std::fabs(var_z - 1.0) < 6 * std::sqrt(2.0 / n));
  REQUIRE(std::fabs(sz4 / n - 3.0) < 6 * std::sqrt(96.0 / n));  // kurtosis of a normal
  const double p1 = 0.6826894921370859;                         // P(|Z| < 1)
  REQUIRE(std::fabs(double(within1) / n - p1) < 6 * std::sqrt(p1 * (1 - p1) / n));
}

TEMPLATE_TEST_CASE("fills: element i depends only on (seed, stream, offset + i)", "[rng]", float,
                   double) {
  using T = TestType;
  const std::int64_t rows = 37, cols = 1001, total = rows * cols;
  for (int normal = 0; normal < 2; ++normal) {
    CAPTURE(normal);
    auto fill1 = [&](View<T, 1> v, std::uint64_t off) {
      normal ? fill_normal(v, 9, 3, off) : fill_uniform(v, 9, 3, off);
    };
    auto fill2 = [&](View<T, 2> v, std::uint64_t off) {
      normal ? fill_normal(v, 9, 3, off) : fill_uniform(v, 9, 3, off);
    };
    // Whole fill with 1 thread and with 2 threads: same bits.
    Tensor<T> whole1({total}), whole2({total});
    {
      ScopedNumThreads t(1);
      fill1(whole1, 5);
    }
    {
      ScopedNumThreads t(2);
      fill1(whole2, 5);
    }
    REQUIRE(std::equal(whole1.begin(), whole1.end(), whole2.begin()));
    // Each element equals the per-position accessor.
    const Rng rng(9, 3);
    for (std::int64_t i = 0; i < total; i += 97) {
      REQUIRE(whole1[i] == (normal ? rng.normal<T>(5 + i) : rng.uniform<T>(5 + i)));
    }
    // Chunked fills with odd sizes and offsets reproduce the whole fill.
    Tensor<T> chunked({total});
    View<T, 1> cv = chunked;
    for (std::int64_t begin = 0; begin < total;) {
      const std::int64_t end = std::min(total, begin + 1 + begin % 1237);
      fill1(cv.slice(0, begin, end), 5 + begin);
      begin = end;
    }
    REQUIRE(std::equal(whole1.begin(), whole1.end(), chunked.begin()));
    // A padded 2-D view numbers its elements row-major, ignoring the padding.
    Tensor<T> padded({rows, cols + 3});
    padded.fill(T(-7));
    View<T, 2> pv = padded;
    fill2(pv.slice(1, 0, cols), 5);
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t c = 0; c < cols; ++c) REQUIRE(padded(r, c) == whole1[r * cols + c]);
      for (std::int64_t c = cols; c < cols + 3; ++c) REQUIRE(padded(r, c) == T(-7));
    }
  }
}

TEMPLATE_TEST_CASE("fill_normal with a mean and a standard deviation", "[rng]", float, double) {
  using T = TestType;
  const std::int64_t n = 5000;
  Tensor<T> standard({n}), scaled({n});
  fill_normal(standard, 11, 2, 7);
  fill_normal(scaled, {.mean = 3.0, .stddev = 0.02}, 11, 2, 7);
  // Position by position: the same draw z, mapped to mean + stddev * z (in double, then T).
  // For float that is within rounding of the float z; for double the z are the same bits.
  for (std::int64_t i = 0; i < n; ++i) {
    const double want = 3.0 + 0.02 * double(standard[i]);
    REQUIRE(std::abs(double(scaled[i]) - want) <= 4 * std::numeric_limits<T>::epsilon() * 3.0);
  }
  // The sample moments follow: mean 3 within 4 sigma / sqrt(n), stddev within 5 %.
  double m = 0, v = 0;
  for (auto x : scaled) m += double(x);
  m /= double(n);
  for (auto x : scaled) v += (double(x) - m) * (double(x) - m);
  CHECK(std::abs(m - 3.0) < 4 * 0.02 / std::sqrt(double(n)));
  CHECK(std::abs(std::sqrt(v / double(n - 1)) - 0.02) < 0.02 * 0.05);
  // mean 0, stddev 1 gives exactly the standard fill; 2-D views number row-major.
  Tensor<T> unit({n});
  fill_normal(unit, {}, 11, 2, 7);
  CHECK(std::equal(unit.begin(), unit.end(), standard.begin()));
  Tensor<T> grid({50, 100});
  fill_normal(View<T, 2>(grid), {.mean = 3.0, .stddev = 0.02}, 11, 2, 7);
  CHECK(std::equal(grid.begin(), grid.end(), scaled.begin()));
  // A constant: stddev 0.
  fill_normal(unit, {.mean = -1.5, .stddev = 0}, 1);
  CHECK(std::all_of(unit.begin(), unit.end(), [](T x) { return x == T(-1.5); }));
  CHECK_THROWS_AS(fill_normal(unit, {.mean = 0, .stddev = -1}, 1), config_error);
  CHECK_THROWS_WITH(fill_normal(unit, {.mean = std::nan(""), .stddev = 1}, 1),
                    Catch::Contains("fill_normal") && Catch::Contains("stddev"));
  CHECK_THROWS_AS(fill_normal(unit, {.mean = 0, .stddev = INFINITY}, 1), config_error);
}
