#include <atomic>
#include <catch2/catch.hpp>
#include <vector>

#include "switchyard/core/parallel_for.hpp"

using namespace switchyard;

TEST_CASE("parallel_for runs every task exactly once", "[threads]") {
  for (int threads : {1, 2, 3}) {
    ScopedNumThreads scope(threads);
    REQUIRE(num_threads() == threads);
    std::vector<std::atomic<int>> hits(101);
    parallel_for(101, [&](std::int64_t i) { hits[i]++; });
    for (auto& h : hits) REQUIRE(h.load() == 1);
  }
}

TEST_CASE("thread setting defaults to hardware threads and is restored by the scope", "[threads]") {
  set_num_threads(0);
  const int hw = num_threads();
  REQUIRE(hw >= 1);
  {
    ScopedNumThreads scope(1);
    REQUIRE(num_threads() == 1);
  }
  REQUIRE(num_threads() == hw);
  set_num_threads(-5);
  REQUIRE(num_threads() == hw);
}

TEST_CASE("parallel_for with zero tasks does nothing; num_chunks covers the range", "[threads]") {
  int calls = 0;
  parallel_for(0, [&](std::int64_t) { ++calls; });
  REQUIRE(calls == 0);
  REQUIRE(num_chunks(10, 4) == 3);
  REQUIRE(num_chunks(8, 4) == 2);
  REQUIRE(num_chunks(0, 4) == 0);
}
