#pragma once
// linear: y = x w^T for an nn.Linear weight w [out, in], the projection every model layer
// runs (q/k/v/o, router logits, LM head). The weight may be stored as the compute type or
// as bf16 / f16 (a checkpoint mapped in place): it is read through the packed GEMM's
// streamed path (core/simd/gemm_packed.hpp), which packs kc x NR blocks of w just before
// use and widens 16-bit values while packing, so no float copy of w is ever made and the
// weights are read from memory once per call. Threads split the output columns; every
// element is summed the same way whichever thread computes it (bit-identical for any thread
// count). Two shapes take other routes with the same sums: fewer outputs than the
// micro-kernel's width (router logits) compute y^T = w x^T, and many rows (prefill, weights
// of the compute type) run gemm_parallel.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/gemm_packed.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace core {

/// Rows of x above which linear (with weights of the compute type) runs gemm_parallel.
inline constexpr std::int64_t linear_gemm_rows = 512;
/// Most outputs for which linear computes y^T = w x^T (router logits, small heads) when x has
/// at least a micro-kernel's width of rows: w is packed once and x streamed through register
/// transposes (measured 1.1-1.8x the direct GEMM at N 64-256, 4-5x at N 8, same bits).
inline constexpr std::int64_t linear_skinny_cols = 256;

namespace detail {

/// linear for few outputs (router logits): y^T = w x^T, so the N outputs are rows of the
/// micro-kernel (its few-row variants use every FMA lane at N = 8) and the tokens its columns,
/// instead of N of NR columns with a scalar-packed copy of x. w is widened and packed once
/// (N <= linear_skinny_cols rows); each task streams 8 x NR rows of x through the packed GEMM's
/// streamed path (register transposes) and transposes its [N, rows] result into y. Every
/// element is summed as the other paths sum it (k blocks in ascending order): same bits.
template <class Arch, class T, class W>
void linear_skinny_n(const ConstView<T, 2>& x, const ConstView<W, 2>& w, const View<T, 2>& y) {
  using G = kernels::GemmTile<Arch, T>;
  const std::int64_t m = x.extent(0), k = x.extent(1), n = w.extent(0);
  // w as T, rows contiguous (at most linear_skinny_cols rows), then packed as the A operand.
  std::unique_ptr<T[]> wt(new T[std::size_t(n * k)]);
  for (std::int64_t j = 0; j < n; ++j)
    for (std::int64_t p = 0; p < k; ++p) wt[std::size_t(j * k + p)] = T(to_float(w(j, p)));
  const std::int64_t n_pad = round_up(n, G::mr);
  std::unique_ptr<T[]> ap(new T[std::size_t(n_pad * k)]);
  kernels::pack_a_all(Arch{}, wt.get(), k, std::int64_t(1), nullptr, n, k, ap.get());
  constexpr std::int64_t rows = 8 * G::nr;  // tokens per task
  parallel_for(num_chunks(m, rows), [&](std::int64_t t) {
    const std::int64_t i0 = t * rows, mt = std::min(rows, m - i0);
    alignas(64) T bblock[G::kc_max * G::nr];
    thread_local std::vector<T, xsimd::aligned_allocator<T, 64>> yt_buf;  // y^T: [n, mt]
    yt_buf.resize(std::size_t(n * rows));
    T* const yt = yt_buf.data();
    kernels::gemm_packed_streamed(Arch{}, n, mt, k, ap.get(), x.data() + i0 * x.stride(0),
                                  x.stride(0), x.stride(1), T(0), yt, mt, bblock);
    for (std::int64_t i = 0; i < mt; ++i)
      for (std::int64_t j = 0; j < n; ++j) y(i0 + i, j) = yt[j * mt + i];
  });
}

}  // namespace detail

