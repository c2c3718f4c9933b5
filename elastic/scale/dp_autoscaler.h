// elastic/scale/dp_autoscaler.h — when an elastic serving group (dp_group.h invariant 7) should
// grow or shrink, from what rank 0 sees of its load: a policy on queue depth and TTFT against an
// SLO, between a least and a largest size, with patience and a cooldown. Pure: the caller feeds it
// observations and carries out what it says (dp_leader::request_scale).
//
//   dp_autoscaler a(opts, [](int r) { return 8 % r == 0; });   // sizes the model can run on
//   if (auto d = a.observe(obs)) leader.request_scale(d->ranks);  // every opts.interval_ms
//
// Invariants:
//   1. Grow when, for `patience` looks in a row, more than queue_per_rank requests wait per rank or
//      the TTFT p90 of the requests that got their first token since the last look is above the SLO;
//      shrink when, as long, nothing waits, the KV use is below shrink_below and that TTFT p90 (if
//      any) is below half the SLO. Any other look starts the count again.
//   2. A change goes to the next size up (or down) that `valid` accepts within [min_ranks,
//      max_ranks] and not above obs.able (the processes able to serve, when given: the pool grows
//      as processes join from outside); none there: no change. Never while a change is under way (obs.changing), and
//      not within cooldown_ms of the last change decided.
//   3. Every decision says why ("queue", "ttft", "idle") and is counted (metrics_text).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "elastic/engine/engine.h"

namespace troupe::elastic {

struct autoscale_options {
  int min_ranks = 1, max_ranks = 1;
  double ttft_slo_s = 2.0;
  int64_t queue_per_rank = 4;
  double shrink_below = 0.25;  // KV use share
  int64_t patience = 3;
  int64_t cooldown_ms = 30000;
};

struct autoscale_observation {
  int64_t now_ms = 0;           // a monotonic clock
  int ranks = 1;
  bool changing = false;        // a change is under way
  int able = 0;                 // processes able to serve now; 0 = only max_ranks bounds a change
  int64_t waiting = 0;          // requests waiting, the whole group
  double kv_usage = 0;          // the group's share of KV blocks in use
  latency_histogram ttft{serving_latency_bounds()};  // cumulative: the group's TTFT histogram
};

struct autoscale_decision {
  int ranks = 0;
  std::string reason;  // queue | ttft | idle
};

class dp_autoscaler {
 public:
  dp_autoscaler(autoscale_options o, std::function<bool(int)> valid);
  std::optional<autoscale_decision> observe(const autoscale_observation& obs);
  // Prometheus text: decisions by direction and reason (thread-safe).
  std::string metrics_text() const;

 private:
  int next_size(int ranks, int step, int able) const;
  autoscale_options o_;
  std::function<bool(int)> valid_;
  std::vector<int64_t> last_counts_;
  int64_t up_streak_ = 0, down_streak_ = 0;
  std::string up_reason_;
  std::optional<int64_t> last_change_ms_;
  mutable std::mutex mu_;  // decisions_, read by /metrics
  std::map<std::pair<std::string, std::string>, int64_t> decisions_;
};

}  // namespace troupe::elastic
