// Hugging Face MoE blocks from sharded checkpoints (moe/hf_checkpoint.hpp): the gpt-fast
// Mixtral fixture's MoE block through io::Checkpoint, random bf16 Mixtral / Qwen2-MoE /
// OLMoE / DeepSeek-V3 blocks written as two shards against a naive double reference, the
// views pointing into the mapped shards (no copies), and every documented loader error.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "support/compare.hpp"
#include "support/fixtures.hpp"
#include "support/moe_experts.hpp"
#include "support/temp_dir.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/io/checkpoint.hpp"
#include "switchyard/io/checkpoint_writer.hpp"
#include "switchyard/moe/hf_checkpoint.hpp"

namespace {

using namespace switchyard;
using Catch::Matchers::Contains;
using moe::HFFamily;
using test_support::OwnedExperts;
using test_support::random_experts;
using test_support::random_tensor;
using test_support::ref_expert;

/// Rounds every value to bf16 (what a bf16 checkpoint holds), in place.
void round_bf16(Tensor<float>& t) {
  for (float& v : t) v = to_float(bf16::from_float(v));
}

/// One random block of `family` with bf16-exact values, and the same block as float tensors
/// for the reference.
struct RandomBlock {
  HFFamily family;
  std::int64_t E, d, F, Fs, k;
  Tensor<float> router, gate, bias;  // [E, d], [1, d] (qwen2), [E] (deepseek_v3)
  OwnedExperts<float> experts, shared;
  std::string prefix = "model.layers.1.mlp";
};

RandomBlock random_block(HFFamily family, std::uint32_t seed) {
  RandomBlock b{family, 8, 24, 40, 32, 2, {}, {}, {}, {}, {}};
  if (family == HFFamily::deepseek_v3 || family == HFFamily::deepseek_v2) b.k = 3;
  if (family == HFFamily::mixtral) b.prefix = "model.layers.1.block_sparse_moe";
  b.router = random_tensor<float>({b.E, b.d}, seed, 0.5);
  b.experts = random_experts<float>(b.E, b.d, b.F, moe::Activation::swiglu, false, seed + 1);
  b.shared = random_experts<float>(1, b.d, b.Fs, moe::Activation::swiglu, false, seed + 2);
  b.gate = random_tensor<float>({1, b.d}, seed + 3, 0.5);
  b.bias = random_tensor<float>({b.E}, seed + 4, 0.3);
  for (Tensor<float>* t : {&b.router, &b.gate, &b.experts.w1, &b.experts.w2, &b.experts.w3,
                           &b.shared.w1, &b.shared.w2, &b.shared.w3})
    round_bf16(*t);
  return b;
}

std::vector<float> row(const Tensor<float>& t, std::int64_t i) {
  const std::int64_t n = t.numel() / t.extent(0);
  return {t.data() + i * n, t.data() + (i + 1) * n};
}

/// Writes the block as two bf16 shards (router and the first half of the experts, then the
/// rest) with an index and config.json. `skip` leaves one tensor out; `bad_shape` writes one
/// tensor with an extra column.
void write_block(const RandomBlock& b, const std::filesystem::path& dir,
                 const std::string& skip = "", const std::string& bad_shape = "") {
  std::vector<io::SafeTensorsWriter> shards(2);
  const auto put = [&](int s, const std::string& name, std::vector<float> v,
                       std::vector<std::int64_t> shape) {
    if (name == skip) return;
    if (name == bad_shape) {
      shape.back() += 1;
      v.resize(std::size_t(std::accumulate(shape.begin(), shape.end(), std::int64_t(1),
                                           std::multiplies<>())),
               0.0f);
    }
    shards[std::size_t(s)].add_bf16(name, v.data(), shape);
  };
  const bool mixtral = b.family == HFFamily::mixtral;
  const std::string g = mixtral ? "w1" : "gate_proj", u = mixtral ? "w3" : "up_proj",
                    dn = mixtral ? "w2" : "down_proj";
  put(0, b.prefix + ".gate.weight", std::vector<float>(b.router.begin(), b.router.end()),
      {b.E, b.d});
  for (std::int64_t e = 0; e < b.E; ++e) {
    const int s = e < b.E / 2 ? 0 : 1;
    const std::string p = b.prefix + ".experts." + std::to_string(e) + ".";
    put(s, p + g + ".weight", row(b.experts.w1, e), {b.F, b.d});
    put(s, p + u + ".weight", row(b.experts.w3, e), {b.F, b.d});
    put(s, p + dn + ".weight", row(b.experts.w2, e), {b.d, b.F});
  }
  const std::string sp = b.family == HFFamily::qwen2_moe ? ".shared_expert" : ".shared_experts";
  const bool deepseek = b.family == HFFamily::deepseek_v2 || b.family == HFFamily::deepseek_v3;
  if (b.family == HFFamily::qwen2_moe || deepseek) {
    put(1, b.prefix + sp + ".gate_proj.weight", row(b.shared.w1, 0), {b.Fs, b.d});
    put(1, b.prefix + sp + ".up_proj.weight", row(b.shared.w3, 0), {b.Fs, b.d});
    put(1, b.prefix + sp + ".down_proj.weight", row(b.shared.w2, 0), {b.d, b.Fs});
  }
  if (b.family == HFFamily::qwen2_moe)
    put(1, b.prefix + ".shared_expert_gate.weight", row(b.gate, 0), {1, b.d});
  if (b.family == HFFamily::deepseek_v3 && skip != b.prefix + ".gate.e_score_correction_bias")
    shards[0].add(b.prefix + ".gate.e_score_correction_bias", b.bias.data(), {b.E});
  nlohmann::json config = {{"model_type", std::string(moe::hf_family_name(b.family))},
                           {"num_experts_per_tok", b.k}};
  if (deepseek) {
    config["n_group"] = 4;
    config["topk_group"] = 2;
    config["routed_scaling_factor"] = 2.5;
    config["norm_topk_prob"] = b.family == HFFamily::deepseek_v3;
  }
  if (b.family == HFFamily::deepseek_v2) config["topk_method"] = "group_limited_greedy";
  if (b.family == HFFamily::qwen3_moe) config["norm_topk_prob"] = true;
  io::save_sharded_checkpoint(dir, shards, config);
}

/// The block's output for x in double: logits, the family's routing, experts, shared expert.
/// DeepSeek's group selection comes from GroupedTopKRouter (tested on its own fixtures); the
/// weights and the other families' routing are computed here.
std::vector<double> ref_block(const RandomBlock& b, const Tensor<float>& x,
                              std::vector<std::vector<int>>& chosen) {
  const std::int64_t T = x.extent(0), d = b.d, E = b.E;
  std::vector<double> y(std::size_t(T * d), 0.0);
  Tensor<float> logits_f({T, E});
  std::vector<double> logits(std::size_t(T * E));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t e = 0; e < E; ++e) {
      double s = 0;
      for (std::int64_t p = 0; p < d; ++p) s += double(x(t, p)) * double(b.router(e, p));
      logits[std::size_t(t * E + e)] = s;
      logits_f(t, e) = float(s);
    }
  moe::DispatchPlan<float> grouped;
  const bool v3 = b.family == HFFamily::deepseek_v3;
  const bool deepseek = v3 || b.family == HFFamily::deepseek_v2;
  if (deepseek) {
    moe::GroupedTopKRouter<float> r(
        {.num_experts = E,
         .top_k = b.k,
         .n_group = 4,
         .topk_group = 2,
         .score_func = v3 ? moe::ScoreFunc::sigmoid : moe::ScoreFunc::softmax,
         .norm_topk_prob = v3,
         .routed_scaling_factor = 2.5});
    if (v3)
      r.route(logits_f, std::span<const float>(b.bias.data(), std::size_t(E)), grouped);
    else
      r.route(logits_f, grouped);
  }
  chosen.assign(std::size_t(T), {});
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<double> xt(static_cast<std::size_t>(d));
    for (std::int64_t p = 0; p < d; ++p) xt[std::size_t(p)] = x(t, p);
    std::vector<std::pair<int, double>> picks;
    if (deepseek) {
      // The weights in double: V3 sigmoid scores of the chosen experts, normalised over them;
      // V2 softmax probabilities as they are; both times routed_scaling_factor.
      double lse = 0;
      for (std::int64_t e = 0; e < E; ++e) lse += std::exp(logits[std::size_t(t * E + e)]);
      for (std::int64_t s = 0; s < b.k; ++s) {
        const int e = grouped.choice_expert[std::size_t(t * b.k + s)];
        const double l = logits[std::size_t(t * E + e)];
        picks.push_back({e, v3 ? 1.0 / (1.0 + std::exp(-l)) : std::exp(l) / lse});
      }
      double z = 0;
      for (auto& pk : picks) z += pk.second;
      for (auto& pk : picks) pk.second = (v3 ? pk.second / z : pk.second) * 2.5;
    } else {
      std::vector<double> p(logits.begin() + t * E, logits.begin() + (t + 1) * E);
      const double m = *std::max_element(p.begin(), p.end());
      double z = 0;
      for (double& v : p) z += (v = std::exp(v - m));
      for (double& v : p) v /= z;
      std::vector<int> order(static_cast<std::size_t>(E));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int c) { return p[a] > p[c]; });
      double sum = 0;
      for (std::int64_t s = 0; s < b.k; ++s) sum += p[std::size_t(order[s])];
      const bool renorm = b.family == HFFamily::mixtral || b.family == HFFamily::qwen3_moe;
      for (std::int64_t s = 0; s < b.k; ++s)
        picks.push_back({order[s], p[std::size_t(order[s])] / (renorm ? sum : 1.0)});
    }
    for (const auto& [e, w] : picks) {
      chosen[std::size_t(t)].push_back(e);
      const auto o = ref_expert(b.experts, e, moe::Activation::swiglu, false, xt);
      for (std::int64_t i = 0; i < d; ++i) y[std::size_t(t * d + i)] += w * o[std::size_t(i)];
    }
    if (b.family == HFFamily::qwen2_moe || deepseek) {
      double g = 1.0;
      if (b.family == HFFamily::qwen2_moe) {
        double z = 0;
        for (std::int64_t p = 0; p < d; ++p) z += xt[std::size_t(p)] * double(b.gate(0, p));
        g = 1.0 / (1.0 + std::exp(-z));
      }
      const auto o = ref_expert(b.shared, 0, moe::Activation::swiglu, false, xt);
      for (std::int64_t i = 0; i < d; ++i) y[std::size_t(t * d + i)] += g * o[std::size_t(i)];
    }
  }
  return y;
}

}  // namespace

