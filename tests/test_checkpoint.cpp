// io::Checkpoint: the two-shard Hugging Face fixtures (f32 and their bf16 rounding), single
// files and folders without an index, every documented error, lazy shard opening from
// several threads, and a multi-GB sparse checkpoint that must open without using memory.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "support/fixtures.hpp"
#include "support/temp_dir.hpp"
#include "switchyard/io/safetensors.hpp"

using namespace switchyard::io;
using Catch::Contains;
using switchyard::bf16;
using switchyard::ConstView;
using switchyard::Tensor;
namespace fs = std::filesystem;

namespace {

/// The fixture checkpoint folder: hf_mixtral_tiny/f32 or hf_mixtral_tiny/bf16.
fs::path hf_dir(const char* which) { return fs::path(fixture_path("hf_mixtral_tiny")) / which; }

/// weight_map of an index, read independently of Checkpoint.
std::map<std::string, std::string> weight_map(const fs::path& index) {
  std::ifstream in(index);
  const auto j = nlohmann::json::parse(in);
  return j.at("weight_map").get<std::map<std::string, std::string>>();
}

/// A shard holding F32 tensors `names`, tensor k filled with 100 * k + i.
std::vector<std::uint8_t> shard_bytes(const std::vector<std::string>& names) {
  SafeTensorsWriter w;
  for (std::size_t k = 0; k < names.size(); ++k) {
    const float v[3] = {100.0f * k, 100.0f * k + 1, 100.0f * k + 2};
    w.add<float>(names[k], v, {3});
  }
  return w.to_bytes();
}

std::string index_json(const std::map<std::string, std::string>& map) {
  return nlohmann::json{{"metadata", {{"total_size", 0}}}, {"weight_map", map}}.dump(2);
}

/// Runs `f`, which must throw switchyard::error, and checks that the message contains each
/// of `words` (a combined Catch matcher cannot be stored: it refers to temporaries).
template <class F>
void check_error(F&& f, const std::vector<std::string>& words) {
  try {
    f();
    FAIL_CHECK("no switchyard::error thrown; expected one with: " << words.front());
  } catch (const switchyard::error& e) {
    for (const auto& w : words) CHECK_THAT(e.what(), Contains(w));
  }
}

/// Resident set size of this process in bytes (/proc/self/statm, field 2, in pages).
std::int64_t resident_bytes() {
  std::ifstream in("/proc/self/statm");
  std::int64_t size = 0, resident = 0;
  in >> size >> resident;
  return resident * static_cast<std::int64_t>(::sysconf(_SC_PAGESIZE));
}

}  // namespace

// ---- the Hugging Face fixtures ---------------------------------------------------------------

TEST_CASE("the two-shard fixtures open, and every index name is found", "[checkpoint][fixture]") {
  for (const char* which : {"f32", "bf16"}) {
    CAPTURE(which);
    const fs::path dir = hf_dir(which);
    const auto map = weight_map(dir / "model.safetensors.index.json");
    REQUIRE(map.size() == 22);
    const auto ckpt = Checkpoint::open(dir);
    CHECK(ckpt.directory() == dir);
    CHECK(ckpt.index_path() == dir / "model.safetensors.index.json");
    CHECK(ckpt.size() == map.size());
    CHECK(ckpt.shard_paths().size() == 2);
    std::vector<std::string> keys;
    for (const auto& [name, file] : map) keys.push_back(name);
    CHECK(ckpt.names() == keys);  // sorted
    const DType want = std::string(which) == "f32" ? DType::F32 : DType::BF16;
    for (const auto& [name, file] : map) {
      CAPTURE(name);
      REQUIRE(ckpt.contains(name));
      CHECK(ckpt.shard_path(name) == dir / file);
      const TensorInfo& i = ckpt.info(name);
      CHECK(i.dtype == want);
      CHECK(ckpt.shard(name).source() == (dir / file).string());
      CHECK(ckpt.shard(name).load_mode() == (can_map_files ? LoadMode::map : LoadMode::read));
      const auto bytes = ckpt.bytes(name);
      const auto section = ckpt.shard(name).data_section();
      CHECK((bytes.data() >= section.data() &&
             bytes.data() + bytes.size() <= section.data() + section.size()));
    }
    CHECK_FALSE(ckpt.contains("model.layers.1.input_layernorm.weight"));
    REQUIRE_NOTHROW(ckpt.validate());
    CHECK(ckpt.intact());
    const auto cfg = ckpt.config();
    CHECK(cfg.at("hidden_size") == 64);
    CHECK(cfg.at("num_local_experts") == 4);
    CHECK(cfg.at("torch_dtype") == (std::string(which) == "f32" ? "float32" : "bfloat16"));
    // Shapes as Mixtral stores them: w1 [F, d], w2 [d, F], gate [E, d].
    CHECK(ckpt.info("model.layers.0.block_sparse_moe.experts.3.w1.weight").shape ==
          std::vector<std::int64_t>{128, 64});
    CHECK(ckpt.info("model.layers.0.block_sparse_moe.experts.3.w2.weight").shape ==
          std::vector<std::int64_t>{64, 128});
    CHECK(ckpt.info("model.layers.0.block_sparse_moe.gate.weight").shape ==
          std::vector<std::int64_t>{4, 64});
  }
}

