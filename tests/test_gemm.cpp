// GEMM against a naive double-precision triple loop: every arch through the kernel
// API (strides, row gather, tails of the register tile, one past each cache block),
// then the public view API (all transposes, alpha/beta, sub-views, errors,
// thread-count-independent parallel bits).
//
// Tolerance: a float/double dot product of length K summed in any order (with or
// without FMA) satisfies |fl(s) - s| <= gamma_K * sum |a_i b_i|, gamma_K = K u / (1 - K u),
// u = eps / 2; scaling by alpha and adding beta * c costs two more roundings. So
// |C - C_ref| <= (K + 2) * eps * (|alpha| * sum_p |a_ip b_pj| + |beta| * |c_ij|) is a
// rigorous bound (with a factor ~2 to spare), computed per element.
#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <random>
#include <vector>

#include "switchyard/core/gemm.hpp"
#include "switchyard/core/gemm_bf16.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/linear.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/gemm_kernel.hpp"
#include "switchyard/core/simd/gemm_packed.hpp"
#include "switchyard/core/tensor.hpp"

// Counts heap allocations so a test can show the workspace overload allocates nothing.
// gcc 12 flags free() in the replaced operator delete as mismatched with the inlined
// `new` expressions of every TU (a false positive for replacement functions).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
namespace {
std::size_t g_allocations = 0;
}
// Every non-aligned form is replaced, so new and delete always pair up (ASan checks).
void* operator new(std::size_t n) {
  ++g_allocations;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return ::operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  ++g_allocations;
  return std::malloc(n ? n : 1);
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept {
  return ::operator new(n, t);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

namespace {

using namespace switchyard;
using core::Trans;

/// A strided matrix inside a larger buffer; padding holds a sentinel.
template <class T>
struct Mat {
  std::int64_t rows = 0, cols = 0, rs = 0, cs = 0;
  std::vector<T> buf;
  Mat(std::int64_t r, std::int64_t c, std::int64_t rs_, std::int64_t cs_)
      : rows(r), cols(c), rs(rs_), cs(cs_) {
    const std::int64_t span = r == 0 || c == 0 ? 1 : (r - 1) * rs + (c - 1) * cs + 1;
    buf.assign(std::size_t(span), T(-777));
  }
  T& at(std::int64_t i, std::int64_t j) { return buf[std::size_t(i * rs + j * cs)]; }
  T at(std::int64_t i, std::int64_t j) const { return buf[std::size_t(i * rs + j * cs)]; }
};

enum class Layout { row_major, col_major, row_padded, col_stride2 };

template <class T>
Mat<T> make_mat(std::int64_t r, std::int64_t c, Layout l) {
  switch (l) {
    case Layout::row_major:
      return Mat<T>(r, c, c, 1);
    case Layout::col_major:
      return Mat<T>(r, c, 1, r);
    case Layout::row_padded:
      return Mat<T>(r, c, c + 3, 1);
    case Layout::col_stride2:
      return Mat<T>(r, c, 2 * c + 1, 2);
  }
  return Mat<T>(r, c, c, 1);
}

template <class T>
void fill_random(Mat<T>& m, std::mt19937& gen) {
  std::uniform_real_distribution<double> ud(-1.0, 1.0);
  for (std::int64_t i = 0; i < m.rows; ++i)
    for (std::int64_t j = 0; j < m.cols; ++j) m.at(i, j) = T(ud(gen));
}

/// Naive reference in double plus the per-element error bound from the header comment.
template <class T>
void reference(const Mat<T>& a, const std::vector<std::int32_t>* rows, const Mat<T>& b,
               const Mat<T>& c0, T alpha, T beta, std::vector<double>& ref,
               std::vector<double>& bound) {
  const std::int64_t m = c0.rows, n = c0.cols, k = b.rows;
  const double eps = std::numeric_limits<T>::epsilon();
  ref.assign(std::size_t(m * n), 0.0);
  bound.assign(std::size_t(m * n), 0.0);
  for (std::int64_t i = 0; i < m; ++i) {
    const std::int64_t ai = rows ? (*rows)[std::size_t(i)] : i;
    for (std::int64_t j = 0; j < n; ++j) {
      double s = 0.0, sa = 0.0;
      for (std::int64_t p = 0; p < k; ++p) {
        s += double(a.at(ai, p)) * double(b.at(p, j));
        sa += std::abs(double(a.at(ai, p)) * double(b.at(p, j)));
      }
      const double cij = beta == T(0) ? 0.0 : double(c0.at(i, j));
      ref[std::size_t(i * n + j)] = double(alpha) * s + double(beta) * cij;
      bound[std::size_t(i * n + j)] =
          double(k + 2) * eps * (std::abs(double(alpha)) * sa + std::abs(double(beta) * cij));
    }
  }
}

/// Checks C against the reference and that C's padding still holds the sentinel.
template <class T>
void check_result(const Mat<T>& c, const std::vector<double>& ref,
                  const std::vector<double>& bound) {
  std::int64_t bad = 0, first_i = -1, first_j = -1;
  for (std::int64_t i = 0; i < c.rows; ++i)
    for (std::int64_t j = 0; j < c.cols; ++j) {
      const double got = double(c.at(i, j)), want = ref[std::size_t(i * c.cols + j)];
      if (!(std::abs(got - want) <= bound[std::size_t(i * c.cols + j)])) {
        if (bad++ == 0) first_i = i, first_j = j;
      }
    }
  CAPTURE(first_i, first_j);
  if (first_i >= 0) {
    CAPTURE(double(c.at(first_i, first_j)), ref[std::size_t(first_i * c.cols + first_j)]);
    CHECK(bad == 0);
  }
  std::vector<char> is_elem(c.buf.size(), 0);
  for (std::int64_t i = 0; i < c.rows; ++i)
    for (std::int64_t j = 0; j < c.cols; ++j) is_elem[std::size_t(i * c.rs + j * c.cs)] = 1;
  std::int64_t clobbered = 0;
  for (std::size_t x = 0; x < c.buf.size(); ++x)
    if (!is_elem[x] && c.buf[x] != T(-777)) ++clobbered;
  CHECK(clobbered == 0);
}

struct Case {
  std::int64_t m, n, k;
  Layout la, lb, lc;
  double alpha, beta;
  bool gather;
  bool nan_c;
};

/// Runs one case through kernels::gemm for every arch against one reference.
template <class T>
void run_kernel_case(const Case& cs, std::mt19937& gen) {
  CAPTURE(cs.m, cs.n, cs.k, int(cs.la), int(cs.lb), int(cs.lc), cs.alpha, cs.beta, cs.gather);
  const std::int64_t a_rows_stored = cs.gather ? cs.m + 5 : cs.m;
  Mat<T> a = make_mat<T>(a_rows_stored, cs.k, cs.la);
  Mat<T> b = make_mat<T>(cs.k, cs.n, cs.lb);
  Mat<T> c0 = make_mat<T>(cs.m, cs.n, cs.lc);
  fill_random(a, gen);
  fill_random(b, gen);
  fill_random(c0, gen);
  if (cs.nan_c)
    for (std::int64_t i = 0; i < cs.m; ++i)
      for (std::int64_t j = 0; j < cs.n; ++j) c0.at(i, j) = std::numeric_limits<T>::quiet_NaN();
  std::vector<std::int32_t> rows;
  if (cs.gather) {
    std::uniform_int_distribution<std::int32_t> pick(0, std::int32_t(a_rows_stored - 1));
    for (std::int64_t i = 0; i < cs.m; ++i) rows.push_back(pick(gen));  // repeats allowed
  }
  std::vector<double> ref, bound;
  reference(a, cs.gather ? &rows : nullptr, b, c0, T(cs.alpha), T(cs.beta), ref, bound);
  simd::for_each_arch([&](auto arch) {
    CAPTURE(decltype(arch)::name());
    Mat<T> c = c0;
    std::vector<T> ws(kernels::gemm_workspace_elems<decltype(arch), T>(arch, cs.m, cs.n, cs.k));
    kernels::gemm(arch, cs.m, cs.n, cs.k, T(cs.alpha), a.buf.data(), a.rs, a.cs,
                  cs.gather ? rows.data() : nullptr, b.buf.data(), b.rs, b.cs, T(cs.beta),
                  c.buf.data(), c.rs, c.cs, ws.data());
    check_result(c, ref, bound);
  });
}

TEMPLATE_TEST_CASE("kernels::gemm matches the naive reference on tile tails, every arch", "[gemm]",
                   float, double) {
  std::mt19937 gen(1234);
  // Sizes around every register tile (mr 4/6/12, nr 4/8/16/32 over archs and types).
  const std::vector<std::int64_t> sizes = {1,  2,  3,  4,  5,  6,  7,  8,  9,
                                           11, 12, 13, 15, 16, 17, 31, 32, 33};
  std::uniform_int_distribution<std::size_t> pick(0, sizes.size() - 1);
  std::uniform_int_distribution<int> lay(0, 3);
  for (int t = 0; t < 40; ++t) {
    const Case cs{sizes[pick(gen)],
                  sizes[pick(gen)],
                  sizes[pick(gen)],
                  Layout(lay(gen)),
                  Layout(lay(gen)),
                  Layout(lay(gen)),
                  1.0,
                  0.0,
                  false,
                  false};
    run_kernel_case<TestType>(cs, gen);
  }
}

TEMPLATE_TEST_CASE("kernels::gemm: random shapes 1..70, strides, alpha/beta, row gather", "[gemm]",
                   float, double) {
  std::mt19937 gen(99);
  std::uniform_int_distribution<std::int64_t> dim(1, 70);
  std::uniform_int_distribution<int> lay(0, 3);
  const double alphas[] = {1.0, -0.5, 2.25};
  const double betas[] = {0.0, 1.0, -1.5};
  for (int t = 0; t < 24; ++t) {
    const Case cs{dim(gen),         dim(gen),
                  dim(gen),         Layout(lay(gen)),
                  Layout(lay(gen)), Layout(lay(gen)),
                  alphas[t % 3],    betas[(t / 3) % 3],
                  t % 2 == 1,       t % 5 == 0 && betas[(t / 3) % 3] == 0.0};
    run_kernel_case<TestType>(cs, gen);
  }
}

// The packed-operand GEMMs of the MoE layer (gemm_packed.hpp): A packed for all of k, B as
// nn.Linear weights w [n, k] packed whole (gemm_packed, gemm_packed_panels: panels packed once
// ahead) or a kc x NR block at a time (gemm_packed_streamed). Each against the naive double
// reference, and all three with the same bits (MoELayer relies on it), on every arch; k one
// past a kc block, m not a multiple of the register rows.
TEMPLATE_TEST_CASE("kernels::gemm_packed, _streamed and _panels: reference and equal bits",
                   "[gemm][packed]", float, double) {
  simd::for_each_arch([](auto arch) {
    using A = decltype(arch);
    using T = TestType;
    using G = kernels::GemmTile<A, T>;
    CAPTURE(A::name());
    std::mt19937 gen(77);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    const std::int64_t k_past = G::kc() + 1;
    for (const auto& [m, n, k] : {std::array<std::int64_t, 3>{1, 1, 1},
                                  {5, 33, 40},
                                  {13, 70, k_past},
                                  {G::mr + 1, G::nr + 3, 2 * G::kc()}}) {
      CAPTURE(m, n, k);
      std::vector<T> a(std::size_t(m * k)), w(std::size_t(n * k)), c0(std::size_t(m * n));
      for (auto& v : a) v = T(u(gen));
      for (auto& v : w) v = T(u(gen));
      for (auto& v : c0) v = T(u(gen));
      const T beta = T(0.5);
      // Packs are written with aligned stores: 64-byte aligned buffers, as the layer's.
      using Aligned = std::vector<T, xsimd::aligned_allocator<T, 64>>;
      Aligned ap(std::size_t(core::round_up(m, G::mr) * k));
      Aligned bp(std::size_t(core::round_up(n, G::nr) * k));
      Aligned block(std::size_t(G::kc_max * G::nr));
      kernels::pack_a_all(A{}, a.data(), k, std::int64_t(1), nullptr, m, k, ap.data());
      kernels::pack_b_rows<A, G::nr>(A{}, w.data(), k, std::int64_t(1), n, k, bp.data());
      std::vector<T> c1 = c0, c2 = c0, c3 = c0;
      kernels::gemm_packed(A{}, m, n, k, ap.data(), bp.data(), beta, c1.data(), n);
      kernels::gemm_packed_streamed(A{}, m, n, k, ap.data(), w.data(), k, std::int64_t(1), beta,
                                    c2.data(), n, block.data());
      kernels::gemm_packed_panels(A{}, m, n, k, ap.data(), bp.data(), beta, c3.data(), n);
      double worst = 0;
      for (std::int64_t i = 0; i < m; ++i)
        for (std::int64_t j = 0; j < n; ++j) {
          double want = double(beta) * double(c0[std::size_t(i * n + j)]), mag = 0;
          for (std::int64_t p = 0; p < k; ++p) {
            const double t = double(a[std::size_t(i * k + p)]) * double(w[std::size_t(j * k + p)]);
            want += t;
            mag += std::abs(t);
          }
          const double bound = double(k + 2) * std::numeric_limits<T>::epsilon() *
                               (mag + std::abs(double(beta) * double(c0[std::size_t(i * n + j)])));
          worst = std::max(worst, std::abs(double(c1[std::size_t(i * n + j)]) - want) / bound);
        }
      CHECK(worst <= 1.0);
      CHECK(c1 == c2);
      CHECK(c1 == c3);
    }
  });
}

TEMPLATE_TEST_CASE("kernels::gemm: one past the kc, mc and nc blocks", "[gemm]", float, double) {
  std::mt19937 gen(5);
  using G = kernels::GemmTile<simd::default_arch, TestType>;
  const std::vector<Case> cases = {
      {7, 9, G::kc() + 1, Layout::row_major, Layout::row_major, Layout::row_major, 1.0, 0.5, false,
       false},
      {G::mc + 1, 5, 3, Layout::row_padded, Layout::row_major, Layout::row_major, 1.0, 0.0, true,
       false},
      {3, G::nc() + 1, 4, Layout::row_major, Layout::col_major, Layout::row_padded, -1.0, 1.0,
       false, false},
  };
  for (const auto& cs : cases) run_kernel_case<TestType>(cs, gen);
}

TEMPLATE_TEST_CASE("kernels::gemm: cache blocking follows this CPU's L2", "[gemm]", float, double) {
  using G = kernels::GemmTile<simd::default_arch, TestType>;
  const simd::CacheSizes& cs = simd::cache_sizes();
  CAPTURE(cs.l1d, cs.l2, G::kc(), G::nc());
  REQUIRE(cs.l1d > 0);
  REQUIRE(cs.l2 > 0);
  // 1 KiB of T per k block from 2 MiB of L2 (Emerald Rapids), 512 bytes below (Zen 4).
  const std::int64_t kc_bytes = cs.l2 >= 2048 * 1024 ? 1024 : 512;
  CHECK(G::kc() * std::int64_t(sizeof(TestType)) == kc_bytes);
  CHECK(G::kc_max % G::kc() == 0);
  // The kc x nc block of B: whole NR panels, within half of L2 (at least 256 KiB).
  CHECK(G::nc() % G::nr == 0);
  CHECK(G::nc() >= G::nr);
  const std::int64_t block = G::kc() * G::nc() * std::int64_t(sizeof(TestType));
  CHECK(block <= std::clamp<std::int64_t>(cs.l2 / 2, 256 * 1024, 2048 * 1024));
  CHECK(block > std::clamp<std::int64_t>(cs.l2 / 2, 256 * 1024, 2048 * 1024) -
                    G::kc() * G::nr * std::int64_t(sizeof(TestType)));
}

TEST_CASE("kernels::gemm: 300x257x513 (several k blocks, all edges)", "[gemm]") {
  std::mt19937 gen(77);
  run_kernel_case<float>({300, 257, 513, Layout::row_major, Layout::col_major, Layout::row_padded,
                          0.75, -0.25, false, false},
                         gen);
}

TEMPLATE_TEST_CASE("kernels::gemm: beta = 0 overwrites NaN; alpha = 0 and k = 0 give beta * C",
                   "[gemm]", float, double) {
  using T = TestType;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  simd::for_each_arch([&](auto arch) {
    CAPTURE(decltype(arch)::name());
    std::vector<T> a(6 * 4, T(1)), b(4 * 5, T(2)), c(6 * 5, nan);
    std::vector<T> ws(kernels::gemm_workspace_elems<decltype(arch), T>(arch, 6, 5, 4));
    kernels::gemm(arch, 6, 5, 4, T(1), a.data(), 4, 1, nullptr, b.data(), 5, 1, T(0), c.data(), 5,
                  1, ws.data());
    for (T x : c) REQUIRE(x == T(8));
    // alpha = 0: A and B are not read (NaN there must not leak), C = beta * C.
    std::fill(a.begin(), a.end(), nan);
    kernels::gemm(arch, 6, 5, 4, T(0), a.data(), 4, 1, nullptr, b.data(), 5, 1, T(-0.5), c.data(),
                  5, 1, ws.data());
    for (T x : c) REQUIRE(x == T(-4));
    // k = 0 with beta = 0: zeros even over NaN.
    std::fill(c.begin(), c.end(), nan);
    kernels::gemm(arch, 6, 5, 0, T(1), a.data(), 4, 1, nullptr, b.data(), 5, 1, T(0), c.data(), 5,
                  1, ws.data());
    for (T x : c) REQUIRE(x == T(0));
  });
}

/// Public API: a stored as [M, K] or [K, M] inside a bigger tensor, same for b and c.
template <class T>
void run_public_case(std::int64_t m, std::int64_t n, std::int64_t k, Trans ta, Trans tb, T alpha,
                     T beta, std::mt19937& gen) {
  CAPTURE(m, n, k, int(ta), int(tb), alpha, beta);
  const std::int64_t ar = ta == Trans::no ? m : k, ac = ta == Trans::no ? k : m;
  const std::int64_t br = tb == Trans::no ? k : n, bc = tb == Trans::no ? n : k;
  // Sub-views: offset by (1, 2) inside tensors 3 rows / 5 columns bigger.
  Tensor<T> abig({ar + 3, ac + 5}), bbig({br + 3, bc + 5}), cbig({m + 3, n + 5});
  std::uniform_real_distribution<double> ud(-1.0, 1.0);
  for (auto* t : {&abig, &bbig, &cbig})
    for (auto& e : *t) e = T(ud(gen));
  const auto av = abig.template view<2>().slice(0, 1, 1 + ar).slice(1, 2, 2 + ac);
  const auto bv = bbig.template view<2>().slice(0, 1, 1 + br).slice(1, 2, 2 + bc);
  const auto cv = cbig.template view<2>().slice(0, 1, 1 + m).slice(1, 2, 2 + n);
  // Reference in the Mat form, op() applied by index.
  Mat<T> a(m, k, k, 1), b(k, n, n, 1), c0(m, n, n, 1);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t p = 0; p < k; ++p) a.at(i, p) = ta == Trans::no ? av(i, p) : av(p, i);
  for (std::int64_t p = 0; p < k; ++p)
    for (std::int64_t j = 0; j < n; ++j) b.at(p, j) = tb == Trans::no ? bv(p, j) : bv(j, p);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) c0.at(i, j) = cv(i, j);
  std::vector<double> ref, bound;
  reference<T>(a, nullptr, b, c0, alpha, beta, ref, bound);
  const Tensor<T> before = cbig;
  core::gemm<T>(av, ta, bv, tb, cv, alpha, beta);
  Mat<T> got(m, n, n, 1);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) got.at(i, j) = cv(i, j);
  check_result(got, ref, bound);
  // Nothing outside the C sub-view changed.
  std::int64_t outside = 0;
  for (std::int64_t i = 0; i < m + 3; ++i)
    for (std::int64_t j = 0; j < n + 5; ++j) {
      const bool inside = i >= 1 && i < 1 + m && j >= 2 && j < 2 + n;
      if (!inside && cbig(i, j) != before(i, j)) ++outside;
    }
  CHECK(outside == 0);
}

