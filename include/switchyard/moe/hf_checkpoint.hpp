#pragma once
// MoE blocks of Hugging Face checkpoints, loaded without copies: the router weight and every
// expert projection are zero-copy views into the mapped shards (io::Checkpoint), one view per
// expert (ExpertWeights::w1_each ...), in the stored element type (float, or bf16 / f16 that
// the layer widens while packing). Only DeepSeek-V3's per-expert score bias (E numbers) is
// copied into float.
//
// Tensor names per family (prefix = the block, e.g. "model.layers.3.mlp"; [out, in] layout;
// E experts, d = hidden_size, F = the experts' intermediate size, Fs = the shared one):
//   mixtral      prefix = ...block_sparse_moe
//                gate.weight [E, d]; experts.{i}.w1.weight [F, d] (gate), w3 [F, d] (up),
//                w2 [d, F] (down)
//   olmoe,       prefix = ...mlp
//   qwen3_moe    gate.weight [E, d]; experts.{i}.gate_proj.weight [F, d], up_proj [F, d],
//                down_proj [d, F]
//   qwen2_moe    as olmoe, plus shared_expert.{gate,up,down}_proj.weight ([Fs, d], [Fs, d],
//                [d, Fs]) and shared_expert_gate.weight [1, d]: the shared expert's output is
//                scaled by sigmoid(x . shared_expert_gate)
//   deepseek_v2, as olmoe, plus shared_experts.{gate,up,down}_proj.weight (all shared experts
//   deepseek_v3  merged into one MLP of width Fs = n_shared_experts * moe_intermediate_size,
//                ungated); deepseek_v3 also gate.e_score_correction_bias [E] (the selection-only
//                bias of GroupedTopKRouter)
// Routing (HFRouting) comes from config.json with the families' own field names and defaults,
// or is given explicitly.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/linear.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/io/checkpoint.hpp"
#include "switchyard/moe/experts.hpp"
#include "switchyard/moe/layer.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router_grouped_topk.hpp"
#include "switchyard/moe/router_topk.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

/// Hugging Face MoE model families whose block layouts load_hf_moe_block knows.
enum class HFFamily { mixtral, olmoe, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3 };

/// The family's config.json "model_type" ("mixtral", "olmoe", "qwen2_moe", ...).
inline constexpr std::string_view hf_family_name(HFFamily f) noexcept {
  switch (f) {
    case HFFamily::mixtral:
      return "mixtral";
    case HFFamily::olmoe:
      return "olmoe";
    case HFFamily::qwen2_moe:
      return "qwen2_moe";
    case HFFamily::qwen3_moe:
      return "qwen3_moe";
    case HFFamily::deepseek_v2:
      return "deepseek_v2";
    case HFFamily::deepseek_v3:
      return "deepseek_v3";
  }
  return "?";
}

/// The family of a config.json "model_type", or nullopt for one this loader does not know.
inline std::optional<HFFamily> parse_hf_family(std::string_view model_type) noexcept {
  for (HFFamily f : {HFFamily::mixtral, HFFamily::olmoe, HFFamily::qwen2_moe, HFFamily::qwen3_moe,
                     HFFamily::deepseek_v2, HFFamily::deepseek_v3})
    if (hf_family_name(f) == model_type) return f;
  return std::nullopt;
}

/// How a block routes. Mixtral, OLMoE and Qwen: softmax over all experts, top_k, weights
/// renormalised when norm_topk_prob (Mixtral always). DeepSeek: GroupedTopKRouter with
/// n_group / topk_group, softmax (V2) or sigmoid (V3) scores, routed_scaling_factor.
struct HFRouting {
  std::int64_t top_k = 0;  ///< num_experts_per_tok
  bool norm_topk_prob = true;
  ScoreFunc score_func = ScoreFunc::softmax;
  std::int64_t n_group = 1;
  std::int64_t topk_group = 1;
  double routed_scaling_factor = 1.0;
};

