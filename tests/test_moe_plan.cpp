// DispatchPlan: check() catches every broken invariant built by hand;
// make_token_choice_plan and build_csr_from_choices; plan_json round trips.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "support/moe.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/plan_json.hpp"

using namespace switchyard;
using Catch::Contains;

namespace {

// 4 tokens, 3 experts, k = 2:
//   token 0 -> (2, 0.6), (0, 0.4);  token 1 -> (1, 0.7), (2, 0.3)
//   token 2 -> (0, 0.5), (1, 0.5);  token 3 -> (2, 1.0), unused (-1)
moe::DispatchPlan<float> small_plan() {
  Tensor<std::int32_t> e({4, 2});
  Tensor<float> w({4, 2});
  const std::int32_t ev[8] = {2, 0, 1, 2, 0, 1, 2, -1};
  const float wv[8] = {0.6f, 0.4f, 0.7f, 0.3f, 0.5f, 0.5f, 1.0f, 0.9f};
  for (int i = 0; i < 8; ++i) {
    e[i] = ev[i];
    w[i] = wv[i];
  }
  return moe::make_token_choice_plan<float, std::int32_t>(3, e.view<2>(), w.view<2>());
}

}  // namespace

TEST_CASE("make_token_choice_plan: CSR by expert, sorted by token", "[moe][plan]") {
  const auto p = small_plan();
  REQUIRE_NOTHROW(p.check());
  REQUIRE(p.num_tokens == 4);
  REQUIRE(p.num_experts == 3);
  REQUIRE(p.top_k == 2);
  REQUIRE(p.capacity == -1);
  REQUIRE(p.nnz() == 7);
  // expert 0: tokens 0 (slot 1), 2 (slot 0); expert 1: 1 (0), 2 (1); expert 2: 0 (0), 1 (1), 3 (0)
  REQUIRE(p.expert_offsets == std::vector<std::int64_t>{0, 2, 4, 7});
  REQUIRE(p.token_index == std::vector<std::int32_t>{0, 2, 1, 2, 0, 1, 3});
  REQUIRE(p.slot == std::vector<std::int32_t>{1, 0, 0, 1, 0, 1, 0});
  REQUIRE(p.gate == std::vector<float>{0.4f, 0.5f, 0.7f, 0.5f, 0.6f, 0.3f, 1.0f});
  REQUIRE(p.choice_weight[7] == 0.0f);  // unused slot: weight 0 whatever was passed
  REQUIRE(p.stats.tokens_per_expert == std::vector<std::int64_t>{2, 2, 3});
  REQUIRE(p.stats.kept_per_expert == std::vector<std::int64_t>{2, 2, 3});
  REQUIRE(p.stats.routed_tokens == 4);
  REQUIRE(p.stats.dropped == 0);
  REQUIRE(p.dropped.empty());
  REQUIRE(p.expert_tokens(2).size() == 3);
  REQUIRE(p.expert_gates(0)[1] == 0.5f);
  REQUIRE(p.expert_indices()(1, 0) == 1);
  REQUIRE(p.expert_weights()(0, 0) == 0.6f);
}

TEST_CASE("make_token_choice_plan: errors", "[moe][plan]") {
  Tensor<std::int64_t> e({2, 2});
  Tensor<float> w({2, 2}), w3({2, 3});
  e[0] = 0;
  e[1] = 1;
  e[2] = 1;
  e[3] = 0;
  const auto make = [&](std::int64_t experts, const Tensor<float>& weights) {
    return moe::make_token_choice_plan<float, std::int64_t>(experts, e.view<2>(),
                                                            weights.view<2>());
  };
  REQUIRE_NOTHROW(make(2, w));
  REQUIRE_THROWS_AS(make(0, w), config_error);
  e[3] = 2;  // out of range
  REQUIRE_THROWS_WITH(make(2, w), Contains("DispatchPlan") && Contains("experts"));
  e[3] = 1;  // token 1 chooses expert 1 twice
  REQUIRE_THROWS_AS(make(2, w), config_error);
  REQUIRE_THROWS_WITH(make(2, w), Contains("at most once"));
  e[3] = -2;
  REQUIRE_THROWS_AS(make(2, w), config_error);
  e[3] = 0;
  REQUIRE_THROWS_AS(make(2, w3), shape_error);
}

