#pragma once
// SoftMoELayer: Soft Mixture of Experts (Puigcerver, Riquelme, Mustafa, Houlsby 2023, "From
// Sparse to Soft Mixtures of Experts", arXiv 2308.00951). No token is dropped and nothing is
// discrete: every expert slot takes a convex combination of all tokens of a group, and every
// token takes a convex combination of all slot outputs.
//
// Per batch item b (one group of m tokens; the softmax over tokens runs within the item),
// x = x[b]: [m, d], n = E * S slots, slot j belongs to expert j / S:
//   logits[t, j] = x[t] . phi[:, j]                       [m, n]
//   D[t, j] = softmax over tokens t of logits[:, j]        dispatch: each column sums to 1
//   X~[j]   = sum_t D[t, j] x[t]                           slot inputs [n, d]
//   Y~[j]   = expert_{j / S}(X~[j])                        expert e runs on rows [e*S, e*S + S)
//   C[t, j] = softmax over slots j of logits[t, :]         combine: each row sums to 1
//   y[t]    = sum_j C[t, j] Y~[j]                          [m, d]
// With normalize = true (the paper's l2 normalisation, section 2.3), only the logits change:
//   logits[t, j] = scale * (x[t] / sqrt(|x[t]|^2 + eps)) . (phi[:, j] / sqrt(|phi[:, j]|^2 + eps))
// with eps = 1e-6 (norm_eps), as google-research/vmoe's SoftRouter computes it; the slots still
// average the raw tokens x[t].
//
// NOT CAUSAL: every slot mixes all m tokens of its item, so every output token depends on every
// input token of the item, later ones included. A decoder must not use this layer over a
// sequence whose future is masked (a token would see the future); there is no causal mode and
// no decode step. Items of the batch never mix.
//
// Execution (each step split into a fixed list of tasks, independent of the thread count):
// 1. (normalize) phi's columns normalised and scaled once per call.
// 2. per (item, tile of row_tile tokens): logits = x phi on the packed GEMM (kernels::gemm, the
//    GEMM core::gemm runs); the raw logits are also stored transposed ([n, m] per item) for the
//    dispatch softmax; then C rows = softmax over slots (kernels::softmax_row).
// 3. per (item, tile of row_tile slots): D^T rows = softmax over tokens, then X~ = D^T x (GEMM).
// 4. the experts: one MoELayer::execute (moe/layer.hpp) over all B * n slot rows, with a fixed
//    plan that sends slot row b * n + j to expert j / S with gate 1: the same packed expert FFN
//    code as the sparse layer, all E experts in one call, each on its B * S rows.
// 5. per (item, tile of row_tile tokens): y = C Y~ (GEMM) straight into out (any strides).
// Every task computes its rows the same way whichever thread runs it, and MoELayer is
// bit-identical for any thread count, so out (and the routing weights) are too.
//
// Scratch: forward() with a SoftMoEScratch reuses its buffers and the experts' plan across
// calls (grown when a larger shape or thread count needs more, rebuilt when B changes); after the
// first call of a shape it allocates nothing. The other overloads allocate their own.
//
// Cost per item (flops()): 3 GEMMs of 2 m n d for the routing, plus the experts on n slot rows,
// 2 n d F (3 for swiglu, 2 for gelu and relu). With n = k * m slots the experts do the work of a
// top-k sparse layer on m tokens.
//
// m = 0 (or B = 0) is valid and does nothing: out is empty (and so are the routing weights).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/gemm_kernel.hpp"
#include "switchyard/core/simd/softmax.hpp"
#include "switchyard/core/simd/vector_ops.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/experts.hpp"
#include "switchyard/moe/layer.hpp"
#include "switchyard/moe/plan.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

/// Designated-initialiser friendly: keep the field order.
struct SoftMoEConfig {
  std::int64_t d_model = 0;           ///< d, token width (input and output)
  std::int64_t d_ff = 0;              ///< F, hidden width of each expert
  std::int64_t num_experts = 0;       ///< E
  std::int64_t slots_per_expert = 1;  ///< S slots per expert (the paper's p); n = E * S slots
  Activation activation = Activation::swiglu;
  /// l2-normalise x and phi before the logits and multiply by SoftMoEWeights::scale (paper
  /// section 2.3; see the file comment).
  bool normalize = false;
};

