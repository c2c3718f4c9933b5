// parallel/ep/ep_rebalance.cpp — see ep_rebalance.h.
#include "parallel/ep/ep_rebalance.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "runtime/error.h"

namespace troupe::parallel::ep {

using runtime::errc;

void ep_rebalance_options::validate() const {
  TROUPE_CHECK(decay >= 0.0 && decay < 1.0, errc::invalid_argument,
               "expert rebalancing: decay {} must be in [0, 1) (0 = only the last step counts)", decay);
  TROUPE_CHECK(threshold >= 1.0, errc::invalid_argument,
               "expert rebalancing: threshold {} must be >= 1 (it bounds a max/mean ratio)", threshold);
  TROUPE_CHECK(patience >= 1, errc::invalid_argument, "expert rebalancing: patience {} must be >= 1 step",
               patience);
  TROUPE_CHECK(cooldown >= 0, errc::invalid_argument, "expert rebalancing: cooldown {} must be >= 0 steps",
               cooldown);
  TROUPE_CHECK(min_improvement >= 0.0 && min_improvement < 1.0, errc::invalid_argument,
               "expert rebalancing: min_improvement {} must be in [0, 1)", min_improvement);
}

// ---- load tracker ----------------------------------------------------------------------

ep_load_tracker::ep_load_tracker(int64_t experts, double decay)
    : ema_(static_cast<size_t>(std::max<int64_t>(experts, 0)), 0.0), decay_(decay) {
  TROUPE_CHECK(experts >= 1, errc::invalid_argument, "expert load tracker: {} experts; need at least one", experts);
  TROUPE_CHECK(decay >= 0.0 && decay < 1.0, errc::invalid_argument,
               "expert load tracker: decay {} must be in [0, 1)", decay);
}

void ep_load_tracker::observe(const std::vector<int64_t>& loads) {
  TROUPE_CHECK(loads.size() == ema_.size(), errc::invalid_argument,
               "expert load tracker: {} loads for {} experts", loads.size(), ema_.size());
  for (size_t e = 0; e < loads.size(); ++e)  // all checked first: a rejected step changes nothing
    TROUPE_CHECK(loads[e] >= 0, errc::invalid_argument, "expert load tracker: expert {} has load {} < 0", e,
                 loads[e]);
  for (size_t e = 0; e < loads.size(); ++e) {
    const double x = static_cast<double>(loads[e]);
    ema_[e] = steps_ == 0 ? x : decay_ * ema_[e] + (1.0 - decay_) * x;
  }
  ++steps_;
}

// ---- balance ---------------------------------------------------------------------------

std::vector<double> ep_rank_loads(const std::vector<double>& loads, const ep_placement& placement) {
  TROUPE_CHECK(static_cast<int64_t>(loads.size()) == placement.experts(), errc::invalid_argument,
               "expert rebalancing: {} loads for a placement of {} experts", loads.size(), placement.experts());
  std::vector<double> rows(static_cast<size_t>(placement.ranks), 0.0);
  for (size_t e = 0; e < loads.size(); ++e) rows[static_cast<size_t>(placement.native[e])] += loads[e];
  return rows;
}

double ep_native_max_over_mean(const std::vector<double>& loads, const ep_placement& placement) {
  const auto rows = ep_rank_loads(loads, placement);
  const double total = std::accumulate(rows.begin(), rows.end(), 0.0);
  if (!(total > 0.0)) return 1.0;
  return *std::max_element(rows.begin(), rows.end()) / (total / static_cast<double>(rows.size()));
}

std::string ep_rebalance_proposal::describe() const {
  std::string s = fmt::format("max/mean {:.3f} -> {:.3f}, {} of {} experts move", before, after, moved,
                              placement.experts());
  return s;
}

namespace {

// Exact minimum-cost assignment of n rows to n columns (Hungarian, O(n^3)); returns col -> row.
std::vector<int> min_cost_assignment(const std::vector<std::vector<int64_t>>& cost) {
  const int n = static_cast<int>(cost.size());
  const int64_t inf = std::numeric_limits<int64_t>::max() / 4;
  std::vector<int64_t> u(static_cast<size_t>(n) + 1, 0), v(static_cast<size_t>(n) + 1, 0);
  std::vector<int> p(static_cast<size_t>(n) + 1, 0), way(static_cast<size_t>(n) + 1, 0);
  for (int i = 1; i <= n; ++i) {
    p[0] = i;
    int j0 = 0;
    std::vector<int64_t> minv(static_cast<size_t>(n) + 1, inf);
    std::vector<bool> used(static_cast<size_t>(n) + 1, false);
    do {
      used[static_cast<size_t>(j0)] = true;
      const int i0 = p[static_cast<size_t>(j0)];
      int64_t delta = inf;
      int j1 = 0;
      for (int j = 1; j <= n; ++j) {
        if (used[static_cast<size_t>(j)]) continue;
        const int64_t cur = cost[static_cast<size_t>(i0 - 1)][static_cast<size_t>(j - 1)] -
                            u[static_cast<size_t>(i0)] - v[static_cast<size_t>(j)];
        if (cur < minv[static_cast<size_t>(j)]) {
          minv[static_cast<size_t>(j)] = cur;
          way[static_cast<size_t>(j)] = j0;
        }
        if (minv[static_cast<size_t>(j)] < delta) {
          delta = minv[static_cast<size_t>(j)];
          j1 = j;
        }
      }
      for (int j = 0; j <= n; ++j) {
        if (used[static_cast<size_t>(j)]) {
          u[static_cast<size_t>(p[static_cast<size_t>(j)])] += delta;
          v[static_cast<size_t>(j)] -= delta;
        } else {
          minv[static_cast<size_t>(j)] -= delta;
        }
      }
      j0 = j1;
    } while (p[static_cast<size_t>(j0)] != 0);
    do {
      const int j1 = way[static_cast<size_t>(j0)];
      p[static_cast<size_t>(j0)] = p[static_cast<size_t>(j1)];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<int> col_to_row(static_cast<size_t>(n), -1);
  for (int j = 1; j <= n; ++j) col_to_row[static_cast<size_t>(j - 1)] = p[static_cast<size_t>(j)] - 1;
  return col_to_row;
}

}  // namespace

ep_rebalance_proposal ep_rebalance_propose(const std::vector<double>& loads, const ep_placement& current) {
  current.validate();
  const int P = current.ranks;
  const int64_t E = current.experts();
  TROUPE_CHECK(static_cast<int64_t>(loads.size()) == E, errc::invalid_argument,
               "expert rebalancing: {} loads for a placement of {} experts", loads.size(), E);
  TROUPE_CHECK(E % P == 0, errc::invalid_argument,
               "expert rebalancing: {} experts do not divide evenly over {} ranks", E, P);
  const int64_t per = E / P;
  for (int r = 0; r < P; ++r)
    TROUPE_CHECK(static_cast<int64_t>(current.experts_of(r).size()) == per, errc::invalid_argument,
                 "expert rebalancing: rank {} holds {} experts, not E/P = {}; the proposal keeps the per-rank "
                 "count and needs it equal to start from",
                 r, current.experts_of(r).size(), per);
  for (size_t e = 0; e < loads.size(); ++e)
    TROUPE_CHECK(std::isfinite(loads[e]) && loads[e] >= 0.0, errc::invalid_argument,
                 "expert rebalancing: expert {} has load {}; loads must be finite and >= 0", e, loads[e]);

  // 1. LPT into P bins of E/P slots.
  std::vector<int> order(static_cast<size_t>(E));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return loads[static_cast<size_t>(a)] > loads[static_cast<size_t>(b)]; });
  std::vector<double> bin_load(static_cast<size_t>(P), 0.0);
  std::vector<int64_t> bin_fill(static_cast<size_t>(P), 0);
  std::vector<int> bin_of(static_cast<size_t>(E), -1);
  for (int e : order) {
    int best = -1;
    for (int b = 0; b < P; ++b) {
      if (bin_fill[static_cast<size_t>(b)] >= per) continue;
      if (best < 0 || bin_load[static_cast<size_t>(b)] < bin_load[static_cast<size_t>(best)]) best = b;
    }
    bin_of[static_cast<size_t>(e)] = best;
    bin_load[static_cast<size_t>(best)] += loads[static_cast<size_t>(e)];
    ++bin_fill[static_cast<size_t>(best)];
  }

