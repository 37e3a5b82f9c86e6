#pragma once
// The fused executor of an AttentionPlan (plan.hpp): one kernel for every
// sparse attention layer (Routing Transformer clusters, BiFormer regions, ...).
//
// Per (group, head) work item:
//   1. gather the group's keys into a workspace, transposed and key-group-major
//      (as DenseAttention packs K), and its values row-major with D padded to
//      whole registers: a workspace sized for ONE group, reused per thread;
//   2. per tile of MR queries (Q gathered and pre-multiplied by scale * log2 e):
//      for each block of KB keys, scores from dense.hpp's register micro-kernel
//      (score_tile), the plan's pair rule (causal / self value), a base-2 online
//      softmax, and P.V accumulated by dense.hpp's value_tile;
//   3. write (PlanOutput::write) or add (PlanOutput::accumulate, with counts).
// Options (PlanExtras): memory key/value tables [R, M, D] (group g sees row
// plan.group_memory[g] before its gathered keys, never masked), and query / key
// keep masks [B, T] / [B, S] (0 = masked: a masked query sees no gathered key, a
// masked key is seen by no query; the self value still applies afterwards).
// Parallelism uses fixed partitions, so results are bit-identical for any thread
// count:
//   write       one task per (group, head, block of ~256 queries); each task
//               gathers its group's K/V (for a group of all T queries and all S
//               keys this costs T/256 gathers of K/V, small against the T*S*D work);
//   accumulate  one task per (batch, head), its groups in plan order, so the sums
//               are always formed in the same order.
// Empty groups and rows that see no key give zeros; queries in no group give 0.
// Cost: sum over groups of |queries| * |keys| * D * 4 flops, plus gathers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/attention/dense.hpp"
#include "switchyard/attention/plan.hpp"