/// Weights of a SoftMoELayer.
template <class T>
struct SoftMoEWeights {
  /// [d, E * S] slot parameters (any strides): column j is slot j % S of expert j / S.
  ConstView<T, 2> phi{};
  /// E experts, the layouts of MoELayer ([E, F, d] w1 / w3, [E, d, F] w2, optional biases).
  ExpertWeights<T> experts{};
  /// The learned scalar scale of the normalised logits; used (and must be finite) only when
  /// config normalize is true.
  T scale = T(1);
};

/// Dispatch and combine weights of one forward call, for inspection (only when asked).
template <class T>
struct SoftMoERouting {
  core::Tensor<T> dispatch;  ///< [B, m, E * S] D[b, t, j]; each (b, j) sums to 1 over t
  core::Tensor<T> combine;   ///< [B, m, E * S] C[b, t, j]; each (b, t) sums to 1 over j
};

template <class T = float, class Arch = simd::default_arch>
class SoftMoELayer;

/// Buffers reused across SoftMoELayer::forward calls: keep one per thread that calls forward
/// concurrently. Opaque; grows on demand and keeps its memory.
template <class T>
class SoftMoEScratch {
 public:
  /// Bytes held now.
  std::size_t capacity_bytes() const noexcept { return bytes_; }

 private:
  template <class, class>
  friend class SoftMoELayer;
  DispatchPlan<T> plan_;  // slot rows -> experts, for the plan's (B, E, S)
  std::int64_t plan_slots_ = 0;
  std::unique_ptr<std::byte[]> buf_;
  std::size_t bytes_ = 0;
};

template <class T, class Arch>
class SoftMoELayer {
 public:
  using config_type = SoftMoEConfig;
  using weights_type = SoftMoEWeights<T>;
  using routing_type = SoftMoERouting<T>;
  using scratch_type = SoftMoEScratch<T>;
  static constexpr std::string_view name = "SoftMoELayer";
  /// Tokens (or slots) per routing task: a multiple of every GEMM register tile's rows.
  static constexpr std::int64_t row_tile = 96;
  /// eps of the normalisation: v / sqrt(|v|^2 + eps).
  static constexpr double norm_eps = 1e-6;

  /// Throws config_error: d_model, d_ff, num_experts or slots_per_expert < 1, an activation
  /// other than swiglu / gelu / relu, or E * S, d_model * E * S or d_model * d_ff past
  /// core::max_buffer_bytes (or E * S past 2^31 - 1: slot rows are int32 plan tokens).
  explicit SoftMoELayer(config_type cfg)
      : cfg_(validated(cfg)),
        experts_({.d_model = cfg.d_model,
                  .d_ff = cfg.d_ff,
                  .num_experts = cfg.num_experts,
                  .activation = cfg.activation}) {}

  const config_type& config() const noexcept { return cfg_; }
  /// n = E * S.
  std::int64_t num_slots() const noexcept { return cfg_.num_experts * cfg_.slots_per_expert; }

  /// FLOPs (2 per multiply-add) of the experts on one item's n slot rows:
  /// n * 2 d F * (3 swiglu, 2 gelu / relu), times batch. Saturates at the int64 maximum.
  std::int64_t expert_flops(std::int64_t batch = 1) const noexcept {
    const std::int64_t mats = cfg_.activation == Activation::swiglu ? 3 : 2;
    return sat_mul({batch, num_slots(), 2, cfg_.d_model, cfg_.d_ff, mats});
  }
  /// FLOPs of forward on B = batch items of m tokens: expert_flops(batch) plus the three routing
  /// GEMMs (x phi, D^T x, C Y~), 6 m n d per item. Softmaxes, activations and biases are not
  /// counted. Saturates at the int64 maximum.
  std::int64_t flops(std::int64_t m, std::int64_t batch = 1) const noexcept {
    const std::int64_t routing = sat_mul({batch, 6, m, num_slots(), cfg_.d_model});
    const std::int64_t e = expert_flops(batch);
    std::int64_t s = 0;
    return core::add_overflows(routing, e, s) ? std::numeric_limits<std::int64_t>::max() : s;
  }

  /// Bytes of scratch forward() uses for B = batch items of m tokens on `threads` threads
  /// (what a SoftMoEScratch grows to). 0 when B or m is 0. Assumes sizes forward accepts.
  std::size_t workspace_bytes(std::int64_t batch, std::int64_t m,
                              int threads = num_threads()) const noexcept {
    if (batch <= 0 || m <= 0) return 0;
    return 64 + layout(batch, m, threads).total;
  }

