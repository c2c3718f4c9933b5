// runtime/communicator_mpi.h — the MPI backend (Open MPI 4.1, C API): a bootstrap and a
// communicator for ranks started by mpirun.
//
//   mpi_session mpi;                                   // MPI_Init_thread .. MPI_Finalize
//   auto comm = make_mpi_communicator({.timeout_ms = 5000});   // collective: a dup of WORLD
//   comm->all_reduce(x, reduce_op::sum);
//   auto boot = make_mpi_bootstrap();                  // for UCX / NCCL set-up
//   auto addrs = boot->all_gather(my_address);
//
// Invariants (on top of communicator.h's):
//   1. Collectives are direct, over MPI_Isend/MPI_Irecv on a private dup of
//      MPI_COMM_WORLD: all_reduce = reduce_scatter (rank r receives chunk r from every
//      rank and combines it in rank order 0..P-1, fp32 accumulation for bf16) + all_gather
//      of the reduced chunks, so every rank holds bitwise the same result; n need not be
//      divisible by P. Up to 32 KiB all_reduce takes one round instead: every rank gets
//      all P tensors and reduces them in rank order (the same bits). Each message's tag holds the collective's sequence number and
//      phase, so messages of different collectives never match.
//   2. Waiting is a polling loop (MPI_Test + yield): a peer silent for timeout_ms makes
//      the op throw errc::io naming the op and the ranks it still waits for; abort() (the
//      one call another thread may make) makes the pending and every later op throw
//      errc::aborted with the reason.
//   3. A size that differs from what the receiver expects (recv, all_to_all_v counts,
//      broadcast, collectives called with different shapes) is errc::invalid_argument
//      naming both ranks; the messages are still consumed.
//   4. After a timeout or abort inside a collective the group is out of step: the
//      communicator refuses every later op. Rebuild the group.
//   5. One message carries at most 2^31-1 bytes (a larger block is errc::unsupported).
//   6. Built without MPI, everything here throws errc::unsupported "built without MPI".
#pragma once
#include <memory>

#include "runtime/bootstrap.h"
#include "runtime/communicator.h"

namespace troupe::runtime {

// Owns MPI's lifetime in this process: MPI_Init_thread (MPI_THREAD_MULTIPLE requested,
// SERIALIZED or better accepted) and MPI_Finalize on destruction. When MPI is already
// initialized (by another session or a host program) it neither inits nor finalizes.
class mpi_session {
 public:
  mpi_session();
  ~mpi_session();
  mpi_session(const mpi_session&) = delete;
  mpi_session& operator=(const mpi_session&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // "MPI_THREAD_MULTIPLE" or "MPI_THREAD_SERIALIZED".
  const char* thread_level() const;

  // True when this process looks started by mpirun / a PMI launcher (environment).
  static bool launched_by_mpirun();
  // True when troupe was built with MPI.
  static bool available();

 private:
  bool owns_ = false;
  int provided_ = 0;
  int rank_ = 0;
  int size_ = 1;
};

// Blobs of any size, over MPI_Allgather of the sizes + MPI_Allgatherv. Needs MPI
// initialized (an mpi_session). Collective over MPI_COMM_WORLD.
std::unique_ptr<bootstrap> make_mpi_bootstrap(int timeout_ms = 60000);

// Collective over MPI_COMM_WORLD (MPI_Comm_dup). Needs MPI initialized (an mpi_session).
std::unique_ptr<communicator> make_mpi_communicator(const communicator_options& options = {});
// A sub-group: collective over MPI_COMM_WORLD; the ranks passing the same color form one
// communicator (MPI_Comm_split, ordered by world rank) — e.g. a job's context-parallel groups.
std::unique_ptr<communicator> make_mpi_communicator_split(int color, const communicator_options& options = {});

}  // namespace troupe::runtime
