#pragma once
// A seeded, counter-based random generator: Philox4x32-10 (Salmon, Moraes,
// Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
//
// Every draw is a pure function of (seed, stream, counter): there is no hidden
// state to advance, so element i of a parallel fill is the same number whatever
// thread computes it, and a fill split into chunks equals the whole fill.
// Layout: key = (seed low 32 bits, seed high 32 bits); counter block b is
// (b low, b high, stream low, stream high). Each block gives 128 bits:
//   uint32(i)      word i % 4 of block i / 4
//   uint64(i)      words 2(i % 2), 2(i % 2) + 1 of block i / 2 (low word first)
//   uniform<T>(i)  the top 24 (float) or 53 (double) bits of uint32(i) / uint64(i), in [0, 1)
//   normal<T>(i)   Box-Muller in double on block i / 2 (cos for even i, sin for
//                  odd i), then rounded to T, so normal<float>(i) == float(normal<double>(i)).
// uniform<double> and normal share blocks: draw them from different streams
// when they must be independent.
#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <type_traits>

#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace core {

/// The Philox4x32 block function with 10 rounds, as in Random123's philox4x32_R(10, ctr, key).
constexpr std::array<std::uint32_t, 4> philox4x32_10(std::array<std::uint32_t, 4> ctr,
                                                     std::array<std::uint32_t, 2> key) noexcept {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {  // Weyl key schedule between rounds
      key[0] += 0x9E3779B9u;
      key[1] += 0xBB67AE85u;
    }
    const std::uint64_t p0 = std::uint64_t{0xD2511F53u} * ctr[0];
    const std::uint64_t p1 = std::uint64_t{0xCD9E8D57u} * ctr[2];
    ctr = {static_cast<std::uint32_t>(p1 >> 32) ^ ctr[1] ^ key[0], static_cast<std::uint32_t>(p1),
           static_cast<std::uint32_t>(p0 >> 32) ^ ctr[3] ^ key[1], static_cast<std::uint32_t>(p0)};
  }
  return ctr;
}

/// Counter-based generator: (seed, stream) picks an independent sequence, every
/// accessor takes the position in it. Cheap to copy; all members are const.
class Rng {
 public:
  constexpr explicit Rng(std::uint64_t seed, std::uint64_t stream = 0) noexcept
      : seed_(seed), stream_(stream) {}

  constexpr std::uint64_t seed() const noexcept { return seed_; }
  constexpr std::uint64_t stream() const noexcept { return stream_; }

  /// The 128 bits of block b.
  constexpr std::array<std::uint32_t, 4> block(std::uint64_t b) const noexcept {
    return philox4x32_10({lo(b), hi(b), lo(stream_), hi(stream_)}, {lo(seed_), hi(seed_)});
  }

  /// 32 random bits at position i.
  constexpr std::uint32_t uint32(std::uint64_t i) const noexcept { return block(i / 4)[i % 4]; }

  /// 64 random bits at position i.
  constexpr std::uint64_t uint64(std::uint64_t i) const noexcept {
    return pair64(block(i / 2), static_cast<unsigned>(i % 2));
  }

  /// Uniform in [0, 1) at position i (float: 24 random bits; double: 53).
  template <class T>
  T uniform(std::uint64_t i) const noexcept {
    static_assert(std::is_floating_point_v<T>);
    if constexpr (std::is_same_v<T, float>) {
      return uniform_from_bits(uint32(i));
    } else {
      return static_cast<T>(uniform_from_bits(uint64(i)));
    }
  }

  /// Standard normal at position i (Box-Muller on block i / 2, computed in double).
  template <class T>
  T normal(std::uint64_t i) const noexcept {
    static_assert(std::is_floating_point_v<T>);
    return static_cast<T>(normal_from_block(block(i / 2), static_cast<unsigned>(i % 2)));
  }

