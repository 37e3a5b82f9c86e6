#pragma once
// Row-wise softmax: y = exp(x - max(x)) / sum(exp(x - max(x))).
//
// Subtracting the row max keeps every exp argument <= 0, so large logits never
// overflow. A row whose max is -inf (every entry masked) gives zeros, not NaN:
// attention and routers use -inf as "masked" and an all-masked row must
// contribute nothing. A row holding NaN or +inf gives NaN (nothing sensible to
// normalise). Three passes per row (max, exp and sum, scale), all vectorised.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "switchyard/core/diagnostics.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/exp.hpp"
#include "switchyard/core/simd/vector_ops.hpp"
#include "switchyard/core/view.hpp"

// gcc: no -Wmaybe-uninitialized / -Wuninitialized from the intrinsics inlined into these
// kernels (false positives in gcc 12's AVX-512 headers; see core/diagnostics.hpp).
SWITCHYARD_DIAGNOSTIC_PUSH
namespace switchyard {
inline namespace v0 {
namespace kernels {

/// src: [n], dst: [n]; dst = softmax(src). src == dst (in place) is allowed;
/// partial overlap is not. If log_sum_exp is given it receives log(sum(exp(src)))
/// (routers need it for the z-loss): -inf for an all -inf row, NaN if NaN shows.
template <class Arch, class T>
void softmax_row(Arch arch, const T* src, T* dst, std::int64_t n,
                 T* log_sum_exp = nullptr) noexcept {
  const T m = row_max(arch, src, n);
  if (m == -std::numeric_limits<T>::infinity()) {
    // All -inf, or -inf and NaN (row_max may skip NaN): NaN must still show.
    const bool has_nan = std::any_of(src, src + n, [](T v) { return v != v; });
    std::fill_n(dst, n, has_nan ? std::numeric_limits<T>::quiet_NaN() : T(0));
    if (log_sum_exp) *log_sum_exp = has_nan ? std::numeric_limits<T>::quiet_NaN() : m;
    return;
  }
  std::int64_t i = 0;
  T sum(0);
  if constexpr (!simd::is_scalar_v<Arch>) {
    using B = xsimd::batch<T, Arch>;
    constexpr std::int64_t L = B::size;
    const B mb(m);
    B s0(T(0)), s1(T(0));
    for (; i + 2 * L <= n; i += 2 * L) {
      const B e0 = simd::exp(B::load_unaligned(src + i) - mb);
      const B e1 = simd::exp(B::load_unaligned(src + i + L) - mb);
      e0.store_unaligned(dst + i);
      e1.store_unaligned(dst + i + L);
      s0 += e0;
      s1 += e1;
    }
    for (; i + L <= n; i += L) {
      const B e = simd::exp(B::load_unaligned(src + i) - mb);
      e.store_unaligned(dst + i);
      s0 += e;
    }
    if (i < n) {  // tail: pad with -inf (exp gives 0) rather than a scalar exp loop
      alignas(64) T buf[L];
      std::fill_n(buf, L, -std::numeric_limits<T>::infinity());
      std::copy(src + i, src + n, buf);
      const B e = simd::exp(B::load_aligned(buf) - mb);
      e.store_aligned(buf);
      std::copy(buf, buf + (n - i), dst + i);
      s0 += e;
      i = n;
    }
    sum = simd::hsum(s0 + s1);
  }
  for (; i < n; ++i) {
    const T e = simd::exp(src[i] - m);
    dst[i] = e;
    sum += e;
  }
  // sum >= 1 (the max contributes exp(0) = 1), so the reciprocal is safe.
  scale(arch, T(1) / sum, dst, n);
  if (log_sum_exp) *log_sum_exp = m + std::log(sum);
}

/// src: [rows, n] with row stride src_stride, dst: [rows, n] with row stride
/// dst_stride (elements); each row of dst = softmax of the row of src.
/// src and dst may be the same buffer with the same stride (in place).
template <class Arch, class T>
void softmax_rows(Arch arch, const T* src, std::ptrdiff_t src_stride, T* dst,
                  std::ptrdiff_t dst_stride, std::int64_t rows, std::int64_t n) noexcept {
  for (std::int64_t r = 0; r < rows; ++r) {
    softmax_row(arch, src + r * src_stride, dst + r * dst_stride, n);
  }
}

}  // namespace kernels

namespace core {

/// src: [R, N], dst: [R, N] (unit inner stride); dst[r] = softmax(src[r]) on
/// Arch (default simd::default_arch; a template parameter so that TUs built for
/// different ISAs get different symbols). src and dst may be the same view (in place). Rows whose
/// entries are all -inf give zeros. Rows run in parallel (parallel_for); each
/// row is computed the same way on any thread, so results do not depend on the
/// thread count. Throws shape_error if the shapes differ or an inner stride is not 1.
template <class T, class Arch = simd::default_arch>
void softmax_rows(std::type_identity_t<ConstView<T, 2>> src, View<T, 2> dst) {
  detail::check_unit_inner_stride("core", "softmax_rows", "src", src);
  detail::check_unit_inner_stride("core", "softmax_rows", "dst", dst);
  detail::check_shape("core", "softmax_rows", "src", src, {"R", "N"}, {-1, -1});
  detail::check_shape("core", "softmax_rows", "dst", dst, {"R", "N"},
                      {src.extent(0), src.extent(1)}, "must match src");
  const std::int64_t rows = src.extent(0), n = src.extent(1);
  // Fixed chunks of about 16k elements: enough work per task to pay for a thread.
  const std::int64_t chunk =
      std::max<std::int64_t>(1, (std::int64_t{1} << 14) / std::max<std::int64_t>(1, n));
  parallel_for(num_chunks(rows, chunk), [&](std::int64_t c) {
    const std::int64_t r0 = c * chunk, r1 = std::min(rows, r0 + chunk);
    kernels::softmax_rows(Arch{}, src.data() + r0 * src.stride(0), src.stride(0),
                          dst.data() + r0 * dst.stride(0), dst.stride(0), r1 - r0, n);
  });
}

/// x: [R, N] (unit inner stride); softmax of each row in place.
template <class T, class Arch = simd::default_arch>
void softmax_rows(View<T, 2> x) {
  softmax_rows<T, Arch>(x, x);
}

}  // namespace core
}  // namespace v0
}  // namespace switchyard
SWITCHYARD_DIAGNOSTIC_POP
