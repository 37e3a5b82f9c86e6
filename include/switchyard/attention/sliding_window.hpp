#pragma once
// Sliding-window and chunked attention with attention sinks, for language models
// ([B, T, H, D], grouped-query attention), in prefill and against a KV cache.
//
// Query i sits at position P = i + S - T (the queries are the last T of the S positions, as
// CausalMask{S - T}). Key j < len(b) (key lengths, default S) is visible when
//   j < sinks and (not causal or j <= P)                       (attention sinks, StreamingLLM)
//   or  in_window and in_chunk and (not causal or j <= P)
// with in_window: window == 0, or P - window < j (causal: the window most recent keys, the
// query included), or |j - P| < window (non-causal); in_chunk: chunk == 0, or
// j / chunk == P / chunk (Llama-4 style chunked attention).
// Execution (block_sparse.hpp): tiles of MR consecutive queries, two runs each - the sinks
// and the band union of the tile's windows - with per-row ranges; chunks inside every row's
// band run unmasked, so the cost per computed pair is the dense kernel's.
// Decoding packs only the keys the new queries can see (sinks and the window) from the cache.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "switchyard/attention/block_sparse.hpp"
#include "switchyard/attention/kv_cache.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// Configuration of SlidingWindowAttention (keep the field order: designated initialisers).
/// At least one of window and chunk must be >= 1.
struct SlidingWindowConfig {
  std::int64_t window = 0;  ///< keys per query's window (the query included); 0 = no window
  std::int64_t chunk = 0;   ///< chunk length for chunked attention; 0 = off
  std::int64_t sinks = 0;   ///< first keys every query sees (attention sinks)
  bool causal = true;
  std::optional<double> scale{};  ///< multiplies q . k; default 1/sqrt(D)
};

