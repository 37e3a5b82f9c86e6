#pragma once
// Small helpers shared by layer tests: random inputs and error measures in double.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <random>
#include <vector>

#include "switchyard/core/tensor.hpp"

namespace test_support {

template <class T>
std::vector<double> to_double(const switchyard::Tensor<T>& t) {
  return std::vector<double>(t.begin(), t.end());
}
template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

/// A tensor of N(0, sd^2) draws from std::mt19937(seed).
template <class T>
switchyard::Tensor<T> random_tensor(std::initializer_list<std::int64_t> shape, std::uint32_t seed,
                                    double sd = 1.0) {
  switchyard::Tensor<T> t(shape);
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, sd);
  for (auto& v : t) v = T(nd(gen));
  return t;
}

/// A rank-4 tensor of U(-1, 1) draws from std::mt19937(seed).
template <class T>
switchyard::Tensor<T> uniform_tensor(switchyard::Shape<4> shape, std::uint32_t seed) {
  switchyard::Tensor<T> t(shape);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (auto& x : t) x = T(u(rng));
  return t;
}

inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

/// Max of |got - want| / max(|want|, floor): relative error, with `floor` keeping entries that
/// are (near) zero from dividing by ~0.
inline double max_rel_err(const std::vector<double>& got, const std::vector<double>& want,
                          double floor) {
  REQUIRE(got.size() == want.size());
  double e = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    e = std::max(e, std::abs(got[i] - want[i]) / std::max(std::abs(want[i]), floor));
  return e;
}

}  // namespace test_support
