// The CPU kernels' thread pool: a work-claiming parallel loop.
//
// The pool's helper threads start once and wait for work. The caller claims chunks itself and only
// waits for chunks a helper has already claimed, so helpers that the OS does not schedule in time
// cost nothing (an OpenMP fork-join region would wait at its barrier for every team thread; on
// loaded cores that wait dominates a small call, see benchmarks/results/kernels.md). OpenMP is not
// used for the work itself: when the build finds it, the thread count follows omp_get_max_threads()
// (OMP_NUM_THREADS, or torch.set_num_threads when torch's libgomp is shared); otherwise it is the
// number of hardware threads.
#pragma once

#include <cstdint>
#include <functional>

namespace kd_ext {

// Threads a parallel_for may use (caller included), >= 1.
int max_threads();

// Calls fn(index, worker) for every index in [0, n), worker in [0, max_threads()) identifying the
// thread (for per-thread buffers; two concurrent calls of fn never share a worker id). Returns
// when all calls are done. When fn throws, no further indices are started, the threads that are
// running finish their current call, and the first exception is re-thrown here after the join;
// the pool is then ready for the next call.
void parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn);

}  // namespace kd_ext