TEST_CASE("load_hf_moe_block reproduces the gpt-fast Mixtral block from the HF checkpoint",
          "[moe][hf][fixtures]") {
  const auto ckpt = io::Checkpoint::open(fixture_path("hf_mixtral_tiny/f32"));
  const auto block =
      moe::load_hf_moe_block<float>(ckpt, "model.layers.0.block_sparse_moe", HFFamily::mixtral);
  REQUIRE(block.layer_config.num_experts == 4);
  REQUIRE(block.layer_config.d_ff == 128);
  REQUIRE(block.routing.top_k == 2);
  const auto fx = open_fixture("decoder_tiny.safetensors");
  const auto x4 = fx.view<float, 3>("ffn_norm_out");  // [1, N, 64]
  const ConstView<float, 2> x(x4.data(), {x4.extent(1), x4.extent(2)});
  Tensor<float> y({x.extent(0), x.extent(1)});
  moe::DispatchPlan<float> plan;
  block.forward(x, y.view<2>(), &plan);
  const auto want = fx.view<float, 3>("moe_out");
  const auto idx = fx.view<std::int64_t, 3>("router_topk_idx");
  double scale = 1, err = 0;
  for (std::int64_t t = 0; t < x.extent(0); ++t) {
    for (std::int64_t j = 0; j < 2; ++j)
      REQUIRE(plan.choice_expert[std::size_t(t * 2 + j)] == idx(0, t, j));
    for (std::int64_t i = 0; i < x.extent(1); ++i) {
      scale = std::max(scale, double(std::abs(want(0, t, i))));
      err = std::max(err, double(std::abs(y(t, i) - want(0, t, i))));
    }
  }
  REQUIRE(err <= 1e-5 * scale);
}

