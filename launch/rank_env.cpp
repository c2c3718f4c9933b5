#include "launch/rank_env.h"

#include <charconv>
#include <cstdlib>

#include "runtime/error.h"

extern char** environ;

namespace troupe::launch {

namespace {
using runtime::errc;

const std::string* find(const env_map& env, const char* key) {
  auto it = env.find(key);
  return it == env.end() ? nullptr : &it->second;
}

int parse_int(const env_map& env, const char* key, int min_value) {
  const std::string& v = env.at(key);
  int out = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  TROUPE_CHECK(ec == std::errc() && p == v.data() + v.size() && !v.empty(), errc::invalid_argument,
               "environment: {}={:?} is not an integer", key, v);
  TROUPE_CHECK(out >= min_value, errc::invalid_argument, "environment: {}={} must be >= {}", key, out, min_value);
  return out;
}

// Reads (rank, size[, local rank, local size]) from one launcher's variables, if present.
bool read_source(const env_map& env, rank_info& r, const char* source, const char* rank_key, const char* size_key,
                 const char* local_rank_key, const char* local_size_key) {
  if (!find(env, rank_key)) return false;
  TROUPE_CHECK(find(env, size_key) != nullptr, errc::invalid_argument,
               "environment: {} is set but {} is not; the launcher must set both", rank_key, size_key);
  r.source = source;
  r.rank = parse_int(env, rank_key, 0);
  r.world_size = parse_int(env, size_key, 1);
  TROUPE_CHECK(r.rank < r.world_size, errc::invalid_argument, "environment: {}={} is not below {}={}", rank_key,
               r.rank, size_key, r.world_size);
  r.local_rank = local_rank_key && find(env, local_rank_key) ? parse_int(env, local_rank_key, 0) : 0;
  r.local_world_size = local_size_key && find(env, local_size_key) ? parse_int(env, local_size_key, 1) : 1;
  TROUPE_CHECK(r.local_rank < r.local_world_size || !(local_size_key && find(env, local_size_key)),
               errc::invalid_argument, "environment: {}={} is not below {}={}", local_rank_key, r.local_rank,
               local_size_key, r.local_world_size);
  return true;
}
}  // namespace

rank_info discover_rank(const env_map& env) {
  rank_info r;
  if (const std::string* join = find(env, "TROUPE_JOIN"); join != nullptr && *join != "0" && !join->empty()) {
    // Invariant 4: a process joining a running group; the supervisor gives its rank.
    TROUPE_CHECK(*join == "1", errc::invalid_argument, "environment: TROUPE_JOIN={:?} must be 1 or 0", *join);
    TROUPE_CHECK(find(env, "TROUPE_RANK") == nullptr, errc::invalid_argument,
                 "environment: TROUPE_JOIN=1 with TROUPE_RANK: a process that joins a running group gets its rank "
                 "from the supervisor");
    TROUPE_CHECK(find(env, "TROUPE_SUPERVISOR") != nullptr, errc::invalid_argument,
                 "environment: TROUPE_JOIN=1 needs TROUPE_SUPERVISOR (host:port of the running group's rank 0)");
    r.late_join = true;
    r.rank = -1;
    r.world_size = 0;
    r.source = "join";
    if (find(env, "TROUPE_LOCAL_RANK")) r.local_rank = parse_int(env, "TROUPE_LOCAL_RANK", 0);
    if (find(env, "TROUPE_LOCAL_WORLD_SIZE")) r.local_world_size = parse_int(env, "TROUPE_LOCAL_WORLD_SIZE", 1);
  }
  bool found = r.late_join || read_source(env, r, "troupe", "TROUPE_RANK", "TROUPE_WORLD_SIZE", "TROUPE_LOCAL_RANK",
                           "TROUPE_LOCAL_WORLD_SIZE") ||
               read_source(env, r, "openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                           "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE") ||
               read_source(env, r, "pmix", "PMIX_RANK", "PMIX_SIZE", nullptr, nullptr) ||
               read_source(env, r, "pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS");
  (void)found;
  if (const std::string* sup = find(env, "TROUPE_SUPERVISOR")) {
    const size_t colon = sup->rfind(':');
    TROUPE_CHECK(colon != std::string::npos && colon > 0 && colon + 1 < sup->size(), errc::invalid_argument,
                 "environment: TROUPE_SUPERVISOR={:?} must be host:port (e.g. 127.0.0.1:7000)", *sup);
    r.supervisor_host = sup->substr(0, colon);
    env_map port{{"TROUPE_SUPERVISOR port", sup->substr(colon + 1)}};
    r.supervisor_port = parse_int(port, "TROUPE_SUPERVISOR port", 1);
    TROUPE_CHECK(r.supervisor_port <= 65535, errc::invalid_argument,
                 "environment: TROUPE_SUPERVISOR port {} is above 65535", r.supervisor_port);
  }
  return r;
}

rank_info discover_rank() {
  env_map env;
  for (char** e = environ; e && *e; ++e) {
    std::string kv(*e);
    const size_t eq = kv.find('=');
    if (eq != std::string::npos) env.emplace(kv.substr(0, eq), kv.substr(eq + 1));
  }
  return discover_rank(env);
}

}  // namespace troupe::launch
