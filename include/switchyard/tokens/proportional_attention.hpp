#pragma once
// Proportional attention (ToMe): after merging, a key that stands for s original tokens gets the
// weight of s keys: logits + log(s). ToMe adds `size.log()[:, None, None, :, 0]` to the attention
// logits before the softmax. The bias is per key and per batch element ([B, S]); DenseAttention's
// AdditiveBias is [T, S] shared over the batch, so each batch element is one DenseAttention call
// whose bias is its log-size row broadcast over the queries by a stride-0 view. That runs the
// fused dense kernel (measured faster than a separate GEMM + softmax + GEMM path here).
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "switchyard/attention/dense.hpp"
#include "switchyard/attention/mask.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace tokens {

/// q: [B, T, H, D], k: [B, S, H, D], v: [B, S, H, D], sizes: [B, S] (every size > 0),
/// out: [B, T, H, D]. out = softmax(q k^T * scale + log(sizes)) v per batch element and head;
/// scale defaults to D^-0.5. Any strides (head slices of a fused qkv buffer need no copy). Keys
/// whose size is +inf are not allowed (log would be +inf). Throws shape_error on mismatched
/// shapes, config_error on a size <= 0 (or NaN) or a scale that is not finite and positive.
template <class T, class Arch = simd::default_arch>
void proportional_attention(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
                            ConstView<T, 2> sizes, View<T, 4> out,
                            std::optional<double> scale = std::nullopt) {
  constexpr std::string_view layer = "ToMe", fn = "proportional_attention";
  const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
  const std::int64_t S = k.extent(1);
  core::detail::check_shape(layer, fn, "k", k, {"B", "S", "H", "D"}, {B, -1, H, D},
                            "batch, heads and head dim of q");
  core::detail::check_shape(layer, fn, "v", v, {"B", "S", "H", "D"}, {B, S, H, D},
                            "the shape of k");
  core::detail::check_shape(layer, fn, "sizes", sizes, {"B", "S"}, {B, S}, "one size per key");
  core::detail::check_shape(layer, fn, "out", out, {"B", "T", "H", "D"}, {B, Tq, H, D},
                            "the shape of q");
  if (scale && !(std::isfinite(*scale) && *scale > 0))
    switchyard::detail::fail_config(layer, fn, "scale", *scale, "a finite scale > 0");
  core::Tensor<T> log_size({B, std::max<std::int64_t>(S, 1)});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t s = 0; s < S; ++s) {
      const T z = sizes(b, s);
      if (!(z > T(0)) || std::isinf(z))
        switchyard::detail::fail_config(
            layer, fn, "sizes",
            std::to_string(z) + " at [b=" + std::to_string(b) + ", s=" + std::to_string(s) +
                "] of sizes with shape " +
                switchyard::detail::format_shape({"B", "S"}, sizes.shape()),
            "every size > 0 and finite");
      log_size(b, s) = std::log(z);
    }
  const attention::DenseAttention<T, Arch> dense({.scale = scale});
  for (std::int64_t b = 0; b < B; ++b) {
    // [T, S] bias whose rows all alias the batch element's log-size row.
    const ConstView<T, 2> bias(log_size.data() + b * log_size.extent(1), {Tq, S}, {0, 1});
    dense.forward(q.slice(0, b, b + 1), k.slice(0, b, b + 1), v.slice(0, b, b + 1),
                  out.slice(0, b, b + 1), attention::AdditiveBias<T>{bias});
  }
}

/// q: [B, T, H, D], k: [B, S, H, D], v: [B, S, H, D], sizes: [B, S]; returns [B, T, H, D].
template <class T, class Arch = simd::default_arch>
core::Tensor<T> proportional_attention(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
                                       ConstView<T, 2> sizes,
                                       std::optional<double> scale = std::nullopt) {
  core::Tensor<T> out({q.extent(0), q.extent(1), q.extent(2), q.extent(3)});
  proportional_attention<T, Arch>(q, k, v, sizes, out.template view<4>(), scale);
  return out;
}

}  // namespace tokens
}  // namespace v0
}  // namespace switchyard