/// Routing of `family` from a parsed config.json, with the defaults of the family's
/// transformers config class for absent optional fields (num_experts_per_tok is required;
/// DeepSeek-V2: topk_method "greedy", norm_topk_prob false, routed_scaling_factor 1, and
/// n_group / topk_group required by the grouped methods; DeepSeek-V3: sigmoid, n_group 8,
/// topk_group 4, norm_topk_prob true, routed_scaling_factor 2.5). DeepSeek's scoring_func
/// ("softmax" / "sigmoid") and topk_method ("greedy", "group_limited_greedy", "noaux_tc") are
/// read when present. Throws config_error naming the field for a missing, ill-typed or
/// unknown value.
inline HFRouting hf_routing_from_config(HFFamily family, const nlohmann::json& config) {
  constexpr std::string_view layer = "load_hf_moe_block", fn = "config.json";
  const auto number = [&](const char* field, std::optional<double> fallback) -> double {
    const auto it = config.find(field);
    if (it == config.end() || it->is_null()) {
      if (fallback) return *fallback;
      switchyard::detail::fail_config(
          layer, fn, field, std::string("missing"),
          "a number (required for " + std::string(hf_family_name(family)) + ")");
    }
    if (!it->is_number()) switchyard::detail::fail_config(layer, fn, field, it->dump(), "a number");
    return it->get<double>();
  };
  const auto integer = [&](const char* field, std::optional<double> fallback) {
    const double v = number(field, fallback);
    if (!(v >= 1 && v <= 1e9) || v != std::floor(v))
      switchyard::detail::fail_config(layer, fn, field, v, "a positive integer");
    return static_cast<std::int64_t>(v);
  };
  const auto flag = [&](const char* field, bool fallback) {
    const auto it = config.find(field);
    if (it == config.end() || it->is_null()) return fallback;
    if (!it->is_boolean())
      switchyard::detail::fail_config(layer, fn, field, it->dump(), "true or false");
    return it->get<bool>();
  };
  // A string field that must be one of `allowed` when present (an unknown method is an
  // error, never silently another one).
  const auto choice = [&](const char* field, const char* fallback,
                          std::initializer_list<std::string_view> allowed) -> std::string {
    const auto it = config.find(field);
    if (it == config.end() || it->is_null()) return fallback;
    if (it->is_string())
      for (std::string_view a : allowed)
        if (it->get<std::string>() == a) return std::string(a);
    std::string want;
    for (std::string_view a : allowed)
      want += (want.empty() ? "\"" : ", \"") + std::string(a) + "\"";
    switchyard::detail::fail_config(layer, fn, field, it->dump(), "one of " + want);
  };
  HFRouting r;
  r.top_k = integer("num_experts_per_tok", std::nullopt);
  switch (family) {
    case HFFamily::mixtral:
      r.norm_topk_prob = true;  // MixtralSparseMoeBlock always renormalises
      break;
    case HFFamily::olmoe:
    case HFFamily::qwen2_moe:
    case HFFamily::qwen3_moe:
      r.norm_topk_prob = flag("norm_topk_prob", false);
      break;
    case HFFamily::deepseek_v2:
    case HFFamily::deepseek_v3: {
      // Defaults of transformers' DeepseekV2Config / DeepseekV3Config; scoring_func and
      // topk_method are fields of DeepSeek's own config classes, read when present.
      const bool v3 = family == HFFamily::deepseek_v3;
      r.norm_topk_prob = flag("norm_topk_prob", v3);
      const std::string scoring =
          choice("scoring_func", v3 ? "sigmoid" : "softmax", {"softmax", "sigmoid"});
      r.score_func = scoring == "sigmoid" ? ScoreFunc::sigmoid : ScoreFunc::softmax;
      // "greedy" top-k ignores the groups; group_limited_greedy and noaux_tc use them.
      const std::string method = choice("topk_method", v3 ? "noaux_tc" : "greedy",
                                        {"greedy", "group_limited_greedy", "noaux_tc"});
      const bool greedy = method == "greedy";
      const std::optional<double> no_default;  // V2 has none: grouped methods need them
      r.n_group = greedy ? 1 : integer("n_group", v3 ? std::optional(8.0) : no_default);
      r.topk_group = greedy ? 1 : integer("topk_group", v3 ? std::optional(4.0) : no_default);
      r.routed_scaling_factor = number("routed_scaling_factor", v3 ? 2.5 : 1.0);
      if (!(r.routed_scaling_factor > 0) || !std::isfinite(r.routed_scaling_factor))
        switchyard::detail::fail_config(layer, fn, "routed_scaling_factor", r.routed_scaling_factor,
                                        "finite and > 0");
      break;
    }
  }
  return r;
}

/// One MoE block of a checkpoint: zero-copy views of its weights (element type W: float, or
/// bf16 / f16) and how it routes. Valid while the io::Checkpoint it came from lives.
template <class W>
struct HFMoEBlock {
  HFFamily family = HFFamily::mixtral;
  std::string prefix;
  ConstView<W, 2> router_weight{};  ///< [E, d]: router logits = x router_weight^T
  core::Tensor<float> score_bias;   ///< [E] DeepSeek-V3 e_score_correction_bias, else empty
  MoELayerWeights<W> weights{};     ///< experts (one view each) and shared experts
  MoELayerConfig layer_config{};    ///< d, F, E, swiglu, shared experts
  HFRouting routing{};

