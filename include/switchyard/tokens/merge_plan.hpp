#pragma once
// MergePlan: the routing decision of token merging (ToMe), separate from the
// arithmetic. It says, per batch element, which output token each input token
// ends up in, and which input tokens make up each output token (in the order
// the reference adds them), so it can be applied to any tensor of the same
// tokens (features, keys, a source map) and undone by a gather.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace tokens {

/// Reduction of merge(): the reference's `merge(x, mode)`. sum, mean and amax include the
/// destination token itself (torch scatter_reduce with include_self=True); prune is PiToMe's
/// mode="prune": each output row is its kept token alone, the tokens merged into it are dropped.
enum class MergeMode { sum, mean, amax, prune };

/// Row order unmerge() reads its input in.
/// inverse: the true inverse of merge()'s output order (each input token gets
/// the row it merged into). reference: ToMe's literal `unmerge`, which ignores
/// the distill-token interleave (rows [0, unmerged) are the unmerged A tokens,
/// the rest B tokens 0, 1, ...). Both agree when there is no distill token.
enum class UnmergeOrder { inverse, reference };

template <class T = float>
struct MergePlan {
  std::int64_t batch = 0;       // B
  std::int64_t num_tokens = 0;  // N, tokens before merging
  std::int64_t num_out = 0;     // N - r, tokens after merging
  std::int64_t r = 0;           // merges per batch element after clamping (0 = identity)
  bool class_token = false;
  bool distill_token = false;

  // Output row of each input token: dest[b*N + i] in [0, num_out).
  std::vector<std::int64_t> dest;
  // Members of output row o of batch b: group_members[b*N + group_offsets[b*(num_out+1) + o] ...
  // up to the next offset), input token indices. The token that keeps its place comes first, then
  // the tokens merged into it in src_idx order: the order in which the reference adds them.
  std::vector<std::int64_t> group_offsets;  // [B, num_out + 1]
  std::vector<std::int64_t> group_members;  // [B, N]
  // The reference's index tensors (empty when r == 0), as ToMe names them: indices into set A
  // (tokens 0, 2, 4, ...) and set B (tokens 1, 3, 5, ...).
  std::vector<std::int64_t> unm_idx;  // [B, ceil(N/2) - r], in output order
  std::vector<std::int64_t> src_idx;  // [B, r], by descending best-match score
  std::vector<std::int64_t> dst_idx;  // [B, r], the B token each src merges into
  core::Tensor<T> size_in;            // [B, N], sizes the plan was built with (1 if none given)
  core::Tensor<T> size_out;           // [B, num_out], sum of the merged sizes
  // Whether unm_idx/src_idx/dst_idx are ToMe's set-A/set-B index tensors above (the default, as
  // bipartite_soft_matching builds them): check() validates them when r > 0 and
  // UnmergeOrder::reference reads them. Routers with other index sets (PiToMe's energy_matching)
  // set it to false and leave the three empty; their reference unmerge order is the inverse.
  bool tome_indices = true;

  bool is_identity() const noexcept { return r == 0; }
  /// Members of output row o of batch element b, as [begin, end) pointers.
  std::pair<const std::int64_t*, const std::int64_t*> group(std::int64_t b,
                                                            std::int64_t o) const noexcept {
    const std::int64_t* off = group_offsets.data() + b * (num_out + 1);
    const std::int64_t* base = group_members.data() + b * num_tokens;
    return {base + off[o], base + off[o + 1]};
  }

