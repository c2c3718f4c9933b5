// actors/cluster.h — one process's actor system: the worker on every rank, and on
// rank 0 also the supervisor, published through the CAF middleman.
//
//   cluster_options o = ...;                 // from launch/rank_env (TROUPE_SUPERVISOR…)
//   cluster_node node(o);                    // rank 0: spawns + publishes the supervisor
//   node.local_worker().on(kind, handler);
//   node.start();                            // connects (retrying) and joins
//   if (node.is_supervisor()) drive(node.driver());
//   return node.wait();                      // exit code
//
// Invariants:
//   1. The supervisor listens on supervisor_host:supervisor_port. Loopback hosts bind
//      127.0.0.1 only; any other host binds every interface (multi-host jobs).
//   2. Joining retries the connection until join_timeout_ms (rank 0 may publish after
//      the other ranks start), then fails naming the address.
//   3. The CAF system uses scheduler_threads threads: control traffic is light, and the
//      cores belong to compute threads.
//   4. With tls.certificate set, every connection is TLS (caf_openssl) and each side
//      verifies the other's certificate against tls.cafile. Without TLS the cluster
//      token authenticates joins but the TCP stream is plain. (caf_openssl without
//      certificates falls back to anonymous Diffie-Hellman: encrypted, but it
//      authenticates no one — troupe refuses that mode rather than pretend.)
//   5. late_join: the process joins a group that already serves (supervisor.h invariant 8);
//      rank() is -1 until start() returns, then the rank the supervisor gave it. open_slots on
//      rank 0 says how many such processes may be members at once.
#pragma once
#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include <memory>
#include <optional>
#include <string>

#include "actors/supervisor.h"
#include "actors/worker.h"

namespace troupe::actors {

struct tls_options {
  std::string certificate;  // PEM file: this node's certificate
  std::string key;          // PEM file: its private key
  std::string passphrase;   // of the key, if any
  std::string cafile;       // PEM file: the CA that signed every node's certificate
  bool enabled() const { return !certificate.empty(); }
};

struct cluster_options {
  int rank = 0;
  int world_size = 1;
  std::string supervisor_host = "127.0.0.1";
  int supervisor_port = 0;  // rank 0: 0 = any free port (then only this process knows it)
  std::string cluster_token;
  std::string host;         // this process's host name, for logs
  std::string device = "cpu";
  std::vector<std::string> backends;
  int heartbeat_interval_ms = 500;
  int heartbeat_timeout_ms = 5000;
  int join_timeout_ms = 60000;
  int max_restarts = 0;
  bool keep_members = false;  // supervisor.h invariant 7 (an elastic serving group)
  int open_slots = 0;         // rank 0: late members alive at once (invariant 5)
  bool late_join = false;     // this process joins a running group (invariant 5)
  // The supervisor's expert placement (parallel/ep/ep_rebalance.h).
  bool rebalance_experts = false;
  parallel::ep::ep_rebalance_options experts;
  int scheduler_threads = 2;
  tls_options tls;
};

class cluster_node {
 public:
  explicit cluster_node(const cluster_options& options);
  ~cluster_node();
  cluster_node(const cluster_node&) = delete;
  cluster_node& operator=(const cluster_node&) = delete;

  bool is_supervisor() const { return o_.rank == 0 && !o_.late_join; }
  int rank() const { return o_.rank; }            // -1 for a late join until start() returns
  int supervisor_port() const { return port_; }  // the bound port (rank 0)
  worker& local_worker() { return *worker_; }
  supervisor_client& driver();                    // rank 0 only
  caf::actor_system& system() { return *system_; }

  void start();  // connect to the supervisor and join (throws on refusal / timeout)
  int wait();    // until this rank is told to stop; the exit code

 private:
  struct config;
  cluster_options o_;
  std::unique_ptr<config> cfg_;
  std::unique_ptr<caf::actor_system> system_;
  caf::actor supervisor_;
  int port_ = 0;
  std::unique_ptr<worker> worker_;
  std::unique_ptr<supervisor_client> driver_;
};

}  // namespace troupe::actors