TEMPLATE_TEST_CASE("core::gemm on views: all transposes, alpha/beta, sub-views", "[gemm]", float,
                   double) {
  using T = TestType;
  std::mt19937 gen(2024);
  for (Trans ta : {Trans::no, Trans::yes})
    for (Trans tb : {Trans::no, Trans::yes}) {
      run_public_case<T>(1, 1, 1, ta, tb, T(1), T(0), gen);
      run_public_case<T>(37, 45, 29, ta, tb, T(1), T(0), gen);
      run_public_case<T>(70, 33, 65, ta, tb, T(-0.5), T(2), gen);
      run_public_case<T>(15, 64, 400, ta, tb, T(1.5), T(1), gen);
    }
}

TEST_CASE("core::gemm with a caller workspace equals the allocating overload bit for bit",
          "[gemm]") {
  std::mt19937 gen(3);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  Tensor<float> a({50, 70}), b({70, 90}), c1({50, 90}), c2({50, 90});
  for (auto* t : {&a, &b})
    for (auto& e : *t) e = ud(gen);
  core::gemm<float>(a.view<2>(), Trans::no, b.view<2>(), Trans::no, c1.view<2>());
  std::vector<std::byte> ws(core::gemm_workspace_bytes<float>(50, 90, 70) + 3);
  // A misaligned workspace start is allowed.
  core::gemm<float>(a.view<2>(), Trans::no, b.view<2>(), Trans::no, c2.view<2>(), 1.0f, 0.0f,
                    std::span<std::byte>(ws).subspan(3));
  REQUIRE(std::memcmp(c1.data(), c2.data(), sizeof(float) * 50 * 90) == 0);
}