TEST_CASE(
    "load_hf_moe_block: bf16 blocks of every family from two shards match a naive double "
    "reference, without copies",
    "[moe][hf]") {
  std::uint32_t seed = 500;
  for (const HFFamily family :
       {HFFamily::mixtral, HFFamily::olmoe, HFFamily::qwen2_moe, HFFamily::qwen3_moe,
        HFFamily::deepseek_v2, HFFamily::deepseek_v3}) {
    CAPTURE(moe::hf_family_name(family));
    const RandomBlock b = random_block(family, seed += 10);
    const TempDir dir("hf_" + std::string(moe::hf_family_name(family)));
    write_block(b, dir.path);
    const auto ckpt = io::Checkpoint::open(dir.path);
    const auto block = moe::load_hf_moe_block<bf16>(ckpt, b.prefix, family);
    REQUIRE(block.layer_config.num_experts == b.E);
    REQUIRE(block.routing.top_k == b.k);
    // Every expert projection is a view into its mapped shard, not a copy.
    const std::string g = family == HFFamily::mixtral ? ".w1.weight" : ".gate_proj.weight";
    for (std::int64_t e = 0; e < b.E; ++e) {
      const auto bytes = ckpt.bytes(b.prefix + ".experts." + std::to_string(e) + g);
      REQUIRE(static_cast<const void*>(block.weights.experts.w1_each[std::size_t(e)].data()) ==
              static_cast<const void*>(bytes.data()));
    }
    REQUIRE(static_cast<const void*>(block.router_weight.data()) ==
            static_cast<const void*>(ckpt.bytes(b.prefix + ".gate.weight").data()));

    for (const std::int64_t tokens : {std::int64_t(3), std::int64_t(90)}) {  // decode, prefill
      CAPTURE(tokens);
      const Tensor<float> x = random_tensor<float>({tokens, b.d}, seed + 7);
      std::vector<std::vector<int>> chosen;
      const auto want = ref_block(b, x, chosen);
      Tensor<float> y({tokens, b.d});
      moe::DispatchPlan<float> plan;
      block.forward(x, y.view<2>(), &plan);
      for (std::int64_t t = 0; t < tokens; ++t)
        for (std::int64_t s = 0; s < b.k; ++s)
          REQUIRE(plan.choice_expert[std::size_t(t * b.k + s)] ==
                  chosen[std::size_t(t)][std::size_t(s)]);
      const double scale = std::max(1.0, test_support::max_abs(want));
      double err = 0;
      for (std::int64_t i = 0; i < y.numel(); ++i)
        err = std::max(err, std::abs(double(y.data()[i]) - want[std::size_t(i)]));
      REQUIRE(err <= 2e-5 * scale);
    }
  }
}

