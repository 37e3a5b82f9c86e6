#pragma once
// Safetensors checkpoints: dtypes, the validating reader, the writer, and sharded
// (Hugging Face) checkpoints.
//   auto f = switchyard::io::SafeTensors::open("model.safetensors");  // memory-mapped
//   Tensor<float> w = f.tensor<float>("w");           // owning copy (BF16/F16 converted)
//   ConstView<float, 2> v = f.view<float, 2>("w");     // zero-copy, exact dtype and rank
//   ConstView<bf16, 2> b = f.view<bf16, 2>("wb");      // BF16 in place, no conversion
//   auto ckpt = switchyard::io::Checkpoint::open("model_dir");  // index + shards, lazily
#include "switchyard/io/checkpoint.hpp"
#include "switchyard/io/checkpoint_writer.hpp"
#include "switchyard/io/dtype.hpp"
#include "switchyard/io/safetensors_reader.hpp"
#include "switchyard/io/safetensors_writer.hpp"
