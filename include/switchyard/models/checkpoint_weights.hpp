#pragma once
// Looking up one weight of a model in a checkpoint: a zero-copy view of the element type the
// model reads, checked against the shape the config implies, with errors that name the tensor.
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "switchyard/core/error.hpp"
#include "switchyard/core/half.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/io/checkpoint.hpp"
#include "switchyard/io/dtype.hpp"

namespace switchyard {
inline namespace v0 {
namespace models {

/// Element types a model's weights may be stored as: float (F32) or bf16 (BF16).
template <class W>
inline constexpr bool is_weight_type_v = std::is_same_v<W, float> || std::is_same_v<W, bf16>;

/// "float" or "bf16", for messages.
template <class W>
constexpr std::string_view weight_type_name() noexcept {
  static_assert(is_weight_type_v<W>);
  return std::is_same_v<W, float> ? "float" : "bf16";
}

/// The checkpoint's tensor `tensor` as a view of element type W and shape `shape`, pointing
/// into the checkpoint (valid while it lives). `layer` and `fn` name the caller, `why` says
/// where the expected shape comes from. Throws switchyard::error when the checkpoint has no
/// such tensor, shape_error naming the tensor when it is stored with another dtype than W or
/// has another shape (both shapes in the message).
template <class W, int R>
ConstView<W, R> weight_view(const io::Checkpoint& ckpt, std::string_view layer, std::string_view fn,
                            const std::string& tensor, const Shape<R>& shape,
                            std::string_view why) {
  static_assert(is_weight_type_v<W>, "weights are float or bf16");
  if (!ckpt.contains(tensor))
    throw switchyard::error(std::string(layer) + "::" + std::string(fn) +
                            ": the checkpoint has no tensor '" + tensor + "' (" + std::string(why) +
                            ")");
  const io::TensorInfo& info = ckpt.info(tensor);
  constexpr io::DType want = std::is_same_v<W, float> ? io::DType::F32 : io::DType::BF16;
  if (info.dtype != want)
    throw shape_error(std::string(layer) + "::" + std::string(fn) + ": tensor '" + tensor +
                      "' is stored as " + std::string(io::dtype_name(info.dtype)) +
                      "; this model reads " + std::string(io::dtype_name(want)) +
                      " weights (W = " + std::string(weight_type_name<W>()) + ")");
  bool same = std::int64_t(info.shape.size()) == R;
  for (int d = 0; same && d < R; ++d) same = info.shape[std::size_t(d)] == shape[std::size_t(d)];
  if (!same)
    throw shape_error(std::string(layer) + "::" + std::string(fn) + ": tensor '" + tensor +
                      "' has shape " + switchyard::detail::format_shape(info.shape) +
                      "; expected " + switchyard::detail::format_shape(shape) + " (" +
                      std::string(why) + ")");
  return ckpt.template view<W, R>(tensor);
}

}  // namespace models
}  // namespace v0
}  // namespace switchyard
