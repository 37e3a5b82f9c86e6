// expert_parallel: one MoE layer spread over MPI ranks (run with `mpiexec -n 2 expert_parallel`;
// `demo` does). 8 SwiGLU experts of width 64 -> 128 plus one shared expert; every rank holds
// only its own experts (E / P each), routes its own 96 tokens with top-2, and runs the layer
// through dist::ExpertParallelMoE. Each rank prints its experts, how many of its (token, expert)
// pairs stay home or travel, how many rows it computed for other ranks, and the largest
// difference from the single-process MoELayer with all experts on the same tokens: 0, because
// the expert-parallel layer sums every token in the same order. Exits 1 otherwise.
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <switchyard/dist/expert_parallel.hpp>
#include <switchyard/moe/layer.hpp>
#include <switchyard/moe/router.hpp>
#include <switchyard/moe/router_topk.hpp>
#include <vector>

using namespace switchyard;

namespace {

constexpr std::int64_t T = 96, d = 64, F = 128, E = 8, k = 2;

core::Tensor<float> random_tensor(std::vector<std::int64_t> shape, std::uint32_t seed,
                                  float scale) {
  core::Tensor<float> t(shape);
  std::mt19937 gen(seed);
  std::normal_distribution<float> n(0.f, scale);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = n(gen);
  return t;
}

int run(int rank, int ranks) {
  // Every rank draws the same router and experts from the same seeds; in a real model each
  // rank would load only its own experts from the checkpoint (io::Checkpoint opens shards lazily).
  const auto w1 = random_tensor({E, F, d}, 1, 0.125f), w3 = random_tensor({E, F, d}, 2, 0.125f);
  const auto w2 = random_tensor({E, d, F}, 3, 0.09f);
  const auto s1 = random_tensor({1, F, d}, 4, 0.125f), s3 = random_tensor({1, F, d}, 5, 0.125f);
  const auto s2 = random_tensor({1, d, F}, 6, 0.09f);
  const auto router_w = random_tensor({E, d}, 7, 0.125f);
  const auto x = random_tensor({T, d}, 100 + std::uint32_t(rank), 1.f);  // this rank's tokens

  const moe::MoELayerConfig cfg{.d_model = d, .d_ff = F, .num_experts = E, .num_shared_experts = 1};
  dist::ExpertParallelMoE<float> layer(MPI_COMM_WORLD,
                                       {.layer = cfg, .router_fingerprint = "topk k=2"});
  const std::int64_t b = layer.expert_begin(), n = layer.local_experts();

  // Route locally (the router is replicated), then run the experts wherever they live.
  core::Tensor<float> logits({T, E});
  moe::router_logits<float>(x, router_w, logits);
  moe::DispatchPlan<float> plan;
  moe::TopKRouter<float>({.num_experts = E, .top_k = k}).route(logits, plan);

  moe::ExpertWeights<float> mine;  // zero-copy views of this rank's experts [b, b + n)
  mine.w1 = ConstView<float, 3>(w1.data() + b * F * d, {n, F, d});
  mine.w3 = ConstView<float, 3>(w3.data() + b * F * d, {n, F, d});
  mine.w2 = ConstView<float, 3>(w2.data() + b * d * F, {n, d, F});
  const moe::ExpertWeights<float> shared{
      .w1 = s1.view<3>(), .w3 = s3.view<3>(), .w2 = s2.view<3>()};
  const core::Tensor<float> y = layer.forward(plan, x, moe::MoELayerWeights<float>{mine, shared});

  // The single-process layer with all experts, on the same tokens and plan.
  const moe::ExpertWeights<float> all{.w1 = w1.view<3>(), .w3 = w3.view<3>(), .w2 = w2.view<3>()};
  const core::Tensor<float> want =
      moe::MoELayer<float>(cfg).execute(plan, x, moe::MoELayerWeights<float>{all, shared});
  double diff = 0;
  for (std::int64_t i = 0; i < y.numel(); ++i)
    diff = std::max(diff, double(std::abs(y.data()[i] - want.data()[i])));

  // Each rank's line, gathered to rank 0 so they print in rank order.
  const auto& tm = layer.last_timings();
  char line[320];
  std::snprintf(
      line, sizeof line,
      "rank %d of %d: experts [%lld, %lld); %lld tokens, %lld (token, expert) pairs: %lld "
      "stay here, %lld sent away; computed %lld rows for other ranks; max |y - "
      "single-process y| = %g",
      rank, ranks, (long long)b, (long long)(b + n), (long long)T, (long long)plan.nnz(),
      (long long)tm.rows_local, (long long)tm.rows_sent, (long long)tm.rows_received, diff);
  std::vector<char> lines(rank == 0 ? sizeof line * std::size_t(ranks) : 0);
  MPI_Gather(line, sizeof line, MPI_CHAR, lines.data(), sizeof line, MPI_CHAR, 0, MPI_COMM_WORLD);
  for (int r = 0; r < (rank == 0 ? ranks : 0); ++r) std::printf("%s\n", &lines[sizeof line * r]);
  const moe::RouterStats g = layer.global_stats(plan.stats);
  if (rank == 0) {
    std::printf("global batch: %lld tokens; tokens per expert:", (long long)g.routed_tokens);
    for (const auto c : g.tokens_per_expert) std::printf(" %lld", (long long)c);
    std::printf("\n");
  }
  return diff == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  int rc = 1;
  try {
    rc = run(rank, ranks);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
  }
  MPI_Allreduce(MPI_IN_PLACE, &rc, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return rc;
}
