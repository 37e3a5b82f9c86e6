// Safetensors reader and writer: a file built byte by byte (independent of the
// writer), writer/reader round trips for every dtype, hand-worked BF16/F16
// conversions, every malformed-file error, every golden fixture, and a mutation
// loop that must only ever load or throw switchyard::error.
#include <unistd.h>  // getpid

#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "support/fixtures.hpp"
#include "support/temp_dir.hpp"
#include "switchyard/io/safetensors.hpp"

using namespace switchyard::io;
using Catch::Contains;
using switchyard::ConstView;
using switchyard::Tensor;

namespace {

using Bytes = std::vector<std::uint8_t>;

void put_u64(Bytes& out, std::uint64_t v) {
  for (int k = 0; k < 8; ++k) out.push_back(static_cast<std::uint8_t>(v >> (8 * k)));
}

/// A file from a literal header and data section, bypassing SafeTensorsWriter.
Bytes raw_file(const std::string& header, const Bytes& data = {}) {
  Bytes out;
  put_u64(out, header.size());
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

/// One header entry as JSON text.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  std::uint64_t begin, std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(end) + "]}";
}

SafeTensors load(const Bytes& b) { return SafeTensors::from_bytes(b, "bad.safetensors"); }

/// Reads every element of every tensor through the typed API, so a broken
/// header that slipped through would touch out-of-range memory (caught by ASan).
double touch_all(const SafeTensors& f) {
  double sum = 0;
  for (const auto& i : f.infos()) {
    if (i.shape.size() > 4) continue;
    const auto add = [&](const auto& t) {
      for (auto v : t) sum += static_cast<double>(v);
    };
    switch (i.dtype) {
      case DType::F64:
        add(f.tensor<double>(i.name));
        break;
      case DType::F32:
      case DType::F16:
      case DType::BF16:
        add(f.tensor<float>(i.name));
        break;
      case DType::I64:
        add(f.tensor<std::int64_t>(i.name));
        break;
      case DType::I32:
        add(f.tensor<std::int32_t>(i.name));
        break;
      case DType::I16:
        add(f.tensor<std::int16_t>(i.name));
        break;
      case DType::I8:
        add(f.tensor<std::int8_t>(i.name));
        break;
      case DType::U64:
        add(f.tensor<std::uint64_t>(i.name));
        break;
      case DType::U32:
        add(f.tensor<std::uint32_t>(i.name));
        break;
      case DType::U16:
        add(f.tensor<std::uint16_t>(i.name));
        break;
      case DType::U8:
        add(f.tensor<std::uint8_t>(i.name));
        break;
      case DType::BOOL:
        add(f.tensor<bool>(i.name));
        break;
    }
  }
  return sum;
}

}  // namespace

// ---- the format itself, independent of our writer -------------------------------------------

TEST_CASE("a hand-built file reads back", "[safetensors]") {
  // Header length 131 (not a multiple of 8) so the data section is misaligned in
  // the file; the reader must still hand out aligned views.
  const std::string header = "{" + entry("w", "F32", "[2]", 8, 16) + "," +
                             entry("idx", "I64", "[1]", 0, 8) +
                             ",\"__metadata__\":{\"format\":\"pt\"}}";
  Bytes data;
  put_u64(data, 0x0102030405060708ull);                               // idx[0]
  for (std::uint8_t b : {0x00, 0x00, 0x80, 0x3F}) data.push_back(b);  // 1.0f
  for (std::uint8_t b : {0x00, 0x00, 0x00, 0xC0}) data.push_back(b);  // -2.0f
  REQUIRE(header.size() % 8 != 0);
  const auto f = SafeTensors::from_bytes(raw_file(header, data));

  REQUIRE(f.names() == std::vector<std::string>{"idx", "w"});  // data-offset order
  REQUIRE(f.contains("w"));
  REQUIRE_FALSE(f.contains("x"));
  const TensorInfo& w = f.info("w");
  CHECK(w.dtype == DType::F32);
  CHECK(w.shape == std::vector<std::int64_t>{2});
  CHECK(w.begin == 8);
  CHECK(w.end == 16);
  CHECK(w.numel() == 2);
  const ConstView<float, 1> v = f.view<float, 1>("w");
  CHECK(reinterpret_cast<std::uintptr_t>(v.data()) % alignof(float) == 0);
  CHECK(v(0) == 1.0f);
  CHECK(v(1) == -2.0f);
  CHECK(f.view<std::int64_t, 1>("idx")(0) == 0x0102030405060708ll);
  CHECK(f.metadata().size() == 1);
  CHECK(f.metadata().at("format") == "pt");
}

TEST_CASE("dtype names, sizes and the C++ type map", "[safetensors]") {
  CHECK(dtype_size(DType::F64) == 8);
  CHECK(dtype_size(DType::BF16) == 2);
  CHECK(dtype_size(DType::BOOL) == 1);
  CHECK(dtype_name(DType::BF16) == "BF16");
  CHECK(parse_dtype("I32") == DType::I32);
  CHECK_FALSE(parse_dtype("F8_E4M3").has_value());
  CHECK_FALSE(parse_dtype("f32").has_value());  // the format is case-sensitive
  STATIC_REQUIRE(dtype_of<float>() == DType::F32);
  STATIC_REQUIRE(dtype_of<bool>() == DType::BOOL);
  STATIC_REQUIRE(dtype_of<std::uint8_t>() == DType::U8);
  STATIC_REQUIRE(dtype_of<std::int64_t>() == DType::I64);
}

// ---- round trips -----------------------------------------------------------------------------

TEMPLATE_TEST_CASE("writer/reader round trip", "[safetensors]", float, double, std::int64_t,
                   std::int32_t, std::int16_t, std::int8_t, std::uint64_t, std::uint32_t,
                   std::uint16_t, std::uint8_t, bool) {
  using T = TestType;
  T src[6];  // not std::vector: vector<bool> has no data()
  for (int i = 0; i < 6; ++i) {
    if constexpr (std::is_same_v<T, bool>) {
      src[i] = (i % 3) == 1;
    } else if constexpr (std::is_floating_point_v<T>) {
      src[i] = static_cast<T>(i) * T(-1.25) + T(0.5);
    } else {
      src[i] = static_cast<T>(std::is_signed_v<T> ? 7 * i - 20 : 37 * i + 3);
    }
  }
  SafeTensorsWriter w;
  std::uint8_t pad = 9;
  w.add<std::uint8_t>("pad", &pad, {1});  // 1-byte tensor first in insertion order
  w.add<T>("x", src, {2, 3});
  const auto f = SafeTensors::from_bytes(w.to_bytes());

  const TensorInfo& i = f.info("x");
  CHECK(i.dtype == dtype_of<T>());
  CHECK(i.shape == std::vector<std::int64_t>{2, 3});
  CHECK(i.end - i.begin == 6 * sizeof(T));
  CHECK(i.begin % sizeof(T) == 0);  // writer keeps every tensor aligned to its element size
  const Tensor<T> t = f.tensor<T>("x");
  REQUIRE(t.rank() == 2);
  REQUIRE(t.extent(0) == 2);
  REQUIRE(t.extent(1) == 3);
  const ConstView<T, 2> v = f.view<T, 2>("x");
  for (int r = 0; r < 2; ++r) {
    for (int c = 0; c < 3; ++c) {
      CHECK(t(r, c) == src[3 * r + c]);
      CHECK(v(r, c) == src[3 * r + c]);
    }
  }
  CHECK(f.scalar<std::uint8_t>("pad") == 9);
}

