// token_pruning: SpAtten cascade token and head pruning in a three-layer ViT-like stack (ViT-Ti
// width: 197 tokens = class token + 14x14 patches, C = 192, 3 heads of 64) on random weights.
// Each layer's attention also returns the attention mass every token received (summed over heads
// and queries) and computes only the heads still active; after the layer, the tokens with the
// lowest accumulated mass and the heads with the smallest accumulated output magnitude are
// pruned for all later layers. Prints per layer the tokens and heads computed and the attention
// FLOPs, which fall layer by layer.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <switchyard/attention/dense.hpp>
#include <switchyard/core/gemm.hpp>
#include <switchyard/tokens/prune_cascade.hpp>
#include <vector>

int main() {
  using namespace switchyard;
  using core::Trans;
  const std::int64_t B = 1, N0 = 197, C = 192, H = 3, D = C / H, layers = 3;
  std::mt19937 gen(0);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const auto random = [&](std::initializer_list<std::int64_t> shape, float sd) {
    Tensor<float> t(shape);
    for (auto& v : t) v = sd * nd(gen);
    return t;
  };
  struct Layer {
    Tensor<float> qkv, proj, fc1, fc2;  // [3C, C], [C, C], [4C, C], [C, 4C]
  };
  std::vector<Layer> w;
  for (std::int64_t l = 0; l < layers; ++l)
    w.push_back({random({3 * C, C}, 1.0f / std::sqrt(float(C))),
                 random({C, C}, 1.0f / std::sqrt(float(C))),
                 random({4 * C, C}, 1.0f / std::sqrt(float(C))),
                 random({C, 4 * C}, 0.5f / std::sqrt(float(C)))});
  Tensor<float> x = random({B, N0, C}, 1.0f);

  const attention::DenseAttention<float> attn;
  // Keep 70% of the tokens (class token protected) and 60% of the active heads after each layer.
  const tokens::CascadeTokenPruner<float> token_pruner({.keep_ratio = 0.7, .class_token = true});
  const tokens::CascadeHeadPruner<float> head_pruner({.keep_ratio = 0.6});
  auto token_state = tokens::TokenImportance<float>::start(B, N0);
  auto head_state = tokens::HeadImportance<float>::start(B, H);
  auto composed = tokens::TokenKeepPlan::identity(B, N0);

  std::printf("SpAtten cascade pruning: %lld layers, N = %lld tokens, C = %lld, %lld heads\n",
              (long long)layers, (long long)N0, (long long)C, (long long)H);
  std::printf("layer  tokens  heads  attention MFLOP  layer MFLOP  key mass / (N x heads)\n");
  const auto t0 = std::chrono::steady_clock::now();
  for (std::int64_t l = 0; l < layers; ++l) {
    const std::int64_t N = x.extent(1), heads = head_state.num_active(0);
    const ConstView<float, 2> x2(x.data(), {B * N, C});
    // Q, K, V: views into one [B * N, 3C] projection.
    Tensor<float> qkv({B * N, 3 * C});
    core::gemm<float>(x2, Trans::no, w[l].qkv, Trans::yes, qkv.view<2>());
    const auto part = [&](std::int64_t i) {
      return ConstView<float, 4>(qkv.data() + i * C, {B, N, H, D}, {N * 3 * C, 3 * C, D, 1});
    };
    // Attention over the live tokens and active heads, with each token's attention mass.
    Tensor<float> heads_out({B, N, H, D}), mass({B, H, N});
    attention::ForwardOptions<float> opts;
    opts.key_mass = mass.view<3>();
    opts.active_heads = head_state.active;
    attn.forward(part(0), part(1), part(2), heads_out.view<4>(), {}, opts);
    double mass_total = 0;
    for (float m : mass) mass_total += m;
    // Output projection, MLP (GELU), residuals.
    core::gemm<float>(ConstView<float, 2>(heads_out.data(), {B * N, C}), Trans::no, w[l].proj,
                      Trans::yes, View<float, 2>(x.data(), {B * N, C}), 1.0f, 1.0f);
    Tensor<float> hidden({B * N, 4 * C});
    core::gemm<float>(x2, Trans::no, w[l].fc1, Trans::yes, hidden.view<2>());
    for (auto& v : hidden) v = 0.5f * v * (1.0f + std::erf(v / std::sqrt(2.0f)));
    core::gemm<float>(hidden, Trans::no, w[l].fc2, Trans::yes, View<float, 2>(x.data(), {B * N, C}),
                      1.0f, 1.0f);

    // FLOPs: Q K^T and P V over the active heads; the whole layer adds the projections and MLP.
    const double attn_flops = 4.0 * double(B * N * N * D * heads);
    const double layer_flops = attn_flops + 2.0 * double(B * N * C * (3 * C + C + 8 * C));
    std::printf("%5lld  %6lld  %5lld  %15.2f  %11.2f  %.6f\n", (long long)l, (long long)N,
                (long long)heads, attn_flops * 1e-6, layer_flops * 1e-6,
                mass_total / double(N * heads));

    // Prune for the next layers: tokens by accumulated attention mass, heads by accumulated
    // output magnitude; the plan gathers the surviving tokens in their original order.
    const tokens::TokenKeepPlan plan = token_pruner.prune(token_state, mass);
    head_pruner.prune(head_state, heads_out);
    x = plan.gather(x);
    composed = composed.then(plan);
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("after %lld layers: %lld of %lld tokens and %lld of %lld heads remain (%.1f ms)\n",
              (long long)layers, (long long)token_state.num_tokens, (long long)N0,
              (long long)head_state.num_active(0), (long long)H, ms);
  std::printf("surviving original tokens (first 12):");
  for (std::int64_t i = 0; i < std::min<std::int64_t>(12, composed.num_kept); ++i)
    std::printf(" %lld", (long long)composed.original[std::size_t(i)]);
  std::printf("\nthe class token (position 0) survives every layer, first: %s\n",
              composed.original[0] == 0 ? "OK" : "NO");
  return composed.original[0] == 0 ? 0 : 1;
}