TEST_CASE("build_csr_from_choices: capacity drops", "[moe][plan]") {
  auto p = small_plan();
  // Drop token 3's only choice and token 0's second choice.
  std::vector<std::uint8_t> keep{1, 0, 1, 1, 1, 1, 0, 1};
  moe::detail::build_csr_from_choices(p, keep);
  p.capacity = 2;
  REQUIRE_NOTHROW(p.check());
  REQUIRE(p.nnz() == 5);
  REQUIRE(p.stats.dropped == 2);
  REQUIRE(p.dropped.size() == 2);
  REQUIRE(p.dropped[0].token == 0);
  REQUIRE(p.dropped[0].slot == 1);
  REQUIRE(p.dropped[0].expert == 0);
  REQUIRE(p.dropped[1].token == 3);
  REQUIRE(p.dropped[1].expert == 2);
  REQUIRE(p.choice_weight[1] == 0.0f);
  REQUIRE(p.choice_weight[6] == 0.0f);
  REQUIRE(p.choice_expert[6] == 2);  // still chosen, only dropped
  REQUIRE(p.stats.tokens_without_expert == 1);
  REQUIRE(p.stats.kept_per_expert == std::vector<std::int64_t>{1, 2, 2});
}

TEST_CASE("DispatchPlan::check catches each broken invariant", "[moe][plan]") {
  const auto good = small_plan();
  REQUIRE_NOTHROW(good.check());
  const auto broken = [&](auto&& edit, const char* what) {
    auto p = good;
    edit(p);
    REQUIRE_THROWS_AS(p.check(), switchyard::error);
    REQUIRE_THROWS_WITH(p.check(), Contains("DispatchPlan::check") && Contains(what));
  };
  // Over capacity: expert 2 holds 3 tokens.
  broken([](auto& p) { p.capacity = 2; }, "over capacity");
  // Duplicate (token, expert): expert 2 lists token 0 twice.
  broken(
      [](auto& p) {
        p.token_index[5] = 0;
        p.slot[5] = 0;
        p.token_index[4] = 0;
      },
      "not strictly ascending");
  // Tokens out of order inside an expert.
  broken(
      [](auto& p) {
        std::swap(p.token_index[0], p.token_index[1]);
        std::swap(p.slot[0], p.slot[1]);
      },
      "ascending");
  // Out-of-range token index.
  broken([](auto& p) { p.token_index[6] = 4; }, "out of range");
  broken([](auto& p) { p.token_index[0] = -1; }, "out of range");
  // Out-of-range slot.
  broken([](auto& p) { p.slot[2] = 2; }, "slot out of range");
  // Inconsistent views: the [T, K] choices disagree with the CSR run.
  broken([](auto& p) { p.choice_expert[2] = 0; }, "disagrees");
  // Chosen pairs that are neither kept nor dropped.
  broken([](auto& p) { p.choice_expert[7] = 0; }, "chosen pairs");
  // Non-finite gate.
  broken([](auto& p) { p.gate[3] = std::numeric_limits<float>::quiet_NaN(); }, "non-finite");
  // Offsets: wrong size, not ending at nnz, decreasing.
  broken([](auto& p) { p.expert_offsets.pop_back(); }, "expert_offsets");
  broken([](auto& p) { p.expert_offsets[3] = 6; }, "expert_offsets");
  broken([](auto& p) { p.expert_offsets[2] = 1; }, "decrease");
  // Parallel arrays of different lengths.
  broken([](auto& p) { p.gate.pop_back(); }, "differ in length");
  // [T, K] views of the wrong size.
  broken([](auto& p) { p.choice_weight.pop_back(); }, "[T, K]");
  // Dropped entry out of range.
  broken([](auto& p) { p.dropped.push_back({0, 0, 3}); }, "dropped entry");
  // Bad sizes.
  broken([](auto& p) { p.num_experts = 0; }, "bad sizes");
}

