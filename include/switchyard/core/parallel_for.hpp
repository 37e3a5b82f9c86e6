#pragma once
// The one place switchyard runs work on several threads.
//
// Thread count: switchyard::set_num_threads(n) sets the process-wide value (n <= 0
// restores the default, the number of hardware threads); switchyard::num_threads()
// reads the value in force for the calling thread. ScopedNumThreads overrides it for
// the calling thread only, until the scope ends: scopes on different threads do not see
// each other, and nested scopes on one thread restore in order. It is switchyard's own
// setting: OpenMP's and Eigen's global settings are never changed.
//
// Determinism: the caller splits its work into a fixed number of independent
// tasks that does not depend on the thread count; each task is computed the
// same way whichever thread runs it, so results are bit-identical for any
// thread count. Without OpenMP (SWITCHYARD_OPENMP=OFF) the loop runs serially.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>

#include "switchyard/config.hpp"

#if SWITCHYARD_HAS_OPENMP
#include <omp.h>
#endif

namespace switchyard {
inline namespace v0 {

namespace detail {
inline std::atomic<int>& thread_setting() noexcept {
  static std::atomic<int> setting{0};  // process-wide; 0 = default
  return setting;
}
/// The calling thread's ScopedNumThreads override: 0 = none, -1 = the default, n > 0 = n.
inline int& thread_override() noexcept {
  thread_local int override_value = 0;
  return override_value;
}
inline int hardware_threads() noexcept {
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}
}  // namespace detail

/// Threads switchyard may use from the calling thread: its ScopedNumThreads value if one is
/// active, else the process-wide value set, else the hardware thread count.
inline int num_threads() noexcept {
  const int local = detail::thread_override();
  if (local > 0) return local;
  if (local < 0) return detail::hardware_threads();
  const int set = detail::thread_setting().load(std::memory_order_relaxed);
  return set > 0 ? set : detail::hardware_threads();
}

/// Sets the process-wide thread count every switchyard parallel loop may use (threads inside
/// a ScopedNumThreads keep their scope's value); n <= 0 restores the default.
inline void set_num_threads(int n) noexcept {
  detail::thread_setting().store(n > 0 ? n : 0, std::memory_order_relaxed);
}

/// Sets the thread count of the calling thread for a scope (n <= 0: the default) and restores
/// the thread's previous value after it. Other threads are not affected.
class ScopedNumThreads {
 public:
  explicit ScopedNumThreads(int n) noexcept : saved_(detail::thread_override()) {
    detail::thread_override() = n > 0 ? n : -1;
  }
  ~ScopedNumThreads() { detail::thread_override() = saved_; }
  ScopedNumThreads(const ScopedNumThreads&) = delete;
  ScopedNumThreads& operator=(const ScopedNumThreads&) = delete;

 private:
  int saved_;
};

/// Runs task(i) for i in [0, num_tasks). Tasks must be independent; `task` must not throw.
/// Runs serially when one thread is set, when there is one task, or when already
/// inside a parallel region (no nested teams).
template <class Task>
void parallel_for(std::int64_t num_tasks, Task&& task) {
  if (num_tasks <= 0) return;
  const int threads = static_cast<int>(std::min<std::int64_t>(num_threads(), num_tasks));
#if SWITCHYARD_HAS_OPENMP
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (std::int64_t i = 0; i < num_tasks; ++i) task(i);
    return;
  }
#else
  (void)threads;
#endif
  for (std::int64_t i = 0; i < num_tasks; ++i) task(i);
}

/// Number of fixed-size chunks covering n items; chunk c is [c*chunk, min(n, (c+1)*chunk)).
/// 0 for n <= 0 or chunk <= 0; never overflows (a chunk near INT64_MAX gives 1).
constexpr std::int64_t num_chunks(std::int64_t n, std::int64_t chunk) noexcept {
  return chunk > 0 && n > 0 ? n / chunk + (n % chunk != 0) : 0;
}

}  // namespace v0
}  // namespace switchyard
