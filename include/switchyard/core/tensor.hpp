#pragma once
// Tensor<T>: an owning, 64-byte aligned, row-major array of rank 1 to 4.
// It converts implicitly to View<T, R> / ConstView<T, R> of its own rank, so a
// Tensor can be passed wherever a layer takes a view.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <new>
#include <span>
#include <string>

#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace core {

inline constexpr std::size_t tensor_alignment = 64;

template <class T>
class Tensor {
  static_assert(!std::is_const_v<T>, "Tensor<T> owns mutable storage; use ConstView for const");

 public:
  Tensor() = default;
  /// Zero-filled tensor of the given extents (rank 1 to 4, extents >= 0).
  explicit Tensor(std::span<const std::int64_t> shape) { allocate(shape); }
  Tensor(std::initializer_list<std::int64_t> shape)
      : Tensor(std::span<const std::int64_t>(shape.begin(), shape.size())) {}
  template <int R>
  explicit Tensor(const Shape<R>& shape) : Tensor(std::span<const std::int64_t>(shape)) {}

  Tensor(const Tensor& other) {
    if (other.rank_ == 0) return;  // a default-constructed (empty) tensor copies as empty
    allocate(other.shape());
    std::copy_n(other.data(), numel_, data_.get());
  }
  Tensor& operator=(const Tensor& other) {
    if (this != &other) *this = Tensor(other);
    return *this;
  }
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;

  int rank() const noexcept { return rank_; }
  std::span<const std::int64_t> shape() const noexcept {
    return {shape_.data(), std::size_t(rank_)};
  }
  std::int64_t extent(int i) const noexcept { return shape_[i]; }
  std::int64_t numel() const noexcept { return numel_; }
  bool empty() const noexcept { return numel_ == 0; }
  T* data() noexcept { return data_.get(); }
  const T* data() const noexcept { return data_.get(); }
  T* begin() noexcept { return data(); }
  T* end() noexcept { return data() + numel_; }
  const T* begin() const noexcept { return data(); }
  const T* end() const noexcept { return data() + numel_; }
  T& operator[](std::int64_t i) noexcept { return data_[i]; }
  const T& operator[](std::int64_t i) const noexcept { return data_[i]; }

  void fill(T value) noexcept { std::fill_n(data(), numel_, value); }

  /// View of rank R; throws shape_error if R differs from the tensor's rank.
  template <int R>
  View<T, R> view() {
    check_rank(R);
    return View<T, R>(data(), shape_array<R>());
  }
  template <int R>
  ConstView<T, R> view() const {
    check_rank(R);
    return ConstView<T, R>(data(), shape_array<R>());
  }
  template <int R>
  operator View<T, R>() {  // NOLINT(google-explicit-constructor)
    return view<R>();
  }
  template <int R>
  operator ConstView<T, R>() const {  // NOLINT(google-explicit-constructor)
    return view<R>();
  }

  template <class... I>
  T& operator()(I... idx) noexcept {
    return data_[offset(idx...)];
  }
  template <class... I>
  const T& operator()(I... idx) const noexcept {
    return data_[offset(idx...)];
  }

 private:
  struct AlignedDelete {
    void operator()(T* p) const noexcept {
      ::operator delete[](static_cast<void*>(p), std::align_val_t{tensor_alignment});
    }
  };

  void allocate(std::span<const std::int64_t> shape) {
    if (shape.empty() || shape.size() > 4) {
      throw shape_error("Tensor: rank " + std::to_string(shape.size()) +
                        " is not supported; expected rank 1 to 4, shape " +
                        switchyard::detail::format_shape(shape));
    }
    for (std::int64_t e : shape) {
      if (e < 0) {
        throw shape_error("Tensor: negative extent in shape " +
                          switchyard::detail::format_shape(shape));
      }
    }
    // Every partial product is checked, so [0, 2^62, 2^62] is rejected as well.
    const std::int64_t n = core::bounded_product(shape, sizeof(T));
    if (n < 0) {
      throw shape_error("Tensor: shape " + switchyard::detail::format_shape(shape) +
                        " overflows or needs more than " + std::to_string(core::max_buffer_bytes) +
                        " bytes (core::max_buffer_bytes)");
    }
    rank_ = static_cast<int>(shape.size());
    std::copy(shape.begin(), shape.end(), shape_.begin());
    numel_ = n;
    const std::size_t bytes = std::max<std::size_t>(1, std::size_t(numel_)) * sizeof(T);
    data_.reset(static_cast<T*>(::operator new[](bytes, std::align_val_t{tensor_alignment})));
    std::memset(static_cast<void*>(data_.get()), 0, bytes);
  }

  void check_rank(int r) const {
    if (r != rank_) {
      throw shape_error("Tensor::view: tensor has rank " + std::to_string(rank_) + " and shape " +
                        switchyard::detail::format_shape(shape()) + "; a view of rank " +
                        std::to_string(r) + " was requested");
    }
  }

  template <int R>
  Shape<R> shape_array() const noexcept {
    Shape<R> s{};
    std::copy_n(shape_.begin(), R, s.begin());
    return s;
  }

  template <class... I>
  std::int64_t offset(I... idx) const noexcept {
    SWITCHYARD_ASSERT(int(sizeof...(I)) == rank_);
    const std::int64_t i[] = {static_cast<std::int64_t>(idx)...};
    std::int64_t off = 0;
    for (std::size_t d = 0; d < sizeof...(I); ++d) {
      SWITCHYARD_ASSERT(i[d] >= 0 && i[d] < shape_[d]);
      off = off * shape_[d] + i[d];
    }
    return off;
  }

  std::unique_ptr<T[], AlignedDelete> data_;
  std::array<std::int64_t, 4> shape_{};
  int rank_ = 0;
  std::int64_t numel_ = 0;
};

}  // namespace core
using core::Tensor;
}  // namespace v0
}  // namespace switchyard
