// parallel/memo/plan_cache.h — memory plans cached on disk, so a restart does not re-solve.
//
//   std::string key = fmt::format("{}|seq={}|alpha={}|{}", model_hash, seq_len, alpha, dtype);
//   bool hit = false;
//   plan p = plan_cached("~/.cache/troupe/memo", key, trace.events(), opts, &hit);
//   bilevel_plan b = plan_bilevel_cached(dir, key, problem, opts, &hit);
//
// The caller builds the key from everything the plan depends on (model config, seq_len, α,
// dtypes); the file is <dir>/memo-<fnv1a64(key) in hex>.json and holds
// {"key", "kind", "fingerprint", "plan"}; "fingerprint" hashes the events (sizes and times)
// and the alignment.
//
// Invariants:
//   1. A hit returns the stored plan only when its key, kind and fingerprint match and it
//      verifies against the given events; anything else (unreadable, corrupt JSON, a hash
//      collision, a stale trace, a plan that fails verification) logs a warning naming the
//      file and why, re-solves, and overwrites the file.
//   2. Files are written to a temporary name in dir and renamed into place, so a reader never
//      sees a half-written plan. dir is created when missing. A failure to write the cache
//      is a warning, not an error: the solved plan is still returned.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "parallel/memo/planner.h"

namespace troupe::parallel::memo {

// <dir>/memo-<16 hex digits>.json
std::string plan_cache_path(const std::string& dir, const std::string& key);

// 64-bit FNV-1a of the events' sizes and lifetimes (names are ignored).
uint64_t events_fingerprint(const std::vector<alloc_event>& ev);

plan plan_cached(const std::string& dir, const std::string& key, const std::vector<alloc_event>& ev,
                 const planner_options& o, bool* hit = nullptr);

bilevel_plan plan_bilevel_cached(const std::string& dir, const std::string& key, const bilevel_problem& bp,
                                 const planner_options& o, bool* hit = nullptr);

}  // namespace troupe::parallel::memo
