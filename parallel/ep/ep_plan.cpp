// parallel/ep/ep_plan.cpp — see ep_plan.h.
#include "parallel/ep/ep_plan.h"

#include <algorithm>
#include <numeric>

#include <fmt/format.h>

#include "runtime/error.h"

namespace troupe::parallel::ep {

using runtime::errc;

// ---- placement -------------------------------------------------------------------------

ep_placement ep_placement::contiguous(int64_t experts, int ranks) {
  TROUPE_CHECK(ranks >= 1 && experts >= 1, errc::invalid_argument,
               "expert placement: need at least one expert and one rank, got {} experts on {} ranks", experts, ranks);
  TROUPE_CHECK(experts % ranks == 0, errc::invalid_argument,
               "expert placement: {} experts do not divide evenly over {} expert-parallel ranks; pick parallel.ep "
               "dividing the model's expert count",
               experts, ranks);
  ep_placement p;
  p.ranks = ranks;
  const int64_t per = experts / ranks;
  for (int64_t e = 0; e < experts; ++e) p.native.push_back(static_cast<int>(e / per));
  return p;
}

std::vector<int> ep_placement::experts_of(int rank) const {
  std::vector<int> out;
  for (size_t e = 0; e < native.size(); ++e)
    if (native[e] == rank) out.push_back(static_cast<int>(e));
  return out;
}

void ep_placement::validate(bool each_rank_owns) const {
  TROUPE_CHECK(ranks >= 1 && !native.empty(), errc::invalid_argument,
               "expert placement: {} experts on {} ranks; need at least one of each", native.size(), ranks);
  std::vector<int> owned(static_cast<size_t>(ranks), 0);
  for (size_t e = 0; e < native.size(); ++e) {
    TROUPE_CHECK(native[e] >= 0 && native[e] < ranks, errc::invalid_argument,
                 "expert placement: expert {} is placed on rank {}, outside [0, {})", e, native[e], ranks);
    ++owned[static_cast<size_t>(native[e])];
  }
  if (each_rank_owns)
    for (int r = 0; r < ranks; ++r)
      TROUPE_CHECK(owned[static_cast<size_t>(r)] > 0, errc::invalid_argument,
                   "expert placement: rank {} owns no expert", r);
}

// ---- plans -----------------------------------------------------------------------------

const char* ep_mode_name(ep_mode m) {
  switch (m) {
    case ep_mode::standard: return "ep";
    case ep_mode::llep: return "llep";
    case ep_mode::eplb: return "eplb";
  }
  return "?";
}

ep_mode ep_mode_from(const std::string& name) {
  if (name == "ep" || name == "standard") return ep_mode::standard;
  if (name == "llep") return ep_mode::llep;
  if (name == "eplb") return ep_mode::eplb;
  TROUPE_THROW(errc::invalid_argument, "expert-parallel mode '{}' is not one of ep, llep, eplb", name);
}

std::vector<int64_t> ep_plan::rank_rows() const {
  std::vector<int64_t> rows(static_cast<size_t>(placement.ranks), 0);
  for (const auto& c : chunks) rows[static_cast<size_t>(c.rank)] += c.rows();
  return rows;
}

namespace {
double max_over_mean_of(const std::vector<int64_t>& rows) {
  const int64_t total = std::accumulate(rows.begin(), rows.end(), int64_t{0});
  if (total == 0 || rows.empty()) return 1.0;
  const int64_t mx = *std::max_element(rows.begin(), rows.end());
  return static_cast<double>(mx) * static_cast<double>(rows.size()) / static_cast<double>(total);
}

void check_loads(const std::vector<int64_t>& loads, int64_t experts, const char* who) {
  TROUPE_CHECK(static_cast<int64_t>(loads.size()) == experts, errc::invalid_argument,
               "{}: {} expert loads for {} experts", who, loads.size(), experts);
  for (size_t e = 0; e < loads.size(); ++e)
    TROUPE_CHECK(loads[e] >= 0, errc::invalid_argument, "{}: expert {} has a negative load {}", who, e, loads[e]);
}

// Experts in descending load, ties by lower id (LPT order).
std::vector<int> lpt_order(const std::vector<int64_t>& loads) {
  std::vector<int> order(loads.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return loads[a] > loads[b]; });
  return order;
}

void sort_chunks(std::vector<ep_chunk>& chunks) {
  std::stable_sort(chunks.begin(), chunks.end(), [](const ep_chunk& a, const ep_chunk& b) {
    return a.expert != b.expert ? a.expert < b.expert : a.begin < b.begin;
  });
}
}  // namespace