TEST_CASE("writer stores strided views row-major, and Tensors", "[safetensors]") {
  Tensor<float> a({3, 4});
  for (int i = 0; i < 12; ++i) a[i] = float(i);
  // Columns 1..2 of each row: a strided view.
  const ConstView<float, 2> cols = a.view<2>().slice(1, 1, 3);
  SafeTensorsWriter w;
  w.add("cols", cols);
  w.add("a", a);
  const auto f = SafeTensors::from_bytes(w.to_bytes());
  const Tensor<float> got = f.tensor<float>("cols");
  REQUIRE(got.extent(0) == 3);
  REQUIRE(got.extent(1) == 2);
  for (int r = 0; r < 3; ++r) {
    CHECK(got(r, 0) == float(4 * r + 1));
    CHECK(got(r, 1) == float(4 * r + 2));
  }
  CHECK(f.tensor<float>("a")(2, 3) == 11.0f);
}

TEST_CASE("BF16 and F16 convert to float bit-exactly", "[safetensors]") {
  struct Case {
    std::uint16_t bits;
    float want;
  };
  const float inf = std::numeric_limits<float>::infinity();
  // Hand-worked: bf16 is the top 16 bits of a float.
  const std::vector<Case> bf16 = {{0x3F80, 1.0f}, {0xC000, -2.0f}, {0x4049, 3.140625f},
                                  {0x7F80, inf},  {0xFF80, -inf},  {0x0001, std::ldexp(1.0f, -133)},
                                  {0x0000, 0.0f}};
  // IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
  const std::vector<Case> f16 = {{0x3C00, 1.0f},
                                 {0xC000, -2.0f},
                                 {0x3555, 0.333251953125f},                  // 1.0101010101b * 2^-2
                                 {0x7BFF, 65504.0f},                         // largest finite
                                 {0x0400, std::ldexp(1.0f, -14)},            // smallest normal
                                 {0x03FF, 1023.0f * std::ldexp(1.0f, -24)},  // largest subnormal
                                 {0x0001, std::ldexp(1.0f, -24)},            // smallest subnormal
                                 {0x8001, -std::ldexp(1.0f, -24)},
                                 {0x7C00, inf},
                                 {0xFC00, -inf}};
  for (const auto& c : bf16) {
    CAPTURE(c.bits);
    CHECK(bf16_to_float(c.bits) == c.want);
  }
  for (const auto& c : f16) {
    CAPTURE(c.bits);
    CHECK(half_to_float(c.bits) == c.want);
  }
  CHECK(std::isnan(bf16_to_float(0x7FC0)));
  CHECK(std::isnan(half_to_float(0x7E00)));
  CHECK(std::isnan(half_to_float(0x7C01)));  // signalling NaN stays NaN, not inf
  CHECK(std::signbit(half_to_float(0x8000)));
  CHECK(half_to_float(0x8000) == 0.0f);

  // Through the reader: stored as raw little-endian bit patterns.
  const auto le = [](const std::vector<Case>& cs) {
    Bytes b;
    for (const auto& c : cs) {
      b.push_back(static_cast<std::uint8_t>(c.bits & 0xFF));
      b.push_back(static_cast<std::uint8_t>(c.bits >> 8));
    }
    return b;
  };
  SafeTensorsWriter w;
  w.add_raw("b", DType::BF16, {std::int64_t(bf16.size())}, le(bf16));
  w.add_raw("h", DType::F16, {std::int64_t(f16.size())}, le(f16));
  w.add_raw("h0", DType::F16, {}, Bytes{0x00, 0x3C});
  const auto f = SafeTensors::from_bytes(w.to_bytes());
  const Tensor<float> b = f.tensor<float>("b");
  const Tensor<float> h = f.tensor<float>("h");
  for (std::size_t k = 0; k < bf16.size(); ++k) CHECK(b[k] == bf16[k].want);
  for (std::size_t k = 0; k < f16.size(); ++k) CHECK(h[k] == f16[k].want);
  CHECK(f.scalar<float>("h0") == 1.0f);
  // Conversion happens on request only: no zero-copy float view of 16-bit data.
  REQUIRE_THROWS_AS((f.view<float, 1>("h")), switchyard::shape_error);
  REQUIRE_THROWS_WITH((f.view<float, 1>("h")),
                      Contains("'h'") && Contains("F16") && Contains("tensor<float>()"));
  REQUIRE_THROWS_AS(f.tensor<double>("b"), switchyard::shape_error);
  REQUIRE_THROWS_AS(f.tensor<std::uint16_t>("b"), switchyard::shape_error);
}

TEST_CASE("float -> BF16: round to nearest even, and the writer's add_bf16", "[safetensors]") {
  const float inf = std::numeric_limits<float>::infinity();
  // Hand-worked: bf16 keeps the top 16 bits; the low 16 decide the rounding.
  CHECK(float_to_bf16(1.0f) == 0x3F80);
  CHECK(float_to_bf16(-2.0f) == 0xC000);
  // 1 + 2^-8 is halfway between bf16 1.0 (0x3F80, even) and 1 + 2^-7 (0x3F81): to even.
  CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);
  // 1 + 3 * 2^-8 is halfway between 0x3F81 (odd) and 0x3F82 (even): up to even.
  CHECK(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82);
  // Just above halfway rounds up, just below down.
  CHECK(float_to_bf16(std::bit_cast<float>(0x3F808001u)) == 0x3F81);
  CHECK(float_to_bf16(std::bit_cast<float>(0x3F807FFFu)) == 0x3F80);
  CHECK(float_to_bf16(3.14159265f) == 0x4049);  // 3.140625, the nearest bf16
  CHECK(float_to_bf16(inf) == 0x7F80);
  CHECK(float_to_bf16(-inf) == 0xFF80);
  CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7F80);  // past bf16's max: inf
  CHECK(float_to_bf16(std::bit_cast<float>(0x7F7F0000u)) == 0x7F7F);  // bf16's max stays
  const std::uint16_t nan = float_to_bf16(std::bit_cast<float>(0x7F800001u));  // payload low
  CHECK(std::isnan(bf16_to_float(nan)));  // truncating would have made it inf
  CHECK(std::signbit(bf16_to_float(float_to_bf16(-std::nanf("")))));
  CHECK(float_to_bf16(-0.0f) == 0x8000);

  // Through the writer: a Tensor, a strided view; read back as float.
  Tensor<float> a({2, 3});
  for (int i = 0; i < 6; ++i) a[i] = 1.0f + float(i) * std::ldexp(1.0f, -9);  // some not bf16
  SafeTensorsWriter w;
  w.add_bf16("a", a);
  w.add_bf16("cols", a.view<2>().slice(1, 1, 3));
  const auto f = SafeTensors::from_bytes(w.to_bytes());
  CHECK(f.info("a").dtype == DType::BF16);
  const Tensor<float> got = f.tensor<float>("a");
  REQUIRE(got.extent(0) == 2);
  REQUIRE(got.extent(1) == 3);
  for (int i = 0; i < 6; ++i) CHECK(got[i] == bf16_to_float(float_to_bf16(a[i])));
  const Tensor<float> cols = f.tensor<float>("cols");
  REQUIRE(cols.extent(1) == 2);
  CHECK(cols(1, 0) == got(1, 1));
  CHECK(cols(1, 1) == got(1, 2));
  REQUIRE_THROWS_AS(w.add_bf16("a", a), switchyard::error);  // duplicate name
}

