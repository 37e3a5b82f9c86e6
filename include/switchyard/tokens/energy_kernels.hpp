#pragma once
// The row kernel of PiToMe's energy (merge_energy.hpp): sum_j elu(s[j] - margin, alpha) over a
// row of cosine similarities, the dominant cost (T^2 exponentials per sequence). The float
// differences are widened and each term computed in double on SIMD registers: exp(v) - 1 in
// double is as accurate as a float expm1 of v (its cancellation for tiny v costs about 1e-16
// absolute). The sum is in double, four register accumulators then a fixed tree, so it depends
// on Arch but not on the thread count.
#include <cstdint>

#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/exp.hpp"

namespace switchyard {
inline namespace v0 {
namespace kernels {

/// s: [n] similarities (float or double); returns sum_j (v_j > 0 ? v_j : alpha * (e^v_j - 1))
/// with v_j = s[j] - margin computed in T, the terms and the sum in double.
template <class Arch, class T>
double elu_energy_row_sum(Arch, const T* s, std::int64_t n, T margin, T alpha) noexcept {
  double total = 0;
  std::int64_t j = 0;
  if constexpr (!simd::is_scalar_v<Arch>) {
    using VD = xsimd::batch<double, Arch>;
    constexpr std::int64_t L = VD::size;
    const VD a = VD(static_cast<double>(alpha)), zero = VD(0.0), one = VD(1.0);
    VD acc[4] = {zero, zero, zero, zero};
    alignas(64) double v[4 * L];
    for (; j + 4 * L <= n; j += 4 * L) {
      for (std::int64_t i = 0; i < 4 * L; ++i) v[i] = double(T(s[j + i] - margin));
      for (int u = 0; u < 4; ++u) {
        const VD x = VD::load_aligned(v + u * L);
        acc[u] += xsimd::select(x > zero, x, a * (simd::exp(x) - one));
      }
    }
    total = simd::hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  }
  for (; j < n; ++j) {
    const double x = double(T(s[j] - margin));
    total += x > 0 ? x : double(alpha) * (simd::exp(x) - 1.0);
  }
  return total;
}

}  // namespace kernels
}  // namespace v0
}  // namespace switchyard