TEST_CASE("DispatchPlan::reset empties the plan and keeps its memory", "[moe][plan]") {
  auto p = small_plan();
  const auto cap = p.token_index.capacity();
  p.capacity = 3;
  p.capacity_clamped = true;
  p.reset(2, 3, 1);
  REQUIRE(p.nnz() == 0);
  REQUIRE(p.token_index.capacity() == cap);
  REQUIRE(p.capacity == -1);
  REQUIRE_FALSE(p.capacity_clamped);
  REQUIRE(p.choice_expert == std::vector<std::int32_t>{-1, -1});
  REQUIRE_NOTHROW(p.check());
}

TEST_CASE("plan_json: every field, and a bit-exact round trip", "[moe][plan][json]") {
  auto p = small_plan();
  std::vector<std::uint8_t> keep{1, 0, 1, 1, 1, 1, 0, 1};
  moe::detail::build_csr_from_choices(p, keep);
  p.capacity = 4;  // clamped from a requested 9 (visible, not silent)
  p.requested_capacity = 9;
  p.capacity_clamped = true;
  p.gate[0] = 0.1f;  // a value with no short decimal form
  p.choice_weight[p.token_index[0] * 2 + p.slot[0]] = 0.1f;
  p.stats.mean_prob = {1.0 / 3, 0.25, 0.1 + 0.2};
  p.stats.aux_loss = 1.0625;
  p.stats.z_loss = std::sqrt(2.0);
  p.stats.entropy = 0.6931471805599453;
  REQUIRE_NOTHROW(p.check());

  const std::string text = moe::to_json_string(p);
  const auto j = nlohmann::json::parse(text);
  REQUIRE(j["num_tokens"] == 4);
  REQUIRE(j["num_experts"] == 3);
  REQUIRE(j["top_k"] == 2);
  REQUIRE(j["nnz"] == 5);
  REQUIRE(j["capacity"] == 4);
  REQUIRE(j["requested_capacity"] == 9);
  REQUIRE(j["capacity_clamped"] == true);
  REQUIRE(j["expert_offsets"] == nlohmann::json({0, 1, 3, 5}));
  REQUIRE(j["experts"].size() == 3);
  REQUIRE(j["experts"][1]["expert"] == 1);
  REQUIRE(j["experts"][1]["tokens"] == nlohmann::json({1, 2}));
  REQUIRE(j["experts"][1]["slots"] == nlohmann::json({0, 1}));
  REQUIRE(j["experts"][2]["gates"][0].get<double>() == 0.6f);
  REQUIRE(j["experts"][0]["gates"][0].get<double>() == 0.1f);
  REQUIRE(j["choice_expert"].size() == 4);
  REQUIRE(j["choice_expert"][3] == nlohmann::json({2, -1}));
  REQUIRE(j["choice_weight"][3] == nlohmann::json({0.0, 0.0}));
  REQUIRE(j["dropped"].size() == 2);
  // Each dropped pair keeps the weight it had in small_plan (0.4f, 1.0f); kept flags mark
  // the rest of the chosen pairs and are rebuilt from the runs on reading.
  REQUIRE(j["dropped"][0]["gate"].get<double>() == 0.4f);
  REQUIRE(j["dropped"][1] ==
          nlohmann::json({{"token", 3}, {"slot", 0}, {"expert", 2}, {"gate", 1.0}}));
  REQUIRE(p.choice_kept == std::vector<std::uint8_t>{1, 0, 1, 1, 1, 1, 0, 0});
  REQUIRE(j["stats"]["dropped"] == 2);
  REQUIRE(j["stats"]["tokens_without_expert"] == 1);
  REQUIRE(j["stats"]["routed_tokens"] == 4);
  REQUIRE(j["stats"]["aux_loss"].get<double>() == 1.0625);
  REQUIRE(j["stats"]["z_loss"].get<double>() == std::sqrt(2.0));
  REQUIRE(j["stats"]["mean_prob"][2].get<double>() == 0.1 + 0.2);

  test_support::require_same_plan(moe::plan_from_json<float>(j), p);
  // One-line text, the ADL hooks, and double plans.
  test_support::require_same_plan(
      moe::plan_from_json<float>(nlohmann::json::parse(moe::to_json_string(p, -1))), p);
  const nlohmann::json via_adl = p;
  test_support::require_same_plan(via_adl.get<moe::DispatchPlan<float>>(), p);
  REQUIRE(moe::to_json_string(p, -1).find('\n') == std::string::npos);

  Tensor<std::int32_t> e({1, 1});
  Tensor<double> w({1, 1});
  e[0] = 0;
  w[0] = 0.1 + 0.2;
  const auto pd = moe::make_token_choice_plan<double, std::int32_t>(1, e.view<2>(), w.view<2>());
  test_support::require_same_plan(
      moe::plan_from_json<double>(nlohmann::json::parse(moe::to_json_string(pd))), pd);
}

