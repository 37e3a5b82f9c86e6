#pragma once
// Writes a sharded checkpoint in Hugging Face's layout: shard files
// model-0000i-of-0000n.safetensors, model.safetensors.index.json ({"metadata": {"total_size"},
// "weight_map": {name: shard file}}) and optionally config.json, so io::Checkpoint and
// transformers' from_pretrained read it back. For tests, examples and converted weights.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/io/safetensors_reader.hpp"
#include "switchyard/io/safetensors_writer.hpp"

namespace switchyard {
inline namespace v0 {
namespace io {

/// Hugging Face's shard file name: shard_file_name(0, 2) = "model-00001-of-00002.safetensors".
inline std::string shard_file_name(std::size_t index, std::size_t count) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return buf;
}

/// Saves shards[i] as shard_file_name(i, shards.size()) in `dir` (created if needed), then
/// the index mapping every tensor to its shard, and config.json when `config` is not null.
/// Returns the index path. Throws switchyard::error when a file cannot be written or a
/// tensor name appears in two shards (naming the tensor and both files).
inline std::filesystem::path save_sharded_checkpoint(const std::filesystem::path& dir,
                                                     const std::vector<SafeTensorsWriter>& shards,
                                                     const nlohmann::json& config = nullptr) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    throw switchyard::error("save_sharded_checkpoint: cannot create '" + dir.string() +
                            "': " + ec.message());
  nlohmann::json weight_map = nlohmann::json::object();
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < shards.size(); ++i) {
    const std::string file = shard_file_name(i, shards.size());
    shards[i].save(dir / file);
    // Read back what was written: the index lists exactly the shard's validated header.
    const SafeTensors st = SafeTensors::open((dir / file).string(), LoadMode::read);
    for (const TensorInfo& info : st.infos()) {
      if (weight_map.contains(info.name))
        throw switchyard::error("save_sharded_checkpoint: tensor '" + info.name + "' is in both " +
                                weight_map[info.name].get<std::string>() + " and " + file);
      weight_map[info.name] = file;
      total += static_cast<std::uint64_t>(info.nbytes());
    }
  }
  const auto write = [&](const std::filesystem::path& p, const nlohmann::json& j) {
    std::ofstream out(p, std::ios::trunc);
    out << j.dump(2) << '\n';
    out.close();
    if (!out) throw switchyard::error("save_sharded_checkpoint: cannot write '" + p.string() + "'");
  };
  const std::filesystem::path index = dir / "model.safetensors.index.json";
  write(index, {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}});
  if (!config.is_null()) write(dir / "config.json", config);
  return index;
}

}  // namespace io
}  // namespace v0
}  // namespace switchyard
