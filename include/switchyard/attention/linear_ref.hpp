#pragma once
// Naive reference of linear attention: plain loops, run in double by the tests.
// It shares no code with the kernels: the feature maps are re-derived here with
// std::exp, and causal attention is the masked quadratic form
//   out_i = sum_{j <= i} w_ij v_j / (sum_{j <= i} w_ij + eps),  w_ij = phi(q_i) . phi(k_j),
// not a chunked or recurrent scan.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "switchyard/attention/linear_feature_maps.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {
namespace ref {

/// x: [D] -> phi(x): [D'] (D' = D, or m = omega rows for favor_plus).
/// omega: [m, D] FAVOR+ directions w_i (unscaled); unused by the other maps.
template <class T>
std::vector<T> linear_feature(FeatureMap fm, std::span<const T> x, ConstView<T, 2> omega,
                              bool is_query) {
  const std::int64_t d = static_cast<std::int64_t>(x.size());
  if (fm == FeatureMap::elu_plus_one) {
    std::vector<T> y(x.size());
    for (std::int64_t c = 0; c < d; ++c) y[c] = x[c] > 0 ? x[c] + 1 : std::exp(x[c]);
    return y;
  }
  if (fm == FeatureMap::relu) {
    std::vector<T> y(x.size());
    for (std::int64_t c = 0; c < d; ++c) y[c] = std::max(x[c], T(0));
    return y;
  }
  const std::int64_t m = omega.extent(0);
  const T scale = std::pow(T(d), T(-0.25));
  std::vector<T> u(static_cast<std::size_t>(m));
  for (std::int64_t i = 0; i < m; ++i) {
    T s = 0;
    for (std::int64_t c = 0; c < d; ++c) s += omega(i, c) * x[c] * scale;
    u[i] = s;
  }
  T sq = 0;
  for (std::int64_t c = 0; c < d; ++c) sq += x[c] * scale * x[c] * scale;
  const T shift = is_query ? *std::max_element(u.begin(), u.end()) : sq / 2;
  // Query: exp(u - |x'|^2/2 - c) with c = max(u) - |x'|^2/2, i.e. exp(u - max u).
  for (auto& e : u) e = std::exp(e - shift) / std::sqrt(T(m));
  return u;
}

/// q [B, T, H, D], k [B, S, H, D], v [B, S, H, Dv] -> out [B, T, H, Dv].
/// causal: key j is seen by query i iff j <= i (needs S == T). key_lengths: empty or [B];
/// keys at positions >= key_lengths[b] get zero features. omega: FAVOR+ [m, D].
template <class T>
void linear_attention(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v, View<T, 4> out,
                      FeatureMap fm, double eps, bool causal,
                      std::span<const std::int64_t> key_lengths = {}, ConstView<T, 2> omega = {}) {
  const std::int64_t nb = q.extent(0), nt = q.extent(1), nh = q.extent(2), d = q.extent(3);
  const std::int64_t ns = k.extent(1), dv = v.extent(3);
  auto row = [d](ConstView<T, 4> x, std::int64_t b, std::int64_t t, std::int64_t h) {
    std::vector<T> r(static_cast<std::size_t>(d));
    for (std::int64_t c = 0; c < d; ++c) r[c] = x(b, t, h, c);
    return r;
  };
  for (std::int64_t b = 0; b < nb; ++b) {
    const std::int64_t klen = key_lengths.empty() ? ns : key_lengths[b];
    for (std::int64_t h = 0; h < nh; ++h) {
      std::vector<std::vector<T>> phik(static_cast<std::size_t>(ns));
      for (std::int64_t j = 0; j < ns; ++j) {
        const auto kj = row(k, b, j, h);
        phik[j] = linear_feature<T>(fm, kj, omega, false);
        if (j >= klen) std::fill(phik[j].begin(), phik[j].end(), T(0));
      }
      for (std::int64_t i = 0; i < nt; ++i) {
        const auto qi = row(q, b, i, h);
        const auto phiq = linear_feature<T>(fm, qi, omega, true);
        std::vector<T> num(static_cast<std::size_t>(dv), T(0));
        T den = 0;
        const std::int64_t jend = causal ? std::min(i + 1, ns) : ns;
        for (std::int64_t j = 0; j < jend; ++j) {
          T w = 0;
          for (std::size_t e = 0; e < phiq.size(); ++e) w += phiq[e] * phik[j][e];
          den += w;
          for (std::int64_t c = 0; c < dv; ++c) num[c] += w * v(b, j, h, c);
        }
        for (std::int64_t c = 0; c < dv; ++c) out(b, i, h, c) = num[c] / (den + T(eps));
      }
    }
  }
}

}  // namespace ref
}  // namespace attention
}  // namespace v0
}  // namespace switchyard