TEST_CASE("the bf16 checkpoint is the round-to-nearest-even of the f32 one, viewed in place",
          "[checkpoint][fixture]") {
  const auto f32 = Checkpoint::open(hf_dir("f32"));
  const auto b16 = Checkpoint::open(hf_dir("bf16") / "model.safetensors.index.json");
  REQUIRE(f32.names() == b16.names());
  std::int64_t compared = 0;
  for (const auto& name : f32.names()) {
    CAPTURE(name);
    const Tensor<float> ref = f32.tensor<float>(name);
    const Tensor<float> up = b16.tensor<float>(name);  // BF16 -> float, exact
    REQUIRE(up.numel() == ref.numel());
    const auto rank = b16.info(name).shape.size();
    REQUIRE((rank == 1 || rank == 2));
    if (rank == 2) {
      const ConstView<bf16, 2> v = b16.view<bf16, 2>(name);
      CHECK(reinterpret_cast<const void*>(v.data()) == b16.bytes(name).data());  // zero-copy
      const ConstView<float, 2> r = f32.view<float, 2>(name);
      REQUIRE(v.extent(0) == r.extent(0));
      REQUIRE(v.extent(1) == r.extent(1));
      for (std::int64_t i = 0; i < v.extent(0); ++i) {
        for (std::int64_t j = 0; j < v.extent(1); ++j) {
          if (v(i, j).bits != float_to_bf16(r(i, j)))
            FAIL_CHECK("bits differ at " << i << "," << j);
          ++compared;
        }
      }
    } else {
      const ConstView<bf16, 1> v = b16.view<bf16, 1>(name);
      for (std::int64_t i = 0; i < v.extent(0); ++i) {
        CHECK(v(i).bits == float_to_bf16(ref[i]));
        ++compared;
      }
    }
    for (std::int64_t k = 0; k < ref.numel(); ++k) {
      if (up[k] != bf16_to_float(float_to_bf16(ref[k]))) FAIL_CHECK("upcast differs at " << k);
    }
  }
  CHECK(compared > 50000);
}

