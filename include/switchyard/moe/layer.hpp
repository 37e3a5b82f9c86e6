#pragma once
// MoELayer: executes a DispatchPlan. Per expert it gathers the expert's tokens, runs the
// expert FFN (moe/experts.hpp) as two or three GEMMs with the activation in between, and
// combines: y[t] = sum over shared experts s (in order) of shared_s(x[t])
//                + sum over the token's kept plan entries, in slot order, of gate * expert(x[t]).
// Dropped pairs and masked tokens contribute nothing; a token with nothing outputs 0 (the
// residual connection is the caller's).
//
// Execution (no allocation with a caller workspace):
// 1. Work is a fixed list of tasks: per expert its CSR run cut into near-equal row tiles of
//    at most row_tile rows, and per shared expert the T tokens cut the same way. A task packs
//    its tile's rows of x once for the GEMM micro-kernel (core/simd/gemm_kernel.hpp), the
//    token gather happening while packing, then runs chunks of ff_chunk hidden columns:
//      g = X_tile w1[e][chunk]^T   (w1's [out, in] rows packed by register transposes)
//      u = X_tile w3[e][chunk]^T   (swiglu)
//      g = act(g + b1) (* (u + b3))
//      O_tile += g w2[e][:, chunk]^T
//    into a [nnz + S*T, d] buffer at the tile's CSR rows; then + b2 and the optional softmax.
//    Tiles are large (all rows of an expert up to row_tile) so that packing the expert's
//    weights, the cost that grows with E rather than with tokens, is paid once per tile.
//    Tiles of at most streamed_rows rows instead pack one kc x NR block of weights at a time
//    just before use, requesting the next block's weights meanwhile (gemm_packed_streamed):
//    whole-chunk packs read the weights in passes of their own, waiting on memory, which at
//    few rows per expert cost a fifth of the layer's time. On one thread this runs at
//    0.83-0.93x the GFLOP/s of dense GEMMs doing the same work (bench/bench_moe_layer.cpp,
//    Emerald Rapids).
//    Decode-shaped plans (T <= config().decode_max_tokens) split the weights instead of the
//    tokens, so that one token keeps every thread streaming weights: per active expert (and shared
//    expert) its gathered rows of x are packed once; then tasks of (expert, decode_ff_chunk
//    hidden columns) compute the hidden chunk from w1 (and w3) rows, and tasks of (expert,
//    decode_d_chunk output columns) multiply the whole hidden row by those rows of w2. Weights
//    are packed kc x NR blocks at a time just before use (gemm_packed_streamed), never whole.
//    Every element is summed in the order the prefill path sums it, so both paths give the
//    same bits.
// 2. Per chunk of tokens, y[t] is summed from that buffer in the fixed order above.
// Tasks go to threads dynamically, but each task and each token is computed the same way
// whichever thread runs it, and the tiling depends only on the plan: the output is
// bit-identical for any thread count. Batch invariance: a token's output row depends only on
// its own x row, its plan entries and the weights (GEMM rows are summed independently, in an
// order fixed by kc alone, on either path), never on which other tokens share the batch.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/gemm_bf16.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/gemm_kernel.hpp"
#include "switchyard/core/simd/gemm_packed.hpp"
#include "switchyard/core/simd/softmax.hpp"
#include "switchyard/core/simd/vector_ops.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/experts.hpp"
#include "switchyard/moe/packed_weights.hpp"
#include "switchyard/moe/plan.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

struct MoELayerConfig {
  std::int64_t d_model = 0;      ///< d, token width (input and output)
  std::int64_t d_ff = 0;         ///< F, hidden width of each routed expert
  std::int64_t num_experts = 0;  ///< E routed experts
  Activation activation = Activation::swiglu;
  std::int64_t num_shared_experts = 0;  ///< S always-on experts (DeepSeekMoE); weight 1, or
                                        ///< sigmoid(x . shared_gate[s]) (Qwen2-MoE)
  bool output_softmax = false;   ///< softmax over each expert's d outputs (noisy top-k experts)
  std::int64_t shared_d_ff = 0;  ///< hidden width of the shared experts; 0 = d_ff
  /// Plans of at most this many tokens run the decode path (weights split across tasks so a
  /// few tokens keep every thread streaming weights); larger ones the prefill path (tokens split
  /// across tasks). Both give the same bits; 0 always runs the prefill path.
  std::int64_t decode_max_tokens = 64;
  /// With bf16 weights, prefill-shaped plans run the expert GEMMs on bf16 operands through
  /// core::gemm_bf16_packed's fastest tile path (AMX, else AVX512-BF16): each tile's rows of x
  /// and its hidden activation are rounded to bf16 (nearest, ties to even) before their GEMM;
  /// sums, activation, bias and combine stay float. Decode-shaped plans keep the float path
  /// (they stream the weights once either way). Needs a tile path in this build and CPU
  /// (core::bf16_best_path() != widen) and bf16 weights (config_error otherwise).
  bool bf16_compute = false;
};

/// Routed experts [E, ...] and shared experts [S, ...], of the layer's activation.
/// T is the stored element type: the layer's compute type, or bf16 / f16 for MoELayer<float>.
template <class T>
struct MoELayerWeights {
  ExpertWeights<T> experts{};  ///< E routed experts
  ExpertWeights<T> shared{};   ///< S shared experts (all views empty when S = 0)
  /// [S, d] or empty: shared expert s's output is scaled by sigmoid(x . shared_gate[s])
  /// (Qwen2-MoE's shared_expert_gate, an nn.Linear(d, 1) without bias); empty = weight 1.
  ConstView<T, 2> shared_gate{};
};

/// A plan from a dense combine-weight matrix, for users who route elsewhere and for tests.
/// combine: [T, E]; every non-zero combine(t, e) becomes an entry (token t, expert e, gate
/// combine(t, e)). Tokens are ascending inside each expert; a token's slots number its
/// non-zero entries in expert order (0, 1, ...); top_k is the largest count per token.
/// Throws config_error for E < 1 or a non-finite weight.
template <class T>
DispatchPlan<T> make_plan_from_combine_weights(ConstView<T, 2> combine) {
  constexpr std::string_view layer = "DispatchPlan";
  const std::int64_t tokens = combine.extent(0), experts = combine.extent(1);
  core::detail::check_shape(layer, "make_plan_from_combine_weights", "combine", combine, {"T", "E"},
                            {-1, -1});
  if (experts < 1) {
    switchyard::detail::fail_config(layer, "make_plan_from_combine_weights", "E", experts,
                                    ">= 1 experts (columns of combine)");
  }
  std::int64_t k = 0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::int64_t n = 0;
    for (std::int64_t e = 0; e < experts; ++e) {
      const T c = combine(t, e);
      if (!std::isfinite(static_cast<double>(c))) {
        switchyard::detail::fail_config(layer, "make_plan_from_combine_weights", "combine",
                                        static_cast<double>(c), "finite weights");
      }
      n += c != T(0);
    }
    k = std::max(k, n);
  }
  DispatchPlan<T> plan;
  plan.reset(tokens, experts, k);
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::int64_t s = 0;
    for (std::int64_t e = 0; e < experts; ++e) {
      const T c = combine(t, e);
      if (c == T(0)) continue;
      plan.choice_expert[t * k + s] = static_cast<std::int32_t>(e);
      plan.choice_weight[t * k + s] = c;
      ++plan.stats.tokens_per_expert[e];
      ++s;
    }
  }
  plan.stats.routed_tokens = tokens;
  detail::build_csr_from_choices(plan);
  return plan;
}

template <class T = float, class Arch = simd::default_arch>
class MoELayer {
 public:
  using config_type = MoELayerConfig;
  using weights_type = MoELayerWeights<T>;
  using plan_type = DispatchPlan<T>;
  static constexpr std::string_view name = "MoELayer";
  /// Most rows (plan entries or tokens) one task runs through an expert.
  static constexpr std::int64_t row_tile = 512;
  /// Hidden columns computed per step of a task (a multiple of the GEMM's k block).
  static constexpr std::int64_t ff_chunk = 512;
  /// Decode path: hidden columns per task (a multiple of the GEMM's k block, so the hidden
  /// row is packed in the blocks the prefill path uses) and output columns per w2 task.
  static constexpr std::int64_t decode_ff_chunk = 256;
  static constexpr std::int64_t decode_d_chunk = 128;
  /// Prefill tiles of at most this many rows stream their weights through packs of one
  /// kc x NR block (gemm_packed_streamed) instead of packing whole hidden chunks.
  static constexpr std::int64_t streamed_rows = 256;
  static_assert(ff_chunk % kernels::GemmTile<Arch, T>::kc_max == 0 &&
                    decode_ff_chunk % kernels::GemmTile<Arch, T>::kc_max == 0,
                "hidden chunks hold whole k blocks of the GEMM (kc divides kc_max)");

