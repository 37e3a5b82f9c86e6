#pragma once
// RoutingDecodeState<T>: what RoutingAttention's incremental decoding (prefill / step, in
// routing_kmeans.hpp) keeps per (sequence b, head h):
//   - the cached keys as attended (shared QK: normalize(q_t); separate QK: k_t as given) and
//     values, [capacity, D] each;
//   - the cluster of every cached key (nearest centroid of its normalised routing vector) and,
//     per cluster, the list of its positions in ascending order.
// Cluster lists are singly linked through a per-position `next` array (head, tail and size per
// cluster), so the state is O(capacity + C) per head however unbalanced the clusters are, and
// an append is O(1). Everything is sized at construction: nothing is allocated or reallocated
// while decoding, and the layer checks the capacity before it writes anything.
//
// Lengths are per sequence (all heads of a sequence grow together): prefilling one sequence
// leaves the others as they were, so sequences of different lengths share one state.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

template <class T, class Arch>
class RoutingAttention;

namespace detail {

// dst = x / max(||x||, 1e-12), the routing normalisation of RoutingAttention (sum of squares in
// double, the inverse norm in T), so a decode step routes a vector exactly as forward does.
template <class T>
void normalize_row(const T* x, std::int64_t stride, std::int64_t D, T* dst) noexcept {
  double ss = 0;
  for (std::int64_t d = 0; d < D; ++d) {
    const double v = double(x[d * stride]);
    ss += v * v;
  }
  const T inv = T(1) / std::max(T(std::sqrt(ss)), T(1e-12));
  for (std::int64_t d = 0; d < D; ++d) dst[d] = x[d * stride] * inv;
}

// argmax_c means[c] . x for means [C, D] contiguous (dots in double), ties toward the lower c.
template <class T>
std::int64_t nearest_centroid(const T* x, const T* means, std::int64_t C, std::int64_t D) noexcept {
  std::int64_t arg = 0;
  double best = -std::numeric_limits<double>::infinity();
  for (std::int64_t c = 0; c < C; ++c) {
    double s = 0;
    for (std::int64_t d = 0; d < D; ++d) s += double(x[d]) * double(means[c * D + d]);
    if (s > best) best = s, arg = c;
  }
  return arg;
}

}  // namespace detail

/// Decode state of RoutingAttention (see the file comment): per (sequence, head) the cached
/// keys and values and the nearest-centroid cluster lists of the cached keys. Create it with
/// RoutingAttention::make_decode_state or directly; fill it with prefill / step.
template <class T>
class RoutingDecodeState {
 public:
  static constexpr std::string_view name = "RoutingDecodeState";

  /// Room for `batch` sequences of up to `capacity` positions, `heads` heads of `head_dim`,
  /// `num_clusters` clusters. Throws config_error for a size < 1 and shape_error when the
  /// storage would pass core::max_buffer_bytes.
  RoutingDecodeState(std::int64_t batch, std::int64_t heads, std::int64_t head_dim,
                     std::int64_t num_clusters, std::int64_t capacity)
      : B_(batch), H_(heads), D_(head_dim), C_(num_clusters), cap_(capacity) {
    const std::string_view fn = "RoutingDecodeState";
    if (batch < 1) switchyard::detail::fail_config(name, fn, "batch", batch, ">= 1");
    if (heads < 1) switchyard::detail::fail_config(name, fn, "heads", heads, ">= 1");
    if (head_dim < 1) switchyard::detail::fail_config(name, fn, "head_dim", head_dim, ">= 1");
    if (num_clusters < 1)
      switchyard::detail::fail_config(name, fn, "num_clusters", num_clusters, ">= 1");
    if (capacity < 1) switchyard::detail::fail_config(name, fn, "capacity", capacity, ">= 1");
    // checked_size returns the element count; the byte bound covers keys and values together.
    const std::int64_t n =
        switchyard::detail::checked_size(name, fn, "capacity", {B_, H_, cap_, D_}, 2 * sizeof(T));
    switchyard::detail::checked_size(name, fn, "capacity", {B_, H_, cap_}, 16);
    switchyard::detail::checked_size(name, fn, "num_clusters", {B_, H_, C_}, 24);
    switchyard::detail::checked_size(name, fn, "head_dim", {B_, H_, D_}, 16 + sizeof(T));
    k_.assign(std::size_t(n), T(0));
    v_.assign(std::size_t(n), T(0));
    bucket_.assign(std::size_t(B_ * H_ * cap_), 0);
    next_.assign(bucket_.size(), -1);
    head_.assign(std::size_t(B_ * H_ * C_), -1);
    tail_.assign(head_.size(), -1);
    size_.assign(head_.size(), 0);
    xn_.assign(std::size_t(B_ * H_ * D_), T(0));
    acc_.assign(std::size_t(B_ * H_ * 2 * D_), 0.0);
    len_.assign(std::size_t(B_), 0);
  }

