// Routing Transformer k-means attention on random data: initialise the centroids,
// route (inspect the plan: cluster sizes, tokens in no cluster, tokens in several),
// run the attention, take one EMA centroid step; then separate Q/K with the
// reference's per-cluster memory key/value and a padding mask, and the causal-safe
// nearest_centroid selection.
#include <cmath>
#include <cstdio>
#include <switchyard/attention/routing_kmeans.hpp>
#include <vector>

using namespace switchyard;

int main() {
  const std::int64_t B = 1, T = 1024, H = 4, D = 64;
  core::Tensor<float> q({B, T, H, D}), v({B, T, H, D});
  core::fill_normal(q, /*seed=*/1);
  core::fill_normal(v, /*seed=*/2);

  const std::int64_t C = attention::default_num_clusters(T);  // ~sqrt(T) = 32
  const attention::RoutingAttention<float> attn(
      {.num_clusters = C, .window_size = T / C, .causal = true});
  auto state = attn.init_state(q, {}, /*seed=*/7);

  const auto routing = attn.route(q, {}, state);
  std::printf("T = %lld tokens, %lld heads, %lld clusters of window %lld (cost O(T^1.5 D))\n",
              (long long)T, (long long)H, (long long)C, (long long)(T / C));
  for (std::int64_t h = 0; h < H; ++h) {
    // Windows are always full (top-w per cluster); what varies is how tokens are
    // covered, and how many tokens pick each cluster as their nearest (buckets).
    std::vector<int> count(static_cast<std::size_t>(T), 0),
        bucket_size(static_cast<std::size_t>(C), 0);
    for (std::int64_t i = 0; i < C * (T / C); ++i) ++count[std::size_t(routing.indices(0, h, i))];
    for (std::int64_t t = 0; t < T; ++t) ++bucket_size[std::size_t(routing.buckets(0, h, t))];
    int none = 0, several = 0, max_count = 0;
    for (const int c : count) {
      none += c == 0;
      several += c > 1;
      max_count = std::max(max_count, c);
    }
    int smallest = int(T), largest = 0;
    for (const int s : bucket_size) {
      smallest = std::min(smallest, s);
      largest = std::max(largest, s);
    }
    std::printf(
        "head %lld: tokens in no cluster %d (%.1f%%), in several %d (max %d); nearest-centroid "
        "cluster sizes %d..%d\n",
        (long long)h, none, 100.0 * none / double(T), several, max_count, smallest, largest);
  }
  core::Tensor<float> out({B, T, H, D});
  const double aux = attn.forward(q, v, state, out);
  std::printf("commitment loss %.4g; out[0, 0, 0, 0..3] = %.4f %.4f %.4f %.4f\n", aux,
              out(0, 0, 0, 0), out(0, 0, 0, 1), out(0, 0, 0, 2), out(0, 0, 0, 3));
  attn.update_centroids(state, q);  // training step: EMA with decay 0.999
  std::printf("centroids updated (EMA); state [H=%lld, C=%lld, D=%lld]\n",
              (long long)state.means.extent(0), (long long)state.means.extent(1),
              (long long)state.means.extent(2));

  // Separate Q/K, causal: the reference always adds (at least) one memory key/value
  // per head and cluster, [H, C, M, D] (learnt parameters; random here).
  core::Tensor<float> k({B, T, H, D});
  core::fill_normal(k, /*seed=*/3);
  const attention::RoutingAttention<float> sep(
      {.num_clusters = C, .window_size = T / C, .causal = true, .shared_qk = false});
  const std::int64_t M = sep.memory_kv();  // max(num_mem_kv, 1) = 1
  core::Tensor<float> mem_k({H, C, M, D}), mem_v({H, C, M, D});
  core::fill_normal(mem_k, /*seed=*/4);
  core::fill_normal(mem_v, /*seed=*/5);
  std::vector<std::uint8_t> keep(static_cast<std::size_t>(B * T), 1);
  for (std::int64_t t = T - 100; t < T; ++t) keep[std::size_t(t)] = 0;  // 100 padding tokens
  const auto sep_state = sep.init_state(q, k, /*seed=*/7);
  sep.forward(q, k, v, sep_state, out, {.mem_key = mem_k, .mem_value = mem_v, .query_mask = keep});
  double mean_abs = 0;
  for (const float x : out) mean_abs += std::abs(double(x)) / double(out.numel());
  std::printf("separate QK + %lld memory key/value per cluster + padding mask: mean |out| = %.4f\n",
              (long long)M, mean_abs);

  // nearest_centroid: every token in exactly one cluster; with causal = true no output
  // depends on a later token (the top-w windows above do not guarantee that).
  const attention::RoutingAttention<float> nearest(
      {.num_clusters = C,
       .causal = true,
       .selection = attention::RoutingSelection::nearest_centroid});
  nearest.forward(q, v, state, out);
  std::printf("nearest_centroid: out[0, 0, 0, 0] = %.4f (token 0 sees only itself)\n",
              out(0, 0, 0, 0));
  return 0;
}