namespace sliding_detail {

// Visible keys of the query at position P with key length len: sinks [0, sink_end) and the
// band [lo, hi) (lo >= sink_end, so the two never overlap).
struct Visible {
  std::int64_t sink_end, lo, hi;
};
inline Visible visible(const SlidingWindowConfig& c, std::int64_t P, std::int64_t len) noexcept {
  const std::int64_t causal_end = c.causal ? std::min(len, P + 1) : len;
  std::int64_t lo = 0, hi = causal_end;
  if (c.window > 0) {
    lo = std::max(lo, P - c.window + 1);
    // P + window could overflow for a window larger than the sequence.
    if (!c.causal) hi = std::min(hi, P + std::min(c.window, std::max<std::int64_t>(len - P, 0)));
  }
  if (c.chunk > 0) {
    const std::int64_t c0 = P / c.chunk * c.chunk;
    lo = std::max(lo, c0);
    hi = std::min(hi, c0 + c.chunk);
  }
  const std::int64_t sink_end = std::max<std::int64_t>(0, std::min(c.sinks, causal_end));
  lo = std::max(lo, std::min(c.sinks, len));
  return {sink_end, lo, std::max(lo, hi)};
}

/// Keys the query at position P sees with key length len.
inline std::int64_t visible_count(const SlidingWindowConfig& c, std::int64_t P,
                                  std::int64_t len) noexcept {
  const Visible v = visible(c, P, len);
  return v.sink_end + (v.hi - v.lo);
}

/// Sum of visible_count over P in [a, b) where it is linear in P.
inline std::int64_t linear_sum(const SlidingWindowConfig& c, std::int64_t a, std::int64_t b,
                               std::int64_t len) noexcept {
  if (a >= b) return 0;
  return (b - a) * (visible_count(c, a, len) + visible_count(c, b - 1, len)) / 2;
}

/// Sum of visible_count over P in [a, b), inside the chunk starting at c0 (or anywhere without
/// chunks). Every bound visible() takes a min or max of is P plus a constant or a constant, so
/// the count is linear in P between the points where two of them cross (integers, where both
/// give the same value); those points split [a, b) into linear pieces. A split too many is
/// harmless.
inline std::int64_t piecewise_sum(const SlidingWindowConfig& c, std::int64_t a, std::int64_t b,
                                  std::int64_t len, std::int64_t c0) noexcept {
  constexpr std::int64_t big = std::numeric_limits<std::int64_t>::max();
  const auto sum = [](std::int64_t x, std::int64_t y) {  // saturating: far points stay far
    std::int64_t r;
    return __builtin_add_overflow(x, y, &r) ? (y > 0 ? big : -big) : r;
  };
  const std::int64_t w = c.window, s1 = std::min(c.sinks, len);
  const std::int64_t e = c.chunk > 0 ? sum(c0, c.chunk) : 0;  // the chunk's end
  // The bounds' constants are 0, len, min(sinks, len), c0 and e; P, P + 1, P - window + 1 and
  // P + window cross them at these offsets.
  std::int64_t split[5 * 4 + 2];
  std::size_t n = 0;
  split[n++] = a;
  for (const std::int64_t base : {std::int64_t(0), len, s1, c0, e})
    for (const std::int64_t offset : {std::int64_t(-1), std::int64_t(0), -w, w - 1})
      if (const std::int64_t x = sum(base, offset); x > a && x < b) split[n++] = x;
  split[n++] = b;
  std::sort(split, split + n);
  std::int64_t total = 0;
  for (std::size_t i = 0; i + 1 < n; ++i) total += linear_sum(c, split[i], split[i + 1], len);
  return total;
}

/// Sum of visible_count over the query positions P in [a, b), 0 <= a <= b < 2^31, in O(1)
/// pieces. With chunks: chunks that end by min(sinks, len) see P + 1 keys (causal) or
/// min(sinks, len) (non-causal), chunks from len on see min(sinks, len): linear over the whole
/// run; chunks from the sinks' end to len all see the same counts at the same offsets, so one
/// is counted and multiplied; at most the two chunks that straddle min(sinks, len) and len,
/// and the partial chunks at a and b, are counted piece by piece.
inline std::int64_t visible_sum(const SlidingWindowConfig& c, std::int64_t a, std::int64_t b,
                                std::int64_t len) noexcept {
  if (c.chunk <= 0) return piecewise_sum(c, a, b, len, 0);
  const std::int64_t ch = c.chunk, s1 = std::min(c.sinks, len), full_end = b / ch * ch;
  std::int64_t total = 0;
  for (std::int64_t P = a; P < b;) {
    const std::int64_t c0 = P / ch * ch;
    if (P == c0 && ch <= b - c0) {  // a whole chunk
      if (ch <= s1 - c0) {
        const std::int64_t end = std::min(full_end, s1 / ch * ch);
        total += linear_sum(c, P, end, len);
        P = end;
        continue;
      }
      if (c0 >= len) {
        total += linear_sum(c, P, full_end, len);
        P = full_end;
        continue;
      }
      if (c0 >= c.sinks && ch <= len - c0) {
        const std::int64_t end = std::min(full_end, len / ch * ch);
        total += (end - c0) / ch * piecewise_sum(c, c0, c0 + ch, len, c0);
        P = end;
        continue;
      }
    }
    const std::int64_t end = ch < b - c0 ? c0 + ch : b;
    total += piecewise_sum(c, P, end, len, c0);
    P = end;
  }
  return total;
}

}  // namespace sliding_detail

/// Sliding-window / chunked attention with sinks (see the file comment), on Arch.
template <class T = float, class Arch = simd::default_arch>
class SlidingWindowAttention {
 public:
  using config_type = SlidingWindowConfig;
  static constexpr std::string_view name = "SlidingWindowAttention";