  /// Throws config_error naming the first broken invariant of a plan that was edited or built
  /// by hand: sizes (B, N >= 0, 0 <= r, num_out = N - r >= 0), array lengths, every dest in
  /// [0, num_out), and group_offsets/group_members listing exactly the tokens of each dest.
  /// Every call that applies the plan runs it first (O(B N), small next to the O(B N C) work).
  void check() const {
    const auto fail = [](const std::string& what) {
      throw config_error("MergePlan::check: " + what);
    };
    if (batch < 0 || num_tokens < 0 || r < 0 || num_out != num_tokens - r || num_out < 0)
      fail("sizes B=" + std::to_string(batch) + ", N=" + std::to_string(num_tokens) +
           ", r=" + std::to_string(r) + ", N_out=" + std::to_string(num_out) +
           " are inconsistent; expected B, N, r >= 0 and N_out = N - r >= 0");
    std::int64_t bn = 0, offsets = 0;
    if (core::mul_overflows(batch, num_tokens, bn) ||
        core::mul_overflows(batch, core::pad_extent(num_out, 1), offsets))
      fail("sizes B=" + std::to_string(batch) + ", N=" + std::to_string(num_tokens) + " overflow");
    const auto expect_len = [&](std::string_view field, std::size_t got, std::int64_t want) {
      if (static_cast<std::int64_t>(got) != want)
        fail("field '" + std::string(field) + "' has " + std::to_string(got) +
             " entries; expected " + std::to_string(want));
    };
    expect_len("dest", dest.size(), bn);
    expect_len("group_members", group_members.size(), bn);
    expect_len("group_offsets", group_offsets.size(), offsets);
    expect_len("size_in", static_cast<std::size_t>(size_in.numel()), bn);
    expect_len("size_out", static_cast<std::size_t>(size_out.numel()), batch * num_out);
    if (!tome_indices) {  // another router's plan: no ToMe index sets to check or read
      expect_len("unm_idx", unm_idx.size(), 0);
      expect_len("src_idx", src_idx.size(), 0);
      expect_len("dst_idx", dst_idx.size(), 0);
    } else if (r > 0) {  // the reference's index arrays, read by UnmergeOrder::reference
      const std::int64_t num_a = (num_tokens + 1) / 2, num_b = num_tokens / 2;
      if (r > num_a || r > num_b) fail("r = " + std::to_string(r) + " exceeds the token sets");
      expect_len("unm_idx", unm_idx.size(), batch * (num_a - r));
      expect_len("src_idx", src_idx.size(), batch * r);
      expect_len("dst_idx", dst_idx.size(), batch * r);
      const auto in_range = [&](std::string_view field, const std::vector<std::int64_t>& v,
                                std::int64_t n) {
        for (std::size_t i = 0; i < v.size(); ++i)
          if (v[i] < 0 || v[i] >= n)
            fail("field '" + std::string(field) + "[" + std::to_string(i) +
                 "]' = " + std::to_string(v[i]) + " is outside [0, " + std::to_string(n) + ")");
      };
      in_range("unm_idx", unm_idx, num_a);
      in_range("src_idx", src_idx, num_a);
      in_range("dst_idx", dst_idx, num_b);
    }
    for (std::size_t i = 0; i < dest.size(); ++i) {  // unmerge and source index by dest
      if (dest[i] < 0 || dest[i] >= num_out)
        fail("field 'dest[" + std::to_string(i) + "]' = " + std::to_string(dest[i]) +
             " is outside [0, N_out=" + std::to_string(num_out) + ")");
    }
    for (std::int64_t b = 0; b < batch; ++b) {
      const std::int64_t* off = group_offsets.data() + b * (num_out + 1);
      if (off[0] != 0 || off[num_out] != num_tokens)
        fail("group_offsets of batch " + std::to_string(b) + " do not span [0, N)");
      for (std::int64_t o = 0; o < num_out; ++o) {
        if (off[o + 1] <= off[o])
          fail("group_offsets of batch " + std::to_string(b) + " are not increasing at row " +
               std::to_string(o) + " (every output row holds at least one token)");
      }
      for (std::int64_t o = 0; o < num_out; ++o) {
        for (std::int64_t k = off[o]; k < off[o + 1]; ++k) {
          const std::int64_t i = group_members[b * num_tokens + k];
          if (i < 0 || i >= num_tokens || dest[b * num_tokens + i] != o)
            fail("group_members[" + std::to_string(b * num_tokens + k) + "] = " +
                 std::to_string(i) + " is not a token whose dest is row " + std::to_string(o));
        }
      }
    }
  }