TEST_CASE("one shard file, or a folder's model.safetensors, is a checkpoint too", "[checkpoint]") {
  // A shard of the fixture opened by itself: its own names, config.json beside it.
  const fs::path shard = hf_dir("f32") / "model-00002-of-00002.safetensors";
  const auto one = Checkpoint::open(shard);
  CHECK(one.index_path().empty());
  CHECK(one.directory() == hf_dir("f32"));
  CHECK(one.size() == 10);
  CHECK(one.contains("lm_head.weight"));
  CHECK_FALSE(one.contains("model.embed_tokens.weight"));
  CHECK(one.shard_path("model.norm.weight") == shard);
  CHECK(one.config().at("vocab_size") == 32);
  const auto full = Checkpoint::open(hf_dir("f32"));
  const auto a = one.view<float, 2>("lm_head.weight");
  const auto b = full.view<float, 2>("lm_head.weight");
  CHECK(std::memcmp(a.data(), b.data(), sizeof(float) * a.numel()) == 0);

  // A folder with model.safetensors: that file only, even beside other .safetensors files.
  TempDir dir("ckpt_single");
  dir.write("model.safetensors", shard_bytes({"x", "y"}));
  dir.write("other.safetensors", shard_bytes({"x", "z"}));
  dir.write("config.json", std::string("{\"hidden_size\": 3}"));
  const auto single = Checkpoint::open(dir.path);
  CHECK(single.names() == std::vector<std::string>{"x", "y"});
  CHECK(single.view<float, 1>("y")(2) == 102.0f);
  CHECK(single.config().at("hidden_size") == 3);
  REQUIRE_NOTHROW(single.validate());
}

TEST_CASE("a folder of shards without an index", "[checkpoint]") {
  TempDir dir("ckpt_noindex");
  dir.write("part-b.safetensors", shard_bytes({"b0", "b1"}));
  dir.write("part-a.safetensors", shard_bytes({"a0", "a1", "a2"}));
  dir.write("notes.txt", std::string("not a shard"));
  const auto ckpt = Checkpoint::open(dir.path);
  CHECK(ckpt.index_path().empty());
  CHECK(ckpt.names() == std::vector<std::string>{"a0", "a1", "a2", "b0", "b1"});
  CHECK(ckpt.shard_paths() ==
        std::vector<fs::path>{dir.path / "part-a.safetensors", dir.path / "part-b.safetensors"});
  CHECK(ckpt.shard_path("b1") == dir.path / "part-b.safetensors");
  CHECK(ckpt.view<float, 1>("a2")(1) == 201.0f);
  CHECK(ckpt.tensor<float>("b1")[0] == 100.0f);
  REQUIRE_THROWS_AS(ckpt.scalar<float>("a0"), switchyard::shape_error);  // 3 elements
}

TEST_CASE("read mode through Checkpoint, and copies that outlive the original", "[checkpoint]") {
  ConstView<float, 2> v;
  std::vector<float> expect;
  std::optional<Checkpoint> keep;
  {
    const auto ckpt = Checkpoint::open(hf_dir("f32"), LoadMode::read);
    CHECK(ckpt.shard("lm_head.weight").load_mode() == LoadMode::read);
    const auto t = ckpt.tensor<float>("lm_head.weight");
    expect.assign(t.begin(), t.end());
    const Checkpoint copy = ckpt;  // shares the opened shards
    v = copy.view<float, 2>("lm_head.weight");
    CHECK(v.data() == ckpt.view<float, 2>("lm_head.weight").data());
    const Checkpoint moved = Checkpoint(copy);
    CHECK(moved.view<float, 2>("lm_head.weight").data() == v.data());
    keep = moved;
  }  // every other copy is gone; `keep` holds the shards
  for (std::int64_t k = 0; k < v.numel(); ++k) {
    if (v.data()[k] != expect[k]) FAIL_CHECK("differs at " << k);
  }
  keep.reset();
}

