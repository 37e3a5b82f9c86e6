#pragma once
// Per-core data cache sizes of the CPU this process runs on, for cache blocking chosen at run
// time (the packed GEMM's kc and nc): the same binary runs on CPUs whose L2 differs by 2x.
#include <cstdint>

#if defined(__linux__)
#include <unistd.h>
#endif

namespace switchyard {
inline namespace v0 {
namespace simd {

/// Bytes of L1 data cache and of L2 per core.
struct CacheSizes {
  std::int64_t l1d = 32 * 1024;
  std::int64_t l2 = 1024 * 1024;
};

/// From the OS (sysconf on Linux with glibc, which reads cpuid), read once per process; where it
/// does not say, 32 KiB and 1 MiB: the smaller of the CPUs we run on (Zen 4), so blocks still fit.
inline const CacheSizes& cache_sizes() noexcept {
  static const CacheSizes sizes = [] {
    CacheSizes s;
#if defined(__linux__) && defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    const long l1d = sysconf(_SC_LEVEL1_DCACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l1d > 0) s.l1d = l1d;
    if (l2 > 0) s.l2 = l2;
#endif
    return s;
  }();
  return sizes;
}

}  // namespace simd
}  // namespace v0
}  // namespace switchyard
