#pragma once
// SafeTensorsWriter: builds a safetensors file in memory, for tests and
// examples. The output follows the format strictly so other readers (the
// Python `safetensors` package included) accept it: the header is padded with
// spaces to a multiple of 8 bytes, and tensors are packed with no gaps, larger
// element types first, so every tensor starts at a multiple of its element size.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/io/dtype.hpp"

namespace switchyard {
inline namespace v0 {
namespace io {

class SafeTensorsWriter {
 public:
  /// Adds a row-major tensor; `shape` may be empty (a 0-d scalar) or hold zeros. T is any
  /// type with a dtype (dtype.hpp): switchyard::bf16 / f16 store BF16 / F16 as they are.
  /// Throws switchyard::error on a duplicate or reserved name, a negative extent, or a
  /// shape too large to hold (see shape_nbytes).
  template <class T>
  void add(std::string name, const T* data, std::vector<std::int64_t> shape) {
    static_assert(has_dtype_v<T>, "SafeTensorsWriter::add: T has no safetensors dtype");
    const std::size_t n = count(name, shape, dtype_of<T>());
    std::vector<std::uint8_t> bytes(n * sizeof(T));
    if (n) std::memcpy(bytes.data(), static_cast<const void*>(data), bytes.size());
    push(std::move(name), dtype_of<T>(), std::move(shape), std::move(bytes));
  }

  /// Adds the elements of a (possibly strided) view, stored row-major (bf16 / f16 views as
  /// BF16 / F16). Throws as add().
  template <class T, int R>
  void add(std::string name, const View<T, R>& v) {
    using U = std::remove_const_t<T>;
    static_assert(has_dtype_v<U>, "SafeTensorsWriter::add: T has no safetensors dtype");
    std::vector<std::int64_t> shape(v.shape().begin(), v.shape().end());
    const std::size_t n = count(name, shape, dtype_of<U>());
    std::vector<std::uint8_t> bytes;  // not std::vector<U>: vector<bool> has no data()
    bytes.reserve(n * sizeof(U));
    if (n) gather(v, 0, 0, bytes);
    push(std::move(name), dtype_of<U>(), std::move(shape), std::move(bytes));
  }

  /// Adds an owning tensor (Tensor<bf16> as BF16...). Throws as add().
  template <class T>
  void add(std::string name, const Tensor<T>& t) {
    add<T>(std::move(name), t.data(),
           std::vector<std::int64_t>(t.shape().begin(), t.shape().end()));
  }

  /// Adds row-major float values stored as BF16 (round to nearest even, float_to_bf16):
  /// half the bytes, the dtype Hugging Face checkpoints use; reads back through
  /// tensor<float>(). Throws as add().
  void add_bf16(std::string name, const float* data, std::vector<std::int64_t> shape) {
    const std::size_t n = count(name, shape, DType::BF16);
    push(std::move(name), DType::BF16, std::move(shape), bf16_bytes(data, n));
  }
  /// The elements of a (possibly strided) float view, as BF16.
  template <int R>
  void add_bf16(std::string name, const View<const float, R>& v) {
    std::vector<std::int64_t> shape(v.shape().begin(), v.shape().end());
    const std::size_t n = count(name, shape, DType::BF16);
    std::vector<std::uint8_t> floats;  // row-major float bytes of v
    floats.reserve(n * sizeof(float));
    if (n) gather(v, 0, 0, floats);
    std::vector<float> values(n);
    if (n) std::memcpy(values.data(), floats.data(), n * sizeof(float));
    push(std::move(name), DType::BF16, std::move(shape), bf16_bytes(values.data(), n));
  }
  template <int R>
  void add_bf16(std::string name, const View<float, R>& v) {
    add_bf16(std::move(name), View<const float, R>(v));
  }
  void add_bf16(std::string name, const Tensor<float>& t) {
    add_bf16(std::move(name), t.data(),
             std::vector<std::int64_t>(t.shape().begin(), t.shape().end()));
  }

  /// Adds raw little-endian bytes of any dtype (e.g. BF16/F16 bit patterns).
  /// Throws switchyard::error if the byte count disagrees with shape and dtype.
  void add_raw(std::string name, DType dtype, std::vector<std::int64_t> shape,
               std::span<const std::uint8_t> bytes) {
    const std::size_t n = count(name, shape, dtype);
    if (bytes.size() != n * dtype_size(dtype)) {
      throw switchyard::error(
          "SafeTensorsWriter::add_raw: tensor '" + name + "': " + std::to_string(bytes.size()) +
          " bytes given, shape " + switchyard::detail::format_shape(shape) + " of " +
          std::string(dtype_name(dtype)) + " needs " + std::to_string(n * dtype_size(dtype)));
    }
    push(std::move(name), dtype, std::move(shape), {bytes.begin(), bytes.end()});
  }

  /// Sets one "__metadata__" entry (replacing an earlier value of the key).
  void set_metadata(std::string key, std::string value) {
    metadata_[std::move(key)] = std::move(value);
  }

  /// The complete file.
  std::vector<std::uint8_t> to_bytes() const {
    std::vector<std::size_t> order(entries_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return dtype_size(entries_[a].dtype) > dtype_size(entries_[b].dtype);
    });
    nlohmann::json header = nlohmann::json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (std::size_t i : order) {
      const Entry& e = entries_[i];
      header[e.name] = {{"dtype", std::string(dtype_name(e.dtype))},
                        {"shape", e.shape},
                        {"data_offsets", {offset, offset + e.bytes.size()}}};
      offset += e.bytes.size();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');

    std::vector<std::uint8_t> out;
    out.reserve(8 + text.size() + offset);
    const std::uint64_t n = text.size();
    for (int k = 0; k < 8; ++k) out.push_back(static_cast<std::uint8_t>(n >> (8 * k)));
    out.insert(out.end(), text.begin(), text.end());
    for (std::size_t i : order)
      out.insert(out.end(), entries_[i].bytes.begin(), entries_[i].bytes.end());
    return out;
  }

  /// Writes to_bytes() to `path`; throws switchyard::error if that fails.
  void save(const std::filesystem::path& path) const {
    const auto bytes = to_bytes();
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) {
      throw switchyard::error("SafeTensorsWriter::save: cannot write '" + path.string() + "'");
    }
  }

 private:
  static std::vector<std::uint8_t> bf16_bytes(const float* data, std::size_t n) {
    std::vector<std::uint8_t> bytes(n * 2);
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint16_t h = float_to_bf16(data[i]);
      bytes[2 * i] = static_cast<std::uint8_t>(h & 0xFF);  // little-endian
      bytes[2 * i + 1] = static_cast<std::uint8_t>(h >> 8);
    }
    return bytes;
  }

  struct Entry {
    std::string name;
    DType dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::uint8_t> bytes;
  };

  /// Elements of `shape`, after checking the name and that every partial product of the
  /// extents (times the element size) stays within core::max_buffer_bytes.
  std::size_t count(const std::string& name, const std::vector<std::int64_t>& shape,
                    DType dtype) const {
    const auto fail = [&](const std::string& what) {
      throw switchyard::error("SafeTensorsWriter::add: tensor '" + name + "': " + what);
    };
    if (name == "__metadata__") fail("the name __metadata__ is reserved");
    if (names_.count(name)) fail("a tensor of this name was already added");
    for (auto e : shape) {
      if (e < 0) fail("negative extent in shape " + switchyard::detail::format_shape(shape));
    }
    const std::int64_t bytes = shape_nbytes(shape, dtype);
    if (bytes < 0) {
      fail("shape " + switchyard::detail::format_shape(shape) + " of " +
           std::string(dtype_name(dtype)) +
           " is too large: a product of its extents (or its byte count) would overflow or "
           "exceed " +
           std::to_string(core::max_buffer_bytes) + " bytes");
    }
    return static_cast<std::size_t>(bytes) / dtype_size(dtype);
  }

  void push(std::string name, DType dtype, std::vector<std::int64_t> shape,
            std::vector<std::uint8_t> bytes) {
    names_.insert(name);
    entries_.push_back({std::move(name), dtype, std::move(shape), std::move(bytes)});
  }

  /// Appends the bytes of v's elements in row-major order, following its strides.
  template <class T, int R>
  static void gather(const View<T, R>& v, int dim, std::int64_t off,
                     std::vector<std::uint8_t>& out) {
    for (std::int64_t i = 0; i < v.extent(dim); ++i) {
      const std::int64_t o = off + i * v.stride(dim);
      if (dim + 1 == R) {
        const auto* p = reinterpret_cast<const std::uint8_t*>(v.data() + o);
        out.insert(out.end(), p, p + sizeof(T));
      } else {
        gather(v, dim + 1, o, out);
      }
    }
  }

  std::vector<Entry> entries_;
  std::set<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace io
}  // namespace v0
}  // namespace switchyard
