#pragma once
// Checkpoint: tensors looked up by name across the shards of a checkpoint as Hugging Face
// stores it (model.safetensors.index.json naming, for every tensor, the shard file that
// holds it), a single model.safetensors, or a folder of *.safetensors files.
//   auto ckpt = switchyard::io::Checkpoint::open("Mixtral-8x7B-v0.1");  // folder, index or file
//   auto w1 = ckpt.view<bf16, 2>("model.layers.0.block_sparse_moe.experts.0.w1.weight");
//   const auto hidden = ckpt.config().at("hidden_size").get<std::int64_t>();
//
// Shards are SafeTensors files, memory-mapped by default (see safetensors_reader.hpp for
// the modes and for what is guaranteed when a file changes after open). With an index,
// a shard is opened on the first lookup of a tensor it holds, and its header is
// validated then: a 50-shard checkpoint opens with one small JSON read. Views are
// zero-copy and stay valid while the Checkpoint, or any copy of it, lives.
//
// Errors are switchyard::error, "Checkpoint::<fn>: '<file>': <problem>", naming the file
// (index, shard, config.json or folder) and the tensor: a missing shard (at open), a tensor
// that the index maps to a shard lacking it (when that shard is opened), a tensor name in
// two shards (at open without an index; with one, when the second shard is opened, and by
// validate()), an index that is not valid JSON or lacks its weight_map, an unknown name.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/io/safetensors_reader.hpp"