TEST_CASE("shards open lazily and safely from several threads", "[checkpoint]") {
  const auto ckpt = Checkpoint::open(hf_dir("bf16"));
  const auto names = ckpt.names();
  std::vector<std::vector<const void*>> seen(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (std::size_t k = 0; k < names.size(); ++k) {
        const auto& n = names[(k + 5 * t) % names.size()];  // each thread in its own order
        seen[t].push_back(ckpt.bytes(n).data());
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 1; t < 4; ++t) {
    std::vector<const void*> a = seen[0], b = seen[t];
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    CHECK(a == b);  // one mapping per shard, whichever thread opened it
  }
}

TEST_CASE("Checkpoint intact / check_intact name the truncated shard", "[checkpoint][mmap]") {
  if (!can_map_files) return;
  TempDir dir("ckpt_trunc");
  dir.write("s1.safetensors", shard_bytes({"a"}));
  dir.write("s2.safetensors", shard_bytes({"b"}));
  dir.write("model.safetensors.index.json",
            index_json({{"a", "s1.safetensors"}, {"b", "s2.safetensors"}}));
  const auto ckpt = Checkpoint::open(dir.path);
  CHECK(ckpt.view<float, 1>("b")(0) == 0.0f);
  const auto size = fs::file_size(dir.path / "s2.safetensors");
  fs::resize_file(dir.path / "s2.safetensors", 16);
  CHECK_FALSE(ckpt.intact());
  REQUIRE_THROWS_WITH(ckpt.check_intact(), Contains("s2.safetensors") &&
                                               Contains(std::to_string(size) + " bytes at open") &&
                                               Contains("16 bytes now"));
}

// ---- errors ----------------------------------------------------------------------------------

TEST_CASE("a shard named by the index is missing", "[checkpoint][error]") {
  TempDir dir("ckpt_missing");
  dir.write("s1.safetensors", shard_bytes({"a"}));
  const auto index =
      dir.write("model.safetensors.index.json", index_json({{"a", "s1.safetensors"},
                                                            {"lost.w", "gone-00002.safetensors"},
                                                            {"lost.v", "gone-00002.safetensors"}}));
  REQUIRE_THROWS_AS(Checkpoint::open(dir.path), switchyard::error);
  REQUIRE_THROWS_WITH(Checkpoint::open(dir.path),
                      Contains("Checkpoint::open") && Contains(index.string()) &&
                          Contains("'gone-00002.safetensors'") && Contains("does not exist") &&
                          Contains("'lost.v'") && Contains("2 tensor(s)"));
}

TEST_CASE("a tensor the index maps to a shard that lacks it", "[checkpoint][error]") {
  TempDir dir("ckpt_lacks");
  const auto s1 = dir.write("s1.safetensors", shard_bytes({"a"}));
  dir.write("s2.safetensors", shard_bytes({"b"}));
  dir.write("model.safetensors.index.json", index_json({{"a", "s1.safetensors"},
                                                        {"ghost.weight", "s1.safetensors"},
                                                        {"b", "s2.safetensors"}}));
  const auto ckpt = Checkpoint::open(dir.path);  // shards are not opened yet
  CHECK(ckpt.contains("ghost.weight"));
  CHECK(ckpt.view<float, 1>("b")(2) == 2.0f);  // the other shard is fine
  const std::vector<std::string> lacks = {s1.string(), "'ghost.weight'", "not in this shard",
                                          "model.safetensors.index.json"};
  REQUIRE_THROWS_AS((ckpt.view<float, 1>("a")), switchyard::error);
  check_error([&] { (void)ckpt.view<float, 1>("a"); }, lacks);
  check_error([&] { (void)ckpt.view<float, 1>("a"); }, {"Checkpoint::view"});
  check_error([&] { (void)ckpt.info("ghost.weight"); }, lacks);
  check_error([&] { (void)ckpt.info("ghost.weight"); }, {"Checkpoint::info"});
  check_error([&] { ckpt.validate(); }, lacks);
  check_error([&] { ckpt.validate(); }, {"Checkpoint::validate"});
}

TEST_CASE("a tensor name in two shards", "[checkpoint][error]") {
  SECTION("the index maps it to one, the other holds it too") {
    TempDir dir("ckpt_dup_index");
    const auto s1 = dir.write("s1.safetensors", shard_bytes({"a", "w"}));
    const auto s2 = dir.write("s2.safetensors", shard_bytes({"b", "w"}));
    dir.write(
        "model.safetensors.index.json",
        index_json({{"a", "s1.safetensors"}, {"w", "s1.safetensors"}, {"b", "s2.safetensors"}}));
    const auto ckpt = Checkpoint::open(dir.path);
    CHECK(ckpt.view<float, 1>("w")(0) == 100.0f);  // s1 is consistent
    const std::vector<std::string> dup = {s2.string(), "duplicate tensor 'w'", s1.string()};
    check_error([&] { (void)ckpt.tensor<float>("b"); }, dup);
    check_error([&] { (void)ckpt.tensor<float>("b"); }, {"Checkpoint::tensor"});
    check_error([&] { ckpt.validate(); }, dup);
    check_error([&] { ckpt.validate(); }, {"Checkpoint::validate"});
  }
  SECTION("two shards hold a name the index does not list") {
    TempDir dir("ckpt_dup_unlisted");
    const auto s1 = dir.write("s1.safetensors", shard_bytes({"a", "extra"}));
    const auto s2 = dir.write("s2.safetensors", shard_bytes({"b", "extra"}));
    dir.write("model.safetensors.index.json",
              index_json({{"a", "s1.safetensors"}, {"b", "s2.safetensors"}}));
    const auto ckpt = Checkpoint::open(dir.path);
    CHECK_FALSE(ckpt.contains("extra"));  // only the index's names are visible
    CHECK(ckpt.view<float, 1>("b")(0) == 0.0f);
    REQUIRE_THROWS_WITH(ckpt.validate(), Contains("Checkpoint::validate") &&
                                             Contains("duplicate tensor 'extra'") &&
                                             Contains(s1.string()) && Contains(s2.string()));
  }
  SECTION("no index: found at open") {
    TempDir dir("ckpt_dup_scan");
    const auto a = dir.write("a.safetensors", shard_bytes({"x", "shared.weight"}));
    const auto b = dir.write("b.safetensors", shard_bytes({"shared.weight", "y"}));
    REQUIRE_THROWS_AS(Checkpoint::open(dir.path), switchyard::error);
    REQUIRE_THROWS_WITH(Checkpoint::open(dir.path),
                        Contains("Checkpoint::open") && Contains("'shared.weight'") &&
                            Contains("duplicate") && Contains(a.string()) && Contains(b.string()));
  }
}

TEST_CASE("malformed indexes", "[checkpoint][error]") {
  struct Case {
    std::string text, words1, words2;
  };
  const Case c =
      GENERATE(Case{"{\"weight_map\": {\"a\": \"s1.safetensors\"", "not valid JSON", ""},
               Case{"", "not valid JSON", ""}, Case{"[1, 2]", "must be a JSON object", "array"},
               Case{"{\"metadata\": {}}", "no \"weight_map\"", ""},
               Case{"{\"weight_map\": [\"s1.safetensors\"]}",
                    "\"weight_map\" must be a JSON object", "array"},
               Case{"{\"weight_map\": {\"a\": 3}}", "'a'", "must be a string"},
               Case{"{\"weight_map\": {\"a\": null}}", "'a'", "must be a string"},
               Case{"{\"weight_map\": {\"a\": \"s1.safetensors\", \"a\": \"s2.safetensors\"}}",
                    "duplicate key 'a'", ""},
               Case{"{\"weight_map\": {\"a\": \"../s1.safetensors\"}}", "'a'",
                    "not a file name inside the index's folder"},
               Case{"{\"weight_map\": {\"a\": \"/etc/passwd\"}}", "'a'", "not a file name inside"},
               Case{"{\"weight_map\": {\"a\": \"\"}}", "'a'", "not a file name inside"},
               Case{std::string(100, '[') + std::string(100, ']'), "more than 64 levels", ""});
  CAPTURE(c.text);
  TempDir dir("ckpt_badindex");
  dir.write("s1.safetensors", shard_bytes({"a"}));
  const auto index = dir.write("model.safetensors.index.json", c.text);
  for (const fs::path& p : {dir.path, index}) {
    REQUIRE_THROWS_AS(Checkpoint::open(p), switchyard::error);
    REQUIRE_THROWS_WITH(Checkpoint::open(p), Contains("Checkpoint::open") &&
                                                 Contains(index.string()) && Contains(c.words1) &&
                                                 Contains(c.words2));
  }
}

TEST_CASE("an unknown tensor name lists the nearest known names", "[checkpoint][error]") {
  const auto ckpt = Checkpoint::open(hf_dir("f32"));
  const std::string typo = "model.layers.0.self_attn.q_proj.weights";
  REQUIRE_THROWS_AS(ckpt.info(typo), switchyard::error);
  const std::vector<std::string> words = {"'" + typo + "'", "model.safetensors.index.json",
                                          "22 tensors", "'model.layers.0.self_attn.q_proj.weight'"};
  check_error([&] { (void)ckpt.info(typo); }, words);
  check_error([&] { (void)ckpt.info(typo); }, {"Checkpoint::info"});
  check_error([&] { (void)ckpt.view<float, 2>(typo); }, words);
  check_error([&] { (void)ckpt.view<float, 2>(typo); }, {"Checkpoint::view"});
  check_error([&] { (void)ckpt.tensor<float>(typo); }, words);
  check_error([&] { (void)ckpt.tensor<float>(typo); }, {"Checkpoint::tensor"});
  check_error([&] { (void)ckpt.shard_path(typo); }, words);
  check_error([&] { (void)ckpt.shard_path(typo); }, {"Checkpoint::shard_path"});
  check_error([&] { (void)ckpt.shard(typo); }, words);
  // Wrong dtype or rank: the shard's own shape_error.
  REQUIRE_THROWS_AS((ckpt.view<bf16, 2>("lm_head.weight")), switchyard::shape_error);
  REQUIRE_THROWS_AS((ckpt.view<float, 1>("lm_head.weight")), switchyard::shape_error);
  REQUIRE_THROWS_WITH((ckpt.view<float, 1>("lm_head.weight")),
                      Contains("'lm_head.weight'") && Contains("model-00002-of-00002"));
}

TEST_CASE("paths that do not exist, empty folders, malformed shards", "[checkpoint][error]") {
  TempDir dir("ckpt_paths");
  const fs::path missing = dir.path / "no_such_checkpoint";
  REQUIRE_THROWS_AS(Checkpoint::open(missing), switchyard::error);
  REQUIRE_THROWS_WITH(Checkpoint::open(missing), Contains("Checkpoint::open") &&
                                                     Contains(missing.string()) &&
                                                     Contains("no such file or directory"));
  fs::create_directories(dir.path / "empty");
  REQUIRE_THROWS_WITH(Checkpoint::open(dir.path / "empty"),
                      Contains("empty") && Contains("holds no model.safetensors.index.json"));
  REQUIRE_THROWS_WITH(Checkpoint::open(dir.path / "nope.safetensors"),
                      Contains("nope.safetensors") && Contains("no such file"));

  // A shard whose header is broken: reported when first used, naming shard and tensor.
  const std::string bad_header = "{\"a\": 1}";
  std::vector<std::uint8_t> bad(8, 0);
  bad[0] = static_cast<std::uint8_t>(bad_header.size());
  bad.insert(bad.end(), bad_header.begin(), bad_header.end());
  const auto broken = dir.write("broken.safetensors", bad);
  dir.write("model.safetensors.index.json", index_json({{"a", "broken.safetensors"}}));
  const auto ckpt = Checkpoint::open(dir.path);
  REQUIRE_THROWS_AS(ckpt.tensor<float>("a"), switchyard::error);
  REQUIRE_THROWS_WITH(ckpt.tensor<float>("a"),
                      Contains("Checkpoint::tensor") && Contains("tensor 'a'") &&
                          Contains(broken.string()) && Contains("entry must be a JSON object"));
  REQUIRE_THROWS_WITH(ckpt.validate(), Contains(broken.string()));
  // Without an index the file is read at open.
  fs::remove(dir.path / "model.safetensors.index.json");
  REQUIRE_THROWS_WITH(Checkpoint::open(dir.path),
                      Contains("SafeTensors::open") && Contains(broken.string()));
}

TEST_CASE("config.json missing or not valid JSON", "[checkpoint][error]") {
  TempDir dir("ckpt_config");
  dir.write("model.safetensors", shard_bytes({"a"}));
  const auto ckpt = Checkpoint::open(dir.path);
  const fs::path cfg = dir.path / "config.json";
  REQUIRE_THROWS_AS(ckpt.config(), switchyard::error);
  REQUIRE_THROWS_WITH(ckpt.config(), Contains("Checkpoint::config") && Contains(cfg.string()) &&
                                         Contains("missing"));
  dir.write("config.json", std::string("{\"hidden_size\": 64,"));
  REQUIRE_THROWS_WITH(ckpt.config(), Contains("Checkpoint::config") && Contains(cfg.string()) &&
                                         Contains("not valid JSON"));
  dir.write("config.json", std::string("{\"hidden_size\": 64}"));
  CHECK(ckpt.config().at("hidden_size") == 64);  // read anew at each call
}

// ---- a multi-GB checkpoint that only exists sparsely -----------------------------------------

TEST_CASE("a 4 GiB sparse checkpoint opens and views without using memory",
          "[checkpoint][mmap][sparse]") {
  if (!can_map_files) {
    WARN("no mmap on this platform: the sparse checkpoint test is skipped");
    return;
  }
  TempDir dir("ckpt_sparse");  // removed with the 4 GiB file, also when a check fails
  const std::uint64_t big = std::uint64_t(1) << 30;  // F32 elements: 4 GiB
  std::string header = "{\"big\":{\"dtype\":\"F32\",\"shape\":[" + std::to_string(big) +
                       "],\"data_offsets\":[0," + std::to_string(4 * big) +
                       "]},\"small\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[" +
                       std::to_string(4 * big) + "," + std::to_string(4 * big + 16) + "]}}";
  header.append((8 - header.size() % 8) % 8, ' ');
  const fs::path path = dir.path / "model.safetensors";
  {
    const int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0644);
    REQUIRE(fd >= 0);
    std::vector<std::uint8_t> head(8);
    for (int k = 0; k < 8; ++k) head[k] = static_cast<std::uint8_t>(header.size() >> (8 * k));
    head.insert(head.end(), header.begin(), header.end());
    const std::uint64_t data_start = head.size();
    const bool wrote = ::write(fd, head.data(), head.size()) == ssize_t(head.size());
    // Extend to the full size without writing: a hole, no disk blocks.
    const int rc = wrote ? ::ftruncate(fd, off_t(data_start + 4 * big + 16)) : -1;
    const int err = errno;
    if (rc != 0 && (err == ENOSPC || err == EFBIG)) {
      ::close(fd);
      WARN("ftruncate to 4 GiB failed (" << std::strerror(err) << "): sparse test skipped");
      return;
    }
    const float small[4] = {1.5f, -2.0f, 0.25f, 8.0f};
    const bool tail = rc == 0 && ::pwrite(fd, small, 16, off_t(data_start + 4 * big)) == 16;
    ::close(fd);
    REQUIRE(wrote);
    REQUIRE(rc == 0);
    REQUIRE(tail);
  }
  REQUIRE(fs::file_size(path) > 4 * big);
  const std::int64_t limit = std::int64_t(64) << 20;

  const std::int64_t before = resident_bytes();
  {
    const auto st = SafeTensors::open(path);
    CHECK(resident_bytes() - before < limit);
    const ConstView<float, 1> v = st.view<float, 1>("big");
    CHECK(v.extent(0) == std::int64_t(big));
    CHECK(resident_bytes() - before < limit);
    CHECK(v(0) == 0.0f);  // a hole reads as zeros; touches one page
    CHECK(v(v.extent(0) - 1) == 0.0f);
    const Tensor<float> s = st.tensor<float>("small");
    CHECK(s[0] == 1.5f);
    CHECK(s[3] == 8.0f);
    CHECK(st.intact());
  }
  {
    const auto ckpt = Checkpoint::open(dir.path);
    CHECK(resident_bytes() - before < limit);
    CHECK(ckpt.names() == std::vector<std::string>{"big", "small"});
    CHECK(ckpt.info("big").nbytes() == 4 * big);
    const ConstView<float, 1> v = ckpt.view<float, 1>("big");
    CHECK(resident_bytes() - before < limit);
    CHECK(v.extent(0) == std::int64_t(big));
    CHECK(ckpt.view<float, 1>("small")(1) == -2.0f);
    REQUIRE_NOTHROW(ckpt.validate());
    CHECK(resident_bytes() - before < limit);
  }
}
