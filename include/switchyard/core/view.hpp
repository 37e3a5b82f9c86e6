#pragma once
// Non-owning strided views. Layers take views, never raw pointers plus loose sizes.
// View<T, R> is mutable, ConstView<T, R> = View<const T, R> is read-only; a View
// converts implicitly to the matching ConstView. Strides are in elements.
#include <array>
#include <cstdint>
#include <type_traits>

#include "switchyard/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"

namespace switchyard {
inline namespace v0 {
namespace core {

template <int R>
using Shape = std::array<std::int64_t, R>;

/// Row-major (C-order) strides of a contiguous tensor with the given extents. Extents whose
/// product overflows give wrapped (meaningless) strides instead of undefined behaviour; every
/// public call rejects such a view through check_shape before it is used.
template <int R>
constexpr Shape<R> row_major_strides(const Shape<R>& shape) noexcept {
  Shape<R> strides{};
  std::uint64_t s = 1;
  for (int i = R - 1; i >= 0; --i) {
    strides[i] = static_cast<std::int64_t>(s);
    s *= static_cast<std::uint64_t>(shape[i]);
  }
  return strides;
}

template <class T, int R>
class View {
  static_assert(R >= 1 && R <= 4, "switchyard views have rank 1 to 4");

 public:
  using element_type = T;
  using value_type = std::remove_const_t<T>;
  static constexpr int rank = R;

  constexpr View() noexcept = default;
  /// Contiguous row-major view.
  constexpr View(T* data, const Shape<R>& shape) noexcept
      : data_(data), shape_(shape), strides_(row_major_strides<R>(shape)) {}
  /// Strided view; strides in elements.
  constexpr View(T* data, const Shape<R>& shape, const Shape<R>& strides) noexcept
      : data_(data), shape_(shape), strides_(strides) {}
  /// View<U> -> View<const U>.
  template <class U>
  requires(std::is_const_v<T>&& std::is_same_v<const U, T>) constexpr View(
      const View<U, R>& other) noexcept  // NOLINT(google-explicit-constructor)
      : data_(other.data()), shape_(other.shape()), strides_(other.strides()) {}

  constexpr T* data() const noexcept { return data_; }
  constexpr const Shape<R>& shape() const noexcept { return shape_; }
  constexpr const Shape<R>& strides() const noexcept { return strides_; }
  constexpr std::int64_t extent(int i) const noexcept { return shape_[i]; }
  constexpr std::int64_t stride(int i) const noexcept { return strides_[i]; }
  /// Product of the extents (wrapped, not undefined, when it overflows: check_shape rejects
  /// such views at the boundary).
  constexpr std::int64_t numel() const noexcept {
    std::uint64_t n = 1;
    for (auto e : shape_) n *= static_cast<std::uint64_t>(e);
    return static_cast<std::int64_t>(n);
  }
  /// True when some extent is 0.
  constexpr bool empty() const noexcept {
    for (auto e : shape_)
      if (e == 0) return true;
    return false;
  }
  /// True when the elements are dense in row-major order.
  constexpr bool is_contiguous() const noexcept {
    std::int64_t s = 1;
    for (int i = R - 1; i >= 0; --i) {
      if (shape_[i] != 1 && strides_[i] != s) return false;
      s *= shape_[i];
    }
    return true;
  }

  template <class... I>
  requires(sizeof...(I) == R) constexpr T& operator()(I... idx) const noexcept {
    const std::array<std::int64_t, R> i{static_cast<std::int64_t>(idx)...};
    std::int64_t off = 0;
    for (int d = 0; d < R; ++d) {
      SWITCHYARD_ASSERT(i[d] >= 0 && i[d] < shape_[d]);
      off += i[d] * strides_[d];
    }
    return data_[off];
  }

  /// Sub-view with the first index fixed: rank R-1.
  constexpr View<T, R - 1> operator[](std::int64_t i) const noexcept requires(R > 1) {
    SWITCHYARD_ASSERT(i >= 0 && i < shape_[0]);
    Shape<R - 1> s{}, st{};
    for (int d = 1; d < R; ++d) {
      s[d - 1] = shape_[d];
      st[d - 1] = strides_[d];
    }
    return View<T, R - 1>(data_ + i * strides_[0], s, st);
  }

  /// Range [begin, end) along dimension `dim`.
  constexpr View slice(int dim, std::int64_t begin, std::int64_t end) const noexcept {
    SWITCHYARD_ASSERT(0 <= begin && begin <= end && end <= shape_[dim]);
    View v = *this;
    v.data_ = data_ + begin * strides_[dim];
    v.shape_[dim] = end - begin;
    return v;
  }

 private:
  T* data_ = nullptr;
  Shape<R> shape_{};
  Shape<R> strides_{};
};

template <class T, int R>
using ConstView = View<const T, R>;

namespace detail {
/// Throws shape_error unless `v` has exactly `expected` extents (-1 = any).
template <class T, int R>
void check_shape(std::string_view layer, std::string_view fn, std::string_view arg,
                 const View<T, R>& v, std::initializer_list<std::string_view> names,
                 const Shape<R>& expected, std::string_view why = {}) {
  // A negative extent is never valid, also where the expected extent is "any" (-1).
  bool ok = true;
  for (int d = 0; d < R; ++d) {
    ok = ok && v.extent(d) >= 0 && (expected[d] < 0 || expected[d] == v.extent(d));
  }
  if (ok) {
    // Every partial product of the extents fits in max_buffer_bytes: a real buffer does, and
    // a stride-0 view that claims more would make the loops over it run for ever.
    if (bounded_product(v.shape(), sizeof(T)) >= 0) return;
    switchyard::detail::fail_shape(layer, fn, arg,
                                   switchyard::detail::format_shape(names, v.shape()),
                                   "at most " + std::to_string(max_buffer_bytes) + " bytes",
                                   "a view this large cannot address memory");
  }
  std::string exp = "[";
  auto name = names.begin();
  for (int d = 0; d < R; ++d) {
    if (d) exp += ", ";
    const std::string_view n = name != names.end() ? *name++ : std::string_view{};
    exp += n;
    // Appended piece by piece. `(n.empty() ? "" : "=") + std::to_string(...)`, a 0- or 1-char
    // literal inserted at the front of a temporary, made gcc 12.2 at -O3 report -Wrestrict
    // ("memcpy ... may overlap up to 9223372036854775811 bytes") inside basic_string::_M_replace:
    // a known false positive with short literals (gcc PR 105329); the two never overlap.
    if (expected[d] >= 0) {
      if (!n.empty()) exp += '=';
      exp += std::to_string(expected[d]);
    }
  }
  exp += "]";
  for (int d = 0; d < R; ++d) {
    if (v.extent(d) < 0) {
      switchyard::detail::fail_shape(layer, fn, arg,
                                     switchyard::detail::format_shape(names, v.shape()), exp,
                                     "extents must be >= 0");
    }
  }
  switchyard::detail::fail_shape(layer, fn, arg, switchyard::detail::format_shape(names, v.shape()),
                                 exp, why);
}

/// Throws shape_error unless the innermost dimension has stride 1.
template <class T, int R>
void check_unit_inner_stride(std::string_view layer, std::string_view fn, std::string_view arg,
                             const View<T, R>& v) {
  if (v.extent(R - 1) > 1 && v.stride(R - 1) != 1) {
    switchyard::detail::fail_shape(layer, fn, arg,
                                   switchyard::detail::format_shape(v.shape()) +
                                       " with inner stride " + std::to_string(v.stride(R - 1)),
                                   "inner stride 1");
  }
}
}  // namespace detail

}  // namespace core
using core::ConstView;
using core::Shape;
using core::View;
}  // namespace v0
}  // namespace switchyard
