#pragma once
// Linear (kernelised) attention, as in fast-transformers:
//
//   out_i = phi(q_i) . (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j) + eps)
//
// Non-causal: j runs over all (unpadded) keys. Causal: j <= i. phi is one of the
// feature maps of linear_feature_maps.hpp; eps (1e-6) is added to the
// denominator as fast-transformers does. Cost is O(T D' Dv) instead of O(T S D).
//
// Causal attention is computed chunk by chunk (Lightning Attention style): inside a
// chunk of C tokens, masked quadratic attention phi(Q_c) phi(K_c)^T; across chunks,
// a carried state S = sum_j phi(k_j) v_j^T [D', Dv] and z = sum_j phi(k_j) [D'],
// updated once per chunk by a GEMM. No per-token prefix sum of D' x Dv matrices is
// ever stored. `step` is the recurrent form for decoding one token at a time on an
// explicit state, and `forward_causal` can start from and leave such a state, so
// a prompt can be prefilled in chunks and then decoded token by token.
//
// Threads: each task takes a batch item and a group of its heads, and reads the
// [B, T, H, D] inputs chunk by chunk, front to back (all heads of a token are
// adjacent). The group size follows the thread count (all heads in one task at 1
// thread), but every head is computed by the same code in the same order whatever
// group it is in, so results are bit-identical for any thread count.
// Inputs are assumed finite; a non-finite future token still never reaches an
// earlier causal output.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/attention/linear_feature_maps.hpp"
#include "switchyard/attention/linear_kernels.hpp"
#include "switchyard/core/alias.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// Configuration of LinearAttention; keep the field order (designated initialisers).
struct LinearAttentionConfig {
  FeatureMap feature_map = FeatureMap::elu_plus_one;
  double eps = 1e-6;             // added to the denominator; finite, >= 0
  std::int64_t chunk_size = 64;  // C, tokens per chunk of forward_causal; >= 1
  // FAVOR+ only:
  std::int64_t num_features = 256;  // m = D', random features; >= 1
  std::uint64_t seed = 0;           // seed of the projection (core::Rng)
  bool orthogonal = true;           // orthogonal blocks of random directions
  std::int64_t head_dim = 0;        // D: required (>= 1) for favor_plus; else 0 = any, or checked
};

/// Recurrent state of causal linear attention for every (batch, head):
/// s [B, H, D', Dv] = sum_j phi(k_j) v_j^T, z [B, H, D'] = sum_j phi(k_j).
template <class T>
struct LinearAttentionState {
  Tensor<T> s;
  Tensor<T> z;
};

/// Linear attention layer; immutable after construction, so one object may be
/// shared by threads. Layout [B, T, H, D] for every sequence tensor, as for dense attention.
template <class T = float>
class LinearAttention {
 public:
  using config_type = LinearAttentionConfig;
  using state_type = LinearAttentionState<T>;
  static constexpr std::string_view name = "LinearAttention";

  /// Validates the config (throws config_error naming the field) and, for
  /// favor_plus, draws the projection.
  explicit LinearAttention(config_type cfg = {}) : cfg_(cfg) {
    constexpr std::string_view fn = "LinearAttention";
    if (!std::isfinite(cfg_.eps) || cfg_.eps < 0)
      switchyard::detail::fail_config(name, fn, "eps", cfg_.eps, "finite and >= 0");
    if (cfg_.chunk_size < 1)
      switchyard::detail::fail_config(name, fn, "chunk_size", cfg_.chunk_size, ">= 1");
    if (cfg_.head_dim < 0)
      switchyard::detail::fail_config(name, fn, "head_dim", cfg_.head_dim, ">= 0");
    if (cfg_.feature_map == FeatureMap::favor_plus) {
      if (cfg_.num_features < 1)
        switchyard::detail::fail_config(name, fn, "num_features", cfg_.num_features,
                                        ">= 1 for feature_map favor_plus");
      if (cfg_.head_dim < 1)
        switchyard::detail::fail_config(
            name, fn, "head_dim", cfg_.head_dim,
            ">= 1 for feature_map favor_plus (the projection is [m, D])");
      favor_ =
          make_favor_projection<T>(cfg_.head_dim, cfg_.num_features, cfg_.seed, cfg_.orthogonal);
    }
  }

