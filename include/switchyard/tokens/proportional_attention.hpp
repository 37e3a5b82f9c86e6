#pragma once
// Proportional attention (ToMe): after merging, a key that stands for s original tokens gets the
// weight of s keys: logits + log(s). ToMe adds `size.log()[:, None, None, :, 0]` to the attention
// logits before the softmax. The bias is per key and per batch element ([B, S]), not the [T, S]
// of DenseAttention's AdditiveBias, so this is a small path of its own: per (batch, head) one
// GEMM for the logits, the log-size bias and a row softmax (core kernels), one GEMM for the output.
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/softmax.hpp"
#include "switchyard/core/simd/vector_ops.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace tokens {

/// q: [B, T, H, D], k: [B, S, H, D], v: [B, S, H, Dv], sizes: [B, S] (every size > 0),
/// out: [B, T, H, Dv]. out = softmax(q k^T * scale + log(sizes)) v per batch element and head;
/// scale defaults to D^-0.5. Views may be strided (head slices of a fused qkv buffer) as long as
/// the innermost stride is 1. Throws shape_error on mismatched shapes, config_error on a size
/// <= 0 or a scale that is not finite and positive.
template <class T, class Arch = simd::default_arch>
void proportional_attention(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
                            ConstView<T, 2> sizes, View<T, 4> out,
                            std::optional<double> scale = std::nullopt) {
  constexpr std::string_view layer = "ToMe", fn = "proportional_attention";
  const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
  const std::int64_t S = k.extent(1), Dv = v.extent(3);
  core::detail::check_shape(layer, fn, "k", k, {"B", "S", "H", "D"}, {B, -1, H, D},
                            "batch, heads and head dim of q");
  core::detail::check_shape(layer, fn, "v", v, {"B", "S", "H", "Dv"}, {B, S, H, -1},
                            "one value per key");
  core::detail::check_shape(layer, fn, "sizes", sizes, {"B", "S"}, {B, S}, "one size per key");
  core::detail::check_shape(layer, fn, "out", out, {"B", "T", "H", "Dv"}, {B, Tq, H, Dv});
  core::detail::check_unit_inner_stride(layer, fn, "q", q);
  core::detail::check_unit_inner_stride(layer, fn, "k", k);
  core::detail::check_unit_inner_stride(layer, fn, "v", v);
  core::detail::check_unit_inner_stride(layer, fn, "out", out);
  const double sc = scale.value_or(D > 0 ? 1.0 / std::sqrt(double(D)) : 1.0);
  if (!(std::isfinite(sc) && sc > 0))
    switchyard::detail::fail_config(layer, fn, "scale", sc, "a finite scale > 0");
  core::Tensor<T> log_size({B, std::max<std::int64_t>(S, 1)});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t s = 0; s < S; ++s) {
      const T z = sizes(b, s);
      if (!(z > T(0)))
        switchyard::detail::fail_config(
            layer, fn, "sizes",
            std::to_string(z) + " at [b=" + std::to_string(b) + ", s=" + std::to_string(s) +
                "] of sizes with shape " +
                switchyard::detail::format_shape({"B", "S"}, sizes.shape()),
            "every size > 0");
      log_size(b, s) = std::log(z);
    }
  if (B * Tq * H * Dv == 0) return;
  if (S == 0) {  // nothing to attend to: zeros, not NaN
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < Tq; ++t)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t j = 0; j < Dv; ++j) out(b, t, h, j) = T(0);
    return;
  }
  using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CMap = Eigen::Map<const RowMat, Eigen::Unaligned, Eigen::OuterStride<>>;
  using MMap = Eigen::Map<RowMat, Eigen::Unaligned, Eigen::OuterStride<>>;
  const T scale_t = static_cast<T>(sc);
  parallel_for(B * H, [&](std::int64_t task) {
    const std::int64_t b = task / H, h = task % H;
    auto at = [&](auto& view) { return view.data() + b * view.stride(0) + h * view.stride(2); };
    const CMap qm(at(q), Tq, D, Eigen::OuterStride<>(q.stride(1)));
    const CMap km(at(k), S, D, Eigen::OuterStride<>(k.stride(1)));
    const CMap vm(at(v), S, Dv, Eigen::OuterStride<>(v.stride(1)));
    MMap om(at(out), Tq, Dv, Eigen::OuterStride<>(out.stride(1)));
    RowMat logits(Tq, S);
    logits.noalias() = qm * km.transpose();
    logits *= scale_t;  // the reference scales q k^T, then adds log(size)
    const T* bias = log_size.data() + b * log_size.extent(1);
    for (std::int64_t t = 0; t < Tq; ++t) {
      T* row = logits.data() + t * S;
      switchyard::kernels::axpy(Arch{}, T(1), bias, row,
                                S);  // + log(size); fma by 1 rounds as an add
      switchyard::kernels::softmax_row(Arch{}, row, row, S);
    }
    om.noalias() = logits * vm;
  });
}

/// q: [B, T, H, D], k: [B, S, H, D], v: [B, S, H, Dv], sizes: [B, S]; returns [B, T, H, Dv].
template <class T, class Arch = simd::default_arch>
core::Tensor<T> proportional_attention(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
                                       ConstView<T, 2> sizes,
                                       std::optional<double> scale = std::nullopt) {
  core::Tensor<T> out({q.extent(0), q.extent(1), q.extent(2), v.extent(3)});
  proportional_attention<T, Arch>(q, k, v, sizes, out.template view<4>(), scale);
  return out;
}

}  // namespace tokens
}  // namespace v0
}  // namespace switchyard
