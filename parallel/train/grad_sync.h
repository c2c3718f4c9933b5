// parallel/train/grad_sync.h — data-parallel gradient reduction in buckets, overlapped with
// backward (PyTorch DDP's reducer, on a communicator of ours).
//
//   grad_sync sync(grads, world_comm, /*bucket_bytes=*/4 << 20);
//   fb_options o;
//   o.grads_ready = [&](int64_t g) { sync.group_ready(g); };   // the decoder's hook
//   sync.begin();
//   dec.forward_backward(ids, targets, B, T, grads, o);        // buckets go out as layers finish
//   sync.finish();                                             // grads = sum over the ranks
//   sync.all_reduce(loss, reduce_op::sum);                     // small reductions, same thread
//
// Invariants:
//   1. Buckets are built once from the decoder's gradient groups in the order backward
//      finishes them: head (final norm, untied lm_head), layers L-1 .. 0, embedding (and a
//      tied lm_head). Consecutive groups fill a bucket up to bucket_bytes; a bucket leaves
//      when its last group is ready, so the reduction of layer l runs while layer l-1's
//      backward computes.
//   2. One thread of its own owns the communicator: every operation on it (bucket
//      reductions and all_reduce()) runs there, in submission order. The compute thread
//      never calls the communicator; it only waits in finish() / all_reduce().
//   3. finish() sends whatever was not sent (groups the hook never reported), waits for
//      all of them and rethrows the first communicator error (errc::io on a dead peer,
//      errc::aborted on teardown). After an error every later call rethrows it.
//   4. With no communicator or one rank nothing is sent and the gradients stay as they are.
//   5. The reduction is a sum in rank order (communicator.h invariant 2): every rank ends
//      with bitwise the same gradients.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "parallel/model/model_weights.h"
#include "runtime/communicator.h"

namespace troupe::parallel {

class grad_sync {
 public:
  // local_only(name): a gradient that is not reduced (an expert-parallel shard's experts: each rank
  // computed the whole batch's gradient of the experts it owns); nullptr = every gradient.
  grad_sync(model_weights& grads, runtime::communicator* comm, size_t bucket_bytes = size_t{4} << 20,
            std::function<bool(const std::string&)> local_only = nullptr);
  ~grad_sync();
  grad_sync(const grad_sync&) = delete;
  grad_sync& operator=(const grad_sync&) = delete;

  bool active() const { return comm_ != nullptr && comm_->size() > 1; }
  // A new backward: every bucket is pending again.
  void begin();
  // The decoder's fb_options::grads_ready hook: group = layer index, or grad_group::head / ::embedding.
  void group_ready(int64_t group);
  // Sends what is left, waits for every bucket; rethrows a communicator error.
  void finish();
  // A blocking reduction on the communicator's thread (losses, token counts, metrics).
  void all_reduce(runtime::tensor& t, runtime::reduce_op op);

  size_t num_buckets() const { return buckets_.size(); }
  size_t bucket_bytes(size_t i) const { return buckets_[i].numel * sizeof(float); }
  // Seconds the compute thread waited in finish() (the part of communication not hidden), totals.
  double exposed_wait_s() const { return exposed_wait_s_; }
  double comm_busy_s() const;

 private:
  struct bucket {
    std::vector<runtime::tensor> tensors;
    std::vector<int64_t> groups;
    int64_t numel = 0;
    runtime::tensor flat;
    size_t groups_seen = 0;
    bool sent = false;
  };
  void send(size_t b);
  void submit(std::function<void()> task);
  void wait_idle();
  void loop();
  void reduce_bucket(bucket& b);

  runtime::communicator* comm_;
  std::vector<bucket> buckets_;
  std::map<int64_t, size_t> bucket_of_group_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  size_t submitted_ = 0, done_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  double busy_s_ = 0;
  double exposed_wait_s_ = 0;
  std::thread thread_;
};

}  // namespace troupe::parallel
