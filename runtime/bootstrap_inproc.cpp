// runtime/bootstrap_inproc.cpp — blob exchange between threads (tests).
#include <chrono>
#include <condition_variable>
#include <mutex>

#include "runtime/bootstrap.h"
#include "runtime/error.h"

namespace troupe::runtime {

namespace {

struct bootstrap_state {
  int P;
  int timeout_ms;
  std::mutex mu;
  std::condition_variable cv;
  int64_t generation = 0;
  int arrived = 0;
  std::vector<std::string> blobs, done;
  bootstrap_state(int p, int t) : P(p), timeout_ms(t), blobs(static_cast<size_t>(p)) {}
};

class inproc_bootstrap final : public bootstrap {
 public:
  inproc_bootstrap(std::shared_ptr<bootstrap_state> s, int rank) : s_(std::move(s)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return s_->P; }
  std::vector<std::string> all_gather(const std::string& mine) override {
    std::unique_lock<std::mutex> lock(s_->mu);
    const int64_t gen = s_->generation;
    s_->blobs[static_cast<size_t>(rank_)] = mine;
    if (++s_->arrived == s_->P) {
      s_->done = s_->blobs;
      s_->arrived = 0;
      ++s_->generation;
      s_->cv.notify_all();
      return s_->done;
    }
    const bool ok = s_->cv.wait_for(lock, std::chrono::milliseconds(s_->timeout_ms),
                                    [&] { return s_->generation != gen; });
    TROUPE_CHECK(ok, errc::io, "bootstrap all_gather: rank {} waited {} ms; {} of {} ranks arrived", rank_,
                 s_->timeout_ms, s_->arrived, s_->P);
    return s_->done;  // stable until every rank of the next generation has arrived
  }

 private:
  std::shared_ptr<bootstrap_state> s_;
  int rank_;
};

}  // namespace

std::vector<std::unique_ptr<bootstrap>> make_inproc_bootstraps(int size, int timeout_ms) {
  TROUPE_CHECK(size >= 1, errc::invalid_argument, "make_inproc_bootstraps: size {} must be >= 1", size);
  auto state = std::make_shared<bootstrap_state>(size, timeout_ms);
  std::vector<std::unique_ptr<bootstrap>> out;
  for (int r = 0; r < size; ++r) out.push_back(std::make_unique<inproc_bootstrap>(state, r));
  return out;
}

}  // namespace troupe::runtime
