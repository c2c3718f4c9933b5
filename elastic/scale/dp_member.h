// elastic/scale/dp_member.h — one process's share of an elastic data-parallel serving group
// (dp_group.h invariant 7): its model (dense weights and its experts) behind the MoE layers'
// expert-parallel runner, the group's communicators, and its part in a change of size — weights
// peer-to-peer (mapped pages on one host, bytes with an XXH3-64 checksum otherwise), and the new group's
// communicators built among its ranks. A process outside the group waits as standby.
//
//   dp_member m(pool, xfer, make_comm, ep_options); // pool, xfer: every process able to serve, rank = pool rank
//   m.load("model_dir", 2);                         // ranks 0, 1: from disk, each its experts
//   m.start_standby_from("model_dir", config);      // ranks 2, 3: nothing loaded
//   dp_elastic el = m.elastic();                    // for dp_leader / dp_follow
//   auto plan = m.wait_standby();                   // a standby rank: the change that takes it in, or
//   if (plan) m.regroup(*plan);                     //   nothing once the service ended
//   dp_serve_follower(m, tok, opts, blocks, el);    // ranks 1..: all of that, until the service ends
//
// Invariants:
//   1. The group is a list of pool ranks (members(), in group-rank order); group rank i is members()[i]
//      and pool rank 0 is always group rank 0. It starts as [0, ranks); a change keeps the first
//      min(P, M) members and appends the lowest standby ranks that are not lost; a recovery drops
//      the lost ones and keeps the order of the rest.
//   2. Experts are placed by an explicit map (expert -> group rank, carried in every DpScale): a
//      change of size places them contiguously (expert e of E on rank e / (E / M); E must be a
//      multiple of M: check_ranks says so otherwise), a recovery keeps every survivor's and gives
//      each lost expert to the survivor holding fewest.
//   3. A change from P to M ranks is collective over its old and new members, in two halves.
//      prepare() starts the moves on a thread of their own over `xfer` while the rank goes on
//      serving on the old layout (they only read its weights); commit() waits for them and
//      switches. The moves run in one global order — every dense tensor to the k-th joining rank
//      from old member k % P, then every expert whose owner changes, from its old owner — grouped
//      into one blocking exchange per (sender, receiver) pair in the order the pairs first appear,
//      so no two ranks wait on each other: the sender's headers for all its tensors, the receiver's
//      answer (which it mapped: invariant 9), then the others' XXH3-64 checksums and bytes in order;
//      a mismatch is errc::io naming the tensor and both ranks. A joining rank's KV cache is made
//      meanwhile (its decoder exists from prepare() on). Nothing is read from
//      disk. Then the new group's ranks make its communicators (invariant 5), so once rank 0's moves
//      are done (ready()) every rank's are: all the new ranks have received everything.
//   4. Ranks that stay keep their dense weights and KV caches in place; experts they gain arrive in
//      buffers of their own and, at commit, are swapped in by handle as those they lose are released
//      (never all expert buffers again) — freed on a thread of their own after the switch, so the
//      pause does not include unmapping them. A leaving rank releases its weights and is standby again.
//   5. The group's communicators (tokens and borrowed expert weights) are made by `make_comm` among
//      the new group's members, once per layout; a group of one rank needs none (its MoE layers run
//      alone, its serving communicator is a one-rank group).
//   6. pool is used by one thread at a time (the rank's stepping thread, or its standby wait), xfer
//      by the moves' thread, or by the stepping thread in a recovery (its messages and the new
//      communicators' bootstrap; no moves run then).
//   7. The MoE runners of earlier layouts (one per change) are kept until the member goes, as
//      another thread may be reading their expert loads for /metrics during a switch.
//   8. A lost pool rank (mark_lost, from any thread) is never planned into a group again. recover()
//      is synchronous on every survivor: the survivors' communicators are made, each survivor keeps
//      its dense weights, KV cache and experts, and reads the lost ranks' experts that it now owns
//      from the checkpoint (the only time a rank reads weights from disk after loading). A change
//      under way is abandoned first (invariant 11).
//   9. Weight memory (dp_weight_memory). shared: every weight this member holds is in a memfd of its
//      own (runtime/shared_weights.h); a tensor moved to a rank of the same host goes as a handle
//      that the receiver maps — the sender's very pages (same boot, same memfd by device and inode,
//      same size: a checksum of the same pages would prove nothing), no copy; when it cannot map them
//      (another host, no access) it asks for the bytes, which come with their checksum as in
//      invariant 3. Pages given away stay alive through the receiver's mapping, so a scale-up on one
//      host adds no weight memory. copy: always bytes.
//      reallocate (the baseline a benchmark compares with): bytes, and at the commit every expert a
//      rank keeps is copied into a new buffer, as a layout change that reallocates its expert
//      buffers would.
//  10. The pool is the pool communicator's ranks at construction, plus every rank add_standby()
//      names later: a process that joined the running service from outside (a pool that grows:
//      runtime/communicator_ucx.h invariant 9). Planning takes standby ranks from it, lowest first;
//      a rank that joined is met by the others when they first send to it.
//  11. A loss while a change is under way (before rank 0 commits it) abandons the change. Its weights
//      and new communicators go through a communicator of its own (dp_moves_factory) that the loss
//      aborts on every rank of the change (watched(): the group and the change's ranks, for the
//      worker's loss registration), so every moves' thread ends at once; abandon() then discards
//      what was prepared — gained experts, new communicators, a joining rank's weights — and the
//      group is as before the change, which rank 0 recovers as invariant 8 says. A joining rank
//      that had switched already goes back to standby (to_standby()). Without a moves factory the
//      moves use `xfer`, and a loss while they run is waited out to its timeout.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "elastic/engine/engine.h"
#include "elastic/scale/dp_group.h"
#include "parallel/ep/ep_serve_runner.h"
#include "parallel/model/decoder.h"
#include "parallel/model/model_weights.h"
#include "runtime/communicator.h"
#include "runtime/proto/serve.pb.h"