TEST_CASE("DeepSeek routing from config.json: transformers' defaults, unknown values named",
          "[moe][hf][config]") {
  using moe::hf_routing_from_config;
  using moe::ScoreFunc;
  const nlohmann::json k2 = {{"num_experts_per_tok", 2}};
  // DeepseekV3Config: n_group 8, topk_group 4, norm_topk_prob true, routed_scaling_factor 2.5.
  const moe::HFRouting v3 = hf_routing_from_config(HFFamily::deepseek_v3, k2);
  CHECK(v3.top_k == 2);
  CHECK(v3.score_func == ScoreFunc::sigmoid);
  CHECK(v3.n_group == 8);
  CHECK(v3.topk_group == 4);
  CHECK(v3.norm_topk_prob);
  CHECK(v3.routed_scaling_factor == 2.5);
  // DeepseekV2Config: topk_method "greedy" (no groups), norm_topk_prob false, factor 1.
  const moe::HFRouting v2 = hf_routing_from_config(HFFamily::deepseek_v2, k2);
  CHECK(v2.score_func == ScoreFunc::softmax);
  CHECK(v2.n_group == 1);
  CHECK(v2.topk_group == 1);
  CHECK(!v2.norm_topk_prob);
  CHECK(v2.routed_scaling_factor == 1.0);
  // "greedy" ignores groups even when the config names them.
  nlohmann::json c = k2;
  c["n_group"] = 4;
  c["topk_group"] = 2;
  CHECK(hf_routing_from_config(HFFamily::deepseek_v2, c).n_group == 1);
  c["topk_method"] = "group_limited_greedy";
  CHECK(hf_routing_from_config(HFFamily::deepseek_v2, c).n_group == 4);
  CHECK(hf_routing_from_config(HFFamily::deepseek_v2, c).topk_group == 2);
  // A grouped method without its groups, and unknown or ill-typed methods, are errors.
  c.erase("n_group");
  CHECK_THROWS_AS(hf_routing_from_config(HFFamily::deepseek_v2, c), config_error);
  CHECK_THROWS_WITH(hf_routing_from_config(HFFamily::deepseek_v2, c),
                    Contains("'n_group'") && Contains("missing"));
  c = k2;
  c["scoring_func"] = "softplus";
  CHECK_THROWS_AS(hf_routing_from_config(HFFamily::deepseek_v3, c), config_error);
  CHECK_THROWS_WITH(hf_routing_from_config(HFFamily::deepseek_v3, c),
                    Contains("'scoring_func' = \"softplus\"") && Contains("\"sigmoid\""));
  c["scoring_func"] = 1;
  CHECK_THROWS_WITH(hf_routing_from_config(HFFamily::deepseek_v3, c), Contains("'scoring_func'"));
  c["scoring_func"] = "softmax";
  CHECK(hf_routing_from_config(HFFamily::deepseek_v3, c).score_func == ScoreFunc::softmax);
  c["topk_method"] = "top_p";
  CHECK_THROWS_AS(hf_routing_from_config(HFFamily::deepseek_v3, c), config_error);
  CHECK_THROWS_WITH(hf_routing_from_config(HFFamily::deepseek_v3, c),
                    Contains("'topk_method' = \"top_p\"") && Contains("\"noaux_tc\""));
}

