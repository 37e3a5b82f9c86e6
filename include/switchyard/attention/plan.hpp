#pragma once
// AttentionPlan: which queries attend to which keys, as a list of query groups
// (CSR). The plan is plain data (no ISA-dependent code): routers build it, tests
// inspect it, attention/plan_executor.hpp runs it.
//
// Group g belongs to batch element group_batch[g] and to head group_head[g]
// (or to every head when group_head[g] == all_heads: the same token sets for all
// heads, as BiFormer's regions). Its queries are
// query_index[query_offsets[g] .. query_offsets[g+1]) and its keys
// key_index[key_offsets[g] .. key_offsets[g+1]), token positions along T (queries)
// and S (keys). Every query of the group attends to every key of the group, plus
// the optional pair rule:
//   causal      key position > query position: the pair is masked (-inf);
//   self_value  key position == query position: the logit is replaced by this
//               value (Routing Transformer's shared-QK penalty, -5e4), after the
//               causal mask (and the executor's keep masks), so a query with only
//               itself visible attends to itself.
//   finite_mask masked pairs get the lowest finite logit instead of -inf, as
//               PyTorch's masked_fill(-finfo.max): a row whose every key is masked
//               then averages its keys' values uniformly instead of giving 0.
// Memory keys (memory_keys = M > 0): group g also sees the M key/value rows
// group_memory[g] of the executor's memory tables ([R, M, D], e.g. one row per
// head and cluster), placed before its gathered keys. Memory keys have no
// position: the pair rule and the keep masks never mask them. group_memory[g] = -1
// (or an empty group_memory) gives group g no memory.
// Output modes:
//   write       each (batch, head, query) lies in at most one group (check()
//               verifies it); out rows of queries in no group are 0.
//   accumulate  a query may lie in several groups; out is the sum of its group
//               outputs (0 in none), counts [B, H, T] the number of groups.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// Additive pair rule applied inside every group (see the file comment).
struct PlanPairRule {
  bool causal = false;               // mask keys later than the query (original positions)
  std::optional<double> self_value;  // logit of a query/key pair at the same position
  bool finite_mask = false;          // masked logit = lowest finite value, not -inf
};

enum class PlanOutput { write, accumulate };

/// Query groups with the keys each may see (CSR), per batch element and head.
struct AttentionPlan {
  static constexpr std::int64_t all_heads = -1;

  std::int64_t batch = 0, heads = 0;           // B, H of the queries
  std::int64_t num_queries = 0;                // T
  std::int64_t num_keys = 0;                   // S
  std::vector<std::int64_t> group_batch;       // [G]
  std::vector<std::int64_t> group_head;        // [G], a head in [0, H) or all_heads
  std::vector<std::int64_t> query_offsets{0};  // [G + 1]
  std::vector<std::int64_t> query_index;       // [query_offsets.back()]
  std::vector<std::int64_t> key_offsets{0};    // [G + 1]
  std::vector<std::int64_t> key_index;         // [key_offsets.back()]
  std::int64_t memory_keys = 0;                // M memory key/value rows per group
  std::vector<std::int64_t> group_memory;      // [G] memory table row, -1 = none (or empty)
  PlanPairRule rule;
  PlanOutput output = PlanOutput::write;

  AttentionPlan() = default;
  AttentionPlan(std::int64_t B, std::int64_t H, std::int64_t T, std::int64_t S)
      : batch(B), heads(H), num_queries(T), num_keys(S) {}

  std::int64_t num_groups() const noexcept { return std::int64_t(group_batch.size()); }
  std::span<const std::int64_t> queries(std::int64_t g) const noexcept {
    return {query_index.data() + query_offsets[g],
            std::size_t(query_offsets[g + 1] - query_offsets[g])};
  }
  std::span<const std::int64_t> keys(std::int64_t g) const noexcept {
    return {key_index.data() + key_offsets[g], std::size_t(key_offsets[g + 1] - key_offsets[g])};
  }

  /// Appends a group of batch element b, head h (or all_heads), with memory table
  /// row `memory` (-1: none; see memory_keys).
  void add_group(std::int64_t b, std::int64_t h, std::span<const std::int64_t> q,
                 std::span<const std::int64_t> k, std::int64_t memory = -1) {
    if (memory >= 0 || !group_memory.empty()) {
      group_memory.resize(group_batch.size(), -1);
      group_memory.push_back(memory);
    }
    group_batch.push_back(b);
    group_head.push_back(h);
    query_index.insert(query_index.end(), q.begin(), q.end());
    key_index.insert(key_index.end(), k.begin(), k.end());
    query_offsets.push_back(std::int64_t(query_index.size()));
    key_offsets.push_back(std::int64_t(key_index.size()));
  }

