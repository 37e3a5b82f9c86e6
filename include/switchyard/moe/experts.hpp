#pragma once
// Expert feed-forward networks of an MoE layer: weights for all experts of one
// kind, in PyTorch nn.Linear layout ([out, in]), one tensor per projection with the
// expert as the leading dimension, and the activation kernels the layer fuses
// between its two GEMMs.
//
// Three kinds (x: one token [d], F = d_ff):
//   swiglu: expert_e(x) = w2[e] (silu(w1[e] x + b1[e]) * (w3[e] x + b3[e])) + b2[e]
//           (Mixtral / LLaMA names: w1 = gate, w3 = up, w2 = down; biases usually absent)
//   gelu:   expert_e(x) = w2[e] gelu(w1[e] x + b1[e]) + b2[e], with the exact erf GELU
//           gelu(v) = v/2 (1 + erf(v / sqrt 2))  (PyTorch nn.GELU(), approximate='none')
//   relu:   expert_e(x) = w2[e] relu(w1[e] x + b1[e]) + b2[e]
// silu(v) = v / (1 + exp(-v)). Optionally (MoELayerConfig::output_softmax) the expert's
// output goes through a softmax over its d output features, as the experts of
// Shazeer et al.'s noisy top-k MoE (davidmrau/mixture-of-experts) do:
// expert_e(x) = softmax(w2[e] relu(w1[e] x + b1[e]) + b2[e]).
// Every bias is optional (an empty view means none).
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "switchyard/core/error.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/exp.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

/// The hidden activation of an expert FFN (see the file comment for the formulas).
enum class Activation { swiglu, gelu, relu };

/// "swiglu", "gelu" or "relu".
inline constexpr std::string_view activation_name(Activation a) noexcept {
  switch (a) {
    case Activation::swiglu:
      return "swiglu";
    case Activation::gelu:
      return "gelu";
    case Activation::relu:
      return "relu";
  }
  return "?";
}

/// Weights of N experts of one kind (N = E routed or S shared), PyTorch layout [out, in].
/// Any strides for the matrices; biases need a unit inner stride. Empty bias = no bias.
template <class T>
struct ExpertWeights {
  ConstView<T, 3> w1{};  ///< [N, F, d] gate (swiglu) or first layer (gelu, relu; "fc1")
  ConstView<T, 3> w3{};  ///< [N, F, d] up projection (swiglu only; empty otherwise)
  ConstView<T, 3> w2{};  ///< [N, d, F] down projection / second layer ("fc2")
  ConstView<T, 2> b1{};  ///< [N, F] bias of w1, or empty
  ConstView<T, 2> b3{};  ///< [N, F] bias of w3 (swiglu only), or empty
  ConstView<T, 2> b2{};  ///< [N, d] bias of w2, or empty
};

namespace detail {

/// Throws shape_error unless w holds `count` experts of width d, hidden width f, for `act`.
/// Argument names are prefix + field ("w1", or "shared.w1").
template <class T>
void check_expert_weights(std::string_view layer, std::string_view fn, std::string_view prefix,
                          const ExpertWeights<T>& w, std::int64_t count, std::int64_t d,
                          std::int64_t f, Activation act) {
  const std::string p(prefix);
  const auto arg = [&](const char* n) { return p + n; };
  core::detail::check_shape(layer, fn, arg("w1"), w.w1, {"E", "F", "D"}, {count, f, d},
                            "[out, in] layout: [experts, d_ff, d_model]");
  core::detail::check_shape(layer, fn, arg("w2"), w.w2, {"E", "D", "F"}, {count, d, f},
                            "[out, in] layout: [experts, d_model, d_ff]");
  if (act == Activation::swiglu) {
    core::detail::check_shape(layer, fn, arg("w3"), w.w3, {"E", "F", "D"}, {count, f, d},
                              "[out, in] layout: [experts, d_ff, d_model]");
  } else if (!w.w3.empty()) {
    core::detail::check_shape(layer, fn, arg("w3"), w.w3, {"E", "F", "D"}, {0, 0, 0},
                              "empty: only swiglu experts have an up projection");
  }
  const auto bias = [&](const char* n, const ConstView<T, 2>& b, std::int64_t out) {
    if (b.empty()) return;
    core::detail::check_shape(layer, fn, arg(n), b, {"E", "F"}, {count, out},
                              "bias [experts, out features], or an empty view");
    core::detail::check_unit_inner_stride(layer, fn, arg(n), b);
  };
  bias("b1", w.b1, f);
  if (act == Activation::swiglu) {
    bias("b3", w.b3, f);
  } else if (!w.b3.empty()) {
    core::detail::check_shape(layer, fn, arg("b3"), w.b3, {"E", "F"}, {0, 0},
                              "empty: only swiglu experts have an up projection");
  }
  bias("b2", w.b2, d);
}

}  // namespace detail
}  // namespace moe

