#pragma once
// Intel AMX (Advanced Matrix Extensions) support: whether this build can use the tiles, the
// one-time request for the tile state that Linux requires before the first tile instruction,
// and the tile configuration of the bf16 GEMM (eight 16-row x 64-byte tiles).
//
// Compile-time: the tile intrinsics exist only where the consumer targets AMX
// (__AMX_TILE__ and __AMX_BF16__, e.g. -march=native on Sapphire/Emerald Rapids).
// Run time: Linux (5.16+) grants the 8 KiB tile state per process on request
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); without it the first tile
// instruction faults. amx_usable() asks once and reports the answer, so callers fall back
// cleanly when the kernel or a VM refuses.
#include <cstdint>

#include "switchyard/core/simd/arch.hpp"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define SWITCHYARD_HAS_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define SWITCHYARD_HAS_AMX 0
#endif

namespace switchyard {
inline namespace v0 {
namespace simd {
// The arch namespace (simd/arch.hpp): TUs built for other instruction sets get other symbols.
inline namespace SWITCHYARD_ARCH_NS {

/// Whether AMX tiles can be used now: compiled in, and Linux granted this process the tile
/// state (requested on the first call; thread-safe; later calls return the cached answer).
inline bool amx_usable() noexcept {
#if SWITCHYARD_HAS_AMX
  static const bool granted = [] {
    constexpr long arch_req_xcomp_perm = 0x1023;  // asm/prctl.h
    constexpr long xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

#if SWITCHYARD_HAS_AMX
/// LDTILECFG's 64-byte operand (palette 1).
struct alignas(64) AmxTileConfig {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t bytes_per_row[16] = {};
  std::uint8_t rows[16] = {};
};

/// Configures tiles 0-7 as 16 rows x 64 bytes (16 floats, or 32 bf16) on the calling thread,
/// and releases them when destroyed (the tile state is per thread).
class AmxTileScope {
 public:
  AmxTileScope() noexcept {
    AmxTileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.bytes_per_row[t] = 64;
      cfg.rows[t] = 16;
    }
    // gcc 12 does not see LDTILECFG read its operand and drops the stores above as dead
    // (the tiles then fault): the empty asm takes the address and clobbers memory.
    asm volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
  }
  ~AmxTileScope() { _tile_release(); }
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;
};
#endif

}  // namespace SWITCHYARD_ARCH_NS
}  // namespace simd
}  // namespace v0
}  // namespace switchyard
