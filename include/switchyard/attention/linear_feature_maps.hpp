#pragma once
// Feature maps phi of kernelised (linear) attention, which replaces
// softmax(q.k) by phi(q).phi(k):
//
//   elu_plus_one  phi(x) = elu(x) + 1 = (x > 0 ? x + 1 : exp(x))      D' = D
//                 (fast-transformers' default; always positive)
//   relu          phi(x) = max(x, 0)                                   D' = D
//   favor_plus    positive random features (Performer, FAVOR+)         D' = m
//                 phi(x)_i = exp(w_i.x' - |x'|^2/2 - c(x)) / sqrt(m), x' = x / D^(1/4)
//
// FAVOR+: E_w[exp(w.q' - |q'|^2/2) exp(w.k' - |k'|^2/2)] = exp(q.k / sqrt(D)) for
// w ~ N(0, I_D), so phi(q).phi(k) estimates the softmax kernel with the usual
// 1/sqrt(D) temperature. The rows w_i (projection [m, D]) are drawn once, from
// core::Rng with the configured seed; with `orthogonal` they come in blocks of D
// exactly orthogonal directions (Gram-Schmidt of a Gaussian block) whose norms
// are redrawn as norms of independent Gaussian vectors (Performer's scaling=0).
// Stabiliser c(x): keys use c = 0, which needs none, because
// w.k' - |k'|^2/2 = |w|^2/2 - |w - k'|^2/2 <= |w|^2/2 (about 32 for D = 64; exp
// overflows float only past 88). Queries use c = max_i (w_i.q') - |q'|^2/2, a
// per-query constant that cancels between numerator and denominator (exactly,
// apart from eps), so no query's features can all underflow; the largest is 1/sqrt(m).
// The same maps are used by every path (non-causal, chunked, recurrent step),
// so they agree with each other and with the reference.
#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "switchyard/attention/linear_kernels.hpp"
#include "switchyard/core/rng.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/exp.hpp"
#include "switchyard/core/tensor.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// Feature map of linear attention; see the file comment for formulas.
enum class FeatureMap { elu_plus_one, relu, favor_plus };

/// "elu_plus_one", "relu" or "favor_plus".
constexpr std::string_view to_string(FeatureMap f) noexcept {
  switch (f) {
    case FeatureMap::elu_plus_one:
      return "elu_plus_one";
    case FeatureMap::relu:
      return "relu";
    case FeatureMap::favor_plus:
      return "favor_plus";
  }
  return "unknown";
}

/// FAVOR+ projection: omega [m, D] holds the rows w_i; omega_t_scaled [D, m] holds
/// D^(-1/4) w_i as columns, the operand the kernels multiply with (x' = x / D^(1/4)).
template <class T>
struct FavorProjection {
  std::int64_t dim = 0;           // D
  std::int64_t num_features = 0;  // m
  Tensor<T> omega;                // [m, D]
  Tensor<T> omega_t_scaled;       // [D, m]
};

/// Draws the FAVOR+ projection for head dim `dim` (D) and `num_features` (m) from
/// core::Rng(seed): i.i.d. rows are normals 0 .. m*D-1 of stream 0; orthogonal blocks
/// take block b from normals b*D*D .. (b+1)*D*D-1 of stream 0 and the row norms from
/// stream 1. Computed in double, then rounded to T, so float and double layers with
/// the same seed use the same directions. Requires dim, num_features >= 1.
template <class T>
FavorProjection<T> make_favor_projection(std::int64_t dim, std::int64_t num_features,
                                         std::uint64_t seed, bool orthogonal) {
  const std::int64_t d = dim, m = num_features;
  if (d < 1 || m < 1)
    switchyard::detail::fail_config("attention", "make_favor_projection",
                                    d < 1 ? "dim" : "num_features", d < 1 ? d : m, ">= 1");
  // [m, D] directions and, when orthogonal, D x D Gaussian blocks, in double.
  switchyard::detail::checked_size("attention", "make_favor_projection", "num_features", {m, d},
                                   sizeof(double));
  switchyard::detail::checked_size("attention", "make_favor_projection", "dim", {d, d},
                                   sizeof(double));
  auto normals = [seed](std::vector<double>& dst, std::uint64_t stream, std::uint64_t offset) {
    core::fill_normal(View<double, 1>(dst.data(), {static_cast<std::int64_t>(dst.size())}), seed,
                      stream, offset);
  };
  std::vector<double> w(static_cast<std::size_t>(m * d));
  if (!orthogonal) {
    normals(w, 0, 0);  // row i, column c: normal number i * D + c of stream 0
  } else {
    // Blocks of D orthonormal rows (modified Gram-Schmidt of a Gaussian D x D
    // block; a Gaussian block has full rank with probability 1), the last block cut to size.
    std::vector<double> block(static_cast<std::size_t>(d * d));
    for (std::int64_t r0 = 0; r0 < m; r0 += d) {
      normals(block, 0, static_cast<std::uint64_t>(r0 * d));  // block r0 / D: numbers r0 * D ...
      for (std::int64_t i = 0; i < d; ++i) {
        double* bi = block.data() + i * d;
        for (std::int64_t j = 0; j < i; ++j) {
          const double* bj = block.data() + j * d;
          double p = 0;
          for (std::int64_t c = 0; c < d; ++c) p += bi[c] * bj[c];
          for (std::int64_t c = 0; c < d; ++c) bi[c] -= p * bj[c];
        }
        double nrm = 0;
        for (std::int64_t c = 0; c < d; ++c) nrm += bi[c] * bi[c];
        nrm = std::sqrt(nrm);
        for (std::int64_t c = 0; c < d; ++c) bi[c] /= nrm;
      }
      const std::int64_t rows = std::min(d, m - r0);
      std::copy_n(block.begin(), rows * d, w.begin() + r0 * d);
    }
    // Norms of independent Gaussian vectors, so |w_i| has the same law as without orthogonality.
    std::vector<double> g(static_cast<std::size_t>(m * d));
    normals(g, 1, 0);  // stream 1
    for (std::int64_t i = 0; i < m; ++i) {
      double nrm = 0;
      for (std::int64_t c = 0; c < d; ++c) nrm += g[i * d + c] * g[i * d + c];
      nrm = std::sqrt(nrm);
      for (std::int64_t c = 0; c < d; ++c) w[i * d + c] *= nrm;
    }
  }
  FavorProjection<T> p;
  p.dim = d;
  p.num_features = m;
  p.omega = Tensor<T>({m, d});
  p.omega_t_scaled = Tensor<T>({d, m});
  const double scale = std::pow(double(d), -0.25);
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t c = 0; c < d; ++c) {
      p.omega(i, c) = static_cast<T>(w[i * d + c]);
      p.omega_t_scaled(c, i) = static_cast<T>(w[i * d + c] * scale);
    }
  }
  return p;
}

