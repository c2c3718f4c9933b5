// launch/cluster_setup.cpp — see cluster_setup.h.
#include "launch/cluster_setup.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>

#include "launch/process_group.h"
#include "runtime/communicator_nccl.h"
#include "runtime/communicator_ucx.h"
#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::launch {

using runtime::errc;

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

std::string this_hostname() {
  char buf[256] = {0};
  ::gethostname(buf, sizeof(buf) - 1);
  return buf;
}

std::unique_ptr<runtime::mpi_session>& mpi_session_of_process() {
  static std::unique_ptr<runtime::mpi_session> s;
  return s;
}

void start_mpi_if_launched(const rank_info& r) {
#ifdef TROUPE_FEATURE_MPI
  if (!mpi_session_of_process() && (r.source == "openmpi" || r.source == "pmix" || r.source == "pmi"))
    mpi_session_of_process() = std::make_unique<runtime::mpi_session>();
#else
  (void)r;
#endif
}

std::vector<std::string> available_backends(const std::string& request) {
  std::vector<std::string> built;
#ifdef TROUPE_FEATURE_MPI
  built.push_back("mpi");
#endif
#ifdef TROUPE_FEATURE_UCX
  built.push_back("ucx");
#endif
#ifdef TROUPE_FEATURE_NCCL
  built.push_back("nccl");
#endif
  std::vector<std::string> out;
  for (const auto& b : request == "all" ? built : request == "none" ? std::vector<std::string>{} : split_list(request)) {
    if (b == "mpi" && !mpi_session_of_process()) continue;  // offered only under mpirun
    if (b == "nccl" && !runtime::cuda_status().available) continue;
    out.push_back(b);
  }
  return out;
}

actors::cluster_options cluster_options_for(const rank_info& r, const cluster_setup_options& o) {
  TROUPE_CHECK(!r.late_join || o.late_join_ok, errc::invalid_argument,
               "TROUPE_JOIN=1 (troupe-launch --join): only troupe serve joins a running group");
  start_mpi_if_launched(r);
  actors::cluster_options co;
  co.late_join = r.late_join;
  co.rank = r.rank;
  co.world_size = r.world_size;
  co.host = this_hostname();
  co.heartbeat_interval_ms = o.heartbeat_ms;
  co.heartbeat_timeout_ms = o.heartbeat_timeout_ms;
  co.join_timeout_ms = o.join_timeout_ms;
  co.max_restarts = o.max_restarts;
  const char* token = std::getenv("TROUPE_CLUSTER_TOKEN");
  if (r.has_supervisor()) {
    co.supervisor_host = r.supervisor_host;
    co.supervisor_port = r.supervisor_port;
    TROUPE_CHECK(token && *token, errc::invalid_argument,
                 "TROUPE_SUPERVISOR is set but TROUPE_CLUSTER_TOKEN is not: every rank needs the shared token");
    co.cluster_token = token;
  } else if (mpi_session_of_process()) {
    // Rank 0 picks the port and the token and tells the others over MPI (a trusted channel).
    std::string mine;
    if (r.rank == 0) {
      const std::string host = r.local_world_size == r.world_size ? "127.0.0.1" : co.host;
      mine = fmt::format("{} {} {}", host, pick_free_port(), token && *token ? token : random_token());
    }
    const auto all = runtime::make_mpi_bootstrap()->all_gather(mine);
    std::istringstream in(all[0]);
    in >> co.supervisor_host >> co.supervisor_port >> co.cluster_token;
  } else {
    TROUPE_CHECK(r.world_size == 1, errc::invalid_argument,
                 "rank {} of {}: no supervisor address: set TROUPE_SUPERVISOR (troupe-launch does) or run under "
                 "mpirun",
                 r.rank, r.world_size);
    co.cluster_token = token && *token ? token : random_token();
  }
  co.backends = o.backends;
  const auto cs = runtime::cuda_status();
  co.device = cs.available ? fmt::format("cuda:{}", r.local_rank % cs.device_count) : "cpu";
  return co;
}

