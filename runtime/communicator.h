// runtime/communicator.h — the data plane: collectives and point-to-point between ranks.
// Tensors move here, never as actor messages. Backends: in-process threads (tests,
// this file's make_inproc_group); MPI (communicator_mpi.h), UCX (communicator_ucx.h),
// NCCL (communicator_nccl.h). runtime/communicator_check.h checks any of them.
//
//   auto group = make_inproc_group(4);             // one communicator per thread
//   std::thread t([&] { group[1]->all_reduce(x, reduce_op::sum); });
//   group[0]->all_to_all_v(recv, recv_counts, send, send_counts);  // counts in elements
//
// Invariants:
//   1. Every rank of a group calls the same collectives in the same order.
//   2. Reductions combine ranks in rank order 0..P-1 (fp32 accumulation for bf16), so
//      every rank gets bitwise the same result, and integer results are exact.
//   3. A rank that does not arrive within timeout_ms makes the others throw errc::io
//      naming the operation and the missing ranks — never a silent hang.
//   5. abort(reason) is the one thread-safe call: every pending and later operation on
//      that rank throws errc::aborted carrying `reason` (the worker actor calls it when
//      the supervisor tears the group down after a member died).
//   4. Buffers are contiguous cpu tensors; dtypes f32, bf16, i32, i64 (max: any).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace troupe::runtime {

enum class reduce_op { sum, max };

class communicator {
 public:
  virtual ~communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;

  // t: same shape on every rank -> t: the reduction (in place)
  virtual void all_reduce(tensor& t, reduce_op op) = 0;
  // in: (P*n) on every rank -> out: (n), block `rank` of the reduction
  virtual void reduce_scatter(tensor& out, const tensor& in, reduce_op op) = 0;
  // in: (n) on every rank -> out: (P*n), rank r's block at r*n
  virtual void all_gather(tensor& out, const tensor& in) = 0;
  // send (flat) holds send_counts[r] elements for rank r, in rank order; recv gets
  // recv_counts[r] elements from rank r, in rank order. recv_counts[r] must equal rank
  // r's send_counts[this rank] (checked).
  virtual void all_to_all_v(tensor& recv, const std::vector<int64_t>& recv_counts, const tensor& send,
                            const std::vector<int64_t>& send_counts) = 0;
  virtual void broadcast(tensor& t, int root) = 0;
  virtual void send(const tensor& t, int peer, int tag) = 0;
  virtual void recv(tensor& t, int peer, int tag) = 0;  // t's shape/dtype must match what was sent
  virtual void barrier() = 0;
  virtual void abort(const std::string& reason) = 0;
};

struct communicator_options {
  int timeout_ms = 60000;  // a peer silent this long makes the operation throw errc::io
};

// `size` communicators over shared memory; each must be used by its own thread.
// (abort() on any of them aborts the whole group: they share one state.)
std::vector<std::unique_ptr<communicator>> make_inproc_group(int size, int timeout_ms = 60000);

}  // namespace troupe::runtime
