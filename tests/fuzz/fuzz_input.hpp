// The choices every structured fuzz target reads from its input (fuzz_layers, fuzz_models),
// over libFuzzer's FuzzedDataProvider. An exhausted input gives false, 0 and `lo`.
#pragma once

#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>

namespace switchyard_fuzz {

class FuzzInput {
 public:
  FuzzInput(const std::uint8_t* data, std::size_t size) : in_(data, size) {}

  bool flag() { return in_.ConsumeBool(); }
  std::uint8_t byte() { return in_.ConsumeIntegral<std::uint8_t>(); }
  std::int64_t pick(std::int64_t lo, std::int64_t hi) {
    return in_.ConsumeIntegralInRange<std::int64_t>(lo, hi);
  }

 protected:
  FuzzedDataProvider in_;
};

}  // namespace switchyard_fuzz