  /// Throws config_error: d_model, d_ff or num_experts < 1, num_shared_experts < 0,
  /// shared_d_ff < 0.
  explicit MoELayer(config_type cfg) : cfg_(cfg) {
    const std::string_view fn = "MoELayer";
    if (cfg.d_model < 1) switchyard::detail::fail_config(name, fn, "d_model", cfg.d_model, ">= 1");
    if (cfg.d_ff < 1) switchyard::detail::fail_config(name, fn, "d_ff", cfg.d_ff, ">= 1");
    if (cfg.num_experts < 1)
      switchyard::detail::fail_config(name, fn, "num_experts", cfg.num_experts, ">= 1");
    if (cfg.num_shared_experts < 0)
      switchyard::detail::fail_config(name, fn, "num_shared_experts", cfg.num_shared_experts,
                                      ">= 0");
    if (cfg.shared_d_ff < 0)
      switchyard::detail::fail_config(name, fn, "shared_d_ff", cfg.shared_d_ff, ">= 0 (0 = d_ff)");
    if (cfg.decode_max_tokens < 0)
      switchyard::detail::fail_config(name, fn, "decode_max_tokens", cfg.decode_max_tokens,
                                      ">= 0 (0 = never the decode path)");
    if (cfg.activation != Activation::swiglu && cfg.activation != Activation::gelu &&
        cfg.activation != Activation::relu)
      switchyard::detail::fail_config(name, fn, "activation", static_cast<int>(cfg.activation),
                                      "swiglu, gelu or relu");
    if (cfg.bf16_compute && core::bf16_best_path() == core::Bf16Path::widen)
      switchyard::detail::fail_config(name, fn, "bf16_compute", "true",
                                      "false here: no bf16 tile path (AMX or AVX512-BF16) in this "
                                      "build and CPU");
    if (cfg_.shared_d_ff == 0) cfg_.shared_d_ff = cfg_.d_ff;
    // Plans hold expert ids as int32; per-expert weight panels [d_ff, d_model] are packed
    // into scratch, so their sizes must be representable.
    if (cfg.num_experts > std::numeric_limits<std::int32_t>::max())
      switchyard::detail::fail_config(name, fn, "num_experts", cfg.num_experts, "<= 2^31 - 1");
    if (core::bounded_product({core::pad_extent(cfg.num_shared_experts, 1), cfg.d_model},
                              sizeof(T)) < 0)
      switchyard::detail::fail_config(name, fn, "num_shared_experts", cfg.num_shared_experts,
                                      "(num_shared_experts + 1) * d_model within max_buffer_bytes");
    if (core::bounded_product({cfg_.d_model, std::max(cfg_.d_ff, cfg_.shared_d_ff)}, sizeof(T)) < 0)
      switchyard::detail::fail_config(name, fn, "d_ff", std::max(cfg_.d_ff, cfg_.shared_d_ff),
                                      "d_model * d_ff within core::max_buffer_bytes");
  }

  /// The config, with shared_d_ff resolved (never 0).
  const config_type& config() const noexcept { return cfg_; }

  /// Bytes of workspace execute() needs for a plan with num_tokens tokens and nnz kept
  /// entries, to run on up to `threads` threads (fewer threads' worth of workspace works too:
  /// execute then uses as many threads as it has scratch for, at least one).
  /// 0 when num_tokens is 0.
  std::size_t workspace_bytes(std::int64_t num_tokens, std::int64_t nnz,
                              int threads = num_threads()) const noexcept {
    if (num_tokens <= 0) return 0;
    const Layout l = layout(num_tokens, nnz);
    const std::int64_t slots =
        std::max<std::int64_t>(1, std::min<std::int64_t>(threads, l.max_tasks));
    return 64 + l.fixed + std::size_t(slots) * l.slot_bytes;
  }
  /// workspace_bytes(plan.num_tokens, plan.nnz(), threads).
  std::size_t workspace_bytes(const plan_type& plan, int threads = num_threads()) const noexcept {
    return workspace_bytes(plan.num_tokens, plan.nnz(), threads);
  }

  /// Weights of the compute type (the common case; braced weights work here).
  void execute(const plan_type& plan, ConstView<T, 2> x, const weights_type& w, View<T, 2> y,
               std::span<std::byte> workspace, TokenMask mask = {}) const {
    execute<T>(plan, x, w, y, workspace, mask);
  }
  void execute(const plan_type& plan, ConstView<T, 2> x, const weights_type& w, View<T, 2> y,
               TokenMask mask = {}) const {
    execute<T>(plan, x, w, y, mask);
  }
  core::Tensor<T> execute(const plan_type& plan, ConstView<T, 2> x, const weights_type& w,
                          TokenMask mask = {}) const {
    return execute<T>(plan, x, w, mask);
  }

  /// plan: routing of the T tokens (plan.num_tokens == T, plan.num_experts == E);
  /// x: [T, d] (any strides); y: [T, d], overwritten (any strides; may be x itself, the same
  /// view, but must not otherwise share memory with x: shape_error).
  /// workspace: at least workspace_bytes(plan) bytes, any alignment, not sharing memory with x
  /// or y (shape_error); nothing is allocated.
  /// mask: optional keep-mask over the T tokens; a masked token outputs 0 (no shared expert
  /// either) even if the plan lists it. T = 0 is valid and does nothing.
  /// w: weights stored as T, or as bf16 / f16 for MoELayer<float> (widened while packing;
  /// never copied whole), each projection stacked or one view per expert (ExpertWeights).
  /// Throws shape_error naming the argument (x, y, w1 / shared.w1 / ..., plan, mask,
  /// workspace) and both shapes, or switchyard::error for a malformed plan (offsets,
  /// token index out of range, tokens of an expert not strictly ascending).
  template <class W>
  void execute(const plan_type& plan, ConstView<T, 2> x, const MoELayerWeights<W>& w, View<T, 2> y,
               std::span<std::byte> workspace, TokenMask mask = {}) const {
    execute_impl(plan, x, w, nullptr, y, workspace, mask);
  }

 private:
  template <class W>
  void execute_impl(const plan_type& plan, ConstView<T, 2> x, const MoELayerWeights<W>& w,
                    const MoEPackedWeights<T>* packed, View<T, 2> y, std::span<std::byte> workspace,
                    TokenMask mask) const {
    const std::string_view fn = "execute";
    check_args(fn, plan, x, w, mask);
    const std::int64_t tokens = plan.num_tokens, d = cfg_.d_model;
    core::detail::check_shape(name, fn, "y", y, {"T", "D"}, {tokens, d},
                              "T = plan.num_tokens, D = d_model");
    // In place (y is exactly x) works: every expert reads x before the combine writes y.
    const bool in_place = y.data() == x.data() && y.strides() == x.strides();
    if (!in_place) core::detail::check_no_alias(name, fn, "y", y, "x", x, "or y is x itself");
    if (tokens == 0) return;
    const std::int64_t nnz = plan.nnz();
    const Layout l = layout(tokens, nnz);
    const std::size_t need = workspace_bytes(tokens, nnz, 1);
    if (workspace.size() < need) {
      switchyard::detail::fail_shape(
          name, fn, "workspace", "[bytes=" + std::to_string(workspace.size()) + "]",
          "[bytes>=" + std::to_string(workspace_bytes(plan)) + "]",
          "workspace_bytes(plan); at least " + std::to_string(need) + " for one thread");
    }
    // The workspace is written while x is read and before y is: it must be separate memory.
    const View<std::byte, 1> ws(workspace.data(), {static_cast<std::int64_t>(workspace.size())});
    core::detail::check_no_alias(name, fn, "workspace", ws, "x", x);
    core::detail::check_no_alias(name, fn, "workspace", ws, "y", y);
    const std::int64_t slots_fit =
        std::int64_t((workspace.size() - 64 - l.fixed) / std::max<std::size_t>(1, l.slot_bytes));
    run(plan, x, w, packed, y, l, align64(workspace.data()), slots_fit, mask);
  }