TEST_CASE("plan_json: expert-choice plan (no [T, K] views), empty plan, errors",
          "[moe][plan][json]") {
  // Expert choice: K = 0, each expert a run of tokens; token 1 is taken twice, token 2 never.
  moe::DispatchPlan<float> p;
  p.reset(3, 2, 0);
  p.expert_offsets = {0, 2, 4};
  p.token_index = {0, 1, 1, 2};
  p.slot = {0, 0, 0, 0};
  p.gate = {0.5f, 0.25f, 0.75f, 1.0f};
  p.capacity = 2;
  p.requested_capacity = 2;
  p.stats.kept_per_expert = {2, 2};
  REQUIRE_NOTHROW(p.check());
  const auto j = moe::to_json(p);
  REQUIRE(j["choice_expert"].empty());
  REQUIRE(j["capacity_clamped"] == false);
  test_support::require_same_plan(moe::plan_from_json<float>(nlohmann::json::parse(j.dump())), p);

  moe::DispatchPlan<float> empty;
  empty.reset(0, 4, 2);
  test_support::require_same_plan(
      moe::plan_from_json<float>(nlohmann::json::parse(moe::to_json_string(empty))), empty);

  auto missing = j;
  missing.erase("capacity");
  REQUIRE_THROWS_AS(moe::plan_from_json<float>(missing), switchyard::error);
  REQUIRE_THROWS_WITH(moe::plan_from_json<float>(missing), Contains("plan_from_json"));
  auto wrong_type = j;
  wrong_type["top_k"] = "two";
  REQUIRE_THROWS_AS(moe::plan_from_json<float>(wrong_type), switchyard::error);
  auto invalid = j;  // well-formed JSON, broken plan: over capacity
  invalid["capacity"] = 1;
  REQUIRE_THROWS_WITH(moe::plan_from_json<float>(invalid), Contains("over capacity"));
}

// ---- hostile input: plan_from_json validates every field before using it ---------------------

namespace {

/// The small token-choice plan as a JSON document, to be broken one field at a time.
nlohmann::json small_plan_json() { return moe::to_json(small_plan()); }

/// plan_from_json(j) throws switchyard::error whose message names plan_from_json and holds
/// every word in `words`, and never leaks a raw nlohmann message.
void require_rejected(const nlohmann::json& j, std::initializer_list<std::string> words) {
  REQUIRE_THROWS_AS(moe::plan_from_json<float>(j), switchyard::error);
  try {
    (void)moe::plan_from_json<float>(j);
  } catch (const switchyard::error& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(what.rfind("moe::plan_from_json: ", 0) == 0);
    CHECK(what.find("json.exception") == std::string::npos);
    for (const auto& w : words) CHECK_THAT(what, Contains(w));
  }
}

}  // namespace

