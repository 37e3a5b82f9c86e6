#pragma once
// GEMM with bf16 operands and float accumulation: C = op(A) op(B) + beta C, A and B bf16
// (checkpoint weights and activations in their own type, no float copy), C float.
// Three paths, chosen at compile time like the other kernels and checked at run time for AMX:
//  - Bf16Path::amx: TDPBF16PS tiles (builds targeting AMX, Linux granting the tile state);
//  - Bf16Path::avx512_bf16: VDPBF16PS (builds targeting AVX512-BF16);
//  - Bf16Path::widen: bf16 widened to float block by block, then the float GEMM (any build).
// The first two share a GotoBLAS-style loop nest: B packed once per column block (k in
// super-blocks of 16384) and shared by every thread, A packed per task of 256 rows, 32 x 32
// blocks of sums kept contiguous per thread and added to C once. Every element of C is summed in
// the same order for any thread count, so results do not depend on it.
#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/amx.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/gemm_bf16_kernels.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace core {
// The arch namespace (simd/arch.hpp): the paths compiled in differ with the instruction set.
inline namespace SWITCHYARD_ARCH_NS {

/// The compute paths of gemm_bf16.
enum class Bf16Path { amx, avx512_bf16, widen };

/// "amx", "avx512_bf16" or "widen".
constexpr const char* bf16_path_name(Bf16Path p) noexcept {
  return p == Bf16Path::amx ? "amx" : p == Bf16Path::avx512_bf16 ? "avx512_bf16" : "widen";
}

/// Whether gemm_bf16 can run `path` here: compiled into this build, and for AMX granted by
/// the OS (requested on the first call).
inline bool bf16_path_available(Bf16Path path) noexcept {
  switch (path) {
    case Bf16Path::amx:
      return simd::amx_usable();
    case Bf16Path::avx512_bf16:
      return kernels::avx512_bf16_compiled;
    case Bf16Path::widen:
      return true;
  }
  return false;
}

/// The fastest available path: AMX, else AVX512-BF16, else widening to float.
inline Bf16Path bf16_best_path() noexcept {
  if (bf16_path_available(Bf16Path::amx)) return Bf16Path::amx;
  if (bf16_path_available(Bf16Path::avx512_bf16)) return Bf16Path::avx512_bf16;
  return Bf16Path::widen;
}

namespace bf16_detail {

/// Blocking of the tile paths: k per packed A block, rows and columns of C per task, and the
/// most bytes of B packed at once.
inline constexpr std::int64_t bf16_kc = 256;
inline constexpr std::int64_t bf16_mc = 256;
inline constexpr std::int64_t bf16_nc_task = 512;
inline constexpr std::int64_t bf16_b_block_bytes = std::int64_t(32) << 20;
inline constexpr std::int64_t bf16_k_super = 16384;

/// Frees storage from ::operator new(bytes, align_val_t{64}).
struct AlignedFree {
  void operator()(void* p) const noexcept { ::operator delete (p, std::align_val_t{64}); }
};

/// One 32 x 32 block of sums (row-major, contiguous) through `path`'s kernel.
inline void bf16_block(Bf16Path path, std::int64_t steps, const bf16* ap, const bf16* bp,
                       float* acc, bool accumulate) noexcept {
#if SWITCHYARD_HAS_AMX
  if (path == Bf16Path::amx)
    return kernels::amx_block(steps, ap, bp, acc, kernels::bf16_block, accumulate);
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (path == Bf16Path::avx512_bf16)
    return kernels::avx512_bf16_block(steps, ap, bp, acc, kernels::bf16_block, accumulate);
#endif
  (void)path, (void)steps, (void)ap, (void)bp, (void)acc, (void)accumulate;
}

}  // namespace bf16_detail

/// bf16 values gemm_bf16_packed's operands take: op(A) [m, k] as kernels::pack_bf16_a leaves
/// it, op(B) [k, n] as kernels::pack_bf16_b leaves it (both zero-padded to 32).
constexpr std::int64_t bf16_packed_a_size(std::int64_t m, std::int64_t k) noexcept {
  return round_up(m, kernels::bf16_block) * round_up(k, kernels::bf16_step);
}
constexpr std::int64_t bf16_packed_b_size(std::int64_t k, std::int64_t n) noexcept {
  return round_up(n, kernels::bf16_block) * round_up(k, kernels::bf16_step);
}

/// C [m, n] (strides rsc, csc) = A B + beta C from packed operands (steps = ceil(k / 32) each),
/// on the calling thread, through `path` (amx or avx512_bf16, available). 32 x 32 blocks of
/// sums are kept contiguous in a per-thread buffer (tile loads and stores stay in L1 / L2
/// whatever C's leading dimension) and written once, one rounding with beta C; C's old values
/// are not read when beta is 0. Blocks: 256 rows x 512 columns, k in blocks of 256.
inline void gemm_bf16_packed(Bf16Path path, std::int64_t m, std::int64_t n, std::int64_t k,
                             const bf16* ap, const bf16* bp, float* c, std::int64_t rsc,
                             std::int64_t csc, float beta) {
  constexpr std::int64_t B = kernels::bf16_block, S = kernels::bf16_step;
  constexpr std::int64_t P = kernels::bf16_panel_step;
  const std::int64_t steps_k = num_chunks(k, S);
  thread_local std::vector<float, xsimd::aligned_allocator<float, 64>> acc;
  acc.resize(std::size_t(bf16_detail::bf16_mc * bf16_detail::bf16_nc_task));
#if SWITCHYARD_HAS_AMX
  std::unique_ptr<simd::AmxTileScope> tiles;
  if (path == Bf16Path::amx) tiles = std::make_unique<simd::AmxTileScope>();
#endif
  for (std::int64_t i0 = 0; i0 < m; i0 += bf16_detail::bf16_mc) {
    const std::int64_t mc = std::min(bf16_detail::bf16_mc, m - i0), bm = num_chunks(mc, B);
    for (std::int64_t j0 = 0; j0 < n; j0 += bf16_detail::bf16_nc_task) {
      const std::int64_t nt = std::min(bf16_detail::bf16_nc_task, n - j0), bn = num_chunks(nt, B);
      for (std::int64_t p0 = 0; p0 < k; p0 += bf16_detail::bf16_kc) {
        const std::int64_t steps = num_chunks(std::min(bf16_detail::bf16_kc, k - p0), S);
        for (std::int64_t jb = 0; jb < bn; ++jb)
          for (std::int64_t ib = 0; ib < bm; ++ib)
            bf16_detail::bf16_block(path, steps, ap + ((i0 / B + ib) * steps_k + p0 / S) * P,
                                    bp + ((j0 / B + jb) * steps_k + p0 / S) * P,
                                    acc.data() + (ib * bn + jb) * B * B, p0 > 0);
      }
      for (std::int64_t i = 0; i < mc; ++i) {
        float* crow = c + (i0 + i) * rsc + j0 * csc;
        const float* arow = acc.data() + (i / B) * bn * B * B + (i % B) * B;
        for (std::int64_t j = 0; j < nt; ++j) {
          const float sum = arow[(j / B) * B * B + j % B];
          crow[j * csc] = beta == 0.0f ? sum : sum + beta * crow[j * csc];
        }
      }
    }
  }
}

namespace bf16_detail {

/// The AMX / AVX512-BF16 path of gemm_bf16 (shapes already checked, m, n, k > 0). B is packed
/// for all of k, a column block at a time (at most ~32 MiB), and shared by every task; a task
/// packs its 256 rows of A once, for all of k, and runs gemm_bf16_packed over its columns, so
/// each [256, 512] region of sums stays in L2 across the k blocks.
inline void gemm_bf16_tiles(Bf16Path path, const bf16* a, std::int64_t rsa, std::int64_t csa,
                            const bf16* b, std::int64_t rsb, std::int64_t csb, float* c,
                            std::int64_t rsc, std::int64_t csc, std::int64_t m, std::int64_t n,
                            std::int64_t k, float beta) {
  constexpr std::int64_t B = kernels::bf16_block, S = kernels::bf16_step;
  // k in super-blocks of at most bf16_k_super, so the packs stay bounded for any K (the sums
  // of one super-block are added to C before the next).
  const std::int64_t k_super = std::min(round_up(k, S), bf16_k_super);
  const std::int64_t steps_max = k_super / S;
  // Columns per packed B block: k_super x nc bf16 within bf16_b_block_bytes, whole slices.
  const std::int64_t nc_fit = bf16_b_block_bytes / (k_super * std::int64_t(sizeof(bf16)));
  const std::int64_t nc_max =
      std::min(round_up(n, B), std::max(bf16_nc_task, nc_fit / bf16_nc_task * bf16_nc_task));
  // 64-byte aligned (a tile row that straddles two cache lines halves the tiles' feed rate),
  // and not zeroed: packing writes every element.
  const std::unique_ptr<bf16, AlignedFree> bpack_storage(static_cast<bf16*>(::operator new (
      std::size_t(round_up(nc_max, B) * k_super) * sizeof(bf16), std::align_val_t{64})));
  bf16* const bpack = bpack_storage.get();
  for (std::int64_t k0 = 0; k0 < k; k0 += k_super) {
    const std::int64_t kk = std::min(k_super, k - k0), steps_k = num_chunks(kk, S);
    const float beta_k = k0 == 0 ? beta : 1.0f;
    const bf16* const ak = a + k0 * csa;
    const bf16* const bk = b + k0 * rsb;
    for (std::int64_t j0 = 0; j0 < n; j0 += nc_max) {
      const std::int64_t nc = std::min(nc_max, n - j0);
      const std::int64_t panels = num_chunks(nc, B);
      // Panels packed in parallel, 8 at a time.
      parallel_for(num_chunks(panels, 8), [&](std::int64_t t) {
        const std::int64_t q0 = t * 8 * B, qn = std::min(8 * B, nc - q0);
        kernels::pack_bf16_b(bk + (j0 + q0) * csb, rsb, csb, kk, qn, steps_k,
                             bpack + (q0 / B) * steps_k * kernels::bf16_panel_step);
      });
      // Tasks: row blocks, split into column groups only where there are fewer row blocks
      // than two per thread.
      const std::int64_t blocks_m = num_chunks(m, bf16_mc);
      const std::int64_t slices = num_chunks(nc, bf16_nc_task);
      const std::int64_t groups =
          std::clamp<std::int64_t>(num_chunks(2 * num_threads(), blocks_m), 1, slices);
      const std::int64_t per_group = num_chunks(slices, groups);
      parallel_for(blocks_m * groups, [&](std::int64_t t) {
        const std::int64_t i0 = (t / groups) * bf16_mc, mc = std::min(bf16_mc, m - i0);
        const std::int64_t s0 = (t % groups) * per_group;
        const std::int64_t s_end = std::min(slices, s0 + per_group);
        if (s0 >= s_end) return;
        thread_local std::vector<bf16, xsimd::aligned_allocator<bf16, 64>> apack;
        apack.resize(std::size_t(bf16_mc * steps_max * S));
        kernels::pack_bf16_a(ak + i0 * rsa, rsa, csa, nullptr, mc, kk, steps_k, apack.data());
        const std::int64_t jt = s0 * bf16_nc_task;
        const std::int64_t nt = std::min(s_end * bf16_nc_task, nc) - jt;
        gemm_bf16_packed(path, mc, nt, kk, apack.data(),
                         bpack + (jt / B) * steps_k * kernels::bf16_panel_step,
                         c + i0 * rsc + (j0 + jt) * csc, rsc, csc, beta_k);
      });
    }
  }
}

/// The widening path: blocks of op(A) (up to 4096 rows) and op(B) (up to 4096 columns), 256
/// values of k at a time, widened to float, then gemm_parallel on each block of C. Bounded
/// buffers (8 MiB) for any shape.
template <class Arch>
void gemm_bf16_widen(const bf16* a, std::int64_t rsa, std::int64_t csa, const bf16* b,
                     std::int64_t rsb, std::int64_t csb, const View<float, 2>& c, std::int64_t m,
                     std::int64_t n, std::int64_t k, float beta) {
  constexpr std::int64_t kc_max = 256, block = 4096;
  const std::int64_t kc0 = std::min(kc_max, k);
  std::unique_ptr<float[]> aw(new float[std::size_t(std::min(m, block) * kc0)]);
  std::unique_ptr<float[]> bw(new float[std::size_t(kc0 * std::min(n, block))]);
  for (std::int64_t j0 = 0; j0 < n; j0 += block) {
    const std::int64_t nb = std::min(block, n - j0);
    for (std::int64_t i0 = 0; i0 < m; i0 += block) {
      const std::int64_t mb = std::min(block, m - i0);
      const View<float, 2> cb = c.slice(0, i0, i0 + mb).slice(1, j0, j0 + nb);
      for (std::int64_t p0 = 0; p0 < k; p0 += kc_max) {
        const std::int64_t kc = std::min(kc_max, k - p0);
        parallel_for(mb, [&](std::int64_t i) {
          for (std::int64_t p = 0; p < kc; ++p)
            aw[std::size_t(i * kc + p)] = to_float(a[(i0 + i) * rsa + (p0 + p) * csa]);
        });
        parallel_for(kc, [&](std::int64_t p) {
          for (std::int64_t j = 0; j < nb; ++j)
            bw[std::size_t(p * nb + j)] = to_float(b[(p0 + p) * rsb + (j0 + j) * csb]);
        });
        gemm_parallel<float, Arch>(ConstView<float, 2>(aw.get(), {mb, kc}), Trans::no,
                                   ConstView<float, 2>(bw.get(), {kc, nb}), Trans::no, cb, 1.0f,
                                   p0 == 0 ? beta : 1.0f);
      }
    }
  }
}

}  // namespace bf16_detail

/// C = op(A) op(B) + beta C with bf16 operands, accumulated in float.
/// a: [M, K] (or [K, M] with ta = yes); b: [K, N] (or [N, K] with tb = yes: nn.Linear's
/// weight); c: [M, N] float. Any strides. beta = 0 overwrites C even where it holds NaN;
/// K = 0 gives beta C. path: any path for which bf16_path_available() is true (default: the
/// fastest). Paths sum in different orders, so their results differ by rounding; each is
/// within float accumulation's bound K * 2^-24 * sum_k |A_ik B_kj| of the exact product.
/// Throws shape_error (mismatched extents, C sharing memory with A or B) and config_error
/// (a path this build or machine cannot run, a non-finite beta).
template <class Arch = simd::default_arch>
void gemm_bf16(ConstView<bf16, 2> a, Trans ta, ConstView<bf16, 2> b, Trans tb, View<float, 2> c,
               float beta = 0.0f, Bf16Path path = bf16_best_path()) {
  const std::array<std::int64_t, 3> mnk =
      detail::gemm_check<bf16, float>("gemm_bf16", a, ta, b, tb, c);
  const std::int64_t m = mnk[0], n = mnk[1], k = mnk[2];
  if (!bf16_path_available(path)) {
    switchyard::detail::fail_config("core", "gemm_bf16", "path", bf16_path_name(path),
                                    std::string("a path this build and CPU can run (best here: ") +
                                        bf16_path_name(bf16_best_path()) + ")");
  }
  if (!(beta - beta == 0.0f)) {
    switchyard::detail::fail_config("core", "gemm_bf16", "beta", beta, "a finite number");
  }
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) c(i, j) = beta == 0.0f ? 0.0f : beta * c(i, j);
    return;
  }
  const std::int64_t rsa = ta == Trans::no ? a.stride(0) : a.stride(1);
  const std::int64_t csa = ta == Trans::no ? a.stride(1) : a.stride(0);
  const std::int64_t rsb = tb == Trans::no ? b.stride(0) : b.stride(1);
  const std::int64_t csb = tb == Trans::no ? b.stride(1) : b.stride(0);
  if (path == Bf16Path::widen) {
    bf16_detail::gemm_bf16_widen<Arch>(a.data(), rsa, csa, b.data(), rsb, csb, c, m, n, k, beta);
  } else {
    bf16_detail::gemm_bf16_tiles(path, a.data(), rsa, csa, b.data(), rsb, csb, c.data(),
                                 c.stride(0), c.stride(1), m, n, k, beta);
  }
}

}  // namespace SWITCHYARD_ARCH_NS
}  // namespace core
}  // namespace v0
}  // namespace switchyard
