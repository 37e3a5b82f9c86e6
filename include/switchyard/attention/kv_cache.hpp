#pragma once
// KVCache<T, S>: the keys and values one attention layer has seen, for autoregressive decoding,
// stored as S (T, or bf16 for T = float).
//
// Layout: K and V each [B, H_kv, capacity, Dp], Dp = D rounded up to 64 bytes of S, 64-byte
// aligned, padding zero. Every (sequence, KV head) is one contiguous [capacity, Dp] block, so the
// decode kernel (attention/decode_kernels.hpp) streams a chunk of keys and the same chunk of
// values as two sequential reads, every row starting on a cache line (aligned vector loads for
// any D).
//
// Lengths are per (sequence, KV head): append() grows every head of a sequence together, and
// keep() (eviction, token selection) may leave the heads of one sequence with different lengths.
// The capacity is fixed at construction: nothing is reallocated while decoding, and a call that
// would pass it throws before writing anything.
#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// Which cached positions keep() retains: for (sequence b, KV head h), the positions
/// positions[offsets[b * H_kv + h] .. offsets[b * H_kv + h + 1]), strictly ascending and below
/// the head's length. offsets has B * H_kv + 1 entries, from 0 to positions.size().
/// lengths: the B * H_kv lengths the plan was made for (eviction policies fill it); when not
/// empty, keep() rejects a cache whose lengths differ (another cache, or one appended to since).
struct KVKeepPlan {
  std::vector<std::int64_t> offsets;
  std::vector<std::int64_t> positions;
  std::vector<std::int64_t> lengths;

  /// Moves the kept rows of a per-position side array [B, H_kv, n] (scores, original positions)
  /// the way keep() moves K and V; entries after the kept ones are set to `fill`. The plan must
  /// have been checked by a keep() (shape_error when `side` does not fit it).
  template <class U>
  void apply(View<U, 3> side, U fill = U(0)) const {
    const std::int64_t heads = std::int64_t(offsets.size()) - 1;
    std::int64_t rows = 0;
    if (heads < 0 || side.extent(0) < 0 || side.extent(1) < 0 || side.extent(2) < 0 ||
        core::mul_overflows(side.extent(0), side.extent(1), rows) || rows != heads ||
        core::bounded_product(side.shape(), sizeof(U)) < 0) {
      const std::int64_t want = std::max<std::int64_t>(heads, 0);
      switchyard::detail::fail_shape(
          "KVKeepPlan", "apply", "side", switchyard::detail::format_shape(side.shape()),
          "[B, H_kv, n] with B * H_kv = " + std::to_string(want), "one row per (sequence, head)");
    }
    for (std::int64_t i = 0; i < heads; ++i) {
      const std::int64_t b = i / side.extent(1), h = i % side.extent(1);
      const std::int64_t b0 = offsets[std::size_t(i)], n = offsets[std::size_t(i + 1)] - b0;
      for (std::int64_t j = 0; j < n; ++j) {
        const std::int64_t src = positions[std::size_t(b0 + j)];
        if (src >= side.extent(2))
          switchyard::detail::fail_shape(
              "KVKeepPlan", "apply", "side", switchyard::detail::format_shape(side.shape()),
              "[B, H_kv, n > " + std::to_string(src) + "]", "the plan keeps that position");
        side(b, h, j) = side(b, h, src);
      }
      for (std::int64_t j = n; j < side.extent(2); ++j) side(b, h, j) = fill;
    }
  }
};

/// T: the compute type appended and attended in. S: the stored type, T itself, or bf16 for
/// T = float (each appended value rounded to the nearest bf16, ties to even: half the memory
/// and half the bytes a decode step reads; the attention kernels widen it exactly as they read).
template <class T, class S = T>
class KVCache {
  static_assert(std::is_same_v<S, T> || (std::is_same_v<S, bf16> && std::is_same_v<T, float>),
                "KVCache<T, S>: S is T, or bf16 for T = float");

 public:
  static constexpr std::string_view name = "KVCache";
  using value_type = T;
  using storage_type = S;

