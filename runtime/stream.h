// runtime/stream.h — ordered queues of work, and events between them.
//
//   stream s(device::cpu());                 // a worker thread runs tasks in order
//   s.enqueue([&] { copy_to_host(...); });
//   event e; e.record(s);                    // marks "everything enqueued so far"
//   e.synchronize();                         // host waits for it
//   stream other(device::cpu()); e.block(other);  // `other` waits for it before its next task
//
// Invariants:
//   1. Tasks on one stream run in enqueue order, one at a time.
//   2. On the cpu a stream is a dedicated thread (never the actor scheduler's);
//      on CUDA it is a cudaStream_t and enqueue() runs a host callback in stream order.
//   3. An exception thrown by a cpu task is kept and rethrown by synchronize().
#pragma once
#include <functional>
#include <memory>

#include "runtime/device.h"

namespace troupe::runtime {

class stream {
 public:
  explicit stream(device dev = device::cpu());
  ~stream();
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;

  device dev() const { return dev_; }
  void enqueue(std::function<void()> task);
  void synchronize();            // waits for all enqueued work; rethrows a task's exception
  void* native_handle() const;   // cudaStream_t on CUDA, nullptr on the cpu

  struct impl;

 private:
  device dev_;
  std::unique_ptr<impl> impl_;
  friend class event;
};

class event {
 public:
  event();
  ~event();
  event(const event&) = delete;
  event& operator=(const event&) = delete;

  void record(stream& s);     // completes when all work enqueued on s so far is done
  void synchronize();         // host waits; returns at once if never recorded
  bool query() const;         // done?
  void block(stream& s);      // work enqueued on s after this waits for the event

  struct impl;

 private:
  std::shared_ptr<impl> impl_;
};

}  // namespace troupe::runtime
