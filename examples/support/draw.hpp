#pragma once
// Drawing helpers for the examples' charts, on top of png.hpp: filled rectangles (bars, heat
// cells), outlines, a dashed line, text in a 5x7 pixel font (printable ASCII up to '_';
// lower case is drawn as upper case), a perceptual colour map, and where to write a file.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>

#include "png.hpp"

namespace example {

inline constexpr Rgb black{0, 0, 0}, white{255, 255, 255}, grey{150, 150, 150},
    light_grey{225, 225, 225}, blue{52, 101, 164}, red{204, 0, 0};

inline void fill_rect(Image& img, int x, int y, int w, int h, Rgb c) {
  for (int j = y; j < y + h; ++j)
    for (int i = x; i < x + w; ++i) img.set(i, j, c);
}

inline void outline(Image& img, int x, int y, int w, int h, Rgb c) {
  fill_rect(img, x, y, w, 1, c);
  fill_rect(img, x, y + h - 1, w, 1, c);
  fill_rect(img, x, y, 1, h, c);
  fill_rect(img, x + w - 1, y, 1, h, c);
}

/// Horizontal dashed line from x0 to x1 (exclusive) at row y.
inline void dashed_hline(Image& img, int x0, int x1, int y, Rgb c, int dash = 4) {
  for (int x = x0; x < x1; ++x)
    if ((x - x0) / dash % 2 == 0) img.set(x, y, c);
}

/// Viridis-like colour map: t in [0, 1] from dark blue through teal and green to yellow.
inline Rgb colour_map(double t) {
  static constexpr Rgb stops[] = {
      {68, 1, 84}, {59, 82, 139}, {33, 145, 140}, {94, 201, 98}, {253, 231, 37}};
  t = std::clamp(std::isfinite(t) ? t : 0.0, 0.0, 1.0) * 4.0;
  const int i = std::min(3, int(t));
  const double f = t - i;
  const auto mix = [f](std::uint8_t a, std::uint8_t b) {
    return std::uint8_t(std::lround(a + (b - a) * f));
  };
  return {mix(stops[i].r, stops[i + 1].r), mix(stops[i].g, stops[i + 1].g),
          mix(stops[i].b, stops[i + 1].b)};
}

/// Black or white, whichever reads better on background c.
inline Rgb ink_on(Rgb c) { return 0.3 * c.r + 0.59 * c.g + 0.11 * c.b > 140 ? black : white; }

/// Glyphs of the characters ' ' (32) to '_' (95): 7 rows each as two hex digits, bit 4 is
/// the leftmost of 5 columns.
inline constexpr std::string_view font_5x7 =
    "00000000000000040404040400040a0a00000000000a1f0a0a1f0a00040f140e051e0418190204081303"
    "0c12140815120d0404000000000002040808080402080402020204080004150e1504000004041f040400"
    "000000000c04080000001f00000000000000000c0c000102040810000e11131519110e040c040404040e"
    "0e11010204081f1f02040201110e02060a121f02021f101e0101110e0608101e11110e1f010204080808"
    "0e11110e11110e0e11110f01020c000c0c000c0c00000c0c000c04080204081008040200001f001f0000"
    "080402010204080e1101020400040e11010d15150e0e11111f1111111e11111e11111e0e11101010110e"
    "1c12111111121c1f10101e10101f1f10101e1010100e11101711110f1111111f1111110e04040404040e"
    "0702020202120c111214181412111010101010101f111b1515111111111119151311110e11111111110e"
    "1e11111e1010100e11111115120d1e11111e1412110f10100e01011e1f0404040404041111111111110e"
    "11111111110a041111111515150a11110a040a111111110a040404041f01020408101f0e08080808080e"
    "001008040201000e02020202020e040a11000000000000000000001f";

/// Width in pixels of s drawn by text() at this scale (6 columns per character).
inline int text_width(std::string_view s, int scale = 1) { return int(s.size()) * 6 * scale; }

/// Draws s with its top-left corner at (x, y); each font pixel is scale x scale pixels.
inline void text(Image& img, int x, int y, std::string_view s, Rgb c = black, int scale = 1) {
  const auto hex = [](char h) { return h <= '9' ? h - '0' : h - 'a' + 10; };
  for (const char raw : s) {
    const char ch = raw >= 'a' && raw <= 'z' ? char(raw - 'a' + 'A') : raw;
    if (ch > ' ' && ch <= '_') {
      const std::size_t g = std::size_t(ch - ' ') * 14;
      for (int row = 0; row < 7; ++row) {
        const int bits = hex(font_5x7[g + 2 * row]) * 16 + hex(font_5x7[g + 2 * row + 1]);
        for (int col = 0; col < 5; ++col)
          if (bits & (16 >> col)) fill_rect(img, x + col * scale, y + row * scale, scale, scale, c);
      }
    }
    x += 6 * scale;
  }
}

/// Where an example writes its file `name`: into the directory given as the first
/// command-line argument (created if missing), else the current directory. Absolute, so the
/// printed path says exactly where the file went.
inline std::filesystem::path output_path(int argc, char** argv, std::string_view name) {
  std::filesystem::path dir = argc > 1 ? std::filesystem::path(argv[1]) : ".";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  return std::filesystem::absolute(dir / name, ec).lexically_normal();
}

}  // namespace example
