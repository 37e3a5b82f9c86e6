#pragma once
// SWITCHYARD_DIAGNOSTIC_PUSH / SWITCHYARD_DIAGNOSTIC_POP: a region in which gcc does not report
// -Wmaybe-uninitialized and -Wuninitialized. It wraps switchyard's includes of xsimd and Eigen
// (which bring in the compiler's intrinsic headers) and the SIMD kernel headers in core/simd/,
// nothing else: a consumer's -Wall -Wextra build stays quiet without losing these warnings for
// their own code.
//
// Why: gcc 12's AVX-512 intrinsics build "undefined" vectors as `__m512 __Y = __Y;`
// (_mm512_undefined_ps/pd/si512 in avx512fintrin.h) and pass them as the unused merge operand of
// masked builtins (_mm512_max_ps, _mm512_broadcastss_ps, _mm512_slli_epi32, ...). Once inlined
// into a kernel, gcc reports "'__Y' may be used uninitialized" (or "is used uninitialized") at
// the intrinsic header: hundreds of reports per -march=native (AVX-512) build, none real, none
// a user can act on; -isystem does not stop them because the inlining chain leaves the system
// headers. x86-64-v3 (AVX2) builds do not have them.
//
// How gcc decides: for a warning in inlined code it walks the inlining chain from the
// innermost location (the intrinsic header) outwards and takes the first location where a
// `#pragma GCC diagnostic` setting for that option is in effect. So the region works when it
// encloses either the text of the intrinsic headers (they are first included by switchyard's
// xsimd / Eigen includes) or one of switchyard's call sites in the chain (core/simd/ kernels).
// A program that includes <immintrin.h>, Eigen or xsimd before switchyard moves the first
// inclusion out of the region; kernels that call core/simd/ stay covered, but warnings entirely
// inside Eigen's own GEMM templates then appear as they would for the program's own Eigen use.
//
// clang does not have these false positives and ignores the region (the macros are empty).
#if defined(__GNUC__) && !defined(__clang__)
#define SWITCHYARD_DIAGNOSTIC_PUSH                                                           \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define SWITCHYARD_DIAGNOSTIC_POP _Pragma("GCC diagnostic pop")
#else
#define SWITCHYARD_DIAGNOSTIC_PUSH
#define SWITCHYARD_DIAGNOSTIC_POP
#endif