  /// x: [B, N, C] -> out: [B, N-r, C]. The reference's merge(x, mode): each output row reduces
  /// its member rows (sum, mean, or max), the kept token first, then merged ones in src order;
  /// prune copies the kept token only.
  void merge(ConstView<T, 3> x, View<T, 3> out, MergeMode mode = MergeMode::sum) const {
    check_merge_args("merge", x, out);
    if (x.extent(2) == 0) return;
    parallel_for(batch, [&](std::int64_t b) {
      for (std::int64_t o = 0; o < num_out; ++o) {
        auto [m, end] = group(b, o);
        T* dst = &out(b, o, 0);
        const std::int64_t C = x.extent(2);
        const T* first = &x(b, *m, 0);
        for (std::int64_t c = 0; c < C; ++c) dst[c] = first[c];
        if (mode == MergeMode::prune) continue;
        for (const std::int64_t* it = m + 1; it != end; ++it) {
          const T* src = &x(b, *it, 0);
          if (mode == MergeMode::amax) {
            for (std::int64_t c = 0; c < C; ++c) dst[c] = std::max(dst[c], src[c]);
          } else {
            for (std::int64_t c = 0; c < C; ++c) dst[c] += src[c];
          }
        }
        if (mode == MergeMode::mean && end - m > 1) {
          const T n = static_cast<T>(end - m);
          for (std::int64_t c = 0; c < C; ++c) dst[c] /= n;
        }
      }
    });
  }

  /// x: [B, N, C] -> out: [B, N-r, C]. ToMe's merge_wavg with this plan's sizes: the size-weighted
  /// average merge(x * size, sum) / merge(size, sum), with the reference's order of operations
  /// (each x*size rounded, summed kept-token first, divided by the summed size).
  void merge_wavg(ConstView<T, 3> x, View<T, 3> out) const {
    check_merge_args("merge_wavg", x, out);
    if (x.extent(2) == 0) return;
    parallel_for(batch, [&](std::int64_t b) {
      const std::int64_t C = x.extent(2);
      const T* s = size_in.data() + b * num_tokens;
      std::vector<T> prod;  // x*size of a merged row, rounded before the sum as in the reference
      for (std::int64_t o = 0; o < num_out; ++o) {
        auto [m, end] = group(b, o);
        T* dst = &out(b, o, 0);
        const T* first = &x(b, *m, 0);
        const T s0 = s[*m];
        for (std::int64_t c = 0; c < C; ++c) dst[c] = first[c] * s0;
        for (const std::int64_t* it = m + 1; it != end; ++it) {
          // Two loops through memory, so the compiler cannot contract x*size + acc into an FMA
          // (that would differ from the reference by an ulp, and more under cancellation).
          prod.resize(static_cast<std::size_t>(C));
          const T* src = &x(b, *it, 0);
          const T si = s[*it];
          for (std::int64_t c = 0; c < C; ++c) prod[c] = src[c] * si;
          for (std::int64_t c = 0; c < C; ++c) dst[c] += prod[c];
        }
        const T total = size_out.data()[b * num_out + o];
        for (std::int64_t c = 0; c < C; ++c) dst[c] /= total;
      }
    });
  }

  /// x: [B, N, C]; returns merge_wavg(x) as a new [B, N-r, C] tensor.
  core::Tensor<T> merge_wavg(ConstView<T, 3> x) const {
    core::Tensor<T> out({x.extent(0), num_out, x.extent(2)});
    merge_wavg(x, out.template view<3>());
    return out;
  }

