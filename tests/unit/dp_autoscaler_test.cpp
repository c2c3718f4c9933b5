// The elastic group's autoscaler (elastic/scale/dp_autoscaler.h) on made-up observations: it grows
// on a long queue or a TTFT p90 above the SLO and shrinks when idle, only after `patience` looks in a
// row, to the next size the model can run on within [min, max], never during a change or a cooldown.
#include <gtest/gtest.h>

#include "elastic/scale/dp_autoscaler.h"

namespace {

using namespace troupe::elastic;

autoscale_options opts() {
  autoscale_options o;
  o.min_ranks = 1;
  o.max_ranks = 4;
  o.ttft_slo_s = 1.0;
  o.queue_per_rank = 4;
  o.shrink_below = 0.25;
  o.patience = 3;
  o.cooldown_ms = 10000;
  return o;
}

autoscale_observation look(int64_t t, int ranks, int64_t waiting, double kv = 0.5) {
  autoscale_observation o;
  o.now_ms = t;
  o.ranks = ranks;
  o.waiting = waiting;
  o.kv_usage = kv;
  return o;
}

TEST(DpAutoscaler, AQueueLongerThanItsShareGrowsAfterPatienceToTheNextValidSize) {
  dp_autoscaler a(opts(), [](int r) { return 4 % r == 0; });  // 1, 2, 4
  EXPECT_FALSE(a.observe(look(0, 2, 9)));
  EXPECT_FALSE(a.observe(look(1000, 2, 9)));
  const auto d = a.observe(look(2000, 2, 9));
  ASSERT_TRUE(d);
  EXPECT_EQ(d->ranks, 4) << "3 is not a size the model runs on";
  EXPECT_EQ(d->reason, "queue");
  EXPECT_NE(a.metrics_text().find("troupe_autoscale_decisions_total{direction=\"up\",reason=\"queue\"} 1"),
            std::string::npos);
}

TEST(DpAutoscaler, ALookThatDisagreesStartsTheCountAgain) {
  dp_autoscaler a(opts(), nullptr);
  EXPECT_FALSE(a.observe(look(0, 1, 9)));
  EXPECT_FALSE(a.observe(look(1000, 1, 9)));
  EXPECT_FALSE(a.observe(look(2000, 1, 2)));  // a queue within its share: the count starts again
  EXPECT_FALSE(a.observe(look(3000, 1, 9)));
  EXPECT_FALSE(a.observe(look(4000, 1, 9)));
  EXPECT_TRUE(a.observe(look(5000, 1, 9)));
}

TEST(DpAutoscaler, ATtftP90AboveTheSloGrowsFromTheNewFirstTokensOnly) {
  dp_autoscaler a(opts(), nullptr);
  autoscale_observation o = look(0, 1, 0);
  for (int i = 0; i < 50; ++i) o.ttft.add(0.1);  // fast first tokens, long ago
  EXPECT_FALSE(a.observe(o));
  for (int k = 1; k <= 3; ++k) {
    o.now_ms = 1000 * k;
    for (int i = 0; i < 10; ++i) o.ttft.add(3.0);  // every new first token is slow
    const auto d = a.observe(o);
    if (k < 3) {
      EXPECT_FALSE(d) << k;
    } else {
      ASSERT_TRUE(d);
      EXPECT_EQ(d->ranks, 2);
      EXPECT_EQ(d->reason, "ttft");
    }
  }
}

TEST(DpAutoscaler, AnIdleGroupShrinksButNotBelowTheLeastSize) {
  autoscale_options o = opts();
  o.min_ranks = 2;
  o.cooldown_ms = 0;
  dp_autoscaler a(o, nullptr);
  for (int t = 0; t < 2; ++t) EXPECT_FALSE(a.observe(look(t * 1000, 3, 0, 0.1)));
  const auto d = a.observe(look(2000, 3, 0, 0.1));
  ASSERT_TRUE(d);
  EXPECT_EQ(d->ranks, 2);
  EXPECT_EQ(d->reason, "idle");
  for (int t = 3; t < 10; ++t) EXPECT_FALSE(a.observe(look(t * 1000, 2, 0, 0.1))) << "at the least size";
  EXPECT_FALSE(a.observe(look(10000, 2, 0, 0.5))) << "busy KV: no shrink";
}

TEST(DpAutoscaler, NothingDuringAChangeOrTheCooldownOrAtTheLargestSize) {
  dp_autoscaler a(opts(), nullptr);
  auto busy = [](int64_t t, int ranks, bool changing) {
    auto o = look(t, ranks, 100);
    o.changing = changing;
    return o;
  };
  EXPECT_FALSE(a.observe(busy(0, 1, true)));
  EXPECT_FALSE(a.observe(busy(1000, 1, true)));
  EXPECT_FALSE(a.observe(busy(2000, 1, true))) << "a change is under way";
  const auto d = a.observe(busy(3000, 1, false));
  ASSERT_TRUE(d);
  EXPECT_EQ(d->ranks, 2);
  for (int t = 4; t < 13; ++t) EXPECT_FALSE(a.observe(busy(t * 1000, 2, false))) << "cooldown at " << t;
  const auto e = a.observe(busy(13000, 2, false));
  ASSERT_TRUE(e);
  EXPECT_EQ(e->ranks, 3);
  for (int t = 30; t < 40; ++t) EXPECT_FALSE(a.observe(busy(t * 1000, 4, false))) << "at the largest size";
}

// Processes join a running group from outside: max_ranks counts the open slots, and a change never
// goes past the processes able to serve now (obs.able).
TEST(DpAutoscaler, AGrowthStopsAtTheProcessesAbleToServe) {
  dp_autoscaler a(opts(), nullptr);  // max 4
  auto busy = [](int64_t t, int able) {
    auto o = look(t, 2, 100);
    o.able = able;
    return o;
  };
  for (int t = 0; t < 5; ++t) EXPECT_FALSE(a.observe(busy(t * 1000, 2))) << "only 2 processes at " << t;
  const auto d = a.observe(busy(5000, 3));  // a third process joined
  ASSERT_TRUE(d);
  EXPECT_EQ(d->ranks, 3);
}

}  // namespace
