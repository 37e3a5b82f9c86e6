// bench_expert_parallel: dist::ExpertParallelMoE under mpiexec, beside the single-process
// MoELayer on the same tokens. Run it as
//   mpiexec -n 1 bench_expert_parallel      (P = 1)
//   mpiexec -n 2 bench_expert_parallel      (P = 2, one core per rank: OMP_NUM_THREADS=1)
// Shapes: OLMoE-like (d 1024, F 512, E 64, k 8) and Mixtral-like (d 1024, F 2816, E 8, k 2),
// T tokens per rank (4096 by default), top-k routing, SwiGLU experts, no shared expert.
//
// Not a Google Benchmark binary: it picks its iteration counts per process, and ranks that ran
// different counts would wait forever in each other's collectives. Here every rank runs the same
// fixed number of repetitions (a warm-up, then --reps timed ones; the median is reported).
//
// Per shape and chunk count it prints, for rank 0 and as the maximum over ranks: tokens/s per
// rank and for all ranks together, and the forward time split into routing (router logits and
// top-k, done before forward), dispatch, expert compute and combine (ExpertParallelTimings),
// the expert compute rate in GFLOP/s, and the bytes each rank sent each way. With P = 1 it also
// times MoELayer::execute on the same plan (the work without any exchange).
//
// Options: --tokens N, --reps N, --chunks a,b,.. (default 1,4), --shape olmoe|mixtral|all.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <switchyard/dist/expert_parallel.hpp>
#include <switchyard/moe/layer.hpp>
#include <switchyard/moe/router.hpp>
#include <switchyard/moe/router_topk.hpp>
#include <vector>

using namespace switchyard;

namespace {

struct MoEShape {
  const char* name;
  std::int64_t d, F, E, k;
};

core::Tensor<float> random_tensor(std::vector<std::int64_t> shape, std::uint32_t seed,
                                  float scale) {
  core::Tensor<float> t(shape);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = u(gen);
  return t;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double max_over_ranks(double v) {
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return v;
}

void run_shape(const MoEShape& s, std::int64_t T, int reps, const std::vector<std::int64_t>& chunks,
               int rank, int ranks) {
  const moe::MoELayerConfig cfg{.d_model = s.d, .d_ff = s.F, .num_experts = s.E};
  const dist::ExpertPartition part{s.E, ranks};
  const std::int64_t n = part.size(rank);
  // Only this rank's experts are allocated (each rank draws its own; values do not matter).
  const auto w1 = random_tensor({n, s.F, s.d}, 10 + std::uint32_t(rank), 0.03f);
  const auto w3 = random_tensor({n, s.F, s.d}, 20 + std::uint32_t(rank), 0.03f);
  const auto w2 = random_tensor({n, s.d, s.F}, 30 + std::uint32_t(rank), 0.03f);
  const moe::MoELayerWeights<float> mine{
      {.w1 = w1.view<3>(), .w3 = w3.view<3>(), .w2 = w2.view<3>()}};
  const auto router_w = random_tensor({s.E, s.d}, 7, 0.05f);
  const auto x = random_tensor({T, s.d}, 100 + std::uint32_t(rank), 1.f);
  const moe::TopKRouter<float> router({.num_experts = s.E, .top_k = s.k});
  core::Tensor<float> logits({T, s.E}), y({T, s.d});
  moe::DispatchPlan<float> plan;

  for (const std::int64_t c : chunks) {
    dist::ExpertParallelMoE<float> layer(MPI_COMM_WORLD, {.layer = cfg, .chunks = c});
    std::vector<double> route_s, total_s, dispatch_s, compute_s, combine_s;
    dist::ExpertParallelTimings last{};
    for (int r = 0; r <= reps; ++r) {
      MPI_Barrier(MPI_COMM_WORLD);
      const double t0 = MPI_Wtime();
      moe::router_logits<float>(x, router_w, logits);
      router.route(logits, plan);
      const double t1 = MPI_Wtime();
      layer.forward(plan, x, mine, y.view<2>());
      if (r == 0) continue;  // warm-up
      last = layer.last_timings();
      route_s.push_back(t1 - t0);
      total_s.push_back(MPI_Wtime() - t0);
      dispatch_s.push_back(last.dispatch);
      compute_s.push_back(last.compute);
      combine_s.push_back(last.combine);
    }
    const double total = max_over_ranks(median(total_s));
    const double route = max_over_ranks(median(route_s));
    const double dispatch = max_over_ranks(median(dispatch_s));
    const double compute = max_over_ranks(median(compute_s));
    const double combine = max_over_ranks(median(combine_s));
    // Expert FLOPs this rank ran: rows through its experts, 3 GEMMs of 2 d F each.
    const double rows = double(last.rows_local + last.rows_received);
    const double gflops = rows * 6.0 * double(s.d * s.F) / median(compute_s) * 1e-9;
    const double min_gflops = -max_over_ranks(-gflops);
    const double sent_mb = max_over_ranks(double(last.rows_sent) * double(s.d) * 4.0 / 1e6);
    if (rank == 0) {
      std::printf(
          "%-8s P=%d chunks=%-3lld T/rank=%lld: %9.0f tokens/s per rank, %9.0f all ranks | "
          "time (max over ranks) %.3f s = route %.3f + dispatch %.3f + experts %.3f + combine "
          "%.3f | experts %.1f GFLOP/s (slowest rank) | sent %.1f MB each way (largest rank)\n",
          s.name, ranks, (long long)c, (long long)T, double(T) / total, double(T) * ranks / total,
          total, route, dispatch, compute, combine, min_gflops, sent_mb);
      std::fflush(stdout);
    }
  }

  if (ranks == 1) {  // the same work through MoELayer alone
    const moe::MoELayer<float> single(cfg);
    std::vector<double> t_s;
    for (int r = 0; r <= reps; ++r) {
      const double t0 = MPI_Wtime();
      moe::router_logits<float>(x, router_w, logits);
      router.route(logits, plan);
      single.execute(plan, x, mine, y.view<2>());
      if (r > 0) t_s.push_back(MPI_Wtime() - t0);
    }
    const double t = median(t_s);
    std::printf("%-8s MoELayer alone (route + execute): %9.0f tokens/s, %.3f s\n", s.name,
                double(T) / t, t);
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  std::int64_t T = 4096;
  int reps = 3;
  std::string shape = "all";
  std::vector<std::int64_t> chunks = {1, 4};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--tokens") {
      T = std::atoll(v.c_str());
    } else if (a == "--reps") {
      reps = std::atoi(v.c_str());
    } else if (a == "--shape") {
      shape = v;
    } else if (a == "--chunks") {
      chunks.clear();
      for (std::size_t p = 0; p < v.size();) {
        const std::size_t q = std::min(v.find(',', p), v.size());
        chunks.push_back(std::atoll(v.substr(p, q - p).c_str()));
        p = q + 1;
      }
    }
  }
  if (rank == 0)
    std::printf("bench_expert_parallel: %d rank(s), %lld tokens per rank, median of %d reps\n",
                ranks, (long long)T, reps);
  const MoEShape shapes[] = {{"olmoe", 1024, 512, 64, 8}, {"mixtral", 1024, 2816, 8, 2}};
  int rc = 0;
  try {
    for (const MoEShape& s : shapes)
      if (shape == "all" || shape == s.name)
        run_shape(s, T, std::max(reps, 1), chunks, rank, ranks);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    rc = 1;
  }
  MPI_Finalize();
  return rc;
}
