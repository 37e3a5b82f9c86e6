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
// truncated, so a hostile file gives one short switchyard::error, never a crash.
//
// Loading (LoadMode):
// - map (the default where POSIX mmap exists): the header is read with read calls and
//   validated, then the whole file is mapped read-only (PROT_READ, MAP_PRIVATE). Opening a
//   20 GB file costs a few system calls and no memory; pages load when a tensor is first
//   touched, and views point into the mapping. A view is aligned as its bytes are in the
//   file: 8 + N + data offset (our writer and Hugging Face pad N to a multiple of 8, so
//   every tensor of such files is aligned to its element size), and view() checks it.
// - read: the data section is copied into one 64-byte aligned buffer owned by the object,
//   so views are 64-byte aligned whatever N is, and later changes to the file do not
//   matter. Used for every open() where mmap does not exist (non-POSIX).
// Views stay valid while the SafeTensors object, or any copy of it, lives: copies share
// the mapping or buffer, which is released (unmapped) once, with the last of them.
//
// What is guaranteed when the file changes after open() (map mode only): every tensor's
// byte range was checked against the file's size at open, so no access through this
// class reaches outside the mapping. But a mapping follows the file: if another process
// truncates it later, touching a page past the new end raises SIGBUS, as for every mmap
// reader (numpy, safetensors' own safe_open, llama.cpp), and bytes rewritten in place
// show through. intact() / check_intact() compare the file's size now (fstat of the
// descriptor kept open) with its size at open, so a reader can check before touching;
// for files that may change underneath, open them with LoadMode::read.
#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
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

// 1 where files can be memory-mapped (POSIX); define it to 0 to force read mode.
#ifndef SWITCHYARD_IO_HAS_MMAP
#if __has_include(<sys/mman.h>) && __has_include(<sys/stat.h>) && __has_include(<fcntl.h>) && \
    __has_include(<unistd.h>)