TEST_CASE("core::gemm with a caller workspace does not allocate", "[gemm]") {
  Tensor<float> a({40, 300}), b({300, 70}), c({40, 70});
  a.fill(0.5f);
  b.fill(2.0f);
  std::vector<std::byte> ws(core::gemm_workspace_bytes<float>(40, 70, 300));
  const auto av = a.view<2>(), bv = b.view<2>();
  const auto cv = c.view<2>();
  const std::size_t before = g_allocations;
  core::gemm<float>(av, Trans::no, bv, Trans::no, cv, 1.0f, 0.0f, ws);
  const std::size_t after = g_allocations;
  CHECK(after == before);
  CHECK(c(0, 0) == 300.0f);
}

TEST_CASE("core::gemm_parallel: same bits for 1 to 3 threads and as gemm, matches the reference",
          "[gemm][parallel]") {
  std::mt19937 gen(11);
  // 1100 columns: 2 threads split C by columns (>= gemm_column_split_min each), 3 by rows
  // (tasks of rows, the shared B blocks packed by several threads); 200 columns: rows only.
  // B as stored and transposed (the column split offsets B along its other stride).
  static_assert(core::gemm_column_split_min * 2 <= 1100 && core::gemm_column_split_min * 3 > 1100);
  for (const std::int64_t n : {1100, 200})
    for (const Trans tb : {Trans::no, Trans::yes}) {
      CAPTURE(n, tb == Trans::yes);
      const std::int64_t m = n == 200 ? 700 : 400, k = 150;
      Mat<float> a(m, k, k, 1), c0(m, n, n, 1);
      Mat<float> b = tb == Trans::no ? Mat<float>(k, n, n, 1) : Mat<float>(k, n, 1, k);
      fill_random(a, gen);
      fill_random(b, gen);
      fill_random(c0, gen);
      std::vector<double> ref, bound;
      reference<float>(a, nullptr, b, c0, 1.0f, 0.5f, ref, bound);
      const ConstView<float, 2> av(a.buf.data(), {m, k});
      const ConstView<float, 2> bv = tb == Trans::no ? ConstView<float, 2>(b.buf.data(), {k, n})
                                                     : ConstView<float, 2>(b.buf.data(), {n, k});
      auto run = [&](int threads) {
        ScopedNumThreads scope(threads);
        Mat<float> c = c0;
        core::gemm_parallel<float>(av, Trans::no, bv, tb, View<float, 2>(c.buf.data(), {m, n}),
                                   1.0f, 0.5f);
        return c;
      };
      const Mat<float> c1 = run(1), c2 = run(2), c3 = run(3);
      check_result(c1, ref, bound);
      check_result(c2, ref, bound);
      REQUIRE(std::memcmp(c1.buf.data(), c2.buf.data(), sizeof(float) * c1.buf.size()) == 0);
      REQUIRE(std::memcmp(c1.buf.data(), c3.buf.data(), sizeof(float) * c1.buf.size()) == 0);
      // Same micro-tile grid as the serial call, so the same bits.
      Mat<float> cs = c0;
      core::gemm<float>(av, Trans::no, bv, tb, View<float, 2>(cs.buf.data(), {m, n}), 1.0f, 0.5f);
      REQUIRE(std::memcmp(c1.buf.data(), cs.buf.data(), sizeof(float) * c1.buf.size()) == 0);
    }
}