TEST_CASE("plan_from_json: integer fields are in-range JSON integers", "[moe][plan][json]") {
  const auto good = small_plan_json();
  REQUIRE_NOTHROW(moe::plan_from_json<float>(good));
  const auto broken = [&](auto&& edit, std::initializer_list<std::string> words) {
    auto j = good;
    edit(j);
    require_rejected(j, words);
  };
  // 2^32 + 1 used to read back as token 1.
  broken([](auto& j) { j["experts"][1]["tokens"][0] = 4294967297ull; },
         {"field 'experts[1].tokens[0]'", "4294967297", "[0, T=4)"});
  broken([](auto& j) { j["experts"][0]["tokens"][1] = -1; }, {"'experts[0].tokens[1]'", "-1"});
  // 6.5 used to become 6; 1e20 was undefined behaviour inside the conversion.
  broken([](auto& j) { j["num_tokens"] = 6.5; }, {"'num_tokens'", "6.5", "integer"});
  broken([](auto& j) { j["top_k"] = 1e20; }, {"'top_k'", "integer"});
  broken([](auto& j) { j["num_experts"] = std::numeric_limits<std::int64_t>::max(); },
         {"'num_experts'", "9223372036854775807"});
  broken([](auto& j) { j["num_experts"] = 18446744073709551615ull; }, {"'num_experts'"});
  broken([](auto& j) { j["capacity"] = -7; }, {"'capacity'", "-7"});
  broken([](auto& j) { j["requested_capacity"] = -2; }, {"'requested_capacity'", "-2"});
  broken([](auto& j) { j["experts"][2]["slots"][0] = 2; }, {"'experts[2].slots[0]'", "[0, K=2)"});
  broken([](auto& j) { j["choice_expert"][3][1] = 3; }, {"'choice_expert[3][1]'", "E=3"});
  broken(
      [](auto& j) {
        j["dropped"] = nlohmann::json::array({{{"token", 0}, {"slot", 1}, {"expert", 7}}});
      },
      {"'dropped[0].expert'", "7"});
  broken([](auto& j) { j["stats"]["routed_tokens"] = -4; }, {"'stats.routed_tokens'"});
  broken([](auto& j) { j["nnz"] = 6; }, {"'nnz'", "6"});
  broken([](auto& j) { j["experts"][1]["expert"] = 0; }, {"'experts[1].expert'"});
}

TEST_CASE("plan_from_json: types, missing fields and lengths", "[moe][plan][json]") {
  const auto good = small_plan_json();
  const auto broken = [&](auto&& edit, std::initializer_list<std::string> words) {
    auto j = good;
    edit(j);
    require_rejected(j, words);
  };
  // nlohmann's "[json.exception.type_error.302] type must be number, but is string" used to
  // leak through; now the error names the field.
  broken([](auto& j) { j["top_k"] = "two"; }, {"'top_k'", "\"two\"", "integer"});
  broken([](auto& j) { j["experts"][0]["gates"][0] = "x"; }, {"'experts[0].gates[0]'", "number"});
  broken([](auto& j) { j["choice_weight"][0][0] = nullptr; }, {"'choice_weight[0][0]'", "null"});
  broken([](auto& j) { j["capacity_clamped"] = 1; }, {"'capacity_clamped'", "boolean"});
  broken([](auto& j) { j["stats"]["aux_loss"] = true; }, {"'stats.aux_loss'", "number"});
  broken([](auto& j) { j.erase("capacity"); }, {"'capacity'", "missing"});
  broken([](auto& j) { j["stats"].erase("entropy"); }, {"'stats.entropy'", "missing"});
  broken([](auto& j) { j["experts"][2] = 5; }, {"'experts[2]'", "object"});
  broken([](auto& j) { j = nlohmann::json::array({1, 2}); }, {"document", "object", "array"});
  // A float gate past float's range would be undefined behaviour to convert.
  broken([](auto& j) { j["experts"][0]["gates"][0] = 1e300; },
         {"'experts[0].gates[0]'", "1e+300", "float"});
  broken([](auto& j) { j["choice_weight"][1][1] = -1e39; }, {"'choice_weight[1][1]'"});
  // Lengths must agree with the counts: checked before anything is allocated, so a huge
  // num_tokens with short arrays is an error, never a multi-terabyte allocation.
  broken([](auto& j) { j["num_tokens"] = 1000000; }, {"'choice_expert'", "T=1000000"});
  broken([](auto& j) { j["num_tokens"] = std::int64_t(1) << 40; }, {"'num_tokens'"});
  broken([](auto& j) { j["top_k"] = 1 << 30; }, {"'choice_expert[0]'", "K=1073741824"});
  broken([](auto& j) { j["expert_offsets"].push_back(7); }, {"'expert_offsets'", "E+1=4"});
  broken([](auto& j) { j["expert_offsets"][1] = 3; }, {"'experts[0].tokens'", "expert_offsets"});
  broken([](auto& j) { j["experts"][0]["slots"].push_back(0); }, {"'experts[0].slots'"});
  broken([](auto& j) { j["experts"].erase(2); }, {"'experts'", "E=3"});
  broken([](auto& j) { j["choice_weight"][2].erase(0); }, {"'choice_weight[2]'", "K=2"});
  broken([](auto& j) { j["stats"]["mean_prob"] = {0.5, 0.5}; }, {"'stats.mean_prob'", "E=3"});
  broken(
      [](auto& j) {
        j["stats"]["kept_per_expert"] = {1, 2, 3, 4};
      },
      {"'stats.kept_per_expert'"});
  // Well-formed fields, broken plan: check()'s message, prefixed by plan_from_json.
  broken([](auto& j) { j["capacity"] = 2; }, {"DispatchPlan::check", "over capacity"});

  // Unknown fields are ignored; empty statistics arrays (absent statistics) are accepted.
  auto extra = good;
  extra["comment"] = {{"nested", {1, 2, 3}}};
  extra["stats"]["mean_prob"] = nlohmann::json::array();
  REQUIRE_NOTHROW(moe::plan_from_json<float>(extra));
}