  /// x: [B, m, d] (any strides), each item b one group of m tokens; out: [B, m, d] (any strides),
  /// overwritten; out may be x itself (the same view: x is read completely before out is
  /// written) but must not otherwise share memory with x. scratch: reused across calls.
  /// routing: when non-null, receives the dispatch and combine weights ([B, m, E * S] each).
  /// m = 0 or B = 0 does nothing. Throws shape_error naming the argument (x, out, phi,
  /// experts.w1 / w2 / w3 / b1 / b3 / b2) and both shapes, or when a buffer size overflows
  /// (logits, slots: B * m * n and B * n * d elements within core::max_buffer_bytes, B * n <=
  /// 2^31 - 1); config_error for a non-finite scale when normalize is on.
  void forward(ConstView<T, 3> x, const weights_type& w, View<T, 3> out, scratch_type& scratch,
               routing_type* routing = nullptr) const {
    const std::string_view fn = "forward";
    check_input(fn, x, w);
    check_out(fn, x, out);
    const std::int64_t B = x.extent(0), m = x.extent(1), n = num_slots();
    if (routing) {
      resize(routing->dispatch, B, m, n);
      resize(routing->combine, B, m, n);
    }
    if (B == 0 || m == 0) return;
    const int threads = std::max(1, num_threads());
    const Layout l = layout(B, m, threads);
    if (scratch.bytes_ < l.total + 64) {
      scratch.buf_.reset();
      scratch.bytes_ = 0;
      scratch.buf_.reset(new std::byte[l.total + 64]);
      scratch.bytes_ = l.total + 64;
    }
    if (scratch.plan_.num_tokens != B * n || scratch.plan_.num_experts != cfg_.num_experts ||
        scratch.plan_slots_ != cfg_.slots_per_expert) {
      scratch.plan_slots_ = 0;  // a failed rebuild must not look valid
      build_plan(scratch.plan_, B);
      scratch.plan_slots_ = cfg_.slots_per_expert;
    }
    run(x, w, out, scratch.plan_, l, align64(scratch.buf_.get()), routing);
  }

  /// As above with a scratch of its own (allocated for this call).
  void forward(ConstView<T, 3> x, const weights_type& w, View<T, 3> out,
               routing_type* routing = nullptr) const {
    scratch_type scratch;
    forward(x, w, out, scratch, routing);
  }

  /// As above, returning out: [B, m, d].
  core::Tensor<T> forward(ConstView<T, 3> x, const weights_type& w,
                          routing_type* routing = nullptr) const {
    check_input("forward", x, w);  // before allocating out: x's shape bounds out's size
    core::Tensor<T> out({x.extent(0), x.extent(1), cfg_.d_model});
    forward(x, w, out.template view<3>(), routing);
    return out;
  }

 private:
  // Byte offsets from a 64-aligned base; per-thread slots follow the fixed part.
  struct Layout {
    std::size_t phin = 0, norms = 0, comb = 0, dt = 0, xs = 0, ys = 0, moe = 0, moe_bytes = 0;
    std::size_t fixed = 0, slot_gemm = 0, slot_xn = 0, slot_bytes = 0, total = 0;
    std::int64_t slots = 0;
  };

  static constexpr std::size_t round64(std::size_t b) noexcept {
    return (b + 63) & ~std::size_t(63);
  }
  static std::byte* align64(std::byte* p) noexcept {
    const auto u = reinterpret_cast<std::uintptr_t>(p);
    return p + ((64 - (u & 63)) & 63);
  }
  static std::int64_t sat_mul(std::initializer_list<std::int64_t> f) noexcept {
    std::int64_t p = 1;
    for (std::int64_t v : f) {
      if (v <= 0) return 0;
      if (core::mul_overflows(p, v, p)) return std::numeric_limits<std::int64_t>::max();
    }
    return p;
  }