  // 2. Bins -> ranks keeping the most experts home: maximise sum of overlap(bin, rank).
  std::vector<std::vector<int64_t>> cost(static_cast<size_t>(P), std::vector<int64_t>(static_cast<size_t>(P), 0));
  for (int64_t e = 0; e < E; ++e) {
    const auto b = static_cast<size_t>(bin_of[static_cast<size_t>(e)]);
    --cost[b][static_cast<size_t>(current.native[static_cast<size_t>(e)])];
  }
  const auto rank_to_bin = min_cost_assignment(cost);
  std::vector<int> rank_of_bin(static_cast<size_t>(P), -1);
  for (int r = 0; r < P; ++r) rank_of_bin[static_cast<size_t>(rank_to_bin[static_cast<size_t>(r)])] = r;

  ep_rebalance_proposal out;
  out.placement.ranks = P;
  out.placement.native.resize(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e)
    out.placement.native[static_cast<size_t>(e)] = rank_of_bin[static_cast<size_t>(bin_of[static_cast<size_t>(e)])];

  // 3. Swap experts of exactly equal load when that keeps more of them home (rank loads unchanged).
  auto& target = out.placement.native;
  const auto& cur = current.native;
  auto home = [&](int64_t e, int r) { return cur[static_cast<size_t>(e)] == r ? 1 : 0; };
  for (bool improved = true; improved;) {
    improved = false;
    for (int64_t x = 0; x < E; ++x) {
      for (int64_t y = x + 1; y < E; ++y) {
        const int tx = target[static_cast<size_t>(x)], ty = target[static_cast<size_t>(y)];
        if (tx == ty || loads[static_cast<size_t>(x)] != loads[static_cast<size_t>(y)]) continue;
        if (home(x, ty) + home(y, tx) > home(x, tx) + home(y, ty)) {
          std::swap(target[static_cast<size_t>(x)], target[static_cast<size_t>(y)]);
          improved = true;
        }
      }
    }
  }

