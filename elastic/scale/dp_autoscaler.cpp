// elastic/scale/dp_autoscaler.cpp — see dp_autoscaler.h.
#include "elastic/scale/dp_autoscaler.h"

#include <fmt/format.h>

#include <algorithm>

#include "runtime/error.h"

namespace troupe::elastic {

using runtime::errc;

dp_autoscaler::dp_autoscaler(autoscale_options o, std::function<bool(int)> valid) : o_(o), valid_(std::move(valid)) {
  TROUPE_CHECK(o_.min_ranks >= 1 && o_.max_ranks >= o_.min_ranks && o_.patience >= 1 && o_.cooldown_ms >= 0 &&
                   o_.queue_per_rank >= 1 && o_.ttft_slo_s > 0,
               errc::invalid_argument, "autoscaler: ranks [{}, {}], patience {}, cooldown {} ms, queue {}, SLO {} s",
               o_.min_ranks, o_.max_ranks, o_.patience, o_.cooldown_ms, o_.queue_per_rank, o_.ttft_slo_s);
  if (!valid_) valid_ = [](int) { return true; };
}

int dp_autoscaler::next_size(int ranks, int step, int able) const {
  const int top = able > 0 ? std::min(o_.max_ranks, able) : o_.max_ranks;
  for (int r = ranks + step; r >= o_.min_ranks && r <= top; r += step)
    if (valid_(r)) return r;
  return 0;
}

std::optional<autoscale_decision> dp_autoscaler::observe(const autoscale_observation& obs) {
  // The TTFT p90 of the first tokens since the last look (invariant 1): the histogram's new counts.
  latency_histogram recent(obs.ttft.bounds);
  if (last_counts_.size() == obs.ttft.counts.size())
    for (size_t i = 0; i < recent.counts.size(); ++i) {
      recent.counts[i] = std::max<int64_t>(0, obs.ttft.counts[i] - last_counts_[i]);
      recent.n += recent.counts[i];
    }
  last_counts_ = obs.ttft.counts;
  const double p90 = recent.n > 0 ? recent.quantile(0.9) : 0.0;
  const int ranks = std::max(obs.ranks, 1);
  std::string up;
  if (obs.waiting > o_.queue_per_rank * ranks) up = "queue";
  else if (recent.n > 0 && p90 > o_.ttft_slo_s) up = "ttft";
  const bool down = up.empty() && obs.waiting == 0 && obs.kv_usage < o_.shrink_below &&
                    (recent.n == 0 || p90 < o_.ttft_slo_s / 2);
  up_streak_ = up.empty() ? 0 : up_streak_ + 1;
  if (!up.empty()) up_reason_ = up;
  down_streak_ = down ? down_streak_ + 1 : 0;
  if (obs.changing) return std::nullopt;
  if (last_change_ms_ && obs.now_ms - *last_change_ms_ < o_.cooldown_ms) return std::nullopt;
  autoscale_decision d;
  if (up_streak_ >= o_.patience) {
    d.ranks = next_size(ranks, +1, obs.able);
    d.reason = up_reason_;
  } else if (down_streak_ >= o_.patience) {
    d.ranks = next_size(ranks, -1, obs.able);
    d.reason = "idle";
  }
  if (d.ranks == 0) return std::nullopt;
  last_change_ms_ = obs.now_ms;
  up_streak_ = down_streak_ = 0;
  {
    std::lock_guard<std::mutex> g(mu_);
    ++decisions_[{d.ranks > ranks ? "up" : "down", d.reason}];
  }
  return d;
}

std::string dp_autoscaler::metrics_text() const {
  std::string out =
      "# HELP troupe_autoscale_decisions_total Changes of size the autoscaler asked for, by direction and reason.\n"
      "# TYPE troupe_autoscale_decisions_total counter\n";
  std::lock_guard<std::mutex> g(mu_);
  for (const auto& [k, n] : decisions_)
    out += fmt::format("troupe_autoscale_decisions_total{{direction=\"{}\",reason=\"{}\"}} {}\n", k.first, k.second, n);
  return out;
}

}  // namespace troupe::elastic
