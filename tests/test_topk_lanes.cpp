// kernels::topk_lanes / topk_rows_lanes (core/simd/topk_lanes.hpp) against core's
// row kernels (core/topk.hpp) on every arch this TU supports (plus scalar), float
// and double: k = 1..8, n around the lane count and larger, with deliberate ties,
// -0.0 / +0.0, -inf, NaN (including rows with fewer than k numbers), and the row
// driver with skipped (unrouted) rows holding NaN.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/topk_lanes.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/topk.hpp"

using namespace switchyard;

namespace {

enum class Fill { random, ties, neg_inf, nan_some, nan_most };

template <class T>
std::vector<T> make_row(std::mt19937& rng, std::int64_t n, Fill fill) {
  std::vector<T> x(static_cast<std::size_t>(n));
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> small(-2, 2), pick(0, 9);
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  for (auto& v : x) {
    switch (fill) {
      case Fill::random:
        v = static_cast<T>(normal(rng));
        break;
      case Fill::ties: {  // few distinct values, signed zeros among them
        const int s = small(rng);
        v = s == 0 ? (pick(rng) < 5 ? T(0) : -T(0)) : static_cast<T>(s);
        break;
      }
      case Fill::neg_inf:
        v = pick(rng) < 5 ? -inf : static_cast<T>(small(rng));
        break;
      case Fill::nan_some:
        v = pick(rng) < 2 ? nan : (pick(rng) < 2 ? -inf : static_cast<T>(small(rng)));
        break;
      case Fill::nan_most:  // often fewer than k numbers
        v = pick(rng) < 8 ? nan : static_cast<T>(small(rng));
        break;
    }
  }
  return x;
}

template <class T>
bool same_value(T a, T b) {
  return std::isnan(a) ? std::isnan(b) : (a == b && std::signbit(a) == std::signbit(b));
}

// core's row kernel for k (argmax for k = 1, insertion up to 8), as core::topk picks.
template <class T>
void core_row(const T* x, std::int64_t n, std::int64_t k, std::int64_t* ix, T* vx) {
  if (k == 1) {
    kernels::argmax_row(x, n, ix, vx);
  } else {
    kernels::topk_row_insertion(x, n, k, ix, vx);
  }
}

template <class T, class Arch>
void check_lanes(Arch arch, std::int64_t n, std::int64_t k, Fill fill, std::mt19937& rng) {
  constexpr auto L = static_cast<std::int64_t>(simd::lanes_v<T, Arch>);
  std::vector<std::vector<T>> rows;
  for (std::int64_t l = 0; l < L; ++l) rows.push_back(make_row<T>(rng, n, fill));
  std::vector<T> tile(static_cast<std::size_t>(n * L));
  for (std::int64_t e = 0; e < n; ++e)
    for (std::int64_t l = 0; l < L; ++l) tile[e * L + l] = rows[l][e];
  std::vector<T> val(static_cast<std::size_t>(8 * L)), idx(static_cast<std::size_t>(8 * L));
  kernels::topk_lanes(arch, k, tile.data(), n, val.data(), idx.data());
  for (std::int64_t l = 0; l < L; ++l) {
    std::int64_t ix[8];
    T vx[8];
    core_row(rows[l].data(), n, k, ix, vx);
    // core::topk itself agrees with its row kernels.
    Tensor<T> x({1, n});
    std::copy(rows[l].begin(), rows[l].end(), x.begin());
    const auto full = core::topk<T>(x, k);
    for (std::int64_t j = 0; j < k; ++j) {
      CAPTURE(l, j);
      REQUIRE(full.indices(0, j) == ix[j]);
      REQUIRE(static_cast<std::int64_t>(idx[j * L + l]) == ix[j]);
      REQUIRE(same_value(val[j * L + l], vx[j]));
    }
  }
}

template <class Arch, class T>
std::vector<std::int64_t> lengths() {
  const auto L = static_cast<std::int64_t>(simd::lanes_v<T, Arch>);
  std::vector<std::int64_t> out;
  for (std::int64_t n :
       {std::int64_t{1}, L - 1, L, L + 1, 3 * L + 1, std::int64_t{64}, std::int64_t{256}}) {
    if (n >= 1 && std::find(out.begin(), out.end(), n) == out.end()) out.push_back(n);
  }
  return out;
}

template <class T>
void run_kernel_cases() {
  std::mt19937 rng(1234);
  simd::for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    for (std::int64_t n : lengths<Arch, T>()) {
      for (std::int64_t k = 1; k <= std::min<std::int64_t>(8, n); ++k) {
        for (Fill fill :
             {Fill::random, Fill::ties, Fill::neg_inf, Fill::nan_some, Fill::nan_most}) {
          CAPTURE(Arch::name(), n, k, static_cast<int>(fill));
          for (int rep = 0; rep < 3; ++rep) check_lanes<T>(arch, n, k, fill, rng);
        }
      }
    }
  });
}