  std::int64_t batch() const noexcept { return B_; }
  std::int64_t heads() const noexcept { return H_; }
  std::int64_t head_dim() const noexcept { return D_; }
  std::int64_t num_clusters() const noexcept { return C_; }
  std::int64_t capacity() const noexcept { return cap_; }

  /// Positions cached for sequence b (every head holds as many).
  std::int64_t length(std::int64_t b) const {
    check_index("length", b, 0, 0);
    return len_[std::size_t(b)];
  }
  /// Every sequence's length, [B].
  std::span<const std::int64_t> lengths() const noexcept { return len_; }

  /// Cached keys of (b, h) as attended, [length(b), D]: normalize(q) with shared QK, k as given
  /// with separate QK.
  ConstView<T, 2> keys(std::int64_t b, std::int64_t h) const {
    check_index("keys", b, h, 0);
    return {k_.data() + (b * H_ + h) * cap_ * D_, {len_[std::size_t(b)], D_}};
  }
  /// Cached values of (b, h), [length(b), D].
  ConstView<T, 2> values(std::int64_t b, std::int64_t h) const {
    check_index("values", b, h, 0);
    return {v_.data() + (b * H_ + h) * cap_ * D_, {len_[std::size_t(b)], D_}};
  }
  /// All key / value storage, [B, H, capacity, D] (rows past a sequence's length are stale).
  ConstView<T, 4> key_storage() const noexcept { return {k_.data(), {B_, H_, cap_, D_}}; }
  ConstView<T, 4> value_storage() const noexcept { return {v_.data(), {B_, H_, cap_, D_}}; }

  /// Cluster of each cached key of (b, h), [length(b)].
  std::span<const std::int64_t> clusters(std::int64_t b, std::int64_t h) const {
    check_index("clusters", b, h, 0);
    return {bucket_.data() + (b * H_ + h) * cap_, std::size_t(len_[std::size_t(b)])};
  }
  /// Number of cached keys of (b, h) in cluster c.
  std::int64_t cluster_size(std::int64_t b, std::int64_t h, std::int64_t c) const {
    check_index("cluster_size", b, h, c);
    return size_[std::size_t((b * H_ + h) * C_ + c)];
  }
  /// Positions of the cached keys of (b, h) in cluster c, ascending (allocates; for
  /// inspection).
  std::vector<std::int64_t> members(std::int64_t b, std::int64_t h, std::int64_t c) const {
    check_index("members", b, h, c);
    const std::int64_t bh = b * H_ + h;
    std::vector<std::int64_t> r;
    r.reserve(std::size_t(size_[std::size_t(bh * C_ + c)]));
    for (std::int64_t p = head_[std::size_t(bh * C_ + c)]; p >= 0;
         p = next_[std::size_t(bh * cap_ + p)])
      r.push_back(p);
    return r;
  }

  /// Forgets everything cached (lengths 0; storage is kept).
  void reset() noexcept {
    std::fill(len_.begin(), len_.end(), 0);
    std::fill(head_.begin(), head_.end(), -1);
    std::fill(tail_.begin(), tail_.end(), -1);
    std::fill(size_.begin(), size_.end(), 0);
  }
  /// Forgets what sequence b cached (a serving slot freed).
  void reset(std::int64_t b) {
    check_index("reset", b, 0, 0);
    len_[std::size_t(b)] = 0;
    const auto first = std::ptrdiff_t(b * H_ * C_), n = std::ptrdiff_t(H_ * C_);
    std::fill_n(head_.begin() + first, n, -1);
    std::fill_n(tail_.begin() + first, n, -1);
    std::fill_n(size_.begin() + first, n, 0);
  }

 private:
  template <class, class>
  friend class RoutingAttention;

  void check_index(std::string_view fn, std::int64_t b, std::int64_t h, std::int64_t c) const {
    if (b < 0 || b >= B_)
      switchyard::detail::fail_config(name, fn, "b", b, "in [0, B=" + std::to_string(B_) + ")");
    if (h < 0 || h >= H_)
      switchyard::detail::fail_config(name, fn, "h", h, "in [0, H=" + std::to_string(H_) + ")");
    if (c < 0 || c >= C_)
      switchyard::detail::fail_config(name, fn, "c", c, "in [0, C=" + std::to_string(C_) + ")");
  }

  // Parameters of one decode token that come from the layer (checked there).
  struct TokenArgs {
    const T* means;              // [C, D] of head h, contiguous
    ConstView<T, 4> mem_key;     // [H, C, M, D]; M = 0: none
    ConstView<T, 4> mem_value;   // [H, C, M, D]
    double scale;                // multiplies q . k (not the self value)
    std::optional<double> self;  // shared QK: the logit of the query's own key
  };

