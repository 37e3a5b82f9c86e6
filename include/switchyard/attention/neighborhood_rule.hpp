#pragma once
// Which keys a query sees in neighbourhood attention (NATTEN semantics), one spatial axis at a
// time; the neighbourhood of a token is the product of its per-axis windows.
//
// The rule, per axis of length L with kernel_size k, dilation d, stride s (NATTEN,
// SHI-Labs/NATTEN src/natten/backends/flex.py, get_na_flex_mask -> single_dim_tiling_mask, and
// the "Neighborhood attention" section of the fixtures README):
//
// - Dilation groups. Position x belongs to group g = x mod d and has group coordinate
//   i = x / d; group g holds Lg = ceil((L - g) / d) positions. A query only sees keys of its
//   own group, and everything below happens in group coordinates.
// - Stride (GNA, Hassani et al. 2025, "Generalized Neighborhood Attention"). Queries are cut
//   into tiles of s consecutive group coordinates, [s*floor(i/s), s*floor(i/s) + s). Every
//   query of a tile uses the tile's leader:
//     non-causal: leader = min(s*floor(i/s) + floor(s/2), Lg - 1)   (the centre query; for
//                 even s the right one of the two centres; clipped to the group's end)
//     causal:     leader = min(s*floor(i/s) + s - 1, Lg - 1)        (the last query)
//   With s = 1 the leader is the query itself.
// - Non-causal window. left = floor(k/2), right = k - 1 - left (even k: one fewer on the
//   right, as NATTEN). centre = clamp(leader, left, Lg - 1 - right); the keys are
//   [centre - left, centre + right]: exactly k of them, SHIFTED at the borders, never
//   truncated. All queries of a tile share this window.
// - Causal window. Keys j with leader - (k - 1) <= j <= i: the window starts where the
//   leader's causal window starts but ends at the query itself (a key after the query is
//   never seen). Truncated at the start of the group, so early queries see fewer keys.
//
// Kernel sizes must be odd (a window centred on its query), as NATTEN's neighbourhood kernels
// required until its flex backend, which also takes even sizes (natten/utils/checks.py); the
// window formula above covers even k (one key fewer on the right), but layers reject it.
// kernel_size * dilation <= L and stride <= kernel_size as NATTEN's check_args_against_input.
// kernel_size = 1 (each query sees itself) is accepted.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// Neighbourhood parameters of one spatial axis (NATTEN's kernel_size, dilation, stride,
/// is_causal for that axis).
struct NeighborhoodAxis {
  std::int64_t kernel_size = 1;
  std::int64_t dilation = 1;
  std::int64_t stride = 1;
  bool is_causal = false;
};

/// Keys start, start + dilation, ..., start + (count - 1) * dilation along one axis, in the
/// axis's original coordinates, ascending.
struct AxisWindow {
  std::int64_t start = 0;
  std::int64_t count = 0;
};

/// The window of query position q (0 <= q < length) along one axis, by the rule at the top
/// of this file. Preconditions (check_neighborhood_axes): 1 <= kernel_size,
/// kernel_size * dilation <= length, 1 <= stride <= kernel_size.
/// Non-causal: count == kernel_size always; causal: 1 <= count <= kernel_size.
inline AxisWindow neighborhood_window(std::int64_t length, std::int64_t q,
                                      const NeighborhoodAxis& a) noexcept {
  const std::int64_t d = a.dilation, k = a.kernel_size, s = a.stride;
  const std::int64_t g = q % d;                      // dilation group
  const std::int64_t i = q / d;                      // coordinate inside the group
  const std::int64_t lg = (length - g + d - 1) / d;  // positions in the group
  const std::int64_t tile = (i / s) * s;
  std::int64_t first = 0, count = 0;
  if (a.is_causal) {
    const std::int64_t leader = std::min(tile + s - 1, lg - 1);
    first = std::max<std::int64_t>(0, leader - (k - 1));
    count = i - first + 1;  // >= 1 because stride <= kernel_size
  } else {
    const std::int64_t left = k / 2, right = k - 1 - left;
    const std::int64_t leader = std::min(tile + s / 2, lg - 1);
    // max/min, not std::clamp: no precondition on the bounds, so no UB on unchecked input.
    const std::int64_t centre = std::max(left, std::min(leader, lg - 1 - right));
    first = centre - left;
    count = k;
  }
  return {first * d + g, count};
}