namespace troupe::elastic {

// A communicator among `members` (pool ranks, group order), made collectively by the members (their
// addresses exchanged over `via`, whose ranks are pool ranks); `name` tells the layouts' groups apart
// ("serve.2").
using dp_comm_factory = std::function<std::unique_ptr<runtime::communicator>(
    runtime::communicator& via, const std::vector<int>& members, const std::string& name)>;
// A change's own point-to-point communicator over the pool (ranks = pool ranks), made by each rank of
// the change alone, with no collective (peers met on first use: runtime/communicator_ucx.h invariant
// 9). Invariant 11: a loss aborts it, and with it the change, without touching the pool's.
using dp_moves_factory = std::function<std::unique_ptr<runtime::communicator>(const std::string& name)>;

struct dp_transfer_stats {
  size_t bytes_sent = 0, bytes_received = 0;  // copied over xfer
  size_t bytes_mapped = 0;                     // received as a same-host rank's pages (invariant 9)
  int64_t tensors_received = 0;  // copied or mapped, each checked against its sender's checksum
  int64_t tensors_mapped = 0;
  double seconds = 0;            // the weights' part of the last regroup
};

// What moving weights does with memory (serve.yaml engine.weight_memory; invariant 9).
enum class dp_weight_memory { shared, copy, reallocate };
dp_weight_memory dp_weight_memory_from(const std::string& name);  // throws errc::invalid_argument

class dp_member {
 public:
  // pool: announcements and the standby wait; xfer: the weights and the new groups' bootstraps (the
  // same ranks; used by the moves' thread).
  dp_member(runtime::communicator& pool, runtime::communicator& xfer, dp_comm_factory make_comm,
            parallel::ep::ep_options ep, dp_weight_memory memory = dp_weight_memory::shared,
            dp_moves_factory make_moves = nullptr);
  ~dp_member();
  dp_member(const dp_member&) = delete;
  dp_member& operator=(const dp_member&) = delete;

  // A rank of the first group of `ranks` ranks: the model from disk, this rank's experts.
  void load(const std::string& dir, int ranks);
  // The same from weights already in memory (tests): this rank's shard is taken from `full`.
  void load(parallel::model_weights full, int ranks);
  // A standby rank: the model's config only (and where its checkpoint is, for a recovery).
  void start_standby(const runtime::model_config& config);
  void start_standby_from(const std::string& dir, const runtime::model_config& config);

  // Throws errc::invalid_argument when the model cannot run on `ranks` ranks (invariant 2), or the
  // pool has fewer processes alive.
  void check_ranks(int ranks) const;
  // Rank 0: the members and placements of a change to `target` ranks (invariants 1, 2); of a recovery
  // without the `lost` pool ranks.
  serve::DpScale plan(int target) const;
  serve::DpScale plan_recovery(const std::vector<int>& lost) const;
  // Invariant 8.
  void mark_lost(int pool_rank);
  std::vector<int> lost() const;
  int pool_alive() const;
  // Invariant 11 (the stepping thread): the pool ranks whose loss concerns this rank — its group's,
  // and while a change is prepared, the change's; abandon the prepared change; leave the group for
  // standby (a joining rank whose change rank 0 abandoned after this rank switched).
  std::vector<int> watched() const;
  void abandon();
  void to_standby();
  // Invariant 10 (any thread): a process that joined the pool later and waits as standby.
  void add_standby(int pool_rank);
  std::vector<int> pool_members() const;  // ascending, lost ones included
  runtime::communicator* recover(const serve::DpScale& plan);
  // Invariant 3. prepare: the moves start beside serving; ready: they are done (or failed); commit:
  // waits for them, rethrows their failure, switches, and returns the new group's serving
  // communicator (null when this rank left). regroup = prepare then commit.
  void prepare(const serve::DpScale& plan);
  bool ready() const;
  std::string move_error() const;  // "" unless the moves are done and failed
  runtime::communicator* commit(const serve::DpScale& plan);
  runtime::communicator* regroup(const serve::DpScale& plan);