double ep_plan::max_over_mean() const { return max_over_mean_of(rank_rows()); }

std::vector<ep_chunk> ep_plan::foreign_weights() const {
  std::vector<ep_chunk> out;
  for (const auto& c : chunks) {
    if (c.rank == placement.native[static_cast<size_t>(c.expert)]) continue;
    const bool seen = std::any_of(out.begin(), out.end(),
                                  [&](const ep_chunk& o) { return o.expert == c.expert && o.rank == c.rank; });
    if (!seen) out.push_back(c);
  }
  return out;
}

std::vector<ep_chunk> ep_plan::chunks_of(int r) const {
  std::vector<ep_chunk> out;
  for (const auto& c : chunks)
    if (c.rank == r) out.push_back(c);
  return out;
}

std::string ep_plan::describe() const {
  std::string s = fmt::format("{} plan{} over {} ranks, max/mean {:.3f}\n", ep_mode_name(mode),
                              gated ? " (gated: standard EP)" : "", placement.ranks, max_over_mean());
  for (const auto& c : chunks) {
    const int n = placement.native[static_cast<size_t>(c.expert)];
    s += fmt::format("  expert {} rows [{}, {}) -> rank {}{}\n", c.expert, c.begin, c.end, c.rank,
                     n == c.rank ? std::string() : fmt::format(" (borrowed from rank {})", n));
  }
  return s;
}

double native_max_over_mean(const std::vector<int64_t>& loads, const ep_placement& native) {
  std::vector<int64_t> rows(static_cast<size_t>(native.ranks), 0);
  for (size_t e = 0; e < loads.size(); ++e) rows[static_cast<size_t>(native.native[e])] += loads[e];
  return max_over_mean_of(rows);
}

ep_plan ep_plan_standard(const std::vector<int64_t>& loads, const ep_placement& native) {
  check_loads(loads, native.experts(), "standard EP plan");
  ep_plan p;
  p.mode = ep_mode::standard;
  p.placement = native;
  for (size_t e = 0; e < loads.size(); ++e)
    if (loads[e] > 0) p.chunks.push_back({static_cast<int>(e), native.native[e], 0, loads[e]});
  return p;
}

