#pragma once
// Element types of safetensors files, the C++ type each one maps to, and the
// bit-exact BF16 / IEEE half <-> float conversions on raw bits (the element types
// themselves, switchyard::bf16 and switchyard::f16, live in core/half.hpp).
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <type_traits>

#include "switchyard/core/half.hpp"
#include "switchyard/core/int_math.hpp"

namespace switchyard {
inline namespace v0 {
namespace io {

/// Element types of the safetensors format (names as spelled in the header).
/// F8 and other exotic types are not supported; a file using them is rejected.
enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL };

/// Bytes per element.
constexpr std::size_t dtype_size(DType d) noexcept {
  switch (d) {
    case DType::F64:
    case DType::I64:
    case DType::U64:
      return 8;
    case DType::F32:
    case DType::I32:
    case DType::U32:
      return 4;
    case DType::F16:
    case DType::BF16:
    case DType::I16:
    case DType::U16:
      return 2;
    case DType::I8:
    case DType::U8:
    case DType::BOOL:
      return 1;
  }
  return 0;
}

/// The header spelling: "F32", "BF16", "BOOL", ...
constexpr std::string_view dtype_name(DType d) noexcept {
  switch (d) {
    case DType::F64:
      return "F64";
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::I64:
      return "I64";
    case DType::I32:
      return "I32";
    case DType::I16:
      return "I16";
    case DType::I8:
      return "I8";
    case DType::U64:
      return "U64";
    case DType::U32:
      return "U32";
    case DType::U16:
      return "U16";
    case DType::U8:
      return "U8";
    case DType::BOOL:
      return "BOOL";
  }
  return "?";
}

/// Inverse of dtype_name; nullopt for a spelling we do not support.
constexpr std::optional<DType> parse_dtype(std::string_view s) noexcept {
  constexpr DType all[] = {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64,
                           DType::I32, DType::I16, DType::I8,  DType::U64,  DType::U32,
                           DType::U16, DType::U8,  DType::BOOL};
  for (DType d : all) {
    if (dtype_name(d) == s) return d;
  }
  return std::nullopt;
}

/// Bytes of a row-major tensor of `shape` and dtype `d`, or -1 when an extent is negative,
/// or the product of the non-zero extents times dtype_size(d) overflows or exceeds
/// core::max_buffer_bytes (the check of core::bounded_product). Zero
/// extents are skipped while checking, so [0, 2^62, 2^62] (0 bytes) is -1 too: every
/// partial product, row-major strides included, then fits comfortably in int64.
constexpr std::int64_t shape_nbytes(std::span<const std::int64_t> shape, DType d) noexcept {
  const auto size = static_cast<std::int64_t>(dtype_size(d));
  const std::int64_t n = core::bounded_product(shape, size);  // every partial product checked
  return n < 0 ? -1 : n * size;
}

/// The dtype a C++ element type reads and writes as. bool <-> BOOL and
/// std::uint8_t <-> U8 are distinct: a BOOL tensor is read as bool only. BF16 and F16
/// map to switchyard::bf16 and switchyard::f16 (core/half.hpp), 2-byte storage types,
/// so a 16-bit tensor can be viewed in place; SafeTensors::tensor<float>() converts them.
template <class T>
inline constexpr bool has_dtype_v =
    std::is_same_v<T, double> || std::is_same_v<T, float> || std::is_same_v<T, bf16> ||
    std::is_same_v<T, f16> || std::is_same_v<T, std::int64_t> || std::is_same_v<T, std::int32_t> ||
    std::is_same_v<T, std::int16_t> || std::is_same_v<T, std::int8_t> ||
    std::is_same_v<T, std::uint64_t> || std::is_same_v<T, std::uint32_t> ||
    std::is_same_v<T, std::uint16_t> || std::is_same_v<T, std::uint8_t> || std::is_same_v<T, bool>;

template <class T>
constexpr DType dtype_of() noexcept {
  static_assert(has_dtype_v<T>, "no safetensors dtype for this C++ type");
  if constexpr (std::is_same_v<T, double>)
    return DType::F64;
  else if constexpr (std::is_same_v<T, float>)
    return DType::F32;
  else if constexpr (std::is_same_v<T, bf16>)
    return DType::BF16;
  else if constexpr (std::is_same_v<T, f16>)
    return DType::F16;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return DType::I64;
  else if constexpr (std::is_same_v<T, std::int32_t>)
    return DType::I32;
  else if constexpr (std::is_same_v<T, std::int16_t>)
    return DType::I16;
  else if constexpr (std::is_same_v<T, std::int8_t>)
    return DType::I8;
  else if constexpr (std::is_same_v<T, std::uint64_t>)
    return DType::U64;
  else if constexpr (std::is_same_v<T, std::uint32_t>)
    return DType::U32;
  else if constexpr (std::is_same_v<T, std::uint16_t>)
    return DType::U16;
  else if constexpr (std::is_same_v<T, std::uint8_t>)
    return DType::U8;
  else
    return DType::BOOL;
}

/// bfloat16 bits -> float: exact (bf16 is the top half of a float). Same as to_float(bf16).
inline float bf16_to_float(std::uint16_t bits) noexcept { return to_float(bf16{bits}); }

/// float -> bfloat16 bits, rounded to nearest, ties to even (what PyTorch's
/// tensor.to(torch.bfloat16) does): bf16_to_float(float_to_bf16(x)) is the bf16 nearest x.
/// Values past the largest bf16 round to +-inf; NaN stays a (quiet) NaN with its sign.
/// Same as bf16::from_float(x).bits.
inline std::uint16_t float_to_bf16(float x) noexcept { return bf16::from_float(x).bits; }

/// IEEE 754 binary16 bits -> float: exact for normals, subnormals, +-0, +-inf;
/// NaN stays NaN with its sign and payload (shifted into the float mantissa).
/// Same as to_float(f16).
inline float half_to_float(std::uint16_t bits) noexcept { return to_float(f16{bits}); }

}  // namespace io
}  // namespace v0
}  // namespace switchyard