TEST_CASE("plan_from_json from text: parse errors are switchyard errors", "[moe][plan][json]") {
  const auto p = small_plan();
  test_support::require_same_plan(moe::plan_from_json<float>(moe::to_json_string(p)), p);
  for (const std::string text : {"", "{\"num_tokens\":", "[1, 2", "nul", "{} x"}) {
    CAPTURE(text);
    REQUIRE_THROWS_AS(moe::plan_from_json<float>(text), switchyard::error);
    REQUIRE_THROWS_WITH(moe::plan_from_json<float>(text), Contains("moe::plan_from_json") &&
                                                              Contains("not valid JSON") &&
                                                              !Contains("json.exception"));
  }
  // Deep nesting is parsed without recursion and never printed in full.
  const std::string deep =
      "{\"num_tokens\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  REQUIRE_THROWS_WITH(moe::plan_from_json<float>(deep),
                      Contains("'num_tokens'") && Contains("array"));
}

// ---- hostile values in a plan built by hand: check(), reset(), make_token_choice_plan ----------

TEST_CASE("DispatchPlan::check never overflows on field values", "[moe][plan]") {
  const auto good = small_plan();
  const auto broken = [&](auto&& edit, const char* what) {
    auto p = good;
    edit(p);
    REQUIRE_THROWS_AS(p.check(), switchyard::error);
    REQUIRE_THROWS_WITH(p.check(), Contains("DispatchPlan::check") && Contains(what));
  };
  constexpr std::int64_t big = std::numeric_limits<std::int64_t>::max();
  // num_experts + 1 and num_tokens * top_k used to overflow.
  broken([](auto& p) { p.num_experts = big; }, "num_experts");
  broken([](auto& p) { p.num_tokens = big; }, "num_tokens");
  broken([](auto& p) { p.top_k = big; }, "top_k");
  broken([](auto& p) { p.num_tokens = std::int64_t(1) << 32; }, "num_tokens");
  // An offset near INT64_MAX used to walk far past the end of token_index.
  broken([&](auto& p) { p.expert_offsets[1] = big; }, "expert_offsets");
  broken([&](auto& p) { p.expert_offsets[1] = std::numeric_limits<std::int64_t>::min(); },
         "expert_offsets");
  broken([](auto& p) { p.capacity = -7; }, "capacity");
  broken([](auto& p) { p.requested_capacity = -2; }, "requested_capacity");
  broken([](auto& p) { p.stats.mean_prob = {0.5}; }, "mean_prob");
  broken([](auto& p) { p.stats.tokens_per_expert.push_back(1); }, "tokens_per_expert");
  broken([](auto& p) { p.stats.kept_per_expert = {1, 2}; }, "kept_per_expert");

  // Absent statistics (empty arrays) are fine.
  auto no_stats = good;
  no_stats.stats = {};
  REQUIRE_NOTHROW(no_stats.check());
  // check() allocates nothing per token: an expert-choice plan (K = 0) with the largest
  // token count and no entries is checked in constant memory.
  moe::DispatchPlan<float> wide;
  wide.num_tokens = std::numeric_limits<std::int32_t>::max();
  wide.num_experts = 2;
  wide.expert_offsets = {0, 0, 0};
  REQUIRE_NOTHROW(wide.check());
}