ep_plan llep_plan(const std::vector<int64_t>& loads, const ep_placement& native, const llep_options& opt) {
  check_loads(loads, native.experts(), "LLEP plan");
  TROUPE_CHECK(opt.lambda >= 1.0 && opt.alpha > 0.0 && opt.min_chunk >= 1 && opt.row_align >= 1,
               errc::invalid_argument,
               "LLEP options: need lambda >= 1, alpha > 0, min_chunk >= 1, row_align >= 1; got lambda={} alpha={} "
               "min_chunk={} row_align={}",
               opt.lambda, opt.alpha, opt.min_chunk, opt.row_align);
  if (native_max_over_mean(loads, native) <= opt.lambda) {
    ep_plan p = ep_plan_standard(loads, native);
    p.mode = ep_mode::llep;
    p.gated = true;
    return p;
  }
  const int P = native.ranks;
  const int64_t total = std::accumulate(loads.begin(), loads.end(), int64_t{0});
  const double cap = opt.alpha * static_cast<double>(total) / P;  // m_alpha
  std::vector<int64_t> assigned(static_cast<size_t>(P), 0), pending(static_cast<size_t>(P), 0);
  for (size_t e = 0; e < loads.size(); ++e) pending[static_cast<size_t>(native.native[e])] += loads[e];
  auto effective = [&](int r) { return assigned[static_cast<size_t>(r)] + pending[static_cast<size_t>(r)]; };
  // Room on rank r, whole rows, rounded down to the row tile (invariant 2).
  auto room = [&](int r) -> int64_t {
    const double free = cap - static_cast<double>(effective(r));
    if (free <= 0) return 0;
    return static_cast<int64_t>(free) / opt.row_align * opt.row_align;
  };

  ep_plan p;
  p.mode = ep_mode::llep;
  p.placement = native;
  for (int e : lpt_order(loads)) {
    const int64_t load = loads[static_cast<size_t>(e)];
    if (load == 0) continue;
    const int n = native.native[static_cast<size_t>(e)];
    pending[static_cast<size_t>(n)] -= load;
    int64_t cursor = 0;
    auto give = [&](int r, int64_t rows) {
      p.chunks.push_back({e, r, cursor, cursor + rows});
      cursor += rows;
      assigned[static_cast<size_t>(r)] += rows;
    };
    // Native first: all if it fits, else its room, spilling the rest.
    const int64_t native_room = room(n);
    if (load <= cap - static_cast<double>(effective(n))) {
      give(n, load);
      continue;
    }
    if (native_room > 0) give(n, native_room);
    // Spill to the others in ascending effective load (ties: lower rank).
    std::vector<int> others;
    for (int r = 0; r < P; ++r)
      if (r != n) others.push_back(r);
    std::stable_sort(others.begin(), others.end(), [&](int a, int b) { return effective(a) < effective(b); });
    for (int r : others) {
      const int64_t rest = load - cursor;
      if (rest == 0) break;
      const int64_t rr = room(r);
      if (rr <= 0) continue;
      const int64_t take = std::min(rest, rr);
      if (take < opt.min_chunk && take != rest) continue;  // too small to be worth the weights
      give(r, take);
    }
    if (load - cursor > 0) {  // nobody had room: the least-loaded rank (ties: lower rank) takes the rest
      int best = 0;
      for (int r = 1; r < P; ++r)
        if (effective(r) < effective(best)) best = r;
      give(best, load - cursor);
    }
  }
  sort_chunks(p.chunks);
  // A rank that got two consecutive chunks of one expert computes them as one.
  std::vector<ep_chunk> merged;
  for (const auto& c : p.chunks) {
    if (!merged.empty() && merged.back().expert == c.expert && merged.back().rank == c.rank &&
        merged.back().end == c.begin)
      merged.back().end = c.end;
    else
      merged.push_back(c);
  }
  p.chunks = std::move(merged);
  return p;
}

ep_plan eplb_plan(const std::vector<int64_t>& loads, int ranks, int redundant_per_rank, int64_t row_align) {
  const int64_t E = static_cast<int64_t>(loads.size());
  ep_plan p;
  p.mode = ep_mode::eplb;
  p.placement = ep_placement::contiguous(E, ranks);
  check_loads(loads, E, "EPLB plan");
  TROUPE_CHECK(redundant_per_rank >= 0 && row_align >= 1, errc::invalid_argument,
               "EPLB plan: redundant_per_rank {} must be >= 0 and row_align {} >= 1", redundant_per_rank, row_align);
  const int64_t slots_per_rank = E / ranks + redundant_per_rank;
  // Redundant slots to the heaviest experts by load per replica (ties: lower id).
  std::vector<int64_t> replicas(static_cast<size_t>(E), 1);
  const int64_t redundant = std::min<int64_t>(int64_t{redundant_per_rank} * ranks, E * (ranks - 1));
  for (int64_t s = 0; s < redundant; ++s) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      if (replicas[static_cast<size_t>(e)] >= ranks) continue;  // one replica per rank at most
      if (best < 0 || loads[static_cast<size_t>(e)] * replicas[static_cast<size_t>(best)] >
                          loads[static_cast<size_t>(best)] * replicas[static_cast<size_t>(e)])
        best = e;
    }
    ++replicas[static_cast<size_t>(best)];
  }
  // Replicas in descending load each, onto the least-loaded rank with a free slot not holding it.
  struct replica {
    int expert;
    double load;
  };
  std::vector<replica> reps;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t k = 0; k < replicas[static_cast<size_t>(e)]; ++k)
      reps.push_back({static_cast<int>(e), static_cast<double>(loads[static_cast<size_t>(e)]) /
                                               static_cast<double>(replicas[static_cast<size_t>(e)])});
  std::stable_sort(reps.begin(), reps.end(), [](const replica& a, const replica& b) { return a.load > b.load; });
  std::vector<double> rank_load(static_cast<size_t>(ranks), 0.0);
  std::vector<int64_t> used(static_cast<size_t>(ranks), 0);
  std::vector<std::vector<int>> holders(static_cast<size_t>(E));
  for (const auto& r : reps) {
    int best = -1;
    for (int q = 0; q < ranks; ++q) {
      if (used[static_cast<size_t>(q)] >= slots_per_rank) continue;
      auto& h = holders[static_cast<size_t>(r.expert)];
      if (std::find(h.begin(), h.end(), q) != h.end()) continue;
      if (best < 0 || rank_load[static_cast<size_t>(q)] < rank_load[static_cast<size_t>(best)]) best = q;
    }
    TROUPE_CHECK(best >= 0, errc::internal, "EPLB plan: no free slot for a replica of expert {}", r.expert);
    holders[static_cast<size_t>(r.expert)].push_back(best);
    rank_load[static_cast<size_t>(best)] += r.load;
    ++used[static_cast<size_t>(best)];
  }
  // Rows split evenly over the replicas in the order they were placed, starts on the row tile.
  for (int64_t e = 0; e < E; ++e) {
    const auto& h = holders[static_cast<size_t>(e)];
    p.placement.native[static_cast<size_t>(e)] = h.front();
    const int64_t load = loads[static_cast<size_t>(e)];
    const int64_t n = static_cast<int64_t>(h.size());
    int64_t begin = 0;
    for (int64_t k = 0; k < n && begin < load; ++k) {
      int64_t end = k + 1 == n ? load : (load * (k + 1) / n + row_align - 1) / row_align * row_align;
      end = std::max(begin, std::min(end, load));
      if (end > begin) p.chunks.push_back({static_cast<int>(e), h[static_cast<size_t>(k)], begin, end});
      begin = end;
    }
  }
  sort_chunks(p.chunks);
  return p;
}

