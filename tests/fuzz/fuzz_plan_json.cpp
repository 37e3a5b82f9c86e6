// libFuzzer target: moe::plan_from_json from arbitrary text (scripts/fuzz.sh runs it).
//
// Every input must either give a plan or throw switchyard::error whose message starts
// with "moe::plan_from_json: ", is short, and holds no raw nlohmann message; any other
// exception escapes and aborts (a finding), as do sanitizer reports. An accepted plan
// must pass check(), and to_json -> text -> plan_from_json must give it back bit for
// bit. Both float and double plans are read.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/moe/plan_json.hpp"

namespace {

using switchyard::moe::DispatchPlan;

[[noreturn]] void finding(const char* what, std::string_view detail = {}) {
  std::fprintf(stderr, "fuzz_plan_json: %s\n%.*s\n", what, static_cast<int>(detail.size()),
               detail.data());
  std::abort();
}

/// Bitwise equality of vectors (so -0.0 and 0.0 differ, as they would in a file).
template <class V>
bool same_bits(const V& a, const V& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0);
}

template <class T>
bool same_plan(const DispatchPlan<T>& a, const DispatchPlan<T>& b) {
  bool dropped_same = a.dropped.size() == b.dropped.size();
  for (std::size_t i = 0; dropped_same && i < a.dropped.size(); ++i) {
    dropped_same = a.dropped[i].token == b.dropped[i].token &&
                   a.dropped[i].slot == b.dropped[i].slot &&
                   a.dropped[i].expert == b.dropped[i].expert;
  }
  const auto& s = a.stats;
  const auto& t = b.stats;
  return dropped_same && a.num_tokens == b.num_tokens && a.num_experts == b.num_experts &&
         a.top_k == b.top_k && a.capacity == b.capacity &&
         a.requested_capacity == b.requested_capacity && a.capacity_clamped == b.capacity_clamped &&
         a.expert_offsets == b.expert_offsets && a.token_index == b.token_index &&
         a.slot == b.slot && same_bits(a.gate, b.gate) && a.choice_expert == b.choice_expert &&
         same_bits(a.choice_weight, b.choice_weight) &&
         s.tokens_per_expert == t.tokens_per_expert && s.kept_per_expert == t.kept_per_expert &&
         same_bits(s.mean_prob, t.mean_prob) && s.routed_tokens == t.routed_tokens &&
         s.dropped == t.dropped && s.tokens_without_expert == t.tokens_without_expert &&
         std::memcmp(&s.aux_loss, &t.aux_loss, sizeof(double)) == 0 &&
         std::memcmp(&s.z_loss, &t.z_loss, sizeof(double)) == 0 &&
         std::memcmp(&s.entropy, &t.entropy, sizeof(double)) == 0;
}

template <class T>
void one(std::string_view text) {
  DispatchPlan<T> plan;
  try {
    plan = switchyard::moe::plan_from_json<T>(text);
  } catch (const switchyard::error& e) {
    // The message has one of our shapes (a raw nlohmann message has none of them; a
    // substring test would not do, as parse errors quote the input, which may hold anything).
    const std::string_view message = e.what();
    if (message.size() > 2000) finding("error message over 2000 characters", message);
    std::string_view what = message;
    constexpr std::string_view prefix = "moe::plan_from_json: ";
    if (what.substr(0, prefix.size()) != prefix) finding("error not from plan_from_json", message);
    what.remove_prefix(prefix.size());
    for (const std::string_view shape : {"field '", "the document = ",
                                         "the fields are well-formed but do not make a valid plan: "
                                         "DispatchPlan::check: ",
                                         "text is not valid JSON: "}) {
      if (what.substr(0, shape.size()) == shape) {
        what.remove_prefix(shape.size());
        if (what.substr(0, 16) == "[json.exception.") break;
        return;
      }
    }
    finding("error message of unknown shape (a leaked nlohmann message?)", message);
  }
  plan.check();  // throws (uncaught: a finding) if an accepted plan is invalid
  const std::string dumped = switchyard::moe::to_json_string(plan, -1);
  const auto again = switchyard::moe::plan_from_json<T>(dumped);  // must not throw
  if (!same_plan(plan, again)) finding("to_json round trip changed the plan");
  if (switchyard::moe::to_json_string(again, -1) != dumped) finding("to_json not stable");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  one<float>(text);
  one<double>(text);
  return 0;
}
