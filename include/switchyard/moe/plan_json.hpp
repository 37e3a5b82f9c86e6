#pragma once
// DispatchPlan <-> JSON (nlohmann::json), to inspect, diff and store routing
// decisions. Every field of the plan is written:
//
// {
//   "num_tokens": T, "num_experts": E, "top_k": K, "nnz": N,
//   "capacity": C (-1 = none), "requested_capacity": R (-1 = none),
//   "capacity_clamped": bool,
//   "expert_offsets": [E+1 ints],
//   "experts": [ {"expert": e, "tokens": [...], "slots": [...], "gates": [...]}, ... ]  (E entries,
//               the CSR run of each expert: tokens ascending, with their slots and gates),
//   "choice_expert": [[K ints] x T]  (-1 = unused; [] rows when K = 0, expert-choice plans),
//   "choice_weight": [[K numbers] x T],
//   "dropped": [ {"token": t, "slot": s, "expert": e}, ... ],
//   "stats": {"tokens_per_expert": [...], "kept_per_expert": [...], "mean_prob": [...],
//             "routed_tokens": n, "dropped": n, "tokens_without_expert": n,
//             "aux_loss": x, "z_loss": x, "entropy": x}
// }
//
// Numbers are written as doubles, which hold every float and double gate exactly,
// and nlohmann prints the shortest text that reads back to the same double, so
// to_json -> dump -> parse -> plan_from_json gives back the same plan bit for bit.
// Non-finite values (never produced by the routers) would be written as null.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/moe/plan.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

/// All fields of `plan` as a JSON object (layout in the file comment).
template <class T>
nlohmann::json to_json(const DispatchPlan<T>& plan) {
  using nlohmann::json;
  json j;
  j["num_tokens"] = plan.num_tokens;
  j["num_experts"] = plan.num_experts;
  j["top_k"] = plan.top_k;
  j["nnz"] = plan.nnz();
  j["capacity"] = plan.capacity;
  j["requested_capacity"] = plan.requested_capacity;
  j["capacity_clamped"] = plan.capacity_clamped;
  j["expert_offsets"] = plan.expert_offsets;
  json experts = json::array();
  for (std::int64_t e = 0; e + 1 < static_cast<std::int64_t>(plan.expert_offsets.size()); ++e) {
    json run;
    run["expert"] = e;
    json tokens = json::array(), slots = json::array(), gates = json::array();
    for (std::int64_t i = plan.expert_offsets[e]; i < plan.expert_offsets[e + 1]; ++i) {
      tokens.push_back(plan.token_index[i]);
      slots.push_back(plan.slot[i]);
      gates.push_back(static_cast<double>(plan.gate[i]));
    }
    run["tokens"] = std::move(tokens);
    run["slots"] = std::move(slots);
    run["gates"] = std::move(gates);
    experts.push_back(std::move(run));
  }
  j["experts"] = std::move(experts);
  json ce = json::array(), cw = json::array();
  const std::int64_t k = plan.top_k;
  if (k > 0) {
    for (std::int64_t t = 0; t < plan.num_tokens; ++t) {
      json re = json::array(), rw = json::array();
      for (std::int64_t s = 0; s < k; ++s) {
        re.push_back(plan.choice_expert[t * k + s]);
        rw.push_back(static_cast<double>(plan.choice_weight[t * k + s]));
      }
      ce.push_back(std::move(re));
      cw.push_back(std::move(rw));
    }
  }
  j["choice_expert"] = std::move(ce);
  j["choice_weight"] = std::move(cw);
  json dropped = json::array();
  for (const auto& d : plan.dropped)
    dropped.push_back({{"token", d.token}, {"slot", d.slot}, {"expert", d.expert}});
  j["dropped"] = std::move(dropped);
  const auto& st = plan.stats;
  j["stats"] = {{"tokens_per_expert", st.tokens_per_expert},
                {"kept_per_expert", st.kept_per_expert},
                {"mean_prob", st.mean_prob},
                {"routed_tokens", st.routed_tokens},
                {"dropped", st.dropped},
                {"tokens_without_expert", st.tokens_without_expert},
                {"aux_loss", st.aux_loss},
                {"z_loss", st.z_loss},
                {"entropy", st.entropy}};
  return j;
}

