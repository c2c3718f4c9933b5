// actors/cluster.cpp — see cluster.h.
#include "actors/cluster.h"

#include <caf/openssl/all.hpp>
#include <fmt/format.h>

#include <chrono>
#include <thread>

#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::actors {

namespace log = runtime::log;
using runtime::errc;

struct cluster_node::config : caf::actor_system_config {
  config(int threads, const tls_options& tls) {
    load<caf::io::middleman>();
    if (tls.enabled()) {
      TROUPE_CHECK(!tls.key.empty() && !tls.cafile.empty(), errc::invalid_argument,
                   "cluster TLS: certificate {} given without {}{}; without a CA and a key no peer is authenticated",
                   tls.certificate, tls.key.empty() ? "a key" : "", tls.cafile.empty() ? " a CA file" : "");
      load<caf::openssl::manager>();
      openssl_certificate = tls.certificate;
      openssl_key = tls.key;
      openssl_passphrase = tls.passphrase;
      openssl_cafile = tls.cafile;
    }
    add_control_messages(*this);
    set("scheduler.max-threads", static_cast<size_t>(std::max(1, threads)));
  }
};

namespace {
bool is_loopback(const std::string& host) { return host == "127.0.0.1" || host == "localhost" || host == "::1"; }
}  // namespace

cluster_node::cluster_node(const cluster_options& options) : o_(options) {
  TROUPE_CHECK(o_.late_join || (o_.world_size >= 1 && o_.rank >= 0 && o_.rank < o_.world_size),
               errc::invalid_argument, "cluster: rank {} of {} is not a valid rank", o_.rank, o_.world_size);
  if (o_.late_join) {  // invariant 5: the supervisor gives the rank
    o_.rank = -1;
    o_.world_size = 0;
  }
  TROUPE_CHECK(!o_.cluster_token.empty(), errc::invalid_argument,
               "cluster: no cluster token (TROUPE_CLUSTER_TOKEN); troupe-launch sets one, mpirun jobs get one "
               "from rank 0");
  cfg_ = std::make_unique<config>(o_.scheduler_threads, o_.tls);
  system_ = std::make_unique<caf::actor_system>(*cfg_);
  if (is_supervisor()) {
    supervisor_options so;
    so.world_size = o_.world_size;
    so.cluster_token = o_.cluster_token;
    so.heartbeat_interval_ms = o_.heartbeat_interval_ms;
    so.heartbeat_timeout_ms = o_.heartbeat_timeout_ms;
    so.join_timeout_ms = o_.join_timeout_ms;
    so.max_restarts = o_.max_restarts;
    so.keep_members = o_.keep_members;
    so.open_slots = o_.open_slots;
    so.rebalance_experts = o_.rebalance_experts;
    so.experts = o_.experts;
    supervisor_ = spawn_supervisor(*system_, so);
    const char* bind = is_loopback(o_.supervisor_host) ? "127.0.0.1" : nullptr;
    auto port = o_.tls.enabled()
                    ? caf::openssl::publish(supervisor_, static_cast<uint16_t>(o_.supervisor_port), bind, true)
                    : system_->middleman().publish(supervisor_, static_cast<uint16_t>(o_.supervisor_port), bind, true);
    if (!port) {
      caf::anon_send_exit(supervisor_, caf::exit_reason::user_shutdown);
      TROUPE_THROW(errc::io, "supervisor: cannot listen on {}:{}: {}", bind ? bind : "*", o_.supervisor_port,
                   system_->render(port.error()));
    }
    port_ = *port;
    driver_ = std::make_unique<supervisor_client>(*system_, supervisor_);
    log::debug("supervisor listening on {}:{}", bind ? bind : "*", port_);
  }
  worker_options wo;
  wo.rank = o_.rank;
  wo.world_size = o_.world_size;
  wo.cluster_token = o_.cluster_token;
  wo.host = o_.host;
  wo.device = o_.device;
  wo.backends = o_.backends;
  wo.join_timeout_ms = o_.join_timeout_ms;
  worker_ = std::make_unique<worker>(*system_, wo);
}

cluster_node::~cluster_node() {
  worker_.reset();
  driver_.reset();
  if (supervisor_) caf::anon_send_exit(supervisor_, caf::exit_reason::user_shutdown);
}

supervisor_client& cluster_node::driver() {
  TROUPE_CHECK(driver_ != nullptr, errc::invalid_argument, "only rank 0 runs the supervisor (this is rank {})",
               o_.rank);
  return *driver_;
}

void cluster_node::start() {
  caf::actor sup = supervisor_;
  if (!sup) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(o_.join_timeout_ms);
    std::string last;
    for (;;) {
      auto h = o_.tls.enabled()
                   ? caf::openssl::remote_actor(*system_, o_.supervisor_host, static_cast<uint16_t>(o_.supervisor_port))
                   : system_->middleman().remote_actor(o_.supervisor_host, static_cast<uint16_t>(o_.supervisor_port));
      if (h) {
        sup = *h;
        break;
      }
      last = system_->render(h.error());
      TROUPE_CHECK(std::chrono::steady_clock::now() < deadline, errc::io,
                   "rank {}: no supervisor at {}:{} after {} ms (is rank 0 running?): {}", o_.rank, o_.supervisor_host,
                   o_.supervisor_port, o_.join_timeout_ms, last);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  worker_->join(sup);
  o_.rank = worker_->rank();
}

int cluster_node::wait() {
  const int code = worker_->wait();
  if (code == 0) log::debug("stopped: {}", worker_->exit_reason());
  else log::error("stopping with exit code {}: {}", code, worker_->exit_reason());
  return code;
}

}  // namespace troupe::actors
