// Task loop of the CPU kernels: OpenMP over chunks of tasks, or a plain loop when the work is
// too small to fork for (or one thread is available).
//
// Why not `#pragma omp parallel for schedule(dynamic, 1) if (cond)` directly: with the condition
// false, libgomp still runs the loop through its dynamic scheduler, one locked
// GOMP_loop_dynamic_next per task (~60 ns). GroupNorm at (8, 64, 4, 4) has 256 tasks of 32
// elements, so that alone was most of its time. Chunks keep each scheduling step at
// >= kChunkWork elements; dynamic scheduling of the chunks keeps a descheduled thread (shared,
// oversubscribed machines) from holding back half of the work.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastdiff {

constexpr int64_t kParallelGrain = 16384;  // elements of work below which one thread runs
constexpr int64_t kChunkWork = 4096;       // elements of work per scheduling step

// body(t) for t in [0, tasks), each task ~task_work elements of work.
template <typename F>
inline void parallel_tasks(int64_t tasks, int64_t task_work, const F& body) {
  task_work = std::max<int64_t>(task_work, 1);
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
  if (tasks > 1 && threads > 1 && tasks * task_work > kParallelGrain) {
    // chunks of >= kChunkWork elements, and >= 4 chunks per thread when there are enough tasks
    int64_t chunk = std::max<int64_t>(1, kChunkWork / task_work);
    chunk = std::min(chunk, std::max<int64_t>(1, tasks / (4 * (int64_t)threads)));
    const int64_t chunks = (tasks + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < chunks; ++b) {
      const int64_t end = std::min(tasks, (b + 1) * chunk);
      for (int64_t t = b * chunk; t < end; ++t) body(t);
    }
    return;
  }
#endif
  for (int64_t t = 0; t < tasks; ++t) body(t);
}

}  // namespace fastdiff
