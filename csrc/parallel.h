// Work-claiming parallel loop for the CPU kernels.
//
// OpenMP fork-join makes the caller wait at the join barrier until every team thread has been
// scheduled at least once; on a machine whose cores are busy with other processes that costs a
// scheduler latency per region (measured: 0.57 ms -> 45 ms per call on 2 loaded cores). Here the
// caller claims chunks itself and only waits for chunks a helper has already claimed, so helpers
// that are not scheduled in time cost nothing. The thread count follows OpenMP's
// omp_get_max_threads() (OMP_NUM_THREADS, torch.set_num_threads when torch's libgomp is shared).
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