  /// Storage for `batch` sequences of up to `capacity` positions, `kv_heads` heads of
  /// `head_dim`. Throws config_error for a size < 1 and shape_error when the storage would
  /// pass core::max_buffer_bytes.
  KVCache(std::int64_t batch, std::int64_t kv_heads, std::int64_t head_dim, std::int64_t capacity)
      : B_(batch), Hkv_(kv_heads), D_(head_dim), cap_(capacity) {
    const std::string_view fn = "KVCache";
    if (batch < 1) switchyard::detail::fail_config(name, fn, "batch", batch, ">= 1");
    if (kv_heads < 1) switchyard::detail::fail_config(name, fn, "kv_heads", kv_heads, ">= 1");
    if (head_dim < 1) switchyard::detail::fail_config(name, fn, "head_dim", head_dim, ">= 1");
    if (capacity < 1) switchyard::detail::fail_config(name, fn, "capacity", capacity, ">= 1");
    Dp_ = core::pad_extent(D_, row_align - 1) / row_align * row_align;
    // Elements of K (V the same); K and V together must fit core::max_buffer_bytes.
    const std::int64_t n = switchyard::detail::checked_size(name, fn, "capacity",
                                                            {B_, Hkv_, cap_, Dp_}, 2 * sizeof(S));
    k_.assign(std::size_t(n), S{});
    v_.assign(k_.size(), S{});
    len_.assign(std::size_t(B_ * Hkv_), 0);
  }

  std::int64_t batch() const noexcept { return B_; }
  std::int64_t kv_heads() const noexcept { return Hkv_; }
  std::int64_t head_dim() const noexcept { return D_; }
  std::int64_t capacity() const noexcept { return cap_; }
  /// Elements between consecutive positions of one head (D padded to 64 bytes).
  std::int64_t row_stride() const noexcept { return Dp_; }

  /// Positions stored for sequence b, KV head h.
  std::int64_t length(std::int64_t b, std::int64_t h) const {
    check_index("length", b, h);
    return len_[std::size_t(b * Hkv_ + h)];
  }
  /// Positions stored for sequence b: its heads' common length (config_error when keep() left
  /// them different).
  std::int64_t length(std::int64_t b) const {
    check_index("length", b, 0);
    const std::int64_t n = len_[std::size_t(b * Hkv_)];
    for (std::int64_t h = 1; h < Hkv_; ++h) {
      if (len_[std::size_t(b * Hkv_ + h)] != n)
        switchyard::detail::fail_config(
            name, "length", "b", b, "a sequence whose heads have one length (use length(b, h))");
    }
    return n;
  }
  /// Every length, [B * H_kv] (sequence-major).
  std::span<const std::int64_t> lengths() const noexcept { return len_; }

  /// All storage, [B, H_kv, capacity, D] (positions past a head's length are stale or zero).
  ConstView<S, 4> keys() const noexcept { return {k_.data(), shape4(), strides4()}; }
  ConstView<S, 4> values() const noexcept { return {v_.data(), shape4(), strides4()}; }
  /// What is stored for (b, h): [length(b, h), D].
  ConstView<S, 2> keys(std::int64_t b, std::int64_t h) const { return head_view(k_.data(), b, h); }
  ConstView<S, 2> values(std::int64_t b, std::int64_t h) const {
    return head_view(v_.data(), b, h);
  }
  /// Positions [0, n) of every head as one [B, n, H_kv, D] view: the layout
  /// DenseAttention::forward takes for K and V, so a chunk of a prompt can be appended and then
  /// attended with forward(q, keys_as_sequence(len), values_as_sequence(len), out,
  /// CausalMask{len - T_chunk}). Positions past a head's length are stale. Throws config_error
  /// unless 0 <= n <= capacity.
  ConstView<S, 4> keys_as_sequence(std::int64_t n) const { return as_sequence(k_.data(), n); }
  ConstView<S, 4> values_as_sequence(std::int64_t n) const { return as_sequence(v_.data(), n); }
  /// Raw storage of (b, h): capacity rows of row_stride() elements (for kernels).
  const S* key_data(std::int64_t b, std::int64_t h) const noexcept {
    return k_.data() + (b * Hkv_ + h) * cap_ * Dp_;
  }
  const S* value_data(std::int64_t b, std::int64_t h) const noexcept {
    return v_.data() + (b * Hkv_ + h) * cap_ * Dp_;
  }

