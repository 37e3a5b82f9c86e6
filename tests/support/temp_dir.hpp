#pragma once
// A scratch folder for tests that write files: unique per process and guard, removed with
// everything in it when the guard goes out of scope, also when a REQUIRE fails.
#include <unistd.h>  // getpid

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <span>
#include <stdexcept>
#include <string>
#include <system_error>

struct TempDir {
  std::filesystem::path path;

  /// temp_directory_path()/switchyard_<tag>_<pid>_<n>, created empty.
  explicit TempDir(const std::string& tag) {
    static int counter = 0;
    path =
        std::filesystem::temp_directory_path() /
        ("switchyard_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(++counter));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;  // never throw from a destructor; a leftover folder is harmless
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  /// Writes `bytes` to path / name (replacing it) and returns the full path; throws
  /// std::runtime_error if that fails.
  std::filesystem::path write(const std::string& name, std::span<const std::uint8_t> bytes) const {
    const auto p = path / name;
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) throw std::runtime_error("TempDir::write: cannot write " + p.string());
    return p;
  }
  std::filesystem::path write(const std::string& name, const std::string& text) const {
    return write(name, std::span<const std::uint8_t>(
                           reinterpret_cast<const std::uint8_t*>(text.data()), text.size()));
  }
};