  // Rank 0: tells the ranks [from, to) of a growing group about it (they wait in wait_standby).
  void announce(const serve::DpScale& plan);
  // Rank 0: tells every rank outside the group that the service ended.
  void end_standby();
  // A standby rank: the next change that takes it into the group, or nothing when the service ended.
  std::optional<serve::DpScale> wait_standby();

  // The dp_elastic of this member for dp_leader / dp_follow (pool_ranks = the pool's size when made;
  // pool_alive follows it as it grows).
  dp_elastic elastic();

  bool active() const {
    return std::find(members_.begin(), members_.end(), pool_.rank()) != members_.end();
  }
  int ranks() const { return static_cast<int>(members_.size()); }
  int pool_rank() const { return pool_.rank(); }
  const std::vector<int>& members() const { return members_; }
  const std::vector<int>& placement() const { return placement_; }  // expert -> group rank
  runtime::communicator& comm();               // the group's serving communicator (active ranks)
  // Every communicator of the layout (none on standby) and the change's moves communicator while one
  // is prepared (invariant 11).
  std::vector<runtime::communicator*> group_comms();
  parallel::decoder& decoder();                // active ranks, and a joining one from prepare() on
  const parallel::model_weights& weights() const { return w_; }
  const runtime::model_config& config() const { return config_; }
  parallel::ep::ep_serve_runner* moe() { return moe_.get(); }
  const dp_transfer_stats& last_transfer() const { return stats_; }
  const dp_transfer_stats& total_transfer() const { return total_; }  // every regroup of this rank
  int64_t layout() const { return layout_; }
  // Called at each switch once the new serving communicator is in place (comm(); none when this
  // rank left) and before the old one goes: e.g. to register the communicators a teardown aborts.
  std::function<void()> on_layout;

 private:
  void load_shard(parallel::model_weights full, int ranks);
  void check_plan(const serve::DpScale& plan) const;
  void make_comms(runtime::communicator& via, const std::vector<int>& members, int64_t layout);
  void discard_change();
  void leave_group(std::vector<int> members, std::vector<int> placement);
  void install(const std::vector<int>& members, const std::vector<int>& placement, int64_t layout);
  void move_weights(const serve::DpScale& plan);
  // Freed on a thread of their own (invariant 4), with a change's moves communicator.
  void release_later(std::vector<runtime::tensor> given, std::unique_ptr<runtime::communicator> comm = nullptr);
  void reload_experts(const std::vector<std::pair<int64_t, int64_t>>& wanted);

  struct incoming_expert {
    size_t layer;
    int64_t expert;
    size_t set;  // gate, up, down
    runtime::tensor value;
  };
  runtime::communicator& pool_;
  runtime::communicator& xfer_;
  dp_comm_factory make_comm_;
  dp_moves_factory make_moves_;
  std::unique_ptr<runtime::communicator> moves_;  // the prepared change's (invariant 11)
  std::optional<serve::DpScale> change_;           // the change prepared and not committed here
  parallel::ep::ep_options ep_;
  dp_weight_memory memory_;
  runtime::model_config config_;
  parallel::model_weights w_;
  std::unique_ptr<parallel::ep::ep_serve_runner> moe_;
  std::vector<std::unique_ptr<parallel::ep::ep_serve_runner>> retired_;  // earlier layouts' (invariant 7)
  std::unique_ptr<parallel::decoder> dec_;
  std::unique_ptr<runtime::communicator> tokens_, borrowed_;
  std::unique_ptr<runtime::communicator> next_tokens_, next_borrowed_;  // made by the moves' thread
  std::vector<incoming_expert> incoming_;
  std::thread releasing_;  // frees the experts the last switch gave away
  std::thread moving_;
  std::atomic<bool> done_{false};
  std::exception_ptr error_;
  std::vector<int> members_;    // pool ranks, group order (invariant 1); empty on a standby rank
  std::vector<int> placement_;  // expert -> group rank (invariant 2)
  std::string dir_;             // the checkpoint (a recovery's lost experts)
  std::shared_ptr<const parallel::model_weights> source_;  // or the weights a test loaded from
  mutable std::mutex pool_mu_;
  std::vector<int> pool_members_;  // pool ranks able to serve, ascending (invariant 10)
  std::vector<int> lost_;       // pool ranks
  int64_t layout_ = 0;
  dp_transfer_stats stats_, total_;
};

// A pool rank other than 0, for the whole service: follows the group while in it (dp_follow), waits as
// standby while not, and is taken in again, until rank 0 ends the service. `opts` are the engine's
// options (group_member is set here; max_waiting is multiplied by the pool's size: rank 0 bounds the
// group); `blocks` the KV blocks of a rank of the first group. el: m.elastic(), or a wrapper of it.
struct dp_follower_summary {
  int64_t steps = 0;  // group iterations run
  int64_t joins = 0;  // times taken in from standby
};
dp_follower_summary dp_serve_follower(dp_member& m, const parallel::text_tokenizer& tok, engine_options opts,
                                      int64_t blocks, const dp_elastic& el);

}  // namespace troupe::elastic