 public:
  /// As above with an allocated workspace.
  template <class W>
  void execute(const plan_type& plan, ConstView<T, 2> x, const MoELayerWeights<W>& w, View<T, 2> y,
               TokenMask mask = {}) const {
    check_args("execute", plan, x, w, mask);
    const std::size_t bytes = workspace_bytes(plan);
    std::unique_ptr<std::byte[]> ws(new std::byte[std::max<std::size_t>(bytes, 1)]);
    execute(plan, x, w, y, std::span<std::byte>(ws.get(), bytes), mask);
  }

  /// As above, returning y: [T, d].
  template <class W>
  core::Tensor<T> execute(const plan_type& plan, ConstView<T, 2> x, const MoELayerWeights<W>& w,
                          TokenMask mask = {}) const {
    check_args("execute", plan, x, w, mask);
    core::Tensor<T> y({plan.num_tokens, cfg_.d_model});
    execute(plan, x, w, y.template view<2>(), mask);
    return y;
  }

  /// The experts' weights packed once into the GEMM's panels (packed_weights.hpp), for a
  /// layer whose weights do not change between calls: execute(plan, x, w, packed, ...) then
  /// skips packing weights (the whole gap to a dense GEMM of the same work). Holds every
  /// projection's weights again as T (panels padded to the micro-kernel width): as much as
  /// float weights, twice bf16 ones. w: as for execute, and it must outlive the packed weights'
  /// use. Throws as execute for bad weights, config_error with bf16_compute (that path packs
  /// bf16 tiles itself) or when the panels would exceed core::max_buffer_bytes.
  template <class W>
  MoEPackedWeights<T> pack_weights(const MoELayerWeights<W>& w) const {
    const std::string_view fn = "pack_weights";
    check_weights(fn, w);
    if (cfg_.bf16_compute)
      switchyard::detail::fail_config(name, fn, "bf16_compute", "true",
                                      "false: packed weights are panels of the compute type");
    using G = kernels::GemmTile<Arch, T>;
    const std::int64_t d = cfg_.d_model, E = cfg_.num_experts, S = cfg_.num_shared_experts;
    const bool swiglu = cfg_.activation == Activation::swiglu;
    MoEPackedWeights<T> pk;
    pk.d_model = d;
    pk.d_ff = cfg_.d_ff;
    pk.shared_d_ff = cfg_.shared_d_ff;
    pk.num_experts = E;
    pk.num_shared = S;
    pk.nr = G::nr;
    pk.activation = cfg_.activation;
    // Values first (overflow-checked): per expert w1 (and w3) round_up(F, NR) * d, w2 per
    // chunk round_up(d, NR) * chunk.
    std::int64_t total = 0;
    const auto add = [&](std::int64_t F) {
      const std::int64_t in = core::bounded_product({core::round_up(F, G::nr), d}, sizeof(T));
      const std::int64_t out = core::bounded_product({core::round_up(d, G::nr), F}, sizeof(T));
      std::int64_t sum = 0;
      if (in < 0 || out < 0 || core::mul_overflows(in, std::int64_t(swiglu ? 2 : 1), sum) ||
          core::add_overflows(sum, out, sum) || core::add_overflows(total, sum, total) ||
          core::bounded_product({total}, sizeof(T)) < 0)
        switchyard::detail::fail_config(name, fn, "d_ff", F,
                                        "packed weights within core::max_buffer_bytes");
    };
    for (std::int64_t e = 0; e < E + S; ++e) add(e < E ? cfg_.d_ff : cfg_.shared_d_ff);
    pk.panels.resize(std::size_t(total));
    // Offsets first, then every expert packed on its own thread.
    std::size_t at = 0;
    for (std::int64_t i = 0; i < E + S; ++i) {
      const std::int64_t F = i >= E ? cfg_.shared_d_ff : cfg_.d_ff;
      pk.w1.push_back(at);
      at += std::size_t(core::round_up(F, G::nr) * d);
      pk.w3.push_back(at);
      if (swiglu) at += std::size_t(core::round_up(F, G::nr) * d);
      pk.w2.push_back(at);
      at += std::size_t(core::round_up(d, G::nr) * F);
    }
    pk.source.resize(std::size_t(3 * (E + S)));
    parallel_for(E + S, [&](std::int64_t i) {
      const bool shared = i >= E;
      const std::int64_t e = shared ? i - E : i, F = shared ? cfg_.shared_d_ff : cfg_.d_ff;
      const ExpertWeights<W>& ew = shared ? w.shared : w.experts;
      const auto w1 = ew.w1_of(e), w2 = ew.w2_of(e);
      const auto w3 = swiglu ? ew.w3_of(e) : ConstView<W, 2>{};
      T* const panels = pk.panels.data();
      kernels::pack_b_rows<Arch, G::nr>(Arch{}, w1.data(), w1.stride(0), w1.stride(1), F, d,
                                        panels + pk.w1[std::size_t(i)]);
      if (swiglu)
        kernels::pack_b_rows<Arch, G::nr>(Arch{}, w3.data(), w3.stride(0), w3.stride(1), F, d,
                                          panels + pk.w3[std::size_t(i)]);
      T* w2p = panels + pk.w2[std::size_t(i)];
      for (std::int64_t f0 = 0; f0 < F; f0 += ff_chunk) {
        const std::int64_t fc = std::min(ff_chunk, F - f0);
        kernels::pack_b_rows<Arch, G::nr>(Arch{}, w2.data() + f0 * w2.stride(1), w2.stride(0),
                                          w2.stride(1), d, fc, w2p);
        w2p += core::round_up(d, G::nr) * fc;
      }
      const void* src[3] = {w1.data(), w3.data(), w2.data()};
      std::copy(src, src + 3, pk.source.begin() + 3 * i);
    });
    return pk;
  }

  /// execute with the weights also packed by pack_weights(w) (this layer's config, these
  /// weights): prefill-shaped plans run on the panels; decode-shaped plans (at most
  /// decode_max_tokens tokens) stream w itself, as without them (they read every weight once
  /// either way). Same bits as execute(plan, x, w, y, ...). Throws as execute, and
  /// shape_error naming 'packed' when it was packed for another config or from other weights.
  template <class W>
  void execute(const plan_type& plan, ConstView<T, 2> x, const MoELayerWeights<W>& w,
               const MoEPackedWeights<T>& packed, View<T, 2> y, std::span<std::byte> workspace,
               TokenMask mask = {}) const {
    check_packed("execute", w, packed);
    execute_impl(plan, x, w, &packed, y, workspace, mask);
  }
  /// As above with an allocated workspace.
  template <class W>
  void execute(const plan_type& plan, ConstView<T, 2> x, const MoELayerWeights<W>& w,
               const MoEPackedWeights<T>& packed, View<T, 2> y, TokenMask mask = {}) const {
    check_args("execute", plan, x, w, mask);
    check_packed("execute", w, packed);
    const std::size_t bytes = workspace_bytes(plan);
    std::unique_ptr<std::byte[]> ws(new std::byte[std::max<std::size_t>(bytes, 1)]);
    execute_impl(plan, x, w, &packed, y, std::span<std::byte>(ws.get(), bytes), mask);
  }

  /// Rows of expert_outputs(): nnz + S * T (plan entries, then shared expert s on token t at
  /// nnz + s * T + t).
  std::int64_t output_rows(const plan_type& plan) const noexcept {
    return plan.nnz() + cfg_.num_shared_experts * plan.num_tokens;
  }

  /// The experts without the combine: out row p < nnz is plan entry p's expert output (not
  /// multiplied by its gate), row nnz + s * T + t shared expert s on token t (times its
  /// sigmoid gate where shared_gate is set). out: [output_rows(plan), d], rows contiguous
  /// (strides {d, 1}), not sharing memory with x. Every row has the bits execute() sums, so
  /// execute(plan, x, w) == combine_outputs(plan, expert_outputs(plan, x, w)) bit for bit;
  /// the pieces let a caller run experts elsewhere (dist::ExpertParallelMoE). Throws as
  /// execute(), and shape_error naming 'out'.
  template <class W>
  void expert_outputs(const plan_type& plan, ConstView<T, 2> x, const MoELayerWeights<W>& w,
                      View<T, 2> out) const {
    const std::string_view fn = "expert_outputs";
    check_args(fn, plan, x, w, {});
    const std::int64_t tokens = plan.num_tokens;
    check_output_rows(fn, plan, out);
    core::detail::check_no_alias(name, fn, "out", out, "x", x);
    if (tokens == 0) return;
    const Layout l = layout(tokens, plan.nnz(), false);
    const std::int64_t slots =
        std::max<std::int64_t>(1, std::min<std::int64_t>(num_threads(), l.max_tasks));
    const std::size_t bytes = 64 + l.fixed + std::size_t(slots) * l.slot_bytes;
    std::unique_ptr<std::byte[]> ws(new std::byte[bytes]);
    std::byte* base = align64(ws.get());
    compute_outputs(plan, x, w, l, base, slots, out.data());
  }