namespace kernels {

namespace detail {
template <class T>
T gelu_erf_scalar(T v) noexcept {
  return T(0.5) * v * (T(1) + std::erf(v * T(0.70710678118654752440)));
}
}  // namespace detail

/// One row of the hidden layer, in place: h[j] = act(h[j] + b1[j]) for gelu / relu, and
/// h[j] = silu(h[j] + b1[j]) * (u[j] + b3[j]) for swiglu (u is then required). b1, b3 may
/// be null (no bias). n values; a partial last register goes through a padded buffer, so
/// every element is computed by the same vector code whatever its position.
template <class Arch, class T>
void expert_activation(Arch, moe::Activation act, T* h, const T* u, const T* b1, const T* b3,
                       std::int64_t n) noexcept {
  if constexpr (simd::is_scalar_v<Arch>) {
    for (std::int64_t j = 0; j < n; ++j) {
      const T g = b1 ? h[j] + b1[j] : h[j];
      switch (act) {
        case moe::Activation::swiglu: {
          const T up = b3 ? u[j] + b3[j] : u[j];
          h[j] = g / (T(1) + simd::exp(-g)) * up;
          break;
        }
        case moe::Activation::gelu:
          h[j] = detail::gelu_erf_scalar(g);
          break;
        case moe::Activation::relu:
          h[j] = g > T(0) ? g : T(0);
          break;
      }
    }
  } else {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    // [hb, ub] -> activated values; loads from possibly padded buffers.
    const auto one = [act](const T* hp, const T* up, const T* b1p, const T* b3p, T* dst) {
      B g = B::load_unaligned(hp);
      if (b1p) g += B::load_unaligned(b1p);
      switch (act) {
        case moe::Activation::swiglu: {
          B v = B::load_unaligned(up);
          if (b3p) v += B::load_unaligned(b3p);
          (g / (B(T(1)) + simd::exp(-g)) * v).store_unaligned(dst);
          break;
        }
        case moe::Activation::gelu:
          (B(T(0.5)) * g * (B(T(1)) + xsimd::erf(g * B(T(0.70710678118654752440)))))
              .store_unaligned(dst);
          break;
        case moe::Activation::relu:
          xsimd::max(g, B(T(0))).store_unaligned(dst);
          break;
      }
    };
    std::int64_t j = 0;
    for (; j + L <= n; j += L)
      one(h + j, u ? u + j : nullptr, b1 ? b1 + j : nullptr, b3 ? b3 + j : nullptr, h + j);
    if (j < n) {
      const std::int64_t r = n - j;
      alignas(64) T hb[L] = {}, ub[L] = {}, b1b[L] = {}, b3b[L] = {};
      for (std::int64_t i = 0; i < r; ++i) {
        hb[i] = h[j + i];
        if (u) ub[i] = u[j + i];
        if (b1) b1b[i] = b1[j + i];
        if (b3) b3b[i] = b3[j + i];
      }
      one(hb, u ? ub : nullptr, b1 ? b1b : nullptr, b3 ? b3b : nullptr, hb);
      for (std::int64_t i = 0; i < r; ++i) h[j + i] = hb[i];
    }
  }
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