  const config_type& config() const noexcept { return cfg_; }

  /// D' for head dim D: D for elu_plus_one and relu, num_features for favor_plus.
  std::int64_t feature_dim(std::int64_t head_dim) const noexcept {
    return attention::feature_dim(cfg_.feature_map, head_dim, cfg_.num_features);
  }

  /// The FAVOR+ projection (omega [m, D]); nullptr for the other feature maps.
  const FavorProjection<T>* projection() const noexcept {
    return cfg_.feature_map == FeatureMap::favor_plus ? &favor_ : nullptr;
  }

  /// Zero state for B batch items, H heads, head dim D, value dim Dv:
  /// s [B, H, D', Dv], z [B, H, D'].
  state_type make_state(std::int64_t batch, std::int64_t heads, std::int64_t head_dim,
                        std::int64_t value_dim) const {
    const std::int64_t f = feature_dim(head_dim);
    return state_type{Tensor<T>({batch, heads, f, value_dim}), Tensor<T>({batch, heads, f})};
  }

  /// q [B, T, H, D], k [B, S, H, D], v [B, S, H, Dv] -> out [B, T, H, Dv], non-causal.
  /// key_lengths: empty (all keys valid) or [B] with 0 <= key_lengths[b] <= S; keys at
  /// positions >= key_lengths[b] are zeroed after the feature map (fast-transformers'
  /// LengthMask), queries are not masked. Any strides; out must not share memory with the
  /// inputs (shape_error).
  template <class Arch = simd::default_arch>
  void forward(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v, View<T, 4> out,
               std::span<const std::int64_t> key_lengths = {}) const {
    const Dims d = check(q, k, v, out, key_lengths, "forward", false);
    run_heads<Arch>(q, k, v, out, key_lengths, d, nullptr, false);
  }

  /// q, k [B, T, H, D], v [B, T, H, Dv] -> out [B, T, H, Dv], causal (token i sees keys
  /// j <= i), computed in chunks of config().chunk_size. key_lengths as for forward.
  /// state: optional; if given (s [B, H, D', Dv], z [B, H, D']), the sums start from it
  /// (earlier tokens) and it holds the sums over all T tokens on return.
  template <class Arch = simd::default_arch>
  void forward_causal(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v, View<T, 4> out,
                      std::span<const std::int64_t> key_lengths = {},
                      state_type* state = nullptr) const {
    const Dims d = check(q, k, v, out, key_lengths, "forward_causal", true);
    if (state) check_state(*state, d, "forward_causal");
    run_heads<Arch>(q, k, v, out, key_lengths, d, state, true);
  }