TEST_CASE("0-d scalars come back as shape [1]", "[safetensors]") {
  SafeTensorsWriter w;
  const double x = -3.5;
  const std::int64_t n = 42;
  w.add<double>("x", &x, {});
  w.add<std::int64_t>("n", &n, {1, 1});
  const auto f = SafeTensors::from_bytes(w.to_bytes());
  CHECK(f.info("x").shape.empty());
  CHECK(f.info("x").numel() == 1);
  CHECK(f.info("x").end - f.info("x").begin == 8);
  CHECK(f.scalar<double>("x") == -3.5);
  CHECK(f.scalar<std::int64_t>("n") == 42);  // one element of any rank
  const Tensor<double> t = f.tensor<double>("x");
  CHECK(t.rank() == 1);
  CHECK(t.extent(0) == 1);
  CHECK(t[0] == -3.5);
  CHECK(f.view<double, 1>("x")(0) == -3.5);
  REQUIRE_THROWS_AS((f.view<double, 2>("x")), switchyard::shape_error);
  REQUIRE_THROWS_AS(f.scalar<float>("x"), switchyard::shape_error);
}

TEST_CASE("empty tensors (a zero extent) round trip", "[safetensors]") {
  SafeTensorsWriter w;
  w.add<float>("e0", nullptr, {0, 3});
  w.add<float>("e1", nullptr, {2, 0});
  const float one = 1.0f;
  w.add<float>("one", &one, {1});
  const auto f = SafeTensors::from_bytes(w.to_bytes());
  CHECK(f.info("e0").numel() == 0);
  CHECK(f.info("e0").begin == f.info("e0").end);
  const Tensor<float> t = f.tensor<float>("e0");
  CHECK(t.rank() == 2);
  CHECK(t.extent(0) == 0);
  CHECK(t.extent(1) == 3);
  CHECK(f.view<float, 2>("e1").extent(1) == 0);
  CHECK(f.view<float, 2>("e1").numel() == 0);
  CHECK(f.scalar<float>("one") == 1.0f);
  REQUIRE_THROWS_AS(f.scalar<float>("e0"), switchyard::shape_error);
  REQUIRE_THROWS_WITH(f.scalar<float>("e0"), Contains("'e0'") && Contains("[0, 3]"));
}

TEST_CASE("metadata round trips; absent metadata is an empty map", "[safetensors]") {
  SafeTensorsWriter w;
  w.set_metadata("format", "switchyard golden fixture v1");
  w.set_metadata("json", "{\"a\": [1, 2]}");
  w.set_metadata("format", "pt");  // replaces
  const auto f = SafeTensors::from_bytes(w.to_bytes());
  CHECK(f.metadata() ==
        std::map<std::string, std::string>{{"format", "pt"}, {"json", "{\"a\": [1, 2]}"}});
  CHECK(f.names().empty());
  CHECK(SafeTensors::from_bytes(SafeTensorsWriter().to_bytes()).metadata().empty());
}

TEST_CASE("save and open through a file", "[safetensors]") {
  const auto path = (std::filesystem::temp_directory_path() /
                     ("switchyard_test_" + std::to_string(::getpid()) + ".safetensors"))
                        .string();
  SafeTensorsWriter w;
  const std::int32_t v[3] = {1, -2, 3};
  w.add<std::int32_t>("v", v, {3});
  w.set_metadata("k", "v");
  w.save(path);
  const auto f = SafeTensors::open(path);
  std::filesystem::remove(path);
  CHECK(f.source() == path);
  CHECK(f.view<std::int32_t, 1>("v")(1) == -2);
  CHECK(f.metadata().at("k") == "v");
  // The header is padded to a multiple of 8, as the fixtures' format notes require.
  const Bytes b = w.to_bytes();
  std::uint64_t n = 0;
  std::memcpy(&n, b.data(), 8);
  CHECK(n % 8 == 0);
}

// ---- errors ----------------------------------------------------------------------------------

TEST_CASE("truncated files and bad header lengths", "[safetensors][error]") {
  REQUIRE_THROWS_AS(load(Bytes{}), switchyard::error);
  REQUIRE_THROWS_WITH(load(Bytes{}), Contains("SafeTensors") && Contains("bad.safetensors") &&
                                         Contains("0 bytes") && Contains("too short"));
  REQUIRE_THROWS_WITH(load(Bytes(7, 0)), Contains("7 bytes") && Contains("too short"));

  Bytes past;
  put_u64(past, 1000);
  past.insert(past.end(), 12, ' ');
  REQUIRE_THROWS_AS(load(past), switchyard::error);
  REQUIRE_THROWS_WITH(load(past),
                      Contains("header length 1000") && Contains("runs past the end of the file"));
  // A length near 2^64 must not wrap around when added to 8.
  Bytes huge;
  put_u64(huge, ~0ull);
  huge.insert(huge.end(), 8, ' ');
  REQUIRE_THROWS_WITH(load(huge), Contains("runs past the end"));

  // A valid file cut short: the tensor's bytes are missing.
  const Bytes ok = raw_file("{" + entry("a", "F32", "[4]", 0, 16) + "}", Bytes(16, 0));
  REQUIRE_NOTHROW(load(ok));
  const Bytes cut(ok.begin(), ok.end() - 1);
  REQUIRE_THROWS_WITH(load(cut), Contains("'a'") && Contains("run past the end of the data"));
}

TEST_CASE("header JSON errors", "[safetensors][error]") {
  struct Case {
    std::string header, words1, words2;
  };
  const Case c = GENERATE(
      Case{"{\"a\":", "not valid JSON", ""}, Case{"[1, 2]", "must be a JSON object", "array"},
      Case{"\"text\"", "must be a JSON object", "string"},
      Case{"{\"a\": 5}", "'a'", "entry must be a JSON object"},
      Case{"{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", "'a'", "missing \"dtype\""},
      Case{"{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", "'a'", "missing \"shape\""},
      Case{"{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", "'a'", "missing \"data_offsets\""},
      Case{"{\"a\":{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}}", "'a'",
           "\"dtype\" must be a string"},
      Case{"{\"a\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,4]}}", "'a'",
           "\"shape\" must be an array"},
      Case{"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}", "'a'",
           "non-integer extent"},
      Case{"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", "'a'",
           "\"data_offsets\" must be [begin, end]"},
      Case{"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", "'a'",
           "\"data_offsets\" must be [begin, end]"},
      Case{"{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("a", "F32", "[1]", 4, 8) + "}",
           "duplicate", "'a'"},
      Case{"{\"a\":{\"dtype\":\"F32\",\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
           "duplicate", "'dtype'"});
  CAPTURE(c.header);
  const Bytes b = raw_file(c.header, Bytes(8, 0));
  REQUIRE_THROWS_AS(load(b), switchyard::error);
  REQUIRE_THROWS_WITH(load(b), Contains("SafeTensors::from_bytes") &&
                                   Contains("'bad.safetensors'") && Contains(c.words1) &&
                                   Contains(c.words2));
}