namespace switchyard {
inline namespace v0 {
namespace io {

/// A checkpoint of one or several safetensors shards, looked up by tensor name.
///
/// Names are those of the index's weight_map (tensors a shard holds beyond them are not
/// visible), or, without an index, those of every shard. Copies are cheap and share the
/// opened shards; const member functions may be called from several threads at once (a
/// mutex per shard guards its lazy open). A moved-from Checkpoint may only be destroyed
/// or assigned to.
class Checkpoint {
 public:
  /// File name of the index in a checkpoint folder.
  static constexpr std::string_view index_file_name = "model.safetensors.index.json";
  /// File name of a single-file checkpoint in a folder.
  static constexpr std::string_view single_file_name = "model.safetensors";

  /// Opens `p`, which is
  /// - a folder: its model.safetensors.index.json if present, else its model.safetensors,
  ///   else every *.safetensors file in it (no index: their headers are read now);
  /// - an index file (any *.json): its weight_map, shard files relative to its folder;
  /// - one .safetensors file.
  /// `mode` is how each shard is loaded (LoadMode::map by default). Throws switchyard::error
  /// when `p` does not exist, the index is not valid JSON, is not an object, has no object
  /// "weight_map" or a value that is not a string (a shard file name inside the index's
  /// folder), a shard file of the index does not exist (naming it and one tensor mapped to
  /// it), a folder holds no safetensors file, a file is malformed (SafeTensors::open), or,
  /// without an index, two files hold a tensor of the same name.
  static Checkpoint open(const std::filesystem::path& p, LoadMode mode = LoadMode::map) {
    std::error_code ec;
    const auto status = std::filesystem::status(p, ec);
    if (status.type() == std::filesystem::file_type::not_found) {
      fail("open", p, "no such file or directory");
    }
    if (ec) fail("open", p, "cannot open: " + ec.message());
    if (std::filesystem::is_directory(status)) {
      const auto index = p / index_file_name;
      if (is_file(index)) return from_index(index, mode);
      const auto single = p / single_file_name;
      if (is_file(single)) return from_files(p, p, {single}, mode);
      std::vector<std::filesystem::path> files;
      for (const auto& e : std::filesystem::directory_iterator(p, ec)) {
        if (e.path().extension() == ".safetensors" && is_file(e.path())) files.push_back(e.path());
      }
      if (ec) fail("open", p, "cannot list the folder: " + ec.message());
      if (files.empty()) {
        fail("open", p,
             "the folder holds no " + std::string(index_file_name) + ", " +
                 std::string(single_file_name) + " or other *.safetensors file");
      }
      std::sort(files.begin(), files.end());
      return from_files(p, p, std::move(files), mode);
    }
    if (!std::filesystem::is_regular_file(status)) {
      fail("open", p, "not a regular file or a folder");
    }
    if (p.extension() == ".json") return from_index(p, mode);
    return from_files(folder_of(p), p, {p}, mode);
  }

  /// Number of tensors.
  std::size_t size() const noexcept { return state_->where.size(); }

  /// True when the checkpoint has a tensor `name` (opens no shard).
  bool contains(std::string_view name) const {
    return state_->where.find(name) != state_->where.end();
  }

  /// Every tensor name, sorted (opens no shard).
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(state_->where.size());
    for (const auto& [name, id] : state_->where) out.push_back(name);
    return out;
  }

  /// Header entry of `name` (begin/end are offsets in its shard's data section). Opens the
  /// shard if needed. Throws switchyard::error for an unknown name (listing the nearest
  /// known ones) or when the shard cannot be opened or fails its checks.
  const TensorInfo& info(std::string_view name) const { return shard_for(name, "info").info(name); }

  /// Zero-copy view of `name` in its shard, valid while this Checkpoint (or a copy) lives;
  /// T and R as SafeTensors::view (bf16 / f16 view BF16 / F16 in place). Throws as info(),
  /// and shape_error / switchyard::error as SafeTensors::view.
  template <class T, int R>
  ConstView<T, R> view(std::string_view name) const {
    return shard_for(name, "view").template view<T, R>(name);
  }

  /// Owning copy of `name` (BF16 / F16 convert to float when T = float), as
  /// SafeTensors::tensor. Throws as info() and SafeTensors::tensor.
  template <class T>
  Tensor<T> tensor(std::string_view name) const {
    return shard_for(name, "tensor").template tensor<T>(name);
  }

  /// The single element of `name`, as SafeTensors::scalar. Throws as info() and
  /// SafeTensors::scalar.
  template <class T>
  T scalar(std::string_view name) const {
    return shard_for(name, "scalar").template scalar<T>(name);
  }

  /// Raw bytes of `name` inside its shard's data section (zero-copy). Throws as info().
  std::span<const std::byte> bytes(std::string_view name) const {
    return shard_for(name, "bytes").bytes(name);
  }

  /// The shard holding `name`, opened (e.g. to check that a view lies in its data_section()).
  /// Throws as info().
  const SafeTensors& shard(std::string_view name) const { return shard_for(name, "shard"); }

  /// Path of the shard file holding `name` (opens no shard). Throws switchyard::error for
  /// an unknown name.
  std::filesystem::path shard_path(std::string_view name) const {
    return state_->shards[shard_id(name, "shard_path")]->path;
  }

  /// Every shard file, in the order of first mention in the index (or sorted by name).
  std::vector<std::filesystem::path> shard_paths() const {
    std::vector<std::filesystem::path> out;
    for (const auto& s : state_->shards) out.push_back(s->path);
    return out;
  }

  /// The folder of the checkpoint (of the index or file it was opened from).
  const std::filesystem::path& directory() const noexcept { return state_->directory; }

  /// The index file, or an empty path when the checkpoint has none.
  const std::filesystem::path& index_path() const noexcept { return state_->index; }

  /// config.json beside the index or file, parsed (read anew at each call). Throws
  /// switchyard::error naming the file when it is missing, unreadable or not valid JSON.
  nlohmann::json config() const {
    const auto p = state_->directory / "config.json";
    if (!is_file(p)) {
      fail("config", p,
           "missing: no config.json beside the checkpoint (" +
               std::string(std::filesystem::exists(p) ? "not a regular file" : "no such file") +
               ")");
    }
    return parse_json_file("config", p);
  }

  /// Opens every shard and cross-checks them: every name of the index is in its shard, and
  /// no tensor name appears in two shards (nor in a shard other than the one the index
  /// names). Throws switchyard::error naming the file(s) and the tensor.
  void validate() const {
    for (std::size_t id = 0; id < state_->shards.size(); ++id) (void)open_shard(id, "validate", {});
    std::map<std::string_view, std::size_t, std::less<>> seen;
    for (std::size_t id = 0; id < state_->shards.size(); ++id) {
      for (const auto& i : open_shard(id, "validate", {}).infos()) {
        const auto [it, fresh] = seen.emplace(i.name, id);
        if (!fresh) {
          fail("validate", state_->shards[id]->path,
               "duplicate tensor " + safetensors_detail::quote_header(i.name) + ": also in " +
                   safetensors_detail::quote(state_->shards[it->second]->path.string()));
        }
      }
    }
  }

  /// True when every shard opened so far is intact() (see SafeTensors::intact).
  bool intact() const {
    for (const auto& s : state_->shards) {
      const std::lock_guard lock(s->mutex);
      if (s->file && !s->file->intact()) return false;
    }
    return true;
  }

  /// Throws switchyard::error (naming the file, its size at open and now) unless every
  /// shard opened so far is intact (see SafeTensors::check_intact).
  void check_intact() const {
    for (const auto& s : state_->shards) {
      std::shared_ptr<const SafeTensors> file;
      {
        const std::lock_guard lock(s->mutex);
        file = s->file;
      }
      if (file) file->check_intact();
    }
  }

 private:
  struct Shard {
    std::filesystem::path path;
    std::vector<std::string_view> names;  // the index's names for this shard (keys of `where`)
    mutable std::mutex mutex;             // guards the lazy open of `file`
    std::shared_ptr<const SafeTensors> file;
  };
  struct State {
    std::filesystem::path directory, index, source;  // source: index, file or folder
    LoadMode mode = LoadMode::map;
    std::vector<std::unique_ptr<Shard>> shards;
    std::map<std::string, std::size_t, std::less<>> where;  // tensor name -> shard
  };

  explicit Checkpoint(std::shared_ptr<State> s) : state_(std::move(s)) {}

  [[noreturn]] static void fail(std::string_view fn, const std::filesystem::path& file,
                                const std::string& what) {
    throw switchyard::error("Checkpoint::" + std::string(fn) + ": " +
                            safetensors_detail::quote(file.string()) + ": " + what);
  }

  static bool is_file(const std::filesystem::path& p) {
    std::error_code ec;
    return std::filesystem::is_regular_file(p, ec);
  }

  static std::filesystem::path folder_of(const std::filesystem::path& file) {
    return file.has_parent_path() ? file.parent_path() : std::filesystem::path(".");
  }

  /// Parses a JSON file with the header's defences: nesting is bounded while parsing, and
  /// a duplicate key (nlohmann would keep the last silently) is an error.
  static nlohmann::json parse_json_file(std::string_view fn, const std::filesystem::path& p) {
    using json = nlohmann::json;
    std::ifstream in(p, std::ios::binary);
    if (!in) fail(fn, p, "cannot open the file for reading");
    const std::string s{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    if (in.bad()) fail(fn, p, "cannot read the file");
    safetensors_detail::JsonProblem problem;
    json j = safetensors_detail::parse_json_strict(s, SafeTensors::max_header_depth, problem);
    switch (problem.kind) {
      case safetensors_detail::JsonProblem::Kind::too_deep:
        fail(fn, p,
             "not valid JSON for a checkpoint: nests arrays/objects more than " +
                 std::to_string(SafeTensors::max_header_depth) + " levels deep");
      case safetensors_detail::JsonProblem::Kind::syntax:
        fail(fn, p, "not valid JSON: " + problem.detail);
      case safetensors_detail::JsonProblem::Kind::duplicate:
        fail(fn, p, "duplicate key " + problem.detail + " in the JSON");
      case safetensors_detail::JsonProblem::Kind::none:
        break;
    }
    return j;
  }

  /// A shard name must stay inside the index's folder: relative, without "..".
  static bool is_inside_name(const std::string& file) {
    const std::filesystem::path f(file);
    if (file.empty() || f.is_absolute() || f.has_root_name() || f.has_root_directory())
      return false;
    for (const auto& part : f) {
      if (part == "..") return false;
    }
    return f.has_filename();
  }

  static Checkpoint from_index(const std::filesystem::path& index, LoadMode mode) {
    const nlohmann::json j = parse_json_file("open", index);
    if (!j.is_object())
      fail("open", index, "the index must be a JSON object, got " + std::string(j.type_name()));
    const auto map = j.find("weight_map");
    if (map == j.end()) {
      fail("open", index, "the index has no \"weight_map\" (tensor name -> shard file)");
    }
    if (!map->is_object()) {
      fail("open", index,
           "\"weight_map\" must be a JSON object (tensor name -> shard file), got " +
               std::string(map->type_name()));
    }
    auto state = std::make_shared<State>();
    state->directory = folder_of(index);
    state->index = index;
    state->source = index;
    state->mode = mode;
    std::map<std::string, std::size_t, std::less<>> shard_ids;
    for (const auto& [name, file] : map->items()) {
      const std::string tensor = safetensors_detail::quote_header(name);
      if (!file.is_string()) {
        fail("open", index,
             "\"weight_map\" value of tensor " + tensor + " must be a string (a shard file), got " +
                 safetensors_detail::describe(file));
      }
      const auto& f = file.get_ref<const std::string&>();
      if (!is_inside_name(f)) {
        fail("open", index,
             "tensor " + tensor + " maps to shard " + safetensors_detail::quote_header(f) +
                 ", which is not a file name inside the index's folder");
      }
      const auto [it, fresh] = shard_ids.emplace(f, state->shards.size());
      if (fresh) {
        state->shards.push_back(std::make_unique<Shard>());
        state->shards.back()->path = state->directory / f;
      }
      state->where.emplace(name, it->second);
    }
    for (const auto& [name, id] : state->where) state->shards[id]->names.emplace_back(name);
    for (const auto& [f, id] : shard_ids) {
      const Shard& s = *state->shards[id];
      if (!is_file(s.path)) {
        fail("open", index,
             "shard " + safetensors_detail::quote_header(f) + " does not exist (no file " +
                 safetensors_detail::quote(s.path.string()) + "); the index maps " +
                 std::to_string(s.names.size()) + " tensor(s) to it, e.g. " +
                 safetensors_detail::quote_header(s.names.front()));
      }
    }
    return Checkpoint(std::move(state));
  }

  /// No index: opens every file now and builds the name map from their headers.
  static Checkpoint from_files(const std::filesystem::path& directory,
                               const std::filesystem::path& source,
                               std::vector<std::filesystem::path> files, LoadMode mode) {
    auto state = std::make_shared<State>();
    state->directory = directory;
    state->source = source;
    state->mode = mode;
    for (auto& p : files) {
      auto s = std::make_unique<Shard>();
      s->file = std::make_shared<const SafeTensors>(SafeTensors::open(p, mode));
      s->path = std::move(p);
      const std::size_t id = state->shards.size();
      for (const auto& i : s->file->infos()) {
        const auto [it, fresh] = state->where.emplace(i.name, id);
        if (!fresh) {
          fail("open", s->path,
               "duplicate tensor " + safetensors_detail::quote_header(i.name) + ": also in " +
                   safetensors_detail::quote(state->shards[it->second]->path.string()) +
                   " (no index says which one is meant)");
        }
      }
      state->shards.push_back(std::move(s));
    }
    for (const auto& [name, id] : state->where) state->shards[id]->names.emplace_back(name);
    return Checkpoint(std::move(state));
  }

  /// Shard index of `name`; throws switchyard::error listing the nearest known names.
  std::size_t shard_id(std::string_view name, std::string_view fn) const {
    const auto& where = state_->where;
    const auto it = where.find(name);
    if (it != where.end()) return it->second;
    // Neighbours in sorted order share the longest prefix with `name`: the likeliest typos.
    auto first = where.lower_bound(name);
    for (int k = 0; k < 3 && first != where.begin(); ++k) --first;
    std::string near;
    int listed = 0;
    for (auto n = first; n != where.end() && listed < 6; ++n, ++listed) {
      near += (listed ? ", " : "") + safetensors_detail::quote_header(n->first);
    }
    fail(fn, state_->source,
         "no tensor named " + safetensors_detail::quote(name) + " (the checkpoint has " +
             std::to_string(where.size()) + " tensors" +
             (where.empty() ? std::string(")") : "; nearest names: " + near + ")"));
  }

  const SafeTensors& shard_for(std::string_view name, std::string_view fn) const {
    return open_shard(shard_id(name, fn), fn, name);
  }

  /// The opened shard `id`, opening and checking it on first use. `name` is the tensor
  /// asked for (empty from validate()), named in errors.
  const SafeTensors& open_shard(std::size_t id, std::string_view fn, std::string_view name) const {
    Shard& s = *state_->shards[id];
    const std::lock_guard lock(s.mutex);
    if (s.file) return *s.file;
    std::shared_ptr<const SafeTensors> file;
    try {
      file = std::make_shared<const SafeTensors>(SafeTensors::open(s.path, state_->mode));
    } catch (const switchyard::error& e) {
      if (name.empty()) throw;
      throw switchyard::error("Checkpoint::" + std::string(fn) + ": tensor " +
                              safetensors_detail::quote(name) +
                              ": its shard failed to open: " + e.what());
    }
    // The index's names for this shard must all be there, and the shard must not hold a
    // tensor the index places in another shard: either way a lookup would be ambiguous.
    for (std::string_view n : s.names) {
      if (!file->contains(n)) {
        fail(fn, s.path,
             "tensor " + safetensors_detail::quote_header(n) + " is not in this shard, but " +
                 safetensors_detail::quote(state_->index.string()) + " maps it here");
      }
    }
    for (const auto& i : file->infos()) {
      const auto it = state_->where.find(i.name);
      if (it != state_->where.end() && it->second != id) {
        fail(fn, s.path,
             "duplicate tensor " + safetensors_detail::quote_header(i.name) +
                 ": this shard holds it, but " + safetensors_detail::quote(state_->index.string()) +
                 " maps it to " +
                 safetensors_detail::quote(state_->shards[it->second]->path.string()));
      }
    }
    s.file = std::move(file);
    return *s.file;
  }

  std::shared_ptr<State> state_;
};

}  // namespace io
}  // namespace v0
}  // namespace switchyard
