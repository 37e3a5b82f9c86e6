// dist::ExpertParallelMoE under mpiexec (ctest runs it on 2 ranks and on 4 oversubscribed
// ranks): on every rank, for every router family, the output must equal bit for bit what the
// single-process MoELayer with all experts gives for that rank's tokens and plan. Also: a rank
// without tokens, an expert without tokens, a fully masked rank, every token sent to one
// rank, chunked (overlapped) exchange, bf16 experts, y = x in place, global statistics, and
// errors that every rank reports instead of hanging.
//
// Collectives must run on every rank even when a check fails, so checks here are CHECK (not
// REQUIRE) between collective calls.
#define CATCH_CONFIG_RUNNER
#include <mpi.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "support/compare.hpp"
#include "support/moe_experts.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/dist/expert_parallel.hpp"
#include "switchyard/moe/layer.hpp"
#include "switchyard/moe/router.hpp"
#include "switchyard/moe/router_capacity.hpp"
#include "switchyard/moe/router_expert_choice.hpp"
#include "switchyard/moe/router_grouped_topk.hpp"
#include "switchyard/moe/router_gshard.hpp"
#include "switchyard/moe/router_hash.hpp"
#include "switchyard/moe/router_noisy_topk.hpp"
#include "switchyard/moe/router_null_experts.hpp"
#include "switchyard/moe/router_relu.hpp"
#include "switchyard/moe/router_top_p.hpp"
#include "switchyard/moe/router_topk.hpp"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = Catch::Session().run(argc, argv);
  MPI_Allreduce(MPI_IN_PLACE, &rc, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return rc;
}

namespace {

using namespace switchyard;
using Catch::Matchers::Contains;
using moe::Activation;
using test_support::random_experts;
using test_support::random_tensor;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

constexpr std::int64_t d = 16, F = 24, E = 6;

// Every rank builds the same weights (same seeds): rank r then hands its expert range over.
struct Model {
  test_support::OwnedExperts<float> routed =
      random_experts<float>(E, d, F, Activation::swiglu, false, 101);
  test_support::OwnedExperts<float> shared =
      random_experts<float>(1, d, F + 8, Activation::swiglu, false, 102);
  Tensor<float> router_weight = random_tensor<float>({E, d}, 103);

  moe::MoELayerConfig config(std::int64_t shared_experts = 1) const {
    return {.d_model = d,
            .d_ff = F,
            .num_experts = E,
            .num_shared_experts = shared_experts,
            .shared_d_ff = F + 8};
  }
  moe::MoELayerWeights<float> all(bool with_shared = true) const {
    return {routed.view(), with_shared ? shared.view() : moe::ExpertWeights<float>{}};
  }
  // Experts [b, b + n): zero-copy slices of the stacked weights.
  moe::MoELayerWeights<float> local(std::int64_t b, std::int64_t n, bool with_shared = true) const {
    moe::ExpertWeights<float> w;
    w.w1 = ConstView<float, 3>(routed.w1.data() + b * F * d, {n, F, d});
    w.w3 = ConstView<float, 3>(routed.w3.data() + b * F * d, {n, F, d});
    w.w2 = ConstView<float, 3>(routed.w2.data() + b * d * F, {n, d, F});
    return {w, with_shared ? shared.view() : moe::ExpertWeights<float>{}};
  }
};

// The tokens rank r holds (every rank can build every rank's tokens).
Tensor<float> tokens_of(int r, std::int64_t count) {
  return random_tensor<float>({count, d}, 200 + std::uint32_t(r));
}

using RouteFn = std::function<void(ConstView<float, 2> logits, moe::DispatchPlan<float>& plan,
                                   const moe::TokenMask& mask)>;

bool same_bits(const Tensor<float>& a, const Tensor<float>& b) {
  return a.numel() == b.numel() &&
         (a.numel() == 0 || std::memcmp(a.data(), b.data(),
                                        sizeof(float) * static_cast<std::size_t>(a.numel())) == 0);
}

// Routes this rank's tokens, runs the layer expert-parallel and alone, and checks the bits.
void check_router(const std::string& fingerprint, const RouteFn& route, std::int64_t chunks = 1,
                  std::int64_t tokens_here = -1, bool mask_all = false) {
  const Model m;
  const int rank = world_rank();
  const std::int64_t T = tokens_here >= 0 ? tokens_here : 37 + 11 * rank;
  const Tensor<float> x = tokens_of(rank, T);
  Tensor<float> logits({T, E});
  moe::router_logits<float>(x, m.router_weight, logits);
  const std::vector<std::uint8_t> keep(static_cast<std::size_t>(mask_all ? T : 0), 0);
  const moe::TokenMask mask{keep};
  moe::DispatchPlan<float> plan;
  route(logits, plan, mask);

  dist::ExpertParallelMoE<float> ep(
      MPI_COMM_WORLD, {.layer = m.config(), .router_fingerprint = fingerprint, .chunks = chunks});
  const Tensor<float> got =
      ep.forward(plan, x, m.local(ep.expert_begin(), ep.local_experts()), mask);
  const moe::MoELayer<float> single(m.config());
  const Tensor<float> want = single.execute(plan, x, m.all(), mask);
  CAPTURE(fingerprint, rank, T, chunks);
  CHECK(got.extent(0) == T);
  CHECK(same_bits(got, want));
  if (T > 0 && !mask_all) CHECK(test_support::max_abs(test_support::to_double(got)) > 0);
}

}  // namespace