/// to_json(plan).dump(indent): indent < 0 gives one line.
template <class T>
std::string to_json_string(const DispatchPlan<T>& plan, int indent = 2) {
  return to_json(plan).dump(indent);
}

/// nlohmann ADL hook: `nlohmann::json j = plan;`.
template <class T>
void to_json(nlohmann::json& j, const DispatchPlan<T>& plan) {
  j = to_json(plan);
}

/// The plan a to_json object describes. Throws switchyard::error naming the
/// problem if a field is missing or mistyped, or if the plan fails check().
template <class T>
DispatchPlan<T> plan_from_json(const nlohmann::json& j) {
  DispatchPlan<T> plan;
  try {
    plan.num_tokens = j.at("num_tokens").get<std::int64_t>();
    plan.num_experts = j.at("num_experts").get<std::int64_t>();
    plan.top_k = j.at("top_k").get<std::int64_t>();
    plan.capacity = j.at("capacity").get<std::int64_t>();
    plan.requested_capacity = j.at("requested_capacity").get<std::int64_t>();
    plan.capacity_clamped = j.at("capacity_clamped").get<bool>();
    plan.expert_offsets = j.at("expert_offsets").get<std::vector<std::int64_t>>();
    for (const auto& run : j.at("experts")) {
      const auto tokens = run.at("tokens").get<std::vector<std::int32_t>>();
      const auto slots = run.at("slots").get<std::vector<std::int32_t>>();
      const auto gates = run.at("gates").get<std::vector<double>>();
      if (slots.size() != tokens.size() || gates.size() != tokens.size())
        throw switchyard::error("plan_from_json: tokens, slots and gates differ in length");
      plan.token_index.insert(plan.token_index.end(), tokens.begin(), tokens.end());
      plan.slot.insert(plan.slot.end(), slots.begin(), slots.end());
      for (double g : gates) plan.gate.push_back(static_cast<T>(g));
    }
    for (const auto& row : j.at("choice_expert"))
      for (const auto& e : row) plan.choice_expert.push_back(e.get<std::int32_t>());
    for (const auto& row : j.at("choice_weight"))
      for (const auto& w : row) plan.choice_weight.push_back(static_cast<T>(w.get<double>()));
    for (const auto& d : j.at("dropped")) {
      plan.dropped.push_back({d.at("token").get<std::int32_t>(), d.at("slot").get<std::int32_t>(),
                              d.at("expert").get<std::int32_t>()});
    }
    const auto& st = j.at("stats");
    plan.stats.tokens_per_expert = st.at("tokens_per_expert").get<std::vector<std::int64_t>>();
    plan.stats.kept_per_expert = st.at("kept_per_expert").get<std::vector<std::int64_t>>();
    plan.stats.mean_prob = st.at("mean_prob").get<std::vector<double>>();
    plan.stats.routed_tokens = st.at("routed_tokens").get<std::int64_t>();
    plan.stats.dropped = st.at("dropped").get<std::int64_t>();
    plan.stats.tokens_without_expert = st.at("tokens_without_expert").get<std::int64_t>();
    plan.stats.aux_loss = st.at("aux_loss").get<double>();
    plan.stats.z_loss = st.at("z_loss").get<double>();
    plan.stats.entropy = st.at("entropy").get<double>();
  } catch (const nlohmann::json::exception& ex) {
    throw switchyard::error(std::string("plan_from_json: ") + ex.what());
  }
  plan.check();
  return plan;
}

/// nlohmann ADL hook: `auto plan = j.get<DispatchPlan<float>>();`.
template <class T>
void from_json(const nlohmann::json& j, DispatchPlan<T>& plan) {
  plan = plan_from_json<T>(j);
}

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
