#pragma once
// Integer helpers: padded sizes for kernels, and the one checked multiply used
// wherever sizes that a user controls multiply (shapes, workspaces, configs).
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <span>
#include <sstream>
#include <string_view>

#include "switchyard/core/error.hpp"

namespace switchyard {
inline namespace v0 {
namespace core {

/// Smallest multiple of `to` (> 0) that is >= x (x >= 0).
constexpr std::int64_t round_up(std::int64_t x, std::int64_t to) noexcept {
  return (x + to - 1) / to * to;
}

/// The largest buffer switchyard will try to allocate or index: 2^40 bytes (1 TiB) unless
/// SWITCHYARD_MAX_BUFFER_BYTES says otherwise (define it the same in every translation unit;
/// the fuzz targets set 2^28 so that every accepted size is also cheap to run). A size past it
/// is a user error (an overflowing product, a stride-0 view with a huge extent), reported as
/// shape_error/config_error before any allocation.
#ifndef SWITCHYARD_MAX_BUFFER_BYTES
#define SWITCHYARD_MAX_BUFFER_BYTES (std::int64_t(1) << 40)
#endif
inline constexpr std::int64_t max_buffer_bytes = SWITCHYARD_MAX_BUFFER_BYTES;

/// x + pad for size checks, saturating at the int64 maximum (then the size check fails), so
/// extents near the int64 limit cannot overflow in the addition. x, pad >= 0.
constexpr std::int64_t pad_extent(std::int64_t x, std::int64_t pad) noexcept {
  return x > std::numeric_limits<std::int64_t>::max() - pad
             ? std::numeric_limits<std::int64_t>::max()
             : x + pad;
}

/// a * b into `out`; true (and `out` unspecified) when the product overflows int64.
constexpr bool mul_overflows(std::int64_t a, std::int64_t b, std::int64_t& out) noexcept {
  return __builtin_mul_overflow(a, b, &out);
}

/// a + b into `out`; true when the sum overflows int64.
constexpr bool add_overflows(std::int64_t a, std::int64_t b, std::int64_t& out) noexcept {
  return __builtin_add_overflow(a, b, &out);
}

/// Product of non-negative factors, or -1 when a factor is negative, a partial product
/// overflows, or product * element_bytes exceeds max_buffer_bytes. Every partial product
/// is checked, so [0, 2^62, 2^62] is rejected although its full product is 0.
constexpr std::int64_t bounded_product(std::span<const std::int64_t> factors,
                                       std::int64_t element_bytes = 1) noexcept {
  std::int64_t partial = 1;  // product of the non-zero factors, so a 0 cannot hide an overflow
  bool empty = false;
  for (std::int64_t f : factors) {
    if (f < 0) return -1;
    if (f == 0) {
      empty = true;
    } else if (mul_overflows(partial, f, partial) || partial > max_buffer_bytes) {
      return -1;
    }
  }
  std::int64_t bytes = 0;
  if (mul_overflows(partial, element_bytes, bytes) || bytes > max_buffer_bytes) return -1;
  return empty ? 0 : partial;
}
constexpr std::int64_t bounded_product(std::initializer_list<std::int64_t> factors,
                                       std::int64_t element_bytes = 1) noexcept {
  return bounded_product(std::span<const std::int64_t>(factors.begin(), factors.size()),
                         element_bytes);
}

}  // namespace core

namespace detail {

/// The number of elements of a buffer whose extents are `factors` (product of non-negative
/// sizes, each partial product checked). Throws shape_error "layer::fn: argument 'arg' has
/// sizes [a, b, c] whose product ... exceeds ..." when it overflows or exceeds
/// core::max_buffer_bytes at `element_bytes` per element, so an absurd request is an error
/// and never an allocation attempt.
inline std::int64_t checked_size(std::string_view layer, std::string_view fn, std::string_view arg,
                                 std::initializer_list<std::int64_t> factors,
                                 std::int64_t element_bytes = 1) {
  const std::int64_t n = core::bounded_product(factors, element_bytes);
  if (n >= 0) return n;
  std::ostringstream os;
  os << layer << "::" << fn << ": argument '" << arg << "' has sizes [";
  bool first = true;
  for (std::int64_t f : factors) {
    os << (first ? "" : ", ") << f;
    first = false;
  }
  os << "] (" << element_bytes << " bytes each) whose product is negative, overflows or exceeds "
     << core::max_buffer_bytes << " bytes";
  throw shape_error(os.str());
}

}  // namespace detail
}  // namespace v0
}  // namespace switchyard