  /// One decoding step: q_t, k_t [B, H, D], v_t [B, H, Dv] -> out_t [B, H, Dv].
  /// Adds phi(k_t) v_t^T to state.s and phi(k_t) to state.z (state from make_state or
  /// forward_causal), then out_t = phi(q_t) s / (phi(q_t) . z + eps), as fast-transformers'
  /// RecurrentLinearAttention.
  template <class Arch = simd::default_arch>
  void step(ConstView<T, 3> q_t, ConstView<T, 3> k_t, ConstView<T, 3> v_t, state_type& state,
            View<T, 3> out_t) const {
    constexpr std::string_view fn = "step";
    const std::int64_t nb = q_t.extent(0), nh = q_t.extent(1), hd = q_t.extent(2);
    check_head_dim(hd, fn, "q_t", {"B", "H", "D"}, q_t.shape());
    core::detail::check_shape(name, fn, "q_t", q_t, {"B", "H", "D"}, {-1, -1, -1});
    core::detail::check_shape(name, fn, "k_t", k_t, {"B", "H", "D"}, {nb, nh, hd},
                              "B, H, D must match q_t");
    const std::int64_t dv = v_t.extent(2);
    core::detail::check_shape(name, fn, "v_t", v_t, {"B", "H", "Dv"}, {nb, nh, -1},
                              "B, H must match q_t");
    core::detail::check_shape(name, fn, "out_t", out_t, {"B", "H", "Dv"}, {nb, nh, dv},
                              "B, H must match q_t and Dv must match v_t");
    const Dims d{nb, 1, 1, nh, hd, dv, feature_dim(hd)};
    check_scratch(d, fn, 1);
    check_state(state, d, fn);
    core::detail::check_no_alias(name, fn, "out_t", out_t, "q_t", q_t);
    core::detail::check_no_alias(name, fn, "out_t", out_t, "k_t", k_t);
    core::detail::check_no_alias(name, fn, "out_t", out_t, "v_t", v_t);
    const std::int64_t f = d.f;
    std::vector<T> ws(static_cast<std::size_t>(nb * nh * (2 * f + 2 * dv)));
    parallel_for(nb * nh, [&](std::int64_t task) {
      const std::int64_t b = task / nh, h = task % nh;
      T* phiq = ws.data() + task * (2 * f + 2 * dv);
      T* phik = phiq + f;
      T* vb = phik + f;
      T* num = vb + dv;
      T* s = state.s.data() + task * f * dv;
      T* z = state.z.data() + task * f;
      const Arch arch{};
      kernels::linear_feature_map(arch, cfg_.feature_map, projection(), false, at(k_t, b, h), 0,
                                  k_t.stride(2), 1, hd, phik, f);
      kernels::linear_feature_map(arch, cfg_.feature_map, projection(), true, at(q_t, b, h), 0,
                                  q_t.stride(2), 1, hd, phiq, f);
      const T* vt = at(v_t, b, h);
      for (std::int64_t c = 0; c < dv; ++c) vb[c] = vt[c * v_t.stride(2)];
      kernels::small_gemm(arch, f, dv, 1, phik, 1, 1, vb, dv, s, dv, true);
      kernels::linear_add(arch, phik, z, f);
      kernels::small_gemm(arch, 1, dv, f, phiq, 0, 1, s, dv, num, dv, false);
      const T inv = T(1) / (kernels::linear_dot(arch, phiq, z, f) + static_cast<T>(cfg_.eps));
      T* o = at(out_t, b, h);
      for (std::int64_t c = 0; c < dv; ++c) o[c * out_t.stride(2)] = num[c] * inv;
    });
  }

 private:
  struct Dims {
    std::int64_t b, t, s, h, d, dv, f;
  };

  // Start of (batch b, head h) of a [B, H, D] view: plain arithmetic, valid for empty extents.
  template <class U>
  static U* at(View<U, 3> x, std::int64_t b, std::int64_t h) noexcept {
    return x.data() + b * x.stride(0) + h * x.stride(1);
  }

  void check_head_dim(std::int64_t hd, std::string_view fn, std::string_view arg,
                      std::initializer_list<std::string_view> names,
                      std::span<const std::int64_t> shape) const {
    if (cfg_.head_dim > 0 && hd != cfg_.head_dim) {
      std::ostringstream exp;  // "[B, T, H, D=64]"
      exp << '[';
      auto it = names.begin();
      for (std::size_t i = 0; i < shape.size(); ++i, ++it) exp << (i ? ", " : "") << *it;
      exp << '=' << cfg_.head_dim << ']';
      switchyard::detail::fail_shape(name, fn, arg, switchyard::detail::format_shape(names, shape),
                                     exp.str(), "D must equal config head_dim");
    }
  }

