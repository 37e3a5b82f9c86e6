#pragma once
// Naive dense attention in long double: the obviously-correct reference the
// fused kernel (dense.hpp) is tested against. O(T * S * D) per head, with the
// whole score row materialised; for tests and small problems only.
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "switchyard/attention/mask.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {
namespace ref {

/// q: [B, T, H, D], k and v: [B, S, H_kv, D] with H % H_kv == 0 (query head h
/// reads K/V head h / (H / H_kv)), out: [B, T, H, D], any strides.
/// out[b,i,h] = sum_j softmax_j(scale * q_i . k_j + bias[i,j]) v_j over the keys
/// the mask leaves visible; a row with no visible key is zero. scale defaults to
/// 1/sqrt(D). Shapes are assumed valid (DenseAttention validates).
template <class T>
void dense_attention(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v, View<T, 4> out,
                     const Mask<T>& mask = {}, std::optional<double> scale = {}) {
  using R = long double;
  const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
  const std::int64_t S = k.extent(1), Hkv = k.extent(2);
  const R sc = scale ? R(*scale) : R(1) / std::sqrt(R(D));
  std::vector<R> w(static_cast<std::size_t>(S));
  std::vector<bool> visible(static_cast<std::size_t>(S));
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t len = mask.key_lengths ? mask.key_lengths->lengths[b] : S;
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t hk = h / (H / Hkv);
      for (std::int64_t i = 0; i < Tq; ++i) {
        R max_score = -std::numeric_limits<R>::infinity();
        for (std::int64_t j = 0; j < S; ++j) {
          bool vis = j < len;
          if (mask.causal) vis = vis && j <= i + mask.causal->offset;
          R s = 0;
          for (std::int64_t d = 0; d < D; ++d) s += R(q(b, i, h, d)) * R(k(b, j, hk, d));
          s *= sc;
          if (mask.bias) s += R(mask.bias->bias(i, j));
          if (std::isinf(s) && s < 0) vis = false;  // a -inf bias masks the key
          visible[j] = vis;
          w[j] = s;
          if (vis) max_score = std::max(max_score, s);
        }
        R sum = 0;
        for (std::int64_t j = 0; j < S; ++j) {
          w[j] = visible[j] ? std::exp(w[j] - max_score) : R(0);
          sum += w[j];
        }
        for (std::int64_t d = 0; d < D; ++d) {
          R acc = 0;
          for (std::int64_t j = 0; j < S; ++j) {
            if (visible[j]) acc += w[j] * R(v(b, j, hk, d));
          }
          out(b, i, h, d) = sum > 0 ? T(acc / sum) : T(0);
        }
      }
    }
  }
}

}  // namespace ref
}  // namespace attention
}  // namespace v0
}  // namespace switchyard