  /// x: [B, N-r, C] -> out: [B, N, C]. Gathers each merged row back to every input token that went
  /// into it (for dense prediction). `order` picks the true inverse or ToMe's literal unmerge.
  void unmerge(ConstView<T, 3> x, View<T, 3> out,
               UnmergeOrder order = UnmergeOrder::inverse) const {
    check();
    core::detail::check_shape("MergePlan", "unmerge", "x", x, {"B", "N_out", "C"},
                              {batch, num_out, -1}, "rows of the merged tensor");
    core::detail::check_shape("MergePlan", "unmerge", "out", out, {"B", "N", "C"},
                              {batch, num_tokens, x.extent(2)});
    core::detail::check_unit_inner_stride("MergePlan", "unmerge", "x", x);
    core::detail::check_unit_inner_stride("MergePlan", "unmerge", "out", out);
    core::detail::check_no_alias("MergePlan", "unmerge", "out", out, "x", x,
                                 "rows of x are read after rows of out are written");
    const std::vector<std::int64_t> rows =
        order == UnmergeOrder::reference ? reference_unmerge_rows() : dest;
    if (x.extent(2) == 0) return;
    parallel_for(batch, [&](std::int64_t b) {
      const std::int64_t C = x.extent(2);
      for (std::int64_t i = 0; i < num_tokens; ++i) {
        const T* src = &x(b, rows[b * num_tokens + i], 0);
        T* dst = &out(b, i, 0);
        for (std::int64_t c = 0; c < C; ++c) dst[c] = src[c];
      }
    });
  }

  /// x: [B, N-r, C]; returns unmerge(x) as a new [B, N, C] tensor.
  core::Tensor<T> unmerge(ConstView<T, 3> x, UnmergeOrder order = UnmergeOrder::inverse) const {
    core::Tensor<T> out({batch, num_tokens, x.extent(2)});
    unmerge(x, out.template view<3>(), order);
    return out;
  }

  /// Returns the source map [B, N-r, N]: 1 where input token j went into output token i, else 0
  /// (ToMe's merge_source with no previous source: amax-merge of the identity).
  core::Tensor<T> source() const {
    check();
    core::Tensor<T> out({batch, num_out, num_tokens});
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = 0; i < num_tokens; ++i) out(b, dest[b * num_tokens + i], i) = T(1);
    return out;
  }

  /// previous: [B, N, N0] source map of an earlier merge; returns [B, N-r, N0], the map from this
  /// plan's output tokens to the original N0 tokens (ToMe's merge_source: amax merge).
  core::Tensor<T> source(ConstView<T, 3> previous) const {
    core::detail::check_shape("MergePlan", "source", "previous", previous, {"B", "N", "N0"},
                              {batch, num_tokens, -1}, "the source map of the tokens merged");
    core::Tensor<T> out({batch, num_out, previous.extent(2)});
    merge(previous, out.template view<3>(), MergeMode::amax);
    return out;
  }

 private:
  template <class X, class O>
  void check_merge_args(std::string_view fn, const X& x, const O& out) const {
    check();
    core::detail::check_shape("MergePlan", fn, "x", x, {"B", "N", "C"}, {batch, num_tokens, -1},
                              "tokens must be those the plan was built from");
    core::detail::check_shape("MergePlan", fn, "out", out, {"B", "N_out", "C"},
                              {batch, num_out, x.extent(2)});
    core::detail::check_unit_inner_stride("MergePlan", fn, "x", x);
    core::detail::check_unit_inner_stride("MergePlan", fn, "out", out);
    core::detail::check_no_alias("MergePlan", fn, "out", out, "x", x,
                                 "rows of x are read after rows of out are written");
  }

  // ToMe's unmerge reads rows [0, unm) as unmerged A tokens and the rest as B tokens in order,
  // also when merge() interleaved the distill token; this mirrors it row for row.
  std::vector<std::int64_t> reference_unmerge_rows() const {
    if (r == 0 || !distill_token || !tome_indices) return dest;
    std::vector<std::int64_t> rows(dest.size());
    const std::int64_t num_a = (num_tokens + 1) / 2, num_b = num_tokens / 2;
    const std::int64_t num_unm = num_a - r;
    for (std::int64_t b = 0; b < batch; ++b) {
      std::int64_t* row = rows.data() + b * num_tokens;
      for (std::int64_t j = 0; j < num_b; ++j) row[2 * j + 1] = num_unm + j;
      for (std::int64_t p = 0; p < num_unm; ++p) row[2 * unm_idx[b * num_unm + p]] = p;
      for (std::int64_t i = 0; i < r; ++i)
        row[2 * src_idx[b * r + i]] = num_unm + dst_idx[b * r + i];
    }
    return rows;
  }
};

}  // namespace tokens
}  // namespace v0
}  // namespace switchyard