  /// The combine alone: y[t] = sum over shared experts s of outputs[nnz + s * T + t], then
  /// over the token's kept entries in slot order of gate * outputs[p], exactly as execute()
  /// sums it; masked tokens output 0. outputs: [nnz + S * T, d] with strides {d, 1}
  /// (expert_outputs' layout); the plan may route to any number of experts (its own
  /// num_experts), e.g. a global plan whose experts ran on other processes. y: [T, d], not
  /// sharing memory with outputs. Throws shape_error naming outputs, y or mask, and
  /// switchyard::error for a malformed plan.
  void combine_outputs(const plan_type& plan, ConstView<T, 2> outputs, View<T, 2> y,
                       TokenMask mask = {}) const {
    const std::string_view fn = "combine_outputs";
    check_plan_structure(fn, plan);
    check_output_rows(fn, plan, outputs);
    const std::int64_t tokens = plan.num_tokens;
    core::detail::check_shape(name, fn, "y", y, {"T", "D"}, {tokens, cfg_.d_model},
                              "T = plan.num_tokens, D = d_model");
    core::detail::check_no_alias(name, fn, "y", y, "outputs", outputs);
    if (!mask.keep.empty() && std::int64_t(mask.keep.size()) != tokens) {
      const std::int64_t got[1] = {std::int64_t(mask.keep.size())};
      switchyard::detail::fail_shape(name, fn, "mask", switchyard::detail::format_shape({"T"}, got),
                                     "[T=" + std::to_string(tokens) + "]",
                                     "one flag per token, or empty");
    }
    if (tokens == 0) return;
    std::vector<std::int64_t> tok_off(std::size_t(tokens + 1)), tok_pos(std::size_t(plan.nnz()));
    index_tokens(plan, tok_off.data(), tok_pos.data());
    combine(plan, y, outputs.data(), tok_off.data(), tok_pos.data(), mask);
  }

 private:
  // outputs / out of expert_outputs() and combine_outputs(): [nnz + S * T, d], strides {d, 1}.
  template <class V>
  void check_output_rows(std::string_view fn, const plan_type& plan, const V& out) const {
    std::int64_t rows = 0;
    const std::int64_t S = cfg_.num_shared_experts, d = cfg_.d_model;
    const bool overflow = core::mul_overflows(S, plan.num_tokens, rows) ||
                          core::add_overflows(rows, plan.nnz(), rows);
    const std::string_view arg = fn == "expert_outputs" ? "out" : "outputs";
    core::detail::check_shape(name, fn, arg, out, {"rows", "D"}, {overflow ? -2 : rows, d},
                              "rows = nnz + num_shared_experts * T, D = d_model");
    if (rows > 0 && (out.stride(0) != d || out.stride(1) != 1)) {
      switchyard::detail::fail_shape(
          name, fn, arg,
          "[strides=" + std::to_string(out.stride(0)) + "," + std::to_string(out.stride(1)) + "]",
          "[strides=" + std::to_string(d) + ",1]", "contiguous rows");
    }
  }

  struct Scratch {
    T *g, *u, *ax, *ah, *bp;  // hidden chunk, up chunk, packed x rows, packed hidden, packed w
  };

  struct Task {
    std::int64_t expert;  // < E: routed expert, rows are CSR positions; else shared expert - E
    std::int64_t begin;   // first CSR position (routed) or token (shared)
    std::int64_t rows;
  };

  // Decode path: one expert's (or shared expert's) rows, packed for the GEMM.
  struct Group {
    std::int64_t expert;  // as Task::expert
    std::int64_t begin;   // first CSR position (routed) or 0 (shared)
    std::int64_t rows;
    std::int64_t ax, h;  // element offsets of its packed x rows and packed hidden rows
  };

  // Workspace layout: byte offsets from a 64-aligned base.
  struct Layout {
    bool decode = false;
    std::size_t out = 0, tok_off = 0, tok_pos = 0, tasks = 0, fixed = 0;
    std::size_t groups = 0, dax = 0, dh = 0;  // decode path: groups, packed x, packed hidden
    std::size_t g = 0, u = 0, ax = 0, ah = 0, bp = 0, slot_bytes = 0;
    std::int64_t max_tasks = 0, rows_cap = 0, fc_cap = 0, max_groups = 0;
  };

  static constexpr std::size_t round64(std::size_t b) noexcept {
    return (b + 63) & ~std::size_t(63);
  }
  static std::byte* align64(std::byte* p) noexcept {
    const auto u = reinterpret_cast<std::uintptr_t>(p);
    return p + ((64 - (u & 63)) & 63);
  }

  // own_out: the output rows live in the workspace (execute); false when the caller gives them
  // (expert_outputs).
  Layout layout(std::int64_t tokens, std::int64_t nnz, bool own_out = true) const noexcept {
    const std::int64_t d = cfg_.d_model, E = cfg_.num_experts, S = cfg_.num_shared_experts;
    Layout l;
    std::size_t off = 0;
    l.out = off;
    if (own_out) off += round64(std::size_t(nnz + S * tokens) * std::size_t(d) * sizeof(T));
    l.tok_off = off;
    off += round64(std::size_t(tokens + 1) * sizeof(std::int64_t));
    l.tok_pos = off;
    off += round64(std::size_t(nnz) * sizeof(std::int64_t));
    const std::int64_t f_max = std::max(cfg_.d_ff, S > 0 ? cfg_.shared_d_ff : 0);
    using G = kernels::GemmTile<Arch, T>;
    const auto bytes = [](std::int64_t elems) { return round64(std::size_t(elems) * sizeof(T)); };
    l.decode = tokens <= cfg_.decode_max_tokens;
    if (l.decode) {
      // Groups: the active experts (at most nnz of them) and the shared experts; each packs
      // its rows padded to whole panels of mr.
      l.max_groups = std::min(E, nnz) + S;
      const std::int64_t packed_rows = nnz + S * tokens + l.max_groups * (G::mr - 1);
      l.max_tasks = l.max_groups *
                    std::max(num_chunks(f_max, decode_ff_chunk), num_chunks(d, decode_d_chunk));
      l.groups = off;
      off += round64(std::size_t(l.max_groups) * sizeof(Group));
      l.dax = off;
      off += bytes(packed_rows * d);
      l.dh = off;
      off += bytes(packed_rows * f_max);
      l.fixed = off;
      l.rows_cap = tokens;
      l.fc_cap = std::min(decode_ff_chunk, f_max);
      std::size_t s = 0;
      l.g = s;
      s += bytes(l.rows_cap * l.fc_cap);
      l.u = s;
      if (cfg_.activation == Activation::swiglu) s += bytes(l.rows_cap * l.fc_cap);
      l.bp = s;
      s += bytes(G::kc() * G::nr);
      l.slot_bytes = s;
      return l;
    }
    l.max_tasks = E + num_chunks(nnz, row_tile) + S * num_chunks(tokens, row_tile);
    l.tasks = off;
    off += round64(std::size_t(l.max_tasks) * sizeof(Task));
    l.fixed = off;
    l.rows_cap = std::min(row_tile, tokens);
    l.fc_cap = std::min(ff_chunk, f_max);
    const std::int64_t m_pad = core::round_up(l.rows_cap, G::mr);
    std::size_t s = 0;
    l.g = s;
    s += bytes(l.rows_cap * l.fc_cap);
    l.u = s;
    if (cfg_.activation == Activation::swiglu) s += bytes(l.rows_cap * l.fc_cap);
    l.ax = s;
    s += bytes(m_pad * d);
    l.ah = s;
    s += bytes(m_pad * l.fc_cap);
    l.bp = s;
    s += bytes(std::max(core::round_up(l.fc_cap, G::nr) * d, core::round_up(d, G::nr) * l.fc_cap));
    l.slot_bytes = s;
    return l;
  }