  /// Appends k_new, v_new: [B, T_new, H_kv, D] (any strides) at the end of every head of every
  /// sequence. Throws, writing nothing, when a shape differs, when the inputs share memory with
  /// the cache, or when a sequence would pass the capacity (naming it, its length and T_new).
  void append(ConstView<T, 4> k_new, ConstView<T, 4> v_new) {
    const std::string_view fn = "append";
    core::detail::check_shape(name, fn, "k_new", k_new, {"B", "T_new", "H_kv", "D"},
                              {B_, -1, Hkv_, D_}, "the cache's batch, KV heads and head_dim");
    core::detail::check_shape<const T, 4>(name, fn, "v_new", v_new, {"B", "T_new", "H_kv", "D"},
                                          k_new.shape(), "v_new has the shape of k_new");
    const std::int64_t n = k_new.extent(1);
    for (std::int64_t b = 0; b < B_; ++b) check_room(fn, b, n);
    check_sources(fn, k_new, v_new);
    for (std::int64_t b = 0; b < B_; ++b) write(b, k_new[b], v_new[b]);
  }

  /// Appends k_new, v_new: [T_new, H_kv, D] to sequence b only (ragged prefill).
  void append(std::int64_t b, ConstView<T, 3> k_new, ConstView<T, 3> v_new) {
    const std::string_view fn = "append";
    check_index(fn, b, 0);
    core::detail::check_shape(name, fn, "k_new", k_new, {"T_new", "H_kv", "D"}, {-1, Hkv_, D_},
                              "the cache's KV heads and head_dim");
    core::detail::check_shape<const T, 3>(name, fn, "v_new", v_new, {"T_new", "H_kv", "D"},
                                          k_new.shape(), "v_new has the shape of k_new");
    check_room(fn, b, k_new.extent(0));
    check_sources(fn, k_new, v_new);
    write(b, k_new, v_new);
  }

  /// Keeps, for every (sequence, KV head), the plan's positions in their order, moved to the
  /// front; the head's length becomes their count. In place, no allocation. The whole plan is
  /// checked first (switchyard::error naming the entry); nothing changes when it is malformed.
  void keep(const KVKeepPlan& plan) {
    const auto bad = [](const std::string& what) {
      throw switchyard::error(std::string(name) + "::keep: plan " + what);
    };
    const std::int64_t heads = B_ * Hkv_;
    const auto& off = plan.offsets;
    if (std::int64_t(off.size()) != heads + 1 || off[0] != 0 ||
        off[std::size_t(heads)] != std::int64_t(plan.positions.size()))
      bad("offsets must have B * H_kv + 1 = " + std::to_string(heads + 1) +
          " entries from 0 to positions.size() = " + std::to_string(plan.positions.size()));
    if (!plan.lengths.empty() && plan.lengths != len_)
      bad("was made for a cache with other lengths (another cache, or one appended to since)");
    for (std::int64_t i = 0; i < heads; ++i) {
      const std::int64_t b0 = off[std::size_t(i)], b1 = off[std::size_t(i + 1)];
      if (b1 < b0) bad("offsets decrease at sequence " + head_name(i));
      if (b1 > std::int64_t(plan.positions.size()))
        bad("offsets pass positions.size() = " + std::to_string(plan.positions.size()) +
            " at sequence " + head_name(i));
      for (std::int64_t p = b0; p < b1; ++p) {
        const std::int64_t pos = plan.positions[std::size_t(p)];
        if (pos < 0 || pos >= len_[std::size_t(i)])
          bad("position " + std::to_string(pos) + " out of range [0, " +
              std::to_string(len_[std::size_t(i)]) + ") at sequence " + head_name(i));
        if (p > b0 && plan.positions[std::size_t(p - 1)] >= pos)
          bad("positions not strictly ascending at sequence " + head_name(i));
      }
    }
    for (std::int64_t i = 0; i < heads; ++i) {
      const std::int64_t b0 = off[std::size_t(i)], n = off[std::size_t(i + 1)] - b0;
      S* kh = k_.data() + i * cap_ * Dp_;
      S* vh = v_.data() + i * cap_ * Dp_;
      // Ascending positions: the destination never passes the source, so moving forward is safe.
      for (std::int64_t j = 0; j < n; ++j) {
        const std::int64_t src = plan.positions[std::size_t(b0 + j)];
        if (src == j) continue;
        std::copy_n(kh + src * Dp_, Dp_, kh + j * Dp_);
        std::copy_n(vh + src * Dp_, Dp_, vh + j * Dp_);
      }
      len_[std::size_t(i)] = n;
    }
  }

  /// Forgets everything stored (lengths 0; storage is kept).
  void reset() noexcept { std::fill(len_.begin(), len_.end(), 0); }
  /// Forgets what sequence b stored (a serving slot freed).
  void reset(std::int64_t b) {
    check_index("reset", b, 0);
    std::fill_n(len_.begin() + b * Hkv_, Hkv_, 0);
  }

