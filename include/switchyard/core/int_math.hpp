#pragma once
// Small integer helpers shared by kernels (block counts, padded sizes).
#include <cstdint>

namespace switchyard {
inline namespace v0 {
namespace core {

/// Smallest multiple of `to` (> 0) that is >= x (x >= 0).
constexpr std::int64_t round_up(std::int64_t x, std::int64_t to) noexcept {
  return (x + to - 1) / to * to;
}

}  // namespace core
}  // namespace v0
}  // namespace switchyard
