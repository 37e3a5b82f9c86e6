#pragma once
// GEMM on views: C = alpha * op(A) * op(B) + beta * C, on switchyard's own packed
// micro-kernel (core/simd/gemm_kernel.hpp). gemm is serial; gemm_parallel runs the same loop
// nest with the threads sharing each packed block of B, and gives gemm's bits for every
// thread count.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/gemm_kernel.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace core {

/// Whether an operand is used as stored or transposed.
enum class Trans { no, yes };

/// Bytes of workspace gemm needs for op(A) [m, k] * op(B) [k, n] on Arch.
template <class T, class Arch = simd::default_arch>
std::size_t gemm_workspace_bytes(std::int64_t m, std::int64_t n, std::int64_t k) noexcept {
  return kernels::gemm_workspace_elems<Arch, T>(Arch{}, m, n, k) * sizeof(T) + 64;
}

namespace detail {

inline std::string op_shape(std::int64_t r, std::int64_t c, const char* rn, const char* cn,
                            Trans t) {
  const std::int64_t e[2] = {r, c};
  return switchyard::detail::format_shape({rn, cn}, e) + (t == Trans::yes ? " (transposed)" : "");
}

/// Validates shapes and returns {M, N, K}; throws shape_error naming gemm and the argument.
/// T: the operands' element type; C: the result's (float for bf16 operands).
template <class T, class C = T>
std::array<std::int64_t, 3> gemm_check(std::string_view fn, const ConstView<T, 2>& a, Trans ta,
                                       const ConstView<T, 2>& b, Trans tb, const View<C, 2>& c) {
  check_shape("core", fn, "a", a, {"rows", "cols"}, {-1, -1});
  check_shape("core", fn, "b", b, {"rows", "cols"}, {-1, -1});
  const std::int64_t m = ta == Trans::no ? a.extent(0) : a.extent(1);
  const std::int64_t k = ta == Trans::no ? a.extent(1) : a.extent(0);
  const std::int64_t kb = tb == Trans::no ? b.extent(0) : b.extent(1);
  const std::int64_t n = tb == Trans::no ? b.extent(1) : b.extent(0);
  if (kb != k) {
    switchyard::detail::fail_shape(
        "core", fn, "b", op_shape(kb, n, "K", "N", tb), "[K=" + std::to_string(k) + ", N]",
        "inner dimensions differ: op(a) is " + op_shape(m, k, "M", "K", ta));
  }
  if (c.extent(0) != m || c.extent(1) != n) {
    switchyard::detail::fail_shape(
        "core", fn, "c", switchyard::detail::format_shape({"M", "N"}, c.shape()),
        "[M=" + std::to_string(m) + ", N=" + std::to_string(n) + "]",
        "op(a) is " + op_shape(m, k, "M", "K", ta) + ", op(b) is " + op_shape(k, n, "K", "N", tb));
  }
  // Stride-0 views can claim any extents; the packing workspace and the loops need sizes
  // that exist.
  switchyard::detail::checked_size("core", fn, "a", {m, k}, sizeof(T));
  switchyard::detail::checked_size("core", fn, "b", {k, n}, sizeof(T));
  switchyard::detail::checked_size("core", fn, "c", {m, n}, sizeof(C));
  check_no_alias("core", fn, "c", c, "a", a, "C is written while A is still read");
  check_no_alias("core", fn, "c", c, "b", b, "C is written while B is still read");
  return {m, n, k};
}

template <class T, class Arch>
void gemm_run(const ConstView<T, 2>& a, Trans ta, const ConstView<T, 2>& b, Trans tb,
              const View<T, 2>& c, T alpha, T beta, std::int64_t m, std::int64_t n, std::int64_t k,
              T* ws) noexcept {
  const std::int64_t rsa = ta == Trans::no ? a.stride(0) : a.stride(1);
  const std::int64_t csa = ta == Trans::no ? a.stride(1) : a.stride(0);
  const std::int64_t rsb = tb == Trans::no ? b.stride(0) : b.stride(1);
  const std::int64_t csb = tb == Trans::no ? b.stride(1) : b.stride(0);
  kernels::gemm(Arch{}, m, n, k, alpha, a.data(), rsa, csa, nullptr, b.data(), rsb, csb, beta,
                c.data(), c.stride(0), c.stride(1), ws);
}

}  // namespace detail