TEST_CASE("core::gemm errors name gemm, the argument and both shapes", "[gemm][errors]") {
  using Catch::Contains;
  Tensor<float> a({4, 6}), b({5, 7}), c({4, 7}), b_ok({6, 7}), c_bad({4, 8});
  // Inner dimensions differ: op(a) is [4, 6], op(b) is [5, 7].
  REQUIRE_THROWS_AS(core::gemm<float>(a.view<2>(), Trans::no, b.view<2>(), Trans::no, c.view<2>()),
                    shape_error);
  REQUIRE_THROWS_WITH(
      core::gemm<float>(a.view<2>(), Trans::no, b.view<2>(), Trans::no, c.view<2>()),
      Contains("gemm") && Contains("'b'") && Contains("[K=5, N=7]") && Contains("[K=6, N]") &&
          Contains("[M=4, K=6]"));
  // Transposed b: stored [7, 5] is op(b) = [5, 7].
  REQUIRE_THROWS_WITH(core::gemm<float>(a.view<2>(), Trans::no, b.view<2>().slice(0, 0, 5),
                                        Trans::yes, c.view<2>()),
                      Contains("gemm") && Contains("'b'") && Contains("[K=7, N=5] (transposed)"));
  // C has the wrong shape.
  REQUIRE_THROWS_WITH(
      core::gemm<float>(a.view<2>(), Trans::no, b_ok.view<2>(), Trans::no, c_bad.view<2>()),
      Contains("gemm") && Contains("'c'") && Contains("[M=4, N=8]") && Contains("[M=4, N=7]"));
  // Workspace too small.
  std::vector<std::byte> small(16);
  REQUIRE_THROWS_WITH(core::gemm<float>(a.view<2>(), Trans::no, b_ok.view<2>(), Trans::no,
                                        c.view<2>(), 1.0f, 0.0f, small),
                      Contains("gemm") && Contains("'workspace'") && Contains("[bytes=16]"));
  // gemm_parallel validates the same way.
  REQUIRE_THROWS_WITH(core::gemm_parallel<float>(a.view<2>(), Trans::no, b_ok.view<2>(), Trans::no,
                                                 c_bad.view<2>()),
                      Contains("gemm_parallel") && Contains("'c'") && Contains("[M=4, N=8]"));
}

}  // namespace