  template <class W>
  void check_args(std::string_view fn, const plan_type& plan, const ConstView<T, 2>& x,
                  const MoELayerWeights<W>& w, const TokenMask& mask) const {
    static_assert(std::is_same_v<W, T> || (std::is_same_v<T, float> && is_half_v<W>),
                  "MoELayer: weights of the compute type T, or bf16 / f16 weights for float");
    const std::int64_t d = cfg_.d_model, E = cfg_.num_experts, S = cfg_.num_shared_experts;
    const std::int64_t tokens = plan.num_tokens;
    if (plan.num_experts != E || tokens < 0) {
      const std::int64_t got[2] = {tokens, plan.num_experts};
      switchyard::detail::fail_shape(
          name, fn, "plan", switchyard::detail::format_shape({"T", "E"}, got),
          "[T, E=" + std::to_string(E) + "]", "plan.num_experts must equal num_experts");
    }
    core::detail::check_shape(name, fn, "x", x, {"T", "D"}, {tokens, d},
                              "T = plan.num_tokens, D = d_model");
    // The workspace holds nnz + S * T output rows of d_model (layout()); a plan or a stride-0
    // x may claim any number of tokens, so the size is checked before it is computed.
    std::int64_t rows = 0;
    if (core::mul_overflows(S, tokens, rows) || core::add_overflows(rows, plan.nnz(), rows) ||
        core::bounded_product({rows, d}, sizeof(T)) < 0 ||
        core::bounded_product({tokens, 2}, sizeof(std::int64_t)) < 0) {
      const std::int64_t got[3] = {tokens, plan.nnz(), S};
      switchyard::detail::fail_shape(
          name, fn, "plan", switchyard::detail::format_shape({"T", "nnz", "shared"}, got),
          "(nnz + shared * T) * d_model * sizeof(T) <= " + std::to_string(core::max_buffer_bytes),
          "the output rows of every expert live in the workspace");
    }
    // The decode path also packs every active group's rows of x and of the hidden layer,
    // padded to whole register panels (layout()).
    if (tokens <= cfg_.decode_max_tokens) {
      const std::int64_t f_max = std::max(cfg_.d_ff, S > 0 ? cfg_.shared_d_ff : 0);
      std::int64_t packed = 0;
      if (core::mul_overflows(std::min(E, plan.nnz()) + S,
                              std::int64_t(kernels::GemmTile<Arch, T>::mr), packed) ||
          core::add_overflows(packed, rows, packed) ||
          core::bounded_product({packed, d + f_max}, sizeof(T)) < 0) {
        const std::int64_t got[3] = {tokens, plan.nnz(), S};
        switchyard::detail::fail_shape(
            name, fn, "plan", switchyard::detail::format_shape({"T", "nnz", "shared"}, got),
            "packed rows * (d_model + d_ff) * sizeof(T) <= " +
                std::to_string(core::max_buffer_bytes),
            "the decode path packs the rows of every active expert");
      }
    }
    check_weights(fn, w);
    if (!mask.keep.empty() && std::int64_t(mask.keep.size()) != tokens) {
      const std::int64_t got[1] = {std::int64_t(mask.keep.size())};
      switchyard::detail::fail_shape(name, fn, "mask", switchyard::detail::format_shape({"T"}, got),
                                     "[T=" + std::to_string(tokens) + "]",
                                     "one flag per token, or empty");
    }
    check_plan_structure(fn, plan);
  }

  // The weights' shapes (every expert, shared experts, shared gate) and type.
  template <class W>
  void check_weights(std::string_view fn, const MoELayerWeights<W>& w) const {
    static_assert(std::is_same_v<W, T> || (std::is_same_v<T, float> && is_half_v<W>),
                  "MoELayer: weights of the compute type T, or bf16 / f16 weights for float");
    const std::int64_t d = cfg_.d_model, E = cfg_.num_experts, S = cfg_.num_shared_experts;
    if (cfg_.bf16_compute && !std::is_same_v<W, bf16>)
      switchyard::detail::fail_config(name, fn, "bf16_compute", "true",
                                      "bf16 weights (these are float or f16)");
    detail::check_expert_weights(name, fn, "", w.experts, E, d, cfg_.d_ff, cfg_.activation);
    if (S > 0) {
      detail::check_expert_weights(name, fn, "shared.", w.shared, S, d, cfg_.shared_d_ff,
                                   cfg_.activation);
    }
    if (!w.shared_gate.empty() || S == 0) {
      core::detail::check_shape(name, fn, "shared_gate", w.shared_gate, {"S", "D"},
                                {w.shared_gate.empty() ? 0 : S, w.shared_gate.empty() ? 0 : d},
                                "one gate row per shared expert, or empty (ungated)");
    }
  }

  // Packed weights made by pack_weights of a layer with this config and micro-kernel, from w.
  template <class W>
  void check_packed(std::string_view fn, const MoELayerWeights<W>& w,
                    const MoEPackedWeights<T>& pk) const {
    const std::int64_t E = cfg_.num_experts, S = cfg_.num_shared_experts;
    const std::int64_t want[7] = {cfg_.d_model,
                                  cfg_.d_ff,
                                  cfg_.shared_d_ff,
                                  E,
                                  S,
                                  kernels::GemmTile<Arch, T>::nr,
                                  static_cast<std::int64_t>(cfg_.activation)};
    const std::int64_t got[7] = {pk.d_model,
                                 pk.d_ff,
                                 pk.shared_d_ff,
                                 pk.num_experts,
                                 pk.num_shared,
                                 pk.nr,
                                 static_cast<std::int64_t>(pk.activation)};
    if (!std::equal(want, want + 7, got) || cfg_.bf16_compute ||
        pk.w1.size() != std::size_t(E + S) || pk.w3.size() != std::size_t(E + S) ||
        pk.w2.size() != std::size_t(E + S) || pk.source.size() != std::size_t(3 * (E + S)))
      switchyard::detail::fail_shape(
          name, fn, "packed",
          switchyard::detail::format_shape(
              {"d_model", "d_ff", "shared_d_ff", "E", "S", "NR", "activation"}, got),
          switchyard::detail::format_shape(
              {"d_model", "d_ff", "shared_d_ff", "E", "S", "NR", "activation"}, want),
          "pack_weights of a layer with this config (and bf16_compute "
          "off), on this build's micro-kernel");
    check_weights(fn, w);
    const bool swiglu = cfg_.activation == Activation::swiglu;
    for (std::int64_t i = 0; i < E + S; ++i) {
      const ExpertWeights<W>& ew = i < E ? w.experts : w.shared;
      const std::int64_t e = i < E ? i : i - E;
      const void* src[3] = {ew.w1_of(e).data(), swiglu ? ew.w3_of(e).data() : nullptr,
                            ew.w2_of(e).data()};
      if (!std::equal(src, src + 3, pk.source.begin() + 3 * i))
        switchyard::detail::fail_shape(
            name, fn, "packed", "[expert " + std::to_string(i) + " packed from other weights]",
            "[packed from w]", "pack_weights(w) of the weights passed with it");
    }
  }

  // The plan's CSR structure (cheap, no allocation): what indexing relies on. Uses the plan's
  // own expert count, so combine_outputs() takes plans over any number of experts.
  void check_plan_structure(std::string_view fn, const plan_type& plan) const {
    const auto bad = [&](const std::string& what) {
      throw switchyard::error(std::string(name) + "::" + std::string(fn) + ": plan " + what);
    };
    const std::int64_t nnz = plan.nnz(), tokens = plan.num_tokens, E = plan.num_experts;
    if (tokens < 0 || E < 0) bad("num_tokens and num_experts must be >= 0");
    if (std::int64_t(plan.expert_offsets.size()) != E + 1 || plan.expert_offsets[0] != 0 ||
        plan.expert_offsets[E] != nnz)
      bad("expert_offsets must have E+1 entries from 0 to nnz");
    if (std::int64_t(plan.slot.size()) != nnz || std::int64_t(plan.gate.size()) != nnz)
      bad("token_index, slot and gate differ in length");
    for (std::int64_t e = 0; e < E; ++e) {
      const std::int64_t b = plan.expert_offsets[e], n = plan.expert_offsets[e + 1] - b;
      if (n < 0) bad("expert_offsets decrease at expert " + std::to_string(e));
      for (std::int64_t i = b; i < b + n; ++i) {
        const std::int64_t t = plan.token_index[i];
        if (t < 0 || t >= tokens)
          bad("token index " + std::to_string(t) + " out of range [0, " + std::to_string(tokens) +
              ") in expert " + std::to_string(e));
        if (i > b && plan.token_index[i - 1] >= t)
          bad("tokens of expert " + std::to_string(e) + " not strictly ascending");
      }
    }
  }

