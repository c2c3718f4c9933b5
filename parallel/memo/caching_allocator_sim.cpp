// parallel/memo/caching_allocator_sim.cpp — a best-fit caching allocator replay (see the header).
#include "parallel/memo/caching_allocator_sim.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <set>
#include <tuple>
#include <utility>

#include "runtime/error.h"

namespace troupe::parallel::memo {

using runtime::errc;

namespace {

struct block {
  int64_t size = 0;
  bool free = true;
};

class caching_sim {
 public:
  explicit caching_sim(const caching_options& o) : o_(o) {}

  // Returns (segment, offset) of the block handed out.
  std::pair<int, int64_t> allocate(int64_t request) {
    const int64_t size = std::max(o_.round, (request + o_.round - 1) / o_.round * o_.round);
    const int pool = pool_of(size);
    auto it = pools_[pool].lower_bound({size, -1, -1});
    if (it == pools_[pool].end()) {
      const int64_t seg_size = segment_size(size);
      const int seg = static_cast<int>(segments_.size());
      segments_.push_back({{0, block{seg_size, true}}});
      segment_pool_.push_back(pool);
      reserved_ += seg_size;
      it = pools_[pool].insert({seg_size, seg, 0}).first;
    }
    const auto [bsize, seg, off] = *it;
    pools_[pool].erase(it);
    auto& blocks = segments_[static_cast<size_t>(seg)];
    blocks[off].free = false;
    const int64_t rest = bsize - size;
    if (should_split(pool, rest)) {
      blocks[off].size = size;
      blocks[off + size] = block{rest, true};
      pools_[pool].insert({rest, seg, off + size});
    }
    allocated_ += blocks[off].size;
    allocated_peak_ = std::max(allocated_peak_, allocated_);
    return {seg, off};
  }

  void release(int seg, int64_t off) {
    auto& blocks = segments_[static_cast<size_t>(seg)];
    const int pool = segment_pool_[static_cast<size_t>(seg)];
    auto it = blocks.find(off);
    allocated_ -= it->second.size;
    it->second.free = true;
    auto next = std::next(it);
    if (next != blocks.end() && next->second.free) {
      pools_[pool].erase({next->second.size, seg, next->first});
      it->second.size += next->second.size;
      blocks.erase(next);
    }
    if (it != blocks.begin()) {
      auto prev = std::prev(it);
      if (prev->second.free) {
        pools_[pool].erase({prev->second.size, seg, prev->first});
        prev->second.size += it->second.size;
        blocks.erase(it);
        it = prev;
      }
    }
    pools_[pool].insert({it->second.size, seg, it->first});
  }

  int64_t reserved() const { return reserved_; }
  int64_t allocated_peak() const { return allocated_peak_; }
  int64_t segments() const { return static_cast<int64_t>(segments_.size()); }

 private:
  int pool_of(int64_t size) const { return o_.pytorch_segments && size <= o_.small_size ? 0 : 1; }
  int64_t segment_size(int64_t size) const {
    if (!o_.pytorch_segments) return size;
    if (size <= o_.small_size) return o_.small_buffer;
    if (size < o_.min_large_alloc) return o_.large_buffer;
    return (size + o_.round_large - 1) / o_.round_large * o_.round_large;
  }
  bool should_split(int pool, int64_t rest) const {
    if (!o_.pytorch_segments || pool == 0) return rest >= o_.round;
    return rest > o_.small_size;
  }

  caching_options o_;
  std::vector<std::map<int64_t, block>> segments_;  // offset -> block, per segment
  std::vector<int> segment_pool_;
  std::set<std::tuple<int64_t, int, int64_t>> pools_[2];  // free blocks: (size, segment, offset)
  int64_t reserved_ = 0, allocated_ = 0, allocated_peak_ = 0;
};

}  // namespace

caching_replay replay_caching_allocator(const std::vector<alloc_event>& ev, const caching_options& o) {
  check_events(ev, "caching allocator replay");
  TROUPE_CHECK(o.round > 0, errc::invalid_argument, "caching allocator replay: round must be positive");
  std::vector<std::pair<int64_t, int>> marks;  // (time, -1-i free | +1+i alloc): frees first
  for (size_t i = 0; i < ev.size(); ++i) {
    marks.emplace_back(ev[i].alloc_time, static_cast<int>(i) + 1);
    marks.emplace_back(ev[i].free_time, -static_cast<int>(i) - 1);
  }
  std::sort(marks.begin(), marks.end());
  caching_sim sim(o);
  std::vector<std::pair<int, int64_t>> where(ev.size());
  for (const auto& [t, m] : marks) {
    const size_t i = static_cast<size_t>(std::abs(m) - 1);
    if (m > 0)
      where[i] = sim.allocate(ev[i].size);
    else
      sim.release(where[i].first, where[i].second);
  }
  caching_replay r;
  r.reserved_peak = sim.reserved();
  r.allocated_peak = sim.allocated_peak();
  r.max_live = max_live_bytes(ev);
  r.segments = sim.segments();
  return r;
}

}  // namespace troupe::parallel::memo
