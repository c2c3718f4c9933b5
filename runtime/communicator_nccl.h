// runtime/communicator_nccl.h — the NCCL backend: collectives and point-to-point between
// GPUs, one rank per GPU. Rank 0's ncclUniqueId travels once through a runtime::bootstrap;
// each communicator owns a non-blocking NCCL communicator and its own CUDA stream.
//
//   auto boots = make_inproc_bootstraps(P);                 // or make_mpi_bootstrap()
//   communicator_options o;  o.timeout_ms = 5000;
//   auto comm = make_nccl_communicator(*boots[rank], rank, o);   // rank on cuda:rank
//   tensor x = tensor::zeros({1024}, dtype::bf16, device::cuda(rank));
//   comm->all_reduce(x, reduce_op::sum);                    // returns once x holds the sum
//
// Invariants (they replace or refine communicator.h's where stated):
//   1. Buffers are contiguous tensors on this communicator's GPU (device::cuda(i) given to
//      the factory); anything else is errc::invalid_argument naming both devices.
//   2. NOT communicator.h's invariant 2 for floats. NCCL combines ranks in an order set by
//      its algorithm (ring, tree, NVLS), not 0..P-1, and reduces bf16 in bf16: every hop
//      rounds the partial sum to bf16 (NVIDIA/nccl#1026), so a bf16 sum over P ranks may
//      differ from "fp32 accumulation, one rounding" by up to about (P-1) bf16 ulps of the
//      largest partial sum. f32 sums are rounded per hop in f32 (order-dependent). Integers
//      and max are exact. Every rank receives the same bits (NCCL broadcasts the reduced
//      value; NVIDIA/nccl#434), but the bits depend on P, the topology and NCCL's version.
//      comm_check_options::bf16_sum_tolerance lets the conformance suite accept this.
//   3. Every call returns once its result is in place (the stream is idle again). Waiting
//      polls cudaStreamQuery and ncclCommGetAsyncError until timeout_ms: then the NCCL
//      communicator is aborted (ncclCommAbort) and the call throws errc::io naming the op.
//      An NCCL error (peer lost over the network) is errc::io/errc::cuda naming the op.
//   4. abort(reason) may be called from any thread: the pending op (if any) aborts the NCCL
//      communicator within one poll and throws errc::aborted with `reason`; every later op
//      throws the same. After any failure (3 or 4) the communicator refuses every op.
//   5. all_to_all_v checks recv_counts against the peers' send_counts (one extra exchange
//      of P int64). Other size agreements (all_gather, reduce_scatter, send/recv shapes) are
//      preconditions NCCL cannot check: a mismatch hangs until timeout_ms or corrupts data.
//   6. send/recv: NCCL has no tags; messages between two ranks match in call order, and
//      `tag` is ignored. A rank cannot send to itself.
//   7. Built without NCCL, or on a machine whose GPU does not answer, the factory throws
//      errc::unsupported saying which (every rank learns of every rank's failure through
//      the bootstrap, so none waits for a rank that gave up).
#pragma once
#include <memory>

#include "runtime/bootstrap.h"
#include "runtime/communicator.h"

namespace troupe::runtime {

// Collective over `boot`: every rank of the bootstrap calls it with the GPU it drives.
// Each communicator must be used by one thread (abort() excepted).
std::unique_ptr<communicator> make_nccl_communicator(bootstrap& boot, int cuda_device,
                                                     const communicator_options& options = {});

}  // namespace troupe::runtime