 private:
  static constexpr std::int64_t row_align = std::max<std::int64_t>(1, 64 / sizeof(S));
  using storage = std::vector<S, xsimd::aligned_allocator<S, 64>>;

  static S to_storage(T x) noexcept {
    if constexpr (std::is_same_v<S, T>) {
      return x;
    } else {
      return bf16::from_float(x);
    }
  }

  Shape<4> shape4() const noexcept { return {B_, Hkv_, cap_, D_}; }
  Shape<4> strides4() const noexcept { return {Hkv_ * cap_ * Dp_, cap_ * Dp_, Dp_, 1}; }

  std::string head_name(std::int64_t i) const {
    return std::to_string(i / Hkv_) + ", KV head " + std::to_string(i % Hkv_);
  }

  void check_index(std::string_view fn, std::int64_t b, std::int64_t h) const {
    if (b < 0 || b >= B_)
      switchyard::detail::fail_config(name, fn, "b", b, "in [0, B=" + std::to_string(B_) + ")");
    if (h < 0 || h >= Hkv_)
      switchyard::detail::fail_config(name, fn, "h", h,
                                      "in [0, H_kv=" + std::to_string(Hkv_) + ")");
  }

  ConstView<S, 2> head_view(const S* base, std::int64_t b, std::int64_t h) const {
    check_index("keys", b, h);
    return {base + (b * Hkv_ + h) * cap_ * Dp_, {len_[std::size_t(b * Hkv_ + h)], D_}, {Dp_, 1}};
  }

  ConstView<S, 4> as_sequence(const S* base, std::int64_t n) const {
    if (n < 0 || n > cap_)
      switchyard::detail::fail_config(name, "keys_as_sequence", "n", n,
                                      "in [0, capacity=" + std::to_string(cap_) + "]");
    return {base, {B_, n, Hkv_, D_}, {Hkv_ * cap_ * Dp_, Dp_, cap_ * Dp_, 1}};
  }

  void check_room(std::string_view fn, std::int64_t b, std::int64_t n) const {
    for (std::int64_t h = 0; h < Hkv_; ++h) {
      const std::int64_t len = len_[std::size_t(b * Hkv_ + h)];
      if (n > cap_ - len) {
        throw config_error(std::string(name) + "::" + std::string(fn) + ": sequence " +
                           std::to_string(b) + " (KV head " + std::to_string(h) + ") holds " +
                           std::to_string(len) + " positions; appending " + std::to_string(n) +
                           " would pass the capacity " + std::to_string(cap_));
      }
    }
  }

  template <int R>
  void check_sources(std::string_view fn, const ConstView<T, R>& k_new,
                     const ConstView<T, R>& v_new) const {
    const ConstView<S, 1> ks(k_.data(), {std::int64_t(k_.size())});
    const ConstView<S, 1> vs(v_.data(), {std::int64_t(v_.size())});
    core::detail::check_no_alias(name, fn, "k_new", k_new, "the cache's keys", ks,
                                 "appended data must not live in the cache");
    core::detail::check_no_alias(name, fn, "k_new", k_new, "the cache's values", vs,
                                 "appended data must not live in the cache");
    core::detail::check_no_alias(name, fn, "v_new", v_new, "the cache's keys", ks,
                                 "appended data must not live in the cache");
    core::detail::check_no_alias(name, fn, "v_new", v_new, "the cache's values", vs,
                                 "appended data must not live in the cache");
  }

  // k_new, v_new: [n, H_kv, D] of sequence b; room checked.
  void write(std::int64_t b, const ConstView<T, 3>& k_new, const ConstView<T, 3>& v_new) {
    const std::int64_t n = k_new.extent(0);
    for (std::int64_t h = 0; h < Hkv_; ++h) {
      std::int64_t& len = len_[std::size_t(b * Hkv_ + h)];
      S* kd = k_.data() + ((b * Hkv_ + h) * cap_ + len) * Dp_;
      S* vd = v_.data() + ((b * Hkv_ + h) * cap_ + len) * Dp_;
      for (std::int64_t t = 0; t < n; ++t, kd += Dp_, vd += Dp_) {
        for (std::int64_t d = 0; d < D_; ++d) {
          kd[d] = to_storage(k_new(t, h, d));
          vd[d] = to_storage(v_new(t, h, d));
        }
      }
      len += n;
    }
  }

  std::int64_t B_, Hkv_, D_, cap_, Dp_ = 0;
  storage k_, v_;
  std::vector<std::int64_t> len_;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