TEST_CASE("DispatchPlan::reset and make_token_choice_plan check sizes first", "[moe][plan]") {
  constexpr std::int64_t big = std::numeric_limits<std::int64_t>::max();
  moe::DispatchPlan<float> p;
  REQUIRE_THROWS_AS(p.reset(4, big, 2), config_error);
  REQUIRE_THROWS_WITH(p.reset(4, big, 2), Contains("DispatchPlan::reset") && Contains("experts"));
  REQUIRE_THROWS_AS(p.reset(big, 3, 1), config_error);
  REQUIRE_THROWS_AS(p.reset(-1, 3, 1), config_error);
  REQUIRE_THROWS_AS(p.reset(1 << 30, 3, 1 << 30), shape_error);
  REQUIRE_THROWS_WITH(p.reset(1 << 30, 3, 1 << 30), Contains("DispatchPlan::reset"));
  REQUIRE_NOTHROW(p.reset(4, 3, 2));

  // INT64_MAX experts used to overflow inside reset.
  Tensor<std::int32_t> e({1, 1});
  Tensor<float> w({1, 1});
  e[0] = 0;
  w[0] = 1;
  REQUIRE_THROWS_AS(
      (moe::make_token_choice_plan<float, std::int32_t>(big, e.view<2>(), w.view<2>())),
      config_error);
  REQUIRE_THROWS_WITH(
      (moe::make_token_choice_plan<float, std::int32_t>(big, e.view<2>(), w.view<2>())),
      Contains("make_token_choice_plan") && Contains("num_experts"));
  // [T, K] views whose element count is absurd: an error before any allocation.
  const ConstView<std::int32_t, 2> huge_e(e.data(), {big, 1}, {0, 0});
  const ConstView<float, 2> huge_w(w.data(), {big, 1}, {0, 0});
  REQUIRE_THROWS_AS((moe::make_token_choice_plan<float, std::int32_t>(3, huge_e, huge_w)),
                    shape_error);
  REQUIRE_THROWS_WITH((moe::make_token_choice_plan<float, std::int32_t>(3, huge_e, huge_w)),
                      Contains("make_token_choice_plan") && Contains("experts"));
  const ConstView<std::int32_t, 2> wide_e(e.data(), {1 << 20, 1 << 20}, {0, 0});
  const ConstView<float, 2> wide_w(w.data(), {1 << 20, 1 << 20}, {0, 0});
  REQUIRE_THROWS_AS((moe::make_token_choice_plan<float, std::int32_t>(3, wide_e, wide_w)),
                    shape_error);
  // An unsigned id of 2^64 - 1 is out of range, not the "unused" marker -1.
  Tensor<std::uint64_t> eu({1, 1});
  eu[0] = ~std::uint64_t(0);
  REQUIRE_THROWS_AS(
      (moe::make_token_choice_plan<float, std::uint64_t>(3, eu.view<2>(), w.view<2>())),
      config_error);
}

TEST_CASE("make_token_choice_plan rejects non-finite weights", "[moe][plan]") {
  Tensor<std::int32_t> e({2, 2});
  Tensor<float> w({2, 2});
  const std::int32_t ev[4] = {0, 1, 1, -1};
  for (int i = 0; i < 4; ++i) {
    e[i] = ev[i];
    w[i] = 0.5f;
  }
  const auto make = [&] {
    return moe::make_token_choice_plan<float, std::int32_t>(2, e.view<2>(), w.view<2>());
  };
  for (const float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
        -std::numeric_limits<float>::infinity()}) {
    CAPTURE(bad);
    w[1] = bad;
    REQUIRE_THROWS_AS(make(), config_error);
    REQUIRE_THROWS_WITH(
        make(), Contains("make_token_choice_plan") && Contains("weights") && Contains("finite"));
    w[1] = 0.5f;
    w[3] = bad;  // the weight of an unused slot (-1) is ignored
    REQUIRE_NOTHROW(make());
    REQUIRE(make().choice_weight[3] == 0.0f);
    w[3] = 0.5f;
  }
}