TEST_CASE("ExpertParallelMoE: partition of experts over ranks", "[dist]") {
  const dist::ExpertPartition even{8, 2}, uneven{6, 4};
  CHECK(even.begin(0) == 0);
  CHECK(even.end(0) == 4);
  CHECK(even.end(1) == 8);
  // 6 over 4: the first 6 % 4 = 2 ranks hold one more: [0,2) [2,4) [4,5) [5,6)
  const std::int64_t want_begin[5] = {0, 2, 4, 5, 6};
  for (int r = 0; r <= 4; ++r) CHECK(uneven.begin(r) == want_begin[r]);
  for (std::int64_t e = 0; e < 6; ++e) {
    const std::int64_t o = uneven.owner(e);
    CHECK(uneven.begin(o) <= e);
    CHECK(e < uneven.end(o));
  }
}

TEST_CASE("ExpertParallelMoE equals the single-process layer bit for bit, every router",
          "[dist][routers]") {
  check_router("topk k=2", [](auto logits, auto& plan, const auto& mask) {
    moe::TopKRouter<float>({.num_experts = E, .top_k = 2}).route(logits, plan, mask);
  });
  check_router("capacity k=2 cf=0.5", [](auto logits, auto& plan, const auto& mask) {
    moe::CapacityRouter<float>({.num_experts = E, .top_k = 2, .capacity_factor = 0.5})
        .route(logits, plan, mask);
  });
  check_router("gshard", [](auto logits, auto& plan, const auto& mask) {
    moe::GShardTop2Router<float>({.num_experts = E}).route(logits, plan, mask);
  });
  check_router("expert choice", [](auto logits, auto& plan, const auto& mask) {
    moe::ExpertChoiceRouter<float>({.num_experts = E, .capacity_factor = 1.0})
        .route(logits, plan, mask);
  });
  check_router("relu", [](auto logits, auto& plan, const auto& mask) {
    moe::ReluRouter<float>({.num_experts = E, .topk_for_target = 2}).route(logits, plan, mask);
  });
  check_router("top-p 0.5", [](auto logits, auto& plan, const auto& mask) {
    moe::TopPRouter<float>({.num_experts = E, .threshold = 0.5}).route(logits, plan, mask);
  });
  check_router("noisy top-k eval k=2", [](auto logits, auto& plan, const auto& mask) {
    moe::NoisyTopKRouter<float>({.num_experts = E, .top_k = 2}).route(logits, plan, mask);
  });
  check_router("grouped top-k", [](auto logits, auto& plan, const auto& mask) {
    moe::GroupedTopKRouter<float>({.num_experts = E,
                                   .top_k = 2,
                                   .n_group = 3,
                                   .topk_group = 2,
                                   .score_func = moe::ScoreFunc::sigmoid,
                                   .norm_topk_prob = true,
                                   .routed_scaling_factor = 2.5})
        .route(logits, plan, mask);
  });
  check_router("null experts", [](auto logits, auto& plan, const auto& mask) {
    // Router width E + 2: two null experts; extra logits columns from the same tokens.
    const std::int64_t T = logits.extent(0);
    Tensor<float> wide({T, E + 2});
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t e = 0; e < E + 2; ++e) wide(t, e) = logits(t, e % E) * (e < E ? 1.f : .5f);
    moe::NullExpertRouter<float>({.num_experts = E, .null_experts = 2, .top_k = 2})
        .route(wide.view<2>(), plan, mask);
  });
  check_router("hash k=2", [](auto logits, auto& plan, const auto& mask) {
    std::vector<std::int64_t> ids(static_cast<std::size_t>(logits.extent(0)));
    for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = std::int64_t(i * 7 + 3);
    moe::HashRouter<float>({.num_experts = E, .top_k = 2}).route(ids, plan, mask);
  });
}