namespace {

/// IEEE half bits of a float that a half holds exactly (normal numbers and zero): the test's
/// own encoding, independent of the library's decoding.
f16 exact_half(float v) {
  const std::uint32_t b = std::bit_cast<std::uint32_t>(v);
  const std::uint16_t sign = static_cast<std::uint16_t>((b >> 16) & 0x8000u);
  if ((b & 0x7FFFFFFFu) == 0) return f16{sign};
  const int exp = int((b >> 23) & 0xFF) - 127 + 15;
  REQUIRE(exp > 0);
  REQUIRE(exp < 31);
  REQUIRE((b & 0x1FFFu) == 0);
  return f16{static_cast<std::uint16_t>(sign | (exp << 10) | ((b >> 13) & 0x3FFu))};
}

/// y = x w^T in double, w given as float values.
std::vector<double> ref_linear(const std::vector<float>& x, const std::vector<float>& w,
                               std::int64_t m, std::int64_t n, std::int64_t k) {
  std::vector<double> y(std::size_t(m * n), 0.0);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (std::int64_t p = 0; p < k; ++p) s += double(x[i * k + p]) * double(w[j * k + p]);
      y[std::size_t(i * n + j)] = s;
    }
  return y;
}

}  // namespace

TEST_CASE("core::linear with float, bf16 and f16 weights matches a naive double reference",
          "[gemm][linear]") {
  std::mt19937 gen(11);
  std::uniform_int_distribution<int> small(-64, 64);
  struct Case {
    std::int64_t m, n, k;
  };
  // Every route: weights streamed (few rows), y^T = w x^T (few outputs: 5, and 40 over two
  // tasks of rows), gemm_parallel (many rows, float weights; bf16 / f16 weights stream).
  for (const Case c : {Case{1, 72, 40}, Case{37, 5, 333}, Case{16, 130, 16}, Case{3, 33, 0},
                       Case{300, 40, 150}, Case{530, 300, 70}}) {
    CAPTURE(c.m, c.n, c.k);
    // Weights are multiples of 1/64 in [-1, 1]: exact in float, bf16 and f16 alike.
    std::vector<float> x(std::size_t(c.m * c.k)), w(std::size_t(c.n * c.k));
    for (auto& v : x) v = float(small(gen)) / 37.0f;
    for (auto& v : w) v = float(small(gen)) / 64.0f;
    std::vector<bf16> wb(w.size());
    std::vector<f16> wh(w.size());
    for (std::size_t i = 0; i < w.size(); ++i) {
      wb[i] = bf16::from_float(w[i]);
      REQUIRE(to_float(wb[i]) == w[i]);
      wh[i] = exact_half(w[i]);
    }
    const auto want = ref_linear(x, w, c.m, c.n, c.k);
    const ConstView<float, 2> xv(x.data(), {c.m, c.k});
    const auto check = [&](const Tensor<float>& y) {
      for (std::int64_t i = 0; i < c.m; ++i)
        for (std::int64_t j = 0; j < c.n; ++j) {
          const double r = want[std::size_t(i * c.n + j)];
          REQUIRE(std::abs(double(y(i, j)) - r) <= 1e-5 * (1.0 + std::abs(r)) * (1 + c.k / 64));
        }
    };
    const Tensor<float> yf = core::linear(xv, ConstView<float, 2>(w.data(), {c.n, c.k}));
    const Tensor<float> yb = core::linear(xv, ConstView<bf16, 2>(wb.data(), {c.n, c.k}));
    const Tensor<float> yh = core::linear(xv, ConstView<f16, 2>(wh.data(), {c.n, c.k}));
    check(yf);
    check(yb);
    check(yh);
    // the same values through any stored type, on any thread count: the same bits
    REQUIRE(std::equal(yb.begin(), yb.end(), yf.begin()));
    REQUIRE(std::equal(yh.begin(), yh.end(), yf.begin()));
    {
      ScopedNumThreads one(1);
      const Tensor<float> y1 = core::linear(xv, ConstView<bf16, 2>(wb.data(), {c.n, c.k}));
      REQUIRE(std::equal(y1.begin(), y1.end(), yf.begin()));
    }
    // the plain C++ path
    const Tensor<float> ys =
        core::linear<simd::scalar>(xv, ConstView<bf16, 2>(wb.data(), {c.n, c.k}));
    check(ys);
    // strided operands: y with a column stride, w transposed in memory, x every other row
    std::vector<float> wt(w.size()), x2(std::size_t(2 * c.m * c.k));
    for (std::int64_t j = 0; j < c.n; ++j)
      for (std::int64_t p = 0; p < c.k; ++p)
        wt[std::size_t(p * c.n + j)] = w[std::size_t(j * c.k + p)];
    for (std::int64_t i = 0; i < c.m; ++i)
      std::copy_n(x.data() + i * c.k, c.k, x2.data() + 2 * i * c.k);
    Tensor<float> yt({c.n, c.m});  // y^T storage: y(i, j) at [j, i]
    core::linear(ConstView<float, 2>(x2.data(), {c.m, c.k}, {2 * c.k, 1}),
                 ConstView<float, 2>(wt.data(), {c.n, c.k}, {1, c.n}),
                 View<float, 2>(yt.data(), {c.m, c.n}, {1, c.m}));
    for (std::int64_t i = 0; i < c.m; ++i)
      for (std::int64_t j = 0; j < c.n; ++j) REQUIRE(yt(j, i) == yf(i, j));
  }
}

