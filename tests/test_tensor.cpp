#include <catch2/catch.hpp>
#include <cstdint>

#include "switchyard/core/eigen_map.hpp"
#include "switchyard/core/tensor.hpp"

using namespace switchyard;

TEST_CASE("Tensor is zero-filled, 64-byte aligned and row-major", "[tensor]") {
  Tensor<float> t({2, 3, 4});
  REQUIRE(t.rank() == 3);
  REQUIRE(t.numel() == 24);
  REQUIRE(reinterpret_cast<std::uintptr_t>(t.data()) % 64 == 0);
  for (float v : t) REQUIRE(v == 0.0f);
  t(1, 2, 3) = 7.0f;
  REQUIRE(t[1 * 12 + 2 * 4 + 3] == 7.0f);
  auto v = t.view<3>();
  REQUIRE(v.strides() == Shape<3>{12, 4, 1});
  REQUIRE(v(1, 2, 3) == 7.0f);
  REQUIRE(v.is_contiguous());
}

TEST_CASE("Tensor copies deeply and converts to views of its rank", "[tensor]") {
  Tensor<double> a({2, 2});
  a(0, 1) = 3.0;
  Tensor<double> b = a;
  b(0, 1) = 4.0;
  REQUIRE(a(0, 1) == 3.0);
  ConstView<double, 2> cv = a;
  REQUIRE(cv(0, 1) == 3.0);
  View<double, 2> mv = b;
  ConstView<double, 2> from_mutable = mv;  // View -> ConstView
  REQUIRE(from_mutable(0, 1) == 4.0);
}

TEST_CASE("Tensor rejects bad ranks and extents with shape_error", "[tensor][error]") {
  REQUIRE_THROWS_AS(Tensor<float>({1, 2, 3, 4, 5}), shape_error);
  REQUIRE_THROWS_AS(Tensor<float>({2, -1}), shape_error);
  Tensor<float> t({2, 3});
  REQUIRE_THROWS_WITH(t.view<3>(), Catch::Contains("rank 2") && Catch::Contains("[2, 3]"));
}

TEST_CASE("Empty tensors are valid", "[tensor]") {
  Tensor<float> t({0, 5});
  REQUIRE(t.numel() == 0);
  REQUIRE(t.empty());
  REQUIRE(t.view<2>().extent(1) == 5);
}

TEST_CASE("View slicing and sub-views follow strides", "[tensor]") {
  Tensor<int> t({3, 4});
  for (int i = 0; i < 12; ++i) t[i] = i;
  View<int, 2> v = t;
  auto row = v[2];
  REQUIRE(row.extent(0) == 4);
  REQUIRE(row(1) == 9);
  auto cols = v.slice(1, 1, 3);  // columns 1..2
  REQUIRE(cols.shape() == Shape<2>{3, 2});
  REQUIRE(cols(2, 1) == 10);
  REQUIRE_FALSE(cols.is_contiguous());
  // Column view of stride 4: a strided, non-contiguous rank-1 view.
  View<int, 1> col(t.data() + 1, {3}, {4});
  REQUIRE(col(2) == 9);
}

TEST_CASE("check_shape names the layer, argument and both shapes", "[tensor][error]") {
  Tensor<float> x({5, 63});
  ConstView<float, 2> xv = x;
  REQUIRE_THROWS_WITH(
      core::detail::check_shape("TopKRouter", "route", "x", xv, {"T", "D"}, {-1, 64}),
      Catch::Equals("TopKRouter::route: argument 'x' has shape [T=5, D=63]; expected [T, D=64]"));
  REQUIRE_NOTHROW(core::detail::check_shape("L", "f", "x", xv, {"T", "D"}, {5, 63}));
}

TEST_CASE("as_eigen maps a row-major strided view without copying", "[tensor][eigen]") {
  Tensor<float> t({3, 4});
  for (int i = 0; i < 12; ++i) t[i] = float(i);
  View<float, 2> v = t;
  auto m = core::as_eigen(v.slice(1, 1, 3));
  REQUIRE(m.rows() == 3);
  REQUIRE(m.cols() == 2);
  REQUIRE(m(2, 1) == 10.0f);
  m(0, 0) = -1.0f;
  REQUIRE(t(0, 1) == -1.0f);
  View<float, 2> transposed(t.data(), {4, 3}, {1, 4});
  REQUIRE_THROWS_AS(core::as_eigen(transposed), shape_error);
}

TEST_CASE("Tensor: a default-constructed tensor copies and assigns as empty", "[tensor]") {
  const switchyard::Tensor<float> empty;
  const switchyard::Tensor<float> copy(empty);
  REQUIRE(copy.rank() == 0);
  REQUIRE(copy.numel() == 0);
  switchyard::Tensor<float> t({2, 3});
  t = empty;
  REQUIRE(t.rank() == 0);
  REQUIRE(t.numel() == 0);
  t = switchyard::Tensor<float>({4});
  REQUIRE(t.numel() == 4);
}