  out.before = ep_native_max_over_mean(loads, current);
  out.after = ep_native_max_over_mean(loads, out.placement);
  for (int64_t e = 0; e < E; ++e) out.moved += target[static_cast<size_t>(e)] != cur[static_cast<size_t>(e)];
  return out;
}

// ---- persistence rule ------------------------------------------------------------------

ep_rebalancer::ep_rebalancer(ep_placement initial, ep_rebalance_options options)
    : placement_(std::move(initial)), o_(options) {
  o_.validate();
  placement_.validate();
}

std::optional<ep_rebalance_proposal> ep_rebalancer::step(const std::vector<double>& ema) {
  ++steps_;
  last_imbalance_ = ep_native_max_over_mean(ema, placement_);
  if (cooldown_left_ > 0) {
    --cooldown_left_;
    streak_ = 0;
    return std::nullopt;
  }
  streak_ = last_imbalance_ > o_.threshold ? streak_ + 1 : 0;
  if (streak_ < o_.patience) return std::nullopt;
  auto p = ep_rebalance_propose(ema, placement_);
  if (p.moved == 0 || !(p.after <= p.before * (1.0 - o_.min_improvement))) return std::nullopt;
  placement_ = p.placement;
  ++version_;
  streak_ = 0;
  cooldown_left_ = o_.cooldown;
  return p;
}

// ---- agreement -------------------------------------------------------------------------

int64_t ep_agree_placement_version(runtime::communicator& comm, int64_t seen) {
  TROUPE_CHECK(seen >= 0, errc::invalid_argument, "placement agreement on rank {}: version {} < 0", comm.rank(),
               seen);
  // min(seen) = -max(-seen): the communicators reduce with sum and max only.
  auto t = runtime::tensor::from_vector(std::vector<int64_t>{-seen}, {1});
  comm.all_reduce(t, runtime::reduce_op::max);
  return -t.data<int64_t>()[0];
}

}  // namespace troupe::parallel::ep