template <class T>
void run_driver_cases() {
  std::mt19937 rng(99);
  simd::for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    const auto L = static_cast<std::int64_t>(simd::lanes_v<T, Arch>);
    for (std::int64_t n : lengths<Arch, T>()) {
      for (std::int64_t k : {std::int64_t{1}, std::int64_t{3}, std::int64_t{8}, std::int64_t{9}}) {
        if (k > n) continue;
        CAPTURE(Arch::name(), n, k);
        const std::int64_t rows = 3 * L + 2, stride = n + 3, r0 = 1, r1 = rows - 1;
        std::vector<T> src(static_cast<std::size_t>(rows * stride),
                           std::numeric_limits<T>::quiet_NaN());
        for (std::int64_t r = 0; r < rows; ++r) {
          const auto row = make_row<T>(rng, n, r % 3 == 0 ? Fill::ties : Fill::nan_some);
          std::copy(row.begin(), row.end(), src.begin() + r * stride);
        }
        // Every 4th row is skipped and filled with NaN: it must neither be visited
        // nor disturb its neighbours in the same tile.
        const auto routed = [](std::int64_t r) { return r % 4 != 2; };
        for (std::int64_t r = 0; r < rows; ++r) {
          if (!routed(r))
            std::fill_n(src.begin() + r * stride, n, std::numeric_limits<T>::quiet_NaN());
        }
        std::vector<std::int64_t> visited;
        std::vector<std::pair<T, std::int64_t>> scratch;
        kernels::topk_rows_lanes<T, Arch>(
            src.data(), stride, r0, r1, n, k, routed,
            [&](std::int64_t r, auto&& index_of, auto&& value_of) {
              visited.push_back(r);
              std::vector<std::int64_t> ix(static_cast<std::size_t>(k));
              std::vector<T> vx(static_cast<std::size_t>(k));
              const T* p = src.data() + r * stride;
              if (k <= 8) {
                core_row(p, n, k, ix.data(), vx.data());
              } else {
                kernels::topk_row_select(p, n, k, ix.data(), vx.data(), scratch);
              }
              for (std::int64_t j = 0; j < k; ++j) {
                CAPTURE(r, j);
                REQUIRE(static_cast<std::int64_t>(index_of(j)) == ix[j]);
                REQUIRE(same_value(value_of(j), vx[j]));
              }
            });
        std::vector<std::int64_t> want;
        for (std::int64_t r = r0; r < r1; ++r)
          if (routed(r)) want.push_back(r);
        REQUIRE(visited == want);
      }
    }
  });
}

}  // namespace

TEST_CASE("topk_lanes matches core's row kernels on every arch (float)", "[topk_lanes]") {
  run_kernel_cases<float>();
}

TEST_CASE("topk_lanes matches core's row kernels on every arch (double)", "[topk_lanes]") {
  run_kernel_cases<double>();
}

TEST_CASE("topk_rows_lanes visits the routed rows in order with core's top-k (float)",
          "[topk_lanes]") {
  run_driver_cases<float>();
}

TEST_CASE("topk_rows_lanes visits the routed rows in order with core's top-k (double)",
          "[topk_lanes]") {
  run_driver_cases<double>();
}