  Dims check(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v, View<T, 4> out,
             std::span<const std::int64_t> key_lengths, std::string_view fn, bool causal) const {
    const std::int64_t nb = q.extent(0), nt = q.extent(1), nh = q.extent(2), hd = q.extent(3);
    check_head_dim(hd, fn, "q", {"B", "T", "H", "D"}, q.shape());
    if (causal) {
      core::detail::check_shape(name, fn, "k", k, {"B", "T", "H", "D"}, {nb, nt, nh, hd},
                                "causal attention needs k shaped like q");
    } else {
      core::detail::check_shape(name, fn, "k", k, {"B", "S", "H", "D"}, {nb, -1, nh, hd},
                                "B, H, D must match q");
    }
    const std::int64_t ns = k.extent(1);
    core::detail::check_shape(name, fn, "v", v, {"B", "S", "H", "Dv"}, {nb, ns, nh, -1},
                              "B, S, H must match k");
    const std::int64_t dv = v.extent(3);
    core::detail::check_shape(name, fn, "out", out, {"B", "T", "H", "Dv"}, {nb, nt, nh, dv},
                              "B, T, H must match q and Dv must match v");
    core::detail::check_shape(name, fn, "q", q, {"B", "T", "H", "D"}, {-1, -1, -1, -1});
    core::detail::check_no_alias(name, fn, "out", out, "q", q);
    core::detail::check_no_alias(name, fn, "out", out, "k", k);
    core::detail::check_no_alias(name, fn, "out", out, "v", v);
    if (!key_lengths.empty()) {
      if (static_cast<std::int64_t>(key_lengths.size()) != nb) {
        const std::int64_t got = static_cast<std::int64_t>(key_lengths.size());
        switchyard::detail::fail_shape(
            name, fn, "key_lengths", switchyard::detail::format_shape({"B"}, {&got, 1}),
            "[B=" + std::to_string(nb) + "]", "one length per batch item, or none");
      }
      for (std::size_t i = 0; i < key_lengths.size(); ++i) {
        if (key_lengths[i] < 0 || key_lengths[i] > ns)
          switchyard::detail::fail_config(name, fn, "key_lengths[" + std::to_string(i) + "]",
                                          key_lengths[i],
                                          "0 <= key_lengths[b] <= S=" + std::to_string(ns));
      }
    }
    const Dims d{nb, nt, ns, nh, hd, dv, feature_dim(hd)};
    check_scratch(d, fn, causal ? std::min(cfg_.chunk_size, nt) : kBlock);
    return d;
  }

  // The per-task scratch of run_heads and step ([B, H] states [D', Dv] and chunk rows
  // [C, D' + Dv]), checked before it is sized: stride-0 views may claim any extents.
  void check_scratch(const Dims& d, std::string_view fn, std::int64_t chunk) const {
    using core::pad_extent;
    const std::int64_t f = pad_extent(d.f, 16), dv = pad_extent(d.dv, 16);
    const std::int64_t c = pad_extent(chunk, 16);
    switchyard::detail::checked_size(name, fn, "q", {d.b, d.h, f, dv}, 2 * sizeof(T));
    switchyard::detail::checked_size(name, fn, "q", {d.b, d.h, c, pad_extent(f, dv)},
                                     4 * sizeof(T));
    switchyard::detail::checked_size(name, fn, "q", {d.b, c, pad_extent(c, f)}, 2 * sizeof(T));
    switchyard::detail::checked_size(name, fn, "q", {d.b, d.t, d.h, pad_extent(d.d, 1)}, sizeof(T));
    switchyard::detail::checked_size(name, fn, "k", {d.b, d.s, d.h, pad_extent(d.d, dv)},
                                     sizeof(T));
  }

  void check_state(const state_type& st, const Dims& d, std::string_view fn) const {
    auto check = [&](std::string_view arg, const Tensor<T>& t, Shape<4> exp_shape, int rank,
                     std::initializer_list<std::string_view> names) {
      bool ok = t.rank() == rank;
      for (int i = 0; ok && i < rank; ++i) ok = t.extent(i) == exp_shape[i];
      if (ok) return;
      std::span<const std::int64_t> es(exp_shape.data(), static_cast<std::size_t>(rank));
      switchyard::detail::fail_shape(name, fn, arg, switchyard::detail::format_shape(t.shape()),
                                     switchyard::detail::format_shape(names, es),
                                     "state from make_state(B, H, D, Dv); D' = feature_dim(D)");
    };
    check("state.s", st.s, {d.b, d.h, d.f, d.dv}, 4, {"B", "H", "D'", "Dv"});
    check("state.z", st.z, {d.b, d.h, d.f, 0}, 3, {"B", "H", "D'"});
  }

  // Element (t, g, c) of a sequence tensor for heads h0 + g of one batch item.
  template <class U>
  struct Seq {
    U* p;
    std::ptrdiff_t rs, hs, cs;
    U* row(std::int64_t t, std::int64_t g) const noexcept { return p + t * rs + g * hs; }
  };