TEST_CASE("ExpertParallelMoE: chunked (overlapped) exchange gives the same bits", "[dist]") {
  for (std::int64_t chunks : {2, 3, 50}) {
    check_router(
        "topk k=3",
        [](auto logits, auto& plan, const auto& mask) {
          moe::TopKRouter<float>({.num_experts = E, .top_k = 3}).route(logits, plan, mask);
        },
        chunks);
  }
}

TEST_CASE("ExpertParallelMoE: a rank with no tokens, and a fully masked rank", "[dist]") {
  const auto topk = [](auto logits, auto& plan, const auto& mask) {
    moe::TopKRouter<float>({.num_experts = E, .top_k = 2}).route(logits, plan, mask);
  };
  // Rank 1 has no tokens (it still serves the others' tokens for its experts).
  check_router("topk", topk, 1, world_rank() == 1 ? 0 : 29);
  // Rank 0 masks all its tokens: it sends nothing, outputs zeros, and serves the others.
  check_router("topk", topk, 1, 29, world_rank() == 0);
}

TEST_CASE("ExpertParallelMoE: an expert without tokens, and every token to one rank", "[dist]") {
  const Model m;
  const int rank = world_rank(), P = world_size();
  const std::int64_t T = 40;
  const Tensor<float> x = tokens_of(rank, T);
  const moe::MoELayer<float> single(m.config());
  dist::ExpertParallelMoE<float> ep(MPI_COMM_WORLD, {.layer = m.config()});
  const auto local = m.local(ep.expert_begin(), ep.local_experts());
  const dist::ExpertPartition part = ep.partition();
  for (int which = 0; which < 2; ++which) {
    // which 0: experts 0 and 1 never chosen; which 1: only the last rank's experts.
    Tensor<float> combine({T, E});
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t lo = which == 0 ? 2 : part.begin(P - 1);
      const std::int64_t span = (which == 0 ? E : part.end(P - 1)) - lo;
      combine(t, lo + t % span) = 0.75f;
      if (span > 1) combine(t, lo + (t + 1) % span) = 0.25f;
    }
    const auto plan = moe::make_plan_from_combine_weights<float>(combine);
    CHECK(plan.expert_size(0) == (which == 0 ? 0 : plan.expert_size(0)));
    const Tensor<float> got = ep.forward(plan, x, local);
    const Tensor<float> want = single.execute(plan, x, m.all());
    CAPTURE(which, rank);
    CHECK(same_bits(got, want));
    if (which == 1) {
      CHECK(ep.last_timings().rows_local == (rank == P - 1 ? plan.nnz() : 0));
      CHECK(ep.last_timings().rows_sent == (rank == P - 1 ? 0 : plan.nnz()));
    }
  }
}

TEST_CASE("ExpertParallelMoE: bf16 experts, no shared expert, y = x in place", "[dist]") {
  const Model m;
  const int rank = world_rank();
  const std::int64_t T = 33;
  const Tensor<float> x = tokens_of(rank, T);
  Tensor<float> logits({T, E});
  moe::router_logits<float>(x, m.router_weight, logits);
  moe::DispatchPlan<float> plan;
  moe::TopKRouter<float>({.num_experts = E, .top_k = 2}).route(logits, plan);

  // bf16 copies of the stacked weights.
  const auto to_bf16 = [](const Tensor<float>& t) {
    std::vector<bf16> out(static_cast<std::size_t>(t.numel()));
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = bf16::from_float(t.data()[i]);
    return out;
  };
  const auto w1 = to_bf16(m.routed.w1), w3 = to_bf16(m.routed.w3), w2 = to_bf16(m.routed.w2);
  const auto stacked = [&](std::int64_t b, std::int64_t n) {
    moe::ExpertWeights<bf16> w;
    w.w1 = ConstView<bf16, 3>(w1.data() + b * F * d, {n, F, d});
    w.w3 = ConstView<bf16, 3>(w3.data() + b * F * d, {n, F, d});
    w.w2 = ConstView<bf16, 3>(w2.data() + b * d * F, {n, d, F});
    return moe::MoELayerWeights<bf16>{w, {}};
  };
  const auto cfg = m.config(0);
  dist::ExpertParallelMoE<float> ep(MPI_COMM_WORLD, {.layer = cfg});
  Tensor<float> y = x;  // in place: y is overwritten with its own experts' output
  ep.forward(plan, y.view<2>(), stacked(ep.expert_begin(), ep.local_experts()), y.view<2>());
  const Tensor<float> want = moe::MoELayer<float>(cfg).execute(plan, x, stacked(0, E));
  CHECK(same_bits(y, want));
}