TEST_CASE("core::linear errors name linear, the argument and both shapes",
          "[gemm][linear][errors]") {
  std::vector<float> x(24), w(60), y(30);
  const ConstView<float, 2> xv(x.data(), {4, 6});
  REQUIRE_THROWS_WITH(
      core::linear(xv, ConstView<float, 2>(w.data(), {6, 10}), View<float, 2>(y.data(), {4, 6})),
      Catch::Contains("core::linear") && Catch::Contains("'w'") && Catch::Contains("[N=6, K=10]"));
  REQUIRE_THROWS_WITH(
      core::linear(xv, ConstView<float, 2>(w.data(), {10, 6}), View<float, 2>(y.data(), {4, 7})),
      Catch::Contains("'y'") && Catch::Contains("[M=4, N=7]"));
  // the output may not overlap x or w
  REQUIRE_THROWS_WITH(
      core::linear(xv, ConstView<float, 2>(w.data(), {10, 6}), View<float, 2>(w.data(), {4, 10})),
      Catch::Contains("'y'") && Catch::Contains("memory shared with argument 'w'"));
  REQUIRE_THROWS_WITH(
      core::linear(xv, ConstView<float, 2>(w.data(), {2, 6}), View<float, 2>(x.data(), {4, 2})),
      Catch::Contains("memory shared with argument 'x'"));
  // extents whose byte count overflows are rejected before anything is allocated
  REQUIRE_THROWS_WITH(
      core::linear(ConstView<float, 2>(x.data(), {std::int64_t(1) << 40, 6}, {0, 1}),
                   ConstView<float, 2>(w.data(), {10, 6}),
                   View<float, 2>(y.data(), {std::int64_t(1) << 40, 10}, {0, 0})),
      Catch::Contains("core::linear"));
}

