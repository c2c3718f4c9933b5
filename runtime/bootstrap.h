// runtime/bootstrap.h — out-of-band exchange of small byte blobs among the ranks of a
// job. A data-plane backend uses it once, at set-up: UCX worker addresses, the NCCL
// unique id. Implementations: threads (make_inproc_bootstraps, for tests), MPI
// (communicator_mpi.h: make_mpi_bootstrap), and the supervisor actor (actors/), which
// is how ranks started by troupe-launch without mpirun find each other.
//
//   auto addrs = boot.all_gather(my_address);   // addrs[r] = rank r's blob, every rank
#pragma once
#include <memory>
#include <string>
#include <vector>

namespace troupe::runtime {

class bootstrap {
 public:
  virtual ~bootstrap() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Collective: every rank passes its blob and gets every rank's blob, in rank order.
  // Throws errc::io naming the missing ranks when one does not arrive in time.
  virtual std::vector<std::string> all_gather(const std::string& mine) = 0;
};

// A sub-group of `world`: every rank of `world` calls all_gather together (it is a world
// all_gather underneath); members of `members` (world ranks, group order) get their group's
// blobs, the others an empty vector. rank() is the position in `members` (-1 when not in it).
std::unique_ptr<bootstrap> make_subgroup_bootstrap(bootstrap& world, std::vector<int> members);

// A bootstrap among `members` (ranks of `comm`, group order) over comm's point-to-point messages with
// user tag `tag`: only the members call all_gather (members[0] gathers and sends every blob back), so a
// group can form while the rest of comm's ranks do other work. rank() is the position in `members`.
class communicator;
std::unique_ptr<bootstrap> make_comm_bootstrap(communicator& comm, std::vector<int> members, int tag);

// `size` bootstraps over shared memory; each must be used by its own thread.
std::vector<std::unique_ptr<bootstrap>> make_inproc_bootstraps(int size, int timeout_ms = 60000);

}  // namespace troupe::runtime