  // Per-task scratch: G heads' packed chunk rows and states (head g's slice of each
  // starts g * C * F, g * C * Dv, g * F * Dv or g * F elements in), plus buffers that one
  // head uses at a time.
  struct Buffers {
    std::int64_t c, cp, f, dv;
    T *phiq = nullptr, *phik = nullptr, *vb = nullptr,
      *num = nullptr;                                        // [G][C][F] x2, [G][C][Dv] x2
    T *s = nullptr, *z = nullptr;                            // [G][F][Dv], [G][F]
    T *den = nullptr, *phik_t = nullptr, *scores = nullptr;  // [C], [F][Cp], [C][Cp]
  };

  static std::int64_t heads_per_task(std::int64_t nb, std::int64_t nh) noexcept {
    // All heads of a batch item in one task, so each chunk of the [B, T, H, D] inputs is
    // read front to back (per-head passes stride H*D and run up to 2x slower), unless
    // that leaves threads idle. Heads are computed the same way whatever the grouping,
    // so the results do not depend on it (or on the thread count).
    const std::int64_t threads = num_threads();
    return std::clamp<std::int64_t>(nb * nh / threads, 1, nh);
  }

  template <class Arch>
  void run_heads(ConstView<T, 4> q, ConstView<T, 4> k, ConstView<T, 4> v, View<T, 4> out,
                 std::span<const std::int64_t> key_lengths, const Dims& d, state_type* state,
                 bool causal) const {
    if (d.b * d.h == 0) return;
    const std::int64_t gsize = heads_per_task(d.b, d.h);
    const std::int64_t groups = (d.h + gsize - 1) / gsize;
    // Chunk rows C; score rows padded to a multiple of 16 so SIMD tiles may overrun
    // the valid columns of a chunk (those scores are never read).
    const std::int64_t c =
        causal ? std::min(cfg_.chunk_size, std::max<std::int64_t>(d.t, 1)) : kBlock;
    const std::int64_t cp = (c + 15) / 16 * 16;
    const std::int64_t f = d.f, dv = d.dv;
    const std::int64_t per_head = 2 * c * f + 2 * c * dv + (state ? 0 : f * dv + f);
    const std::int64_t shared = c + (causal ? f * cp + c * cp : 0);
    const std::int64_t per_task = gsize * per_head + shared;
    Tensor<T> ws({d.b * groups, per_task});  // zero-filled: zero initial state
    parallel_for(d.b * groups, [&](std::int64_t task) {
      const std::int64_t b = task / groups, h0 = (task % groups) * gsize;
      const std::int64_t g = std::min(gsize, d.h - h0);
      T* w = ws.data() + task * per_task;
      Buffers buf{c, cp, f, dv};
      buf.phiq = w;
      buf.phik = buf.phiq + gsize * c * f;
      buf.vb = buf.phik + gsize * c * f;
      buf.num = buf.vb + gsize * c * dv;
      T* next = buf.num + gsize * c * dv;
      if (state) {
        buf.s = state->s.data() + (b * d.h + h0) * f * dv;
        buf.z = state->z.data() + (b * d.h + h0) * f;
      } else {
        buf.s = next;
        buf.z = buf.s + gsize * f * dv;
        next = buf.z + gsize * f;
      }
      buf.den = next;
      buf.phik_t = buf.den + c;
      buf.scores = buf.phik_t + f * cp;
      auto seq = [&](auto x) {
        using U = std::remove_pointer_t<decltype(x.data())>;
        return Seq<U>{x.data() + b * x.stride(0) + h0 * x.stride(2), x.stride(1), x.stride(2),
                      x.stride(3)};
      };
      const Group grp{seq(q), seq(k), seq(v), seq(out), g};
      const std::int64_t klen = key_lengths.empty() ? d.s : key_lengths[b];
      if (causal)
        causal_group(Arch{}, grp, d, klen, buf);
      else
        noncausal_group(Arch{}, grp, d, klen, buf);
    });
  }

  static constexpr std::int64_t kBlock = 64;  // rows per block of the non-causal passes

  struct Group {
    Seq<const T> q, k, v;
    Seq<T> out;
    std::int64_t g;  // heads in the group
  };

