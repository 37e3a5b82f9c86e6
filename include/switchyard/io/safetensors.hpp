#pragma once
// Safetensors checkpoints: dtypes, the validating reader and the writer.
//   auto f = switchyard::io::SafeTensors::open("model.safetensors");
//   Tensor<float> w = f.tensor<float>("w");           // owning copy (BF16/F16 converted)
//   ConstView<float, 2> v = f.view<float, 2>("w");     // zero-copy, exact dtype and rank
#include "switchyard/io/dtype.hpp"
#include "switchyard/io/safetensors_reader.hpp"
#include "switchyard/io/safetensors_writer.hpp"