  static config_type validated(const config_type& cfg) {
    const std::string_view fn = "SoftMoELayer";
    if (cfg.d_model < 1) switchyard::detail::fail_config(name, fn, "d_model", cfg.d_model, ">= 1");
    if (cfg.d_ff < 1) switchyard::detail::fail_config(name, fn, "d_ff", cfg.d_ff, ">= 1");
    if (cfg.num_experts < 1)
      switchyard::detail::fail_config(name, fn, "num_experts", cfg.num_experts, ">= 1");
    if (cfg.slots_per_expert < 1)
      switchyard::detail::fail_config(name, fn, "slots_per_expert", cfg.slots_per_expert, ">= 1");
    if (cfg.activation != Activation::swiglu && cfg.activation != Activation::gelu &&
        cfg.activation != Activation::relu)
      switchyard::detail::fail_config(name, fn, "activation", static_cast<int>(cfg.activation),
                                      "swiglu, gelu or relu");
    // n = E * S slots: phi is [d, n] and slot rows are int32 plan tokens.
    const std::int64_t n = core::bounded_product({cfg.num_experts, cfg.slots_per_expert});
    if (n < 0 || n > max_plan_extent || core::bounded_product({cfg.d_model, n}, sizeof(T)) < 0)
      switchyard::detail::fail_config(
          name, fn, "slots_per_expert", cfg.slots_per_expert,
          "num_experts * slots_per_expert <= 2^31 - 1 and d_model * num_experts * "
          "slots_per_expert * sizeof(T) <= " +
              std::to_string(core::max_buffer_bytes) +
              " (num_experts = " + std::to_string(cfg.num_experts) + ")");
    if (core::bounded_product({cfg.d_model, cfg.d_ff}, sizeof(T)) < 0)
      switchyard::detail::fail_config(name, fn, "d_ff", cfg.d_ff,
                                      "d_model * d_ff within core::max_buffer_bytes");
    return cfg;
  }

  static void resize(core::Tensor<T>& t, std::int64_t B, std::int64_t m, std::int64_t n) {
    if (t.rank() == 3 && t.extent(0) == B && t.extent(1) == m && t.extent(2) == n) return;
    t = core::Tensor<T>({B, m, n});
  }

  void check_out(std::string_view fn, const ConstView<T, 3>& x, const View<T, 3>& out) const {
    core::detail::check_shape(name, fn, "out", out, {"B", "m", "D"},
                              {x.extent(0), x.extent(1), cfg_.d_model}, "out has the shape of x");
    const bool in_place = out.data() == x.data() && out.strides() == x.strides();
    if (!in_place) core::detail::check_no_alias(name, fn, "out", out, "x", x, "or out is x itself");
  }

  void check_input(std::string_view fn, const ConstView<T, 3>& x, const weights_type& w) const {
    const std::int64_t d = cfg_.d_model, n = num_slots();
    core::detail::check_shape(name, fn, "x", x, {"B", "m", "D"}, {-1, -1, d}, "D = d_model");
    const std::int64_t B = x.extent(0), m = x.extent(1);
    core::detail::check_shape(
        name, fn, "phi", w.phi, {"D", "n"}, {d, n},
        "[d_model, num_experts * slots_per_expert]; column j is slot j % S of expert j / S");
    detail::check_expert_weights(name, fn, "experts.", w.experts, cfg_.num_experts, d, cfg_.d_ff,
                                 cfg_.activation);
    if (cfg_.normalize && !std::isfinite(static_cast<double>(w.scale)))
      switchyard::detail::fail_config(name, fn, "scale", static_cast<double>(w.scale),
                                      "a finite scale (config normalize is true)");
    // Sizes of the buffers forward keeps: logits and weights [B, m, n], slot rows [B * n, d]
    // (int32 plan tokens).
    switchyard::detail::checked_size(name, fn, "logits", {B, m, n}, sizeof(T));
    const std::int64_t rows =
        switchyard::detail::checked_size(name, fn, "slots", {B, n, d}, sizeof(T)) /
        std::max<std::int64_t>(d, 1);
    if (rows > max_plan_extent) {
      const std::int64_t got[2] = {B, n};
      switchyard::detail::fail_shape(
          name, fn, "x", switchyard::detail::format_shape({"B", "n"}, got), "B * n <= 2147483647",
          "the B * n slot rows are int32 tokens of the experts' plan");
    }
  }

  Layout layout(std::int64_t B, std::int64_t m, int threads) const noexcept {
    const std::int64_t d = cfg_.d_model, n = num_slots();
    const auto bytes = [](std::int64_t elems) { return round64(std::size_t(elems) * sizeof(T)); };
    Layout l;
    std::size_t off = 0;
    const auto take = [&](std::size_t& at, std::size_t b) {
      at = off;
      off += b;
    };
    take(l.phin, cfg_.normalize ? bytes(d * n) : 0);
    take(l.norms, cfg_.normalize ? bytes(n) : 0);
    take(l.comb, bytes(B * m * n));
    take(l.dt, bytes(B * n * m));
    take(l.xs, bytes(B * n * d));
    take(l.ys, bytes(B * n * d));
    l.moe_bytes = experts_.workspace_bytes(B * n, B * n, threads);
    take(l.moe, round64(l.moe_bytes));
    l.fixed = off;
    const std::int64_t mt = std::min(m, row_tile), nt = std::min(n, row_tile);
    const std::size_t gemm = std::max({kernels::gemm_workspace_elems<Arch, T>(Arch{}, mt, n, d),
                                       kernels::gemm_workspace_elems<Arch, T>(Arch{}, nt, d, m),
                                       kernels::gemm_workspace_elems<Arch, T>(Arch{}, mt, d, n)});
    std::size_t s = 0;
    l.slot_gemm = s;
    s += round64(gemm * sizeof(T));
    l.slot_xn = s;
    if (cfg_.normalize) s += bytes(mt * d);
    l.slot_bytes = s;
    l.slots = std::max(1, threads);
    l.total = l.fixed + std::size_t(l.slots) * l.slot_bytes;
    return l;
  }