  // One token of (b, h) at position pos (checked to be length(b) + the tokens before it in
  // this call, below capacity): caches its key and value, links the key into its cluster,
  // then attends from q over the query's cluster (memory first, then members in ascending
  // position, the new key included when it is a member) with an online softmax in double.
  // k == nullptr means shared QK (key = normalize(q), routed with the query). No cluster key
  // and no memory gives zeros. Touches only (b, h)'s rows, lists and scratch.
  void decode_token(std::int64_t b, std::int64_t h, std::int64_t pos, const T* q, std::int64_t qs,
                    const T* k, std::int64_t ks, const T* v, std::int64_t vs, const TokenArgs& a,
                    T* out, std::int64_t os) noexcept {
    const std::int64_t bh = b * H_ + h, D = D_;
    T* const krow = k_.data() + (bh * cap_ + pos) * D;
    T* const vrow = v_.data() + (bh * cap_ + pos) * D;
    T* const xn = xn_.data() + bh * D;
    double* const qd = acc_.data() + bh * 2 * D;
    double* const acc = qd + D;
    // key: cache it, route it by its normalised vector
    std::int64_t ck;
    if (k == nullptr) {
      detail::normalize_row(q, qs, D, krow);
      ck = detail::nearest_centroid(krow, a.means, C_, D);
    } else {
      for (std::int64_t d = 0; d < D; ++d) krow[d] = k[d * ks];
      detail::normalize_row(k, ks, D, xn);
      ck = detail::nearest_centroid(xn, a.means, C_, D);
    }
    for (std::int64_t d = 0; d < D; ++d) vrow[d] = v[d * vs];
    bucket_[std::size_t(bh * cap_ + pos)] = ck;
    next_[std::size_t(bh * cap_ + pos)] = -1;
    const std::size_t ci = std::size_t(bh * C_ + ck);
    if (tail_[ci] >= 0) {
      next_[std::size_t(bh * cap_ + tail_[ci])] = pos;
    } else {
      head_[ci] = pos;
    }
    tail_[ci] = pos;
    ++size_[ci];
    // query: shared QK routes with its own key
    std::int64_t cq = ck;
    if (k != nullptr) {
      detail::normalize_row(q, qs, D, xn);
      cq = detail::nearest_centroid(xn, a.means, C_, D);
    }
    for (std::int64_t d = 0; d < D; ++d) qd[d] = double(q[d * qs]), acc[d] = 0.0;
    double mx = -std::numeric_limits<double>::infinity(), z = 0;
    // Online softmax: rescale the running sums whenever the maximum grows.
    const auto add = [&](double logit, const T* val, std::int64_t stride) {
      if (logit > mx) {
        const double r = std::exp(mx - logit);  // 0 for the first entry
        z *= r;
        for (std::int64_t d = 0; d < D; ++d) acc[d] *= r;
        mx = logit;
      }
      const double p = std::exp(logit - mx);
      z += p;
      for (std::int64_t d = 0; d < D; ++d) acc[d] += p * double(val[d * stride]);
    };
    const auto dot = [&](const T* x, std::int64_t stride) {
      double s = 0;
      for (std::int64_t d = 0; d < D; ++d) s += qd[d] * double(x[d * stride]);
      return s;
    };
    const std::int64_t M = a.mem_key.data() ? a.mem_key.extent(2) : 0;
    for (std::int64_t j = 0; j < M; ++j)
      add(dot(&a.mem_key(h, cq, j, 0), a.mem_key.stride(3)) * a.scale, &a.mem_value(h, cq, j, 0),
          a.mem_value.stride(3));
    const T* const keys = k_.data() + bh * cap_ * D;
    const T* const vals = v_.data() + bh * cap_ * D;
    for (std::int64_t p = head_[std::size_t(bh * C_ + cq)]; p >= 0;
         p = next_[std::size_t(bh * cap_ + p)]) {
      const double logit = a.self && p == pos ? *a.self : dot(keys + p * D, 1) * a.scale;
      add(logit, vals + p * D, 1);
    }
    const double inv = z > 0 ? 1.0 / z : 0.0;  // z == 0: nothing selected, zeros
    for (std::int64_t d = 0; d < D; ++d) out[d * os] = T(acc[d] * inv);
  }

  std::int64_t B_, H_, D_, C_, cap_;
  std::vector<T> k_, v_;                   // [B, H, capacity, D]
  std::vector<std::int64_t> bucket_;       // [B, H, capacity] cluster of each cached key
  std::vector<std::int64_t> next_;         // [B, H, capacity] next position in its cluster, -1
  std::vector<std::int64_t> head_, tail_;  // [B, H, C] first / last position, -1 when empty
  std::vector<std::int64_t> size_;         // [B, H, C]
  std::vector<T> xn_;                      // [B, H, D] scratch: a normalised routing vector
  std::vector<double> acc_;                // [B, H, 2D] scratch: q in double, the weighted sum
  std::vector<std::int64_t> len_;          // [B]
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