/// Feature dimension D' of a map: D for elu_plus_one and relu, m for favor_plus.
constexpr std::int64_t feature_dim(FeatureMap f, std::int64_t dim,
                                   std::int64_t num_features) noexcept {
  return f == FeatureMap::favor_plus ? num_features : dim;
}

}  // namespace attention

namespace kernels {

/// src: `rows` rows of `dim` values, element (t, c) at src[t*rs + c*cs];
/// dst: [rows, D'] with row stride ldd. Applies the feature map to every row;
/// `is_query` selects the FAVOR+ stabiliser (see linear_feature_maps.hpp);
/// `favor` must be non-null for favor_plus and have favor->dim == dim.
template <class Arch, class T>
void linear_feature_map(Arch arch, attention::FeatureMap fm,
                        const attention::FavorProjection<T>* favor, bool is_query, const T* src,
                        std::ptrdiff_t rs, std::ptrdiff_t cs, std::int64_t rows, std::int64_t dim,
                        T* dst, std::ptrdiff_t ldd) noexcept {
  using attention::FeatureMap;
  if (fm == FeatureMap::favor_plus) {
    const std::int64_t m = favor->num_features;
    // u = x' W^T for all rows at once, then a per-row shift and exp.
    small_gemm(arch, rows, m, dim, src, rs, cs, favor->omega_t_scaled.data(), m, dst, ldd, false);
    const T inv_sqrt_m = T(1) / std::sqrt(T(m));
    const T half_inv_sqrt_d = T(0.5) / std::sqrt(T(dim));
    for (std::int64_t t = 0; t < rows; ++t) {
      T* u = dst + t * ldd;
      T shift;
      if (is_query) {
        shift = u[0];
        for (std::int64_t i = 1; i < m; ++i) shift = std::max(shift, u[i]);
      } else {
        T sq = 0;
        for (std::int64_t c = 0; c < dim; ++c) sq += src[t * rs + c * cs] * src[t * rs + c * cs];
        shift = sq * half_inv_sqrt_d;  // |x'|^2 / 2
      }
      std::int64_t i = 0;
      if constexpr (!simd::is_scalar_v<Arch>) {
        using B = xsimd::batch<T, Arch>;
        for (; i + std::int64_t(B::size) <= m; i += B::size)
          (simd::exp(B::load_unaligned(u + i) - B(shift)) * B(inv_sqrt_m)).store_unaligned(u + i);
      }
      for (; i < m; ++i) u[i] = simd::exp(u[i] - shift) * inv_sqrt_m;
    }
    return;
  }
  const bool elu = fm == FeatureMap::elu_plus_one;
  for (std::int64_t t = 0; t < rows; ++t) {
    const T* x = src + t * rs;
    T* y = dst + t * ldd;
    std::int64_t c = 0;
    if constexpr (!simd::is_scalar_v<Arch>) {
      using B = xsimd::batch<T, Arch>;
      if (cs == 1) {
        for (; c + std::int64_t(B::size) <= dim; c += B::size) {
          const B v = B::load_unaligned(x + c);
          const B r =
              elu ? xsimd::select(v > B(T(0)), v + B(T(1)), simd::exp(v)) : xsimd::max(v, B(T(0)));
          r.store_unaligned(y + c);
        }
      }
    }
    for (; c < dim; ++c) {
      const T v = x[c * cs];
      y[c] = elu ? (v > T(0) ? v + T(1) : simd::exp(v)) : std::max(v, T(0));
    }
  }
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