TEST_CASE("tensor entry errors", "[safetensors][error]") {
  struct Case {
    std::string header, words1, words2;
  };
  const Case c = GENERATE(
      Case{"{" + entry("a", "F8_E4M3", "[8]", 0, 8) + "}", "unknown or unsupported dtype",
           "F8_E4M3"},
      Case{"{" + entry("a", "f32", "[2]", 0, 8) + "}", "unknown or unsupported dtype", "f32"},
      Case{"{" + entry("a", "F32", "[3]", 0, 8) + "}", "needs 12 bytes", "span 8"},
      Case{"{" + entry("a", "I64", "[2]", 0, 8) + "}", "needs 16 bytes", "span 8"},
      Case{"{" + entry("a", "F32", "[4]", 0, 16) + "}", "run past the end of the data section",
           "8 bytes"},
      Case{"{" + entry("a", "U8", "[1]", 8, 9) + "}", "run past the end", "[8, 9]"},
      Case{"{" + entry("a", "F32", "[1]", 8, 4) + "}", "begin > end", "[8, 4]"},
      Case{"{" + entry("a", "F32", "[-1]", 0, 0) + "}", "negative", "-1"},
      Case{"{" + entry("a", "F32", "[4294967296, 4294967296]", 0, 8) + "}", "overflow",
           "[4294967296, 4294967296]"},
      Case{"{" + entry("a", "F64", "[4611686018427387904]", 0, 8) + "}", "overflow", "F64"},
      Case{"{" + entry("a", "F32", "[99999999999999999999]", 0, 8) + "}", "'a'", "extent"},
      Case{"{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "U8", "[4]", 4, 8) + "}",
           "overlapping", "'a' [0, 8) and 'b' [4, 8)"},
      Case{"{" + entry("a", "U8", "[8]", 0, 8) + "," + entry("b", "U8", "[2]", 3, 5) + "}",
           "overlapping", "'b'"},
      Case{"{" + entry("a", "BOOL", "[8]", 0, 8) + "}", "BOOL element 2", "must be 0 or 1"},
      Case{"{\"__metadata__\":{\"k\":1}}", "__metadata__", "must be a string"},
      Case{"{\"__metadata__\":[\"k\"]}", "__metadata__", "must be a JSON object"});
  CAPTURE(c.header);
  const Bytes data = {0, 1, 2, 0, 0, 0, 0, 0};  // byte 2 is not a valid bool
  const Bytes b = raw_file(c.header, data);
  REQUIRE_THROWS_AS(load(b), switchyard::error);
  REQUIRE_THROWS_WITH(load(b), Contains("SafeTensors::from_bytes") &&
                                   Contains("'bad.safetensors'") && Contains(c.words1) &&
                                   Contains(c.words2));
}

TEST_CASE("deeply nested headers are rejected without recursion", "[safetensors][error]") {
  // 100k nested '[' used to overflow the stack in the recursive dump() of the error path.
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const std::string in_shape =
      "{\"a\":{\"dtype\":\"F32\",\"shape\":" + deep + ",\"data_offsets\":[0,4]}}";
  const std::string in_offsets =
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0," + deep + "]}}";
  const std::string in_metadata = "{\"__metadata__\":{\"k\":" + deep + "}}";
  std::string unclosed = "{\"a\":";  // objects this time, and never closed
  for (int i = 0; i < 100000; ++i) unclosed += "{\"b\":";
  for (const std::string& header : {in_shape, in_offsets, in_metadata, unclosed, deep}) {
    const Bytes b = raw_file(header, Bytes(8, 0));
    REQUIRE_THROWS_AS(load(b), switchyard::error);
    REQUIRE_THROWS_WITH(load(b), Contains("SafeTensors::from_bytes") &&
                                     Contains("'bad.safetensors'") && Contains("nest") &&
                                     Contains("64"));
  }
  // Nesting up to the bound is only an ordinary type error.
  const std::string nested_ok = std::string(60, '[') + std::string(60, ']');
  const Bytes ok_depth =
      raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[" + nested_ok + "],\"data_offsets\":[0,4]}}",
               Bytes(8, 0));
  REQUIRE_THROWS_WITH(load(ok_depth), Contains("non-integer extent") && Contains("array"));
}

TEST_CASE("values quoted in errors are truncated", "[safetensors][error]") {
  const std::string long_text(100000, 'x');
  for (const std::string& header :
       {"{\"a\":{\"dtype\":\"F32\",\"shape\":[\"" + long_text + "\"],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"" + long_text + "\",\"shape\":[1],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,\"" + long_text + "\"]}}",
        "{\"" + long_text + "\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,8]}}",
        "{\"a\":\"" + long_text + "\x01\"}"}) {
    try {
      (void)load(raw_file(header, Bytes(8, 0)));
      FAIL("no error");
    } catch (const switchyard::error& e) {
      CAPTURE(std::string(e.what()).substr(0, 300));
      CHECK(std::string(e.what()).size() < 1000);
      CHECK_THAT(e.what(), Contains("'bad.safetensors'") && Contains("..."));
    }
  }
}

TEST_CASE("every partial product of a shape is bounded", "[safetensors][error]") {
  // [0, 2^62, 2^62] has 0 elements, but its row-major strides overflow int64.
  struct Case {
    std::string shape, words;
  };
  const Case c = GENERATE(Case{"[0,4611686018427387904,4611686018427387904]",
                               "[0, 4611686018427387904, 4611686018427387904]"},
                          Case{"[4611686018427387904,4611686018427387904,0]", "0]"},
                          Case{"[3037000500,3037000500,0]", "[3037000500, 3037000500, 0]"},
                          Case{"[0,1099511627777]", "[0, 1099511627777]"});
  CAPTURE(c.shape);
  const Bytes b = raw_file("{" + entry("a", "F32", c.shape, 0, 0) + "}", Bytes(8, 0));
  REQUIRE_THROWS_AS(load(b), switchyard::error);
  REQUIRE_THROWS_WITH(load(b), Contains("'a'") && Contains(c.words) && Contains("too large"));
  // Large but sane empty shapes still load, and their views have exact strides.
  const Bytes fine = raw_file("{" + entry("z", "F32", "[0,65536,65536]", 0, 0) + "}");
  const auto f = load(fine);
  CHECK(f.view<float, 3>("z").stride(0) == std::int64_t(1) << 32);
}

TEST_CASE("gaps, adjacent tensors and shared empty offsets are fine", "[safetensors]") {
  const std::string header = "{" + entry("a", "U8", "[2]", 0, 2) + "," +
                             entry("b", "U8", "[2]", 4, 6) + "," + entry("e", "F32", "[0]", 2, 2) +
                             "," + entry("z", "F32", "[0,5]", 2, 2) + "}";
  const auto f = load(raw_file(header, Bytes{1, 2, 3, 4, 5, 6, 7, 8}));
  CHECK(f.names() == std::vector<std::string>{"a", "e", "z", "b"});
  CHECK(f.view<std::uint8_t, 1>("b")(1) == 6);
}

