// The whole MoE pipeline on every MoE fixture: tokens x and the router weight go
// through router_logits, the fixture's router and the MoELayer, and the output must be
// the reference's y (within 1e-5 relative), with its balance loss. The router and layer
// tests check each half against the fixtures' intermediate tensors; this checks that
// the halves fit together (slot order, gate conventions, drops, shared experts).
#include <catch2/catch.hpp>
#include <cstdint>
#include <string>

#include "support/compare.hpp"
#include "support/fixtures.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/layer.hpp"
#include "switchyard/moe/router.hpp"
#include "switchyard/moe/router_capacity.hpp"
#include "switchyard/moe/router_expert_choice.hpp"
#include "switchyard/moe/router_gshard.hpp"
#include "switchyard/moe/router_noisy_topk.hpp"
#include "switchyard/moe/router_relu.hpp"
#include "switchyard/moe/router_topk.hpp"

namespace {
using namespace switchyard;
using test_support::max_abs;
using test_support::max_rel_err;
using test_support::to_double;

/// |got - want| <= 1e-5 * max(|want|, 1e-2 * max|want|) elementwise.
void require_close(const Tensor<float>& got, const Tensor<float>& want) {
  REQUIRE(got.numel() == want.numel());
  const auto g = to_double(got), w = to_double(want);
  const double err = max_rel_err(g, w, 1e-2 * max_abs(w));
  CAPTURE(err);
  REQUIRE(err <= 1e-5);
}

void require_close(double got, double want) {
  CAPTURE(got, want);
  REQUIRE(std::abs(got - want) <= 1e-5 * std::abs(want) + 1e-12);
}

/// The SwiGLU experts every fixture but noisy_topk uses, in the layer's layout.
struct SwigluFixture {
  Tensor<float> x, router_w, w1, w2, w3;
  explicit SwigluFixture(const io::SafeTensors& f, const std::string& prefix = "")
      : x(f.tensor<float>("x")),
        router_w(f.tensor<float>("router_w")),
        w1(f.tensor<float>(prefix + "w1")),
        w2(f.tensor<float>(prefix + "w2")),
        w3(f.tensor<float>(prefix + "w3")) {}
  // Every field, in declaration order (w1 gate, w3 up, w2 down, then the biases): gcc's
  // -Wmissing-field-initializers (-Wextra) also flags designated initialisers that leave some out.
  moe::ExpertWeights<float> experts() const {
    return {.w1 = w1, .w3 = w3, .w2 = w2, .b1 = {}, .b3 = {}, .b2 = {}};
  }
};

/// Routes the fixture's tokens with `router` and runs a SwiGLU layer over the plan.
template <class Router>
moe::DispatchPlan<float> route_and_check(const io::SafeTensors& f, const Router& router,
                                         const moe::ExpertWeights<float>* shared = nullptr,
                                         const SwigluFixture* shared_src = nullptr) {
  const SwigluFixture fx(f);
  const auto logits = moe::router_logits<float>(fx.x, fx.router_w);
  require_close(logits, f.tensor<float>("router_logits"));
  const auto plan = router.route(logits.view<2>());
  plan.check();
  const std::int64_t experts = fx.w1.extent(0);
  const moe::MoELayer<float> layer({.d_model = fx.x.extent(1),
                                    .d_ff = fx.w1.extent(1),
                                    .num_experts = experts,
                                    .num_shared_experts = shared ? shared_src->w1.extent(0) : 0});
  const auto y =
      layer.execute(plan, fx.x, {fx.experts(), shared ? *shared : moe::ExpertWeights<float>{}});
  require_close(y, f.tensor<float>("y"));
  return plan;
}

}  // namespace

TEST_CASE("MoE end to end: top-k token choice (Mixtral, OLMoE, shared expert)", "[moe][e2e]") {
  {
    const auto f = open_fixture("mixtral_topk_tiny.safetensors");
    const auto plan = route_and_check(f, moe::TopKRouter<float>({.num_experts = 4, .top_k = 2}));
    require_close(plan.stats.aux_loss, f.scalar<float>("aux_loss_megatron"));
    require_close(plan.stats.z_loss, f.scalar<float>("z_loss"));
  }
  {
    const auto f = open_fixture("olmoe_topk_tiny.safetensors");
    const auto plan = route_and_check(
        f, moe::TopKRouter<float>({.num_experts = 4, .top_k = 2, .renormalize = false}));
    require_close(plan.stats.aux_loss, f.scalar<float>("aux_loss_megatron"));
  }
  {
    const auto f = open_fixture("shared_expert_topk_tiny.safetensors");
    const SwigluFixture shared(f, "shared_");
    const auto sw = shared.experts();
    route_and_check(f, moe::TopKRouter<float>({.num_experts = 4, .top_k = 2, .renormalize = false}),
                    &sw, &shared);
  }
}