  /// Throws config_error for window < 0, chunk < 0, sinks < 0, window == chunk == 0, or a
  /// scale that is not finite and > 0.
  explicit SlidingWindowAttention(config_type cfg) : cfg_(cfg) {
    using switchyard::detail::fail_config;
    if (cfg_.window < 0) fail_config(name, name, "window", cfg_.window, ">= 0");
    if (cfg_.chunk < 0) fail_config(name, name, "chunk", cfg_.chunk, ">= 0");
    if (cfg_.sinks < 0) fail_config(name, name, "sinks", cfg_.sinks, ">= 0");
    if (cfg_.window == 0 && cfg_.chunk == 0)
      fail_config(name, name, "window", cfg_.window,
                  ">= 1 (or chunk >= 1 for chunked attention; both are 0)");
    if (cfg_.scale && !(std::isfinite(*cfg_.scale) && *cfg_.scale > 0))
      fail_config(name, name, "scale", *cfg_.scale, "a finite value > 0");
  }
  const config_type& config() const noexcept { return cfg_; }

  /// (query, key) pairs computed by forward for B sequences of T queries and S keys, per head
  /// (multiply by H for all heads); key_lengths: empty or [B].
  std::int64_t pairs(std::int64_t B, std::int64_t T_q, std::int64_t S,
                     std::span<const std::int64_t> key_lengths = {}) const {
    check_lengths("pairs", B, T_q, S, key_lengths);
    // Sizes no tensor could have are refused (and keep the per-sequence sums below 2^62).
    constexpr std::int64_t most = std::numeric_limits<std::int32_t>::max();
    if (B < 0 || T_q < 0 || S > most) {
      const std::int64_t got[3] = {B, T_q, S};
      switchyard::detail::fail_shape(name, "pairs",
                                     switchyard::detail::format_shape({"B", "T", "S"}, got),
                                     "B, T >= 0 and S <= 2^31 - 1", "sizes of real tensors");
    }
    // O(1) per sequence (sliding_detail::visible_sum), at most T * S < 2^62.
    const auto sequence = [&](std::int64_t len) {
      return sliding_detail::visible_sum(cfg_, S - T_q, S, len);
    };
    const auto too_many = [&] {
      switchyard::detail::fail_config(name, "pairs", "B", B, "a batch whose pairs fit int64");
    };
    std::int64_t total = 0;
    if (key_lengths.empty()) {  // every sequence alike: one count times B
      if (core::mul_overflows(sequence(S), B, total)) too_many();
      return total;
    }
    for (std::int64_t b = 0; b < B; ++b)
      if (core::add_overflows(total, sequence(key_lengths[std::size_t(b)]), total)) too_many();
    return total;
  }

  /// q: [B, T, H, D], k and v: [B, S, H_kv, D] with T <= S and H_kv dividing H, out:
  /// [B, T, H, D]; key_lengths: empty or [B], each in [0, S]. Any strides; out must not share
  /// memory with q, k, v. Rows that see no key get zeros. Throws shape_error / config_error.
  void forward(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v, View<T, 4> out,
               std::span<const std::int64_t> key_lengths = {}) const {
    const std::string_view fn = "forward";
    const auto a = structured_detail::make_args<T>(name, fn, q, k, v, out, cfg_.scale);
    check_lengths(fn, a.B, a.T_q, a.S, key_lengths);
    using Tl = kernels::detail::DenseTiling<T, Arch>;
    constexpr std::int64_t MR = Tl::MR, NB = 512;
    structured_detail::check_pack<T, Arch>(name, fn, a, a.S, NB);
    kernels::SparseKeyPack<T, Arch> pack(a.B * a.Hkv, a.S, NB, a.D);
    // Keys past the key length are never read.
    const auto needed = [&](std::int64_t b) {
      return key_lengths.empty() ? a.S : key_lengths[std::size_t(b)];
    };
    kernels::sparse_pack_all<Arch>(
        a, pack, [](std::int64_t, std::int64_t, std::int64_t p) { return p; },
        [&](std::int64_t b, std::int64_t) { return needed(b); });
    const std::int64_t off = a.S - a.T_q;
    kernels::sparse_attention(
        Arch{}, a, pack, num_chunks(a.T_q, MR), std::max<std::int64_t>(1, 256 / MR),
        [&](std::int64_t b, std::int64_t, std::int64_t t, kernels::QueryTile& tile) {
          const std::int64_t len = key_lengths.empty() ? a.S : key_lengths[std::size_t(b)];
          const std::int64_t i0 = t * MR;
          tile.n_rows = int(std::min(MR, a.T_q - i0));
          for (int r = 0; r < tile.n_rows; ++r) tile.rows[r] = i0 + r;
          add_runs(
              tile, [&](int r) { return sliding_detail::visible(cfg_, i0 + r + off, len); },
              [](std::int64_t j) { return j; });
        });
  }