std::unique_ptr<runtime::communicator> make_group_comm(const std::string& backend, actors::worker_context& ctx,
                                                       int local_rank, runtime::device* dev, int timeout_ms) {
  runtime::communicator_options co;
  co.timeout_ms = timeout_ms;
  if (backend == "mpi") {
    TROUPE_CHECK(mpi_session_of_process() != nullptr, errc::unsupported, "mpi: this job was not launched by mpirun");
    TROUPE_CHECK(ctx.epoch() == 1, errc::unsupported,
                 "mpi: MPI_COMM_WORLD cannot shrink; group epoch {} has {} ranks", ctx.epoch(), ctx.group_size());
    return runtime::make_mpi_communicator(co);
  }
  if (backend == "ucx") {
    auto boot = ctx.bootstrap("ucx");
    runtime::ucx_options uo;
    uo.timeout_ms = co.timeout_ms;
    return runtime::make_ucx_communicator(*boot, uo);
  }
  if (backend == "nccl") {
    const auto cs = runtime::cuda_status();
    TROUPE_CHECK(cs.available, errc::unsupported, "nccl: no GPU ({})", cs.reason);
    const int d = local_rank % cs.device_count;
    if (dev) *dev = runtime::device{runtime::device_kind::cuda, d};
    auto boot = ctx.bootstrap("nccl");
    return runtime::make_nccl_communicator(*boot, d, co);
  }
  TROUPE_THROW(errc::invalid_argument, "unknown backend '{}' (mpi, ucx, nccl)", backend);
}

std::unique_ptr<runtime::communicator> make_subgroup_comm(const std::string& backend, actors::worker_context& ctx,
                                                          const std::vector<int>& members, int color,
                                                          const std::string& name, int timeout_ms,
                                                          bool sleep_when_idle) {
  runtime::communicator_options co;
  co.timeout_ms = timeout_ms;
  if (backend == "mpi") {
    TROUPE_CHECK(mpi_session_of_process() != nullptr, errc::unsupported, "mpi: this job was not launched by mpirun");
    TROUPE_CHECK(ctx.epoch() == 1, errc::unsupported, "mpi: MPI_COMM_WORLD cannot shrink (group epoch {})",
                 ctx.epoch());
    return runtime::make_mpi_communicator_split(color, co);
  }
  if (backend == "ucx") {
    auto world = ctx.bootstrap(name);
    auto boot = runtime::make_subgroup_bootstrap(*world, members);
    runtime::ucx_options uo;
    uo.timeout_ms = co.timeout_ms;
    uo.sleep_when_idle = sleep_when_idle;
    return runtime::make_ucx_communicator(*boot, uo);
  }
  TROUPE_THROW(errc::unsupported, "sub-groups over '{}' are not supported (mpi, ucx)", backend);
}

int run_cluster_node(actors::cluster_node& node, const char* what,
                     const std::function<int(actors::supervisor_client&)>& drive) {
  try {
    node.start();
  } catch (const runtime::error& e) {
    runtime::log::error("{}", e.what());
    return e.code() == errc::invalid_argument ? actors::exit_join_refused : 1;
  }
  int driver_code = 0;
  if (node.is_supervisor()) {
    try {
      driver_code = drive(node.driver());
    } catch (const runtime::error& e) {
      runtime::log::error("{}: {}", what, e.what());
      driver_code = e.code() == errc::aborted ? actors::exit_group_torn_down : 1;
    }
  }
  return std::max(node.wait(), driver_code);
}

int run_group_command(const rank_info& r, cluster_setup_options so,
                      const std::function<void(actors::cluster_options&)>& tweak, const group_command& g) {
  start_mpi_if_launched(r);
  so.backends = available_backends("all");
  actors::cluster_options co = cluster_options_for(r, so);
  if (tweak) tweak(co);
  actors::cluster_node node(co);
  node.local_worker().on(g.kind, g.run);
  return run_cluster_node(node, g.what, [&](actors::supervisor_client& sup) {
    sup.wait_for_group(so.join_timeout_ms);
    control::Command c;
    c.set_id(1);
    c.set_kind(g.kind);
    for (const auto& [k, v] : g.args) (*c.mutable_args())[k] = v;
    bool ok = true;
    const auto reports = sup.run(c, g.timeout_ms);
    for (const auto& rep : reports) {
      if (!rep.ok()) {
        ok = false;
        fmt::print("rank {}: FAILED: {}\n", rep.rank(), rep.error());
      }
    }
    if (g.after) g.after(sup, reports);
    std::fflush(stdout);
    sup.shutdown(fmt::format("{} {}", g.what, ok ? "done" : "failed"), ok ? 0 : 1);
    return ok ? 0 : 1;
  });
}

}  // namespace troupe::launch