TEST_CASE("ExpertParallelMoE: global statistics equal one process routing every rank's tokens",
          "[dist][stats]") {
  const Model m;
  const int rank = world_rank(), P = world_size();
  const moe::TopKRouter<float> router({.num_experts = E, .top_k = 2});
  const auto plan_of = [&](const Tensor<float>& x) {
    Tensor<float> logits({x.extent(0), E});
    moe::router_logits<float>(x, m.router_weight, logits);
    moe::DispatchPlan<float> plan;
    router.route(logits, plan);
    return plan;
  };
  dist::ExpertParallelMoE<float> ep(MPI_COMM_WORLD, {.layer = m.config()});
  const auto mine = plan_of(tokens_of(rank, 37 + 11 * rank));
  const moe::RouterStats g = ep.global_stats(mine.stats);
  // One process with the concatenated batch.
  std::int64_t total = 0;
  for (int r = 0; r < P; ++r) total += 37 + 11 * r;
  Tensor<float> all({total, d});
  for (int r = 0, at = 0; r < P; at += 37 + 11 * r, ++r) {
    const Tensor<float> xr = tokens_of(r, 37 + 11 * r);
    std::memcpy(all.data() + std::int64_t(at) * d, xr.data(),
                sizeof(float) * static_cast<std::size_t>(xr.numel()));
  }
  const moe::RouterStats want = plan_of(all).stats;
  CHECK(g.tokens_per_expert == want.tokens_per_expert);
  CHECK(g.kept_per_expert == want.kept_per_expert);
  CHECK(g.routed_tokens == want.routed_tokens);
  CHECK(g.dropped == want.dropped);
  for (std::int64_t e = 0; e < E; ++e)
    CHECK(g.mean_prob[e] == Approx(want.mean_prob[e]).epsilon(1e-12));
  CHECK(g.z_loss == Approx(want.z_loss).epsilon(1e-12));
  CHECK(g.entropy == Approx(want.entropy).epsilon(1e-12));
  // The global Switch loss from the reduced statistics is the single-process aux_loss.
  std::vector<double> prob_sum(static_cast<std::size_t>(E));
  for (std::int64_t e = 0; e < E; ++e) prob_sum[e] = g.mean_prob[e] * double(g.routed_tokens);
  CHECK(moe::switch_load_balancing_loss(g.tokens_per_expert, prob_sum, g.routed_tokens, 2) ==
        Approx(want.aux_loss).epsilon(1e-12));
  // Wrong length on one rank: every rank throws.
  moe::RouterStats bad = mine.stats;
  if (rank == P - 1) bad.mean_prob.pop_back();
  CHECK_THROWS_WITH(ep.global_stats(bad), Contains("mean_prob"));
}