  // Feature rows of tokens [t0, t0 + n) for every head of the group, read token by
  // token (front to back in memory) into dst [G][C][F].
  template <class Arch>
  void pack_features(Arch arch, const Seq<const T>& x, std::int64_t g, bool is_query,
                     std::int64_t t0, std::int64_t n, const Dims& d, const Buffers& buf,
                     T* dst) const {
    for (std::int64_t i = 0; i < n; ++i)
      kernels::linear_feature_map(arch, cfg_.feature_map, projection(), is_query, x.row(t0 + i, 0),
                                  x.hs, x.cs, g, d.d, dst + i * d.f, buf.c * d.f);
  }

  // Keys and values of tokens [t0, t0 + n) for every head; keys at positions >= klen
  // are zeroed after the feature map (fast-transformers' LengthMask).
  template <class Arch>
  void pack_keys(Arch arch, const Group& grp, const Dims& d, std::int64_t t0, std::int64_t n,
                 std::int64_t klen, const Buffers& buf) const {
    const std::int64_t f = d.f, dv = d.dv;
    pack_features(arch, grp.k, grp.g, false, t0, n, d, buf, buf.phik);
    for (std::int64_t i = 0; i < n; ++i) {
      for (std::int64_t h = 0; h < grp.g; ++h) {
        const T* src = grp.v.row(t0 + i, h);
        T* dst = buf.vb + (h * buf.c + i) * dv;
        if (t0 + i >= klen) std::fill_n(buf.phik + (h * buf.c + i) * f, f, T(0));
        if (grp.v.cs == 1)
          std::copy_n(src, dv, dst);
        else
          for (std::int64_t e = 0; e < dv; ++e) dst[e] = src[e * grp.v.cs];
      }
    }
  }

  // s += phik^T vb, z += column sums of phik, both in key order (head h's slices).
  template <class Arch>
  void update_state(Arch arch, const Dims& d, std::int64_t n, const Buffers& buf,
                    std::int64_t h) const {
    const std::int64_t f = d.f, dv = d.dv;
    const T* phik = buf.phik + h * buf.c * f;
    T* z = buf.z + h * f;
    kernels::small_gemm(arch, f, dv, n, phik, 1, f, buf.vb + h * buf.c * dv, dv, buf.s + h * f * dv,
                        dv, true);
    for (std::int64_t j = 0; j < n; ++j) kernels::linear_add(arch, phik + j * f, z, f);
  }

  // Head h: num rows /= (den + phiq.z + eps) in place; num already holds
  // phiq s (+ the intra-chunk part), den the intra-chunk denominators.
  template <class Arch>
  void normalise(Arch arch, const Dims& d, std::int64_t n, const Buffers& buf,
                 std::int64_t h) const {
    const T eps = static_cast<T>(cfg_.eps);
    const T* phiq = buf.phiq + h * buf.c * d.f;
    const T* z = buf.z + h * d.f;
    T* num = buf.num + h * buf.c * d.dv;
    for (std::int64_t i = 0; i < n; ++i) {
      const T den = buf.den[i] + kernels::linear_dot(arch, phiq + i * d.f, z, d.f);
      const T inv = T(1) / (den + eps);
      T* row = num + i * d.dv;
      for (std::int64_t e = 0; e < d.dv; ++e) row[e] *= inv;
    }
  }

  // Output rows of tokens [t0, t0 + n), written token by token.
  void store_rows(const Group& grp, const Dims& d, std::int64_t t0, std::int64_t n,
                  const Buffers& buf) const {
    for (std::int64_t i = 0; i < n; ++i) {
      for (std::int64_t h = 0; h < grp.g; ++h) {
        const T* src = buf.num + (h * buf.c + i) * d.dv;
        T* dst = grp.out.row(t0 + i, h);
        if (grp.out.cs == 1)
          std::copy_n(src, d.dv, dst);
        else
          for (std::int64_t e = 0; e < d.dv; ++e) dst[e * grp.out.cs] = src[e];
      }
    }
  }

