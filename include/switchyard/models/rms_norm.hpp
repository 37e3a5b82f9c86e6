#pragma once
// RMSNorm (Zhang & Sennrich 2019), as LLaMA / Mistral / Mixtral use it:
//   y[t] = x[t] * rsqrt(mean_j x[t, j]^2 + eps) * weight
// with eps inside the square root and no bias or mean subtraction (Hugging Face
// MixtralRMSNorm, gpt-fast RMSNorm). Activations are float; the weight may be stored as
// float or bf16 (a checkpoint mapped in place) and is widened element by element.
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace models {

struct RMSNormConfig {
  double eps = 1e-5;  ///< added to the mean square (HF rms_norm_eps); finite and > 0
};

class RMSNorm {
 public:
  using config_type = RMSNormConfig;
  static constexpr std::string_view name = "RMSNorm";

  /// Throws config_error unless eps is finite and > 0.
  explicit RMSNorm(config_type cfg = {}) : cfg_(cfg) {
    if (!(std::isfinite(cfg.eps) && cfg.eps > 0))
      switchyard::detail::fail_config(name, "RMSNorm", "eps", cfg.eps, "a finite value > 0");
  }
  /// The validated config.
  const config_type& config() const noexcept { return cfg_; }

  /// x: [T, d], weight: [d] (float or bf16), y: [T, d] (may be x itself, the same view; must
  /// not otherwise overlap x). Any strides. The mean square of a row is summed in double and
  /// rounded once, so it does not depend on d's rounding; the rest is float, as in the
  /// reference: y = (x * rsqrt(ms + eps)) * weight. Throws shape_error naming the argument and
  /// both shapes.
  template <class W>
  void forward(ConstView<float, 2> x, ConstView<W, 1> weight, View<float, 2> y) const {
    static_assert(std::is_same_v<W, float> || std::is_same_v<W, bf16>,
                  "RMSNorm weights are float or bf16");
    const std::string_view fn = "forward";
    core::detail::check_shape(name, fn, "x", x, {"T", "d"}, {-1, -1});
    const std::int64_t T = x.extent(0), d = x.extent(1);
    core::detail::check_shape(name, fn, "weight", weight, {"d"}, {d}, "one weight per feature");
    core::detail::check_shape(name, fn, "y", y, {"T", "d"}, {T, d}, "y has the shape of x");
    const bool in_place = y.data() == x.data() && y.strides() == x.strides();
    if (!in_place) core::detail::check_no_alias(name, fn, "y", y, "x", x, "or y is x itself");
    if (d == 0) return;
    const float eps = static_cast<float>(cfg_.eps);
    for (std::int64_t t = 0; t < T; ++t) {
      double ss = 0;
      for (std::int64_t j = 0; j < d; ++j) {
        const double v = x(t, j);
        ss += v * v;
      }
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / double(d)) + eps);
      for (std::int64_t j = 0; j < d; ++j) y(t, j) = (x(t, j) * inv) * to_float(weight(j));
    }
  }

 private:
  config_type cfg_;
};

}  // namespace models
}  // namespace v0
}  // namespace switchyard
