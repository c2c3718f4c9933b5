// runtime/threads.h — the CPU thread count used by OpenMP and OpenBLAS.
//
//   troupe::runtime::set_num_threads(8);   // or TROUPE_NUM_THREADS=8
//   int n = troupe::runtime::num_threads();
//
// Invariants:
//   1. One setting drives the OpenMP thread count; OpenBLAS itself runs single-threaded
//      inside those threads (kernels/cpu/blas.h splits each sgemm), so there is one pool
//      and no two pools spin-waiting against each other.
//   2. Default: TROUPE_NUM_THREADS if set, else the number of online cores.
//   3. OpenMP keeps the thread count per thread: a new thread starts from OpenMP's default (every
//      core), not from what set_num_threads did on another thread. So every thread that runs
//      kernels calls adopt_num_threads() first (the worker's compute thread, the serve scheduler,
//      the engine's loop, CPU streams); set_num_threads applies to the calling thread itself.
#pragma once

namespace troupe::runtime {

int num_threads();
void set_num_threads(int n);   // n <= 0 means "number of cores"
void adopt_num_threads();      // the setting, on the calling thread (invariant 3)
int hardware_threads();

}  // namespace troupe::runtime
