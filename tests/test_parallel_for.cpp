#include <atomic>
#include <catch2/catch.hpp>
#include <cstdint>
#include <limits>
#include <thread>
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
  // No overflow for chunks or counts near the int64 limit; nothing for n <= 0 or chunk <= 0.
  const std::int64_t big = std::numeric_limits<std::int64_t>::max();
  REQUIRE(num_chunks(16, big) == 1);
  REQUIRE(num_chunks(big, big) == 1);
  REQUIRE(num_chunks(big, 2) == big / 2 + 1);
  REQUIRE(num_chunks(-5, 4) == 0);
  REQUIRE(num_chunks(5, 0) == 0);
}

TEST_CASE("ScopedNumThreads is per calling thread: scopes ending out of order restore each",
          "[threads]") {
  set_num_threads(3);
  // Thread A opens a scope, thread B opens one after it and closes it after A closed its own.
  // With one process-wide saved value, B's restore would leave A's value behind.
  std::atomic<int> step{0};
  int a_inside = 0, b_inside = 0, a_after = 0, b_after = 0;
  const auto wait_for = [&](int s) {
    while (step.load() < s) std::this_thread::yield();
  };
  std::thread a([&] {
    {
      ScopedNumThreads scope(1);
      a_inside = num_threads();
      step = 1;
      wait_for(2);
    }
    a_after = num_threads();
    step = 3;
  });
  std::thread b([&] {
    wait_for(1);
    {
      ScopedNumThreads scope(2);
      b_inside = num_threads();
      step = 2;
      wait_for(3);
    }
    b_after = num_threads();
  });
  a.join();
  b.join();
  CHECK(a_inside == 1);
  CHECK(b_inside == 2);
  CHECK(a_after == 3);
  CHECK(b_after == 3);
  CHECK(num_threads() == 3);
  {
    ScopedNumThreads outer(2);
    {
      ScopedNumThreads inner(0);  // the default inside the scope, whatever the global says
      CHECK(num_threads() == static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    }
    CHECK(num_threads() == 2);
  }
  set_num_threads(0);
}