/// C = alpha * op(A) * op(B) + beta * C with a caller-provided workspace (no allocation).
/// a: [M, K] (or [K, M] with ta = yes); b: [K, N] (or [N, K] with tb = yes); c: [M, N].
/// Any strides (transposes and sub-views need no copies). beta = 0 overwrites C even
/// where it holds NaN; alpha = 0 or K = 0 gives beta * C. C must not share memory with A
/// or B (shape_error).
/// workspace: at least gemm_workspace_bytes<T, Arch>(M, N, K) bytes, any alignment, separate
/// from A, B and C.
/// Throws shape_error (naming gemm, the argument and both shapes) on mismatched
/// extents or a too-small workspace.
template <class T, class Arch = simd::default_arch>
void gemm(ConstView<std::type_identity_t<T>, 2> a, Trans ta,
          ConstView<std::type_identity_t<T>, 2> b, Trans tb, View<T, 2> c,
          std::type_identity_t<T> alpha, std::type_identity_t<T> beta,
          std::span<std::byte> workspace) {
  const auto [m, n, k] = detail::gemm_check<T>("gemm", a, ta, b, tb, c);
  const std::size_t need = gemm_workspace_bytes<T, Arch>(m, n, k);
  if (workspace.size() < need) {
    switchyard::detail::fail_shape(
        "core", "gemm", "workspace", "[bytes=" + std::to_string(workspace.size()) + "]",
        "[bytes>=" + std::to_string(need) + "]", "gemm_workspace_bytes(M, N, K)");
  }
  const View<std::byte, 1> ws(workspace.data(), {static_cast<std::int64_t>(workspace.size())});
  detail::check_no_alias("core", "gemm", "workspace", ws, "a", a);
  detail::check_no_alias("core", "gemm", "workspace", ws, "b", b);
  detail::check_no_alias("core", "gemm", "workspace", ws, "c", c);
  detail::gemm_run<T, Arch>(a, ta, b, tb, c, alpha, beta, m, n, k,
                            reinterpret_cast<T*>(workspace.data()));
}

/// C = alpha * op(A) * op(B) + beta * C; allocates its workspace. Shapes as above:
/// a: [M, K] (ta = no) or [K, M] (ta = yes); b: [K, N] or [N, K]; c: [M, N].
template <class T, class Arch = simd::default_arch>
void gemm(ConstView<std::type_identity_t<T>, 2> a, Trans ta,
          ConstView<std::type_identity_t<T>, 2> b, Trans tb, View<T, 2> c,
          std::type_identity_t<T> alpha = T(1), std::type_identity_t<T> beta = T(0)) {
  const auto [m, n, k] = detail::gemm_check<T>("gemm", a, ta, b, tb, c);
  const std::size_t elems = kernels::gemm_workspace_elems<Arch, T>(Arch{}, m, n, k);
  std::unique_ptr<T[]> ws(new T[elems]);
  detail::gemm_run<T, Arch>(a, ta, b, tb, c, alpha, beta, m, n, k, ws.get());
}

namespace detail {

/// 64-byte aligned scratch of T, reused by the calling thread across calls.
template <class T>
T* thread_scratch(std::size_t elems) {
  thread_local std::vector<T, xsimd::aligned_allocator<T, 64>> buf;
  if (buf.size() < elems) buf.resize(elems);
  return buf.data();
}

}  // namespace detail

/// Columns of C per thread from which gemm_parallel splits C by columns rather than by rows.
/// Measured on Emerald Rapids, 2 threads, against the row split: 1.01-1.06x at 1024^3 and
/// 4096^3, 1.17-1.32x at 256-512 rows (512 x 2816 x 1024, 512 x 1024 x 2816, 256 x 4096 x
/// 4096), 0.83-0.85x with 128 columns per thread (4096 x 256 x 2048).
inline constexpr std::int64_t gemm_column_split_min = 512;

