// runtime/communicator_ucx.h — the UCX backend: collectives and point-to-point built on
// UCP tagged messages, plus one-sided put/get into registered memory (expert weights,
// KV blocks). One UCP context, one worker and one endpoint per peer; worker addresses
// travel once through a runtime::bootstrap.
//
//   ucx_options o;
//   o.transports = "tcp";                                 // or "posix,cma,self", "" (UCX's choice)
//   o.timeout_ms = 5000;
//   auto boots = make_inproc_bootstraps(2);              // or make_mpi_bootstrap()
//   auto comm = make_ucx_communicator(*boots[rank], o);  // collective over the bootstrap
//   comm->all_reduce(x, reduce_op::sum);
//   memory_region mine = comm->register_memory(kv);      // pin + pack an rkey
//   auto regions = comm->exchange_regions(mine);         // collective: regions[r] is rank r's
//   comm->put(block, 1, regions[1], 4096);  comm->flush(1);   // bytes land at rank 1 + 4096
//
// Invariants (on top of communicator.h's):
//   1. A message's UCP tag holds its kind, the sender's rank and either (user tag, per
//      (peer, tag) sequence) or (collective sequence, op, step), so messages of different
//      operations never match each other; a size that differs from what the receiver
//      expects is errc::invalid_argument naming both ranks.
//   2. Reductions are direct: rank r receives block r from every rank, combines it in
//      rank order 0..P-1 (fp32 accumulation for bf16) and sends the result to all, so
//      every rank holds bitwise the same result.
//   3. Waiting is a progress loop with a deadline: a silent peer is errc::io naming the
//      op and the peer after timeout_ms; a failed endpoint (UCP peer error handling) is
//      errc::io naming the peer at once; abort() makes the pending and every later op
//      throw errc::aborted with the reason.
//   4. After a failure that leaves the group out of step (a collective, or a send that
//      did not complete) the communicator refuses every later op: rebuild the group.
//   5. put() and get() return once the local buffer may be reused (get: the data is
//      there); flush(peer) returns once every put to `peer` is visible there.
//   6. Each communicator belongs to one thread (its worker is UCS_THREAD_MODE_SINGLE);
//      abort() is the one call another thread may make. User tags are in [0, 2^24).
//   7. Peer death: TCP reports a closed connection at once; shared memory (posix, sysv)
//      is checked by UCX keepalive every timeout_ms/3 (clamped to 0.2-20 s). To let
//      shared memory report failures at all, the first communicator sets
//      UCX_MM_ERROR_HANDLING=y for the process unless the environment chose already.
//   8. Built without UCX, make_ucx_communicator throws errc::unsupported.
//   9. A group that grows (ucx_options::resolve_peer set: the elastic serving pool). A rank that
//      joins later is made by make_ucx_joining_communicator at its rank, with no collective; the
//      others learn its worker address from resolve_peer when they first send to it, and a
//      receive from it needs no address at all. size() is one more than the highest rank this
//      side has met, so it may differ between ranks: such a group does point-to-point only (a
//      collective on it is errc::invalid_argument; before it grows it runs them as any other).
//      Only the endpoint to a peer is made lazily; resolve_peer runs on the owning thread.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "runtime/bootstrap.h"
#include "runtime/communicator.h"
#include "runtime/tensor.h"

namespace troupe::runtime {

struct ucx_options : communicator_options {
  std::string transports;   // UCX_TLS, e.g. "tcp", "posix,cma,self"; "" keeps UCX's default
  std::string net_devices;  // UCX_NET_DEVICES, e.g. "lo" (tests); "" keeps UCX's default
  // A wait with nothing to progress for 2 ms sleeps on the worker's event fd (UCP_FEATURE_WAKEUP)
  // instead of spinning: for a communicator whose ranks may wait long (an idle serving group). UCX
  // then uses only transports that can signal events (tcp, posix, sysv do).
  bool sleep_when_idle = false;
  // Invariant 9: the worker address of `rank`, which joined after the group was made. Blocks
  // until it is known; throws (errc::io, naming the rank) when it never comes.
  std::function<std::string(int rank)> resolve_peer;
};

// Local memory pinned for one-sided access (ucp_mem_map). Copies share the mapping,
// which is released (and the tensor's storage let go) when the last copy dies.
class memory_region {
 public:
  memory_region() = default;
  memory_region(void* data, size_t nbytes, std::string packed_rkey, std::shared_ptr<void> handle)
      : data_(data), nbytes_(nbytes), packed_rkey_(std::move(packed_rkey)), handle_(std::move(handle)) {}
  bool valid() const { return handle_ != nullptr; }
  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  const std::string& packed_rkey() const { return packed_rkey_; }  // what a peer needs to reach it

 private:
  void* data_ = nullptr;
  size_t nbytes_ = 0;
  std::string packed_rkey_;
  std::shared_ptr<void> handle_;  // unmaps on release
};

// A peer's region as seen from here: its address in the peer's process and its rkey.
struct remote_region {
  int rank = -1;
  uint64_t address = 0;
  size_t nbytes = 0;  // 0: the peer registered nothing
  std::string packed_rkey;
};

class ucx_communicator : public communicator {
 public:
  // t: a contiguous cpu tensor, kept alive by the region.
  virtual memory_region register_memory(tensor& t) = 0;
  // Collective: every rank passes its region (or an invalid one) -> result[r] is rank r's.
  virtual std::vector<remote_region> exchange_regions(const memory_region& mine) = 0;
  // Writes src's bytes at dst.address + offset (bytes) on `peer`; see invariant 5.
  virtual void put(const tensor& src, int peer, const remote_region& dst, size_t offset) = 0;
  // Reads dst.nbytes() bytes at src.address + offset (bytes) on `peer` into dst.
  virtual void get(tensor& dst, int peer, const remote_region& src, size_t offset) = 0;
  virtual void flush(int peer) = 0;
  // This rank's worker address: what a rank that joins later passes to resolve_peer.
  virtual std::string address() const = 0;
};

// Collective over `boot`: every rank of the bootstrap calls it (UCP context, worker,
// address exchange, endpoints). Throws errc::unsupported when the transports cannot
// reach a peer or UCX is missing from this build.
std::unique_ptr<ucx_communicator> make_ucx_communicator(bootstrap& boot, const ucx_options& options = {});
// Invariant 9: rank `rank` of a group that exists (made with the same resolve_peer), joining it
// alone; every peer is found through options.resolve_peer, which must be set.
std::unique_ptr<ucx_communicator> make_ucx_joining_communicator(int rank, const ucx_options& options);

}  // namespace troupe::runtime