// ---- bf16 operands, float accumulation (core/gemm_bf16.hpp) ------------------------------
// Reference: the same bf16 values widened exactly, summed in double. Every product of two
// bf16 is exact in float, so the only errors are float additions: |C - C_ref| <=
// (K + 1) * 2^-24 * (sum_p |a_ip b_pj| + |beta c_ij|) for normal data.

namespace {

std::vector<core::Bf16Path> bf16_paths_here() {
  std::vector<core::Bf16Path> paths;
  for (auto p : {core::Bf16Path::amx, core::Bf16Path::avx512_bf16, core::Bf16Path::widen}) {
    if (core::bf16_path_available(p)) {
      paths.push_back(p);
    } else {
      WARN("gemm_bf16 path " << core::bf16_path_name(p) << " skipped: not in this build or CPU");
    }
  }
  return paths;
}

struct Bf16Case {
  std::int64_t m, n, k;
  core::Trans ta, tb;
};

// op(A) [m, k] and op(B) [k, n] stored as the case says, random bf16 in [-2, 2].
struct Bf16Operands {
  std::vector<bf16> a, b;
  Bf16Case cs;
  explicit Bf16Operands(const Bf16Case& c, std::uint32_t seed) : cs(c) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> ud(-2.0f, 2.0f);
    a.resize(std::size_t(c.m * c.k));
    b.resize(std::size_t(c.k * c.n));
    for (auto& x : a) x = bf16::from_float(ud(gen));
    for (auto& x : b) x = bf16::from_float(ud(gen));
  }
  ConstView<bf16, 2> av() const {
    return cs.ta == core::Trans::no ? ConstView<bf16, 2>(a.data(), {cs.m, cs.k})
                                    : ConstView<bf16, 2>(a.data(), {cs.k, cs.m});
  }
  ConstView<bf16, 2> bv() const {
    return cs.tb == core::Trans::no ? ConstView<bf16, 2>(b.data(), {cs.k, cs.n})
                                    : ConstView<bf16, 2>(b.data(), {cs.n, cs.k});
  }
  double opa(std::int64_t i, std::int64_t p) const {
    return to_float(cs.ta == core::Trans::no ? a[std::size_t(i * cs.k + p)]
                                             : a[std::size_t(p * cs.m + i)]);
  }
  double opb(std::int64_t p, std::int64_t j) const {
    return to_float(cs.tb == core::Trans::no ? b[std::size_t(p * cs.n + j)]
                                             : b[std::size_t(j * cs.k + p)]);
  }
};

