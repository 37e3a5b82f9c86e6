// libFuzzer target: SafeTensors from arbitrary bytes (scripts/fuzz.sh runs it).
//
// Every input must either load or throw switchyard::error; any other exception escapes
// and aborts (a finding), as do sanitizer reports. A file that loads is read through
// every accessor with the dtype and rank its header declares (BF16 / F16 both as
// switchyard::bf16 / f16 views and converted to float), so a header that slipped past
// validation would touch memory out of range. The same bytes also go through open()
// (via a memfd) in both load modes, memory-mapped and read, which must agree with
// from_bytes().
#include <sys/mman.h>  // memfd_create
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/io/safetensors.hpp"

namespace {

using switchyard::io::DType;
using switchyard::io::LoadMode;
using switchyard::io::SafeTensors;
using switchyard::io::TensorInfo;

[[noreturn]] void finding(const char* what, const char* detail = "") {
  std::fprintf(stderr, "fuzz_safetensors: %s\n%.3000s\n", what, detail);
  std::abort();
}

/// A view at the stored rank (a 0-d scalar as [1]) must cover exactly the tensor's bytes.
template <class T, int R>
void view_at_rank(const SafeTensors& f, const TensorInfo& i) {
  try {
    const auto v = f.view<T, R>(i.name);
    if (v.numel() != i.numel()) finding("view numel differs from the header");
    if (reinterpret_cast<const std::byte*>(v.data()) != f.bytes(i.name).data())
      finding("view and bytes() start at different addresses");
  } catch (const switchyard::error&) {
    // A misaligned address (data offset, or 8 + N + offset when mapped): documented, and
    // tensor<T>() still copies the data.
  }
}

template <class T>
void read_as(const SafeTensors& f, const TensorInfo& i) {
  switch (std::max<std::size_t>(i.shape.size(), 1)) {
    case 1:
      view_at_rank<T, 1>(f, i);
      break;
    case 2:
      view_at_rank<T, 2>(f, i);
      break;
    case 3:
      view_at_rank<T, 3>(f, i);
      break;
    case 4:
      view_at_rank<T, 4>(f, i);
      break;
    default:
      return;  // rank 5+: bytes() only, Tensor holds rank 1 to 4
  }
  const auto t = f.tensor<T>(i.name);
  if (t.numel() != i.numel()) finding("tensor numel differs from the header");
  if (i.numel() == 1) (void)f.scalar<T>(i.name);
}

void touch_all(const SafeTensors& f) {
  for (const auto& i : f.infos()) {
    if (f.bytes(i.name).size() != i.nbytes()) finding("bytes() size differs from the header");
    switch (i.dtype) {
      case DType::F64:
        read_as<double>(f, i);
        break;
      case DType::F32:
        read_as<float>(f, i);
        break;
      case DType::F16:
        read_as<switchyard::f16>(f, i);
        if (i.shape.size() <= 4) (void)f.tensor<float>(i.name);
        break;
      case DType::BF16:
        read_as<switchyard::bf16>(f, i);
        if (i.shape.size() <= 4) (void)f.tensor<float>(i.name);
        break;
      case DType::I64:
        read_as<std::int64_t>(f, i);
        break;
      case DType::I32:
        read_as<std::int32_t>(f, i);
        break;
      case DType::I16:
        read_as<std::int16_t>(f, i);
        break;
      case DType::I8:
        read_as<std::int8_t>(f, i);
        break;
      case DType::U64:
        read_as<std::uint64_t>(f, i);
        break;
      case DType::U32:
        read_as<std::uint32_t>(f, i);
        break;
      case DType::U16:
        read_as<std::uint16_t>(f, i);
        break;
      case DType::U8:
        read_as<std::uint8_t>(f, i);
        break;
      case DType::BOOL:
        read_as<bool>(f, i);
        break;
    }
  }
  (void)f.metadata();
}

/// Names of the tensors, or nullopt when loading threw switchyard::error (whose message
/// must be short whatever the input).
template <class Load>
std::optional<std::vector<std::string>> try_load(Load&& load) {
  try {
    const SafeTensors f = load();
    touch_all(f);
    if (!f.intact()) finding("a file nobody changed is not intact()");
    return f.names();
  } catch (const switchyard::error& e) {
    if (std::strlen(e.what()) > 2000) finding("error message over 2000 characters", e.what());
    return std::nullopt;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto from_bytes = try_load([&] {
    return SafeTensors::from_bytes(std::vector<std::uint8_t>(data, data + size), "fuzz");
  });

  // open() reads the same bytes from a file; it has its own reading code.
  const int fd = memfd_create("fuzz.safetensors", 0);
  if (fd < 0) return 0;
  std::size_t written = 0;
  while (written < size) {
    const ssize_t n = write(fd, data + written, size - written);
    if (n <= 0) break;
    written += static_cast<std::size_t>(n);
  }
  if (written == size) {
    const std::string path = "/proc/self/fd/" + std::to_string(fd);
    for (const LoadMode mode : {LoadMode::map, LoadMode::read}) {
      const auto opened = try_load([&] { return SafeTensors::open(path, mode); });
      if (opened != from_bytes) {
        finding(mode == LoadMode::map ? "open(map) and from_bytes() disagree"
                                      : "open(read) and from_bytes() disagree");
      }
    }
  }
  close(fd);
  return 0;
}