  template <class W>
  void run(const plan_type& plan, const ConstView<T, 2>& x, const MoELayerWeights<W>& w,
           const MoEPackedWeights<T>* packed, const View<T, 2>& y, const Layout& l, std::byte* base,
           std::int64_t slots_fit, const TokenMask& mask) const {
    T* out = reinterpret_cast<T*>(base + l.out);
    auto* tok_off = reinterpret_cast<std::int64_t*>(base + l.tok_off);
    auto* tok_pos = reinterpret_cast<std::int64_t*>(base + l.tok_pos);
    index_tokens(plan, tok_off, tok_pos);
    compute_outputs(plan, x, w, l, base, slots_fit, out, packed);
    combine(plan, y, out, tok_off, tok_pos, mask);
  }

  // Every expert's (and shared expert's) output rows into out [nnz + S * T, d].
  template <class W>
  void compute_outputs(const plan_type& plan, const ConstView<T, 2>& x, const MoELayerWeights<W>& w,
                       const Layout& l, std::byte* base, std::int64_t slots_fit, T* out,
                       const MoEPackedWeights<T>* packed = nullptr) const {
    Task* tasks = reinterpret_cast<Task*>(base + l.tasks);
    std::byte* slot_base = base + l.fixed;
    if (l.decode) {
      run_decode(plan, x, w, l, base, slot_base, slots_fit, out);
    } else {
      run_prefill(plan, x, w, packed, l, out, tasks, slot_base, slots_fit);
    }
    if (!w.shared_gate.empty()) gate_shared(x, w.shared_gate, plan.num_tokens, plan.nnz(), out);
  }

  // tok_off [T + 1], tok_pos [nnz]: each token's CSR positions, in combine order.
  static void index_tokens(const plan_type& plan, std::int64_t* tok_off,
                           std::int64_t* tok_pos) noexcept {
    const std::int64_t tokens = plan.num_tokens, nnz = plan.nnz();
    // Inverse map token -> its CSR positions, in slot order (ties: expert order).
    std::fill_n(tok_off, tokens + 1, 0);
    for (std::int64_t p = 0; p < nnz; ++p) ++tok_off[plan.token_index[p] + 1];
    for (std::int64_t t = 0; t < tokens; ++t) tok_off[t + 1] += tok_off[t];
    for (std::int64_t p = 0; p < nnz; ++p) tok_pos[tok_off[plan.token_index[p]]++] = p;
    for (std::int64_t t = tokens; t > 0; --t) tok_off[t] = tok_off[t - 1];
    tok_off[0] = 0;
    for (std::int64_t t = 0; t < tokens; ++t) {
      std::int64_t* b = tok_pos + tok_off[t];
      const std::int64_t n = tok_off[t + 1] - tok_off[t];
      for (std::int64_t i = 1; i < n; ++i) {  // stable insertion sort by slot (K is small)
        const std::int64_t p = b[i];
        std::int64_t j = i;
        for (; j > 0 && plan.slot[b[j - 1]] > plan.slot[p]; --j) b[j] = b[j - 1];
        b[j] = p;
      }
    }
  }