namespace {
// Redundant slots to the heaviest experts by load per replica (ties: lower id), one per rank at most.
std::vector<int64_t> replica_counts(const std::vector<int64_t>& loads, int ranks, int64_t redundant) {
  const int64_t E = static_cast<int64_t>(loads.size());
  std::vector<int64_t> replicas(static_cast<size_t>(E), 1);
  redundant = std::min<int64_t>(redundant, E * (ranks - 1));
  for (int64_t s = 0; s < redundant; ++s) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      if (replicas[static_cast<size_t>(e)] >= ranks) continue;
      if (best < 0 || loads[static_cast<size_t>(e)] * replicas[static_cast<size_t>(best)] >
                          loads[static_cast<size_t>(best)] * replicas[static_cast<size_t>(e)])
        best = e;
    }
    ++replicas[static_cast<size_t>(best)];
  }
  return replicas;
}

// An expert's rows split evenly over its holders (in order), starts on the row tile.
void split_rows(ep_plan& p, int e, int64_t load, const std::vector<int>& holders, int64_t row_align) {
  const int64_t n = static_cast<int64_t>(holders.size());
  int64_t begin = 0;
  for (int64_t k = 0; k < n && begin < load; ++k) {
    // Rounded up to the row tile, so the first holder (the native one in eplb_plan_on) is never empty.
    int64_t end = k + 1 == n ? load : (load * (k + 1) / n + row_align - 1) / row_align * row_align;
    end = std::max(begin, std::min(end, load));
    if (end > begin) p.chunks.push_back({e, holders[static_cast<size_t>(k)], begin, end});
    begin = end;
  }
}
}  // namespace

