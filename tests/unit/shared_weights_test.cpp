// Weights in memfd pages another process of the same host maps (runtime/shared_weights.h): a forked
// child maps the parent's tensor and reads the same bytes; a handle of another boot, of the wrong size,
// of a file that is no memfd or of another memfd gives nothing; a mapping shares the pages; pages
// handed over outlive the tensor that gave them.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fcntl.h>

#include "runtime/shared_weights.h"

namespace {

using namespace troupe::runtime;

tensor ramp(int64_t n) {
  tensor t = tensor::empty({n});
  for (int64_t i = 0; i < n; ++i) t.data<float>()[i] = static_cast<float>(i) * 0.5f - 3.0f;
  return t;
}

bool same_bytes(const tensor& a, const tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0;
}

TEST(SharedWeights, AnotherProcessMapsTheSamePages) {
  const tensor src = ramp(3000);  // not a page multiple
  const tensor w = shared_weights_copy(src);
  ASSERT_TRUE(same_bytes(w, src));
  const auto h = shared_weights_handle(w);
  ASSERT_TRUE(h.has_value());
  EXPECT_EQ(h->pid, ::getpid());
  EXPECT_EQ(h->bytes, 3000 * 4);
  EXPECT_FALSE(shared_weights_handle(src).has_value()) << "an ordinary tensor has no handle";
  EXPECT_FALSE(shared_weights_handle(w.slice(0, 1, 10)).has_value()) << "only whole tensors";
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {  // another process: maps the parent's pages
    const auto m = shared_weights_map(*h, {3000}, dtype::f32);
    ::_exit(!m ? 2 : same_bytes(*m, src) ? 0 : 3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "2: not mapped, 3: other bytes";
}

TEST(SharedWeights, HandlesOfAnotherBootSizeOrFileGiveNothing) {
  const tensor w = shared_weights_copy(ramp(1024));
  const auto h = shared_weights_handle(w);
  ASSERT_TRUE(h.has_value());
  ASSERT_TRUE(shared_weights_map(*h, {1024}, dtype::f32).has_value());
  auto other_boot = *h;
  other_boot.boot[1] ^= 1;
  EXPECT_FALSE(shared_weights_map(other_boot, {1024}, dtype::f32).has_value());
  EXPECT_FALSE(shared_weights_map(*h, {1025}, dtype::f32).has_value()) << "the size must match";
  EXPECT_FALSE(shared_weights_map(*h, {512}, dtype::f32).has_value());
  auto no_fd = *h;
  no_fd.fd = 1 << 20;
  EXPECT_FALSE(shared_weights_map(no_fd, {1024}, dtype::f32).has_value());
  const int plain = ::open("/proc/self/exe", O_RDONLY | O_CLOEXEC);  // a regular file, no memfd
  ASSERT_GE(plain, 0);
  auto not_memfd = *h;
  not_memfd.fd = plain;
  EXPECT_FALSE(shared_weights_map(not_memfd, {1024}, dtype::f32).has_value());
  ::close(plain);
}

TEST(SharedWeights, PagesHandedOverOutliveTheTensorThatGaveThem) {
  const tensor src = ramp(4096);
  std::optional<tensor> m;
  {
    const tensor w = shared_weights_copy(src);
    m = shared_weights_map(*shared_weights_handle(w), {4096}, dtype::f32);
    ASSERT_TRUE(m.has_value());
  }  // the giver's tensor, mapping and descriptor are gone
  EXPECT_TRUE(same_bytes(*m, src));
  EXPECT_TRUE(shared_weights_handle(*m).has_value()) << "a mapping can be handed on";
}

TEST(SharedWeights, AMappingSharesThePagesBothWays) {
  const tensor w = shared_weights_copy(ramp(16));
  const auto m = shared_weights_map(*shared_weights_handle(w), {16}, dtype::f32);
  ASSERT_TRUE(m.has_value());
  EXPECT_NE(m->data_ptr(), w.data_ptr()) << "a mapping of its own";
  w.data<float>()[3] = 42.0f;  // the same pages, not a copy
  EXPECT_EQ(m->data<float>()[3], 42.0f);
}

TEST(SharedWeights, AnotherMemfdAtTheSameNumberIsNotTaken) {
  const tensor a = shared_weights_copy(ramp(256)), b = shared_weights_copy(ramp(256));
  auto h = *shared_weights_handle(a);
  const auto hb = *shared_weights_handle(b);
  h.fd = hb.fd;  // b's descriptor under a's identity (a pid reused in another namespace)
  EXPECT_FALSE(shared_weights_map(h, {256}, dtype::f32).has_value());
}

}  // namespace
