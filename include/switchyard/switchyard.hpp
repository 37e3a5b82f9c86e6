#pragma once
// Umbrella header: everything switchyard offers.
#include "switchyard/config.hpp"
#include "switchyard/core/eigen_map.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/exp.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/version.hpp"
