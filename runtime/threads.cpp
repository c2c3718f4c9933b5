#include "runtime/threads.h"

#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <thread>

extern "C" void openblas_set_num_threads(int num_threads);

namespace troupe::runtime {

namespace {
std::atomic<int>& current() {
  static std::atomic<int> n{[] {
    int v = 0;
    if (const char* env = std::getenv("TROUPE_NUM_THREADS")) v = std::atoi(env);
    if (v <= 0) v = hardware_threads();
    omp_set_num_threads(v);
    openblas_set_num_threads(1);  // kernels/cpu/blas.h parallelises sgemm with OpenMP: one thread pool
    return v;
  }()};
  return n;
}
}  // namespace

int hardware_threads() {
  unsigned h = std::thread::hardware_concurrency();
  return h == 0 ? 1 : static_cast<int>(h);
}

int num_threads() { return current().load(); }

void set_num_threads(int n) {
  if (n <= 0) n = hardware_threads();
  current().store(n);
  omp_set_num_threads(n);
  openblas_set_num_threads(1);
}

void adopt_num_threads() { omp_set_num_threads(current().load()); }

}  // namespace troupe::runtime
