// runtime/shared_weights.h — weights in memory that another process on the same host can map
// instead of copying (memfd + mmap on the CPU): an elastic serving group hands dense weights and
// experts to a joining rank of the same host as pages, not bytes (elastic/scale/dp_member.h).
//
//   tensor w = shared_weights_copy(t);               // the same values, in a memfd of its own
//   auto h = shared_weights_handle(w);               // {boot id, pid, fd, bytes}: tell the other process
//   // in the other process, on the same host:
//   std::optional<tensor> m = shared_weights_map(*h, shape, dtype::f32);   // the same pages
//
// Invariants:
//   1. Each tensor has a memfd of its own, sized to its bytes rounded up to pages, mapped shared:
//      pages handed to another process live while either holds them and are freed when both let
//      go (a rank that gives an expert away releases its tensor; the receiver keeps the pages). A
//      descriptor per tensor: the open-file limit is raised to its hard limit first.
//   2. shared_weights_handle answers only for whole, contiguous tensors made by shared_weights_copy
//      or shared_weights_map, while they are alive; nothing otherwise.
//   3. shared_weights_map answers nothing — never a wrong mapping — unless the handle comes from this
//      boot of this host (/proc/sys/kernel/random/boot_id), /proc/<pid>/fd/<fd> opens and is the very
//      memfd the handle names (device and inode: another pid namespace's pid cannot pass for it) of
//      at least the handle's bytes; the caller then checks the contents (a checksum) and copies when
//      nothing came back. Mappings are shared read-write, as the giver's: UCX must be able to
//      register them to send them on (an RDMA registration of read-only pages fails), and nothing
//      writes weights while serving.
//   4. The CUDA counterpart (cuMemCreate with a POSIX-fd handle, cuMemExportToShareableHandle,
//      cuMemMap into a reserved range) fills the same interface; it is not built yet, so device
//      tensors are never shared (shared_weights_copy returns its input on a device).
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>

#include "runtime/tensor.h"

namespace troupe::runtime {

struct shared_weights_handle_t {
  uint64_t boot[2] = {0, 0};  // this host's boot id (128 bits)
  int64_t pid = 0;
  int64_t fd = -1;            // in pid's file table
  int64_t bytes = 0;
  int64_t dev = 0, ino = 0;   // the memfd's identity (fstat): what opening /proc/<pid>/fd/<fd> must find
};

// Invariant 1; a cpu tensor's values in a memfd of its own (contiguous).
tensor shared_weights_copy(const tensor& t);
// Invariant 2.
std::optional<shared_weights_handle_t> shared_weights_handle(const tensor& t);
// Invariant 3: the pages of `h` as a tensor of `shape` and `dt` (bytes must match), or nothing.
std::optional<tensor> shared_weights_map(const shared_weights_handle_t& h, const shape_t& shape, dtype dt);
// This host's boot id, as shared_weights_handle_t::boot holds it.
void shared_weights_boot_id(uint64_t out[2]);

}  // namespace troupe::runtime