/// gemm on several threads. With at least gemm_column_split_min columns of C per thread, each
/// thread runs gemm on its own columns. Otherwise every thread works on the same packed blocks
/// of B (GotoBLAS's scheme): per (column block, k block) the threads pack B's kc x nc block
/// together, then split the rows of C, each packing its own rows of A. Either way every element
/// is summed as gemm sums it (k blocks in ascending order, beta on the first, the same micro-tile
/// grid), so the result equals gemm's bit for bit and does not depend on the thread count.
/// Shapes as gemm: a: [M, K] or [K, M]; b: [K, N] or [N, K]; c: [M, N]. The row split
/// allocates the shared B block; everything else lives in per-thread buffers.
template <class T, class Arch = simd::default_arch>
void gemm_parallel(ConstView<std::type_identity_t<T>, 2> a, Trans ta,
                   ConstView<std::type_identity_t<T>, 2> b, Trans tb, View<T, 2> c,
                   std::type_identity_t<T> alpha = T(1), std::type_identity_t<T> beta = T(0)) {
  // Plain variables, not a structured binding: clang 14 cannot capture bindings.
  const std::array<std::int64_t, 3> mnk = detail::gemm_check<T>("gemm_parallel", a, ta, b, tb, c);
  const std::int64_t m = mnk[0], n = mnk[1], k = mnk[2];
  using G = kernels::GemmTile<Arch, T>;
  const int threads = num_threads();
  if (threads <= 1 || m <= G::mr) {
    const std::size_t elems = kernels::gemm_workspace_elems<Arch, T>(Arch{}, m, n, k);
    detail::gemm_run<T, Arch>(a, ta, b, tb, c, alpha, beta, m, n, k,
                              detail::thread_scratch<T>(elems));
    return;
  }
  const std::int64_t rsa = ta == Trans::no ? a.stride(0) : a.stride(1);
  const std::int64_t csa = ta == Trans::no ? a.stride(1) : a.stride(0);
  const std::int64_t rsb = tb == Trans::no ? b.stride(0) : b.stride(1);
  const std::int64_t csb = tb == Trans::no ? b.stride(1) : b.stride(0);
  const std::int64_t rsc = c.stride(0), csc = c.stride(1);
  if (k == 0 || alpha == T(0)) {  // C = beta C, without reading A or B
    kernels::gemm(Arch{}, m, n, k, alpha, a.data(), rsa, csa, nullptr, b.data(), rsb, csb, beta,
                  c.data(), rsc, csc, detail::thread_scratch<T>(1));
    return;
  }
  if (n >= gemm_column_split_min * threads) {
    // Column split: each thread runs gemm's loop nest on its own columns (a multiple of nr
    // wide, so the micro-tile grid is gemm's), with its own B blocks in its own L2 and no
    // barrier. Every thread packs all of A, once per B block: about 1 / (2 * its columns) of
    // its work, hence the minimum width.
    const std::int64_t cols = num_chunks(num_chunks(n, G::nr), threads) * G::nr;
    parallel_for(threads, [&](std::int64_t t) {
      const std::int64_t j0 = t * cols, nt = std::min(n, j0 + cols) - j0;
      if (nt <= 0) return;
      const std::size_t elems = kernels::gemm_workspace_elems<Arch, T>(Arch{}, m, nt, k);
      kernels::gemm(Arch{}, m, nt, k, alpha, a.data(), rsa, csa, nullptr, b.data() + j0 * csb, rsb,
                    csb, beta, c.data() + j0 * csc, rsc, csc, detail::thread_scratch<T>(elems));
    });
    return;
  }
  // Row split: the threads pack each B block together, then share it.
  const std::int64_t kc_max = std::min<std::int64_t>(k, G::kc());
  const std::int64_t nc_max = std::min<std::int64_t>(round_up(n, G::nr), G::nc());
  std::vector<T, xsimd::aligned_allocator<T, 64>> bpack(std::size_t(kc_max * nc_max));
  // Row tasks: whole register panels, about four per thread for balance.
  const std::int64_t panels_m = num_chunks(m, G::mr);
  const std::int64_t rows_per_task =
      G::mr * num_chunks(panels_m, std::min<std::int64_t>(panels_m, 4 * threads));
  const std::int64_t tasks_m = num_chunks(m, rows_per_task);
  const std::int64_t mc_max = std::min<std::int64_t>(round_up(rows_per_task, G::mr), G::mc);
  for (std::int64_t j0 = 0; j0 < n; j0 += G::nc()) {
    const std::int64_t nc = std::min<std::int64_t>(G::nc(), n - j0);
    const std::int64_t panels_n = num_chunks(nc, G::nr);
    for (std::int64_t p0 = 0; p0 < k; p0 += G::kc()) {
      const std::int64_t kc = std::min<std::int64_t>(G::kc(), k - p0);
      const T beta_eff = p0 == 0 ? beta : T(1);
      parallel_for(num_chunks(panels_n, 4), [&](std::int64_t t) {
        const std::int64_t q0 = t * 4 * G::nr, qn = std::min<std::int64_t>(4 * G::nr, nc - q0);
        kernels::detail::pack_b<Arch, G::nr>(Arch{}, b.data(), rsb, csb, p0, kc, j0 + q0, qn,
                                             bpack.data() + q0 * kc);
      });
      parallel_for(tasks_m, [&](std::int64_t t) {
        T* apack = detail::thread_scratch<T>(std::size_t(mc_max * kc_max));
        kernels::detail::gemm_rows(Arch{}, t * rows_per_task, std::min(m, (t + 1) * rows_per_task),
                                   p0, kc, j0, nc, alpha, a.data(), rsa, csa, nullptr, bpack.data(),
                                   beta_eff, c.data(), rsc, csc, apack);
      });
    }
  }
}

}  // namespace core
}  // namespace v0
}  // namespace switchyard