TEST_CASE("load_hf_moe_block checks the routing against the router at load, not at forward",
          "[moe][hf][errors]") {
  const RandomBlock v3 = random_block(HFFamily::deepseek_v3, 960);  // E = 8
  const TempDir dir("groups");
  write_block(v3, dir.path);
  const auto ckpt = io::Checkpoint::open(dir.path);
  const moe::HFRouting fits{
      .top_k = 3, .score_func = moe::ScoreFunc::sigmoid, .n_group = 4, .topk_group = 2};
  CHECK_NOTHROW(moe::load_hf_moe_block<bf16>(ckpt, v3.prefix, HFFamily::deepseek_v3, fits));
  moe::HFRouting r = fits;
  r.n_group = 3;  // does not divide E = 8
  CHECK_THROWS_AS(moe::load_hf_moe_block<bf16>(ckpt, v3.prefix, HFFamily::deepseek_v3, r),
                  config_error);
  CHECK_THROWS_WITH(moe::load_hf_moe_block<bf16>(ckpt, v3.prefix, HFFamily::deepseek_v3, r),
                    Contains("'n_group' = 3") && Contains("num_experts = 8"));
  r = fits;
  r.topk_group = 5;  // more than n_group = 4
  CHECK_THROWS_WITH(moe::load_hf_moe_block<bf16>(ckpt, v3.prefix, HFFamily::deepseek_v3, r),
                    Contains("'topk_group' = 5"));
  // From config.json: transformers' default n_group = 8 fits E = 8; an explicit 16 does not.
  nlohmann::json c = ckpt.config();
  c.erase("n_group");
  c.erase("topk_group");
  std::ofstream(dir.path / "config.json") << c.dump();
  CHECK_NOTHROW(moe::load_hf_moe_block<bf16>(ckpt, v3.prefix, HFFamily::deepseek_v3));
  c["n_group"] = 16;
  std::ofstream(dir.path / "config.json") << c.dump();
  CHECK_THROWS_WITH(moe::load_hf_moe_block<bf16>(ckpt, v3.prefix, HFFamily::deepseek_v3),
                    Contains("'n_group' = 16"));
}