/// Throws unless `axes` describe a valid neighbourhood over a token grid of `extents`
/// (one axis per extent, row-major, e.g. [X, Y] for 2D). Messages read
///   "layer::fn: argument 'axes[1].kernel_size' = 9 is invalid; expected ... (extents [8, 8])".
/// shape_error: axes.size() != extents.size(). config_error, per axis a: kernel_size < 1 or
/// even; dilation < 1; kernel_size * dilation > extents[a] (NATTEN: the product of kernel size and
/// dilation cannot exceed the input size; this also covers kernel_size > extents[a]);
/// stride < 1 or stride > kernel_size. Whether is_causal is allowed is the layer's decision.
inline void check_neighborhood_axes(std::string_view layer, std::string_view fn,
                                    std::span<const std::int64_t> extents,
                                    std::span<const NeighborhoodAxis> axes) {
  const std::string ext = "extents " + switchyard::detail::format_shape(extents);
  if (axes.size() != extents.size()) {
    switchyard::detail::fail_shape(
        layer, fn, "axes", "[" + std::to_string(axes.size()) + " axes]",
        "one axis per spatial extent, " + std::to_string(extents.size()) + " for " + ext);
  }
  // Extents of real grids: pairs() and the executors loop over positions, so a size no tensor
  // could have is refused here rather than looped over.
  if (core::bounded_product(extents, 1) < 0 ||
      std::any_of(extents.begin(), extents.end(),
                  [](std::int64_t e) { return e > std::numeric_limits<std::int32_t>::max(); })) {
    switchyard::detail::fail_shape(layer, fn, "extents", switchyard::detail::format_shape(extents),
                                   "extents <= 2^31 - 1 whose product fits in memory");
  }
  for (std::size_t n = 0; n < axes.size(); ++n) {
    const NeighborhoodAxis& a = axes[n];
    const std::int64_t len = extents[n];
    const std::string arg = "axes[" + std::to_string(n) + "].";
    const std::string where = " (axis " + std::to_string(n) + " of " + ext + ")";
    if (a.kernel_size < 1) {
      switchyard::detail::fail_config(layer, fn, arg + "kernel_size", a.kernel_size,
                                      ">= 1" + where);
    }
    if (a.kernel_size % 2 == 0) {
      switchyard::detail::fail_config(
          layer, fn, arg + "kernel_size", a.kernel_size,
          "an odd size (a window centred on its query, as NATTEN's kernels require)" + where);
    }
    if (a.dilation < 1) {
      switchyard::detail::fail_config(layer, fn, arg + "dilation", a.dilation, ">= 1" + where);
    }
    if (a.kernel_size > len) {
      switchyard::detail::fail_config(layer, fn, arg + "kernel_size", a.kernel_size,
                                      "<= the axis length " + std::to_string(len) + where);
    }
    // Dividing avoids overflow of kernel_size * dilation for absurd values.
    if (a.dilation > len / a.kernel_size) {
      switchyard::detail::fail_config(layer, fn, arg + "dilation", a.dilation,
                                      "kernel_size * dilation <= the axis length (kernel_size " +
                                          std::to_string(a.kernel_size) + ", length " +
                                          std::to_string(len) + ")" + where);
    }
    if (a.stride < 1 || a.stride > a.kernel_size) {
      switchyard::detail::fail_config(
          layer, fn, arg + "stride", a.stride,
          "1 <= stride <= kernel_size = " + std::to_string(a.kernel_size) + where);
    }
  }
}

