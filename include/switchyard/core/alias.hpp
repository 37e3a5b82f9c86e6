#pragma once
// Aliasing checks at the public boundary: an output view that shares memory with
// an input view gives silently wrong results in kernels that read an input after
// writing part of the output, so such calls throw shape_error instead.
//
// The test is exact for the layouts people build (slices and head slices of one
// row-major buffer, where each stride is larger than the reach of the smaller ones):
// two views that interleave without sharing an element, such as two heads of one
// [B, T, H, D] buffer, do not alias. For other layouts it is conservative: address
// ranges that intersect count as aliasing.
#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace core {
namespace detail {

/// [lo, hi) byte addresses touched by a view; empty (lo == hi) when it has no element.
/// `ok` is false when the extents times strides overflow (no real buffer is that large).
struct ByteRange {
  std::uintptr_t lo = 0, hi = 0;
  bool ok = true;
};

template <class T, int R>
ByteRange byte_range(const View<T, R>& v) noexcept {
  ByteRange r;
  if (v.empty() || v.data() == nullptr) return r;
  // A negative extent addresses nothing (shape checks reject such views); no element either.
  for (int d = 0; d < R; ++d)
    if (v.extent(d) < 0) return r;
  std::int64_t lo = 0, hi = 0;  // element offsets of the extreme elements
  for (int d = 0; d < R; ++d) {
    std::int64_t reach = 0;
    if (mul_overflows(v.extent(d) - 1, v.stride(d), reach)) return {0, 0, false};
    std::int64_t& end = reach < 0 ? lo : hi;  // negative strides reach below data()
    if (add_overflows(end, reach, end)) return {0, 0, false};
  }
  std::int64_t lo_b = 0, hi_b = 0;
  if (mul_overflows(lo, std::int64_t(sizeof(T)), lo_b) ||
      mul_overflows(hi + 1, std::int64_t(sizeof(T)), hi_b)) {
    return {0, 0, false};
  }
  const auto base = reinterpret_cast<std::uintptr_t>(v.data());
  r.lo = base + static_cast<std::uintptr_t>(lo_b);  // wraps like the pointer arithmetic would
  r.hi = base + static_cast<std::uintptr_t>(hi_b);
  return r;
}

/// Whether `diff` (in elements) is a sum of i_d * stride_d with |i_d| < extent_d, i.e. whether
/// a view and the same layout shifted by `diff` elements share an element. Exact when the
/// strides nest (each larger than the total reach of the smaller ones): then at each
/// dimension only the two nearest multiples can lead to a solution.
template <int R>
bool shifted_layout_meets(std::int64_t diff, const std::array<std::int64_t, R>& extents,
                          const std::array<std::int64_t, R>& strides, int dim = 0) noexcept {
  if (dim == R) return diff == 0;
  const std::int64_t s = strides[dim], e = extents[dim];
  if (s == 0 || e <= 1) return shifted_layout_meets<R>(diff, extents, strides, dim + 1);
  const std::int64_t q0 = diff / s;  // truncates toward zero; try it and its neighbours
  for (std::int64_t q : {q0 - 1, q0, q0 + 1}) {
    if (q <= -e || q >= e) continue;
    if (shifted_layout_meets<R>(diff - q * s, extents, strides, dim + 1)) return true;
  }
  return false;
}

/// True when the layout is nested: sorted by |stride| descending, each stride exceeds the
/// reach sum_{smaller} (extent - 1) * |stride| of the dimensions below it.
template <int R>
bool nested_layout(std::array<std::int64_t, R>& extents, std::array<std::int64_t, R>& strides) {
  std::array<int, R> order{};
  for (int d = 0; d < R; ++d) order[d] = d;
  std::sort(order.begin(), order.end(),
            [&](int a, int b) { return std::abs(strides[a]) > std::abs(strides[b]); });
  std::array<std::int64_t, R> e{}, s{};
  for (int d = 0; d < R; ++d) {
    e[d] = extents[order[d]];
    s[d] = std::abs(strides[order[d]]);
  }
  std::int64_t reach = 0;
  for (int d = R - 1; d >= 0; --d) {
    if (e[d] <= 1) continue;
    if (s[d] <= reach) return false;
    std::int64_t r = 0;
    if (mul_overflows(e[d] - 1, s[d], r) || add_overflows(reach, r, reach)) return false;
  }
  extents = e;
  strides = s;
  return true;
}

}  // namespace detail

/// True when the two views may share an element (see the file comment for exactness).
template <class A, int RA, class B, int RB>
bool may_alias(const View<A, RA>& a, const View<B, RB>& b) noexcept {
  const detail::ByteRange ra = detail::byte_range(a), rb = detail::byte_range(b);
  if (!ra.ok || !rb.ok) return true;
  if (ra.lo == ra.hi || rb.lo == rb.hi) return false;
  if (ra.hi <= rb.lo || rb.hi <= ra.lo) return false;
  // Intersecting ranges: exact only for equal layouts of one element type.
  if constexpr (RA == RB && sizeof(A) == sizeof(B)) {
    if (a.shape() != b.shape() || a.strides() != b.strides()) return true;
    const auto pa = reinterpret_cast<std::uintptr_t>(a.data());
    const auto pb = reinterpret_cast<std::uintptr_t>(b.data());
    const std::uintptr_t bytes = pb >= pa ? pb - pa : pa - pb;
    if (bytes % sizeof(A) != 0) return true;
    auto extents = a.shape();
    auto strides = a.strides();
    if (!detail::nested_layout<RA>(extents, strides)) return true;
    return detail::shifted_layout_meets<RA>(static_cast<std::int64_t>(bytes / sizeof(A)), extents,
                                            strides);
  } else {
    return true;
  }
}

namespace detail {

/// Throws shape_error "layer::fn: argument 'out' [shape] shares memory with argument 'in'
/// [shape]; expected separate buffers (why)" when the views may alias.
template <class A, int RA, class B, int RB>
void check_no_alias(std::string_view layer, std::string_view fn, std::string_view out_name,
                    const View<A, RA>& out, std::string_view in_name, const View<B, RB>& in,
                    std::string_view why = "the output must not overlap an input") {
  if (!may_alias(out, in)) return;
  switchyard::detail::fail_shape(layer, fn, out_name,
                                 switchyard::detail::format_shape(out.shape()) +
                                     " (memory shared with argument '" + std::string(in_name) +
                                     "' " + switchyard::detail::format_shape(in.shape()) + ")",
                                 "a buffer separate from '" + std::string(in_name) + "'", why);
}

}  // namespace detail
}  // namespace core
}  // namespace v0
}  // namespace switchyard
