#pragma once
// Random experts in the MoE layer's layouts and a naive double-precision expert, shared by the
// MoE layer and Soft MoE tests.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "support/compare.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/experts.hpp"

namespace test_support {

template <class T>
struct OwnedExperts {
  switchyard::Tensor<T> w1, w3, w2, b1, b3, b2;
  switchyard::moe::ExpertWeights<T> view() const {
    switchyard::moe::ExpertWeights<T> w;
    w.w1 = w1;
    w.w2 = w2;
    if (!w3.empty()) w.w3 = w3;
    if (!b1.empty()) w.b1 = b1;
    if (!b3.empty()) w.b3 = b3;
    if (!b2.empty()) w.b2 = b2;
    return w;
  }
};

template <class T>
OwnedExperts<T> random_experts(std::int64_t n, std::int64_t d, std::int64_t f,
                               switchyard::moe::Activation act, bool biases, std::uint32_t seed) {
  OwnedExperts<T> w;
  const double s1 = 1.0 / std::sqrt(double(d)), s2 = 1.0 / std::sqrt(double(f));
  w.w1 = random_tensor<T>({n, f, d}, seed, s1);
  w.w2 = random_tensor<T>({n, d, f}, seed + 1, s2);
  if (act == switchyard::moe::Activation::swiglu) w.w3 = random_tensor<T>({n, f, d}, seed + 2, s1);
  if (biases) {
    w.b1 = random_tensor<T>({n, f}, seed + 3, 0.5);
    w.b2 = random_tensor<T>({n, d}, seed + 4, 0.5);
    if (act == switchyard::moe::Activation::swiglu) w.b3 = random_tensor<T>({n, f}, seed + 5, 0.5);
  }
  return w;
}

/// Naive expert e on one token, in double.
template <class T>
std::vector<double> ref_expert(const OwnedExperts<T>& w, std::int64_t e,
                               switchyard::moe::Activation act, bool out_softmax,
                               const std::vector<double>& x) {
  const std::int64_t f = w.w1.extent(1), d = w.w1.extent(2);
  std::vector<double> h(std::size_t(f), 0.0), y(std::size_t(d), 0.0);
  for (std::int64_t j = 0; j < f; ++j) {
    double g = 0, u = 0;
    for (std::int64_t p = 0; p < d; ++p) {
      g += double(w.w1(e, j, p)) * x[p];
      if (act == switchyard::moe::Activation::swiglu) u += double(w.w3(e, j, p)) * x[p];
    }
    if (!w.b1.empty()) g += double(w.b1(e, j));
    if (!w.b3.empty()) u += double(w.b3(e, j));
    switch (act) {
      case switchyard::moe::Activation::swiglu:
        h[j] = g / (1.0 + std::exp(-g)) * u;
        break;
      case switchyard::moe::Activation::gelu:
        h[j] = 0.5 * g * (1.0 + std::erf(g / std::sqrt(2.0)));
        break;
      case switchyard::moe::Activation::relu:
        h[j] = std::max(g, 0.0);
        break;
    }
  }
  for (std::int64_t i = 0; i < d; ++i) {
    double s = w.b2.empty() ? 0.0 : double(w.b2(e, i));
    for (std::int64_t j = 0; j < f; ++j) s += double(w.w2(e, i, j)) * h[j];
    y[i] = s;
  }
  if (out_softmax) {
    const double m = *std::max_element(y.begin(), y.end());
    double z = 0;
    for (auto& v : y) z += (v = std::exp(v - m));
    for (auto& v : y) v /= z;
  }
  return y;
}

}  // namespace test_support