  /// As above, returning a new [B, T, H, D] tensor.
  core::Tensor<T> forward(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v,
                          std::span<const std::int64_t> key_lengths = {}) const {
    core::Tensor<T> out(q.shape());
    forward(q, k, v, out.template view<4>(), key_lengths);
    return out;
  }

  /// Decoding: q [B, T_new, H, D] are the queries of the last T_new positions of every
  /// (sequence, KV head) of `cache` (append their keys first); query t sits at position
  /// length - T_new + t and sees the cached keys the rule gives with S = length. out:
  /// [B, T_new, H, D], not sharing memory with q or the cache. Reads only the visible keys
  /// (sinks and the window); a bf16 cache (KVCache<float, bf16>) is widened as they are
  /// packed. Throws shape_error / config_error.
  template <class S>
  void decode(ConstView<T, 4> q, const KVCache<T, S>& cache, View<T, 4> out) const {
    const std::string_view fn = "decode";
    const std::int64_t B = cache.batch(), Hkv = cache.kv_heads(), D = cache.head_dim();
    core::detail::check_shape<const T, 4>(name, fn, "q", q, {"B", "T_new", "H", "D"},
                                          Shape<4>{B, -1, -1, D}, "the cache's batch and head_dim");
    const std::int64_t Tn = q.extent(1), H = q.extent(2);
    if (Tn < 1 || H < 1 || H % Hkv != 0)
      switchyard::detail::fail_shape(
          name, fn, "q", switchyard::detail::format_shape({"B", "T_new", "H", "D"}, q.shape()),
          "T_new >= 1 and H a multiple of the cache's H_kv=" + std::to_string(Hkv),
          "grouped-query attention");
    core::detail::check_shape<T, 4>(name, fn, "out", out, {"B", "T_new", "H", "D"}, q.shape(),
                                    "out has the shape of q");
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < Hkv; ++h)
        if (cache.length(b, h) < Tn)
          throw config_error(std::string(name) + "::decode: sequence " + std::to_string(b) +
                             " (KV head " + std::to_string(h) + ") holds " +
                             std::to_string(cache.length(b, h)) + " positions, fewer than the " +
                             std::to_string(Tn) + " new queries (append their keys first)");
    const ConstView<S, 4> ks = cache.keys_as_sequence(cache.capacity());
    const ConstView<S, 4> vs = cache.values_as_sequence(cache.capacity());
    core::detail::check_no_alias(name, fn, "out", out, "q", q);
    core::detail::check_no_alias(name, fn, "out", out, "cache keys", ks);
    core::detail::check_no_alias(name, fn, "out", out, "cache values", vs);