  // Building blocks shared with the bulk fills (so they reuse one block for several elements).
  static constexpr std::uint64_t pair64(const std::array<std::uint32_t, 4>& w,
                                        unsigned half) noexcept {
    return std::uint64_t{w[2 * half]} | (std::uint64_t{w[2 * half + 1]} << 32);
  }
  static constexpr float uniform_from_bits(std::uint32_t bits) noexcept {
    return static_cast<float>(bits >> 8) * 0x1p-24f;
  }
  static constexpr double uniform_from_bits(std::uint64_t bits) noexcept {
    return static_cast<double>(bits >> 11) * 0x1p-53;
  }
  static double normal_from_block(const std::array<std::uint32_t, 4>& w, unsigned which) noexcept {
    const double u1 =
        static_cast<double>((pair64(w, 0) >> 11) + 1) * 0x1p-53;  // (0, 1]: log finite
    const double u2 = uniform_from_bits(pair64(w, 1));
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 2.0 * std::numbers::pi * u2;
    return which == 0 ? r * std::cos(theta) : r * std::sin(theta);
  }

 private:
  static constexpr std::uint32_t lo(std::uint64_t v) noexcept {
    return static_cast<std::uint32_t>(v);
  }
  static constexpr std::uint32_t hi(std::uint64_t v) noexcept {
    return static_cast<std::uint32_t>(v >> 32);
  }

  std::uint64_t seed_;
  std::uint64_t stream_;
};

namespace detail {
// dst[r, c] = draw(offset + r * cols + c) over a [rows, cols] view, in fixed
// chunks of 4096 positions run by parallel_for. `draw(rng, pos, cache)` may keep
// the last block in `cache` so consecutive positions share one Philox call.
template <class T, class Draw>
void fill_positions(View<T, 2> dst, std::uint64_t seed, std::uint64_t stream, std::uint64_t offset,
                    Draw draw) {
  const std::int64_t rows = dst.extent(0), cols = dst.extent(1), total = rows * cols;
  constexpr std::int64_t chunk = 4096;
  const Rng rng(seed, stream);
  parallel_for(num_chunks(total, chunk), [&](std::int64_t c) {
    struct {
      std::uint64_t id = ~std::uint64_t{0};
      std::array<std::uint32_t, 4> words{};
    } cache;
    const std::int64_t end = std::min(total, (c + 1) * chunk);
    for (std::int64_t lin = c * chunk; lin < end; ++lin) {
      dst(lin / cols, lin % cols) = draw(rng, offset + static_cast<std::uint64_t>(lin), cache);
    }
  });
}

template <class T>
struct UniformDraw {
  template <class Cache>
  T operator()(const Rng& rng, std::uint64_t pos, Cache& cache) const noexcept {
    constexpr std::uint64_t per_block = std::is_same_v<T, float> ? 4 : 2;
    const std::uint64_t b = pos / per_block;
    if (b != cache.id) {
      cache.id = b;
      cache.words = rng.block(b);
    }
    if constexpr (std::is_same_v<T, float>) {
      return Rng::uniform_from_bits(cache.words[pos % 4]);
    } else {
      return static_cast<T>(Rng::uniform_from_bits(Rng::pair64(cache.words, pos % 2)));
    }
  }
};

template <class T>
struct NormalDraw {
  template <class Cache>
  T operator()(const Rng& rng, std::uint64_t pos, Cache& cache) const noexcept {
    const std::uint64_t b = pos / 2;
    if (b != cache.id) {
      cache.id = b;
      cache.words = rng.block(b);
    }
    return static_cast<T>(Rng::normal_from_block(cache.words, static_cast<unsigned>(pos % 2)));
  }
};

/// mean + stddev * NormalDraw, the product and sum in double, then rounded to T.
template <class T>
struct ScaledNormalDraw {
  double mean = 0, stddev = 1;
  template <class Cache>
  T operator()(const Rng& rng, std::uint64_t pos, Cache& cache) const noexcept {
    const double z = NormalDraw<double>{}(rng, pos, cache);
    return static_cast<T>(mean + stddev * z);
  }
};

template <class T>
View<T, 2> as_row(View<T, 1> v) noexcept {
  return View<T, 2>(v.data(), {1, v.extent(0)}, {0, v.stride(0)});
}
}  // namespace detail

/// dst: [N] (any stride); dst[i] = Rng(seed, stream).uniform<T>(offset + i), filled in
/// parallel with the same bits as a serial loop.
template <class T>
void fill_uniform(View<T, 1> dst, std::uint64_t seed, std::uint64_t stream = 0,
                  std::uint64_t offset = 0) {
  detail::fill_positions(detail::as_row(dst), seed, stream, offset, detail::UniformDraw<T>{});
}

