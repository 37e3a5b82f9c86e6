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
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/half.hpp"
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
/// The matrices come in one of two forms, per projection:
///  - stacked: one [N, ...] view (w1, w3, w2), the expert as the leading dimension;
///  - per expert: N separate 2-D views (w1_each, w3_each, w2_each), each anywhere in memory,
///    e.g. views into a Hugging Face checkpoint that stores one tensor per expert
///    (moe/hf_checkpoint.hpp), so nothing is stacked into a copy. The layer reads both forms
///    through the same packing, at the same speed.
/// A projection uses exactly one form: the stacked view empty when the per-expert list is not.
/// T is the stored element type: the layer's compute type, or bf16 / f16 for a float layer
/// (widened while the layer packs weights; such experts take no biases).
template <class T>
struct ExpertWeights {
  ConstView<T, 3> w1{};  ///< [N, F, d] gate (swiglu) or first layer (gelu, relu; "fc1")
  ConstView<T, 3> w3{};  ///< [N, F, d] up projection (swiglu only; empty otherwise)
  ConstView<T, 3> w2{};  ///< [N, d, F] down projection / second layer ("fc2")
  ConstView<T, 2> b1{};  ///< [N, F] bias of w1, or empty
  ConstView<T, 2> b3{};  ///< [N, F] bias of w3 (swiglu only), or empty
  ConstView<T, 2> b2{};  ///< [N, d] bias of w2, or empty
  std::vector<ConstView<T, 2>> w1_each{};  ///< or N views [F, d] (w1 then empty)
  std::vector<ConstView<T, 2>> w3_each{};  ///< or N views [F, d] (w3 then empty)
  std::vector<ConstView<T, 2>> w2_each{};  ///< or N views [d, F] (w2 then empty)

  /// Expert e's matrices, whichever form holds them (e < N; checked by the layer).
  ConstView<T, 2> w1_of(std::int64_t e) const noexcept { return pick(w1, w1_each, e); }
  ConstView<T, 2> w3_of(std::int64_t e) const noexcept { return pick(w3, w3_each, e); }
  ConstView<T, 2> w2_of(std::int64_t e) const noexcept { return pick(w2, w2_each, e); }

 private:
  static ConstView<T, 2> pick(const ConstView<T, 3>& stacked,
                              const std::vector<ConstView<T, 2>>& each, std::int64_t e) noexcept {
    return each.empty() ? stacked[e] : each[std::size_t(e)];
  }
};

namespace detail {

/// Throws shape_error unless w holds `count` experts of width d, hidden width f, for `act`.
/// Argument names are prefix + field ("w1", or "shared.w1").
/// Throws shape_error unless `stacked` (or, when `each` is not empty, every view of it) holds
/// `count` matrices of [rows, cols]; arg is e.g. "w1" or "shared.w1".
template <class T>
void check_expert_matrices(std::string_view layer, std::string_view fn, const std::string& arg,
                           const ConstView<T, 3>& stacked, const std::vector<ConstView<T, 2>>& each,
                           std::int64_t count, std::int64_t rows, std::int64_t cols,
                           const char* rows_name, const char* cols_name, std::string_view note) {
  if (each.empty()) {
    core::detail::check_shape(layer, fn, arg, stacked, {"E", rows_name, cols_name},
                              {count, rows, cols}, note);
    return;
  }
  if (!stacked.empty() || std::int64_t(each.size()) != count) {
    switchyard::detail::fail_shape(layer, fn, arg + "_each",
                                   "[" + std::to_string(each.size()) + " views] and " + arg + " " +
                                       switchyard::detail::format_shape(stacked.shape()),
                                   "[" + std::to_string(count) + " views] and " + arg + " empty",
                                   "one view per expert, or one stacked view, not both");
  }
  for (std::size_t e = 0; e < each.size(); ++e)
    core::detail::check_shape(layer, fn, arg + "_each[" + std::to_string(e) + "]", each[e],
                              {rows_name, cols_name}, {rows, cols}, note);
}

/// Throws shape_error unless w holds `count` experts of width d, hidden width f, for `act`.
/// Argument names are prefix + field ("w1", or "shared.w1").
template <class T>
void check_expert_weights(std::string_view layer, std::string_view fn, std::string_view prefix,
                          const ExpertWeights<T>& w, std::int64_t count, std::int64_t d,
                          std::int64_t f, Activation act) {
  const std::string p(prefix);
  const auto arg = [&](const char* n) { return p + n; };
  check_expert_matrices(layer, fn, arg("w1"), w.w1, w.w1_each, count, f, d, "F", "D",
                        "[out, in] layout: [experts, d_ff, d_model]");
  check_expert_matrices(layer, fn, arg("w2"), w.w2, w.w2_each, count, d, f, "D", "F",
                        "[out, in] layout: [experts, d_model, d_ff]");
  if (act == Activation::swiglu) {
    check_expert_matrices(layer, fn, arg("w3"), w.w3, w.w3_each, count, f, d, "F", "D",
                          "[out, in] layout: [experts, d_ff, d_model]");
  } else if (!w.w3.empty() || !w.w3_each.empty()) {
    core::detail::check_shape(layer, fn, arg("w3"), w.w3, {"E", "F", "D"}, {0, 0, 0},
                              "empty: only swiglu experts have an up projection");
    if (!w.w3_each.empty())
      switchyard::detail::fail_shape(layer, fn, arg("w3_each"),
                                     "[" + std::to_string(w.w3_each.size()) + " views]",
                                     "[0 views]", "only swiglu experts have an up projection");
  }
  const bool has_bias = !w.b1.empty() || !w.b3.empty() || !w.b2.empty();
  if (is_half_v<T> && has_bias) {
    const char* which = !w.b1.empty() ? "b1" : (!w.b3.empty() ? "b3" : "b2");
    switchyard::detail::fail_shape(layer, fn, arg(which), "bf16/f16 bias", "empty",
                                   "experts with 16-bit weights take no biases (no Hugging Face "
                                   "MoE family has them); pass float weights for biased experts");
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