  /// y [T, d] = the block's output for x [T, d] (router logits, routing, experts, shared
  /// experts); no residual. plan_out: optional, receives the routing (choices per token).
  /// Throws shape_error for x / y shapes, and the router's and layer's errors.
  void forward(ConstView<float, 2> x, View<float, 2> y, DispatchPlan<float>* plan_out = nullptr,
               View<float, 2> logits_out = {}) const {
    const std::int64_t E = layer_config.num_experts;
    core::detail::check_shape("HFMoEBlock", "forward", "x", x, {"T", "D"},
                              {-1, layer_config.d_model}, "D = hidden_size");
    core::Tensor<float> logits_buf;
    View<float, 2> logits = logits_out;
    if (logits.empty()) {
      logits_buf = core::Tensor<float>({x.extent(0), E});
      logits = logits_buf.view<2>();
    }
    core::linear(x, router_weight, logits);
    DispatchPlan<float> local;
    DispatchPlan<float>& plan = plan_out ? *plan_out : local;
    if (grouped()) {
      GroupedTopKRouter<float> router(grouped_router_config());
      if (score_bias.numel() > 0)
        router.route(logits, std::span<const float>(score_bias.data(), std::size_t(E)), plan);
      else
        router.route(logits, plan);
    } else {
      TopKRouter<float>(topk_router_config()).route(logits, plan);
    }
    MoELayer<float>(layer_config).execute(plan, x, weights, y);
  }

  /// Throws config_error when the routing does not fit the block's experts (the router's own
  /// checks: top_k, n_group dividing E, topk_group, routed_scaling_factor).
  void check_routing() const {
    if (grouped())
      GroupedTopKRouter<float>{grouped_router_config()};
    else
      TopKRouter<float>{topk_router_config()};
  }

 private:
  bool grouped() const noexcept {
    return family == HFFamily::deepseek_v2 || family == HFFamily::deepseek_v3;
  }
  GroupedTopKRouterConfig grouped_router_config() const {
    return {.num_experts = layer_config.num_experts,
            .top_k = routing.top_k,
            .n_group = routing.n_group,
            .topk_group = routing.topk_group,
            .score_func = routing.score_func,
            .norm_topk_prob = routing.norm_topk_prob,
            .routed_scaling_factor = routing.routed_scaling_factor};
  }
  TopKRouterConfig topk_router_config() const {
    return {.num_experts = layer_config.num_experts,
            .top_k = routing.top_k,
            .renormalize = routing.norm_topk_prob};
  }
};

namespace detail {

/// The view of `name` as [rows, cols] (-1: any) of element type W; errors name the tensor.
template <class W>
ConstView<W, 2> hf_matrix(const io::Checkpoint& ckpt, const std::string& name, std::int64_t rows,
                          std::int64_t cols, const char* what) {
  if (!ckpt.contains(name)) {
    throw switchyard::error("load_hf_moe_block: tensor " + name + " (" + what +
                            ") is missing from the checkpoint " + ckpt.directory().string());
  }
  const io::TensorInfo& info = ckpt.info(name);
  if (info.dtype != io::dtype_of<W>()) {
    switchyard::detail::fail_shape("load_hf_moe_block", "load", name,
                                   std::string(io::dtype_name(info.dtype)) + " " +
                                       switchyard::detail::format_shape(info.shape),
                                   std::string(io::dtype_name(io::dtype_of<W>())),
                                   "load the block with the checkpoint's element type");
  }
  const bool ok = info.shape.size() == 2 && (rows < 0 || info.shape[0] == rows) &&
                  (cols < 0 || info.shape[1] == cols);
  if (!ok) {
    const std::string want = "[" + (rows < 0 ? std::string("any") : std::to_string(rows)) + ", " +
                             (cols < 0 ? std::string("any") : std::to_string(cols)) + "]";
    switchyard::detail::fail_shape("load_hf_moe_block", "load", name,
                                   switchyard::detail::format_shape(info.shape), want, what);
  }
  return ckpt.view<W, 2>(name);
}

}  // namespace detail