  // Slot row b * n + j -> expert j / S, gate 1, one choice per row.
  void build_plan(DispatchPlan<T>& plan, std::int64_t B) const {
    const std::int64_t E = cfg_.num_experts, S = cfg_.slots_per_expert, n = E * S, rows = B * n;
    plan.reset(rows, E, 1);
    for (std::int64_t r = 0; r < rows; ++r) {
      const auto e = static_cast<std::int32_t>((r % n) / S);
      plan.choice_expert[r] = e;
      plan.choice_weight[r] = T(1);
      ++plan.stats.tokens_per_expert[e];
    }
    plan.stats.routed_tokens = rows;
    detail::build_csr_from_choices(plan);
  }

  // Runs body(task, slot_scratch) for every task of a fixed list on up to l.slots threads.
  template <class Body>
  static void run_tasks(std::int64_t num_tasks, const Layout& l, std::byte* base, Body&& body) {
    const std::int64_t slots = std::max<std::int64_t>(
        1, std::min<std::int64_t>({std::int64_t(num_threads()), num_tasks, l.slots}));
    std::atomic<std::int64_t> next{0};
    parallel_for(slots, [&](std::int64_t s) {
      std::byte* sb = base + l.fixed + std::size_t(s) * l.slot_bytes;
      for (std::int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) body(i, sb);
    });
  }