TEST_CASE("load_hf_moe_block errors name the tensor and both shapes", "[moe][hf][errors]") {
  const RandomBlock b = random_block(HFFamily::qwen2_moe, 900);
  {
    const TempDir dir("missing");
    write_block(b, dir.path, b.prefix + ".experts.5.up_proj.weight");
    const auto ckpt = io::Checkpoint::open(dir.path);
    REQUIRE_THROWS_WITH(moe::load_hf_moe_block<bf16>(ckpt, b.prefix, HFFamily::qwen2_moe),
                        Contains("experts.5.up_proj.weight") && Contains("missing"));
  }
  {
    const TempDir dir("shape");
    write_block(b, dir.path, "", b.prefix + ".experts.3.down_proj.weight");
    const auto ckpt = io::Checkpoint::open(dir.path);
    REQUIRE_THROWS_WITH(
        moe::load_hf_moe_block<bf16>(ckpt, b.prefix, HFFamily::qwen2_moe),
        Contains("experts.3.down_proj.weight") && Contains("[24, 41]") && Contains("[24, 40]"));
  }
  {
    const TempDir dir("gate");
    write_block(b, dir.path, b.prefix + ".shared_expert_gate.weight");
    const auto ckpt = io::Checkpoint::open(dir.path);
    REQUIRE_THROWS_WITH(moe::load_hf_moe_block<bf16>(ckpt, b.prefix, HFFamily::qwen2_moe),
                        Contains("shared_expert_gate.weight") && Contains("missing"));
    // the wrong element type: a bf16 checkpoint loaded as float
    REQUIRE_THROWS_WITH(moe::load_hf_moe_block<float>(ckpt, b.prefix, HFFamily::qwen2_moe),
                        Contains("gate.weight") && Contains("BF16") && Contains("F32"));
    // routing that does not fit the router, and a bad config field
    REQUIRE_THROWS_WITH(
        moe::load_hf_moe_block<bf16>(ckpt, b.prefix, HFFamily::olmoe, moe::HFRouting{.top_k = 9}),
        Contains("top_k") && Contains("1..8"));
    REQUIRE_THROWS_WITH(
        moe::hf_routing_from_config(HFFamily::olmoe, {{"num_experts_per_tok", "2"}}),
        Contains("num_experts_per_tok") && Contains("a number"));
    REQUIRE_THROWS_WITH(moe::hf_routing_from_config(HFFamily::olmoe, nlohmann::json::object()),
                        Contains("num_experts_per_tok") && Contains("missing"));
    REQUIRE_THROWS_WITH(
        moe::hf_routing_from_config(HFFamily::deepseek_v3,
                                    {{"num_experts_per_tok", 2}, {"routed_scaling_factor", -1}}),
        Contains("routed_scaling_factor"));
  }
  {
    const RandomBlock v3 = random_block(HFFamily::deepseek_v3, 950);
    const TempDir dir("bias");
    write_block(v3, dir.path, v3.prefix + ".gate.e_score_correction_bias");
    const auto ckpt = io::Checkpoint::open(dir.path);
    REQUIRE_THROWS_WITH(moe::load_hf_moe_block<bf16>(ckpt, v3.prefix, HFFamily::deepseek_v3),
                        Contains("e_score_correction_bias") && Contains("missing"));
  }
  REQUIRE(moe::parse_hf_family("qwen2_moe") == HFFamily::qwen2_moe);
  REQUIRE(!moe::parse_hf_family("llama").has_value());
}