  /// Largest query / key count of a group (workspace sizes).
  std::int64_t max_group_queries() const noexcept {
    std::int64_t m = 0;
    for (std::int64_t g = 0; g < num_groups(); ++g)
      m = std::max(m, query_offsets[g + 1] - query_offsets[g]);
    return m;
  }
  std::int64_t max_group_keys() const noexcept {
    std::int64_t m = 0;
    for (std::int64_t g = 0; g < num_groups(); ++g)
      m = std::max(m, key_offsets[g + 1] - key_offsets[g]);
    return m;
  }

  /// Memory table row of group g, or -1.
  std::int64_t memory_row(std::int64_t g) const noexcept {
    return memory_keys > 0 && !group_memory.empty() ? group_memory[std::size_t(g)] : -1;
  }

  /// Throws config_error (naming `layer::fn` and argument 'plan') if the CSR
  /// arrays are inconsistent, an index is out of range, self_value is NaN,
  /// memory_keys < 0, group_memory is neither empty nor [G] with entries >= -1, or
  /// in write mode a (batch, head, query) lies in two groups. O(size + B H T).
  void check(std::string_view layer = "AttentionPlan", std::string_view fn = "check") const {
    const auto bad = [&](const std::string& what) {
      switchyard::detail::fail_config(layer, fn, "plan", what, "a consistent AttentionPlan");
    };
    if (batch < 0 || heads < 0 || num_queries < 0 || num_keys < 0) bad("negative extent");
    const std::int64_t G = num_groups();
    if (std::int64_t(group_head.size()) != G || std::int64_t(query_offsets.size()) != G + 1 ||
        std::int64_t(key_offsets.size()) != G + 1 || query_offsets[0] != 0 || key_offsets[0] != 0)
      bad("group arrays of different lengths");
    if (query_offsets[G] != std::int64_t(query_index.size()) ||
        key_offsets[G] != std::int64_t(key_index.size()))
      bad("offsets do not end at the index count");
    if (rule.self_value && !(*rule.self_value == *rule.self_value)) bad("self_value NaN");
    if (memory_keys < 0) bad("memory_keys " + std::to_string(memory_keys));
    if (!group_memory.empty() && std::int64_t(group_memory.size()) != G)
      bad("group_memory of " + std::to_string(group_memory.size()) + " entries for " +
          std::to_string(G) + " groups");
    for (const auto r : group_memory)
      if (r < -1) bad("memory row " + std::to_string(r));
    for (std::int64_t g = 0; g < G; ++g) {
      if (group_batch[g] < 0 || group_batch[g] >= batch)
        bad("group " + std::to_string(g) + " batch " + std::to_string(group_batch[g]));
      if (group_head[g] != all_heads && (group_head[g] < 0 || group_head[g] >= heads))
        bad("group " + std::to_string(g) + " head " + std::to_string(group_head[g]));
      if (query_offsets[g + 1] < query_offsets[g] || key_offsets[g + 1] < key_offsets[g])
        bad("decreasing offsets at group " + std::to_string(g));
    }
    for (const auto i : query_index)
      if (i < 0 || i >= num_queries) bad("query index " + std::to_string(i));
    for (const auto j : key_index)
      if (j < 0 || j >= num_keys) bad("key index " + std::to_string(j));
    if (output == PlanOutput::write) {
      const std::int64_t cells = core::bounded_product({batch, heads, num_queries});
      if (cells < 0)
        bad("sizes B=" + std::to_string(batch) + ", H=" + std::to_string(heads) +
            ", T=" + std::to_string(num_queries) + " whose product overflows");
      std::vector<unsigned char> seen(static_cast<std::size_t>(cells), 0);
      for (std::int64_t g = 0; g < G; ++g) {
        const std::int64_t h0 = group_head[g] == all_heads ? 0 : group_head[g];
        const std::int64_t h1 = group_head[g] == all_heads ? heads : group_head[g] + 1;
        for (std::int64_t h = h0; h < h1; ++h)
          for (const auto i : queries(g)) {
            auto& s = seen[std::size_t((group_batch[g] * heads + h) * num_queries + i)];
            if (s) bad("query " + std::to_string(i) + " in two groups in write mode");
            s = 1;
          }
      }
    }
  }
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