TEST_CASE("open reports missing files and directories", "[safetensors][error]") {
  const std::string missing = fixture_path("no_such_file.safetensors");
  REQUIRE_THROWS_AS(SafeTensors::open(missing), switchyard::error);
  REQUIRE_THROWS_WITH(SafeTensors::open(missing), Contains("SafeTensors::open") &&
                                                      Contains("no_such_file.safetensors") &&
                                                      Contains("cannot open"));
  REQUIRE_THROWS_WITH(SafeTensors::open(SWITCHYARD_FIXTURE_DIR), Contains("not a regular file"));
  REQUIRE_THROWS_AS(open_fixture("no_such_file.safetensors"), switchyard::error);
}

TEST_CASE("view/tensor with the wrong name, dtype or rank", "[safetensors][error]") {
  SafeTensorsWriter w;
  const float x[6] = {};
  w.add<float>("x", x, {2, 3});
  const auto f = SafeTensors::from_bytes(w.to_bytes(), "w.safetensors");

  REQUIRE_THROWS_AS(f.info("nope"), switchyard::error);
  REQUIRE_THROWS_WITH(f.info("nope"),
                      Contains("'nope'") && Contains("w.safetensors") && Contains("'x'"));
  REQUIRE_THROWS_AS(f.tensor<float>("nope"), switchyard::error);

  REQUIRE_THROWS_AS((f.view<std::int32_t, 2>("x")), switchyard::shape_error);
  REQUIRE_THROWS_WITH((f.view<std::int32_t, 2>("x")), Contains("SafeTensors::view") &&
                                                          Contains("'x'") &&
                                                          Contains("dtype F32") && Contains("I32"));
  REQUIRE_THROWS_AS((f.view<double, 2>("x")), switchyard::shape_error);
  REQUIRE_THROWS_AS(f.tensor<double>("x"), switchyard::shape_error);
  REQUIRE_THROWS_WITH(f.tensor<double>("x"), Contains("SafeTensors::tensor") && Contains("F64"));

  REQUIRE_THROWS_AS((f.view<float, 3>("x")), switchyard::shape_error);
  REQUIRE_THROWS_WITH((f.view<float, 3>("x")), Contains("SafeTensors::view") && Contains("'x'") &&
                                                   Contains("[2, 3]") && Contains("rank 3"));
  REQUIRE_THROWS_AS((f.view<float, 1>("x")), switchyard::shape_error);
  REQUIRE_THROWS_AS(f.scalar<float>("x"), switchyard::shape_error);

  // Rank 5 exists in files but not in Tensor.
  const auto g = load(raw_file("{" + entry("r5", "U8", "[1,1,1,1,2]", 0, 2) + "}", Bytes{1, 2}));
  REQUIRE_THROWS_AS(g.tensor<std::uint8_t>("r5"), switchyard::shape_error);
  REQUIRE_THROWS_WITH(g.tensor<std::uint8_t>("r5"), Contains("[1, 1, 1, 1, 2]"));
  CHECK(g.bytes("r5").size() == 2);
}

TEST_CASE("a misaligned tensor is copied, never viewed in place", "[safetensors][error]") {
  // Valid per the format, but F32 at data offset 2: no aligned zero-copy view exists.
  const std::string header =
      "{" + entry("u", "U8", "[2]", 0, 2) + "," + entry("f", "F32", "[1]", 2, 6) + "}";
  const auto f = load(raw_file(header, Bytes{0, 0, 0x00, 0x00, 0x80, 0x3F}));
  REQUIRE_THROWS_AS((f.view<float, 1>("f")), switchyard::error);
  REQUIRE_THROWS_WITH((f.view<float, 1>("f")),
                      Contains("'f'") && Contains("offset 2") && Contains("not a multiple of 4"));
  CHECK(f.tensor<float>("f")[0] == 1.0f);
  CHECK(f.scalar<float>("f") == 1.0f);
}

TEST_CASE("writer errors", "[safetensors][error]") {
  SafeTensorsWriter w;
  const float x = 0;
  w.add<float>("x", &x, {1});
  REQUIRE_THROWS_AS(w.add<float>("x", &x, {1}), switchyard::error);
  REQUIRE_THROWS_WITH(w.add<float>("x", &x, {1}), Contains("'x'") && Contains("already added"));
  REQUIRE_THROWS_WITH(w.add<float>("__metadata__", &x, {1}), Contains("reserved"));
  REQUIRE_THROWS_WITH(w.add<float>("n", &x, {-1}), Contains("negative"));
  REQUIRE_THROWS_WITH(w.add_raw("h", DType::F16, {2}, Bytes{0, 0, 0}),
                      Contains("'h'") && Contains("3 bytes") && Contains("needs 4"));
  REQUIRE_THROWS_AS(w.save("/nonexistent_dir_for_switchyard/x.safetensors"), switchyard::error);
}

TEST_CASE("writer rejects shapes whose element count overflows", "[safetensors][error]") {
  SafeTensorsWriter w;
  const float x = 0;
  // 2^62 * 2^62 used to wrap to 0 elements and be accepted.
  REQUIRE_THROWS_AS(w.add<float>("x", &x, {std::int64_t(1) << 62, std::int64_t(1) << 62}),
                    switchyard::error);
  REQUIRE_THROWS_WITH(w.add<float>("x", &x, {std::int64_t(1) << 62, std::int64_t(1) << 62}),
                      Contains("'x'") && Contains("too large"));
  REQUIRE_THROWS_WITH(
      w.add_raw("h", DType::F16, {std::numeric_limits<std::int64_t>::max(), 4}, Bytes{}),
      Contains("'h'") && Contains("too large"));
  REQUIRE_THROWS_AS(w.add<float>("z", &x, {0, std::int64_t(1) << 62, std::int64_t(1) << 62}),
                    switchyard::error);
}

// ---- golden fixtures -------------------------------------------------------------------------

TEST_CASE("every golden fixture loads", "[safetensors][fixture]") {
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(SWITCHYARD_FIXTURE_DIR)) {
    if (e.path().extension() == ".safetensors") files.push_back(e.path());
  }
  REQUIRE(files.size() >= 20);
  for (const auto& p : files) {
    CAPTURE(p.filename().string());
    const auto f = open_fixture(p.filename().string());
    CHECK(f.metadata().at("format") == "switchyard golden fixture v1");
    CHECK(f.metadata().at("case") == p.stem().string());
    REQUIRE(f.size() > 0);
    // The fixtures are packed back to back from offset 0 (README "File layout").
    std::uint64_t expect_begin = 0;
    for (const auto& i : f.infos()) {
      CAPTURE(i.name);
      CHECK((i.dtype == DType::F32 || i.dtype == DType::I64));
      CHECK(i.begin == expect_begin);
      expect_begin = i.end;
    }
    CHECK(std::isfinite(touch_all(f)));
    // open() and from_bytes() agree on the same bytes.
    std::ifstream in(p, std::ios::binary);
    const Bytes raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto g = SafeTensors::from_bytes(raw, p.string());
    CHECK(g.names() == f.names());
    CHECK(g.metadata() == f.metadata());
  }
}

