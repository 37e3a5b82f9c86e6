#pragma once
// Golden fixtures (tests/fixtures/*.safetensors, copied from the shared folder by
// scripts/sync_fixtures.sh) for the tests: where they are and how to open one.
// SWITCHYARD_FIXTURE_DIR comes from tests/CMakeLists.txt. A missing fixture fails the
// test with an error naming the full path it looked at; nothing is skipped.
#include <string>
#include <string_view>

#include "switchyard/io/safetensors.hpp"

#ifndef SWITCHYARD_FIXTURE_DIR
#error "SWITCHYARD_FIXTURE_DIR must be defined (tests/CMakeLists.txt does it)"
#endif

/// Absolute path of a fixture file, e.g. fixture_path("gshard_top2_tiny.safetensors").
inline std::string fixture_path(std::string_view file) {
  return std::string(SWITCHYARD_FIXTURE_DIR) + "/" + std::string(file);
}

/// Opens and validates a fixture; throws switchyard::error naming the file if it is
/// missing or malformed. Read into memory by default, so views are 64-byte aligned as the
/// tests were written against (a mapped file aligns a view only as its file offset is).
inline switchyard::io::SafeTensors open_fixture(
    std::string_view file, switchyard::io::LoadMode mode = switchyard::io::LoadMode::read) {
  return switchyard::io::SafeTensors::open(fixture_path(file), mode);
}
