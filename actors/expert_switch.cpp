// actors/expert_switch.cpp — the worker's side of a placement change (expert_balancer.h,
// invariant 4). Apart from expert_balancer.cpp so that only commands that switch placements
// link the MoE layer's ep_migrate.
#include <fmt/format.h>

#include "actors/expert_balancer.h"
#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::actors {

namespace log = runtime::log;
using runtime::errc;

bool switch_expert_placement(worker_context& ctx, runtime::communicator& comm, int layer,
                             expert_placement_state& st, const std::vector<ep::ep_expert_tensors>& sets) {
  const int64_t agreed = ep::ep_agree_placement_version(comm, ctx.placement_version(layer));
  if (agreed <= st.version) return false;
  const auto update = ctx.placement_update(layer, agreed);
  TROUPE_CHECK(update.has_value(), errc::internal,
               "rank {}: the group agreed on placement v{} of layer {}, which this rank never received", ctx.rank(),
               agreed, layer);
  auto next = placement_of(*update);
  TROUPE_CHECK(next.ranks == comm.size() && next.experts() == st.placement.experts(), errc::invalid_argument,
               "placement v{} of layer {}: {} experts on {} ranks, but the layer has {} experts on {} ranks", agreed,
               layer, next.experts(), next.ranks, st.placement.experts(), comm.size());
  const size_t sent = ep::ep_migrate(sets, st.placement, next, comm);
  log::debug("rank {}: layer {} switched to placement v{} ({} bytes sent)", ctx.rank(), layer, agreed, sent);
  st.placement = std::move(next);
  st.version = agreed;
  ++st.switches;
  st.bytes_sent += sent;
  return true;
}

}  // namespace troupe::actors
