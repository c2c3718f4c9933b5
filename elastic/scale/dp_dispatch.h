// elastic/scale/dp_dispatch.h — which rank of a data-parallel-attention group serves a request
// (dp_group.h). A policy sees the prompt and every rank's load, and remembers what it sent where.
//
//   dp_least_kv_prefix policy(/*ranks=*/4, /*block_size=*/16);
//   std::vector<dp_rank_load> loads = ...;              // each rank's KV use and queue
//   const int r = policy.pick(prompt, loads);
//   policy.dispatched(r, prompt);                        // r now holds (or will hold) these blocks
//
// Invariants:
//   1. pick() returns a rank in [0, ranks); it depends only on the prompt, the loads and what
//      dispatched() was told before (no clock, no randomness): the same history picks the same.
//   2. least_kv_prefix: among the ranks whose load is at most the slack above the least loaded one
//      (slack_blocks, or by default a sixteenth of the least loaded rank's blocks, at least 1), the
//      one holding the longest prefix of the prompt's full blocks (chained block hashes, as
//      kv_blocks.h hashes them) wins when that prefix is at least one block; otherwise the least
//      loaded rank. Load = KV blocks in use + blocks of requests dispatched but not yet reported.
//      Ties go to the lowest rank.
//   3. The remembered prefixes are bounded: at most max_blocks hashes per rank, the least recently
//      dispatched forgotten first.
//   4. round_robin: ranks in turn (a baseline, and for tests).
#pragma once
#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace troupe::elastic {

struct dp_rank_load {
  int64_t blocks_used = 0, num_blocks = 0;
  int64_t running = 0, waiting = 0;
  int64_t pending_blocks = 0;  // dispatched since the rank's last report
  int64_t load() const { return blocks_used + pending_blocks; }
};

class dp_dispatch_policy {
 public:
  virtual ~dp_dispatch_policy() = default;
  virtual int pick(std::span<const int32_t> prompt, std::span<const dp_rank_load> loads) = 0;
  virtual void dispatched(int rank, std::span<const int32_t> prompt) = 0;
  virtual std::string name() const = 0;
  // The group now has `ranks` ranks (it grew or shrank; ranks that stay keep their numbers and
  // what the policy remembers of them, new ranks start empty).
  virtual void resize(int ranks) = 0;
  // `rank` is gone (lost): the ranks above it move down by one and keep what the policy remembers.
  virtual void remove(int rank) = 0;
};

class dp_least_kv_prefix final : public dp_dispatch_policy {
 public:
  // slack_blocks < 0: a sixteenth of the least loaded rank's KV blocks
  dp_least_kv_prefix(int ranks, int64_t block_size, int64_t slack_blocks = -1, size_t max_blocks = 1 << 16);
  int pick(std::span<const int32_t> prompt, std::span<const dp_rank_load> loads) override;
  void dispatched(int rank, std::span<const int32_t> prompt) override;
  std::string name() const override { return "least_kv_prefix"; }
  void resize(int ranks) override;
  void remove(int rank) override;
  // Full blocks of the prompt's prefix that `rank` was sent before (invariant 2).
  int64_t prefix_blocks(int rank, std::span<const int32_t> prompt) const;

 private:
  struct rank_memory {
    std::list<uint64_t> lru;  // front: least recently dispatched
    std::unordered_map<uint64_t, std::list<uint64_t>::iterator> where;
  };
  std::vector<uint64_t> hashes(std::span<const int32_t> prompt) const;
  int64_t block_size_, slack_;
  size_t max_blocks_;
  std::vector<rank_memory> ranks_;
};

class dp_round_robin final : public dp_dispatch_policy {
 public:
  explicit dp_round_robin(int ranks) : ranks_(ranks) {}
  int pick(std::span<const int32_t>, std::span<const dp_rank_load>) override { return next_++ % ranks_; }
  void dispatched(int, std::span<const int32_t>) override {}
  std::string name() const override { return "round_robin"; }
  void resize(int ranks) override {
    ranks_ = ranks;
    next_ = 0;
  }
  void remove(int) override { resize(ranks_ > 1 ? ranks_ - 1 : 1); }

 private:
  int ranks_;
  int next_ = 0;
};

// "least_kv_prefix" | "round_robin" -> the policy; throws errc::invalid_argument naming the others.
std::unique_ptr<dp_dispatch_policy> make_dp_dispatch(const std::string& name, int ranks, int64_t block_size);

}  // namespace troupe::elastic