TEST_CASE("dense fixture: q, k, v, out are [1, 8, 128, 64] F32", "[safetensors][fixture]") {
  const auto f = open_fixture("dense_B1_H8_L128_d64_noncausal.safetensors");
  for (const char* name : {"q", "k", "v", "out"}) {
    CAPTURE(name);
    CHECK(f.info(name).dtype == DType::F32);
    CHECK(f.info(name).shape == std::vector<std::int64_t>{1, 8, 128, 64});
    const ConstView<float, 4> v = f.view<float, 4>(name);
    CHECK(v.extent(2) == 128);
    CHECK(reinterpret_cast<std::uintptr_t>(v.data()) % 64 == 0);  // data section is 64-aligned
    const Tensor<float> t = f.tensor<float>(name);
    CHECK(std::memcmp(t.data(), v.data(), sizeof(float) * t.numel()) == 0);
  }
}

// ---- mutation ("fuzz") loop ------------------------------------------------------------------

TEST_CASE("mutated files load or throw switchyard::error, never crash", "[safetensors][fuzz]") {
  SafeTensorsWriter w;
  const float f32[6] = {1, 2, 3, 4, 5, 6};
  const std::int64_t i64[2] = {-1, 7};
  const bool b[3] = {true, false, true};
  const double s = 0.25;
  w.add<float>("f", f32, {2, 3});
  w.add<std::int64_t>("i", i64, {2});
  w.add<bool>("b", b, {3});
  w.add<double>("s", &s, {});
  w.add<float>("e", nullptr, {0, 2});
  w.add_raw("h", DType::F16, {2}, Bytes{0x00, 0x3C, 0x01, 0x00});
  w.set_metadata("format", "pt");
  const Bytes valid = w.to_bytes();
  REQUIRE_NOTHROW(touch_all(SafeTensors::from_bytes(valid)));

  std::mt19937_64 rng(20261123);
  int loaded = 0, rejected = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    Bytes m = valid;
    const int kind = static_cast<int>(rng() % 4);
    if (kind == 3) {
      m.resize(rng() % m.size());  // truncate
    } else {
      const int edits = 1 + static_cast<int>(rng() % 3);
      for (int e = 0; e < edits; ++e) {
        // Mostly the header (where the structure is), sometimes the length or data.
        const std::size_t pos = kind == 0   ? rng() % 8
                                : kind == 1 ? 8 + rng() % (m.size() - 8)
                                            : rng() % m.size();
        const std::uint8_t choices[] = {'0', '9', '-', ',', '"', '[', ']', '{', '}', 0xFF, 0};
        m[pos] = (rng() % 2) ? static_cast<std::uint8_t>(rng()) : choices[rng() % sizeof(choices)];
      }
    }
    try {
      const auto f = SafeTensors::from_bytes(m);
      touch_all(f);
      ++loaded;
    } catch (const switchyard::error&) {
      ++rejected;
    } catch (const std::exception& e) {
      // Only a dtype/rank request may raise shape_error; touch_all asks for the right ones.
      FAIL("unexpected exception type: " << e.what());
    }
  }
  CHECK(loaded + rejected == 4000);
  CHECK(rejected > 1000);  // the mutations do reach the validator
  CHECK(loaded > 0);       // ... and do not all break the file (data-only edits load)
}

// ---- memory mapping and load modes -----------------------------------------------------------

namespace {

void write_file(const std::filesystem::path& p, const Bytes& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  out.close();
  REQUIRE(out.good());
}

bool inside(std::span<const std::byte> outer, const void* p, std::size_t n) {
  const auto* b = static_cast<const std::byte*>(p);
  return b >= outer.data() && b + n <= outer.data() + outer.size();
}

}  // namespace

TEST_CASE("open maps the file by default; read mode copies; both agree", "[safetensors][mmap]") {
  TempDir dir("st_modes");
  SafeTensorsWriter w;
  const float f32[6] = {1, -2, 3.5f, 4, 5, 6};
  const std::int64_t i64[2] = {-1, 1ll << 40};
  const bool flags[3] = {true, false, true};
  w.add<float>("f", f32, {2, 3});
  w.add<std::int64_t>("i", i64, {2});
  w.add<bool>("b", flags, {3});
  w.add<float>("e", nullptr, {0, 4});
  w.add_bf16("h", f32, {6});
  const auto path = dir.path / "m.safetensors";
  w.save(path);

  const auto mapped = SafeTensors::open(path);
  const auto read = SafeTensors::open(path, LoadMode::read);
  CHECK(mapped.load_mode() == (can_map_files ? LoadMode::map : LoadMode::read));
  CHECK(read.load_mode() == LoadMode::read);
  CHECK(SafeTensors::from_bytes(w.to_bytes()).load_mode() == LoadMode::read);
  CHECK(mapped.source() == path.string());
  CHECK(mapped.names() == read.names());
  CHECK(mapped.data_section().size() == read.data_section().size());
  for (const auto& i : mapped.infos()) {
    CAPTURE(i.name);
    const auto a = mapped.bytes(i.name);
    const auto b = read.bytes(i.name);
    REQUIRE(a.size() == b.size());
    CHECK(std::memcmp(a.data(), b.data(), a.size()) == 0);
    CHECK(inside(mapped.data_section(), a.data(), a.size()));
  }
  const ConstView<float, 2> v = mapped.view<float, 2>("f");
  CHECK(v(1, 0) == 4.0f);
  CHECK(reinterpret_cast<const void*>(v.data()) == mapped.bytes("f").data());  // zero-copy
  CHECK(mapped.view<std::int64_t, 1>("i")(1) == (1ll << 40));
  CHECK(mapped.tensor<bool>("b")[2]);
  CHECK(mapped.view<float, 2>("e").numel() == 0);
  CHECK(mapped.tensor<float>("h")[2] == 3.5f);
  CHECK(read.view<float, 2>("f")(0, 2) == 3.5f);
  CHECK(reinterpret_cast<std::uintptr_t>(read.data_section().data()) % 64 == 0);
}

TEST_CASE("copies share the mapping, which outlives the original", "[safetensors][mmap]") {
  TempDir dir("st_copies");
  SafeTensorsWriter w;
  const std::int32_t x[4] = {10, 20, 30, 40};
  w.add<std::int32_t>("x", x, {4});
  const auto path = dir.path / "c.safetensors";
  w.save(path);

  ConstView<std::int32_t, 1> v;
  std::optional<SafeTensors> copy;
  {
    const auto original = SafeTensors::open(path);
    v = original.view<std::int32_t, 1>("x");
    copy = original;  // shares, does not map again
    CHECK(copy->data_section().data() == original.data_section().data());
    SafeTensors moved = SafeTensors(original);
    CHECK(moved.view<std::int32_t, 1>("x").data() == v.data());
  }  // the original and the moved-to object are gone; the copy keeps the mapping
  CHECK(v(3) == 40);
  CHECK(copy->view<std::int32_t, 1>("x")(0) == 10);
  copy.reset();  // the last owner unmaps (once: ASan and the kernel would see a double unmap)
}

