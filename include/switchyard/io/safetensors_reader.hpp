#pragma once
// SafeTensors: a validating reader for the safetensors checkpoint format
// (https://github.com/huggingface/safetensors): 8-byte little-endian header
// length N, N bytes of JSON, then the raw little-endian row-major data section.
//
// The whole header is validated when the file is opened, so later calls only
// check what the caller asks for (dtype, rank). The header is untrusted input:
// nesting deeper than max_header_depth is rejected while parsing (nothing about it
// recurses), every partial product of a shape is bounded (shape_nbytes), offsets are
// compared, never added, and values quoted in error messages are summarised or
// truncated, so a hostile file gives one short switchyard::error, never a crash. The file is read,
// not memory-mapped: the data section is copied into one 64-byte aligned buffer owned by the
// object, so views are aligned whatever N is, and they stay valid while the SafeTensors object (or
// the one it was moved into) lives.
#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
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

static_assert(std::endian::native == std::endian::little,
              "switchyard::io reads little-endian safetensors data in place");

/// One header entry. `begin`/`end` are byte offsets into the data section.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;  // empty for a 0-d scalar
  std::uint64_t begin = 0, end = 0;

  /// Product of the extents (1 for a 0-d scalar); at open, every partial product was
  /// checked to stay within core::max_buffer_bytes, so this cannot overflow.
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (auto e : shape) n *= e;
    return n;
  }
  std::uint64_t nbytes() const noexcept { return end - begin; }
};

namespace safetensors_detail {

/// 's' (built by append: GCC 12 warns falsely, -Wrestrict, on "'" + std::string(s)).
inline std::string quote(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out.push_back('\'');
  out.append(s);
  out.push_back('\'');
  return out;
}

/// Tensor names, keys and values from a header longer than this are cut in messages.
inline constexpr std::size_t max_quoted_chars = 80;

/// quote() for text read from a header: cut to max_quoted_chars with "...", so a
/// hostile name cannot make a huge message. (Paths and names the caller gave are not cut.)
inline std::string quote_header(std::string_view s) {
  if (s.size() <= max_quoted_chars) return quote(s);
  std::string out = quote(s.substr(0, max_quoted_chars));
  out.insert(out.size() - 1, "...");
  return out;
}

/// A header value in a message: scalars as (cut) JSON text, arrays and objects by size
/// only. Never recursive, unlike dump(), so depth cannot overflow the stack here either.
inline std::string describe(const nlohmann::json& v) {
  if (v.is_array()) return "[...] (an array of " + std::to_string(v.size()) + ")";
  if (v.is_object()) return "{...} (an object of " + std::to_string(v.size()) + " keys)";
  constexpr auto replace = nlohmann::json::error_handler_t::replace;  // invalid UTF-8
  if (v.is_string() && v.get_ref<const std::string&>().size() > max_quoted_chars) {
    std::string text = nlohmann::json(v.get_ref<const std::string&>().substr(0, max_quoted_chars))
                           .dump(-1, ' ', false, replace);
    text.insert(text.size() - 1, "...");
    return text;
  }
  return v.dump(-1, ' ', false, replace);
}

struct AlignedBytes {
  struct Delete {
    void operator()(std::byte* p) const noexcept {
      ::operator delete[](static_cast<void*>(p), std::align_val_t{core::tensor_alignment});
    }
  };
  std::unique_ptr<std::byte[], Delete> ptr;
  std::size_t size = 0;

  explicit AlignedBytes(std::size_t n = 0) : size(n) {
    // Never a null pointer, so views of empty tensors still have a valid base.
    ptr.reset(static_cast<std::byte*>(
        ::operator new[](std::max<std::size_t>(n, 1), std::align_val_t{core::tensor_alignment})));
  }
};

}  // namespace safetensors_detail

/// A safetensors file held in memory, with its header validated.
///
/// Errors: every malformed-file problem throws switchyard::error with a message
/// "SafeTensors::<fn>: '<source>': <problem>" where <source> is the path (or the
/// name given to from_bytes) and <problem> names the tensor when there is one.
/// Asking for the wrong C++ type or rank throws switchyard::shape_error.
///
/// Type mapping: float F32, double F64, int64_t I64, int32_t I32, int16_t I16,
/// int8_t I8, uint64_t U64, uint32_t U32, uint16_t U16, uint8_t U8, bool BOOL.
/// BF16 and F16 are read only through tensor<float>() / scalar<float>().
class SafeTensors {
 public:
  /// Deepest nesting of arrays and objects accepted in a header. A valid header needs 3
  /// levels (root object, tensor entry, shape array); the bound stops hostile nesting early.
  static constexpr int max_header_depth = 64;

