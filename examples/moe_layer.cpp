// A small Mixture-of-Experts layer (d 64, SwiGLU experts of width 128, 8 experts,
// 512 tokens) run with each router on the same router logits. Route, then execute:
// every router returns a DispatchPlan; the same MoELayer executes any of them.
// Prints per router: pairs routed, dropped pairs, tokens left without an expert,
// capacity (and whether it was clamped), load per expert, losses, and the output norm.
#include <cmath>
#include <cstdio>
#include <string>
#include <switchyard/moe/layer.hpp>
#include <switchyard/moe/plan_json.hpp>
#include <switchyard/moe/router_capacity.hpp>
#include <switchyard/moe/router_expert_choice.hpp>
#include <switchyard/moe/router_gshard.hpp>
#include <switchyard/moe/router_hash.hpp>
#include <switchyard/moe/router_noisy_topk.hpp>
#include <switchyard/moe/router_relu.hpp>
#include <switchyard/moe/router_top_p.hpp>
#include <switchyard/moe/router_topk.hpp>
#include <vector>

using namespace switchyard;

namespace {

void report(const char* router, const moe::DispatchPlan<float>& plan,
            const core::Tensor<float>& y) {
  const auto& s = plan.stats;
  std::string load;
  for (const auto n : s.kept_per_expert) load += " " + std::to_string(n);
  double norm = 0;
  for (const float v : y) norm += double(v) * v;
  std::printf("%-18s pairs %5lld  dropped %4lld  no-expert %3lld  capacity %4lld%s\n", router,
              (long long)plan.nnz(), (long long)s.dropped, (long long)s.tokens_without_expert,
              (long long)plan.capacity, plan.capacity_clamped ? " (clamped)" : "");
  std::printf("%-18s load per expert:%s\n", "", load.c_str());
  std::printf("%-18s aux %.4f  z %.3f  entropy %.3f nats  |y| %.3f\n", "", s.aux_loss, s.z_loss,
              s.entropy, std::sqrt(norm));
}

}  // namespace

int main() {
  const std::int64_t T = 512, d = 64, F = 128, E = 8, k = 2;
  core::Tensor<float> x({T, d}), router_w({E, d}), w1({E, F, d}), w3({E, F, d}), w2({E, d, F});
  core::fill_normal(x, /*seed=*/1);
  core::fill_normal(router_w, /*seed=*/2);
  for (auto& v : router_w) v *= 0.15f;  // logits of unit scale, like a trained router's
  for (auto* w : {&w1, &w3, &w2}) {
    core::fill_normal(*w, /*seed=*/3 + (w == &w3) + 2 * (w == &w2));
    for (auto& v : *w) v *= 0.1f;
  }
  // Router logits [T, E] = x router_w^T (nn.Linear layout [out, in]).
  const auto logits = moe::router_logits<float>(x, router_w);

  const moe::MoELayer<float> layer({.d_model = d, .d_ff = F, .num_experts = E});
  const moe::MoELayerWeights<float> weights{.experts = {.w1 = w1, .w3 = w3, .w2 = w2}};
  const auto run = [&](const char* name, const moe::DispatchPlan<float>& plan) {
    plan.check();  // no expert over capacity, indices in range, no duplicate pair
    report(name, plan, layer.execute(plan, x, weights));
  };

  std::printf("MoE layer: T %lld tokens, d %lld, %lld SwiGLU experts of width %lld\n\n",
              (long long)T, (long long)d, (long long)E, (long long)F);
  run("topk (Mixtral)", moe::TopKRouter<float>({.num_experts = E, .top_k = k}).route(logits));
  run("topk (OLMoE)",
      moe::TopKRouter<float>({.num_experts = E, .top_k = k, .renormalize = false}).route(logits));
  run("switch top-1",
      moe::CapacityRouter<float>({.num_experts = E, .top_k = 1, .capacity_factor = 1.0})
          .route(logits));
  run("megatron top-2",
      moe::CapacityRouter<float>({.num_experts = E, .top_k = k, .capacity_factor = 1.25})
          .route(logits));
  run("gshard top-2", moe::GShardTop2Router<float>({.num_experts = E}).route(logits));
  run("expert choice",
      moe::ExpertChoiceRouter<float>({.num_experts = E, .capacity_factor = 2.0}).route(logits));
  run("relu (ReMoE)",
      moe::ReluRouter<float>({.num_experts = E, .topk_for_target = k}).route(logits));
  run("noisy top-k (eval)",
      moe::NoisyTopKRouter<float>({.num_experts = E, .top_k = k}).route(logits));
  run("top-p 0.5", moe::TopPRouter<float>({.num_experts = E, .threshold = 0.5}).route(logits));
  std::vector<std::int64_t> token_ids(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) token_ids[t] = (t * 7919) % 32000;
  run("hash", moe::HashRouter<float>({.num_experts = E, .top_k = 1}).route(token_ids));

  // Padding: the last 100 tokens are masked; they are never routed, output 0, and the
  // statistics and losses cover the 412 real tokens only.
  std::vector<std::uint8_t> keep(static_cast<std::size_t>(T), 1);
  std::fill(keep.end() - 100, keep.end(), std::uint8_t{0});
  const moe::TokenMask mask{keep};
  const auto padded = moe::TopKRouter<float>({.num_experts = E, .top_k = k}).route(logits, mask);
  std::printf("\nwith 100 padding tokens: routed %lld tokens, pairs %lld\n",
              (long long)padded.stats.routed_tokens, (long long)padded.nnz());

  // Plans export to JSON for inspection outside C++.
  const auto small = moe::TopKRouter<float>({.num_experts = E, .top_k = k})
                         .route(ConstView<float, 2>(logits.data(), {2, E}));
  std::printf("\nthe plan of the first two tokens as JSON:\n%s\n",
              moe::to_json_string(small, -1).c_str());
}