#define SWITCHYARD_IO_HAS_MMAP 1
#else
#define SWITCHYARD_IO_HAS_MMAP 0
#endif
#endif
#if SWITCHYARD_IO_HAS_MMAP
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace switchyard {
inline namespace v0 {
namespace io {

static_assert(std::endian::native == std::endian::little,
              "switchyard::io reads little-endian safetensors data in place");

/// How SafeTensors::open gets at the data section (see the notes at the top of this file).
enum class LoadMode {
  map,   ///< memory-map the file read-only: no memory used until tensors are touched
  read,  ///< copy the data section into a 64-byte aligned buffer: immune to later file changes
};

/// True where LoadMode::map exists (POSIX mmap); elsewhere open() reads whatever mode is asked.
inline constexpr bool can_map_files = SWITCHYARD_IO_HAS_MMAP != 0;

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

/// The open file: a POSIX descriptor read with pread, or elsewhere an ifstream. Methods
/// return an empty string on success, else why they failed (the caller names the file).
class InputFile {
 public:
  InputFile() = default;
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;
#if SWITCHYARD_IO_HAS_MMAP
  ~InputFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  std::string open(const std::filesystem::path& path) {
    do {
      fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    } while (fd_ < 0 && errno == EINTR);
    return fd_ < 0 ? errno_text() : std::string();
  }
  /// The size of the opened file itself (fstat), not of whatever the path names later.
  std::string size(std::uint64_t& out) const {
    struct ::stat st {};
    if (::fstat(fd_, &st) != 0) return errno_text();
    if (!S_ISREG(st.st_mode)) return "not a regular file";
    out = static_cast<std::uint64_t>(st.st_size);
    return {};
  }
  /// Exactly n bytes at `offset`, or false (the file shrank, or an I/O error).
  bool read_at(std::uint64_t offset, void* dst, std::uint64_t n) const {
    auto* p = static_cast<char*>(dst);
    while (n > 0) {
      // Bounded chunks: Linux reads at most ~2 GiB per call anyway.
      const std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(n, 1u << 30));
      const ssize_t got = ::pread(fd_, p, chunk, static_cast<off_t>(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) return false;
      p += got;
      offset += static_cast<std::uint64_t>(got);
      n -= static_cast<std::uint64_t>(got);
    }
    return true;
  }
  int fd() const noexcept { return fd_; }
  /// Hands the descriptor over (to a Mapping); this object no longer closes it.
  int release() noexcept { return std::exchange(fd_, -1); }

 private:
  static std::string errno_text() {
    return std::error_code(errno, std::generic_category()).message();
  }
  int fd_ = -1;
#else
  std::string open(const std::filesystem::path& path) {
    path_ = path;
    in_.open(path, std::ios::binary);
    return in_ ? std::string() : std::string("cannot open for reading");
  }
  std::string size(std::uint64_t& out) const {
    std::error_code ec;
    const std::uintmax_t n = std::filesystem::file_size(path_, ec);
    if (ec) return ec.message();
    out = n;
    return {};
  }
  bool read_at(std::uint64_t offset, void* dst, std::uint64_t n) {
    if (n == 0) return true;
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(offset));
    return static_cast<bool>(in_.read(static_cast<char*>(dst), static_cast<std::streamsize>(n)));
  }

 private:
  std::filesystem::path path_;
  std::ifstream in_;
#endif
};

#if SWITCHYARD_IO_HAS_MMAP
/// A read-only private mapping of a whole file and the descriptor it came from, kept open
/// so intact() can fstat the very file that is mapped (the path may name another by now).
struct Mapping {
  void* base = nullptr;
  std::size_t length = 0;  // the file's size at open
  int fd = -1;

  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (base) ::munmap(base, length);
    if (fd >= 0) ::close(fd);
  }
};
#endif

/// What parse_json_strict found wrong, if anything.
struct JsonProblem {
  enum class Kind { none, too_deep, syntax, duplicate } kind = Kind::none;
  std::string detail;  ///< syntax: the parser's message (cut); duplicate: the quoted key
  int depth = 0;       ///< duplicate: containers around the key (1 = a top-level key)
};

/// Parses JSON text with the defences a checkpoint needs: nesting deeper than max_depth is
/// refused while parsing (before the parser builds, and anything later walks, a value deeper
/// than the bound), and a key repeated in one object (nlohmann keeps the last silently) is
/// reported, as is a syntax error; the caller turns `problem` into its error.
inline nlohmann::json parse_json_strict(std::string_view text, int max_depth,
                                        JsonProblem& problem) {
  using json = nlohmann::json;
  struct TooDeep {};
  std::vector<std::set<std::string>> open_objects;
  const json::parser_callback_t on_event = [&](int depth, json::parse_event_t ev, json& parsed) {
    const bool opens =
        ev == json::parse_event_t::object_start || ev == json::parse_event_t::array_start;
    if (opens && depth >= max_depth) throw TooDeep{};  // depth counts the enclosing containers
    if (ev == json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (ev == json::parse_event_t::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (ev == json::parse_event_t::key && !open_objects.empty() && parsed.is_string()) {
      if (!open_objects.back().insert(parsed.get<std::string>()).second &&
          problem.kind == JsonProblem::Kind::none) {
        problem = {JsonProblem::Kind::duplicate, quote_header(parsed.get<std::string>()), depth};
      }
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), on_event);
  } catch (const TooDeep&) {
    problem = {JsonProblem::Kind::too_deep, {}, 0};
  } catch (const json::exception& e) {
    // Without nlohmann's "[json.exception.parse_error.101] " prefix, and cut: it quotes the
    // last token read, which can be as long as the text.
    std::string_view what = e.what();
    if (what.rfind("[json.exception.", 0) == 0 && what.find("] ") != std::string_view::npos)
      what.remove_prefix(what.find("] ") + 2);
    std::string msg(what.substr(0, 200));
    if (what.size() > 200) msg += "...";
    problem = {JsonProblem::Kind::syntax, msg, 0};
  }
  return {};
}

}  // namespace safetensors_detail

/// A safetensors file, memory-mapped (or read, or given as bytes), with its header validated.
///
/// Errors: every malformed-file problem throws switchyard::error with a message
/// "SafeTensors::<fn>: '<source>': <problem>" where <source> is the path (or the
/// name given to from_bytes) and <problem> names the tensor when there is one.
/// Asking for the wrong C++ type or rank throws switchyard::shape_error.
///
/// Type mapping: float F32, double F64, switchyard::bf16 BF16, switchyard::f16 F16,
/// int64_t I64, int32_t I32, int16_t I16, int8_t I8, uint64_t U64, uint32_t U32,
/// uint16_t U16, uint8_t U8, bool BOOL. tensor<float>() / scalar<float>() also convert
/// BF16 and F16 (exactly).
///
/// Copies are cheap and share the data (mapping or buffer); const member functions may be
/// called from several threads at once.
class SafeTensors {
 public:
  /// Deepest nesting of arrays and objects accepted in a header. A valid header needs 3
  /// levels (root object, tensor entry, shape array); the bound stops hostile nesting early.
  static constexpr int max_header_depth = 64;

  /// Opens `path` and validates its header; with LoadMode::map (the default) the file is
  /// then memory-mapped, with LoadMode::read its data section is copied into memory (also
  /// what map does where mmap does not exist). BOOL tensors are read once to check their
  /// bytes. Throws switchyard::error naming the file and the problem (missing, not a
  /// regular file, cannot be read or mapped, truncated, bad header...).
  static SafeTensors open(const std::filesystem::path& path, LoadMode mode = LoadMode::map) {
    const std::string source = path.string();
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (status.type() == std::filesystem::file_type::not_found) {
      fail("open", source, "cannot open: no such file or directory");
    }
    if (ec) fail("open", source, "cannot open: " + ec.message());
    if (!std::filesystem::is_regular_file(status)) {
      fail("open", source, "cannot open: not a regular file");
    }
    safetensors_detail::InputFile in;
    if (std::string why = in.open(path); !why.empty()) {
      fail("open", source, "cannot open for reading: " + why);
    }
    std::uint64_t size = 0;
    if (std::string why = in.size(size); !why.empty()) {
      fail("open", source, "cannot read its size: " + why);
    }
    const auto read = [&](void* dst, std::uint64_t offset, std::uint64_t n) {
      if (!in.read_at(offset, dst, n)) {
        fail("open", source, "read failed (file changed while reading?)");
      }
    };
    if (size < 8) fail_too_short("open", source, size);
    std::array<unsigned char, 8> len{};
    read(len.data(), 0, 8);
    const std::uint64_t n = le_u64(len.data());
    check_header_length("open", source, size, n);
    SafeTensors st;
    st.source_ = source;
    st.loading_fn_ = "open";
    // The header is read, not mapped, so it is validated before the mapping exists.
    std::string header(n, '\0');
    read(header.data(), 8, n);
    const std::uint64_t data_size = size - 8 - n;
    st.parse_header(header, data_size);
    st.data_start_ = 8 + n;
    st.data_size_ = data_size;
#if SWITCHYARD_IO_HAS_MMAP
    if (mode == LoadMode::map) {
      st.map_file(in, size);
      st.check_bool_values();
      return st;
    }
#else
    (void)mode;
#endif
    auto buffer = std::make_shared<safetensors_detail::AlignedBytes>(data_size);
    read(buffer->ptr.get(), 8 + n, data_size);
    st.data_ = buffer->ptr.get();
    st.buffer_ = std::move(buffer);
    st.check_bool_values();
    return st;
  }

  /// Same as open() on an in-memory copy of a file (held in a 64-byte aligned buffer, as
  /// LoadMode::read does); `name` stands for the path in errors. Throws as open().
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
    auto buffer = std::make_shared<safetensors_detail::AlignedBytes>(data_size);
    if (data_size) std::memcpy(buffer->ptr.get(), bytes.data() + 8 + n, data_size);
    st.data_start_ = 8 + n;
    st.data_size_ = data_size;
    st.data_ = buffer->ptr.get();
    st.buffer_ = std::move(buffer);
    st.check_bool_values();
    return st;
  }

  /// LoadMode::map when the data lives in a mapping of the file, LoadMode::read when it was
  /// copied into memory (read mode, from_bytes, or open() where mmap does not exist).
  LoadMode load_mode() const noexcept {
#if SWITCHYARD_IO_HAS_MMAP
    if (mapping_) return LoadMode::map;
#endif
    return LoadMode::read;
  }

  /// The whole data section (mapped or owned): every view and bytes() span lies inside it.
  std::span<const std::byte> data_section() const noexcept {
    return {data_, static_cast<std::size_t>(data_size_)};
  }

  /// False when the mapped file's size is no longer its size at open (truncated or rewritten
  /// by someone else), or it cannot be fstat'ed: touching tensors past the new end would
  /// raise SIGBUS. Always true for data held in memory (read mode, from_bytes). Does not
  /// notice bytes rewritten in place at the same size.
  bool intact() const noexcept {
#if SWITCHYARD_IO_HAS_MMAP
    if (!mapping_) return true;
    struct ::stat now {};
    return ::fstat(mapping_->fd, &now) == 0 &&
           static_cast<std::uint64_t>(now.st_size) == mapping_->length;
#else
    return true;
#endif
  }

  /// Throws switchyard::error naming the file, its size at open and its size now, unless
  /// intact(). Call it before touching tensors of a file that may have been replaced.
  void check_intact() const {
#if SWITCHYARD_IO_HAS_MMAP
    if (!mapping_) return;
    struct ::stat now {};
    if (::fstat(mapping_->fd, &now) != 0) {
      fail("check_intact", source_,
           "cannot fstat the mapped file: " +
               std::error_code(errno, std::generic_category()).message());
    }
    const auto size_now = static_cast<std::uint64_t>(now.st_size);
    if (size_now != mapping_->length) {
      fail("check_intact", source_,
           "the file was " + std::to_string(mapping_->length) + " bytes at open and is " +
               std::to_string(size_now) +
               " bytes now: it changed after open (touching mapped tensors past its new end "
               "raises SIGBUS); reopen it, or open files that may change with LoadMode::read");
    }
#endif
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

  /// Raw bytes of a tensor (little-endian, row-major), zero-copy: data_section() + begin.
  /// Throws switchyard::error when there is no tensor `name`.
  std::span<const std::byte> bytes(std::string_view name) const {
    const TensorInfo& i = info(name);
    return {data_ + i.begin, static_cast<std::size_t>(i.nbytes())};
  }

  /// Zero-copy row-major view of `name`, valid while this object (or a copy) lives.
  /// T must map exactly to the stored dtype (bf16 / f16 for BF16 / F16) and R must equal
  /// the stored rank (a 0-d scalar may be viewed with R = 1 as shape [1]); otherwise
  /// shape_error. Throws switchyard::error for an unknown name, or when the data's address
  /// is not a multiple of alignof(T): in read mode when the data offset is not, in map mode
  /// when 8 + N + offset is not. Never for files whose N is a multiple of 8 and whose
  /// tensors start at multiples of their element size, as our writer and Hugging Face's
  /// safetensors write them; tensor<T>() copies such a tensor instead.
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
    const std::byte* first = data_ + i.begin;
    // The address, not the offset: a mapped data section starts at byte 8 + N of a page.
    if (reinterpret_cast<std::uintptr_t>(first) % alignof(T) != 0) {
      fail("view", source_,
           "tensor " + safetensors_detail::quote_header(i.name) + ": its address (data offset " +
               std::to_string(i.begin) + ", byte " + std::to_string(data_start_ + i.begin) +
               " of the file) is not a multiple of " + std::to_string(alignof(T)) +
               " bytes, so it cannot be viewed in place; use tensor<T>() for a copy" +
               (load_mode() == LoadMode::map
                    ? " (the file is memory-mapped: a view is aligned as 8 + header length + "
                      "data offset is)"
                    : ""));
    }
    Shape<R> shape{};
    if (scalar_as_1d) {
      shape[0] = 1;
    } else {
      std::copy_n(i.shape.begin(), R, shape.begin());
    }
    return ConstView<T, R>(reinterpret_cast<const T*>(first), shape);
  }

  /// Owning copy of `name`. T must map to the stored dtype, except that
  /// BF16 and F16 convert to float when T = float (exactly). A 0-d scalar comes back
  /// with shape [1]; rank above 4 throws shape_error (Tensor holds rank 1-4), a wrong
  /// dtype shape_error, an unknown name switchyard::error.
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

  /// The single element of a 0-d or one-element tensor (same dtype rules as tensor<T>);
  /// shape_error when it has more or fewer elements.
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

#if SWITCHYARD_IO_HAS_MMAP
  /// Maps the whole file (size >= 8, so never a zero-length mapping, even with no data).
  void map_file(safetensors_detail::InputFile& in, std::uint64_t size) {
    if (size > std::numeric_limits<std::size_t>::max()) {
      fail("open", source_, "file of " + std::to_string(size) + " bytes is too large to map");
    }
    auto mapping = std::make_shared<safetensors_detail::Mapping>();
    void* base =
        ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, MAP_PRIVATE, in.fd(), 0);
    if (base == MAP_FAILED) {
      fail("open", source_,
           "cannot memory-map its " + std::to_string(size) +
               " bytes: " + std::error_code(errno, std::generic_category()).message() +
               " (LoadMode::read copies the data instead)");
    }
    mapping->base = base;
    mapping->length = static_cast<std::size_t>(size);
    mapping->fd = in.release();
    data_ = static_cast<const std::byte*>(base) + data_start_;
    mapping_ = std::move(mapping);
  }
