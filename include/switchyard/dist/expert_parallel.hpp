#pragma once
// ExpertParallelMoE: one MoE layer whose routed experts are spread over the P ranks of an MPI
// communicator (OpenMPI), giving on every rank the bits the single-process MoELayer gives.
//
// Needs MPI: link switchyard::mpi (CMake: find_package(switchyard COMPONENTS mpi)); the rest of
// switchyard never includes <mpi.h>.
//
// Experts: rank r holds the contiguous range [expert_begin(r), expert_end(r)) of the E routed
// experts; when P does not divide E the first E % P ranks hold one expert more
// (ExpertPartition). Shared experts and the router are replicated on every rank.
//
// forward(plan, x, local_weights, y) on every rank, with the rank's own tokens x [T_r, d] and
// its own plan over all E experts (any router, run locally: capacity and expert choice act on
// the rank's batch, as in DeepSpeed-MoE and Tutel):
//   1. per destination rank, the number of plan entries for its experts (MPI_Alltoall);
//   2. the entries' rows of x and local expert ids (MPI_Alltoallv, in plan order: the CSR is
//      sorted by expert, so each destination's entries are one contiguous run);
//   3. each rank runs its experts on what it received (MoELayer::execute on a plan over its
//      E / P experts, gate 1: a row comes back as its expert's output, bit for bit);
//   4. the outputs go back (MPI_Alltoallv) into the plan's entry order; shared experts run
//      locally (MoELayer::expert_outputs), and MoELayer::combine_outputs sums each token in the
//      single-process order (shared experts, then slots).
// A token's expert output depends only on its row, its expert and the weights (MoELayer's
// batch invariance), and the combine is the same function in the same order, so the output
// equals the single-process MoELayer's for these tokens bit for bit, for any P.
//
// Overlap: config.chunks > 1 splits each destination's entries into that many parts, sent
// with MPI_Ialltoallv so that the experts run on part c while part c + 1 travels (and part
// c's results travel back meanwhile). Same bits for any chunk count.
//
// Errors never hang: every collective call first agrees, with one small MPI_Allreduce, on
// whether every rank accepted its arguments; if one did not, every rank throws (the failing
// rank its own exception, the others switchyard::error quoting it). The constructor compares
// every rank's configuration (E, d, d_ff, shared experts, activation, router fingerprint...)
// with one MPI_Allgather and throws config_error on every rank naming the fields and ranks
// that disagree.
//
// Lifetime: the object holds a duplicate of the communicator and a row datatype; destroy it
// before MPI_Finalize.
#include <mpi.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/layer.hpp"
#include "switchyard/moe/plan.hpp"

