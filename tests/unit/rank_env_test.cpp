// Rank discovery from launcher environments (launch/rank_env.h).
#include "launch/rank_env.h"

#include <gtest/gtest.h>

#include <string>

#include "runtime/error.h"

using troupe::launch::discover_rank;
using troupe::launch::env_map;
using troupe::runtime::errc;
using troupe::runtime::error;

namespace {
// Expects discover_rank(env) to throw invalid_argument with `needle` in the message.
void expect_rejected(const env_map& env, const std::string& needle) {
  try {
    discover_rank(env);
    FAIL() << "accepted an environment that should be rejected (expected '" << needle << "')";
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::invalid_argument);
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(RankEnv, NothingSetIsOneRank) {
  auto r = discover_rank(env_map{{"PATH", "/bin"}});
  EXPECT_EQ(r.rank, 0);
  EXPECT_EQ(r.world_size, 1);
  EXPECT_EQ(r.local_rank, 0);
  EXPECT_EQ(r.source, "default");
  EXPECT_FALSE(r.has_supervisor());
}

TEST(RankEnv, OpenMpi) {
  auto r = discover_rank(env_map{{"OMPI_COMM_WORLD_RANK", "3"},
                                 {"OMPI_COMM_WORLD_SIZE", "8"},
                                 {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                                 {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}});
  EXPECT_EQ(r.source, "openmpi");
  EXPECT_EQ(r.rank, 3);
  EXPECT_EQ(r.world_size, 8);
  EXPECT_EQ(r.local_rank, 1);
  EXPECT_EQ(r.local_world_size, 4);
}

TEST(RankEnv, TroupeLauncherWinsOverMpiAndCarriesTheSupervisor) {
  auto r = discover_rank(env_map{{"TROUPE_RANK", "2"},
                                 {"TROUPE_WORLD_SIZE", "4"},
                                 {"TROUPE_SUPERVISOR", "127.0.0.1:7123"},
                                 {"OMPI_COMM_WORLD_RANK", "0"},
                                 {"OMPI_COMM_WORLD_SIZE", "1"}});
  EXPECT_EQ(r.source, "troupe");
  EXPECT_EQ(r.rank, 2);
  EXPECT_EQ(r.world_size, 4);
  EXPECT_EQ(r.supervisor_host, "127.0.0.1");
  EXPECT_EQ(r.supervisor_port, 7123);
}

TEST(RankEnv, PmixAndPmi) {
  auto x = discover_rank(env_map{{"PMIX_RANK", "5"}, {"PMIX_SIZE", "6"}});
  EXPECT_EQ(x.source, "pmix");
  EXPECT_EQ(x.rank, 5);
  EXPECT_EQ(x.world_size, 6);
  auto p = discover_rank(env_map{{"PMI_RANK", "1"}, {"PMI_SIZE", "2"}});
  EXPECT_EQ(p.source, "pmi");
  EXPECT_EQ(p.rank, 1);
  EXPECT_EQ(p.world_size, 2);
}

TEST(RankEnv, AJoinerHasNoRankUntilTheSupervisorGivesIt) {
  auto r = discover_rank(env_map{{"TROUPE_JOIN", "1"}, {"TROUPE_SUPERVISOR", "node-a:7000"},
                                 {"TROUPE_LOCAL_RANK", "1"}, {"TROUPE_LOCAL_WORLD_SIZE", "2"}});
  EXPECT_TRUE(r.late_join);
  EXPECT_EQ(r.rank, -1);
  EXPECT_EQ(r.world_size, 0);
  EXPECT_EQ(r.source, "join");
  EXPECT_EQ(r.local_rank, 1);
  EXPECT_EQ(r.local_world_size, 2);
  EXPECT_EQ(r.supervisor_host, "node-a");
  EXPECT_FALSE(discover_rank(env_map{{"TROUPE_JOIN", "0"}}).late_join);
  expect_rejected(env_map{{"TROUPE_JOIN", "1"}}, "needs TROUPE_SUPERVISOR");
  expect_rejected(env_map{{"TROUPE_JOIN", "1"}, {"TROUPE_SUPERVISOR", "a:1"}, {"TROUPE_RANK", "0"},
                     {"TROUPE_WORLD_SIZE", "2"}},
             "gets its rank from the supervisor");
  expect_rejected(env_map{{"TROUPE_JOIN", "yes"}, {"TROUPE_SUPERVISOR", "a:1"}}, "must be 1 or 0");
}

TEST(RankEnv, BadValuesNameTheVariable) {
  expect_rejected({{"TROUPE_RANK", "one"}, {"TROUPE_WORLD_SIZE", "4"}}, "TROUPE_RANK");
  expect_rejected({{"TROUPE_RANK", "4"}, {"TROUPE_WORLD_SIZE", "4"}}, "is not below TROUPE_WORLD_SIZE=4");
  expect_rejected({{"TROUPE_RANK", "-1"}, {"TROUPE_WORLD_SIZE", "4"}}, "TROUPE_RANK=-1 must be >= 0");
  expect_rejected({{"TROUPE_RANK", "0"}}, "TROUPE_WORLD_SIZE is not");
  expect_rejected({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "0"}}, "OMPI_COMM_WORLD_SIZE=0");
  expect_rejected({{"OMPI_COMM_WORLD_RANK", "0"},
                   {"OMPI_COMM_WORLD_SIZE", "2"},
                   {"OMPI_COMM_WORLD_LOCAL_RANK", "2"},
                   {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}},
                  "OMPI_COMM_WORLD_LOCAL_RANK=2");
  expect_rejected({{"TROUPE_SUPERVISOR", "localhost"}}, "host:port");
  expect_rejected({{"TROUPE_SUPERVISOR", "localhost:http"}}, "not an integer");
  expect_rejected({{"TROUPE_SUPERVISOR", "localhost:70000"}}, "above 65535");
}