TEST_CASE("ExpertParallelMoE: ranks that disagree, or bad input on one rank, fail on every rank",
          "[dist][errors]") {
  const Model m;
  const int rank = world_rank(), P = world_size();
  auto cfg = m.config();
  // A different expert count on the last rank.
  if (rank == P - 1) cfg.num_experts = E + P;
  CHECK_THROWS_WITH((dist::ExpertParallelMoE<float>(MPI_COMM_WORLD, {.layer = cfg})),
                    Contains("ExpertParallelMoE") && Contains("disagree on num_experts"));
  // A different router on rank 0.
  CHECK_THROWS_WITH(
      (dist::ExpertParallelMoE<float>(
          MPI_COMM_WORLD,
          {.layer = m.config(), .router_fingerprint = rank == 0 ? "topk k=2" : "topk k=1"})),
      Contains("router_fingerprint"));
  // Fewer experts than ranks; an invalid layer config on one rank only.
  auto few = m.config();
  few.num_experts = P - 1;
  CHECK_THROWS_WITH((dist::ExpertParallelMoE<float>(MPI_COMM_WORLD, {.layer = few})),
                    Contains("num_experts = " + std::to_string(P - 1)));
  auto broken = m.config();
  if (rank == 0) broken.d_ff = 0;
  CHECK_THROWS_WITH((dist::ExpertParallelMoE<float>(MPI_COMM_WORLD, {.layer = broken})),
                    Contains("invalid config on rank(s) 0"));
  CHECK_THROWS_WITH(
      (dist::ExpertParallelMoE<float>(MPI_COMM_WORLD, {.layer = m.config(), .chunks = 0})),
      Contains("chunks = 0"));

  // forward: rank 0 passes x of the wrong width; every rank throws, none waits forever.
  dist::ExpertParallelMoE<float> ep(MPI_COMM_WORLD, {.layer = m.config()});
  const std::int64_t T = 12;
  const Tensor<float> x = tokens_of(rank, T), x_bad({T, d + 1});
  Tensor<float> logits({T, E});
  moe::router_logits<float>(x, m.router_weight, logits);
  moe::DispatchPlan<float> plan;
  moe::TopKRouter<float>({.num_experts = E, .top_k = 2}).route(logits, plan);
  const auto local = m.local(ep.expert_begin(), ep.local_experts());
  if (rank == 0) {
    CHECK_THROWS_AS(ep.forward(plan, x_bad, local), shape_error);
  } else {
    CHECK_THROWS_WITH(ep.forward(plan, x, local),
                      Contains("rank 0 rejected its arguments") && Contains("'x'"));
  }
  // Weights of the wrong expert count, and a plan over the wrong E.
  CHECK_THROWS_WITH(ep.forward(plan, x, m.all()), Contains("w1") || Contains("rejected"));
  moe::DispatchPlan<float> wrong;
  wrong.reset(T, E + 1, 0);
  CHECK_THROWS_WITH(ep.forward(rank == P - 1 ? wrong : plan, x, local),
                    Contains("plan") || Contains("rejected"));
  // The layer still works after the errors.
  const Tensor<float> got = ep.forward(plan, x, local);
  CHECK(same_bits(got, moe::MoELayer<float>(m.config()).execute(plan, x, m.all())));
}

TEST_CASE("ExpertParallelMoE<double> equals MoELayer<double>", "[dist][double]") {
  const int rank = world_rank();
  const std::int64_t T = 21;
  const auto routed = random_experts<double>(E, d, F, Activation::gelu, true, 301);
  const Tensor<double> x = random_tensor<double>({T, d}, 302 + std::uint32_t(rank));
  Tensor<double> combine({T, E});
  for (std::int64_t t = 0; t < T; ++t) {
    combine(t, (t * 5 + rank) % E) = 0.625;
    combine(t, (t * 5 + rank + 1 + t % 3) % E) = 0.375;
  }
  const auto plan = moe::make_plan_from_combine_weights<double>(combine);
  const moe::MoELayerConfig cfg{
      .d_model = d, .d_ff = F, .num_experts = E, .activation = Activation::gelu};
  dist::ExpertParallelMoE<double> ep(MPI_COMM_WORLD, {.layer = cfg});
  const std::int64_t b = ep.expert_begin(), n = ep.local_experts();
  moe::ExpertWeights<double> mine;
  mine.w1 = ConstView<double, 3>(routed.w1.data() + b * F * d, {n, F, d});
  mine.w2 = ConstView<double, 3>(routed.w2.data() + b * d * F, {n, d, F});
  mine.b1 = ConstView<double, 2>(routed.b1.data() + b * F, {n, F});
  mine.b2 = ConstView<double, 2>(routed.b2.data() + b * d, {n, d});
  const Tensor<double> got = ep.forward(plan, x, moe::MoELayerWeights<double>{mine, {}});
  const Tensor<double> want =
      moe::MoELayer<double>(cfg).execute(plan, x, moe::MoELayerWeights<double>{routed.view(), {}});
  CHECK(got.numel() == want.numel());
  CHECK(std::memcmp(got.data(), want.data(), sizeof(double) * std::size_t(got.numel())) == 0);
}