TEST_CASE("MoE end to end: capacity routers (Switch top-1, Megatron top-2, GShard)", "[moe][e2e]") {
  {
    const auto f = open_fixture("switch_top1_capacity_tiny.safetensors");
    const auto plan = route_and_check(
        f, moe::CapacityRouter<float>({.num_experts = 4, .top_k = 1, .capacity_factor = 1.0}));
    REQUIRE(plan.capacity == f.scalar<std::int64_t>("capacity"));
    REQUIRE(plan.stats.dropped == 2);
    require_close(plan.stats.aux_loss, f.scalar<float>("aux_loss"));
  }
  {
    const auto f = open_fixture("topk_capacity_tiny.safetensors");
    const auto plan = route_and_check(
        f, moe::CapacityRouter<float>(
               {.num_experts = 4, .top_k = 2, .capacity_factor = 1.0, .pre_softmax = false}));
    REQUIRE(plan.stats.dropped == 3);
    require_close(plan.stats.aux_loss, f.scalar<float>("aux_loss"));
  }
  {
    const auto f = open_fixture("gshard_top2_tiny.safetensors");
    const auto plan = route_and_check(f, moe::GShardTop2Router<float>({.num_experts = 4}));
    REQUIRE(plan.capacity == f.scalar<std::int64_t>("capacity"));
    REQUIRE(plan.stats.dropped == 3);
    require_close(plan.stats.aux_loss, f.scalar<float>("l_aux"));
  }
}

TEST_CASE("MoE end to end: expert choice and ReLU routing", "[moe][e2e]") {
  {
    const auto f = open_fixture("expert_choice_tiny.safetensors");
    const auto plan = route_and_check(
        f, moe::ExpertChoiceRouter<float>({.num_experts = 4, .capacity_factor = 1.0}));
    REQUIRE(plan.stats.tokens_without_expert == 2);
  }
  {
    const auto f = open_fixture("remoe_relu_tiny.safetensors");
    const auto plan =
        route_and_check(f, moe::ReluRouter<float>({.num_experts = 4, .topk_for_target = 2}));
    require_close(plan.stats.aux_loss, f.scalar<float>("l1_loss_unscaled"));
    require_close(moe::ReluRouter<float>::sparsity(plan), f.scalar<float>("sparsity"));
  }
}

TEST_CASE("MoE end to end: noisy top-k, eval and train with the recorded noise", "[moe][e2e]") {
  const auto f = open_fixture("noisy_topk_tiny.safetensors");
  const auto x = f.tensor<float>("x");
  const auto w_gate = f.tensor<float>("w_gate"), w_noise = f.tensor<float>("w_noise");
  const auto fc1_w = f.tensor<float>("fc1_w"), fc1_b = f.tensor<float>("fc1_b");
  const auto fc2_w = f.tensor<float>("fc2_w"), fc2_b = f.tensor<float>("fc2_b");
  const auto noise = f.tensor<float>("train_noise");
  const moe::NoisyTopKRouter<float> router({.num_experts = 4, .top_k = 2});
  const moe::MoELayer<float> layer({.d_model = x.extent(1),
                                    .d_ff = fc1_w.extent(1),
                                    .num_experts = 4,
                                    .activation = moe::Activation::relu,
                                    .output_softmax = true});
  const moe::MoELayerWeights<float> weights{
      .experts = {.w1 = fc1_w, .w3 = {}, .w2 = fc2_w, .b1 = fc1_b, .b3 = {}, .b2 = fc2_b},
      .shared = {}};
  const moe::NoisyTopKWeights<float> gate_w{.w_gate = w_gate, .w_noise = w_noise};

  const auto eval = router.route(x, gate_w);
  eval.check();
  require_close(layer.execute(eval, x, weights), f.tensor<float>("y"));
  require_close(eval.stats.aux_loss_scaled, f.scalar<float>("loss"));  // times loss_coef

  const auto train = router.route(x, gate_w, {}, moe::NoisyMode::train,
                                  moe::NoisyTopKNoise<float>{.normal = noise});
  train.check();
  require_close(layer.execute(train, x, weights), f.tensor<float>("train_y"));
  require_close(train.stats.aux_loss_scaled, f.scalar<float>("train_loss"));
}