namespace neighborhood_detail {

[[noreturn]] inline void fail_pairs_overflow(std::span<const std::int64_t> extents) {
  switchyard::detail::fail_config("NeighborhoodAttention", "pairs", "extents",
                                  switchyard::detail::format_shape(extents),
                                  "a grid whose (query, key) pair count fits int64");
}

/// a * b, or config_error naming the grid when the pair count passes int64.
inline std::int64_t checked_pairs_product(std::int64_t a, std::int64_t b,
                                          std::span<const std::int64_t> extents) {
  std::int64_t out = 0;
  if (core::mul_overflows(a, b, out)) fail_pairs_overflow(extents);
  return out;
}

/// Along one axis of length `length`: the sum over all queries of their window sizes.
inline std::int64_t axis_pairs(std::int64_t length, const NeighborhoodAxis& a) {
  std::int64_t sum = 0;  // <= length * kernel_size <= 2^62: no overflow
  for (std::int64_t q = 0; q < length; ++q) sum += neighborhood_window(length, q, a).count;
  return sum;
}

}  // namespace neighborhood_detail

/// (query, key) pairs computed per (batch, head) by neighbourhood attention over a grid of
/// `extents`: the sum over all query tokens of the product of their per-axis window counts.
/// It factorises, so it is computed as the product over axes of the per-axis sums of counts
/// (O(sum of extents)). Preconditions: check_neighborhood_axes passed. Throws config_error
/// when the count passes int64.
inline std::int64_t neighborhood_pairs(std::span<const std::int64_t> extents,
                                       std::span<const NeighborhoodAxis> axes) {
  std::int64_t pairs = 1;
  for (std::size_t n = 0; n < extents.size() && n < axes.size(); ++n)
    pairs = neighborhood_detail::checked_pairs_product(
        pairs, neighborhood_detail::axis_pairs(extents[n], axes[n]), extents);
  return pairs;
}

/// The pairs of neighborhood_pairs whose key's row-major token index is below `len`
/// (0 <= len <= tokens): a key-length mask. In O(sum of extents), without visiting the
/// tokens: write len in the grid's mixed radix, len = sum_a c_a * P_a (P_a the product of the
/// extents after axis a). A key is below len exactly when, at the first axis a where its
/// coordinate differs from c_a, it is smaller; so the count is the sum over a of
///   prod_{b<a} in_b(c_b) * below_a(c_a) * prod_{b>a} axis_pairs_b
/// where in_b(c) counts the queries whose window contains key coordinate c along axis b and
/// below_a(c) the (query, key) pairs along axis a with key coordinate below c (every
/// window is a product of per-axis windows, so each sum over the grid factorises).
/// Preconditions: check_neighborhood_axes passed. Throws config_error when the count
/// passes int64.
inline std::int64_t neighborhood_pairs_below(std::span<const std::int64_t> extents,
                                             std::span<const NeighborhoodAxis> axes,
                                             std::int64_t len) {
  const std::size_t rank = std::min(extents.size(), axes.size());
  std::int64_t tokens = 1;
  for (std::size_t n = 0; n < rank; ++n) tokens *= extents[n];
  if (len >= tokens) return neighborhood_pairs(extents, axes);
  if (len <= 0) return 0;
  std::vector<std::int64_t> digit(rank);
  for (std::size_t n = rank; n-- > 0;) {
    digit[n] = len % extents[n];
    len /= extents[n];
  }
  using neighborhood_detail::checked_pairs_product;
  std::int64_t total = 0, prefix = 1;  // prefix = prod_{b<a} in_b(c_b)
  for (std::size_t a = 0; a < rank && prefix > 0; ++a) {
    std::int64_t in = 0, below = 0;
    for (std::int64_t q = 0; q < extents[a]; ++q) {
      const AxisWindow w = neighborhood_window(extents[a], q, axes[a]);
      const std::int64_t d = axes[a].dilation, c = digit[a];
      if (c >= w.start && (c - w.start) % d == 0 && (c - w.start) / d < w.count) ++in;
      below += std::clamp<std::int64_t>(c > w.start ? (c - w.start + d - 1) / d : 0, 0, w.count);
    }
    std::int64_t term = checked_pairs_product(prefix, below, extents);
    for (std::size_t b = a + 1; b < rank; ++b)
      term = checked_pairs_product(term, neighborhood_detail::axis_pairs(extents[b], axes[b]),
                                   extents);
    if (core::add_overflows(total, term, total)) neighborhood_detail::fail_pairs_overflow(extents);
    prefix = checked_pairs_product(prefix, in, extents);
  }
  return total;
}

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