/// y [M, N] = x [M, K] w^T, w [N, K] in nn.Linear layout [out, in], stored as T or (for
/// T = float) as bf16 / f16. Any strides for x, w and y; y is overwritten and must not share
/// memory with x or w. M = 0 or N = 0 does nothing; K = 0 gives zeros.
/// Allocates one packed copy of x (M x K) and a kc x NR block per thread, never a copy of w
/// (N <= linear_skinny_cols and M >= NR: a copy of w as T, packed; M > linear_gemm_rows:
/// gemm_parallel's B blocks).
/// Throws shape_error naming "linear", the argument and both shapes on mismatched extents,
/// aliasing, or sizes whose byte counts overflow.
/// Views of const or mutable elements are accepted alike (x and w are only read).
template <class Arch = simd::default_arch, class X, class WS, class T>
requires(std::is_same_v<std::remove_const_t<X>, T> &&
         !std::is_const_v<T>) void linear(View<X, 2> x_in, View<WS, 2> w_in, View<T, 2> y) {
  using W = std::remove_const_t<WS>;
  static_assert(std::is_same_v<W, T> || (std::is_same_v<T, float> && is_half_v<W>),
                "linear: weights of the compute type T, or bf16 / f16 weights for float");
  const ConstView<T, 2> x = x_in;
  const ConstView<W, 2> w = w_in;
  constexpr std::string_view layer = "core", fn = "linear";
  detail::check_shape(layer, fn, "x", x, {"M", "K"}, {-1, -1});
  const std::int64_t m = x.extent(0), k = x.extent(1);
  detail::check_shape(layer, fn, "w", w, {"N", "K"}, {-1, k},
                      "nn.Linear layout [out, in]: K = x's columns");
  const std::int64_t n = w.extent(0);
  detail::check_shape(layer, fn, "y", y, {"M", "N"}, {m, n}, "M = x's rows, N = w's rows");
  switchyard::detail::checked_size(layer, fn, "x", {m, k}, sizeof(T));
  switchyard::detail::checked_size(layer, fn, "w", {n, k}, sizeof(W));
  switchyard::detail::checked_size(layer, fn, "y", {m, n}, sizeof(T));
  detail::check_no_alias(layer, fn, "y", y, "x", x, "y is written while x is still read");
  detail::check_no_alias(layer, fn, "y", y, "w", w, "y is written while w is still read");
  if (m == 0 || n == 0) return;
  if (k == 0) {  // the GEMM loops over k blocks would leave y untouched
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) y(i, j) = T(0);
    return;
  }

  using G = kernels::GemmTile<Arch, T>;
  if (n <= linear_skinny_cols && m >= G::nr) {
    detail::linear_skinny_n<Arch>(x, w, y);
    return;
  }
  if constexpr (std::is_same_v<W, T>) {
    // Many rows (prefill): the packed GEMM with shared B blocks beats streaming w, which
    // re-reads all of packed x per column panel (measured crossover 600-800 rows, 1 and 2
    // threads, Emerald Rapids). Both sum every element in the same order: same bits.
    if (m > linear_gemm_rows) {
      gemm_parallel<T, Arch>(x, Trans::no, w, Trans::yes, y);
      return;
    }
  }
  const std::int64_t m_pad = round_up(m, G::mr);
  // x packed once for all of k (kc blocks, MR-row panels), shared by every column task.
  std::unique_ptr<T[]> ap(new T[std::size_t(std::max<std::int64_t>(1, m_pad * k))]);
  kernels::pack_a_all(Arch{}, x.data(), x.stride(0), x.stride(1), nullptr, m, k, ap.get());
  // Column tasks of whole NR panels: enough of them to keep every thread streaming w.
  const std::int64_t panels = num_chunks(n, G::nr);
  const std::int64_t per_task =
      std::max<std::int64_t>(1, num_chunks(panels, std::int64_t(num_threads()) * 4));
  const std::int64_t tasks = num_chunks(panels, per_task);
  const bool unit_y = y.stride(1) == 1;
  parallel_for(tasks, [&](std::int64_t t) {
    const std::int64_t j0 = t * per_task * G::nr;
    const std::int64_t nc = std::min(n - j0, per_task * G::nr);
    alignas(64) T bblock[G::kc_max * G::nr];
    if (unit_y) {
      kernels::gemm_packed_streamed(Arch{}, m, nc, k, ap.get(), w.data() + j0 * w.stride(0),
                                    w.stride(0), w.stride(1), T(0), y.data() + j0, y.stride(0),
                                    bblock);
      return;
    }
    // y with a column stride: the task's columns go through a contiguous buffer.
    std::unique_ptr<T[]> tmp(new T[std::size_t(m * nc)]);
    kernels::gemm_packed_streamed(Arch{}, m, nc, k, ap.get(), w.data() + j0 * w.stride(0),
                                  w.stride(0), w.stride(1), T(0), tmp.get(), nc, bblock);
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < nc; ++j) y(i, j0 + j) = tmp[std::size_t(i * nc + j)];
  });
}

/// As above, returning y [M, N].
template <class Arch = simd::default_arch, class X, class WS>
Tensor<std::remove_const_t<X>> linear(View<X, 2> x, View<WS, 2> w) {
  using T = std::remove_const_t<X>;
  detail::check_shape("core", "linear", "x", x, {"M", "K"}, {-1, -1});
  detail::check_shape("core", "linear", "w", w, {"N", "K"}, {-1, x.extent(1)},
                      "nn.Linear layout [out, in]: K = x's columns");
  switchyard::detail::checked_size("core", "linear", "y", {x.extent(0), w.extent(0)}, sizeof(T));
  Tensor<T> y({x.extent(0), w.extent(0)});
  linear<Arch>(x, w, y.template view<2>());
  return y;
}

}  // namespace core
}  // namespace v0
}  // namespace switchyard