/// Loads the MoE block at `prefix` (see the file comment for each family's names) with the
/// given routing. E is the router's row count; every expert 0..E-1 must be present.
/// Throws switchyard::error naming a missing tensor, shape_error naming a tensor with the
/// wrong shape or dtype (both shapes), config_error for routing that does not fit E (top_k,
/// and for DeepSeek n_group dividing E and 1 <= topk_group <= n_group).
template <class W>
HFMoEBlock<W> load_hf_moe_block(const io::Checkpoint& ckpt, std::string_view prefix,
                                HFFamily family, const HFRouting& routing) {
  const std::string p(prefix);
  HFMoEBlock<W> b;
  b.family = family;
  b.prefix = p;
  b.routing = routing;
  b.router_weight = detail::hf_matrix<W>(ckpt, p + ".gate.weight", -1, -1, "router [E, d]");
  const std::int64_t E = b.router_weight.extent(0), d = b.router_weight.extent(1);
  if (routing.top_k < 1 || routing.top_k > E)
    switchyard::detail::fail_config("load_hf_moe_block", "routing", "top_k", routing.top_k,
                                    "1.." + std::to_string(E) + " (the router's experts)");
  const bool mixtral = family == HFFamily::mixtral;
  const std::string gate = mixtral ? "w1" : "gate_proj", up = mixtral ? "w3" : "up_proj",
                    down = mixtral ? "w2" : "down_proj";
  // The first expert fixes F; every other must match it.
  const std::string e0 = p + ".experts.0.";
  const std::int64_t F =
      detail::hf_matrix<W>(ckpt, e0 + gate + ".weight", -1, d, "expert gate projection [F, d]")
          .extent(0);
  ExpertWeights<W>& ex = b.weights.experts;
  for (std::int64_t e = 0; e < E; ++e) {
    const std::string ep = p + ".experts." + std::to_string(e) + ".";
    ex.w1_each.push_back(detail::hf_matrix<W>(ckpt, ep + gate + ".weight", F, d, "[F, d]"));
    ex.w3_each.push_back(detail::hf_matrix<W>(ckpt, ep + up + ".weight", F, d, "[F, d]"));
    ex.w2_each.push_back(detail::hf_matrix<W>(ckpt, ep + down + ".weight", d, F, "[d, F]"));
  }
  b.layer_config = {.d_model = d, .d_ff = F, .num_experts = E, .activation = Activation::swiglu};

  const auto add_shared = [&](const std::string& sp) {
    const auto g = detail::hf_matrix<W>(ckpt, sp + ".gate_proj.weight", -1, d, "[Fs, d]");
    const std::int64_t Fs = g.extent(0);
    b.weights.shared.w1_each = {g};
    b.weights.shared.w3_each = {
        detail::hf_matrix<W>(ckpt, sp + ".up_proj.weight", Fs, d, "[Fs, d]")};
    b.weights.shared.w2_each = {
        detail::hf_matrix<W>(ckpt, sp + ".down_proj.weight", d, Fs, "[d, Fs]")};
    b.layer_config.num_shared_experts = 1;
    b.layer_config.shared_d_ff = Fs;
  };
  if (family == HFFamily::qwen2_moe) {
    add_shared(p + ".shared_expert");
    b.weights.shared_gate = detail::hf_matrix<W>(ckpt, p + ".shared_expert_gate.weight", 1, d,
                                                 "shared expert gate [1, d]");
  } else if (family == HFFamily::deepseek_v2 || family == HFFamily::deepseek_v3) {
    add_shared(p + ".shared_experts");
  }
  if (family == HFFamily::deepseek_v3) {
    const std::string name = p + ".gate.e_score_correction_bias";
    if (!ckpt.contains(name))
      throw switchyard::error("load_hf_moe_block: tensor " + name +
                              " (score bias [E]) is missing from the checkpoint " +
                              ckpt.directory().string());
    const io::TensorInfo& info = ckpt.info(name);
    if (info.shape.size() != 1 || info.shape[0] != E)
      switchyard::detail::fail_shape("load_hf_moe_block", "load", name,
                                     switchyard::detail::format_shape(info.shape),
                                     "[" + std::to_string(E) + "]", "one bias per expert");
    b.score_bias = ckpt.tensor<float>(name);
  }
  b.check_routing();
  return b;
}

/// As above, with the routing read from the checkpoint's config.json
/// (hf_routing_from_config). Throws when config.json is missing or invalid.
template <class W>
HFMoEBlock<W> load_hf_moe_block(const io::Checkpoint& ckpt, std::string_view prefix,
                                HFFamily family) {
  return load_hf_moe_block<W>(ckpt, prefix, family, hf_routing_from_config(family, ckpt.config()));
}

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