// Checks c against beta * c0 + op(A) op(B) within the float-accumulation bound.
void check_bf16_result(const Bf16Operands& in, const std::vector<float>& c0, float beta,
                       const std::vector<float>& c) {
  const Bf16Case& cs = in.cs;
  const double u = std::ldexp(1.0, -24);
  std::int64_t bad = 0;
  for (std::int64_t i = 0; i < cs.m; ++i)
    for (std::int64_t j = 0; j < cs.n; ++j) {
      const double old = beta == 0.0f ? 0.0 : double(beta) * c0[std::size_t(i * cs.n + j)];
      double ref = old, mag = std::fabs(old);
      for (std::int64_t p = 0; p < cs.k; ++p) {
        const double t = in.opa(i, p) * in.opb(p, j);
        ref += t;
        mag += std::fabs(t);
      }
      const double err = std::fabs(double(c[std::size_t(i * cs.n + j)]) - ref);
      if (!(err <= double(cs.k + 1) * u * mag + 1e-30)) ++bad;
    }
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("gemm_bf16 matches a double reference on every available path", "[gemm][bf16]") {
  using core::Trans;
  const Bf16Case cases[] = {
      {1, 1, 1, Trans::no, Trans::no},       {32, 32, 32, Trans::no, Trans::no},
      {33, 31, 65, Trans::no, Trans::yes},   {100, 70, 77, Trans::yes, Trans::no},
      {65, 33, 600, Trans::yes, Trans::yes}, {7, 600, 33, Trans::no, Trans::yes},
      {300, 40, 530, Trans::no, Trans::no},  // one past the k block and the row block
      {3, 5, 16424, Trans::no, Trans::yes},  // past a k super-block (the packs' bound)
      {4100, 3, 5, Trans::no, Trans::no},    // past the widening path's row block
      {3, 4100, 5, Trans::yes, Trans::yes},  // and its column block
  };
  for (core::Bf16Path path : bf16_paths_here()) {
    for (const Bf16Case& cs : cases) {
      for (float beta : {0.0f, 0.5f}) {
        INFO("path " << core::bf16_path_name(path) << " m " << cs.m << " n " << cs.n << " k "
                     << cs.k << " ta " << int(cs.ta) << " tb " << int(cs.tb) << " beta " << beta);
        const Bf16Operands in(cs, std::uint32_t(cs.m * 7 + cs.n * 3 + cs.k));
        std::vector<float> c0(std::size_t(cs.m * cs.n));
        for (std::size_t i = 0; i < c0.size(); ++i)
          c0[i] = beta == 0.0f ? std::numeric_limits<float>::quiet_NaN() : float(i % 7) - 3.0f;
        std::vector<float> c = c0;
        core::gemm_bf16(in.av(), cs.ta, in.bv(), cs.tb, View<float, 2>(c.data(), {cs.m, cs.n}),
                        beta, path);
        check_bf16_result(in, c0, beta, c);
      }
    }
  }
}

TEST_CASE("gemm_bf16: a hand-worked 2x2 product and K = 0", "[gemm][bf16]") {
  // [1 2; 3 4] x [0.5 -1; 0.25 2] = [1 3; 2.5 5]: every value exact in bf16 and float.
  const std::vector<bf16> a = {bf16::from_float(1), bf16::from_float(2), bf16::from_float(3),
                               bf16::from_float(4)};
  const std::vector<bf16> b = {bf16::from_float(0.5f), bf16::from_float(-1),
                               bf16::from_float(0.25f), bf16::from_float(2)};
  for (core::Bf16Path path : bf16_paths_here()) {
    INFO("path " << core::bf16_path_name(path));
    std::vector<float> c = {10, 20, 30, 40};
    core::gemm_bf16(ConstView<bf16, 2>(a.data(), {2, 2}), core::Trans::no,
                    ConstView<bf16, 2>(b.data(), {2, 2}), core::Trans::no,
                    View<float, 2>(c.data(), {2, 2}), 1.0f, path);
    CHECK(c == std::vector<float>{11, 23, 32.5f, 45});
    // K = 0: C = beta C, and beta = 0 clears NaN.
    std::vector<float> d = {1, std::numeric_limits<float>::quiet_NaN()};
    core::gemm_bf16(ConstView<bf16, 2>(a.data(), {1, 0}), core::Trans::no,
                    ConstView<bf16, 2>(b.data(), {0, 2}), core::Trans::no,
                    View<float, 2>(d.data(), {1, 2}), 0.0f, path);
    CHECK(d == std::vector<float>{0, 0});
  }
}

TEST_CASE("gemm_bf16 gives the same bits for 1 and 2 threads and a strided C", "[gemm][bf16]") {
  const Bf16Case cs{300, 600, 200, core::Trans::no, core::Trans::yes};
  const Bf16Operands in(cs, 11);
  for (core::Bf16Path path : bf16_paths_here()) {
    INFO("path " << core::bf16_path_name(path));
    std::vector<float> c1(std::size_t(cs.m * cs.n)), c2 = c1;
    std::vector<float> ct(std::size_t(cs.m * cs.n));  // C as the transpose of a [n, m] buffer
    {
      ScopedNumThreads one(1);
      core::gemm_bf16(in.av(), cs.ta, in.bv(), cs.tb, View<float, 2>(c1.data(), {cs.m, cs.n}), 0.0f,
                      path);
    }
    {
      ScopedNumThreads two(2);
      core::gemm_bf16(in.av(), cs.ta, in.bv(), cs.tb, View<float, 2>(c2.data(), {cs.m, cs.n}), 0.0f,
                      path);
      core::gemm_bf16(in.av(), cs.ta, in.bv(), cs.tb,
                      View<float, 2>(ct.data(), {cs.m, cs.n}, {1, cs.m}), 0.0f, path);
    }
    CHECK(std::memcmp(c1.data(), c2.data(), c1.size() * sizeof(float)) == 0);
    std::int64_t differ = 0;
    for (std::int64_t i = 0; i < cs.m; ++i)
      for (std::int64_t j = 0; j < cs.n; ++j)
        differ += ct[std::size_t(j * cs.m + i)] != c1[std::size_t(i * cs.n + j)];
    CHECK(differ == 0);
    check_bf16_result(in, c1, 0.0f, c1);
  }
}

TEST_CASE("gemm_bf16 errors name gemm_bf16, the argument and the shapes", "[gemm][bf16][errors]") {
  std::vector<bf16> a(6), b(6);
  std::vector<float> c(4);
  const ConstView<bf16, 2> a23(a.data(), {2, 3}), b32(b.data(), {3, 2}), b23(b.data(), {2, 3});
  const View<float, 2> c22(c.data(), {2, 2});
  CHECK_THROWS_WITH(core::gemm_bf16(a23, core::Trans::no, b23, core::Trans::no, c22),
                    Catch::Contains("gemm_bf16") && Catch::Contains("'b'") &&
                        Catch::Contains("inner dimensions differ"));
  CHECK_THROWS_AS(
      core::gemm_bf16(a23, core::Trans::no, b32, core::Trans::no, View<float, 2>(c.data(), {2, 1})),
      shape_error);
  CHECK_THROWS_WITH(core::gemm_bf16(a23, core::Trans::no, b32, core::Trans::no, c22,
                                    std::numeric_limits<float>::quiet_NaN()),
                    Catch::Contains("gemm_bf16") && Catch::Contains("beta"));
  // C sharing memory with A.
  std::vector<float> shared(8);
  const ConstView<bf16, 2> a_in_c(reinterpret_cast<const bf16*>(shared.data()), {2, 3});
  CHECK_THROWS_WITH(core::gemm_bf16(a_in_c, core::Trans::no, b32, core::Trans::no,
                                    View<float, 2>(shared.data(), {2, 2})),
                    Catch::Contains("gemm_bf16") && Catch::Contains("'c'"));
  for (auto p : {core::Bf16Path::amx, core::Bf16Path::avx512_bf16}) {
    if (core::bf16_path_available(p)) continue;
    CHECK_THROWS_WITH(core::gemm_bf16(a23, core::Trans::no, b32, core::Trans::no, c22, 0.0f, p),
                      Catch::Contains("gemm_bf16") && Catch::Contains("'path'") &&
                          Catch::Contains(core::bf16_path_name(p)));
  }
}