  void run(const ConstView<T, 3>& x, const weights_type& w, const View<T, 3>& out,
           const DispatchPlan<T>& plan, const Layout& l, std::byte* base,
           routing_type* routing) const {
    const std::int64_t B = x.extent(0), m = x.extent(1), d = cfg_.d_model, n = num_slots();
    const bool norm = cfg_.normalize;
    T* const phin = reinterpret_cast<T*>(base + l.phin);
    T* const comb = reinterpret_cast<T*>(base + l.comb);  // [B, m, n] logits, then C
    T* const dt = reinterpret_cast<T*>(base + l.dt);      // [B, n, m] logits^T, then D^T
    T* const xs = reinterpret_cast<T*>(base + l.xs);      // [B * n, d] slot inputs X~
    T* const ys = reinterpret_cast<T*>(base + l.ys);      // [B * n, d] slot outputs Y~
    const T eps = static_cast<T>(norm_eps);

    // 1. phi^ = scale * phi / sqrt(|phi column|^2 + eps), contiguous [d, n].
    if (norm) {
      T* const norms = reinterpret_cast<T*>(base + l.norms);
      constexpr std::int64_t cols = 256;
      parallel_for(num_chunks(n, cols), [&](std::int64_t c) {
        const std::int64_t j0 = c * cols, j1 = std::min(n, j0 + cols);
        std::fill(norms + j0, norms + j1, T(0));
        for (std::int64_t p = 0; p < d; ++p) {
          const T* row = w.phi.data() + p * w.phi.stride(0);
          for (std::int64_t j = j0; j < j1; ++j) {
            const T v = row[j * w.phi.stride(1)];
            norms[j] += v * v;
          }
        }
        for (std::int64_t j = j0; j < j1; ++j) norms[j] = w.scale / std::sqrt(norms[j] + eps);
        for (std::int64_t p = 0; p < d; ++p) {
          const T* row = w.phi.data() + p * w.phi.stride(0);
          for (std::int64_t j = j0; j < j1; ++j)
            phin[p * n + j] = row[j * w.phi.stride(1)] * norms[j];
        }
      });
    }
    const T* const bphi = norm ? phin : w.phi.data();
    const std::int64_t rs_phi = norm ? n : w.phi.stride(0), cs_phi = norm ? 1 : w.phi.stride(1);

    // 2. logits of a token tile; kept transposed for the dispatch softmax; C rows.
    const std::int64_t tiles_m = num_chunks(m, row_tile), tiles_n = num_chunks(n, row_tile);
    run_tasks(B * tiles_m, l, base, [&](std::int64_t task, std::byte* sb) {
      const std::int64_t b = task / tiles_m, i0 = (task % tiles_m) * row_tile;
      const std::int64_t mt = std::min(row_tile, m - i0);
      T* const gws = reinterpret_cast<T*>(sb + l.slot_gemm);
      const T* xb = x.data() + b * x.stride(0) + i0 * x.stride(1);
      const T* a = xb;
      std::int64_t rsa = x.stride(1), csa = x.stride(2);
      if (norm) {
        T* const xn = reinterpret_cast<T*>(sb + l.slot_xn);
        for (std::int64_t i = 0; i < mt; ++i) {
          T* dst = xn + i * d;
          const T* src = xb + i * x.stride(1);
          for (std::int64_t p = 0; p < d; ++p) dst[p] = src[p * x.stride(2)];
          const T ss = kernels::dot(Arch{}, dst, dst, d);
          kernels::scale(Arch{}, T(1) / std::sqrt(ss + eps), dst, d);
        }
        a = xn;
        rsa = d;
        csa = 1;
      }
      T* const c = comb + (b * m + i0) * n;
      kernels::gemm(Arch{}, mt, n, d, T(1), a, rsa, csa, nullptr, bphi, rs_phi, cs_phi, T(0), c, n,
                    std::int64_t(1), gws);
      T* const dtb = dt + b * n * m + i0;
      constexpr std::int64_t jb = 16;
      for (std::int64_t j0 = 0; j0 < n; j0 += jb) {
        const std::int64_t j1 = std::min(n, j0 + jb);
        for (std::int64_t i = 0; i < mt; ++i)
          for (std::int64_t j = j0; j < j1; ++j) dtb[j * m + i] = c[i * n + j];
      }
      for (std::int64_t i = 0; i < mt; ++i) kernels::softmax_row(Arch{}, c + i * n, c + i * n, n);
    });

    // 3. dispatch weights of a slot tile (softmax over the item's tokens), then X~ = D^T x.
    run_tasks(B * tiles_n, l, base, [&](std::int64_t task, std::byte* sb) {
      const std::int64_t b = task / tiles_n, j0 = (task % tiles_n) * row_tile;
      const std::int64_t nt = std::min(row_tile, n - j0);
      T* const dtb = dt + (b * n + j0) * m;
      for (std::int64_t j = 0; j < nt; ++j)
        kernels::softmax_row(Arch{}, dtb + j * m, dtb + j * m, m);
      kernels::gemm(Arch{}, nt, d, m, T(1), dtb, m, std::int64_t(1), nullptr,
                    x.data() + b * x.stride(0), x.stride(1), x.stride(2), T(0),
                    xs + (b * n + j0) * d, d, std::int64_t(1),
                    reinterpret_cast<T*>(sb + l.slot_gemm));
    });

    // 4. every expert on its slot rows, in one MoELayer call.
    const std::int64_t rows = B * n;
    experts_.execute(plan, ConstView<T, 2>(xs, {rows, d}), MoELayerWeights<T>{w.experts, {}},
                     View<T, 2>(ys, {rows, d}), std::span<std::byte>(base + l.moe, l.moe_bytes));

    // 5. y = C Y~ for a token tile, into out.
    run_tasks(B * tiles_m, l, base, [&](std::int64_t task, std::byte* sb) {
      const std::int64_t b = task / tiles_m, i0 = (task % tiles_m) * row_tile;
      const std::int64_t mt = std::min(row_tile, m - i0);
      kernels::gemm(Arch{}, mt, d, n, T(1), comb + (b * m + i0) * n, n, std::int64_t(1), nullptr,
                    ys + b * n * d, d, std::int64_t(1), T(0),
                    out.data() + b * out.stride(0) + i0 * out.stride(1), out.stride(1),
                    out.stride(2), reinterpret_cast<T*>(sb + l.slot_gemm));
    });

    if (routing) {
      T* const rd = routing->dispatch.data();
      T* const rc = routing->combine.data();
      std::copy_n(comb, B * m * n, rc);
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t t = 0; t < m; ++t)
          for (std::int64_t j = 0; j < n; ++j) rd[(b * m + t) * n + j] = dt[(b * n + j) * m + t];
    }
  }

  config_type cfg_;
  MoELayer<T, Arch> experts_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