namespace switchyard {
inline namespace v0 {
namespace kernels {

/// Raw operands of a plan execution (checked by PlanExecutor). Strides in elements;
/// q/out [B, T, H, D], k/v [B, S, Hkv, D], counts [B, H, T] (accumulate mode) or null.
template <class T>
struct PlanAttentionArgs {
  const T* q;
  std::int64_t q_stride[4];
  const T* k;
  std::int64_t k_stride[4];
  const T* v;
  std::int64_t v_stride[4];
  T* out;
  std::int64_t out_stride[4];
  T* counts = nullptr;
  std::int64_t counts_stride[3] = {0, 0, 0};
  const T* mem_k = nullptr;  // [R, M, D] memory tables (plan.memory_keys = M), or null
  std::int64_t mem_k_stride[3] = {0, 0, 0};
  const T* mem_v = nullptr;
  std::int64_t mem_v_stride[3] = {0, 0, 0};
  std::int64_t M = 0;
  const std::uint8_t* q_keep = nullptr;  // [B, T] contiguous, 0 = masked; or null
  const std::uint8_t* k_keep = nullptr;  // [B, S] contiguous, 0 = masked; or null
  std::int64_t B, T_q, S, H, Hkv, D;
  T scale;
};

namespace detail {

template <class T>
struct PlanWorkspace {
  aligned_vector<T> kt, vp, qp, s, o, m, l, alpha, row;
};

template <class T, class Arch>
PlanWorkspace<T>& plan_workspace() {
  static thread_local PlanWorkspace<T> ws;
  return ws;
}

// Gathers the nm memory rows of table row mem_row (nm = 0: none), then keys
// `keys[0 .. nk)` of (b, kv head hk), into ws.kt (group-major, zero padded to G)
// and ws.vp ([nm + nk, Dp]).
template <class Arch, class T>
void plan_gather(const PlanAttentionArgs<T>& a, std::int64_t b, std::int64_t hk,
                 const std::int64_t* keys, std::int64_t nk, std::int64_t mem_row, std::int64_t nm,
                 PlanWorkspace<T>& ws) {
  using Tl = DenseTiling<T, Arch>;
  constexpr std::int64_t G = Tl::G;
  const std::int64_t n = nm + nk;
  const std::int64_t D = a.D, Dp = round_up(D, Tl::L), n_pad = round_up(n, G);
  ws.kt.resize(std::size_t(std::max<std::int64_t>(1, n_pad * D)));
  ws.vp.resize(std::size_t(std::max<std::int64_t>(1, n * Dp)));
  const T* k_bh = a.k + b * a.k_stride[0] + hk * a.k_stride[2];
  const T* v_bh = a.v + b * a.v_stride[0] + hk * a.v_stride[2];
  // Row j of the gathered keys / values (memory rows first) and its element stride.
  struct Row {
    const T* p;
    std::int64_t stride;
  };
  const auto key_row = [&](std::int64_t j) -> Row {
    if (j < nm)
      return {a.mem_k + mem_row * a.mem_k_stride[0] + j * a.mem_k_stride[1], a.mem_k_stride[2]};
    return {k_bh + keys[j - nm] * a.k_stride[1], a.k_stride[3]};
  };
  const auto value_row = [&](std::int64_t j) -> Row {
    if (j < nm)
      return {a.mem_v + mem_row * a.mem_v_stride[0] + j * a.mem_v_stride[1], a.mem_v_stride[2]};
    return {v_bh + keys[j - nm] * a.v_stride[1], a.v_stride[3]};
  };
  for (std::int64_t g = 0; g < n_pad; g += G) {
    T* dst = ws.kt.data() + g * D;
    const std::int64_t valid = std::min(G, n - g);
    for (std::int64_t jj = 0; jj < valid; ++jj) {
      const Row src = key_row(g + jj);
      for (std::int64_t d = 0; d < D; ++d) dst[d * G + jj] = src.p[d * src.stride];
    }
    for (std::int64_t jj = valid; jj < G; ++jj)
      for (std::int64_t d = 0; d < D; ++d) dst[d * G + jj] = T(0);
  }
  for (std::int64_t j = 0; j < n; ++j) {
    const Row src = value_row(j);
    T* dst = ws.vp.data() + j * Dp;
    for (std::int64_t d = 0; d < D; ++d) dst[d] = src.p[d * src.stride];
    for (std::int64_t d = D; d < Dp; ++d) dst[d] = T(0);
  }
}

// Attention of queries qs[0 .. nq) of (b, h) over the keys already gathered in ws
// (nm memory keys, then positions keys[0 .. nk)); writes or adds each row into out.
// Masked pairs get mask_logit (-inf, or the lowest finite value).
template <class Arch, class T, bool Causal, bool Self, bool Accum>
void plan_queries(const PlanAttentionArgs<T>& a, std::int64_t b, std::int64_t h,
                  const std::int64_t* qs, std::int64_t nq, const std::int64_t* keys,
                  std::int64_t nk, std::int64_t nm, T self_logit, T mask_logit,
                  PlanWorkspace<T>& ws) {
  using Tl = DenseTiling<T, Arch>;
  constexpr int MR = Tl::MR, NV = Tl::NV;
  constexpr std::int64_t L = Tl::L, G = Tl::G, KB = Tl::KB;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  constexpr T log2e = T(1.44269504088896340736);
  const std::int64_t D = a.D, Dp = round_up(D, L);
  T* const out_bh = a.out + b * a.out_stride[0] + h * a.out_stride[2];
  T* const counts_bh =
      a.counts ? a.counts + b * a.counts_stride[0] + h * a.counts_stride[1] : nullptr;
  ws.qp.resize(std::size_t(std::max<std::int64_t>(1, MR * D)));
  ws.s.resize(std::size_t(MR * KB));
  ws.o.resize(std::size_t(std::max<std::int64_t>(1, MR * Dp)));
  ws.row.resize(std::size_t(std::max<std::int64_t>(1, Dp)));
  ws.m.resize(MR);
  ws.l.resize(MR);
  ws.alpha.resize(MR);
  const T qscale = a.scale * log2e;
  const T self2 = self_logit * log2e;
  const std::uint8_t* const qkeep = a.q_keep ? a.q_keep + b * a.T_q : nullptr;
  const std::uint8_t* const kkeep = a.k_keep ? a.k_keep + b * a.S : nullptr;
  const bool rules = Causal || Self || qkeep || kkeep;
  const std::int64_t n_all = nm + nk;

  const auto tile = [&]<int M>(const std::int64_t* qi, std::int64_t rows) {
    for (int r = 0; r < M; ++r) {
      T* qd = ws.qp.data() + r * D;
      if (r < rows) {
        const T* src = a.q + b * a.q_stride[0] + qi[r] * a.q_stride[1] + h * a.q_stride[2];
        for (std::int64_t d = 0; d < D; ++d) qd[d] = src[d * a.q_stride[3]] * qscale;
      } else {
        std::fill_n(qd, D, T(0));
      }
      ws.m[r] = neg_inf;
      ws.l[r] = T(0);
    }
    std::fill(ws.o.begin(), ws.o.begin() + M * Dp, T(0));
    for (std::int64_t j0 = 0; j0 < n_all; j0 += KB) {
      const std::int64_t n = std::min(KB, n_all - j0);
      const std::int64_t n_pad = round_up(n, G);
      for (std::int64_t g = 0; g < n_pad; g += G) {
        score_tile<Arch, T, M, NV>(ws.qp.data(), D, ws.kt.data() + (j0 + g) * D, ws.s.data() + g,
                                   KB);
      }
      for (int r = 0; r < M; ++r) {
        T* srow = ws.s.data() + r * KB;
        std::fill(srow + n, srow + n_pad, neg_inf);
        if (rules && r < rows) {
          const std::int64_t i = qi[r];
          const bool q_masked = qkeep && !qkeep[i];
          // gathered key jj >= nm is position keys[jj - nm]; memory keys are never masked
          for (std::int64_t j = std::max<std::int64_t>(0, nm - j0); j < n; ++j) {
            const std::int64_t kpos = keys[j0 + j - nm];
            bool masked = q_masked || (kkeep && !kkeep[kpos]);
            if constexpr (Causal) masked = masked || kpos > i;
            if (masked) srow[j] = mask_logit;
            if constexpr (Self) {
              if (kpos == i) srow[j] = self2;
            }
          }
        }
      }
      for (int r = 0; r < M; ++r) {
        ws.alpha[r] = online_softmax_update(Arch{}, ws.s.data() + r * KB, n_pad, ws.m[r], ws.l[r]);
      }
      const T* vp = ws.vp.data() + j0 * Dp;
      std::int64_t c = 0;
      for (; c + NV * L <= Dp; c += NV * L) {
        value_tile<Arch, T, M, NV>(ws.s.data(), KB, ws.alpha.data(), n, vp + c, Dp, ws.o.data() + c,
                                   Dp);
      }
      for (; c < Dp; c += L) {
        value_tile<Arch, T, M, 1>(ws.s.data(), KB, ws.alpha.data(), n, vp + c, Dp, ws.o.data() + c,
                                  Dp);
      }
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      T* dst = out_bh + qi[r] * a.out_stride[1];
      if constexpr (Accum) {
        online_softmax_finish(Arch{}, ws.o.data() + r * Dp, D, ws.l[r], ws.row.data());
        for (std::int64_t d = 0; d < D; ++d) dst[d * a.out_stride[3]] += ws.row[d];
        if (counts_bh) counts_bh[qi[r] * a.counts_stride[2]] += T(1);
      } else {
        online_softmax_finish(Arch{}, ws.o.data() + r * Dp, D, ws.l[r], dst, a.out_stride[3]);
      }
    }
  };
  std::int64_t i = 0;
  for (; i + MR <= nq; i += MR) tile.template operator()<MR>(qs + i, MR);
  const std::int64_t rest = nq - i;
  if (2 * rest >= MR) {
    tile.template operator()<MR>(qs + i, rest);
  } else {
    for (std::int64_t r = 0; r < rest; ++r) tile.template operator()<1>(qs + i + r, 1);
  }
}

template <class T>
void zero_rows(const PlanAttentionArgs<T>& a, std::int64_t b, std::int64_t h) noexcept {
  T* out_bh = a.out + b * a.out_stride[0] + h * a.out_stride[2];
  for (std::int64_t i = 0; i < a.T_q; ++i)
    for (std::int64_t d = 0; d < a.D; ++d) out_bh[i * a.out_stride[1] + d * a.out_stride[3]] = T(0);
  if (a.counts) {
    T* c = a.counts + b * a.counts_stride[0] + h * a.counts_stride[1];
    for (std::int64_t i = 0; i < a.T_q; ++i) c[i * a.counts_stride[2]] = T(0);
  }
}

}  // namespace detail

/// Runs a checked plan on Arch (see the file comment). Output rows of queries in no
/// group are set to 0 (and their counts to 0 in accumulate mode).
template <class Arch, class T>
void plan_attention(Arch, const attention::AttentionPlan& p, const PlanAttentionArgs<T>& a) {
  using attention::AttentionPlan;
  if (a.B == 0 || a.H == 0 || a.T_q == 0) return;
  const bool accum = p.output == attention::PlanOutput::accumulate;
  const bool self = p.rule.self_value.has_value();
  const T self_logit = self ? static_cast<T>(*p.rule.self_value) : T(0);
  const T mask_logit =
      p.rule.finite_mask ? std::numeric_limits<T>::lowest() : -std::numeric_limits<T>::infinity();
  const std::int64_t M = a.mem_k ? a.M : 0;
  const std::int64_t group_size = a.H / a.Hkv;

  const auto run = [&](auto causal_c, auto self_c, auto accum_c) {
    constexpr bool Causal = decltype(causal_c)::value, Self = decltype(self_c)::value,
                   Accum = decltype(accum_c)::value;
    if constexpr (Accum) {
      // Groups of each (b, h), in plan order.
      const std::int64_t BH = a.B * a.H;
      std::vector<std::int64_t> off(std::size_t(BH + 1), 0), list;
      for (std::int64_t g = 0; g < p.num_groups(); ++g) {
        const std::int64_t b = p.group_batch[g];
        if (p.group_head[g] == AttentionPlan::all_heads) {
          for (std::int64_t h = 0; h < a.H; ++h) ++off[std::size_t(b * a.H + h + 1)];
        } else {
          ++off[std::size_t(b * a.H + p.group_head[g] + 1)];
        }
      }
      for (std::int64_t i = 0; i < BH; ++i) off[std::size_t(i + 1)] += off[std::size_t(i)];
      list.resize(std::size_t(off[std::size_t(BH)]));
      std::vector<std::int64_t> fill(off.begin(), off.end() - 1);
      for (std::int64_t g = 0; g < p.num_groups(); ++g) {
        const std::int64_t b = p.group_batch[g];
        const std::int64_t h0 = p.group_head[g] == AttentionPlan::all_heads ? 0 : p.group_head[g];
        const std::int64_t h1 =
            p.group_head[g] == AttentionPlan::all_heads ? a.H : p.group_head[g] + 1;
        for (std::int64_t h = h0; h < h1; ++h)
          list[std::size_t(fill[std::size_t(b * a.H + h)]++)] = g;
      }
      parallel_for(BH, [&](std::int64_t task) {
        const std::int64_t b = task / a.H, h = task % a.H;
        detail::zero_rows(a, b, h);
        auto& ws = detail::plan_workspace<T, Arch>();
        for (std::int64_t e = off[std::size_t(task)]; e < off[std::size_t(task + 1)]; ++e) {
          const std::int64_t g = list[std::size_t(e)];
          const auto qs = p.queries(g);
          const auto ks = p.keys(g);
          if (qs.empty()) continue;
          const std::int64_t row = p.memory_row(g), nm = row >= 0 ? M : 0;
          detail::plan_gather<Arch>(a, b, h / group_size, ks.data(), std::int64_t(ks.size()), row,
                                    nm, ws);
          detail::plan_queries<Arch, T, Causal, Self, true>(
              a, b, h, qs.data(), std::int64_t(qs.size()), ks.data(), std::int64_t(ks.size()), nm,
              self_logit, mask_logit, ws);
        }
      });
    } else {
      parallel_for(a.B * a.H,
                   [&](std::int64_t task) { detail::zero_rows(a, task / a.H, task % a.H); });
      // (group, head, query block) work items.
      const std::int64_t block = detail::DenseTiling<T, Arch>::rows_per_task;
      struct Item {
        std::int64_t g, h, i0, i1;
      };
      std::vector<Item> items;
      for (std::int64_t g = 0; g < p.num_groups(); ++g) {
        const std::int64_t nq = std::int64_t(p.queries(g).size());
        const std::int64_t h0 = p.group_head[g] == AttentionPlan::all_heads ? 0 : p.group_head[g];
        const std::int64_t h1 =
            p.group_head[g] == AttentionPlan::all_heads ? a.H : p.group_head[g] + 1;
        for (std::int64_t h = h0; h < h1; ++h)
          for (std::int64_t i0 = 0; i0 < nq; i0 += block)
            items.push_back({g, h, i0, std::min(nq, i0 + block)});
      }
      parallel_for(std::int64_t(items.size()), [&](std::int64_t task) {
        const Item it = items[std::size_t(task)];
        const std::int64_t b = p.group_batch[it.g];
        const auto qs = p.queries(it.g);
        const auto ks = p.keys(it.g);
        auto& ws = detail::plan_workspace<T, Arch>();
        const std::int64_t row = p.memory_row(it.g), nm = row >= 0 ? M : 0;
        detail::plan_gather<Arch>(a, b, it.h / group_size, ks.data(), std::int64_t(ks.size()), row,
                                  nm, ws);
        detail::plan_queries<Arch, T, Causal, Self, false>(
            a, b, it.h, qs.data() + it.i0, it.i1 - it.i0, ks.data(), std::int64_t(ks.size()), nm,
            self_logit, mask_logit, ws);
      });
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  const auto with_accum = [&](auto c, auto s) { accum ? run(c, s, yes{}) : run(c, s, no{}); };
  const auto with_self = [&](auto c) { self ? with_accum(c, yes{}) : with_accum(c, no{}); };
  p.rule.causal ? with_self(yes{}) : with_self(no{});
}

}  // namespace kernels

namespace attention {

/// Configuration of PlanExecutor. scale multiplies q . k; default 1/sqrt(D).
struct PlanExecutorConfig {
  std::optional<double> scale;
};

/// Optional operands of PlanExecutor::execute (see the file comment). Views are
/// not owned; empty members are absent.
template <class T>
struct PlanExtras {
  ConstView<T, 3> memory_k{};  // [R, M, D], M = plan.memory_keys (required when M > 0)
  ConstView<T, 3> memory_v{};  // [R, M, D]
  std::span<const std::uint8_t> query_keep{};  // [B * T] row-major, 0 = masked query
  std::span<const std::uint8_t> key_keep{};    // [B * S] row-major, 0 = masked key
};

/// Runs any AttentionPlan with the fused gathered kernel (see the file comment).
template <class T = float, class Arch = simd::default_arch>
class PlanExecutor {
 public:
  using config_type = PlanExecutorConfig;
  static constexpr std::string_view name = "PlanExecutor";

  /// Throws config_error if scale is set and not finite and > 0.
  explicit PlanExecutor(config_type cfg = {}) : cfg_(cfg) {
    if (cfg_.scale && !(std::isfinite(*cfg_.scale) && *cfg_.scale > 0)) {
      switchyard::detail::fail_config(name, "PlanExecutor", "scale", *cfg_.scale,
                                      "a finite value > 0");
    }
  }
  const config_type& config() const noexcept { return cfg_; }

  /// q: [B, T, H, D], k and v: [B, S, H_kv, D] (H_kv divides H), out: [B, T, H, D],
  /// counts: [B, H, T] or empty (accumulate mode only: the number of groups that
  /// contain each query). Plan extents must be B, H, T, S. extras: memory tables
  /// (required iff plan.memory_keys > 0, rows covering plan.group_memory) and keep
  /// masks. Any strides; out and counts must not overlap the inputs. Throws
  /// shape_error / config_error.
  void execute(const AttentionPlan& plan, ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
               View<T, 4> out, View<T, 3> counts = {}, const PlanExtras<T>& extras = {}) const {
    const std::int64_t B = q.extent(0), Tq = q.extent(1), H = q.extent(2), D = q.extent(3);
    core::detail::check_shape<const T, 4>(name, "execute", "q", q, {"B", "T", "H", "D"},
                                          Shape<4>{-1, -1, -1, -1});
    core::detail::check_shape<const T, 4>(name, "execute", "k", k, {"B", "S", "H_kv", "D"},
                                          Shape<4>{B, -1, -1, D}, "k matches q in B and D");
    core::detail::check_shape<const T, 4>(name, "execute", "v", v, {"B", "S", "H_kv", "D"},
                                          k.shape(), "v has the shape of k");
    core::detail::check_shape<T, 4>(name, "execute", "out", out, {"B", "T", "H", "D"}, q.shape(),
                                    "out has the shape of q");
    const std::int64_t Hkv = k.extent(2), S = k.extent(1);
    if ((Hkv == 0 && H > 0) || (Hkv > 0 && H % Hkv != 0)) {
      switchyard::detail::fail_shape(
          name, "execute", "k",
          switchyard::detail::format_shape({"B", "S", "H_kv", "D"}, k.shape()),
          "[B, S, H_kv, D] with H_kv dividing H=" + std::to_string(H), "grouped-query attention");
    }
    if (plan.batch != B || plan.heads != H || plan.num_queries != Tq || plan.num_keys != S) {
      const std::int64_t got[4] = {plan.batch, plan.heads, plan.num_queries, plan.num_keys};
      const std::int64_t want[4] = {B, H, Tq, S};
      switchyard::detail::fail_shape(name, "execute", "plan",
                                     switchyard::detail::format_shape({"B", "H", "T", "S"}, got),
                                     switchyard::detail::format_shape({"B", "H", "T", "S"}, want),
                                     "plan extents match q and k");
    }
    if (counts.data() != nullptr) {
      core::detail::check_shape<T, 3>(name, "execute", "counts", counts, {"B", "H", "T"},
                                      Shape<3>{B, H, Tq}, "one count per query row");
    }
    plan.check(name, "execute");
    const std::int64_t M = plan.memory_keys;
    if (M > 0 || extras.memory_k.data() != nullptr || extras.memory_v.data() != nullptr) {
      std::int64_t rows = 0;
      for (std::int64_t g = 0; g < plan.num_groups(); ++g)
        rows = std::max(rows, plan.memory_row(g) + 1);
      core::detail::check_shape<const T, 3>(name, "execute", "memory_k", extras.memory_k,
                                            {"R", "M", "D"}, Shape<3>{-1, M, D},
                                            "M = plan.memory_keys, D of q");
      core::detail::check_shape<const T, 3>(name, "execute", "memory_v", extras.memory_v,
                                            {"R", "M", "D"}, extras.memory_k.shape(),
                                            "memory_v has the shape of memory_k");
      if (M > 0 && (extras.memory_k.data() == nullptr || extras.memory_k.extent(0) < rows)) {
        switchyard::detail::fail_shape(
            name, "execute", "memory_k",
            switchyard::detail::format_shape({"R", "M", "D"}, extras.memory_k.shape()),
            "[R >= " + std::to_string(rows) + ", M=" + std::to_string(M) +
                ", D=" + std::to_string(D) + "]",
            "one memory row per plan.group_memory entry");
      }
    }
    const auto check_keep = [&](std::string_view arg, std::span<const std::uint8_t> keep,
                                std::int64_t n, std::string_view want) {
      if (!keep.empty() && std::int64_t(keep.size()) != core::bounded_product({B, n})) {
        switchyard::detail::fail_shape(
            name, "execute", arg, "[" + std::to_string(keep.size()) + " entries]",
            std::string(want) + " = " + std::to_string(core::bounded_product({B, n})) + " entries",
            "one keep flag per token, row-major");
      }
    };
    check_keep("query_keep", extras.query_keep, Tq, "[B, T]");
    check_keep("key_keep", extras.key_keep, S, "[B, S]");
    core::detail::check_no_alias(name, "execute", "out", out, "q", q);
    core::detail::check_no_alias(name, "execute", "out", out, "k", k);
    core::detail::check_no_alias(name, "execute", "out", out, "v", v);
    if (counts.data() != nullptr) {
      core::detail::check_no_alias(name, "execute", "counts", counts, "q", q);
      core::detail::check_no_alias(name, "execute", "counts", counts, "k", k);
      core::detail::check_no_alias(name, "execute", "counts", counts, "v", v);
      core::detail::check_no_alias(name, "execute", "counts", counts, "out", out);
    }
    // Per-thread gather of a group's keys and values ([keys + M, D] each, padded), and the
    // per-(b, h) group lists of accumulate mode. Stride-0 views can claim any D.
    switchyard::detail::checked_size(
        name, "execute", "k",
        {core::pad_extent(plan.max_group_keys(), 64), core::pad_extent(D, 64)}, 2 * sizeof(T));
    switchyard::detail::checked_size(name, "execute", "memory_k",
                                     {core::pad_extent(M, 64), core::pad_extent(D, 64)},
                                     2 * sizeof(T));
    switchyard::detail::checked_size(name, "execute", "q", {B, H, core::pad_extent(Tq, 64)},
                                     sizeof(T));
    kernels::PlanAttentionArgs<T> a{};
    if (M > 0) {
      a.mem_k = extras.memory_k.data();
      a.mem_v = extras.memory_v.data();
      for (int i = 0; i < 3; ++i) {
        a.mem_k_stride[i] = extras.memory_k.stride(i);
        a.mem_v_stride[i] = extras.memory_v.stride(i);
      }
      a.M = M;
    }
    if (!extras.query_keep.empty()) a.q_keep = extras.query_keep.data();
    if (!extras.key_keep.empty()) a.k_keep = extras.key_keep.data();
    a.q = q.data();
    a.k = k.data();
    a.v = v.data();
    a.out = out.data();
    for (int i = 0; i < 4; ++i) {
      a.q_stride[i] = q.stride(i);
      a.k_stride[i] = k.stride(i);
      a.v_stride[i] = v.stride(i);
      a.out_stride[i] = out.stride(i);
    }
    if (counts.data() != nullptr) {
      a.counts = counts.data();
      for (int i = 0; i < 3; ++i) a.counts_stride[i] = counts.stride(i);
    }
    a.B = B;
    a.T_q = Tq;
    a.H = H;
    a.D = D;
    a.S = S;
    a.Hkv = Hkv;
    a.scale = static_cast<T>(cfg_.scale ? *cfg_.scale
                                        : 1.0 / std::sqrt(double(std::max<std::int64_t>(1, D))));
    kernels::plan_attention(Arch{}, plan, a);
  }

  /// As above, returning a new [B, T, H, D] tensor (counts not returned).
  core::Tensor<T> execute(const AttentionPlan& plan, ConstView<T, 4> q, ConstView<T, 4> k,
                          ConstView<T, 4> v) const {
    core::Tensor<T> out(q.shape());
    execute(plan, q, k, v, out.template view<4>());
    return out;
  }

 private:
  config_type cfg_;
};

/// A plan in which every query of every batch element sees every key (dense attention).
inline AttentionPlan full_plan(std::int64_t B, std::int64_t H, std::int64_t T, std::int64_t S,
                               bool causal = false) {
  // One group per batch element holding all T queries and S keys: B * (T + S) indices.
  if (B < 0 || H < 0 || T < 0 || S < 0 ||
      core::bounded_product({B, core::pad_extent(T, S)}, 2 * sizeof(std::int64_t)) < 0) {
    const std::int64_t got[4] = {B, H, T, S};
    switchyard::detail::fail_config("attention", "full_plan", "extents",
                                    switchyard::detail::format_shape({"B", "H", "T", "S"}, got),
                                    "non-negative extents whose index arrays fit in memory");
  }
  AttentionPlan p(B, H, T, S);
  p.rule.causal = causal;
  std::vector<std::int64_t> qs(static_cast<std::size_t>(T)), ks(static_cast<std::size_t>(S));
  for (std::int64_t i = 0; i < T; ++i) qs[std::size_t(i)] = i;
  for (std::int64_t j = 0; j < S; ++j) ks[std::size_t(j)] = j;
  for (std::int64_t b = 0; b < B; ++b) p.add_group(b, AttentionPlan::all_heads, qs, ks);
  return p;
}

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