/// dst: [R, C] (any strides); dst[r, c] = Rng(seed, stream).uniform<T>(offset + r * C + c).
template <class T>
void fill_uniform(View<T, 2> dst, std::uint64_t seed, std::uint64_t stream = 0,
                  std::uint64_t offset = 0) {
  detail::fill_positions(dst, seed, stream, offset, detail::UniformDraw<T>{});
}

/// dst: [N] (any stride); dst[i] = Rng(seed, stream).normal<T>(offset + i).
template <class T>
void fill_normal(View<T, 1> dst, std::uint64_t seed, std::uint64_t stream = 0,
                 std::uint64_t offset = 0) {
  detail::fill_positions(detail::as_row(dst), seed, stream, offset, detail::NormalDraw<T>{});
}

/// dst: [R, C] (any strides); dst[r, c] = Rng(seed, stream).normal<T>(offset + r * C + c).
template <class T>
void fill_normal(View<T, 2> dst, std::uint64_t seed, std::uint64_t stream = 0,
                 std::uint64_t offset = 0) {
  detail::fill_positions(dst, seed, stream, offset, detail::NormalDraw<T>{});
}

/// t: any rank; element i in row-major order = Rng(seed, stream).uniform<T>(offset + i).
/// (A Tensor converts to views of every rank, so it gets its own overload.)
template <class T>
void fill_uniform(Tensor<T>& t, std::uint64_t seed, std::uint64_t stream = 0,
                  std::uint64_t offset = 0) {
  fill_uniform(View<T, 1>(t.data(), {t.numel()}), seed, stream, offset);
}

/// t: any rank; element i in row-major order = Rng(seed, stream).normal<T>(offset + i).
template <class T>
void fill_normal(Tensor<T>& t, std::uint64_t seed, std::uint64_t stream = 0,
                 std::uint64_t offset = 0) {
  fill_normal(View<T, 1>(t.data(), {t.numel()}), seed, stream, offset);
}

/// A normal distribution for fill_normal: mean and standard deviation (finite, stddev >= 0).
struct Normal {
  double mean = 0;
  double stddev = 1;
};

namespace detail {
inline ScaledNormalDraw<double> checked_normal(const Normal& dist) {
  if (!std::isfinite(dist.mean) || !std::isfinite(dist.stddev) || !(dist.stddev >= 0)) {
    switchyard::detail::fail_config(
        "core", "fill_normal", "dist",
        "{mean " + std::to_string(dist.mean) + ", stddev " + std::to_string(dist.stddev) + "}",
        "a finite mean and a finite stddev >= 0");
  }
  return {dist.mean, dist.stddev};
}
}  // namespace detail

/// dst: [N] (any stride); dst[i] = T(mean + stddev * z), z the value fill_normal(dst, seed,
/// stream, offset) writes at position i (computed in double; so stddev 1, mean 0 gives the
/// same values). E.g. weights ~ N(0, 0.02): fill_normal(w, {.stddev = 0.02}, seed).
/// Throws config_error for a non-finite mean or a stddev that is negative or not finite.
template <class T>
void fill_normal(View<T, 1> dst, Normal dist, std::uint64_t seed, std::uint64_t stream = 0,
                 std::uint64_t offset = 0) {
  const auto d = detail::checked_normal(dist);
  detail::fill_positions(detail::as_row(dst), seed, stream, offset,
                         detail::ScaledNormalDraw<T>{d.mean, d.stddev});
}

/// dst: [R, C] (any strides), positions as fill_normal(View<T, 2>, seed, ...).
template <class T>
void fill_normal(View<T, 2> dst, Normal dist, std::uint64_t seed, std::uint64_t stream = 0,
                 std::uint64_t offset = 0) {
  const auto d = detail::checked_normal(dist);
  detail::fill_positions(dst, seed, stream, offset, detail::ScaledNormalDraw<T>{d.mean, d.stddev});
}

/// t: any rank, row-major positions.
template <class T>
void fill_normal(Tensor<T>& t, Normal dist, std::uint64_t seed, std::uint64_t stream = 0,
                 std::uint64_t offset = 0) {
  fill_normal(View<T, 1>(t.data(), {t.numel()}), dist, seed, stream, offset);
}

}  // namespace core
using core::fill_normal;
using core::fill_uniform;
using core::Rng;
}  // namespace v0
}  // namespace switchyard
