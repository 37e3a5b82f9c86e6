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
//   "choice_expert": [[K ints] x T]  (-1 = unused; [] when K = 0, expert-choice plans),
//   "choice_weight": [[K numbers] x T],
//   "dropped": [ {"token": t, "slot": s, "expert": e, "gate": g}, ... ],
//   "stats": {"tokens_per_expert": [...], "kept_per_expert": [...], "mean_prob": [...],
//             "routed_tokens": n, "dropped": n, "tokens_without_expert": n,
//             "aux_loss": x, "aux_loss_scaled": x, "z_loss": x, "entropy": x}
// }
// (choice_kept is not written: it follows from the runs and is rebuilt on reading. A
// dropped entry's "gate" and "aux_loss_scaled" are optional on reading, for documents
// written before they existed: 0 and aux_loss.)
//
// Numbers are written as doubles, which hold every float and double gate exactly,
// and nlohmann prints the shortest text that reads back to the same double, so
// to_json -> dump -> parse -> plan_from_json gives back the same plan bit for bit.
// Non-finite values (never produced by the routers) would be written as null, which
// plan_from_json rejects.
//
// Reading a document (plan_from_json) trusts nothing in it. Every field is checked for
// type and range before it is used: integer fields must be JSON integers (6.5 or 1e20 is
// an error, never a truncation) inside their range (T, E and K in [0, 2^31 - 1], since
// ids are int32; token ids in [0, T); capacities -1 or >= 0...); gates, weights and
// statistics must be finite numbers that fit T; every array length must match the counts
// (E+1 offsets, E runs whose lengths are the offset differences, T rows of K choices,
// statistics of length 0 or E) and is compared before anything is allocated, so memory
// use is bounded by the size of the document, whatever counts it declares. Fields we do
// not know are ignored; "nnz" and a run's "expert" are optional but checked when present.
// Finally the plan must pass DispatchPlan::check().
//
// Errors: a document is data, not an argument, so every problem with it (text that is not
// JSON, a missing or mistyped field, a value out of range, inconsistent lengths, a plan
// that fails check()) throws switchyard::error, never nlohmann's exceptions, with one line
//   moe::plan_from_json: field 'experts[3].tokens[2]' = 4294967297 is invalid; expected a
//   token index in [0, T=6)
// naming the field by its path. Values are quoted in short form (strings truncated, arrays
// and objects summarised), so a hostile document cannot blow up the message.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
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
    dropped.push_back(
        {{"token", d.token}, {"slot", d.slot}, {"expert", d.expert}, {"gate", d.gate}});
  j["dropped"] = std::move(dropped);
  const auto& st = plan.stats;
  j["stats"] = {{"tokens_per_expert", st.tokens_per_expert},
                {"kept_per_expert", st.kept_per_expert},
                {"mean_prob", st.mean_prob},
                {"routed_tokens", st.routed_tokens},
                {"dropped", st.dropped},
                {"tokens_without_expert", st.tokens_without_expert},
                {"aux_loss", st.aux_loss},
                {"aux_loss_scaled", st.aux_loss_scaled},
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

namespace detail {

/// Reads a to_json document into a plan, checking each field before it is used (rules in
/// the file comment). Paths and expectations for messages are built only on failure.
template <class T>
class PlanJsonReader {
 public:
  using json = nlohmann::json;

  static DispatchPlan<T> read(const json& doc) {
    if (!doc.is_object()) {
      fail("the document = " + describe(doc) + " is invalid; expected a JSON object");
    }
    DispatchPlan<T> plan;
    plan.num_tokens = count(doc, "num_tokens", 0);
    plan.num_experts = count(doc, "num_experts", 1);
    plan.top_k = count(doc, "top_k", 0);
    plan.capacity = capacity(doc, "capacity");
    plan.requested_capacity = capacity(doc, "requested_capacity");
    const json& clamped = member(doc, "", "capacity_clamped");
    if (!clamped.is_boolean()) invalid("capacity_clamped", clamped, "a boolean");
    plan.capacity_clamped = clamped.get<bool>();

    read_offsets(doc, plan);
    read_runs(doc, plan);
    read_choices(doc, plan);
    read_dropped(doc, plan);
    read_stats(member(doc, "", "stats"), plan);

    try {
      plan.check();
    } catch (const switchyard::error& e) {
      fail(std::string("the fields are well-formed but do not make a valid plan: ") + e.what());
    }
    moe::detail::fill_choice_kept(plan);  // only now are the runs known to be in range
    return plan;
  }

 private:
  static constexpr std::int64_t int64_max = std::numeric_limits<std::int64_t>::max();
  static constexpr std::size_t any_length = std::numeric_limits<std::size_t>::max();

  [[noreturn]] static void fail(const std::string& what) {
    throw switchyard::error("moe::plan_from_json: " + what);
  }

  /// A JSON value in a message: scalars as JSON text (at most ~60 characters), arrays and
  /// objects by size only, so a huge or deeply nested value is never printed (or recursed).
  static std::string describe(const json& v) {
    constexpr auto replace = json::error_handler_t::replace;
    std::string out;
    if (v.is_array()) {
      out = "[...] (an array of " + std::to_string(v.size()) + ")";
    } else if (v.is_object()) {
      out = "{...} (an object of " + std::to_string(v.size()) + " fields)";
    } else if (v.is_number_float() && !std::isfinite(v.get<double>())) {
      std::ostringstream os;  // dump() would write a non-finite double as null
      os << v.get<double>();
      out = os.str();
    } else if (v.is_string() && v.get_ref<const std::string&>().size() > 64) {
      out = json(v.get_ref<const std::string&>().substr(0, 64)).dump(-1, ' ', false, replace);
      out.insert(out.size() - 1, "...");
    } else {
      out = v.dump(-1, ' ', false, replace);  // invalid UTF-8 (cut or built in C++) is replaced
    }
    return out;
  }

  [[noreturn]] static void invalid(const std::string& path, const json& v,
                                   const std::string& expected) {
    fail("field '" + path + "' = " + describe(v) + " is invalid; expected " + expected);
  }

  [[noreturn]] static void wrong_length(const std::string& path, std::size_t got,
                                        const std::string& expected) {
    fail("field '" + path + "' has " + std::to_string(got) + (got == 1 ? " entry" : " entries") +
         "; expected " + expected);
  }

  /// "base[i]"
  static std::string at(const std::string& base, std::size_t i) {
    return base + "[" + std::to_string(i) + "]";
  }

  /// obj[key] where obj (at `path`, "" for the document) is an object; missing is an error.
  static const json& member(const json& obj, const std::string& path, const char* key) {
    const auto it = obj.find(key);
    if (it == obj.end()) fail("field '" + path + (path.empty() ? "" : ".") + key + "' is missing");
    return *it;
  }

  /// The value of a JSON integer in [lo, hi], or nullopt (floats, even integral ones, and
  /// every other type included). Reads the stored integer directly: no conversion can wrap.
  static std::optional<std::int64_t> integer(const json& v, std::int64_t lo, std::int64_t hi) {
    if (hi < lo) return std::nullopt;  // an empty range, e.g. token ids when T = 0
    if (const auto* u = v.get_ptr<const json::number_unsigned_t*>()) {
      if (hi < 0 || *u > static_cast<std::uint64_t>(hi)) return std::nullopt;
      const auto x = static_cast<std::int64_t>(*u);
      return x >= lo ? std::optional(x) : std::nullopt;
    }
    if (const auto* i = v.get_ptr<const json::number_integer_t*>()) {
      if (*i < lo || *i > hi) return std::nullopt;
      return static_cast<std::int64_t>(*i);
    }
    return std::nullopt;
  }

  /// A finite JSON number that U can hold; U's value of it.
  template <class U>
  static std::optional<U> number(const json& v) {
    if (!v.is_number()) return std::nullopt;
    const double x = v.get<double>();
    if (!std::isfinite(x) || std::abs(x) > static_cast<double>(std::numeric_limits<U>::max()))
      return std::nullopt;
    return static_cast<U>(x);
  }

  template <class U>
  static std::string number_expectation() {
    return std::is_same_v<U, float> ? "a finite number in the range of float" : "a finite number";
  }

  /// v at `path` is an array; `n` is its required length (any_length: any), `what` says why.
  static const json& array(const json& v, const std::string& path, std::size_t n = any_length,
                           const std::string& what = {}) {
    if (!v.is_array()) invalid(path, v, "an array" + (what.empty() ? "" : " of " + what));
    if (n != any_length && v.size() != n) wrong_length(path, v.size(), what);
    return v;
  }

  static const json& object(const json& v, const std::string& path, const char* fields) {
    if (!v.is_object()) invalid(path, v, std::string("an object ") + fields);
    return v;
  }

  /// num_tokens / num_experts / top_k: an integer in [lo, max_plan_extent].
  static std::int64_t count(const json& doc, const char* key, std::int64_t lo) {
    const json& v = member(doc, "", key);
    const auto x = integer(v, lo, max_plan_extent);
    if (!x) {
      invalid(key, v,
              "an integer in [" + std::to_string(lo) + ", " + std::to_string(max_plan_extent) +
                  "] (ids are int32)");
    }
    return *x;
  }

  static std::int64_t capacity(const json& doc, const char* key) {
    const json& v = member(doc, "", key);
    const auto x = integer(v, -1, int64_max);
    if (!x) invalid(key, v, "-1 (none) or an integer >= 0");
    return *x;
  }

  /// A non-negative int64 count (statistics).
  static std::int64_t nonnegative(const json& v, const std::string& path) {
    const auto x = integer(v, 0, int64_max);
    if (!x) invalid(path, v, "an integer >= 0");
    return *x;
  }

  static std::string slot_expectation(std::int64_t K) {
    return K > 0 ? "a slot in [0, K=" + std::to_string(K) + ")"
                 : "a slot in [0, " + std::to_string(max_plan_extent) + "] (K = 0)";
  }

  static std::int32_t slot(const json& v, std::int64_t K, const std::string& path) {
    const auto x = integer(v, 0, K > 0 ? K - 1 : max_plan_extent);
    if (!x) invalid(path, v, slot_expectation(K));
    return static_cast<std::int32_t>(*x);
  }

  static void read_offsets(const json& doc, DispatchPlan<T>& plan) {
    const std::int64_t E = plan.num_experts;
    const json& offsets = array(member(doc, "", "expert_offsets"), "expert_offsets",
                                static_cast<std::size_t>(E + 1), "E+1=" + std::to_string(E + 1));
    plan.expert_offsets.resize(static_cast<std::size_t>(E + 1));  // E + 1 elements exist
    for (std::int64_t e = 0; e <= E; ++e) {
      // Starts at 0 and never decreases: every run length below is a valid difference.
      const std::int64_t lo = e == 0 ? 0 : plan.expert_offsets[e - 1];
      const auto x = integer(offsets[e], lo, e == 0 ? 0 : int64_max);
      if (!x) {
        invalid(at("expert_offsets", e), offsets[e],
                e == 0 ? std::string("0")
                       : "an integer >= expert_offsets[" + std::to_string(e - 1) +
                             "] = " + std::to_string(lo) + " (offsets never decrease)");
      }
      plan.expert_offsets[e] = *x;
    }
    if (const auto it = doc.find("nnz"); it != doc.end()) {
      const std::int64_t nnz = plan.expert_offsets[E];
      if (integer(*it, nnz, nnz) != nnz) {
        invalid("nnz", *it, std::to_string(nnz) + " (expert_offsets[E])");
      }
    }
  }

  static void read_runs(const json& doc, DispatchPlan<T>& plan) {
    const std::int64_t E = plan.num_experts, tokens = plan.num_tokens, K = plan.top_k;
    const json& runs = array(member(doc, "", "experts"), "experts", static_cast<std::size_t>(E),
                             "E=" + std::to_string(E) + " (one run per expert)");
    // First the structure, so the entries are reserved only once their count is known to
    // match the arrays actually present.
    for (std::int64_t e = 0; e < E; ++e) {
      const std::string path = at("experts", e);
      const json& run = object(runs[e], path, "{expert, tokens, slots, gates}");
      if (const auto it = run.find("expert"); it != run.end() && integer(*it, e, e) != e) {
        invalid(path + ".expert", *it, std::to_string(e));
      }
      const auto n = static_cast<std::size_t>(plan.expert_offsets[e + 1] - plan.expert_offsets[e]);
      array(member(run, path, "tokens"), path + ".tokens", n,
            std::to_string(n) + " (expert_offsets[" + std::to_string(e + 1) +
                "] - expert_offsets[" + std::to_string(e) + "])");
      for (const char* key : {"slots", "gates"}) {
        array(member(run, path, key), path + "." + key, n,
              std::to_string(n) + " (as many as " + path + ".tokens)");
      }
    }
    const auto nnz = static_cast<std::size_t>(plan.expert_offsets[E]);
    plan.token_index.reserve(nnz);
    plan.slot.reserve(nnz);
    plan.gate.reserve(nnz);
    for (std::int64_t e = 0; e < E; ++e) {
      const json& run = runs[e];
      const json &ids = *run.find("tokens"), &slots = *run.find("slots"),
                 &gates = *run.find("gates");
      for (std::size_t i = 0; i < ids.size(); ++i) {
        const auto t = integer(ids[i], 0, tokens - 1);
        if (!t) {
          invalid(at(at("experts", e) + ".tokens", i), ids[i],
                  "a token index in [0, T=" + std::to_string(tokens) + ")");
        }
        const auto g = number<T>(gates[i]);
        if (!g) invalid(at(at("experts", e) + ".gates", i), gates[i], number_expectation<T>());
        plan.token_index.push_back(static_cast<std::int32_t>(*t));
        plan.slot.push_back(slot(slots[i], K, at(at("experts", e) + ".slots", i)));
        plan.gate.push_back(*g);
      }
    }
  }

  /// choice_expert and choice_weight: T rows of K values, or no rows at all when K = 0.
  static void read_choices(const json& doc, DispatchPlan<T>& plan) {
    const std::int64_t tokens = plan.num_tokens, E = plan.num_experts, K = plan.top_k;
    const auto rows_of = [&](const char* key) -> const json& {
      const json& rows = array(member(doc, "", key), key);
      if (K == 0 && rows.empty()) return rows;
      array(rows, key, static_cast<std::size_t>(tokens), "T=" + std::to_string(tokens) + " rows");
      for (std::size_t t = 0; t < rows.size(); ++t) {
        array(rows[t], at(key, t), static_cast<std::size_t>(K), "K=" + std::to_string(K));
      }
      return rows;
    };
    const json& ce = rows_of("choice_expert");
    const json& cw = rows_of("choice_weight");
    // Both hold T rows of K values (or nothing when K = 0): T * K is bounded by the document.
    const auto n = static_cast<std::size_t>(K == 0 ? 0 : tokens * K);
    plan.choice_expert.reserve(n);
    plan.choice_weight.reserve(n);
    for (std::size_t t = 0; t < ce.size(); ++t) {
      for (std::size_t s = 0; s < ce[t].size(); ++s) {
        const auto e = integer(ce[t][s], -1, E - 1);
        if (!e) {
          invalid(at(at("choice_expert", t), s), ce[t][s],
                  "-1 (unused) or an expert id in [0, E=" + std::to_string(E) + ")");
        }
        plan.choice_expert.push_back(static_cast<std::int32_t>(*e));
      }
    }
    for (std::size_t t = 0; t < cw.size(); ++t) {
      for (std::size_t s = 0; s < cw[t].size(); ++s) {
        const auto w = number<T>(cw[t][s]);
        if (!w) invalid(at(at("choice_weight", t), s), cw[t][s], number_expectation<T>());
        plan.choice_weight.push_back(*w);
      }
    }
  }

  static void read_dropped(const json& doc, DispatchPlan<T>& plan) {
    const std::int64_t tokens = plan.num_tokens, E = plan.num_experts, K = plan.top_k;
    const json& dropped = array(member(doc, "", "dropped"), "dropped");
    plan.dropped.reserve(dropped.size());
    for (std::size_t i = 0; i < dropped.size(); ++i) {
      const std::string path = at("dropped", i);
      const json& d = object(dropped[i], path, "{token, slot, expert}");
      const json& token = member(d, path, "token");
      const auto t = integer(token, 0, tokens - 1);
      if (!t)
        invalid(path + ".token", token, "a token index in [0, T=" + std::to_string(tokens) + ")");
      const std::int32_t s = slot(member(d, path, "slot"), K, path + ".slot");
      const json& expert = member(d, path, "expert");
      const auto e = integer(expert, 0, E - 1);
      if (!e) invalid(path + ".expert", expert, "an expert id in [0, E=" + std::to_string(E) + ")");
      double gate = 0;
      if (const auto it = d.find("gate"); it != d.end()) {
        const auto g = number<double>(*it);
        if (!g) invalid(path + ".gate", *it, "a finite number");
        gate = *g;
      }
      plan.dropped.push_back(
          {static_cast<std::int32_t>(*t), s, static_cast<std::int32_t>(*e), gate});
    }
  }

  static void read_stats(const json& st, DispatchPlan<T>& plan) {
    const std::int64_t E = plan.num_experts;
    object(st, "stats", "of router statistics");
    const auto per_expert = [&](const char* key) -> const json& {
      const std::string path = std::string("stats.") + key;
      const json& v = array(member(st, "stats", key), path);
      if (!v.empty() && v.size() != static_cast<std::size_t>(E)) {
        wrong_length(path, v.size(), "0 (absent) or E=" + std::to_string(E));
      }
      return v;
    };
    auto& out = plan.stats;
    for (auto [key, dst] : {std::pair{"tokens_per_expert", &out.tokens_per_expert},
                            std::pair{"kept_per_expert", &out.kept_per_expert}}) {
      const json& v = per_expert(key);
      for (std::size_t e = 0; e < v.size(); ++e)
        dst->push_back(nonnegative(v[e], at(std::string("stats.") + key, e)));
    }
    const json& mean_prob = per_expert("mean_prob");
    for (std::size_t e = 0; e < mean_prob.size(); ++e) {
      const auto p = number<double>(mean_prob[e]);
      if (!p) invalid(at("stats.mean_prob", e), mean_prob[e], "a finite number");
      out.mean_prob.push_back(*p);
    }
    out.routed_tokens = nonnegative(member(st, "stats", "routed_tokens"), "stats.routed_tokens");
    out.dropped = nonnegative(member(st, "stats", "dropped"), "stats.dropped");
    out.tokens_without_expert =
        nonnegative(member(st, "stats", "tokens_without_expert"), "stats.tokens_without_expert");
    for (auto [key, dst] : {std::pair{"aux_loss", &out.aux_loss}, std::pair{"z_loss", &out.z_loss},
                            std::pair{"entropy", &out.entropy}}) {
      const json& v = member(st, "stats", key);
      const auto x = number<double>(v);
      if (!x) invalid(std::string("stats.") + key, v, "a finite number");
      *dst = *x;
    }
    out.aux_loss_scaled = out.aux_loss;
    if (const auto it = st.find("aux_loss_scaled"); it != st.end()) {
      const auto x = number<double>(*it);
      if (!x) invalid("stats.aux_loss_scaled", *it, "a finite number");
      out.aux_loss_scaled = *x;
    }
  }
};

/// nlohmann's parse error without its "[json.exception.parse_error.101] " prefix, clipped.
inline std::string parse_error_text(const nlohmann::json::exception& e) {
  std::string_view what = e.what();
  if (what.rfind("[json.exception.", 0) == 0) {
    const auto end = what.find("] ");
    if (end != std::string_view::npos) what.remove_prefix(end + 2);
  }
  if (what.size() > 200) return std::string(what.substr(0, 200)) + "...";
  return std::string(what);
}

}  // namespace detail

/// The plan a to_json document describes, every field validated (see the file comment).
/// Throws switchyard::error naming the field for a missing, mistyped or out-of-range field,
/// a length that disagrees with the counts, or a plan that fails check().
template <class T>
DispatchPlan<T> plan_from_json(const nlohmann::json& j) {
  try {
    return detail::PlanJsonReader<T>::read(j);
  } catch (const nlohmann::json::exception& e) {
    // Not reached by design (every access is type-checked first); kept so that no
    // nlohmann exception can ever leave this function.
    throw switchyard::error("moe::plan_from_json: " + detail::parse_error_text(e));
  }
}

/// The plan in JSON text (e.g. to_json_string's output): parse, then plan_from_json(json).
/// Text that is not JSON throws switchyard::error "moe::plan_from_json: text is not valid
/// JSON: ...". Any nesting depth parses without recursion, and nothing deep is printed.
template <class T, class Text>
requires(std::is_convertible_v<const Text&, std::string_view> &&
         !std::is_same_v<std::remove_cvref_t<Text>, nlohmann::json>)
    DispatchPlan<T> plan_from_json(const Text& text) {
  const std::string_view sv(text);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(sv.begin(), sv.end());
  } catch (const nlohmann::json::exception& e) {
    throw switchyard::error("moe::plan_from_json: text is not valid JSON: " +
                            detail::parse_error_text(e));
  }
  return plan_from_json<T>(j);
}

/// nlohmann ADL hook: `auto plan = j.get<DispatchPlan<float>>();`.
template <class T>
void from_json(const nlohmann::json& j, DispatchPlan<T>& plan) {
  plan = plan_from_json<T>(j);
}

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