ep_plan eplb_plan_on(const std::vector<int64_t>& loads, const ep_placement& native, int redundant_per_rank,
                     int64_t row_align) {
  check_loads(loads, native.experts(), "EPLB plan");
  TROUPE_CHECK(redundant_per_rank >= 0 && row_align >= 1, errc::invalid_argument,
               "EPLB plan: redundant_per_rank {} must be >= 0 and row_align {} >= 1", redundant_per_rank, row_align);
  const int P = native.ranks;
  const int64_t E = native.experts();
  ep_plan p;
  p.mode = ep_mode::eplb;
  p.placement = native;
  const auto replicas = replica_counts(loads, P, int64_t{redundant_per_rank} * P);
  std::vector<std::vector<int>> holders(static_cast<size_t>(E));
  std::vector<double> rank_load(static_cast<size_t>(P), 0.0);
  for (int64_t e = 0; e < E; ++e) {
    holders[static_cast<size_t>(e)].push_back(native.native[static_cast<size_t>(e)]);
    rank_load[static_cast<size_t>(native.native[static_cast<size_t>(e)])] +=
        static_cast<double>(loads[static_cast<size_t>(e)]) / static_cast<double>(replicas[static_cast<size_t>(e)]);
  }
  struct replica {
    int expert;
    double load;
  };
  std::vector<replica> extra;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t k = 1; k < replicas[static_cast<size_t>(e)]; ++k)
      extra.push_back({static_cast<int>(e), static_cast<double>(loads[static_cast<size_t>(e)]) /
                                                static_cast<double>(replicas[static_cast<size_t>(e)])});
  std::stable_sort(extra.begin(), extra.end(), [](const replica& a, const replica& b) { return a.load > b.load; });
  std::vector<int64_t> used(static_cast<size_t>(P), 0);
  for (const auto& r : extra) {
    int best = -1;
    auto& h = holders[static_cast<size_t>(r.expert)];
    for (int q = 0; q < P; ++q) {
      if (used[static_cast<size_t>(q)] >= redundant_per_rank) continue;
      if (std::find(h.begin(), h.end(), q) != h.end()) continue;
      if (best < 0 || rank_load[static_cast<size_t>(q)] < rank_load[static_cast<size_t>(best)]) best = q;
    }
    if (best < 0) continue;  // every rank with a free slot holds it already: fewer replicas
    h.push_back(best);
    rank_load[static_cast<size_t>(best)] += r.load;
    ++used[static_cast<size_t>(best)];
  }
  for (int64_t e = 0; e < E; ++e)
    split_rows(p, static_cast<int>(e), loads[static_cast<size_t>(e)], holders[static_cast<size_t>(e)], row_align);
  sort_chunks(p.chunks);
  return p;
}

ep_plan make_ep_plan(ep_mode mode, const std::vector<int64_t>& loads, const ep_placement& native,
                     const llep_options& opt, int eplb_redundant_per_rank) {
  switch (mode) {
    case ep_mode::standard: return ep_plan_standard(loads, native);
    case ep_mode::llep: return llep_plan(loads, native, opt);
    case ep_mode::eplb: return eplb_plan_on(loads, native, eplb_redundant_per_rank, opt.row_align);
  }
  TROUPE_THROW(errc::internal, "unknown expert-parallel mode");
}

void ep_plan_check(const ep_plan& plan, const std::vector<int64_t>& loads, int64_t row_align) {
  std::vector<int64_t> next(loads.size(), 0);
  int last_expert = -1;
  for (const auto& c : plan.chunks) {
    TROUPE_CHECK(c.expert >= 0 && static_cast<size_t>(c.expert) < loads.size(), errc::internal,
                 "ep plan: chunk of expert {} outside [0, {})", c.expert, loads.size());
    TROUPE_CHECK(c.rank >= 0 && c.rank < plan.placement.ranks, errc::internal,
                 "ep plan: expert {} chunk on rank {} outside [0, {})", c.expert, c.rank, plan.placement.ranks);
    TROUPE_CHECK(c.expert >= last_expert, errc::internal, "ep plan: chunks not sorted by expert at expert {}",
                 c.expert);
    last_expert = c.expert;
    auto& n = next[static_cast<size_t>(c.expert)];
    TROUPE_CHECK(c.begin == n && c.end > c.begin && c.end <= loads[static_cast<size_t>(c.expert)],
                 errc::internal, "ep plan: expert {} chunk [{}, {}) does not continue at row {} (load {})", c.expert,
                 c.begin, c.end, n, loads[static_cast<size_t>(c.expert)]);
    TROUPE_CHECK(c.begin % row_align == 0, errc::internal, "ep plan: expert {} chunk starts at {}, not a multiple of {}",
                 c.expert, c.begin, row_align);
    n = c.end;
  }
  for (size_t e = 0; e < loads.size(); ++e)
    TROUPE_CHECK(next[e] == loads[e], errc::internal, "ep plan: expert {} covers {} of its {} rows", e, next[e],
                 loads[e]);
}

}  // namespace troupe::parallel::ep
