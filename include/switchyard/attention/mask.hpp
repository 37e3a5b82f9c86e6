#pragma once
// Attention masks as types, never a bare bool (PyTorch uses both polarities).
//
//   NoMask                 every query sees every key.
//   CausalMask{offset}     query i sees keys j <= i + offset. offset = 0 is the
//                          usual square causal mask; when decoding with a KV
//                          cache (T new queries after S - T cached keys) use
//                          offset = S - T so the last query sees every key.
//   KeyLengths{lengths}    per batch element b, keys j >= lengths[b] are padding
//                          and masked (lengths: [B], each in [0, S]).
//   AdditiveBias<T>{bias}  bias: [T, S], added to the scaled scores (the same
//                          bias for every batch element and head); -inf masks.
//
// A Mask<T> holds any combination of the last three (at most one of each), so
// causal + key lengths + bias is one argument:
//   attn.forward(q, k, v, out, {CausalMask{}, KeyLengths{lengths}});
// A query row that sees no key gets an output of exact zeros.
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace attention {

/// No masking.
struct NoMask {};

/// Query i sees keys j <= i + offset (offset = S - T for decoding with a KV cache).
struct CausalMask {
  std::int64_t offset = 0;
};

/// lengths: [B]; keys j >= lengths[b] of batch element b are masked. Not owned.
struct KeyLengths {
  std::span<const std::int64_t> lengths;
};

/// bias: [T, S], added to the scaled scores; may hold -inf (masked). Not owned.
template <class T>
struct AdditiveBias {
  ConstView<T, 2> bias;
};

/// Any combination of CausalMask, KeyLengths and AdditiveBias<T> (at most one of
/// each); converts implicitly from each of them and from NoMask.
template <class T>
struct Mask {
  std::optional<CausalMask> causal;
  std::optional<KeyLengths> key_lengths;
  std::optional<AdditiveBias<T>> bias;

  Mask() = default;
  template <class... Parts>
  requires(sizeof...(Parts) >= 1)
      Mask(const Parts&... parts) {  // NOLINT(google-explicit-constructor)
    (add(parts), ...);
  }

  bool empty() const noexcept { return !causal && !key_lengths && !bias; }

  /// Throws shape_error / config_error naming `layer::fn` unless the mask fits
  /// a problem with batch B, T queries and S keys.
  void validate(std::string_view layer, std::string_view fn, std::int64_t B, std::int64_t Tq,
                std::int64_t S) const {
    if (key_lengths) {
      const auto lengths = key_lengths->lengths;
      const std::int64_t n = static_cast<std::int64_t>(lengths.size());
      if (n != B) {
        switchyard::detail::fail_shape(
            layer, fn, "key_lengths", switchyard::detail::format_shape({"B"}, std::span(&n, 1)),
            "[B=" + std::to_string(B) + "]", "one key length per batch element");
      }
      for (std::int64_t b = 0; b < B; ++b) {
        if (lengths[b] < 0 || lengths[b] > S) {
          switchyard::detail::fail_config(layer, fn, "key_lengths[" + std::to_string(b) + "]",
                                          lengths[b],
                                          "a length in [0, S=" + std::to_string(S) + "]");
        }
      }
    }
    if (bias) {
      core::detail::check_shape<const T, 2>(layer, fn, "bias", bias->bias, {"T", "S"},
                                            Shape<2>{Tq, S}, "additive bias is [T, S]");
    }
  }

 private:
  void add(const NoMask&) noexcept {}
  void add(const CausalMask& m) {
    if (causal) duplicate("CausalMask");
    causal = m;
  }
  void add(const KeyLengths& m) {
    if (key_lengths) duplicate("KeyLengths");
    key_lengths = m;
  }
  void add(const AdditiveBias<T>& m) {
    if (bias) duplicate("AdditiveBias");
    bias = m;
  }
  [[noreturn]] static void duplicate(std::string_view what) {
    switchyard::detail::fail_config("Mask", "Mask", "parts", what, "at most one mask of each type");
  }
};

}  // namespace attention
}  // namespace v0
}  // namespace switchyard