TEST_CASE("an empty data section opens in both modes", "[safetensors][mmap]") {
  TempDir dir("st_empty");
  SafeTensorsWriter w;
  w.set_metadata("format", "pt");
  w.add<float>("e", nullptr, {0, 3});
  const auto path = dir.path / "e.safetensors";
  w.save(path);
  for (const LoadMode mode : {LoadMode::map, LoadMode::read}) {
    const auto f = SafeTensors::open(path, mode);
    CHECK(f.data_section().empty());
    CHECK(f.names() == std::vector<std::string>{"e"});
    CHECK(f.view<float, 2>("e").numel() == 0);
    CHECK(f.tensor<float>("e").extent(1) == 3);
    CHECK(f.metadata().at("format") == "pt");
    CHECK(f.intact());
  }
  // No tensors at all: only the 8-byte length and "{}" padded.
  SafeTensorsWriter().save(dir.path / "none.safetensors");
  CHECK(SafeTensors::open(dir.path / "none.safetensors").size() == 0);
}

TEST_CASE("short and malformed files are rejected before mapping", "[safetensors][mmap][error]") {
  TempDir dir("st_short");
  for (const LoadMode mode : {LoadMode::map, LoadMode::read}) {
    write_file(dir.path / "zero.safetensors", {});
    REQUIRE_THROWS_WITH(SafeTensors::open(dir.path / "zero.safetensors", mode),
                        Contains("SafeTensors::open") && Contains("zero.safetensors") &&
                            Contains("0 bytes") && Contains("too short"));
    write_file(dir.path / "seven.safetensors", Bytes(7, 0));
    REQUIRE_THROWS_WITH(SafeTensors::open(dir.path / "seven.safetensors", mode),
                        Contains("7 bytes") && Contains("too short"));
    // The tensor's bytes are cut off: caught at open, never a fault on access.
    const Bytes ok = raw_file("{" + entry("a", "F32", "[4]", 0, 16) + "}", Bytes(16, 0));
    write_file(dir.path / "cut.safetensors", Bytes(ok.begin(), ok.end() - 1));
    REQUIRE_THROWS_WITH(
        SafeTensors::open(dir.path / "cut.safetensors", mode),
        Contains("cut.safetensors") && Contains("'a'") && Contains("run past the end of the data"));
    write_file(dir.path / "bool.safetensors",
               raw_file("{" + entry("b", "BOOL", "[2]", 0, 2) + "}", Bytes{1, 7}));
    REQUIRE_THROWS_WITH(SafeTensors::open(dir.path / "bool.safetensors", mode),
                        Contains("'b'") && Contains("must be 0 or 1"));
  }
}

TEST_CASE("every golden fixture maps, and agrees with read mode", "[safetensors][mmap][fixture]") {
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(SWITCHYARD_FIXTURE_DIR)) {
    if (e.path().extension() != ".safetensors") continue;
    CAPTURE(e.path().filename().string());
    ++files;
    const auto m = SafeTensors::open(e.path(), LoadMode::map);
    const auto r = SafeTensors::open(e.path(), LoadMode::read);
    REQUIRE(m.names() == r.names());
    CHECK(m.metadata() == r.metadata());
    for (const auto& i : m.infos()) {
      CAPTURE(i.name);
      CHECK(std::memcmp(m.bytes(i.name).data(), r.bytes(i.name).data(), i.nbytes()) == 0);
      if (i.dtype == DType::F32 && !i.shape.empty() && i.shape.size() <= 4) {
        // Fixture headers are padded to 8 bytes, so F32 views are aligned in the mapping.
        const auto t = m.tensor<float>(i.name);
        CHECK(std::memcmp(t.data(), m.bytes(i.name).data(), i.nbytes()) == 0);
      }
    }
    CHECK(std::isfinite(touch_all(m)));
  }
  CHECK(files >= 20);
  const auto d = open_fixture("dense_B1_H8_L128_d64_noncausal.safetensors", LoadMode::map);
  const ConstView<float, 4> q = d.view<float, 4>("q");
  CHECK(reinterpret_cast<std::uintptr_t>(q.data()) % alignof(float) == 0);
  CHECK(inside(d.data_section(), q.data(), sizeof(float) * q.numel()));
}

TEST_CASE("a mapped tensor at a misaligned file offset is copied, never viewed",
          "[safetensors][mmap][error]") {
  // Header length 141: the data section starts at byte 149 of the file, so in a mapping
  // (page-aligned base) the F32 tensor at data offset 8 sits at an address = 1 mod 4.
  const std::string header = "{" + entry("w", "F32", "[2]", 8, 16) + "," +
                             entry("idx", "I64", "[1]", 0, 8) +
                             ",\"__metadata__\":{\"format\":\"pt\"}}";
  REQUIRE(header.size() == 141);
  Bytes data;
  put_u64(data, 7);
  for (std::uint8_t b : {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0}) data.push_back(b);
  TempDir dir("st_align");
  const auto path = dir.path / "odd.safetensors";
  write_file(path, raw_file(header, data));

  const auto r = SafeTensors::open(path, LoadMode::read);
  CHECK(r.view<float, 1>("w")(1) == -2.0f);  // the copy is 64-byte aligned
  if (!can_map_files) return;
  const auto m = SafeTensors::open(path, LoadMode::map);
  REQUIRE_THROWS_AS((m.view<float, 1>("w")), switchyard::error);
  REQUIRE_THROWS_WITH((m.view<float, 1>("w")),
                      Contains("SafeTensors::view") && Contains("odd.safetensors") &&
                          Contains("'w'") && Contains("offset 8") && Contains("byte 157") &&
                          Contains("not a multiple of 4") && Contains("memory-mapped"));
  REQUIRE_THROWS_WITH((m.view<std::int64_t, 1>("idx")),
                      Contains("'idx'") && Contains("not a multiple of 8"));
  CHECK(m.tensor<float>("w")[0] == 1.0f);  // tensor<T>() copies, whatever the alignment
  CHECK(m.tensor<std::int64_t>("idx")[0] == 7);
  CHECK(std::to_integer<int>(m.bytes("w")[3]) == 0x3F);  // bytes() has no alignment
}

TEST_CASE("intact / check_intact notice a file truncated after open", "[safetensors][mmap]") {
  TempDir dir("st_trunc");
  SafeTensorsWriter w;
  std::vector<float> big(4096, 1.5f);
  w.add<float>("big", big.data(), {4096});
  const auto path = dir.path / "t.safetensors";
  w.save(path);
  const auto size_at_open = std::filesystem::file_size(path);

  const auto m = SafeTensors::open(path, LoadMode::map);
  const auto r = SafeTensors::open(path, LoadMode::read);
  CHECK(m.intact());
  REQUIRE_NOTHROW(m.check_intact());
  CHECK(m.view<float, 1>("big")(4095) == 1.5f);

  std::filesystem::resize_file(path, 100);  // another process truncating the file
  CHECK(r.intact());                        // read mode holds its own copy
  CHECK(r.view<float, 1>("big")(4095) == 1.5f);
  if (!can_map_files) return;
  CHECK_FALSE(m.intact());
  REQUIRE_THROWS_AS(m.check_intact(), switchyard::error);
  REQUIRE_THROWS_WITH(m.check_intact(),
                      Contains("SafeTensors::check_intact") && Contains(path.string()) &&
                          Contains(std::to_string(size_at_open) + " bytes at open") &&
                          Contains("100 bytes now") && Contains("SIGBUS"));
  // (The mapped tensor is not touched now: pages past the new end would raise SIGBUS.)
  std::filesystem::resize_file(path, size_at_open);  // same size again: intact by size
  CHECK(m.intact());
}

