#pragma once
// Eigen interop: map a 2-D switchyard view as a row-major Eigen matrix without copying.
#include <type_traits>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/view.hpp"

// Eigen brings in the compiler's intrinsic headers: see core/diagnostics.hpp.
SWITCHYARD_DIAGNOSTIC_PUSH
// Eigen 3.4's bf16 packet code has unused variables; with -I (pkg-config's eigen3 flags, not
// CMake's -isystem) gcc and clang would report them in a consumer's -Wall build.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-variable"
#endif
#include <Eigen/Core>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
SWITCHYARD_DIAGNOSTIC_POP

namespace switchyard {
inline namespace v0 {
namespace core {

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Map type for a view of T (const T gives a read-only map).
template <class T>
using EigenMap = Eigen::Map<
    std::conditional_t<std::is_const_v<T>, const RowMatrix<std::remove_const_t<T>>, RowMatrix<T>>,
    Eigen::Unaligned, Eigen::OuterStride<>>;

/// Row-major Eigen map of a 2-D view whose inner stride is 1 (throws shape_error otherwise).
template <class T>
EigenMap<T> as_eigen(View<T, 2> v) {
  detail::check_shape("core", "as_eigen", "v", v, {"rows", "cols"}, {-1, -1});
  detail::check_unit_inner_stride("core", "as_eigen", "v", v);
  return EigenMap<T>(v.data(), v.extent(0), v.extent(1), Eigen::OuterStride<>(v.stride(0)));
}

}  // namespace core
}  // namespace v0
}  // namespace switchyard
