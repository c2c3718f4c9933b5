// parallel/memo/caching_allocator_sim.h — the fragmentation baseline: replays an allocation
// trace through a simulation of PyTorch's CUDA caching allocator and reports the memory it
// would reserve from the device.
//
//   caching_replay r = replay_caching_allocator(trace.events());
//   r.fragmentation();           // reserved_peak / max_live; the planned arena: plan.peak / max_live
//
// The model (c10/cuda/CUDACachingAllocator.cpp, without streams, events, OOM retries and
// empty_cache): requests are rounded up to 512 bytes; requests <= 1 MiB use the small pool,
// larger ones the large pool. A request takes the smallest cached free block of its pool that
// holds it (lowest segment/offset on ties); the block is split when the rest is >= 512 bytes
// (small pool) or > 1 MiB (large pool). With no cached block, a new segment is reserved: 2 MiB
// for small requests, 20 MiB for requests below 10 MiB, else the request rounded up to 2 MiB.
// A freed block merges with free neighbours of its segment and returns to its pool; segments
// are never given back. With pytorch_segments = false there is one pool, a new segment is
// exactly the rounded request, and any rest >= 512 bytes is split off.
//
// Invariants:
//   1. reserved_peak >= allocated_peak >= max_live (rounding only adds) and reserved never
//      shrinks, so reserved_peak is the reserved total at the end.
//   2. Events are processed in time order, frees before allocs at one tick ([alloc, free)).
//   3. Bad events throw errc::invalid_argument (check_events).
#pragma once
#include <cstdint>
#include <vector>

#include "parallel/memo/alloc_trace.h"

namespace troupe::parallel::memo {

struct caching_options {
  bool pytorch_segments = true;
  int64_t round = 512;                    // kMinBlockSize
  int64_t small_size = 1 << 20;           // kSmallSize
  int64_t small_buffer = 2 << 20;         // kSmallBuffer
  int64_t large_buffer = 20 << 20;        // kLargeBuffer
  int64_t min_large_alloc = 10 << 20;     // kMinLargeAlloc
  int64_t round_large = 2 << 20;          // kRoundLarge
};

struct caching_replay {
  int64_t reserved_peak = 0;   // bytes reserved from the device (segments)
  int64_t allocated_peak = 0;  // max over time of the rounded bytes handed out
  int64_t max_live = 0;        // max over time of the requested bytes (max_live_bytes)
  int64_t segments = 0;        // device allocations made
  double fragmentation() const {
    return max_live > 0 ? static_cast<double>(reserved_peak) / static_cast<double>(max_live) : 1.0;
  }
};

caching_replay replay_caching_allocator(const std::vector<alloc_event>& ev, const caching_options& o = {});

}  // namespace troupe::parallel::memo