  template <class Arch>
  void noncausal_group(Arch arch, const Group& grp, const Dims& d, std::int64_t klen,
                       const Buffers& buf) const {
    const std::int64_t f = d.f, dv = d.dv;
    std::fill_n(buf.s, grp.g * f * dv, T(0));
    std::fill_n(buf.z, grp.g * f, T(0));
    // Padded keys would add exact zeros, so they are skipped.
    for (std::int64_t t0 = 0; t0 < klen; t0 += kBlock) {
      const std::int64_t n = std::min(kBlock, klen - t0);
      pack_keys(arch, grp, d, t0, n, klen, buf);
      for (std::int64_t h = 0; h < grp.g; ++h) update_state(arch, d, n, buf, h);
    }
    std::fill_n(buf.den, buf.c, T(0));
    for (std::int64_t t0 = 0; t0 < d.t; t0 += kBlock) {
      const std::int64_t n = std::min(kBlock, d.t - t0);
      pack_features(arch, grp.q, grp.g, true, t0, n, d, buf, buf.phiq);
      for (std::int64_t h = 0; h < grp.g; ++h) {
        kernels::small_gemm(arch, n, dv, f, buf.phiq + h * buf.c * f, f, 1, buf.s + h * f * dv, dv,
                            buf.num + h * buf.c * dv, dv, false);
        normalise(arch, d, n, buf, h);
      }
      store_rows(grp, d, t0, n, buf);
    }
  }

  template <class Arch>
  void causal_group(Arch arch, const Group& grp, const Dims& d, std::int64_t klen,
                    const Buffers& buf) const {
    const std::int64_t f = d.f, dv = d.dv, c = buf.c, cp = buf.cp;
    constexpr std::int64_t rb = 16;  // score rows per block; columns past the diagonal skipped
    for (std::int64_t t0 = 0; t0 < d.t; t0 += c) {
      const std::int64_t n = std::min(c, d.t - t0);
      pack_keys(arch, grp, d, t0, n, klen, buf);
      pack_features(arch, grp.q, grp.g, true, t0, n, d, buf, buf.phiq);
      for (std::int64_t h = 0; h < grp.g; ++h) {
        const T* phiq = buf.phiq + h * c * f;
        const T* phik = buf.phik + h * c * f;
        const T* vb = buf.vb + h * c * dv;
        T* num = buf.num + h * c * dv;
        for (std::int64_t j = 0; j < n; ++j)
          for (std::int64_t e = 0; e < f; ++e) buf.phik_t[e * cp + j] = phik[j * f + e];
        // Inter-chunk part: phi(Q_c) S, the tokens of earlier chunks.
        kernels::small_gemm(arch, n, dv, f, phiq, f, 1, buf.s + h * f * dv, dv, num, dv, false);
        // Intra-chunk part: A = phi(Q_c) phi(K_c)^T, lower triangle only, num += A V_c.
        // Score columns past the diagonal are computed (whole SIMD tiles) but never read.
        for (std::int64_t i0 = 0; i0 < n; i0 += rb) {
          const std::int64_t mi = std::min(rb, n - i0);
          const std::int64_t width = std::min((i0 + mi + 15) / 16 * 16, cp);
          T* a = buf.scores + i0 * cp;
          kernels::small_gemm(arch, mi, width, f, phiq + i0 * f, f, 1, buf.phik_t, cp, a, cp,
                              false);
          for (std::int64_t i = 0; i < mi; ++i) {
            T sum = 0;
            for (std::int64_t j = 0; j <= i0 + i; ++j) sum += a[i * cp + j];
            buf.den[i0 + i] = sum;
          }
          // Keys before the block reach every row of it; keys inside it only rows at or
          // after them, so a future key never enters a product (not even as 0 * inf).
          if (i0 > 0)
            kernels::small_gemm(arch, mi, dv, i0, a, cp, 1, vb, dv, num + i0 * dv, dv, true);
          for (std::int64_t i = 0; i < mi; ++i)
            kernels::small_gemm(arch, 1, dv, i + 1, a + i * cp + i0, 0, 1, vb + i0 * dv, dv,
                                num + (i0 + i) * dv, dv, true);
        }
        normalise(arch, d, n, buf, h);
        update_state(arch, d, n, buf, h);
      }
      store_rows(grp, d, t0, n, buf);
    }
  }

  config_type cfg_;
  FavorProjection<T> favor_;
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
