#pragma once
// A tiny self-contained PNG writer for the examples: 8-bit RGB, the zlib stream made of
// "stored" (uncompressed) deflate blocks, CRC-32 and Adler-32 computed here. No dependency;
// files are as large as the pixels (3 bytes each), which is fine for small charts.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace example {

struct Rgb {
  std::uint8_t r = 0, g = 0, b = 0;
};

/// An RGB8 image, row-major, top row first. Writes outside the image are ignored.
class Image {
 public:
  Image(int width, int height, Rgb background = {255, 255, 255})
      : w_(width), h_(height), px_(std::size_t(width) * std::size_t(height), background) {}
  int width() const { return w_; }
  int height() const { return h_; }
  void set(int x, int y, Rgb c) {
    if (x >= 0 && y >= 0 && x < w_ && y < h_) px_[std::size_t(y) * std::size_t(w_) + x] = c;
  }
  Rgb at(int x, int y) const { return px_[std::size_t(y) * std::size_t(w_) + x]; }

 private:
  int w_, h_;
  std::vector<Rgb> px_;
};

namespace png_detail {

inline std::uint32_t crc32(const std::uint8_t* p, std::size_t n, std::uint32_t crc = 0) {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

inline std::uint32_t adler32(const std::vector<std::uint8_t>& data) {
  std::uint32_t a = 1, b = 0;
  for (const std::uint8_t v : data) {
    a = (a + v) % 65521u;
    b = (b + a) % 65521u;
  }
  return (b << 16) | a;
}

inline void put32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(std::uint8_t(v >> s));
}

/// One chunk: length, type, data, CRC of type + data.
inline void chunk(std::vector<std::uint8_t>& out, const char* type,
                  const std::vector<std::uint8_t>& data) {
  put32(out, std::uint32_t(data.size()));
  const std::size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put32(out, crc32(out.data() + start, out.size() - start));
}

}  // namespace png_detail

/// Writes `img` as a PNG file; returns false if the file cannot be written.
inline bool write_png(const std::string& path, const Image& img) {
  using namespace png_detail;
  // Raw scanlines: a filter byte (0 = none), then the row's RGB bytes.
  std::vector<std::uint8_t> raw;
  raw.reserve(std::size_t(img.height()) * (1 + 3 * std::size_t(img.width())));
  for (int y = 0; y < img.height(); ++y) {
    raw.push_back(0);
    for (int x = 0; x < img.width(); ++x) {
      const Rgb c = img.at(x, y);
      raw.insert(raw.end(), {c.r, c.g, c.b});
    }
  }
  // zlib: header 78 01, stored blocks of at most 65535 bytes (BFINAL on the last one,
  // LEN and its complement little-endian), then the Adler-32 of the raw data, big-endian.
  std::vector<std::uint8_t> z = {0x78, 0x01};
  std::size_t pos = 0;
  do {
    const std::size_t n = std::min<std::size_t>(65535, raw.size() - pos);
    const auto len = std::uint16_t(n), nlen = std::uint16_t(~len);
    z.insert(z.end(), {std::uint8_t(pos + n == raw.size()), std::uint8_t(len & 0xFF),
                       std::uint8_t(len >> 8), std::uint8_t(nlen & 0xFF), std::uint8_t(nlen >> 8)});
    z.insert(z.end(), raw.begin() + std::ptrdiff_t(pos), raw.begin() + std::ptrdiff_t(pos + n));
    pos += n;
  } while (pos < raw.size());
  put32(z, adler32(raw));

  std::vector<std::uint8_t> file = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<std::uint8_t> ihdr;
  put32(ihdr, std::uint32_t(img.width()));
  put32(ihdr, std::uint32_t(img.height()));
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8 bits, RGB, deflate, no filter, no interlace
  chunk(file, "IHDR", ihdr);
  chunk(file, "IDAT", z);
  chunk(file, "IEND", {});

  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  const bool ok = std::fwrite(file.data(), 1, file.size(), f) == file.size();
  return std::fclose(f) == 0 && ok;
}

}  // namespace example