  /// Reads and validates the whole file. Throws switchyard::error naming the
  /// file and the problem (cannot open, truncated, bad header...).
  static SafeTensors open(const std::string& path) {
    std::error_code ec;
    const bool regular = std::filesystem::is_regular_file(path, ec);
    if (!regular) {
      fail("open", path, ec ? "cannot open: " + ec.message() : "cannot open: not a regular file");
    }
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    if (ec) fail("open", path, "cannot read its size: " + ec.message());
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("open", path, "cannot open for reading");

    const auto read = [&](void* dst, std::uint64_t n) {
      if (n > 0 && !in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n))) {
        fail("open", path, "read failed (file changed while reading?)");
      }
    };
    if (size < 8) fail_too_short("open", path, size);
    std::array<unsigned char, 8> len{};
    read(len.data(), 8);
    const std::uint64_t n = le_u64(len.data());
    check_header_length("open", path, size, n);
    SafeTensors st;
    st.source_ = path;
    st.loading_fn_ = "open";
    std::string header(n, '\0');
    read(header.data(), n);
    const std::uint64_t data_size = size - 8 - n;
    st.parse_header(header, data_size);
    st.data_ = safetensors_detail::AlignedBytes(data_size);
    read(st.data_.ptr.get(), data_size);
    st.check_bool_values();
    return st;
  }

  /// Same as open() on an in-memory copy of a file; `name` stands for the path in errors.
  static SafeTensors from_bytes(std::vector<std::uint8_t> bytes, std::string name = "<memory>") {
    const std::uint64_t size = bytes.size();
    if (size < 8) fail_too_short("from_bytes", name, size);
    const std::uint64_t n = le_u64(bytes.data());
    check_header_length("from_bytes", name, size, n);
    SafeTensors st;
    st.source_ = std::move(name);
    st.loading_fn_ = "from_bytes";
    const std::uint64_t data_size = size - 8 - n;
    st.parse_header(std::string_view(reinterpret_cast<const char*>(bytes.data()) + 8, n),
                    data_size);
    st.data_ = safetensors_detail::AlignedBytes(data_size);
    if (data_size) std::memcpy(st.data_.ptr.get(), bytes.data() + 8 + n, data_size);
    st.check_bool_values();
    return st;
  }

  /// The path or from_bytes name used in error messages.
  const std::string& source() const noexcept { return source_; }
  std::size_t size() const noexcept { return infos_.size(); }

  /// Tensor names in the order of their data offsets (ties: by name).
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(infos_.size());
    for (const auto& i : infos_) out.push_back(i.name);
    return out;
  }
  /// All header entries, in the order of names().
  const std::vector<TensorInfo>& infos() const noexcept { return infos_; }

  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }

  /// Header entry of `name`; throws switchyard::error naming it (and the file) when missing.
  const TensorInfo& info(std::string_view name) const {
    auto it = index_.find(name);
    if (it == index_.end()) {
      std::string known;
      for (std::size_t i = 0; i < infos_.size() && i < 20; ++i) {
        known += (i ? ", " : "") + safetensors_detail::quote_header(infos_[i].name);
      }
      if (infos_.size() > 20) known += ", ...";
      fail("info", source_,
           "no tensor named " + safetensors_detail::quote(name) + " (the file has " +
               std::to_string(infos_.size()) + ": " + known + ")");
    }
    return infos_[it->second];
  }

  /// The "__metadata__" string map (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

  /// Raw bytes of a tensor (little-endian, row-major), 64-byte aligned base + begin.
  std::span<const std::byte> bytes(std::string_view name) const {
    const TensorInfo& i = info(name);
    return {data_.ptr.get() + i.begin, static_cast<std::size_t>(i.nbytes())};
  }

  /// Zero-copy row-major view of `name`, valid while this object lives.
  /// T must map exactly to the stored dtype and R must equal the stored rank
  /// (a 0-d scalar may be viewed with R = 1 as shape [1]); otherwise shape_error.
  /// Throws switchyard::error if the data is not aligned for T (offset not a
  /// multiple of sizeof(T); never the case for files our writer produced).
  template <class T, int R>
  ConstView<T, R> view(std::string_view name) const {
    static_assert(has_dtype_v<T>, "view<T, R>: T has no safetensors dtype");
    const TensorInfo& i = info(name);
    check_dtype<T>("view", i, false);
    const bool scalar_as_1d = i.shape.empty() && R == 1;
    if (static_cast<int>(i.shape.size()) != R && !scalar_as_1d) {
      switchyard::detail::fail_shape("SafeTensors", "view", i.name,
                                     switchyard::detail::format_shape(i.shape),
                                     "rank " + std::to_string(R),
                                     "file " + safetensors_detail::quote(source_) + ", rank " +
                                         std::to_string(i.shape.size()));
    }
    if (i.begin % alignof(T) != 0) {
      fail("view", source_,
           "tensor " + safetensors_detail::quote_header(i.name) + ": data offset " +
               std::to_string(i.begin) + " is not a multiple of " + std::to_string(alignof(T)) +
               " bytes, so it cannot be viewed in place; use tensor<T>() for a copy");
    }
    Shape<R> shape{};
    if (scalar_as_1d) {
      shape[0] = 1;
    } else {
      std::copy_n(i.shape.begin(), R, shape.begin());
    }
    return ConstView<T, R>(reinterpret_cast<const T*>(data_.ptr.get() + i.begin), shape);
  }

  /// Owning copy of `name`. T must map to the stored dtype, except that
  /// BF16 and F16 convert to float when T = float. A 0-d scalar comes back
  /// with shape [1]; rank above 4 throws shape_error (Tensor holds rank 1-4).
  template <class T>
  Tensor<T> tensor(std::string_view name) const {
    static_assert(has_dtype_v<T>, "tensor<T>: T has no safetensors dtype");
    const TensorInfo& i = info(name);
    check_dtype<T>("tensor", i, std::is_same_v<T, float>);
    if (i.shape.size() > 4) {
      switchyard::detail::fail_shape("SafeTensors", "tensor", i.name,
                                     switchyard::detail::format_shape(i.shape), "rank 0 to 4",
                                     "file " + safetensors_detail::quote(source_));
    }
    const std::vector<std::int64_t> one{1};
    Tensor<T> t(i.shape.empty() ? std::span<const std::int64_t>(one)
                                : std::span<const std::int64_t>(i.shape));
    copy_elements(i, t.data());
    return t;
  }

  /// The single element of a 0-d or one-element tensor (same dtype rules as tensor<T>).
  template <class T>
  T scalar(std::string_view name) const {
    static_assert(has_dtype_v<T>, "scalar<T>: T has no safetensors dtype");
    const TensorInfo& i = info(name);
    check_dtype<T>("scalar", i, std::is_same_v<T, float>);
    if (i.numel() != 1) {
      switchyard::detail::fail_shape(
          "SafeTensors", "scalar", i.name, switchyard::detail::format_shape(i.shape),
          "one element ([] or [1])", "file " + safetensors_detail::quote(source_));
    }
    T out{};
    copy_elements(i, &out);
    return out;
  }

 private:
  SafeTensors() = default;

  [[noreturn]] static void fail(std::string_view fn, std::string_view source,
                                const std::string& what) {
    throw switchyard::error("SafeTensors::" + std::string(fn) + ": " +
                            safetensors_detail::quote(source) + ": " + what);
  }

  static std::uint64_t le_u64(const unsigned char* p) noexcept {
    std::uint64_t v = 0;
    for (int k = 7; k >= 0; --k) v = (v << 8) | p[k];
    return v;
  }

  [[noreturn]] static void fail_too_short(std::string_view fn, std::string_view source,
                                          std::uint64_t size) {
    fail(fn, source,
         "file is " + std::to_string(size) +
             " bytes, too short for the 8-byte header length (truncated?)");
  }

  /// 8 + N <= size, written so a huge N cannot overflow.
  static void check_header_length(std::string_view fn, std::string_view source, std::uint64_t size,
                                  std::uint64_t n) {
    if (n > size - 8) {
      fail(fn, source,
           "header length " + std::to_string(n) + " runs past the end of the file (" +
               std::to_string(size) + " bytes, so at most " + std::to_string(size - 8) +
               " header bytes; truncated?)");
    }
  }

  static std::string json_type(const nlohmann::json& j) { return j.type_name(); }

  void parse_header(std::string_view text, std::uint64_t data_size) {
    using json = nlohmann::json;
    // nlohmann keeps the last of duplicate keys silently; a checkpoint with two
    // entries of one name is ambiguous, so track keys per object and reject.
    std::vector<std::set<std::string>> open_objects;
    std::string duplicate;
    const json::parser_callback_t on_event = [&](int depth, json::parse_event_t ev, json& parsed) {
      const bool opens =
          ev == json::parse_event_t::object_start || ev == json::parse_event_t::array_start;
      // depth counts the containers around this one; stop here, before the parser builds
      // (and anything later walks) a value deeper than the bound.
      if (opens && depth >= max_header_depth) {
        fail(loading_fn_, source_,
             "header nests arrays/objects more than " + std::to_string(max_header_depth) +
                 " levels deep");
      }
      if (ev == json::parse_event_t::object_start) {
        open_objects.emplace_back();
      } else if (ev == json::parse_event_t::object_end) {
        if (!open_objects.empty()) open_objects.pop_back();
      } else if (ev == json::parse_event_t::key && !open_objects.empty() && parsed.is_string()) {
        if (!open_objects.back().insert(parsed.get<std::string>()).second && duplicate.empty()) {
          duplicate = (depth == 1 ? "tensor name " : "key ") +
                      safetensors_detail::quote_header(parsed.get<std::string>());
        }
      }
      return true;
    };
    json header;
    try {
      header = json::parse(text.begin(), text.end(), on_event);
    } catch (const json::exception& e) {
      // Without nlohmann's "[json.exception.parse_error.101] " prefix, and cut: it quotes
      // the last token read, which can be as long as the header.
      std::string_view what = e.what();
      if (what.rfind("[json.exception.", 0) == 0 && what.find("] ") != std::string_view::npos)
        what.remove_prefix(what.find("] ") + 2);
      std::string text(what.substr(0, 200));
      if (what.size() > 200) text += "...";
      fail(loading_fn_, source_, "header is not valid JSON: " + text);
    }
    if (!duplicate.empty()) fail(loading_fn_, source_, "header has a duplicate " + duplicate);
    if (!header.is_object()) {
      fail(loading_fn_, source_, "header must be a JSON object, got " + json_type(header));
    }

    for (const auto& [key, entry] : header.items()) {
      if (key == "__metadata__") {
        parse_metadata(entry);
        continue;
      }
      infos_.push_back(parse_entry(key, entry, data_size));
    }

    std::sort(infos_.begin(), infos_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
    });
    // Sorted by begin, ranges are disjoint iff each starts at or after the
    // furthest end so far; empty tensors occupy no bytes and never overlap.
    const TensorInfo* furthest = nullptr;
    for (const auto& i : infos_) {
      if (i.begin == i.end) continue;
      if (furthest && i.begin < furthest->end) {
        fail(loading_fn_, source_,
             "tensors " + safetensors_detail::quote_header(furthest->name) + " [" +
                 std::to_string(furthest->begin) + ", " + std::to_string(furthest->end) + ") and " +
                 safetensors_detail::quote_header(i.name) + " [" + std::to_string(i.begin) + ", " +
                 std::to_string(i.end) + ") have overlapping data_offsets");
      }
      if (!furthest || i.end > furthest->end) furthest = &i;
    }
    for (std::size_t k = 0; k < infos_.size(); ++k) index_.emplace(infos_[k].name, k);
  }

  void parse_metadata(const nlohmann::json& entry) {
    if (!entry.is_object()) {
      fail(loading_fn_, source_,
           "__metadata__ must be a JSON object of strings, got " + json_type(entry));
    }
    for (const auto& [k, v] : entry.items()) {
      if (!v.is_string()) {
        fail(loading_fn_, source_,
             "__metadata__ value of " + safetensors_detail::quote_header(k) +
                 " must be a string, got " + json_type(v));
      }
      metadata_.emplace(k, v.get<std::string>());
    }
  }

  TensorInfo parse_entry(const std::string& name, const nlohmann::json& entry,
                         std::uint64_t data_size) const {
    const auto bad = [&](const std::string& what) {
      fail(loading_fn_, source_, "tensor " + safetensors_detail::quote_header(name) + ": " + what);
    };
    if (!entry.is_object()) bad("entry must be a JSON object, got " + json_type(entry));
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(field)) bad(std::string("missing \"") + field + "\"");
    }
    TensorInfo info;
    info.name = name;

    const auto& dt = entry.at("dtype");
    if (!dt.is_string()) bad("\"dtype\" must be a string, got " + json_type(dt));
    const auto parsed = parse_dtype(dt.get_ref<const std::string&>());
    if (!parsed) {
      bad("unknown or unsupported dtype " + safetensors_detail::describe(dt) +
          " (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL)");
    }
    info.dtype = *parsed;

    const auto& shape = entry.at("shape");
    if (!shape.is_array()) bad("\"shape\" must be an array, got " + json_type(shape));
    for (const auto& e : shape) {
      if (!e.is_number_integer()) {
        bad("\"shape\" has a non-integer extent " + safetensors_detail::describe(e));
      }
      if (e.is_number_unsigned()
              ? e.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<std::int64_t>::max())
              : e.get<std::int64_t>() < 0) {
        bad("\"shape\" has a negative or too large extent " + safetensors_detail::describe(e));
      }
      info.shape.push_back(e.get<std::int64_t>());
    }
    // Every partial product, not only the full one: [0, 2^62, 2^62] holds 0 elements but
    // its row-major strides would overflow in view().
    const std::int64_t nbytes = shape_nbytes(info.shape, info.dtype);
    if (nbytes < 0) {
      bad("shape " + switchyard::detail::format_shape(info.shape) + " of " +
          std::string(dtype_name(info.dtype)) +
          " is too large: a product of its extents (or its byte count) would overflow or "
          "exceed " +
          std::to_string(core::max_buffer_bytes) + " bytes");
    }

    const auto& off = entry.at("data_offsets");
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned()) {
      std::string got = safetensors_detail::describe(off);
      if (off.is_array() && off.size() == 2) {
        got = "[" + safetensors_detail::describe(off[0]) + ", " +
              safetensors_detail::describe(off[1]) + "]";
      }
      bad("\"data_offsets\" must be [begin, end] with non-negative integers, got " + got);
    }
    info.begin = off[0].get<std::uint64_t>();
    info.end = off[1].get<std::uint64_t>();
    const std::string range =
        "[" + std::to_string(info.begin) + ", " + std::to_string(info.end) + "]";
    if (info.begin > info.end) bad("data_offsets " + range + " have begin > end");
    if (info.end > data_size) {
      bad("data_offsets " + range + " run past the end of the data section (" +
          std::to_string(data_size) + " bytes; truncated?)");
    }
    if (info.end - info.begin != static_cast<std::uint64_t>(nbytes)) {
      bad("shape " + switchyard::detail::format_shape(info.shape) + " of " +
          std::string(dtype_name(info.dtype)) + " needs " + std::to_string(nbytes) +
          " bytes but data_offsets " + range + " span " + std::to_string(info.end - info.begin));
    }
    return info;
  }

  /// A bool holding anything but 0 or 1 is undefined behaviour to read, so
  /// BOOL data is checked once, at open.
  void check_bool_values() const {
    for (const auto& i : infos_) {
      if (i.dtype != DType::BOOL) continue;
      for (std::uint64_t b = i.begin; b < i.end; ++b) {
        const auto v = std::to_integer<unsigned>(data_.ptr[b]);
        if (v > 1) {
          fail(loading_fn_, source_,
               "tensor " + safetensors_detail::quote_header(i.name) + ": BOOL element " +
                   std::to_string(b - i.begin) + " has byte value " + std::to_string(v) +
                   " (must be 0 or 1)");
        }
      }
    }
  }

  template <class T>
  void check_dtype(std::string_view fn, const TensorInfo& i, bool allow_half_to_float) const {
    const bool half = i.dtype == DType::BF16 || i.dtype == DType::F16;
    if (i.dtype == dtype_of<T>() || (allow_half_to_float && half)) return;
    std::string want = std::string(dtype_name(dtype_of<T>()));
    if (std::is_same_v<T, float> && allow_half_to_float) want += " (or BF16/F16, converted)";
    std::string hint;
    if (half) hint = "; read BF16/F16 with tensor<float>() or scalar<float>()";
    throw shape_error(
        "SafeTensors::" + std::string(fn) + ": tensor " + safetensors_detail::quote_header(i.name) +
        " in " + safetensors_detail::quote(source_) + " has dtype " +
        std::string(dtype_name(i.dtype)) + "; the requested C++ type reads " + want + hint);
  }

  /// Copies (or converts, BF16/F16 -> float) the elements of `i` into `dst`.
  template <class T>
  void copy_elements(const TensorInfo& i, T* dst) const {
    const std::byte* src = data_.ptr.get() + i.begin;
    const auto n = static_cast<std::size_t>(i.numel());
    if constexpr (std::is_same_v<T, float>) {
      if (i.dtype == DType::BF16 || i.dtype == DType::F16) {
        for (std::size_t k = 0; k < n; ++k) {
          std::uint16_t bits;
          std::memcpy(&bits, src + 2 * k, 2);
          dst[k] = i.dtype == DType::BF16 ? bf16_to_float(bits) : half_to_float(bits);
        }
        return;
      }
    }
    if (n) std::memcpy(static_cast<void*>(dst), src, n * sizeof(T));
  }

  std::string source_;
  std::string_view loading_fn_ = "open";  // names open() or from_bytes() in errors
  std::vector<TensorInfo> infos_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
  safetensors_detail::AlignedBytes data_;
};

}  // namespace io
}  // namespace v0
}  // namespace switchyard
