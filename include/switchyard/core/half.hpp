#pragma once
// 16-bit float element types: bf16 (bfloat16, the top half of a float) and f16 (IEEE 754
// binary16). They are storage types: views of checkpoint weights in their own element
// type (no converted copy), read by kernels that convert while they pack. Arithmetic
// happens in float; to_float() is exact for both.
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace switchyard {
inline namespace v0 {

/// bfloat16 bits. Trivially copyable, 2 bytes, so a bf16 tensor in a file is a bf16 array.
struct bf16 {
  std::uint16_t bits = 0;

  /// Nearest bf16, ties to even (PyTorch's tensor.to(torch.bfloat16)); values past the
  /// largest bf16 round to +-inf; NaN stays a quiet NaN with its sign.
  static constexpr bf16 from_float(float x) noexcept {
    const std::uint32_t b = std::bit_cast<std::uint32_t>(x);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u)
      return bf16{static_cast<std::uint16_t>((b >> 16) | 0x0040u)};
    const std::uint32_t lsb = (b >> 16) & 1u;  // ties go to the even upper half
    return bf16{static_cast<std::uint16_t>((b + 0x7FFFu + lsb) >> 16)};
  }
  friend constexpr bool operator==(bf16, bf16) = default;
};

/// IEEE 754 binary16 bits.
struct f16 {
  std::uint16_t bits = 0;
  friend constexpr bool operator==(f16, f16) = default;
};

static_assert(sizeof(bf16) == 2 && alignof(bf16) == 2 && std::is_trivially_copyable_v<bf16>);
static_assert(sizeof(f16) == 2 && alignof(f16) == 2 && std::is_trivially_copyable_v<f16>);

/// Exact: a bf16 is the upper half of the float it stands for.
constexpr float to_float(bf16 v) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(v.bits) << 16);
}

/// Exact for normals, subnormals, +-0 and +-inf; NaN keeps its sign and payload.
inline float to_float(f16 v) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(v.bits & 0x8000u) << 16;
  const std::uint32_t exp = (v.bits >> 10) & 0x1Fu;
  const std::uint32_t mant = v.bits & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float mag = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -mag : mag;
  }
  if (exp == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));
  return std::bit_cast<float>(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

/// float, double: themselves (so kernels templated on the stored type read any of them).
constexpr float to_float(float v) noexcept { return v; }
constexpr double to_float(double v) noexcept { return v; }

/// True for the 16-bit storage types.
template <class T>
inline constexpr bool is_half_v =
    std::is_same_v<std::remove_cv_t<T>, bf16> || std::is_same_v<std::remove_cv_t<T>, f16>;

}  // namespace v0
}  // namespace switchyard
