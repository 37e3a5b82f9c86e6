#pragma once
// Top-k of each row: the indices and values of the k largest entries, sorted
// descending.
//
// Order (a strict total order, so the result is unique and deterministic):
//   - larger values first;
//   - equal values (including -0.0 == +0.0): the lower index first;
//   - NaN counts as smaller than every number, -inf included; NaNs among
//     themselves keep index order. A NaN is returned only when fewer than k
//     entries of the row are numbers.
// Paths: k = 1 is one argmax scan; k <= 8 keeps a sorted buffer of k entries
// and inserts by a scan (one compare per entry in the common case); larger k
// uses nth_element then sort on (value, index) pairs, O(n + k log k).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace kernels {

namespace detail {
// a is ranked before b (values only): a > b, or b is NaN and a is not.
template <class T>
inline bool value_before(T a, T b) noexcept {
  return a > b || (b != b && a == a);
}
}  // namespace detail

/// x: [n], n >= 1; writes the index and value of the first maximum (NaN ranks lowest).
template <class T>
void argmax_row(const T* x, std::int64_t n, std::int64_t* index, T* value) noexcept {
  std::int64_t bi = 0;
  T bv = x[0];
  for (std::int64_t i = 1; i < n; ++i) {
    if (detail::value_before(x[i], bv)) {  // strict: a tie keeps the lower index
      bv = x[i];
      bi = i;
    }
  }
  *index = bi;
  *value = bv;
}

/// x: [n], 1 <= k <= n, k small (<= 8 is the intended range); indices, values: [k].
/// Keeps a descending buffer of the best k seen so far in index order, so a
/// later equal value never displaces an earlier one.
template <class T>
void topk_row_insertion(const T* x, std::int64_t n, std::int64_t k, std::int64_t* indices,
                        T* values) noexcept {
  std::int64_t filled = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    if (filled == k && !detail::value_before(v, values[k - 1])) continue;
    std::int64_t j = filled < k ? filled++ : k - 1;  // slot freed (or the worst dropped)
    for (; j > 0 && detail::value_before(v, values[j - 1]); --j) {
      values[j] = values[j - 1];
      indices[j] = indices[j - 1];
    }
    values[j] = v;
    indices[j] = i;
  }
}

/// x: [n], 1 <= k <= n; indices, values: [k]. `scratch` is resized to n (reuse it
/// across rows to avoid allocation).
template <class T>
void topk_row_select(const T* x, std::int64_t n, std::int64_t k, std::int64_t* indices, T* values,
                     std::vector<std::pair<T, std::int64_t>>& scratch) {
  scratch.resize(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) scratch[i] = {x[i], i};
  const auto before = [](const std::pair<T, std::int64_t>& a, const std::pair<T, std::int64_t>& b) {
    if (detail::value_before(a.first, b.first)) return true;
    if (detail::value_before(b.first, a.first)) return false;
    return a.second < b.second;  // equal, or both NaN
  };
  const auto kth = scratch.begin() + k;
  if (k < n) std::nth_element(scratch.begin(), kth - 1, scratch.end(), before);
  std::sort(scratch.begin(), kth, before);
  for (std::int64_t j = 0; j < k; ++j) {
    values[j] = scratch[j].first;
    indices[j] = scratch[j].second;
  }
}

}  // namespace kernels

namespace core {

/// x: [R, N] (unit inner stride), 1 <= k <= N; indices: [R, K], values: [R, K]
/// (unit inner stride). Row r of indices/values gets the k largest entries of
/// x[r], sorted descending; ties go to the lower index and NaN ranks below
/// every number (see the file comment). Rows run in parallel; the result does
/// not depend on the thread count. Throws config_error if k is out of range,
/// shape_error on a shape or stride mismatch.
template <class T>
void topk(std::type_identity_t<ConstView<T, 2>> x, std::int64_t k, View<std::int64_t, 2> indices,
          View<T, 2> values) {
  const std::int64_t rows = x.extent(0), n = x.extent(1);
  if (k < 1 || k > n) {
    switchyard::detail::fail_config("core", "topk", "k", k,
                                    "1 <= k <= n, with n = " + std::to_string(n));
  }
  detail::check_unit_inner_stride("core", "topk", "x", x);
  detail::check_shape("core", "topk", "indices", indices, {"R", "K"}, {rows, k});
  detail::check_shape("core", "topk", "values", values, {"R", "K"}, {rows, k});
  detail::check_unit_inner_stride("core", "topk", "indices", indices);
  detail::check_unit_inner_stride("core", "topk", "values", values);
  detail::check_shape("core", "topk", "x", x, {"R", "N"}, {-1, -1});
  detail::check_no_alias("core", "topk", "values", values, "x", x);
  detail::check_no_alias("core", "topk", "indices", indices, "x", x);
  detail::check_no_alias("core", "topk", "values", values, "indices", indices);
  switchyard::detail::checked_size("core", "topk", "x", {n}, 2 * sizeof(T) + 8);  // row scratch
  // Fixed chunks of rows (about 16k entries each), independent of the thread count.
  const std::int64_t chunk =
      std::max<std::int64_t>(1, (std::int64_t{1} << 14) / std::max<std::int64_t>(1, n));
  parallel_for(num_chunks(rows, chunk), [&](std::int64_t c) {
    std::vector<std::pair<T, std::int64_t>> scratch;
    for (std::int64_t r = c * chunk; r < std::min(rows, (c + 1) * chunk); ++r) {
      const T* xr = x.data() + r * x.stride(0);
      std::int64_t* ir = indices.data() + r * indices.stride(0);
      T* vr = values.data() + r * values.stride(0);
      if (k == 1) {
        kernels::argmax_row(xr, n, ir, vr);
      } else if (k <= 8) {
        kernels::topk_row_insertion(xr, n, k, ir, vr);
      } else {
        kernels::topk_row_select(xr, n, k, ir, vr, scratch);
      }
    }
  });
}

/// Result of the allocating topk: indices [R, K] and values [R, K].
template <class T>
struct TopK {
  Tensor<std::int64_t> indices;
  Tensor<T> values;
};

/// x: [R, N]; returns TopK with indices and values of shape [R, K]. Same rules and
/// errors as the overload above. Call as topk<float>(x, k) when x is a Tensor.
template <class T>
TopK<T> topk(std::type_identity_t<ConstView<T, 2>> x, std::int64_t k) {
  if (k < 1 || k > x.extent(1)) {
    switchyard::detail::fail_config("core", "topk", "k", k,
                                    "1 <= k <= n, with n = " + std::to_string(x.extent(1)));
  }
  TopK<T> out{Tensor<std::int64_t>({x.extent(0), k}), Tensor<T>({x.extent(0), k})};
  topk<T>(x, k, out.indices, out.values);
  return out;
}

}  // namespace core
}  // namespace v0
}  // namespace switchyard