    // Packed keys of (b, hk): the sinks [0, sink_n), then positions [start, length).
    struct Head {
      std::int64_t len, sink_n, start;
    };
    std::vector<Head> heads(std::size_t(B * Hkv));
    std::int64_t N = 1;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t hk = 0; hk < Hkv; ++hk) {
        const std::int64_t len = cache.length(b, hk);
        const auto first = sliding_detail::visible(cfg_, len - Tn, len);
        std::int64_t start = first.lo;
        for (std::int64_t t = 1; t < Tn; ++t)
          start = std::min(start, sliding_detail::visible(cfg_, len - Tn + t, len).lo);
        const std::int64_t sink_n = std::min(cfg_.sinks, len);
        start = std::max(start, sink_n);
        heads[std::size_t(b * Hkv + hk)] = {len, sink_n, start};
        N = std::max(N, sink_n + len - start);
      }
    kernels::SparseAttentionArgs<T, S> a{};
    a.q = q.data();
    a.k = ks.data();
    a.v = vs.data();
    a.out = out.data();
    for (int i = 0; i < 4; ++i) {
      a.q_stride[i] = q.stride(i);
      a.k_stride[i] = ks.stride(i);
      a.v_stride[i] = vs.stride(i);
      a.out_stride[i] = out.stride(i);
    }
    a.B = B;
    a.T_q = Tn;
    a.H = H;
    a.D = D;
    a.S = cache.capacity();
    a.Hkv = Hkv;
    a.scale = static_cast<T>(cfg_.scale ? *cfg_.scale : 1.0 / std::sqrt(double(D)));
    using Tl = kernels::detail::DenseTiling<T, Arch>;
    constexpr std::int64_t MR = Tl::MR, NB = 512;
    structured_detail::check_pack<T, Arch>(name, fn, a, N, NB);
    kernels::SparseKeyPack<T, Arch> pack(B * Hkv, N, NB, D);
    kernels::sparse_pack_all<Arch>(
        a, pack,
        [&](std::int64_t b, std::int64_t hk, std::int64_t p) {
          const Head& hd = heads[std::size_t(b * Hkv + hk)];
          return p < hd.sink_n ? p : hd.start + (p - hd.sink_n);
        },
        [&](std::int64_t b, std::int64_t hk) {
          const Head& hd = heads[std::size_t(b * Hkv + hk)];
          return hd.sink_n + hd.len - hd.start;
        });
    const std::int64_t group = H / Hkv;
    kernels::sparse_attention(
        Arch{}, a, pack, num_chunks(Tn, MR), std::max<std::int64_t>(1, 256 / MR),
        [&](std::int64_t b, std::int64_t h, std::int64_t t, kernels::QueryTile& tile) {
          const Head& hd = heads[std::size_t(b * Hkv + h / group)];
          const std::int64_t i0 = t * MR;
          tile.n_rows = int(std::min(MR, Tn - i0));
          for (int r = 0; r < tile.n_rows; ++r) tile.rows[r] = i0 + r;
          add_runs(
              tile,
              [&](int r) { return sliding_detail::visible(cfg_, hd.len - Tn + i0 + r, hd.len); },
              [&](std::int64_t j) { return j < hd.sink_n ? j : hd.sink_n + (j - hd.start); });
        });
  }

 private:
  // The tile's two runs (sinks, band) from each row's visible keys; packed(j): packed index
  // of key position j (monotone over the visible keys).
  template <class VisibleOf, class Packed>
  static void add_runs(kernels::QueryTile& tile, VisibleOf&& vis_of, Packed&& packed) {
    kernels::TileRun sinks, band;
    sinks.begin = band.begin = std::numeric_limits<std::int64_t>::max();
    for (int r = 0; r < tile.n_rows; ++r) {
      const auto vis = vis_of(r);
      sinks.rows[r] = {0, packed(vis.sink_end - 1) + 1};
      if (vis.sink_end == 0) sinks.rows[r] = {0, 0};
      sinks.begin = 0;
      sinks.end = std::max(sinks.end, sinks.rows[r].end);
      if (vis.lo < vis.hi) {
        band.rows[r] = {packed(vis.lo), packed(vis.hi - 1) + 1};
        band.begin = std::min(band.begin, band.rows[r].begin);
        band.end = std::max(band.end, band.rows[r].end);
      }
    }
    if (sinks.end > 0) tile.runs.push_back(sinks);
    if (band.end > 0) tile.runs.push_back(band);
  }

  void check_lengths(std::string_view fn, std::int64_t B, std::int64_t T_q, std::int64_t S,
                     std::span<const std::int64_t> key_lengths) const {
    if (T_q > S) {
      const std::int64_t got[2] = {T_q, S};
      switchyard::detail::fail_shape(name, fn, "q",
                                     switchyard::detail::format_shape({"T", "S"}, got), "T <= S",
                                     "the queries are the last T of the S key positions");
    }
    if (!key_lengths.empty() || key_lengths.data()) {
      const Mask<T> m{KeyLengths{key_lengths}};
      m.validate(name, fn, B, T_q, S);
    }
  }

  config_type cfg_;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
