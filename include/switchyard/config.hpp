#pragma once
#include <cassert>

#include "switchyard/version.hpp"

// Debug-only checks inside kernels: public calls validate and throw, kernels
// assume checked input and stay branch-free in release builds.
#ifndef SWITCHYARD_ASSERT
#define SWITCHYARD_ASSERT(cond) assert(cond)
#endif

#if defined(_OPENMP)
#define SWITCHYARD_HAS_OPENMP 1
#else
#define SWITCHYARD_HAS_OPENMP 0
#endif