namespace switchyard {
inline namespace v0 {
namespace dist {

/// Which rank holds which routed experts: contiguous ranges, the first E % P ranks one more.
struct ExpertPartition {
  std::int64_t num_experts = 0;
  std::int64_t num_ranks = 1;

  std::int64_t begin(std::int64_t rank) const noexcept {
    const std::int64_t base = num_experts / num_ranks, extra = num_experts % num_ranks;
    return rank * base + std::min(rank, extra);
  }
  std::int64_t end(std::int64_t rank) const noexcept { return begin(rank + 1); }
  std::int64_t size(std::int64_t rank) const noexcept { return end(rank) - begin(rank); }
  /// The rank holding expert e (0 <= e < num_experts).
  std::int64_t owner(std::int64_t e) const noexcept {
    const std::int64_t base = num_experts / num_ranks, extra = num_experts % num_ranks;
    const std::int64_t big = extra * (base + 1);  // experts held by the ranks with one more
    return e < big ? e / (base + 1) : extra + (e - big) / base;
  }
};

struct ExpertParallelConfig {
  /// The whole layer as one process would build it: num_experts = E over all ranks.
  moe::MoELayerConfig layer{};
  /// Describes the router every rank uses (for example "topk k=2 renormalize"); ranks with
  /// different strings are a config_error at construction. Routers are replicated: their
  /// settings must agree, and this is how switchyard can tell.
  std::string router_fingerprint{};
  /// Parts each destination's entries are split into, for overlapping communication with
  /// expert compute (1 = one blocking exchange each way).
  std::int64_t chunks = 1;
};

/// Seconds spent by the last forward() on this rank (MPI_Wtime), and its traffic.
struct ExpertParallelTimings {
  double dispatch = 0;  ///< counts exchange, gathering rows, waiting for received rows
  double compute = 0;   ///< local experts on received rows
  double combine = 0;   ///< waiting for returned outputs, shared experts, the combine
  double total = 0;
  std::int64_t rows_sent = 0;      ///< plan entries sent to other ranks (and received back)
  std::int64_t rows_received = 0;  ///< rows this rank's experts processed for other ranks
  std::int64_t rows_local = 0;     ///< plan entries whose expert is on this rank
};

namespace detail {

/// Grow-only uninitialised buffer of rows (kept between calls, like a workspace).
template <class U>
class RowBuffer {
 public:
  U* get(std::int64_t rows, std::int64_t width) {
    const auto n = static_cast<std::size_t>(std::max<std::int64_t>(rows * width, 1));
    if (n > size_) {
      data_.reset(new U[n]);
      size_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<U[]> data_;
  std::size_t size_ = 0;
};

template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>) {
    return MPI_FLOAT;
  } else {
    static_assert(std::is_same_v<T, double>, "ExpertParallelMoE: float or double");
    return MPI_DOUBLE;
  }
}

/// FNV-1a over a string: the router fingerprint compared across ranks.
inline std::int64_t fingerprint_hash(std::string_view s) noexcept {
  std::uint64_t h = 1469598103934665603ull;
  for (const char c : s) h = (h ^ std::uint8_t(c)) * 1099511628211ull;
  return std::int64_t(h >> 1);
}

}  // namespace detail

template <class T = float, class Arch = simd::default_arch>
class ExpertParallelMoE {
 public:
  static constexpr std::string_view name = "ExpertParallelMoE";
  using layer_type = moe::MoELayer<T, Arch>;
  using plan_type = moe::DispatchPlan<T>;

  /// Collective over comm. Throws config_error on every rank when any rank's configuration
  /// is invalid (E < P, bad layer config, chunks < 1) or when the ranks' configurations differ.
  ExpertParallelMoE(MPI_Comm comm, ExpertParallelConfig cfg)
      : cfg_(std::move(cfg)),
        local_layer_(valid_layer(cfg_.layer)),
        expert_layer_(valid_layer(cfg_.layer)) {
    MPI_Comm_dup(comm, &comm_);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &ranks_);
    part_ = {cfg_.layer.num_experts, ranks_};
    // Local checks first, then one allgather that carries both their verdict and the config,
    // so a rank that rejects its config cannot leave the others waiting.
    std::string problem;
    if (cfg_.layer.num_experts < ranks_)
      problem = "num_experts = " + std::to_string(cfg_.layer.num_experts) + " < " +
                std::to_string(ranks_) + " ranks (every rank holds at least one expert)";
    else if (cfg_.chunks < 1)
      problem = "chunks = " + std::to_string(cfg_.chunks) + " (expected >= 1)";
    else if (cfg_.layer.d_model > std::numeric_limits<int>::max())
      problem = "d_model = " + std::to_string(cfg_.layer.d_model) +
                " (expected <= 2^31 - 1: an MPI row type counts d_model elements in an int)";
    else if (!valid_)
      problem = invalid_reason_;
    const moe::MoELayerConfig& l = cfg_.layer;
    const std::array<std::int64_t, fields> mine = {
        problem.empty() ? 0 : 1,
        l.num_experts,
        l.d_model,
        l.d_ff,
        l.num_shared_experts,
        l.shared_d_ff == 0 ? l.d_ff : l.shared_d_ff,
        static_cast<std::int64_t>(l.activation),
        l.output_softmax ? 1 : 0,
        detail::fingerprint_hash(cfg_.router_fingerprint),
        cfg_.chunks};
    std::vector<std::int64_t> all(static_cast<std::size_t>(fields) *
                                  static_cast<std::size_t>(ranks_));
    MPI_Allgather(mine.data(), fields, MPI_INT64_T, all.data(), fields, MPI_INT64_T, comm_);
    std::string bad_ranks, disagree;
    static constexpr std::array<const char*, fields> field_names = {
        "",           "num_experts",        "d_model",
        "d_ff",       "num_shared_experts", "shared_d_ff",
        "activation", "output_softmax",     "router_fingerprint",
        "chunks"};
    std::array<bool, fields> reported{};  // each field named once, with the first rank differing
    for (int r = 0; r < ranks_; ++r) {
      const std::int64_t* theirs = all.data() + static_cast<std::size_t>(r) * fields;
      if (theirs[0]) bad_ranks += (bad_ranks.empty() ? "" : ", ") + std::to_string(r);
      for (int f = 1; f < fields; ++f) {
        if (theirs[f] == all[static_cast<std::size_t>(f)] || reported[f]) continue;
        reported[f] = true;
        disagree += std::string(disagree.empty() ? "" : ", ") + field_names[f] +
                    " (rank 0: " + std::to_string(all[static_cast<std::size_t>(f)]) + ", rank " +
                    std::to_string(r) + ": " + std::to_string(theirs[f]) + ")";
      }
    }
    if (!problem.empty() || !bad_ranks.empty() || !disagree.empty()) {
      MPI_Comm_free(&comm_);
      std::string msg = std::string(name) + ": ";
      if (!problem.empty()) msg += "this rank's config is invalid: " + problem + "; ";
      if (!bad_ranks.empty()) msg += "invalid config on rank(s) " + bad_ranks + "; ";
      if (!disagree.empty()) msg += "ranks disagree on " + disagree + "; ";
      msg += "no rank built the layer";
      throw config_error(msg);
    }
    const std::int64_t local = part_.size(rank_);
    moe::MoELayerConfig lc = cfg_.layer;
    lc.num_experts = local;
    local_layer_ = layer_type(lc);  // this rank's experts and the shared experts
    lc.num_shared_experts = 0;
    expert_layer_ = layer_type(lc);  // this rank's experts only, for received rows
    MPI_Type_contiguous(int(cfg_.layer.d_model), detail::mpi_type<T>(), &row_type_);
    MPI_Type_commit(&row_type_);
  }

  ExpertParallelMoE(const ExpertParallelMoE&) = delete;
  ExpertParallelMoE& operator=(const ExpertParallelMoE&) = delete;
  ~ExpertParallelMoE() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    MPI_Type_free(&row_type_);
    MPI_Comm_free(&comm_);
  }

  int rank() const noexcept { return rank_; }
  int ranks() const noexcept { return ranks_; }
  const ExpertParallelConfig& config() const noexcept { return cfg_; }
  const ExpertPartition& partition() const noexcept { return part_; }
  /// This rank's experts: [expert_begin(), expert_end()) of the E routed experts.
  std::int64_t expert_begin() const noexcept { return part_.begin(rank_); }
  std::int64_t expert_end() const noexcept { return part_.end(rank_); }
  std::int64_t local_experts() const noexcept { return part_.size(rank_); }
  const ExpertParallelTimings& last_timings() const noexcept { return timings_; }

  /// Collective: every rank of the communicator calls it, each with its own tokens.
  /// plan: this rank's routing of its T tokens over all E experts (plan.num_experts == E);
  /// x: [T, d]; w: this rank's experts (w.experts holds local_experts() experts, expert
  /// expert_begin() first) and every shared expert (w.shared, w.shared_gate), stored as T or
  /// as bf16 / f16; y: [T, d], overwritten (may be x itself, not otherwise overlap it);
  /// mask: as MoELayer::execute. T = 0 is valid (the rank still serves other ranks).
  /// Throws (on every rank, see the file comment) shape_error / config_error naming the
  /// argument, or switchyard::error for a malformed plan.
  template <class W>
  void forward(const plan_type& plan, ConstView<T, 2> x, const moe::MoELayerWeights<W>& w,
               View<T, 2> y, moe::TokenMask mask = {}) {
    const double t_start = MPI_Wtime();
    agree([&] { check_forward(plan, x, w, y, mask); });
    timings_ = {};
    const std::int64_t d = cfg_.layer.d_model, C = cfg_.chunks, P = ranks_, me = rank_;
    const std::int64_t nnz = plan.nnz(), S = cfg_.layer.num_shared_experts;
    const std::int64_t tokens = plan.num_tokens;

    // Per destination q its entries [first[q], first[q + 1]) of the plan, cut into C parts.
    // This rank's own entries never travel (count 0): they run straight from x.
    std::vector<std::int64_t> first(static_cast<std::size_t>(P + 1));
    for (std::int64_t q = 0; q <= P; ++q) first[q] = plan.expert_offsets[part_.begin(q)];
    const auto part_begin = [&](std::int64_t q, std::int64_t c) {
      const std::int64_t n = q == me ? 0 : first[q + 1] - first[q];
      return first[q] + n * c / C;
    };
    std::vector<std::int64_t> send_counts(static_cast<std::size_t>(P * C));
    std::vector<std::int64_t> recv_counts(static_cast<std::size_t>(P * C));
    for (std::int64_t q = 0; q < P; ++q)
      for (std::int64_t c = 0; c < C; ++c)
        send_counts[q * C + c] = part_begin(q, c + 1) - part_begin(q, c);
    MPI_Alltoall(send_counts.data(), int(C), MPI_INT64_T, recv_counts.data(), int(C), MPI_INT64_T,
                 comm_);

    // Rows and local expert ids of the travelling entries, in plan order without this rank's
    // own run: plan position p is send row p, or p - own after the own run.
    const std::int64_t own = first[me + 1] - first[me];
    const auto send_row = [&](std::int64_t p) { return p < first[me] ? p : p - own; };
    T* const send_x = send_x_.get(nnz - own, d);
    std::int32_t* const send_e = send_e_.get(nnz - own, 1);
    for (std::int64_t q = 0; q < P; ++q) {
      if (q == me) continue;
      for (std::int64_t e = part_.begin(q); e < part_.end(q); ++e) {
        for (std::int64_t p = plan.expert_offsets[e]; p < plan.expert_offsets[e + 1]; ++p) {
          send_e[send_row(p)] = std::int32_t(e - part_.begin(q));
          const T* xr = x.data() + plan.token_index[p] * x.stride(0);
          T* dst = send_x + send_row(p) * d;
          if (x.stride(1) == 1) {
            std::memcpy(dst, xr, sizeof(T) * static_cast<std::size_t>(d));
          } else {
            for (std::int64_t j = 0; j < d; ++j) dst[j] = xr[j * x.stride(1)];
          }
        }
      }
    }
    // Received rows: chunk-major, then by source rank.
    std::vector<std::int64_t> chunk_first(static_cast<std::size_t>(C + 1), 0);
    for (std::int64_t c = 0; c < C; ++c) {
      std::int64_t n = 0;
      for (std::int64_t q = 0; q < P; ++q) n += recv_counts[q * C + c];
      chunk_first[c + 1] = chunk_first[c] + n;
    }
    const std::int64_t received = chunk_first[C];
    agree([&] {  // MPI displacements are int: what one rank receives must fit too
      if (received > std::numeric_limits<int>::max())
        switchyard::detail::fail_config(name, "forward", "rows received", received,
                                        "<= 2^31 - 1 per rank (MPI counts are int)");
    });
    // Buffers kept between calls (grown, never cleared: every row read is written first).
    T* const recv_x = recv_x_.get(received, d);
    T* const recv_out = recv_out_.get(received, d);
    std::int32_t* const recv_e = recv_e_.get(received, 1);
    T* const outputs = outputs_.get(nnz + S * tokens, d);

    // Per chunk: counts and displacements (in rows) of the exchanges.
    struct Exchange {
      std::vector<int> send_n, send_at, back_at, recv_n, recv_at;  // back_at: plan positions
    };
    std::vector<Exchange> ex(static_cast<std::size_t>(C));
    for (std::int64_t c = 0; c < C; ++c) {
      Exchange& e = ex[c];
      for (auto* v : {&e.send_n, &e.send_at, &e.back_at, &e.recv_n, &e.recv_at})
        v->resize(static_cast<std::size_t>(P));
      std::int64_t at = 0;
      for (std::int64_t q = 0; q < P; ++q) {
        e.send_n[q] = int(send_counts[q * C + c]);
        e.send_at[q] = int(q == me ? 0 : send_row(part_begin(q, c)));
        e.back_at[q] = int(part_begin(q, c));
        e.recv_n[q] = int(recv_counts[q * C + c]);
        e.recv_at[q] = int(at);
        at += recv_counts[q * C + c];
      }
    }
    timings_.rows_local = first[me + 1] - first[me];
    timings_.rows_sent = nnz - timings_.rows_local;
    timings_.rows_received = received;

    // Post chunk 0's rows, then compute what needs no exchange while they travel: this rank's
    // own entries (straight from x into their plan rows) and the shared experts.
    std::vector<MPI_Request> rows_req(static_cast<std::size_t>(2 * C), MPI_REQUEST_NULL);
    std::vector<MPI_Request> back_req(static_cast<std::size_t>(C), MPI_REQUEST_NULL);
    const auto post_rows = [&](std::int64_t c) {
      const Exchange& e = ex[c];
      T* rx = recv_x + chunk_first[c] * d;
      std::int32_t* re = recv_e + chunk_first[c];
      MPI_Ialltoallv(send_x, e.send_n.data(), e.send_at.data(), row_type_, rx, e.recv_n.data(),
                     e.recv_at.data(), row_type_, comm_, &rows_req[2 * c]);
      MPI_Ialltoallv(send_e, e.send_n.data(), e.send_at.data(), MPI_INT32_T, re, e.recv_n.data(),
                     e.recv_at.data(), MPI_INT32_T, comm_, &rows_req[2 * c + 1]);
    };
    post_rows(0);
    const double t_posted = MPI_Wtime();
    timings_.dispatch += t_posted - t_start;
    run_own_entries(plan, x, w, first[me], outputs + first[me] * d);
    if (S > 0 && tokens > 0) {  // shared experts: rows [nnz, nnz + S * T) of outputs
      plan_type none;
      none.reset(tokens, local_layer_.config().num_experts, 0);
      local_layer_.expert_outputs(none, x, w, View<T, 2>(outputs + nnz * d, {S * tokens, d}));
    }
    timings_.compute += MPI_Wtime() - t_posted;

    // Per chunk: wait for its rows, post the next chunk's, run the experts, post the outputs
    // back to the senders' plan positions. (C = 1: one exchange each way.)
    for (std::int64_t c = 0; c < C; ++c) {
      const double t0 = MPI_Wtime();
      MPI_Waitall(2, &rows_req[2 * c], MPI_STATUSES_IGNORE);
      if (c + 1 < C) post_rows(c + 1);
      const double t1 = MPI_Wtime();
      timings_.dispatch += t1 - t0;
      run_received(recv_x + chunk_first[c] * d, recv_e + chunk_first[c],
                   chunk_first[c + 1] - chunk_first[c], w, recv_out + chunk_first[c] * d);
      const Exchange& e = ex[c];
      MPI_Ialltoallv(recv_out + chunk_first[c] * d, e.recv_n.data(), e.recv_at.data(), row_type_,
                     outputs, e.send_n.data(), e.back_at.data(), row_type_, comm_, &back_req[c]);
      timings_.compute += MPI_Wtime() - t1;
    }
    const double t2 = MPI_Wtime();
    MPI_Waitall(int(C), back_req.data(), MPI_STATUSES_IGNORE);
    local_layer_.combine_outputs(plan, ConstView<T, 2>(outputs, {nnz + S * tokens, d}), y, mask);
    const double t_end = MPI_Wtime();
    timings_.combine += t_end - t2;
    timings_.total = t_end - t_start;
  }

  /// As above, returning y: [T, d].
  template <class W>
  core::Tensor<T> forward(const plan_type& plan, ConstView<T, 2> x,
                          const moe::MoELayerWeights<W>& w, moe::TokenMask mask = {}) {
    core::Tensor<T> y({std::max<std::int64_t>(plan.num_tokens, 0), cfg_.layer.d_model});
    forward(plan, x, w, y.template view<2>(), mask);
    return y;
  }

  /// Collective: routing statistics over the global batch (every rank gets the same values).
  /// Counts (tokens_per_expert, kept_per_expert, routed_tokens, dropped,
  /// tokens_without_expert) are exact integer sums. mean_prob, z_loss and entropy are means
  /// over all routed tokens (sums of rank values times routed tokens, divided by the total):
  /// equal to one process routing the concatenated batch up to the order of the sums, for
  /// routers that treat tokens independently. aux_loss and aux_loss_scaled are the
  /// routed-token-weighted means of the ranks' own losses (what data-parallel training
  /// with per-rank losses optimises); the global-batch Switch loss of top-k style routers is
  /// moe::switch_load_balancing_loss(tokens_per_expert, mean_prob * routed_tokens,
  /// routed_tokens, k) over these statistics. Throws (on every rank) when a rank's
  /// per-expert arrays do not have E entries.
  moe::RouterStats global_stats(const moe::RouterStats& local) {
    const std::int64_t E = cfg_.layer.num_experts;
    agree([&] {
      const auto check = [&](std::string_view arg, std::size_t n) {
        if (std::int64_t(n) != E)
          switchyard::detail::fail_shape(name, "global_stats", arg, "[E=" + std::to_string(n) + "]",
                                         "[E=" + std::to_string(E) + "]", "one entry per expert");
      };
      check("tokens_per_expert", local.tokens_per_expert.size());
      check("kept_per_expert", local.kept_per_expert.size());
      check("mean_prob", local.mean_prob.size());
    });
    std::vector<std::int64_t> ints(static_cast<std::size_t>(2 * E + 3));
    std::copy(local.tokens_per_expert.begin(), local.tokens_per_expert.end(), ints.begin());
    std::copy(local.kept_per_expert.begin(), local.kept_per_expert.end(), ints.begin() + E);
    ints[2 * E] = local.routed_tokens;
    ints[2 * E + 1] = local.dropped;
    ints[2 * E + 2] = local.tokens_without_expert;
    MPI_Allreduce(MPI_IN_PLACE, ints.data(), int(ints.size()), MPI_INT64_T, MPI_SUM, comm_);
    const auto n = double(local.routed_tokens);
    std::vector<double> sums(static_cast<std::size_t>(E + 5));
    for (std::int64_t e = 0; e < E; ++e) sums[e] = local.mean_prob[e] * n;
    sums[E] = local.z_loss * n;
    sums[E + 1] = local.entropy * n;
    sums[E + 2] = local.aux_loss * n;
    sums[E + 3] = local.aux_loss_scaled * n;
    MPI_Allreduce(MPI_IN_PLACE, sums.data(), int(sums.size()), MPI_DOUBLE, MPI_SUM, comm_);
    moe::RouterStats g;
    g.tokens_per_expert.assign(ints.begin(), ints.begin() + E);
    g.kept_per_expert.assign(ints.begin() + E, ints.begin() + 2 * E);
    g.routed_tokens = ints[2 * E];
    g.dropped = ints[2 * E + 1];
    g.tokens_without_expert = ints[2 * E + 2];
    const double total = double(g.routed_tokens);
    const auto mean = [&](double s) { return total > 0 ? s / total : 0.0; };
    g.mean_prob.resize(static_cast<std::size_t>(E));
    for (std::int64_t e = 0; e < E; ++e) g.mean_prob[e] = mean(sums[e]);
    g.z_loss = mean(sums[E]);
    g.entropy = mean(sums[E + 1]);
    g.aux_loss = mean(sums[E + 2]);
    g.aux_loss_scaled = mean(sums[E + 3]);
    return g;
  }

 private:
  static constexpr int fields = 10;

  // A MoELayer config that constructs: the given one, or (remembering why) a minimal valid
  // one, so that a bad config is reported through the collective check, never thrown alone.
  layer_type valid_layer(const moe::MoELayerConfig& c) {
    try {
      return layer_type(c);
    } catch (const std::exception& e) {
      valid_ = false;
      invalid_reason_ = e.what();
      return layer_type({.d_model = 1, .d_ff = 1, .num_experts = 1});
    }
  }

  // Runs check(); then every rank learns whether every rank passed. The first failing rank's
  // message is broadcast; the failing rank rethrows its own exception, the others throw
  // switchyard::error quoting it.
  template <class Check>
  void agree(Check&& check) {
    std::exception_ptr failure;
    std::string what;
    try {
      check();
    } catch (const std::exception& e) {
      failure = std::current_exception();
      what = e.what();
    }
    int first_bad = failure ? rank_ : ranks_;
    MPI_Allreduce(MPI_IN_PLACE, &first_bad, 1, MPI_INT, MPI_MIN, comm_);
    if (first_bad == ranks_) return;
    std::int64_t len = std::int64_t(what.size());
    MPI_Bcast(&len, 1, MPI_INT64_T, first_bad, comm_);
    what.resize(static_cast<std::size_t>(len));
    MPI_Bcast(what.data(), int(len), MPI_CHAR, first_bad, comm_);
    if (failure) std::rethrow_exception(failure);
    throw switchyard::error(std::string(name) + ": rank " + std::to_string(first_bad) +
                            " rejected its arguments, so no rank ran: " + what);
  }

  template <class W>
  void check_forward(const plan_type& plan, const ConstView<T, 2>& x,
                     const moe::MoELayerWeights<W>& w, const View<T, 2>& y,
                     const moe::TokenMask& mask) const {
    const std::string_view fn = "forward";
    const std::int64_t d = cfg_.layer.d_model, E = cfg_.layer.num_experts;
    const std::int64_t tokens = plan.num_tokens;
    if (plan.num_experts != E || tokens < 0) {
      const std::int64_t got[2] = {tokens, plan.num_experts};
      switchyard::detail::fail_shape(
          name, fn, "plan", switchyard::detail::format_shape({"T", "E"}, got),
          "[T, E=" + std::to_string(E) + "]", "plan over all experts of all ranks");
    }
    plan.check();
    core::detail::check_shape(name, fn, "x", x, {"T", "D"}, {tokens, d},
                              "T = plan.num_tokens, D = d_model");
    core::detail::check_shape(name, fn, "y", y, {"T", "D"}, {tokens, d},
                              "T = plan.num_tokens, D = d_model");
    if (!(y.data() == x.data() && y.strides() == x.strides()))
      core::detail::check_no_alias(name, fn, "y", y, "x", x, "or y is x itself");
    moe::detail::check_expert_weights(name, fn, "", w.experts, local_experts(), d, cfg_.layer.d_ff,
                                      cfg_.layer.activation);
    const std::int64_t S = cfg_.layer.num_shared_experts;
    if (S > 0)
      moe::detail::check_expert_weights(name, fn, "shared.", w.shared, S, d,
                                        local_layer_.config().shared_d_ff, cfg_.layer.activation);
    if (!mask.keep.empty() && std::int64_t(mask.keep.size()) != tokens) {
      const std::int64_t got[1] = {std::int64_t(mask.keep.size())};
      switchyard::detail::fail_shape(name, fn, "mask", switchyard::detail::format_shape({"T"}, got),
                                     "[T=" + std::to_string(tokens) + "]",
                                     "one flag per token, or empty");
    }
    // MPI counts and displacements are int: the rows one rank sends must fit.
    if (plan.nnz() > std::numeric_limits<int>::max())
      switchyard::detail::fail_config(name, fn, "plan.nnz", plan.nnz(),
                                      "<= 2^31 - 1 entries per rank (MPI counts are int)");
  }

  // This rank's own plan entries [first, first + n), straight from x: the plan's CSR slice of
  // its experts (token ids index x) through expert_outputs, whose row i is entry first + i.
  template <class W>
  void run_own_entries(const plan_type& plan, const ConstView<T, 2>& x,
                       const moe::MoELayerWeights<W>& w, std::int64_t first, T* out) {
    const std::int64_t E = local_experts(), b = expert_begin(), d = cfg_.layer.d_model;
    const std::int64_t n = plan.expert_offsets[b + E] - first;
    if (n == 0) return;
    plan_type& own = own_plan_;
    own.reset(plan.num_tokens, E, 0);
    for (std::int64_t e = 0; e <= E; ++e)
      own.expert_offsets[e] = plan.expert_offsets[b + e] - first;
    own.token_index.assign(plan.token_index.begin() + first, plan.token_index.begin() + first + n);
    own.slot.assign(plan.slot.begin() + first, plan.slot.begin() + first + n);
    own.gate.assign(plan.gate.begin() + first, plan.gate.begin() + first + n);
    const moe::MoELayerWeights<W> experts_only{w.experts, {}, {}};
    expert_layer_.expert_outputs(own, x, experts_only, View<T, 2>(out, {n, d}));
  }

  // Rows [n, d] from other ranks with their local expert ids through this rank's experts,
  // gate 1: out[i] is row i's expert output (0 + 1 * o, exactly o).
  template <class W>
  void run_received(const T* rows, const std::int32_t* ids, std::int64_t n,
                    const moe::MoELayerWeights<W>& w, T* out) {
    if (n == 0) return;
    const std::int64_t E = local_experts(), d = cfg_.layer.d_model;
    plan_type& lp = local_plan_;
    lp.reset(n, E, 0);
    for (std::int64_t i = 0; i < n; ++i) ++lp.expert_offsets[ids[i] + 1];
    for (std::int64_t e = 0; e < E; ++e) lp.expert_offsets[e + 1] += lp.expert_offsets[e];
    lp.token_index.resize(static_cast<std::size_t>(n));
    lp.slot.assign(static_cast<std::size_t>(n), 0);
    lp.gate.assign(static_cast<std::size_t>(n), T(1));
    std::vector<std::int64_t> at(lp.expert_offsets.begin(), lp.expert_offsets.end() - 1);
    for (std::int64_t i = 0; i < n; ++i) lp.token_index[at[ids[i]]++] = std::int32_t(i);
    lp.stats.routed_tokens = n;
    const moe::MoELayerWeights<W> experts_only{w.experts, {}, {}};
    expert_layer_.execute(lp, ConstView<T, 2>(rows, {n, d}), experts_only, View<T, 2>(out, {n, d}));
  }

  ExpertParallelConfig cfg_;
  bool valid_ = true;
  std::string invalid_reason_;
  layer_type local_layer_;
  layer_type expert_layer_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Datatype row_type_ = MPI_DATATYPE_NULL;
  int rank_ = 0, ranks_ = 1;
  ExpertPartition part_{};
  plan_type local_plan_{};
  plan_type own_plan_{};
  detail::RowBuffer<T> send_x_, recv_x_, recv_out_, outputs_;
  detail::RowBuffer<std::int32_t> send_e_, recv_e_;
  ExpertParallelTimings timings_{};
};

}  // namespace dist
}  // namespace v0
}  // namespace switchyard
