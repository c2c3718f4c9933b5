// runtime/threads.h invariant 3: OpenMP keeps its thread count per thread, so a thread made after
// set_num_threads starts from OpenMP's default; adopt_num_threads() gives it the setting. The count
// is hardware + 1 so that it differs from OpenMP's default on any machine.
#include <gtest/gtest.h>
#include <omp.h>

#include <thread>

#include "runtime/threads.h"

namespace {

using namespace troupe::runtime;

TEST(Threads, ANewThreadAdoptsTheSetting) {
  const int before = num_threads();
  const int want = hardware_threads() + 1;
  set_num_threads(want);
  EXPECT_EQ(omp_get_max_threads(), want);  // the calling thread at once
  int fresh = 0, adopted = 0;
  std::thread([&] {
    fresh = omp_get_max_threads();
    adopt_num_threads();
    adopted = omp_get_max_threads();
  }).join();
  EXPECT_NE(fresh, want) << "OpenMP passed the count to a new thread: adopt_num_threads is not needed";
  EXPECT_EQ(adopted, want);
  EXPECT_EQ(num_threads(), want);
  set_num_threads(before);
}

}  // namespace
