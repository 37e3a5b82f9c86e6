#pragma once
// Rotary position embedding (RoPE, Su et al. 2021) in Hugging Face's rotate_half convention,
// the one every Hugging Face LLaMA / Mistral / Mixtral checkpoint's q_proj and k_proj rows are
// stored for: inside a head of D channels, channel i pairs with channel i + D/2 (i < D/2) and
//   out[i]       = x[i] cos(a) - x[i + D/2] sin(a)
//   out[i + D/2] = x[i + D/2] cos(a) + x[i] sin(a),   a = pos * theta_i
// (q * cos + rotate_half(q) * sin). Meta / gpt-fast checkpoints pair (2i, 2i + 1) instead;
// their weights differ by a row permutation (the fixture README of decoder_tiny spells it out).
//
// The table is float32 computed the way the references compute it (HF MixtralRotaryEmbedding,
// gpt-fast precompute_freqs_cis): theta_i = 1 / theta ** (float(2i) / D), the power rounded to
// float and the reciprocal taken in float; the angle float(pos) * theta_i rounded to float;
// then cos and sin of that float angle, here evaluated in double and rounded once (correctly
// rounded, so the table does not depend on the C library's float cosf).
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace models {

struct RotaryConfig {
  std::int64_t head_dim = 0;       ///< D, even and >= 2
  double theta = 10000.0;          ///< base (HF rope_theta), in [1, FLT_MAX]
  std::int64_t max_positions = 0;  ///< positions 0 .. max_positions - 1 have a table row, >= 1
};

class RotaryEmbedding {
 public:
  using config_type = RotaryConfig;
  static constexpr std::string_view name = "RotaryEmbedding";

  /// Builds the [max_positions, D/2] cos and sin tables. Throws config_error naming the field:
  /// head_dim odd or < 2, theta outside [1, FLT_MAX] (the table is computed in float, as
  /// gpt-fast does: a larger base rounds to infinity, and a base below 1 gives frequencies
  /// above 1, whose angles overflow float far enough below), max_positions < 1 (or a table
  /// too large for core::max_buffer_bytes).
  explicit RotaryEmbedding(config_type cfg) : cfg_(cfg) {
    const std::string_view fn = "RotaryEmbedding";
    if (cfg.head_dim < 2 || cfg.head_dim % 2 != 0)
      switchyard::detail::fail_config(name, fn, "head_dim", cfg.head_dim,
                                      "an even number >= 2 (channels rotate in pairs)");
    if (!(cfg.theta >= 1 && cfg.theta <= std::numeric_limits<float>::max()))
      switchyard::detail::fail_config(name, fn, "theta", cfg.theta,
                                      "a value in [1, FLT_MAX] (the table is float)");
    if (cfg.max_positions < 1)
      switchyard::detail::fail_config(name, fn, "max_positions", cfg.max_positions, ">= 1");
    const std::int64_t half = cfg.head_dim / 2;
    if (core::bounded_product({cfg.max_positions, half}, 2 * sizeof(float)) < 0)
      switchyard::detail::fail_config(name, fn, "max_positions", cfg.max_positions,
                                      "a table [max_positions, head_dim / 2] within "
                                      "core::max_buffer_bytes");
    inv_freq_.resize(std::size_t(half));
    const float base = static_cast<float>(cfg.theta);
    for (std::int64_t i = 0; i < half; ++i) {
      const float exponent = static_cast<float>(2 * i) / static_cast<float>(cfg.head_dim);
      const float power = static_cast<float>(std::pow(double(base), double(exponent)));
      inv_freq_[std::size_t(i)] = 1.0f / power;
    }
    cos_ = Tensor<float>({cfg.max_positions, half});
    sin_ = Tensor<float>({cfg.max_positions, half});
    for (std::int64_t p = 0; p < cfg.max_positions; ++p) {
      for (std::int64_t i = 0; i < half; ++i) {
        const float angle = static_cast<float>(p) * inv_freq_[std::size_t(i)];
        cos_(p, i) = static_cast<float>(std::cos(double(angle)));
        sin_(p, i) = static_cast<float>(std::sin(double(angle)));
      }
    }
  }

  /// The validated config.
  const config_type& config() const noexcept { return cfg_; }
  /// theta_i, [D/2].
  const std::vector<float>& inv_freq() const noexcept { return inv_freq_; }
  /// cos(pos * theta_i), [max_positions, D/2] (row = position).
  ConstView<float, 2> cos() const { return cos_.view<2>(); }
  /// sin(pos * theta_i), [max_positions, D/2].
  ConstView<float, 2> sin() const { return sin_.view<2>(); }

  /// Rotates x: [T, H, D] in place, row t being position pos0 + t (any strides). Throws
  /// shape_error when D differs from head_dim and config_error when a position falls outside
  /// [0, max_positions).
  void apply(View<float, 3> x, std::int64_t pos0) const {
    const std::string_view fn = "apply";
    core::detail::check_shape(name, fn, "x", x, {"T", "H", "D"}, {-1, -1, cfg_.head_dim},
                              "D = head_dim");
    const std::int64_t T = x.extent(0), H = x.extent(1), half = cfg_.head_dim / 2;
    if (T == 0) return;
    if (pos0 < 0 || pos0 > cfg_.max_positions - T)
      switchyard::detail::fail_config(name, fn, "pos0", pos0,
                                      "positions pos0 .. pos0 + T - 1 (T = " + std::to_string(T) +
                                          ") inside [0, " + std::to_string(cfg_.max_positions) +
                                          ") (max_positions)");
    for (std::int64_t t = 0; t < T; ++t) {
      const float* c = cos_.data() + (pos0 + t) * half;
      const float* s = sin_.data() + (pos0 + t) * half;
      for (std::int64_t h = 0; h < H; ++h) {
        for (std::int64_t i = 0; i < half; ++i) {
          float& lo = x(t, h, i);
          float& hi = x(t, h, i + half);
          const float a = lo, b = hi;
          lo = a * c[i] - b * s[i];
          hi = b * c[i] + a * s[i];
        }
      }
    }
  }

 private:
  config_type cfg_;
  std::vector<float> inv_freq_;
  Tensor<float> cos_, sin_;
};

}  // namespace models
}  // namespace v0
}  // namespace switchyard
