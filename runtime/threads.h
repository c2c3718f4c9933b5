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
#pragma once

namespace troupe::runtime {

int num_threads();
void set_num_threads(int n);   // n <= 0 means "number of cores"
int hardware_threads();

}  // namespace troupe::runtime