// ---- BF16 / F16 as their own element types ---------------------------------------------------

TEST_CASE("BF16 and F16 tensors are viewed in place as bf16 / f16", "[safetensors][half]") {
  using switchyard::bf16;
  using switchyard::f16;
  STATIC_REQUIRE(has_dtype_v<bf16>);
  STATIC_REQUIRE(has_dtype_v<f16>);
  STATIC_REQUIRE(dtype_of<bf16>() == DType::BF16);
  STATIC_REQUIRE(dtype_of<f16>() == DType::F16);
  STATIC_REQUIRE_FALSE(has_dtype_v<long double>);

  // Hand-worked bits: bf16 0x3F80 = 1, 0xC000 = -2, 0x4049 = 3.140625, 0x3E80 = 0.25,
  // 0xBF40 = -0.75, 0x4120 = 10; f16 0x3C00 = 1, 0xC000 = -2, 0x3555 = 0.333251953125,
  // 0x7BFF = 65504, 0x0001 = 2^-24, 0xB800 = -0.5.
  const std::uint16_t b_bits[6] = {0x3F80, 0xC000, 0x4049, 0x3E80, 0xBF40, 0x4120};
  const float b_want[6] = {1.0f, -2.0f, 3.140625f, 0.25f, -0.75f, 10.0f};
  const std::uint16_t h_bits[6] = {0x3C00, 0xC000, 0x3555, 0x7BFF, 0x0001, 0xB800};
  const float h_want[6] = {1.0f, -2.0f, 0.333251953125f, 65504.0f, std::ldexp(1.0f, -24), -0.5f};
  const auto le = [](const std::uint16_t* bits) {
    Bytes b;
    for (int k = 0; k < 6; ++k) {
      b.push_back(static_cast<std::uint8_t>(bits[k] & 0xFF));
      b.push_back(static_cast<std::uint8_t>(bits[k] >> 8));
    }
    return b;
  };
  SafeTensorsWriter w;
  w.add_raw("b", DType::BF16, {2, 3}, le(b_bits));
  w.add_raw("h", DType::F16, {3, 2}, le(h_bits));
  TempDir dir("st_half");
  const auto path = dir.path / "half.safetensors";
  w.save(path);

  for (const LoadMode mode : {LoadMode::map, LoadMode::read}) {
    CAPTURE(int(mode));
    const auto f = SafeTensors::open(path, mode);
    const ConstView<bf16, 2> b = f.view<bf16, 2>("b");
    const ConstView<f16, 2> h = f.view<f16, 2>("h");
    REQUIRE(b.extent(0) == 2);
    REQUIRE(b.extent(1) == 3);
    REQUIRE(h.extent(0) == 3);
    CHECK(reinterpret_cast<const void*>(b.data()) == f.bytes("b").data());  // in place
    for (int k = 0; k < 6; ++k) {
      CAPTURE(k);
      CHECK(b(k / 3, k % 3).bits == b_bits[k]);
      CHECK(switchyard::to_float(b(k / 3, k % 3)) == b_want[k]);
      CHECK(h(k / 2, k % 2).bits == h_bits[k]);
      CHECK(switchyard::to_float(h(k / 2, k % 2)) == h_want[k]);
    }
    // Copies of their own type, and float conversions as before.
    const Tensor<bf16> bt = f.tensor<bf16>("b");
    CHECK(bt(1, 2) == bf16{0x4120});
    const Tensor<float> bf = f.tensor<float>("b");
    const Tensor<float> hf = f.tensor<float>("h");
    for (int k = 0; k < 6; ++k) {
      CHECK(bf[k] == b_want[k]);
      CHECK(hf[k] == h_want[k]);
    }
    // The wrong 16-bit type, or float, is a dtype error that says how to read it.
    REQUIRE_THROWS_AS((f.view<f16, 2>("b")), switchyard::shape_error);
    REQUIRE_THROWS_WITH((f.view<f16, 2>("b")),
                        Contains("'b'") && Contains("dtype BF16") && Contains("F16"));
    REQUIRE_THROWS_WITH((f.view<float, 2>("b")),
                        Contains("view<bf16, R>") && Contains("tensor<float>()"));
    REQUIRE_THROWS_WITH((f.view<float, 2>("h")), Contains("view<f16, R>"));
    REQUIRE_THROWS_AS(f.tensor<bf16>("h"), switchyard::shape_error);
    REQUIRE_THROWS_AS(f.tensor<std::uint16_t>("b"), switchyard::shape_error);
  }
}

TEST_CASE("the raw-bit helpers agree with core/half.hpp", "[safetensors][half]") {
  for (std::uint32_t bits = 0; bits < 0x10000; bits += 7) {
    const auto u = static_cast<std::uint16_t>(bits);
    const float a = bf16_to_float(u);
    const float b = switchyard::to_float(switchyard::bf16{u});
    CHECK((std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b)));
    const float c = half_to_float(u);
    const float d = switchyard::to_float(switchyard::f16{u});
    CHECK(((std::isnan(c) && std::isnan(d)) ||
           std::bit_cast<std::uint32_t>(c) == std::bit_cast<std::uint32_t>(d)));
  }
  for (const float x : {0.1f, -3.3f, 1e30f, 65504.0f, 1.00390625f}) {
    CHECK(float_to_bf16(x) == switchyard::bf16::from_float(x).bits);
  }
}

TEST_CASE("the writer stores bf16 / f16 tensors and views as BF16 / F16", "[safetensors][half]") {
  using switchyard::bf16;
  using switchyard::f16;
  Tensor<bf16> a({2, 3});
  for (int i = 0; i < 6; ++i) a[i] = bf16::from_float(0.5f * float(i) - 1.0f);  // exact in bf16
  Tensor<f16> h({4});
  const std::uint16_t hb[4] = {0x3C00, 0x4000, 0x4200, 0xC400};  // 1, 2, 3, -4
  for (int i = 0; i < 4; ++i) h[i] = f16{hb[i]};
  SafeTensorsWriter w;
  w.add("a", a);
  w.add("cols", a.view<2>().slice(1, 1, 3));  // strided
  w.add("h", h);
  w.add<bf16>("s", &a[5], {});
  const auto f = SafeTensors::from_bytes(w.to_bytes());
  CHECK(f.info("a").dtype == DType::BF16);
  CHECK(f.info("h").dtype == DType::F16);
  CHECK(f.info("cols").shape == std::vector<std::int64_t>{2, 2});
  const Tensor<float> got = f.tensor<float>("a");
  for (int i = 0; i < 6; ++i) CHECK(got[i] == 0.5f * float(i) - 1.0f);
  CHECK(f.view<bf16, 2>("cols")(1, 1) == a(1, 2));
  CHECK(f.tensor<float>("h")[3] == -4.0f);
  CHECK(f.scalar<bf16>("s") == a[5]);
  CHECK(f.scalar<float>("s") == 1.5f);
}