#endif

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
    // A checkpoint with two entries of one name is ambiguous: duplicates are rejected.
    safetensors_detail::JsonProblem problem;
    const json header = safetensors_detail::parse_json_strict(text, max_header_depth, problem);
    switch (problem.kind) {
      case safetensors_detail::JsonProblem::Kind::too_deep:
        fail(loading_fn_, source_,
             "header nests arrays/objects more than " + std::to_string(max_header_depth) +
                 " levels deep");
      case safetensors_detail::JsonProblem::Kind::syntax:
        fail(loading_fn_, source_, "header is not valid JSON: " + problem.detail);
      case safetensors_detail::JsonProblem::Kind::duplicate:
        fail(loading_fn_, source_,
             std::string("header has a duplicate ") +
                 (problem.depth == 1 ? "tensor name " : "key ") + problem.detail);
      case safetensors_detail::JsonProblem::Kind::none:
        break;
    }
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
        const auto v = std::to_integer<unsigned>(data_[b]);
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
    if (half) {
      hint = i.dtype == DType::BF16 ? "; view BF16 in place as switchyard::bf16 (view<bf16, R>)"
                                    : "; view F16 in place as switchyard::f16 (view<f16, R>)";
      hint += ", or convert with tensor<float>() or scalar<float>()";
    }
    throw shape_error(
        "SafeTensors::" + std::string(fn) + ": tensor " + safetensors_detail::quote_header(i.name) +
        " in " + safetensors_detail::quote(source_) + " has dtype " +
        std::string(dtype_name(i.dtype)) + "; the requested C++ type reads " + want + hint);
  }

  /// Copies (or converts, BF16/F16 -> float) the elements of `i` into `dst`.
  template <class T>
  void copy_elements(const TensorInfo& i, T* dst) const {
    const std::byte* src = data_ + i.begin;
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
  // The data section: in buffer_ (read mode, from_bytes) or in mapping_ (map mode). Copies
  // share them; data_ points at its first byte.
  std::shared_ptr<const safetensors_detail::AlignedBytes> buffer_;
#if SWITCHYARD_IO_HAS_MMAP
  std::shared_ptr<const safetensors_detail::Mapping> mapping_;
#endif
  const std::byte* data_ = nullptr;
  std::uint64_t data_size_ = 0;
  std::uint64_t data_start_ = 0;  // 8 + N: where the data section starts in the file
};

}  // namespace io
}  // namespace v0
}  // namespace switchyard