  template <class W>
  void run_prefill(const plan_type& plan, const ConstView<T, 2>& x, const MoELayerWeights<W>& w,
                   const MoEPackedWeights<T>* packed, const Layout& l, T* out, Task* tasks,
                   std::byte* slot_base, std::int64_t slots_fit) const {
    const std::int64_t tokens = plan.num_tokens, E = cfg_.num_experts;
    const std::int64_t S = cfg_.num_shared_experts;
    // The fixed task list: near-equal row tiles of at most row_tile rows.
    std::int64_t num_tasks = 0;
    const auto add_tiles = [&](std::int64_t expert, std::int64_t begin, std::int64_t n) {
      if (n <= 0) return;
      const std::int64_t tiles = num_chunks(n, row_tile), per = num_chunks(n, tiles);
      for (std::int64_t i = 0; i < tiles; ++i)
        tasks[num_tasks++] = {expert, begin + i * per, std::min(per, n - i * per)};
    };
    for (std::int64_t e = 0; e < E; ++e) add_tiles(e, plan.expert_offsets[e], plan.expert_size(e));
    for (std::int64_t s = 0; s < S; ++s) add_tiles(E + s, 0, tokens);

    const std::int64_t slots = std::max<std::int64_t>(
        1, std::min<std::int64_t>({std::int64_t(num_threads()), num_tasks, slots_fit}));
    std::atomic<std::int64_t> next{0};
    parallel_for(slots, [&](std::int64_t s) {
      std::byte* sb = slot_base + std::size_t(s) * l.slot_bytes;
      Scratch sc{reinterpret_cast<T*>(sb + l.g), reinterpret_cast<T*>(sb + l.u),
                 reinterpret_cast<T*>(sb + l.ax), reinterpret_cast<T*>(sb + l.ah),
                 reinterpret_cast<T*>(sb + l.bp)};
      for (std::int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1))
        run_task(tasks[i], plan, x, w, packed, out, sc);
    });
  }

  // Decode path (see the file comment): pack each group's rows of x, then hidden-chunk tasks,
  // then output-chunk tasks, then b2 / softmax per row.
  template <class W>
  void run_decode(const plan_type& plan, const ConstView<T, 2>& x, const MoELayerWeights<W>& w,
                  const Layout& l, std::byte* base, std::byte* slot_base, std::int64_t slots_fit,
                  T* const out) const {
    using G = kernels::GemmTile<Arch, T>;
    const std::int64_t tokens = plan.num_tokens, nnz = plan.nnz();
    const std::int64_t d = cfg_.d_model, E = cfg_.num_experts, S = cfg_.num_shared_experts;
    Group* const groups = reinterpret_cast<Group*>(base + l.groups);
    T* const ax = reinterpret_cast<T*>(base + l.dax);
    T* const hid = reinterpret_cast<T*>(base + l.dh);
    std::int64_t n_groups = 0, ax_off = 0, h_off = 0;
    const auto add_group = [&](std::int64_t expert, std::int64_t begin, std::int64_t rows) {
      if (rows <= 0) return;
      const std::int64_t f = expert < E ? cfg_.d_ff : cfg_.shared_d_ff;
      const std::int64_t m_pad = core::round_up(rows, G::mr);
      groups[n_groups++] = {expert, begin, rows, ax_off, h_off};
      ax_off += m_pad * d;
      h_off += m_pad * f;
    };
    for (std::int64_t e = 0; e < E; ++e) add_group(e, plan.expert_offsets[e], plan.expert_size(e));
    for (std::int64_t s = 0; s < S; ++s) add_group(E + s, 0, tokens);

    struct Ref {  // a group's weights, hidden width, input rows and output rows
      const ExpertWeights<W>* ew;
      std::int64_t e, F;
      const std::int32_t* rows;
      const T* xa;
      T* o;
    };
    const auto ref = [&](const Group& gr) {
      const bool shared = gr.expert >= E;
      Ref r{shared ? &w.shared : &w.experts,
            shared ? gr.expert - E : gr.expert,
            shared ? cfg_.shared_d_ff : cfg_.d_ff,
            nullptr,
            x.data(),
            nullptr};
      if (shared) {
        r.o = out + (nnz + r.e * tokens) * d;
      } else {
        r.rows = plan.token_index.data() + gr.begin;
        r.o = out + gr.begin * d;
      }
      return r;
    };

    parallel_for(n_groups, [&](std::int64_t i) {
      const Ref r = ref(groups[i]);
      kernels::pack_a_all(Arch{}, r.xa, x.stride(0), x.stride(1), r.rows, groups[i].rows, d,
                          ax + groups[i].ax);
    });

    // Fixed task lists: (group, chunk) in group order; the chunk counts depend on the shapes.
    const auto for_chunks = [&](std::int64_t chunk, bool hidden, auto&& body) {
      std::int64_t num_tasks = 0;
      for (std::int64_t i = 0; i < n_groups; ++i)
        num_tasks += num_chunks(hidden ? ref(groups[i]).F : d, chunk);
      const std::int64_t slots = std::max<std::int64_t>(
          1, std::min<std::int64_t>({std::int64_t(num_threads()), num_tasks, slots_fit}));
      std::atomic<std::int64_t> next{0};
      parallel_for(slots, [&](std::int64_t slot) {
        std::byte* sb = slot_base + std::size_t(slot) * l.slot_bytes;
        // Walk the (group, chunk) list in order; tasks are claimed in that order.
        std::int64_t gi = 0, before = 0;
        for (std::int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) {
          for (;;) {
            const std::int64_t n = num_chunks(hidden ? ref(groups[gi]).F : d, chunk);
            if (t < before + n) break;
            before += n;
            ++gi;
          }
          body(groups[gi], (t - before) * chunk, sb);
        }
      });
    };

    // Hidden chunk [f0, f0 + fc) of every row: act(x w1^T (+ b1)) (* (x w3^T + b3)), packed into
    // the group's hidden rows in the GEMM's k blocks.
    for_chunks(decode_ff_chunk, true, [&](const Group& gr, std::int64_t f0, std::byte* sb) {
      const Ref r = ref(gr);
      const std::int64_t fc = std::min(decode_ff_chunk, r.F - f0), R = gr.rows;
      T* const g = reinterpret_cast<T*>(sb + l.g);
      T* const u = reinterpret_cast<T*>(sb + l.u);
      T* const bb = reinterpret_cast<T*>(sb + l.bp);
      const Activation act = cfg_.activation;
      const auto w1 = r.ew->w1_of(r.e);
      kernels::gemm_packed_streamed(Arch{}, R, fc, d, ax + gr.ax, w1.data() + f0 * w1.stride(0),
                                    w1.stride(0), w1.stride(1), T(0), g, fc, bb);
      if (act == Activation::swiglu) {
        const auto w3 = r.ew->w3_of(r.e);
        kernels::gemm_packed_streamed(Arch{}, R, fc, d, ax + gr.ax, w3.data() + f0 * w3.stride(0),
                                      w3.stride(0), w3.stride(1), T(0), u, fc, bb);
      }
      const T* b1 = bias_row(r.ew->b1, r.e, f0);
      const T* b3 = bias_row(r.ew->b3, r.e, f0);
      for (std::int64_t row = 0; row < R; ++row)
        kernels::expert_activation(Arch{}, act, g + row * fc,
                                   act == Activation::swiglu ? u + row * fc : nullptr, b1, b3, fc);
      const std::int64_t m_pad = core::round_up(R, G::mr);
      kernels::pack_a_all(Arch{}, g, fc, std::int64_t(1), nullptr, R, fc, hid + gr.h + f0 * m_pad);
    });

    // Output columns [j0, j0 + dc) of every row: hidden w2[j0 : j0 + dc]^T over all F.
    for_chunks(decode_d_chunk, false, [&](const Group& gr, std::int64_t j0, std::byte* sb) {
      const Ref r = ref(gr);
      const std::int64_t dc = std::min(decode_d_chunk, d - j0);
      const auto w2 = r.ew->w2_of(r.e);
      kernels::gemm_packed_streamed(Arch{}, gr.rows, dc, r.F, hid + gr.h,
                                    w2.data() + j0 * w2.stride(0), w2.stride(0), w2.stride(1), T(0),
                                    r.o + j0, d, reinterpret_cast<T*>(sb + l.bp));
    });

    parallel_for(n_groups, [&](std::int64_t i) {
      const Ref r = ref(groups[i]);
      const T* b2 = bias_row(r.ew->b2, r.e, 0);
      if (!b2 && !cfg_.output_softmax) return;
      for (std::int64_t row = 0; row < groups[i].rows; ++row) {
        T* orow = r.o + row * d;
        if (b2) kernels::axpy(Arch{}, T(1), b2, orow, d);
        if (cfg_.output_softmax) kernels::softmax_row(Arch{}, orow, orow, d);
      }
    });
  }

  // Row e of a bias (from column `col`), or null when there is none. 16-bit experts have no
  // biases (check_expert_weights rejects them).
  template <class W>
  static const T* bias_row(const ConstView<W, 2>& b, std::int64_t e, std::int64_t col) noexcept {
    if constexpr (std::is_same_v<W, T>) {
      return b.empty() ? nullptr : b.data() + e * b.stride(0) + col;
    } else {
      return nullptr;
    }
  }

  // Qwen2-MoE's gated shared experts: shared row (s, t) *= sigmoid(x[t] . gate[s]), before
  // combine (which may overwrite x when y is x).
  template <class W>
  void gate_shared(const ConstView<T, 2>& x, const ConstView<W, 2>& gate, std::int64_t tokens,
                   std::int64_t nnz, T* out) const {
    const std::int64_t d = cfg_.d_model, S = cfg_.num_shared_experts;
    parallel_for(num_chunks(tokens, 64), [&](std::int64_t c) {
      for (std::int64_t t = c * 64; t < std::min(tokens, (c + 1) * 64); ++t) {
        const T* xr = x.data() + t * x.stride(0);
        for (std::int64_t s = 0; s < S; ++s) {
          const W* gr = gate.data() + s * gate.stride(0);
          T dot = T(0);  // explicit fma: the same rounding for every stored type W
          for (std::int64_t j = 0; j < d; ++j)
            dot = std::fma(xr[j * x.stride(1)], T(to_float(gr[j * gate.stride(1)])), dot);
          const T g = T(1) / (T(1) + std::exp(-dot));
          T* row = out + (nnz + s * tokens + t) * d;
          for (std::int64_t j = 0; j < d; ++j) row[j] *= g;
        }
      }
    });
  }

  // y[t] = sum over shared experts, then the token's slots, of gate * expert output row.
  void combine(const plan_type& plan, const View<T, 2>& y, const T* out,
               const std::int64_t* tok_off, const std::int64_t* tok_pos,
               const TokenMask& mask) const {
    const std::int64_t tokens = plan.num_tokens, nnz = plan.nnz();
    const std::int64_t d = cfg_.d_model, S = cfg_.num_shared_experts;
    // Combine, per chunk of tokens, in the fixed order: shared experts, then slots.
    constexpr std::int64_t chunk = 64;
    parallel_for(num_chunks(tokens, chunk), [&](std::int64_t c) {
      const std::int64_t t1 = std::min(tokens, (c + 1) * chunk);
      for (std::int64_t t = c * chunk; t < t1; ++t) {
        T* yr = y.data() + t * y.stride(0);
        const std::int64_t ys = y.stride(1);
        if (ys == 1) {
          std::fill_n(yr, d, T(0));
        } else {
          for (std::int64_t j = 0; j < d; ++j) yr[j * ys] = T(0);
        }
        if (!mask.routed(t)) continue;
        const auto add = [&](T gate, const T* src) {
          if (ys == 1) {
            kernels::axpy(Arch{}, gate, src, yr, d);
          } else {
            for (std::int64_t j = 0; j < d; ++j) yr[j * ys] += gate * src[j];
          }
        };
        for (std::int64_t s = 0; s < S; ++s) add(T(1), out + (nnz + s * tokens + t) * d);
        for (std::int64_t i = tok_off[t]; i < tok_off[t + 1]; ++i) {
          const std::int64_t p = tok_pos[i];
          add(plan.gate[p], out + p * d);
        }
      }
    });
  }

  // One tile through one expert: O_tile = FFN(X_tile) (+ b2, softmax) into `out`.
  template <class W>
  void run_task(const Task& tk, const plan_type& plan, const ConstView<T, 2>& x,
                const MoELayerWeights<W>& w, const MoEPackedWeights<T>* packed, T* out,
                const Scratch& sc) const noexcept {
    using G = kernels::GemmTile<Arch, T>;
    const std::int64_t d = cfg_.d_model, E = cfg_.num_experts, tokens = plan.num_tokens;
    const bool shared = tk.expert >= E;
    const std::int64_t e = shared ? tk.expert - E : tk.expert;
    const ExpertWeights<W>& ew = shared ? w.shared : w.experts;
    const std::int64_t F = shared ? cfg_.shared_d_ff : cfg_.d_ff;
    const std::int64_t R = tk.rows;
    const T* xa = x.data();
    const std::int32_t* rows = nullptr;
    T* o = nullptr;
    if (shared) {
      xa += tk.begin * x.stride(0);
      o = out + (plan.nnz() + e * tokens + tk.begin) * d;
    } else {
      rows = plan.token_index.data() + tk.begin;
      o = out + tk.begin * d;
    }
    const Activation act = cfg_.activation;
    const auto w1 = ew.w1_of(e);
    const auto w2 = ew.w2_of(e);
    const auto w3 = act == Activation::swiglu ? ew.w3_of(e) : ConstView<W, 2>{};
    const T* b1 = bias_row(ew.b1, e, 0);
    const T* b3 = bias_row(ew.b3, e, 0);
    T* const g = sc.g;
    T* const u = sc.u;
    if constexpr (std::is_same_v<W, bf16> && std::is_same_v<T, float>) {
      if (cfg_.bf16_compute) {
        run_ffn_bf16(xa, x.stride(0), x.stride(1), rows, R, F, w1, w3, w2, b1, b3, g, u, o);
        finish_rows(ew, e, R, o);
        return;
      }
    }
    // The tile's gathered rows of x, packed once for every hidden chunk and both projections.
    kernels::pack_a_all(Arch{}, xa, x.stride(0), x.stride(1), rows, R, d, sc.ax);
    // Few rows: each kc x NR block of weights is packed just before use while the next one's
    // weights are fetched (gemm_packed_streamed); a whole chunk's pack would read them in a
    // pass of its own, waiting on memory. Many rows: the chunk is packed once for them all.
    // Packed weights (pack_weights): this expert's panels, used in place.
    const T* pw1 = packed ? packed->panels.data() + packed->w1[std::size_t(tk.expert)] : nullptr;
    const T* pw3 = packed ? packed->panels.data() + packed->w3[std::size_t(tk.expert)] : nullptr;
    const T* pw2 = packed ? packed->panels.data() + packed->w2[std::size_t(tk.expert)] : nullptr;
    const bool streamed = !packed && R <= streamed_rows;
    for (std::int64_t f0 = 0; f0 < F; f0 += ff_chunk) {
      const std::int64_t fc = std::min(ff_chunk, F - f0);
      // op(B)(p, j) = w1[e][f0 + j][p], p < d, j < fc
      if (packed) {
        kernels::gemm_packed_panels(Arch{}, R, fc, d, sc.ax, pw1 + f0 * d, T(0), g, fc);
        if (act == Activation::swiglu)
          kernels::gemm_packed_panels(Arch{}, R, fc, d, sc.ax, pw3 + f0 * d, T(0), u, fc);
      } else if (streamed) {
        kernels::gemm_packed_streamed(Arch{}, R, fc, d, sc.ax, w1.data() + f0 * w1.stride(0),
                                      w1.stride(0), w1.stride(1), T(0), g, fc, sc.bp);
        if (act == Activation::swiglu)
          kernels::gemm_packed_streamed(Arch{}, R, fc, d, sc.ax, w3.data() + f0 * w3.stride(0),
                                        w3.stride(0), w3.stride(1), T(0), u, fc, sc.bp);
      } else {
        kernels::pack_b_rows<Arch, G::nr>(Arch{}, w1.data() + f0 * w1.stride(0), w1.stride(0),
                                          w1.stride(1), fc, d, sc.bp);
        kernels::gemm_packed(Arch{}, R, fc, d, sc.ax, sc.bp, T(0), g, fc);
        if (act == Activation::swiglu) {
          kernels::pack_b_rows<Arch, G::nr>(Arch{}, w3.data() + f0 * w3.stride(0), w3.stride(0),
                                            w3.stride(1), fc, d, sc.bp);
          kernels::gemm_packed(Arch{}, R, fc, d, sc.ax, sc.bp, T(0), u, fc);
        }
      }
      for (std::int64_t r = 0; r < R; ++r) {
        kernels::expert_activation(Arch{}, act, g + r * fc,
                                   act == Activation::swiglu ? u + r * fc : nullptr,
                                   b1 ? b1 + f0 : nullptr, b3 ? b3 + f0 : nullptr, fc);
      }
      // op(B)(p, j) = w2[e][j][f0 + p], p < fc, j < d; chunks after the first accumulate.
      kernels::pack_a_all(Arch{}, g, fc, std::int64_t(1), nullptr, R, fc, sc.ah);
      if (packed) {
        kernels::gemm_packed_panels(Arch{}, R, d, fc, sc.ah, pw2 + core::round_up(d, G::nr) * f0,
                                    f0 == 0 ? T(0) : T(1), o, d);
      } else if (streamed) {
        kernels::gemm_packed_streamed(Arch{}, R, d, fc, sc.ah, w2.data() + f0 * w2.stride(1),
                                      w2.stride(0), w2.stride(1), f0 == 0 ? T(0) : T(1), o, d,
                                      sc.bp);
      } else {
        kernels::pack_b_rows<Arch, G::nr>(Arch{}, w2.data() + f0 * w2.stride(1), w2.stride(0),
                                          w2.stride(1), d, fc, sc.bp);
        kernels::gemm_packed(Arch{}, R, d, fc, sc.ah, sc.bp, f0 == 0 ? T(0) : T(1), o, d);
      }
    }
    finish_rows(ew, e, R, o);
  }

  // + b2 and the optional softmax over each of the R output rows at o.
  template <class W>
  void finish_rows(const ExpertWeights<W>& ew, std::int64_t e, std::int64_t R, T* o) const {
    const std::int64_t d = cfg_.d_model;
    const T* b2 = bias_row(ew.b2, e, 0);
    if (b2 || cfg_.output_softmax) {
      for (std::int64_t r = 0; r < R; ++r) {
        T* orow = o + r * d;
        if (b2) kernels::axpy(Arch{}, T(1), b2, orow, d);
        if (cfg_.output_softmax) kernels::softmax_row(Arch{}, orow, orow, d);
      }
    }
  }

  // The expert FFN of one tile on bf16 operands (bf16_compute): the same chunks as the float
  // path, through core::gemm_bf16_packed. x rows (gathered by `rows` when non-null) and each
  // hidden chunk are rounded to bf16 while packed; g and u hold float sums. The packs live in
  // per-thread buffers (allocated on a thread's first tile).
  void run_ffn_bf16(const float* xa, std::int64_t rsx, std::int64_t csx, const std::int32_t* rows,
                    std::int64_t R, std::int64_t F, const ConstView<bf16, 2>& w1,
                    const ConstView<bf16, 2>& w3, const ConstView<bf16, 2>& w2, const float* b1,
                    const float* b3, float* g, float* u, float* o) const {
    const std::int64_t d = cfg_.d_model;
    const Activation act = cfg_.activation;
    const core::Bf16Path path = core::bf16_best_path();
    using Buffer = std::vector<bf16, xsimd::aligned_allocator<bf16, 64>>;
    thread_local Buffer xp, hp, wp;
    xp.resize(std::size_t(core::bf16_packed_a_size(R, d)));
    hp.resize(std::size_t(core::bf16_packed_a_size(R, ff_chunk)));
    wp.resize(std::size_t(
        std::max(core::bf16_packed_b_size(d, ff_chunk), core::bf16_packed_b_size(ff_chunk, d))));
    const std::int64_t steps_d = num_chunks(d, kernels::bf16_step);
    kernels::pack_bf16_a(xa, rsx, csx, rows, R, d, steps_d, xp.data());
    for (std::int64_t f0 = 0; f0 < F; f0 += ff_chunk) {
      const std::int64_t fc = std::min(ff_chunk, F - f0);
      // op(B)(p, j) = w1[f0 + j][p], p < d, j < fc
      kernels::pack_bf16_b(w1.data() + f0 * w1.stride(0), w1.stride(1), w1.stride(0), d, fc,
                           steps_d, wp.data());
      core::gemm_bf16_packed(path, R, fc, d, xp.data(), wp.data(), g, fc, 1, 0.0f);
      if (act == Activation::swiglu) {
        kernels::pack_bf16_b(w3.data() + f0 * w3.stride(0), w3.stride(1), w3.stride(0), d, fc,
                             steps_d, wp.data());
        core::gemm_bf16_packed(path, R, fc, d, xp.data(), wp.data(), u, fc, 1, 0.0f);
      }
      for (std::int64_t r = 0; r < R; ++r) {
        kernels::expert_activation(Arch{}, act, g + r * fc,
                                   act == Activation::swiglu ? u + r * fc : nullptr,
                                   b1 ? b1 + f0 : nullptr, b3 ? b3 + f0 : nullptr, fc);
      }
      // op(B)(p, j) = w2[j][f0 + p], p < fc, j < d; chunks after the first accumulate.
      const std::int64_t steps_f = num_chunks(fc, kernels::bf16_step);
      kernels::pack_bf16_a(g, fc, std::int64_t(1), nullptr, R, fc, steps_f, hp.data());
      kernels::pack_bf16_b(w2.data() + f0 * w2.stride(1), w2.stride(1), w2.stride(0), fc, d,
                           steps_f, wp.data());
      core::gemm_bf16_packed(path, R, d, fc, hp.data(), wp.data(), o, d, 1, f0 == 0 ? 0.0f : 1.0f);
    }
  }

  config_type cfg_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
